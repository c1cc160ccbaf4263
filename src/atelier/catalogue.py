"""Catalogue items as item JSON: STD values from the catalogue's own columns, service fields.

This is the no-LLM view of the catalogue (DESIGN.md section 2: columns map to STD values
deterministically); the enrichment stage adds what the columns lack and all RE values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from atelier.atomic import atomic_write
from atelier.mapping import available_mappings, coverage, load_mapping, map_columns, unmapped_values
from atelier.schema import ItemJSON, Schema, Service, load_schema


def _text(value: object) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA else str(value)


def column_items(items: pd.DataFrame, dataset: str, schema: Schema | None = None) -> list[ItemJSON]:
    """Item JSON for every catalogue row, STD values from the dataset's column mapping (if any)."""
    schema = schema or load_schema()
    clothes = (map_columns(items, load_mapping(dataset, schema)) if dataset in available_mappings()
               else [{} for _ in range(len(items))])
    prices = items["price"].to_numpy() if "price" in items else [None] * len(items)
    out = []
    for row, attrs, price in zip(items[["item_id", "title", "description", "group_id"]].itertuples(index=False),
                                 clothes, prices, strict=True):
        service = Service(
            title=_text(row.title), description=_text(row.description), group_id=_text(row.group_id) or None,
            price=None if price is None or (isinstance(price, float) and math.isnan(price)) else float(price),
        )
        out.append(ItemJSON.model_construct(item_id=str(row.item_id), clothes=attrs,
                                            reinforced_feature_value={}, service=service))
    return out


def coverage_report(
    items: pd.DataFrame, dataset: str, schema: Schema | None = None, mapped: list[ItemJSON] | None = None,
) -> dict[str, object]:
    """Share of items that get each STD field from columns alone, plus unmapped raw values.

    ``mapped`` (the ``column_items`` of ``items``) saves mapping the columns a second time.
    """
    schema = schema or load_schema()
    if dataset not in available_mappings():
        return {"dataset": dataset, "items": len(items), "coverage": {}, "unmapped": {}}
    mapping = load_mapping(dataset, schema)
    clothes = [item.clothes for item in mapped] if mapped is not None else map_columns(items, mapping)
    return {
        "dataset": dataset,
        "items": len(items),
        "coverage": {k: round(v, 4) for k, v in coverage(clothes, schema).items()},
        "unmapped": unmapped_values(items, mapping),
    }


def write_items_jsonl(items: list[ItemJSON], path: Path) -> None:
    """Write item JSON lines atomically (temp file + rename)."""
    with atomic_write(path, "w") as fh:
        for item in items:
            fh.write(json.dumps(item.model_dump(mode="json"), ensure_ascii=False) + "\n")
