"""Item tower (DESIGN.md section 4): STD, RE and text tokens -> one L2-normalised item vector.

- STD token  = Emb_std(value) + Emb_field(field)
- RE token   = Emb_re(crc32 bucket) + stopgrad(Emb_std(parent STD value)) + Emb_field(field):
  an RE word is learned as a delta on its STD parent, so a brand-new trend word starts at its
  parent's meaning instead of at noise.
- text token = Linear(frozen all-MiniLM-L6-v2 sentence vector) + Emb_field("title"/"description")
- [CLS] + all tokens -> pre-norm GELU transformer encoder -> residual MLP head on [CLS] -> L2 norm.

References: Vaswani et al. 2017 (transformer); Xiong et al. 2020 (pre-norm); Gao, Yao and
Chen, "SimCSE", EMNLP 2021 (contrastive training, see ``atelier.models.losses``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from atelier.atomic import atomic_write
from atelier.vocab import ItemTokens, tensorise

CHECKPOINT_FORMAT = 1
LENGTH_GROUPS = 4  # rows of a batch are encoded in this many groups of similar length (ItemTower.encode_cls)


@dataclass
class ItemTowerConfig:
    """Hyper-parameters of the item tower; sizes of the tables come from the vocabulary."""

    std_size: int
    re_size: int
    field_size: int
    text_dim: int = 384  # all-MiniLM-L6-v2
    n_text: int = 2  # title, title+description
    d_model: int = 128  # a few hundred STD values and short token sequences need no more
    n_layers: int = 2
    n_heads: int = 4
    ff_mult: int = 4
    dropout: float = 0.1
    head_blocks: int = 2  # residual MLP blocks after the encoder
    out_dim: int = 128  # vector stored in pgvector
    title_field_id: int = 0  # field ids of the text tokens (from the vocabulary)
    description_field_id: int = 0


class ResidualBlock(nn.Module):
    """x + MLP(LayerNorm(x)): a pre-norm residual block for the head."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


@dataclass
class ItemInputs:
    """Everything the tower reads for a batch: tokens, frozen text vectors, and their mask."""

    tokens: ItemTokens
    text: torch.Tensor  # (batch, n_text, text_dim) float
    text_mask: torch.Tensor  # (batch, n_text) bool: True where the text exists

    def to(self, device: torch.device | str) -> ItemInputs:
        """Move every tensor to ``device``."""
        t = self.tokens
        return ItemInputs(
            ItemTokens(*(getattr(t, f).to(device) for f in (
                "std_ids", "std_field_ids", "std_mask", "re_ids", "re_parent_ids", "re_field_ids", "re_mask"))),
            self.text.to(device), self.text_mask.to(device),
        )


