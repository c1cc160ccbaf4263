"""The ranker stage: ``atelier train ranker``, the ranking chain's DeepFM trained on the evaluation split's
training window (its default cut, or ``cut``) and saved where the service loads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atelier.config import Settings
from atelier.datasets import time_split, train_data
from atelier.ingest import load_tables
from atelier.models.ranker import RankerConfig
from atelier.recommend.ranking import RankingSpec, VectorsFn, vector_spaces
from atelier.recommend.user_tower import item_tower_for
from atelier.train.ranker import ChainRecommender, ProgressFn, RankerTrainConfig


def chain_parts(settings: Settings, dataset: str) -> tuple[RankingSpec, dict[str, VectorsFn], Path]:
    """A dataset's chain: its default spec over the vector spaces it has, the spaces, its item tower."""
    vectors = vector_spaces(settings, dataset)
    return RankingSpec.for_dataset(dataset, list(vectors)), vectors, item_tower_for(settings, dataset)


def chain_recommender(settings: Settings, dataset: str, model: str = "deepfm", *, name: str | None = None,
                      tcfg: RankerTrainConfig | None = None, cfg: RankerConfig | None = None,
                      progress: ProgressFn | None = None, save: bool = False) -> ChainRecommender:
    """The chain of a dataset behind the harness interface (``deepfm`` reuses the saved ranker when it was
    trained on the same window; with ``save`` it saves what it trains as the served ranker)."""
    spec, vectors, tower = chain_parts(settings, dataset)
    return ChainRecommender(model, spec, vectors, tower, tcfg=tcfg, cfg=cfg, name=name, progress=progress,
                            enriched=settings.paths.items(dataset, "enriched"),
                            saved=settings.paths.ranker(dataset) if model == "deepfm" else None, save=save)


def train_ranker_stage(
    settings: Settings, dataset: str, tcfg: RankerTrainConfig, cfg: RankerConfig | None = None,
    progress: ProgressFn | None = None, cut: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """``atelier train ranker``: train the chain's DeepFM on the training window of the dataset's evaluation
    split and save it (a ranker saved for this very window and config is kept as it is)."""
    items, interactions, users = load_tables(settings.paths.dataset(dataset))
    data = train_data(time_split(dataset, interactions, cut), items, users, settings.paths.features)
    rec = chain_recommender(settings, dataset, tcfg=tcfg, cfg=cfg, progress=progress).fit(data)
    path = settings.paths.ranker(dataset)
    if "reused" not in rec.history:
        rec.save(path, {"dataset": dataset})
    return path, rec.history
