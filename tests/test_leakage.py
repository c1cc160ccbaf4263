"""Nothing a model sees may come from the test window (``pytest -k leak``).

Two copies of a real slice of each dataset differ only after the default cut: in the second, the test
window's rows are given to other shoppers (items shuffled across buyers), their prices are tripled, the
renters' stated profiles change, and new shoppers buy random items. The whole pipeline runs on each
copy (ingest, vocabulary, item tower, user tower, ranker, index) and the harness's inputs and every
model's predictions for the same queries must be identical. This is the test that failed while H&M
article prices were medians over all transactions (test days included).
"""

from __future__ import annotations

import gzip
import shutil
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from atelier.config import Settings
from atelier.datasets import build_queries, cart_queries, rules_for, time_split, train_data
from atelier.ingest import load_tables
from atelier.recommender import Query
from atelier.train.ranker import RankerTrainConfig

# The chain's rows and trees on a small budget: the same code, fewer shoppers and steps.
TINY_RANKER = RankerTrainConfig(label_periods=2, epochs=1, max_queries=300, trees=20)
CUT = {name: pd.Timestamp(rules_for(name).cut) for name in ("hm", "rtr")}


def _keep(ids: pd.Series, every: int) -> pd.Series:
    """A stable pseudo-random 1/``every`` of the ids (crc32, the same on every machine)."""
    return ids.map(lambda s: zlib.crc32(str(s).encode()) % every == 0)


