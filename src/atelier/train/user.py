"""Training the user tower against frozen item vectors (DESIGN.md section 5).

- ``build_examples``: next-interaction examples from a time-ordered log (history = the user's items
  strictly before the target's timestamp, so a basket never sees itself), plus empty-history examples
  from first interactions (profile/context-only shoppers), at most half of all examples.
- ``train_user_tower``: setup -> loop -> evaluate -> keep the best. Sampled softmax over in-batch
  targets plus ``n_sampled`` popularity-sampled negatives, logQ-corrected (Yi et al., RecSys 2019);
  AdamW with warm-up and cosine decay; early stopping on validation Recall@100 over the whole
  catalogue; bf16 autocast on GPU. The item vectors are a constant tensor: no gradient reaches them.
- ``TwoTowerRecommender``: the harness's two-tower retriever, whose ``fit`` trains (or reloads an identical
  earlier fit of) the tower on the window it is given; inference is ``atelier.recommend.user_tower``.

References: Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
Recommendations", RecSys 2019; Yang et al., "Mixed Negative Sampling for Learning Two-tower Neural
Networks in Recommendations", WWW 2020 (in-batch + sampled negatives).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
import torch

from atelier.models.losses import sampled_softmax
from atelier.models.user_tower import (
    PARTS,
    PROFILE_FIELDS,
    ProfileStats,
    UserInputs,
    UserTower,
    UserTowerConfig,
    save_user_checkpoint,
)
from atelier.recommend.encoder import catalogue_vectors, file_id
from atelier.recommend.user_tower import (
    EncodeFn,
    UserTowerRecommender,
    bias_segments,
    log_popularity,
    retrieval_keys,
)
from atelier.recommender import Query, Recommender, TrainData
from atelier.text import TEXT_DIM, encode_texts
from atelier.train.item import lr_at, optimizer_step

ProgressFn = Callable[[int, int, float], None]  # (step, total steps, loss)


@dataclass
class TrainUserConfig:
    """Sampled-softmax recipe for the user tower."""

    epochs: int = 3  # validation recall plateaus after 2-3 passes; CPU time is the budget
    batch_size: int = 512  # in-batch negatives come free with the batch
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.05
    temperature: float = 0.05  # the item tower's: vectors live on the same sphere
    n_sampled: int = 1024  # popularity-sampled negatives shared by the batch (mixed negative sampling)
    logq: bool = True  # subtract log sampling probability, else popular items are over-penalised
    patience: int = 2  # epochs without a better validation Recall@100 before stopping
    seed: int = 0
    device: str = "cpu"
    drop: frozenset[str] = frozenset()  # parts hidden in training and at inference (ablations)
    val_max_examples: int = 20_000  # validation examples scored per epoch (random subset): bounds its time
    max_train_examples: int | None = None  # random subset of the training examples (CPU budget)
    basket_history: bool = False  # ``from_training``: basket-mates as history in training examples (not in validation)
    val_frac_days: float = 0.1  # ``from_training``: the last 10% of distinct days validate
    recent_days: float | None = None  # ``from_training``: only targets of the last N days (histories see all)


# ---------------------------------------------------------------- examples


@dataclass
class Examples:
    """Next-interaction training examples, as arrays (one row per example)."""

    history: np.ndarray  # (n, max_history) int64 item rows, [:, 0] = most recent, -1 = none
    target: np.ndarray  # (n,) int64 item row
    ts: np.ndarray  # (n,) datetime64: when the target happened
    user_rows: np.ndarray  # (n,) int64 row of the user in ``users`` (-1 = unknown user)
    profile: np.ndarray  # (n, len(PROFILE_FIELDS)) float32, NaN = missing
    body_type: np.ndarray  # (n,) int64, 0 = unknown
    context_ids: np.ndarray  # (n,) int64 row of ``context_vectors``, -1 = no context
    context_vectors: np.ndarray  # (n_contexts, 384) MiniLM vectors of ``context_texts``
    context_texts: list[str] = field(default_factory=list)
    body_vocab: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.target)

    def subset(self, rows: np.ndarray) -> Examples:
        """The examples at ``rows`` (a boolean mask or indices); tables are shared."""
        return replace(self, history=self.history[rows], target=self.target[rows], ts=self.ts[rows],
                       user_rows=self.user_rows[rows], profile=self.profile[rows], body_type=self.body_type[rows],
                       context_ids=self.context_ids[rows])

    def profile_stats(self) -> ProfileStats:
        """Z-score statistics over the distinct users of these examples (each user counted once)."""
        _, first = np.unique(self.user_rows, return_index=True)
        return ProfileStats.from_values(self.profile[first], PROFILE_FIELDS)


def body_vocabulary(users: pd.DataFrame) -> dict[str, int]:
    """Body type -> id (1..n, sorted, so every run agrees); 0 is reserved for unknown."""
    if "body_type" not in users.columns:
        return {}
    values = sorted({str(v).strip().lower() for v in users["body_type"].dropna() if str(v).strip()})
    return {v: i + 1 for i, v in enumerate(values)}


def _profiles(users: pd.DataFrame, body_vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per users-row numeric profile (n_users, 3) with NaN, and body-type ids (n_users,)."""
    cols = [users[f].astype("float64").to_numpy() if f in users.columns else np.full(len(users), np.nan)
            for f in PROFILE_FIELDS]
    numeric = np.stack(cols, axis=1).astype(np.float32) if len(users) else np.zeros((0, len(PROFILE_FIELDS)),
                                                                                      np.float32)
    if "body_type" in users.columns:
        body = users["body_type"].astype("string").str.strip().str.lower().map(body_vocab)
        body_ids = body.fillna(0).astype("int64").to_numpy()
    else:
        body_ids = np.zeros(len(users), dtype=np.int64)
    return numeric, body_ids


