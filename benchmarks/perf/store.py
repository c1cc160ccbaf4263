"""Part 3, the store: pgvector HNSW vs FAISS HNSW vs exact numpy, by ``bench_store.py``.

Runs ``bench_store.main`` (load, HNSW build, recall@100 against exact search, p50/p99 and queries/s
at 1/4/16 clients; FAISS ``IndexHNSWFlat`` tuned to the store's recall and numpy exact search on the
same held-out queries; the store's probe calibrates ef_search to ``--recall-target``, 0.98 by
default, the issue's bar) on synthetic Gaussian-mixture vectors at ``--store-sizes`` (10k, 105,542 by
default; 1M with ``--million``: a pgvector HNSW build of 1M x 128 takes several minutes on 2 shared
cores) and on the real item-tower vectors of the H&M catalogue (105,542 x 128), each in a temporary
embedded PostgreSQL, and merges the results into one perf-store JSON.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.perf.common import MAIN_RUNS, Result


def item_tower_vectors(tmp: Path) -> Path | None:
    """The newest H&M item-tower vectors as a .npy (bench_store's --real format), or None."""
    files = sorted((MAIN_RUNS / "vectors" / "hm").glob("*.npz"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    out = tmp / "hm-item-tower.npy"
    np.save(out, np.load(files[-1])["vectors"].astype(np.float32))
    return out


def run(args: Any) -> Path:
    from benchmarks import bench_store

    res = Result("store")
    runs: dict[str, Any] = {}
    sizes = list(args.store_sizes) + ([1_000_000] if args.million else [])
    with tempfile.TemporaryDirectory(prefix="perf-store-") as tmp_dir:
        tmp = Path(tmp_dir)
        common = ["--seconds", str(args.store_seconds), "--queries", str(args.store_queries),
                  "--recall-target", str(args.recall_target)]
        out = tmp / "synthetic.json"
        print(f"[store] synthetic {sizes} ...", flush=True)
        bench_store.main(["--sizes", *map(str, sizes), *common, "--out", str(out)])
        runs["synthetic"] = json.loads(out.read_text())
        real = item_tower_vectors(tmp)
        if real is not None and not args.no_real:
            out = tmp / "real.json"
            print("[store] real H&M item-tower vectors ...", flush=True)
            bench_store.main(["--sizes", "105542", "--real", str(real), *common, "--out", str(out)])
            runs["item_tower_hm"] = json.loads(out.read_text())
    rows = []
    for label, r in runs.items():
        for row in r["results"]:
            pg, fa, npy = row["pgvector"], row["faiss_hnsw"], row["numpy_exact"]
            qps = {c["clients"]: round(c["qps"], 1) for c in pg["concurrency"]}
            rows.append({"data": label, "n": row["n"], "dim": row["dim"], "pg_recall": round(pg["recall_at_100"], 4),
                         "faiss_recall": round(fa["recall_at_100"], 4), "pg_p50_ms": round(pg["p50_ms"], 3),
                         "pg_p99_ms": round(pg["p99_ms"], 3), "faiss_p50_ms": round(fa["p50_ms"], 3),
                         "numpy_p50_ms": round(npy["p50_ms"], 3), "pg_qps": qps,
                         "pg_server_p50_ms": round(pg["server_side_hnsw"]["p50_ms"], 3)
                         if "server_side_hnsw" in pg else None,
                         "pg_server_over_faiss_p50": round(pg["server_side_hnsw"]["p50_ms"] / fa["p50_ms"], 2)
                         if "server_side_hnsw" in pg else None,
                         "pg_over_faiss_p50": round(pg["p50_ms"] / fa["p50_ms"], 2),
                         "pg_over_numpy_p50": round(pg["p50_ms"] / npy["p50_ms"], 2),
                         "load_s": round(pg["copy_s"], 2), "pg_build_s": round(pg["index_build_s"], 1),
                         "faiss_build_s": round(fa["build_s"], 1)})
    res["summary"] = rows
    res["runs"] = runs
    if not args.million:
        res["skipped"] = ("1M vectors: not run by default (pgvector HNSW build of 1M x 128 takes several minutes on "
                          "2 shared cores); `--million` adds it")
    return res.write()
