"""The service object behind the routes: store, shop state (histories, popular lists), loaded models.

Built once per process (``RecommendService.from_settings``). It survives a missing or unreachable
store: the popular list and the items it shows are cached in memory at start-up, so
``recommend`` answers with them and ``degraded: true`` until the store is back (it is retried at
most every ``STORE_RETRY_S`` seconds, so a dead database does not add a timeout to every request).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psycopg

from atelier.config import Settings
from atelier.datasets import current_data, rules_for
from atelier.ingest import load_tables
from atelier.models.item_tower import CheckpointError
from atelier.recommend.baselines import profile_keys
from atelier.recommend.chain import (
    PopularLists,
    RankedStage,
    Stage,
    TwoTowerStage,
    popular_lists,
    run_chain,
    stage_request,
)
from atelier.recommend.encoder import ItemEncoder, file_id
from atelier.recommender import TrainData
from atelier.schema import ItemJSON, load_schema
from atelier.schema.item import normalise_item
from atelier.serve.explain import attribute_sets, explain, label
from atelier.serve.products import Enricher, make_enricher
from atelier.serve.schemas import (
    IngestResponse,
    Item,
    ItemPage,
    Meta,
    ProductIn,
    Ready,
    Recommendation,
    RecommendRequest,
    RecommendResponse,
    SimilarItem,
    SimilarResponse,
    StageReport,
)
from atelier.serve.stages import StageContext, build_chain
from atelier.store import SearchFilters, StoreError, VectorStore, fetch_items, open_store, search_items, start_embedded
from atelier.store.pointers import live_model_id

log = logging.getLogger("atelier.serve")

STORE_RETRY_S = 5.0  # after a failure, serve degraded this long before trying the store again
STORE_WAIT_S = 5.0  # a request waits at most this long for a pooled connection (a dead server: once)
POPULAR_CACHE = 500  # popular items kept in memory (with their item JSON) for degraded answers
SEGMENT_CACHE = 300  # per occasion / body segment
# torch threads per worker process (unless OMP_NUM_THREADS says otherwise): requests already run side by
# side in uvicorn's thread pool, and intra-op threads on top of them spin against each other and against
# other processes. Measured on 2 shared cores (benchmarks/results/perf-threads-2026-11-27.json): a request
# took 2.35x longer at p50 with 2 threads than with 1 (interleaved, same requests).
SERVE_TORCH_THREADS = 1


class ServiceError(Exception):
    """A request the service cannot fulfil; ``status`` is the HTTP code, the message says why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass
class ShopState:
    """What the service keeps from the ingested tables: user histories and popular lists."""

    dataset: str
    histories: dict[str, tuple[str, ...]] = field(default_factory=dict)
    popular: PopularLists = field(default_factory=lambda: PopularLists(None, []))
    popular_docs: dict[str, dict[str, Any]] = field(default_factory=dict)  # item JSON of cached items
    n_items: int = 0
    data: TrainData | None = None  # the whole log, read once and handed to every stage that needs it


def load_shop_state(settings: Settings, dataset: str) -> ShopState:
    """Histories and popular lists from ``runs/data/<dataset>`` (empty when not ingested)."""

    folder = settings.paths.dataset(dataset)
    if not (folder / "items.parquet").is_file():
        return ShopState(dataset)
    data = current_data(dataset, *load_tables(folder), settings.paths.features)  # prices as of today
    lists, docs = popular_lists(data, rules_for(dataset).popularity_days, POPULAR_CACHE, SEGMENT_CACHE,
                                enriched=settings.paths.items(dataset, "enriched"))
    items, inter = data.items, data.interactions
    return ShopState(dataset, user_histories(inter), lists, {i: d.model_dump(mode="json") for i, d in docs.items()},
                     len(items), data)


def user_histories(inter: pd.DataFrame) -> dict[str, tuple[str, ...]]:
    """Each user's items, oldest first, a repeated item kept at its latest position."""
    if inter.empty:
        return {}
    ordered = inter.sort_values(["user_id", "ts"], kind="stable")
    users = ordered["user_id"].astype(str).to_numpy()
    items = ordered["item_id"].astype(str).to_numpy()
    starts = np.concatenate([[0], np.flatnonzero(users[1:] != users[:-1]) + 1])
    ends = np.append(starts[1:], len(users))
    # one slice per user instead of a pandas groupby: 52k H&M users in well under a second
    return {str(users[s]): tuple(dict.fromkeys(items[s:e][::-1].tolist()))[::-1]
            for s, e in zip(starts, ends, strict=True)}


