"""LightFM, the hybrid matrix factorisation a user would pick instead of atelier (the peer baseline).

Reference: M. Kula, "Metadata Embeddings for User and Item Cold-start Recommendations",
CBRecSys workshop at RecSys 2015 (arXiv:1507.08439); library ``lightfm``.

An item is represented as the normalised sum of the embeddings of its features: one identity
feature per catalogue item plus one ``column=value`` feature per catalogue attribute (H&M's
product type, colour, department, ...; RentTheRunway's category). Items nobody bought in the
training window therefore still get a representation from their attributes, so cold items can
be ranked. Users are identity features only. Training uses the WARP ranking loss.

``RepurchaseFirst(LightFMRecommender())`` (``atelier.recommender``) gives "repurchase+lightfm":
the shopper's own history (most recent first) and then LightFM's ranking, the peer of atelier's
repurchase+popularity baseline.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Self

import numpy as np
import pandas as pd
import scipy.sparse as sp
from lightfm import LightFM

from atelier.recommender import Query, Recommender, TrainData, fill, popular_items, top_k

__all__ = ["LightFMRecommender", "default_feature_columns", "item_feature_matrix"]

# Columns every catalogue has that are identifiers, free text or continuous, never categories.
_NON_FEATURE_COLUMNS = frozenset({"item_id", "title", "description", "group_id", "price"})
MAX_DISTINCT_VALUES = 5_000


def _same_partition(a: pd.Series, b: pd.Series) -> bool:
    """True when ``a`` and ``b`` are one-to-one relabellings of each other (e.g. a code and its name)."""
    pairs = pd.DataFrame({"a": a, "b": b}).drop_duplicates()
    return len(pairs) == a.nunique(dropna=False) == b.nunique(dropna=False)


def default_feature_columns(items: pd.DataFrame, max_distinct: int = MAX_DISTINCT_VALUES) -> list[str]:
    """Categorical attribute columns: not an id/text/price column, fewer than ``max_distinct`` values."""
    # A column with a single value puts the same feature on every item: no information, only
    # dilution of the identity feature, so it needs at least two values.
    candidates = [c for c in items.columns
                  if c not in _NON_FEATURE_COLUMNS and 2 <= items[c].nunique(dropna=True) < max_distinct]
    # H&M ships many attributes twice (``colour_group_code`` and ``colour_group_name``); an exact
    # relabelling adds no information and would only double that attribute's weight after row
    # normalisation, so keep one of each such pair: the readable one, i.e. the longer values
    # ("Ladieswear" rather than "A"), which makes feature names legible.
    def mean_length(column: str) -> float:
        return float(items[column].dropna().astype(str).str.len().mean())

    chosen: list[str] = []
    for column in sorted(candidates, key=mean_length, reverse=True):
        if not any(_same_partition(items[column], items[kept]) for kept in chosen):
            chosen.append(column)
    return [c for c in candidates if c in chosen]  # the catalogue's own column order


def item_feature_matrix(items: pd.DataFrame, columns: Sequence[str]) -> tuple[sp.csr_matrix, list[str]]:
    """Sparse (items x features) matrix: identity + ``column=value`` one-hots, rows summing to 1."""
    n_items = len(items)
    rows: list[np.ndarray] = [np.arange(n_items)]
    cols: list[np.ndarray] = [np.arange(n_items)]
    names: list[str] = [f"item={i}" for i in items["item_id"].astype(str)]
    offset = n_items
    for column in columns:
        values = items[column]
        present = values.notna().to_numpy() & (values.astype(str).str.strip() != "").to_numpy()
        codes, uniques = pd.factorize(values[present].astype(str), sort=True)
        rows.append(np.flatnonzero(present))
        cols.append(offset + codes)
        names.extend(f"{column}={value}" for value in uniques)
        offset += len(uniques)
    row = np.concatenate(rows)
    col = np.concatenate(cols)
    matrix = sp.csr_matrix((np.ones(len(row), dtype=np.float32), (row, col)), shape=(n_items, offset))
    # LightFM's own Dataset normalises each row to sum to 1 so items with many features do not get
    # larger representations (and larger scores) than items with few; do the same.
    row_sums = np.asarray(matrix.sum(axis=1)).ravel()
    matrix = sp.diags((1.0 / row_sums).astype(np.float32)) @ matrix
    return sp.csr_matrix(matrix, dtype=np.float32), names


class LightFMRecommender(Recommender):
    """LightFM with WARP loss over identity + catalogue-attribute item features; popularity for new users."""

    name = "lightfm"

    def __init__(
        self,
        no_components: int = 64,
        epochs: int = 20,
        learning_rate: float = 0.3,
        item_alpha: float = 1e-6,
        feature_columns: Sequence[str] | None = None,
        window_days: float | None = None,
        num_threads: int = 1,  # LightFM's threads update shared weights without locks: 2 differ run to run
        seed: int = 0,
        batch_users: int = 512,
    ) -> None:
        # Defaults tuned on H&M (train to 2020-09-18, test 19-20, checked on a 18th-day validation
        # split): WARP on three days of sparse purchases underfits at lightfm's usual learning
        # rate 0.05; 0.3 for 20 epochs was best (0.5 got worse again), fitting in ~30 s on 2 cores.
        self.no_components = no_components
        self.epochs = epochs
        self.learning_rate = learning_rate
        self.item_alpha = item_alpha
        self.feature_columns = None if feature_columns is None else list(feature_columns)
        self.window_days = window_days
        self.num_threads = num_threads
        self.seed = seed
        self.batch_users = batch_users
        self.model: LightFM | None = None
        self.item_ids = np.array([], dtype=object)
        self.user_index: dict[str, int] = {}
        self.popular: list[str] = []
        self.used_columns: list[str] = []
        self.fit_seconds = 0.0
        self._user_vectors = np.zeros((0, 0), dtype=np.float32)
        self._item_vectors = np.zeros((0, 0), dtype=np.float32)
        self._item_biases = np.zeros(0, dtype=np.float32)

    def fit(self, data: TrainData) -> Self:
        """Train LightFM on the training window over the whole catalogue; count popularity."""
        start = time.perf_counter()
        items = data.items.reset_index(drop=True)
        self.item_ids = items["item_id"].astype(str).to_numpy(dtype=object)
        item_index = {item: i for i, item in enumerate(self.item_ids)}
        self.used_columns = (default_feature_columns(items) if self.feature_columns is None
                             else list(self.feature_columns))
        features, _ = item_feature_matrix(items, self.used_columns)

        inter = data.interactions
        user_ids = inter["user_id"].astype(str).to_numpy(dtype=object)
        item_pos = pd.Series(inter["item_id"].astype(str).to_numpy(dtype=object)).map(item_index)
        known = item_pos.notna().to_numpy()  # interactions with items outside the catalogue cannot be scored
        users, user_pos = np.unique(user_ids[known], return_inverse=True)
        self.user_index = {str(u): i for i, u in enumerate(users)}
        # Binary matrix: a repeated purchase counts once. WARP learns a ranking from the set of
        # positives; weighting repeats would mainly over-train multi-packs bought in one basket.
        cols = item_pos[known].to_numpy(dtype=np.int64)
        matrix = sp.coo_matrix(
            (np.ones(len(cols), dtype=np.float32), (user_pos, cols)), shape=(len(users), len(items))
        ).tocsr()
        matrix.data[:] = 1.0  # duplicates were summed by tocsr(); reset them to 1
        matrix = matrix.tocoo()

        self.popular = popular_items(inter, self.window_days)
        if len(self.popular) < 200:  # a quiet window: pad from all training days, as the baselines do
            self.popular = fill(self.popular, popular_items(inter), 10_000)

        self.model = LightFM(no_components=self.no_components, loss="warp", learning_rate=self.learning_rate,
                             item_alpha=self.item_alpha, random_state=self.seed)
        if matrix.nnz:
            self.model.fit_partial(matrix, item_features=features, epochs=self.epochs,
                                   num_threads=self.num_threads)
            # Item vectors are the feature-weighted sums of feature embeddings; compute them once
            # so recommending is a dense matrix product rather than model.predict per user.
            self._item_biases, self._item_vectors = self.model.get_item_representations(features)
            _, self._user_vectors = self.model.get_user_representations()
        self.fit_seconds = time.perf_counter() - start
        return self

    def _rank(self, users: np.ndarray, k: int) -> np.ndarray:
        """Top-``k`` catalogue positions for a batch of user rows, best first."""
        # The user bias is the same for every item of a user, so it cannot change the ranking.
        scores = self._user_vectors[users] @ self._item_vectors.T + self._item_biases
        return top_k(scores, k)[0]

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        """LightFM's top-k for users seen in training; popularity for the others."""
        out: list[list[str]] = [[] for _ in queries]
        if k < 1:
            return out
        k_model = min(k, len(self.item_ids))
        seen: list[tuple[int, int]] = []
        if self._user_vectors.size:  # an empty training window leaves no model: popularity for all
            index = self.user_index
            seen = [(qi, index[q.user_id]) for qi, q in enumerate(queries) if q.user_id in index]
        # Batches bound the dense score block to batch_users x catalogue floats (~200 MB for H&M).
        for start in range(0, len(seen), self.batch_users):
            batch = seen[start : start + self.batch_users]
            ranked = self._rank(np.array([u for _, u in batch], dtype=np.int64), k_model)
            for (qi, _), row in zip(batch, ranked, strict=True):
                out[qi] = [str(self.item_ids[j]) for j in row]
        scored = {qi for qi, _ in seen}
        for qi in range(len(queries)):
            if qi not in scored:
                out[qi] = self.popular[:k]
        return out
