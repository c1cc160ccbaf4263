"""Candidate sources: small, named ways to propose items for a shopper, each with its own scores.

The strongest cheap recommender for H&M is a chain of four of them (the ``rules`` baseline): the
shopper's own purchases (most recent first), other colourways of what they bought or hold in the cart
(same ``group_id``, by popularity), items bought together with those (same customer and day over the
training window, by how many customers did), then popularity. Every source answers the same call
(``candidates(queries, k)`` -> ``[(item_id, score), ...]`` per query, best first), so the harness can
report what each one finds on its own and a ranker can read their ranks and scores.

All counts come from the ``TrainData`` a source is fitted on, i.e. the training window only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

import numpy as np
import pandas as pd
from scipy import sparse

from atelier.recommender import Query, Recommender, TrainData, fill, top_k

Candidates = list[tuple[str, float]]


def log_rows(data: TrainData) -> tuple[np.ndarray, dict[str, int], pd.DataFrame, np.ndarray]:
    """The catalogue's ids (object array), their row numbers, and the log's interactions with a catalogue item
    together with that item's row (interactions naming an item the catalogue lacks are left out)."""
    item_ids = np.array([str(i) for i in data.items["item_id"]], dtype=object)
    index = {item: i for i, item in enumerate(item_ids)}
    rows = data.interactions["item_id"].astype(str).map(index)
    ok = rows.notna().to_numpy()
    return item_ids, index, data.interactions[ok], rows[ok].astype(np.int64).to_numpy()


@dataclass
class LogIndex:
    """What the log-based sources share, computed once per training window."""

    item_ids: np.ndarray  # (n,) object, catalogue order
    index: dict[str, int]
    pop: np.ndarray  # (n,) float: interactions over the popularity window (+ a small all-time share for ties)
    popular: list[str]  # item ids by ``pop``, ties by id
    group_rows: dict[str, np.ndarray]  # group id -> item rows, most popular first
    group_of: np.ndarray  # (n,) object: each item's group id
    co: sparse.csr_matrix  # (n, n) customers who bought both items on one day (0 on the diagonal)

    @classmethod
    def build(cls, data: TrainData, window_days: float | None) -> LogIndex:
        """Counts of ``data.interactions`` over the catalogue ``data.items``."""
        item_ids, index, log, rows = log_rows(data)
        n = len(item_ids)
        total = np.bincount(rows, minlength=n).astype(np.float64)
        recent = np.ones(len(rows), dtype=bool)
        if window_days is not None and len(log):
            recent = (log["ts"] > log["ts"].max() - pd.Timedelta(days=window_days)).to_numpy()
        pop = np.bincount(rows[recent], minlength=n).astype(np.float64)
        pop += total / (total.max() + 1.0) * 0.5  # all-time sales only break ties of the window's counts
        order = np.lexsort((item_ids.astype(str), -pop))
        popular = [str(item_ids[i]) for i in order if pop[i] > 0]
        groups = data.items["group_id"].astype(str).to_numpy(dtype=object) if "group_id" in data.items \
            else item_ids
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        # each group's rows, most popular first: its members' popularity ranks, sorted, mapped back to rows
        group_rows = {str(g): order[np.sort(r.to_numpy())] for g, r in pd.Series(rank).groupby(groups)}
        return cls(item_ids, index, pop, popular, group_rows, groups, co_purchases(log, rows, n))


def co_purchases(log: pd.DataFrame, rows: np.ndarray, n: int) -> sparse.csr_matrix:
    """Item x item counts of customers who bought both on the same day (distinct customers)."""
    if not len(log):
        return sparse.csr_matrix((n, n), dtype=np.float32)
    baskets = pd.factorize(pd.MultiIndex.from_arrays([log["user_id"].astype(str).to_numpy(),
                                                      log["ts"].dt.normalize().to_numpy()]))[0]
    b = sparse.csr_matrix((np.ones(len(rows), np.float32), (baskets, rows)), shape=(baskets.max() + 1, n))
    b.data[:] = 1.0  # a quantity of two is one customer
    co = (b.T @ b).tocsr()
    co.setdiag(0)
    co.eliminate_zeros()
    return co


