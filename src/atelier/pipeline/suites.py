"""The models of an evaluation report: baselines, every trained stage found in the run folder, and
``atelier``, the served chain.

``model_suite`` is what ``atelier evaluate`` and ``atelier run`` score. ``ServedChain`` is the served
chain behind the harness interface: ``atelier serve`` answers a request by running its stage chain
(``atelier.recommend.chain``): the reranker over the first retrieval stage that serves (content, then
two-tower), content kNN, two-tower, popularity, each padding what the earlier ones left short.
``ServedChain`` builds the same stages from models fitted on the harness's training window and runs every
test query through ``run_chain`` with the request the API would build (history and cart excluded, as
``exclude_seen`` does by default). Two differences from a live server, both deliberate: vector searches
are exact (``ExactIndex``; the served HNSW index is checked against exact search when it is built) and
explanations are not built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Self

import numpy as np

from atelier.config import Settings
from atelier.datasets import EvaluationError, rules_for
from atelier.models.ranker import load_ranker
from atelier.pipeline.ranker import make_retriever
from atelier.recommend.baselines import (
    PopularityRecommender,
    RandomRecommender,
    RepurchaseRecommender,
    SegmentPopularityRecommender,
    TextKNNRecommender,
    profile_keys,
)
from atelier.recommend.chain import (
    ContentStage,
    PopularityStage,
    RerankStage,
    Stage,
    TwoTowerStage,
    popular_lists,
    run_chain,
    stage_request,
)
from atelier.recommend.content import ItemTowerRecommender
from atelier.recommend.encoder import ItemEncoder, file_id
from atelier.recommend.exact_index import ExactIndex
from atelier.recommend.sources import RulesRecommender
from atelier.recommend.user_tower import bias_window, item_tower_for
from atelier.recommender import Query, Recommender, RepurchaseFirst, TrainData
from atelier.train.ranker import RerankRecommender, RerankTrainConfig
from atelier.train.user import TrainUserConfig, TwoTowerRecommender


def baseline_suite(dataset: str, names: Sequence[str] | None = None) -> list[Recommender]:
    """The baselines of a dataset, in report order (all of them when ``names`` is None)."""
    rules = rules_for(dataset)
    window = rules.popularity_days
    # The strongest simple baseline: where shoppers re-buy, own items, colourways, co-purchases, popularity;
    # where they rent for an occasion and rarely rent an item twice, popularity within the occasion.
    rule_set: Recommender = (SegmentPopularityRecommender("context", window, name="rules") if rules.occasion_rule
                             else RulesRecommender(window))
    suite: list[Recommender] = [
        RandomRecommender(),
        PopularityRecommender(window),
        RepurchaseRecommender(window),
        rule_set,
        TextKNNRecommender(window),
    ]
    if rules.occasion_rule:
        suite.append(SegmentPopularityRecommender("profile", window))
    try:
        from atelier.lightfm_peer import LightFMRecommender
    except ImportError:  # lightfm is optional: it needs a compiler to install
        pass
    else:
        lightfm = LightFMRecommender(window_days=window)
        suite += [lightfm, RepurchaseFirst(lightfm, shared=True)]
    return _select(suite, names)


def two_tower_suite(settings: Settings, dataset: str, cfg: TrainUserConfig | None = None,
                    ablations: bool = False) -> list[Recommender]:
    """The two-tower retriever of a dataset for the harness, plus one per removed input with ``ablations``."""
    try:
        item_ckpt = item_tower_for(settings, dataset)
    except FileNotFoundError:
        return []
    cfg = cfg or TrainUserConfig()
    window = bias_window(dataset)
    vectors = settings.paths.vectors(dataset, file_id(item_ckpt))
    suite: list[Recommender] = [TwoTowerRecommender(item_ckpt, cfg=cfg, window_days=window, vectors_file=vectors)]
    if ablations:
        for part in ("history", "context", "profile"):
            suite.append(TwoTowerRecommender(item_ckpt, cfg=replace(cfg, drop=frozenset({part})), window_days=window,
                                             name=f"two-tower -{part}", vectors_file=vectors))
        suite.append(TwoTowerRecommender(item_ckpt, cfg=cfg, item_bias=False, window_days=window,
                                         name="two-tower -popularity", vectors_file=vectors))
    return suite


def rerank_suite(settings: Settings, dataset: str) -> list[Recommender]:
    """The harness entry for a dataset's saved reranker: the same retriever and configs, refitted on the
    harness's training window (empty when ``atelier train ranker`` has not run)."""
    path = settings.paths.ranker(dataset)
    if not path.is_file():
        return []
    _, cfg, payload = load_ranker(path)
    kind = str(payload.get("retriever", "content"))
    rec = RerankRecommender(make_retriever(settings, dataset, kind), item_tower_for(settings, dataset),
                            cfg=cfg, train=RerankTrainConfig(**payload["train"]),
                            enriched=settings.paths.items(dataset, "enriched"), name=f"rerank ({kind})", saved=path)
    return [rec]


