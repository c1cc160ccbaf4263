"""Explanations: the STD values a recommended item shares with the shopper's cart, history and context (the
context's values come from ``atelier.schema.context``), and one plain sentence per item from the strongest
signal that is true for this shopper.

``plain_reason`` picks, in order: another colour of an item in the cart (or of one bought or viewed), the item
itself bought or viewed before, then what the candidate source or stage found (often bought together, new in
near the shopper's items, popular in its category, popular for the named occasion or build, popular overall,
similar to the shopper's items with the values it shares, matching what they asked for, their profile).
An anonymous shopper's history is what they looked at, never what they bought. The model's detail (stage,
source, the stage's own words, shared values) stays in structured fields.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from atelier.schema import UNKNOWN, load_schema
from atelier.schema.context import EXPLAIN_FIELDS
from atelier.serve.schemas import Explanation, SharedAttribute

Doc = Mapping[str, Any]  # a stored item JSON

# Shared values worth saying out loud after "also" (category is already in the noun, gender says nothing).
TOLD_FIELDS = ("color", "print", "fiber_composition", "style", "fit", "detail", "top.sleeve_length_type",
               "top.neck_color_design", "dress.length_type", "bottom.length_type")


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
            sources: Mapping[str, Mapping[str, set[str]]], source: str | None = None) -> Explanation:
    """The model's side of one item's explanation: stage, candidate source (``Scored.source``), the stage's
    words and the shared values. ``reason`` is the stage's words until ``plain_reason`` (which needs the
    shopper) replaces it."""
    return Explanation(reason=stage_reason, stage=stage, source=source, detail=stage_reason,
                       shared=shared_attributes(item, sources))


# --- plain words ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shopper:
    """What a sentence may say about the shopper."""

    cart: Mapping[str, Doc] = field(default_factory=dict)  # cart item id -> item JSON, in cart order
    history: Mapping[str, Doc] = field(default_factory=dict)  # recent history item id -> item JSON, oldest first
    history_ids: frozenset[str] = frozenset()  # the whole history: purchases of a known customer and views
    bought_ids: frozenset[str] = frozenset()  # the part of it a known customer bought (empty when anonymous)
    context: str | None = None  # what the shopper asked for in words
    window_days: float | None = None  # the popularity window

    def seen(self, item_ids: frozenset[str] | None = None) -> str:
        """What the shopper did with these history items (default: all): "bought", "looked at" or both."""
        ids = self.history_ids if item_ids is None else item_ids
        bought = ids & self.bought_ids
        return "bought" if bought == ids else "looked at" if not bought else "bought and looked at"


@lru_cache(maxsize=1)
def _category_nouns() -> dict[str, str]:
    """Category id -> the word a shop uses: its first synonym in the schema ("bikini top"), else its label."""
    spec = load_schema().std["category"]
    out = {value: label("category", value) for value in spec.values}
    for synonym, value in reversed(list(spec.synonyms.items())):  # the first synonym listed wins
        out[value] = synonym
    return out


def noun(doc: Doc | None) -> str:
    """What to call an item in a sentence: its category's word ("dress"), else "item"."""
    categories = ((doc or {}).get("clothes") or {}).get("category") or []
    known = [c for c in categories if c != UNKNOWN]
    return _category_nouns().get(known[0], "item") if known else "item"


def plural(word: str) -> str:
    """English plural of a category word, enough for the schema's nouns."""
    if word.endswith(("wear", "ery", "s")) and not word.endswith("ss"):
        return word
    return word + ("es" if word.endswith(("ss", "sh", "ch", "x")) else "s")


def window_words(days: float | None) -> str:
    """" this week" for a popularity window of up to 7 days, " this month" up to 31, else nothing."""
    if days is None:
        return ""
    return " this week" if days <= 7 else " this month" if days <= 31 else ""


def _group(doc: Doc | None) -> str | None:
    group = ((doc or {}).get("service") or {}).get("group_id")
    return str(group) if group else None


def seeds_words(shopper: Shopper) -> str:
    """The shopper's items as a sentence names them: "the dress in your cart", "what you looked at"."""
    seen = f"what you {shopper.seen()}"
    if shopper.cart and shopper.history_ids:
        return f"your cart and {seen}"
    if len(shopper.cart) == 1:
        return f"the {noun(next(iter(shopper.cart.values())))} in your cart"
    nouns = {noun(doc) for doc in shopper.cart.values()}
    if len(nouns) == 1 and "item" not in nouns:
        return f"the {plural(nouns.pop())} in your cart"
    if shopper.cart:
        return "the items in your cart"
    return seen


def _also(shared: Sequence[SharedAttribute], source: str) -> str:
    told = [label(s.field, s.value) for s in shared if s.source == source and s.field in TOLD_FIELDS]
    return f", also {', '.join(dict.fromkeys(told[:3]))}" if told else ""


def plain_reason(item_id: str, item: Doc, explanation: Explanation, shopper: Shopper) -> tuple[str, str]:
    """One short sentence (and the signal it rests on) from the strongest signal true for this shopper; the
    signals are listed in the module's docstring."""
    group = _group(item)
    if group:
        for seed, doc in shopper.cart.items():
            if seed != item_id and _group(doc) == group:
                return f"another colour of the {noun(doc)} in your cart", "colourway"
        for seed, doc in reversed(list(shopper.history.items())):
            if seed != item_id and _group(doc) == group:
                return f"another colour of the {noun(doc)} you {shopper.seen(frozenset({seed}))}", "colourway"
    if item_id in shopper.history_ids:
        return ("you bought it before" if item_id in shopper.bought_ids else "you looked at it recently"), "own"
    source, stage, shared = explanation.source, explanation.stage, explanation.shared
    when = window_words(shopper.window_days)
    if source == "co-bought":
        return f"often bought with {seeds_words(shopper)}", "co-bought"
    if source is not None and source.startswith("new:"):
        return f"new in: close to {seeds_words(shopper)}", "new"
    if source == "category-popularity":
        return f"popular{when} in {plural(noun(item))}", "category-popularity"
    if source == "occasion-popularity" or (stage == "popularity" and "popular for '" in explanation.detail):
        occasion = re.search(r"popular for '([^']+)'", explanation.detail)
        return (f"popular for {occasion.group(1)}" if occasion else "popular for the occasion you named",
                "occasion-popularity")
    if source == "profile-popularity" or (stage == "popularity" and "your build" in explanation.detail):
        return "popular with shoppers of your build", "profile-popularity"
    if stage == "popularity" or source == "popularity":
        return f"popular{when}", "popularity"
    if stage == "ranked" and not (source or "").startswith("near:"):  # a source not known here: claim nothing
        return "picked for you", "ranked"
    # similar: a vector source, the content stage, the two-tower stage
    if shopper.cart or shopper.history_ids:
        where = "cart" if shopper.cart else "history"
        return f"similar to {seeds_words(shopper)}{_also(shared, where)}", "similar"
    asked = [label(s.field, s.value) for s in sorted(shared, key=lambda s: s.field == "category")
             if s.source == "context"]  # "black dress": the kind last
    if asked:
        return f"matches what you asked for: {' '.join(dict.fromkeys(asked))}", "context"
    if shopper.context:
        return "close to what you asked for", "context"
    return "picked for your profile", "profile"
