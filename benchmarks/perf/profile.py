"""Profile the recommend path in process with pyinstrument: where a request's time goes, by function.

Runs the ``bench_serve`` request mix through ``RecommendService.recommend`` (plus the response's JSON
serialisation) on one torch thread and writes the call tree as text
(``benchmarks/results/perf-profile-recommend-<date>.txt``, the top frames only) and a summary JSON.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.perf.common import RESULTS, Result, bench_run_dir, single_thread, today


def run(args: Any) -> Path:
    from pyinstrument import Profiler

    from atelier.config import Settings
    from atelier.serve.schemas import RecommendRequest
    from atelier.serve.service import RecommendService
    from benchmarks.perf.recommend import request_bodies

    res = Result("profile")
    run_dir = bench_run_dir("hm")
    svc = RecommendService(Settings.model_validate({"run_dir": run_dir, "DATABASE_URL": ""}))
    mix = [RecommendRequest.model_validate(b) for _, b in request_bodies(run_dir, args.requests, 5)]
    with single_thread():
        for req in mix[:20]:
            svc.recommend(req)
        profiler = Profiler(interval=0.0005)
        t = time.perf_counter()
        profiler.start()
        for req in mix:
            svc.recommend(req).model_dump_json()
        profiler.stop()
        wall = time.perf_counter() - t
    svc.close()
    text = profiler.output_text(unicode=False, color=False, show_all=False)
    out_txt = RESULTS / f"perf-profile-recommend-{today()}.txt"
    lines = text.splitlines()
    out_txt.write_text("\n".join(lines[:400]) + "\n")
    res["requests"] = len(mix)
    res["ms_per_request"] = round(1000 * wall / len(mix), 3)
    res["profile_text"] = out_txt.name
    print(f"[profile] {res['ms_per_request']} ms/request (profiled); tree in {out_txt.name}", flush=True)
    return res.write()
