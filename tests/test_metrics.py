"""Hand-computed checks for atelier.metrics; each expected value has its arithmetic beside it."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Sequence

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atelier.metrics import (
    average_precision_at_k,
    cold_item_recall,
    coverage,
    dedupe,
    hit_rate_at_k,
    ndcg_at_k,
    recall_at_k,
    score_users,
    summarise,
)

Metric = Callable[[Collection[str], Sequence[str], int], float]

MISSES = [f"x{i}" for i in range(200)]


def test_dedupe_keeps_first_occurrence_order() -> None:
    assert dedupe(["b", "a", "b", "c", "a"]) == ["b", "a", "c"]
    assert dedupe([]) == []


# --- MAP@12, Kaggle H&M edge cases -------------------------------------------------------


def test_ap_fewer_than_k_relevant() -> None:
    # hits at positions 1 and 3: P(1) = 1/1, P(3) = 2/3; denominator min(3, 12) = 3
    # AP = (1 + 2/3) / 3 = 5/9
    assert average_precision_at_k({"a", "b", "c"}, ["a", "x", "b", "y"]) == pytest.approx(5 / 9)


def test_ap_more_than_k_relevant_uses_k_as_denominator() -> None:
    actual = {f"r{i}" for i in range(20)}
    # hits at positions 1 and 3: (1/1 + 2/3) = 5/3; denominator min(20, 12) = 12 -> 5/36
    assert average_precision_at_k(actual, ["r0", "x", "r1"]) == pytest.approx(5 / 36)
    # twelve hits in twelve slots: each P(i) = 1, sum 12, / 12 = 1 (not 12/20)
    assert average_precision_at_k(actual, [f"r{i}" for i in range(12)]) == pytest.approx(1.0)


def test_ap_duplicates_count_once() -> None:
    # distinct predictions [a, b]: P(1) = 1/1, P(2) = 2/2; / min(2, 12) = 2 -> (1 + 1) / 2 = 1
    # (if the repeat took slot 2, b would sit at 3: (1 + 2/3) / 2 = 5/6)
    assert average_precision_at_k({"a", "b"}, ["a", "a", "b"]) == pytest.approx(1.0)
    # a repeated *hit* is not scored twice: distinct [a, x] -> 1/1 / min(2, 12) = 1/2
    assert average_precision_at_k({"a", "b"}, ["a", "a", "a", "x"]) == pytest.approx(0.5)


def test_ap_duplicates_do_not_consume_a_slot() -> None:
    # raw list: x0, x0, x1..x10, a  -> 13 entries but only 12 distinct, a is distinct position 12
    # AP = P(12) / min(1, 12) = (1/12) / 1 = 1/12
    predicted = ["x0", "x0", *MISSES[1:11], "a"]
    assert len(predicted) == 13
    assert average_precision_at_k({"a"}, predicted) == pytest.approx(1 / 12)


def test_ap_empty_predictions_is_zero() -> None:
    assert average_precision_at_k({"a"}, []) == 0.0


def test_relevant_item_at_position_13_does_not_count() -> None:
    predicted = [*MISSES[:12], "a"]
    # a is at position 13 > 12: no hits in the top 12
    assert average_precision_at_k({"a"}, predicted) == 0.0
    assert recall_at_k({"a"}, predicted, 12) == 0.0
    assert ndcg_at_k({"a"}, predicted, 12) == 0.0
    assert hit_rate_at_k({"a"}, predicted, 12) == 0.0
    # ... but it does at k = 13: P(13) = 1/13, / min(1, 13) = 1/13
    assert average_precision_at_k({"a"}, predicted, k=13) == pytest.approx(1 / 13)
    assert recall_at_k({"a"}, predicted, 13) == 1.0


def test_ap_actual_is_treated_as_a_set() -> None:
    # actual ["a", "a"] is {a}: AP = (1/1) / min(1, 12) = 1 rather than 1/2
    assert average_precision_at_k(["a", "a"], ["a"]) == pytest.approx(1.0)


# --- other metrics ----------------------------------------------------------------------


def test_perfect_ranking_scores_one() -> None:
    actual = {"a", "b", "c"}
    predicted = ["c", "a", "b", "x", "y"]
    assert average_precision_at_k(actual, predicted, 12) == pytest.approx(1.0)
    assert ndcg_at_k(actual, predicted, 12) == pytest.approx(1.0)
    assert recall_at_k(actual, predicted, 12) == pytest.approx(1.0)
    assert hit_rate_at_k(actual, predicted, 12) == 1.0


def test_recall_at_100_versus_12() -> None:
    # a at position 1, b at 50, c at 101, d never
    predicted = ["a", *MISSES[:48], "b", *MISSES[48:98], "c"]
    assert predicted.index("b") == 49 and predicted.index("c") == 100
    actual = {"a", "b", "c", "d"}
    assert recall_at_k(actual, predicted, 12) == pytest.approx(1 / 4)  # {a}
    assert recall_at_k(actual, predicted, 100) == pytest.approx(2 / 4)  # {a, b}
    assert recall_at_k(actual, predicted, 101) == pytest.approx(3 / 4)  # {a, b, c}


def test_recall_counts_duplicates_once() -> None:
    # distinct top 2 = [a, x] -> |{a}| / |{a, b}| = 1/2
    assert recall_at_k({"a", "b"}, ["a", "a", "x", "b"], 2) == pytest.approx(0.5)


def test_ndcg_hand_value() -> None:
    # hits at positions 2 and 4: DCG = 1/log2(3) + 1/log2(5)
    # ideal: min(2, 12) = 2 hits at positions 1, 2: IDCG = 1/log2(2) + 1/log2(3) = 1 + 1/log2(3)
    expected = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k({"a", "b"}, ["x", "a", "y", "b"], 12) == pytest.approx(expected)
    assert expected == pytest.approx(0.6509209298071326)


def test_ndcg_ideal_is_capped_at_k() -> None:
    actual = {f"r{i}" for i in range(5)}
    # k = 2, hit at position 2 only: DCG = 1/log2(3); IDCG over min(5, 2) = 2 hits = 1 + 1/log2(3)
    expected = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(actual, ["x", "r3", "r4"], 2) == pytest.approx(expected)


def test_hit_rate() -> None:
    assert hit_rate_at_k({"a"}, ["x", "y", "a"], 3) == 1.0
    assert hit_rate_at_k({"a"}, ["x", "y", "a"], 2) == 0.0
    # duplicates don't use up slots: distinct top 2 = [x, a]
    assert hit_rate_at_k({"a"}, ["x", "x", "a"], 2) == 1.0
    assert hit_rate_at_k({"a"}, [], 12) == 0.0


@pytest.mark.parametrize("metric", [average_precision_at_k, recall_at_k, ndcg_at_k, hit_rate_at_k])
def test_empty_actual_raises(metric: Metric) -> None:
    with pytest.raises(ValueError, match="actual is empty"):
        metric(set(), ["a"], 12)


@pytest.mark.parametrize("metric", [average_precision_at_k, recall_at_k, ndcg_at_k, hit_rate_at_k])
def test_non_positive_k_raises(metric: Metric) -> None:
    with pytest.raises(ValueError, match="k must be"):
        metric({"a"}, ["a"], 0)


# --- catalogue-level metrics ------------------------------------------------------------


def test_coverage_by_hand() -> None:
    predicted = {"u1": ["a", "b", "c"], "u2": ["a", "a", "d"]}
    # k=2: u1 -> {a, b}; u2 distinct top 2 -> {a, d}; union {a, b, d} = 3 of 10
    assert coverage(predicted, catalogue_size=10, k=2) == pytest.approx(0.3)
    # k=3: u1 -> {a, b, c}; u2 -> {a, d}; union {a, b, c, d} = 4 of 10
    assert coverage(predicted, catalogue_size=10, k=3) == pytest.approx(0.4)
    assert coverage({}, catalogue_size=10) == 0.0


def test_coverage_rejects_ids_outside_catalogue() -> None:
    with pytest.raises(ValueError):
        coverage({"u1": ["a", "b", "c"]}, catalogue_size=2, k=3)


def test_cold_item_recall_by_hand() -> None:
    cold = {"c1", "c2", "c3"}
    actual = {
        "u1": {"c1", "c2", "w"},  # cold pairs (u1, c1), (u1, c2)
        "u2": {"c3"},  # cold pair (u2, c3); u2 has no predictions
        "u3": {"w"},  # no cold pairs
    }
    predicted = {"u1": ["c1", "x", "c2"], "u3": ["w"]}
    # k=2: u1 top {c1, x} finds c1 only; u2 finds nothing -> 1 found of 3 pairs
    assert cold_item_recall(actual, predicted, cold, k=2) == pytest.approx(1 / 3)
    # k=3: u1 top {c1, x, c2} finds c1 and c2 -> 2 of 3 (micro-average, not mean of 1 and 0)
    assert cold_item_recall(actual, predicted, cold, k=3) == pytest.approx(2 / 3)


def test_cold_item_recall_without_cold_pairs_is_nan() -> None:
    assert math.isnan(cold_item_recall({"u1": {"w"}}, {"u1": ["w"]}, {"c1"}, k=12))


# --- score_users / summarise ------------------------------------------------------------


def test_score_users_shape_columns_and_missing_predictions() -> None:
    actual = {"u1": {"a", "b"}, "u2": {"c"}, "u3": set(), "u4": ["a"]}
    predicted = {"u1": ["x", "a", "y", "b"], "u3": ["a"], "u4": ["a"], "ghost": ["a"]}
    df = score_users(actual, predicted)

    assert list(df.columns) == ["map@12", "recall@12", "ndcg@12", "hitrate@12", "recall@100"]
    assert df.index.name == "user_id"
    # u3 has no test items and is dropped; "ghost" is not in actual; u2 has no predictions
    assert list(df.index) == ["u1", "u2", "u4"]
    assert df.shape == (3, 5)
    assert (df.loc["u2"] == 0.0).all()
    assert (df.loc["u4"] == 1.0).all()
    # u1: AP = (1/2 + 2/4) / 2 = 1/2; ndcg as in test_ndcg_hand_value
    assert df.loc["u1", "map@12"] == pytest.approx(0.5)
    assert df.loc["u1", "ndcg@12"] == pytest.approx(0.6509209298071326)
    assert df.loc["u1", "recall@12"] == 1.0 and df.loc["u1", "hitrate@12"] == 1.0


def test_score_users_custom_ks() -> None:
    actual = {"u1": {"a", "b", "c", "d"}}
    predicted = {"u1": ["a", *MISSES[:48], "b", *MISSES[48:98], "c"]}
    df = score_users(actual, predicted, ks=(100, 5, 12))
    # smallest k gets the full set; others only recall; order by ascending k
    assert list(df.columns) == ["map@5", "recall@5", "ndcg@5", "hitrate@5", "recall@12", "recall@100"]
    assert df.loc["u1", "recall@5"] == pytest.approx(1 / 4)
    assert df.loc["u1", "recall@100"] == pytest.approx(2 / 4)
    # AP@5 = (1/1) / min(4, 5) = 1/4
    assert df.loc["u1", "map@5"] == pytest.approx(1 / 4)


def test_score_users_empty_input() -> None:
    df = score_users({"u1": set()}, {})
    assert df.shape == (0, 5)
    assert df.index.name == "user_id"
    assert summarise(df)["users"] == 0.0


def test_score_users_rejects_bad_ks() -> None:
    with pytest.raises(ValueError):
        score_users({"u1": {"a"}}, {}, ks=())
    with pytest.raises(ValueError):
        score_users({"u1": {"a"}}, {}, ks=(0, 12))


def test_summarise() -> None:
    df = score_users({"u1": {"a"}, "u2": {"b"}}, {"u1": ["a"], "u2": ["x", "b"]}, ks=(12,))
    summary = summarise(df)
    # u1: AP 1, ndcg 1; u2: AP (1/2)/1 = 1/2, ndcg 1/log2(3) / 1
    assert summary["map@12"] == pytest.approx((1 + 0.5) / 2)
    assert summary["ndcg@12"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert summary["recall@12"] == 1.0 and summary["hitrate@12"] == 1.0
    assert summary["users"] == 2.0
    assert all(isinstance(v, float) for v in summary.values())


# --- properties -------------------------------------------------------------------------

ITEM = st.sampled_from([f"i{j}" for j in range(30)])


@settings(max_examples=200, deadline=None)
@given(
    actual=st.sets(ITEM, min_size=1, max_size=20),
    predicted=st.lists(ITEM, max_size=40),
    k=st.integers(min_value=1, max_value=40),
)
def test_metrics_bounded_and_recall_monotone(actual: set[str], predicted: list[str], k: int) -> None:
    for metric in (average_precision_at_k, recall_at_k, ndcg_at_k, hit_rate_at_k):
        assert 0.0 <= metric(actual, predicted, k) <= 1.0 + 1e-12
    assert recall_at_k(actual, predicted, k) <= recall_at_k(actual, predicted, k + 1)

    # score_users must agree with the scalar functions
    row = score_users({"u": actual}, {"u": predicted}, ks=(k, k + 1)).loc["u"]
    assert row[f"map@{k}"] == pytest.approx(average_precision_at_k(actual, predicted, k))
    assert row[f"ndcg@{k}"] == pytest.approx(ndcg_at_k(actual, predicted, k))
    assert row[f"hitrate@{k}"] == hit_rate_at_k(actual, predicted, k)
    assert row[f"recall@{k + 1}"] == pytest.approx(recall_at_k(actual, predicted, k + 1))


# --- cross-check against ranx -----------------------------------------------------------


# ranx JIT-compiles its metrics with numba: about a minute on a cold cache, ~10 s warm.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::numba.core.errors.NumbaTypeSafetyWarning")
def test_against_ranx() -> None:
    ranx = pytest.importorskip("ranx")
    rng = random.Random(12)
    pool = [f"i{j}" for j in range(60)]
    cases: dict[str, tuple[set[str], list[str]]] = {}
    for n in range(40):
        actual = set(rng.sample(pool, rng.randint(1, 25)))  # some cases have > 12 relevant items
        predicted = rng.choices(pool, k=rng.randint(1, 30))  # with repeats
        cases[f"q{n}"] = (actual, predicted)

    # ranx takes a scored dict, so a ranking cannot hold repeats: feed it our deduped list with
    # strictly decreasing scores so its sort reproduces our order exactly.
    qrels = ranx.Qrels({q: dict.fromkeys(a, 1) for q, (a, _) in cases.items()})
    run = ranx.Run(
        {q: {doc: float(100 - i) for i, doc in enumerate(dedupe(p))} for q, (_, p) in cases.items()}
    )
    ranx.evaluate(qrels, run, ["map@12", "ndcg@12", "recall@12", "hit_rate@12"], return_mean=False)
    got = {metric: dict(scores) for metric, scores in run.scores.items()}

    for q, (actual, predicted) in cases.items():
        # ranx's AP@k divides by |actual| where Kaggle divides by min(|actual|, k), so rescale;
        # for |actual| <= 12 the factor is 1 and the two must agree as-is.
        rescale = len(actual) / min(len(actual), 12)
        assert average_precision_at_k(actual, predicted, 12) == pytest.approx(got["map@12"][q] * rescale)
        assert ndcg_at_k(actual, predicted, 12) == pytest.approx(got["ndcg@12"][q])
        assert recall_at_k(actual, predicted, 12) == pytest.approx(got["recall@12"][q])
        assert hit_rate_at_k(actual, predicted, 12) == pytest.approx(got["hit_rate@12"][q])
    assert any(len(a) > 12 for a, _ in cases.values())
    assert any(len(a) <= 12 for a, _ in cases.values())


def test_score_users_returns_dataframe() -> None:
    assert isinstance(score_users({"u": {"a"}}, {"u": ["a"]}), pd.DataFrame)
