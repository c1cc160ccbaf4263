"""Stage 2 training and retrieval: the user tower against frozen item vectors (DESIGN.md section 5).

- ``build_examples``: next-interaction examples from a time-ordered log (history = the user's items
  strictly before the target's timestamp, so a basket never sees itself), plus empty-history examples
  from first interactions (profile/context-only shoppers), at most half of all examples.
- ``train_user_tower``: setup -> loop -> evaluate -> keep the best. Sampled softmax over in-batch
  targets plus ``n_sampled`` popularity-sampled negatives, logQ-corrected (Yi et al., RecSys 2019);
  AdamW with warm-up and cosine decay; early stopping on validation Recall@100 over the whole
  catalogue; bf16 autocast on GPU. The item vectors are a constant tensor: no gradient reaches them.
- ``UserTowerRecommender`` ("two-tower"): user vector . item vectors over the whole catalogue.

References: Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
Recommendations", RecSys 2019; Yang et al., "Mixed Negative Sampling for Learning Two-tower Neural
Networks in Recommendations", WWW 2020 (in-batch + sampled negatives).
"""

from __future__ import annotations

import copy
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
from torch.nn import functional as F

from atelier.baselines import PopularityRecommender
from atelier.models.user_tower import (
    PARTS,
    PROFILE_FIELDS,
    ProfileStats,
    UserInputs,
    UserTower,
    UserTowerConfig,
    load_user_checkpoint,
)
from atelier.recommender import Query, TrainData, fill
from atelier.text import TEXT_DIM, encode_texts
from atelier.train import lr_at, optimizer_step

ProgressFn = Callable[[int, int, float], None]  # (step, total steps, loss)
EncodeFn = Callable[[list[str]], np.ndarray]  # texts -> (n, 384) sentence vectors


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


def _segment(values: pd.Series) -> pd.Series:
    return values.astype("string").str.strip().str.lower().fillna("")


def bias_segments(interactions: pd.DataFrame, max_segments: int = 16, min_count: int = 100) -> tuple[str, ...]:
    """The most frequent context values (``occasion``) of a log, for per-segment popularity columns."""
    if "occasion" not in interactions.columns:
        return ()
    counts = _segment(interactions["occasion"]).value_counts()
    return tuple(str(v) for v, n in counts.head(max_segments).items() if n >= min_count and v)


def log_popularity(
    interactions: pd.DataFrame, item_index: dict[str, int], window_days: float | None = None,
    segments: Sequence[str] = (), segment_window_days: float | None = None,
) -> np.ndarray:
    """(n_items, 1 + len(segments)) float32 log(1 + interactions) per item: overall over the log's last
    ``window_days``, then within each ``occasion`` segment over the last ``segment_window_days`` (None: the
    whole log). The ``b`` of the retrieval keys ``[v, b]``; unknown and cold items get 0."""
    def recent(days: float | None) -> tuple[pd.DataFrame, np.ndarray]:
        log = interactions
        if days is not None and len(log):
            log = log[log["ts"] > log["ts"].max() - pd.Timedelta(days=days)]
        rows = log["item_id"].astype(str).map(item_index)
        known = rows.notna().to_numpy()
        return log[known], rows[known].to_numpy(dtype=np.int64)

    _, rows = recent(window_days)
    columns = [np.bincount(rows, minlength=len(item_index))]
    if segments:
        log, rows = recent(segment_window_days)
        occasion = _segment(log["occasion"]).to_numpy(dtype=object)
        columns += [np.bincount(rows[occasion == seg], minlength=len(item_index)) for seg in segments]
    return np.log1p(np.stack(columns, axis=1)).astype(np.float32)


