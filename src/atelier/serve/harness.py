"""The served chain behind the harness interface: the model ``atelier`` in every evaluation report.

``atelier serve`` answers a request by running its stage chain (``serve.stages``): the reranker over
the first retrieval stage that serves (content, then two-tower), content kNN, two-tower, popularity,
each padding what the earlier ones left short. ``ServedChain`` builds the same stages from models
fitted on the harness's training window and runs every test query through ``run_chain`` with the
request the API would build (history and cart excluded, as ``exclude_seen`` does by default).

Two differences from a live server, both deliberate: vector searches are exact (``ExactIndex``; the
served HNSW index is checked against exact search when it is built) and explanations are not built.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Self

from atelier.baselines import profile_keys
from atelier.exact_index import ExactIndex
from atelier.recommender import Query, Recommender, TrainData
from atelier.serve.stages import (
    ContentStage,
    PopularityStage,
    RerankStage,
    Stage,
    TwoTowerStage,
    popular_lists,
    run_chain,
    stage_request,
)


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
        import numpy as np

        from atelier.rerank import RerankRecommender
        from atelier.serve.products import ItemEncoder
        from atelier.two_tower import TwoTowerRecommender

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
