"""Attribute-level explanations: the STD values a recommended item shares with the shopper's cart, history
and context (the context's values come from ``atelier.schema.context``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from atelier.schema import UNKNOWN
from atelier.schema.context import EXPLAIN_FIELDS
from atelier.serve.schemas import Explanation, SharedAttribute


def attribute_sets(items: Sequence[Mapping[str, object]]) -> dict[str, set[str]]:
    """Union of the explainable STD values of several item JSON dicts, per field."""
    out: dict[str, set[str]] = {}
    for item in items:
        clothes = item.get("clothes") or {}
        assert isinstance(clothes, dict), "item JSON 'clothes' must be an object"
        for name in EXPLAIN_FIELDS:
            for value in clothes.get(name) or []:
                if value != UNKNOWN:
                    out.setdefault(name, set()).add(value)
    return out


def label(field: str, value: str) -> str:
    """A shopper-readable value: K-Fashion category ids lose their group prefix."""
    if field == "category" and "_" in value:
        return value.split("_", 1)[1].lstrip("0123456789")
    return value


def shared_attributes(
    item: Mapping[str, object],
    sources: Mapping[str, Mapping[str, set[str]]],
) -> list[SharedAttribute]:
    """STD values of ``item`` found in each source (``cart`` first, then ``history``, ``context``)."""
    clothes = item.get("clothes") or {}
    assert isinstance(clothes, dict), "item JSON 'clothes' must be an object"
    out: list[SharedAttribute] = []
    for name in EXPLAIN_FIELDS:
        for value in clothes.get(name) or []:
            for source in ("cart", "history", "context"):
                if value in sources.get(source, {}).get(name, set()):
                    out.append(SharedAttribute(field=name, value=value, source=source))
                    break
    return out


def explain(stage: str, stage_reason: str, item: Mapping[str, object],
            sources: Mapping[str, Mapping[str, set[str]]]) -> Explanation:
    """The explanation of one recommended item: the stage's reason plus the attributes it shares."""
    shared = shared_attributes(item, sources)
    if shared:
        by_source: dict[str, list[str]] = {}
        for s in shared:
            by_source.setdefault(s.source, []).append(f"{s.field.split('.')[-1]} {label(s.field, s.value)}")
        parts = [f"shares {', '.join(v)} with your {src}" for src, v in by_source.items()]
        reason = f"{stage_reason}; " + "; ".join(parts)
    else:
        reason = stage_reason
    return Explanation(reason=reason, shared=shared)
