"""Attribute-level explanations: STD values found in a context text, and values a recommended item
shares with the shopper's cart, history and context.

Context keywords are matched against the schema's own values and synonyms (word n-grams, longest
first), so "a black maxi dress for a wedding" yields ``color=black``, ``category=04onepiece_01dress``,
``occasion=wedding`` with no model call and no list of words in code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache

from atelier.schema import UNKNOWN, load_schema
from atelier.serve.schemas import Explanation, SharedAttribute

# Fields whose shared values mean something to a shopper. Gender is left out: nearly every item
# shares it with the cart, which would make it noise in every explanation.
EXPLAIN_FIELDS = (
    "category", "color", "print", "fiber_composition", "style", "occasion", "fit", "detail",
    "top.sleeve_length_type", "top.neck_color_design", "dress.length_type", "bottom.length_type", "season",
)
MAX_NGRAM = 3  # the longest synonyms in the schema are three words ("down jacket", "v neck collar")
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


@lru_cache(maxsize=1024)
def context_attributes(text: str) -> dict[str, list[str]]:
    """STD values named in a free-text context (longest n-gram wins, each word used once)."""
    schema = load_schema()
    words = _WORD.findall(text.lower())
    used = [False] * len(words)
    found: dict[str, list[str]] = {}
    for n in range(MAX_NGRAM, 0, -1):
        for start in range(len(words) - n + 1):
            if any(used[start : start + n]):
                continue
            phrase = " ".join(words[start : start + n])
            for name in EXPLAIN_FIELDS:
                spec = schema.std.get(name)
                value = spec.normalise(phrase) if spec else None
                if value is None or value == UNKNOWN:
                    continue
                if value not in found.setdefault(name, []):
                    found[name].append(value)
                used[start : start + n] = [True] * n
                break
    return {name: values for name, values in found.items() if values}


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
