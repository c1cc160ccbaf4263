"""Part 1, enrichment: items/s of the embedded LLM on CPU, the cost of a warm-cache re-run, tokens/item.

On ``--enrich-items`` H&M products (a fixed slice of the catalogue, an empty cache file of its own):

- ``embedded``: Gemma 3 270M Q4_K_M through llama.cpp, grammar-constrained generation with the
  production prompt (the STD fields the columns lack + all RE fields), one thread; prompt and
  completion tokens per item from llama.cpp's usage counts;
- ``embedded-ll``: the same model scoring every allowed STD label by log-likelihood (no RE
  phrases): the method whose GPU figure exists (``loglik-gpu-h100-2026-11-27.json``, one H100,
  transformers, batched, 4-5 fields), so CPU and GPU are compared on the same method;
- peers in the same run: the ``fake`` backend (deterministic keyword rules: the pipeline's cost
  without a model) and a re-run of ``embedded`` over the now-warm cache (should cost ~0).

The GPU figure is read from the existing result file, not re-measured (no GPU here).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.perf.common import MAIN_RUNS, RESULTS, Result

GPU_FILE = RESULTS / "loglik-gpu-h100-2026-11-27.json"


def _count_tokens(extractor: Any) -> dict[str, int]:
    """Wrap llama.cpp's chat completion to add up its usage counts (prompt, completion, calls)."""
    counts = {"prompt_tokens": 0, "completion_tokens": 0, "calls": 0}
    llm = extractor.load()
    original = llm.create_chat_completion

    def counted(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        usage = out.get("usage") or {}
        counts["prompt_tokens"] += int(usage.get("prompt_tokens", 0))
        counts["completion_tokens"] += int(usage.get("completion_tokens", 0))
        counts["calls"] += 1
        return out

    llm.create_chat_completion = counted
    return counts


def one_backend(name: str, products: list[Any], cache_file: Path, settings: Any) -> dict[str, Any]:
    from atelier.enrich import get_extractor
    from atelier.enrich.batch import enrich_products
    from atelier.enrich.cache import EnrichCache

    extractor = get_extractor(name, settings)
    t = time.perf_counter()
    counts = _count_tokens(extractor) if name == "embedded" else None
    if name == "embedded-ll" and hasattr(extractor, "load"):
        extractor.load()
    load_s = time.perf_counter() - t
    with EnrichCache(cache_file) as cache:
        t = time.perf_counter()
        results = enrich_products(products, extractor, cache)
        wall = time.perf_counter() - t
    fresh = [r for r in results if not r.cached]
    out: dict[str, Any] = {
        "backend": extractor.model_id, "items": len(results), "fresh": len(fresh),
        "cached": len(results) - len(fresh), "ok": sum(r.status in ("ok", "repaired") for r in results),
        "model_load_s": round(load_s, 2), "wall_s": round(wall, 3),
        "items_per_s": round(len(results) / wall, 3) if wall > 0 else None,
        "s_per_item": round(wall / max(1, len(results)), 4),
    }
    if counts is not None and counts["calls"]:
        out["tokens"] = {**counts, "prompt_per_item": round(counts["prompt_tokens"] / max(1, len(fresh)), 1),
                         "completion_per_item": round(counts["completion_tokens"] / max(1, len(fresh)), 1)}
    extractor.close()
    return out


def gpu_reference() -> dict[str, Any] | None:
    """items/s of embedded-ll scoring on one H100 from the existing result file."""
    if not GPU_FILE.is_file():
        return None
    data = json.loads(GPU_FILE.read_text())
    best: dict[str, Any] = {}
    for run_name, run in data.get("runs", {}).items():
        for ds, d in run.get("datasets", {}).items():
            ips = d.get("items_per_s")
            if ips and ips > best.get(ds, {}).get("items_per_s", 0):
                best[ds] = {"items_per_s": ips, "run": run_name, "fields": d.get("fields")}
    return {"file": GPU_FILE.name, "device": "NVIDIA H100 80GB HBM3", "method": "embedded-ll, transformers bf16",
            "best": best}


def run(args: Any) -> Path:
    from atelier.config import Settings
    from atelier.enrich.batch import load_products
    from atelier.enrich.embedded import llama_available

    res = Result("enrich")
    settings = Settings.model_validate({"run_dir": MAIN_RUNS, "llm_threads": 1})  # reads tables and the GGUF only
    products = load_products(settings, "hm", limit=args.enrich_offset + args.enrich_items)[args.enrich_offset:]
    backends: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="perf-enrich-") as tmp:
        names = ["fake"] + (["embedded", "embedded-ll"] if llama_available() else [])
        for name in names:
            print(f"[enrich] {name}: {len(products)} products ...", flush=True)
            backends[name] = one_backend(name, products, Path(tmp) / f"{name}.jsonl", settings)
            print(f"  {backends[name]['items_per_s']} items/s", flush=True)
        if "embedded" in backends:
            print("[enrich] embedded again, warm cache ...", flush=True)
            backends["embedded (warm cache)"] = one_backend("embedded", products, Path(tmp) / "embedded.jsonl",
                                                            settings)
    res["products"] = {"dataset": "hm", "offset": args.enrich_offset, "n": len(products)}
    res["backends"] = backends
    res["gpu_reference"] = gpu_reference()
    if "embedded" in backends:
        cold, warm = backends["embedded"], backends["embedded (warm cache)"]
        res["warm_over_cold_wall"] = round(warm["wall_s"] / cold["wall_s"], 5)
        res["embedded_over_fake_s_per_item"] = round(cold["s_per_item"] / backends["fake"]["s_per_item"], 1)
    else:
        res["skipped"] = "embedded backends: llama_cpp not installed (make llm)"
    return res.write()
