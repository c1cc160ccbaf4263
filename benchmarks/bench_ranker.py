"""The served ranker's latency for one request (issue #20 item 8: 200 candidates in at most 15 ms p99 on one core).

Loads the served chain of an indexed run folder (``load_chain``: the saved DeepFM, the pipeline fitted on the
whole log), draws shoppers from the log (with history) and carts (one sold item, no history), and times one
request at a time on one thread, per part: candidate generation (every source), the chain's features, and
the DeepFM's scoring of the first 200 candidate rows (the issue's unit; a query with fewer scores what it has);
and each candidate source on its own (the same request, timed before the chain's own call).
Latency is wall time in this process (no HTTP, no store).

    python -m benchmarks.bench_ranker --run-dir runs [--dataset hm] [--requests 300]

Writes ``benchmarks/results/ranker-latency-<date>-<dataset>.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atelier.atomic import write_json
from atelier.config import Settings
from atelier.datasets import load_current
from atelier.evaluate import git_commit
from atelier.recommend.ranking import load_chain
from atelier.recommender import Query

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = 200  # the unit: candidates scored per request


def percentiles(ms: list[float]) -> dict[str, float]:
    """p50, p90, p99, max and mean of a list of milliseconds."""
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p90_ms": round(float(np.percentile(a, 90)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "max_ms": round(float(a.max()), 2),
            "mean_ms": round(float(a.mean()), 2)}


def requests(log: Any, n: int, seed: int) -> list[Query]:
    """Half shoppers with history (their items, oldest first), half one-item carts, drawn from the log."""
    rng = np.random.default_rng(seed)
    by_user = log.sort_values("ts").groupby("user_id")["item_id"].apply(lambda s: tuple(dict.fromkeys(s.astype(str))))
    users = by_user.index.to_numpy()
    picked = rng.choice(len(users), size=min(n // 2, len(users)), replace=False)
    out = [Query(str(users[i]), history=by_user.iloc[i][-20:]) for i in picked]
    items = log["item_id"].astype(str).unique()
    out += [Query(f"cart-{k}", cart=(str(items[j]),)) for k, j in enumerate(rng.choice(len(items), n - len(out)))]
    return out


def main(argv: list[str] | None = None) -> int:
    """Time the served chain request by request; write the result file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs"))
    parser.add_argument("--dataset", default="hm")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # one core, as one served worker
    settings = Settings.model_validate({"run_dir": args.run_dir})
    t0 = time.perf_counter()
    data = load_current(args.dataset, settings.paths.dataset(args.dataset), settings.paths.features)
    chain, _ = load_chain(settings, args.dataset, data)
    load_s = time.perf_counter() - t0
    queries = requests(data.interactions, args.requests + args.warmup, args.seed)
    parts: dict[str, list[float]] = {"candidates": [], "features": [], f"score {ROWS}": [], "total": []}
    generator = chain.pipeline.generator
    per_source: dict[str, list[float]] = {f"source {s.name}": [] for s in generator.sources}
    rows_seen: list[int] = []
    for n, q in enumerate(queries):
        for source in generator.sources:  # each source on its own first (the chain's call below repeats them)
            ts = time.perf_counter()
            source.candidates([q], generator.depth[source.name])
            if n >= args.warmup:
                per_source[f"source {source.name}"].append(1000 * (time.perf_counter() - ts))
        t1 = time.perf_counter()
        cands = chain.pipeline.candidates([q])
        t2 = time.perf_counter()
        x = chain.pipeline.features([q], cands)
        t3 = time.perf_counter()
        head = np.arange(min(ROWS, len(cands)))
        chain.scorer.predict([q], cands.subset(head), x[head])
        t4 = time.perf_counter()
        if n < args.warmup:
            continue
        rows_seen.append(len(cands))
        for key, dt in (("candidates", t2 - t1), ("features", t3 - t2), (f"score {ROWS}", t4 - t3), ("total", t4 - t1)):
            parts[key].append(1000 * dt)
    result = {
        "benchmark": "ranker-latency", "command": "python -m benchmarks.bench_ranker " + " ".join(sys.argv[1:]),
        "git_commit": git_commit(), "date": date.today().isoformat(), "dataset": args.dataset,
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
                    "loadavg_at_end": list(os.getloadavg())},
        "load_chain_s": round(load_s, 1), "requests": len(rows_seen), "warmup": args.warmup,
        "candidate_rows": {"mean": round(float(np.mean(rows_seen)), 1), "min": int(np.min(rows_seen)),
                           "max": int(np.max(rows_seen))},
        "latency": {key: percentiles(ms) for key, ms in parts.items()},
        "sources": {key: percentiles(ms) for key, ms in per_source.items()},
        "target": {"part": f"score {ROWS}", "p99_ms": 15.0},
    }
    out = args.out or RESULTS / f"ranker-latency-{date.today().isoformat()}-{args.dataset}.json"
    write_json(out, result, indent=2)
    for key, stats in [*result["latency"].items(), *result["sources"].items()]:
        print(f"{key:28s} {stats}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
