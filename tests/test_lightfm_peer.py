"""LightFM peer: cluster structure is learnt, cold items ride on their features, fallbacks behave."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from atelier.lightfm_peer import LightFMRecommender, default_feature_columns, item_feature_matrix
from atelier.recommender import Query, RepurchaseFirst, TrainData, popular_items

N_WARM = 8  # bought items per cluster; each cluster also has one cold item


def _data(tmp_path: Path) -> TrainData:
    """Two clusters (red tops, blue trousers); each user buys only within one cluster."""
    rows = []
    for cluster, (colour, kind) in {"a": ("red", "top"), "b": ("blue", "trousers")}.items():
        for i in range(N_WARM):
            rows.append({"item_id": f"{cluster}{i}", "colour": colour, "kind": kind})
        rows.append({"item_id": f"{cluster}_cold", "colour": colour, "kind": kind})
    items = pd.DataFrame(rows).assign(title="", description="", group_id=lambda f: f["item_id"], price=np.nan)
    rng = np.random.default_rng(0)
    start = pd.Timestamp("2020-09-01")
    events = []
    for cluster in "ab":
        for u in range(12):
            bought = rng.choice(N_WARM, size=4, replace=False)
            for day, i in enumerate(bought):
                events.append({"user_id": f"{cluster}_user{u}", "item_id": f"{cluster}{i}",
                               "ts": start + pd.Timedelta(days=int(day))})
    # Repeat purchases make a0 the best seller overall, then b0, so the popularity order is known.
    for n in range(12):
        events.append({"user_id": f"a_user{n}", "item_id": "a0", "ts": start + pd.Timedelta(days=5)})
        if n < 6:
            events.append({"user_id": f"b_user{n}", "item_id": "b0", "ts": start + pd.Timedelta(days=5)})
    interactions = pd.DataFrame(events)
    users = pd.DataFrame({"user_id": interactions["user_id"].unique()})
    return TrainData("toy", items, interactions, users, tmp_path)


@pytest.fixture
def fitted(tmp_path: Path) -> tuple[LightFMRecommender, TrainData]:
    data = _data(tmp_path)
    # Both columns named: in this toy they are relabellings of each other, which the default would merge.
    model = LightFMRecommender(no_components=8, epochs=40, learning_rate=0.05,
                               feature_columns=["colour", "kind"], num_threads=1, seed=0)
    return model.fit(data), data


def _history(data: TrainData, user: str) -> tuple[str, ...]:
    own = data.interactions[data.interactions["user_id"] == user].sort_values("ts", kind="stable")
    return tuple(own.drop_duplicates("item_id", keep="last")["item_id"])


def test_default_feature_columns_skip_ids_text_and_relabellings() -> None:
    items = pd.DataFrame({
        "item_id": ["1", "2", "3"], "title": ["x", "y", "z"], "description": ["", "", ""],
        "group_id": ["1", "1", "2"], "price": [1.0, 2.0, 3.0],
        "colour_code": ["9", "10", "9"], "colour_name": ["Black", "White", "Black"],
        "kind": ["top", "top", "dress"], "constant": ["a", "a", "a"],
    })
    assert default_feature_columns(items) == ["colour_name", "kind"]
    assert default_feature_columns(items, max_distinct=2) == []


def test_item_features_identity_plus_one_hots_rows_sum_to_one() -> None:
    items = pd.DataFrame({"item_id": ["1", "2"], "colour": ["red", None]})
    matrix, names = item_feature_matrix(items, ["colour"])
    assert names == ["item=1", "item=2", "colour=red"]
    np.testing.assert_allclose(matrix.toarray(), [[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])


def test_ranks_own_cluster_above_other_cluster(fitted: tuple[LightFMRecommender, TrainData]) -> None:
    model, data = fitted
    users = [f"{c}_user{u}" for c in "ab" for u in range(12)]
    ranked = model.recommend([Query(user_id=u) for u in users], k=len(data.items))
    wins = 0
    for user, ranking in zip(users, ranked, strict=True):
        bought = set(_history(data, user))
        pos = {item: r for r, item in enumerate(ranking)}
        own = [pos[i] for i in pos if i[0] == user[0] and i not in bought]
        other = [pos[i] for i in pos if i[0] != user[0]]
        wins += np.mean(own) < np.mean(other)
    assert wins >= 0.9 * len(users)


def test_cold_item_reaches_its_cluster(fitted: tuple[LightFMRecommender, TrainData]) -> None:
    model, data = fitted
    users = [f"{c}_user{u}" for c in "ab" for u in range(12)]
    ranked = model.recommend([Query(user_id=u) for u in users], k=len(data.items))
    wins = 0
    for user, ranking in zip(users, ranked, strict=True):
        cold = ranking.index(f"{user[0]}_cold")
        other = [r for r, item in enumerate(ranking) if item[0] != user[0]]
        wins += cold < min(other)
    assert wins >= 0.9 * len(users)


def test_unseen_user_gets_popularity(fitted: tuple[LightFMRecommender, TrainData]) -> None:
    model, data = fitted
    [ranking] = model.recommend([Query(user_id="stranger")], k=5)
    assert ranking == popular_items(data.interactions)[:5]
    assert ranking[:2] == ["a0", "b0"]


def test_after_repurchase_puts_history_first_most_recent_first(tmp_path: Path) -> None:
    data = _data(tmp_path)
    model = RepurchaseFirst(LightFMRecommender(no_components=8, epochs=5, num_threads=1)).fit(data)
    assert model.name == "repurchase+lightfm"
    history = _history(data, "b_user7")
    [ranking, new] = model.recommend([Query(user_id="b_user7", history=history),
                                      Query(user_id="stranger", history=("a3", "b5"))], k=10)
    assert ranking[: len(history)] == list(reversed(history))
    assert len(ranking) == 10 and len(set(ranking)) == 10
    assert new[:2] == ["b5", "a3"] and new[2] == "a0"


@pytest.mark.parametrize("k", [1, 3, 12, 50])
def test_k_respected_and_ids_distinct(fitted: tuple[LightFMRecommender, TrainData], k: int) -> None:
    model, data = fitted
    known, stranger = model.recommend([Query(user_id="a_user1"), Query(user_id="stranger")], k=k)
    assert len(known) == min(k, len(data.items))  # the model ranks the whole catalogue
    assert len(stranger) == min(k, data.interactions["item_id"].nunique())  # popularity knows bought items
    for ranking in (known, stranger):
        assert len(set(ranking)) == len(ranking)
        assert all(isinstance(item, str) for item in ranking)
    assert model.name == "lightfm"
