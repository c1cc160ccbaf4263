"""Stage 2 end to end: frozen item vectors -> trained user tower -> top-100 candidates.

``TwoTowerRecommender`` is the harness's two-tower retriever: ``fit`` trains a user tower on the
training window it is given (or reloads the checkpoint of an identical earlier fit) against the item
tower's frozen vectors, and ``recommend`` scores the catalogue by inner product with the retrieval keys
``[v, b]`` (item vector, log popularity). ``train_user_stage`` is ``atelier train user``: the same fit on
the dataset's evaluation split, saved where serving and ``atelier recommend`` look for it.
``index_user_stage`` loads the keys into the store so ``retrieve`` is one pgvector query.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Self

import numpy as np

from atelier.atomic import atomic_write
from atelier.config import Settings
from atelier.datasets import POPULARITY_WINDOW_DAYS, load_current, time_split, train_data
from atelier.models.user_tower import UserTowerConfig, save_user_checkpoint
from atelier.recommender import Query, Recommender, TrainData
from atelier.store import SearchFilters, VectorStore
from atelier.train_user import ProgressFn, TrainUserConfig, UserTowerRecommender


def bias_window(dataset: str) -> float:
    """Days of the log whose interactions make an item's popularity b: the popularity baseline's."""
    return POPULARITY_WINDOW_DAYS.get(dataset, 7.0)


def user_checkpoint_path(settings: Settings, dataset: str) -> Path:
    """Where ``atelier train user`` saves the user tower of a dataset."""
    return settings.run_dir / "models" / f"user_tower-{dataset}.pt"


def item_tower_for(settings: Settings, dataset: str) -> Path:
    """The item tower whose vectors a dataset's user tower reads: the dataset's own, else H&M's.

    The vocabulary is shared by every dataset, so H&M's tower encodes a RentTheRunway dress from its
    attributes like any new H&M product (cold start across catalogues)."""
    from atelier.content import checkpoint_path

    for name in (dataset, "hm"):
        path = checkpoint_path(settings, name)
        if path.is_file():
            return path
    raise FileNotFoundError(f"no item tower for {dataset!r} or 'hm'; run `atelier train item --dataset hm` first")


def fingerprint(data: TrainData, item_vectors: np.ndarray, cfg: TrainUserConfig, model_cfg: UserTowerConfig) -> str:
    """Short hash of everything a fit depends on: the training log, the item vectors and both configs."""
    digest = hashlib.sha256()
    log = data.interactions
    digest.update(json.dumps([data.dataset, len(log), str(log["ts"].min()), str(log["ts"].max()),
                              asdict(model_cfg), {**asdict(cfg), "drop": sorted(cfg.drop), "device": ""}],
                             sort_keys=True, default=str).encode())
    digest.update(np.ascontiguousarray(log["item_id"].astype(str).to_numpy()).astype("U").tobytes())
    digest.update(np.ascontiguousarray(item_vectors, dtype=np.float32).tobytes())
    return digest.hexdigest()[:12]


class TwoTowerRecommender(Recommender):
    """Two-tower retrieval through the harness: fit = train the user tower on the given window.

    ``drop`` removes parts of the user's input in training and at inference (the ablations);
    ``exclude_history`` (off for H&M, whose shoppers re-buy) removes the shopper's items from the results;
    ``item_bias=False`` drops the popularity coordinate of the keys (an ablation).
    """

    name = "two-tower"

    def __init__(
        self, item_checkpoint: Path, *, cfg: TrainUserConfig | None = None, item_bias: bool = True,
        window_days: float | None = 3, exclude_history: bool = False, name: str | None = None,
        progress: ProgressFn | None = None,
    ) -> None:
        self.item_checkpoint = item_checkpoint
        self.cfg = cfg or TrainUserConfig()
        self.item_bias = item_bias
        self.window_days, self.exclude_history = window_days, exclude_history
        self.progress = progress
        self.retriever: UserTowerRecommender | None = None
        self.checkpoint: Path | None = None
        if name:
            self.name = name  # type: ignore[misc]

    def item_vectors(self, data: TrainData) -> np.ndarray:
        """The frozen item-tower vectors of the catalogue (encoded once and cached by the content stage)."""
        from atelier.content import ItemTowerRecommender, file_id

        encoded = self.item_checkpoint.parent.parent / "vectors" / data.dataset / f"{file_id(self.item_checkpoint)}.npz"
        return ItemTowerRecommender(self.item_checkpoint, vectors_file=encoded).item_vectors(data)

    def fit(self, data: TrainData) -> Self:
        """Train (or reload an identical earlier fit of) the user tower on ``data.interactions``."""
        from atelier.content import file_id

        ids = data.items["item_id"].astype(str).tolist()
        vectors = self.item_vectors(data)
        model_cfg = UserTowerConfig(item_dim=vectors.shape[1], item_bias=self.item_bias)
        key = fingerprint(data, vectors, self.cfg, model_cfg)
        path = data.cache_dir / "user_towers" / f"{data.dataset}-{key}.pt"
        opts: dict[str, Any] = {"window_days": self.window_days, "exclude_history": self.exclude_history,
                                "drop": self.cfg.drop, "name": self.name}
        if path.is_file():
            rec = UserTowerRecommender.from_checkpoint(path, ids, vectors, cache_dir=data.cache_dir, **opts).fit(data)
        else:
            rec = UserTowerRecommender.from_training(data, ids, vectors, self.cfg, model_cfg, self.progress, **opts)
            save_user_checkpoint(rec.model, path, rec.stats, rec.body_vocab, file_id(self.item_checkpoint),
                                 extra={"history": rec.history, "dataset": data.dataset, "fingerprint": key,
                                        "train_window": [str(data.interactions["ts"].min()),
                                                         str(data.interactions["ts"].max())]})
        self.retriever, self.checkpoint = rec, path
        return self

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        """Top-k items per query from the trained tower."""
        if self.retriever is None:
            raise RuntimeError("call fit() first")
        return self.retriever.recommend(queries, k)


def two_tower_suite(settings: Settings, dataset: str, cfg: TrainUserConfig | None = None,
                    ablations: bool = False) -> list[Recommender]:
    """The two-tower retriever of a dataset for the harness, plus one per removed input with ``ablations``."""
    try:
        item_ckpt = item_tower_for(settings, dataset)
    except FileNotFoundError:
        return []
    cfg = cfg or TrainUserConfig()
    window = bias_window(dataset)
    suite: list[Recommender] = [TwoTowerRecommender(item_ckpt, cfg=cfg, window_days=window)]
    if ablations:
        for part in ("history", "context", "profile"):
            suite.append(TwoTowerRecommender(item_ckpt, cfg=replace(cfg, drop=frozenset({part})),
                                             window_days=window, name=f"two-tower -{part}"))
        suite.append(TwoTowerRecommender(item_ckpt, cfg=cfg, item_bias=False, window_days=window,
                                         name="two-tower -popularity"))
    return suite


def train_user_stage(settings: Settings, dataset: str, cfg: TrainUserConfig,
                     progress: ProgressFn | None = None) -> tuple[Path, dict[str, Any]]:
    """``atelier train user``: fit the tower on the dataset's evaluation training window and save it as
    the dataset's user tower (so the harness's numbers describe the checkpoint that is served)."""
    from atelier.ingest import load_tables

    items, interactions, users = load_tables(settings.dataset_dir(dataset))
    data = train_data(time_split(dataset, interactions), items, users, settings.run_dir / "features")
    rec = TwoTowerRecommender(item_tower_for(settings, dataset), cfg=cfg,
                              window_days=bias_window(dataset), progress=progress).fit(data)
    assert rec.checkpoint is not None and rec.retriever is not None
    out = user_checkpoint_path(settings, dataset)
    with atomic_write(out) as fh, rec.checkpoint.open("rb") as src:
        shutil.copyfileobj(src, fh)
    return out, rec.retriever.history


# ---------------------------------------------------------------- serving: keys in the store, one query per shopper


def two_tower_pointer(settings: Settings, dataset: str) -> Path:
    """Where ``index_user_stage`` records the store's two-tower model id of a dataset."""
    return settings.run_dir / "index" / f"{dataset}-two_tower.json"


