"""Cold-start ingest: raw product -> item JSON (an ``Enricher``) -> item-tower vector -> store.

An ``Enricher`` is any callable from a ``ProductIn`` to an ``ItemJSON``. The default,
``ColumnEnricher``, is the deterministic column mapping the catalogue itself goes through
(``atelier.catalogue.column_items``) plus any STD values the merchandiser gave, normalised against
the schema. ``ATELIER_SERVE_ENRICHER=llm`` selects ``LLMEnricher`` (columns, then the LLM backend of
``ATELIER_LLM_BACKEND`` through ``atelier.enrich``); other enrichers register a factory under a
name (``register_enricher``); nothing else changes.

``attribute_origins`` says where each field of a product came from (catalogue columns, the enrichment
stage with its method and model id, the merchandiser's values): the merchandiser's view and the preview
of a posted product show it.

``ItemEncoder`` encodes item JSON exactly as ``atelier encode`` does (MiniLM vector of title +
description as the text token, the checkpoint's own vocabulary for STD/RE ids), so a new product
lands in the same space as the indexed catalogue and is recommendable as soon as it is upserted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol

import pandas as pd

from atelier.catalogue import column_items
from atelier.config import Settings
from atelier.enrich import enrich_product, get_extractor
from atelier.schema import UNKNOWN, ItemJSON, Service, load_schema
from atelier.serve.schemas import AttributeOrigin, ProductIn


class EnrichError(RuntimeError):
    """The enricher could not turn a product into item JSON (the service answers 502)."""


class Enricher(Protocol):
    """Raw product -> item JSON with STD (and, for LLM backends, RE) values."""

    name: str

    def __call__(self, product: ProductIn) -> ItemJSON:
        """The item JSON of one product; raise on failure (nothing is stored then).

        The service normalises whatever comes back against the schema, so a backend may return
        synonyms or stray values and they are mapped or reported, never stored raw."""
        ...


class ColumnEnricher:
    """The catalogue's column mapping applied to one product, then the merchandiser's STD values."""

    name = "columns"

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self.schema = load_schema()

    def __call__(self, product: ProductIn) -> ItemJSON:
        """Map the product's raw columns like a catalogue row; explicit ``attributes`` win per field."""
        row = {**product.columns, "item_id": product.item_id, "title": product.title,
               "description": product.description, "group_id": product.group_id, "price": product.price}
        mapped = column_items(pd.DataFrame([row]), self.dataset, self.schema)[0]
        clothes = {**mapped.clothes, **product.attributes}
        return ItemJSON(
            item_id=product.item_id,
            clothes=clothes,
            service=Service(title=product.title, description=product.description, brand=product.brand,
                            price=product.price, stock=product.stock, group_id=product.group_id),
        )


class LLMEnricher:
    """The column mapping first, then the configured LLM backend (``atelier.enrich``) fills in the
    STD fields the columns lack and the RE phrases; a failed extraction raises (the service answers
    502 and stores nothing)."""

    def __init__(self, dataset: str, settings: Settings) -> None:

        self.columns = ColumnEnricher(dataset)
        self.extractor = get_extractor(settings.llm_backend, settings)
        self.name = f"llm:{settings.llm_backend}"

    def __call__(self, product: ProductIn) -> ItemJSON:
        """Column facts as the extractor's known values, the shop fields as its service fields."""

        base = self.columns(product)
        raw = {"item_id": product.item_id, "title": product.title, "description": product.description,
               "known": base.clothes, "service": base.service.model_dump(exclude={"title", "description"})}
        result = enrich_product(raw, self.extractor)
        if result.status == "error" or result.item is None:
            raise EnrichError(f"{self.extractor.model_id}: {result.error or 'no item returned'}")
        return result.item


EnricherFactory = Callable[[str, Settings], Enricher]
ENRICHERS: dict[str, EnricherFactory] = {
    "columns": lambda dataset, settings: ColumnEnricher(dataset),
    "llm": LLMEnricher,  # backend from ATELIER_LLM_BACKEND (embedded, openai, fake)
}


def register_enricher(name: str, factory: EnricherFactory) -> None:
    """Make an enricher selectable by ``ATELIER_SERVE_ENRICHER=name`` (factory gets dataset, settings)."""
    ENRICHERS[name] = factory


def make_enricher(name: str, dataset: str, settings: Settings) -> Enricher:
    """The enricher registered under ``name`` for a dataset, or ValueError listing the known ones."""
    factory = ENRICHERS.get(name)
    if factory is None:
        raise ValueError(f"unknown enricher {name!r} (ATELIER_SERVE_ENRICHER); known: {sorted(ENRICHERS)}")
    return factory(dataset, settings)


# --- where attributes came from ---------------------------------------------------------------


def enrichment_sources(settings: Settings, dataset: str) -> tuple[str | None, dict[str, Any]]:
    """The enrichment stage's model id and per-field sources (its report ``runs/reports/enrich-<dataset>.json``:
    method, backend and model id of each STD field and of the RE phrases), or (None, {}) without a report."""
    path = settings.paths.enrich_report(dataset)
    if not path.is_file():
        return None, {}
    report = json.loads(path.read_text(encoding="utf-8"))
    return report.get("model_id"), dict(report.get("sources") or {})


def column_values(catalogue: pd.DataFrame | None, dataset: str, item_id: str) -> dict[str, list[str]] | None:
    """The STD values the dataset's column mapping gives a catalogue row; None when the item is not a row
    of ``catalogue`` (a product posted to the service)."""
    if catalogue is None or catalogue.empty:
        return None
    row = catalogue[catalogue["item_id"].astype(str) == item_id]
    return column_items(row.head(1), dataset)[0].clothes if len(row) else None


def attribute_origins(
    item: Mapping[str, Any], columns: Mapping[str, list[str]] | None, *, given: Mapping[str, list[str]] | None = None,
    enricher: str | None = None, sources: Mapping[str, Any] | None = None,
) -> list[AttributeOrigin]:
    """Each field's origin: the merchandiser's ``given`` values, else the ``columns`` when they hold every value,
    else the enricher (method and model id from ``sources``, else ``enricher``); with ``columns`` None (a
    posted product, whose split was not kept) every field is "posted"."""
    sources = sources or {}
    out: list[AttributeOrigin] = []

    def enriched(name: str, values: list[str], kind: Literal["std", "re"]) -> AttributeOrigin:
        src = sources.get(name if kind == "std" else "re") or {}
        return AttributeOrigin(field=name, values=values, kind=kind,
                               origin="posted" if columns is None and given is None else "enricher",
                               method=src.get("method") or src.get("backend"), model_id=src.get("model_id") or enricher)

    for name, raw in (item.get("clothes") or {}).items():
        values = [v for v in raw or [] if v != UNKNOWN]
        if not values:
            continue
        if given and sorted(given.get(name) or []) == sorted(values):
            out.append(AttributeOrigin(field=name, values=values, kind="std", origin="given"))
        elif columns is not None and set(values) <= set(columns.get(name) or []):
            out.append(AttributeOrigin(field=name, values=values, kind="std", origin="columns"))
        else:
            out.append(enriched(name, values, "std"))
    for name, raw in (item.get("reinforced_feature_value") or {}).items():
        if raw:
            out.append(enriched(name, list(raw), "re"))
    return out

