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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

import numpy as np
import pandas as pd
from scipy import sparse

from atelier.recommender import Query, Recommender, TrainData, fill

Candidates = list[tuple[str, float]]


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
        item_ids = np.array([str(i) for i in data.items["item_id"]], dtype=object)
        index = {item: i for i, item in enumerate(item_ids)}
        n = len(item_ids)
        log = data.interactions
        rows = log["item_id"].astype(str).map(index)
        ok = rows.notna().to_numpy()
        log, rows = log[ok], rows[ok].astype(np.int64).to_numpy()
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
