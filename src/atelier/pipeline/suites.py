"""The models of an evaluation report: the baselines, every trained stage found in the run folder, and the
ranking chain with its peers, ``atelier`` (the served chain: the DeepFM over every candidate source) last.

``model_suite`` is what ``atelier evaluate`` and ``atelier run`` score. The chain's models share one set of
candidates and training rows per window (``atelier.train.ranker``); ``atelier`` runs the same
``RankedChain`` code the service's ranked stage runs (``atelier.recommend.ranking``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from atelier.config import Settings
from atelier.datasets import EvaluationError, rules_for
from atelier.pipeline.ranker import chain_recommender
from atelier.recommend.baselines import (
    PopularityRecommender,
    RandomRecommender,
    RepurchaseRecommender,
    SegmentPopularityRecommender,
    TextKNNRecommender,
)
from atelier.recommend.content import ItemTowerRecommender
from atelier.recommend.encoder import file_id
from atelier.recommend.sources import RulesRecommender
from atelier.recommend.user_tower import bias_window, item_tower_for
from atelier.recommender import Recommender, RepurchaseFirst
from atelier.train.ranker import RankerTrainConfig
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


def model_suite(settings: Settings, dataset: str, names: Sequence[str] | None = None, ablations: bool = False,
                tcfg: RankerTrainConfig | None = None, save_ranker: bool = False) -> list[Recommender]:
    """Baselines plus every trained stage of a dataset found in the run folder, in report order, then the
    ranking chain and its peers, the served one (``atelier``) last (with ``ablations``, the two-tower
    retriever once more per removed input)."""
    suite = baseline_suite(dataset)
    window = rules_for(dataset).popularity_days
    checkpoint = settings.paths.item_tower(dataset)
    if checkpoint.is_file():
        encoded = settings.paths.vectors(dataset, file_id(checkpoint))
        suite.append(ItemTowerRecommender(checkpoint, window_days=window, vectors_file=encoded))
    if settings.paths.user_tower(dataset).is_file():
        # The harness refits on its own training window; `atelier train user` left the fit in the cache.
        suite += two_tower_suite(settings, dataset, ablations=ablations)
    if checkpoint.is_file() or settings.paths.user_tower(dataset).is_file():  # an item tower to read from
        # The ranking chain: its union ordered by the single sources, the LightGBM peers and the served DeepFM
        # (`atelier`), all on the same candidates and rows (built once per window).
        suite += [chain_recommender(settings, dataset, model, name=name, tcfg=tcfg, save=save_ranker)
                  for model, name in (("union", "union"), ("lightgbm-lambdarank", "lightgbm (lambdarank)"),
                                      ("lightgbm-binary", "lightgbm (binary)"), ("deepfm", "atelier"))]
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
    return chosen
