"""Item JSON models (DESIGN.md section 2) and their normalisation against the schema."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from atelier.schema.spec import UNKNOWN, normalise_text

if TYPE_CHECKING:
    from atelier.schema.spec import Schema

RE_MAX_CHARS = 60  # an RE value is a short phrase; longer text is a sign the LLM rambled
RE_MAX_VALUES = 8  # per field; more is noise for the item tower


class Service(BaseModel):
    """What the shop already knows about the product."""

    model_config = ConfigDict(extra="forbid")

    title: str = ""
    description: str = ""
    brand: str | None = None
    price: float | None = Field(default=None, ge=0)
    stock: int | None = Field(default=None, ge=0)
    group_id: str | None = Field(default=None, description="colourways of one product share it")


class ItemJSON(BaseModel):
    """One product as the models see it: STD values, RE phrases and service fields."""

    model_config = ConfigDict(extra="forbid")

    item_id: str = Field(min_length=1, max_length=128)
    clothes: dict[str, list[str]] = Field(default_factory=dict)
    reinforced_feature_value: dict[str, list[str]] = Field(default_factory=dict)
    service: Service = Field(default_factory=Service)

    @field_validator("item_id")
    @classmethod
    def _strip_id(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("item_id is blank")
        return v


def normalise_item(item: ItemJSON, schema: Schema) -> tuple[ItemJSON, list[str]]:
    """Map STD values onto the vocabulary (synonyms, else ``unknown``) and tidy RE phrases.

    Returns the normalised item and a list of human-readable issues (unknown fields, values that
    fell to ``unknown``, over-long phrases), so callers can count and report them.
    """

    issues: list[str] = []
    clothes: dict[str, list[str]] = {}
    for name, values in item.clothes.items():
        spec = schema.std.get(name)
        if spec is None:
            issues.append(f"clothes.{name}: not an STD field")
            continue
        out: list[str] = []
        for raw in values:
            value = spec.normalise(raw)
            if value is None:
                issues.append(f"clothes.{name}: {raw!r} is not an allowed value")
                value = UNKNOWN
            if value not in out:
                out.append(value)
        if out:
            clothes[name] = out
    rfv: dict[str, list[str]] = {}
    for name, values in item.reinforced_feature_value.items():
        if name not in schema.re:
            issues.append(f"reinforced_feature_value.{name}: not an RE field")
            continue
        phrases: list[str] = []
        for raw in values:
            text = normalise_text(raw)
            if len(text) > RE_MAX_CHARS:
                issues.append(f"reinforced_feature_value.{name}: phrase cut to {RE_MAX_CHARS} chars")
                text = text[:RE_MAX_CHARS].rstrip()
            if text and text not in phrases:
                phrases.append(text)
        if phrases:
            rfv[name] = phrases[:RE_MAX_VALUES]
    normalised = item.model_copy(update={"clothes": clothes, "reinforced_feature_value": rfv})
    return normalised, issues
