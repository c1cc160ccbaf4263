"""Plain-language reasons (``atelier.serve.explain``): one true sentence per item from its strongest signal."""

from __future__ import annotations

from typing import Any

import pytest

from atelier.recommend.chain import REASONS, reason_for
from atelier.recommender import Query
from atelier.serve.explain import Shopper, explain, plain_reason, plural
from atelier.serve.schemas import Explanation, SharedAttribute


def doc(category: str, color: str, group: str) -> dict[str, Any]:
    """A stored item JSON with the fields the sentences read."""
    return {"clothes": {"category": [category], "color": [color]}, "service": {"group_id": group}}


DRESS = doc("04onepiece_01dress", "black", "g-dress")
TROUSERS = doc("03bottom_02pants", "beige", "g-trousers")
KNIT = doc("02top_04knitwear", "gray", "g-knit")
SHOPPERS = [Query("", cart=("c",)), Query("", history=("h",), cart=("c",)), Query("", history=("h",))]


def ranked(source: str | None, **shared: str) -> Explanation:
    """The explanation the service builds for an item the ranked stage took from ``source``."""
    sentence = reason_for(source, SHOPPERS[0])
    out = explain("ranked", sentence, {}, {}, source=source)
    out.shared = [SharedAttribute(field=f, value=v, source="cart") for f, v in shared.items()]
    return out


def cart_of(**items: dict[str, Any]) -> Shopper:
    return Shopper(cart=items, window_days=3.0)


def test_every_ranked_source_has_a_sentence() -> None:
    # each source the chain can name gets a sentence of its own, never the catch-all ("own" and "colourways"
    # are told from the shopper's own items: see the colourway tests)
    for source in (s for s in REASONS if s not in (None, "own", "colourways")):
        reason, signal = plain_reason("k", KNIT, ranked(source), cart_of(t1=TROUSERS))
        assert signal != "ranked" and reason != "picked for you", source
    unknown = explain("ranked", "a sentence the chain may say one day", {}, {}, source="a-source-not-known-here")
    assert plain_reason("k", KNIT, unknown, cart_of(t1=TROUSERS)) == ("picked for you", "ranked")


def test_colourway_of_a_cart_item_comes_first() -> None:
    red_dress = doc("04onepiece_01dress", "red", "g-dress")
    reason, signal = plain_reason("d2", red_dress, ranked("co-bought"), cart_of(d1=DRESS))
    assert (reason, signal) == ("another colour of the dress in your cart", "colourway")
    # the item itself is never its own colourway
    assert plain_reason("d1", DRESS, ranked("own"), Shopper(history={"d1": DRESS}, history_ids=frozenset({"d1"}),
                                                            bought_ids=frozenset({"d1"})))[0] == "you bought it before"


def test_sources_in_words() -> None:
    shopper = cart_of(t1=TROUSERS)
    assert plain_reason("k", KNIT, ranked("co-bought"), shopper)[0] == "often bought with the pants in your cart"
    assert plain_reason("k", KNIT, ranked("new:item_tower"), shopper)[0] == "new in: close to the pants in your cart"
    assert plain_reason("k", KNIT, ranked("category-popularity"), shopper)[0] == "popular this week in knitwear"
    assert plain_reason("k", DRESS, ranked("category-popularity"), shopper)[0] == "popular this week in dresses"
    assert plain_reason("k", KNIT, ranked("popularity"), shopper)[0] == "popular this week"
    similar = plain_reason("k", KNIT, ranked("near:item_tower", color="gray", category="02top_04knitwear"), shopper)
    assert similar == ("similar to the pants in your cart, also gray", "similar")
    two = Shopper(cart={"t1": TROUSERS, "t2": TROUSERS}, window_days=30)
    assert plain_reason("k", KNIT, ranked("co-bought"), two)[0] == "often bought with the pants in your cart"
    assert plain_reason("k", KNIT, ranked("popularity"), two)[0] == "popular this month"


def test_an_anonymous_shopper_is_never_told_what_they_bought() -> None:
    viewed = Shopper(history={"t1": TROUSERS}, history_ids=frozenset({"t1", "x"}), window_days=3.0)
    sentences = [plain_reason("k", KNIT, ranked(source), viewed)[0] for source in REASONS]
    sentences += [plain_reason("x", KNIT, ranked("own"), viewed)[0],
                  plain_reason("t2", doc("03bottom_02pants", "navy", "g-trousers"), ranked(None), viewed)[0]]
    assert "you looked at it recently" in sentences and "another colour of the pants you looked at" in sentences
    assert "often bought with what you looked at" in sentences
    assert not [s for s in sentences if "you bought" in s or "purchase" in s], sentences
    # a known customer: purchases are purchases, views stay views
    known = Shopper(history={"t1": TROUSERS}, history_ids=frozenset({"t1", "x"}), bought_ids=frozenset({"t1"}))
    assert plain_reason("t1", TROUSERS, ranked("own"), known)[0] == "you bought it before"
    assert plain_reason("x", KNIT, ranked("own"), known)[0] == "you looked at it recently"
    assert plain_reason("k", KNIT, ranked("co-bought"), known)[0] == "often bought with what you bought and looked at"


@pytest.mark.parametrize(("stage", "detail", "expected"), [
    ("popularity", "popular for 'wedding' over the last 90 days", "popular for wedding"),
    ("popularity", "popular with shoppers of your build over the last 90 days", "popular with shoppers of your build"),
    ("popularity", "among the most bought items of the last 3 days", "popular this week"),
    ("two_tower", "the two-tower retriever's pick for your profile", "picked for your profile"),
])
def test_stages_without_a_source(stage: str, detail: str, expected: str) -> None:
    explanation = explain(stage, detail, {}, {})
    assert plain_reason("k", KNIT, explanation, Shopper(window_days=3.0))[0] == expected
    assert explanation.stage == stage and explanation.source is None and explanation.detail == detail


def test_context_only() -> None:
    asked = explain("content", "close to your context in the item tower's space", DRESS,
                    {"context": {"color": {"black"}, "category": {"04onepiece_01dress"}}})
    shopper = Shopper(context="a black dress for a party")
    assert plain_reason("d", DRESS, asked, shopper)[0] == "matches what you asked for: black dress"
    nothing = explain("content", "close to your context in the item tower's space", KNIT, {})
    assert plain_reason("k", KNIT, nothing, shopper)[0] == "close to what you asked for"


def test_plural() -> None:
    assert [plural(w) for w in ("dress", "bikini top", "knitwear", "jeans", "jewellery", "coat")] == [
        "dresses", "bikini tops", "knitwear", "jeans", "jewellery", "coats"]
