"""Catalogue reads the service needs beyond ``VectorStore``'s API, as SQL over the same tables.

Batch reads (many items' JSON, many items' vectors in one round trip) and a plain text search
over titles and descriptions. They use the store's pooled connections and its ``items`` and
per-model vector tables (``atelier.store`` documents the layout).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import sql

from atelier.serve.schemas import Item
from atelier.store import SearchFilters, VectorStore, filter_clauses


def to_item(item_id: str, item: dict[str, Any] | None) -> Item:
    """The API view of a stored item JSON (an id-only placeholder row gives an empty item)."""
    item = item or {}
    service = item.get("service") or {}
    return Item(
        item_id=item_id,
        title=service.get("title") or "",
        description=service.get("description") or "",
        price=service.get("price"),
        group_id=service.get("group_id"),
        attributes=item.get("clothes") or {},
        re_attributes=item.get("reinforced_feature_value") or {},
    )


def fetch_items(store: VectorStore, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Stored item JSON of many ids in one query; unknown ids are absent from the result."""
    if not item_ids:
        return {}
    with store.connection() as conn:
        rows = conn.execute("SELECT item_id, item FROM items WHERE item_id = ANY(%s)", (list(item_ids),)).fetchall()
    return {str(r[0]): dict(r[1]) if r[1] is not None else {} for r in rows}


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def search_items(
    store: VectorStore, query: str, filters: SearchFilters, colors: Sequence[str] = (),
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
