"""A dataset's items as validated item JSON: the one loader every stage reads the catalogue through.

``dataset_items`` gives every catalogue row's item JSON: STD values from the catalogue's own columns
(DESIGN.md section 2: columns map to STD values deterministically) and, with ``enriched`` (the
enrichment stage's output), the enriched record where a product has one: the LLM's values for the STD
fields the columns lack and its RE phrases. Service fields (title, description, group, price) always
come from the table given, so a price is the one as of the caller's cut.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from atelier.atomic import atomic_write
from atelier.mapping import available_mappings, coverage, load_mapping, map_columns, unmapped_values
from atelier.schema import ItemJSON, Schema, Service, load_schema
from atelier.schema.item import normalise_item


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


class CatalogueError(ValueError):
    """An enriched item file has a record that is not valid item JSON (the message names file and line)."""


def load_enriched(path: Path, schema: Schema | None = None) -> dict[str, ItemJSON]:
    """Enriched item JSON by item id, each record validated against the schema (CatalogueError if one fails)."""
    schema = schema or load_schema()
    out: dict[str, ItemJSON] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item, _ = normalise_item(ItemJSON.model_validate_json(line), schema)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise CatalogueError(f"{path}:{number}: not a valid item JSON record: {exc}") from None
        out[item.item_id] = item
    return out


def dataset_items(items: pd.DataFrame, dataset: str, *, enriched: Path | None = None,
                  schema: Schema | None = None) -> list[ItemJSON]:
    """Item JSON of every catalogue row, in row order: column STD values, or a product's enriched record
    (``enriched``, when the file exists and holds it) with the row's own service fields."""
    schema = schema or load_schema()
    base = column_items(items, dataset, schema)
    if enriched is None or not enriched.is_file():
        return base
    found = load_enriched(enriched, schema)
    return [item if (rich := found.get(item.item_id)) is None
            else rich.model_copy(update={"service": item.service}) for item in base]


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
