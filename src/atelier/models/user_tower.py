"""User tower (DESIGN.md section 5): behaviour + context + profile -> one L2-normalised vector in item space.

The item tower is frozen: the user tower reads item vectors, never item weights, and its output is
compared with the same vectors by inner product (cosine), so retrieval is one ANN/matmul lookup.

- behaviour: the most recent ``max_history`` item vectors (``history[:, 0]`` is the most recent),
  Linear(item_dim -> d) + a learned recency embedding -> pre-norm GELU transformer encoder ->
  masked mean pool.
- context: a frozen MiniLM sentence vector (a cart's concept, an occasion) -> Linear(384 -> d) ->
  one encoder layer over a single [context] token. With one token, self-attention reduces to its
  value/output projections, so the layer is in effect a residual MLP block; it is kept as an encoder
  layer so several context tokens (cart items, several phrases) can be added without a new design.
- profile: height, weight, age z-scored with training-user statistics kept in buffers (and in the
  checkpoint); a missing value becomes 0 plus a "missing" indicator, so NaN never enters the net;
  + a body-type embedding (id 0 = unknown) -> Linear -> d.
- fusion: one scalar gate per present part (softmax over present parts only), a weighted sum, an MLP to
  ``out_dim``; plus a learned multiple of the mean history item vector (``history_skip``: the MLP's
  last layer starts near zero, so an untrained tower ranks like content kNN), then L2 norm. A user
  with no part at all gets a learned "nobody" vector, still normalised.

References: Covington et al., "Deep Neural Networks for YouTube Recommendations", RecSys 2016 (user
tower from watch history + context); Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large
Corpus Item Recommendations", RecSys 2019 (two towers, logQ correction: see ``atelier.train_user``);
Xiong et al. 2020 (pre-norm transformer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from atelier.atomic import atomic_write
from atelier.models.item_tower import CheckpointError, read_payload

CHECKPOINT_FORMAT = 1
PARTS = ("history", "context", "profile")
PROFILE_FIELDS = ("height_cm", "weight_kg", "age")


@dataclass
class UserTowerConfig:
    """Hyper-parameters of the user tower; the body-type table size comes from the vocabulary."""

    item_dim: int = 128  # width of the frozen item vectors
    d_model: int = 128  # the item tower's width: a handful of inputs needs no more
    n_layers: int = 1  # 20 recent items: one attention layer already mixes them
    n_heads: int = 4
    ff_mult: int = 4
    max_history: int = 10  # 90% of RentTheRunway training examples have <= 5 earlier items; cost grows with it
    text_dim: int = 384  # all-MiniLM-L6-v2
    n_profile: int = 3  # height_cm, weight_kg, age
    n_body_types: int = 1  # vocabulary size incl. 0 = unknown (set from the body-type vocabulary)
    dropout: float = 0.1
    history_skip: bool = True  # add a learned multiple of the mean history vector before normalising
    out_dim: int | None = None  # None = item_dim (the output is compared with item vectors)
    # One extra query coordinate: a per-user weight w >= 0 for the item's log popularity b, so retrieval
    # scores u.v + w*b by inner product against [v, b]. Frozen content vectors cannot tell two items of
    # one category apart; the bias can, and it stays a plain MIPS query for the store.
    item_bias: bool = True
    # Context values (RentTheRunway occasions) whose own popularity is one more key column each: the query
    # weighs "popular for weddings" when the context says wedding. Empty = overall popularity only.
    bias_segments: tuple[str, ...] = ()
    segment_window_days: float | None = 180.0  # a segment's counts are thin: the occasion baseline's 180 days

    def __post_init__(self) -> None:
        if self.out_dim is None:
            self.out_dim = self.item_dim
        self.bias_segments = tuple(self.bias_segments)  # a checkpoint's JSON-ish config gives a list

    @property
    def query_dim(self) -> int:
        """Width of the retrieval query: the user vector, plus the popularity weights with ``item_bias``."""
        return (self.out_dim or self.item_dim) + self.n_bias

    @property
    def n_bias(self) -> int:
        """Popularity columns of the keys: overall, then one per segment (0 without ``item_bias``)."""
        return 1 + len(self.bias_segments) if self.item_bias else 0
        assert self.d_model % self.n_heads == 0, f"d_model {self.d_model} not divisible by n_heads {self.n_heads}"
        assert self.n_body_types >= 1, "n_body_types counts the unknown id 0, so it is at least 1"


@dataclass
class ProfileStats:
    """Z-score statistics of the numeric profile fields, computed from training users."""

    fields: tuple[str, ...] = PROFILE_FIELDS
    mean: list[float] = field(default_factory=lambda: [0.0] * len(PROFILE_FIELDS))
    std: list[float] = field(default_factory=lambda: [1.0] * len(PROFILE_FIELDS))

    @classmethod
    def from_values(cls, values: np.ndarray, fields: tuple[str, ...] = PROFILE_FIELDS) -> ProfileStats:
        """Mean and std per column of ``values`` (users x fields, NaN = missing); 0/1 for an empty column."""
        values = np.asarray(values, dtype=np.float64).reshape(-1, len(fields))
        present = ~np.isnan(values)
        mean, std = [], []
        for j in range(len(fields)):
            col = values[present[:, j], j]
            mean.append(float(col.mean()) if len(col) else 0.0)
            std.append(float(col.std()) if len(col) > 1 and col.std() > 1e-6 else 1.0)
        return cls(tuple(fields), mean, std)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for the checkpoint)."""
        return {"fields": list(self.fields), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProfileStats:
        """Inverse of ``to_dict``."""
        return cls(tuple(d["fields"]), [float(x) for x in d["mean"]], [float(x) for x in d["std"]])


@dataclass
class UserInputs:
    """One batch of users; any part may be absent (mask False / NaN / body type 0)."""

    history: torch.Tensor  # (batch, max_history, item_dim) float, [:, 0] = most recent item
    history_mask: torch.Tensor  # (batch, max_history) bool: True where an item is present
    context: torch.Tensor  # (batch, text_dim) float: MiniLM vector of the context text
    context_mask: torch.Tensor  # (batch,) bool: True where there is a context
    profile: torch.Tensor  # (batch, n_profile) float, NaN = missing
    body_type: torch.Tensor  # (batch,) long, 0 = unknown

    def __len__(self) -> int:
        return int(self.history.shape[0])

    def to(self, device: torch.device | str) -> UserInputs:
        """Move every tensor to ``device``."""
        return UserInputs(*(getattr(self, f.name).to(device) for f in fields(self)))

    def hide(self, drop: set[str] | frozenset[str]) -> UserInputs:
        """The same batch with whole parts removed (``drop`` within {"history", "context", "profile"})."""
        unknown = set(drop) - set(PARTS)
        assert not unknown, f"unknown parts {sorted(unknown)}; choose from {PARTS}"
        out = replace(self)
        if "history" in drop:
            out.history_mask = torch.zeros_like(self.history_mask)
        if "context" in drop:
            out.context_mask = torch.zeros_like(self.context_mask)
        if "profile" in drop:
            out.profile = torch.full_like(self.profile, float("nan"))
            out.body_type = torch.zeros_like(self.body_type)
        return out

    def present(self) -> torch.Tensor:
        """(batch, 3) bool: which of history, context, profile each user has."""
        has_profile = (~torch.isnan(self.profile)).any(dim=1) | (self.body_type > 0)
        return torch.stack([self.history_mask.any(dim=1), self.context_mask, has_profile], dim=1)


def empty_inputs(config: UserTowerConfig, batch: int) -> UserInputs:
    """A batch of users with nothing known (every part absent)."""
    return UserInputs(
        torch.zeros(batch, config.max_history, config.item_dim),
        torch.zeros(batch, config.max_history, dtype=torch.bool),
        torch.zeros(batch, config.text_dim), torch.zeros(batch, dtype=torch.bool),
        torch.full((batch, config.n_profile), float("nan")), torch.zeros(batch, dtype=torch.long),
    )


def _encoder(config: UserTowerConfig, n_layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(config.d_model, config.n_heads, config.ff_mult * config.d_model,
                                       config.dropout, activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)


class UserTower(nn.Module):
    """The user encoder; built from its config alone so a checkpoint rebuilds it."""

    profile_mean: torch.Tensor  # (n_profile,) buffers: saved with the weights
    profile_std: torch.Tensor

    def __init__(self, config: UserTowerConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        out_dim = config.out_dim or config.item_dim
        # behaviour
        self.item_proj = nn.Linear(config.item_dim, d)
        self.recency = nn.Embedding(config.max_history, d)
        self.history_encoder = _encoder(config, config.n_layers)
        self.history_norm = nn.LayerNorm(d)
        # context
        self.context_proj = nn.Linear(config.text_dim, d)
        self.context_encoder = _encoder(config, 1)
        self.context_norm = nn.LayerNorm(d)
        # profile: z-scores + missing indicators, plus a body-type embedding
        self.register_buffer("profile_mean", torch.zeros(config.n_profile))
        self.register_buffer("profile_std", torch.ones(config.n_profile))
        self.profile_proj = nn.Linear(2 * config.n_profile, d)
        self.body_emb = nn.Embedding(config.n_body_types, d)
        self.profile_norm = nn.LayerNorm(d)
        # fusion
        self.gates = nn.ModuleList([nn.Linear(d, 1) for _ in PARTS])
        self.nobody = nn.Parameter(torch.zeros(d))
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(config.dropout),
                                  nn.Linear(2 * d, out_dim))
        self.bias_head = nn.Linear(d, config.n_bias) if config.item_bias else None
        self.skip_scale = nn.Parameter(torch.tensor(1.0 if config.history_skip else 0.0),
                                       requires_grad=config.history_skip)
        nn.init.normal_(self.recency.weight, std=0.02)
        nn.init.normal_(self.body_emb.weight, std=0.02)
        nn.init.normal_(self.nobody, std=0.02)
        if config.history_skip:
            # The learned part starts small, so an untrained tower ranks a shopper with history like content
            # kNN (mean history vector) and training moves away from that only as far as the data asks.
            last = self.head[-1]
            assert isinstance(last, nn.Linear)
            nn.init.normal_(last.weight, std=0.02 / math.sqrt(2 * d))
            nn.init.zeros_(last.bias)
        if self.bias_head is not None:
            # softplus(-2) ~ 0.13: a log-popularity of ~4 then weighs about as much as a perfect content match.
            nn.init.zeros_(self.bias_head.weight)
            nn.init.constant_(self.bias_head.bias, -2.0)

    def set_profile_stats(self, stats: ProfileStats) -> None:
        """Store the training users' z-score statistics in the buffers (saved with the weights)."""
        assert len(stats.mean) == self.config.n_profile, f"{len(stats.mean)} stats for {self.config.n_profile} fields"
        with torch.no_grad():
            self.profile_mean.copy_(torch.tensor(stats.mean, dtype=torch.float32))
            self.profile_std.copy_(torch.tensor(stats.std, dtype=torch.float32).clamp_min(1e-6))

    def encode_history(self, x: UserInputs) -> torch.Tensor:
        """(batch, d): masked mean of the encoded recent items (zeros where there is no history)."""
        mask = x.history_mask
        out = torch.zeros(mask.shape[0], self.config.d_model, device=mask.device, dtype=x.history.dtype)
        rows = mask.any(dim=1).nonzero().squeeze(1)
        if len(rows) == 0:
            return self.history_norm(out)
        # Only shoppers with history go through the encoder (often half a batch or fewer).
        mask, hist = mask[rows], x.history[rows]
        pos = torch.arange(mask.shape[1], device=mask.device)
        h = self.item_proj(hist) + self.recency(pos)[None]  # (R, H, d)
        h = self.history_encoder(h, src_key_padding_mask=~mask)  # (R, H, d)
        w = mask.to(h.dtype).unsqueeze(-1)  # (R, H, 1)
        pooled = (h * w).sum(1) / w.sum(1)  # (R, d)
        out = out.to(pooled.dtype).index_copy(0, rows, pooled)
        return self.history_norm(out)

    def encode_context(self, x: UserInputs) -> torch.Tensor:
        """(batch, d): the context sentence vector as one encoded token."""
        tok = self.context_proj(x.context).unsqueeze(1)  # (B, 1, d)
        return self.context_norm(self.context_encoder(tok)[:, 0])

    def encode_profile(self, x: UserInputs) -> torch.Tensor:
        """(batch, d): z-scored numeric fields with missing indicators, plus the body-type embedding."""
        missing = torch.isnan(x.profile)  # (B, P)
        z = ((x.profile - self.profile_mean) / self.profile_std).masked_fill(missing, 0.0)
        feats = torch.cat([z, missing.to(z.dtype)], dim=1)  # (B, 2P)
        return self.profile_norm(self.profile_proj(feats) + self.body_emb(x.body_type))

    def forward(self, x: UserInputs) -> torch.Tensor:
        """Retrieval queries, shape (batch, query_dim): the L2-normalised user vector, then (with
        ``item_bias``) the user's weight for item popularity."""
        assert x.history.shape[1] <= self.config.max_history and x.history.shape[2] == self.config.item_dim, (
            f"history must be (batch, <= {self.config.max_history}, {self.config.item_dim}), "
            f"got {tuple(x.history.shape)}")
        # Most shoppers have a few items: drop the slots nobody in the batch fills (the transformer's cost
        # grows with the slots, and an empty slot is masked anyway).
        filled = int(x.history_mask.any(dim=0).nonzero().max()) + 1 if bool(x.history_mask.any()) else 1
        if filled < x.history.shape[1]:
            x = replace(x, history=x.history[:, :filled], history_mask=x.history_mask[:, :filled])
        assert x.profile.shape[1] == self.config.n_profile, f"profile must have {self.config.n_profile} columns"
        present = x.present()  # (B, 3)
        parts = torch.stack([self.encode_history(x), self.encode_context(x), self.encode_profile(x)], dim=1)
        logits = torch.cat([g(parts[:, i]) for i, g in enumerate(self.gates)], dim=1)  # (B, 3)
        weights = torch.softmax(logits.masked_fill(~present, float("-inf")), dim=1).nan_to_num(0.0)
        fused = (weights.unsqueeze(-1) * parts).sum(1)  # (B, d)
        anyone = present.any(dim=1, keepdim=True)
        fused = torch.where(anyone, fused, self.nobody.to(fused.dtype).expand_as(fused))
        out = self.head(fused)  # (B, out_dim)
        if self.config.history_skip:
            w = x.history_mask.to(out.dtype).unsqueeze(-1)
            mean_item = (x.history.to(out.dtype) * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, item_dim)
            out = out + self.skip_scale * F.normalize(mean_item, dim=-1)
        out = F.normalize(out, dim=-1)
        if self.bias_head is None:
            return out
        return torch.cat([out, F.softplus(self.bias_head(fused)).to(out.dtype)], dim=1)


def save_user_checkpoint(
    model: UserTower, path: Path, stats: ProfileStats, body_vocab: dict[str, int], item_checkpoint_id: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """Self-describing checkpoint: config, profile statistics, body-type vocabulary, the item vectors' id,
    weights; written atomically."""
    assert all(0 < i < model.config.n_body_types for i in body_vocab.values()), "body vocabulary exceeds the table"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT, "kind": "user_tower", "config": asdict(model.config),
        "profile_stats": stats.to_dict(), "body_vocab": dict(body_vocab), "item_checkpoint_id": item_checkpoint_id,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **(extra or {}),
    }
    with atomic_write(path) as fh:
        torch.save(payload, fh)


def load_user_checkpoint(path: Path, device: str = "cpu") -> tuple[UserTower, dict[str, Any]]:
    """Rebuild the tower from a checkpoint file alone; returns the model (eval mode) and the payload
    (``payload["profile_stats"]`` is a ``ProfileStats``)."""
    payload = read_payload(path, "user_tower", CHECKPOINT_FORMAT, device)
    missing = [k for k in ("config", "profile_stats", "body_vocab", "item_checkpoint_id", "state_dict")
               if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: user tower checkpoint lacks {missing}")
    try:
        model = UserTower(UserTowerConfig(**payload["config"]))
        model.load_state_dict(payload["state_dict"])
    except (TypeError, RuntimeError, AssertionError) as exc:
        raise CheckpointError(f"{path}: weights do not match the config: {exc}") from None
    stats = ProfileStats.from_dict(payload["profile_stats"])
    if not torch.allclose(model.profile_mean.cpu(), torch.tensor(stats.mean, dtype=torch.float32)):
        raise CheckpointError(f"{path}: profile statistics disagree with the weights' buffers")
    payload["profile_stats"] = stats
    return model.to(device).eval(), payload
