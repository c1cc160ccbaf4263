"""The ranking chain: candidate union, features with known answers, label periods without leakage, the DeepFM
(embedding transfer, overfitting, checkpoints) and its peers, the served stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from atelier.config import Settings
from atelier.models.item_tower import CheckpointError, ItemTower, save_checkpoint
from atelier.models.ranker import RankerConfig, build_ranker, load_ranker, projection, transfer_embeddings
from atelier.recommend.candidates import CandidateGenerator
from atelier.recommend.chain import RankedStage, Scored, StageRequest, reason_for
from atelier.recommend.encoder import tower_config
from atelier.recommend.features import build_features
from atelier.recommend.ranker import BestSourceScorer, DenseScale, prepare_dense
from atelier.recommend.ranking import RankedChain, RankingPipeline, RankingSpec, knows_nothing, load_chain
from atelier.recommend.sources import CoBought, Colourways, OwnItems, Popular
from atelier.recommender import Query, TrainData
from atelier.schema import load_schema
from atelier.train.ranker import ChainRecommender, RankerTrainConfig, clearly_better, period_starts, ranking_rows
from atelier.vocab import build_vocab

DAY = pd.Timestamp("2020-09-15")
CATS = ["Dress", "Trousers", "Sweater", "Top"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainData, Path]:
    """40 H&M-like items in 10 colourway groups, 30 shoppers over 4 days who buy within a group, and a
    tiny item tower."""
    items = pd.DataFrame({"item_id": [f"i{n:02d}" for n in range(40)],
                          "title": [f"{CATS[n % 4]} {n}" for n in range(40)],
                          "description": "", "group_id": [f"g{n // 4}" for n in range(40)], "price": np.nan,
                          "product_type_name": [CATS[n % 4] for n in range(40)],
                          "colour_group_name": ["Black", "White"] * 20, "graphical_appearance_name": "Solid",
                          "index_group_name": "Ladieswear", "section_name": "Womens", "index_name": "Ladieswear",
                          "product_group_name": "Garment Upper body", "garment_group_name": "Jersey Basic",
                          "department_name": "Jersey", "perceived_colour_value_name": "Dark",
                          "perceived_colour_master_name": "Black", "detail_desc": ""})
    rng = np.random.default_rng(0)
    rows = []
    for u in range(30):
        group = u % 10
        for d in range(4):
            for _ in range(int(rng.integers(0, 3))):
                rows.append((f"u{u}", f"i{group * 4 + int(rng.integers(0, 4)):02d}", DAY + pd.Timedelta(days=d),
                             10.0 + group))
    log = pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "price"])
    users = pd.DataFrame({"user_id": sorted(set(log["user_id"]))})
    folder = tmp_path_factory.mktemp("chain")
    vocab = build_vocab(load_schema())
    torch.manual_seed(0)
    tower = ItemTower(tower_config(vocab, d_model=32, n_heads=2, n_layers=1, out_dim=16))
    save_checkpoint(tower, folder / "tower.pt", vocab.to_dict(), {})
    return TrainData("hm", items, log, users, folder), folder / "tower.pt"


def _vectors(data: TrainData) -> np.ndarray:
    """Stand-in item vectors: items of one group point the same way (what a trained tower would learn)."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(10, 8))
    return np.stack([base[int(g[1:])] + 0.1 * rng.normal(size=8) for g in data.items["group_id"]]).astype(np.float32)


SPACES = {"item_tower": _vectors}


def _spec() -> RankingSpec:
    return RankingSpec.for_dataset("hm", ["item_tower"])


def test_union_keeps_every_sources_rank_and_score(toy: tuple[TrainData, Path]) -> None:
    data, _ = toy
    sources = [OwnItems(None), Colourways(None), CoBought(None), Popular(None)]
    gen = CandidateGenerator(sources, {"own": 5, "colourways": 5, "co-bought": 5, "popularity": 3}).fit(data)
    index = {i: n for n, i in enumerate(data.items["item_id"])}
    queries = [Query("u0", history=("i01",)), Query("new", cart=("i05",)), Query("nobody")]
    cands = gen.generate(queries, index)
    assert np.all(np.diff(cands.query) >= 0)  # grouped by query
    assert len(cands.per_query(3)[2]) == 3  # nobody: popularity only
    rows0 = cands.per_query(3)[0]
    own = {int(cands.item[r]): cands.rank[r, 0] for r in rows0 if not np.isnan(cands.rank[r, 0])}
    assert own == {1: 0.0}
    colour = sorted(int(cands.item[r]) for r in rows0 if not np.isnan(cands.rank[r, 1]))
    assert colour == [0, 2, 3]  # the other colourways of i01 (group g0)
    assert (cands.score[np.isnan(cands.rank)] == 0).all()
    assert cands.first_source()[rows0[0]] in range(4)


