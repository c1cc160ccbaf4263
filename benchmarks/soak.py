"""Soak test (issue 12): minutes of mixed read/write load on `atelier serve`, loopback only.

Starts the web service as its own process (``atelier serve``) over a small indexed run folder (the
400-article H&M slice that the serving tests build with the pipeline's own functions, unless
``--run-dir`` names an existing one), measures its closed-loop peak for ``--peak-s`` seconds with
``--clients`` clients, then drives it at ``--load`` (default 80%) of that peak for ``--minutes``:
recommendations (carts, known users, contexts, profiles), searches, item and similar-item reads,
and writes (create, replace, delete products). Every ``--sample-s`` seconds it records the server's
resident memory (RSS), its open TCP connections and file descriptors, the PostgreSQL backends
connected, requests and errors. At the end it checks the store (0 lost, 0 duplicated items and
vectors) and writes ``benchmarks/results/soak-<date>.json`` (command, commit, machine, figures,
curves) and a PNG of the curves.

An error is a transport failure, any 5xx, or a status the request cannot legitimately get (e.g. a
404 for an id the load generator knows exists). Bounded: a fixed duration, a fixed client count,
a token-bucket rate, loopback only.

    nice -n 10 python -m benchmarks.soak --minutes 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
CONTEXTS = ["a black dress for a wedding", "summer holiday", "office trousers in navy", "cosy knit for winter",
            "running shorts", "party top with sequins", "", "denim jacket"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def git_commit() -> str:
    res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    return res.stdout.strip()


def build_run(run_dir: Path, data_dir: Path) -> Path:
    """The serving tests' tiny indexed run (ingest, vocabulary, small tower, encode, index)."""
    from tests.helpers import build_tiny_run

    build_tiny_run(run_dir, data_dir)
    return run_dir


class Load:
    """A pool of clients issuing a weighted mix of requests, optionally paced by a token bucket."""

    def __init__(self, base: str, key: str, catalogue: list[str], users: list[str], seed: int = 0) -> None:
        self.base, self.key = base, key
        self.catalogue, self.users = catalogue, users
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.created: set[str] = set()  # live products this run added and has not deleted
        self.statuses: Counter[str] = Counter()
        self.errors: list[str] = []
        self.latencies_ms: list[float] = []
        self.requests = 0

    _serial = itertools.count(1)  # shared by every Load of this process: ids never repeat

    def _next_id(self) -> str:
        return f"soak-{os.getpid()}-{next(Load._serial)}"

    def one(self, client: httpx.Client, rng: random.Random) -> None:
        """Pick and send one request; record its status, latency and whether it is an error."""
        auth = {"X-API-Key": self.key}
        roll = rng.random()
        expect: tuple[int, ...] = (200,)
        if roll < 0.45:
            body: dict[str, Any] = {"k": rng.choice([6, 12, 24])}
            kind = rng.random()
            if kind < 0.4:
                body["cart"] = rng.sample(self.catalogue, rng.randint(1, 3))
            elif kind < 0.6 and self.users:
                body["user_id"] = rng.choice(self.users)
            elif kind < 0.85:
                body["context"] = rng.choice(CONTEXTS)
                body["profile"] = {"height_cm": rng.randint(150, 195), "weight_kg": rng.randint(45, 110)}
            name, call = "recommend", lambda: client.post("/recommend", json=body)
        elif roll < 0.65:
            params = rng.choice([{"query": "top"}, {"query": "dress", "limit": 12}, {"category": "trousers"}, {}])
            name, call = "search", lambda: client.get("/items", params=params)
        elif roll < 0.78:
            item = rng.choice(self.catalogue)
            name, call = "item", lambda: client.get(f"/items/{item}")
        elif roll < 0.9:
            item = rng.choice(self.catalogue)
            name, call = "similar", lambda: client.get(f"/items/{item}/similar", params={"k": 10})
        else:
            with self.lock:
                victim = self.created.pop() if self.created and rng.random() < 0.45 else None
            if victim is not None:
                name, expect = "delete", (204,)
                call = lambda: client.delete(f"/items/{victim}", headers=auth)  # noqa: E731
            else:
                new_id = self._next_id()
                product = {"item_id": new_id, "title": f"Soak test dress {new_id}",
                           "description": "Midi dress in satin with narrow straps.", "price": 0.03,
                           "columns": {"product_type_name": "Dress", "colour_group_name": rng.choice(["Black", "Red"])}}
                name, expect = "create", (201,)
                call = lambda: client.post("/items", json=product, headers=auth)  # noqa: E731
        t0 = time.perf_counter()
        try:
            res = call()
            status = res.status_code
        except httpx.HTTPError as exc:
            status, res = -1, None
            with self.lock:
                self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
        ms = 1000 * (time.perf_counter() - t0)
        with self.lock:
            self.requests += 1
            self.latencies_ms.append(ms)
            self.statuses[f"{name} {status}"] += 1
            if status not in expect and status != -1:
                self.errors.append(f"{name}: HTTP {status}: {res.text[:200] if res is not None else ''}")
            if name == "create" and status == 201:
                self.created.add(product["item_id"])
            if name == "delete" and status != 204 and victim is not None:
                self.created.add(victim)  # not deleted after all: still expected in the store

    def run(self, clients: int, seconds: float, rate: float | None, stop: threading.Event) -> None:
        """``clients`` threads for ``seconds``; with ``rate`` (req/s) paced by a shared token bucket."""
        deadline = time.monotonic() + seconds
        interval = 1.0 / rate if rate else 0.0
        next_slot = [time.monotonic()]
        slot_lock = threading.Lock()

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=self.base, timeout=30.0) as client:
                while not stop.is_set() and time.monotonic() < deadline:
                    if interval:
                        with slot_lock:
                            slot = next_slot[0] = max(next_slot[0] + interval, time.monotonic() - 1.0)
                        delay = slot - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                    self.one(client, rng)

        threads = [threading.Thread(target=worker, args=(self.rng.randrange(1 << 30),), daemon=True)
                   for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def sample(server: psutil.Process, pg_uri: str) -> dict[str, Any]:
    """Server RSS (with child processes), its TCP connections and fds, and PostgreSQL's client backends."""
    import psycopg

    procs = [server, *server.children(recursive=True)]
    rss = sum(p.memory_info().rss for p in procs if p.is_running())
    tcp = sum(1 for p in procs for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_ESTABLISHED)
    fds = sum(p.num_fds() for p in procs)
    with psycopg.connect(pg_uri, connect_timeout=5) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                           " AND pid <> pg_backend_pid()").fetchone()
    return {"rss_mb": round(rss / 2**20, 1), "tcp_established": tcp, "fds": fds,
            "pg_backends": int(row[0]) if row else -1}


