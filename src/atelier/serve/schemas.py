"""Request and response models of the web service (the OpenAPI schema is generated from these).

Every request model forbids unknown keys, so a misspelt field is a 422 that names it instead of
being silently ignored. STD values in requests are checked against the attribute schema and
normalised (synonyms such as "dress" become "04onepiece_01dress").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from atelier.ingest import PROFILE_RANGES
from atelier.schema import load_schema
from atelier.store.items import PRICE_LEVELS

ItemId = str  # validated where it enters (Field constraints below)
ITEM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"  # safe in URLs, SQL params and file names


def storable_text(value: str) -> str:
    """Refuse what PostgreSQL text/jsonb cannot hold (NUL) and what is not Unicode (a lone UTF-16
    surrogate such as ``"\\ud800"``, which JSON can spell but UTF-8 cannot encode)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\x00) characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"is not valid Unicode (a lone surrogate at character {exc.start})") from None
    return value


Text = Annotated[str, AfterValidator(storable_text)]
"""Every free-text request field: any Unicode text PostgreSQL can store, so a request that
validates can always be stored, searched and echoed back."""


def json_number(value: object) -> object:
    """Refuse what pydantic's lax mode would coerce into a number: ``true`` is not 1, ``"170"`` is not 170."""
    if isinstance(value, bool | str):
        raise ValueError(f"must be a JSON number, not {type(value).__name__}")
    return value


Int = Annotated[int, BeforeValidator(json_number)]  # 12.0 is still 12 (JSON Schema's integer), 12.5 is not
Float = Annotated[float, BeforeValidator(json_number)]
Bool = Annotated[bool, Field(strict=True)]  # true/false only, not 1 or "yes"


def std_values(field_name: str, values: list[str]) -> list[str]:
    """Normalise values of one STD field; ValueError naming the first value the schema does not know."""
    spec = load_schema().std.get(field_name)
    if spec is None:
        raise ValueError(f"{field_name!r} is not an STD field")
    out: list[str] = []
    for raw in values:
        value = spec.normalise(raw)
        if value is None:
            shown = ", ".join(spec.values[:8]) + (" ..." if len(spec.values) > 8 else "")
            raise ValueError(f"{raw!r} is not a {field_name} value (allowed: {shown})")
        if value not in out:
            out.append(value)
    return out


# --- requests ---------------------------------------------------------------------------------


class Profile(BaseModel):
    """An anonymous shopper's body profile; every part optional, ranges catch unit mistakes."""

    model_config = ConfigDict(extra="forbid")

    # The ranges ingest keeps (values outside them are unit mistakes or typos there too).
    height_cm: Float | None = Field(default=None, ge=PROFILE_RANGES["height_cm"][0], le=PROFILE_RANGES["height_cm"][1])
    weight_kg: Float | None = Field(default=None, ge=PROFILE_RANGES["weight_kg"][0], le=PROFILE_RANGES["weight_kg"][1])
    age: Int | None = Field(default=None, ge=PROFILE_RANGES["age"][0], le=PROFILE_RANGES["age"][1])
    body_type: Text | None = Field(default=None, max_length=40)


class Filters(BaseModel):
    """Metadata filters: STD category/gender values (or synonyms), price range, stock."""

    model_config = ConfigDict(extra="forbid")

    categories: list[str] = Field(default_factory=list, max_length=20)
    genders: list[str] = Field(default_factory=list, max_length=5)
    min_price: Float | None = Field(default=None, ge=0, le=1e9)
    max_price: Float | None = Field(default=None, ge=0, le=1e9)
    in_stock_only: Bool = False

    @field_validator("categories")
    @classmethod
    def _categories(cls, v: list[str]) -> list[str]:
        return std_values("category", v)

    @field_validator("genders")
    @classmethod
    def _genders(cls, v: list[str]) -> list[str]:
        return std_values("gender", v)

    @model_validator(mode="after")
    def _price_range(self) -> Filters:
        if self.min_price is not None and self.max_price is not None and self.max_price < self.min_price:
            raise ValueError(f"max_price {self.max_price} is below min_price {self.min_price}")
        return self


