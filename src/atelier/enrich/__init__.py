"""LLM enrichment (DESIGN.md section 2): raw product -> validated STD/RE item JSON, cached and resumable.

Public API (what the CLI and the web service call):

- ``get_extractor(name, settings)``: a backend by name (``embedded``, ``embedded-ll``,
  ``embedded-ll-cal``, ``embedded-ll-lora``, ``minilm``, ``keyword``, ``tfidf-lr``, ``phrases``,
  ``phrases-minilm``, ``phrases-ll``, ``phrases-ll-lora``, ``hybrid``, ``openai``, ``shipped``, ``fake``);
- ``enrich_product(raw, extractor, cache=...)``: one product -> ``EnrichmentResult`` (an item, or
  an error record; never raises for a bad answer);
- ``enrich_products`` / ``enrich_dataset``: batches with bounded concurrency, the cache, outputs.

Modules: ``base`` (interface + registry), ``prompt`` (versioned prompt + answer schema),
``core`` (parse, repair, retry), ``cache`` (append-only JSONL log), ``batch``, ``rules`` (keyword
baseline), one module per backend, ``fieldwise`` (extractors that pick each field's value:
keyword, MiniLM nearest label), ``loglik`` (value scoring with the embedded LLM), ``lora`` (the
same with the committed LoRA adapter), ``supervised`` (TF-IDF + logistic regression trained on the
LoRA's labelled items), ``phrases`` / ``phrase_llm`` (grounded RE phrases cut from the product text and
assigned to RE fields), ``hybrid`` (per-field sources from ``field_sources.toml``), ``shipped`` (the
enrichment file made on a GPU) and ``gpu`` (the batched scorer that makes it).
"""

from atelier.enrich import embedded as _embedded  # noqa: F401  (registers "embedded")
from atelier.enrich import fake as _fake  # noqa: F401  (registers "fake")
from atelier.enrich import fieldwise as _fieldwise  # noqa: F401  (registers "keyword", "minilm")
from atelier.enrich import hybrid as _hybrid  # noqa: F401  (registers "hybrid")
from atelier.enrich import loglik as _loglik  # noqa: F401  (registers "embedded-ll", "embedded-ll-cal")
from atelier.enrich import lora as _lora  # noqa: F401  (registers "embedded-ll-lora")
from atelier.enrich import openai_backend as _openai  # noqa: F401  (registers "openai")
from atelier.enrich import phrase_llm as _phrase_llm  # noqa: F401  (registers "phrases-ll", "phrases-ll-lora")
from atelier.enrich import phrases as _phrases  # noqa: F401  (registers "phrases", "phrases-minilm")
from atelier.enrich import shipped as _shipped  # noqa: F401  (registers "shipped")
from atelier.enrich import supervised as _supervised  # noqa: F401  (registers "tfidf-lr")
from atelier.enrich.base import (
    BackendError,
    BackendUnavailable,
    ExtractionRequest,
    Extractor,
    UnknownBackendError,
    available_backends,
    get_extractor,
    register,
)
from atelier.enrich.batch import EnrichSummary, cache_path, enrich_dataset, enrich_products, load_products
from atelier.enrich.cache import EnrichCache
from atelier.enrich.core import EnrichmentResult, EnrichOptions, enrich_product, parse_answer
from atelier.enrich.prompt import PROMPT_VERSION, RawProduct

__all__ = [
    "PROMPT_VERSION",
    "BackendError",
    "BackendUnavailable",
    "EnrichCache",
    "EnrichOptions",
    "EnrichSummary",
    "EnrichmentResult",
    "ExtractionRequest",
    "Extractor",
    "RawProduct",
    "UnknownBackendError",
    "available_backends",
    "cache_path",
    "enrich_dataset",
    "enrich_product",
    "enrich_products",
    "get_extractor",
    "load_products",
    "parse_answer",
    "register",
]