def _dedupe_recent(window: np.ndarray, max_history: int) -> np.ndarray:
    """Per row keep the first (most recent) occurrence of each item, compacted to the left, cut to max_history."""
    keep = window >= 0
    for h in range(1, window.shape[1]):
        keep[:, h] &= ~(window[:, :h] == window[:, h : h + 1]).any(axis=1)
    order = np.argsort(~keep, axis=1, kind="stable")  # kept slots first, in recency order
    out = np.where(np.take_along_axis(keep, order, axis=1), np.take_along_axis(window, order, axis=1), -1)
    return out[:, :max_history]


def build_examples(
    interactions: pd.DataFrame, item_index: dict[str, int], users: pd.DataFrame, max_history: int,
    *, body_vocab: dict[str, int] | None = None, encode: EncodeFn | None = None, max_empty_frac: float = 0.5,
    basket_history: bool = False, seed: int = 0,
) -> Examples:
    """Next-interaction examples from a log (user_id, item_id, ts [, occasion]).

    For each interaction: history = the user's distinct items strictly before its timestamp (most
    recent first, at most ``max_history``; interactions at the same timestamp form one basket and do
    not see each other), target = its item, profile from ``users``, context = its ``occasion``.
    Interactions with no earlier item (first baskets) become empty-history examples, subsampled to at
    most ``max_empty_frac`` of the result. Exact duplicate rows (H&M quantities) count once; items not
    in ``item_index`` are dropped. ``encode`` turns context texts into vectors (default: MiniLM).

    ``basket_history=True`` (training augmentation for day-stamped logs such as H&M's, where a day's
    basket has no order): the history also holds the *other* items of the target's basket, most recent
    of all, so every multi-item basket yields examples with history. It never shows a later basket.
    """
    body_vocab = body_vocabulary(users) if body_vocab is None else body_vocab
    cols = ["user_id", "item_id", "ts"] + (["occasion"] if "occasion" in interactions.columns else [])
    log = interactions[cols].copy()
    log["row"] = log["item_id"].astype(str).map(item_index)
    log = log.dropna(subset=["row"]).drop_duplicates(["user_id", "item_id", "ts"])
    log = log.sort_values(["user_id", "ts"], kind="stable").reset_index(drop=True)
    n = len(log)
    user_codes = pd.factorize(log["user_id"])[0]
    items = log["row"].to_numpy(dtype=np.int64)
    ts = log["ts"].to_numpy()
    idx = np.arange(n)
    new_user = np.r_[True, user_codes[1:] != user_codes[:-1]] if n else np.zeros(0, bool)
    new_basket = new_user | np.r_[True, ts[1:] != ts[:-1]] if n else np.zeros(0, bool)
    user_start = np.maximum.accumulate(np.where(new_user, idx, 0)) if n else idx
    basket_start = np.maximum.accumulate(np.where(new_basket, idx, 0)) if n else idx
    # A window twice the history length, so repeats removed still leave max_history items.
    width = 2 * max_history
    if basket_history:
        basket_end = np.r_[np.flatnonzero(new_basket)[1:], n][np.cumsum(new_basket) - 1] if n else idx
        pos = basket_end[:, None] - 1 - np.arange(width + 1)[None]  # (n, 2H + 1): basket, then earlier
        pos = np.take_along_axis(pos, np.argsort(pos == idx[:, None], axis=1, kind="stable"), axis=1)[:, :width]
    else:
        pos = basket_start[:, None] - 1 - np.arange(width)[None]  # (n, 2H), most recent first
    window = np.where(pos >= user_start[:, None], items[np.clip(pos, 0, None)], -1)
    history = _dedupe_recent(window, max_history)

    empty = np.flatnonzero(history[:, 0] < 0)
    rng = np.random.default_rng(seed)
    n_full = n - len(empty)
    cap = math.floor(max_empty_frac / (1 - max_empty_frac) * n_full) if max_empty_frac < 1 else len(empty)
    keep = np.ones(n, dtype=bool)
    if len(empty) > cap:
        keep[rng.choice(empty, size=len(empty) - cap, replace=False)] = False

    user_lookup = pd.Series(np.arange(len(users)), index=users["user_id"].astype(str).to_numpy())
    user_rows = log["user_id"].astype(str).map(user_lookup).fillna(-1).to_numpy(dtype=np.int64)
    numeric, body_ids = _profiles(users, body_vocab)
    known = user_rows >= 0
    profile = np.full((n, len(PROFILE_FIELDS)), np.nan, dtype=np.float32)
    profile[known] = numeric[user_rows[known]]
    body = np.zeros(n, dtype=np.int64)
    body[known] = body_ids[user_rows[known]]

    texts: list[str] = []
    context_ids = np.full(n, -1, dtype=np.int64)
    if "occasion" in log.columns:
        occasion = log["occasion"].astype("string").str.strip().fillna("")
        codes, uniques = pd.factorize(occasion.where(occasion != "", None))
        context_ids, texts = codes.astype(np.int64), [str(t) for t in uniques]
    vectors = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
    if texts:
        vectors = np.asarray((encode or encode_texts)(texts), dtype=np.float32)
        assert vectors.shape == (len(texts), TEXT_DIM), f"encoder gave {vectors.shape} for {len(texts)} texts"
    return Examples(history[keep], items[keep], ts[keep], user_rows[keep], profile[keep], body[keep],
                    context_ids[keep], vectors, texts, dict(body_vocab))


