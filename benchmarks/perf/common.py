"""Shared pieces of the performance suite: result files, the benchmark run folder, timers.

The serving benchmarks never touch ``runs/pgdata`` (the main job's store): ``bench_run_dir``
builds a run folder of its own under ``/tmp`` whose read-only inputs (ingested tables, models,
vectors, vocabulary, cached text vectors) are symlinks into ``runs/``, and whose embedded
PostgreSQL holds a fresh copy of the H&M index. It is kept between runs (rebuilt when the
indexed checkpoint changes), so only the first run pays the ~2 minutes of indexing.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from atelier.store.pointers import live_model_id
from benchmarks.bench_store import git_commit, machine

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
MAIN_RUNS = ROOT / "runs"
BENCH_RUN_DIR = Path(os.environ.get("ATELIER_PERF_RUN_DIR", "/tmp/atelier-perf-run"))
TAG: list[str] = []  # set by --tag: results go to perf-<part>-<date>-<tag>.json (a variant beside the main run)


def today() -> str:
    return dt.date.today().isoformat()


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def git_dirty() -> bool:
    """True when tracked files differ from the commit (the figures may not match it exactly)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        return bool(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return False


class Result:
    """One part's JSON: header (command, commit, machine, date, load) plus figures."""

    def __init__(self, part: str, argv: list[str] | None = None) -> None:
        self.part = part
        self.t0 = time.perf_counter()
        self.data: dict[str, Any] = {
            "benchmark": f"perf-{part}",
            "command": " ".join(["python -m benchmarks.perf", *(argv if argv is not None else sys.argv[1:])]),
            "git_commit": git_commit(),
            "git_dirty": git_dirty(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
        }

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def write(self, out: Path | None = None) -> Path:
        self.data["machine"]["loadavg_at_end"] = list(os.getloadavg())
        self.data["wall_s"] = round(time.perf_counter() - self.t0, 1)
        path = out or RESULTS / f"perf-{self.part}-{today()}{''.join('-' + t for t in TAG)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.data, indent=2, default=_jsonable) + "\n")
        print(f"[{self.part}] wrote {path.relative_to(ROOT)} ({self.data['wall_s']} s)", flush=True)
        return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def newest(part: str) -> dict[str, Any] | None:
    """The newest result JSON of a part (by date in the name, then mtime), or None."""
    files = sorted(RESULTS.glob(f"perf-{part}-*.json"), key=lambda p: (p.name, p.stat().st_mtime))
    return json.loads(files[-1].read_text()) if files else None


def pct(values_s: list[float] | np.ndarray, qs: tuple[int, ...] = (50, 95, 99)) -> dict[str, float]:
    """Percentiles in milliseconds of durations given in seconds."""
    ms = np.asarray(values_s, dtype=float) * 1000
    if ms.size == 0:
        return {f"p{q}_ms": float("nan") for q in qs}
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 3) for q in qs} | {"n": int(ms.size)}


@contextmanager
def single_thread() -> Iterator[None]:
    """torch on one thread for the block (the shared 2-core box; steadier timings)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def link_tree(src: Path, dst: Path) -> None:
    """Mirror ``src`` as real folders holding symlinks to its files: reads go to runs/, writes stay here."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        target = dst / entry.name
        if entry.is_dir():
            link_tree(entry, target)
        elif not target.exists():
            target.symlink_to(entry)


def bench_run_dir(dataset: str = "hm", two_tower: bool = True) -> Path:
    """A run folder with its own embedded PostgreSQL holding ``dataset``'s live index (built once)."""
    from atelier.config import Settings
    from atelier.pipeline.item_tower import index_stage

    main = Settings.model_validate({"run_dir": MAIN_RUNS})
    run_dir = BENCH_RUN_DIR
    for name in ("data", "models", "vectors", "vocab", "features", "items"):
        if (MAIN_RUNS / name).is_dir():
            link_tree(MAIN_RUNS / name, run_dir / name)
    settings = Settings.model_validate({"run_dir": run_dir, "DATABASE_URL": ""})
    wanted = live_model_id(main.paths, dataset)
    try:
        have = live_model_id(settings.paths, dataset)
    except FileNotFoundError:
        have = None
    if have != wanted:
        print(f"[setup] indexing {dataset} ({wanted}) into {run_dir}/pgdata (once) ...", flush=True)
        vectors = MAIN_RUNS / "vectors" / dataset / f"{wanted.rsplit(':', 1)[1]}.npz"
        index_stage(settings, dataset, vectors if vectors.is_file() else None)
    if two_tower and (MAIN_RUNS / "models" / f"user_tower-{dataset}.pt").is_file():
        from atelier.pipeline.user_tower import index_user_stage

        report = index_user_stage(settings, dataset, force=False)
        if not report.get("reused"):
            print(f"[setup] indexed the two-tower keys of {dataset}", flush=True)
    return run_dir


class Timer:
    """Named durations collected by wrapping callables (``wrap(obj, 'method', 'label')``)."""

    def __init__(self) -> None:
        self.spans: dict[str, list[float]] = {}
        self._active: dict[str, float] = {}

    def wrap(self, obj: Any, attr: str, label: str) -> None:
        original = getattr(obj, attr)
        spans = self.spans.setdefault(label, [])

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spans.append(time.perf_counter() - t)

        setattr(obj, attr, timed)

    def reset(self) -> None:
        for v in self.spans.values():
            v.clear()
