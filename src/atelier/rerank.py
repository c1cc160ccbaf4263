"""Stage 3 end to end: retrieve(100) -> DeepFM score -> top-k, with an explanation per item.

``RerankRecommender`` wraps any retriever behind the harness interface. ``fit`` never looks past the
training window it is given: the window's last ``label_days`` become labels and the days before them
history, a copy of the retriever is fitted on that history alone, its top-100 candidates for every user
active in the label days (plus a few random catalogue items) are labelled by what the user then bought,
and the DeepFM (``atelier.models.ranker``) is trained on those rows. Serving refits the retriever on the
whole window and recomputes popularity as of its end, so training and serving features mean the same.
"""

from __future__ import annotations

import copy
import json
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from atelier.catalogue import column_items
from atelier.datasets import POPULARITY_WINDOW_DAYS, build_queries, current_data, time_split, train_data
from atelier.models.ranker import (
    DENSE,
    ITEM_FIELDS,
    USER_BUCKETS,
    RankerConfig,
    build_ranker,
    fm_terms,
    load_ranker,
    save_ranker,
    transfer_embeddings,
)
from atelier.recommender import Query, Recommender, TrainData
from atelier.schema import normalise_text
from atelier.vocab import Vocab

LABEL_DAYS = {"hm": 1.0, "rtr": 90.0}  # H&M: 3 training days -> 2 of history, 1 of labels
# Raw catalogue columns the STD schema does not cover, hashed as RE attributes (the RE table is hashed, so a
# column value gets an id without any table; the tower has not trained these rows).
RAW_RE_COLUMNS = {"hm": ("product_type_name", "department_name", "section_name", "garment_group_name",
                         "graphical_appearance_name", "perceived_colour_value_name")}
ProgressFn = Callable[[str], None]


@dataclass
class RerankTrainConfig:
    """How the reranker's rows are built and how long it trains."""

    label_days: float | None = None  # None: LABEL_DAYS of the dataset
    max_users: int = 20000  # label-window users sampled (H&M has ~13k, RTR ~11k: all of them)
    positive_users_only: bool = True  # a user none of whose candidates was bought carries no ranking signal
    candidates: int = 100  # retriever depth, as served
    hard_negatives: int = 40  # retrieved non-purchases kept per user: more users for the same rows
    random_negatives: int = 5  # easy negatives per user so scores stay calibrated off the retriever's list
    epochs: int = 3
    batch_size: int = 512  # rows per step (listwise: whole users adding up to about this many rows)
    lr: float = 2e-3
    seed: int = 0
    loss: str = "pointwise"  # pointwise: log loss per row; listwise: softmax over each user's candidates


# --------------------------------------------------------------------------- features


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
class Catalogue:
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
              enriched: Path | None = None) -> Catalogue:
        """STD values from the column mapping, RE ids from enrichment output and raw columns."""
        jsons = column_items(items, dataset)
        extra_re: dict[str, dict[str, list[str]]] = {}
        if enriched is not None and enriched.is_file():
            for line in enriched.read_text().splitlines():
                rec = json.loads(line)
                extra_re[str(rec["item_id"])] = rec.get("reinforced_feature_value", {})
        raw_cols = [c for c in RAW_RE_COLUMNS.get(dataset, ()) if c in items]
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
            re_list = [vocab.re_id(f, v) for f, vs in extra_re.get(item.item_id, {}).items() for v in vs]
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
    def build(cls, log: pd.DataFrame, cat: Catalogue, window_days: float) -> LogStats:
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


def _standardised_log_price(cat: Catalogue, log: pd.DataFrame) -> np.ndarray:
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
class ProfileStats:
    """Means and sds of the numeric profile fields (for the dense inputs), from the users table."""

    mean: dict[str, float]
    sd: dict[str, float]

    @classmethod
    def build(cls, users: pd.DataFrame) -> ProfileStats:
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

    def __init__(self, cfg: RankerConfig, cat: Catalogue, profiles: ProfileStats, feature_index: dict[str, Any]):
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


