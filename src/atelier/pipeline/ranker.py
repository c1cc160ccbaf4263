"""The reranker stage of ``atelier run``: ``atelier train ranker`` on the evaluation training window."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atelier.config import Settings
from atelier.datasets import rules_for, time_split, train_data
from atelier.ingest import load_tables
from atelier.models.ranker import RankerConfig
from atelier.recommend.baselines import SegmentPopularityRecommender
from atelier.recommend.content import ItemTowerRecommender
from atelier.recommend.encoder import file_id
from atelier.recommend.user_tower import item_tower_for
from atelier.recommender import Recommender, RepurchaseFirst
from atelier.train.ranker import ProgressFn, RerankRecommender, RerankTrainConfig
from atelier.train.user import TwoTowerRecommender


def make_retriever(settings: Settings, dataset: str, kind: str = "content") -> Recommender:
    """A fresh retriever for the reranker: ``content`` (item-tower kNN; behind the shopper's own items where
    shoppers re-buy), ``occasion`` (popularity within the stated occasion, RentTheRunway's strongest
    baseline) or ``two-tower`` (the trained user tower)."""
    ckpt = item_tower_for(settings, dataset)
    rules = rules_for(dataset)
    if kind == "two-tower":
        return TwoTowerRecommender(ckpt, window_days=rules.popularity_days,
                                   vectors_file=settings.paths.vectors(dataset, file_id(ckpt)))
    if kind == "occasion":
        return SegmentPopularityRecommender("context", rules.popularity_days)
    if kind != "content":
        raise ValueError(f"unknown retriever {kind!r}; choose content, occasion or two-tower")
    knn = ItemTowerRecommender(ckpt, window_days=rules.popularity_days,
                               vectors_file=settings.paths.vectors(dataset, file_id(ckpt)))
    return RepurchaseFirst(knn) if rules.rebuy else knn


def train_ranker_stage(
    settings: Settings, dataset: str, tcfg: RerankTrainConfig, cfg: RankerConfig | None = None,
    retriever: str = "content", progress: ProgressFn | None = None, cut: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """``atelier train ranker``: fit the reranker on the training window of the dataset's evaluation split (its
    default cut, or ``cut``) and save it."""
    items, interactions, users = load_tables(settings.paths.dataset(dataset))
    data = train_data(time_split(dataset, interactions, cut), items, users, settings.paths.features)
    rec = RerankRecommender(make_retriever(settings, dataset, retriever), item_tower_for(settings, dataset),
                            cfg=cfg, train=tcfg, enriched=settings.paths.items(dataset, "enriched"),
                            progress=progress).fit(data)
    path = settings.paths.ranker(dataset)
    rec.save(path, {"retriever": retriever, "dataset": dataset})
    return path, rec.history
