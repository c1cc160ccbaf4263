"""Training the ranker of the ranking chain on every label period inside a training window.

With a few days of history every label day counts: each period at the end of the window (H&M: every
day after the first; RentTheRunway: one 90-day period) becomes labels, and everything before it history.
For each period the chain's pipeline (``atelier.recommend.ranking``) is fitted on the history alone (as of
the period's start: ``datasets.train_data``), asked for the candidates of every shopper active in the
period (shoppers with history; new shoppers with a one-item cart, as the harness's cart cohort; a sample
of new shoppers with nothing), and the candidates they then bought are the positives. Rows keep every
positive and a sample of negatives per shopper with a positive. The same rows train the served DeepFM
and the LightGBM peers, so their numbers compare.

``ChainRecommender`` is the chain behind the harness interface: ``fit`` trains on the window it is given
(or reloads the saved ranker when it was trained on this very window), then fits the pipeline on the whole
window; ``atelier`` is the served DeepFM chain, the peers are LightGBM (lambdarank, binary) and the union of
the sources in their single-source order.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from atelier.datasets import Split, build_queries, cart_queries, rules_for, train_data
from atelier.metrics import score_users
from atelier.models.item_tower import load_checkpoint
from atelier.models.ranker import RankerConfig, build_ranker, load_ranker, save_ranker, transfer_embeddings
from atelier.recommend.candidates import CandidateSet
from atelier.recommend.ranker import (
    PROFILE_DENSE,
    BestSourceScorer,
    DeepFMScorer,
    DenseScale,
    LightGBMScorer,
    category_codes,
    deepfm_featuriser,
    prepare_dense,
    with_codes,
)
from atelier.recommend.ranking import RankedChain, RankingPipeline, RankingSpec, RowScorer, VectorsFn, knows_nothing
from atelier.recommender import Query, Recommender, TrainData
from atelier.vocab import Vocab

ProgressFn = Callable[[str], None]
MODELS = ("deepfm", "lightgbm-lambdarank", "lightgbm-binary", "union")


@dataclass
class RankerTrainConfig:
    """How the ranker's rows are built and how long it trains."""

    label_periods: int | None = None  # None: every period at the window's end that leaves history before it
    label_days: float | None = None  # length of a period; None: the dataset's rules
    negatives: int = 40  # sampled negatives per shopper with a positive (every positive is kept)
    max_queries: int = 20000  # shoppers per period and kind (history / cart / nothing), sampled beyond that
    nothing_share: float = 0.2  # shoppers with nothing known, as a share of the others (they teach the fallback)
    epochs: int = 3  # DeepFM passes over the rows
    batch_size: int = 1024
    lr: float = 2e-3
    trees: int = 300  # LightGBM peers
    seed: int = 0


@dataclass
class PeriodRows:
    """The rows of one label period: its queries, candidate rows, features and labels."""

    start: pd.Timestamp
    queries: list[Query]
    cands: CandidateSet
    x: np.ndarray  # (n, F) chain features
    y: np.ndarray  # (n,) 1 = bought in the period
    truth: list[set[str]]  # what each query's shopper bought in the period
    pipeline: RankingPipeline  # fitted on the period's history (its snapshot and codes)


@dataclass
class Rows:
    """Every period's rows, and what they were built from."""

    periods: list[PeriodRows]
    names: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def x(self) -> np.ndarray:
        """All periods' features."""
        return np.concatenate([p.x for p in self.periods])

    @property
    def y(self) -> np.ndarray:
        """All periods' labels."""
        return np.concatenate([p.y for p in self.periods])

    @property
    def groups(self) -> np.ndarray:
        """Rows per shopper and period, in row order (LightGBM's lambdarank groups)."""
        return np.concatenate([np.bincount(p.cands.query)[np.unique(p.cands.query)] for p in self.periods])


