"""DeepFM reranker: leakage-free rows, exact embedding transfer, explanations, overfitting, checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd
import pytest
import torch

from atelier.config import Settings
from atelier.models.item_tower import CheckpointError, ItemTower, load_checkpoint, save_checkpoint
from atelier.models.losses import listwise_loss
from atelier.models.ranker import RankerConfig, build_ranker, load_ranker, projection, transfer_embeddings
from atelier.pipeline.suites import rerank_suite
from atelier.recommend.baselines import PopularityRecommender
from atelier.recommend.chain import RerankStage, Scored, StageRequest, StageSkip
from atelier.recommend.encoder import tower_config
from atelier.recommend.ranker import Featuriser, ItemFeatures, LogStats, ProfileScale, load_scorer, predict
from atelier.recommender import Query, TrainData
from atelier.schema import load_schema
from atelier.train.ranker import RerankRecommender, RerankTrainConfig, Rows, encoded_tables, train_ranker, training_rows
from atelier.vocab import Vocab, build_vocab

CATS = ["dress", "gown", "jumpsuit", "skirt", "top"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainData, Path]:
    """30 RentTheRunway-like items, 20 users over 5 days (day 5 = label day), a tiny item tower."""
    items = pd.DataFrame({"item_id": [f"i{n}" for n in range(30)], "title": [CATS[n % 5] for n in range(30)],
                          "description": "", "group_id": [f"i{n}" for n in range(30)], "price": np.nan,
                          "category": [CATS[n % 5] for n in range(30)]})
    rng = np.random.default_rng(0)
    rows = [(f"u{u}", f"i{int(rng.integers(0, 25))}", pd.Timestamp("2017-07-01") + pd.Timedelta(days=d))
            for u in range(20) for d in range(5) if rng.random() < 0.7]
    rows += [(f"u{u}", "i29", pd.Timestamp("2017-07-05")) for u in range(0, 20, 2)]  # only bought on the label day
    log = pd.DataFrame(rows, columns=["user_id", "item_id", "ts"])
    log["occasion"] = "wedding"
    users = pd.DataFrame({"user_id": [f"u{u}" for u in range(20)], "height_cm": 165.0, "weight_kg": 60.0,
                          "age": 30.0, "body_type": "hourglass"})
    folder = tmp_path_factory.mktemp("rerank")
    vocab = build_vocab(load_schema())
    torch.manual_seed(0)
    tower = ItemTower(tower_config(vocab, d_model=32, n_heads=2, n_layers=1, out_dim=16))
    ckpt = folder / "tower.pt"
    save_checkpoint(tower, ckpt, vocab.to_dict(), {})
    return TrainData("rtr", items, log, users, folder), ckpt


class SpyRetriever(PopularityRecommender):
    """Popularity that remembers the last day of every log it was fitted on."""

    seen_until: ClassVar[list[pd.Timestamp]] = []

    def fit(self, data: TrainData) -> Self:
        self.seen_until.append(data.interactions["ts"].max())
        return super().fit(data)


def _tcfg(**kw: object) -> RerankTrainConfig:
    return RerankTrainConfig(**{"label_days": 1, "epochs": 2, "batch_size": 64, **kw})  # type: ignore[arg-type]


def _featuriser(data: TrainData, ckpt: Path, cfg: RankerConfig) -> tuple[Featuriser, object]:
    rec = RerankRecommender(PopularityRecommender(None), ckpt, cfg=cfg)
    rec._setup(data)
    assert rec.feat is not None
    return rec.feat, rec.model


def test_training_rows_use_only_days_before_the_labels(toy: tuple[TrainData, Path]) -> None:
    data, ckpt = toy
    feat, _ = _featuriser(data, ckpt, RankerConfig(0, 0))
    spy = SpyRetriever(None)
    spy.seen_until.clear()
    rows = training_rows(data, spy, feat, _tcfg(random_negatives=30), window_days=30)
    assert rows.info["label_cut"] == "2017-07-05"
    assert spy.seen_until == [pd.Timestamp("2017-07-04")], "the retriever saw the label day"
    # i29 is bought on the label day only: popularity, recency and history features must not know it,
    # while its label day purchases are positives.
    i29 = rows.items == "i29"
    assert i29.any()
    for name in ("item_pop", "item_pop_recent", "item_recency", "in_history", "retrieval_score"):
        assert rows.x[i29, feat.layout[name][0]].max() == 0, name
    assert rows.y[i29].sum() > 0
    label_day = data.interactions[data.interactions["ts"] >= "2017-07-05"]
    bought = set(zip(label_day["user_id"], label_day["item_id"], strict=True))
    users = sorted(label_day["user_id"].unique())
    assert rows.info["users"] == len(users)
    # Every row's label is exactly "this user bought this item on the label day" (groups in user-id order).
    expected = [(users[g], i) in bought for g, i in zip(rows.group, rows.items, strict=True)]
    assert rows.y.tolist() == [float(e) for e in expected]
    assert 0 < rows.y.sum() <= len(bought)


def test_transfer_copies_exactly_the_vocabulary_rows(toy: tuple[TrainData, Path]) -> None:
    _, ckpt = toy
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    vocab = build_vocab(load_schema())
    for dim in (32, 8):  # identity (same width) and PCA projection
        cfg = RankerConfig(vocab.std_size, vocab.re_size, embedding_dim=dim)
        model = build_ranker(cfg)
        info = transfer_embeddings(model, state, cfg)
        proj = projection(state["emb_std.weight"], dim)
        std, re_t = model.embedding_dict["std"].weight, model.embedding_dict["re"].weight
        for name, value in (("color", "black"), ("category", "04onepiece_01dress")):
            sid = vocab.std_id(name, value)
            assert sid > 3
            torch.testing.assert_close(std[sid], state["emb_std.weight"][sid] @ proj * info["scale"])
        rid = vocab.re_id("style", "cottagecore")
        torch.testing.assert_close(re_t[rid], state["emb_re.weight"][rid] @ proj * info["scale"])
        assert float(std[0].abs().sum().detach()) == 0 and float(re_t[0].abs().sum().detach()) == 0
        assert abs(float(std[4:].std().detach()) - cfg.init_scale) < 1e-3
        if dim == 32:
            torch.testing.assert_close(std[5] / info["scale"], state["emb_std.weight"][5])
        # The linear (first-order) tables are DeepCTR's own and stay untouched.
        assert model.linear_model.embedding_dict["std"].weight.shape[1] == 1


def test_encoded_transfer_uses_the_tower_output_of_one_attribute_items(toy: tuple[TrainData, Path]) -> None:
    _, ckpt = toy
    tower, payload = load_checkpoint(ckpt)
    vocab = Vocab.from_dict(payload["vocab"])
    rid = vocab.re_id("hm.department_name", "Jersey Basic")
    tables = encoded_tables(tower, vocab, np.array([0, rid]))
    std, re_t = tables["emb_std.weight"], tables["emb_re.weight"]
    assert std.shape == (vocab.std_size, tower.config.out_dim) and float(std[:4].abs().sum()) == 0
    assert float(re_t[rid].abs().sum()) > 0 and float(re_t[rid + 1].abs().sum()) == 0  # only listed RE ids
    black, white = vocab.std_id("color", "black"), vocab.std_id("color", "white")
    assert not torch.allclose(std[black], std[white])
    torch.testing.assert_close(std[4:].mean(0), torch.zeros(tower.config.out_dim), atol=1e-5, rtol=0)


def test_fit_recommend_and_explain_are_consistent(toy: tuple[TrainData, Path]) -> None:
    data, ckpt = toy
    torch.set_num_threads(1)
    rec = RerankRecommender(PopularityRecommender(None), ckpt, cfg=RankerConfig(0, 0, embedding_dim=8),
                            train=_tcfg(candidates=20)).fit(data)
    q = Query("u1", history=("i0", "i5"), profile={"height_cm": 165.0, "age": None}, context="wedding")
    ranked = rec.recommend([q, Query("new")], k=10)
    assert all(len(r) == 10 and len(set(r)) == 10 for r in ranked)
    expl = rec.explain(q, [*ranked[0][:3], "i5"])
    given = dict(zip([*ranked[0][:3], "i5"], rec.score(q, [*ranked[0][:3], "i5"]).tolist(), strict=True))
    assert rec.scorer.explain(q, list(given), scores=given) == expl  # reorder's scores spare a forward
    assert [e["item_id"] for e in expl] == [*ranked[0][:3], "i5"]
    hist_labels = {f"{f}={v}" for i in ("i0", "i5") for f, v in rec.feat.cat.labels[rec.feat.cat.index[i]].items()}
    for e in expl:
        own = {f"{f}={v}" for f, v in rec.feat.cat.labels[rec.feat.cat.index[e["item_id"]]].items()}
        assert set(e["matches"]["history"]) <= own & hist_labels
        assert e["matches"]["repurchase"] == (e["item_id"] in q.history)
        assert e["matches"]["profile"] == ["height_cm"] and e["matches"]["context"] == "wedding"
        assert 0 <= e["score"] <= 1 and 1 <= len(e["top_fields"]) <= 3
        # Missing inputs (no weight, no age, no body type given) never explain anything.
        named = {f for f, _ in e["top_fields"]} | {f for pair in e["top_pairs"] for f in pair[:2]}
        assert not named & {"weight_b", "age_b", "body_type"}
        assert all(a in {"hist_std", "hist_re", "height_b", "weight_b", "age_b", "body_type", "context",
                         "hist_len_b"} for a, _, _ in e["top_pairs"])
    # i5 is in the history itself, so every one of its attributes matches the history.
    i5 = rec.feat.cat.labels[rec.feat.cat.index["i5"]]
    assert expl[-1]["matches"]["history"] == sorted(f"{f}={v}" for f, v in i5.items()) and i5
    cands = rec.retriever.recommend([q], 20)[0]
    p = rec.score(q, cands)  # in retrieval order, as recommend scores them
    assert ranked[0] == [cands[i] for i in np.argsort(-p, kind="stable")][:10]


def _tiny(n: int, low: int = 1) -> tuple[Any, np.ndarray, int, np.random.Generator]:
    """A small ranker, n input rows with random item categories in [low, 50), and the category column."""
    model = build_ranker(RankerConfig(std_size=50, re_size=40, embedding_dim=8, dropout=0.0, transfer=False))
    rng = np.random.default_rng(0)
    x = np.zeros((n, max(b for _, b in model.feature_index.values())), np.float32)
    a, _ = model.feature_index["item_category"]
    x[:, a] = rng.integers(low, 50, n)
    return model, x, a, rng


def test_overfit_a_tiny_set() -> None:
    model, x, a, rng = _tiny(64)
    h, _ = model.feature_index["hist_std"]
    x[:, h] = rng.integers(1, 50, 64)
    y = (x[:, a] % 2 == x[:, h] % 2).astype(np.float32)  # a pure interaction: needs the FM/DNN part
    rows = Rows(x, y, np.zeros(64, int), np.zeros(64, object), {})
    hist = train_ranker(model, rows, RerankTrainConfig(epochs=150, batch_size=64, lr=1e-2))
    assert hist["loss"][-1] < 0.1 < hist["initial_loss"]


def test_listwise_loss_is_softmax_cross_entropy_per_user() -> None:
    logits = torch.tensor([2.0, 0.5, -1.0, 0.3, 0.1, 3.0, -2.0])
    y = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    group = torch.tensor([4, 4, 4, 7, 7, 9, 9])  # user 7 bought nothing: left out
    expected = torch.stack([-torch.log_softmax(logits[:3], 0)[0],
                            -torch.log_softmax(logits[5:], 0).mean()]).mean()
    torch.testing.assert_close(listwise_loss(logits, y, group), expected)


def test_listwise_training_learns_the_order_within_users() -> None:
    model, x, a, rng = _tiny(200, low=8)  # negatives never share the bought category (7)
    group = np.repeat(np.arange(20), 10)
    y = np.zeros(200, np.float32)
    y[np.arange(20) * 10 + rng.integers(0, 10, 20)] = 1.0
    x[y == 1, a] = 7  # the bought item of every user has category id 7
    rows = Rows(x, y, group, np.zeros(200, object), {})
    hist = train_ranker(model, rows, RerankTrainConfig(epochs=40, batch_size=50, lr=1e-2, loss="listwise"))
    assert hist["loss"][-1] < 0.2 * hist["loss"][0]
    p = predict(model, x).reshape(20, 10)
    assert (p.argmax(1) == y.reshape(20, 10).argmax(1)).all() and model.out.task == "binary"
    with pytest.raises(ValueError, match="unknown ranker loss"):
        train_ranker(model, rows, RerankTrainConfig(epochs=1, loss="pairwise"))


def test_checkpoint_round_trip(tmp_path: Path, toy: tuple[TrainData, Path]) -> None:
    data, ckpt = toy
    rec = RerankRecommender(PopularityRecommender(None), ckpt, cfg=RankerConfig(0, 0, embedding_dim=8),
                            train=_tcfg(epochs=1, candidates=10)).fit(data)
    q = Query("u3", history=("i1",))
    before = rec.score(q, ["i1", "i2", "i3"])
    rec.save(tmp_path / "ranker.pt")
    model, cfg, payload = load_ranker(tmp_path / "ranker.pt")
    assert cfg == rec.cfg and payload["history"]["rows"]["label_cut"] == "2017-07-05"
    rec.model = model
    np.testing.assert_allclose(rec.score(q, ["i1", "i2", "i3"]), before, rtol=1e-6)
    # The harness entry rebuilds the saved configuration (and is absent before any `train ranker`).
    settings = Settings(run_dir=tmp_path / "runs")
    assert rerank_suite(settings, "rtr") == []
    (tmp_path / "runs" / "models").mkdir(parents=True)
    shutil.copyfile(ckpt, tmp_path / "runs" / "models" / "item_tower-rtr.pt")
    rec.save(settings.paths.ranker("rtr"), {"retriever": "occasion"})
    (entry,) = rerank_suite(settings, "rtr")
    assert isinstance(entry, RerankRecommender) and entry.cfg_overrides == rec.cfg and entry.tcfg == rec.tcfg
    assert entry.name == "rerank (occasion)"
    # On the window it was trained on, the harness reuses the saved weights; on any other it trains afresh.
    entry.retriever = PopularityRecommender(None)
    assert "reused" in entry.fit(data).history
    np.testing.assert_allclose(entry.score(q, ["i1", "i2", "i3"]), before, rtol=1e-6)
    shorter = TrainData(data.dataset, data.items, data.interactions[data.interactions["ts"] < "2017-07-05"],
                        data.users, data.cache_dir)
    assert "reused" not in entry.fit(shorter).history
    # The serving loader rebuilds features from the tables and scores exactly as the fitted recommender.
    scorer, payload = load_scorer(settings, "rtr", data)
    assert payload["retriever"] == "occasion"
    np.testing.assert_allclose(scorer.score(q, ["i1", "i2", "i3"]), before, rtol=1e-6)
    settings.paths.ranker("rtr").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="ranker"):
        load_scorer(settings, "rtr", data)


def test_reorder_keeps_unknown_items_in_their_slot(toy: tuple[TrainData, Path]) -> None:
    data, ckpt = toy
    rec = RerankRecommender(PopularityRecommender(None), ckpt, cfg=RankerConfig(0, 0, embedding_dim=8),
                            train=_tcfg(epochs=1, candidates=10)).fit(data)
    q = Query("u3", history=("i1",))
    order = rec.scorer.reorder(q, ["i1", "new-1", "i2", "i3", "new-2"])
    assert [i for i, _ in order][1] == "new-1" and order[4] == ("new-2", None)
    known = [(i, p) for i, p in order if p is not None]
    assert sorted(i for i, _ in known) == ["i1", "i2", "i3"]
    assert [p for _, p in known] == sorted((p for _, p in known), reverse=True)


class ListStage:
    """A retrieval stage serving a fixed list (or skipping when it has none)."""

    def __init__(self, name: str, items: list[str]) -> None:
        self.name, self.items = name, items

    def available(self) -> str | None:
        return None

    def recommend(self, request: StageRequest) -> list[Scored]:
        if not self.items:
            raise StageSkip("nothing")
        return [Scored(i, 1.0, self.name, f"from {self.name}") for i in self.items[: request.k]]


def test_rerank_stage_reorders_the_first_serving_retriever(toy: tuple[TrainData, Path]) -> None:
    data, ckpt = toy
    rec = RerankRecommender(PopularityRecommender(None), ckpt, cfg=RankerConfig(0, 0, embedding_dim=8),
                            train=_tcfg(epochs=1, candidates=10)).fit(data)
    cands = [f"i{n}" for n in range(12)] + ["posted-today"]
    stage = RerankStage(rec.scorer, [ListStage("content", []), ListStage("two_tower", cands)], candidates=13)
    request = StageRequest(k=13, history=("i1",), profile={"height_cm": 170.0})
    got = stage.recommend(request)
    q = Query("request", history=("i1",), profile={"height_cm": 170.0})
    assert [s.item_id for s in got] == [i for i, _ in rec.scorer.reorder(q, cands)]
    assert all(s.stage == "rerank" and s.reason.startswith("from two_tower") for s in got)
    assert got[-1].item_id == "posted-today" and got[-1].score is None and "reranker" not in got[-1].reason
    assert all("reordered by the reranker" in s.reason for s in got[:-1])
    with pytest.raises(StageSkip):
        RerankStage(rec.scorer, [ListStage("content", [])]).recommend(request)


def test_featuriser_marks_repurchases_and_retrieval_rank(toy: tuple[TrainData, Path]) -> None:
    data, ckpt = toy
    feat, _ = _featuriser(data, ckpt, RankerConfig(0, 0))
    stats = LogStats.build(data.interactions, feat.cat, 30)
    x = feat.rows(Query("u", history=("i2",)), ["i1", "i2"], np.array([1.0, 0.5], np.float32), stats)
    assert x[:, feat.layout["in_history"][0]].tolist() == [0.0, 1.0]
    assert x[:, feat.layout["retrieval_score"][0]].tolist() == [1.0, 0.5]
    assert ProfileScale.build(data.users).z("age", None) == 0.0
    assert predict(_featuriser(data, ckpt, RankerConfig(0, 0))[1], x).shape == (2,)
    # A catalogue row holds the item's STD ids: the mapped category of a dress is in its fields.
    cat: ItemFeatures = feat.cat
    assert feat.cat.fields[cat.index["i0"], 0] == build_vocab(load_schema()).std_id("category", "04onepiece_01dress")