def split_by_days(examples: Examples, val_frac_days: float = 0.1) -> tuple[Examples, Examples]:
    """Train on examples before the last ``val_frac_days`` of distinct target days, validate on those days."""
    days = np.unique(examples.ts.astype("datetime64[D]"))
    assert len(days) >= 2, f"need at least two distinct days to hold some out, got {len(days)}"
    n_val = min(len(days) - 1, max(1, math.ceil(val_frac_days * len(days))))
    cut = days[-n_val]
    is_val = examples.ts.astype("datetime64[D]") >= cut
    return examples.subset(~is_val), examples.subset(is_val)


# ---------------------------------------------------------------- item popularity




# ---------------------------------------------------------------- tensors


def example_inputs(examples: Examples, rows: np.ndarray, items: torch.Tensor) -> UserInputs:
    """Tower inputs for ``examples`` rows; ``items`` is the frozen (n_items, item_dim) table on the target device
    (wider retrieval keys are cut to their first ``item_dim`` columns by the caller)."""
    device = items.device
    hist = torch.from_numpy(examples.history[rows]).to(device)  # (B, H)
    mask = hist >= 0
    history = items[hist.clamp_min(0)] * mask.unsqueeze(-1).to(items.dtype)  # (B, H, item_dim)
    # Row -1 (no context) reads an appended zero row.
    table = np.concatenate([examples.context_vectors, np.zeros((1, TEXT_DIM), np.float32)])
    ctx_ids = examples.context_ids[rows]
    context = torch.from_numpy(table[ctx_ids]).to(device)  # (B, 384)
    return UserInputs(history, mask, context, torch.from_numpy(ctx_ids >= 0).to(device),
                      torch.from_numpy(examples.profile[rows]).to(device),
                      torch.from_numpy(examples.body_type[rows]).to(device))




# ---------------------------------------------------------------- loss




# ---------------------------------------------------------------- training


