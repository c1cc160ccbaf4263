"""Batch enrichment of a catalogue: cached, resumable, bounded concurrency, a summary of outcomes.

``enrich_dataset`` reads an ingested catalogue, fills STD facts from its columns (the same
mapping as ``atelier vocab``), asks the backend only for products whose (inputs, prompt version,
model) are not in the cache, appends each result to the cache as it finishes (so an interrupted
run resumes where it stopped), and writes:

- ``runs/items/<dataset>.enriched.jsonl``: item JSON of every enriched product of the selection;
- ``runs/items/<dataset>.enrich_errors.jsonl``: one error record per product that failed;
- ``runs/reports/enrich-<dataset>.json``: the summary (counts per outcome, items/s).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atelier.atomic import atomic_write, write_json
from atelier.enrich.base import Extractor
from atelier.enrich.cache import EnrichCache
from atelier.enrich.core import EnrichmentResult, EnrichOptions, cache_key, for_product, prepare, run_prepared
from atelier.enrich.prompt import PROMPT_VERSION, RawProduct
from atelier.schema import Schema, load_schema

if TYPE_CHECKING:
    from atelier.config import Settings

__all__ = ["EnrichSummary", "cache_path", "enrich_dataset", "enrich_products", "load_products"]

Progress = Callable[[EnrichmentResult], None]


@dataclass
class EnrichSummary:
    """Counts per outcome for one batch; ``items_per_s`` counts products the model was asked about."""

    dataset: str
    backend: str
    prompt_version: str
    total: int = 0
    cached: int = 0
    ok: int = 0
    repaired: int = 0
    errors: int = 0
    retried: int = 0  # products that needed more than one attempt (any final outcome)
    model_seconds: float = 0.0
    wall_seconds: float = 0.0
    items_per_s: float = 0.0
    error_rate: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)
    torn_cache_lines: int = 0

    def add(self, result: EnrichmentResult) -> None:
        """Count one result."""
        self.total += 1
        if result.cached:
            self.cached += 1
            return
        if result.attempts > 1:
            self.retried += 1
        self.model_seconds += result.seconds
        if result.status == "ok":
            self.ok += 1
        elif result.status == "repaired":
            self.repaired += 1
        else:
            self.errors += 1


def cache_path(settings: Settings) -> Path:
    """Where the enrichment cache log lives."""
    return settings.run_dir / "enrich" / "cache.jsonl"


def load_products(settings: Settings, dataset: str, limit: int | None = None,
                  schema: Schema | None = None) -> list[RawProduct]:
    """The first ``limit`` products of an ingested catalogue, with their column STD facts."""
    from atelier.catalogue import column_items
    from atelier.ingest import load_tables

    schema = schema or load_schema()
    items_df = load_tables(settings.dataset_dir(dataset))[0]
    if limit is not None:
        items_df = items_df.head(limit)
    products = []
    for item in column_items(items_df, dataset, schema):
        service = item.service.model_dump(exclude={"title", "description"}, exclude_none=True)
        products.append(RawProduct(item_id=item.item_id, title=item.service.title,
                                   description=item.service.description, known=dict(item.clothes), service=service))
    return products


def enrich_products(products: Iterable[RawProduct | dict[str, Any]], extractor: Extractor, cache: EnrichCache | None,
                    schema: Schema | None = None, options: EnrichOptions | None = None,
                    on_result: Progress | None = None) -> list[EnrichmentResult]:
    """Enrich many products, in input order; cache hits are not sent; each result is cached as it lands.

    Up to ``extractor.concurrency`` requests run at once. On an interrupt (Ctrl-C) no new request
    starts; what finished is already in the cache, so the next run resumes from there.
    """
    schema = schema or load_schema()
    options = options or EnrichOptions()
    prepared = [prepare(p, schema, options) for p in products]
    results: list[EnrichmentResult | None] = [None] * len(prepared)
    todo: list[int] = []
    for i, prep in enumerate(prepared):
        hit = cache.get(cache_key(prep.input_hash, PROMPT_VERSION, extractor.model_id)) if cache else None
        if hit is not None:
            hit = results[i] = for_product(hit, prep, schema)
            if on_result:
                on_result(hit)
        else:
            todo.append(i)

    def finish(i: int, result: EnrichmentResult) -> None:
        if cache is not None:
            cache.put(result)
        results[i] = result
        if on_result:
            on_result(result)

    if extractor.concurrency <= 1:
        for i in todo:
            finish(i, run_prepared(prepared[i], extractor, schema, options))
    else:
        # A sliding window of futures: bounded memory, and an interrupt cancels little.
        with ThreadPoolExecutor(max_workers=extractor.concurrency, thread_name_prefix="enrich") as pool:
            pending: dict[Future[EnrichmentResult], int] = {}
            queue = iter(todo)
            try:
                for i in queue:
                    pending[pool.submit(run_prepared, prepared[i], extractor, schema, options)] = i
                    if len(pending) >= 2 * extractor.concurrency:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in done:
                            finish(pending.pop(fut), fut.result())
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        finish(pending.pop(fut), fut.result())
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
    return [r for r in results if r is not None]


def enrich_dataset(settings: Settings, dataset: str, extractor: Extractor, limit: int | None = None,
                   options: EnrichOptions | None = None, on_start: Callable[[int, int], None] | None = None,
                   on_result: Progress | None = None) -> EnrichSummary:
    """Enrich an ingested catalogue (first ``limit`` products); write items, errors and the summary.

    ``on_start(total, cached)`` is called once the cache has been checked.
    """
    from atelier.catalogue import write_items_jsonl

    schema = load_schema()
    options = options or EnrichOptions()
    products = load_products(settings, dataset, limit, schema)
    summary = EnrichSummary(dataset=dataset, backend=extractor.model_id, prompt_version=PROMPT_VERSION)
    start = time.perf_counter()
    with EnrichCache(cache_path(settings), sync_every=0.0) as cache:
        summary.torn_cache_lines = cache.torn_lines
        if on_start is not None:
            hits = sum(cache_key(prepare(p, schema, options).input_hash, PROMPT_VERSION, extractor.model_id) in cache
                       for p in products)
            on_start(len(products), hits)

        def count(result: EnrichmentResult) -> None:
            summary.add(result)
            if on_result:
                on_result(result)

        results = enrich_products(products, extractor, cache, schema, options, on_result=count)
    summary.backend = extractor.model_id  # a hybrid source that went down mid-run changed it (+down:)
    summary.wall_seconds = round(time.perf_counter() - start, 3)
    asked = summary.ok + summary.repaired + summary.errors
    summary.items_per_s = round(asked / summary.model_seconds, 4) if summary.model_seconds else 0.0
    summary.model_seconds = round(summary.model_seconds, 3)
    failed = [r for r in results if r.item is None]
    summary.error_rate = round(len(failed) / len(results), 4) if results else 0.0
    items_dir = settings.run_dir / "items"
    out = items_dir / f"{dataset}.enriched.jsonl"
    write_items_jsonl([r.item for r in results if r.item is not None], out)
    errors_path = items_dir / f"{dataset}.enrich_errors.jsonl"
    _write_jsonl([r.error_record() for r in failed], errors_path)
    report = settings.run_dir / "reports" / f"enrich-{dataset}.json"
    summary.outputs = {"items": str(out), "errors": str(errors_path), "summary": str(report),
                       "cache": str(cache_path(settings))}
    write_json(report, {**asdict(summary), "options": asdict(options)}, indent=2)
    return summary


def _write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    """Write JSON lines atomically (temp file + rename)."""
    with atomic_write(path, "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
