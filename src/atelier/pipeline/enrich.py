"""The enrichment stage of ``atelier run``: item JSON with model values for every product it can reach.

``enrich_stage(settings, dataset, budget_s, progress)``, between vocab and the item tower:

1. every product's content hash under the ``hybrid`` extractor (the per-field sources of
   ``field_sources.toml`` and its RE method, grounded phrases), the key ``atelier enrich --backend hybrid``
   caches under;
2. products whose (hash, prompt version, model id) the shipped enrichment file holds
   (``data/enriched/<dataset>-enriched.jsonl.gz``: ``atelier.enrich.shipped``, made by
   ``benchmarks/bench_enrich_gpu.py``) take that record, then products the enrichment cache
   (``runs/enrich/cache.jsonl``) holds take theirs;
3. the rest are enriched on the CPU through the same ``hybrid`` until ``budget_s`` seconds (counted from
   the stage's start) are spent: distinct inputs in chunks, each chunk's MiniLM / TF-IDF sources picked in
   one batched pass (``shipped.batched_stand_ins``), every result cached as it lands, so a later run resumes;
4. ``settings.paths.items(dataset, "enriched")`` gets the validated item JSON of every product reached
   (columns first, model values for the fields the columns lack, RE phrases), one JSON line each in
   catalogue order: what ``catalogue.dataset_items(..., enriched=...)`` reads. A product not reached (or
   whose extraction failed) is left out and keeps its column attributes downstream;
5. ``runs/reports/enrich-<dataset>.json`` (also returned) says where each product's values came from
   (``counts``: shipped, cache, cpu, unreached), which source fills which field, the item ids ``not_reached``
   in the budget and ``failed``, and, when an LLM source cannot run here, which products lack its values.

Nothing is skipped without a line in the report.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from typing import Any

from atelier.atomic import write_json
from atelier.catalogue import write_items_jsonl
from atelier.config import Settings
from atelier.enrich import EnrichCache, EnrichmentResult, EnrichOptions, Extractor, get_extractor, load_products
from atelier.enrich.core import Prepared, cache_key, for_product, run_prepared
from atelier.enrich.hybrid import LLM_METHODS, LOCAL_LLM, HybridExtractor
from atelier.enrich.prompt import PROMPT_VERSION, RawProduct, asked_fields, build_request, input_hash
from atelier.enrich.shipped import ShippedRecords, batched_stand_ins
from atelier.schema import Schema, load_schema

__all__ = ["MAX_CHUNK", "enrich_stage"]

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]  # (products done, products in all)
MAX_CHUNK = 512  # distinct inputs per batched MiniLM / TF-IDF pass: larger gains little
MIN_CHUNK = 16  # the first chunk (it measures the rate) and the smallest


def _key(product: RawProduct, schema: Schema, options: EnrichOptions) -> tuple[str, list[str], list[str]]:
    """(content hash, asked fields, RE fields) of a product: ``core.prepare`` without building the prompt."""
    only = list(options.fields) if options.fields is not None else None
    fields = asked_fields(product, schema, full=options.full, only=only)
    re_fields = list(schema.re) if options.re_fields is None else [f for f in options.re_fields if f in schema.re]
    return input_hash(product, fields, re_fields, options.show_known, schema), fields, re_fields


def _sources(hybrid: HybridExtractor, schema: Schema) -> dict[str, Any]:
    """Which backend (and model id) fills each STD field and the RE phrases here."""
    out: dict[str, Any] = {}
    ids: dict[str, str] = {}

    def model_id(backend: str | None) -> str | None:
        if backend is None:
            return None
        if backend not in ids:
            try:
                ids[backend] = hybrid.backend(backend).model_id
            except Exception as exc:  # a backend that cannot be built here: say why
                ids[backend] = f"unavailable: {exc}"
        return ids[backend]

    for name in schema.std:
        src = hybrid.sources.source(name)
        used = hybrid.route(name)
        out[name] = {"method": src.method, "backend": used, "model_id": model_id(used),
                     "llm": src.method in LLM_METHODS and used == src.backend, "fallback_value": src.fallback}
        if used != src.backend:
            out[name]["configured_backend"] = src.backend
    re_backend = hybrid.sources.re if hybrid.sources.re not in hybrid._down else None
    out["re"] = {"backend": re_backend, "model_id": model_id(re_backend), "llm": _llm_re(re_backend)}
    if hybrid.sources.re and re_backend is None:
        out["re"]["configured_backend"] = hybrid.sources.re
    return out


def _llm_re(backend: str | None) -> bool:
    return bool(backend) and (backend in LOCAL_LLM or str(backend).startswith("phrases-ll"))


class _Ticker:
    """The stage's progress: a tqdm bar (``progress=True``), a callback, or nothing."""

    def __init__(self, progress: Progress | bool, total: int, label: str) -> None:
        self.callback = progress if callable(progress) else None
        self.bar: Any = None
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=label, unit="item", mininterval=1.0, dynamic_ncols=True)
        self.done, self.total = 0, total

    def add(self, n: int, postfix: str | None = None) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix is not None:
                self.bar.set_postfix_str(postfix, refresh=False)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def enrich_stage(settings: Settings, dataset: str, budget_s: float, progress: Progress | bool = True, *,
                 extractor: Extractor | None = None, max_chunk: int = MAX_CHUNK) -> dict[str, Any]:
    """Enrich ``dataset``: shipped file, then cache, then the CPU within ``budget_s``; write the items and report.

    ``progress``: True for a tqdm bar, a ``(done, total)`` callback, or False. ``extractor``: the ``hybrid``
    extractor to use (default: the packaged ``field_sources.toml``). Returns the report (also written to
    ``settings.paths.enrich_report(dataset)``; its path under ``"report"``).
    """
    start = time.perf_counter()
    assert budget_s >= 0, f"budget_s must be >= 0, got {budget_s}"
    schema = load_schema()
    options = EnrichOptions()
    hybrid = extractor or get_extractor("hybrid", settings)
    if not isinstance(hybrid, HybridExtractor):
        raise TypeError(f"enrich_stage needs the hybrid extractor, got {type(hybrid).__name__}")
    products = load_products(settings, dataset, None, schema)
    config_id = hybrid.config_id  # every configured source up: what the shipped file is made under
    model_id = hybrid.model_id  # "+down:<backend>" where an LLM source cannot run here
    shipped = ShippedRecords(dataset, settings.enriched_dir)
    if shipped.model_id is not None and shipped.model_id != config_id:
        log.warning("enrich %s: the shipped file was made for %s, this configuration is %s: no product can use "
                    "it (regenerate it: benchmarks/README.md)", dataset, shipped.model_id, config_id)
    keys = [_key(p, schema, options) for p in products]
    results: list[EnrichmentResult | None] = [None] * len(products)
    origin: list[str] = ["unreached"] * len(products)
    seconds: dict[str, float] = {"load": time.perf_counter() - start}
    ticker = _Ticker(progress, len(products), f"enrich {dataset}")

    def answered(i: int) -> Prepared:  # product i, answered from a record (nothing is sent)
        return Prepared(products[i], _NO_REQUEST, *keys[i])

    # 1. the shipped file: made with every source up, valid here whether or not an LLM source can run
    t = time.perf_counter()
    n = 0
    for i, (h, _, _) in enumerate(keys):
        hit = shipped.get(h, PROMPT_VERSION, config_id, products[i], schema) or (
            shipped.get(h, PROMPT_VERSION, model_id, products[i], schema) if model_id != config_id else None)
        if hit is not None:
            results[i], origin[i] = hit, "shipped"
            n += 1
    ticker.add(n, "shipped")
    seconds["shipped"] = time.perf_counter() - t
    cpu = {"asked": 0, "chunks": 0, "batched_pick_seconds": 0.0}
    with EnrichCache(settings.paths.enrich_cache, sync_every=1.0) as cache:
        # 2. the cache: an earlier run of this stage, or of `atelier enrich --backend hybrid`
        t = time.perf_counter()
        n = 0
        todo: dict[str, list[int]] = {}  # distinct input -> its products, in catalogue order
        for i, (h, _, _) in enumerate(keys):
            if results[i] is not None:
                continue
            hit = cache.get(cache_key(h, PROMPT_VERSION, config_id)) or cache.get(cache_key(h, PROMPT_VERSION,
                                                                                             model_id))
            if hit is not None:
                results[i], origin[i] = for_product(hit, answered(i), schema), "cache"
                n += 1
            else:
                todo.setdefault(h, []).append(i)
        ticker.add(n, "cache")
        seconds["cache"] = time.perf_counter() - t
        # 3. the CPU within the budget: chunks of distinct inputs, batched picks, each result cached as it lands
        t_cpu = time.perf_counter()
        pending = list(todo.values())
        rate = 0.0  # distinct inputs per second so far
        while pending:
            left = budget_s - (time.perf_counter() - start)
            if left <= 0:
                break
            # the first chunk measures the rate; later ones take about half the time left, so the budget is met
            size = MIN_CHUNK if rate == 0 else int(min(max_chunk, max(MIN_CHUNK, rate * left / 2)))
            chunk, pending = pending[:size], pending[size:]
            t_chunk = time.perf_counter()
            twin = hybrid
            try:
                stand_ins = batched_stand_ins(hybrid, [(products[idx[0]].title, products[idx[0]].description,
                                                        keys[idx[0]][1]) for idx in chunk])
                twin = hybrid.with_backends(stand_ins)
            except Exception as exc:  # a source that fails in a batch fails product by product below, on record
                log.warning("enrich %s: batched picks failed (%s: %s); asking product by product", dataset,
                            type(exc).__name__, exc)
            cpu["batched_pick_seconds"] += time.perf_counter() - t_chunk
            cpu["chunks"] += 1
            for k, idx in enumerate(chunk):
                if time.perf_counter() - start >= budget_s:
                    pending = chunk[k:] + pending
                    break
                first = products[idx[0]]
                h, fields, re_fields = keys[idx[0]]
                request = build_request(first, schema, fields, re_fields, options.show_known)
                result = run_prepared(Prepared(first, request, h, fields, re_fields), twin, schema, options)
                cache.put(result)
                cpu["asked"] += 1
                for i in idx:
                    results[i] = result if i == idx[0] else for_product(result, answered(i), schema)
                    origin[i] = "cpu"
                ticker.add(len(idx), "cpu")
            rate = cpu["asked"] / max(time.perf_counter() - t_cpu, 1e-6)
        seconds["cpu"] = time.perf_counter() - t_cpu
    ticker.close()
    model_id = hybrid.model_id  # a source that went down while answering says so
    t = time.perf_counter()
    out = settings.paths.items(dataset, "enriched")
    write_items_jsonl([r.item for r in results if r is not None and r.item is not None], out)
    seconds["write"] = time.perf_counter() - t
    report = _report(dataset, products, keys, results, origin, hybrid, schema, shipped, config_id, model_id,
                     budget_s, cpu, seconds)
    report["outputs"] = {"items": str(out), "cache": str(settings.paths.enrich_cache)}
    report["seconds"] = round(time.perf_counter() - start, 2)
    path = settings.paths.enrich_report(dataset)
    write_json(path, report, indent=1)
    report["report"] = str(path)
    return report


