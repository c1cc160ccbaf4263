"""Items: look up, search and browse, similar items; create, replace and delete (API key).

A search with words is ranked (``atelier.store.items.rank_items``): full-text search over titles, attribute
words and descriptions, fused with a vector search in the live item tower's space for the query encoded as
an item (its words as the title, the STD values it names as attributes: how the content stage reads a
shopper's context), popularity breaking ties. Without an item tower (nothing indexed, or a checkpoint that
changed since) the vector part cannot run: the page says so in ``ranked_by`` and ``notes`` and the log warns.
Every item answered carries its price level in the catalogue (``show_catalogue_prices``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from pathlib import Path as FilePath
from typing import Annotated

import numpy as np
import psycopg
from fastapi import APIRouter, Path, Query, Response, status

from atelier.schema import ItemJSON
from atelier.schema.context import context_attributes
from atelier.schema.item import normalise_item
from atelier.serve.deps import ApiKey, ServiceDep
from atelier.serve.products import ColumnEnricher, attribute_origins, column_values, enrichment_sources
from atelier.serve.schemas import (
    CURRENCIES,
    ITEM_ID_PATTERN,
    CartCount,
    IngestResponse,
    Item,
    ItemPage,
    PreviewResponse,
    ProductIn,
    ProductView,
    SimilarResponse,
    Text,
    error_responses,
    show_prices,
    std_values,
)
from atelier.serve.service import RecommendService, ServiceError
from atelier.store import SearchFilters, StoreError, fetch_items
from atelier.store.items import catalogue_facts, items_in_group, rank_items

router = APIRouter(prefix="/items", tags=["items"])
ItemIdPath = Annotated[Text, Path(min_length=1, max_length=128)]
WRITE_ERRORS = error_responses(401, 403, 413, 502)
VECTOR_DEPTH = 100  # the vector list's length: at rank 100 an item adds 1/320 at half weight, under any text match
QUERY_CACHE = 512  # query vectors kept in memory (queries repeat: the page's suggestions, popular words)
LOG_TAIL_BYTES = 8 << 20  # the merchandiser's view reads the last 8 MB of the recommendation log (~40k answers)
log = logging.getLogger("atelier.serve")
_query_vectors: dict[tuple[str, str], np.ndarray] = {}


def recommendation_log(service: RecommendService) -> FilePath:
    """The service's log of answers to shoppers with a cart: one JSON line each (cart, items, stage)."""
    return service.settings.paths.recommendation_log


