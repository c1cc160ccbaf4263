"""One product -> validated item JSON: ask the backend, parse, repair, retry, or record the error.

Every answer goes through the same steps whatever the backend:

1. parse JSON (repairs: code fences, text around the outermost ``{...}``);
2. accept the flat answer shape or the item-JSON shape a server without schema support may use;
3. map each STD label back to its allowed value, else through the schema's synonyms, else to
   ``unknown`` (``normalise_item``); ``"unknown"`` from the model means "not stated": the field
   is left out;
4. build the pydantic ``ItemJSON`` and normalise it against the schema.

An answer that is not JSON, or not an object, is retried (up to ``max_attempts``; retries ask the
backend to sample, since a greedy decoder repeats itself). A product that still fails ends as an
error record with its raw output: nothing is dropped silently.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from atelier.enrich.base import BackendError, ExtractionRequest, Extractor
from atelier.enrich.prompt import (
    PROMPT_VERSION,
    UNKNOWN_LABEL,
    RawProduct,
    asked_fields,
    build_request,
    input_hash,
    label_maps,
)
from atelier.schema import UNKNOWN, ItemJSON, Schema, Service, load_schema
from atelier.schema.item import normalise_item

if TYPE_CHECKING:
    from atelier.enrich.cache import EnrichCache

__all__ = ["AnswerError", "EnrichOptions", "EnrichmentResult", "Prepared", "enrich_product", "parse_answer",
           "prepare"]

Status = Literal["ok", "repaired", "error"]
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)
_SERVICE_KEYS = set(Service.model_fields)


class AnswerError(ValueError):
    """The model's answer cannot be used at all (not JSON, not an object)."""


@dataclass(frozen=True)
class EnrichOptions:
    """What to ask: ``full`` ignores the columns (benchmarks), ``fields``/``re_fields`` restrict the ask."""

    full: bool = False
    fields: tuple[str, ...] | None = None  # None = every relevant STD field the columns lack
    re_fields: tuple[str, ...] | None = None  # None = every RE field; () = none
    show_known: bool = True  # give the model the column facts as context (off when they are hidden)
    max_attempts: int = 3  # answers that are not JSON are asked again this many times in all


