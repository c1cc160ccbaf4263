"""Enriched catalogues committed with the project (``data/enriched/``): RE phrases on a CPU-only machine.

A GPU batch run (``benchmarks/bench_enrich_gpu.py``) enriches a whole catalogue with the embedded
model's prompt and writes one gzipped JSONL (one line per article: ``item_id``, ``status``,
``input_hash``, ``clothes``, ``reinforced_feature_value``; never the listing text) plus a manifest
(model, prompt version, counts, command, device). This module reads it back:

- ``load_re(dataset)``: ``item_id -> {RE field: [phrases]}``;
- ``with_shipped_re(items, dataset)``: item JSON with the shipped RE merged in (items that already
  carry RE values keep them);
- the ``shipped`` backend: ``atelier enrich -d hm --backend shipped`` answers from the file instead of
  a model, through the usual parse / validate / cache / outputs path, so
  ``runs/items/<dataset>.enriched.jsonl`` gets full-catalogue RE values in minutes on a CPU.
  Asked STD fields are answered ``unknown`` (the run did not extract them; the columns fill what
  they can). A product whose text changed since the run (input hash differs) is not answered
  from the file: it becomes an error record, never a stale answer.

The directory is ``ATELIER_ENRICHED_DIR`` or ``data/enriched`` of the source checkout.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atelier.enrich.base import BackendError, ExtractionRequest, Extractor, register
from atelier.enrich.prompt import UNKNOWN_LABEL, RawProduct, input_hash
from atelier.paths import SHIPPED_ENRICHED_DIR

if TYPE_CHECKING:
    from atelier.config import Settings
    from atelier.schema import ItemJSON

__all__ = ["ShippedExtractor", "enriched_dir", "load_manifest", "load_re", "load_records", "with_shipped_re"]

def enriched_dir() -> Path:
    """Where shipped enriched catalogues live by default (``Settings.enriched_dir`` points elsewhere)."""
    return SHIPPED_ENRICHED_DIR


def _manifest_path(dataset: str, directory: Path | None = None) -> Path:
    return (directory or enriched_dir()) / f"{dataset}-re.manifest.json"


def load_manifest(dataset: str, directory: Path | None = None) -> dict[str, Any] | None:
    """The manifest of a dataset's shipped file, or None when there is none."""
    path = _manifest_path(dataset, directory)
    return json.loads(path.read_text()) if path.is_file() else None


@lru_cache(maxsize=4)
def _records(path: Path, mtime: float) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            out[str(rec["item_id"])] = rec
    return out


def load_records(dataset: str, directory: Path | None = None) -> dict[str, dict[str, Any]]:
    """``item_id -> record`` of the shipped file ({} when the dataset has none)."""
    manifest = load_manifest(dataset, directory)
    if manifest is None:
        return {}
    path = _manifest_path(dataset, directory).parent / manifest["file"]
    return _records(path, path.stat().st_mtime)


def load_re(dataset: str, directory: Path | None = None) -> dict[str, dict[str, list[str]]]:
    """``item_id -> {RE field: [phrases]}`` from the shipped file ({} when there is none)."""
    return {i: r.get("reinforced_feature_value") or {} for i, r in load_records(dataset, directory).items()}


def with_shipped_re(items: list[ItemJSON], dataset: str, directory: Path | None = None) -> list[ItemJSON]:
    """``items`` with the shipped RE values of their ids (items with RE values of their own keep them)."""
    re_map = load_re(dataset, directory)
    if not re_map:
        return items
    return [item.model_copy(update={"reinforced_feature_value": re_map[item.item_id]})
            if not item.reinforced_feature_value and item.item_id in re_map else item for item in items]


@register("shipped")
class ShippedExtractor(Extractor):
    """Answers from a shipped enriched catalogue instead of a model (RE phrases; STD ``unknown``)."""

    concurrency = 1
    constrained = True

    def __init__(self, dataset: str = "hm", directory: Path | None = None) -> None:
        self.dataset, self.directory = dataset, directory
        self._by_hash: dict[str, dict[str, Any]] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ShippedExtractor:
        """The dataset's file (``ATELIER_SHIPPED_DATASET``, H&M by default) in ``ATELIER_ENRICHED_DIR``."""
        return cls(settings.shipped_dataset, settings.enriched_dir)

    @property
    def model_id(self) -> str:
        """``shipped:<the run's backend>@<file sha>`` (a new file misses the cache)."""
        manifest = load_manifest(self.dataset, self.directory)
        if manifest is None:
            return f"shipped:{self.dataset}:none"
        return f"shipped:{manifest.get('backend', '?')}@{str(manifest.get('sha256', ''))[:12]}"

    def complete(self, request: ExtractionRequest) -> str:
        """The shipped RE phrases of this product (same input hash), STD fields ``unknown``."""
        from atelier.schema import load_schema

        records = load_records(self.dataset, self.directory)
        if not records:
            raise BackendError(f"no shipped enriched catalogue for {self.dataset!r} in "
                               f"{self.directory or enriched_dir()}")
        ctx = request.context
        re_fields = list(ctx.get("re_fields", []))
        product = RawProduct(item_id=request.item_id, title=str(ctx.get("title", "")),
                             description=str(ctx.get("description", "")))
        schema = load_schema()
        h = input_hash(product, [], list(schema.re), False, schema)
        rec = records.get(request.item_id)
        if rec is None or rec.get("input_hash") != h:
            if self._by_hash is None:
                self._by_hash = {str(r.get("input_hash")): r for r in records.values()}
            rec = self._by_hash.get(h)
        if rec is None:
            raise BackendError("product not in the shipped file (new, or its text changed since the run)")
        rfv = rec.get("reinforced_feature_value") or {}
        answer: dict[str, Any] = {f: UNKNOWN_LABEL for f in ctx.get("fields", [])}
        answer["re"] = {f: list(rfv.get(f, [])) for f in re_fields}
        return json.dumps(answer)
