from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from atelier.datasets import EvaluationError, build_queries, time_split
from atelier.evaluate import evaluate, write_report
from atelier.ingest import ingest
from atelier.recommend.baselines import (
    PopularityRecommender,
    RandomRecommender,
    RepurchaseRecommender,
    SegmentPopularityRecommender,
)
from atelier.recommender import Query, TrainData, fill, popular_items


def _inter(rows: list[tuple[str, str, str]], **extra: list[object]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"])
    frame["ts"] = pd.to_datetime(frame["ts"], format="mixed")
    for k, v in extra.items():
        frame[k] = v
    return frame


TINY = _inter([
    ("u1", "a", "2020-09-16"), ("u1", "b", "2020-09-17"), ("u2", "a", "2020-09-18"),
    ("u3", "c", "2020-09-18"), ("u2", "c", "2020-09-18 23:59:59"),
    ("u1", "d", "2020-09-19"), ("u1", "a", "2020-09-19"), ("u4", "c", "2020-09-20"),
])
ITEMS = pd.DataFrame({"item_id": list("abcde"), "title": list("ABCDE"), "description": "",
                      "group_id": list("abcde"), "price": 0.0})


def _data(train: pd.DataFrame, users: pd.DataFrame | None = None) -> TrainData:
    return TrainData("hm", ITEMS, train, users if users is not None else pd.DataFrame({"user_id": []}),
                     Path("/nonexistent"))


def test_split_boundaries_and_no_leakage() -> None:
    split = time_split("hm", TINY)
    assert split.train["ts"].max() < pd.Timestamp("2020-09-19") <= split.test["ts"].min()
    assert len(split.train) + len(split.test) == len(TINY)
    # The last second of the 18th is training; midnight of the 19th is test.
    assert "c" in set(split.train[split.train["user_id"] == "u2"]["item_id"])
    queries, actual = build_queries(split, pd.DataFrame({"user_id": []}))
    assert actual == {"u1": {"a", "d"}, "u4": {"c"}}
    by_user = {q.user_id: q for q in queries}
    assert by_user["u1"].history == ("a", "b")  # oldest first, training only
    assert by_user["u4"].history == ()
    assert not any("d" in q.history for q in queries)  # a test item never leaks into history


def test_split_errors() -> None:
    with pytest.raises(EvaluationError, match="leaves"):
        time_split("hm", TINY, cut="2021-01-01")
    with pytest.raises(EvaluationError, match="1 day"):
        time_split("shop", TINY[TINY["ts"] < "2020-09-17"])


def test_a_catalogue_without_rules_tests_on_its_last_fifth_of_days() -> None:
    """Any catalogue gets a default cut: 5 days of log -> the last day tests (a fifth, at least one)."""
    split = time_split("shop", TINY)
    assert split.cut == pd.Timestamp("2020-09-20") and split.source == "default cut"
    spread = TINY.assign(ts=TINY["ts"] + pd.to_timedelta(range(len(TINY)), unit="D"))
    assert time_split("shop", spread).cut == pd.Timestamp("2020-09-25")  # 8 distinct days -> the last 2 test


def test_popularity_and_repurchase_known_answers() -> None:
    train = time_split("hm", TINY).train
    assert popular_items(train) == ["a", "c", "b"]  # a:2, c:2 (tie by id), b:1
    # The day before the last training moment (09-18 23:59:59): a once, c twice.
    assert popular_items(train, window_days=1) == ["c", "a"]
    pop = PopularityRecommender(window_days=None).fit(_data(train))
    assert pop.recommend([Query("x")], 2) == [["a", "c"]]
    rep = RepurchaseRecommender(window_days=None).fit(_data(train))
    assert rep.recommend([Query("u1", history=("a", "b"))], 3) == [["b", "a", "c"]]


def test_random_is_seeded_and_distinct() -> None:
    rec = RandomRecommender(seed=3).fit(_data(TINY))
    first = rec.recommend([Query("x"), Query("y")], 4)
    assert first == RandomRecommender(seed=3).fit(_data(TINY)).recommend([Query("x"), Query("y")], 4)
    assert all(len(set(r)) == 4 for r in first)


def test_segment_popularity_uses_profile_and_context() -> None:
    train = _inter(
        [("p1", "gown", "2017-01-01"), ("p2", "gown", "2017-01-02"), ("p3", "tee", "2017-01-03"),
         ("p4", "tee", "2017-01-04"), ("p5", "tee", "2017-01-05")],
        occasion=["wedding", "wedding", "everyday", "everyday", "everyday"],
    )
    users = pd.DataFrame({"user_id": ["p1", "p2", "p3", "p4", "p5"],
                          "body_type": ["pear", "pear", "athletic", "athletic", "athletic"],
                          "height_cm": [160.0, 161.0, 175.0, 176.0, 177.0], "weight_kg": [60.0] * 5})
    data = TrainData("rtr", ITEMS, train, users, Path("/nonexistent"))
    ctx = SegmentPopularityRecommender("context", None, min_support=1, segment_window_days=None).fit(data)
    assert ctx.recommend([Query("n", context="Wedding"), Query("m")], 2) == [["gown", "tee"], ["tee", "gown"]]
    prof = SegmentPopularityRecommender("profile", None, min_support=1, segment_window_days=None).fit(data)
    new_pear = Query("n", profile={"body_type": "pear", "height_cm": 162.0, "weight_kg": 61.0})
    assert prof.recommend([new_pear], 2) == [["gown", "tee"]]
    with pytest.raises(ValueError, match="by must be"):
        SegmentPopularityRecommender("mood")


def test_fill_skips_duplicates_and_exclusions() -> None:
    assert fill(["a", "a", "b"], ["b", "c", "d"], 3, exclude=frozenset({"c"})) == ["a", "b", "d"]


def test_evaluate_writes_report_and_plots(tmp_path: Path) -> None:
    src = tmp_path / "custom"
    src.mkdir()
    ITEMS.to_csv(src / "items.csv", index=False)
    TINY.assign(ts=TINY["ts"].dt.strftime("%Y-%m-%d %H:%M:%S")).to_csv(src / "tx.csv", index=False)
    (src / "map.toml").write_text('name = "tiny"\n[items]\npath = "items.csv"\nitem_id = "item_id"\ntitle = "title"\n'
                                  '[interactions]\npath = "tx.csv"\nuser_id = "user_id"\nitem_id = "item_id"\n'
                                  'timestamp = "ts"\n')
    result = ingest("custom", src / "map.toml", tmp_path / "data")
    report = evaluate("tiny", result.out_dir, [PopularityRecommender(None), RepurchaseRecommender(None)],
                      tmp_path / "cache", cut="2020-09-19")
    models = report["models"]
    # popularity ranks a, c, b: u1 wants {a, d}: AP@12 = (1/1)/2 = 0.5; u4 wants {c}: AP = (1/2)/1 = 0.5
    assert models["popularity"]["cohorts"]["all"]["map@12"] == pytest.approx(0.5)
    # repurchase for u1: b, a, c, ...: a at rank 2 -> AP = (1/2)/2 = 0.25; u4 (no history) as popularity: 0.5
    assert models["repurchase+popularity"]["cohorts"]["with_history"]["map@12"] == pytest.approx(0.25)
    assert models["repurchase+popularity"]["cohorts"]["without_history"]["map@12"] == pytest.approx(0.5)
    # d is the only cold item (never in training) and nobody recommends it.
    assert models["popularity"]["cold_items"] == {"recall@12": 0.0, "recall@100": 0.0, "pairs": 1}
    path = write_report(report, tmp_path / "reports")
    assert json.loads(path.read_text())["split"]["test_users"] == 2
    assert (tmp_path / "reports" / "tiny_metrics.png").stat().st_size > 1000
    assert (tmp_path / "reports" / "tiny_cohorts.png").is_file()


def test_test_file_split_trains_on_everything_before_it(tmp_path: Path) -> None:
    from atelier.datasets import file_split

    items = pd.DataFrame({"item_id": ["0000000001", "0000000002", "0000000003"]})
    interactions = _inter([("u1", "0000000001", "2020-09-16"), ("u1", "0000000002", "2020-09-20"),
                           ("u2", "0000000003", "2020-09-21")])
    test_file = tmp_path / "transactions.csv"
    test_file.write_text("t_dat,customer_id,article_id,price,sales_channel_id\n"
                         "2020-09-21,u1,0000000003,0.05,2\n"
                         "2020-09-22,u3,0000000001,0.05,1\n"
                         "2020-09-22,u3,9999999999,0.05,1\n")
    split = file_split("hm", interactions, items, test_file)
    # Training = every ingested interaction before the file's first day (all five shared days for H&M).
    assert split.cut == pd.Timestamp("2020-09-21")
    assert list(split.train["item_id"]) == ["0000000001", "0000000002"]
    assert len(split.test) == 2 and "1 rows rejected" in split.source
    with pytest.raises(EvaluationError, match="no ingested interaction precedes"):
        file_split("hm", interactions[interactions["ts"] > "2020-09-21"], items, test_file)


def test_repurchase_first_shares_a_fitted_model() -> None:
    from atelier.pipeline.suites import _select
    from atelier.recommender import RepurchaseFirst

    train = time_split("hm", TINY).train
    pop = PopularityRecommender(window_days=None)
    wrapper = RepurchaseFirst(pop, shared=True)
    assert wrapper.name == "repurchase+popularity"
    pop.fit(_data(train))
    wrapper.fit(_data(train))
    assert wrapper.recommend([Query("u1", history=("a", "b"))], 3) == [["b", "a", "c"]]
    # Chosen without its base, the wrapper fits the base itself.
    alone = _select([pop, wrapper], ["repurchase+popularity"])
    assert alone == [wrapper] and not wrapper.shared


def test_chain_source_recall_scores_each_source_and_the_union() -> None:
    """Each source is cut at its own k with the cart's items removed; the union counts every candidate."""
    from atelier.evaluate import CandidateLister, chain_source_recall

    class Lister:
        asked = 0

        def candidate_lists(self, queries: list[Query]) -> dict[str, list[list[str]]]:
            self.asked += 1
            near = [[f"n{i}" for i in range(300)] for _ in queries]  # the bought item sits at rank 120
            own = [["cart", "a"] for _ in queries]
            return {"union": [n + o for n, o in zip(near, own, strict=True)], "near": near, "own": own}

    lister = Lister()
    assert isinstance(lister, CandidateLister)
    queries = [Query("u1", cart=("cart",)), Query("u2"), Query("u3", history=("x",))]
    actual = {"u1": {"n120", "a"}, "u2": {"zzz"}, "u3": {"n0"}}
    out = chain_source_recall(lister, {"cart": (queries, actual, [True, True, False]),
                                       "history": (queries, actual, [False, False, True]),
                                       "empty": (queries, actual, [False, False, False])})
    assert lister.asked == 1  # one list of queries: its candidates are asked for once
    assert set(out) == {"union", "near", "own"} and set(out["near"]) == {"cart", "history"}
    assert out["near"]["history"]["recall@50"] == 1.0 and out["own"]["history"]["recall@200"] == 0.0
    assert out["near"]["cart"]["recall@100"] == 0.0 and out["near"]["cart"]["recall@200"] == 0.25
    assert out["own"]["cart"]["recall@50"] == 0.25  # "a" for u1 (1 of 2), nothing for u2
    assert out["union"]["cart"]["recall@all"] == 0.5
    assert out["union"]["cart"]["candidates"] == 301.5  # u1's cart item is not a candidate for u1
