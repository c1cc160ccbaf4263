"""Part 5, ingest to live: seconds from POST /items to the product appearing in /recommend.

For each enricher configuration the service starts in its own process over the benchmark run folder
(its own PostgreSQL: the products are written there and deleted afterwards), then
``bench_serve.ingest_to_live`` posts catalogue articles re-listed under a new id and title and polls
/recommend with the original article as the cart until the new one is in the top 100 (its rank is
kept). Configurations:
the catalogue's column mapping (``columns``, the default), columns + the ``fake`` LLM backend
(deterministic rules: the cost of the LLM path without a model), and columns + the ``embedded``
Gemma 3 270M backend when llama_cpp is installed (fewer products: seconds each).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.perf.common import Result, bench_run_dir
from benchmarks.perf.server import service

# "Live" = in the top 100 of /recommend for a cart holding the original article (bench_serve.py's top 12
# measures quality as much as latency: an LLM-enriched copy differs from the original and may rank 13th).
LIVE_K = 100


def llama_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def one_config(run_dir: Path, env: dict[str, str], products: int, seed: int) -> dict[str, Any]:
    from benchmarks.bench_serve import ingest_to_live

    with service(run_dir, env=env) as svc:
        # an embedded-LLM POST takes tens of seconds on a busy box: a long client timeout
        rows = ingest_to_live(svc["base"], svc["key"], run_dir, products, seed, k=LIVE_K, timeout_s=300)
        startup = svc["startup_s"]
    live = [r["live_s"] for r in rows if r["live_s"] is not None]
    post = [r["post_s"] for r in rows]
    return {"env": env, "startup_s": startup, "products": rows,
            "median_live_s": round(float(np.median(live)), 3) if live else None,
            "max_live_s": round(max(live), 3) if live else None, "median_post_s": round(float(np.median(post)), 3),
            "all_live": len(live) == len(rows)}


def run(args: Any) -> Path:
    res = Result("live")
    run_dir = bench_run_dir("hm")
    configs: dict[str, tuple[dict[str, str], int]] = {
        "columns (default)": ({"ATELIER_SERVE_ENRICHER": "columns"}, args.products),
        "llm: fake backend": ({"ATELIER_SERVE_ENRICHER": "llm", "ATELIER_LLM_BACKEND": "fake"}, args.products),
    }
    if llama_installed() and not args.no_llm:
        configs["llm: embedded Gemma 3 270M"] = (
            {"ATELIER_SERVE_ENRICHER": "llm", "ATELIER_LLM_BACKEND": "embedded", "ATELIER_LLM_THREADS": "1",
             "ATELIER_LLM_MODEL_PATH": str(Path("runs/models/gemma3-270m-q4_k_m.gguf").resolve())},
            args.llm_products)
    out = {}
    for name, (env, n) in configs.items():
        print(f"[live] {name}: {n} products ...", flush=True)
        try:
            out[name] = one_config(run_dir, env, n, args.seed)
        except Exception as exc:  # one configuration failing must not lose the others
            out[name] = {"env": env, "error": f"{type(exc).__name__}: {exc}", "median_live_s": None,
                         "max_live_s": None, "products": []}
            print(f"  failed: {out[name]['error']}", flush=True)
            continue
        print(f"  median {out[name]['median_live_s']} s, max {out[name]['max_live_s']} s, "
              f"ranks {[p['rank'] for p in out[name]['products']]}", flush=True)
    res["configs"] = out
    res["live_means"] = f"in the top {LIVE_K} of POST /recommend for a cart holding the original article"
    if not llama_installed():
        res["skipped"] = "embedded LLM: llama_cpp is not installed in this venv (make llm)"
    return res.write()