def period_starts(log: pd.DataFrame, label_days: float, periods: int | None) -> list[pd.Timestamp]:
    """Starts of the label periods at the end of the log, oldest first; each leaves history before it."""
    end = log["ts"].max().normalize() + pd.Timedelta(days=1)
    first = log["ts"].min().normalize()
    starts: list[pd.Timestamp] = []
    start = end - pd.Timedelta(days=label_days)
    while start > first and (periods is None or len(starts) < periods):
        starts.append(start)
        start -= pd.Timedelta(days=label_days)
    if not starts:
        raise ValueError(f"the window {first.date()}..{end.date()} is too short for a {label_days:g}-day label "
                         "period with history before it")
    return starts[::-1]


def _sample(items: list[Any], n: int, rng: np.random.Generator) -> list[Any]:
    if len(items) <= n:
        return items
    return [items[i] for i in sorted(rng.choice(len(items), n, replace=False))]


def period_rows(data: TrainData, start: pd.Timestamp, label_days: float, spec: RankingSpec,
                vectors: Mapping[str, VectorsFn], tcfg: RankerTrainConfig, rng: np.random.Generator) -> PeriodRows:
    """Rows of one label period: the pipeline fitted on everything before ``start``, labels from the period."""
    log = data.interactions
    end = start + pd.Timedelta(days=label_days)
    split = Split(data.dataset, log[log["ts"] < start], log[(log["ts"] >= start) & (log["ts"] < end)], start,
                  "label period")
    queries, actual = build_queries(split, data.users)
    carts, cart_actual = cart_queries(split)
    with_history = _sample([q for q in queries if q.history], tcfg.max_queries, rng)
    carts = _sample(carts, tcfg.max_queries, rng)
    nothing = _sample([q for q in queries if knows_nothing(q)],
                      int(tcfg.nothing_share * (len(with_history) + len(carts))) + 1, rng)
    asked = [*with_history, *carts, *nothing]
    truth = [actual[q.user_id] for q in with_history] + [cart_actual[q.user_id] for q in carts] + \
        [actual[q.user_id] for q in nothing]
    pipeline = RankingPipeline(spec, vectors).fit(train_data(split, data.items, data.users, data.cache_dir))
    cands = pipeline.candidates(asked)
    ids = pipeline.item_ids
    bought = np.array([ids[i] in truth[q] for q, i in zip(cands.query, cands.item, strict=True)], bool)
    keep = np.zeros(len(cands), bool)
    for rows in cands.per_query(len(asked)):
        pos = rows[bought[rows]]
        if not len(pos):
            continue  # a shopper who bought none of their candidates says nothing about their order
        neg = rows[~bought[rows]]
        keep[pos] = True
        keep[rng.choice(neg, min(len(neg), tcfg.negatives), replace=False)] = True
    chosen = cands.subset(np.flatnonzero(keep))
    x = pipeline.features(asked, chosen)
    return PeriodRows(start, asked, chosen, x, bought[keep].astype(np.float32), truth, pipeline)


def ranking_rows(data: TrainData, spec: RankingSpec, vectors: Mapping[str, VectorsFn], tcfg: RankerTrainConfig,
                 progress: ProgressFn | None = None) -> Rows:
    """Every label period's rows (shared by every model trained on this window and config: built once)."""
    label_days = tcfg.label_days or rules_for(data.dataset).label_days
    key = ("ranking_rows", repr(spec), label_days, tcfg.label_periods, tcfg.negatives, tcfg.max_queries,
           tcfg.nothing_share, tcfg.seed)
    if key in data.memo:
        found: Rows = data.memo[key]
        return found
    rng = np.random.default_rng(tcfg.seed)
    periods = []
    for start in period_starts(data.interactions, label_days, tcfg.label_periods):
        t0 = time.perf_counter()
        periods.append(period_rows(data, start, label_days, spec, vectors, tcfg, rng))
        if progress is not None:
            p = periods[-1]
            progress(f"label period {start.date()}: {len(p.y):,} rows, {int(p.y.sum()):,} positives "
                     f"({time.perf_counter() - t0:.0f} s)")
    rows = Rows(periods, periods[0].pipeline.names)
    rows.info = {"periods": [str(p.start.date()) for p in periods], "label_days": label_days,
                 "rows": int(sum(len(p.y) for p in periods)), "positives": int(sum(p.y.sum() for p in periods)),
                 "queries": int(sum(len(p.queries) for p in periods))}
    data.memo[key] = rows
    return rows


