"""The DeepFM reranker at inference: features of (shopper, candidate) rows and the scorer.

``ItemFeatures`` holds every catalogue item's sparse ids (STD values from the column mapping, RE ids
from enrichment output and hashed raw columns) and its own price; ``LogStats`` the popularity, recency
and price of items as of the end of a log; ``Featuriser`` lays a query's rows out as the DeepFM expects;
``Scorer`` scores, reorders and explains a retriever's candidates. ``load_scorer`` builds the served one
from the saved checkpoint and today's log. Training (rows, loop, the harness recommender) lives in
``atelier.train.ranker``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from atelier.catalogue import dataset_items
from atelier.config import Settings
from atelier.datasets import current_data, rules_for
from atelier.ingest import load_tables
from atelier.models.item_tower import CHECKPOINT_FORMAT, CheckpointError, read_payload
from atelier.models.ranker import ITEM_FIELDS, USER_BUCKETS, RankerConfig, fm_terms, load_ranker
from atelier.recommend.user_tower import item_tower_for
from atelier.recommender import Query, TrainData
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
class LogStats:
    """Item popularity, recency and price as of the end of an interaction log (what a server would know)."""

    pop: np.ndarray  # (n,) log1p(count in the window) / log1p(max count)
    recency: np.ndarray  # (n,) exp(-days since the item's last interaction / window), 0 if never
    pop_recent: np.ndarray  # (n,) as ``pop`` over the last third of the window: the trend
    price: np.ndarray  # (n,) standardised log price (the catalogue's, else the log's median), 0 when unknown

    @classmethod
    def build(cls, log: pd.DataFrame, cat: ItemFeatures, window_days: float) -> LogStats:
        """Counts over the last ``window_days`` of ``log``; recency over all of it; prices as of its end."""
        n = len(cat.item_ids)
        pop, rec = np.zeros(n, np.float32), np.zeros(n, np.float32)
        price = _standardised_log_price(cat, log)
        if log.empty:
            return cls(pop, rec, pop.copy(), price)
        end = log["ts"].max()
        idx = log["item_id"].astype(str).map(cat.index)
        ok = idx.notna().to_numpy()
        rows, ts = idx[ok].astype(int).to_numpy(), log["ts"][ok]

        def scaled_counts(days: float) -> np.ndarray:
            recent = (ts > end - pd.Timedelta(days=days)).to_numpy()
            counts = np.bincount(rows[recent], minlength=n).astype(np.float32)
            return (np.log1p(counts) / max(float(np.log1p(counts.max())), 1e-6)).astype(np.float32)

        last = pd.Series(ts.to_numpy()).groupby(rows).max()
        days = ((end - last).dt.total_seconds() / 86400).to_numpy()
        rec[last.index.to_numpy()] = np.exp(-days / window_days)
        return cls(scaled_counts(window_days), rec, scaled_counts(window_days / 3), price)


def _standardised_log_price(cat: ItemFeatures, log: pd.DataFrame) -> np.ndarray:
    """The catalogue's own price, else the median price ``log`` sold the item at; z-scored log, 0 if unknown."""
    prices = cat.own_price.copy()
    if "price" in log.columns and not log.empty:
        median = log.groupby(log["item_id"].astype(str))["price"].median()
        sold = pd.Series(cat.item_ids).map(median).to_numpy(float)
        prices = np.where(np.isnan(prices), sold, prices)
    logp = np.log(np.where(prices > 0, prices, np.nan))
    mu, sd = (np.nanmean(logp), np.nanstd(logp) + 1e-6) if np.isfinite(logp).any() else (0.0, 1.0)
    return np.nan_to_num((logp - mu) / sd, nan=0.0).astype(np.float32)