@torch.inference_mode()
def encoded_tables(tower: Any, vocab: Vocab, re_ids: np.ndarray) -> dict[str, torch.Tensor]:
    """The tower's output vector for a one-attribute item per STD id (and per RE id in ``re_ids``), laid out
    like its ``emb_std``/``emb_re`` tables (zeros elsewhere) so ``transfer_embeddings`` can copy them."""
    from atelier.models.item_tower import ItemInputs
    from atelier.vocab import PAD_ID, ItemTokens

    def encode(std: list[tuple[int, int]], re_t: list[tuple[int, int, int]]) -> torch.Tensor:
        n = max(len(std), len(re_t))
        s = torch.tensor(std or [(PAD_ID, PAD_ID)] * n).reshape(n, 1, 2)  # (n, 1, [id, field])
        r = torch.tensor(re_t or [(PAD_ID, PAD_ID, PAD_ID)] * n).reshape(n, 1, 3)  # (n, 1, [id, parent, field])
        tokens = ItemTokens(s[..., 0], s[..., 1], s[..., 0] != PAD_ID, r[..., 0], r[..., 1], r[..., 2],
                            r[..., 0] != PAD_ID)
        text = torch.zeros(n, tower.config.n_text, tower.config.text_dim)
        return tower.eval()(ItemInputs(tokens, text, torch.zeros(n, tower.config.n_text, dtype=torch.bool)))

    out_dim = tower.config.out_dim
    std_table = torch.zeros(vocab.std_size, out_dim)
    ids = list(range(4, vocab.std_size))  # after [PAD] [MASK] [UNK] [CLS]
    std_table[ids] = encode([(i, vocab.field_id(vocab.std_token(i)[0])) for i in ids], [])
    re_table = torch.zeros(vocab.re_size, out_dim)
    re_list = [int(i) for i in re_ids if i > 1]
    if re_list:  # an RE value's field is unknown from its hash: parent and field stay [UNK]
        from atelier.vocab import UNK_ID

        re_table[re_list] = encode([], [(i, UNK_ID, UNK_ID) for i in re_list])
    # Unit vectors of one tower share a large common direction; centring keeps only what tells them apart.
    mean = std_table[ids].mean(0)
    std_table[ids] -= mean
    if re_list:
        re_table[re_list] -= mean
    return {"emb_std.weight": std_table, "emb_re.weight": re_table}


def rank_scores(n: int) -> np.ndarray:
    """The retrieval-score input of a ranked list of ``n``: 1 for the first, falling linearly to 1/n."""
    return (1.0 - np.arange(n) / max(n, 1)).astype(np.float32)


# --------------------------------------------------------------------------- training rows


@dataclass
class Rows:
    """Training rows grouped per user: inputs, labels and the user index of each row."""

    x: np.ndarray  # (N, width) float32
    y: np.ndarray  # (N,) float32
    group: np.ndarray  # (N,) int: which label-window user
    items: np.ndarray  # (N,) object: the candidate item id of each row
    info: dict[str, Any]


def label_cut(log: pd.DataFrame, label_days: float) -> pd.Timestamp:
    """First day of the label period: the last ``label_days`` whole days of the log."""
    return log["ts"].max().normalize() - pd.Timedelta(days=math.ceil(label_days) - 1)


