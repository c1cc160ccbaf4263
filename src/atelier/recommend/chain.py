"""The recommendation chain: stages ordered by preference, each serving what it can.

A ``Stage`` either returns scored items for a request, raises ``StageSkip`` (it has nothing to
work from, e.g. content without history, cart or context) or fails (store errors); ``run_chain``
then asks the next one, and pads a short list from later stages, so every answer says which stage
produced each item. The stages: ``RerankStage`` (the DeepFM over the first retrieval stage that
serves), ``ContentStage`` (item-tower kNN around cart, history and context), ``TwoTowerStage``
(the user tower's query) and ``PopularityStage`` (from memory, so it serves without the store).
The service builds its chain from the run folder (``atelier.serve.stages``); the harness builds the
same stages from models fitted on its window (``atelier.pipeline.suites.ServedChain``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import psycopg

from atelier.catalogue import dataset_items
from atelier.recommend.baselines import PopularityRecommender, SegmentPopularityRecommender
from atelier.recommend.encoder import ItemEncoder
from atelier.recommend.ranking import RankedChain
from atelier.recommend.user_tower import UserTowerRecommender
from atelier.recommender import Query, TrainData
from atelier.schema import ItemJSON
from atelier.schema.context import context_attributes
from atelier.store import SearchFilters, StoreError
from atelier.text import encode_texts


@dataclass(frozen=True)
class StageRequest:
    """A resolved request: what the shopper gave, with ids already looked up and exclusions fixed."""

    k: int
    history: tuple[str, ...] = ()  # the known user's items, then recent views; oldest first
    cart: tuple[str, ...] = ()
    profile: Mapping[str, float | str | None] = field(default_factory=dict)
    context: str | None = None
    context_attributes: Mapping[str, list[str]] = field(default_factory=dict)
    filters: SearchFilters = field(default_factory=SearchFilters)
    exclude: frozenset[str] = frozenset()
    user_id: str | None = None  # a known shopper (their purchases in the log); None: anonymous


@dataclass(frozen=True)
class Scored:
    """One ranked item: its score where the stage has one, the stage's reason in words, and the candidate
    source that put it forward (ranked stage)."""

    item_id: str
    score: float | None
    stage: str
    reason: str
    source: str | None = None


class VectorSearch(Protocol):
    """What the retrieval stages ask of the store (``VectorStore``)."""

    def search(self, model_id: str, query_vector: Any, k: int = 100, *, filters: Any = None,
               exclude_ids: Sequence[str] = (), dedupe_groups: bool = False) -> list[tuple[str, float]]:
        """Top-k ``(item_id, inner product)``, best first."""
        ...

    def vectors_of(self, model_id: str, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Vectors of the known ids."""
        ...


def stage_request(
    k: int, history: Sequence[str] = (), cart: Sequence[str] = (), profile: Mapping[str, Any] | None = None,
    context: str | None = None, filters: SearchFilters | None = None, exclude_seen: bool = False,
    user_id: str | None = None,
) -> StageRequest:
    """The chain's request for a shopper: history (oldest first), cart, profile, context and filters; the
    context's named STD values looked up. The cart is always left out (it is already chosen); the history
    too with ``exclude_seen`` (off by default: shoppers buy again, and what they bought leads the rules)."""

    history, cart = list(dict.fromkeys(history)), list(dict.fromkeys(cart))
    return StageRequest(
        k=k, history=tuple(history), cart=tuple(cart), profile=dict(profile or {}), context=context,
        context_attributes=context_attributes(context) if context else {}, filters=filters or SearchFilters(),
        exclude=frozenset(history + cart) if exclude_seen else frozenset(cart), user_id=user_id,
    )


class StageSkip(Exception):
    """The stage has nothing to work from for this request (the message says what it lacks)."""


class Stage(Protocol):
    """A recommender the service can put in its chain."""

    name: str

    def available(self) -> str | None:
        """None when the stage can serve; otherwise why not (shown in /ready and in answers)."""
        ...

    def recommend(self, request: StageRequest) -> list[Scored]:
        """Up to ``request.k`` items not in ``request.exclude``, best first; StageSkip if not applicable."""
        ...


