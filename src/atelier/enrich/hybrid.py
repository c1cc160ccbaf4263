"""Per-field defaults (``hybrid``): each STD field is filled by the extractor that won it on held-out data.

``field_sources.toml`` (data, next to this module) says, per field, which backend fills it
(``tfidf-lr``, ``embedded-ll-lora``, ``minilm``, ``keyword``, ``embedded``... or none) and an optional
``fallback`` value for when that backend gives no answer (keyword rules that match nothing). It is
written from the extraction benchmark's tuning half by ``choose_sources``
(``benchmarks/bench_extraction.py --write-sources``); the README reports the test half. Fields the
benchmark does not measure use ``default``; RE phrases come from the ``re`` backend when they are asked
(``phrases``: grounded phrases cut from the product text, issue #19; ``embedded``: free generation).

The embedded LLM fills a field only where one of its variants strictly beat every non-LLM baseline on
the tuning half, the supervised ones (trained on the LoRA's own labelled items) included; ties go to the
cheaper method. Such a field also names its ``baseline`` (the best zero-shot method): when the LLM
backend cannot run here (llama-cpp-python is an optional extra, the LoRA adapter or the ``gguf`` package
may be absent: ``BackendUnavailable``), the field is filled by that baseline with a logged warning, and
the hybrid model id says so (``+down:<backend>``), so the cache never mixes the two: a source that goes
down while answering changes the id, and ``core.run_prepared`` asks again under the new id. Other
backend failures are that product's error.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import threading
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atelier.enrich.base import BackendUnavailable, ExtractionRequest, Extractor, get_extractor, register
from atelier.enrich.fieldwise import FieldwiseExtractor
from atelier.enrich.prompt import UNKNOWN_LABEL, RawProduct, build_request, label_maps
from atelier.schema import Schema, load_schema

if TYPE_CHECKING:
    from atelier.config import Settings

__all__ = ["BASELINES", "LLM_METHODS", "METHOD_SOURCES", "SUPERVISED", "FieldSource", "FieldSources",
           "HybridExtractor", "choose_sources", "load_sources"]

SOURCES_FILE = Path(__file__).with_name("field_sources.toml")
log = logging.getLogger(__name__)

# Benchmark method -> backend that implements it (None: no backend, the fallback value only).
METHOD_SOURCES: dict[str, str | None] = {
    "majority": None, "keyword": "keyword", "keyword_or_majority": "keyword", "minilm": "minilm",
    "keyword_or_minilm": "keyword-minilm",
    "embedded": "embedded", "loglik": "embedded-ll", "loglik_cal": "embedded-ll-cal",
    "loglik_lora": "embedded-ll-lora", "tfidf_lr": "tfidf-lr",
}
# Cheapest first: on a tie the earlier one wins.
BASELINES = ("majority", "keyword", "keyword_or_majority", "minilm", "keyword_or_minilm")
LLM_METHODS = ("loglik", "loglik_cal", "loglik_lora", "embedded")
# Non-LLM classifiers trained on the LoRA's own labelled items (benchmarks/bench_extraction.py --supervised):
# the bar an LLM method must clear. One becomes a default only if it ships as a backend (tfidf_lr does).
SUPERVISED = ("tfidf_lr", "minilm_lr")
# Backends that run the embedded model in-process (need the optional llama-cpp-python).
LOCAL_LLM = frozenset({"embedded", "embedded-ll", "embedded-ll-cal", "embedded-ll-lora", "phrases-ll",
                       "phrases-ll-lora"})


@dataclass(frozen=True)
class FieldSource:
    """Who fills one field: a backend name (or None) and a value for when it has no answer."""

    method: str
    backend: str | None
    fallback: str | None = None
    baseline: str | None = None  # non-LLM method used when ``backend`` cannot run here


@dataclass(frozen=True)
class FieldSources:
    """The whole config: per-field sources, the default for other fields, the RE backend."""

    fields: dict[str, FieldSource]
    default: str | None = "keyword"
    re: str | None = "embedded"
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def source(self, name: str) -> FieldSource:
        """The source of field ``name`` (the default for fields not in the file)."""
        return self.fields.get(name) or FieldSource("default", self.default)

    def digest(self, versions: Mapping[str, str] | None = None) -> str:
        """Short hash of the config and of ``versions`` (the rules' versions: part of the hybrid backend's model
        id, hence of the cache key and of the shipped file's key)."""
        data = {n: (s.backend, s.fallback) + ((s.baseline,) if s.baseline else ())
                for n, s in sorted(self.fields.items())}
        payload: list[Any] = [data, self.default, self.re]
        if versions:
            payload.append(dict(sorted(versions.items())))
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:8]