def log_index(data: TrainData, window_days: float | None) -> LogIndex:
    """The ``LogIndex`` of a training window, built once and shared by every source fitted on it."""
    key = ("log_index", window_days)
    if key not in data.memo:
        data.memo[key] = LogIndex.build(data, window_days)
    found: LogIndex = data.memo[key]
    return found


class CandidateSource(ABC):
    """Proposes items for shoppers; fitted on the training window."""

    name: ClassVar[str] = "source"

    def __init__(self, window_days: float | None = 3.0) -> None:
        self.window_days = window_days
        self.log: LogIndex | None = None

    def fit(self, data: TrainData) -> Self:
        """Share the window's counts (built once per ``TrainData``)."""
        self.log = log_index(data, self.window_days)
        return self

    @property
    def ready(self) -> LogIndex:
        """The fitted counts (AssertionError before ``fit``)."""
        assert self.log is not None, f"{self.name}: call fit() first"
        return self.log

    @abstractmethod
    def candidates(self, queries: Sequence[Query], k: int) -> list[Candidates]:
        """Up to ``k`` ``(item_id, score)`` per query, best first, never one of the query's own seeds
        unless the source is about them (own purchases)."""


class OwnItems(CandidateSource):
    """The shopper's own purchases, most recent first (a cart is not a purchase)."""

    name = "own"

    def candidates(self, queries: Sequence[Query], k: int) -> list[Candidates]:
        """History newest first; score 1 for the newest, falling to 1/n."""
        out = []
        for q in queries:
            recent = list(reversed(q.history))[:k]
            out.append([(item, 1.0 - r / len(recent)) for r, item in enumerate(recent)])
        return out


class Colourways(CandidateSource):
    """Other colourways (same ``group_id``) of the shopper's items and cart, most popular first."""

    name = "colourways"

    def candidates(self, queries: Sequence[Query], k: int) -> list[Candidates]:
        """Colourways of every seed, ranked by the window's popularity."""
        log = self.ready
        out = []
        for q in queries:
            seeds = [log.index[i] for i in q.seeds if i in log.index]
            seen = set(seeds)
            rows: list[int] = []
            for s in reversed(seeds):  # the newest seed's group first among equals
                for r in log.group_rows.get(str(log.group_of[s]), ()):
                    if r not in seen:
                        seen.add(int(r))
                        rows.append(int(r))
            rows.sort(key=lambda r: -log.pop[r])  # stable: ties keep the newest seed's order
            out.append([(str(log.item_ids[r]), float(log.pop[r])) for r in rows[:k]])
        return out


class CoBought(CandidateSource):
    """Items other customers bought on the same day as the shopper's items and cart, by how many did."""

    name = "co-bought"

    def candidates(self, queries: Sequence[Query], k: int) -> list[Candidates]:
        """Sum of co-purchase counts with every seed; ties by popularity."""
        log = self.ready
        seeds = [[log.index[i] for i in q.seeds if i in log.index] for q in queries]
        rows = np.repeat(np.arange(len(queries)), [len(s) for s in seeds])
        cols = np.fromiter((c for s in seeds for c in s), dtype=np.int64, count=len(rows))
        picks = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                                  shape=(len(queries), len(log.item_ids)))
        scores = (picks @ log.co).tocsr()  # (queries, items): co-purchases with all of a query's seeds
        out: list[Candidates] = []
        for qi, own in enumerate(seeds):
            lo, hi = scores.indptr[qi], scores.indptr[qi + 1]
            hits, counts = scores.indices[lo:hi], scores.data[lo:hi]
            keep = ~np.isin(hits, own)
            hits, counts = hits[keep], counts[keep]
            order = np.lexsort((-log.pop[hits], -counts))[:k]
            out.append(list(zip(log.item_ids[hits[order]].tolist(), counts[order].tolist(), strict=True)))
        return out