@dataclass
class ChainReport:
    """One stage's outcome for one request."""

    name: str
    status: str  # served | skipped | unavailable | failed | not_needed
    detail: str = ""
    items: int = 0


@dataclass
class ChainResult:
    """The merged ranking and what every stage did."""

    items: list[Scored]
    reports: list[ChainReport]
    store_failed: bool = False


def run_chain(stages: Sequence[Stage], request: StageRequest) -> ChainResult:
    """Ask stages in order until ``k`` items are found; later stages pad what earlier ones left short."""
    items: list[Scored] = []
    seen: set[str] = set(request.exclude)
    reports: list[ChainReport] = []
    store_failed = False
    for stage in stages:
        if len(items) >= request.k:
            reports.append(ChainReport(stage.name, "not_needed"))
            continue
        why = stage.available()
        if why is not None:
            reports.append(ChainReport(stage.name, "unavailable", why))
            continue
        try:
            got = stage.recommend(replace(request, k=request.k - len(items), exclude=frozenset(seen)))
        except StageSkip as skip:
            reports.append(ChainReport(stage.name, "skipped", str(skip)))
            continue
        except (StoreError, psycopg.Error) as exc:
            # The store went away mid-request: note it and let the next stage (popularity, which
            # serves from memory) answer, rather than failing the request.
            store_failed = True
            reports.append(ChainReport(stage.name, "failed", f"store error: {exc}"))
            continue
        fresh = [s for s in got if s.item_id not in seen][: request.k - len(items)]
        seen.update(s.item_id for s in fresh)
        items.extend(fresh)
        reports.append(ChainReport(stage.name, "served" if fresh else "skipped",
                                   "" if fresh else "no items after filters", len(fresh)))
    return ChainResult(items, reports, store_failed)


# --- content: item-tower vectors in pgvector ---------------------------------------------------


class ContentStage:
    """Nearest items (HNSW in pgvector) to the shopper's cart, history and context in item-tower space.

    The query vector is a weighted mean of unit vectors: each cart item counts ``cart_weight``
    times a history item (the cart is what the shopper wants now), and the context text counts as
    one more "virtual item" encoded by the same tower from its text and the STD values it names,
    weighted ``context_weight`` times the rest together. Colourways are folded so the list is not
    six colours of one product.
    """

    name = "content"

    def __init__(
        self, store: Callable[[], VectorSearch | None], model_id: str | None, encoder: ItemEncoder | None,
        *, history_limit: int = 20, cart_weight: float = 2.0, context_weight: float = 1.0,
    ) -> None:
        self.store = store
        self.model_id = model_id
        self.encoder = encoder
        self.history_limit = history_limit  # older items say little about today's intent
        self.cart_weight = cart_weight
        self.context_weight = context_weight
        self._context_cache: dict[tuple[str, str], np.ndarray] = {}

    def available(self) -> str | None:
        """Needs a live model id and a reachable store."""
        if self.model_id is None:
            return "no indexed model (run `atelier run` or `atelier index`)"
        if self.store() is None:
            return "store unreachable"
        return None

    def context_vector(self, text: str, attributes: Mapping[str, list[str]]) -> np.ndarray | None:
        """The tower's vector of a virtual item with the context as its title and its named STD values."""
        if self.encoder is None:
            return None
        key = (text, repr(sorted(attributes.items())))
        if key not in self._context_cache:
            item = ItemJSON.model_validate({"item_id": "context", "clothes": dict(attributes),
                                            "service": {"title": text}})
            if len(self._context_cache) > 512:  # bounded: contexts are free text
                self._context_cache.clear()
            self._context_cache[key] = self.encoder.encode([item])[0]
        return self._context_cache[key]

    def recommend(self, request: StageRequest) -> list[Scored]:
        """HNSW search around the weighted mean of cart, history and context vectors."""
        store = self.store()
        assert store is not None and self.model_id is not None, "available() was not checked"
        history = list(request.history[-self.history_limit :])
        seeds = list(dict.fromkeys([*history, *request.cart]))
        vectors = store.vectors_of(self.model_id, seeds) if seeds else {}
        parts: list[np.ndarray] = []
        weights: list[float] = []
        for item_id, vec in vectors.items():
            parts.append(vec)
            weights.append(self.cart_weight if item_id in request.cart else 1.0)
        used = ["cart"] if any(i in vectors for i in request.cart) else []
        if any(i in vectors for i in history):
            used.append("recent items")
        if request.context:
            ctx = self.context_vector(request.context, request.context_attributes)
            if ctx is not None:
                parts.append(ctx)
                weights.append(self.context_weight * max(1.0, sum(weights)))
                used.append("context")
        if not parts:
            missing = f" ({len(seeds)} given, none indexed)" if seeds else ""
            raise StageSkip(f"no history, cart or context to start from{missing}")
        query = np.average(np.stack(parts), axis=0, weights=weights)  # (dim,)
        query /= np.linalg.norm(query) + 1e-12
        hits = store.search(self.model_id, query, request.k, filters=request.filters,
                            exclude_ids=sorted(request.exclude), dedupe_groups=True)
        reason = "close to your " + " and ".join(used) + " in the item tower's space"
        return [Scored(item_id, score, self.name, reason) for item_id, score in hits]