def slope_per_min(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (seconds), per minute."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def plot(samples: list[dict[str, Any]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from atelier.atomic import atomic_write

    t = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(t, [s["rss_mb"] for s in samples], color="#4c72b0")
    axes[0].set_ylabel("server RSS (MB)")
    axes[1].plot(t, [s["tcp_established"] for s in samples], label="server TCP connections")
    axes[1].plot(t, [s["pg_backends"] for s in samples], label="PostgreSQL backends")
    axes[1].plot(t, [s["fds"] for s in samples], label="server open fds", alpha=0.6)
    axes[1].set_ylabel("count")
    axes[1].legend(fontsize=8)
    axes[2].plot(t, [s["req_per_s"] for s in samples], label="requests/s", color="#55a868")
    ax_err = axes[2].twinx()
    ax_err.plot(t, [s["errors_total"] for s in samples], label="errors (cumulative)", color="#c44e52")
    axes[2].set_ylabel("requests/s")
    ax_err.set_ylabel("errors (cumulative)")
    axes[2].set_xlabel("minutes")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_write(out) as fh:
        fig.savefig(fh, dpi=100, format="png")
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--load", type=float, default=0.8, help="fraction of the measured peak to run at")
    parser.add_argument("--peak-s", type=float, default=30.0, help="seconds of closed-loop load to find the peak")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--run-dir", type=Path, default=None, help="an indexed run folder (default: build a tiny one)")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import pandas as pd

    from atelier.atomic import write_json
    from atelier.config import Settings
    from atelier.store import open_store

    workdir = Path(tempfile.mkdtemp(prefix="atelier-soak-"))
    run_dir = args.run_dir or build_run(workdir / "run", args.data_dir)
    settings = Settings.model_validate({"run_dir": run_dir, "DATABASE_URL": ""})
    catalogue = pd.read_parquet(settings.paths.dataset("hm") / "items.parquet")["item_id"].astype(str).tolist()
    users = pd.read_parquet(settings.paths.dataset("hm") / "users.parquet")["user_id"].astype(str).tolist()[:2000]
    key, port = secrets.token_urlsafe(24), free_port()  # throwaway key: never printed or saved
    env = {**os.environ, "ATELIER_RUN_DIR": str(run_dir), "ATELIER_API_KEY": key, "HF_HUB_OFFLINE": "1",
           "ATELIER_SERVE_PORT": str(port), "ATELIER_SERVE_HOST": "127.0.0.1"}
    log_path = workdir / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "atelier.cli", "serve"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the service did not start: see {log_path}")
            time.sleep(0.5)
        server = psutil.Process(proc.pid)
        store = open_store(settings, pool_size=1)
        pg_uri = store.conninfo
        before = store.consistency(httpx.get(f"{base}/ready").json()["model_id"])
        with store.connection() as conn:
            before_ids = {r[0] for r in conn.execute("SELECT item_id FROM items WHERE item IS NOT NULL").fetchall()}

        # 1. the peak: closed loop, every client as fast as it can
        stop = threading.Event()
        peak_load = Load(base, key, catalogue, users, args.seed)
        t0 = time.monotonic()
        peak_load.run(args.clients, args.peak_s, None, stop)
        peak = peak_load.requests / (time.monotonic() - t0)
        rate = max(1.0, args.load * peak)
        print(f"peak {peak:.1f} req/s ({peak_load.requests} requests, {len(peak_load.errors)} errors); "
              f"soak at {rate:.1f} req/s for {args.minutes} min", flush=True)

        # 2. the soak, sampled
        load = Load(base, key, catalogue, users, args.seed + 1)
        load.created = set(peak_load.created)
        samples: list[dict[str, Any]] = []
        runner = threading.Thread(target=load.run, args=(args.clients, 60 * args.minutes, rate, stop), daemon=True)
        start = time.monotonic()
        runner.start()
        last_n, last_t = 0, start
        while runner.is_alive():
            runner.join(timeout=args.sample_s)
            now = time.monotonic()
            with load.lock:
                n, errors = load.requests, len(load.errors)
            point = {"t_s": round(now - start, 1), **sample(server, pg_uri), "requests": n,
                     "req_per_s": round((n - last_n) / max(1e-9, now - last_t), 2), "errors_total": errors}
            samples.append(point)
            last_n, last_t = n, now
            if len(samples) % 12 == 0:
                print(json.dumps(point), flush=True)

        # 3. nothing lost or duplicated
        model_id = httpx.get(f"{base}/ready").json()["model_id"]
        after = store.consistency(model_id)
        with store.connection() as conn:
            present = {r[0] for r in conn.execute("SELECT item_id FROM items WHERE item IS NOT NULL").fetchall()}
        expected = before_ids | load.created  # what was there, plus the products this run created and kept
        store.close()
        lost, unexpected = len(expected - present), len(present - expected)
        half = [s for s in samples if s["t_s"] >= samples[-1]["t_s"] / 2] if samples else []
        lat = sorted(load.latencies_ms)

        def pct(q: float) -> float:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else 0.0

        result = {
            "command": " ".join(["python -m benchmarks.soak", *sys.argv[1:]]),
            "git_commit": git_commit(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": os.cpu_count(), "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
                        "nice": os.nice(0)},
            "config": {"minutes": args.minutes, "clients": args.clients, "load_fraction": args.load,
                       "peak_s": args.peak_s, "run": "tiny 400-article H&M run" if args.run_dir is None
                       else str(args.run_dir), "catalogue_items": len(catalogue)},
            "peak_req_per_s": round(peak, 2),
            "target_req_per_s": round(rate, 2),
            "achieved_req_per_s": round(load.requests / max(1e-9, samples[-1]["t_s"] if samples else 1), 2),
            "requests": load.requests,
            "errors": len(load.errors),
            "peak_phase_errors": len(peak_load.errors),
            "error_examples": (peak_load.errors + load.errors)[:10],
            "statuses": dict(sorted((peak_load.statuses + load.statuses).items())),
            "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0)},
            "rss_mb": {"start": samples[0]["rss_mb"], "end": samples[-1]["rss_mb"],
                       "max": max(s["rss_mb"] for s in samples),
                       "slope_mb_per_min_second_half": round(slope_per_min([s["t_s"] for s in half],
                                                                           [s["rss_mb"] for s in half]), 3)},
            "connections": {"tcp_min": min(s["tcp_established"] for s in samples),
                            "tcp_max": max(s["tcp_established"] for s in samples),
                            "pg_backends_min": min(s["pg_backends"] for s in samples),
                            "pg_backends_max": max(s["pg_backends"] for s in samples),
                            "fds_min": min(s["fds"] for s in samples), "fds_max": max(s["fds"] for s in samples)},
            "consistency": {"before": before, "after": after, "lost": lost, "unexpected_items": unexpected,
                            "live_products_created": len(load.created)},
            "samples": samples,
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        # a terminated server process never runs the embedded PostgreSQL's exit hook: stop it here
        from atelier.store import start_embedded

        if not settings.database_url:
            start_embedded(settings.run_dir / "pgdata").stop()
    if not result:
        return 1
    day = result["date"][:10]
    out_json, out_png = args.out / f"soak-{day}.json", args.out / f"soak-{day}.png"
    result["outputs"] = {"json": os.path.relpath(out_json, ROOT), "png": os.path.relpath(out_png, ROOT)}
    plot(result["samples"], out_png, f"atelier soak {day}: {result['target_req_per_s']} req/s target, "
                                     f"{args.clients} clients, {args.minutes} min, {result['errors']} errors")
    write_json(out_json, result, indent=1)
    summary = {k: result[k] for k in ("peak_req_per_s", "target_req_per_s", "achieved_req_per_s", "requests",
                                      "errors", "latency_ms", "rss_mb", "connections")}
    print(json.dumps(summary, indent=1))
    print(f"consistency: {json.dumps(result['consistency']['after'])}; lost {lost}, unexpected {unexpected}")
    print(f"wrote {out_json} and {out_png}")
    ok = result["errors"] == 0 and lost == 0 and unexpected == 0 and not any(
        result["consistency"]["after"][k] for k in ("duplicate_items", "duplicate_vectors", "items_without_vector",
                                                    "vectors_without_item", "staging_tables"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
