"""Baselines every model must beat, in the same report (DESIGN.md section 8).

- random: uniform over the catalogue (a floor)
- popularity: interaction counts over the last few training days
- repurchase+popularity: the user's own items, most recent first, then popularity (the classic H&M heuristic)
- text-knn: all-MiniLM-L6-v2 over title + description; user = mean of history (and cart) vectors;
  cosine over the whole catalogue; popularity for users with neither
- profile-popularity: popularity among shoppers with a similar body (body type, height, weight)
- context-popularity: popularity among rentals for the same occasion
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Self

import numpy as np
import pandas as pd

from atelier.recommender import Query, Recommender, TrainData, fill, popular_items, top_k
from atelier.text import encode_texts, item_texts


class RandomRecommender(Recommender):
    """Uniformly random catalogue items (seeded): the floor every model must clear."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._items = np.array([], dtype=object)

    def fit(self, data: TrainData) -> Self:
        """Remember the catalogue."""
        self._items = data.items["item_id"].astype(str).to_numpy(dtype=object)
        return self

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        """k random distinct items per query."""
        rng = np.random.default_rng(self.seed)
        k = min(k, len(self._items))
        return [[str(i) for i in rng.choice(self._items, size=k, replace=False)] for _ in queries]


class PopularityRecommender(Recommender):
    """The most bought items of the last ``window_days`` training days, the same for everyone."""

    name = "popularity"

    def __init__(self, window_days: float | None = 3) -> None:
        self.window_days = window_days
        self.popular: list[str] = []

    def fit(self, data: TrainData) -> Self:
        """Count recent interactions."""
        self.popular = popular_items(data.interactions, self.window_days)
        if len(self.popular) < 200:  # a quiet window: pad from all training days
            self.popular = fill(self.popular, popular_items(data.interactions), 10_000)
        return self

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        """The same top-k for every query."""
        top = self.popular[:k]
        return [list(top) for _ in queries]


class RepurchaseRecommender(PopularityRecommender):
    """The shopper's own items (most recent first), then popularity."""

    name = "repurchase+popularity"

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        """History newest first, padded with popular items."""
        return [fill(list(reversed(q.history)), self.popular, k) for q in queries]


class VectorKNNRecommender(PopularityRecommender):
    """Cosine similarity of item vectors to the mean of the user's history and cart; popularity without either.

    Subclasses say where the vectors come from (``item_vectors``); the ranking is shared.
    """

    name = "vector-knn"

    def __init__(self, window_days: float | None = 3, batch_users: int = 1024) -> None:
        super().__init__(window_days)
        self.batch_users = batch_users
        self.item_ids = np.array([], dtype=object)
        self.vectors = np.zeros((0, 0), dtype=np.float32)
        self._index: dict[str, int] = {}

    def item_vectors(self, data: TrainData) -> np.ndarray:
        """L2-normalised vectors of ``data.items`` in row order."""
        raise NotImplementedError

    def fit(self, data: TrainData) -> Self:
        """Popularity for the fallback, then the catalogue's vectors."""
        super().fit(data)
        self.vectors = self.item_vectors(data)
        self.item_ids = data.items["item_id"].astype(str).to_numpy(dtype=object)
        self._index = {item: i for i, item in enumerate(self.item_ids)}
        return self

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        """Nearest catalogue items to each user's mean history-and-cart vector; popularity without either."""
        out: list[list[str]] = [[] for _ in queries]
        rows = [(qi, [self._index[i] for i in q.seeds if i in self._index]) for qi, q in enumerate(queries)]
        with_history = [(qi, idx) for qi, idx in rows if idx]
        for start in range(0, len(with_history), self.batch_users):
            batch = with_history[start : start + self.batch_users]
            users = np.stack([self.vectors[idx].mean(axis=0) for _, idx in batch])  # (batch, dim)
            users /= np.linalg.norm(users, axis=1, keepdims=True) + 1e-12
            scores = users @ self.vectors.T  # (batch, n_items)
            ranked, _ = top_k(scores, k)
            for (qi, _), r in zip(batch, ranked, strict=True):
                out[qi] = [str(self.item_ids[j]) for j in r]
        for qi, idx in rows:
            if not idx:
                out[qi] = self.popular[:k]
        return out