# --- popularity: from memory, so it serves even without the store ------------------------------


@dataclass(frozen=True)
class PopularEntry:
    """A popular item with the fields popularity filters need (kept in memory)."""

    item_id: str
    category: str | None
    gender: str | None
    price: float | None
    in_stock: bool | None

    @classmethod
    def of(cls, item: ItemJSON) -> PopularEntry:
        """The filterable fields of an item JSON."""
        def first(name: str) -> str | None:
            values = item.clothes.get(name) or []
            return values[0] if values else None

        stock = item.service.stock
        return cls(item.item_id, first("category"), first("gender"), item.service.price,
                   None if stock is None else stock > 0)

    def passes(self, f: SearchFilters) -> bool:
        """The same predicates the store applies in SQL (unknown stock counts as available)."""
        if f.categories and self.category not in f.categories:
            return False
        if f.genders and self.gender not in f.genders:
            return False
        if f.min_price is not None and (self.price is None or self.price < f.min_price):
            return False
        if f.max_price is not None and (self.price is None or self.price > f.max_price):
            return False
        return not (f.in_stock_only and self.in_stock is False)


@dataclass
class PopularLists:
    """Ranked item ids overall and per segment (occasion, body profile), with filter fields."""

    window_days: float | None
    overall: list[str]
    occasions: dict[str, list[str]] = field(default_factory=dict)
    profiles: dict[tuple[str, ...], list[str]] = field(default_factory=dict)
    entries: dict[str, PopularEntry] = field(default_factory=dict)
    built_at: float = field(default_factory=time.time)


def popular_lists(data: TrainData, window_days: float, top: int = 500, segment_top: int = 300,
                  enriched: Path | None = None) -> tuple[PopularLists, dict[str, ItemJSON]]:
    """The popularity stage's lists from a log (overall, per occasion, per body segment: the evaluated
    baselines' counts) and the item JSON of every listed item (its filter fields; degraded answers)."""

    overall = PopularityRecommender(window_days).fit(data).popular[:top]
    lists = PopularLists(window_days, overall)
    if "occasion" in data.interactions.columns:
        seg = SegmentPopularityRecommender("context", window_days).fit(data)
        lists.occasions = {key[1]: ranked[:segment_top] for key, ranked in seg.segments.items()}
    if any(c in data.users.columns for c in ("body_type", "height_cm", "weight_kg")):
        seg = SegmentPopularityRecommender("profile", window_days).fit(data)
        lists.profiles = {key: ranked[:segment_top] for key, ranked in seg.segments.items()}
    wanted = set(overall).union(*lists.occasions.values(), *lists.profiles.values())
    subset = data.items[data.items["item_id"].astype(str).isin(wanted)]
    docs = {item.item_id: item for item in dataset_items(subset, data.dataset, enriched=enriched)}
    lists.entries = {i: PopularEntry.of(doc) for i, doc in docs.items()}
    return lists, docs


