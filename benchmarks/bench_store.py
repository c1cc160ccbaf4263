"""Benchmark the pgvector store: load, HNSW build, recall@100, latency and throughput vs numpy and FAISS.

Standalone: ``python -m benchmarks.bench_store --sizes 10000 105542 [--real PATH.npy]``.
Synthetic vectors (default) are unit-normalised Gaussian mixtures; ``--real`` takes the rows of a
``.npy`` file (e.g. the MiniLM vectors of the H&M catalogue). Held-out queries are not in the index.
For each size it measures, in one run and on one machine:

- load (binary COPY) and HNSW build time, and the store's own probe (recall@100, calibrated ef);
- recall@100 of the store against exact numpy search on the held-out queries;
- single-query latency p50/p99 and queries/s at 1, 4 and 16 concurrent clients (threads, each on
  its own pooled connection);
- exact numpy search (one query at a time) and FAISS ``IndexHNSWFlat(d, 32, METRIC_INNER_PRODUCT)``
  with ``efSearch`` tuned to the store's recall, reported as ratios.

Results go to ``benchmarks/results/store-<date>.json`` (command, commit, machine, figures) and a
table is printed. A default run (10k and 105,542 synthetic, 128 dims) takes about 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from atelier.config import Settings
from atelier.store import IndexConfig, SearchConfig, VectorStore, open_store

ROOT = Path(__file__).resolve().parents[1]
K = 100
TOLERANCE = 0.002  # recall difference treated as equal (500 queries: ~0.1 pp sampling noise)


def git_commit(root: Path = ROOT) -> str | None:
    """The checked-out commit, read from .git files (no git subprocess)."""
    git = root / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        return None
    return None


def machine() -> dict[str, Any]:
    """What ran it: cores, platform, memory, load (other jobs skew the timings)."""
    mem_gb = None
    with contextlib.suppress(ValueError, OSError):
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "memory_gb": mem_gb,
        "loadavg_at_start": list(os.getloadavg()),
    }


def gaussian_mixture(n: int, d: int, seed: int, clusters: int = 256, spread: float = 0.7) -> np.ndarray:
    """Unit vectors around ``clusters`` random centres: clustered like real embeddings, not uniform."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)  # (clusters, d)
    labels = rng.integers(0, clusters, n)
    x = centres[labels] + spread * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)  # (n, d)


