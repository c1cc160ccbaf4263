"""Enriched catalogues committed with the project (``data/enriched/``), made on a GPU, used on any machine.

**The enrichment file** (``<dataset>-enriched.jsonl.gz`` + ``.manifest.json``, issue #19): the records the
CPU path (``atelier enrich --backend hybrid``) would write to its cache, one per distinct content hash,
made in one GPU run (``benchmarks/bench_enrich_gpu.py``: the LLM sources scored on the GPU, every other
source run here by ``hybrid`` itself). A line is ``{"h": input hash, "s": status, "c": model STD values,
"r": RE phrases}``; the manifest names the model id (``hybrid@<config digest>``), prompt version, schema
version and enrichment options every record answers for, and how it was made. ``ShippedRecords`` looks a
product up by (content hash, prompt version, model id), so a product whose text or columns changed, or a
changed ``field_sources.toml``, misses and is enriched on the CPU instead; never a stale answer.

**The first RE file** (``<dataset>-re.jsonl.gz``, 2026-11-27, free generation by the 270M model; its
phrases are noise, gold RE precision 0.02): ``load_re`` / ``with_shipped_re`` and the ``shipped`` backend
still read it when it is there.

The directory is ``ATELIER_ENRICHED_DIR`` or ``data/enriched`` of the source checkout.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atelier.enrich.base import BackendError, ExtractionRequest, Extractor, register
from atelier.enrich.fieldwise import FieldwiseExtractor, product_text
from atelier.enrich.prompt import UNKNOWN_LABEL, RawProduct, input_hash
from atelier.paths import SHIPPED_ENRICHED_DIR

if TYPE_CHECKING:
    from atelier.config import Settings
    from atelier.enrich.core import EnrichmentResult, EnrichOptions
    from atelier.enrich.hybrid import HybridExtractor
    from atelier.schema import ItemJSON, Schema

__all__ = ["PickedExtractor", "ShippedExtractor", "ShippedRecords", "batched_stand_ins", "enriched_dir",
           "load_manifest", "load_re", "load_records", "with_shipped_re", "write_shipped"]

ENRICHED = "enriched"  # file kind of the issue-19 files: <dataset>-enriched.*


def enriched_dir() -> Path:
    """Where shipped enriched catalogues live by default (``Settings.enriched_dir`` points elsewhere)."""
    return SHIPPED_ENRICHED_DIR


# ------------------------------------------------------------------ the enrichment file (hybrid cache records)


class ShippedRecords:
    """The records of one dataset's enrichment file, by content hash, for the model id its manifest names."""

    def __init__(self, dataset: str, directory: Path | None = None) -> None:
        self.dataset = dataset
        self.directory = directory or enriched_dir()
        self.manifest: dict[str, Any] | None = load_manifest(dataset, self.directory, ENRICHED)
        self._records: dict[str, dict[str, Any]] | None = None

    @property
    def model_id(self) -> str | None:
        """The extractor id every record answers for (None: no file)."""
        return None if self.manifest is None else str(self.manifest["model_id"])

    @property
    def prompt_version(self) -> str | None:
        """The prompt version of the records."""
        return None if self.manifest is None else str(self.manifest["prompt_version"])

    def records(self) -> dict[str, dict[str, Any]]:
        """input hash -> record ({} without a file)."""
        if self._records is None:
            if self.manifest is None:
                self._records = {}
            else:
                path = self.directory / self.manifest["file"]
                self._records = _records_by(path, path.stat().st_mtime, "h")
        return self._records

    def get(self, input_hash_: str, prompt_version: str, model_id: str, product: RawProduct | None = None,
            schema: Schema | None = None) -> EnrichmentResult | None:
        """The shipped result for this key (None: not shipped, or another model or prompt); with ``product``, its
        validated item too (columns first, the record's model values for the rest), as ``core.for_product``
        makes a cached result's."""
        if self.manifest is None or model_id != self.model_id or prompt_version != self.prompt_version:
            return None
        rec = self.records().get(input_hash_)
        if rec is None:
            return None
        from atelier.enrich.core import EnrichmentResult, _item

        extracted = {"clothes": rec.get("c", {}), "re": rec.get("r", {})}
        result = EnrichmentResult(item_id="", status=rec["s"], backend=model_id, prompt_version=prompt_version,
                                  input_hash=input_hash_, extracted=extracted, cached=True)
        if product is not None:
            from atelier.schema import load_schema

            result.item_id = product.item_id
            result.item, _ = _item(product, extracted["clothes"], extracted["re"], schema or load_schema())
        return result


