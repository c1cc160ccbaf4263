"""Ranking metrics for the offline evaluation harness.

All metrics use binary relevance. For one user, ``actual`` is the set of items the user
interacted with in the test window (treated as a set: repeats are ignored) and
``predicted`` is a ranked list of item ids. Every metric first reduces ``predicted`` to its
*distinct* items, keeping the first occurrence of each, and then looks at the first ``k``
of those; a repeated id therefore never scores twice and never uses up one of the ``k``
slots. ``rel(i)`` is 1 when the i-th distinct prediction (1-based) is in ``actual``.

Definitions, with ``A = set(actual)`` and ``p_1..p_n`` the first ``n <= k`` distinct
predictions:

* ``AP@k = sum_{i<=n} P(i) * rel(i) / min(|A|, k)`` where ``P(i)`` is the share of
  ``p_1..p_i`` in ``A``. This is the MAP@12 of the Kaggle "H&M Personalized Fashion
  Recommendations" competition; MAP@k is its mean over users.
* ``recall@k = |A ∩ {p_1..p_n}| / |A|``.
* ``nDCG@k = DCG / IDCG`` with ``DCG = sum_{i<=n} rel(i) / log2(i + 1)`` and ``IDCG`` the
  DCG of ``min(|A|, k)`` hits in the top positions.
* ``hitrate@k = 1`` if any of ``p_1..p_n`` is in ``A``, else ``0``.
* ``coverage@k``: share of the catalogue that appears in at least one user's top ``k``.
* ``cold_item_recall@k``: micro-averaged recall over the (user, item) test pairs whose item
  is cold, i.e. the share of those pairs whose item is in that user's top ``k``.

Per-user metrics are undefined for a user with no test items, so they raise ``ValueError``;
callers score only users with at least one test interaction (``score_users`` skips others).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from functools import lru_cache

import numpy as np
import pandas as pd

__all__ = [
    "average_precision_at_k",
    "cold_item_recall",
    "coverage",
    "dedupe",
    "hit_rate_at_k",
    "ndcg_at_k",
    "recall_at_k",
    "score_users",
    "summarise",
]


def dedupe(predicted: Sequence[str]) -> list[str]:
    """Drop repeated ids, keeping the order of first occurrences."""
    return list(dict.fromkeys(predicted))


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def _actual_set(actual: Collection[str]) -> set[str] | frozenset[str]:
    relevant = actual if isinstance(actual, set | frozenset) else set(actual)
    if not relevant:
        raise ValueError("actual is empty: metrics are undefined for a user with no test items")
    return relevant


def _top_k_distinct(predicted: Sequence[str], k: int) -> list[str]:
    if len(predicted) <= 2 * k:
        # dict.fromkeys runs in C, so for short lists deduplicating in full beats a Python loop.
        return list(dict.fromkeys(predicted))[:k]
    # Long candidate lists: stop after k distinct ids instead of deduplicating everything.
    seen: set[str] = set()
    top: list[str] = []
    for item in predicted:
        if item not in seen:
            seen.add(item)
            top.append(item)
            if len(top) == k:
                break
    return top


@lru_cache(maxsize=1024)
def _ideal_dcg(n_hits: int) -> float:
    return sum(1.0 / math.log2(i + 2) for i in range(n_hits))


def _average_precision(hits: Sequence[bool], n_relevant: int, k: int) -> float:
    n_hit = 0
    total = 0.0
    for i, hit in enumerate(hits[:k]):
        if hit:
            n_hit += 1
            total += n_hit / (i + 1)
    return total / min(n_relevant, k)


def _ndcg(hits: Sequence[bool], n_relevant: int, k: int) -> float:
    dcg = 0.0
    for i, hit in enumerate(hits[:k]):
        if hit:
            dcg += 1.0 / math.log2(i + 2)
    return dcg / _ideal_dcg(min(n_relevant, k))


def average_precision_at_k(actual: Collection[str], predicted: Sequence[str], k: int = 12) -> float:
    """Kaggle H&M AP@k: precision at each hit among the first k distinct predictions over min(|actual|, k)."""
    _check_k(k)
    relevant = _actual_set(actual)
    hits = [item in relevant for item in _top_k_distinct(predicted, k)]
    return _average_precision(hits, len(relevant), k)


def recall_at_k(actual: Collection[str], predicted: Sequence[str], k: int) -> float:
    """Share of actual items found among the first k distinct predictions."""
    _check_k(k)
    relevant = _actual_set(actual)
    n_hit = sum(item in relevant for item in _top_k_distinct(predicted, k))
    return n_hit / len(relevant)


def ndcg_at_k(actual: Collection[str], predicted: Sequence[str], k: int) -> float:
    """Binary-relevance nDCG@k with a log2(i + 1) discount over the first k distinct predictions."""
    _check_k(k)
    relevant = _actual_set(actual)
    hits = [item in relevant for item in _top_k_distinct(predicted, k)]
    return _ndcg(hits, len(relevant), k)


def hit_rate_at_k(actual: Collection[str], predicted: Sequence[str], k: int) -> float:
    """1.0 if any of the first k distinct predictions is an actual item, else 0.0."""
    _check_k(k)
    relevant = _actual_set(actual)
    return 1.0 if any(item in relevant for item in _top_k_distinct(predicted, k)) else 0.0


def _metric_columns(ks: Sequence[int]) -> tuple[int, list[int], list[str]]:
    if not ks:
        raise ValueError("ks must contain at least one cutoff")
    for k in ks:
        _check_k(k)
    cutoffs = sorted(set(ks))
    head = cutoffs[0]
    columns = [f"map@{head}", f"recall@{head}", f"ndcg@{head}", f"hitrate@{head}"]
    columns += [f"recall@{k}" for k in cutoffs[1:]]
    return head, cutoffs, columns


def score_users(
    actual: Mapping[str, Collection[str]],
    predicted: Mapping[str, Sequence[str]],
    ks: Sequence[int] = (12, 100),
) -> pd.DataFrame:
    """Per-user map/ndcg/hitrate at the smallest k and recall at every k, for users with test items."""
    head, cutoffs, columns = _metric_columns(ks)
    k_max = cutoffs[-1]
    users: list[str] = []
    rows: list[list[float]] = []
    empty: Sequence[str] = ()
    for user, items in actual.items():
        relevant = items if isinstance(items, set | frozenset) else set(items)
        if not relevant:
            continue
        n_relevant = len(relevant)
        hits = [item in relevant for item in _top_k_distinct(predicted.get(user, empty), k_max)]
        # Running hit count, so recall at every cutoff is a lookup rather than a rescan.
        cumulative = [0]
        for hit in hits:
            cumulative.append(cumulative[-1] + hit)
        n_ranked = len(hits)
        row = [
            _average_precision(hits, n_relevant, head),
            cumulative[min(head, n_ranked)] / n_relevant,
            _ndcg(hits, n_relevant, head),
            1.0 if cumulative[min(head, n_ranked)] else 0.0,
        ]
        row += [cumulative[min(k, n_ranked)] / n_relevant for k in cutoffs[1:]]
        users.append(user)
        rows.append(row)
    values = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(columns))
    return pd.DataFrame(values, index=pd.Index(users, name="user_id", dtype=object), columns=columns)


def coverage(predicted: Mapping[str, Sequence[str]], catalogue_size: int, k: int = 12) -> float:
    """Share of the catalogue appearing in at least one user's first k distinct predictions."""
    _check_k(k)
    if catalogue_size < 1:
        raise ValueError(f"catalogue_size must be >= 1, got {catalogue_size}")
    shown: set[str] = set()
    for ranking in predicted.values():
        shown.update(_top_k_distinct(ranking, k))
    if len(shown) > catalogue_size:
        # More distinct ids than the catalogue holds means ids from outside it were recommended.
        raise ValueError(f"{len(shown)} distinct predicted items exceed catalogue_size={catalogue_size}")
    return len(shown) / catalogue_size


def cold_item_recall(
    actual: Mapping[str, Collection[str]],
    predicted: Mapping[str, Sequence[str]],
    cold_items: Collection[str],
    k: int,
) -> float:
    """Share of (user, cold item) test pairs whose item is in that user's first k distinct predictions."""
    _check_k(k)
    cold = cold_items if isinstance(cold_items, set | frozenset) else set(cold_items)
    empty: Sequence[str] = ()
    n_pairs = 0
    n_found = 0
    for user, items in actual.items():
        user_cold = cold.intersection(items)
        if not user_cold:
            continue
        n_pairs += len(user_cold)
        n_found += len(user_cold.intersection(_top_k_distinct(predicted.get(user, empty), k)))
    return n_found / n_pairs if n_pairs else float("nan")


def summarise(per_user: pd.DataFrame) -> dict[str, float]:
    """Mean of each metric column plus the number of users scored (as float, key ``users``)."""
    if "users" in per_user.columns:
        raise ValueError("per_user must not have a column named 'users'")
    summary = {str(column): float(per_user[column].mean()) for column in per_user.columns}
    summary["users"] = float(len(per_user))
    return summary