class Popular(CandidateSource):
    """The window's most bought items, the same for everyone."""

    name = "popularity"

    def candidates(self, queries: Sequence[Query], k: int) -> list[Candidates]:
        """The top-k of the popular list with their counts."""
        log = self.ready
        top = [(item, float(log.pop[log.index[item]])) for item in log.popular[:k]]
        return [list(top) for _ in queries]


def item_categories(data: TrainData) -> np.ndarray:
    """(n,) int code of each catalogue item's STD category (its first value; -1 when it has none), built once
    per ``TrainData`` from the item JSON (column values, and enriched ones where the run has them)."""
    key = "item_categories"
    if key not in data.memo:
        from atelier.catalogue import dataset_items

        jsons = dataset_items(data.items, data.dataset)
        names = [(item.clothes.get("category") or [""])[0] for item in jsons]
        codes, _ = pd.factorize(pd.Series(names).replace("", np.nan))
        data.memo[key] = codes.astype(np.int64)
    found: np.ndarray = data.memo[key]
    return found


class CategoryPopular(CandidateSource):
    """The window's most bought items within the categories of the shopper's items and cart (the three
    categories they hold most), interleaved by popularity."""

    name = "category-popularity"

    def __init__(self, window_days: float | None = 3.0, per_category: int = 200) -> None:
        super().__init__(window_days)
        self.per_category = per_category
        self.by_category: dict[int, np.ndarray] = {}
        self.category = np.zeros(0, np.int64)

    def fit(self, data: TrainData) -> Self:
        """Each category's items by the window's popularity (sold items only)."""
        super().fit(data)
        log = self.ready
        self.category = item_categories(data)
        sold = np.flatnonzero(log.pop > 0)
        order = sold[np.argsort(-log.pop[sold], kind="stable")]
        self.by_category = {int(c): order[self.category[order] == c][: self.per_category]
                            for c in np.unique(self.category[order]) if c >= 0}
        return self

    def candidates(self, queries: Sequence[Query], k: int) -> list[Candidates]:
        """Popular items of the seeds' three most held categories, best first (seeds left out)."""
        log = self.ready
        out: list[Candidates] = []
        for q in queries:
            seeds = [log.index[i] for i in q.seeds if i in log.index]
            cats = pd.Series(self.category[seeds]).value_counts().index[:3] if seeds else []
            pool = [self.by_category.get(int(c), np.zeros(0, np.int64)) for c in cats if c >= 0]
            rows = np.concatenate(pool) if pool else np.zeros(0, np.int64)
            rows = rows[~np.isin(rows, seeds)]
            rows = rows[np.argsort(-log.pop[rows], kind="stable")][:k]
            out.append(list(zip(log.item_ids[rows].tolist(), log.pop[rows].tolist(), strict=True)))
        return out


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """The rows of ``vectors`` as float32 unit vectors (a zero row stays zero)."""
    v = np.asarray(vectors, dtype=np.float32)
    return v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-12)


