"""Scorers of the ranking chain at inference: the served DeepFM, the LightGBM peers, the plain union.

``ItemFeatures`` holds every catalogue item's sparse ids (STD values of its item JSON, RE ids from the
enriched phrases and hashed raw columns); ``Featuriser`` lays a shopper's sparse fields (history and cart
STD/RE ids, profile and context buckets) out as DeepCTR expects; ``DeepFMScorer`` adds the chain's dense
features (``prepare_dense``, then ``DenseScale`` from the training rows) and scores candidate rows in one
batched forward. ``LightGBMScorer`` and ``BestSourceScorer`` are the peers the harness compares it with.
Training lives in ``atelier.train.ranker``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from atelier.catalogue import dataset_items
from atelier.datasets import rules_for
from atelier.models.ranker import ITEM_FIELDS, RankerConfig
from atelier.recommender import Query
from atelier.schema import normalise_text
from atelier.vocab import Vocab

ProgressFn = Callable[[str], None]


def _bucket(value: Any, lo: float, step: float, size: int) -> int:
    """1 + the bin of a number (0 = missing), clipped to the table."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 0
    return 1 + int(min(max((float(value) - lo) // step, 0), size - 2))


def _hash_bucket(text: str | None, size: int) -> int:
    """1 + crc32 of normalised text into the table (0 = missing), stable across machines."""
    if not text:
        return 0
    return 1 + zlib.crc32(normalise_text(str(text)).encode()) % (size - 1)


def _pad(ids: Sequence[int], width: int) -> np.ndarray:
    out = np.zeros(width, dtype=np.int64)
    cut = list(ids)[:width]
    out[: len(cut)] = cut
    return out


@dataclass
class ItemFeatures:
    """Per-item sparse ids and the catalogue's own price for the whole catalogue, in ``items`` row order."""

    item_ids: np.ndarray  # (n,) object
    fields: np.ndarray  # (n, len(ITEM_FIELDS)) STD id of each item field's first value, 0 if absent
    std: np.ndarray  # (n, item_std_len) the item's other STD ids
    re: np.ndarray  # (n, re_len) RE ids (enriched RE values + hashed raw columns)
    own_price: np.ndarray  # (n,) the catalogue's own price, NaN when it has none (H&M: prices come from sales)
    labels: list[dict[str, str]]  # field -> value of each item (for explanations)
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {str(i): n for n, i in enumerate(self.item_ids)}

    @classmethod
    def build(cls, items: pd.DataFrame, dataset: str, vocab: Vocab, cfg: RankerConfig,
              enriched: Path | None = None) -> ItemFeatures:
        """STD and RE values of the item JSON (``enriched``: the enrichment output where a product has one), plus
        the dataset's raw columns the schema lacks, hashed as RE ids."""
        jsons = dataset_items(items, dataset, enriched=enriched)
        raw_cols = [c for c in rules_for(dataset).raw_re_columns if c in items]
        raw = items[raw_cols].astype(str).to_numpy() if raw_cols else np.zeros((len(items), 0), dtype=object)
        n = len(jsons)
        fields = np.zeros((n, len(ITEM_FIELDS)), dtype=np.int64)
        std = np.zeros((n, cfg.item_std_len), dtype=np.int64)
        re_ids = np.zeros((n, cfg.re_len), dtype=np.int64)
        labels: list[dict[str, str]] = []
        for row, item in enumerate(jsons):
            others: list[int] = []
            label: dict[str, str] = {}
            for name, values in item.clothes.items():
                if not values:
                    continue
                label[name] = values[0]
                ids = [vocab.std_id(name, v) for v in values]
                if name in ITEM_FIELDS:
                    fields[row, ITEM_FIELDS.index(name)] = ids[0]
                    others += ids[1:]
                else:
                    others += ids
            std[row] = _pad(others, cfg.item_std_len)
            re_list = [vocab.re_id(f, v) for f, vs in item.reinforced_feature_value.items() for v in vs]
            re_list += [vocab.re_id(f"{dataset}.{c}", v) for c, v in zip(raw_cols, raw[row], strict=True)
                        if v and v != "nan"]
            re_ids[row] = _pad(re_list, cfg.re_len)
            labels.append(label)
        # Only the catalogue's own price: a price derived from sales belongs to a log (LogStats), or the
        # rows of a label day would see prices of the day's own sales.
        own = "catalogue_price" if "catalogue_price" in items else "price"
        prices = (pd.to_numeric(items[own], errors="coerce").to_numpy(float) if own in items
                  else np.full(n, np.nan))
        return cls(items["item_id"].astype(str).to_numpy(dtype=object), fields, std, re_ids, prices, labels)




@dataclass
class ProfileScale:
    """Means and sds of the numeric profile fields (for the dense inputs), from the users table."""

    mean: dict[str, float]
    sd: dict[str, float]

    @classmethod
    def fixed(cls) -> ProfileScale:
        """Physical scales that depend on no data (cm, kg, years around a typical adult): the same at
        training and serving, whatever the users table holds."""
        return cls({"height_cm": 165.0, "weight_kg": 65.0, "age": 35.0},
                   {"height_cm": 10.0, "weight_kg": 15.0, "age": 12.0})

    @classmethod
    def build(cls, users: pd.DataFrame) -> ProfileScale:
        """Statistics of height_cm, weight_kg, age where the table has them."""
        mean, sd = {}, {}
        for col in ("height_cm", "weight_kg", "age"):
            vals = pd.to_numeric(users[col], errors="coerce") if col in users else pd.Series(dtype=float)
            mean[col] = float(vals.mean()) if vals.notna().any() else 0.0
            sd[col] = float(vals.std()) if vals.notna().sum() > 1 else 1.0
        return cls(mean, sd)

    def z(self, col: str, value: Any) -> float:
        """Standardised value, 0 when missing."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return 0.0
        return (float(value) - self.mean[col]) / (self.sd[col] or 1.0)


class Featuriser:
    """Turns (query, candidate items, retrieval ranks) into DeepFM input rows laid out by ``feature_index``."""

    def __init__(self, cfg: RankerConfig, cat: ItemFeatures, profiles: ProfileScale, feature_index: dict[str, Any]):
        self.cfg, self.cat, self.profiles = cfg, cat, profiles
        self.layout = {name: (int(a), int(b)) for name, (a, b) in feature_index.items()}
        self.width = max(b for _, b in self.layout.values())
        self.item_all_std = np.concatenate([cat.fields, cat.std], axis=1)  # (n, n_fields + item_std_len)

    def user_part(self, q: Query) -> dict[str, np.ndarray]:
        """History and cart STD/RE ids (most recent items first), profile buckets and numbers of one query."""
        idx = [self.cat.index[i] for i in reversed(q.seeds) if i in self.cat.index]
        hist_std = self.item_all_std[idx].ravel() if idx else np.zeros(0, np.int64)
        hist_re = self.cat.re[idx].ravel() if idx else np.zeros(0, np.int64)
        p, size = q.profile, self.cfg.bucket_size
        buckets = {
            "height_b": _bucket(p.get("height_cm"), 140, 2.5, size),
            "weight_b": _bucket(p.get("weight_kg"), 40, 3, size),
            "age_b": _bucket(p.get("age"), 16, 2, size),
            "body_type": _hash_bucket(body if isinstance(body := p.get("body_type"), str) else None, size),
            "context": _hash_bucket(q.context, size),
            "hist_len_b": 1 + min(int(math.log2(1 + len(q.seeds))), size - 2),
        }
        return {
            "hist_std": _pad(hist_std[hist_std != 0], self.cfg.hist_len),
            "hist_re": _pad(hist_re[hist_re != 0], self.cfg.re_len),
            **{k: np.array([v]) for k, v in buckets.items()},
            "height": np.array([self.profiles.z("height_cm", p.get("height_cm"))]),
            "weight": np.array([self.profiles.z("weight_kg", p.get("weight_kg"))]),
            "age": np.array([self.profiles.z("age", p.get("age"))]),
        }


@torch.inference_mode()
def predict(model: Any, x: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Click probabilities of input rows."""
    model.eval()
    out = [model(torch.from_numpy(x[s : s + batch_size])).squeeze(-1).numpy() for s in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)




# --------------------------------------------------------------------------- scorers of the ranking chain

# Dense inputs the DeepFM reads besides the chain's features: the shopper's stated body, z-scored.
PROFILE_DENSE = ("height", "weight", "age")
# Features that count days back to an event: recency exp(-days / a week) makes "never" the natural 0.
_DAYS = ("days_since_first", "days_since_last", "bought_days", "days_since_last_buy")


def prepare_dense(names: Sequence[str], x: np.ndarray) -> np.ndarray:
    """The chain's features as a network reads them: ranks as 1 / (1 + rank), days as exp(-days / 7), every
    missing value 0 (absent from a source, never sold, never bought)."""
    out = np.array(x, dtype=np.float32, copy=True)
    for j, name in enumerate(names):
        col = out[:, j]
        if name.startswith("rank:"):
            col = 1.0 / (1.0 + col)
        elif name in _DAYS:
            col = np.exp(-col / 7.0)
        out[:, j] = np.nan_to_num(col, nan=0.0, posinf=0.0, neginf=0.0)
    return out


@dataclass
class DenseScale:
    """Per-column mean and sd of the prepared dense inputs, from the training rows (saved with the model)."""

    mean: np.ndarray
    sd: np.ndarray

    @classmethod
    def fit(cls, prepared: np.ndarray) -> DenseScale:
        """Statistics of training rows."""
        return cls(prepared.mean(axis=0).astype(np.float32), (prepared.std(axis=0) + 1e-6).astype(np.float32))

    def __call__(self, prepared: np.ndarray) -> np.ndarray:
        """Standardised columns, clipped to +-8 sd (a new extreme should not swamp the network)."""
        return np.clip((prepared - self.mean) / self.sd, -8.0, 8.0).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        """Plain lists for a checkpoint."""
        return {"mean": self.mean.tolist(), "sd": self.sd.tolist()}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Sequence[float]]) -> DenseScale:
        """The statistics a checkpoint saved."""
        return cls(np.asarray(raw["mean"], np.float32), np.asarray(raw["sd"], np.float32))


def deepfm_featuriser(items: pd.DataFrame, dataset: str, cfg: RankerConfig, model: Any, vocab: Vocab,
                      enriched: Path | None) -> Featuriser:
    """The DeepFM's sparse inputs of a catalogue (STD/RE ids of every item: no log, so no cut to respect) and
    data-free profile scales, so training and serving read the same numbers."""
    return Featuriser(cfg, ItemFeatures.build(items, dataset, vocab, cfg, enriched), ProfileScale.fixed(),
                      model.feature_index)


def deepfm_inputs(feat: Featuriser, names: Sequence[str], queries: Sequence[Query], cands: Any,
                  dense: np.ndarray) -> np.ndarray:
    """(len(cands), width) DeepCTR inputs: the item's sparse ids, the shopper's (history and cart STD/RE ids,
    profile and context buckets), and the standardised dense columns ``names`` (chain features, then the
    profile numbers)."""
    x = np.zeros((len(cands), feat.width), dtype=np.float32)
    idx = cands.item
    for j, name in enumerate(ITEM_FIELDS):
        x[:, feat.layout[f"item_{name}"][0]] = feat.cat.fields[idx, j]
    for name, table in (("item_std", feat.cat.std), ("item_re", feat.cat.re)):
        a, b = feat.layout[name]
        x[:, a:b] = table[idx]
    parts = [feat.user_part(q) for q in queries]
    for name in parts[0] if parts else ():
        if name not in feat.layout:
            continue
        a, b = feat.layout[name]
        per_query = np.stack([p[name] for p in parts]).astype(np.float32)  # (n_queries, b - a)
        x[:, a:b] = per_query[cands.query]
    for j, name in enumerate(names):
        x[:, feat.layout[name][0]] = dense[:, j]
    return x


@dataclass
class DeepFMScorer:
    """The served ranker: a DeepFM over the chain's features plus the item's and shopper's sparse fields."""

    model: Any
    feat: Featuriser
    names: list[str]  # the chain's dense features, in the pipeline's order
    scale: DenseScale
    name: str = "deepfm"

    def inputs(self, queries: Sequence[Query], cands: Any, x: np.ndarray) -> np.ndarray:
        """The DeepCTR input rows of candidates with their chain features ``x``."""
        profile = np.array([[self.feat.profiles.z(c, q.profile.get(c)) for c in ("height_cm", "weight_kg", "age")]
                            for q in queries], np.float32).reshape(len(queries), 3)
        dense = np.concatenate([self.scale(prepare_dense(self.names, x)), profile[cands.query]], axis=1)
        return deepfm_inputs(self.feat, [*self.names, *PROFILE_DENSE], queries, cands, dense)

    def predict(self, queries: Sequence[Query], cands: Any, x: np.ndarray) -> np.ndarray:
        """Probability of a purchase for every candidate row."""
        return predict(self.model, self.inputs(queries, cands, x))


@dataclass
class LightGBMScorer:
    """A LightGBM peer over the chain's features and the item's attribute values (categorical, coded by the
    values seen in training, so the codes mean the same in every window's catalogue)."""

    booster: Any
    categories: dict[str, list[str]]  # attribute -> the values seen in training; code = position
    item_codes: dict[str, np.ndarray] = field(default_factory=dict)  # attribute -> (n_items,) of the bound catalogue
    name: str = "lightgbm"

    def bind(self, values: Mapping[str, np.ndarray]) -> LightGBMScorer:
        """The scorer for a catalogue whose items have these attribute values (a pipeline's ``values``)."""
        return replace(self, item_codes=category_codes(values, self.categories))

    def predict(self, queries: Sequence[Query], cands: Any, x: np.ndarray) -> np.ndarray:
        """The booster's score of every candidate row (higher is better)."""
        assert self.item_codes or not self.categories, "bind() the scorer to the serving catalogue first"
        return np.asarray(self.booster.predict(with_codes(x, self.item_codes, cands.item)), dtype=np.float64)


def category_codes(values: Mapping[str, np.ndarray], categories: Mapping[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """Each item's position among an attribute's known values (-1 unknown or unseen)."""
    out = {}
    for name, cats in categories.items():
        v = pd.Series(values[name], dtype=object)
        out[name] = pd.Index(list(cats), dtype=object).get_indexer(v.where(v.notna(), "\0")).astype(np.int64)
    return out


def with_codes(x: np.ndarray, codes: Mapping[str, np.ndarray], items: np.ndarray) -> np.ndarray:
    """The dense features with each attribute's code of the candidate item appended (NaN when unknown)."""
    extra = [np.where(c[items] >= 0, c[items], np.nan).astype(np.float32) for c in codes.values()]
    return np.concatenate([x, np.stack(extra, axis=1)], axis=1) if extra else x


@dataclass
class BestSourceScorer:
    """No learning: a candidate's place in the first source (in ``priority`` order) that proposed it, then
    its rank there: the union ordered by the best single sources."""

    priority: list[int]  # source columns, best first
    name: str = "union"

    def predict(self, queries: Sequence[Query], cands: Any, x: np.ndarray) -> np.ndarray:
        """Higher for an earlier source, then a better rank in it."""
        ranks = cands.rank[:, self.priority]  # (n, S) in priority order
        present = ~np.isnan(ranks)
        first = np.where(present.any(axis=1), present.argmax(axis=1), len(self.priority))
        rank = np.take_along_axis(np.nan_to_num(ranks, nan=1e6), first.clip(max=len(self.priority) - 1)[:, None],
                                  axis=1)[:, 0]
        return -(first.astype(np.float64) * 1e7 + rank)
