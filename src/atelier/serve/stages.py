"""How the service builds its recommendation chain from the run folder: stage factories in preference order.

``PREFERENCE`` orders the stages of ``atelier.recommend.chain``: the ranking chain (every candidate source,
ordered by the trained ranker), content kNN, the two-tower retriever, popularity. Each stage has a factory
that loads what it needs from the run folder (the saved ranker, the indexed user tower) or returns None
when the dataset has no such model; adding a stage is ``register_stage(name, factory)`` (see
``StageContext`` for what a factory gets) with no change to the service or the routes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from atelier.catalogue import dataset_items
from atelier.config import Settings
from atelier.datasets import load_current
from atelier.recommend.chain import (
    ContentStage,
    PopularEntry,
    PopularityStage,
    PopularLists,
    RankedStage,
    Stage,
    TwoTowerStage,
    VectorSearch,
)
from atelier.recommend.encoder import ItemEncoder
from atelier.recommend.ranking import load_chain
from atelier.recommend.user_tower import serving_retriever
from atelier.recommender import TrainData
from atelier.store.pointers import live_model_id

# DESIGN.md puts two-tower before content; measured, it is not better yet: on H&M its top 12 is worse for
# shoppers with history (MAP@12 0.044 vs 0.059), and a new product (no interactions, b = 0) never reaches its
# top against popularity-weighted keys, which would break cold start. So content serves whoever gives items or
# a context, and two-tower serves what content cannot: a shopper known only by a body profile.
log = logging.getLogger("atelier.serve")


# The ranking chain serves everyone it can; content kNN and two-tower answer when no ranker is trained (or it
# cannot load); popularity serves from memory whatever happens to the store.
PREFERENCE = ("ranked", "content", "two_tower", "popularity")


StageFactory = Callable[["StageContext"], Stage | None]


STAGE_FACTORIES: dict[str, StageFactory] = {}


def register_stage(name: str, factory: StageFactory) -> None:
    """Add (or replace) the factory of a stage; its place in the chain comes from ``PREFERENCE``."""
    if name not in PREFERENCE:
        raise ValueError(f"unknown stage {name!r}: PREFERENCE orders {PREFERENCE}")
    STAGE_FACTORIES[name] = factory


@dataclass
class StageContext:
    """What a stage factory may use: settings, the store accessor, the live model and loaded parts."""

    settings: Settings
    dataset: str
    store: Callable[[], VectorSearch | None]
    model_id: str | None
    encoder: ItemEncoder | None
    popular: PopularLists
    profile_keys: Callable[[dict[str, object]], list[tuple[str, ...]]]
    data: TrainData | None = None  # the dataset's whole log as the service loaded it (read once for every stage)
    built: dict[str, Stage] = field(default_factory=dict)  # stages later in PREFERENCE, built first


def _ranked(ctx: StageContext) -> Stage | None:
    settings = ctx.settings
    if not settings.paths.ranker(ctx.dataset).is_file():
        return None
    data = ctx.data or load_current(ctx.dataset, settings.paths.dataset(ctx.dataset), settings.paths.features)
    try:
        chain, _ = load_chain(settings, ctx.dataset, data)
    except (ValueError, FileNotFoundError) as exc:  # CheckpointError: corrupt, stale, another item tower
        log.warning("ranking chain not loaded: %s", exc)
        return None
    items = dataset_items(data.items, ctx.dataset, enriched=settings.paths.items(ctx.dataset, "enriched"))
    # content kNN places products posted after the chain was fitted (at their retrieval slot)
    return RankedStage(chain, {item.item_id: PopularEntry.of(item) for item in items}, ctx.built.get("content"))


def _two_tower(ctx: StageContext) -> Stage | None:
    settings = ctx.settings
    if not settings.paths.user_tower(ctx.dataset).is_file():
        return None
    try:
        model_id = live_model_id(settings.paths, ctx.dataset, "two_tower")
        retriever = serving_retriever(settings, ctx.dataset, ctx.data)
    except FileNotFoundError:
        return None
    except ValueError as exc:  # CheckpointError: a corrupt user tower leaves the stage out, not the service
        log.warning("two-tower stage not loaded: %s", exc)
        return None
    return TwoTowerStage(ctx.store, model_id, retriever)


def _content(ctx: StageContext) -> Stage:
    return ContentStage(ctx.store, ctx.model_id, ctx.encoder)


def _popularity(ctx: StageContext) -> Stage:
    return PopularityStage(ctx.popular, ctx.profile_keys)


def build_chain(ctx: StageContext) -> tuple[list[Stage], dict[str, str]]:
    """The stages to run, in preference order, and a line for each of ``PREFERENCE`` for /ready."""
    status: dict[str, str] = {}
    for name in reversed(PREFERENCE):  # later stages first: the reranker reorders their candidates
        factory = STAGE_FACTORIES.get(name)
        if factory is None:
            status[name] = "not built yet"
            continue
        stage = factory(ctx)
        if stage is None:
            status[name] = "no model for this dataset"
            continue
        ctx.built[name] = stage
        status[name] = "registered"
    return [ctx.built[n] for n in PREFERENCE if n in ctx.built], {n: status[n] for n in PREFERENCE}


register_stage("ranked", _ranked)
register_stage("two_tower", _two_tower)
register_stage("content", _content)
register_stage("popularity", _popularity)
