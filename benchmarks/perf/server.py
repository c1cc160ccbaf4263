"""Start the web service in its own uvicorn process over a benchmark run folder, and load it with locust."""

from __future__ import annotations

import csv
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from benchmarks.perf.common import ROOT

STARTUP_LIMIT_S = 240


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def service(run_dir: Path, *, stages: list[str] | None = None, workers: int = 1,
            env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """A running service: yields ``{"base", "key", "startup_s", "ready"}``; stopped on exit."""
    key = secrets.token_urlsafe(24)  # throwaway key for this run; never printed or saved
    port = free_port()
    # The service runs as `atelier serve` would: thread settings of this shell (OMP_NUM_THREADS=1 for the
    # in-process parts) are not passed on unless ``env`` sets them.
    inherited = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    full_env = {**inherited, "ATELIER_RUN_DIR": str(run_dir), "ATELIER_API_KEY": key, "HF_HUB_OFFLINE": "1",
                "DATABASE_URL": "", "PERF_STAGES": ",".join(stages or []), **(env or {})}
    cmd = [sys.executable, "-m", "uvicorn", "benchmarks.perf.serve_app:app", "--factory", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", "--no-access-log", "--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=full_env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        ready: dict[str, Any] = {}
        while time.perf_counter() - t0 < STARTUP_LIMIT_S:
            try:
                ready = httpx.get(f"{base}/ready", timeout=5).json()
                if ready.get("ready"):
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError("the service exited during start-up")
            time.sleep(0.25)
        if not ready.get("ready"):
            raise RuntimeError(f"service not ready: {ready}")
        yield {"base": base, "key": key, "startup_s": round(time.perf_counter() - t0, 1), "ready": ready,
               "pid": proc.pid}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def locust_level(base: str, mix_file: Path, users: int, seconds: float) -> dict[str, Any]:
    """One headless locust run at ``users`` closed-loop users for ``seconds``: percentiles, req/s, errors."""
    with tempfile.TemporaryDirectory(prefix="perf-locust-") as tmp:
        prefix = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "locust", "-f", str(Path(__file__).with_name("locustfile.py")), "--headless",
               "--host", base, "-u", str(users), "-r", str(users), "-t", f"{seconds:g}s", "--csv", str(prefix),
               "--only-summary", "--loglevel", "ERROR", "--stop-timeout", "5"]
        env = {**os.environ, "PERF_MIX": str(mix_file)}
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 120)
        stats = Path(f"{prefix}_stats.csv")
        if not stats.is_file():
            raise RuntimeError(f"locust wrote no stats (rc {done.returncode}): {done.stderr[-2000:]}")
        rows = list(csv.DictReader(stats.open()))
    agg = next(r for r in rows if r["Name"] == "Aggregated")
    count = int(agg["Request Count"])
    failures = int(agg["Failure Count"])

    def ms(col: str) -> float | None:
        value = agg.get(col, "N/A")
        return None if value in ("N/A", "", None) else float(value)

    return {"users": users, "seconds": seconds, "requests": count, "failures": failures,
            "requests_per_s": round(float(agg["Requests/s"]), 1), "p50_ms": ms("50%"), "p95_ms": ms("95%"),
            "p99_ms": ms("99%"), "max_ms": ms("Max Response Time"), "mean_ms": ms("Average Response Time")}