@dataclass
class ProfileScale:
    """Means and sds of the numeric profile fields (for the dense inputs), from the users table."""

    mean: dict[str, float]
    sd: dict[str, float]

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

    def rows(self, q: Query, items: Sequence[str], scores: np.ndarray, stats: LogStats) -> np.ndarray:
        """(len(items), width) float32 inputs; ``scores`` is the retrieval score of each item (0 = not retrieved)."""
        idx = np.array([self.cat.index[i] for i in items], dtype=np.int64)
        x = np.zeros((len(idx), self.width), dtype=np.float32)
        for name, value in self.user_part(q).items():
            a, b = self.layout[name]
            x[:, a:b] = value[None, :]
        for j, name in enumerate(ITEM_FIELDS):
            a, _ = self.layout[f"item_{name}"]
            x[:, a] = self.cat.fields[idx, j]
        for name, table in (("item_std", self.cat.std), ("item_re", self.cat.re)):
            a, b = self.layout[name]
            x[:, a:b] = table[idx]
        history = set(q.history)
        dense = {"retrieval_score": scores, "in_history": np.array([i in history for i in items], np.float32),
                 "item_pop": stats.pop[idx], "item_pop_recent": stats.pop_recent[idx],
                 "item_recency": stats.recency[idx], "price": stats.price[idx]}
        for name, value in dense.items():
            if name in self.layout:
                x[:, self.layout[name][0]] = value
        return x


def rank_scores(n: int) -> np.ndarray:
    """The retrieval-score input of a ranked list of ``n``: 1 for the first, falling linearly to 1/n."""
    return (1.0 - np.arange(n) / max(n, 1)).astype(np.float32)