# --------------------------------------------------------------------------- the models


def ranker_config(vocab: Vocab, names: Sequence[str], overrides: RankerConfig | None = None) -> RankerConfig:
    """The DeepFM's config for a vocabulary and the chain's dense features (plus the profile numbers)."""
    base = overrides or RankerConfig(0, 0)
    return replace(base, std_size=vocab.std_size, re_size=vocab.re_size, dense=(*names, *PROFILE_DENSE))


def train_deepfm(rows: Rows, data: TrainData, checkpoint: Path, tcfg: RankerTrainConfig,
                 cfg: RankerConfig | None = None, enriched: Path | None = None,
                 progress: ProgressFn | None = None) -> tuple[DeepFMScorer, dict[str, Any]]:
    """Train the DeepFM on every period's rows (pointwise log loss, Adam), its STD/RE tables started from the
    item tower's (``cfg.transfer``); returns the scorer and the training record."""
    torch.manual_seed(tcfg.seed)
    tower, payload = load_checkpoint(checkpoint)
    vocab = Vocab.from_dict(payload["vocab"])
    cfg = ranker_config(vocab, rows.names, cfg)
    model = build_ranker(cfg)
    transfer = transfer_embeddings(model, {k: v.detach() for k, v in tower.state_dict().items()}, cfg) \
        if cfg.transfer else {}
    scorer = DeepFMScorer(model, deepfm_featuriser(data.items, data.dataset, cfg, model, vocab, enriched), rows.names,
                          DenseScale.fit(prepare_dense(rows.names, rows.x)))
    x = torch.from_numpy(np.concatenate([scorer.inputs(p.queries, p.cands, p.x) for p in rows.periods]))
    y = torch.from_numpy(rows.y)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    gen = torch.Generator().manual_seed(tcfg.seed)
    history: dict[str, Any] = {"loss": [], "transfer": transfer}
    for epoch in range(tcfg.epochs):
        model.train()
        total = 0.0
        for b in torch.randperm(len(y), generator=gen).split(tcfg.batch_size):
            loss = F.binary_cross_entropy(model(x[b]).squeeze(-1), y[b])  # DeepFM ends in a sigmoid
            opt.zero_grad()
            (loss + model.get_regularization_loss()).backward()
            opt.step()
            total += loss.item() * len(b)
        history["loss"].append(round(total / max(len(y), 1), 5))
        if progress is not None:
            progress(f"epoch {epoch + 1}/{tcfg.epochs}: loss {history['loss'][-1]:.4f}")
    model.eval()
    return scorer, {"config": asdict(cfg), **history}


def train_lightgbm(rows: Rows, objective: str, tcfg: RankerTrainConfig) -> LightGBMScorer:
    """A LightGBM peer on the same rows (plus each item's attribute codes, categorical): ``lambdarank``
    (groups = shoppers) or ``binary``."""
    import lightgbm as lgb

    # Attribute values keyed by value, not by one catalogue's codes: a period's catalogue may differ from the
    # next (RentTheRunway's holds the items rented so far), and the served one differs again.
    categories: dict[str, list[str]] = {}
    for p in rows.periods:
        for name, v in p.pipeline.values.items():
            categories.setdefault(name, [])
            categories[name] = sorted({*categories[name], *(x for x in v if x is not None)})
    x = np.concatenate([with_codes(p.x, category_codes(p.pipeline.values, categories), p.cands.item)
                        for p in rows.periods])
    # LightGBM refuses JSON-special characters in feature names: "rank:own" -> "rank_own"
    names = [re.sub(r"[^0-9A-Za-z_]", "_", n) for n in [*rows.names, *(f"code:{c}" for c in categories)]]
    params: dict[str, Any] = dict(n_estimators=tcfg.trees, learning_rate=0.05, num_leaves=63, min_child_samples=20,
                                  subsample=0.8, subsample_freq=1, colsample_bytree=0.8, random_state=tcfg.seed,
                                  n_jobs=2, verbose=-1)
    categorical = names[len(rows.names):]
    frame = pd.DataFrame(x, columns=names)
    if objective == "lambdarank":
        model: Any = lgb.LGBMRanker(objective="lambdarank", **params)
        model.fit(frame, rows.y, group=rows.groups, categorical_feature=categorical)
    else:
        model = lgb.LGBMClassifier(objective="binary", **params)
        model.fit(frame, rows.y, categorical_feature=categorical)
    return LightGBMScorer(model.booster_, categories, name=f"lightgbm-{objective}")


