"""Builders several test modules share (tests import these, never each other)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd
import torch

from atelier.catalogue import column_items
from atelier.config import Settings
from atelier.datasets import rules_for
from atelier.evaluate import evaluate, write_report
from atelier.ingest import ingest, load_tables
from atelier.models.item_tower import ItemTower, save_checkpoint
from atelier.pipeline.item_tower import encode_stage, index_stage
from atelier.recommend.baselines import PopularityRecommender, RandomRecommender
from atelier.recommend.content import ItemTowerRecommender
from atelier.recommend.encoder import file_id, tower_config
from atelier.recommend.sources import RulesRecommender
from atelier.schema import load_schema
from atelier.vocab import build_vocab


def write_head(src: Path, dst: Path, lines: int) -> Path:
    """Copy the header and the first ``lines`` rows of a (gzipped) CSV into ``dst``."""
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rt", encoding="utf-8") as fh:
        head = [next(fh) for _ in range(lines + 1)]
    dst.parent.mkdir(parents=True, exist_ok=True)
    out_opener = gzip.open if dst.suffix == ".gz" else open
    with out_opener(dst, "wt", encoding="utf-8") as fh:
        fh.writelines(head)
    return dst


N_ARTICLES = 400  # enough for categories, colours and a popular list; MiniLM encodes it in ~2 s


API_KEY = "test-key-0123456789"


def build_tiny_run(run_dir: Path, data_dir: Path) -> Settings:
    """A run folder with an ingested H&M slice, a small item tower and its vectors indexed (idempotent)."""
    settings = Settings.model_validate({"run_dir": run_dir, "data_dir": run_dir / "source", "DATABASE_URL": "",
                                        "api_key": API_KEY})
    if (run_dir / "index" / "hm.json").is_file():
        return settings
    source = run_dir / "source" / "hm"
    source.mkdir(parents=True)
    with gzip.open(data_dir / "hm" / "articles.csv.gz", "rt", encoding="utf-8") as fh:
        head = [next(fh) for _ in range(N_ARTICLES + 1)]
    with gzip.open(source / "articles.csv.gz", "wt", encoding="utf-8") as fh:
        fh.writelines(head)
    ids = {line.split(",", 1)[0] for line in head[1:]}
    tx = pd.read_csv(data_dir / "hm" / "transactions.csv.gz", dtype=str)
    tx[tx["article_id"].isin(ids)].to_csv(source / "transactions.csv.gz", index=False, compression="gzip")
    ingest("hm", source, run_dir / "data")
    items = load_tables(settings.paths.dataset("hm"))[0]
    vocab = build_vocab(load_schema(), column_items(items, "hm"))
    vocab.save(settings.paths.vocab)
    torch.manual_seed(0)
    tower = ItemTower(tower_config(vocab, d_model=32, n_heads=2, n_layers=1, head_blocks=1, out_dim=32)).eval()
    save_checkpoint(tower, settings.paths.item_tower("hm"), vocab.to_dict(), {"dataset": "hm"})
    encode_stage(settings, "hm")
    report = index_stage(settings, "hm")
    assert report["ok"], report["problems"]
    return settings


def product(item_id: str, **extra: object) -> dict[str, object]:
    """A new product as a merchandiser would post it."""
    body: dict[str, object] = {
        "item_id": item_id, "title": "Emerald satin slip dress",
        "description": "Bias-cut midi slip dress in green satin with narrow adjustable straps.",
        "columns": {"product_type_name": "Dress", "colour_group_name": "Green"}, "price": 0.05,
    }
    return {**body, **extra}


def write_evaluation(settings: Settings) -> Path:
    """A real report of the harness on the tiny run, plots beside it (idempotent): two baselines, random, and
    the tiny item tower under the served chain's name (training the DeepFM chain is the ranker tests' job)."""
    path = settings.paths.evaluation_report("hm")
    if path.is_file():
        return path
    window, tower = rules_for("hm").popularity_days, settings.paths.item_tower("hm")
    suite = [RandomRecommender(), PopularityRecommender(window), RulesRecommender(window),
             ItemTowerRecommender(tower, window_days=window, name="atelier",
                                  vectors_file=settings.paths.vectors("hm", file_id(tower)))]
    report = evaluate("hm", settings.paths.dataset("hm"), suite, settings.paths.features)
    return write_report(report, settings.paths.reports)