def serving_retriever(settings: Settings, dataset: str, data: TrainData | None = None) -> UserTowerRecommender:
    """The saved user tower of a dataset with retrieval keys from the whole log (today's popularity);
    ``data`` is the dataset's whole log when the caller has it loaded already."""
    if data is None:
        data = load_current(dataset, settings.dataset_dir(dataset), settings.run_dir / "features")
    ids = data.items["item_id"].astype(str).tolist()
    vectors = TwoTowerRecommender(item_tower_for(settings, dataset)).item_vectors(data)
    return UserTowerRecommender.from_checkpoint(user_checkpoint_path(settings, dataset), ids, vectors,
                                                window_days=bias_window(dataset), cache_dir=data.cache_dir).fit(data)


def index_user_stage(settings: Settings, dataset: str, progress: Callable[[str, int, int], None] | None = None,
                     force: bool = True) -> dict[str, Any]:
    """Load the retrieval keys ``[v, b]`` of a dataset's user tower into pgvector (HNSW, inner product) and
    record the model id, so a shopper's top 100 is one store query. Without ``force``, a checkpoint that
    is already indexed is left as it is (the popularity column is then as of that indexing)."""
    from atelier.catalogue import column_items
    from atelier.content import file_id, write_pointer
    from atelier.store import index_vectors

    model_id = f"two_tower:{dataset}:{file_id(user_checkpoint_path(settings, dataset))}"
    pointer = two_tower_pointer(settings, dataset)
    if not force and pointer.is_file():
        previous: dict[str, Any] = json.loads(pointer.read_text())
        if previous.get("model_id") == model_id and previous.get("ok"):
            return {**previous, "reused": True}
    data = load_current(dataset, settings.dataset_dir(dataset), settings.run_dir / "features")
    retriever = serving_retriever(settings, dataset, data)
    assert retriever.keys is not None
    ids = [str(i) for i in retriever.item_ids]
    report = index_vectors(settings, model_id, ids, retriever.keys, column_items(data.items, dataset),
                           progress=progress)
    report["model_id"] = model_id
    write_pointer(pointer, report)
    return report


def two_tower_model_id(settings: Settings, dataset: str) -> str:
    """The store's model id of a dataset's indexed two-tower keys."""
    pointer = two_tower_pointer(settings, dataset)
    if not pointer.is_file():
        raise FileNotFoundError(f"no two-tower index for {dataset}; run `atelier train user -d {dataset}` first")
    return str(json.loads(pointer.read_text())["model_id"])


def retrieve(store: VectorStore, model_id: str, retriever: UserTowerRecommender, query: Query, k: int = 100,
             *, exclude_history: bool = False, filters: SearchFilters | None = None) -> list[tuple[str, float]]:
    """Top-k ``(item_id, score)`` for one shopper: the user tower's query vector, one HNSW search."""
    vector = retriever.user_vectors([query])[0][0]
    exclude = list(query.history) if exclude_history else []
    return store.search(model_id, vector, k, exclude_ids=exclude, filters=filters)
