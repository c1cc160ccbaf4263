"""Item rows: the ``items`` columns of an item JSON, bulk and live upserts (with vectors), reads, deletes,
vectors of items, and the catalogue reads the web service runs (many items' JSON in one query, a plain
text search over titles and descriptions, search hits described).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from psycopg import sql
from psycopg.types.json import Jsonb

from atelier.schema.item import ItemJSON
from atelier.store.schema import get_model
from atelier.store.search import SearchFilters, as_query, filter_clauses
from atelier.store.server import Pooled, StoreError


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


# --- writes -----------------------------------------------------------------------------------


def upsert_items(store: Pooled, items: Sequence[ItemJSON]) -> int:
    """Insert or update item rows (binary COPY into a temp table, then one upsert)."""
    latest = {item.item_id: item for item in items}  # last one wins within a batch
    if not latest:
        return 0
    with store.connection() as conn, conn.transaction():
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
    with store.connection() as conn:
        conn.execute("ANALYZE items")
    return len(latest)


def upsert_item(
    store: Pooled, item: ItemJSON, model_id: str, vector: Any, also: Mapping[str, Any] | None = None
) -> None:
    """Add or update one item and its vector (and its vectors of the models in ``also``, model id ->
    vector) in one transaction; searchable as soon as this returns."""
    with store.connection() as conn, conn.transaction():
        vectors = []
        for mid, vector_of in {model_id: vector, **(also or {})}.items():
            model = get_model(conn, mid)
            vectors.append((model, as_query(vector_of, model.dim, f"{mid} vector of item {item.item_id!r}")))
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


def delete_item(store: Pooled, item_id: str) -> bool:
    """Delete an item and, by cascade, its vectors in every model; False when unknown."""
    with store.connection() as conn:
        cur = conn.execute("DELETE FROM items WHERE item_id = %s", (item_id,))
        return cur.rowcount > 0


# --- reads ------------------------------------------------------------------------------------


def get_item(store: Pooled, item_id: str) -> dict[str, Any] | None:
    """The stored item JSON (None when unknown; ``{}`` for a vector-only placeholder row)."""
    with store.connection() as conn:
        row = conn.execute("SELECT item FROM items WHERE item_id = %s", (item_id,)).fetchone()
    if row is None:
        return None
    return dict(row[0]) if row[0] is not None else {}


def get_vector(store: Pooled, model_id: str, item_id: str) -> np.ndarray:
    """The stored vector of an item under a model, or StoreError."""
    with store.connection() as conn:
        model = get_model(conn, model_id)
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


def vectors_of(store: Pooled, model_id: str, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """Vectors of many items under a model in one query (``get_vector`` would cost a round trip each);
    unknown ids are absent from the result."""
    if not item_ids:
        return {}
    with store.connection() as conn:
        table = get_model(conn, model_id).table_name
    with store.connection() as conn:
        rows = conn.execute(
            sql.SQL("SELECT item_id, embedding FROM {} WHERE item_id = ANY(%s)").format(sql.Identifier(table)),
            (list(item_ids),),
        ).fetchall()
    return {str(r[0]): np.asarray(r[1].to_numpy(), dtype=np.float32) for r in rows}


def fetch_items(store: Pooled, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Stored item JSON of many ids in one query; unknown ids are absent from the result."""
    if not item_ids:
        return {}
    with store.connection() as conn:
        rows = conn.execute("SELECT item_id, item FROM items WHERE item_id = ANY(%s)", (list(item_ids),)).fetchall()
    return {str(r[0]): dict(r[1]) if r[1] is not None else {} for r in rows}


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def search_items(
    store: Pooled, query: str, filters: SearchFilters, colors: Sequence[str] = (),
    limit: int = 24, offset: int = 0,
) -> list[tuple[str, dict[str, Any]]]:
    """Items whose title or description contains every word of ``query``, filtered; title hits first."""
    clauses: list[sql.Composable] = [sql.SQL("item IS NOT NULL")]
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    words = [w for w in query.lower().split() if w][:8]
    for n, word in enumerate(words):
        # ILIKE per word: "black dress" finds "Dress in black" too; the escape keeps % and _ literal.
        clauses.append(sql.SQL("(title ILIKE {p} OR item->'service'->>'description' ILIKE {p})").format(
            p=sql.Placeholder(f"w{n}")))
        params[f"w{n}"] = f"%{_escape_like(word)}%"
    more, more_params = filter_clauses(filters)
    clauses += more
    params.update(more_params)
    if colors:
        clauses.append(sql.SQL("item->'clothes'->'color' ?| %(colors)s"))
        params["colors"] = list(colors)
    order = sql.SQL("(title ILIKE %(w0)s) DESC, ") if words else sql.SQL("")  # title hits first
    statement = sql.SQL(
        "SELECT item_id, item FROM items WHERE {where} ORDER BY {order}updated_at DESC, item_id"
        " LIMIT %(limit)s OFFSET %(offset)s"
    ).format(where=sql.SQL(" AND ").join(clauses), order=order)
    with store.connection() as conn:
        rows = conn.execute(statement, params).fetchall()
    return [(str(r[0]), dict(r[1])) for r in rows]


def describe_hits(store: Pooled, hits: Sequence[tuple[str, float]]) -> list[dict[str, Any]]:
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