def clearly_better(ours: np.ndarray, theirs: np.ndarray, z: float = 2.0) -> bool:
    """Whether per-shopper scores ``ours`` beat ``theirs`` (the same shoppers, in order) by more than ``z``
    standard errors of the mean paired difference: a gain a resample of shoppers would not undo."""
    diff = np.asarray(ours, np.float64) - np.asarray(theirs, np.float64)
    if len(diff) < 2:
        return False
    return bool(diff.mean() > z * diff.std(ddof=1) / np.sqrt(len(diff)))


def choose_fallback(rows: Rows, scorer: RowScorer) -> tuple[str, dict[str, float]]:
    """Ranker or plain popularity for shoppers the sources know nothing about, measured by MAP@12 on the last
    label period (inside the training window: the test window is never looked at). Popularity stays unless
    the ranker is clearly better (``clearly_better``): one seed's lucky margin once served new shoppers a
    ranker that lost to popularity on later days."""
    last = rows.periods[-1]
    asked = [(q, t) for q, t in zip(last.queries, last.truth, strict=True) if knows_nothing(q) and t]
    if not asked:
        return "popularity", {}
    queries = [q for q, _ in asked]
    actual = {q.user_id: t for q, t in asked}
    if isinstance(scorer, LightGBMScorer):
        scorer = scorer.bind(last.pipeline.values)
    chain = RankedChain(last.pipeline, scorer, fallback="ranker")
    ranked = {q.user_id: [r.item_id for r in got] for q, got in zip(queries, chain.rank(queries, 12), strict=True)}
    popular = {q.user_id: last.pipeline.popular[:12] for q in queries}
    ap = {name: score_users(actual, predicted, ks=(12,))["map@12"].to_numpy()
          for name, predicted in (("ranker", ranked), ("popularity", popular))}
    figures = {f"{name}_map@12": float(values.mean()) for name, values in ap.items()}
    figures["shoppers"] = float(len(queries))
    return ("ranker" if clearly_better(ap["ranker"], ap["popularity"]) else "popularity"), figures


# --------------------------------------------------------------------------- the harness recommender