def _report(dataset: str, products: list[RawProduct], keys: list[tuple[str, list[str], list[str]]],
            results: list[EnrichmentResult | None], origin: list[str], hybrid: HybridExtractor, schema: Schema,
            shipped: ShippedRecords, config_id: str, model_id: str, budget_s: float, cpu: dict[str, Any],
            seconds: dict[str, float]) -> dict[str, Any]:
    """The stage's report: where each product's values came from, what was not reached or failed, and why."""
    failed = [{"item_id": products[i].item_id, **r.error_record()} for i, r in enumerate(results)
              if r is not None and r.item is None]
    unreached = [products[i].item_id for i, r in enumerate(results) if r is None]
    sources = _sources(hybrid, schema)
    llm_fields = [f for f in schema.std if hybrid.sources.source(f).method in LLM_METHODS]
    down = sorted(hybrid._down)
    cpu_s = seconds.get("cpu", 0.0)
    report: dict[str, Any] = {
        "dataset": dataset, "products": len(products), "distinct_inputs": len({k[0] for k in keys}),
        "model_id": model_id, "configured_model_id": config_id, "prompt_version": PROMPT_VERSION,
        "budget_s": budget_s, "seconds_by_step": {k: round(v, 2) for k, v in seconds.items()},
        "counts": {k: origin.count(k) for k in ("shipped", "cache", "cpu", "unreached")},
        "enriched": sum(r is not None and r.item is not None for r in results),
        "asked_on_cpu": cpu["asked"], "cpu_chunks": cpu["chunks"],
        "batched_pick_seconds": round(cpu["batched_pick_seconds"], 2),
        "cpu_items_per_s": round(cpu["asked"] / cpu_s, 2) if cpu["asked"] and cpu_s else None,
        "errors": len(failed),
        "shipped_file": None if shipped.manifest is None else {
            "file": str(shipped.directory / shipped.manifest["file"]), "model_id": shipped.model_id,
            "prompt_version": shipped.prompt_version, "made": shipped.manifest.get("how"),
            "matches_this_config": shipped.model_id == config_id},
        "sources": sources, "llm_fields": llm_fields, "llm_re": _llm_re(hybrid.sources.re),
        "llama_cpp_python": importlib.util.find_spec("llama_cpp") is not None, "down": down,
        "not_reached": unreached,
        "not_reached_why": "the time budget ran out before these products were enriched on the CPU; they keep their "
                           "column attributes (the next run resumes from the enrichment cache)" if unreached else None,
        "failed": failed,
    }
    if down:
        why = f"{', '.join(down)} cannot run here"
        if not report["llama_cpp_python"]:
            why += " (llama-cpp-python is not installed: `make llm`)"
        why += "; these products were enriched on the CPU with each LLM field's baseline instead"
        if hybrid.sources.re in down:
            why += " and no RE phrases"
        report["no_llm_values"] = {
            "why": why,
            "fields": [f for f in llm_fields if hybrid.sources.source(f).backend in down]
            + (["re"] if hybrid.sources.re in down else []),
            "products": [products[i].item_id for i in range(len(products)) if origin[i] == "cpu"]}
    return report


class _NoRequest:
    """Placeholder request of a product answered from the shipped file or the cache (nothing is sent)."""


_NO_REQUEST: Any = _NoRequest()