class TextKNNRecommender(VectorKNNRecommender):
    """all-MiniLM-L6-v2 vectors of title + description (cached on disk by content hash)."""

    name = "text-knn"

    def __init__(self, window_days: float | None = 3, progress: Callable[[int, int], None] | None = None) -> None:
        super().__init__(window_days)
        self.progress = progress

    def item_vectors(self, data: TrainData) -> np.ndarray:
        """Encode the catalogue once; later runs read the cache."""
        items = data.items
        texts = item_texts(items["title"].fillna("").astype(str).tolist(),
                           items["description"].fillna("").astype(str).tolist())
        return encode_texts(texts, data.cache_dir, progress=self.progress)


def _bucket(value: object, width: float) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "?"
    return str(int(float(value) // width))  # type: ignore[arg-type]


def profile_keys(profile: dict[str, object] | pd.Series) -> list[tuple[str, ...]]:
    """Neighbourhood keys from finest to coarsest: body type x 5 cm x 5 kg, then coarser."""
    body = str(profile.get("body_type") or "?")
    height = _bucket(profile.get("height_cm"), 5.0)
    weight = _bucket(profile.get("weight_kg"), 5.0)
    return [("bhw", body, height, weight), ("bh", body, height), ("b", body)]


class SegmentPopularityRecommender(PopularityRecommender):
    """Popularity within the shopper's segment, padded from coarser segments, then overall.

    ``by="profile"``: body type and height/weight neighbourhood (RentTheRunway's body fields);
    ``by="context"``: the occasion the shopper names (``rented_for``).
    A segment ranks only once it has ``min_support`` interactions in the last
    ``segment_window_days``: on RentTheRunway (cut 2017-08-01) finer, thinner segments scored
    lower (profile MAP@12 0.0041 at 20, 0.0062 at 400, 0.0068 at 1,000).
    """

    def __init__(
        self, by: str = "profile", window_days: float | None = None, min_support: int = 1000,
        segment_window_days: float | None = 180, name: str | None = None,
    ) -> None:
        super().__init__(window_days)
        self.segment_window_days = segment_window_days
        if by not in ("profile", "context"):
            raise ValueError(f"by must be 'profile' or 'context', got {by!r}")
        self.by = by
        self.name = name or f"{by}-popularity"  # type: ignore[misc]
        self.min_support = min_support
        self.segments: dict[tuple[str, ...], list[str]] = {}

    def _keys(self, query: Query) -> list[tuple[str, ...]]:
        if self.by == "context":
            return [("ctx", (query.context or "").strip().lower())] if query.context else []
        return profile_keys(dict(query.profile))

    def fit(self, data: TrainData) -> Self:
        """Count interactions per segment."""
        super().fit(data)
        counts: dict[tuple[str, ...], Counter[str]] = defaultdict(Counter)
        inter = data.interactions
        if self.segment_window_days is not None and len(inter):
            # Rental catalogues turn over: counts from years ago rank items no longer offered.
            inter = inter[inter["ts"] > inter["ts"].max() - pd.Timedelta(days=self.segment_window_days)]
        if self.by == "context":
            if "occasion" not in inter:
                return self
            for occasion, item in zip(inter["occasion"].fillna("").str.lower(), inter["item_id"], strict=True):
                if occasion:
                    counts[("ctx", occasion)][str(item)] += 1
        else:
            users = data.users.set_index("user_id")
            profile_cols = [c for c in ("body_type", "height_cm", "weight_kg") if c in users.columns]
            if not profile_cols:
                return self
            prof = users[profile_cols].to_dict("index")
            for user, item in zip(inter["user_id"], inter["item_id"], strict=True):
                for key in profile_keys(prof.get(user, {})):
                    counts[key][str(item)] += 1
        self.segments = {
            key: [i for i, n in c.most_common() if n >= 1]
            for key, c in counts.items() if sum(c.values()) >= self.min_support
        }
        return self

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        """Finest segment first, then coarser ones, then overall popularity."""
        out = []
        for q in queries:
            ranked: list[str] = []
            for key in self._keys(q):
                ranked = fill(ranked, self.segments.get(key, []), k)
                if len(ranked) >= k:
                    break
            out.append(fill(ranked, self.popular, k))
        return out