def carts_recommended(service: RecommendService, item_id: str, top: int = 5) -> tuple[list[tuple[list[str], int]], str]:
    """The carts ``item_id`` was recommended to most often in the log's tail, and what was read."""
    path = recommendation_log(service)
    if not path.is_file():
        return [], f"{path}: no answers logged yet"
    with path.open("rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(max(0, size - LOG_TAIL_BYTES))
        lines = fh.read().decode("utf-8", errors="replace").splitlines()[1 if size > LOG_TAIL_BYTES else 0 :]
    counts: Counter[tuple[str, ...]] = Counter()
    for line in lines:
        try:
            answer = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash: skipped
            continue
        if item_id in answer.get("items", ()):
            counts[tuple(sorted(answer.get("cart", ())))] += 1
    return [(list(cart), n) for cart, n in counts.most_common(top)], f"{path}: last {len(lines)} answers read"


def show_catalogue_prices(service: RecommendService, items: Iterable[Item]) -> None:
    """Label the items' prices against the catalogue's price quantiles (nothing while the store is down)."""
    store = service.store()
    if store is None:
        return
    try:
        facts = catalogue_facts(store)
    except (StoreError, psycopg.Error) as exc:
        log.warning("price levels unavailable: %s", exc)
        return
    show_prices(items, facts.price_level, CURRENCIES.get(service.dataset))


def semantic_blocker(service: RecommendService) -> str | None:
    """Why the vector part of a search cannot run, or None."""
    if service.model_id is None:
        return f"nothing indexed for {service.dataset}; run `atelier run`"
    if service.encoder is None:
        return service.ingest_blocker or "no item tower loaded"
    return None


def query_item(query: str) -> ItemJSON:
    """A search as an item: the words as its title, the STD values they name as its attributes."""
    return ItemJSON.model_validate({"item_id": "query", "clothes": context_attributes(query),
                                    "service": {"title": query}})


def query_vector(service: RecommendService, query: str) -> np.ndarray:
    """The query as the live item tower sees a product titled with it, with the STD values it names."""
    assert service.encoder is not None and service.model_id is not None, "semantic_blocker() was not checked"
    key = (service.model_id, query)
    if key not in _query_vectors:
        if len(_query_vectors) >= QUERY_CACHE:  # bounded: queries are free text
            _query_vectors.clear()
        _query_vectors[key] = service.encoder.encode([query_item(query)])[0]
    return _query_vectors[key]


def ranked_search(service: RecommendService, query: str, filters: SearchFilters, colors: list[str], limit: int,
                  offset: int) -> ItemPage:
    """Text and vector search fused, popularity breaking ties; ``ranked_by`` names the lists that ran."""
    store = service.store()
    if store is None:
        raise ServiceError(503, "the vector store is unreachable: search needs it")
    notes: list[str] = []
    hits, name = None, "vector"
    why = semantic_blocker(service)
    if why is None:
        assert service.model_id is not None
        hits = store.search(service.model_id, query_vector(service, query), VECTOR_DEPTH, filters=filters)
        name = f"vector: {service.model_id}"
    else:
        notes.append(f"ranked without the vector search: {why}")
        log.warning("search %r ranked without the vector search: %s", query[:80], why)
    page = rank_items(store, query, filters, colors, limit, offset, vector_hits=hits, vector_name=name,
                      popular=service.shop.popular.overall)
    return ItemPage(items=[Item.stored(i, d) for i, d in page.rows], next_offset=offset + limit if page.more else None,
                    source="search", ranked_by=page.ranked_by, corrections=page.corrections, notes=notes)


@router.get("", response_model=ItemPage)
def search(
    service: ServiceDep,
    query: Annotated[Text, Query(max_length=200, description="words to search for (ranked; misspellings "
                                                             "corrected)")] = "",
    category: Annotated[list[Text] | None, Query(max_length=20)] = None,
    gender: Annotated[list[Text] | None, Query(max_length=5)] = None,
    color: Annotated[list[Text] | None, Query(max_length=10)] = None,
    min_price: Annotated[float | None, Query(ge=0)] = None,
    max_price: Annotated[float | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 24,
    offset: Annotated[int, Query(ge=0, le=10_000)] = 0,
) -> ItemPage:
    """Ranked search over titles, attributes and descriptions with filters; filters alone browse the newest;
    with neither, the popular items."""
    try:
        filters = SearchFilters(categories=tuple(std_values("category", category or [])),
                                genders=tuple(std_values("gender", gender or [])),
                                min_price=min_price, max_price=max_price)
        colors = std_values("color", color or [])
    except ValueError as exc:
        raise ServiceError(422, f"query: {exc}") from None
    if query.strip():
        page = ranked_search(service, query, filters, colors, limit, offset)
    else:
        page = service.search(query, filters, colors, limit, offset)
    show_catalogue_prices(service, page.items)
    return page


@router.get("/{item_id}", response_model=Item, responses=error_responses(404))
def get_item(service: ServiceDep, item_id: ItemIdPath) -> Item:
    """One item with its attributes."""
    item = service.get_item(item_id)
    show_catalogue_prices(service, [item])
    return item


@router.get("/{item_id}/similar", response_model=SimilarResponse, responses=error_responses(404))
def similar(service: ServiceDep, item_id: ItemIdPath, k: Annotated[int, Query(ge=1, le=100)] = 10) -> SimilarResponse:
    """The k nearest items in the live model's space (colourways folded)."""
    found = service.similar(item_id, k)
    show_catalogue_prices(service, found.items)
    return found


@router.get("/{item_id}/merchandising", response_model=ProductView, dependencies=[ApiKey],
            responses={**error_responses(401, 403, 404)})
def merchandising(service: ServiceDep, item_id: ItemIdPath) -> ProductView:
    """A merchandiser's view: attributes and where each came from (catalogue columns, or the enrichment stage
    with its method and model id), colourways, nearest items, and the carts it was recommended to most."""
    item = service.get_item(item_id)
    store = service.store()
    if store is None:
        raise ServiceError(503, "the vector store is unreachable")
    doc = store.get_item(item_id) or {}
    data = service.shop.data
    columns = column_values(data.items if data is not None else None, service.dataset, item_id)
    model_id, sources = enrichment_sources(service.settings, service.dataset) if columns is not None else (None, {})
    provenance = ("a product posted to the service: its enricher's output was stored without the split"
                  if columns is None else
                  f"catalogue columns through the {service.dataset} mapping; the rest from the enrichment stage "
                  f"({model_id}, runs/reports/enrich-{service.dataset}.json)" if model_id else
                  f"catalogue columns through the {service.dataset} mapping (no enrichment report)")
    colourways = [Item.stored(i, d) for i, d in items_in_group(store, item.group_id) if i != item_id] \
        if item.group_id else []
    neighbours = service.similar(item_id, 8).items if service.model_id is not None else []
    carts, read = carts_recommended(service, item_id)
    titles = fetch_items(store, sorted({i for cart, _ in carts for i in cart}))
    show_catalogue_prices(service, [item, *colourways, *neighbours])
    return ProductView(
        item=item, origins=attribute_origins(doc, columns, enricher=model_id, sources=sources), provenance=provenance,
        colourways=colourways, neighbours=neighbours, log=read,
        carts=[CartCount(cart=cart, titles=[((titles.get(i) or {}).get("service") or {}).get("title") or i
                                            for i in cart], times=n) for cart, n in carts])


@router.post("/preview", response_model=PreviewResponse, dependencies=[ApiKey], responses=WRITE_ERRORS)
def preview(service: ServiceDep, product: ProductIn) -> PreviewResponse:
    """What the enricher makes of a product before it goes live: its normalised attributes, where each came
    from, and the issues found; nothing is stored or encoded."""
    name = getattr(service.enricher, "name", type(service.enricher).__name__)
    try:
        enriched = service.enricher(product)
        item, issues = normalise_item(ItemJSON.model_validate(enriched.model_dump()), service.schema)
    except Exception as exc:  # any backend failure: the same 502 as ingest, nothing stored either way
        raise ServiceError(502, f"enrichment ({name}) failed for {product.item_id!r}: {exc}") from None
    columns = ColumnEnricher(service.dataset)(product.model_copy(update={"attributes": {}})).clothes
    doc = item.model_dump(mode="json")
    return PreviewResponse(item=doc, enricher=name, issues=issues,
                           origins=attribute_origins(doc, columns, given=product.attributes, enricher=name))


@router.post("", response_model=IngestResponse, status_code=status.HTTP_201_CREATED, dependencies=[ApiKey],
             responses={**WRITE_ERRORS, **error_responses(409)})
def create(service: ServiceDep, product: ProductIn) -> IngestResponse:
    """Ingest a new product: enrich, encode with the item tower, upsert: recommendable at once."""
    return service.ingest(product, create_only=True)


@router.put("/{item_id}", response_model=IngestResponse, dependencies=[ApiKey], responses=WRITE_ERRORS)
def replace(service: ServiceDep, item_id: Annotated[str, Path(pattern=ITEM_ID_PATTERN)],
            product: ProductIn) -> IngestResponse:
    """Create or replace a product (its vector is re-encoded)."""
    if product.item_id != item_id:
        raise ServiceError(422, f"body.item_id: {product.item_id!r} differs from the path's {item_id!r}")
    return service.ingest(product, create_only=False)


@router.delete("/{item_id}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[ApiKey],
               responses={**WRITE_ERRORS, **error_responses(404)})
def delete(service: ServiceDep, item_id: ItemIdPath) -> Response:
    """Remove a product and its vectors."""
    service.delete(item_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