def _hm_slice(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    articles = pd.read_csv(data_dir / "hm" / "articles.csv.gz", dtype=str)
    tx = pd.read_csv(data_dir / "hm" / "transactions.csv.gz", dtype=str)
    tx = tx[_keep(tx["customer_id"], 40)]
    bought = set(tx["article_id"])
    articles = articles[articles["article_id"].isin(bought) | (articles.index < 800)]
    return articles, tx


def _rtr_slice(data_dir: Path) -> pd.DataFrame:
    rentals = pd.read_csv(data_dir / "rtr" / "rentals.csv.gz", dtype=str)
    return rentals[_keep(rentals["user_id"], 40)]


def _alter(rows: pd.DataFrame, when: pd.Series, user: str, rng: np.random.Generator) -> pd.DataFrame:
    """Shuffle which shopper bought which test row, and add new shoppers buying items of the catalogue
    (rows of any day, moved into the test window) then."""
    rows = rows.copy()
    test = rows.index[when]
    rows.loc[test, user] = rng.permutation(rows.loc[test, user].to_numpy())
    extra = rows.sample(n=120, random_state=1).copy()
    extra[user] = [f"newshopper{n}" for n in range(len(extra))]
    day = next(c for c in ("t_dat", "review_date") if c in rows.columns)
    extra[day] = rng.choice(rows.loc[test, day].to_numpy(), size=len(extra))
    return pd.concat([rows, extra], ignore_index=True)


def _write(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        frame.to_csv(fh, index=False)


def _copies(root: Path, data_dir: Path) -> tuple[Path, Path]:
    """The real slice and its copy with an altered test window."""
    rng = np.random.default_rng(0)
    articles, tx = _hm_slice(data_dir)
    rentals = _rtr_slice(data_dir)
    real, altered = root / "real", root / "altered"
    for folder in (real, altered):
        _write(articles, folder / "hm" / "articles.csv.gz")
    _write(tx, real / "hm" / "transactions.csv.gz")
    _write(rentals, real / "rtr" / "rentals.csv.gz")

    when = pd.to_datetime(tx["t_dat"]) >= CUT["hm"]
    tx2 = _alter(tx, when, "customer_id", rng)
    later = pd.to_datetime(tx2["t_dat"]) >= CUT["hm"]
    tx2.loc[later, "price"] = (tx2.loc[later, "price"].astype(float) * 3).map(repr)
    _write(tx2, altered / "hm" / "transactions.csv.gz")

    when = pd.to_datetime(rentals["review_date"]) >= CUT["rtr"]
    rentals2 = _alter(rentals, when, "user_id", rng)
    later = pd.to_datetime(rentals2["review_date"]) >= CUT["rtr"]
    rentals2.loc[later, "weight_lbs"] = (pd.to_numeric(rentals2.loc[later, "weight_lbs"]) + 11).astype(str)
    rentals2.loc[later, "body_type"] = "athletic"
    # items RentTheRunway first rents in the test window: its catalogue is known only through rentals
    fresh = rentals2[later].head(40).copy()
    fresh["item_id"] = [f"99999{n:02d}" for n in range(len(fresh))]
    rentals2 = pd.concat([rentals2, fresh], ignore_index=True)
    _write(rentals2, altered / "rtr" / "rentals.csv.gz")
    return real, altered


def _pipeline(settings: Settings, minilm_cache: Path | None) -> None:
    """The main job's stages on tiny configurations (the same code, fewer steps)."""
    from atelier.cli import run_ingest, run_vocab
    from atelier.pipeline.item_tower import encode_stage, index_stage, train_item_stage
    from atelier.pipeline.ranker import train_ranker_stage
    from atelier.pipeline.user_tower import index_user_stage, train_user_stage
    from atelier.train.item import TrainItemConfig
    from atelier.train.user import TrainUserConfig

    run_ingest(settings, ["hm", "rtr"])
    run_vocab(settings, ["hm", "rtr"])
    features = settings.paths.features
    if minilm_cache is not None:  # the catalogue text is the same in both copies: encode it once
        features.mkdir(parents=True, exist_ok=True)
        for f in minilm_cache.glob("minilm-*.npy"):
            shutil.copy(f, features / f.name)
    train_item_stage(settings, "hm", TrainItemConfig(epochs=1, batch_size=128), d_model=32, n_heads=2,
                     n_layers=1, out_dim=16)
    encode_stage(settings, "hm")
    index_stage(settings, "hm")
    for name in ("hm", "rtr"):
        train_user_stage(settings, name, TrainUserConfig(epochs=1, batch_size=128, val_max_examples=500))
        index_user_stage(settings, name)
        train_ranker_stage(settings, name, TINY_RANKER)


@pytest.fixture(scope="module")
def leak_runs(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> tuple[Settings, Settings]:
    root = tmp_path_factory.mktemp("leak")
    real, altered = _copies(root, data_dir)
    runs = []
    for name, folder in (("real", real), ("altered", altered)):
        settings = Settings.model_validate({"data_dir": folder, "run_dir": root / f"runs-{name}", "DATABASE_URL": ""})
        _pipeline(settings, runs[0].run_dir / "features" if runs else None)
        runs.append(settings)
    return runs[0], runs[1]


def _queries(settings: Settings, dataset: str) -> list[Query]:
    _, inter, users = load_tables(settings.paths.dataset(dataset))
    split = time_split(dataset, inter)
    return build_queries(split, users)[0] + cart_queries(split)[0]


@pytest.mark.parametrize("dataset", ["hm", "rtr"])
def test_no_leak_into_training_data(leak_runs: tuple[Settings, Settings], dataset: str) -> None:
    """The catalogue, window and users a model is fitted on are the same whatever the test window holds."""
    views = []
    for settings in leak_runs:
        items, inter, users = load_tables(settings.paths.dataset(dataset))
        views.append(train_data(time_split(dataset, inter), items, users, settings.paths.features))
    real, altered = views
    for table in ("items", "interactions", "users"):
        pd.testing.assert_frame_equal(getattr(real, table), getattr(altered, table), obj=f"{dataset} {table}")
    if dataset == "hm":  # the slice has priced and unpriced articles: prices come from the window's sales
        assert real.items["price"].notna().any() and real.items["price"].isna().any()


@pytest.mark.parametrize("dataset", ["hm", "rtr"])
def test_no_leak_into_predictions(leak_runs: tuple[Settings, Settings], dataset: str) -> None:
    """Every model of the report, fitted on each copy, ranks the same items for the same shoppers."""
    from atelier.pipeline.suites import model_suite

    queries = _queries(leak_runs[0], dataset)
    assert (any(q.history for q in queries) and any(q.cart for q in queries)) or dataset == "rtr"
    suites = [model_suite(s, dataset, tcfg=TINY_RANKER) for s in leak_runs]
    names = [r.name for r in suites[0]]
    assert names == [r.name for r in suites[1]]
    assert {"rules", "atelier", "lightgbm (lambdarank)", "union"} <= set(names)
    data = []
    for settings in leak_runs:
        items, inter, users = load_tables(settings.paths.dataset(dataset))
        data.append(train_data(time_split(dataset, inter), items, users, settings.paths.features))
    for real, altered in zip(*suites, strict=True):
        ranked = [rec.fit(d).recommend(queries, 50) for rec, d in ((real, data[0]), (altered, data[1]))]
        changed = [q.user_id for q, a, b in zip(queries, *ranked, strict=True) if a != b]
        assert not changed, f"{dataset} {real.name}: {len(changed)}/{len(queries)} rankings depend on the test window"