@lru_cache(maxsize=4)
def _records_by(path: Path, mtime: float, key: str) -> dict[str, dict[str, Any]]:
    """A gzipped JSONL file's records by one of their fields (``mtime``: a changed file is read again)."""
    out: dict[str, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            out[str(rec[key])] = rec
    return out


def write_shipped(products: list[RawProduct], extractor: Extractor, schema: Schema, options: EnrichOptions,
                  out: Path, name: str, dataset: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Enrich every distinct product (by content hash) with ``extractor`` through the CPU path and write the file.

    ``enrich_products`` without a cache: the same prompt, parse, repair and validation as ``atelier enrich``;
    error records go to ``<name>.errors.jsonl.gz``. Returns the manifest.
    """
    from atelier.enrich.batch import enrich_products
    from atelier.enrich.core import prepare
    from atelier.enrich.prompt import PROMPT_VERSION

    first: dict[str, RawProduct] = {}
    for p in products:
        first.setdefault(prepare(p, schema, options).input_hash, p)
    results = enrich_products(list(first.values()), extractor, None, schema, options)
    model_id = extractor.model_id
    out.mkdir(parents=True, exist_ok=True)
    path, errors = out / f"{name}.jsonl.gz", out / f"{name}.errors.jsonl.gz"
    counts: dict[str, int] = {}
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as fh, \
            gzip.open(errors, "wt", encoding="utf-8", compresslevel=9) as fe:
        for h, r in sorted(zip(first, results, strict=True)):
            counts[r.status] = counts.get(r.status, 0) + 1
            if r.backend != model_id:
                raise BackendError(f"{r.item_id}: answered as {r.backend}, not {model_id}")
            if r.item is None:
                fe.write(json.dumps(r.error_record(), ensure_ascii=False) + "\n")
                continue
            rec = {"h": h, "s": r.status, "c": r.extracted.get("clothes", {}), "r": r.extracted.get("re", {})}
            fh.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
    from dataclasses import asdict

    manifest = {
        "file": path.name, "errors_file": errors.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "bytes": path.stat().st_size, "dataset": dataset, "model_id": model_id, "prompt_version": PROMPT_VERSION,
        "schema_version": schema.version, "options": asdict(options), "products": len(products),
        "distinct_inputs": len(first), "counts_distinct_inputs": counts,
        "created": datetime.now(UTC).isoformat(timespec="seconds"), **(extra or {}),
    }
    (out / f"{name}.manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


class PickedExtractor(FieldwiseExtractor):
    """A field-wise backend answered from precomputed picks by product text (a GPU run, a batch pass).

    It stands in for the backend it copies inside ``hybrid`` while the shipped file is written: ``pick``
    returns what that backend chose for the same text; its ``model_id`` is the copied backend's.
    """

    concurrency = 4

    def __init__(self, copies: str, picks: Mapping[str, Mapping[str, str]],
                 re_picks: Mapping[str, Mapping[str, list[str]]] | None = None, schema: Schema | None = None) -> None:
        super().__init__(schema)
        self.copies = copies
        self._picks = picks  # product text -> {field: value}
        self._re = re_picks  # product text -> {RE field: phrases}

    @property
    def model_id(self) -> str:
        """The copied backend's name (the hybrid's id names its sources, not their run)."""
        return f"picked:{self.copies}"

    def pick(self, title: str, description: str, fields: list[str]) -> dict[str, str]:
        """The precomputed values of this text (a text without picks is an error: nothing is guessed)."""
        text = product_text(title, description)
        got = self._picks.get(text)
        if got is None:
            raise BackendError(f"{self.copies}: no precomputed answer for this product")
        return {f: got[f] for f in fields if f in got}

    def complete(self, request: ExtractionRequest) -> str:
        """The field-wise answer, with the precomputed RE phrases when this backend gives them."""
        answer: dict[str, Any] = json.loads(super().complete(request))
        ctx = request.context
        re_fields = list(ctx.get("re_fields", []))
        if re_fields and self._re is not None:
            got = self._re.get(product_text(str(ctx.get("title", "")), str(ctx.get("description", ""))))
            if got is None:
                raise BackendError(f"{self.copies}: no precomputed RE phrases for this product")
            answer["re"] = {f: list(got.get(f, [])) for f in re_fields}
        return json.dumps(answer)

    @classmethod
    def for_hybrid(cls, hybrid: HybridExtractor, by_text: Mapping[str, Mapping[str, Any]],
                   products: list[RawProduct]) -> dict[str, Extractor]:
        """Stand-ins for the hybrid's LLM sources from GPU picks: ``by_text[variant][text]`` = {"std", "std_cal",
        "re"} (variant ``base`` or ``lora``; ``re``: part phrase -> answer word). Non-LLM sources are left to
        the hybrid itself."""
        from atelier.enrich.hybrid import METHOD_SOURCES
        from atelier.enrich.phrase_llm import ANSWERS
        from atelier.enrich.phrases import Candidate, assign, candidate_phrases

        routes = {"embedded-ll": ("base", "std"), "embedded-ll-cal": ("base", "std_cal"),
                  "embedded-ll-lora": ("lora", "std")}
        out: dict[str, Extractor] = {}
        used = {s.backend for s in hybrid.sources.fields.values()}
        for backend, (variant, key) in routes.items():
            if backend in used:
                table = {t: row[key] for t, row in by_text[variant].items()}
                out[backend] = cls(backend, table, schema=hybrid.schema)
        re_routes = {"phrases-ll": "base", "phrases-ll-lora": "lora"}
        if hybrid.sources.re in re_routes:
            answers = by_text[re_routes[hybrid.sources.re]]
            schema = hybrid.schema
            re_table: dict[str, dict[str, list[str]]] = {}
            for p in products:
                text = product_text(p.title, p.description)
                if text in re_table or text not in answers:
                    continue
                judged: Mapping[str, str] = answers[text]["re"]  # part phrase -> the LLM's answer word

                def judge(parts: list[Candidate], j: Mapping[str, str] = judged) -> list[str | None]:
                    return [ANSWERS.get(j.get(c.text, "")) for c in parts]

                re_table[text] = assign(candidate_phrases(p.title, p.description, schema), schema, judge)
            out[hybrid.sources.re] = cls(hybrid.sources.re, {t: {} for t in answers}, re_table, schema)
        assert set(out) <= set(METHOD_SOURCES.values()) | set(re_routes)
        return out


def batched_stand_ins(hybrid: HybridExtractor, asks: Sequence[tuple[str, str, Sequence[str]]]) -> dict[str, Extractor]:
    """Stand-ins for the hybrid's batchable sources (MiniLM, TF-IDF: a ``pick_many`` over many texts is far cheaper
    than one call per product), answered by one pass over the distinct texts of ``asks`` ((title, description,
    asked STD fields) per product). Keyed by the backend they replace (``HybridExtractor.with_backends``)."""
    from atelier.enrich.fieldwise import KeywordThenNearestExtractor, NearestLabelExtractor
    from atelier.enrich.rules import keyword_values
    from atelier.enrich.supervised import TfidfLogRegExtractor

    wanted: dict[str, tuple[dict[str, None], set[str]]] = {}  # backend -> (its texts in order, its fields)
    for title, description, fields in asks:
        text = product_text(title, description)
        for name in fields:
            backend = hybrid.route(name)
            if backend is None:
                continue
            texts, names = wanted.setdefault(backend, ({}, set()))
            texts[text] = None
            names.add(name)
    out: dict[str, Extractor] = {}
    for backend, (texts, names) in wanted.items():
        ex = hybrid.backend(backend)
        order, fields = list(texts), sorted(names)
        if isinstance(ex, KeywordThenNearestExtractor):
            # keyword-minilm: MiniLM only decides where no keyword does, so only those texts are encoded
            kw = [keyword_values(t, hybrid.schema, fields) for t in order]
            need = [t for t, k in zip(order, kw, strict=True) if len(k) < len(fields)]
            near = dict(zip(need, NearestLabelExtractor.pick_many(ex, need, fields), strict=True)) if need else {}
            got = [{**near.get(t, {}), **k} for t, k in zip(order, kw, strict=True)]
        elif isinstance(ex, NearestLabelExtractor | TfidfLogRegExtractor):
            got = ex.pick_many(order, fields)
        else:
            continue
        out[backend] = PickedExtractor(backend, dict(zip(order, got, strict=True)), schema=hybrid.schema)
    return out


# ------------------------------------------------------------------ the first RE file (free generation, history)


def _manifest_path(dataset: str, directory: Path | None = None, kind: str = "re") -> Path:
    return (directory or enriched_dir()) / f"{dataset}-{kind}.manifest.json"


def load_manifest(dataset: str, directory: Path | None = None, kind: str = "re") -> dict[str, Any] | None:
    """The manifest of a dataset's shipped file (``kind`` re or enriched), or None when there is none."""
    path = _manifest_path(dataset, directory, kind)
    return json.loads(path.read_text()) if path.is_file() else None