def model_suite(settings: Settings, dataset: str, names: Sequence[str] | None = None,
                ablations: bool = False) -> list[Recommender]:
    """Baselines plus every trained stage of a dataset found in the run folder, in report order, then the
    served chain (with ``ablations``, the two-tower retriever once more per removed input)."""
    suite = baseline_suite(dataset)
    window = rules_for(dataset).popularity_days
    checkpoint = settings.paths.item_tower(dataset)
    content: tuple[Path, Path] | None = None
    if checkpoint.is_file():
        encoded = settings.paths.vectors(dataset, file_id(checkpoint))
        if settings.paths.index_pointer(dataset).is_file():  # served: its vectors are indexed
            content = (checkpoint, encoded)
        suite.append(ItemTowerRecommender(checkpoint, window_days=window, vectors_file=encoded))
    if settings.paths.user_tower(dataset).is_file():
        # The harness refits on its own training window; `atelier train user` left the fit in the cache.
        suite += two_tower_suite(settings, dataset, ablations=ablations)
    suite += rerank_suite(settings, dataset)  # only once `atelier train ranker` has saved one
    two_tower = next((r for r in suite if isinstance(r, TwoTowerRecommender)), None)
    rerank = next((r for r in suite if isinstance(r, RerankRecommender)), None)
    suite.append(ServedChain(window, content=content, two_tower=two_tower, rerank=rerank))
    return _select(suite, names)


def _select(suite: list[Recommender], names: Sequence[str] | None) -> list[Recommender]:
    if names is None:
        return suite
    known = {r.name: r for r in suite}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise EvaluationError(f"unknown model(s) {unknown}; choose from {list(known)}")
    chosen = [known[n] for n in names]
    for rec in chosen:
        # A shared wrapper whose base is not in the run must fit its base itself.
        if isinstance(rec, RepurchaseFirst) and rec.base not in chosen:
            rec.shared = False
        if isinstance(rec, ServedChain) and any(part is not None and part not in chosen
                                                for part in (rec.two_tower, rec.rerank)):
            rec.shared = False
    return chosen


class ServedChain(Recommender):
    """``atelier serve``'s chain, fitted on the training window: the served chain as the harness scores it.

    ``content`` is the item tower's checkpoint with its encoded vectors when the dataset's content stage
    serves (its vectors are indexed); ``two_tower`` and ``rerank`` are the suite's own recommenders, fitted
    earlier in the same run when ``shared`` (the harness fits models in order), so nothing trains twice.
    """

    name = "atelier"

    def __init__(
        self, window_days: float, *, content: tuple[Path, Path] | None = None, two_tower: Recommender | None = None,
        rerank: Recommender | None = None, shared: bool = True,
    ) -> None:
        self.window_days = window_days
        self.content = content
        self.two_tower, self.rerank = two_tower, rerank
        self.shared = shared
        self.stages: list[Stage] = []

    def fit(self, data: TrainData) -> Self:
        """Build the chain's stages over the window (popularity, content, two-tower, rerank)."""
        groups = data.items["group_id"].astype(str).tolist() if "group_id" in data.items else None
        ids = data.items["item_id"].astype(str).tolist()
        lists, _ = popular_lists(data, self.window_days)
        retrievers: list[Stage] = []
        content: ContentStage | None = None
        if self.content is not None:
            checkpoint, vectors_file = self.content
            blob = np.load(vectors_file)
            assert [str(i) for i in blob["item_ids"]] == ids, f"{vectors_file} is not this catalogue's"
            index = ExactIndex("content", ids, blob["vectors"], groups or ids)
            content = ContentStage(lambda: index, "content", ItemEncoder(checkpoint))
            retrievers.append(content)
        two_tower: TwoTowerStage | None = None
        if isinstance(self.two_tower, TwoTowerRecommender):
            if not self.shared or self.two_tower.retriever is None:
                self.two_tower.fit(data)
            retriever = self.two_tower.retriever
            assert retriever is not None and retriever.keys is not None
            keys = ExactIndex("two_tower", [str(i) for i in retriever.item_ids], retriever.keys, groups or ids)
            two_tower = TwoTowerStage(lambda: keys, "two_tower", retriever)
            retrievers.append(two_tower)
        self.stages = []
        if isinstance(self.rerank, RerankRecommender) and retrievers:
            if not self.shared or self.rerank.stats is None:
                self.rerank.fit(data)
            self.stages.append(RerankStage(self.rerank.scorer, retrievers, explain=False))
        self.stages += [s for s in (content, two_tower) if s is not None]
        self.stages.append(PopularityStage(lists, profile_keys))
        return self

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        """Each query as the API's request (history, cart, profile, context), through the chain."""
        out = []
        for q in queries:
            request = stage_request(k, q.history, q.cart, q.profile, q.context)
            out.append([s.item_id for s in run_chain(self.stages, request).items])
        return out
