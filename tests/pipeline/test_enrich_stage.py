"""The enrichment stage of ``atelier run`` on a 60-article H&M slice: shipped hits, CPU misses, budget, resume."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from atelier.catalogue import dataset_items
from atelier.config import Settings
from atelier.enrich import EnrichOptions, load_products
from atelier.enrich.core import prepare
from atelier.enrich.fieldwise import KeywordThenNearestExtractor
from atelier.enrich.hybrid import HybridExtractor
from atelier.enrich.shipped import write_shipped
from atelier.ingest import ingest, load_tables
from atelier.pipeline.enrich import enrich_stage
from atelier.schema import load_schema
from tests.helpers import write_head

N = 60  # articles in the slice
MARK = "from the shipped file"  # an RE phrase only the shipped file has


def _toy_encode(texts: list[str]) -> np.ndarray:
    """Deterministic unit vectors from a text hash: MiniLM's shape without loading it (keeps the test fast)."""
    rows = [np.frombuffer(hashlib.sha256(t.encode()).digest(), dtype=np.uint8).astype(np.float32) - 127.5
            for t in texts]
    x = np.stack(rows) if rows else np.zeros((0, 32), np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-6)


def _hybrid(settings: Settings) -> HybridExtractor:
    """The packaged hybrid configuration with the toy encoder behind its MiniLM source."""
    return HybridExtractor(settings=settings, backends={"keyword-minilm": KeywordThenNearestExtractor(
        encode=_toy_encode)})


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """The first ``N`` H&M articles and some transactions, ingested once into a folder the tests copy."""
    root = tmp_path_factory.mktemp("enrich-stage")
    write_head(data_dir / "hm" / "articles.csv.gz", root / "src" / "hm" / "articles.csv.gz", N)
    write_head(data_dir / "hm" / "transactions.csv.gz", root / "src" / "hm" / "transactions.csv.gz", 50)
    ingest("hm", root / "src" / "hm", root / "data")
    return root


def _settings(source: Path, run_dir: Path) -> Settings:
    return Settings.model_validate({"run_dir": run_dir, "data_dir": source / "src",
                                    "enriched_dir": run_dir / "enriched"})


def _link_data(source: Path, settings: Settings) -> None:
    settings.paths.dataset("hm").parent.mkdir(parents=True, exist_ok=True)
    settings.paths.dataset("hm").symlink_to(source / "data" / "hm", target_is_directory=True)


def _ship_first_half(settings: Settings) -> list[str]:
    """A shipped file made the way ``bench_enrich_gpu.py ship`` makes it, for the first half of the slice; the
    first product's record gets a marker RE phrase. Returns the ids of the products the file answers."""
    schema, options = load_schema(), EnrichOptions()
    products = load_products(settings, "hm", None, schema)
    hybrid = _hybrid(settings)
    write_shipped(products[: N // 2], hybrid, schema, options, settings.enriched_dir, "hm-enriched", "hm")
    path = settings.enriched_dir / "hm-enriched.jsonl.gz"
    first = prepare(products[0], schema, options).input_hash
    with gzip.open(path, "rt") as fh:
        lines = [json.loads(line) for line in fh]
    for rec in lines:
        if rec["h"] == first:
            rec["r"]["vibe"] = [MARK]
    with gzip.open(path, "wt") as fh:
        fh.writelines(json.dumps(rec) + "\n" for rec in lines)
    shipped = {rec["h"] for rec in lines}
    return [p.item_id for p in products if prepare(p, schema, options).input_hash in shipped]


def _enriched(settings: Settings) -> dict[str, Any]:
    items = load_tables(settings.paths.dataset("hm"))[0]
    return {i.item_id: i for i in dataset_items(items, "hm", enriched=settings.paths.items("hm", "enriched"))}


def test_shipped_hits_then_cpu_then_resume(source: Path, tmp_path: Path) -> None:
    settings = _settings(source, tmp_path / "runs")
    _link_data(source, settings)
    shipped_ids = _ship_first_half(settings)
    calls: list[tuple[int, int]] = []
    report = enrich_stage(settings, "hm", 600.0, lambda done, total: calls.append((done, total)),
                          extractor=_hybrid(settings))
    counts = report["counts"]
    assert report["shipped_file"]["matches_this_config"]
    assert counts["shipped"] == len(shipped_ids) >= N // 2
    assert counts["cpu"] == N - len(shipped_ids) and counts["unreached"] == 0 and report["not_reached"] == []
    assert report["asked_on_cpu"] <= counts["cpu"] and report["errors"] == 0
    assert calls[-1] == (N, N)
    # the file is what dataset_items reads: every product enriched, the shipped record used as shipped
    lines = settings.paths.items("hm", "enriched").read_text().splitlines()
    assert len(lines) == N
    items = _enriched(settings)
    first = load_products(settings, "hm", 1)[0]
    assert items[first.item_id].reinforced_feature_value["vibe"] == [MARK]
    assert items[first.item_id].clothes["color"] == first.known["color"]  # columns first
    assert all(items[i].reinforced_feature_value for i in items)  # grounded RE phrases from the CPU path too
    assert any("season" in items[i].clothes for i in items if i not in shipped_ids)  # STD fields the columns lack
    assert json.loads(Path(report["report"]).read_text())["counts"] == counts
    # a rerun takes every CPU answer from the enrichment cache
    again = enrich_stage(settings, "hm", 600.0, False, extractor=_hybrid(settings))
    assert again["counts"] == {"shipped": counts["shipped"], "cache": counts["cpu"], "cpu": 0, "unreached": 0}


def test_exhausted_budget_lists_unreached_products_then_resumes(source: Path, tmp_path: Path) -> None:
    settings = _settings(source, tmp_path / "runs")
    _link_data(source, settings)
    shipped_ids = _ship_first_half(settings)
    report = enrich_stage(settings, "hm", 0.0, False, extractor=_hybrid(settings))
    missing = sorted(set(p.item_id for p in load_products(settings, "hm")) - set(shipped_ids))
    assert report["counts"]["cpu"] == 0 and sorted(report["not_reached"]) == missing
    assert report["not_reached_why"] and report["counts"]["unreached"] == len(missing)
    on_disk = json.loads(Path(report["report"]).read_text())
    assert sorted(on_disk["not_reached"]) == missing
    # unreached products keep their column attributes: no RE, no model STD values
    items = _enriched(settings)
    assert len(settings.paths.items("hm", "enriched").read_text().splitlines()) == len(shipped_ids)
    assert all(not items[i].reinforced_feature_value and "season" not in items[i].clothes for i in missing)
    # the next run with time enriches them
    done = enrich_stage(settings, "hm", 600.0, False, extractor=_hybrid(settings))
    assert done["counts"]["cpu"] == len(missing) and done["not_reached"] == []


def test_shipped_file_of_another_configuration_is_not_used(source: Path, tmp_path: Path) -> None:
    settings = _settings(source, tmp_path / "runs")
    _link_data(source, settings)
    _ship_first_half(settings)
    manifest = settings.enriched_dir / "hm-enriched.manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "model_id": "hybrid@00000000"}))
    report = enrich_stage(settings, "hm", 600.0, False, extractor=_hybrid(settings))
    assert report["counts"]["shipped"] == 0 and report["counts"]["cpu"] == N
    assert report["shipped_file"]["matches_this_config"] is False