def test_features_have_their_known_values(toy: tuple[TrainData, Path]) -> None:
    data, _ = toy
    pipe = RankingPipeline(_spec(), SPACES).fit(data)
    u = next(u for u in pipe.snapshot.user_items if len(pipe.snapshot.user_items[u][0]) >= 2)  # type: ignore[union-attr]
    rows, counts, days = pipe.snapshot.user_items[u]  # type: ignore[union-attr]
    bought = str(pipe.item_ids[rows[0]])
    q = Query(u, history=(bought,))
    cands = pipe.candidates([q])
    x = pipe.features([q], cands)
    names = pipe.names
    assert x.shape == (len(cands), len(names))
    col = {n: j for j, n in enumerate(names)}
    mine = next(r for r in range(len(cands)) if pipe.item_ids[cands.item[r]] == bought)
    assert x[mine, col["bought_n"]] == counts[0] and x[mine, col["bought_days"]] == days[0]
    assert x[mine, col["same_group_n"]] == 1.0 and x[mine, col["n_seeds"]] == 1.0
    assert x[mine, col["sim_max:item_tower"]] == pytest.approx(1.0, abs=1e-5)  # itself
    groups = data.items["group_id"].to_numpy()
    other_group = [r for r in range(len(cands)) if groups[cands.item[r]] != groups[rows[0]]]
    assert (x[other_group, col["same_group_n"]] == 0).all()
    # a query without seeds has no similarity and no overlap
    empty = pipe.candidates([Query("nobody")])
    xe = build_features(pipe.snapshot, [Query("nobody")], empty)  # type: ignore[arg-type]
    assert (xe[:, col["sim_mean:item_tower"]] == 0).all() and (xe[:, col["bought_n"]] == 0).all()
    assert np.isnan(xe[:, col["price_vs_shopper"]]).all()


def test_label_periods_end_the_window_and_never_see_their_own_days(toy: tuple[TrainData, Path]) -> None:
    data, _ = toy
    starts = period_starts(data.interactions, 1.0, None)
    assert starts == [DAY + pd.Timedelta(days=d) for d in (1, 2, 3)]  # every day after the first
    assert period_starts(data.interactions, 1.0, 2) == starts[1:]
    rows = ranking_rows(data, _spec(), SPACES, RankerTrainConfig(negatives=5))
    assert [p.start for p in rows.periods] == starts and rows.y.sum() > 0
    for p in rows.periods:  # each period's pipeline knows only the days before it
        snap = p.pipeline.snapshot
        assert snap is not None
        before = data.interactions[data.interactions["ts"] < p.start]
        assert snap.pop_all.sum() == len(before)
    assert ranking_rows(data, _spec(), SPACES, RankerTrainConfig(negatives=5)) is rows  # built once per window


def _tiny(n: int, low: int = 4) -> tuple[object, np.ndarray, int, np.random.Generator]:
    cfg = RankerConfig(std_size=50, re_size=50, embedding_dim=8, dense=("a", "b"), transfer=False)
    model = build_ranker(cfg)
    rng = np.random.default_rng(0)
    width = max(b for _, b in model.feature_index.values())
    x = np.zeros((n, width), np.float32)
    a, _ = model.feature_index["item_category"]
    x[:, a] = rng.integers(low, 50, n)
    return model, x, a, rng


def test_deepfm_overfits_a_tiny_interaction() -> None:
    model, x, a, rng = _tiny(64)
    h, _ = model.feature_index["hist_std"]  # type: ignore[attr-defined]
    x[:, h] = rng.integers(1, 50, 64)
    y = torch.from_numpy((x[:, a] % 2 == x[:, h] % 2).astype(np.float32))  # a pure interaction
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # type: ignore[attr-defined]
    xt = torch.from_numpy(x)
    for _ in range(150):
        loss = torch.nn.functional.binary_cross_entropy(model(xt).squeeze(-1), y)  # type: ignore[operator]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1


