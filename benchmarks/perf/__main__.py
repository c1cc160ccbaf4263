"""``python -m benchmarks.perf [all|enrich|item-tower|store|recommend|live|profile|ab|threads|report] [options]``."""

from __future__ import annotations

import argparse
import os
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__)
    p.add_argument("part", nargs="?", default="all",
                   choices=["all", "enrich", "item-tower", "store", "recommend", "live", "profile", "ab", "threads",
                            "threads-load", "report"])
    p.add_argument("--tag", help="write perf-<part>-<date>-<tag>.json (a variant; report reads untagged files)")
    g = p.add_argument_group("enrich")
    g.add_argument("--enrich-items", type=int, default=4, help="products per backend")
    g.add_argument("--enrich-offset", type=int, default=5000, help="where in the catalogue the slice starts")
    g = p.add_argument_group("item tower")
    g.add_argument("--tower-sizes", type=int, nargs="+", default=[10_000, 105_542, 1_000_000])
    g.add_argument("--steps", type=int, default=6, help="timed SimCSE steps per size")
    g.add_argument("--encode-items", type=int, default=20_000, help="items encoded per size (then extrapolated)")
    g.add_argument("--minilm-items", type=int, default=300, help="texts the MiniLM peer encodes")
    g.add_argument("--threads", type=int, default=2, help="torch threads for training/encoding")
    g = p.add_argument_group("store")
    g.add_argument("--store-sizes", type=int, nargs="+", default=[10_000, 105_542])
    g.add_argument("--million", action="store_true", help="add 1M synthetic vectors (minutes of HNSW build)")
    g.add_argument("--no-real", action="store_true", help="skip the real item-tower vectors")
    g.add_argument("--store-seconds", type=float, default=4.0)
    g.add_argument("--recall-target", type=float, default=0.98, help="recall@100 the store is calibrated to")
    g.add_argument("--store-queries", type=int, default=500)
    g = p.add_argument_group("recommend / live / profile")
    g.add_argument("--requests", type=int, default=200, help="in-process requests for the breakdown/profile")
    g.add_argument("--seconds", type=float, default=10.0, help="seconds per locust level")
    g.add_argument("--max-level", type=int, default=7, help="levels of 1,2,4,...,64 users")
    g.add_argument("--levels", type=int, nargs="+", default=None,
                   help="exactly these user counts, every one of them run (e.g. 1 4 16 64)")
    g.add_argument("--workers", type=int, nargs="+", default=[1],
                   help="uvicorn workers of the full chain (one ladder each)")
    g.add_argument("--omp", type=int, help="also load the full chain with OMP_NUM_THREADS=N (torch threads)")
    g.add_argument("--only", nargs="+", help="load-test only these configurations (labels)")
    g.add_argument("--products", type=int, default=5, help="ingest-to-live products (fast enrichers)")
    g.add_argument("--llm-products", type=int, default=2, help="ingest-to-live products with the embedded LLM")
    g.add_argument("--no-llm", action="store_true", help="skip the embedded LLM in ingest-to-live")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("ab (before/after of the store code, interleaved)")
    g.add_argument("--before", default="b8d53a0", help="commit whose src/atelier/store.py is 'before'")
    g.add_argument("--ab-queries", type=int, default=150, help="VectorStore.search queries per case")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from benchmarks.perf import ab, common, enrich, item_tower, live, profile, recommend, report, store

    if args.tag:
        common.TAG.append(args.tag)

    parts = {"enrich": enrich.run, "item-tower": item_tower.run, "store": store.run, "recommend": recommend.run,
             "live": live.run, "profile": profile.run, "ab": ab.run,
             "threads": ab.run_threads, "threads-load": recommend.run_pair}
    chosen = list(parts) if args.part == "all" else [] if args.part == "report" else [args.part]
    for name in chosen:
        parts[name](args)
    report.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