class VectorNeighbours(CandidateSource):
    """Nearest catalogue items to the shopper's items and cart in a vector space (item tower, MiniLM text):
    the unit mean of their vectors, each cart item counting ``cart_weight`` times, scored by cosine over
    the whole catalogue (exact), the seeds themselves left out. Unsold items are reachable: this is where
    content finds new products."""

    def __init__(self, name: str, vectors: Callable[[TrainData], np.ndarray], window_days: float | None = 3.0,
                 cart_weight: float = 2.0, batch: int = 512) -> None:
        super().__init__(window_days)
        self.name = name  # type: ignore[misc]
        self.vectors_of, self.cart_weight, self.batch = vectors, cart_weight, batch
        self.vectors = np.zeros((0, 0), np.float32)

    def fit(self, data: TrainData) -> Self:
        """The catalogue's vectors (unit length, in catalogue order)."""
        super().fit(data)
        v = np.asarray(self.vectors_of(data), dtype=np.float32)
        assert len(v) == len(data.items), f"{self.name}: {len(v)} vectors for {len(data.items)} items"
        self.vectors = unit_rows(v)
        return self

    def query_vectors(self, queries: Sequence[Query]) -> tuple[np.ndarray, list[list[int]]]:
        """(n, dim) unit query vectors (zero where a query has no known seed) and each query's seed rows."""
        log = self.ready
        out = np.zeros((len(queries), self.vectors.shape[1]), np.float32)
        seeds_of: list[list[int]] = []
        for qi, q in enumerate(queries):
            seeds = [log.index[i] for i in q.seeds if i in log.index]
            seeds_of.append(seeds)
            if seeds:
                cart = set(q.cart)
                w = np.array([self.cart_weight if log.item_ids[s] in cart else 1.0 for s in seeds], np.float32)
                mean = (self.vectors[seeds] * w[:, None]).sum(0)
                out[qi] = mean / (np.linalg.norm(mean) + 1e-12)
        return out, seeds_of

    def candidates(self, queries: Sequence[Query], k: int) -> list[Candidates]:
        """Top-k by cosine to the query vector; nothing for a query without known items."""
        log = self.ready
        qv, seeds_of = self.query_vectors(queries)
        out: list[Candidates] = [[] for _ in queries]
        todo = [qi for qi, s in enumerate(seeds_of) if s]
        k = min(k, len(self.vectors) - 1)
        for start in range(0, len(todo), self.batch):
            batch = todo[start : start + self.batch]
            scores = qv[batch] @ self.vectors.T  # (batch, n_items)
            for j, qi in enumerate(batch):
                scores[j, seeds_of[qi]] = -np.inf
            top, best = top_k(scores, k)
            for j, qi in enumerate(batch):
                out[qi] = list(zip(log.item_ids[top[j]].tolist(), best[j].tolist(), strict=True))
        return out


class NewArrivals(VectorNeighbours):
    """Items never sold, or first sold in the last ``fresh_days``, near the shopper's items and cart in a vector
    space, weighted by how likely a fresh item of their category is to sell: among the category's items still
    unsold ``fresh_days`` before the window's end, the share first sold since then (learned from the log, no
    hand weight). Score = (1 + cosine) / 2 x that share: the chance a similar fresh item is the one that sells."""

    def __init__(self, name: str, vectors: Callable[[TrainData], np.ndarray], window_days: float | None = 3.0,
                 fresh_days: float = 3.0, cart_weight: float = 2.0, batch: int = 512) -> None:
        super().__init__(name, vectors, window_days, cart_weight, batch)
        self.fresh_days = fresh_days
        self.pool = np.zeros(0, np.int64)  # the fresh items' catalogue rows
        # the pool's vectors and the share of each pool item's category that sold when fresh, gathered once
        # at fit: gathering the vectors per request copied ~45 MB each time
        self.pool_vectors = np.zeros((0, 0), np.float32)
        self.pool_prior = np.zeros(0, np.float32)

    def fit(self, data: TrainData) -> Self:
        """The fresh pool and the per-category sell-through of fresh items, as of the window's end."""
        super().fit(data)
        log = self.ready
        n = len(log.item_ids)
        rows = data.interactions["item_id"].astype(str).map(log.index)
        ok = rows.notna().to_numpy()
        ts = data.interactions["ts"][ok]
        rows = rows[ok].astype(np.int64).to_numpy()
        first = np.full(n, np.datetime64("NaT"), dtype="datetime64[ns]")
        if len(rows):
            earliest = pd.Series(ts.to_numpy()).groupby(rows).min()
            first[earliest.index.to_numpy()] = earliest.to_numpy()
        since = (ts.max() if len(ts) else pd.Timestamp(0)) - pd.Timedelta(days=self.fresh_days)
        never = np.isnat(first)
        fresh = never | (first > np.datetime64(since))  # unsold before `since`: the fresh items of the window
        new = fresh & ~never  # ... and those of them that sold since
        category = item_categories(data)
        codes = np.where(category >= 0, category, category.max() + 1 if len(category) else 0)
        sold = np.bincount(codes[new], minlength=codes.max() + 1 if len(codes) else 1).astype(np.float32)
        held = np.bincount(codes[fresh], minlength=codes.max() + 1 if len(codes) else 1).astype(np.float32)
        share = (sold + 1.0) / (held + 100.0)  # a little smoothing: a category with no fresh sale is not 0
        self.pool = np.flatnonzero(fresh | (log.pop <= 0))
        self.pool_vectors = np.ascontiguousarray(self.vectors[self.pool])
        self.pool_prior = share[codes[self.pool]].astype(np.float32)
        return self

    def candidates(self, queries: Sequence[Query], k: int) -> list[Candidates]:
        """Top-k fresh items by (1 + cosine) / 2 x their category's fresh sell-through."""
        log = self.ready
        qv, seeds_of = self.query_vectors(queries)
        out: list[Candidates] = [[] for _ in queries]
        todo = [qi for qi, s in enumerate(seeds_of) if s]
        pool = self.pool
        if not len(pool):
            return out
        k = min(k, len(pool))
        v, prior = self.pool_vectors, self.pool_prior
        for start in range(0, len(todo), self.batch):
            batch = todo[start : start + self.batch]
            scores = (1.0 + qv[batch] @ v.T) / 2.0 * prior[None, :]  # (batch, pool)
            top, best = top_k(scores, k)
            for j, qi in enumerate(batch):
                keep = ~np.isin(pool[top[j]], seeds_of[qi])
                out[qi] = list(zip(log.item_ids[pool[top[j][keep]]].tolist(), best[j][keep].tolist(), strict=True))
        return out


