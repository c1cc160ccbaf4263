"""The API view of a stored item JSON.

The catalogue reads the service runs (many items' JSON in one query, a plain text search over titles
and descriptions) are store SQL: ``atelier.store.items`` has them (``fetch_items``, ``search_items``).
"""

from __future__ import annotations

from typing import Any

from atelier.serve.schemas import Item


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