class ChainRecommender(Recommender):
    """The ranking chain behind the harness interface, its ranker trained on the window it is given.

    ``model``: ``deepfm`` (the served ranker; ``saved`` is reused when it was trained on this very window
    and config), ``lightgbm-lambdarank``, ``lightgbm-binary`` (the peers, on the same rows) or ``union``
    (no learning: the sources in their order). Every model of one window shares its rows and pipelines.
    """

    def __init__(
        self, model: str, spec: RankingSpec, vectors: Mapping[str, VectorsFn], checkpoint: Path, *,
        tcfg: RankerTrainConfig | None = None, cfg: RankerConfig | None = None, enriched: Path | None = None,
        name: str | None = None, saved: Path | None = None, save: bool = False, progress: ProgressFn | None = None,
    ) -> None:
        if model not in MODELS:
            raise ValueError(f"unknown ranker {model!r}; choose from {MODELS}")
        self.model, self.spec, self.vectors, self.checkpoint = model, spec, dict(vectors), checkpoint
        self.tcfg, self.cfg_overrides, self.enriched = tcfg or RankerTrainConfig(), cfg, enriched
        self.saved, self.save_trained, self.progress = saved, save, progress
        self.name = name or f"chain ({model})"  # type: ignore[misc]
        self.chain: RankedChain | None = None
        self.history: dict[str, Any] = {}

    def pipeline(self, data: TrainData) -> RankingPipeline:
        """The pipeline fitted on the whole window (shared by every model of this window and spec)."""
        key = ("ranking_pipeline", repr(self.spec))
        if key not in data.memo:
            data.memo[key] = RankingPipeline(self.spec, self.vectors).fit(data)
            data.memo[key].remember = 2  # the harness asks every model of the window for the same queries and carts
        found: RankingPipeline = data.memo[key]
        return found

    def fit(self, data: TrainData) -> Self:
        """Train (or reload) the ranker on the window's label periods, then fit the pipeline on all of it."""
        t0 = time.perf_counter()
        end = str(data.interactions["ts"].max())
        reused = self._reuse(data, end) if self.saved is not None and self.model == "deepfm" else None
        rows = None
        if reused is None:
            rows = ranking_rows(data, self.spec, self.vectors, self.tcfg, self.progress)
            scorer, record = self._train(rows, data)
            fallback, figures = choose_fallback(rows, scorer)
            self.history = {"rows": rows.info, "fallback": fallback, "fallback_figures": figures, "train_end": end,
                            "seconds": round(time.perf_counter() - t0, 1), **record}
        else:
            scorer, fallback = reused
        pipeline = self.pipeline(data)
        if isinstance(scorer, LightGBMScorer):
            scorer = scorer.bind(pipeline.values)
        self.chain = RankedChain(pipeline, scorer, fallback, dict(self.history))
        if self.save_trained and reused is None and self.saved is not None:
            self.save(self.saved, {"dataset": data.dataset})  # `atelier run`: the evaluated ranker is the served one
        return self

    def _train(self, rows: Rows, data: TrainData) -> tuple[RowScorer, dict[str, Any]]:
        if self.model == "deepfm":
            return train_deepfm(rows, data, self.checkpoint, self.tcfg, self.cfg_overrides, self.enriched,
                                self.progress)
        if self.model == "union":
            return BestSourceScorer(list(range(len(self.spec.sources)))), {}
        return train_lightgbm(rows, self.model.removeprefix("lightgbm-"), self.tcfg), {}

    def _reuse(self, data: TrainData, end: str) -> tuple[RowScorer, str] | None:
        """The saved DeepFM when it was trained on this very window with this spec and config (refitting
        would repeat the work); any other window trains afresh, so a saved model never scores days it saw."""
        assert self.saved is not None
        if not self.saved.is_file():
            return None
        model, cfg, payload = load_ranker(self.saved)
        same = (payload.get("history", {}).get("train_end") == end and payload.get("spec") == self.spec.to_dict()
                and payload.get("train") == asdict(self.tcfg))
        if not same:
            return None
        vocab = Vocab.from_dict(load_checkpoint(self.checkpoint)[1]["vocab"])
        feat = deepfm_featuriser(data.items, data.dataset, cfg, model, vocab, self.enriched)
        scorer = DeepFMScorer(model, feat, list(payload["names"]),
                              DenseScale.from_dict(payload["scale"]))
        self.history = {**payload["history"], "reused": str(self.saved)}
        return scorer, str(payload["history"]["fallback"])

    def recommend(self, queries: Sequence[Query], k: int) -> list[list[str]]:
        """The chain's top-k per query."""
        assert self.chain is not None, "call fit() first"
        return [[r.item_id for r in got] for got in self.chain.rank(queries, k)]

    def candidate_lists(self, queries: Sequence[Query]) -> dict[str, list[list[str]]]:
        """Each of the chain's sources' candidates per query, and their union (the harness's source recall)."""
        assert self.chain is not None, "call fit() first"
        return self.chain.source_lists(queries)

    def save(self, path: Path, extra: Mapping[str, Any] | None = None) -> None:
        """Checkpoint the DeepFM with what rebuilds its chain: the spec, feature names and scale, fallback."""
        assert self.chain is not None and isinstance(self.chain.scorer, DeepFMScorer), "only the DeepFM is saved"
        scorer = self.chain.scorer
        cfg = RankerConfig(**{**self.history["config"], "dnn_hidden": tuple(self.history["config"]["dnn_hidden"]),
                              "dense": tuple(self.history["config"]["dense"])})
        save_ranker(scorer.model, cfg, path, {"spec": self.spec.to_dict(), "names": scorer.names,
                                              "scale": scorer.scale.to_dict(), "history": self.history,
                                              "train": asdict(self.tcfg), **(extra or {})})
