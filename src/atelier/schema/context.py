"""STD values named in free text: a shopper's context ("a black maxi dress for a wedding") read against the
schema's own values and synonyms (word n-grams, longest first): ``color=black``,
``category=04onepiece_01dress``, ``occasion=wedding``, with no model call and no list of words in code.
"""

from __future__ import annotations

import re
from functools import lru_cache

from atelier.schema import UNKNOWN, load_schema

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