class PopularityStage:
    """The most bought items of the recent window, within the shopper's occasion or body segment
    when the data has them (RentTheRunway), overall otherwise. Always available: it needs no store."""

    name = "popularity"

    def __init__(self, lists: PopularLists, profile_keys: Callable[[dict[str, object]], list[tuple[str, ...]]]) -> None:
        self.lists = lists
        self.profile_keys = profile_keys

    def available(self) -> str | None:
        """Available whenever the cached list is non-empty."""
        return None if self.lists.overall else "no interactions to count"

    def recommend(self, request: StageRequest) -> list[Scored]:
        """Segment lists first (occasion named in the context, then body profile), then overall."""
        window = f"the last {self.lists.window_days:g} days" if self.lists.window_days else "the log"
        sources: list[tuple[list[str], str]] = []
        context = (request.context or "").lower()
        for occasion, ranked in self.lists.occasions.items():
            if occasion and occasion in context:
                sources.append((ranked, f"popular for '{occasion}' over {window}"))
        if request.profile:
            for key in self.profile_keys(dict(request.profile)):
                if key in self.lists.profiles:
                    sources.append((self.lists.profiles[key], f"popular with shoppers of your build over {window}"))
                    break
        sources.append((self.lists.overall, f"among the most bought items of {window}"))
        out: list[Scored] = []
        seen = set(request.exclude)
        for ranked, reason in sources:
            for item_id in ranked:
                entry = self.lists.entries.get(item_id)
                if item_id in seen or entry is None or not entry.passes(request.filters):
                    continue
                seen.add(item_id)
                out.append(Scored(item_id, None, self.name, reason))
                if len(out) == request.k:
                    return out
        return out




class TwoTowerStage:
    """The user tower's query (recent items and cart, body profile, context text) against the two-tower
    keys ``[v, b]`` in pgvector: one HNSW search. Items posted after training are in the index (with
    ``b = 0``, no interactions yet) but the tower reads only the items it was trained with as history."""

    name = "two_tower"

    def __init__(self, store: Callable[[], VectorSearch | None], model_id: str,
                 retriever: UserTowerRecommender) -> None:
        self.store = store
        self.model_id = model_id
        self.retriever = retriever
        self._contexts: dict[str, np.ndarray] = {}
        retriever.context_encoder = self.encode_contexts  # free text: memory, not a cache file per request

    def encode_contexts(self, texts: list[str]) -> np.ndarray:
        """MiniLM vectors of context texts, remembered in a bounded in-memory table."""

        missing = [t for t in texts if t not in self._contexts]
        if missing:
            if len(self._contexts) > 512:  # bounded: contexts are free text
                self._contexts.clear()
            self._contexts.update(zip(missing, encode_texts(missing), strict=True))
        return np.stack([self._contexts[t] for t in texts])

    def available(self) -> str | None:
        """Needs a reachable store."""
        return None if self.store() is not None else "store unreachable"

    def recommend(self, request: StageRequest) -> list[Scored]:
        """One HNSW search with the tower's query vector; skips a shopper the tower knows nothing about."""

        query = Query(user_id="request", history=tuple(dict.fromkeys([*request.history, *request.cart])),
                      profile=dict(request.profile), context=request.context)
        vectors, usable = self.retriever.user_vectors([query])
        if not usable[0]:
            raise StageSkip("no known items, profile or context for the user tower")
        store = self.store()
        assert store is not None, "available() was not checked"
        hits = store.search(self.model_id, vectors[0], request.k, filters=request.filters,
                            exclude_ids=sorted(request.exclude), dedupe_groups=True)
        used = [name for name, present in (("recent items", query.history), ("profile", request.profile),
                                            ("context", request.context)) if present]
        reason = "the two-tower retriever's pick for your " + " and ".join(used)
        return [Scored(item_id, score, self.name, reason) for item_id, score in hits]