def test_transfer_copies_exactly_the_vocabulary_rows() -> None:
    cfg = RankerConfig(std_size=30, re_size=20, embedding_dim=4)
    model = build_ranker(cfg)
    std, re = torch.randn(30, 6), torch.randn(20, 6)
    transfer_embeddings(model, {"emb_std.weight": std, "emb_re.weight": re}, cfg)
    proj = projection(std, 4)
    got = model.embedding_dict["std"].weight
    scale = float(got[5, 0] / (std @ proj)[5, 0])
    torch.testing.assert_close(got[1:], (std @ proj)[1:] * scale)
    assert got[0].abs().sum() == 0


def test_dense_inputs_are_finite_and_standardised() -> None:
    names = ["rank:own", "days_since_first", "score:own"]
    x = np.array([[0.0, np.nan, 1.0], [np.nan, 3.0, 0.0], [4.0, 0.0, 2.0]], np.float32)
    prepared = prepare_dense(names, x)
    assert np.isfinite(prepared).all()
    assert prepared[0, 0] == 1.0 and prepared[1, 0] == 0.0 and prepared[2, 0] == pytest.approx(0.2)
    assert prepared[0, 1] == 0.0 and prepared[2, 1] == 1.0  # never sold -> 0, sold today -> 1
    z = DenseScale.fit(prepared)(prepared)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-5)


@pytest.mark.parametrize("model", ["deepfm", "lightgbm-binary", "lightgbm-lambdarank", "union"])
def test_every_model_ranks_k_distinct_items(toy: tuple[TrainData, Path], model: str) -> None:
    data, ckpt = toy
    rec = ChainRecommender(model, _spec(), SPACES, ckpt, tcfg=RankerTrainConfig(epochs=1, trees=20, negatives=5),
                           cfg=RankerConfig(0, 0, embedding_dim=8)).fit(data)
    queries = [Query("u3", history=("i13", "i12")), Query("new", cart=("i20",)), Query("nobody")]
    ranked = rec.recommend(queries, 10)
    assert all(len(r) == 10 and len(set(r)) == 10 for r in ranked)
    assert rec.chain is not None and rec.chain.fallback in ("ranker", "popularity")
    if rec.chain.fallback == "popularity":
        assert ranked[2] == rec.chain.pipeline.popular[:10]


def test_pipeline_remembers_the_rows_of_recent_query_lists(toy: tuple[TrainData, Path]) -> None:
    data, _ = toy
    pipe = RankingPipeline(_spec(), SPACES).fit(data)
    built: list[int] = []
    generate = pipe.candidates
    pipe.candidates = lambda qs: built.append(len(qs)) or generate(qs)  # type: ignore[method-assign]
    queries = [Query("u3", history=("i13",)), Query("new", cart=("i20",))]
    pipe.rows(queries)
    pipe.rows(queries)
    assert built == [2, 2]  # serving's default: nothing kept between requests
    pipe.remember = 2
    first = pipe.rows(queries)
    again = pipe.rows(list(queries))  # an equal list: the same rows
    assert built == [2, 2, 2] and again[0] is first[0] and again[1] is first[1]
    pipe.rows([Query("u3", history=("i12",))])  # a different list is built ...
    pipe.rows([Query("nobody")])  # ... and the oldest of the three falls out
    pipe.rows(queries)
    assert built == [2, 2, 2, 1, 1, 2]


def test_best_source_scorer_orders_by_source_then_rank() -> None:
    class Cands:
        rank = np.array([[np.nan, 2.0], [0.0, np.nan], [1.0, 0.0], [np.nan, np.nan]], np.float32)

    scores = BestSourceScorer([0, 1]).predict([], Cands(), np.zeros((4, 0)))
    assert list(np.argsort(-scores)) == [1, 2, 0, 3]


