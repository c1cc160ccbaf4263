from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from atelier.models.item_tower import CheckpointError
from atelier.models.losses import sampled_softmax
from atelier.models.user_tower import (
    ProfileStats,
    UserInputs,
    UserTower,
    UserTowerConfig,
    empty_inputs,
    load_user_checkpoint,
    save_user_checkpoint,
)
from atelier.recommend.user_tower import UserTowerRecommender, user_inputs_for
from atelier.recommender import Query
from atelier.train.user import (
    Examples,
    TrainUserConfig,
    build_examples,
    example_inputs,
    split_by_days,
    train_user_recommender,
    train_user_tower,
)

N_ITEMS, DIM, H = 60, 16, 5


def _cfg(**kw: object) -> UserTowerConfig:
    return UserTowerConfig(item_dim=DIM, d_model=32, n_heads=2, max_history=H, n_body_types=4, dropout=0.0,
                           **kw)  # type: ignore[arg-type]


def _items(seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((N_ITEMS, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _fake_encode(texts: list[str]) -> np.ndarray:
    """Deterministic stand-in for MiniLM: one seeded unit vector per text."""
    out = np.stack([np.random.default_rng(sum(map(ord, t))).standard_normal(384) for t in texts]).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _batch(n: int = 6) -> UserInputs:
    gen = torch.Generator().manual_seed(0)
    x = empty_inputs(_cfg(), n)
    x.history = torch.randn(n, H, DIM, generator=gen)
    x.history_mask = torch.arange(H)[None] < torch.tensor([3, 5, 1, 2, 4, 5])[:n, None]
    x.context = torch.randn(n, 384, generator=gen)
    x.context_mask = torch.ones(n, dtype=torch.bool)
    x.profile = torch.tensor([[165.0, 60.0, 30.0]] * n)
    x.body_type = torch.full((n,), 2)
    return x


@pytest.mark.parametrize("keep", [{"history"}, {"context"}, {"profile"}, set(), {"history", "context", "profile"}])
def test_shapes_and_unit_norm_with_parts_missing(keep: set[str]) -> None:
    torch.manual_seed(0)
    model = UserTower(_cfg()).eval()
    x = _batch().hide({"history", "context", "profile"} - keep)
    z = model(x)
    assert z.shape == (6, DIM + 1) and torch.isfinite(z).all()
    # A unit user vector, then the popularity weight (softplus: positive).
    assert torch.allclose(z[:, :DIM].norm(dim=-1), torch.ones(6), atol=1e-5)
    assert (z[:, DIM] > 0).all()
    if not keep:  # nobody: one learned vector for everyone
        assert torch.allclose(z, z[:1].expand_as(z), atol=1e-6)


def test_missing_profile_values_are_masked_not_propagated() -> None:
    model = UserTower(_cfg()).eval()
    model.set_profile_stats(ProfileStats(mean=[165.0, 65.0, 35.0], std=[7.0, 10.0, 9.0]))
    x = _batch().hide({"history", "context"})
    x.profile = torch.tensor([[np.nan, 60.0, np.nan]] * 6)
    z = model(x)
    assert torch.isfinite(z).all()
    # A NaN field is a masked field: its value never matters.
    x2 = _batch().hide({"history", "context"})
    x2.profile = torch.tensor([[np.nan, 60.0, np.nan]] * 6)
    x2.profile[:, 0] = float("nan")
    assert torch.equal(model(x2), z)
    # Fully missing profile with a known body type still counts as a profile.
    x.profile[:] = float("nan")
    assert x.present()[:, 2].all() and torch.isfinite(model(x)).all()


def test_checkpoint_round_trip_keeps_stats(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = UserTower(_cfg()).eval()
    stats = ProfileStats(mean=[165.0, 65.0, 35.0], std=[7.0, 10.0, 9.0])
    model.set_profile_stats(stats)
    path = tmp_path / "user.pt"
    save_user_checkpoint(model, path, stats, {"hourglass": 1, "pear": 2}, "abc123")
    loaded, payload = load_user_checkpoint(path)
    x = _batch()
    assert torch.equal(model(x), loaded(x))
    assert payload["profile_stats"] == stats and payload["item_checkpoint_id"] == "abc123"
    assert payload["body_vocab"] == {"hourglass": 1, "pear": 2}
    assert torch.equal(loaded.profile_mean, torch.tensor(stats.mean))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_user_checkpoint(tmp_path / "missing.pt")
    torch.save({"kind": "item_tower"}, tmp_path / "item.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of the user tower"):
        load_user_checkpoint(tmp_path / "item.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_user_checkpoint(tmp_path / "junk.pt")


def test_item_vectors_are_frozen() -> None:
    model = UserTower(_cfg())
    items = torch.from_numpy(_items())
    assert all(p.shape != items.shape for p in model.parameters())
    ex = _toy_examples()
    x = example_inputs(ex, np.arange(len(ex)), items)
    u = model(x)
    keys = torch.cat([items, torch.ones(len(items), 1)], dim=1)  # [v, b]
    sampled_softmax(u, keys, torch.from_numpy(ex.target), torch.arange(5), None, 0.05).backward()
    assert not items.requires_grad and items.grad is None
    assert model.item_proj.weight.grad is not None


def test_logq_correction_direction() -> None:
    # Positive and negative score the same; the positive is popular (sampled often), the negative rare.
    users = torch.tensor([[1.0, 0.0]])
    items = torch.tensor([[0.6, 0.8], [0.6, -0.8]])
    targets, negatives = torch.tensor([0]), torch.tensor([1])
    plain = sampled_softmax(users, items, targets, negatives, None, 0.1)
    assert torch.isclose(plain, torch.log(torch.tensor(2.0)))
    corrected = sampled_softmax(users, items, targets, negatives, torch.log(torch.tensor([0.9, 0.1])), 0.1)
    assert corrected > plain  # a popular positive earns less credit once its sampling rate is removed
    rare_positive = sampled_softmax(users, items, targets, negatives, torch.log(torch.tensor([0.1, 0.9])), 0.1)
    assert rare_positive < plain
    # An accidental hit (the target drawn as a negative) is not a negative.
    assert torch.isclose(sampled_softmax(users, items, targets, torch.tensor([0, 1]), None, 0.1), plain)


def _log() -> tuple[pd.DataFrame, pd.DataFrame, dict[str, int]]:
    day = pd.Timestamp("2020-01-01")
    rows = [  # user, item, day offset, occasion
        ("u1", "a", 0, "wedding"), ("u1", "b", 0, "wedding"), ("u1", "c", 1, "work"), ("u1", "a", 2, "party"),
        ("u1", "d", 3, None), ("u2", "b", 1, "date"), ("u2", "e", 2, "date"), ("u3", "c", 2, None),
        ("u1", "b", 0, "wedding"),  # exact duplicate (a quantity of 2): counted once
    ]
    log = pd.DataFrame([(u, i, day + pd.Timedelta(days=d), o) for u, i, d, o in rows],
                       columns=["user_id", "item_id", "ts", "occasion"]).sample(frac=1.0, random_state=0)
    users = pd.DataFrame({"user_id": ["u1", "u2"], "height_cm": [170.0, np.nan], "weight_kg": [60.0, 55.0],
                          "age": [30.0, np.nan], "body_type": ["Pear", "athletic"]})
    return log, users, {k: i for i, k in enumerate("abcde")}


def _toy_examples() -> Examples:
    log, users, index = _log()
    return build_examples(log, index, users, max_history=H, encode=_fake_encode, max_empty_frac=1.0)


def test_build_examples_exact_histories_no_leakage() -> None:
    log, users, index = _log()
    ex = build_examples(log, index, users, max_history=2, encode=_fake_encode, max_empty_frac=1.0)
    names = "abcde"
    got = sorted(
        (str(pd.Timestamp(t).day), names[int(tgt)], "".join(names[int(i)] for i in hist if i >= 0))
        for t, tgt, hist in zip(ex.ts, ex.target, ex.history, strict=True)
    )
    # u1: day1 a,b (one basket: neither sees the other); day2 c sees b,a; day3 a sees c,(b|a) ->
    # distinct most recent first, cut to 2; day4 d sees a,c. u2: b then e. u3: c alone.
    assert sorted(got) == sorted([
        ("1", "a", ""), ("1", "b", ""), ("2", "c", "ab"), ("3", "a", "ca"), ("4", "d", "ac"),
        ("2", "b", ""), ("3", "e", "b"), ("3", "c", ""),
    ]) or sorted(got) == sorted([
        ("1", "a", ""), ("1", "b", ""), ("2", "c", "ba"), ("3", "a", "cb"), ("4", "d", "ac"),
        ("2", "b", ""), ("3", "e", "b"), ("3", "c", ""),
    ])
    # No leakage: every history item was bought by the same user strictly before the target.
    first = log.groupby(["user_id", "item_id"])["ts"].min()
    for tgt, ts, hist in zip(ex.target, ex.ts, ex.history, strict=True):
        owner = log.loc[(log["item_id"] == names[int(tgt)]) & (log["ts"] == ts), "user_id"].unique()
        assert len(owner) == 1  # (item, day) identifies the buyer in this log
        for i in hist[hist >= 0]:
            assert first[(owner[0], names[int(i)])] < ts
    # Profile and context travel with the example; u3 is unknown (all NaN, body 0).
    u3 = ex.user_rows == -1
    assert np.isnan(ex.profile[u3]).all() and (ex.body_type[u3] == 0).all() and (ex.context_ids[u3] == -1).all()
    assert ex.body_vocab == {"athletic": 1, "pear": 2}
    assert set(ex.context_texts) == {"wedding", "work", "party", "date"}


def test_build_examples_caps_empty_history() -> None:
    log, users, index = _log()
    ex = build_examples(log, index, users, max_history=H, encode=_fake_encode)
    empty = (ex.history[:, 0] < 0).sum()
    assert empty <= len(ex) - empty and len(ex) - empty == 4


def test_overfit_one_tiny_batch() -> None:
    torch.manual_seed(0)
    items = torch.from_numpy(_items())
    ex = _toy_examples()
    model = UserTower(_cfg())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = np.arange(len(ex))
    x = example_inputs(ex, rows, items)
    keys = torch.cat([items, torch.zeros(len(items), 1)], dim=1)  # no popularity: vectors must do it
    targets = torch.from_numpy(ex.target)
    losses = []
    for _ in range(150):
        loss = sampled_softmax(model(x), keys, targets, torch.arange(N_ITEMS), None, 0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses[::30]


def _fitted(tmp_path: Path) -> UserTowerRecommender:
    from atelier.recommender import TrainData

    log, users, _ = _log()
    ex = _toy_examples()
    train, val = split_by_days(ex, 0.25)
    model, history = train_user_tower(_items(), train, val, _cfg(), TrainUserConfig(epochs=2, batch_size=4,
                                                                                    n_sampled=8))
    assert len(history["epochs"]) >= 2 and history["epochs"][0]["epoch"] == 0 and history["best_epoch"] >= 0
    rec = UserTowerRecommender(list("abcde") + [f"x{i}" for i in range(N_ITEMS - 5)], _items(), model,
                               ProfileStats.from_dict(history["profile_stats"]), ex.body_vocab)
    return rec.fit(TrainData("toy", pd.DataFrame(), log, users, tmp_path))


def test_recommender_k_distinct_and_exclude_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import atelier.recommend.user_tower as tu

    monkeypatch.setattr(tu, "encode_texts", lambda texts, cache_dir=None: _fake_encode(list(texts)))
    rec = _fitted(tmp_path)
    queries = [Query("u1", history=("a", "b", "c")), Query("n", profile={"height_cm": 160.0, "body_type": "pear"},
                                                              context="wedding"),
               Query("anon", context="beach wedding guest"), Query("nobody")]
    ranked = rec.recommend(queries, 10)
    assert all(len(r) == 10 and len(set(r)) == 10 for r in ranked)
    assert ranked[3][:5] == rec.popular[:5]  # nothing known: popularity (5 items), then the tower
    rec.exclude_history = True
    assert not {"a", "b", "c"} & set(rec.recommend(queries[:1], 50)[0])
    # Dropping a part changes what the tower sees.
    inputs = user_inputs_for(queries, rec.item_index, rec.item_vectors, _fake_encode, rec.stats, rec.body_vocab, H,
                             drop={"context"})
    assert not inputs.context_mask.any() and inputs.history_mask[0, :3].all() and inputs.body_type[1] == 2
    assert torch.isnan(inputs.profile[1, 1:]).all() and inputs.profile[1, 0] == 160.0
    # Most recent first.
    assert torch.equal(inputs.history[0, 0], torch.from_numpy(rec.item_vectors[2]))


def test_basket_history_adds_basket_mates_only() -> None:
    log, users, index = _log()
    ex = build_examples(log, index, users, max_history=H, encode=_fake_encode, max_empty_frac=1.0,
                        basket_history=True)
    names = "abcde"
    got = {(pd.Timestamp(t).day, names[int(tgt)]): {names[int(i)] for i in hist if i >= 0}
           for t, tgt, hist in zip(ex.ts, ex.target, ex.history, strict=True)}
    assert got[(1, "a")] == {"b"} and got[(1, "b")] == {"a"}  # each sees its basket-mate, never itself
    assert got[(2, "c")] == {"a", "b"} and got[(4, "d")] == {"a", "b", "c"}  # and earlier baskets, never later


def test_train_user_recommender_fits_a_recommender(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import atelier.recommend.user_tower as inference
    import atelier.train.user as training
    from atelier.recommender import TrainData

    for module in (inference, training):
        monkeypatch.setattr(module, "encode_texts", lambda texts, cache_dir=None: _fake_encode(list(texts)))
    log, users, _ = _log()
    ids = list("abcde") + [f"x{i}" for i in range(N_ITEMS - 5)]
    cfg = TrainUserConfig(epochs=1, batch_size=4, n_sampled=8, drop=frozenset({"profile"}))
    rec = train_user_recommender(TrainData("toy", pd.DataFrame(), log, users, tmp_path), ids, _items(), cfg, _cfg())
    assert rec.name == "two-tower" and rec.drop == {"profile"} and rec.history["val_examples"] > 0
    assert rec.history["config"]["drop"] == ["profile"]
    assert all(len(set(r)) == 5 for r in rec.recommend([Query("u1", history=("a",), context="work")] * 2, 5))


def test_log_popularity_overall_and_per_segment_columns() -> None:
    from atelier.recommend.user_tower import bias_segments, log_popularity, retrieval_keys

    ts = pd.to_datetime(["2020-01-01", "2020-01-09", "2020-01-10", "2020-01-10", "2020-01-10"])
    log = pd.DataFrame({"user_id": list("abcde"), "item_id": ["x", "x", "x", "y", "z"], "ts": ts,
                        "occasion": ["Wedding", "wedding ", "party", "party", None]})
    index = {"x": 0, "y": 1, "z": 2, "w": 3}
    b = log_popularity(log, index, window_days=5, segments=("wedding", "party"), segment_window_days=5)
    # The 2020-01-01 row is outside the 5-day window; occasions match case- and space-insensitively.
    expected = np.log1p([[2, 1, 1], [1, 0, 1], [1, 0, 0], [0, 0, 0]])
    assert np.allclose(b, expected)
    assert bias_segments(log, min_count=1) == ("wedding", "party")
    assert bias_segments(log.drop(columns="occasion")) == ()
    keys = retrieval_keys(np.eye(4, dtype=np.float32), b)
    assert keys.shape == (4, 7) and np.allclose(keys[:, 4:], b)
    # Segment columns may count a longer window than the overall column.
    wide = log_popularity(log, index, window_days=5, segments=("wedding",), segment_window_days=None)
    assert np.allclose(wide[:, 0], expected[:, 0]) and np.allclose(wide[:, 1], np.log1p([2, 0, 0, 0]))
