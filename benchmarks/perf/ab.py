"""Before/after of the store code, interleaved in one process (fair on a shared, noisy machine).

``python -m benchmarks.perf ab --before COMMIT`` loads ``src/atelier/store.py`` as it was at COMMIT
as a second module and builds two ``RecommendService`` objects over the same benchmark PostgreSQL:
one on the current store code, one on the old. Every request of the mix goes to both, in random
order, so load from other jobs hits both alike. Also times ``VectorStore.search`` directly (old vs
new class, same queries: top-100 with and without colourway de-dup) and checks the answers agree.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from benchmarks.perf.common import MAIN_RUNS, ROOT, Result, bench_run_dir, pct, single_thread


def old_store(commit: str, tmp: Path) -> ModuleType:
    """``atelier/store.py`` at ``commit``, imported under another name."""
    source = subprocess.run(["git", "show", f"{commit}:src/atelier/store.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = tmp / "store_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("atelier_store_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["atelier_store_before"] = module
    spec.loader.exec_module(module)
    return module


def search_ab(old: ModuleType, new_store: Any, model_id: str, n: int, rng: np.random.Generator) -> dict[str, Any]:
    """VectorStore.search, old class vs new, on queries made of 3 catalogue items (those excluded)."""
    old_store_obj = old.VectorStore(new_store.conninfo, pool_size=2)
    blob = np.load(sorted((MAIN_RUNS / "vectors" / "hm").glob("*.npz"), key=lambda p: p.stat().st_mtime)[-1])
    x, ids = blob["vectors"], blob["item_ids"]
    cases = {"top-100, colourways folded, 3 excluded (the reranker's candidates)": (100, True),
             "top-12, colourways folded, 3 excluded (content stage)": (12, True),
             "top-100 plain (bench_store)": (100, False)}
    out = {}
    for name, (k, dedupe) in cases.items():
        t: dict[str, list[float]] = {"before": [], "after": []}
        same = []
        for _ in range(n):
            pick = rng.choice(len(x), 3, replace=False)
            q = x[pick].mean(0)
            q /= np.linalg.norm(q)
            exclude = [str(ids[i]) for i in pick] if dedupe else []
            hits = {}
            order = [("before", old_store_obj), ("after", new_store)]
            if rng.random() < 0.5:
                order.reverse()
            for label, store in order:
                t0 = time.perf_counter()
                hits[label] = [h for h, _ in store.search(model_id, q, k, exclude_ids=exclude, dedupe_groups=dedupe)]
                t[label].append(time.perf_counter() - t0)
            same.append(hits["before"] == hits["after"])
        b, a = pct(t["before"]), pct(t["after"])
        out[name] = {"before": b, "after": a, "p50_before_over_after": round(b["p50_ms"] / a["p50_ms"], 2),
                     "mean_before_over_after": round(float(np.mean(t["before"]) / np.mean(t["after"])), 2),
                     "identical_answers": float(np.mean(same))}
        print(f"  {name}: p50 {b['p50_ms']} -> {a['p50_ms']} ms ({out[name]['p50_before_over_after']}x), "
              f"identical {out[name]['identical_answers']:.3f}", flush=True)
    old_store_obj.close()
    return out


def run(args: Any) -> Path:
    from atelier.config import Settings
    from atelier.serve.schemas import RecommendRequest
    from atelier.serve.service import RecommendService
    from benchmarks.perf.recommend import request_bodies

    res = Result("ab")
    run_dir = bench_run_dir("hm")
    settings = Settings.model_validate({"run_dir": run_dir, "DATABASE_URL": ""})
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="perf-ab-") as tmp:
        old = old_store(args.before, Path(tmp))
        after = RecommendService(settings)
        before = RecommendService(settings, store_factory=lambda s: old.open_store(s))
        model_id = json.loads((run_dir / "index" / "hm.json").read_text())["model_id"]
        store = after.store()
        assert store is not None
        print("[ab] VectorStore.search ...", flush=True)
        res["search"] = search_ab(old, store, model_id, args.ab_queries, rng)
        mix = request_bodies(run_dir, args.requests, 11)
        times: dict[str, list[float]] = {"before": [], "after": []}
        kinds = []
        same = []
        print(f"[ab] RecommendService.recommend, {len(mix)} requests each ...", flush=True)
        with single_thread():
            for _, body in request_bodies(run_dir, 10, 12):
                for svc in (before, after):
                    svc.recommend(RecommendRequest.model_validate(body))
            for kind, body in mix:
                got = {}
                order = [("before", before), ("after", after)]
                if rng.random() < 0.5:
                    order.reverse()
                for label, svc in order:
                    t0 = time.perf_counter()
                    got[label] = svc.recommend(RecommendRequest.model_validate(body))
                    times[label].append(time.perf_counter() - t0)
                kinds.append(kind)
                same.append([i.item_id for i in got["before"].items] == [i.item_id for i in got["after"].items])
        b, a = pct(times["before"]), pct(times["after"])
        res["recommend"] = {
            "requests": len(mix), "before": b, "after": a,
            "p50_before_over_after": round(b["p50_ms"] / a["p50_ms"], 2),
            "p95_before_over_after": round(b["p95_ms"] / a["p95_ms"], 2),
            "mean_before_over_after": round(float(np.mean(times["before"]) / np.mean(times["after"])), 2),
            "identical_answers": float(np.mean(same)),
            "by_kind": {k: {"before": pct([t for t, kk in zip(times["before"], kinds, strict=True) if kk == k]),
                            "after": pct([t for t, kk in zip(times["after"], kinds, strict=True) if kk == k])}
                        for k in sorted(set(kinds))}}
        print(f"  recommend p50 {b['p50_ms']} -> {a['p50_ms']} ms ({res['recommend']['p50_before_over_after']}x), "
              f"p95 {b['p95_ms']} -> {a['p95_ms']}, identical {res['recommend']['identical_answers']:.3f}", flush=True)
        before.close()
        after.close()
    res["before_commit"] = args.before
    res["stages"] = [s.name for s in after.stages]
    return res.write()


def run_threads(args: Any) -> Path:
    """torch on 1 vs 2 threads for ``RecommendService.recommend``, interleaved request by request."""
    import torch

    from atelier.config import Settings
    from atelier.serve.schemas import RecommendRequest
    from atelier.serve.service import RecommendService
    from benchmarks.perf.recommend import request_bodies

    res = Result("threads")
    run_dir = bench_run_dir("hm")
    svc = RecommendService(Settings.model_validate({"run_dir": run_dir, "DATABASE_URL": ""}))
    rng = np.random.default_rng(args.seed)
    mix = request_bodies(run_dir, args.requests, 21)
    for _, body in mix[:10]:
        svc.recommend(RecommendRequest.model_validate(body))
    before = torch.get_num_threads()
    times: dict[int, list[float]] = {1: [], 2: []}
    for _, body in mix:
        for n in rng.permutation([1, 2]):
            torch.set_num_threads(int(n))
            t0 = time.perf_counter()
            svc.recommend(RecommendRequest.model_validate(body))
            times[int(n)].append(time.perf_counter() - t0)
    torch.set_num_threads(before)
    svc.close()
    res["requests"] = len(mix)
    res["stages"] = [s.name for s in svc.stages]
    res["one_thread"], res["two_threads"] = pct(times[1]), pct(times[2])
    res["p50_two_over_one"] = round(res["two_threads"]["p50_ms"] / res["one_thread"]["p50_ms"], 2)
    res["mean_two_over_one"] = round(float(np.mean(times[2]) / np.mean(times[1])), 2)
    print(f"[threads] p50 1 thread {res['one_thread']['p50_ms']} ms, 2 threads {res['two_threads']['p50_ms']} ms "
          f"({res['p50_two_over_one']}x)", flush=True)
    return res.write()