def training_rows(
    data: TrainData, retriever: Recommender, feat: Featuriser, tcfg: RerankTrainConfig, window_days: float,
) -> Rows:
    """Rows from the training window only: history before the label days, labels from them.

    ``retriever`` is fitted here on the history part (so its candidates never saw the labels).
    """
    days = tcfg.label_days or LABEL_DAYS.get(data.dataset, 7.0)
    cut = label_cut(data.interactions, days)
    split = time_split(data.dataset, data.interactions, str(cut.date()))
    queries, actual = build_queries(split, data.users)
    rng = np.random.default_rng(tcfg.seed)
    if len(queries) > tcfg.max_users:
        queries = [queries[i] for i in sorted(rng.choice(len(queries), tcfg.max_users, replace=False))]
    history = train_data(split, data.items, data.users, data.cache_dir)  # everything as of the label cut
    retriever.fit(history)
    candidates = retriever.recommend(queries, tcfg.candidates)
    stats = LogStats.build(split.train, feat.cat, window_days)
    xs, ys, groups, row_items = [], [], [], []
    n_items, hits = len(feat.cat.item_ids), 0
    for g, (q, cands) in enumerate(zip(queries, candidates, strict=True)):
        cands = [c for c in cands if c in feat.cat.index]
        ranks = np.arange(len(cands))
        bought = np.array([c in actual[q.user_id] for c in cands], bool)
        hits += int(bought.any())
        if tcfg.positive_users_only and not bought.any():
            continue
        if (~bought).sum() > tcfg.hard_negatives:  # subsample the retrieved negatives, keep every positive
            keep = np.sort(np.concatenate([ranks[bought], rng.choice(ranks[~bought], tcfg.hard_negatives,
                                                                     replace=False)]))
        else:
            keep = ranks
        taken = set(cands)
        extra = [str(feat.cat.item_ids[j]) for j in rng.choice(n_items, tcfg.random_negatives, replace=False)]
        extra = [e for e in extra if e not in taken]
        items = [cands[i] for i in keep] + extra
        scores = np.concatenate([rank_scores(len(cands))[keep], np.zeros(len(extra), np.float32)])
        y = np.array([i in actual[q.user_id] for i in items], np.float32)
        xs.append(feat.rows(q, items, scores, stats))
        ys.append(y)
        groups.append(np.full(len(items), g))
        row_items += items
    assert xs, "no label-window user bought any of their candidates: nothing to learn from"
    y_all = np.concatenate(ys)
    info = {"label_cut": str(cut.date()), "history_days": [str(split.train["ts"].min().date()), str(cut.date())],
            "users": len(queries), "users_in_rows": len(xs), "rows": len(y_all), "positives": int(y_all.sum()),
            "users_with_a_positive_candidate": hits}
    return Rows(np.concatenate(xs), y_all, np.concatenate(groups), np.array(row_items, dtype=object), info)


# --------------------------------------------------------------------------- training


