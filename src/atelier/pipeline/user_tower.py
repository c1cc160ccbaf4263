"""The user-tower stages of ``atelier run``: ``atelier train user`` and loading its keys into the store.

``train_user_stage`` fits the tower on the dataset's evaluation training window (``TwoTowerRecommender``,
the harness's fit, so the harness's numbers describe the checkpoint that is served) and saves it;
``index_user_stage`` loads the retrieval keys ``[v, b]`` into pgvector so a shopper's top 100 is one query.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from atelier.atomic import atomic_write
from atelier.catalogue import dataset_items
from atelier.config import Settings
from atelier.datasets import load_current, time_split, train_data
from atelier.ingest import load_tables
from atelier.recommend.encoder import file_id
from atelier.recommend.user_tower import bias_window, item_tower_for, serving_retriever
from atelier.store import index_vectors
from atelier.store.pointers import write_pointer
from atelier.train.user import ProgressFn, TrainUserConfig, TwoTowerRecommender


def train_user_stage(settings: Settings, dataset: str, cfg: TrainUserConfig, progress: ProgressFn | None = None,
                     cut: str | None = None) -> tuple[Path, dict[str, Any]]:
    """``atelier train user``: fit the tower on the training window of the dataset's evaluation split (its
    default cut, or ``cut``) and save it as the dataset's user tower (so the harness's numbers describe the
    checkpoint that is served)."""
    items, interactions, users = load_tables(settings.paths.dataset(dataset))
    data = train_data(time_split(dataset, interactions, cut), items, users, settings.paths.features)
    tower = item_tower_for(settings, dataset)
    rec = TwoTowerRecommender(tower, cfg=cfg, window_days=bias_window(dataset), progress=progress,
                              vectors_file=settings.paths.vectors(dataset, file_id(tower))).fit(data)
    assert rec.checkpoint is not None and rec.retriever is not None
    out = settings.paths.user_tower(dataset)
    with atomic_write(out) as fh, rec.checkpoint.open("rb") as src:
        shutil.copyfileobj(src, fh)
    return out, rec.retriever.history


def index_user_stage(settings: Settings, dataset: str, progress: Callable[[str, int, int], None] | None = None,
                     force: bool = True) -> dict[str, Any]:
    """Load the retrieval keys ``[v, b]`` of a dataset's user tower into pgvector (HNSW, inner product) and
    record the model id, so a shopper's top 100 is one store query. Without ``force``, a checkpoint that
    is already indexed is left as it is (the popularity column is then as of that indexing)."""
    model_id = f"two_tower:{dataset}:{file_id(settings.paths.user_tower(dataset))}"
    pointer = settings.paths.index_pointer(dataset, "two_tower")
    if not force and pointer.is_file():
        previous: dict[str, Any] = json.loads(pointer.read_text())
        if previous.get("model_id") == model_id and previous.get("ok"):
            return {**previous, "reused": True}
    data = load_current(dataset, settings.paths.dataset(dataset), settings.paths.features)
    retriever = serving_retriever(settings, dataset, data)
    assert retriever.keys is not None
    ids = [str(i) for i in retriever.item_ids]
    items = dataset_items(data.items, dataset, enriched=settings.paths.items(dataset, "enriched"))
    report = index_vectors(settings, model_id, ids, retriever.keys, items, progress=progress)
    report["model_id"] = model_id
    write_pointer(pointer, report)
    return report




