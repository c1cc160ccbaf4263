"""The ranking chain: candidates from every source, their features as of the log's end, a ranker's order.

``RankingSpec`` names what the chain is made of (sources and their depths, vector spaces, attributes);
it is saved with the ranker, so serving rebuilds exactly what training used. ``RankingPipeline`` fits
the sources and the feature snapshot on one window and turns a batch of queries into a
``CandidateSet`` with its feature matrix; the ranker's training (``atelier.train.ranker``) runs it once
per label period inside the training window, the harness and the service on the whole window.
``RankedChain`` orders a pipeline's candidates by a ``RowScorer`` (the served DeepFM, or a LightGBM peer)
and answers a shopper it knows nothing about (no history, no cart, no context or profile the sources
use) with the fallback the training window chose for that cohort.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any, Protocol

import numpy as np
import pandas as pd

from atelier.catalogue import dataset_items
from atelier.config import Settings
from atelier.datasets import load_current, rules_for
from atelier.models.item_tower import CHECKPOINT_FORMAT, CheckpointError, read_payload
from atelier.models.ranker import load_ranker
from atelier.recommend.baselines import SegmentPopularityRecommender
from atelier.recommend.candidates import CandidateGenerator, CandidateSet
from atelier.recommend.encoder import catalogue_vectors, file_id
from atelier.recommend.features import Snapshot, build_features, feature_names
from atelier.recommend.ranker import DeepFMScorer, DenseScale, deepfm_featuriser
from atelier.recommend.sources import (
    CandidateSource,
    CategoryPopular,
    CoBought,
    Colourways,
    NewArrivals,
    OwnItems,
    Popular,
    RecommenderSource,
    VectorNeighbours,
    unit_rows,
)
from atelier.recommend.user_tower import item_tower_for
from atelier.recommender import Query, TrainData
from atelier.text import encode_texts, item_texts
from atelier.vocab import Vocab

VectorsFn = Callable[[TrainData], np.ndarray]  # a catalogue's vectors in one space, in catalogue order
STD_ATTRIBUTES = ("category", "category_specification", "color", "print", "gender")


@dataclass(frozen=True)
class RankingSpec:
    """What a ranking chain is made of; saved with the ranker so serving rebuilds the same chain."""

    window_days: float
    sources: tuple[str, ...]
    depth: Mapping[str, int]
    spaces: tuple[str, ...]  # vector spaces for similarity features (and their neighbour sources)
    attributes: tuple[str, ...]  # STD fields (item JSON) and raw catalogue columns, for overlap features

    @classmethod
    def for_dataset(cls, dataset: str, spaces: Sequence[str]) -> RankingSpec:
        """The default chain of a dataset: the log's sources where shoppers re-buy, occasion and body
        popularity where they rent for an occasion, neighbours in every vector space available."""
        rules = rules_for(dataset)
        sources = ["own", "colourways", "co-bought"] if rules.rebuy else []
        sources += ["occasion-popularity", "profile-popularity"] if rules.occasion_rule else []
        sources += [f"near:{space}" for space in spaces]
        sources += ["new:item_tower"] if "item_tower" in spaces else []
        sources += ["category-popularity", "popularity"]
        depth = {"own": 50, "colourways": 40, "co-bought": 60, "category-popularity": 30, "popularity": 60,
                 "occasion-popularity": 80, "profile-popularity": 40, "new:item_tower": 30,
                 **{f"near:{s}": 40 for s in spaces}}
        return cls(rules.popularity_days, tuple(sources), {s: depth[s] for s in sources}, tuple(spaces),
                   STD_ATTRIBUTES + tuple(rules.raw_re_columns))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint."""
        return {**asdict(self), "depth": dict(self.depth)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> RankingSpec:
        """The spec a checkpoint saved."""
        return cls(float(raw["window_days"]), tuple(raw["sources"]), dict(raw["depth"]), tuple(raw["spaces"]),
                   tuple(raw["attributes"]))


def attribute_values(data: TrainData, attributes: Sequence[str]) -> dict[str, np.ndarray]:
    """(n,) object arrays per attribute in catalogue order (None unknown): STD fields from the item JSON
    (first value), other names from the catalogue's own columns. Built once per ``TrainData``."""
    key = ("attribute_values", tuple(attributes))
    if key not in data.memo:
        jsons = None
        out: dict[str, np.ndarray] = {}
        for name in attributes:
            if name in STD_ATTRIBUTES:
                jsons = jsons or dataset_items(data.items, data.dataset)
                values = [(item.clothes.get(name) or [""])[0] or None for item in jsons]
            elif name in data.items.columns:
                col = data.items[name]
                values = [None if pd.isna(v) else str(v) for v in col]
            else:
                continue
            out[name] = np.array(values, dtype=object)
        data.memo[key] = out
    found: dict[str, np.ndarray] = data.memo[key]
    return found


def attribute_codes(values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """(n,) int codes per attribute (-1 unknown). The codes only say which items share a value: they are
    catalogue-specific (a learned model keys on the values, see ``LightGBMScorer.bind``)."""
    return {name: pd.factorize(pd.Series(v, dtype=object))[0].astype(np.int64) for name, v in values.items()}


def make_source(name: str, spec: RankingSpec, vectors: Mapping[str, VectorsFn]) -> CandidateSource:
    """The source a spec names."""
    w = spec.window_days
    simple: dict[str, Callable[[], CandidateSource]] = {
        "own": lambda: OwnItems(w), "colourways": lambda: Colourways(w), "co-bought": lambda: CoBought(w),
        "popularity": lambda: Popular(w), "category-popularity": lambda: CategoryPopular(w),
        "occasion-popularity": lambda: RecommenderSource(name, SegmentPopularityRecommender("context", w), w),
        "profile-popularity": lambda: RecommenderSource(name, SegmentPopularityRecommender("profile", w), w),
    }
    if name in simple:
        return simple[name]()
    if name.startswith("near:") and name[5:] in vectors:
        return VectorNeighbours(name, vectors[name[5:]], w)
    if name.startswith("new:") and name[4:] in vectors:
        return NewArrivals(name, vectors[name[4:]], w, fresh_days=w)
    raise ValueError(f"unknown candidate source {name!r} (vector spaces given: {sorted(vectors)})")


class RankingPipeline:
    """A spec's sources and feature snapshot fitted on one window: candidates and features for queries."""

    def __init__(self, spec: RankingSpec, vectors: Mapping[str, VectorsFn]) -> None:
        missing = [s for s in spec.spaces if s not in vectors]
        assert not missing, f"no vectors for the spaces {missing}"
        self.spec, self.vectors = spec, dict(vectors)
        self.generator = CandidateGenerator([make_source(n, spec, self.vectors) for n in spec.sources], spec.depth)
        self.snapshot: Snapshot | None = None
        self.values: dict[str, np.ndarray] = {}  # attribute -> each catalogue item's value (None unknown)
        self.popular: list[str] = []
        self.item_ids = np.zeros(0, dtype=object)  # catalogue row -> item id
        # The harness scores several rankers of one pipeline on the same query lists: with ``remember`` > 0 the
        # candidates and features of the last few lists are kept (compared by value) instead of rebuilt per model.
        self.remember = 0
        self._rows: list[tuple[list[Query], CandidateSet, np.ndarray]] = []

    def fit(self, data: TrainData) -> RankingPipeline:
        """Fit the sources on the window and take the snapshot its features read."""
        self.generator.fit(data)
        spaces = {}
        for space in self.spec.spaces:
            # a neighbour source of the space already holds its unit vectors; a chain without one (an ablation)
            # reads them itself
            source = next((s for s in self.generator.sources
                           if isinstance(s, VectorNeighbours) and s.name.endswith(f":{space}")), None)
            if source is not None:
                spaces[space] = source.vectors
            else:
                spaces[space] = unit_rows(self.vectors[space](data))
        self.values = attribute_values(data, self.spec.attributes)
        self.snapshot = Snapshot.build(data, self.spec.window_days, attribute_codes(self.values), spaces)
        popular = next((s for s in self.generator.sources if isinstance(s, Popular)), None)
        self.popular = popular.ready.popular if popular is not None else []
        self.item_ids = data.items["item_id"].astype(str).to_numpy(dtype=object)
        return self

    @property
    def names(self) -> list[str]:
        """The feature columns."""
        assert self.snapshot is not None, "call fit() first"
        return feature_names(self.generator.names, self.snapshot)

    def candidates(self, queries: Sequence[Query]) -> CandidateSet:
        """The union of every source's candidates for each query."""
        assert self.snapshot is not None, "call fit() first"
        return self.generator.generate(queries, self.snapshot.index)

    def features(self, queries: Sequence[Query], cands: CandidateSet) -> np.ndarray:
        """Dense features of every candidate row."""
        assert self.snapshot is not None, "call fit() first"
        return build_features(self.snapshot, queries, cands)

    def rows(self, queries: Sequence[Query]) -> tuple[CandidateSet, np.ndarray]:
        """The candidates of ``queries`` and their features (remembered for the last ``remember`` query lists)."""
        for known, cands, x in self._rows:
            if known is queries or known == list(queries):
                return cands, x
        cands = self.candidates(queries)
        x = self.features(queries, cands)
        if self.remember > 0:
            self._rows = [*self._rows, (list(queries), cands, x)][-self.remember:]
        return cands, x


class RowScorer(Protocol):
    """Orders candidate rows: higher is better."""

    name: str

    def predict(self, queries: Sequence[Query], cands: CandidateSet, x: np.ndarray) -> np.ndarray:
        """(len(cands),) scores."""
        ...


def knows_nothing(query: Query) -> bool:
    """A shopper the item sources cannot start from: no history, no cart, no context, no profile."""
    return not (query.history or query.cart or query.context or any(v is not None for v in query.profile.values()))


@dataclass
class Ranked:
    """One recommended item: its score and the source that put it forward first (None: the fallback)."""

    item_id: str
    score: float
    source: str | None


@dataclass
class RankedChain:
    """A fitted pipeline ordered by a scorer; ``fallback`` answers shoppers it knows nothing about."""

    pipeline: RankingPipeline
    scorer: RowScorer
    fallback: str = "popularity"  # "ranker" or "popularity", chosen on the training window
    info: dict[str, Any] = field(default_factory=dict)

    def rank(self, queries: Sequence[Query], k: int, exclude: Sequence[frozenset[str]] | None = None
             ) -> list[list[Ranked]]:
        """Up to ``k`` items per query, best first (``exclude``: ids to leave out per query)."""
        cands, x = self.pipeline.rows(queries)
        out: list[list[Ranked]] = [[] for _ in queries]
        item_ids, names = self.pipeline.item_ids, self.pipeline.generator.names
        if len(cands):
            scores = self.scorer.predict(queries, cands, x)
            first = cands.first_source()
            order = np.lexsort((-scores, cands.query))  # by query, best first
            bounds = np.searchsorted(cands.query[order], np.arange(len(queries) + 1))
            for qi in range(len(queries)):
                skip = exclude[qi] if exclude is not None else frozenset()
                # the best k + |skip| rows hold the best k not skipped: no need to look further down
                head = order[bounds[qi] : min(bounds[qi + 1], bounds[qi] + k + len(skip))]
                rows = [r for r in head if item_ids[cands.item[r]] not in skip][:k]
                out[qi] = [Ranked(str(item_ids[cands.item[r]]), float(scores[r]), names[first[r]]) for r in rows]
        for qi, query in enumerate(queries):
            if self.fallback == "popularity" and knows_nothing(query):
                out[qi] = []  # the training window found plain popularity better for such shoppers
            if len(out[qi]) < k:  # pad a short list with popularity
                have = (exclude[qi] if exclude is not None else frozenset()) | {r.item_id for r in out[qi]}
                # lazily: the popular list is long and a query needs a few of it
                pad = islice((i for i in self.pipeline.popular if i not in have), k - len(out[qi]))
                out[qi] += [Ranked(i, 0.0, None) for i in pad]
        return out

    def source_lists(self, queries: Sequence[Query]) -> dict[str, list[list[str]]]:
        """Per source, each query's candidates from that source in the source's own order; under ``union``,
        every candidate of the query (what the ranker orders). For per-source recall in reports."""
        cands, _ = self.pipeline.rows(queries)
        ids = self.pipeline.item_ids
        per_query = cands.per_query(len(queries))
        out = {"union": [[str(ids[i]) for i in cands.item[rows]] for rows in per_query]}
        for s, name in enumerate(cands.sources):
            lists = []
            for rows in per_query:
                ranks = cands.rank[rows, s]
                proposed = ~np.isnan(ranks)
                mine = rows[proposed][np.argsort(ranks[proposed], kind="stable")]
                lists.append([str(ids[i]) for i in cands.item[mine]])
            out[name] = lists
        return out


# --------------------------------------------------------------------------- what a dataset's chain is built from


def vector_spaces(settings: Settings, dataset: str) -> dict[str, VectorsFn]:
    """The vector spaces of a dataset's chain: its item tower's (its own, else a borrowed one with the shared
    vocabulary) when one is trained, and MiniLM over title and description. Each function remembers the
    vectors of the last catalogue it was asked for (label periods share one catalogue)."""
    def remembered(compute: VectorsFn) -> VectorsFn:
        last: dict[str, np.ndarray] = {}

        def vectors(data: TrainData) -> np.ndarray:
            key = hashlib.sha256("\x00".join(data.items["item_id"].astype(str)).encode()).hexdigest()
            if key not in last:
                last.clear()
                last[key] = compute(data)
            return last[key]
        return vectors

    def text(data: TrainData) -> np.ndarray:
        items = data.items
        return encode_texts(item_texts(items["title"].fillna("").astype(str).tolist(),
                                       items["description"].fillna("").astype(str).tolist()), settings.paths.features)

    spaces: dict[str, VectorsFn] = {}
    try:
        tower = item_tower_for(settings, dataset)
    except FileNotFoundError:
        pass
    else:
        spaces["item_tower"] = remembered(
            lambda data: catalogue_vectors(tower, data, settings.paths.vectors(dataset, file_id(tower))))
    spaces["text"] = remembered(text)
    return spaces


def load_chain(settings: Settings, dataset: str, data: TrainData | None = None) -> tuple[RankedChain, dict[str, Any]]:
    """The served chain of a dataset: the saved DeepFM (``atelier train ranker``) with the pipeline fitted on
    the whole log (popularity, co-purchases, prices as a server knows them today); ``data`` is that log when
    the caller has it loaded. CheckpointError (a ValueError) says what to run when it is missing or stale."""
    path = settings.paths.ranker(dataset)
    model, cfg, payload = load_ranker(path)
    if "spec" not in payload:
        raise CheckpointError(f"{path}: a ranker of an older layout; run `atelier train ranker -d {dataset}` again")
    tower = item_tower_for(settings, dataset)
    vocab = Vocab.from_dict(read_payload(tower, "item_tower", CHECKPOINT_FORMAT)["vocab"])
    if (vocab.std_size, vocab.re_size) != (cfg.std_size, cfg.re_size):
        raise CheckpointError(f"{path}: trained with another item tower's vocabulary; run `atelier train ranker "
                              f"-d {dataset}` again")
    data = data or load_current(dataset, settings.paths.dataset(dataset), settings.paths.features)
    pipeline = RankingPipeline(RankingSpec.from_dict(payload["spec"]), vector_spaces(settings, dataset)).fit(data)
    enriched = settings.paths.items(dataset, "enriched")
    scorer = DeepFMScorer(model, deepfm_featuriser(data.items, dataset, cfg, model, vocab, enriched),
                          list(payload["names"]), DenseScale.from_dict(payload["scale"]))
    return RankedChain(pipeline, scorer, str(payload["history"]["fallback"]), dict(payload["history"])), payload
