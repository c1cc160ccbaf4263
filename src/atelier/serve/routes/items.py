"""Items: look up, search and browse, similar items; create, replace and delete (API key)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from atelier.serve.deps import ApiKey, ServiceDep
from atelier.serve.schemas import (
    ITEM_ID_PATTERN,
    IngestResponse,
    Item,
    ItemPage,
    ProductIn,
    SimilarResponse,
    Text,
    error_responses,
    std_values,
)
from atelier.serve.service import ServiceError
from atelier.store import SearchFilters

router = APIRouter(prefix="/items", tags=["items"])
ItemIdPath = Annotated[Text, Path(min_length=1, max_length=128)]
WRITE_ERRORS = error_responses(401, 403, 413, 502)


@router.get("", response_model=ItemPage)
def search(
    service: ServiceDep,
    query: Annotated[Text, Query(max_length=200, description="words that must all appear")] = "",
    category: Annotated[list[Text] | None, Query(max_length=20)] = None,
    gender: Annotated[list[Text] | None, Query(max_length=5)] = None,
    color: Annotated[list[Text] | None, Query(max_length=10)] = None,
    min_price: Annotated[float | None, Query(ge=0)] = None,
    max_price: Annotated[float | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 24,
    offset: Annotated[int, Query(ge=0, le=10_000)] = 0,
) -> ItemPage:
    """Search titles and descriptions with filters; with neither, the popular items."""
    try:
        filters = SearchFilters(categories=tuple(std_values("category", category or [])),
                                genders=tuple(std_values("gender", gender or [])),
                                min_price=min_price, max_price=max_price)
        colors = std_values("color", color or [])
    except ValueError as exc:
        raise ServiceError(422, f"query: {exc}") from None
    return service.search(query, filters, colors, limit, offset)


@router.get("/{item_id}", response_model=Item, responses=error_responses(404))
def get_item(service: ServiceDep, item_id: ItemIdPath) -> Item:
    """One item with its attributes."""
    return service.get_item(item_id)


@router.get("/{item_id}/similar", response_model=SimilarResponse, responses=error_responses(404))
def similar(service: ServiceDep, item_id: ItemIdPath, k: Annotated[int, Query(ge=1, le=100)] = 10) -> SimilarResponse:
    """The k nearest items in the live model's space (colourways folded)."""
    return service.similar(item_id, k)


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
