"""Candidate sources and the rule set on a log small enough to know every answer."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from atelier.datasets import Split, cart_queries
from atelier.recommend.sources import CoBought, Colourways, OwnItems, Popular, RulesRecommender
from atelier.recommender import Query, TrainData

D1, D2, D3 = (pd.Timestamp(f"2020-09-{d}") for d in (16, 17, 18))


def _data() -> TrainData:
    items = pd.DataFrame({"item_id": ["a", "a2", "a3", "b", "c", "d", "e"],
                          "group_id": ["g1", "g1", "g1", "gb", "gc", "gd", "ge"], "title": "", "description": ""})
    log = pd.DataFrame([
        ("u1", "a", D1), ("u1", "b", D1),  # a and b bought together by two customers
        ("u2", "a", D1), ("u2", "b", D1), ("u2", "c", D1),
        ("u3", "a", D2), ("u3", "d", D3),  # a and d by the same customer, on different days: not together
        ("u4", "a3", D3), ("u5", "a3", D3), ("u6", "d", D3), ("u7", "d", D3),
    ], columns=["user_id", "item_id", "ts"])
    return TrainData("toy", items, log, pd.DataFrame({"user_id": sorted(set(log["user_id"]))}), Path("."))


def _ids(cands: list[tuple[str, float]]) -> list[str]:
    return [item for item, _ in cands]


def test_each_source_on_a_known_log() -> None:
    data = _data()
    q = Query("u", history=("c", "a"))  # bought c, then a
    own, colour, co, pop = (s.fit(data) for s in (OwnItems(None), Colourways(None), CoBought(None), Popular(None)))
    assert _ids(own.candidates([q], 10)[0]) == ["a", "c"]
    assert _ids(colour.candidates([q], 10)[0]) == ["a3", "a2"]  # a's colourways, most bought first
    assert co.candidates([q], 10)[0] == [("b", 3.0)]  # b with a (u1, u2) and with c (u2); never a seed
    assert _ids(pop.candidates([q], 3)[0]) == ["a", "d", "a3"]  # a 4, d 3, a3 2 (ties by all-time sales, id)
    cart = Query("new", cart=("a",))
    assert _ids(own.candidates([cart], 10)[0]) == []  # a cart is not a purchase
    assert _ids(colour.candidates([cart], 10)[0]) == ["a3", "a2"]


def test_popularity_window_counts_only_recent_days() -> None:
    pop = Popular(window_days=1).fit(_data())
    assert _ids(pop.candidates([Query("u")], 2)[0]) == ["d", "a3"]  # the last day: d 3, a3 2


def test_rules_chain_own_colourways_cobought_popularity() -> None:
    rules = RulesRecommender(None).fit(_data())
    assert rules.recommend([Query("u", history=("c", "a"))], 6) == [["a", "c", "a3", "a2", "b", "d"]]
    assert rules.recommend([Query("new", cart=("b",))], 4) == [["a", "c", "d", "a3"]]  # co-bought, then popular


def test_cart_cohort_definition() -> None:
    test = pd.DataFrame([
        ("old", "x", D3 + pd.Timedelta(days=1)), ("old", "y", D3 + pd.Timedelta(days=1)),  # has history
        ("n1", "y", D3 + pd.Timedelta(days=1)), ("n1", "x", D3 + pd.Timedelta(days=1)),  # cart y, truth {x, z}
        ("n1", "z", D3 + pd.Timedelta(days=2)),
        ("n2", "x", D3 + pd.Timedelta(days=1)), ("n2", "x", D3 + pd.Timedelta(days=1)),  # one distinct item
        ("n3", "x", D3 + pd.Timedelta(days=1)), ("n3", "y", D3 + pd.Timedelta(days=2)),  # two days, one each
    ], columns=["user_id", "item_id", "ts"])
    split = Split("toy", _data().interactions.assign(user_id=lambda f: f["user_id"].replace("u1", "old")),
                  test, D3 + pd.Timedelta(days=1), "test")
    queries, actual = cart_queries(split)
    assert [(q.user_id, q.cart, q.history, q.context) for q in queries] == [("n1", ("y",), (), None)]
    assert actual == {"n1": {"x", "z"}}