def _batches(rows: Rows, tcfg: RerankTrainConfig, gen: torch.Generator) -> list[torch.Tensor]:
    """Row indices per step: shuffled rows (pointwise), or shuffled whole users (listwise)."""
    if tcfg.loss == "pointwise":
        order = torch.randperm(len(rows.y), generator=gen)
        return list(order.split(tcfg.batch_size))
    if tcfg.loss != "listwise":
        raise ValueError(f"unknown ranker loss {tcfg.loss!r}; choose pointwise or listwise")
    starts = np.flatnonzero(np.r_[True, rows.group[1:] != rows.group[:-1]]).tolist()  # a user's rows are contiguous
    users = [torch.arange(a, b) for a, b in zip(starts, [*starts[1:], len(rows.y)], strict=True)]
    per_step = max(1, tcfg.batch_size // max(1, len(rows.y) // len(users)))
    shuffled: list[int] = torch.randperm(len(users), generator=gen).tolist()
    return [torch.cat([users[u] for u in shuffled[i : i + per_step]]) for i in range(0, len(shuffled), per_step)]


def listwise_loss(logits: torch.Tensor, y: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy over each user's candidates, the target spread evenly over what they bought
    (ListNet with one-hot relevance); users without a positive carry no signal and are left out."""
    _, local = torch.unique_consecutive(group, return_inverse=True)
    n_users = int(local.max()) + 1
    lse = torch.full((n_users,), float("-inf")).scatter_reduce(0, local, logits, "amax")  # stable logsumexp
    lse = lse + torch.zeros(n_users).index_add(0, local, (logits - lse[local]).exp()).log()
    pos = torch.zeros(n_users).index_add(0, local, y)
    nll = torch.zeros(n_users).index_add(0, local, y * (lse[local] - logits)) / pos.clamp(min=1)
    return nll[pos > 0].mean()


def train_ranker(model: Any, rows: Rows, tcfg: RerankTrainConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Setup, loop, evaluate: Adam on pointwise log loss or the listwise loss (+ DeepCTR's L2 terms)."""
    torch.manual_seed(tcfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    x, y, group = torch.from_numpy(rows.x), torch.from_numpy(rows.y), torch.from_numpy(rows.group)
    gen = torch.Generator().manual_seed(tcfg.seed)
    history: dict[str, Any] = {"loss": [], "initial_loss": _log_loss(model, x, y)}
    for epoch in range(tcfg.epochs):
        model.train()
        total, seen = 0.0, 0
        for b in _batches(rows, tcfg, gen):
            if tcfg.loss == "listwise":
                # DeepCTR's output layer applies the sigmoid only for task "binary": switched off here to get
                # the logits a softmax needs; scores stay sigmoid(logit), so the ranking is the same.
                model.out.task = "regression"
                try:
                    loss = listwise_loss(model(x[b]).squeeze(-1), y[b], group[b])
                finally:
                    model.out.task = "binary"
            else:
                loss = F.binary_cross_entropy(model(x[b]).squeeze(-1), y[b])  # DeepFM ends in a sigmoid
            opt.zero_grad()
            (loss + model.get_regularization_loss()).backward()
            opt.step()
            total, seen = total + loss.item() * len(b), seen + len(b)
        history["loss"].append(round(total / max(seen, 1), 5))
        if progress is not None:
            progress(f"epoch {epoch + 1}/{tcfg.epochs}: loss {history['loss'][-1]:.4f}")
    model.eval()
    return history


@torch.inference_mode()
def _log_loss(model: Any, x: torch.Tensor, y: torch.Tensor, limit: int = 20000) -> float:
    model.eval()
    p = model(x[:limit]).squeeze(-1).clamp(1e-7, 1 - 1e-7)
    return round(float(F.binary_cross_entropy(p, y[:limit])), 5)


@torch.inference_mode()
def predict(model: Any, x: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Click probabilities of input rows."""
    model.eval()
    out = [model(torch.from_numpy(x[s : s + batch_size])).squeeze(-1).numpy() for s in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


# --------------------------------------------------------------------------- the recommender


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


class RerankRecommender(Recommender):
    """retrieve(``candidates``) -> DeepFM -> top-k, behind the harness interface.

    ``item_checkpoint`` gives the vocabulary (ids of the ``std``/``re`` tables) and, with
    ``cfg.transfer``, the embeddings the ranker starts from.
    """

    name = "rerank"

    def __init__(
        self, retriever: Recommender, item_checkpoint: Path, *, cfg: RankerConfig | None = None,
        train: RerankTrainConfig | None = None, window_days: float | None = None, enriched: Path | None = None,
        name: str | None = None, progress: ProgressFn | None = None, saved: Path | None = None,
    ) -> None:
        self.retriever = retriever
        self.item_checkpoint = item_checkpoint
        self.cfg_overrides = cfg
        self.tcfg = train or RerankTrainConfig()
        self.window_days, self.enriched, self.progress = window_days, enriched, progress
        self.saved = saved  # a checkpoint to reuse when it was trained on the same window (see fit)
        self.model: Any = None
        self.cfg: RankerConfig | None = None
        self.feat: Featuriser | None = None
        self.stats: LogStats | None = None
        self.vocab: Vocab | None = None
        self.history: dict[str, Any] = {}
        self.name = name or f"rerank({retriever.name})"  # type: ignore[misc]

    def _setup(self, data: TrainData) -> dict[str, torch.Tensor]:
        """Vocabulary, config, model and featuriser; returns the tables to transfer from."""
        from atelier.models.item_tower import load_checkpoint

        tower, payload = load_checkpoint(self.item_checkpoint)
        self.vocab = Vocab.from_dict(payload["vocab"])
        base = RankerConfig(std_size=self.vocab.std_size, re_size=self.vocab.re_size)
        self.cfg = replace(self.cfg_overrides, std_size=base.std_size, re_size=base.re_size) \
            if self.cfg_overrides is not None else base
        self.model = build_ranker(self.cfg)
        cat = Catalogue.build(data.items, data.dataset, self.vocab, self.cfg, self.enriched)
        self.feat = Featuriser(self.cfg, cat, ProfileStats.build(data.users), self.model.feature_index)
        if self.cfg.transfer_source == "encoded":
            return encoded_tables(tower, self.vocab, np.unique(cat.re))
        assert self.cfg.transfer_source == "table", f"unknown transfer source {self.cfg.transfer_source!r}"
        return {k: v.detach() for k, v in tower.state_dict().items()}

    def fit(self, data: TrainData) -> Self:
        """Build rows from the window's last days, train the DeepFM, then fit the retriever on all of it."""
        torch.manual_seed(self.tcfg.seed)
        t0 = time.perf_counter()
        tower_state = self._setup(data)
        assert self.cfg is not None and self.feat is not None
        window = self.window_days or POPULARITY_WINDOW_DAYS.get(data.dataset, 7.0)
        if self.saved is not None and self._reuse_saved(data):
            self.retriever.fit(data)
            self.stats = LogStats.build(data.interactions, self.feat.cat, window)
            return self
        transfer = transfer_embeddings(self.model, tower_state, self.cfg) if self.cfg.transfer else {}
        rows = training_rows(data, copy.deepcopy(self.retriever), self.feat, self.tcfg, window)
        t1 = time.perf_counter()
        if self.progress is not None:
            self.progress(f"{rows.info['rows']} rows, {rows.info['positives']} positives ({t1 - t0:.0f} s)")
        hist = train_ranker(self.model, rows, self.tcfg, self.progress)
        self.history = {"rows": rows.info, "transfer": transfer, "rows_seconds": round(t1 - t0, 1),
                        "train_end": str(data.interactions["ts"].max()),
                        "train_seconds": round(time.perf_counter() - t1, 1), **hist}
        self.retriever.fit(data)
        self.stats = LogStats.build(data.interactions, self.feat.cat, window)
        return self

    def _reuse_saved(self, data: TrainData) -> bool:
        """Load the saved weights when they were trained on this very window (same last interaction, same
        configs): refitting would only repeat that work. Any other window trains afresh, so a saved model
        never scores days it has seen."""
        assert self.saved is not None
        model, cfg, payload = load_ranker(self.saved)
        same = (payload.get("history", {}).get("train_end") == str(data.interactions["ts"].max())
                and cfg == self.cfg and payload.get("train") == asdict(self.tcfg))
        if same:
            self.model, self.history = model, {**payload["history"], "reused": str(self.saved)}
        return same

    @property
    def scorer(self) -> Scorer:
        """The fitted model with its featuriser and log statistics."""
        assert self.feat is not None and self.stats is not None and self.vocab is not None, "call fit() first"
        return Scorer(self.model, self.feat, self.stats, self.vocab)

    def score(self, query: Query, candidates: Sequence[str]) -> np.ndarray:
        """Ranker probabilities of one query's retrieved candidates (in retrieval order)."""
        return self.scorer.score(query, candidates)

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        """Retrieve ``candidates`` per query, reorder them by the ranker, cut to k."""
        scorer = self.scorer
        ranked = self.retriever.recommend(queries, max(k, self.tcfg.candidates))
        return [[item for item, _ in scorer.reorder(q, cands)][:k] for q, cands in zip(queries, ranked, strict=True)]

    def explain(self, query: Query, items: Sequence[str], top: int = 3) -> list[dict[str, Any]]:
        """See ``Scorer.explain``."""
        return self.scorer.explain(query, items, top)

    def save(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        """Checkpoint the ranker with the training history (the featuriser is rebuilt from the catalogue)."""
        assert self.cfg is not None
        save_ranker(self.model, self.cfg, path, {"history": self.history, "train": asdict(self.tcfg),
                                                 "dense": list(DENSE), **(extra or {})})

    def load_weights(self, path: Path) -> None:
        """Replace the fitted model by a saved one (same config)."""
        self.model, self.cfg, _ = load_ranker(path)


# --------------------------------------------------------------------------- stage (CLI)


def ranker_path(settings: Any, dataset: str) -> Path:
    """Where ``atelier train ranker`` saves a dataset's reranker."""
    return Path(settings.run_dir) / "models" / f"ranker-{dataset}.pt"


def make_retriever(settings: Any, dataset: str, kind: str = "content") -> Recommender:
    """A fresh retriever for the reranker: ``content`` (item-tower kNN; on H&M behind the shopper's own
    items, since H&M shoppers re-buy), ``occasion`` (popularity within the stated occasion, RentTheRunway's
    strongest baseline) or ``two-tower`` (the trained user tower)."""
    from atelier.content import ItemTowerRecommender, file_id
    from atelier.recommender import RepurchaseFirst
    from atelier.two_tower import TwoTowerRecommender, item_tower_for

    ckpt = item_tower_for(settings, dataset)
    window = POPULARITY_WINDOW_DAYS.get(dataset, 7.0)
    if kind == "two-tower":
        return TwoTowerRecommender(ckpt, window_days=window)
    if kind == "occasion":
        from atelier.baselines import SegmentPopularityRecommender

        return SegmentPopularityRecommender("context", window)
    if kind != "content":
        raise ValueError(f"unknown retriever {kind!r}; choose content, occasion or two-tower")
    vectors = Path(settings.run_dir) / "vectors" / dataset / f"{file_id(ckpt)}.npz"
    knn = ItemTowerRecommender(ckpt, window_days=window, vectors_file=vectors)
    return RepurchaseFirst(knn) if dataset == "hm" else knn


def train_ranker_stage(
    settings: Any, dataset: str, tcfg: RerankTrainConfig, cfg: RankerConfig | None = None,
    retriever: str = "content", progress: ProgressFn | None = None,
) -> tuple[Path, dict[str, Any]]:
    """``atelier train ranker``: fit the reranker on the dataset's evaluation training window and save it."""
    from atelier.ingest import load_tables
    from atelier.two_tower import item_tower_for

    items, interactions, users = load_tables(settings.dataset_dir(dataset))
    data = train_data(time_split(dataset, interactions), items, users, Path(settings.run_dir) / "features")
    rec = RerankRecommender(make_retriever(settings, dataset, retriever), item_tower_for(settings, dataset),
                            cfg=cfg, train=tcfg, enriched=enriched_path(settings, dataset), progress=progress).fit(data)
    path = ranker_path(settings, dataset)
    rec.save(path, {"retriever": retriever, "dataset": dataset})
    return path, rec.history


def load_scorer(settings: Any, dataset: str, data: TrainData | None = None) -> tuple[Scorer, dict[str, Any]]:
    """A dataset's saved reranker ready to reorder served candidates, with its checkpoint's payload.

    Features are built over the whole log (popularity and recency as a server knows them today) and the
    catalogue the item tower's vocabulary reads; ``data`` is that log when the caller has it loaded.
    CheckpointError (a ValueError) says what to run when the ranker is missing or does not match."""
    from atelier.ingest import load_tables
    from atelier.models.item_tower import CHECKPOINT_FORMAT, CheckpointError, read_payload
    from atelier.two_tower import item_tower_for

    path = ranker_path(settings, dataset)
    model, cfg, payload = load_ranker(path)
    vocab = Vocab.from_dict(read_payload(item_tower_for(settings, dataset), "item_tower", CHECKPOINT_FORMAT)["vocab"])
    if (vocab.std_size, vocab.re_size) != (cfg.std_size, cfg.re_size):
        raise CheckpointError(f"{path}: trained with another item tower's vocabulary; run `atelier train ranker "
                              f"-d {dataset}` again")
    if data is None:
        data = current_data(dataset, *load_tables(settings.dataset_dir(dataset)), Path(settings.run_dir) / "features")
    cat = Catalogue.build(data.items, dataset, vocab, cfg, enriched_path(settings, dataset))
    feat = Featuriser(cfg, cat, ProfileStats.build(data.users), model.feature_index)
    stats = LogStats.build(data.interactions, cat, POPULARITY_WINDOW_DAYS.get(dataset, 7.0))
    return Scorer(model, feat, stats, vocab), payload


def enriched_path(settings: Any, dataset: str) -> Path:
    """Enrichment output whose RE values the reranker reads as item fields (absent: columns only)."""
    return Path(settings.run_dir) / "items" / f"{dataset}.enriched.jsonl"


def rerank_suite(settings: Any, dataset: str) -> list[Recommender]:
    """The harness entry for a dataset's saved reranker: the same retriever and configs, refitted on the
    harness's training window (empty when ``atelier train ranker`` has not run)."""
    from atelier.two_tower import item_tower_for

    path = ranker_path(settings, dataset)
    if not path.is_file():
        return []
    _, cfg, payload = load_ranker(path)
    kind = str(payload.get("retriever", "content"))
    rec = RerankRecommender(make_retriever(settings, dataset, kind), item_tower_for(settings, dataset),
                            cfg=cfg, train=RerankTrainConfig(**payload["train"]),
                            enriched=enriched_path(settings, dataset), name=f"rerank ({kind})", saved=path)
    return [rec]
