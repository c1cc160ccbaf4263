"""DeepFM reranker (DESIGN.md section 6) on DeepCTR-Torch, with embeddings transferred from the item tower.

Fields (one row = one shopper x one candidate):
- item STD fields (category, colour, print, ...) and a multi-value field of its other STD values, all
  looking up ONE table named ``std`` whose row ``i`` is STD id ``i`` of the shared vocabulary;
- the shopper's history as a multi-value field of the STD ids of their past items, in the same ``std``
  table: FM's <hist_std, category> term is then "how well this category matches what they bought";
- RE attributes (hashed ids) of the item and of the history in one table ``re`` (RE id ``i`` = row ``i``);
- bucketised profile fields (height, weight, age, body type), the context (hashed), history length;
- dense: retrieval score, already-bought flag, item popularity (window and its last third) and recency,
  price, raw profile numbers.

Weight transfer (``transfer_embeddings``): DeepCTR-Torch keeps each table in ``model.embedding_dict``
keyed by ``SparseFeat.embedding_name``; since ``std``/``re`` rows are the item tower's ids, the tower's
``emb_std``/``emb_re`` weights are projected to the ranker's width (PCA basis of the STD rows, or the
identity when the widths match), rescaled to a small per-coordinate std so the first logits are sane
(raw unit-scale vectors start the loss at ~1.5 instead of ln 2), and copied in under ``no_grad``.

References: Guo et al., "DeepFM: a factorization-machine based neural network for CTR prediction",
IJCAI 2017; Rendle, "Factorization machines", ICDM 2010; DeepCTR-Torch 0.3.0 (issues #211, #228,
#273 ask how to load pretrained embeddings: this module's answer is ``transfer_embeddings``).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from atelier.atomic import atomic_write
from atelier.models.item_tower import CheckpointError, read_payload

RANKER_FORMAT = 1

# Item STD fields that get their own FM field (first value); every other STD value goes to ``item_std``.
ITEM_FIELDS: tuple[str, ...] = ("category", "category_specification", "color", "print", "gender",
                                "fiber_composition")
USER_BUCKETS: tuple[str, ...] = ("height_b", "weight_b", "age_b", "body_type", "context", "hist_len_b")
DENSE: tuple[str, ...] = ("retrieval_score", "in_history", "item_pop", "item_pop_recent", "item_recency", "price",
                          "height", "weight", "age")


@dataclass
class RankerConfig:
    """Hyper-parameters of the DeepFM ranker; table sizes come from the vocabulary."""

    std_size: int
    re_size: int
    embedding_dim: int = 16  # DeepFM shares one width across fields; 16 keeps FM pairs cheap on CPU
    hist_len: int = 64  # STD ids of the most recent history items (about 8 items x 8 values)
    item_std_len: int = 12  # other STD values of an item (sleeve, neck, length, ...)
    re_len: int = 16  # RE ids of an item / of the history
    bucket_size: int = 64  # rows of each bucketised user table (0 = missing)
    dnn_hidden: tuple[int, ...] = (128, 64)  # small: rows are ~100 per user, a few hundred thousand in all
    dropout: float = 0.1
    l2_embedding: float = 1e-6  # DeepCTR's default 1e-5 pulls the transferred rows back to 0 quickly
    transfer: bool = True  # start std/re tables from the item tower (False = random, the ablation)
    # "table": the tower's emb_std/emb_re rows; "encoded": the tower's output vector of a one-attribute item
    # (the hm tower's tables barely moved from their init in training: its structure lives in the encoder)
    transfer_source: str = "table"
    init_scale: float = 0.03  # per-coordinate std of the std/re tables at start (transferred or random)
    seed: int = 0
    dense: tuple[str, ...] = field(default_factory=lambda: DENSE)


def quiet_deepctr() -> None:
    """Register the ``deepctr_torch`` package without running its ``__init__``, which starts a thread that
    asks PyPI for a newer release on every import: a network call from a server (offline, a stray printed
    line). Its submodules then import as usual; call before the first ``deepctr_torch`` import."""
    if "deepctr_torch" in sys.modules:
        return
    spec = importlib.util.find_spec("deepctr_torch")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("deepctr-torch is not installed: pip install deepctr-torch==0.3.0")
    package = types.ModuleType("deepctr_torch")
    package.__path__ = list(spec.submodule_search_locations)
    package.__version__ = "0.3.0"  # type: ignore[attr-defined]
    sys.modules["deepctr_torch"] = package


def feature_columns(cfg: RankerConfig) -> list[Any]:
    """DeepCTR feature columns: shared ``std``/``re`` tables, user bucket tables, dense fields."""
    quiet_deepctr()
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat

    d = cfg.embedding_dim
    cols: list[Any] = [SparseFeat(f"item_{f}", cfg.std_size, d, embedding_name="std") for f in ITEM_FIELDS]
    cols.append(VarLenSparseFeat(SparseFeat("item_std", cfg.std_size, d, embedding_name="std"), cfg.item_std_len))
    cols.append(VarLenSparseFeat(SparseFeat("hist_std", cfg.std_size, d, embedding_name="std"), cfg.hist_len))
    cols.append(VarLenSparseFeat(SparseFeat("item_re", cfg.re_size, d, embedding_name="re"), cfg.re_len))
    cols.append(VarLenSparseFeat(SparseFeat("hist_re", cfg.re_size, d, embedding_name="re"), cfg.re_len))
    cols += [SparseFeat(name, cfg.bucket_size, d) for name in USER_BUCKETS]
    cols += [DenseFeat(name, 1) for name in cfg.dense]
    return cols


def build_ranker(cfg: RankerConfig) -> Any:
    """A DeepFM over ``feature_columns(cfg)`` (std/re tables at random, scaled like a transfer)."""
    quiet_deepctr()
    from deepctr_torch.models import DeepFM

    cols = feature_columns(cfg)
    model = DeepFM(cols, cols, dnn_hidden_units=cfg.dnn_hidden, dnn_dropout=cfg.dropout,
                   l2_reg_embedding=cfg.l2_embedding, seed=cfg.seed, task="binary", device="cpu")
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for name in ("std", "re"):
            table = model.embedding_dict[name].weight
            table.copy_(torch.randn(table.shape, generator=gen) * cfg.init_scale)
            table[0].zero_()  # padding id: pooled away by the mask, zero keeps single fields neutral too
    return model


def projection(std_table: torch.Tensor, dim: int) -> torch.Tensor:
    """(d_tower, dim) map to the ranker width: identity when equal, else the top principal directions
    of the tower's STD rows (specials excluded), so most of the variance of the attribute space survives."""
    d_tower = std_table.shape[1]
    if dim == d_tower:
        return torch.eye(d_tower)
    assert dim < d_tower, f"ranker width {dim} exceeds the tower's {d_tower}: nothing to project into"
    rows = std_table[4:].double()  # ids 0..3 are [PAD] [MASK] [UNK] [CLS]
    _, _, vh = torch.linalg.svd(rows - rows.mean(0), full_matrices=False)
    return vh[:dim].T.float()  # (d_tower, dim)


