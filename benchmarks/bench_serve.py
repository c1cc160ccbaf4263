"""Benchmark the web service: POST /recommend latency under a simple load, and ingest-to-live time.

Standalone: ``python -m benchmarks.bench_serve [--sequential 500] [--concurrent 200 --clients 8]``.
It starts the real service (``uvicorn atelier.serve.app:app_from_env --factory``) in a subprocess
on a free loopback port over the run folder's H&M index (``atelier run`` must have run), then:

- sends ``--sequential`` POST /recommend requests one after another from one httpx client (after
  a short warm-up), then ``--concurrent`` more from ``--clients`` threads; the request mix is a
  quarter each of known users (from the interactions), anonymous carts of 1-3 catalogue items,
  context texts, and empty requests (popularity); client-side p50/p90/p99 per mix and overall;
- ingest-to-live: POST /items of ``--products`` new products (catalogue articles with a new id, a
  changed title and colour), then POST /recommend with the original article as the cart, repeated
  until the new product is in the top 12: seconds from the POST to that answer. They are deleted
  afterwards.

Results go to ``benchmarks/results/serve-<date>.json`` (command, commit, machine, figures).
Other jobs on a shared machine skew latency: the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

from benchmarks.bench_store import git_commit, machine

ROOT = Path(__file__).resolve().parents[1]
CONTEXTS = ["black dress for a wedding", "summer holiday beach", "office blazer navy", "cosy knitwear for winter",
            "party top with sequins", "running leggings for the gym", "denim shorts", "linen shirt white",
            "floral midi skirt", "warm padded jacket"]


LIVE_DEADLINE_S = 10.0  # give up on a product after this long (it then counts as not live)
MAPPED_COLUMNS = ("product_type_name", "colour_group_name", "graphical_appearance_name", "index_name",
                  "garment_group_name", "section_name", "product_group_name", "perceived_colour_master_name")


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentiles(ms: list[float]) -> dict[str, float]:
    """p50/p90/p99/mean/max in milliseconds."""
    a = np.asarray(ms)
    pct = {f"p{q}_ms": round(float(np.percentile(a, q)), 2) for q in (50, 90, 99)}
    return {"n": len(ms), **pct, "mean_ms": round(float(a.mean()), 2), "max_ms": round(float(a.max()), 2)}


def request_mix(run_dir: Path, n: int, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """``n`` (kind, body) pairs: known users, anonymous carts, contexts and empty requests, shuffled."""
    rng = random.Random(seed)
    inter = pd.read_parquet(run_dir / "data" / "hm" / "interactions.parquet", columns=["user_id", "item_id"])
    users = inter["user_id"].astype(str).drop_duplicates().tolist()
    items = inter["item_id"].astype(str).drop_duplicates().tolist()
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(n):
        kind = ("user", "cart", "context", "empty")[i % 4]
        if kind == "user":
            body: dict[str, Any] = {"user_id": rng.choice(users)}
        elif kind == "cart":
            body = {"cart": rng.sample(items, rng.randint(1, 3))}
        elif kind == "context":
            body = {"context": rng.choice(CONTEXTS)}
        else:
            body = {}
        out.append((kind, {**body, "k": 12}))
    rng.shuffle(out)
    return out


def run_load(base: str, mix: list[tuple[str, dict[str, Any]]], clients: int) -> dict[str, Any]:
    """Send the mix from ``clients`` threads; client-side latency per request, and throughput."""
    results: list[tuple[str, float, str]] = []
    lock = threading.Lock()
    queue = list(mix)

    def worker() -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            while True:
                with lock:
                    if not queue:
                        return
                    kind, body = queue.pop()
                t = time.perf_counter()
                res = client.post("/recommend", json=body)
                ms = 1000 * (time.perf_counter() - t)
                res.raise_for_status()
                with lock:
                    results.append((kind, ms, res.json()["stage"]))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    by_kind = {k: percentiles([ms for kk, ms, _ in results if kk == k]) for k in sorted({r[0] for r in results})}
    stages: dict[str, int] = {}
    for _, _, stage in results:
        stages[stage] = stages.get(stage, 0) + 1
    return {"clients": clients, "overall": percentiles([ms for _, ms, _ in results]), "by_kind": by_kind,
            "stages": stages, "requests_per_s": round(len(results) / wall, 1), "wall_s": round(wall, 2)}


def ingest_to_live(base: str, key: str, run_dir: Path, n: int, seed: int, k: int = 12,
                   timeout_s: float = 60) -> list[dict[str, Any]]:
    """Seconds from POST /items to the product's first appearance in the top ``k`` of /recommend for a
    matching cart."""
    items = pd.read_parquet(run_dir / "data" / "hm" / "items.parquet")
    rng = random.Random(seed)
    rows = items.iloc[rng.sample(range(len(items)), n)]
    out = []
    with httpx.Client(base_url=base, timeout=timeout_s, headers={"X-API-Key": key}) as client:
        for row in rows.itertuples(index=False):
            new_id = f"bench-live-{row.item_id}"
            # A new-season reissue: same kind, colour and pattern, a new title and id (the shopper
            # with the old article in the cart is the matching shopper).
            product = {"item_id": new_id, "title": f"{row.title} new season", "description": str(row.description),
                       "columns": {c: str(getattr(row, c)) for c in MAPPED_COLUMNS}}
            client.delete(f"/items/{new_id}")  # a previous, interrupted run
            t0 = time.perf_counter()
            created = client.post("/items", json=product)
            created.raise_for_status()
            post_s = time.perf_counter() - t0
            rank, polls = None, 0
            while time.perf_counter() - t0 < LIVE_DEADLINE_S and rank is None:
                polls += 1
                answer = client.post("/recommend", json={"cart": [row.item_id], "k": k}).json()
                ids = [i["item_id"] for i in answer["items"]]
                rank = ids.index(new_id) + 1 if new_id in ids else None
                if rank is None:
                    time.sleep(0.01)
            live_s = time.perf_counter() - t0
            out.append({"item_id": new_id, "from": str(row.item_id), "post_s": round(post_s, 3),
                        "live_s": round(live_s, 3) if rank else None, "rank": rank, "polls": polls,
                        "server_timings_ms": created.json()["timings_ms"]})
            client.delete(f"/items/{new_id}").raise_for_status()
    return out


def main() -> None:
    """Start the service, measure, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequential", type=int, default=500)
    parser.add_argument("--concurrent", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--products", type=int, default=5)
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    key = secrets.token_urlsafe(24)  # a throwaway key for this run; never printed or saved
    port = free_port()
    env = {**os.environ, "ATELIER_RUN_DIR": str(args.run_dir), "ATELIER_API_KEY": key, "HF_HUB_OFFLINE": "1"}
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "atelier.serve.app:app_from_env", "--factory", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning", "--no-access-log"], env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        ready: dict[str, Any] = {}
        while time.perf_counter() - t_start < 180:
            try:
                ready = httpx.get(f"{base}/ready", timeout=5).json()
                break
            except httpx.HTTPError:
                if server.poll() is not None:
                    raise SystemExit("the service exited during start-up") from None
                time.sleep(0.2)
        startup_s = time.perf_counter() - t_start
        if not ready.get("ready"):
            raise SystemExit(f"service not ready: {ready}")
        print(f"service ready in {startup_s:.1f} s: {ready['model_id']}")
        run_load(base, request_mix(args.run_dir, 20, args.seed + 1), 1)  # warm-up: caches, first queries
        sequential = run_load(base, request_mix(args.run_dir, args.sequential, args.seed), 1)
        print(f"sequential: {sequential['overall']}")
        concurrent = run_load(base, request_mix(args.run_dir, args.concurrent, args.seed + 2), args.clients)
        print(f"{args.clients} clients: {concurrent['overall']}, {concurrent['requests_per_s']} req/s")
        live = ingest_to_live(base, key, args.run_dir, args.products, args.seed)
        print("ingest-to-live s:", [r["live_s"] for r in live], "ranks:", [r["rank"] for r in live])
    finally:
        server.terminate()
        server.wait(timeout=30)
    live_s = [r["live_s"] for r in live if r["live_s"] is not None]
    result = {
        "benchmark": "serve",
        "command": " ".join(["python -m benchmarks.bench_serve", *sys.argv[1:]]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": {**machine(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "service": {"model_id": ready["model_id"], "startup_s": round(startup_s, 1), "workers": 1,
                    "transport": "HTTP/1.1 over loopback, httpx client, uvicorn in a separate process"},
        "recommend_sequential": sequential,
        "recommend_concurrent": concurrent,
        "ingest_to_live": {"products": live, "median_s": round(float(np.median(live_s)), 3) if live_s else None,
                           "max_s": round(max(live_s), 3) if live_s else None, "all_live": len(live_s) == len(live)},
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"serve-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
