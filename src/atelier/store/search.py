"""Search: a model's nearest items by HNSW (or exactly), with metadata filters pushed into SQL,
exclusions and colourway de-duplication, many queries in one pipelined round trip; and the recall probe
that calibrates each model's ``ef_search`` factor. ``atelier.store`` explains the query.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from atelier.store.schema import ModelInfo, get_model
from atelier.store.server import Connection, Pooled, Progress, StoreError

MAX_EF_SEARCH = 1000  # pgvector's upper bound for hnsw.ef_search
# A search reads its model's registration (table, dim, ef_factor) from this process's memory when it is
# younger than this; a re-index in another process swaps the table, which a search notices (undefined
# table) and re-reads at once, so only a re-calibrated ef_factor can be this stale.
MODEL_CACHE_S = 5.0


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


def as_query(vector: Any, dim: int, what: str = "query vector") -> np.ndarray:
    """``vector`` as float32 of the model's ``dim``, finite, or StoreError saying what is wrong."""
    arr = np.asarray(vector, dtype=np.float32)
    if arr.ndim != 1 or arr.shape[0] != dim:
        raise StoreError(f"{what} has shape {arr.shape}, the model's vectors have {dim} dimensions")
    if not np.isfinite(arr).all():
        raise StoreError(f"{what} contains NaN or infinity")
    return arr


class ModelCache:
    """Models' registrations for searching, kept in this process's memory for ``MODEL_CACHE_S`` seconds."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, ModelInfo]] = {}  # model id -> (read at, registration)

    def get(self, conn: Connection, model_id: str, *, fresh: bool = False) -> ModelInfo:
        """A model's registration: from memory when read in the last MODEL_CACHE_S seconds."""
        now = time.monotonic()
        hit = self._entries.get(model_id)
        if hit is not None and not fresh and now - hit[0] < MODEL_CACHE_S:
            return hit[1]
        model = get_model(conn, model_id)
        self._entries[model_id] = (now, model)
        return model

    def forget(self, model_id: str) -> None:
        """Drop a model's registration (its table was replaced or dropped, or its ef_factor changed)."""
        self._entries.pop(model_id, None)


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


def search_batch(
    store: Pooled,
    models: ModelCache,
    cfg: SearchConfig,
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
    with store.connection() as conn:
        for attempt in (0, 1):
            model = models.get(conn, model_id, fresh=attempt > 0)
            queries = [as_query(q, model.dim) for q in query_vectors]
            plan = _SearchPlan(model, k, filters or SearchFilters(), list(exclude_ids), dedupe_groups)
            try:
                with conn.pipeline(), conn.transaction():  # COMMIT is queued, then the pipeline syncs
                    sent = [plan.send(conn, q, cfg, exact=exact) for q in queries]
                # one round trip: every cursor now holds its rows
                out = []
                for q, (cursor, n) in zip(queries, sent, strict=True):
                    hits = plan.take(cursor.fetchall(), n)
                    if hits is None:
                        with conn.transaction():
                            hits = plan.run(conn, q, cfg, exact=exact, n=4 * n)
                    out.append(hits)
                return out
            except psycopg.errors.UndefinedTable:
                if attempt:
                    raise
                # re-indexed elsewhere since the registration was read: read it again, once
        raise AssertionError("unreachable")


def probe(
    store: Pooled,
    models: ModelCache,
    cfg: SearchConfig,
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
    target = cfg.recall_target
    with store.connection() as conn:
        model = get_model(conn, model_id)
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
    truth = [{i for i, _ in hits} for hits in search_batch(store, models, cfg, model_id, queries, k_eff, exact=True)]
    exact_s = time.perf_counter() - t0
    tried: list[dict[str, float]] = []
    chosen: dict[str, float] | None = None
    for step, factor in enumerate(ef_factors):
        plan = _SearchPlan(model, k_eff, SearchFilters(), [], False)
        t1 = time.perf_counter()
        with store.connection() as conn, conn.transaction():
            found = [plan.run(conn, q, cfg, ef_factor=factor) for q in queries]
        elapsed = time.perf_counter() - t1
        recalls = [
            len({i for i, _ in hits} & want) / max(1, len(want)) for hits, want in zip(found, truth, strict=True)
        ]
        returned = [len(hits) for hits in found]
        entry = {
            "ef_factor": factor,
            "ef_search": plan.ef_search(cfg, factor, k_eff),
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
    with store.connection() as conn:
        conn.execute("UPDATE models SET ef_factor = %s WHERE model_id = %s", (chosen["ef_factor"], model_id))
    models.forget(model_id)
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