def load_records(dataset: str, directory: Path | None = None) -> dict[str, dict[str, Any]]:
    """``item_id -> record`` of the first RE file ({} when the dataset has none)."""
    manifest = load_manifest(dataset, directory)
    if manifest is None:
        return {}
    path = _manifest_path(dataset, directory).parent / manifest["file"]
    return _records_by(path, path.stat().st_mtime, "item_id")


def load_re(dataset: str, directory: Path | None = None) -> dict[str, dict[str, list[str]]]:
    """``item_id -> {RE field: [phrases]}`` from the first RE file ({} when there is none)."""
    return {i: r.get("reinforced_feature_value") or {} for i, r in load_records(dataset, directory).items()}


def with_shipped_re(items: list[ItemJSON], dataset: str, directory: Path | None = None) -> list[ItemJSON]:
    """``items`` with the first RE file's phrases of their ids (items with RE values of their own keep them)."""
    re_map = load_re(dataset, directory)
    if not re_map:
        return items
    return [item.model_copy(update={"reinforced_feature_value": re_map[item.item_id]})
            if not item.reinforced_feature_value and item.item_id in re_map else item for item in items]


@register("shipped")
class ShippedExtractor(Extractor):
    """Answers from the first RE file instead of a model (RE phrases; STD ``unknown``)."""

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