class ItemTower(nn.Module):
    """The item encoder; built from its config alone so a checkpoint rebuilds it."""

    def __init__(self, config: ItemTowerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.emb_std = nn.Embedding(config.std_size, d, padding_idx=0)
        self.emb_re = nn.Embedding(config.re_size, d, padding_idx=0)
        self.emb_field = nn.Embedding(config.field_size, d, padding_idx=0)
        self.text_proj = nn.Linear(config.text_dim, d)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        layer = nn.TransformerEncoderLayer(d, config.n_heads, config.ff_mult * d, config.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Sequential(*[ResidualBlock(d, config.dropout) for _ in range(config.head_blocks)],
                                  nn.LayerNorm(d), nn.Linear(d, config.out_dim))
        for emb in (self.emb_std, self.emb_re, self.emb_field):
            nn.init.normal_(emb.weight, std=0.02)
            with torch.no_grad():
                emb.weight[0].zero_()
        nn.init.normal_(self.cls, std=0.02)
        text_fields = torch.tensor([config.title_field_id, config.description_field_id][: config.n_text])
        self.register_buffer("text_field_ids", text_fields, persistent=False)

    def embed(self, x: ItemInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings (batch, 1 + n_std + n_re + n_text, d) and the padding mask (True = pad)."""
        t = x.tokens
        std = self.emb_std(t.std_ids) + self.emb_field(t.std_field_ids)  # (B, Ls, d)
        parent = self.emb_std(t.re_parent_ids).detach()  # stop-gradient: RE tokens never move STD rows
        re_tok = self.emb_re(t.re_ids) + parent + self.emb_field(t.re_field_ids)  # (B, Lr, d)
        text = self.text_proj(x.text) + self.emb_field(self.text_field_ids)[None]  # (B, Lt, d)
        batch = std.shape[0]
        tokens = torch.cat([self.cls.expand(batch, -1, -1), std, re_tok, text], dim=1)
        keep = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=std.device),
                          t.std_mask, t.re_mask, x.text_mask], dim=1)
        return tokens, ~keep

    def forward(self, x: ItemInputs) -> torch.Tensor:
        """L2-normalised item vectors, shape (batch, out_dim)."""
        tokens, pad = self.embed(x)
        return F.normalize(self.head(self.norm(self.encode_cls(tokens, pad))), dim=-1)

    def encode_cls(self, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """The encoder's [CLS] output of every row, (batch, d). Rows are encoded in ``LENGTH_GROUPS`` groups of
        similar length, each with its kept tokens moved to the front and cut to its longest row: exact (the
        encoder treats rows independently, has no positions and never attends to a pad) and about half the
        work, since an item's kept tokens vary from a few to thirty and one padded batch pays for the longest."""
        n = tokens.shape[0]
        if n == 0:
            return tokens[:, 0]
        lengths = (~pad).sum(1)
        order = torch.argsort(lengths)
        outs = []
        for part in order.tensor_split(min(LENGTH_GROUPS, n)):
            width = int(lengths[part].max())
            keep = torch.argsort(pad[part].to(torch.int8), dim=1, stable=True)[:, :width]  # [CLS] stays first
            group = torch.gather(tokens[part], 1, keep[..., None].expand(-1, -1, tokens.shape[2]))
            outs.append(self.encoder(group, src_key_padding_mask=torch.gather(pad[part], 1, keep))[:, 0])
        return torch.cat(outs)[torch.argsort(order)]


def save_checkpoint(model: ItemTower, path: Path, vocab: dict[str, Any], extra: dict[str, Any]) -> None:
    """Self-describing checkpoint: config, vocabulary, schema version, weights; written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT, "kind": "item_tower", "config": asdict(model.config), "vocab": vocab,
        "schema_version": vocab.get("schema_version", ""), "state_dict": model.state_dict(), **extra,
    }
    with atomic_write(path) as fh:
        torch.save(payload, fh)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or not an item tower of this format."""


def read_payload(path: Path, kind: str, fmt: int, device: str = "cpu") -> dict[str, Any]:
    """A self-describing checkpoint's payload, checked for its ``kind`` ("item_tower", "user_tower") and
    format; CheckpointError with what to run when it is missing, unreadable or something else."""
    what = kind.replace("_", " ")
    try:
        payload = torch.load(path, map_location=device, weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint; run `atelier train {kind.split('_')[0]}` first") from None
    except Exception as exc:  # torch raises several types for a truncated or foreign file
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        raise CheckpointError(f"{path}: not a checkpoint of the {what}")
    if payload.get("format") != fmt:
        raise CheckpointError(f"{path}: checkpoint format {payload.get('format')}, expected {fmt}")
    return payload


def load_checkpoint(path: Path, device: str = "cpu") -> tuple[ItemTower, dict[str, Any]]:
    """Rebuild the tower from a checkpoint file alone; returns the model (eval mode) and the payload."""
    payload = read_payload(path, "item_tower", CHECKPOINT_FORMAT, device)
    missing = [k for k in ("config", "vocab", "state_dict") if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: item tower checkpoint lacks {missing}")
    try:
        model = ItemTower(ItemTowerConfig(**payload["config"]))
        model.load_state_dict(payload["state_dict"])
    except (TypeError, RuntimeError, AssertionError) as exc:
        raise CheckpointError(f"{path}: weights do not match the config: {exc}") from None
    return model.to(device).eval(), payload


def item_inputs(items: Any, vocab: Any, text: Any, max_std: int = 32, max_re: int = 48) -> ItemInputs:
    """Tower inputs for item JSONs plus their frozen text vectors (numpy or tensor, (n, n_text, 384)).

    An all-zero text vector (an item with no text) is masked out.
    """

    tokens = tensorise(items, vocab, max_std=max_std, max_re=max_re)
    text_t = torch.as_tensor(text, dtype=torch.float32)
    if text_t.dim() == 2:
        text_t = text_t[:, None, :]  # (n, 1, text_dim)
    assert text_t.shape[0] == len(tokens), f"{len(tokens)} items but {text_t.shape[0]} text rows"
    return ItemInputs(tokens, text_t, text_t.abs().sum(-1) > 0)


def slice_inputs(x: ItemInputs, idx: torch.Tensor) -> ItemInputs:
    """Rows ``idx`` of a catalogue's inputs (for batching)."""
    t = x.tokens
    return ItemInputs(
        ItemTokens(t.std_ids[idx], t.std_field_ids[idx], t.std_mask[idx], t.re_ids[idx], t.re_parent_ids[idx],
                   t.re_field_ids[idx], t.re_mask[idx]),
        x.text[idx], x.text_mask[idx],
    )


def stack_inputs(a: ItemInputs, b: ItemInputs) -> ItemInputs:
    """Two batches of the same shapes as one batch (``a`` first): two views in one forward."""
    ta, tb = a.tokens, b.tokens
    return ItemInputs(
        ItemTokens(*(torch.cat([getattr(ta, f), getattr(tb, f)]) for f in (
            "std_ids", "std_field_ids", "std_mask", "re_ids", "re_parent_ids", "re_field_ids", "re_mask"))),
        torch.cat([a.text, b.text]), torch.cat([a.text_mask, b.text_mask]),
    )


def mask_parts(x: ItemInputs, std: bool = True, re: bool = True, text: bool = True) -> ItemInputs:
    """The same inputs with whole token types hidden (for ablations: STD only, text only, ...)."""
    t = x.tokens
    return ItemInputs(
        ItemTokens(t.std_ids, t.std_field_ids, t.std_mask & std, t.re_ids, t.re_parent_ids, t.re_field_ids,
                   t.re_mask & re),
        x.text, x.text_mask & text,
    )


@torch.inference_mode()
def encode_items(model: ItemTower, x: ItemInputs, batch_size: int = 4096, device: str = "cpu") -> Any:
    """Vectors of every item, a float32 numpy array (n, out_dim), in input order."""
    import numpy as np

    model.eval()
    n = len(x.tokens)
    out = np.zeros((n, model.config.out_dim), dtype=np.float32)
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        out[start : start + len(idx)] = model(slice_inputs(x, idx).to(device)).float().cpu().numpy()
    return out