def retrieval_keys(item_vectors: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """The keys a query of the user tower is scored against: ``[v, b]`` (or ``v`` without a bias)."""
    vectors = np.asarray(item_vectors, dtype=np.float32)
    if bias is None:
        return vectors
    bias = np.asarray(bias, np.float32).reshape(len(vectors), -1)
    return np.concatenate([vectors, bias], axis=1)


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


def _number(value: object) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        return float("nan")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def user_inputs_for(
    queries: Sequence[Query], item_index: dict[str, int], item_vectors: np.ndarray, context_vectors_fn: EncodeFn,
    stats: ProfileStats, body_vocab: dict[str, int], max_history: int, drop: frozenset[str] | set[str] = frozenset(),
) -> UserInputs:
    """Tower inputs for harness queries: the last ``max_history`` known history and cart items (most recent first),
    the context text encoded by ``context_vectors_fn`` (e.g. cached ``encode_texts``), the profile fields
    named by ``stats`` (missing -> NaN) and the body type (unknown -> 0)."""
    n = len(queries)
    rows = np.full((n, max_history), -1, dtype=np.int64)
    for qi, q in enumerate(queries):
        known = [item_index[i] for i in q.seeds if i in item_index][-max_history:][::-1]  # history, then cart
        rows[qi, : len(known)] = known
    mask = rows >= 0
    history = np.asarray(item_vectors, dtype=np.float32)[np.clip(rows, 0, None)] * mask[..., None]
    texts = [(q.context or "").strip() for q in queries]
    unique = sorted({t for t in texts if t})
    context = np.zeros((n, TEXT_DIM), dtype=np.float32)
    if unique:
        vecs = np.asarray(context_vectors_fn(unique), dtype=np.float32)
        lookup = {t: i for i, t in enumerate(unique)}
        for qi, t in enumerate(texts):
            if t:
                context[qi] = vecs[lookup[t]]
    profile = np.array([[_number(q.profile.get(f)) for f in stats.fields] for q in queries],
                       dtype=np.float32).reshape(n, len(stats.fields))
    body = np.array([body_vocab.get(str(q.profile.get("body_type") or "").strip().lower(), 0) for q in queries],
                    dtype=np.int64)
    inputs = UserInputs(torch.from_numpy(history), torch.from_numpy(mask), torch.from_numpy(context),
                        torch.tensor([bool(t) for t in texts], dtype=torch.bool), torch.from_numpy(profile),
                        torch.from_numpy(body))
    return inputs.hide(frozenset(drop))


# ---------------------------------------------------------------- loss


def sampled_softmax(
    users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
    log_q: torch.Tensor | None, temperature: float,
) -> torch.Tensor:
    """Softmax over in-batch targets + sampled negatives; row i's label is its own target.

    ``users`` (B, D) are queries and ``items`` (N, D) retrieval keys (see ``retrieval_keys``); ``targets``
    (B,) and ``negatives`` (S,) are item rows; ``log_q`` (N,) is each item's log sampling probability,
    subtracted from its logit (logQ correction) unless None. A candidate equal to the row's target
    elsewhere (an accidental hit) is masked out.
    """
    cand = torch.cat([targets, negatives])  # (B + S,)
    logits = users @ items[cand].T / temperature  # (B, B + S)
    if log_q is not None:
        logits = logits - log_q[cand][None]
    labels = torch.arange(len(targets), device=users.device)
    hit = cand[None, :] == targets[:, None]  # (B, B + S)
    hit[labels, labels] = False
    return F.cross_entropy(logits.masked_fill(hit, float("-inf")), labels)


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


class UserTowerRecommender(PopularityRecommender):
    """Two-tower retrieval: one user vector per query, inner product with every item vector, top-k.

    History is not excluded by default (H&M shoppers re-buy). A query with no usable part (no known
    history, context or profile, or all of them dropped) gets the popularity list when
    ``fallback_popular`` (padded by the tower's ranking), else the tower's learned "nobody" vector.
    """

    name = "two-tower"

    def __init__(
        self, item_ids: Sequence[str], item_vectors: np.ndarray, model: UserTower, stats: ProfileStats,
        body_vocab: dict[str, int], *, window_days: float | None = 3, drop: frozenset[str] | set[str] = frozenset(),
        exclude_history: bool = False, fallback_popular: bool = True, cache_dir: Path | None = None,
        batch_users: int = 1024, name: str | None = None,
    ) -> None:
        super().__init__(window_days)
        assert len(item_ids) == len(item_vectors), f"{len(item_ids)} ids for {len(item_vectors)} vectors"
        unknown = set(drop) - set(PARTS)
        assert not unknown, f"unknown parts to drop {sorted(unknown)}; choose from {PARTS}"
        self.item_ids = np.asarray([str(i) for i in item_ids], dtype=object)
        self.item_vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
        self.item_index = {item: i for i, item in enumerate(self.item_ids)}
        self.model = model.eval()
        self.stats, self.body_vocab = stats, dict(body_vocab)
        self.drop = frozenset(drop)
        self.exclude_history, self.fallback_popular = exclude_history, fallback_popular
        self.cache_dir, self.batch_users = cache_dir, batch_users
        self.history: dict[str, Any] = {}
        self.keys: np.ndarray | None = None  # [v, b] retrieval keys, set by ``fit`` (b changes with the log)
        # Context texts -> MiniLM vectors; None = ``encode_texts`` cached under ``cache_dir`` (fine for the
        # harness's few occasions; a service sets an in-memory encoder so free text writes no files).
        self.context_encoder: EncodeFn | None = None
        if name:
            self.name = name  # type: ignore[misc]

    @classmethod
    def from_checkpoint(cls, path: Path, item_ids: Sequence[str], item_vectors: np.ndarray, **kwargs: Any) -> Self:
        """A recommender from a saved user tower and the item vectors it was trained against (with the
        training history the checkpoint carries, if any)."""
        model, payload = load_user_checkpoint(path)
        rec = cls(item_ids, item_vectors, model, payload["profile_stats"], payload["body_vocab"], **kwargs)
        rec.history = payload.get("history", {})
        return rec

    @classmethod
    def from_training(
        cls, data: TrainData, item_ids: Sequence[str], item_vectors: np.ndarray, cfg: TrainUserConfig,
        model_cfg: UserTowerConfig | None = None, progress: ProgressFn | None = None, **kwargs: Any,
    ) -> Self:
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
        rec = cls(item_ids, item_vectors, model, ProfileStats.from_dict(history["profile_stats"]),
                  examples.body_vocab, drop=kwargs.pop("drop", cfg.drop), cache_dir=data.cache_dir, **kwargs)
        rec.history = history
        return rec.fit(data)

    def fit(self, data: TrainData) -> Self:
        """Popularity for the fallback and the keys' popularity column (the tower itself is trained by
        ``train_user_tower``)."""
        super().fit(data)
        if self.cache_dir is None:
            self.cache_dir = data.cache_dir
        cfg = self.model.config
        bias = log_popularity(data.interactions, self.item_index, self.window_days, cfg.bias_segments,
                              cfg.segment_window_days)
        self.keys = retrieval_keys(self.item_vectors, bias if self.model.config.item_bias else None)
        return self

    def inputs(self, queries: Sequence[Query]) -> UserInputs:
        """Tower inputs for queries (parts in ``drop`` hidden)."""
        encode = self.context_encoder or partial(encode_texts, cache_dir=self.cache_dir)
        return user_inputs_for(queries, self.item_index, self.item_vectors, encode, self.stats, self.body_vocab,
                               self.model.config.max_history, self.drop)

    def user_vectors(self, queries: Sequence[Query]) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) user vectors and (n,) bool: whether each query had any usable part."""
        x = self.inputs(queries)
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            vecs = [self.model(_slice(x, s, self.batch_users).to(device)).float().cpu().numpy()
                    for s in range(0, len(x), self.batch_users)]
        dim = self.model.config.query_dim
        return (np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32)), x.present().any(1).numpy()

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        """Top-k catalogue items by inner product with each user's vector."""
        if self.keys is None:
            raise RuntimeError("call fit() first: the retrieval keys need the interaction log's popularity")
        keys = self.keys
        users, usable = self.user_vectors(queries)
        k_items = min(k, len(self.item_ids))
        # Queries answered by popularity alone skip the catalogue scan.
        popular_only = self.fallback_popular & ~usable & (len(self.popular) >= k + (
            max((len(q.history) for q in queries), default=0) if self.exclude_history else 0))
        out: list[list[str]] = [[] for _ in queries]
        for qi in np.flatnonzero(popular_only):
            exclude = frozenset(queries[int(qi)].history) if self.exclude_history else frozenset()
            out[qi] = fill(self.popular, [], k, exclude)
        rows = np.flatnonzero(~popular_only)
        for s in range(0, len(rows), self.batch_users):
            batch = rows[s : s + self.batch_users]
            scores = users[batch] @ keys.T  # (batch, n_items)
            if self.exclude_history:
                for r, qi in enumerate(batch):
                    seen = [self.item_index[i] for i in queries[int(qi)].history if i in self.item_index]
                    scores[r, seen] = -np.inf
            top = np.argpartition(-scores, kth=k_items - 1, axis=1)[:, :k_items]
            order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
            ranked = np.take_along_axis(top, order, axis=1)
            for r, qi in enumerate(batch):
                exclude = frozenset(queries[int(qi)].history) if self.exclude_history else frozenset()
                tower = [str(self.item_ids[j]) for j in ranked[r]]
                first, then = (self.popular, tower) if self.fallback_popular and not usable[qi] else (tower, [])
                out[qi] = fill(first, then or self.popular, k, exclude)
        return out


def _slice(x: UserInputs, start: int, size: int) -> UserInputs:
    return UserInputs(x.history[start : start + size], x.history_mask[start : start + size],
                      x.context[start : start + size], x.context_mask[start : start + size],
                      x.profile[start : start + size], x.body_type[start : start + size])