@torch.inference_mode()
def user_vectors(model: UserTower, inputs_fn: Callable[[np.ndarray], UserInputs], n: int,
                 batch_size: int = 2048) -> torch.Tensor:
    """(n, out_dim) user vectors, computed in batches of rows."""
    model.eval()
    chunks = [model(inputs_fn(np.arange(s, min(s + batch_size, n)))).float() for s in range(0, n, batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, model.config.query_dim)


@torch.inference_mode()
def recall_at(model: UserTower, examples: Examples, keys: torch.Tensor, k: int = 100,
              drop: frozenset[str] = frozenset(), batch_size: int = 1024) -> float:
    """Share of examples whose target is in the top ``k`` of the whole catalogue (brute-force matmul over
    the retrieval ``keys``, whose first ``item_dim`` columns are the item vectors)."""
    if len(examples) == 0:
        return float("nan")
    items = keys[:, : model.config.item_dim]
    hits = 0
    for s in range(0, len(examples), batch_size):
        rows = np.arange(s, min(s + batch_size, len(examples)))
        u = model(example_inputs(examples, rows, items).hide(drop)).float()  # (b, query_dim)
        top = (u @ keys.float().T).topk(min(k, len(keys)), dim=1).indices  # (b, k)
        hits += int((top == torch.from_numpy(examples.target[rows]).to(top.device)[:, None]).any(1).sum())
    return hits / len(examples)


def train_user_tower(
    item_vectors: np.ndarray, train_examples: Examples, val_examples: Examples, model_cfg: UserTowerConfig,
    cfg: TrainUserConfig, progress: ProgressFn | None = None, item_bias: np.ndarray | None = None,
) -> tuple[UserTower, dict[str, Any]]:
    """Train a user tower against frozen item vectors; returns the best model (eval mode) and a history
    (``epochs[0]`` is the untrained tower; ``best_epoch`` 0 means training never beat it). With
    ``model_cfg.item_bias`` the keys are ``[v, item_bias]`` (default: log popularity of the training targets)."""
    # ---- setup
    unknown = set(cfg.drop) - set(PARTS)
    assert not unknown, f"unknown parts to drop {sorted(unknown)}; choose from {PARTS}"
    assert item_vectors.shape[1] == model_cfg.item_dim, (
        f"item vectors {item_vectors.shape} but item_dim {model_cfg.item_dim}")
    assert len(train_examples) > 0, "no training examples"
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.max_train_examples is not None and len(train_examples) > cfg.max_train_examples:
        train_examples = train_examples.subset(np.sort(rng.choice(len(train_examples), cfg.max_train_examples,
                                                                  replace=False)))
    if len(val_examples) > cfg.val_max_examples:
        val_examples = val_examples.subset(np.sort(rng.choice(len(val_examples), cfg.val_max_examples, replace=False)))
    n_body = max(model_cfg.n_body_types, len(train_examples.body_vocab) + 1)
    model_cfg = replace(model_cfg, n_body_types=n_body)
    model = UserTower(model_cfg).to(device)
    stats = train_examples.profile_stats()
    model.set_profile_stats(stats)
    # Frozen: a plain tensor, never a parameter, so the optimiser cannot touch it.
    counts = np.bincount(train_examples.target, minlength=len(item_vectors)).astype(np.float64)
    if model_cfg.item_bias and item_bias is None:
        item_bias = np.log1p(counts).astype(np.float32)[:, None]
    if model_cfg.item_bias:
        assert item_bias is not None and item_bias.reshape(len(item_vectors), -1).shape[1] == model_cfg.n_bias, (
            f"item_bias must have {model_cfg.n_bias} columns (overall + segments {model_cfg.bias_segments})")
    keys = torch.as_tensor(retrieval_keys(item_vectors, item_bias if model_cfg.item_bias else None),
                           device=device).requires_grad_(False)
    items = keys[:, : model_cfg.item_dim]
    q = torch.as_tensor(counts / counts.sum(), dtype=torch.float32, device=device)  # popularity sampling
    log_q = torch.log(q.clamp_min(1e-12)) if cfg.logq else None
    n = len(train_examples)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = steps_per_epoch * cfg.epochs
    no_decay = [p for name, p in model.named_parameters() if p.dim() < 2 or "emb" in name or "recency" in name]
    decay = [p for name, p in model.named_parameters() if p.dim() >= 2 and "emb" not in name and "recency" not in name]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total, max(1, int(cfg.warmup_frac * total))))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    amp = device.type == "cuda"
    history: dict[str, Any] = {
        "config": {**asdict(cfg), "drop": sorted(cfg.drop)}, "model_config": asdict(model_cfg), "epochs": [],
        "train_examples": n, "val_examples": len(val_examples), "profile_stats": stats.to_dict(),
        "train_empty_history": float((train_examples.history[:, 0] < 0).mean()),
    }
    drop = frozenset(cfg.drop)
    # Epoch 0 is a candidate too: with ``history_skip`` the untrained tower is content kNN, and a few
    # epochs on little data must beat that to be kept.
    t0 = time.perf_counter()
    start = recall_at(model, val_examples, keys, 100, drop)
    history["epochs"].append({"epoch": 0, "loss": float("nan"), "val_recall@100": start,
                              "seconds": round(time.perf_counter() - t0, 2)})
    best = (start if start == start else -1.0, 0, copy.deepcopy(model.state_dict()))

    # ---- loop
    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        perm = rng.permutation(n)
        losses = []
        for b in range(steps_per_epoch):
            rows = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            x = example_inputs(train_examples, rows, items).hide(drop)
            targets = torch.from_numpy(train_examples.target[rows]).to(device)
            negatives = torch.multinomial(q, cfg.n_sampled, replacement=True, generator=gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                u = model(x)
            loss = sampled_softmax(u.float(), keys, targets, negatives, log_q, cfg.temperature)
            optimizer_step(loss, model, opt, sched)
            step += 1
            losses.append(loss.item())
            if progress is not None:
                progress(step, total, losses[-1])
        # ---- evaluate: validation Recall@100 over the whole catalogue
        recall = recall_at(model, val_examples, keys, 100, drop)
        seconds = time.perf_counter() - t0
        history["epochs"].append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_recall@100": recall,
                                  "seconds": round(seconds, 2)})
        if not recall <= best[0]:  # NaN (no validation examples) keeps the latest epoch
            best = (recall, epoch + 1, copy.deepcopy(model.state_dict()))
        elif epoch + 1 - best[1] >= cfg.patience:
            break
    model.load_state_dict(best[2])
    history["best_epoch"], history["best_val_recall@100"] = best[1], best[0]
    return model.eval(), history