def served_model_id(settings: Settings, dataset: str) -> str | None:
    """The model id ``atelier index`` last loaded for the dataset, or None before any index."""
    try:
        return live_model_id(settings.paths, dataset)
    except FileNotFoundError:
        return None


class RecommendService:
    """Everything a request needs, loaded once; every method is safe to call from worker threads."""

    def __init__(
        self,
        settings: Settings,
        *,
        dataset: str | None = None,
        store_factory: Callable[[Settings], VectorStore] | None = None,
        enricher: Enricher | None = None,
        shop: ShopState | None = None,
        warm_up: bool = True,
    ) -> None:
        self.settings = settings
        self.dataset = dataset or settings.serve_dataset
        self.store_factory = store_factory or serving_store
        self._store: VectorStore | None = None
        self._store_error = "not connected yet"
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.schema = load_schema()
        self.error_log = settings.paths.serve_errors  # failed ingests, one JSON line each
        self.model_id = served_model_id(settings, self.dataset)
        self.enricher = enricher or make_enricher(settings.serve_enricher, self.dataset, settings)
        self.encoder, self.ingest_blocker = self._load_encoder()
        if warm_up and self.encoder is not None:
            self.encoder.warm_up()
        self.shop = shop or load_shop_state(settings, self.dataset)
        self._connect()
        ctx = StageContext(settings, self.dataset, self.store, self.model_id, self.encoder,
                           self.shop.popular, profile_keys, self.shop.data)
        self.stages: list[Stage]
        self.stages, self.stage_status = build_chain(ctx)

    @classmethod
    def from_settings(cls, settings: Settings) -> RecommendService:
        """The service for ``atelier serve``: embedded store, the settings' dataset and enricher, torch on
        ``SERVE_TORCH_THREADS`` threads (or ``OMP_NUM_THREADS``) in this worker process."""
        import os

        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or SERVE_TORCH_THREADS))
        return cls(settings)

    # -- start-up ------------------------------------------------------------------------------

    def _load_encoder(self) -> tuple[ItemEncoder | None, str | None]:
        """The item tower whose vectors are live, or why new products cannot be encoded."""

        path = self.settings.paths.item_tower(self.dataset)
        if self.model_id is None:
            return None, f"nothing indexed for {self.dataset}; run `atelier run` first"
        if not path.is_file():
            return None, f"no item tower checkpoint at {path}"
        # A new product must be encoded by the very checkpoint whose vectors are indexed, or it
        # would land in a different space: the model id ends with that checkpoint's content hash.
        if not self.model_id.endswith(f":{file_id(path)}"):
            return None, (f"{path.name} changed since {self.model_id} was indexed; run `atelier encode` and "
                          "`atelier index` (ingest is off until the store holds this checkpoint's vectors)")
        try:
            return ItemEncoder(path), None
        except CheckpointError as exc:
            return None, str(exc)

    def _connect(self) -> None:
        try:
            self._store = self.store_factory(self.settings)
            self._store_error = ""
        except StoreError as exc:
            self._store, self._store_error = None, str(exc)
            self._down_until = time.monotonic() + STORE_RETRY_S
            log.warning("store unavailable, serving degraded: %s", exc)

    def close(self) -> None:
        """Close the store's connection pool."""
        if self._store is not None:
            self._store.close()

    # -- the store, with a circuit breaker -----------------------------------------------------

    def store(self) -> VectorStore | None:
        """The store, or None while it is known to be down (retried every STORE_RETRY_S seconds)."""
        if time.monotonic() < self._down_until:
            return None
        with self._lock:
            if time.monotonic() < self._down_until:
                return None
            if self._store is None:
                self._connect()
            elif self._store_error:
                # Back from a failure: a direct connect with a short timeout, so a still-dead
                # server costs 2 s once instead of the pool's wait on every request; a stopped
                # embedded server is started again. Then a fresh pool: the old one's connections
                # died with the server and its reconnect backoff can lag for tens of seconds.
                why = self._probe(self._store.conninfo)
                if why and self._store.server is not None:
                    why = self._restart_embedded(why)
                if why:
                    self.mark_store_down(why)
                    return None
                old, self._store = self._store, None
                _close_quietly(old)
                self._connect()
            return self._store

    @staticmethod
    def _probe(conninfo: str) -> str:
        """Empty when the server answers a query within 2 s, else why not."""
        try:
            with psycopg.connect(conninfo, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return ""
        except psycopg.Error as exc:
            return str(exc).strip() or type(exc).__name__

    def _restart_embedded(self, why: str) -> str:
        """Start the embedded PostgreSQL again after it stopped (crash, kill); empty on success."""

        assert self._store is not None and self._store.server is not None
        try:
            start_embedded(Path(self._store.server.pgdata))
        except StoreError as exc:
            return f"{why}; restarting the embedded server failed: {exc}"
        log.warning("the embedded PostgreSQL had stopped (%s): started it again", why)
        deadline = time.monotonic() + 10  # crash recovery: "the database system is starting up"
        while (why := self._probe(self._store.conninfo)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return why

    def mark_store_down(self, why: str) -> None:
        """Serve degraded for STORE_RETRY_S seconds after a store error."""
        self._store_error = why or "store error"
        self._down_until = time.monotonic() + STORE_RETRY_S

    def store_failed(self, why: str) -> bool:
        """After an error from the store: serve degraded only if the server really does not answer (a
        2 s probe, then one query through the pool). An error caused by one request's data must not take
        the store away from everyone."""
        if self._store is not None:
            try:
                with psycopg.connect(self._store.conninfo, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                with self._store.connection() as conn:  # the server answers: is our pool still usable?
                    conn.execute("SELECT 1")
                log.warning("a store query failed but the store answers: %s", why)
                return False
            except (StoreError, psycopg.Error):
                pass
        self.mark_store_down(why)
        return True

    def _require_store(self) -> VectorStore:
        store = self.store()
        if store is None:
            raise ServiceError(503, f"the vector store is unreachable: {self._store_error}")
        return store

    # -- readiness -----------------------------------------------------------------------------

    def readiness(self) -> Ready:
        """Store reachable (a real query), models loaded and their versions, stage availability."""
        store = self.store()
        status = "unreachable: " + self._store_error if store is None else "ok"
        if store is not None:
            try:
                with store.connection() as conn:
                    conn.execute("SELECT 1")
            except (StoreError, psycopg.Error) as exc:
                self.mark_store_down(str(exc))
                status = f"unreachable: {exc}"
        models = {"text_encoder": "all-MiniLM-L6-v2"} if self.encoder else {}
        if self.encoder is not None:
            models["item_tower"] = str(self.encoder.checkpoint.name)
        stages = dict(self.stage_status)
        for stage in self.stages:
            stages[stage.name] = stage.available() or "ready"
        ok = status == "ok" and self.model_id is not None
        return Ready(ready=ok, degraded=status != "ok", store=status, dataset=self.dataset, model_id=self.model_id,
                     models=models, stages=stages, ingest=self.ingest_blocker or "ready")

    def meta(self) -> Meta:
        """Allowed filter values for the page's pickers."""

        std = self.schema.std
        return Meta(
            dataset=self.dataset,
            categories=[{"value": v, "label": label("category", v)} for v in std["category"].values],
            colors=list(std["color"].values), genders=list(std["gender"].values),
            stages=[s.name for s in self.stages],
        )

    # -- items ---------------------------------------------------------------------------------

    def get_item(self, item_id: str) -> Item:
        """One stored item, or 404."""
        doc = self._require_store().get_item(item_id)
        if doc is None:
            raise ServiceError(404, f"unknown item id {item_id!r}")
        return Item.stored(item_id, doc)

    def similar(self, item_id: str, k: int) -> SimilarResponse:
        """The k nearest items to one item under the live model, colourways folded."""
        store = self._require_store()
        if self.model_id is None:
            raise ServiceError(503, f"nothing indexed for {self.dataset}; run `atelier run` first")
        if store.get_item(item_id) is None:
            raise ServiceError(404, f"unknown item id {item_id!r}")
        try:
            vector = store.get_vector(self.model_id, item_id)
        except StoreError as exc:
            raise ServiceError(404, str(exc)) from None
        hits = store.search(self.model_id, vector, k, exclude_ids=[item_id], dedupe_groups=True)
        docs = fetch_items(store, [h for h, _ in hits])
        items = [SimilarItem(**Item.stored(h, docs.get(h)).model_dump(), score=s) for h, s in hits]
        return SimilarResponse(item_id=item_id, model_id=self.model_id, items=items)

    def search(self, query: str, filters: SearchFilters, colors: Sequence[str], limit: int, offset: int) -> ItemPage:
        """ShopState search; with no query and no filters, the popular list (a shop's front page)."""
        if not query.strip() and filters.is_empty() and not colors:
            ranked = self.shop.popular.overall
            page = ranked[offset : offset + limit]
            store = self.store()
            docs = dict(self.shop.popular_docs)
            if store is not None:
                try:
                    docs.update(fetch_items(store, page))
                except (StoreError, psycopg.Error) as exc:
                    self.mark_store_down(str(exc))
            items = [Item.stored(i, docs.get(i)) for i in page if i in docs]
            more = offset + limit < len(ranked)
            return ItemPage(items=items, next_offset=offset + limit if more else None, source="popular")
        rows = search_items(self._require_store(), query, filters, colors, limit + 1, offset)
        more = len(rows) > limit
        return ItemPage(items=[Item.stored(i, d) for i, d in rows[:limit]],
                        next_offset=offset + limit if more else None, source="search")

    # -- recommend -----------------------------------------------------------------------------

    def recommend(self, req: RecommendRequest) -> RecommendResponse:
        """Run the stage chain for a known or anonymous shopper and explain every item."""
        t0 = time.perf_counter()
        notes: list[str] = []
        known: tuple[str, ...] = ()
        if req.user_id:
            known = self.shop.histories.get(req.user_id, ())
            if not known:
                notes.append(f"user {req.user_id!r} has no history in {self.dataset}: treated as anonymous")
        # oldest first; an item seen again recently moves to its recent position
        recent = list(dict.fromkeys(req.recent_item_ids))
        recent_set = set(recent)
        history = [i for i in known if i not in recent_set] + recent
        cart = list(dict.fromkeys(req.cart))
        f = req.filters
        filters = SearchFilters(
            categories=tuple(f.categories), genders=tuple(f.genders), min_price=f.min_price, max_price=f.max_price,
            in_stock_only=f.in_stock_only,
        ) if f else SearchFilters()
        profile = req.profile.model_dump(exclude_none=True) if req.profile else {}
        request = stage_request(req.k, history, cart, profile, req.context, filters, req.exclude_seen,
                                user_id=req.user_id if known else None)
        ctx_attrs = dict(request.context_attributes)
        store = self.store()
        degraded = store is None
        result = run_chain(self.stages, request)
        if result.store_failed and self.store_failed(next(r.detail for r in result.reports if r.status == "failed")):
            degraded = True
            store = None
        ids = [s.item_id for s in result.items]
        docs: dict[str, dict[str, Any]] = {}
        if store is not None:
            try:
                docs = fetch_items(store, list(dict.fromkeys(ids + history[-20:] + cart)))
            except (StoreError, psycopg.Error) as exc:
                degraded = self.store_failed(str(exc))
        for i in ids:
            if i not in docs and i in self.shop.popular_docs:
                docs[i] = self.shop.popular_docs[i]
        if degraded:
            notes.append("the vector store is unreachable: serving the cached popular list")
        sources = {
            "cart": attribute_sets([docs[i] for i in cart if i in docs]),
            "history": attribute_sets([docs[i] for i in history[-20:] if i in docs]),
            "context": {name: set(values) for name, values in ctx_attrs.items()},
        }
        items = [
            Recommendation(**Item.stored(s.item_id, docs.get(s.item_id)).model_dump(), score=s.score, stage=s.stage,
                           explanation=explain(s.stage, s.reason, docs.get(s.item_id) or {}, sources,
                                               source=s.source))
            for s in result.items
        ]
        return RecommendResponse(
            items=items, stage=items[0].stage if items else "none",
            stages=[StageReport(name=r.name, status=r.status, detail=r.detail, items=r.items)  # type: ignore[arg-type]
                    for r in result.reports],
            degraded=degraded, context_attributes=ctx_attrs, notes=notes, model_id=self.model_id,
            elapsed_ms=round(1000 * (time.perf_counter() - t0), 2),
        )

    # -- writes --------------------------------------------------------------------------------

    def _record_error(self, product: ProductIn, step: str, exc: BaseException) -> None:
        """Append a failed ingest to ``runs/serve/ingest-errors.jsonl`` (the product is not stored)."""
        path = self.error_log
        record = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "item_id": product.item_id, "step": step,
                  "enricher": getattr(self.enricher, "name", type(self.enricher).__name__),
                  "error": f"{type(exc).__name__}: {exc}", "product": product.model_dump(mode="json")}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock, path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        except OSError as exc:  # a full or read-only run folder must not turn the answer into a 500
            log.warning("could not record the failed ingest of %r in %s: %s", product.item_id, path, exc)

    def ingest(self, product: ProductIn, *, create_only: bool) -> IngestResponse:
        """Enrich, normalise, encode and upsert one product (one transaction): recommendable at once."""
        timings: dict[str, float] = {}
        store = self._require_store()
        if self.encoder is None or self.model_id is None:
            raise ServiceError(503, f"ingest is unavailable: {self.ingest_blocker}")
        if create_only and store.get_item(product.item_id) is not None:
            raise ServiceError(409, f"item {product.item_id!r} exists; use PUT /items/{product.item_id} to replace it")
        enricher_name = getattr(self.enricher, "name", type(self.enricher).__name__)
        t = time.perf_counter()
        try:
            enriched = self.enricher(product)
            item, issues = normalise_item(ItemJSON.model_validate(enriched.model_dump()), self.schema)
            if item.item_id != product.item_id:
                raise ValueError(f"enricher returned item id {item.item_id!r} for {product.item_id!r}")
        except Exception as exc:  # any backend failure: recorded, answered 502, nothing stored
            self._record_error(product, "enrich", exc)
            raise ServiceError(502, f"enrichment ({enricher_name}) failed for {product.item_id!r}: {exc}; "
                                    "nothing was stored") from None
        timings["enrich_ms"] = 1000 * (time.perf_counter() - t)
        t = time.perf_counter()
        try:
            vector = self.encoder.encode([item])[0]
            if not np.isfinite(vector).all():
                raise ValueError("the item tower returned a non-finite vector")
        except Exception as exc:
            self._record_error(product, "encode", exc)
            raise ServiceError(503, f"encoding {product.item_id!r} failed: {exc}; nothing was stored") from None
        timings["encode_ms"] = 1000 * (time.perf_counter() - t)
        t = time.perf_counter()
        # item row + vectors in one transaction; in the two-tower keys [v, b] a new item has b = log(1 + 0)
        also = {stage.model_id: np.append(vector, 0.0) for stage in self.stages if isinstance(stage, TwoTowerStage)}
        store.upsert_item(item, self.model_id, vector, also=also)
        for stage in self.stages:
            if isinstance(stage, RankedStage):
                stage.add_item(item.item_id)
        timings["upsert_ms"] = 1000 * (time.perf_counter() - t)
        return IngestResponse(item=item.model_dump(mode="json"), model_id=self.model_id, enricher=enricher_name,
                              issues=issues, timings_ms={k: round(v, 2) for k, v in timings.items()})

    def delete(self, item_id: str) -> None:
        """Remove an item and its vectors; it also leaves the cached popular list."""
        if not self._require_store().delete_item(item_id):
            raise ServiceError(404, f"unknown item id {item_id!r}")
        self.shop.popular.entries.pop(item_id, None)
        self.shop.popular_docs.pop(item_id, None)
        for stage in self.stages:
            if isinstance(stage, RankedStage):
                stage.remove_item(item_id)



def serving_store(settings: Settings) -> VectorStore:
    """The store as the web service opens it: a request waits at most STORE_WAIT_S for a connection."""
    return open_store(settings, wait_s=STORE_WAIT_S)


def _close_quietly(store: VectorStore) -> None:
    try:
        store.close()
    except Exception as exc:  # a pool whose server died may complain while closing; it is discarded anyway
        log.warning("closing the old store pool: %s", exc)