class RecommenderSource(CandidateSource):
    """A fitted harness recommender as a source (two-tower, occasion or body-profile popularity): its
    ranking, scored by rank (1 for the first, falling to 1/k)."""

    def __init__(self, name: str, recommender: Recommender, window_days: float | None = 3.0,
                 refit: bool = True) -> None:
        super().__init__(window_days)
        self.name = name  # type: ignore[misc]
        self.recommender, self.refit = recommender, refit

    def fit(self, data: TrainData) -> Self:
        """Fit the wrapped recommender on the window (unless it is fitted by its owner)."""
        super().fit(data)
        if self.refit:
            self.recommender.fit(data)
        return self

    def candidates(self, queries: Sequence[Query], k: int) -> list[Candidates]:
        """The wrapped recommender's top-k."""
        return [[(item, 1.0 - r / max(len(ranked), 1)) for r, item in enumerate(ranked)]
                for ranked in self.recommender.recommend(queries, k)]


def rule_sources(window_days: float | None) -> list[CandidateSource]:
    """The rule set's sources in its order: own, colourways, co-bought, popularity."""
    return [OwnItems(window_days), Colourways(window_days), CoBought(window_days), Popular(window_days)]


class RulesRecommender(Recommender):
    """The four-line rule set: own purchases, their colourways, items co-bought with them, popularity
    (a cart's items count as seeds for colourways and co-purchases)."""

    name = "rules"

    def __init__(self, window_days: float | None = 3.0) -> None:
        self.sources = rule_sources(window_days)

    def fit(self, data: TrainData) -> Self:
        """Fit every source on the window (one shared count)."""
        for source in self.sources:
            source.fit(data)
        return self

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        """Each source's list in turn, distinct, cut to ``k``."""
        lists = [source.candidates(queries, k) for source in self.sources]
        out = []
        for qi in range(len(queries)):
            ranked: list[str] = []
            for per_query in lists:
                ranked = fill(ranked, [item for item, _ in per_query[qi]], k)
                if len(ranked) >= k:
                    break
            out.append(ranked)
        return out