def load_sources(path: Path | None = None) -> FieldSources:
    """Read ``field_sources.toml`` (or ``path``)."""
    raw = tomllib.loads((path or SOURCES_FILE).read_text())
    fields = {}
    for name, spec in raw.get("fields", {}).items():
        method = str(spec["method"])
        if method not in METHOD_SOURCES:
            raise ValueError(f"field_sources: {name}: unknown method {method!r}; known: {', '.join(METHOD_SOURCES)}")
        baseline = spec.get("baseline")
        if baseline is not None and baseline not in BASELINES:
            raise ValueError(f"field_sources: {name}: baseline {baseline!r} is not one of {', '.join(BASELINES)}")
        fields[name] = FieldSource(method, METHOD_SOURCES[method], spec.get("fallback"), baseline)
    default, re_backend = str(raw.get("default", "keyword")), str(raw.get("re", "embedded"))
    return FieldSources(fields, default=None if default in ("", "none") else default,
                        re=None if re_backend in ("", "none") else re_backend, note=str(raw.get("note", "")))


def choose_sources(tune: Mapping[str, Mapping[str, tuple[int, int]]],
                   fallbacks: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Per field, the method to use, from (correct, n) counts on the tuning half.

    ``tune[field][method] = (correct, n)``, pooled over catalogues. The best baseline is the most
    accurate of ``BASELINES`` (ties: the cheaper). An LLM method replaces it only when strictly more
    accurate than it *and* than every supervised baseline measured (``SUPERVISED``: classifiers trained
    on the LoRA's own labelled items); otherwise the best supervised method that ships as a backend
    (``METHOD_SOURCES``) replaces it when strictly more accurate. ``fallbacks[field]`` is stored for
    the methods that need one (majority, keyword -> majority).
    Returns ``{field: {"method", "acc", "baseline", "baseline_acc", "best_llm"?, "best_supervised"?,
    "fallback"?}}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, methods in tune.items():
        acc = {m: c / n for m, (c, n) in methods.items() if n}
        base = [m for m in BASELINES if m in acc]
        if not base:
            raise ValueError(f"{name}: no baseline measured")
        best_base = max(base, key=lambda m: (acc[m], -base.index(m)))
        llm = [m for m in LLM_METHODS if m in acc]
        best_llm = max(llm, key=lambda m: (acc[m], -llm.index(m))) if llm else None
        sup = [m for m in SUPERVISED if m in acc]
        best_sup = max(sup, key=lambda m: (acc[m], -sup.index(m))) if sup else None
        shipped = [m for m in sup if METHOD_SOURCES.get(m)]
        best_shipped = max(shipped, key=lambda m: (acc[m], -shipped.index(m))) if shipped else None
        method = best_base
        if best_llm is not None and acc[best_llm] > max(acc[best_base], acc[best_sup] if best_sup else 0.0):
            method = best_llm
        elif best_shipped is not None and acc[best_shipped] > acc[best_base]:
            method = best_shipped
        row: dict[str, Any] = {"method": method, "acc": acc[method], "baseline": best_base,
                               "baseline_acc": acc[best_base]}
        if best_llm is not None:
            row.update(best_llm=best_llm, best_llm_acc=acc[best_llm])
        if best_sup is not None:
            row.update(best_supervised=best_sup, best_supervised_acc=acc[best_sup])
        if method in ("majority", "keyword_or_majority") or best_base in ("majority", "keyword_or_majority"):
            if not fallbacks or name not in fallbacks:
                raise ValueError(f"{name}: {method} needs a fallback value")
            row["fallback"] = fallbacks[name]
        out[name] = row
    return out


def sources_toml(chosen: Mapping[str, Mapping[str, Any]], note: str, default: str = "keyword",
                 re: str = "embedded") -> str:
    """``field_sources.toml`` text for a ``choose_sources`` result."""
    lines = [f"# Written by benchmarks/bench_extraction.py --write-sources. {note}".rstrip(),
             f'note = "{note}"', f'default = "{default}"  # fields the benchmark does not measure',
             f're = "{re}"  # backend for RE phrases when they are asked ("none": no RE)', ""]
    for name, row in chosen.items():
        lines.append(f'[fields."{name}"]' if "." in name else f"[fields.{name}]")
        lines.append(f'method = "{row["method"]}"  # tuning acc {row["acc"]:.3f}; best baseline '
                     f'{row["baseline"]} {row["baseline_acc"]:.3f}'
                     + (f'; best supervised {row["best_supervised"]} {row["best_supervised_acc"]:.3f}'
                        if "best_supervised" in row else "")
                     + (f'; best LLM {row["best_llm"]} {row["best_llm_acc"]:.3f}' if "best_llm" in row else ""))
        if row["method"] in LLM_METHODS:
            lines.append(f'baseline = "{row["baseline"]}"  # used where the LLM backend cannot run')
        if row.get("fallback"):
            lines.append(f'fallback = "{row["fallback"]}"')
        lines.append("")
    return "\n".join(lines)


@register("hybrid")
class HybridExtractor(Extractor):
    """Asks each field's source backend for its fields only and merges the answers."""

    constrained = True

    def __init__(self, sources: FieldSources | None = None, settings: Settings | None = None,
                 backends: Mapping[str, Extractor] | None = None, schema: Schema | None = None) -> None:
        self.sources = sources or load_sources()
        self.settings = settings
        self.schema = schema or load_schema()
        self._backends: dict[str, Extractor] = dict(backends or {})
        self._lock = threading.Lock()
        self._down: set[str] = set()  # LLM backends that cannot run here (their fields use the baseline)
        self._probed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> HybridExtractor:
        """Sources from the packaged ``field_sources.toml``; sub-backends built from ``settings``."""
        return cls(settings=settings)

    def backend(self, name: str) -> Extractor:
        """The sub-backend ``name`` (built once)."""
        with self._lock:
            if name not in self._backends:
                self._backends[name] = get_extractor(name, self.settings)
            return self._backends[name]

    def _probe(self) -> None:
        """Once: which LLM backends with a baseline cannot run here (no llama-cpp-python, no adapter)."""
        if self._probed:
            return
        self._probed = True
        llm = {METHOD_SOURCES[m] for m in LLM_METHODS}
        no_llama = importlib.util.find_spec("llama_cpp") is None
        missing = BackendUnavailable("llama-cpp-python is not installed (the optional `llm` extra: run `make llm`)")
        for src in self.sources.fields.values():
            name = src.backend
            if name is not None and name in llm and src.baseline and name not in self._down:
                try:
                    if no_llama and name in LOCAL_LLM:
                        raise missing
                    self.backend(name)
                except Exception as exc:  # any failure to build it means: use the baseline
                    self._mark_down(name, exc)
        if self.sources.re in LOCAL_LLM and no_llama and self.sources.re not in self._down:
            self._mark_down(self.sources.re, missing)

    def _mark_down(self, backend: str, exc: BaseException) -> None:
        self._down.add(backend)
        fields = [n for n, s in self.sources.fields.items() if s.backend == backend and s.baseline]
        if fields:
            log.warning("hybrid: %s is unavailable (%s); fields %s use their baseline instead",
                        backend, exc, ", ".join(fields))
        if backend == self.sources.re:
            log.warning("hybrid: %s is unavailable (%s); RE phrases are left empty", backend, exc)

    def route(self, name: str) -> str | None:
        """The backend that fills field ``name`` here: its source, or its baseline when the source is down."""
        src = self.sources.source(name)
        if src.backend in self._down and src.baseline:
            return METHOD_SOURCES[src.baseline]
        return src.backend

    def versions(self) -> dict[str, str]:
        """Versions of the rules the sources run in-process: the schema (keyword rules, labels) and, for a
        grounded-phrase RE backend, the phrase cutting and assignment rules (``phrases.PHRASES_VERSION``).
        Model-backed sources (TF-IDF, MiniLM, the LLM) are pinned by the committed files the config names."""
        out = {"schema": str(self.schema.version)}
        if self.sources.re and self.sources.re.startswith("phrases"):
            from atelier.enrich.phrases import PHRASES_VERSION

            out["phrases"] = PHRASES_VERSION
        return out

    @property
    def config_id(self) -> str:
        """``hybrid@<digest>``: the id with every configured source up (the shipped file is made under it)."""
        return f"hybrid@{self.sources.digest(self.versions())}"

    @property
    def model_id(self) -> str:
        """``config_id`` plus ``+down:<backends>`` for the LLM sources that cannot run here."""
        self._probe()
        down = sorted(self._down)
        return self.config_id + (f"+down:{','.join(down)}" if down else "")

    def with_backends(self, backends: Mapping[str, Extractor]) -> HybridExtractor:
        """A twin answering through ``backends`` in place of its own sub-backends of those names (batched picks
        standing in for MiniLM / TF-IDF): same sources, same down-state, same model id."""
        self._probe()
        twin = copy.copy(self)
        twin._backends = {**self._backends, **backends}
        return twin

    def _ask(self, name: str, request: ExtractionRequest, fields: list[str], re_fields: list[str]) -> dict[str, Any]:
        """One sub-backend's answer for ``fields`` (and RE fields) as a dict ({} when it is not JSON)."""
        ex = self.backend(name)
        ctx = request.context
        if isinstance(ex, FieldwiseExtractor):
            sub = replace(request, context={**ctx, "fields": fields, "re_fields": re_fields})
        else:  # a generating backend needs a prompt and schema for just these fields
            product = RawProduct(item_id=request.item_id, title=str(ctx.get("title", "")),
                                 description=str(ctx.get("description", "")), known=dict(ctx.get("known", {})))
            sub = build_request(product, self.schema, fields, re_fields, show_known=bool(product.known))
            sub = replace(sub, context={**sub.context, **{k: v for k, v in ctx.items() if k == "attempt"}})
        try:
            answer = json.loads(ex.complete(sub))
        except json.JSONDecodeError:
            return {}
        return answer if isinstance(answer, dict) else {}

    def complete(self, request: ExtractionRequest) -> str:
        """Each field from its source, the fallback where the source said nothing, RE from ``re``."""
        ctx = request.context
        fields = [f for f in ctx.get("fields", []) if f in self.schema.std]
        self._probe()
        re_fields = list(ctx.get("re_fields", [])) if self.sources.re and self.sources.re not in self._down else []
        groups: dict[str, list[str]] = {}
        for name in fields:
            backend = self.route(name)
            if backend is not None:
                groups.setdefault(backend, []).append(name)
        answer: dict[str, Any] = {}
        for backend, names in groups.items():
            try:
                got = self._ask(backend, request, names, re_fields if backend == self.sources.re else [])
            except BackendUnavailable as exc:
                # An LLM source that cannot run here (model, adapter or package missing): its fields use
                # their baseline from now on and the model id says so (``+down:``), so run_prepared asks
                # again under that id. Any other failure (one product too long...) is that product's error.
                if not all(self.sources.source(n).baseline and self.sources.source(n).backend == backend
                           for n in names):
                    raise
                self._mark_down(backend, exc)
                got = {}
                for base, sub in _group({n: self.route(n) for n in names}).items():
                    got.update(self._ask(base, request, sub, []))
            answer.update({n: got.get(n, UNKNOWN_LABEL) for n in names})
            if "re" in got and backend == self.sources.re:
                answer["re"] = got["re"]
        if re_fields and "re" not in answer and self.sources.re:
            try:
                answer["re"] = self._ask(self.sources.re, request, [], re_fields).get("re", {})
            except BackendUnavailable as exc:
                if self.sources.re not in LOCAL_LLM:
                    raise
                self._mark_down(self.sources.re, exc)  # the in-process model cannot load: no RE, not an error
        for name in fields:
            src = self.sources.source(name)
            if answer.get(name, UNKNOWN_LABEL) == UNKNOWN_LABEL:
                to_label = {v: k for k, v in label_maps(self.schema)[name].items()}
                answer[name] = to_label.get(src.fallback, UNKNOWN_LABEL) if src.fallback else UNKNOWN_LABEL
        if ctx.get("re_fields") and "re" not in answer:
            answer["re"] = {n: [] for n in ctx["re_fields"]}
        return json.dumps(answer)

    def close(self) -> None:
        """Close every sub-backend."""
        for ex in self._backends.values():
            ex.close()


def _group(routes: Mapping[str, str | None]) -> dict[str, list[str]]:
    """{backend: fields} from {field: backend} (fields without a backend left out)."""
    out: dict[str, list[str]] = {}
    for name, backend in routes.items():
        if backend is not None:
            out.setdefault(backend, []).append(name)
    return out