@torch.no_grad()
def transfer_embeddings(model: Any, tower_state: dict[str, torch.Tensor], cfg: RankerConfig) -> dict[str, float]:
    """Copy the item tower's STD/RE tables into the ranker's ``std``/``re`` tables (same ids, row for row).

    ``tower_state`` is the item tower's ``state_dict`` (keys ``emb_std.weight``, ``emb_re.weight``). Both
    tables go through the same projection (RE rows are deltas in the STD space) and one scale factor,
    chosen so the STD rows have per-coordinate std ``cfg.init_scale``. Row 0 (padding) stays zero.
    Returns the scale and projection size for the record.
    """
    std_src, re_src = tower_state["emb_std.weight"].float(), tower_state["emb_re.weight"].float()
    dst_std, dst_re = model.embedding_dict["std"].weight, model.embedding_dict["re"].weight
    assert std_src.shape[0] == dst_std.shape[0], f"STD table {std_src.shape[0]} rows vs ranker {dst_std.shape[0]}"
    assert re_src.shape[0] == dst_re.shape[0], f"RE table {re_src.shape[0]} rows vs ranker {dst_re.shape[0]}"
    proj = projection(std_src, cfg.embedding_dim)
    std_new = std_src @ proj  # (std_size, dim)
    scale = cfg.init_scale / float(std_new[4:].std().clamp_min(1e-12))
    dst_std.copy_(std_new * scale)
    dst_re.copy_((re_src @ proj) * scale)
    dst_std[0].zero_()
    dst_re[0].zero_()
    return {"scale": scale, "tower_dim": float(std_src.shape[1]), "dim": float(cfg.embedding_dim)}


def fm_terms(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Per-pair FM second-order terms <e_i, e_j> (batch, n_fields, n_fields) and the field names.

    The FM part of the logit is the sum over i < j of these terms; half a row sum is a field's share.
    """
    embs, _ = model.input_from_feature_columns(x, model.dnn_feature_columns, model.embedding_dict)
    e = torch.cat(embs, dim=1)  # (batch, n_fields, dim)
    quiet_deepctr()
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat

    cols = model.dnn_feature_columns  # the order input_from_feature_columns returns: single, then varlen
    names = ([c.name for c in cols if isinstance(c, SparseFeat)]
             + [c.name for c in cols if isinstance(c, VarLenSparseFeat)])
    return e @ e.transpose(1, 2), names  # (batch, n_fields, n_fields)


def save_ranker(model: Any, cfg: RankerConfig, path: Path, extra: dict[str, Any]) -> None:
    """Self-describing checkpoint (config, weights, extras such as feature statistics); atomic write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": RANKER_FORMAT, "kind": "ranker", "config": asdict(cfg), "state_dict": model.state_dict(),
               **extra}
    with atomic_write(path) as fh:
        torch.save(payload, fh)


def load_ranker(path: Path) -> tuple[Any, RankerConfig, dict[str, Any]]:
    """Rebuild the ranker from its checkpoint alone: model (eval mode), config, payload."""

    payload = read_payload(path, "ranker", RANKER_FORMAT)
    raw = dict(payload["config"])
    raw["dnn_hidden"], raw["dense"] = tuple(raw["dnn_hidden"]), tuple(raw["dense"])
    cfg = RankerConfig(**raw)
    model = build_ranker(cfg)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the config: {exc}") from None
    return model.eval(), cfg, payload
