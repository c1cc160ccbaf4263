"""Keyword/synonym rules: STD values from text by matching the schema's values, labels and synonyms.

No model: the longest term of a field found in the text wins (ties: the later one, since English
puts the head noun last: "Navy Blue Shirt", "Jersey top"). It is the non-LLM baseline of the
extraction benchmark and the brain of the deterministic fake backend.
"""

from __future__ import annotations

import re
from typing import Any

from atelier.enrich.prompt import label_maps
from atelier.schema import Schema, normalise_text

__all__ = ["keyword_values"]

_MEMO: dict[int, tuple[Schema, dict[str, list[tuple[re.Pattern[str], int, str]]]]] = {}


def _patterns(schema: Schema) -> dict[str, list[tuple[re.Pattern[str], int, str]]]:
    """Per field: (word-boundary pattern, term length, allowed value), longest terms first."""
    hit = _MEMO.get(id(schema))
    if hit is not None and hit[0] is schema:
        return hit[1]
    labels = label_maps(schema)
    out: dict[str, list[tuple[re.Pattern[str], int, str]]] = {}
    for name, spec in schema.std.items():
        terms: dict[str, str] = {}
        for value in spec.values:
            if "_" not in value:  # numbered ids ("02top_06tshirt") never occur in text
                terms[value] = value
        terms.update({alias: target for alias, target in spec.synonyms.items()})
        terms.update(labels[name])
        pats = [(re.compile(rf"(?<![a-z]){re.escape(t)}(?:s|es)?(?![a-z])"), len(t), v) for t, v in terms.items()
                if len(t) > 1]
        out[name] = sorted(pats, key=lambda p: -p[1])
    _MEMO[id(schema)] = (schema, out)
    return out


def keyword_values(text: str, schema: Schema, fields: list[str] | None = None) -> dict[str, str]:
    """Per field (default all STD fields), the allowed value whose term best matches ``text``."""
    low = normalise_text(text)
    out: dict[str, str] = {}
    for name, pats in _patterns(schema).items():
        if fields is not None and name not in fields:
            continue
        best: tuple[int, int, Any] | None = None
        for pat, length, value in pats:
            if best is not None and length < best[0]:
                break  # sorted by length: nothing shorter can win
            for m in pat.finditer(low):
                if best is None or (length, m.start()) > (best[0], best[1]):
                    best = (length, m.start(), value)
        if best is not None:
            out[name] = best[2]
    return out
