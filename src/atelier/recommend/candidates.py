"""Candidate generation: the union of named sources, each candidate carrying every source's rank and score.

The winning H&M pipelines retrieved about a hundred candidates per shopper from several sources
(repurchase, same product, co-purchase, popularity, embeddings) and let a ranker order them; one
retriever's top 100 is not enough. ``CandidateGenerator`` asks each source for its ``depth`` best items
per query, merges them, and returns a ``CandidateSet``: one row per (query, item) with the rank and score
of the item in every source (NaN / 0 where a source did not propose it). The ranker reads those as
features; the harness reports what each source and the union find.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from atelier.recommend.sources import CandidateSource
from atelier.recommender import Query, TrainData


@dataclass
class CandidateSet:
    """Candidates of a batch of queries, one row per distinct (query, item), rows grouped by query."""

    sources: tuple[str, ...]
    query: np.ndarray  # (n,) int64: index of the query in the batch
    item: np.ndarray  # (n,) int64: catalogue row of the item
    rank: np.ndarray  # (n, S) float32: 0-based rank in each source, NaN where the source did not propose it
    score: np.ndarray  # (n, S) float32: each source's score, 0 where it did not propose it

    def __len__(self) -> int:
        return len(self.query)

    def per_query(self, n_queries: int) -> list[np.ndarray]:
        """The row indices of each query (rows are grouped by query)."""
        bounds = np.searchsorted(self.query, np.arange(n_queries + 1))
        return [np.arange(bounds[i], bounds[i + 1]) for i in range(n_queries)]

    def subset(self, rows: np.ndarray) -> CandidateSet:
        """The candidates at ``rows`` (kept in order)."""
        return CandidateSet(self.sources, self.query[rows], self.item[rows], self.rank[rows], self.score[rows])

    def first_source(self) -> np.ndarray:
        """(n,) int: the source that proposed each row at its best rank (ties: the first source listed)."""
        ranked = np.where(np.isnan(self.rank), np.inf, self.rank)
        return ranked.argmin(axis=1)


class CandidateGenerator:
    """Named sources, each asked for its own depth of candidates; their union per query."""

    def __init__(self, sources: Sequence[CandidateSource], depth: Mapping[str, int] | int = 50) -> None:
        names = [s.name for s in sources]
        assert len(set(names)) == len(names), f"source names must be distinct, got {names}"
        self.sources = list(sources)
        self.depth = {s.name: depth if isinstance(depth, int) else depth.get(s.name, 50) for s in self.sources}

    @property
    def names(self) -> tuple[str, ...]:
        """Source names, in the order of the rank/score columns."""
        return tuple(s.name for s in self.sources)

    def fit(self, data: TrainData) -> CandidateGenerator:
        """Fit every source on the window (sources built on one log share its counts)."""
        for source in self.sources:
            source.fit(data)
        return self

    def generate(self, queries: Sequence[Query], index: Mapping[str, int]) -> CandidateSet:
        """The union of every source's candidates for each query (items outside ``index`` are dropped)."""
        n_src = len(self.sources)
        qs, items, srcs, ranks, scores = [], [], [], [], []
        for s, source in enumerate(self.sources):
            for qi, cands in enumerate(source.candidates(queries, self.depth[source.name])):
                rows = [(index[i], sc) for i, sc in cands if i in index]
                if not rows:
                    continue
                qs.append(np.full(len(rows), qi, np.int64))
                items.append(np.fromiter((r for r, _ in rows), np.int64, len(rows)))
                srcs.append(np.full(len(rows), s, np.int64))
                ranks.append(np.arange(len(rows), dtype=np.float32))
                scores.append(np.fromiter((sc for _, sc in rows), np.float32, len(rows)))
        if not qs:
            empty = np.zeros(0, np.int64)
            return CandidateSet(self.names, empty, empty, np.zeros((0, n_src), np.float32),
                                np.zeros((0, n_src), np.float32))
        q, it, s_ = np.concatenate(qs), np.concatenate(items), np.concatenate(srcs)
        r, sc = np.concatenate(ranks), np.concatenate(scores)
        key: np.ndarray = q * (int(it.max()) + 1) + it
        uniq, row = np.unique(key, return_inverse=True)  # sorted by query, then item
        rank = np.full((len(uniq), n_src), np.nan, np.float32)
        score = np.zeros((len(uniq), n_src), np.float32)
        rank[row, s_] = r
        score[row, s_] = sc
        first = np.zeros(len(uniq), np.int64)
        first[row] = np.arange(len(row))
        return CandidateSet(self.names, q[first], it[first], rank, score)