def exact_topk(x: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """Ground truth: indices of the k largest inner products per query (batched matmul)."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 256):
        scores = queries[start : start + 256] @ x.T  # (b, n)
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(scores, part, axis=1).argsort(axis=1)[:, ::-1]
        out[start : start + 256] = np.take_along_axis(part, order, axis=1)
    return out


def recall(found: list[list[int]] | np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k that was found."""
    pairs = zip(found, truth, strict=True)
    return float(np.mean([len(set(map(int, f)) & set(t.tolist())) / len(t) for f, t in pairs]))


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def concurrent_qps(store: VectorStore, model_id: str, queries: np.ndarray, clients: int, seconds: float) -> dict:
    """Queries/s with ``clients`` threads searching for ``seconds`` (each takes its own pooled connection)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    deadline = time.perf_counter() + seconds
    barrier = threading.Barrier(clients)

    def client(c: int) -> None:
        barrier.wait()
        i = c
        try:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                store.search(model_id, queries[i % len(queries)], K)
                latencies[c].append(time.perf_counter() - t0)
                i += clients
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    flat = [x for lat in latencies for x in lat]
    return {"clients": clients, "queries": len(flat), "qps": len(flat) / wall, **percentiles(flat)}


def bench_faiss(x: np.ndarray, queries: np.ndarray, truth: np.ndarray, target: float) -> dict[str, Any]:
    """FAISS HNSW (M=32, inner product): build, efSearch tuned to ``target`` recall, latency."""
    import faiss

    index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    index.add(x)
    build_s = time.perf_counter() - t0
    tried: list[dict[str, float]] = []
    for ef in (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024):
        index.hnsw.efSearch = ef
        _, found = index.search(queries, K)
        tried.append({"ef_search": ef, "recall": recall(found, truth)})
        if tried[-1]["recall"] >= target - TOLERANCE:
            break
    # Equal recall where FAISS reaches the store's; where its graph plateaus below (a few queries
    # stuck in poorly linked regions), the smallest efSearch within the tolerance of its best.
    best = max(t["recall"] for t in tried)
    goal = min(target, best) - TOLERANCE
    chosen = next(t for t in tried if t["recall"] >= goal)
    index.hnsw.efSearch = int(chosen["ef_search"])
    # One query per call on one thread: the same shape of work as one store.search call.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    lat = []
    for q in queries:
        t1 = time.perf_counter()
        index.search(q[None, :], K)
        lat.append(time.perf_counter() - t1)
    faiss.omp_set_num_threads(threads)
    t1 = time.perf_counter()
    index.search(queries, K)
    batch_qps = len(queries) / (time.perf_counter() - t1)
    return {
        "build_s": build_s,
        "ef_search": chosen["ef_search"],
        "recall_at_100": chosen["recall"],
        "matched_store_recall": chosen["recall"] >= target - TOLERANCE,
        "tried": tried,
        "qps_single_thread": len(lat) / sum(lat),
        "qps_batch_all_threads": batch_qps,
        **percentiles(lat),
    }


def bench_numpy(x: np.ndarray, queries: np.ndarray) -> dict[str, Any]:
    """Exact search one query at a time: matmul + argpartition over all rows."""
    lat = []
    for q in queries:
        t0 = time.perf_counter()
        scores = x @ q
        top = np.argpartition(-scores, K - 1)[:K]
        top[np.argsort(-scores[top])]
        lat.append(time.perf_counter() - t0)
    return {"qps_single_thread": len(lat) / sum(lat), **percentiles(lat)}


def server_side(store: VectorStore, model_id: str, queries: np.ndarray, ef_search: int) -> dict[str, float]:
    """Server-side execution time of the plain HNSW top-100 (EXPLAIN ANALYZE), without the client round trip.

    The statement is the store's search without filters (``ORDER BY embedding <#> q LIMIT 100`` at the
    calibrated ef_search), so the gap to the client-side p50 is what the round trip, psycopg and the
    pool cost."""
    info = store.model(model_id)
    times = []
    with store.connection() as conn, conn.transaction():
        conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(ef_search),))
        for q in queries:
            row = conn.execute(
                f"EXPLAIN (ANALYZE, FORMAT JSON) SELECT item_id, embedding <#> %s AS d FROM {info.table_name}"
                f" ORDER BY d LIMIT {K}",
                (q,),
            ).fetchone()
            assert row is not None
            plan = row[0][0] if isinstance(row[0], list) else json.loads(row[0])[0]
            times.append(plan["Execution Time"] / 1000)
    return percentiles(times)


def bench_size(
    store: VectorStore,
    x: np.ndarray,
    queries: np.ndarray,
    *,
    label: str,
    probe: int,
    seconds: float,
    clients: list[int],
    config: IndexConfig,
) -> dict[str, Any]:
    n, d = x.shape
    model_id = f"bench-{label}-{n}x{d}"
    ids = [f"b{i:07d}" for i in range(n)]
    print(f"[{n:>9,} x {d}] loading ...", flush=True)
    load = store.load_vectors(model_id, ids, x, config=config)
    print(f"[{n:>9,} x {d}] copy {load.copy_s:.1f}s, HNSW build {load.index_s:.1f}s; probing ...", flush=True)
    check = store.probe(model_id, sample=probe)
    truth = exact_topk(x, queries)

    lat, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        hits = store.search(model_id, q, K)
        lat.append(time.perf_counter() - t0)
        found.append([int(h[1:]) for h, _ in hits])
    pg_recall = recall(found, truth)
    returned = min(len(f) for f in found)
    server = server_side(store, model_id, queries[:100], int(check["ef_search"]))
    exact_lat = []
    for q in queries[:20]:
        t0 = time.perf_counter()
        store.exact_search(model_id, q, K)
        exact_lat.append(time.perf_counter() - t0)
    print(f"[{n:>9,} x {d}] recall@100 {pg_recall:.3f}; concurrency ...", flush=True)
    conc = [concurrent_qps(store, model_id, queries, c, seconds) for c in clients]
    store.drop_model(model_id)  # free the server's memory and disk before FAISS runs

    print(f"[{n:>9,} x {d}] numpy and FAISS ...", flush=True)
    npy = bench_numpy(x, queries)
    fai = bench_faiss(x, queries, truth, pg_recall)
    pg = {
        "copy_s": load.copy_s,
        "index_build_s": load.index_s,
        "analyze_swap_s": load.analyze_s + load.swap_s,
        "maintenance_work_mem": load.maintenance_work_mem,
        "build_notices": load.notices,
        "probe": {k: v for k, v in check.items() if k != "tried"},
        "probe_tried": check["tried"],
        "recall_at_100": pg_recall,
        "min_returned": returned,
        "qps_single_client": len(lat) / sum(lat),
        **percentiles(lat),
        "sql_exact": percentiles(exact_lat),
        "server_side_hnsw": server,
        "concurrency": conc,
    }
    return {
        "n": n,
        "dim": d,
        "queries": len(queries),
        "pgvector": pg,
        "numpy_exact": npy,
        "faiss_hnsw": fai,
        "ratios": {
            "p50_pg_over_faiss": pg["p50_ms"] / fai["p50_ms"],
            "p50_pg_over_numpy": pg["p50_ms"] / npy["p50_ms"],
            "p50_pg_server_side_over_faiss": server["p50_ms"] / fai["p50_ms"],
            "qps1_pg_over_faiss": pg["qps_single_client"] / fai["qps_single_thread"],
            "build_pg_over_faiss": load.index_s / fai["build_s"],
        },
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'n':>9} {'d':>4} {'load s':>7} {'build s':>8} {'ef':>4} {'recall':>6} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'qps@1':>6} {'qps@4':>6} {'qps@16':>6} | {'faiss ef':>8} {'f p50':>6} "
        f"{'f build':>7} {'np p50':>6} | {'pg/faiss':>8} {'pg/np':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        pg, fa, npy, ra = r["pgvector"], r["faiss_hnsw"], r["numpy_exact"], r["ratios"]
        qps = {c["clients"]: c["qps"] for c in pg["concurrency"]}
        print(
            f"{r['n']:>9,} {r['dim']:>4} {pg['copy_s']:>7.2f} {pg['index_build_s']:>8.1f} "
            f"{pg['probe']['ef_search']:>4} {pg['recall_at_100']:>6.3f} {pg['p50_ms']:>7.2f} "
            f"{pg['p99_ms']:>7.2f} {qps.get(1, 0):>6.0f} {qps.get(4, 0):>6.0f} {qps.get(16, 0):>6.0f} | "
            f"{fa['ef_search']:>8} {fa['p50_ms']:>6.2f} {fa['build_s']:>7.1f} {npy['p50_ms']:>6.2f} | "
            f"{ra['p50_pg_over_faiss']:>8.1f} {ra['p50_pg_over_numpy']:>6.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 105_542])
    parser.add_argument("--dim", type=int, default=128, help="synthetic vector dimension")
    parser.add_argument("--real", type=Path, help=".npy of real vectors (rows are items); sizes cap at its rows")
    parser.add_argument("--queries", type=int, default=500, help="held-out queries for recall and latency")
    parser.add_argument("--probe", type=int, default=200, help="item vectors the store's probe uses")
    parser.add_argument("--seconds", type=float, default=4.0, help="per concurrency level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--m", type=int, default=16, help="HNSW m")
    parser.add_argument("--ef-construction", type=int, default=64)
    parser.add_argument("--recall-target", type=float, default=SearchConfig().recall_target,
                        help="recall@100 the store's probe calibrates ef_search to (the store's default: 0.95)")
    parser.add_argument("--database-url", default="", help="external PostgreSQL (default: embedded, temp dir)")
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/store-<date>.json)")
    args = parser.parse_args(argv)

    date = dt.datetime.now(dt.UTC)
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"store-{date:%Y-%m-%d}" + ("-real" if args.real else "") + ".json"
    )
    real = None
    if args.real:
        real = np.load(args.real, mmap_mode="r")
        if real.ndim != 2:
            parser.error(f"{args.real} holds shape {real.shape}, expected (rows, dim)")
    run_dir = Path(tempfile.mkdtemp(prefix="atelier-bench-"))
    settings = Settings.model_validate({"run_dir": run_dir, "DATABASE_URL": args.database_url})
    config = IndexConfig(m=args.m, ef_construction=args.ef_construction)
    info: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.bench_store", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "date": date.isoformat(timespec="seconds"),
        "machine": machine(),
        "data": (
            {"kind": "real", "path": str(args.real), "shape": list(real.shape)}
            if real is not None
            else {"kind": "synthetic gaussian mixture (256 centres, spread 0.7)", "dim": args.dim}
        ),
        "config": {
            "k": K,
            "queries": args.queries,
            "probe": args.probe,
            "seconds_per_level": args.seconds,
            "hnsw_m": args.m,
            "hnsw_ef_construction": args.ef_construction,
            "recall_target": args.recall_target,
            "faiss": "IndexHNSWFlat(d, 32, METRIC_INNER_PRODUCT), efConstruction 40 (default)",
        },
    }
    rows = []
    started = time.perf_counter()
    server = None
    try:
        search = SearchConfig(recall_target=args.recall_target)
        with open_store(settings, pool_size=max(args.clients), search=search) as store:
            server = store.server
            with store.connection() as conn:
                version_row = conn.execute("SHOW server_version").fetchone()
            info["server"] = {
                "postgres": version_row[0] if version_row else None,
                "pgvector": store.pgvector_version,
                "embedded": not args.database_url,
            }
            for n in args.sizes:
                if real is not None:
                    rng = np.random.default_rng(0)
                    total = real.shape[0]
                    # queries are held out: the last `queries` rows of a shuffled order
                    order = rng.permutation(total)
                    take = min(n, total - args.queries)
                    x = np.ascontiguousarray(real[np.sort(order[:take])], dtype=np.float32)
                    queries = np.ascontiguousarray(real[order[-args.queries :]], dtype=np.float32)
                    x /= np.linalg.norm(x, axis=1, keepdims=True)
                    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
                    label = "real"
                else:
                    x = gaussian_mixture(n, args.dim, seed=n)
                    queries = gaussian_mixture(args.queries, args.dim, seed=n + 1)
                    label = "synth"
                rows.append(
                    bench_size(
                        store,
                        x,
                        queries,
                        label=label,
                        probe=args.probe,
                        seconds=args.seconds,
                        clients=args.clients,
                        config=config,
                    )
                )
    finally:
        if server is not None:
            server.cleanup()  # stop the embedded server before removing its folder
        shutil.rmtree(run_dir, ignore_errors=True)
    info["machine"]["loadavg_at_end"] = list(os.getloadavg())
    info["wall_s"] = time.perf_counter() - started
    info["results"] = rows
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2) + "\n")
    print()
    print_table(rows)
    print(
        f"\nwall {info['wall_s']:.0f}s; load average {info['machine']['loadavg_at_start']} -> "
        f"{info['machine']['loadavg_at_end']}; written {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
