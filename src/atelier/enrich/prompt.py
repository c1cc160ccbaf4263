"""The versioned extraction prompt and the JSON schema that constrains the model's answer.

What the model sees: a fixed guide (every STD field with its allowed values, every RE field with
what it means), then one product (title, description, facts the catalogue columns already give)
and the list of fields to fill. The guide is identical for every product, so llama.cpp reuses
its KV cache for that prefix and only the product is evaluated per item.

What the model may write: a flat JSON object, one key per asked STD field whose value is an enum
of readable labels (``"vest top"``, not ``"02top_08vesttop"``: a small model picks a word far
better than a numbered id) plus ``"unknown"``, and an ``re`` object of short phrases per RE field.
There are deliberately no few-shot examples: the 270M model copies them (issue #5).

Bump ``PROMPT_VERSION`` whenever the guide, the instructions or the schema shape change: it is
part of the cache key, so a bump re-enriches everything.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from atelier.enrich.base import ExtractionRequest
from atelier.schema import Schema, StdField

__all__ = [
    "PROMPT_VERSION",
    "RE_MAX_PHRASES",
    "RE_PHRASE_CHARS",
    "UNKNOWN_LABEL",
    "RawProduct",
    "asked_fields",
    "build_request",
    "input_hash",
    "label_maps",
    "output_schema",
]

PROMPT_VERSION = "enrich-v1"
UNKNOWN_LABEL = "unknown"  # what the model answers when the listing does not say
RE_MAX_PHRASES = 2  # per RE field: every extra phrase costs ~8 decoded tokens on CPU
RE_PHRASE_CHARS = 32  # bounds a rambling phrase so the grammar always closes the JSON
_ID_VALUE = re.compile(r"^\d\d[a-z]+_\d\d([a-z]+)$")

# Garment-specific STD fields only make sense for some garment groups (category_specification);
# asking a sock for its neckline wastes tokens and invites nonsense.
_GARMENT_FIELDS = {
    "top.length_type": {"top", "outer", "nightwear"},
    "top.sleeve_length_type": {"top", "outer", "onepiece", "nightwear", "swimwear"},
    "top.neck_color_design": {"top", "outer", "onepiece", "nightwear", "swimwear"},
    "top.sleeve_design": {"top", "outer", "onepiece"},
    "bottom.length_type": {"bottom"},
    "dress.length_type": {"onepiece"},
}
_CLOTHING = {"outer", "top", "bottom", "onepiece", "set", "underwear", "nightwear", "swimwear", "socks_tights"}
_CLOTHING_ONLY = {"elasticity", "transparency", "isfleece", "fit"}
_SYSTEM = (
    "You are a fashion catalogue expert. You read one product listing and fill in its attributes "
    "as JSON. For each attribute pick the allowed value the listing states or clearly implies; "
    'write "unknown" when it does not say and you cannot tell. Free-text attributes (under "re") '
    f"take at most {RE_MAX_PHRASES} short phrases of one to three words each, drawn from the "
    "listing; write [] when nothing fits. Never copy these instructions.\n\n"
)


@dataclass(frozen=True)
class RawProduct:
    """One product as the extractor sees it: text plus the STD facts catalogue columns already give."""

    item_id: str
    title: str = ""
    description: str = ""
    known: dict[str, list[str]] = field(default_factory=dict)
    service: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def coerce(cls, raw: RawProduct | dict[str, Any]) -> RawProduct:
        """Accept a ``RawProduct`` or a dict such as an item JSON or an ingest API payload.

        Dict keys: ``item_id`` (required), ``title``, ``description`` (top level or under
        ``service``), ``clothes`` or ``known`` (STD facts), and the remaining ``service`` fields.
        """
        if isinstance(raw, RawProduct):
            return raw
        if "item_id" not in raw or not str(raw["item_id"]).strip():
            raise ValueError("a product needs a non-empty item_id")
        service = dict(raw.get("service") or {})
        title = str(raw.get("title") or service.pop("title", "") or "")
        description = str(raw.get("description") or service.pop("description", "") or "")
        service.pop("title", None)
        service.pop("description", None)
        for key in ("price", "brand", "stock", "group_id"):
            if key in raw and key not in service:
                service[key] = raw[key]
        known_raw = raw.get("known") or raw.get("clothes") or {}
        known = {str(k): [str(v) for v in (vals if isinstance(vals, list) else [vals])]
                 for k, vals in known_raw.items()}
        return cls(item_id=str(raw["item_id"]).strip(), title=title.strip(), description=description.strip(),
                   known=known, service=service)


def _labels_for(spec: StdField) -> dict[str, str]:
    """Readable label -> allowed value for one field (identity unless values are numbered ids)."""
    out: dict[str, str] = {}
    for value in spec.values:
        match = _ID_VALUE.match(value)
        if not match:
            label = value
        else:
            # The first synonym naming this value is the everyday word ("vest top"); else the id's tail.
            label = next((alias for alias, target in spec.synonyms.items() if target == value), match.group(1))
        if label in out or label == UNKNOWN_LABEL:
            raise ValueError(f"std.{spec.name}: label {label!r} is ambiguous")
        out[label] = value
    return out


# Schema holds dicts, so it is not hashable: memoise per object (kept alive by the entry itself).
_MEMO: dict[tuple[str, int], tuple[Schema, Any]] = {}


def _memo(kind: str, schema: Schema, make: Any) -> Any:
    key = (kind, id(schema))
    hit = _MEMO.get(key)
    if hit is None or hit[0] is not schema:
        hit = _MEMO[key] = (schema, make(schema))
    return hit[1]


def label_maps(schema: Schema) -> dict[str, dict[str, str]]:
    """Per STD field: the label the model writes -> the allowed value it stands for."""
    result: dict[str, dict[str, str]] = _memo(
        "labels", schema, lambda s: {name: _labels_for(spec) for name, spec in s.std.items()})
    return result


def asked_fields(product: RawProduct, schema: Schema, full: bool = False,
                 only: list[str] | None = None) -> list[str]:
    """STD fields to ask the model for: the relevant ones the columns did not already fill.

    ``full`` asks every relevant field regardless of the columns (the accuracy benchmark hides
    the columns this way); ``only`` restricts the list to the named fields.
    """
    group = None if full else next(iter(product.known.get("category_specification", [])), None)
    fields = []
    for name in schema.std:
        if only is not None and name not in only:
            continue
        if not full and product.known.get(name):
            continue
        if group is not None:
            if name in _GARMENT_FIELDS and group not in _GARMENT_FIELDS[name]:
                continue
            if name in _CLOTHING_ONLY and group not in _CLOTHING:
                continue
        fields.append(name)
    return fields


def _guide(schema: Schema) -> str:
    """The fixed part of the prompt: every field and its allowed labels."""
    text: str = _memo("guide", schema, _make_guide)
    return text


def _make_guide(schema: Schema) -> str:
    labels = label_maps(schema)
    lines = ["Attributes and their allowed values:"]
    for name, spec in schema.std.items():
        # "garment kind: <group>_<kind>, ..." -> "garment kind": the model sees labels, not ids.
        about = spec.description.split(":")[0]
        lines.append(f"- {name} ({about}): {', '.join(labels[name])}")
    lines.append("Free-text attributes (re):")
    for name, re_spec in schema.re.items():
        # Without the schema's example phrases: the 270M model copies them ("wrap dress" on a top).
        lines.append(f"- {name}: {re_spec.description.split('(')[0].strip()}")
    return _SYSTEM + "\n".join(lines)


def output_schema(schema: Schema, fields: list[str], re_fields: list[str]) -> dict[str, Any]:
    """The JSON schema of the answer: one enum per asked STD field, short phrase lists under ``re``."""
    labels = label_maps(schema)
    props: dict[str, Any] = {
        name: {"type": "string", "enum": [*labels[name], UNKNOWN_LABEL]} for name in fields
    }
    required = list(fields)
    if re_fields:
        phrase = {"type": "string", "maxLength": RE_PHRASE_CHARS}
        props["re"] = {
            "type": "object",
            "properties": {name: {"type": "array", "items": phrase, "maxItems": RE_MAX_PHRASES} for name in re_fields},
            "required": list(re_fields),
            "additionalProperties": False,
        }
        required.append("re")
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def _product_text(product: RawProduct, schema: Schema, fields: list[str], re_fields: list[str],
                  show_known: bool) -> str:
    lines = ["Product listing:", f"Title: {product.title or '(none)'}"]
    if product.description:
        lines.append(f"Description: {product.description}")
    if show_known and product.known:
        # Facts in the same words as the guide ("vest top", not "02top_08vesttop").
        to_label = {name: {v: k for k, v in labels.items()} for name, labels in label_maps(schema).items()}
        facts = "; ".join(f"{k} = {', '.join(to_label.get(k, {}).get(x, x) for x in v)}"
                          for k, v in product.known.items())
        lines.append(f"Known facts: {facts}")
    lines.append(f"Fill in: {', '.join(fields) if fields else '(no attributes)'}")
    if re_fields:
        lines.append(f"and re: {', '.join(re_fields)}")
    return "\n".join(lines)


def build_request(product: RawProduct, schema: Schema, fields: list[str], re_fields: list[str],
                  show_known: bool = True) -> ExtractionRequest:
    """The chat messages and answer schema for one product (the guide first, for prefix reuse)."""
    # One user turn: Gemma's chat template has no system role, and a fixed leading text keeps
    # the llama.cpp prefix cache warm across products.
    content = _guide(schema) + "\n\n" + _product_text(product, schema, fields, re_fields, show_known)
    # ~8 tokens per STD key/value and ~12 per RE field of two phrases, plus slack for JSON syntax.
    max_tokens = 32 + 10 * len(fields) + (4 + RE_MAX_PHRASES * 12) * len(re_fields)
    return ExtractionRequest(
        item_id=product.item_id,
        messages=[{"role": "user", "content": content}],
        schema=output_schema(schema, fields, re_fields),
        max_tokens=max_tokens,
        context={"title": product.title, "description": product.description, "fields": fields,
                 "re_fields": re_fields, "known": product.known if show_known else {}},
    )


def input_hash(product: RawProduct, fields: list[str], re_fields: list[str], show_known: bool,
               schema: Schema) -> str:
    """Content hash of everything the model's answer depends on (besides prompt and model ids)."""
    payload = {
        "title": product.title, "description": product.description,
        "known": product.known if show_known else {}, "fields": fields, "re": re_fields,
        "schema": schema.version,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]