@dataclass
class EnrichmentResult:
    """The outcome for one product: an item, or an error record with the raw output."""

    item_id: str
    status: Status
    backend: str
    prompt_version: str
    input_hash: str
    item: ItemJSON | None = None
    extracted: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # model-only {clothes, re}
    issues: list[str] = field(default_factory=list)
    error: str | None = None
    raw: str | None = None
    attempts: int = 0
    seconds: float = 0.0
    cached: bool = False

    @property
    def key(self) -> str:
        """The cache key: inputs x prompt version x backend/model."""
        return cache_key(self.input_hash, self.prompt_version, self.backend)

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict (the cache and error files store this)."""
        rec = asdict(self)
        rec["item"] = self.item.model_dump(mode="json") if self.item is not None else None
        rec.pop("cached")
        rec["key"] = self.key
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any], cached: bool = True) -> EnrichmentResult:
        """Rebuild a result read back from the cache."""
        data = {k: v for k, v in rec.items() if k in cls.__dataclass_fields__ and k != "cached"}
        if data.get("item") is not None:
            data["item"] = ItemJSON.model_validate(data["item"])
        return cls(**data, cached=cached)

    def error_record(self) -> dict[str, Any]:
        """The error record a failed product leaves: id, backend, error, raw output."""
        return {"item_id": self.item_id, "backend": self.backend, "prompt_version": self.prompt_version,
                "error": self.error, "raw": self.raw, "attempts": self.attempts}


def cache_key(input_hash_: str, prompt_version: str, backend: str) -> str:
    """One string for (content hash, prompt version, backend + model id)."""
    return f"{input_hash_}|{prompt_version}|{backend}"


@dataclass(frozen=True)
class Prepared:
    """A product ready to send: its request and cache identity."""

    product: RawProduct
    request: ExtractionRequest
    input_hash: str
    fields: list[str]
    re_fields: list[str]


def prepare(raw: RawProduct | dict[str, Any], schema: Schema, options: EnrichOptions) -> Prepared:
    """Work out the asked fields, the request and the content hash of one product."""
    product = RawProduct.coerce(raw)
    only = list(options.fields) if options.fields is not None else None
    fields = asked_fields(product, schema, full=options.full, only=only)
    re_fields = list(schema.re) if options.re_fields is None else [f for f in options.re_fields if f in schema.re]
    request = build_request(product, schema, fields, re_fields, show_known=options.show_known)
    return Prepared(product, request, input_hash(product, fields, re_fields, options.show_known, schema),
                    fields, re_fields)


def _loads(raw: str) -> tuple[Any, list[str]]:
    """JSON from the raw answer, repairing fences and chatter around the object."""
    try:
        return json.loads(raw), []
    except json.JSONDecodeError:
        pass
    try:
        # llama.cpp's JSON grammar lets raw control characters (newlines) into strings; strict JSON does not
        return json.loads(raw, strict=False), ["json: repaired (control characters in strings)"]
    except json.JSONDecodeError:
        pass
    text = _FENCE.sub("", raw.strip())
    start, end = text.find("{"), text.rfind("}")
    if start >= 0 and end > start:
        try:
            return json.loads(text[start:end + 1]), ["json: repaired (text around the object)"]
        except json.JSONDecodeError as exc:
            raise AnswerError(f"invalid JSON: {exc.msg} at char {exc.pos}") from None
    raise AnswerError("invalid JSON: no object in the answer")


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [str(v) for v in value if v is not None and not isinstance(v, dict | list)]
    if isinstance(value, dict):
        return []
    return [str(value)]


def parse_answer(raw: str, schema: Schema, fields: list[str],
                 re_fields: list[str]) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    """The raw answer as (STD values, RE phrases, repair notes); ``AnswerError`` if it is unusable.

    STD values come back as allowed values or ``unknown``; fields that were not asked are dropped
    with a note; ``"unknown"`` answers leave the field out.
    """
    data, notes = _loads(raw)
    if not isinstance(data, dict):
        raise AnswerError(f"answer is a JSON {type(data).__name__}, not an object")
    # Servers without schema support sometimes answer in the item-JSON shape instead.
    std_src: dict[str, Any] = data
    re_src: Any = data.get("re", {})
    if isinstance(data.get("clothes"), dict):
        std_src = data["clothes"]
        re_src = data.get("reinforced_feature_value", re_src)
        notes.append("shape: item-JSON answer accepted")
    labels = label_maps(schema)
    clothes: dict[str, list[str]] = {}
    for name, value in std_src.items():
        if name in ("re", "reinforced_feature_value", "item_id", "service"):
            continue
        if name not in fields:
            notes.append(f"{name}: not asked, dropped")
            continue
        spec = schema.std[name]
        out: list[str] = []
        for text in _as_list(value):
            key = text.strip().lower()
            if key in ("", UNKNOWN_LABEL, "none given", "n/a", "null"):
                continue
            mapped = labels[name].get(key) or (key if key in spec.values else None)
            if mapped is None:
                mapped = spec.normalise(key)
                notes.append(f"{name}: {text!r} -> {mapped or UNKNOWN}")
            out.append(mapped or UNKNOWN)
        if out:
            clothes[name] = list(dict.fromkeys(out))
    missing = [f for f in fields if f not in std_src]
    if missing:
        notes.append(f"missing fields: {', '.join(missing)}")
    rfv: dict[str, list[str]] = {}
    if isinstance(re_src, dict):
        for name, value in re_src.items():
            if name not in re_fields:
                notes.append(f"re.{name}: not asked, dropped")
                continue
            phrases = [p for p in _as_list(value) if p.strip()]
            if phrases:
                rfv[name] = phrases
    elif re_fields:
        notes.append("re: not an object, dropped")
    return clothes, rfv, notes


def _item(product: RawProduct, clothes: dict[str, list[str]], rfv: dict[str, list[str]],
          schema: Schema) -> tuple[ItemJSON, list[str]]:
    """Columns first, model values for the fields they lack; validated and normalised."""
    merged = {**clothes, **product.known}
    service = {k: v for k, v in product.service.items() if k in _SERVICE_KEYS and v is not None}
    service.update(title=product.title, description=product.description)
    item = ItemJSON(item_id=product.item_id, clothes=merged, reinforced_feature_value=rfv,
                    service=Service(**service))
    return normalise_item(item, schema)


def enrich_product(raw: RawProduct | dict[str, Any], extractor: Extractor, *, schema: Schema | None = None,
                   options: EnrichOptions | None = None, cache: EnrichCache | None = None) -> EnrichmentResult:
    """Enrich one product: cached result if any, else ask the backend (retrying bad JSON).

    Never raises for a bad answer or a backend failure: those come back as ``status="error"``
    with the raw output, and are written to ``cache`` too (a later run retries them).
    """
    schema = schema or load_schema()
    options = options or EnrichOptions()
    prep = prepare(raw, schema, options)
    if cache is not None:
        hit = cache.get(cache_key(prep.input_hash, PROMPT_VERSION, extractor.model_id))
        if hit is not None:
            return for_product(hit, prep, schema)
    result = run_prepared(prep, extractor, schema, options)
    if cache is not None:
        cache.put(result)
    return result


def for_product(hit: EnrichmentResult, prep: Prepared, schema: Schema) -> EnrichmentResult:
    """A cached result applied to ``prep``'s product. The cache key covers what the model saw, not the
    product's id or shop fields, so catalogue rows with identical text share one answer; each must
    still come back under its own id, with its own price and stock (not the first row's)."""
    if hit.item is None:
        return replace(hit, item_id=prep.product.item_id)
    item, _ = _item(prep.product, hit.extracted.get("clothes", {}), hit.extracted.get("re", {}), schema)
    return replace(hit, item_id=prep.product.item_id, item=item)


def run_prepared(prep: Prepared, extractor: Extractor, schema: Schema, options: EnrichOptions) -> EnrichmentResult:
    """Ask the backend for one prepared product, with bounded retries on unusable answers."""
    start = time.perf_counter()
    result = EnrichmentResult(item_id=prep.product.item_id, status="error", backend=extractor.model_id,
                              prompt_version=PROMPT_VERSION, input_hash=prep.input_hash)
    if not prep.fields and not prep.re_fields:
        # Nothing to ask (the columns gave everything and RE is off): no model call needed.
        item, issues = _item(prep.product, {}, {}, schema)
        result.status, result.item, result.issues = "ok", item, issues
        return result
    errors: list[str] = []
    for attempt in range(1, max(1, options.max_attempts) + 1):
        result.attempts = attempt
        request = prep.request if attempt == 1 else _retry_request(prep.request, attempt)
        try:
            raw = extractor.complete(request)
            # An extractor whose identity changed while answering (a hybrid source went down and its
            # fields fell back to their baseline: ``+down:`` in its id) is asked again, so the answer
            # kept was made wholly by what the id it is cached under names.
            changes = 0
            while (now := extractor.model_id) != result.backend:
                changes += 1
                if changes > 2:
                    raise BackendError(f"the backend's model id kept changing while answering (now {now})")
                result.backend = now
                raw = extractor.complete(request)
        except BackendError as exc:
            result.error = f"backend: {exc}"
            break
        except Exception as exc:  # a backend bug must not kill the batch: record it with its type
            result.error = f"backend: {type(exc).__name__}: {exc}"
            break
        result.raw = raw
        try:
            clothes, rfv, notes = parse_answer(raw, schema, prep.fields, prep.re_fields)
            item, issues = _item(prep.product, clothes, rfv, schema)
        except (AnswerError, ValidationError) as exc:
            errors.append(f"attempt {attempt}: {exc}".splitlines()[0])
            continue
        # The model's own values (parse_answer already normalised them), apart from the columns.
        normalised = {"clothes": clothes, "re": dict(item.reinforced_feature_value)}
        result.item, result.extracted = item, normalised
        result.issues = [*errors, *notes, *issues]
        result.status = "repaired" if (errors or notes or issues) else "ok"
        result.error = None
        result.raw = None  # kept only for error records: the item is the useful part
        break
    else:
        result.error = "; ".join(errors) or "no usable answer"
    result.seconds = round(time.perf_counter() - start, 4)
    return result


def _retry_request(request: ExtractionRequest, attempt: int) -> ExtractionRequest:
    """The same request marked as a retry (backends sample instead of decoding greedily)."""
    from dataclasses import replace

    return replace(request, context={**request.context, "attempt": attempt})
