"""Reranker evaluation (issue #9): retrieval only vs retrieval + DeepFM, transferred vs random embeddings.

Everything goes through the harness (``atelier.evaluate.evaluate``): the same split, the same sampled test
users, the same metrics as the README's baselines. Each reranker is fitted with a different seed; the
retriever is the content retriever (item-tower kNN; on H&M behind the shopper's own items) unless
``--retriever two-tower`` is given. Reranking latency is the DeepFM scoring of 100 candidates for one
shopper (features + forward), on CPU with one thread, retrieval excluded.

    nice -n 10 .venv/bin/python benchmarks/rerank_eval.py --dataset hm --max-users 3000 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from atelier.config import Settings
from atelier.datasets import build_queries, rules_for, time_split
from atelier.evaluate import evaluate, git_commit, machine
from atelier.ingest import load_tables
from atelier.models.ranker import RankerConfig
from atelier.pipeline.ranker import make_retriever
from atelier.recommend.user_tower import item_tower_for
from atelier.recommender import Recommender
from atelier.train.ranker import RerankRecommender, RerankTrainConfig

RUN_DIR = Path("runs")
OUT = Path("benchmarks/results/rerank-2026-11-27.json")
METRICS = ("map@12", "ndcg@12", "recall@12", "recall@100")


def retriever(dataset: str, kind: str) -> Recommender:
    """A fresh, unfitted retriever of the chosen kind (two-tower capped at 2 epochs for CPU time)."""
    settings = Settings(run_dir=RUN_DIR)
    if kind == "two-tower":
        from atelier.recommend.user_tower import item_tower_for
        from atelier.train.user import TrainUserConfig, TwoTowerRecommender

        return TwoTowerRecommender(item_tower_for(settings, dataset), cfg=TrainUserConfig(epochs=2),
                                   window_days=rules_for(dataset).popularity_days)
    return make_retriever(settings, dataset, kind)


def latency_ms(rec: RerankRecommender, dataset: str, n_queries: int = 100) -> dict[str, float]:
    """Milliseconds to score 100 retrieved candidates for one shopper (median, p95), retrieval excluded."""
    _, interactions, users = load_tables(RUN_DIR / "data" / dataset)
    queries, _ = build_queries(time_split(dataset, interactions), users)
    queries = queries[:n_queries]
    cands = rec.retriever.recommend(queries, 100)
    times = []
    for q, c in zip(queries, cands, strict=True):
        t0 = time.perf_counter()
        rec.score(q, c)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {"median_ms": round(statistics.median(times), 2), "p95_ms": round(times[int(0.95 * (len(times) - 1))], 2),
            "queries": len(times), "candidates": 100, "threads": torch.get_num_threads()}


def explanation_example(rec: RerankRecommender, dataset: str) -> dict[str, Any]:
    """The reranker's top 3 for the first test user with a history, with their explanations."""
    _, interactions, users = load_tables(RUN_DIR / "data" / dataset)
    queries, actual = build_queries(time_split(dataset, interactions), users)
    q = next(q for q in queries if q.history)
    top = rec.recommend([q], 3)[0]
    return {"user": q.user_id, "history": list(q.history[-5:]), "context": q.context,
            "bought": sorted(actual[q.user_id]), "top3": rec.explain(q, top)}


def summary(values: list[float]) -> dict[str, float]:
    """Mean and sample sd (0 for one value)."""
    return {"mean": round(statistics.fmean(values), 5),
            "sd": round(statistics.stdev(values), 5) if len(values) > 1 else 0.0, "n": len(values)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison on one dataset and merge it into the results file."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="hm")
    ap.add_argument("--retriever", default="content", choices=["content", "occasion", "two-tower"])
    ap.add_argument("--max-users", type=int, default=3000, help="test users sampled by the harness")
    ap.add_argument("--train-users", type=int, default=20000, help="label-window users sampled for training rows")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-random", action="store_true", help="skip the random-initialisation ablation")
    ap.add_argument("--transfer-source", default="table", choices=["table", "encoded"],
                    help="tower tables, or the tower's vectors of one-attribute items")
    ap.add_argument("--loss", default="pointwise", choices=["pointwise", "listwise"])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--key", default=None, help="entry in the results file (default: dataset/retriever)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # 2 shared cores: one thread ran 4.5x faster than two under contention
    ckpt = item_tower_for(Settings(run_dir=RUN_DIR), args.dataset)
    enriched = RUN_DIR / "items" / f"{args.dataset}.enriched.jsonl"
    base = retriever(args.dataset, args.retriever)
    base.name = f"retrieval: {base.name}"  # type: ignore[misc]
    recs: list[Recommender] = [base]
    variants = [True] if args.no_random else [True, False]
    for transfer in variants:
        for seed in args.seeds:
            recs.append(RerankRecommender(
                retriever(args.dataset, args.retriever), ckpt, enriched=enriched,
                cfg=RankerConfig(0, 0, transfer=transfer, transfer_source=args.transfer_source, seed=seed),
                train=RerankTrainConfig(max_users=args.train_users, epochs=args.epochs, seed=seed, loss=args.loss),
                name=f"rerank {'transfer' if transfer else 'random'} seed={seed}",
                progress=lambda m: print(f"  {m}", flush=True)))
    report = evaluate(args.dataset, RUN_DIR / "data" / args.dataset, recs, RUN_DIR / "features",
                      max_users=args.max_users, on_model=lambda n: print(f"[{args.dataset}] {n}", flush=True))
    models: dict[str, Any] = report["models"]  # type: ignore[assignment]
    table: dict[str, Any] = {"retrieval only": {m: models[base.name]["cohorts"]["all"][m] for m in METRICS}}
    for transfer in variants:
        tag = "transfer" if transfer else "random"
        runs = [models[f"rerank {tag} seed={s}"]["cohorts"]["all"] for s in args.seeds]
        table[f"rerank ({tag} init)"] = {m: summary([float(r[m]) for r in runs]) for m in METRICS}
    reranker = next(r for r in recs if isinstance(r, RerankRecommender))
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": git_commit(), "machine": machine(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "retriever": base.name, "transfer_source": args.transfer_source, "loss": args.loss, "split": report["split"],
        "table": table,
        "latency_100_candidates": latency_ms(reranker, args.dataset),
        "explanation_example": explanation_example(reranker, args.dataset),
        "training": {r.name: r.history for r in recs if isinstance(r, RerankRecommender)},
        "models": {n: {"all": m["cohorts"]["all"], "with_history": m["cohorts"]["with_history"],
                       "fit_seconds": m["fit_seconds"], "recommend_seconds": m["recommend_seconds"]}
                   for n, m in models.items()},
    }
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    suffix = ("" if args.transfer_source == "table" else f"/{args.transfer_source}") + \
        ("" if args.loss == "pointwise" else f"/{args.loss}")
    results[args.key or f"{args.dataset}/{args.retriever}{suffix}"] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=float))
    print(json.dumps({"table": table, "latency": result["latency_100_candidates"]}, indent=2, default=float))
    return result


if __name__ == "__main__":
    main()