# ---------------------------------------------------------------- retrieval


def random_item_vectors(items: pd.DataFrame, dim: int = 128, column: str = "category", item_weight: float = 1.0,
                        seed: int = 0) -> np.ndarray:
    """Item vectors for a catalogue without an item tower: a fixed Gaussian random projection of the one-hot
    of (``column`` value, item id), L2-normalised. Items of one category share a direction (cosine about
    1 / (1 + item_weight^2)); the item part keeps them distinguishable so the tower can learn item popularity."""
    rng = np.random.default_rng(seed)
    codes, uniques = pd.factorize(items[column].astype("string").fillna("?"))
    cat = rng.standard_normal((len(uniques), dim)).astype(np.float32) / np.sqrt(dim)
    own = rng.standard_normal((len(items), dim)).astype(np.float32) / np.sqrt(dim)
    vectors = cat[codes] + item_weight * own
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def train_user_recommender(
    data: TrainData, item_ids: Sequence[str], item_vectors: np.ndarray, cfg: TrainUserConfig,
    model_cfg: UserTowerConfig | None = None, progress: ProgressFn | None = None, **kwargs: Any,
) -> UserTowerRecommender:
    """Train a tower on ``data.interactions`` (the last ``cfg.val_frac_days`` of days validate) and
    return the fitted recommender (``cfg.drop`` applies at inference too)."""
    model_cfg = model_cfg or UserTowerConfig(item_dim=item_vectors.shape[1])
    if model_cfg.item_bias and not model_cfg.bias_segments:
        model_cfg = replace(model_cfg, bias_segments=bias_segments(data.interactions))
    index = {str(item): i for i, item in enumerate(item_ids)}
    encode = partial(encode_texts, cache_dir=data.cache_dir)
    examples = build_examples(data.interactions, index, data.users, model_cfg.max_history, encode=encode,
                              seed=cfg.seed)
    if cfg.recent_days is not None:
        start = np.datetime64(pd.Timestamp(examples.ts.max()) - pd.Timedelta(days=cfg.recent_days))
        examples = examples.subset(examples.ts > start)
    train, val = split_by_days(examples, cfg.val_frac_days)
    # Popularity as it stood before the validation days, so validation does not see its own counts.
    window = kwargs.get("window_days", 3)
    bias = log_popularity(data.interactions[data.interactions["ts"] < val.ts.min()], index, window,
                          model_cfg.bias_segments, model_cfg.segment_window_days)
    if cfg.basket_history:
        cut = val.ts.min()
        train = build_examples(data.interactions[data.interactions["ts"] < cut], index, data.users,
                               model_cfg.max_history, encode=encode, basket_history=True, seed=cfg.seed)
        if cfg.recent_days is not None:
            train = train.subset(train.ts > start)
    model, history = train_user_tower(item_vectors, train, val, model_cfg, cfg, progress, item_bias=bias)
    rec = UserTowerRecommender(item_ids, item_vectors, model, ProfileStats.from_dict(history["profile_stats"]),
                               examples.body_vocab, drop=kwargs.pop("drop", cfg.drop), cache_dir=data.cache_dir,
                               **kwargs)
    rec.history = history
    return rec.fit(data)