class RecommendRequest(BaseModel):
    """A known user (``user_id``) or an anonymous shopper: recent items, cart, profile, context."""

    model_config = ConfigDict(extra="forbid")

    user_id: Text | None = Field(default=None, min_length=1, max_length=128)
    recent_item_ids: list[Text] = Field(default_factory=list, max_length=50, description="oldest first")
    cart: list[Text] = Field(default_factory=list, max_length=50)
    profile: Profile | None = None
    context: Text | None = Field(default=None, max_length=500, description="an occasion or free text")
    filters: Filters | None = None
    k: Int = Field(default=12, ge=1, le=100)
    exclude_seen: Bool = Field(default=False, description="also leave out the history's items (the cart's always are)")

    @field_validator("recent_item_ids", "cart")
    @classmethod
    def _ids(cls, v: list[str]) -> list[str]:
        for item_id in v:
            if not 1 <= len(item_id) <= 128:
                raise ValueError(f"item id {item_id[:40]!r} must be 1..128 characters")
        return v


class ProductIn(BaseModel):
    """A raw product for cold-start ingest: shop fields, raw catalogue columns, optional STD values."""

    model_config = ConfigDict(extra="forbid")

    item_id: str = Field(pattern=ITEM_ID_PATTERN, description="letters, digits and . _ : - (max 128)")
    title: Text = Field(min_length=1, max_length=200)
    description: Text = Field(default="", max_length=5000)
    brand: Text | None = Field(default=None, max_length=100)
    price: Float | None = Field(default=None, ge=0, le=1_000_000)
    stock: Int | None = Field(default=None, ge=0, le=10_000_000)
    group_id: Text | None = Field(default=None, max_length=128)
    columns: dict[Annotated[Text, Field(max_length=100)], Annotated[Text, Field(max_length=500)]] = Field(
        default_factory=dict, max_length=50,
        description="raw catalogue columns the dataset's mapping knows, e.g. product_type_name, colour_group_name",
    )
    attributes: dict[str, list[str]] = Field(
        default_factory=dict, max_length=30, description="STD values given directly, e.g. {'color': ['black']}"
    )

    @field_validator("attributes")
    @classmethod
    def _attributes(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        return {name: std_values(name, values) for name, values in v.items() if values}


# --- responses --------------------------------------------------------------------------------


class FieldError(BaseModel):
    """One invalid part of a request: where it is (``body.profile.height_cm``) and what is wrong."""

    field: str
    message: str


class ErrorOut(BaseModel):
    """The body of every error answer: one line naming what was wrong (and, for 422, each field)."""

    detail: str
    errors: list[FieldError] = Field(default_factory=list)


def error_responses(*codes: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI ``responses`` entries with the ``ErrorOut`` body for these status codes."""
    return {code: {"model": ErrorOut, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


ERROR_DESCRIPTIONS = {
    400: "the body is not JSON (or not UTF-8)", 401: "no API key", 403: "wrong API key, or writes disabled",
    404: "unknown item",
    409: "the id exists; use PUT", 413: "request body too large",
    422: "invalid request: the message names each bad field",
    502: "enrichment failed; nothing stored", 503: "store or encoder unavailable",
}


class Item(BaseModel):
    """An item as the page shows it: id, shop fields and its STD/RE attributes."""

    item_id: str
    title: str = ""
    description: str = ""
    price: float | None = Field(default=None, description="the catalogue's own number, as stored (H&M's are "
                                                          "normalised: not an amount of money)")
    price_level: int | None = Field(default=None, ge=1, le=PRICE_LEVELS,
                                    description=f"1 (the cheapest fifth of the catalogue) .. {PRICE_LEVELS} (the "
                                                "dearest fifth); none when the price or the store is missing")
    price_label: str | None = Field(default=None, description="the price as a shop shows it: the amount and "
                                                              "currency when the catalogue has one, else the level")
    group_id: str | None = None
    attributes: dict[str, list[str]] = Field(default_factory=dict)
    re_attributes: dict[str, list[str]] = Field(default_factory=dict)

    @classmethod
    def stored(cls, item_id: str, item: dict[str, Any] | None) -> Item:
        """The API view of a stored item JSON (an id-only placeholder row gives an empty item)."""
        item = item or {}
        service = item.get("service") or {}
        return cls(item_id=item_id, title=service.get("title") or "", description=service.get("description") or "",
                   price=service.get("price"), group_id=service.get("group_id"), attributes=item.get("clothes") or {},
                   re_attributes=item.get("reinforced_feature_value") or {})


class ItemPage(BaseModel):
    """One page of a catalogue search."""

    items: list[Item]
    next_offset: int | None
    source: Literal["search", "popular"]
    ranked_by: list[str] = Field(default_factory=list, description=(
        "the ranked lists fused into this order: 'text: all words' (or 'text: most words' when no item has "
        "every word: items with any of them, most words first), 'vector: <model id>' (the query encoded as an "
        "item), 'popularity' (ties); no vector entry means the semantic part did not run, and notes say why"))
    corrections: dict[str, str] = Field(default_factory=dict, description="misspelt word -> the word searched")
    notes: list[str] = Field(default_factory=list)


# Catalogues whose prices are money, by dataset: ISO 4217 code. H&M's prices are normalised (0.0169), RentTheRunway
# and Myntra have none, so the shipped datasets show a price level; a shop adds its catalogue here.
CURRENCIES: dict[str, str] = {}


def show_prices(items: Iterable[Item], level: Callable[[float | None], int | None], currency: str | None) -> None:
    """Fill each item's price level (``level``: the catalogue's quantile of a price) and its label: the amount
    in ``currency``, or, without one, "price level 3 of 5"."""
    for item in items:
        item.price_level = level(item.price)
        if item.price is not None and currency:
            item.price_label = f"{item.price:,.2f} {currency}"
        elif item.price_level is not None:
            item.price_label = f"price level {item.price_level} of {PRICE_LEVELS}"


class SimilarItem(Item):
    """A neighbour of an item with its inner-product score."""

    score: float


class SimilarResponse(BaseModel):
    """Nearest items to one item in the live model's space."""

    item_id: str
    model_id: str
    items: list[SimilarItem]


class SharedAttribute(BaseModel):
    """One STD value a recommended item has in common with what the shopper gave."""

    field: str
    value: str
    source: Literal["cart", "history", "context"]


class Explanation(BaseModel):
    """Why an item was recommended: one sentence for the shopper, and the model's detail behind it."""

    reason: str = Field(description="one short sentence from the strongest signal that is true for this shopper")
    signal: str = Field(default="", description=(
        "what the sentence rests on: colourway, own, co-bought, new, similar, context, category-popularity, "
        "popularity, occasion-popularity, profile-popularity"))
    stage: str = Field(default="", description="the chain stage that served the item")
    source: str | None = Field(default=None, description="the candidate source that proposed it (ranked stage)")
    detail: str = Field(default="", description="the stage's own words (model detail, not for shoppers)")
    shared: list[SharedAttribute] = Field(default_factory=list)


class Recommendation(Item):
    """A recommended item, its score (None for popularity ranks) and the stage that produced it."""

    score: float | None
    stage: str
    explanation: Explanation


class StageReport(BaseModel):
    """What one stage of the chain did for this request."""

    name: str
    status: Literal["served", "skipped", "unavailable", "failed", "not_needed"]
    detail: str = ""
    items: int = 0


class RecommendResponse(BaseModel):
    """Ranked items, the stage that produced the first one, and every stage's report."""

    items: list[Recommendation]
    stage: str
    stages: list[StageReport]
    degraded: bool = Field(description="true when the store was unreachable and the cached popular list served")
    context_attributes: dict[str, list[str]] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    model_id: str | None = None
    elapsed_ms: float


class AttributeOrigin(BaseModel):
    """Where one field's values of a product came from."""

    field: str
    values: list[str]
    kind: Literal["std", "re"]
    origin: Literal["columns", "enricher", "given", "posted"] = Field(description=(
        "columns: the catalogue's own columns through the dataset's mapping; enricher: the enrichment stage or "
        "the service's enricher (method and model id say which); given: the merchandiser's STD values; posted: "
        "a product posted to the service, whose split between columns and enricher was not kept"))
    method: str | None = None
    model_id: str | None = None


class CartCount(BaseModel):
    """A cart the product was recommended to, and how often, in the service's recommendation log."""

    cart: list[str]
    titles: list[str]
    times: int


class ProductView(BaseModel):
    """A merchandiser's view of a product: its attributes and their origins, colourways, nearest items, and
    the carts it was recommended to most."""

    item: Item
    origins: list[AttributeOrigin]
    provenance: str = Field(description="what the origins were read from")
    colourways: list[Item]
    neighbours: list[SimilarItem]
    carts: list[CartCount]
    log: str = Field(description="the recommendation log read and how much of it")


class PreviewResponse(BaseModel):
    """What the enricher makes of a product before it goes live (nothing is stored or encoded)."""

    item: dict[str, object]
    enricher: str
    issues: list[str]
    origins: list[AttributeOrigin]


class IngestResponse(BaseModel):
    """The stored item JSON of an ingested product and how long each step took."""

    item: dict[str, object]
    model_id: str
    enricher: str
    issues: list[str]
    timings_ms: dict[str, float]


class Ready(BaseModel):
    """Readiness: the store, the loaded models and which stages can serve."""

    ready: bool
    degraded: bool
    store: str
    dataset: str
    model_id: str | None
    models: dict[str, str]
    stages: dict[str, str]
    ingest: str


class Meta(BaseModel):
    """What the page needs for its pickers: dataset and allowed filter values."""

    dataset: str
    categories: list[dict[str, str]]
    colors: list[str]
    genders: list[str]
    stages: list[str]


Role = Literal["baseline", "served", "other"]
CohortName = Literal["all", "history", "new", "cart"]


class CohortRow(BaseModel):
    """One model's scores in one cohort of the evaluation report (None: the report has no such number)."""

    model: str
    role: Role = Field(description=(
        "baseline: `rules` (the strongest simple baseline) or `popularity`; served: `atelier`, the chain this "
        "service serves; other: the remaining baselines, stages and peers"))
    map_at_12: float | None = Field(description="MAP@12 (Kaggle H&M definition)")
    recall_at_100: float | None
    cold_recall_at_100: float | None = Field(description=(
        "recall@100 of the test pairs whose item had no training interaction (the all and cart cohorts only)"))


class CohortTable(BaseModel):
    """One cohort of the report: who is in it, how many, and every model's scores in report order."""

    cohort: CohortName
    title: str
    about: str
    users: int | None
    rows: list[CohortRow]


class ReportPlot(BaseModel):
    """A PNG plot beside the report and where the service serves it."""

    name: str
    url: str


class EvaluationView(BaseModel):
    """The latest evaluation report of a dataset, as the page's tables: one per cohort, the split in a sentence,
    its plots."""

    dataset: str
    report: str = Field(description="the report file read (`atelier evaluate` and `atelier run` write it)")
    created: str | None
    git_commit: str | None
    validation: bool = Field(description="true for the default split, whose days were also used to tune choices")
    split: str = Field(description="the split in one sentence: validation or test, days, users per cohort")
    baselines: list[str] = Field(description="the baselines' names present in the report")
    served: str | None = Field(description="the served chain's name, when the report scores it")
    cohorts: list[CohortTable]
    plots: list[ReportPlot]
    notes: list[str] = Field(default_factory=list)