@torch.inference_mode()
def predict(model: Any, x: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Click probabilities of input rows."""
    model.eval()
    out = [model(torch.from_numpy(x[s : s + batch_size])).squeeze(-1).numpy() for s in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


@dataclass
class Scorer:
    """A fitted DeepFM with what it needs to score any retriever's candidates for a shopper: the featuriser
    over the catalogue and popularity/recency as of the end of the log."""

    model: Any
    feat: Featuriser
    stats: LogStats
    vocab: Vocab

    def score(self, query: Query, candidates: Sequence[str]) -> np.ndarray:
        """Ranker probabilities of one query's retrieved candidates (in retrieval order; all in the catalogue)."""
        x = self.feat.rows(query, candidates, rank_scores(len(candidates)), self.stats)
        return predict(self.model, x)

    def reorder(self, query: Query, candidates: Sequence[str]) -> list[tuple[str, float | None]]:
        """The candidates best first with their probability. Items the ranker's catalogue lacks (products
        posted after it was built) keep their retrieval slot with no score: it knows nothing of them, and
        pushing them down would bury every new product."""
        known = [c for c in candidates if c in self.feat.cat.index]
        if not known:
            return [(c, None) for c in candidates]
        p = self.score(query, known)
        best = iter([(known[i], float(p[i])) for i in np.argsort(-p, kind="stable")])
        return [next(best) if c in self.feat.cat.index else (c, None) for c in candidates]

    def explain(self, query: Query, items: Sequence[str], top: int = 3,
                scores: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
        """Per item: score, its attributes matching the shopper's history/profile/context, and the fields
        and user x item field pairs with the largest FM second-order terms. ``scores`` are the items'
        probabilities when the caller has them (from ``reorder``): a DeepFM forward fewer."""
        items = [i for i in items if i in self.feat.cat.index]
        if not items:
            return []
        x = self.feat.rows(query, items, rank_scores(len(items)), self.stats)
        p = np.array([scores[i] for i in items]) if scores is not None else predict(self.model, x)
        with torch.inference_mode():
            terms, names = fm_terms(self.model, torch.from_numpy(x))  # (n, F, F)
        user_fields = {"hist_std", "hist_re", *USER_BUCKETS}
        is_user = torch.tensor([n in user_fields for n in names])
        # A field whose input is missing (id 0: no weight given, empty history) still has a learned row,
        # but "your missing weight" explains nothing: such fields are left out of the explanation.
        here = torch.from_numpy(np.stack([x[:, slice(*self.feat.layout[n])].any(axis=1) for n in names], axis=1))
        t = terms * (here[:, :, None] & here[:, None, :])
        t.diagonal(dim1=1, dim2=2).zero_()
        share = (0.5 * t.sum(2)).masked_fill(~here, float("-inf"))  # (n, F) each field's half of its pairs
        pair_mask = here[:, :, None] & here[:, None, :] & is_user[None, :, None] & ~is_user[None, None, :]
        pairs = t.masked_fill(~pair_mask, float("-inf")).flatten(1)  # (n, F*F) user x item terms only
        k_pairs = min(top, pairs.shape[1])
        pair_vals, pair_idx = pairs.topk(k_pairs, dim=1)
        field_vals, field_idx = share.topk(min(top, len(names)), dim=1)
        hist_values = {self.vocab.std_token(int(i)) for i in self.feat.user_part(query)["hist_std"] if i}
        history, profile = set(query.history), sorted(k for k, v in query.profile.items() if v is not None)
        out = []
        for row, item in enumerate(items):
            label = self.feat.cat.labels[self.feat.cat.index[item]]
            matches = {"history": sorted(f"{f}={v}" for f, v in label.items() if (f, v) in hist_values),
                       "repurchase": item in history, "profile": profile, "context": query.context}
            fields = [(names[j], round(float(v), 4)) for j, v in zip(field_idx[row].tolist(),
                                                                     field_vals[row].tolist(), strict=True)
                      if v != float("-inf")]
            top_pairs = [(names[j // len(names)], names[j % len(names)], round(float(v), 4))
                         for j, v in zip(pair_idx[row].tolist(), pair_vals[row].tolist(), strict=True)
                         if v != float("-inf")]
            out.append({"item_id": item, "score": round(float(p[row]), 5), "matches": matches,
                        "top_fields": fields, "top_pairs": top_pairs})
        return out


def field_label(field_name: str) -> str:
    """A ranker field as a shopper reads it: ``hist_std`` -> "your items", ``item_color`` -> "its color"."""
    names = {"hist_std": "your items", "hist_re": "your items' details", "item_std": "its other attributes",
             "item_re": "its details", "context": "your occasion", "body_type": "your body type",
             "hist_len_b": "how much you have bought"}
    if field_name in names:
        return names[field_name]
    if field_name.startswith("item_"):
        return "its " + field_name.removeprefix("item_").replace("_", " ")
    return "your " + field_name.removesuffix("_b")


def load_scorer(settings: Settings, dataset: str, data: TrainData | None = None) -> tuple[Scorer, dict[str, Any]]:
    """A dataset's saved reranker ready to reorder served candidates, with its checkpoint's payload.

    Features are built over the whole log (popularity and recency as a server knows them today) and the
    catalogue the item tower's vocabulary reads; ``data`` is that log when the caller has it loaded.
    CheckpointError (a ValueError) says what to run when the ranker is missing or does not match."""

    path = settings.paths.ranker(dataset)
    model, cfg, payload = load_ranker(path)
    vocab = Vocab.from_dict(read_payload(item_tower_for(settings, dataset), "item_tower", CHECKPOINT_FORMAT)["vocab"])
    if (vocab.std_size, vocab.re_size) != (cfg.std_size, cfg.re_size):
        raise CheckpointError(f"{path}: trained with another item tower's vocabulary; run `atelier train ranker "
                              f"-d {dataset}` again")
    if data is None:
        data = current_data(dataset, *load_tables(settings.paths.dataset(dataset)), settings.paths.features)
    cat = ItemFeatures.build(data.items, dataset, vocab, cfg, settings.paths.items(dataset, "enriched"))
    feat = Featuriser(cfg, cat, ProfileScale.build(data.users), model.feature_index)
    stats = LogStats.build(data.interactions, cat, rules_for(dataset).popularity_days)
    return Scorer(model, feat, stats, vocab), payload