def fingerprint(data: TrainData, item_vectors: np.ndarray, cfg: TrainUserConfig, model_cfg: UserTowerConfig) -> str:
    """Short hash of everything a fit depends on: the training log, its users, the item vectors and both configs."""
    digest = hashlib.sha256()
    log = data.interactions
    digest.update(json.dumps([data.dataset, len(log), str(log["ts"].min()), str(log["ts"].max()),
                              asdict(model_cfg), {**asdict(cfg), "drop": sorted(cfg.drop), "device": ""}],
                             sort_keys=True, default=str).encode())
    digest.update(np.ascontiguousarray(log["item_id"].astype(str).to_numpy()).astype("U").tobytes())
    digest.update(pd.util.hash_pandas_object(data.users, index=False).to_numpy().tobytes())  # profiles as of the cut
    digest.update(np.ascontiguousarray(item_vectors, dtype=np.float32).tobytes())
    return digest.hexdigest()[:12]


class TwoTowerRecommender(Recommender):
    """Two-tower retrieval through the harness: fit = train the user tower on the given window.

    ``drop`` removes parts of the user's input in training and at inference (the ablations);
    ``exclude_history`` (off for H&M, whose shoppers re-buy) removes the shopper's items from the results;
    ``item_bias=False`` drops the popularity coordinate of the keys (an ablation).
    """

    name = "two-tower"

    def __init__(
        self, item_checkpoint: Path, *, cfg: TrainUserConfig | None = None, item_bias: bool = True,
        window_days: float | None = 3, exclude_history: bool = False, name: str | None = None,
        progress: ProgressFn | None = None, vectors_file: Path | None = None,
    ) -> None:
        self.item_checkpoint = item_checkpoint
        self.vectors_file = vectors_file  # `atelier encode` output of the item tower, read instead of encoding
        self.cfg = cfg or TrainUserConfig()
        self.item_bias = item_bias
        self.window_days, self.exclude_history = window_days, exclude_history
        self.progress = progress
        self.retriever: UserTowerRecommender | None = None
        self.checkpoint: Path | None = None
        if name:
            self.name = name  # type: ignore[misc]

    def item_vectors(self, data: TrainData) -> np.ndarray:
        """The frozen item-tower vectors of the catalogue (read from the encoded file when it holds them)."""
        return catalogue_vectors(self.item_checkpoint, data, self.vectors_file)

    def fit(self, data: TrainData) -> Self:
        """Train (or reload an identical earlier fit of) the user tower on ``data.interactions``."""
        ids = data.items["item_id"].astype(str).tolist()
        vectors = self.item_vectors(data)
        model_cfg = UserTowerConfig(item_dim=vectors.shape[1], item_bias=self.item_bias)
        key = fingerprint(data, vectors, self.cfg, model_cfg)
        path = data.cache_dir / "user_towers" / f"{data.dataset}-{key}.pt"
        opts: dict[str, Any] = {"window_days": self.window_days, "exclude_history": self.exclude_history,
                                "drop": self.cfg.drop, "name": self.name}
        if path.is_file():
            rec = UserTowerRecommender.from_checkpoint(path, ids, vectors, cache_dir=data.cache_dir, **opts).fit(data)
        else:
            rec = train_user_recommender(data, ids, vectors, self.cfg, model_cfg, self.progress, **opts)
            save_user_checkpoint(rec.model, path, rec.stats, rec.body_vocab, file_id(self.item_checkpoint),
                                 extra={"history": rec.history, "dataset": data.dataset, "fingerprint": key,
                                        "train_window": [str(data.interactions["ts"].min()),
                                                         str(data.interactions["ts"].max())]})
        self.retriever, self.checkpoint = rec, path
        return self

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        """Top-k items per query from the trained tower."""
        if self.retriever is None:
            raise RuntimeError("call fit() first")
        return self.retriever.recommend(queries, k)
