"""Ranked search (``GET /items?query=``): latency of each part and top-10 relevance on an indexed run folder.

Queries come from the catalogue itself (fixed seed): H&M product types ("bikini top"), colour + product type
("black coat"), the same with one letter dropped from the longest word (typos), and product names. Each query
is answered twice, interleaved: by text alone (``rank_items`` without vector hits) and fused as the route does
(the query encoded as an item by the live item tower, HNSW top 100, ``rank_items``). Latency is wall time in
this process against the store (no HTTP), per part: encoding (torch on one thread, as a served worker), vector
search, text search + fusion.

Relevance: precision@10 = items in the top 10 whose H&M product type (and colour, for colour + type) is the
query's, over min(10, such items in the catalogue); a typo is scored against the query it misspells. Three
named queries list their top 10.

    python -m benchmarks.bench_search --run-dir runs --label full     # the run folder `atelier run` indexed
    python -m benchmarks.bench_search --run-dir /tmp/search-slice --slice-every 40 --label slice
      # builds the run first: every 40th H&M product code, an untrained item tower (latency only for the vector)

Results are merged into ``benchmarks/results/search-<date>.json`` under ``--label``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from atelier.config import Settings
from atelier.datasets import load_current, rules_for
from atelier.recommend.chain import popular_lists
from atelier.recommend.encoder import ItemEncoder, file_id
from atelier.serve.routes.items import VECTOR_DEPTH, query_item
from atelier.serve.service import SERVE_TORCH_THREADS
from atelier.store import SearchFilters, open_store
from atelier.store.items import catalogue_facts, rank_items, read_catalogue_facts
from atelier.store.pointers import live_model_id
from benchmarks.bench_store import git_commit, machine

ROOT = Path(__file__).resolve().parents[1]
NAMED = ("bikini top", "black wool coat", "bikni top")


def build_slice_run(run_dir: Path, data_dir: Path, every: int) -> Settings:
    """Ingest every ``every``-th H&M product, an untrained item tower (default size), encode and index."""
    from atelier.catalogue import column_items
    from atelier.ingest import ingest, load_tables
    from atelier.models.item_tower import ItemTower, save_checkpoint
    from atelier.pipeline.item_tower import encode_stage, index_stage
    from atelier.recommend.encoder import tower_config
    from atelier.schema import load_schema
    from atelier.vocab import build_vocab

    settings = Settings.model_validate({"run_dir": run_dir, "data_dir": run_dir / "source", "DATABASE_URL": ""})
    if (run_dir / "index" / "hm.json").is_file():
        return settings
    source = run_dir / "source" / "hm"
    source.mkdir(parents=True, exist_ok=True)
    articles = pd.read_csv(data_dir / "hm" / "articles.csv.gz", dtype=str)
    articles = articles[articles["product_code"].astype(int) % every == 0]
    articles.to_csv(source / "articles.csv.gz", index=False, compression="gzip")
    with gzip.open(data_dir / "hm" / "transactions.csv.gz", "rt") as fh:
        tx = pd.read_csv(fh, dtype=str)
    tx[tx["article_id"].isin(set(articles["article_id"]))].to_csv(source / "transactions.csv.gz", index=False,
                                                                  compression="gzip")
    ingest("hm", source, run_dir / "data")
    vocab = build_vocab(load_schema(), column_items(load_tables(settings.paths.dataset("hm"))[0], "hm"))
    vocab.save(settings.paths.vocab)
    torch.manual_seed(0)
    tower = ItemTower(tower_config(vocab)).eval()
    save_checkpoint(tower, settings.paths.item_tower("hm"), vocab.to_dict(), {"dataset": "hm"})
    encode_stage(settings, "hm")
    report = index_stage(settings, "hm")
    assert report["ok"], report["problems"]
    return settings


def make_queries(items: pd.DataFrame, n_per_kind: int, seed: int) -> list[dict[str, Any]]:
    """Type, colour + type, typo and product-name queries with what a relevant item has."""
    rng = np.random.default_rng(seed)
    types = items["product_type_name"].value_counts()
    types = [t for t, c in types.items() if c >= 5 and t != "Unknown"]
    pairs = items.groupby(["colour_group_name", "product_type_name"]).size()
    pairs = [p for p, c in pairs.items() if c >= 3 and p[1] in types and p[0] != "Unknown"]
    out: list[dict[str, Any]] = []
    for t in rng.permutation(types)[:n_per_kind]:
        out.append({"kind": "type", "query": str(t).lower(), "type": t, "colour": None})
    for i in rng.permutation(len(pairs))[:n_per_kind]:
        colour, t = pairs[i]
        out.append({"kind": "colour+type", "query": f"{colour} {t}".lower(), "type": t, "colour": colour})
    for q in [q for q in out if q["kind"] in ("type", "colour+type")][:n_per_kind]:
        words = q["query"].split()
        longest = max(range(len(words)), key=lambda w: len(words[w]))
        if len(words[longest]) < 5:
            continue
        drop = int(rng.integers(1, len(words[longest]) - 1))  # never the first letter: people get that right
        words[longest] = words[longest][:drop] + words[longest][drop + 1 :]
        out.append({**q, "kind": "typo", "query": " ".join(words), "of": q["query"]})
    names = items["prod_name"].dropna().unique()
    for name in rng.permutation(names)[:n_per_kind]:
        out.append({"kind": "name", "query": str(name).lower(), "type": None, "colour": None})
    return out


def precision(ids: list[str], info: pd.DataFrame, q: dict[str, Any]) -> float | None:
    """Relevant items in the top 10 (the query's product type, and colour) over the most there can be
    (10, or fewer when the catalogue has fewer: "grey vest top" has 3 in the slice)."""
    if q["type"] is None:
        return None
    relevant = info["product_type_name"].eq(q["type"])
    if q["colour"] is not None:
        relevant &= info["colour_group_name"].eq(q["colour"])
    found = relevant.reindex(ids[:10], fill_value=False)
    return float(found.sum()) / min(10, int(relevant.sum()))


def pct(values: list[float]) -> dict[str, float]:
    ms = np.asarray(values) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p90_ms": round(float(np.percentile(ms, 90)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "mean_ms": round(float(ms.mean()), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--dataset", default="hm")
    parser.add_argument("--slice-every", type=int, default=None, help="build a slice run of every N-th product")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("ATELIER_DATA_DIR", "../shared/data")))
    parser.add_argument("--per-kind", type=int, default=100, help="queries of each kind (4 kinds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="run")
    parser.add_argument("--note", default="")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    started = datetime.now(UTC)
    info: dict[str, Any] = {
        "benchmark": "search", "command": "python -m benchmarks.bench_search " + " ".join(argv or sys.argv[1:]),
        "git_commit": git_commit(), "working_tree": "uncommitted changes of issue #23 on top of the commit",
        "date": started.isoformat(timespec="seconds"), "machine": machine(), "note": args.note}
    t0 = time.perf_counter()
    if args.slice_every:
        settings = build_slice_run(args.run_dir, args.data_dir, args.slice_every)
    else:
        settings = Settings.model_validate({"run_dir": args.run_dir, "data_dir": args.data_dir, "DATABASE_URL": ""})
    dataset = args.dataset
    model_id = live_model_id(settings.paths, dataset)
    checkpoint = settings.paths.item_tower(dataset)
    assert model_id.endswith(f":{file_id(checkpoint)}"), f"{checkpoint} is not the checkpoint of {model_id}"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or SERVE_TORCH_THREADS))  # as a served worker
    encoder = ItemEncoder(checkpoint)
    encoder.warm_up()
    data = load_current(dataset, settings.paths.dataset(dataset), settings.paths.features)
    popular = popular_lists(data, rules_for(dataset).popularity_days)[0].overall
    items = data.items.assign(item_id=data.items["item_id"].astype(str)).set_index("item_id")
    queries = make_queries(items.reset_index(), args.per_kind, args.seed)
    store = open_store(settings)
    t_facts = time.perf_counter()
    facts = read_catalogue_facts(store)  # the first request's read (later ones run in the background)
    info["catalogue_facts_s"] = round(time.perf_counter() - t_facts, 3)
    catalogue_facts(store)
    info["lexicon_words"] = len(facts.lexicon.counts)
    with store.connection() as conn:
        row = conn.execute("SELECT count(*) FROM items WHERE item IS NOT NULL").fetchone()
    info["items_in_store"] = int(row[0]) if row else 0
    info["model_id"] = model_id
    info["setup_s"] = round(time.perf_counter() - t0, 1)

    for q in queries[:10]:  # warm-up: caches, first HNSW pages, MiniLM's first batches
        rank_items(store, q["query"], SearchFilters(), popular=popular)
    timings: dict[str, list[float]] = {k: [] for k in ("encode", "vector", "fuse", "fused_total", "text_only")}
    by_kind: dict[str, dict[str, list[float]]] = {}
    for n, q in enumerate(queries):
        order = ("fused", "text") if n % 2 == 0 else ("text", "fused")  # interleaved: load drifts hit both
        for mode in order:
            if mode == "text":
                t = time.perf_counter()
                page = rank_items(store, q["query"], SearchFilters(), popular=popular)
                timings["text_only"].append(time.perf_counter() - t)
                q["text_ids"] = [i for i, _ in page.rows]
            else:
                t = time.perf_counter()
                vector = encoder.encode([query_item(q["query"])])[0]
                t1 = time.perf_counter()
                hits = store.search(model_id, vector, VECTOR_DEPTH)
                t2 = time.perf_counter()
                page = rank_items(store, q["query"], SearchFilters(), vector_hits=hits, vector_name="vector",
                                  popular=popular)
                t3 = time.perf_counter()
                timings["encode"].append(t1 - t)
                timings["vector"].append(t2 - t1)
                timings["fuse"].append(t3 - t2)
                timings["fused_total"].append(t3 - t)
                q["fused_ids"], q["corrections"] = [i for i, _ in page.rows], page.corrections
        for mode in ("text", "fused"):
            p = precision(q[f"{mode}_ids"], items, q)
            if p is not None:
                by_kind.setdefault(q["kind"], {}).setdefault(mode, []).append(p)

    def listing(ids: list[str]) -> list[str]:
        rows = items.reindex(ids[:10])
        return [f"{r.title} | {r.product_type_name} | {r.colour_group_name} | {r.index_group_name}"
                for r in rows.itertuples()]

    named = {}
    for query in NAMED:
        text = [i for i, _ in rank_items(store, query, SearchFilters(), popular=popular).rows]
        hits = store.search(model_id, encoder.encode([query_item(query)])[0], VECTOR_DEPTH)
        page = rank_items(store, query, SearchFilters(), vector_hits=hits, popular=popular)
        fused = [i for i, _ in page.rows]
        rows = items.reindex(fused[:10])
        named[query] = {
            "corrections": page.corrections,
            "womens_bikini_tops_in_top10": int((rows["product_type_name"].eq("Bikini top")
                                                & rows["index_group_name"].ne("Baby/Children")).sum()),
            "black_coats_in_top10": int((rows["product_type_name"].eq("Coat")
                                         & rows["colour_group_name"].eq("Black")).sum()),
            "fused_top10": listing(fused), "text_only_top10": listing(text),
        }
    store.close()
    result: dict[str, Any] = {
        **info,
        "queries": {kind: sum(q["kind"] == kind for q in queries) for kind in ("type", "colour+type", "typo", "name")},
        "latency": {k: pct(v) for k, v in timings.items()},
        "precision_at_10": {kind: {mode: round(float(np.mean(v)), 3) for mode, v in modes.items()}
                            for kind, modes in by_kind.items()},
        "typos_corrected": sum(bool(q.get("corrections")) for q in queries if q["kind"] == "typo"),
        "named_queries": named,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    result["machine"]["loadavg_at_end"] = list(os.getloadavg())
    out = args.out or ROOT / "benchmarks" / "results" / f"search-{started.date().isoformat()}.json"
    merged: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {"benchmark": "search", "runs": {}}
    merged["runs"][args.label] = result
    out.write_text(json.dumps(merged, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: result[k] for k in ("items_in_store", "queries", "latency", "precision_at_10",
                                             "typos_corrected", "catalogue_facts_s")}, indent=2))
    print({q: (v["womens_bikini_tops_in_top10"], v["black_coats_in_top10"]) for q, v in named.items()})
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
