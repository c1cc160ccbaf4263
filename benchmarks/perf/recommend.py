"""Part 4, the recommend path: where one request's time goes, and /recommend under load.

Breakdown (in process, one thread, after a warm-up): ``RecommendService.recommend`` over the request
mix of ``bench_serve.py`` (known users, anonymous carts, context texts, empty requests), with the
parts it calls wrapped in timers: the user tower's query (two-tower stage), the context text's
vector, the seed items' vectors (a store read), the ANN search (pgvector HNSW), the ranked stage
(each candidate source, their union, the features, the ranker's forward) when it is registered,
fetching the answer items' JSON, the explanations, and the response's JSON serialisation. Per
request the parts are summed; p50/p95 per part and their share of the total are reported.

Load (over loopback): the service in its own uvicorn process, locust headless with closed-loop
users (each sends the next request when the answer is in) at 1, 2, 4, ... users, each level
bounded in seconds, until a level has errors or p99 > 100 ms (1, 2 and 4 users always run; with
``--levels`` exactly the levels given). The same ladder runs in the same run for the full chain and
for peers: retrieval only (the chain without ``ranked``) when the ranked stage is registered, and
popularity only (no store round trip, no model: the floor of the HTTP + FastAPI + pydantic stack).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.perf.common import Result, Timer, bench_run_dir, pct, single_thread
from benchmarks.perf.server import locust_level, service

P99_LIMIT_MS = 100.0
MIN_LEVELS = 3  # 1, 2 and 4 users are always run


def request_bodies(run_dir: Path, n: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    from benchmarks.bench_serve import request_mix

    return request_mix(run_dir, n, seed)


def breakdown(run_dir: Path, n: int = 200, seed: int = 0) -> dict[str, Any]:
    """Per-request time by part, in process (no HTTP), one torch thread."""
    import atelier.recommend.chain as stages_mod
    import atelier.serve.service as service_mod
    from atelier.config import Settings
    from atelier.serve.schemas import RecommendRequest
    from atelier.serve.service import RecommendService

    settings = Settings.model_validate({"run_dir": run_dir, "DATABASE_URL": ""})
    t = time.perf_counter()
    svc = RecommendService(settings)
    startup_s = time.perf_counter() - t
    timer = Timer()
    store = svc.store()
    assert store is not None, "the benchmark store is not reachable"
    timer.wrap(store, "search", "ann search (pgvector HNSW)")
    timer.wrap(store, "vectors_of", "seed item vectors (store read)")
    timer.wrap(service_mod, "fetch_items", "answer item JSON (store read)")
    timer.wrap(service_mod, "explain", "explanations")
    timer.wrap(service_mod, "attribute_sets", "explanations")
    timer.wrap(service_mod, "context_attributes", "context attributes (keywords)")
    stage_names = [s.name for s in svc.stages]
    for stage in svc.stages:
        timer.wrap(stage, "recommend", f"stage {stage.name} (total)")
        if isinstance(stage, stages_mod.TwoTowerStage):
            timer.wrap(stage.retriever, "user_vectors", "user tower")
        if isinstance(stage, stages_mod.ContentStage):
            timer.wrap(stage, "context_vector", "context vector (MiniLM + tower)")
        if isinstance(stage, stages_mod.RankedStage):
            # the ranking chain: each candidate source, the union, the features, the ranker's forward
            pipeline = stage.chain.pipeline
            for source in pipeline.generator.sources:
                timer.wrap(source, "candidates", f"ranked: source {source.name}")
            timer.wrap(pipeline, "candidates", "ranked: candidates (all sources + union)")
            timer.wrap(pipeline, "features", "ranked: features")
            timer.wrap(stage.chain.scorer, "predict", "ranked: ranker forward")
    mix = request_bodies(run_dir, n, seed)
    warm = request_bodies(run_dir, 20, seed + 1)
    per_request: list[dict[str, float]] = []
    kinds: list[str] = []
    served: list[str] = []
    with single_thread():
        for _, body in warm:
            svc.recommend(RecommendRequest.model_validate(body))
        for kind, body in mix:
            timer.reset()
            t0 = time.perf_counter()
            req = RecommendRequest.model_validate(body)
            res = svc.recommend(req)
            t1 = time.perf_counter()
            res.model_dump_json()
            t2 = time.perf_counter()
            row = {label: sum(v) for label, v in timer.spans.items()}
            row["service total"] = t1 - t0
            row["JSON serialisation"] = t2 - t1
            row["request total"] = t2 - t0
            per_request.append(row)
            kinds.append(kind)
            served.append(res.stage)
    svc.close()
    labels = list(per_request[0])
    totals = np.array([r["request total"] for r in per_request])
    parts = {}
    for label in labels:
        values = np.array([r.get(label, 0.0) for r in per_request])
        parts[label] = {**pct(values), "mean_ms": round(1000 * float(values.mean()), 3),
                        "share_of_total": round(float(values.sum() / totals.sum()), 3)}
    by_kind = {k: pct([r["request total"] for r, kk in zip(per_request, kinds, strict=True) if kk == k])
               for k in sorted(set(kinds))}
    return {"requests": n, "stages": stage_names, "startup_s": round(startup_s, 1), "parts": parts,
            "by_kind": by_kind, "served_by": {s: served.count(s) for s in sorted(set(served))},
            "ranked_registered": "ranked" in stage_names}


def ladder(run_dir: Path, mix_file: Path, *, stages: list[str] | None, seconds: float, levels: list[int],
           workers: int = 1, env: dict[str, str] | None = None, every_level: bool = False) -> dict[str, Any]:
    """Locust at increasing users until errors or p99 > 100 ms (the first failing level is kept)."""
    rows = []
    with service(run_dir, stages=stages, workers=workers, env=env) as svc:
        locust_level(svc["base"], mix_file, 2, 3)  # warm-up: caches, first queries
        for users in levels:
            row = locust_level(svc["base"], mix_file, users, seconds)
            print(f"  users {users:>3}: {row['requests_per_s']:>6} req/s  p50 {row['p50_ms']} p95 {row['p95_ms']} "
                  f"p99 {row['p99_ms']} ms  failures {row['failures']}", flush=True)
            rows.append(row)
            # at least MIN_LEVELS levels, so a busy machine still gives a throughput curve
            if not every_level and len(rows) >= MIN_LEVELS and (row["failures"] or (row["p99_ms"] or 0) > P99_LIMIT_MS):
                break
        ready = svc["ready"]
    ok = [r for r in rows if not r["failures"] and (r["p99_ms"] or 1e9) <= P99_LIMIT_MS]
    best = max(ok, key=lambda r: r["requests_per_s"]) if ok else None
    within_50 = [r for r in rows if not r["failures"] and (r["p99_ms"] or 1e9) <= 50.0]
    return {"stages": ready.get("stages"), "workers": workers, "env": env or {}, "levels": rows,
            "max_req_s_p99_le_100ms": best["requests_per_s"] if best else None,
            "max_req_s_p99_le_50ms": max((r["requests_per_s"] for r in within_50), default=None),
            "single_user": rows[0] if rows else None}


def run(args: Any) -> Path:
    import torch

    res = Result("recommend")
    run_dir = bench_run_dir("hm")
    print("[recommend] breakdown ...", flush=True)
    res["breakdown"] = breakdown(run_dir, n=args.requests)
    res["torch_threads_default"] = torch.get_num_threads()
    for label, p in res["breakdown"]["parts"].items():
        print(f"  {label:<36} p50 {p['p50_ms']:>8.2f} ms  p95 {p['p95_ms']:>8.2f} ms  share {p['share_of_total']}")
    levels = args.levels or [1, 2, 4, 8, 16, 32, 64][: args.max_level]
    with tempfile.TemporaryDirectory(prefix="perf-mix-") as tmp:
        mix_file = Path(tmp) / "mix.json"
        mix_file.write_text(json.dumps([b for _, b in request_bodies(run_dir, 1000, 3)]))
        configs: dict[str, list[str] | None] = {"full chain": None}
        if res["breakdown"]["ranked_registered"]:
            configs["retrieval only (no ranking chain)"] = [s for s in res["breakdown"]["stages"] if s != "ranked"]
        configs["popularity only (HTTP floor)"] = ["popularity"]
        runs: list[tuple[str, list[str] | None, int, dict[str, str] | None]] = []
        for name, stages in configs.items():  # extra worker counts for the full chain only
            for workers in args.workers if name == "full chain" else [1]:
                runs.append((name if workers == 1 else f"{name}, {workers} workers", stages, workers, None))
        if args.omp:  # the same full chain with torch/OpenMP on N threads per process
            runs.insert(1, (f"full chain, OMP_NUM_THREADS={args.omp}", None, 1, {"OMP_NUM_THREADS": str(args.omp)}))
        load = {}
        for label, stages, workers, env in runs:
            if args.only and label not in args.only:
                continue
            print(f"[recommend] load: {label}", flush=True)
            load[label] = ladder(run_dir, mix_file, stages=stages, seconds=args.seconds, levels=levels,
                                 workers=workers, env=env, every_level=bool(args.levels))
    res["load"] = load
    res["config"] = {"level_seconds": args.seconds, "levels": levels, "p99_limit_ms": P99_LIMIT_MS,
                     "every_level": bool(args.levels),
                     "client": "locust FastHttpUser, headless, closed loop (wait 0), same 2 cores as the server",
                     "mix": "bench_serve.request_mix: 1/4 known users, 1/4 carts, 1/4 context texts, 1/4 empty; k=12"}
    return res.write()


def ladder_pair(run_dir: Path, mix_file: Path, configs: dict[str, dict[str, str]], seconds: float,
                levels: list[int]) -> dict[str, Any]:
    """Two (or more) services up at once, their ladders interleaved level by level (A@1, B@1, A@2, ...),
    so a change in the other jobs' load hits every configuration alike."""
    from contextlib import ExitStack

    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    with ExitStack() as stack:
        services = {name: stack.enter_context(service(run_dir, env=env)) for name, env in configs.items()}
        for svc in services.values():
            locust_level(svc["base"], mix_file, 2, 3)  # warm-up
        for i, users in enumerate(levels):
            names = list(services) if i % 2 == 0 else list(reversed(services))
            for name in names:
                done = rows[name] and len(rows[name]) >= MIN_LEVELS and (
                    rows[name][-1]["failures"] or (rows[name][-1]["p99_ms"] or 0) > P99_LIMIT_MS)
                if done:
                    continue
                row = locust_level(services[name]["base"], mix_file, users, seconds)
                print(f"  {name:<34} users {users:>3}: {row['requests_per_s']:>6} req/s  p50 {row['p50_ms']} "
                      f"p95 {row['p95_ms']} p99 {row['p99_ms']} ms", flush=True)
                rows[name].append(row)
    return {name: {"env": configs[name], "levels": r} for name, r in rows.items()}


def run_pair(args: Any) -> Path:
    """Full chain with torch on 1 thread (the service's default) vs OMP_NUM_THREADS=2, interleaved."""
    res = Result("threads-load")
    run_dir = bench_run_dir("hm")
    levels = args.levels or [1, 2, 4, 8, 16, 32, 64][: args.max_level]
    with tempfile.TemporaryDirectory(prefix="perf-mix-") as tmp:
        mix_file = Path(tmp) / "mix.json"
        mix_file.write_text(json.dumps([b for _, b in request_bodies(run_dir, 1000, 3)]))
        res["ladders"] = ladder_pair(run_dir, mix_file, {"torch 1 thread (default)": {},
                                                         "OMP_NUM_THREADS=2": {"OMP_NUM_THREADS": "2"}},
                                     args.seconds, levels)
    res["config"] = {"level_seconds": args.seconds, "levels": levels, "interleaved": True}
    return res.write()
