"""Two-tower retrieval end to end on a tiny real H&M run: train, index the keys in the real store, retrieve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from atelier.cli import app
from atelier.config import Settings
from atelier.pipeline.user_tower import index_user_stage, train_user_stage
from atelier.recommend.chain import StageRequest
from atelier.recommend.user_tower import retrieve, serving_retriever
from atelier.recommender import Query
from atelier.store import open_store
from atelier.store.pointers import live_model_id
from atelier.train.user import TrainUserConfig
from tests.helpers import build_tiny_run

TINY = TrainUserConfig(epochs=1, batch_size=64, n_sampled=64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Settings:
    """A tiny run with its user tower trained and its keys indexed."""
    settings = build_tiny_run(tmp_path_factory.getbasetemp() / "two-tower-run", data_dir)
    train_user_stage(settings, "hm", TINY)
    report = index_user_stage(settings, "hm")
    assert report["ok"], report["problems"]
    return settings


def test_training_is_cached_and_the_checkpoint_describes_its_window(trained: Settings) -> None:
    path = trained.paths.user_tower("hm")
    before = path.stat().st_mtime_ns
    _, history = train_user_stage(trained, "hm", TINY)  # same log, vectors and config: reloaded, not retrained
    assert history["epochs"][0]["epoch"] == 0 and "best_epoch" in history
    cached = list((trained.paths.features / "user_towers").glob("hm-*.pt"))
    assert len(cached) == 1
    import torch

    payload = torch.load(path, weights_only=False)
    # Trained on the evaluation split's training window only: nothing from the test days.
    assert payload["train_window"][1] < "2020-09-19"
    assert path.stat().st_mtime_ns >= before


def test_store_retrieval_matches_brute_force_and_excludes_history(trained: Settings) -> None:
    retriever = serving_retriever(trained, "hm")
    model_id = live_model_id(trained.paths, "hm", "two_tower")
    assert model_id.startswith("two_tower:hm:")
    log = pd.read_parquet(trained.paths.dataset("hm") / "interactions.parquet")
    user = str(log["user_id"].value_counts().index[0])
    history = tuple(dict.fromkeys(log.loc[log["user_id"].astype(str) == user, "item_id"].astype(str)))
    query = Query(user_id=user, history=history)
    with open_store(trained, pool_size=1) as store:
        hits = retrieve(store, model_id, retriever, query, 20, exclude_history=True)
        assert store.model(model_id).dim == retriever.keys.shape[1]  # type: ignore[union-attr]
    ids = [i for i, _ in hits]
    assert len(ids) == 20 == len(set(ids)) and not set(ids) & set(history)
    # The store ranks by the same inner product as a brute-force scan of the keys.
    vector = retriever.user_vectors([query])[0][0]
    assert retriever.keys is not None
    scores = retriever.keys @ vector
    scores[[retriever.item_index[i] for i in history]] = -np.inf
    exact = [str(retriever.item_ids[j]) for j in np.argsort(-scores)[:20]]
    assert len(set(ids) & set(exact)) >= 18
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)


def test_reindex_is_skipped_for_an_indexed_checkpoint(trained: Settings) -> None:
    report = index_user_stage(trained, "hm", force=False)
    assert report.get("reused") is True
    pointer = json.loads((trained.run_dir / "index" / "hm-two_tower.json").read_text())
    assert pointer["model_id"] == report["model_id"]


def test_recommend_cli_for_a_user_and_an_anonymous_shopper(trained: Settings) -> None:
    runner = CliRunner()
    log = pd.read_parquet(trained.paths.dataset("hm") / "interactions.parquet")
    user = str(log["user_id"].iloc[0])
    common = ["--run-dir", str(trained.run_dir), "--data-dir", str(trained.data_dir), "-d", "hm", "-k", "5"]
    known = runner.invoke(app, ["recommend", "--user", user, *common])
    assert known.exit_code == 0, known.output
    assert f"top 5 for user {user}" in known.output
    anonymous = runner.invoke(app, ["recommend", "--height", "170", "--context", "summer dress", *common])
    assert anonymous.exit_code == 0, anonymous.output
    assert "anonymous" in anonymous.output and "height_cm 170" in anonymous.output
    unknown = runner.invoke(app, ["recommend", "--user", "no-such-user", *common])
    assert unknown.exit_code == 1 and "unknown user" in unknown.output


def test_service_serves_two_tower_and_indexes_new_products_in_its_keys(trained: Settings) -> None:
    from fastapi.testclient import TestClient

    from atelier.serve.app import create_app
    from atelier.serve.service import RecommendService
    from tests.helpers import API_KEY, product

    settings = trained.model_copy(update={"api_key": API_KEY})
    service = RecommendService(settings, warm_up=False)
    try:
        assert service.stage_status["two_tower"] == "registered"
        log = pd.read_parquet(trained.paths.dataset("hm") / "interactions.parquet")
        user = str(log["user_id"].iloc[0])
        with TestClient(create_app(settings, service=service)) as client:
            # A known user: content serves first (see PREFERENCE); a body profile alone: the user tower.
            answer = client.post("/recommend", json={"user_id": user, "k": 5})
            assert answer.status_code == 200 and answer.json()["stage"] == "content", answer.text
            profile_only = client.post("/recommend", json={"profile": {"height_cm": 168, "age": 30}, "k": 5})
            assert profile_only.status_code == 200, profile_only.text
            assert profile_only.json()["stage"] == "two_tower" and len(profile_only.json()["items"]) == 5
            # Free-text contexts reach the user tower through an in-memory table: no cache file per request.
            stage = next(st for st in service.stages if st.name == "two_tower")
            before = sorted((trained.paths.features).glob("minilm-*.npy"))
            assert stage.recommend(StageRequest(k=5, context="linen trousers for a summer wedding"))
            assert sorted((trained.paths.features).glob("minilm-*.npy")) == before
            created = client.post("/items", json=product("tt-new-1"), headers={"X-API-Key": API_KEY})
            assert created.status_code in (200, 201), created.text
        model_id = live_model_id(trained.paths, "hm", "two_tower")
        with open_store(trained, pool_size=1) as store:
            key = store.get_vector(model_id, "tt-new-1")
            assert key.shape == (store.model(model_id).dim,) and key[-1] == 0.0  # no interactions yet: b = 0
            assert store.delete_item("tt-new-1")
    finally:
        service.close()