def test_checkpoint_reuse_and_the_served_chain(tmp_path: Path, toy: tuple[TrainData, Path]) -> None:
    data, ckpt = toy
    settings = Settings(run_dir=tmp_path / "runs")
    (tmp_path / "runs" / "models").mkdir(parents=True)
    tower = settings.paths.item_tower("hm")
    tower.write_bytes(ckpt.read_bytes())
    tcfg = RankerTrainConfig(epochs=1, negatives=5)
    rec = ChainRecommender("deepfm", _spec(), SPACES, tower, tcfg=tcfg, cfg=RankerConfig(0, 0, embedding_dim=8),
                           saved=settings.paths.ranker("hm"), save=True).fit(data)
    assert settings.paths.ranker("hm").is_file() and "reused" not in rec.history
    q = [Query("u3", history=("i13",)), Query("new", cart=("i20",))]
    before = rec.recommend(q, 8)
    again = ChainRecommender("deepfm", _spec(), SPACES, tower, tcfg=tcfg, saved=settings.paths.ranker("hm")).fit(data)
    assert "reused" in again.history and again.recommend(q, 8) == before  # the same window: reused, same answers
    shorter = TrainData("hm", data.items, data.interactions[data.interactions["ts"] < DAY + pd.Timedelta(days=3)],
                        data.users, data.cache_dir)
    assert "reused" not in ChainRecommender("deepfm", _spec(), SPACES, tower, tcfg=tcfg,
                                            saved=settings.paths.ranker("hm")).fit(shorter).history
    _, _, payload = load_ranker(settings.paths.ranker("hm"))
    assert payload["spec"] == _spec().to_dict() and len(payload["names"]) == len(payload["scale"]["mean"])
    settings.paths.ranker("hm").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_chain(settings, "hm", data)


def test_ranked_stage_serves_the_chain_with_plain_reasons(toy: tuple[TrainData, Path]) -> None:
    data, ckpt = toy
    rec = ChainRecommender("union", _spec(), SPACES, ckpt, tcfg=RankerTrainConfig(negatives=5)).fit(data)
    assert rec.chain is not None
    chain = RankedChain(rec.chain.pipeline, rec.chain.scorer, "popularity")
    stage = RankedStage(chain)
    got = stage.recommend(StageRequest(k=6, cart=("i20",), exclude=frozenset({"i20"})))
    assert len(got) == 6 and "i20" not in {s.item_id for s in got} and all(s.stage == "ranked" for s in got)
    assert any("your cart" in s.reason for s in got) and not any("bought it before" in s.reason for s in got)
    assert reason_for("own", Query("u", history=("i1",))) == "you bought it before"
    assert knows_nothing(Query("x")) and not knows_nothing(Query("x", context="wedding"))


class NearStage:
    """A retrieval stage answering a fixed list (the content kNN of the service, without a store)."""

    name = "content"

    def __init__(self, items: list[str]) -> None:
        self.items = items
        self.asked = 0

    def available(self) -> str | None:
        return None

    def recommend(self, request: StageRequest) -> list[Scored]:
        self.asked += 1
        return [Scored(i, 1.0 - n / 100, self.name, "similar") for n, i in enumerate(self.items[: request.k])]


def test_a_posted_product_keeps_its_retrieval_slot_in_the_ranked_stage(toy: tuple[TrainData, Path]) -> None:
    data, ckpt = toy
    rec = ChainRecommender("union", _spec(), SPACES, ckpt, tcfg=RankerTrainConfig(negatives=5)).fit(data)
    assert rec.chain is not None
    near = NearStage(["i21", "posted-1", "i22", "i23"])
    stage = RankedStage(rec.chain, retrieval=near)
    request = StageRequest(k=6, cart=("i20",), exclude=frozenset({"i20"}))
    before = stage.recommend(request)
    assert near.asked == 0 and "posted-1" not in {s.item_id for s in before}  # nothing posted: no extra query
    stage.add_item("i21")  # already in the chain's catalogue: the chain ranks it itself
    stage.add_item("posted-1")
    got = stage.recommend(request)
    assert [s.item_id for s in got].index("posted-1") == 1 and len(got) == 6
    assert got[1].source == "new:posted" and "your cart" in got[1].reason and "i21" not in stage.posted
    assert [s.item_id for s in got if s.item_id != "posted-1"] == [s.item_id for s in before][:5]
    stage.recommend(StageRequest(k=6))  # a shopper with nothing to be near: retrieval is not asked
    assert near.asked == 1
    stage.remove_item("posted-1")
    assert "posted-1" not in {s.item_id for s in stage.recommend(request)} and near.asked == 1


def test_the_fallback_takes_the_ranker_only_when_it_is_clearly_better() -> None:
    """A small average gain with a wide spread is noise: new shoppers keep popularity."""
    rng = np.random.default_rng(0)
    base = rng.random(400)
    assert clearly_better(base + 0.05, base)  # every shopper gains
    noisy = base + rng.normal(0.005, 0.3, 400)  # a higher mean, but within the noise
    assert noisy.mean() > base.mean() and not clearly_better(noisy, base)
    assert not clearly_better(base, base) and not clearly_better(base[:1] + 1, base[:1])
