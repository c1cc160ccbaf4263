"""Bulk loads: a model's vectors replaced atomically in one transaction (binary COPY in validated chunks,
HNSW built after the load, foreign key, ANALYZE, swap onto the live name), the HNSW build parameters and
memory estimate, and the load's report. ``atelier.store`` explains why it is done this way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from atelier.store.schema import MAX_HNSW_DIM, table_name_for
from atelier.store.server import Connection, Pooled, Progress, StoreError

COPY_CHUNK = 8192  # rows validated and written per step; also the progress granularity


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


# --- vectors in, checked ----------------------------------------------------------------------


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


def _prepend(
    first: tuple[list[str], np.ndarray], rest: Iterator[tuple[list[str], np.ndarray]]
) -> Iterator[tuple[list[str], np.ndarray]]:
    yield first
    yield from rest


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


# --- the load ---------------------------------------------------------------------------------


def load_vectors(
    store: Pooled,
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
        with store.connection() as conn, conn.transaction():
            # One load per model at a time; a second waits instead of colliding on the stage name.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"atelier.load:{model_id}",))
            dim, rows = _copy_stage(conn, stage, item_ids, vectors, progress, total)
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
