"""Two-tower retrieval at inference: a trained user tower's query vector against the item vectors.

``UserTowerRecommender`` ("two-tower") turns queries (recent items and cart, body profile, context
text) into user vectors and scores the catalogue by inner product with the retrieval keys ``[v, b]``
(item vector, log popularity over the recent window, by segment). ``serving_retriever`` loads the
served user tower with keys from the whole log; ``retrieve`` asks the store for one shopper's top-k.
Training lives in ``atelier.train.user``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
import torch

from atelier.config import Settings
from atelier.datasets import load_current, rules_for
from atelier.models.user_tower import PARTS, ProfileStats, UserInputs, UserTower, load_user_checkpoint
from atelier.recommend.baselines import PopularityRecommender
from atelier.recommend.encoder import catalogue_vectors, file_id
from atelier.recommender import Query, TrainData, fill, top_k
from atelier.store import SearchFilters, VectorStore
from atelier.text import TEXT_DIM, encode_texts

EncodeFn = Callable[[list[str]], np.ndarray]  # texts -> (n, 384) sentence vectors


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
            ranked, _ = top_k(scores, k_items)
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


def bias_window(dataset: str) -> float:
    """Days of the log whose interactions make an item's popularity b: the popularity baseline's."""
    return rules_for(dataset).popularity_days


def item_tower_for(settings: Settings, dataset: str) -> Path:
    """The item tower whose vectors a dataset's user tower reads: the dataset's own, else another dataset's
    (the first by name; `atelier run` trains H&M's).

    The vocabulary is shared by every dataset, so H&M's tower encodes a RentTheRunway dress from its
    attributes like any new H&M product (cold start across catalogues)."""
    own = settings.paths.item_tower(dataset)
    if own.is_file():
        return own
    others = sorted(settings.paths.models.glob(settings.paths.item_tower("*").name))
    if others:
        return others[0]
    raise FileNotFoundError(f"no item tower for {dataset!r} or any other dataset; run `atelier train item` first")


def serving_retriever(settings: Settings, dataset: str, data: TrainData | None = None) -> UserTowerRecommender:
    """The saved user tower of a dataset with retrieval keys from the whole log (today's popularity);
    ``data`` is the dataset's whole log when the caller has it loaded already."""
    if data is None:
        data = load_current(dataset, settings.paths.dataset(dataset), settings.paths.features)
    ids = data.items["item_id"].astype(str).tolist()
    tower = item_tower_for(settings, dataset)
    vectors = catalogue_vectors(tower, data, settings.paths.vectors(dataset, file_id(tower)))
    return UserTowerRecommender.from_checkpoint(settings.paths.user_tower(dataset), ids, vectors,
                                                window_days=bias_window(dataset), cache_dir=data.cache_dir).fit(data)


def retrieve(store: VectorStore, model_id: str, retriever: UserTowerRecommender, query: Query, k: int = 100,
             *, exclude_history: bool = False, filters: SearchFilters | None = None) -> list[tuple[str, float]]:
    """Top-k ``(item_id, score)`` for one shopper: the user tower's query vector, one HNSW search."""
    vector = retriever.user_vectors([query])[0][0]
    exclude = list(query.history) if exclude_history else []
    return store.search(model_id, vector, k, exclude_ids=exclude, filters=filters)