# What each source's pick means to the shopper (``{seeds}``: "items in your cart" or "past purchases").
REASONS = {
    "own": "you bought it before",
    "colourways": "another colour of {seeds}",
    "co-bought": "often bought with {seeds}",
    "near:item_tower": "goes with the style of {seeds}",
    "near:text": "like {seeds}",
    "new:item_tower": "new in: matches {seeds}",
    "category-popularity": "popular in the categories of {seeds}",
    "popularity": "among the most bought items right now",
    "occasion-popularity": "popular for the occasion you named",
    "profile-popularity": "popular with shoppers of your build",
    None: "among the most bought items right now",
}


def reason_for(source: str | None, query: Query) -> str:
    """One plain sentence for an item a source put forward, true for this shopper (a cart is not a purchase)."""
    seeds = ("the items in your cart" if query.cart and not query.history else
             "your past purchases and cart" if query.cart else "your past purchases")
    return REASONS.get(source, "picked for you").format(seeds=seeds)


class RankedStage:
    """The ranking chain (``atelier.recommend.ranking``): candidates from every source, ordered by the trained
    ranker; a shopper it knows nothing about gets the fallback its training window chose.

    Products posted after the chain was fitted (``POST /items``) are not in its catalogue; when there are any,
    the ``retrieval`` stage (content kNN in the tuned item-tower space) is asked too, and each posted product it
    returns keeps its retrieval slot in the list, so a new product reaches the shoppers it is near at once."""

    name = "ranked"

    def __init__(self, chain: RankedChain, entries: Mapping[str, PopularEntry] | None = None,
                 retrieval: Stage | None = None) -> None:
        self.chain = chain
        self.entries = entries or {}  # every item's filter fields (metadata filters of the request)
        self.retrieval = retrieval
        self.posted: set[str] = set()  # products added since the chain was fitted

    def available(self) -> str | None:
        """Always available: every source answers from memory."""
        return None

    def add_item(self, item_id: str) -> None:
        """A product posted while serving: retrieval places it until the chain is refitted."""
        if self.chain.pipeline.snapshot is None or item_id not in self.chain.pipeline.snapshot.index:
            self.posted.add(item_id)

    def remove_item(self, item_id: str) -> None:
        """A product deleted while serving."""
        self.posted.discard(item_id)

    def _with_posted(self, request: StageRequest, ranked: list[Scored]) -> list[Scored]:
        if not self.posted or self.retrieval is None or self.retrieval.available() is not None:
            return ranked
        if not (request.history or request.cart or request.context):
            return ranked
        near = self.retrieval.recommend(request)
        out = list(ranked)
        for slot, got in enumerate(near):
            if got.item_id in self.posted and got.item_id not in {s.item_id for s in out}:
                out.insert(min(slot, len(out)), Scored(got.item_id, got.score, self.name,
                                                       "new in: close to " + _seed_words(request), "new:posted"))
        return out[: request.k]

    def recommend(self, request: StageRequest) -> list[Scored]:
        """The chain's top ``request.k`` for the request as a query (history, cart, profile, context)."""
        query = Query(user_id=request.user_id or "", history=request.history, cart=request.cart,
                      profile=dict(request.profile), context=request.context)
        ranked = self.chain.rank([query], request.k, exclude=[request.exclude])[0]
        if not request.filters.is_empty():  # rank deeper, keep what passes the filters
            ranked = [r for r in self.chain.rank([query], 10 * request.k, exclude=[request.exclude])[0]
                      if (e := self.entries.get(r.item_id)) is not None and e.passes(request.filters)][: request.k]
        scored = [Scored(r.item_id, r.score, self.name, reason_for(r.source, query), r.source) for r in ranked]
        return self._with_posted(request, scored)


def _seed_words(request: StageRequest) -> str:
    """What a posted product was found near, in the shopper's terms."""
    if request.cart:
        return "your cart"
    return "what you bought" if request.history else "what you asked for"
