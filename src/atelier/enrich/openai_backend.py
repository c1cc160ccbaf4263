"""The OpenAI-compatible backend: vLLM, llama.cpp server, Ollama, or any server speaking the protocol.

Requests use ``response_format={"type": "json_schema", ...}`` so servers that support structured
output (vLLM, llama.cpp server, Ollama) constrain decoding to the schema; a server that rejects
that (an HTTP error naming ``response_format``: a 400, or the 500 llama-cpp-python's own server
answers with) is asked again with ``{"type": "json_object", "schema": ...}`` (llama-cpp-python's
server constrains decoding to that schema), then with plain ``json_object``, then with no format;
the downgrade is kept for the process. Transient failures (connection errors, timeouts, 429, 5xx, bodies that
are not a chat completion) are retried with exponential backoff and jitter; other 4xx errors are
final. The batch runner keeps ``concurrency`` requests in flight.
"""

from __future__ import annotations

import random
import threading
import time
from typing import TYPE_CHECKING, Any

from atelier.enrich.base import BackendError, ExtractionRequest, Extractor, register

if TYPE_CHECKING:
    from atelier.config import Settings

__all__ = ["OpenAIExtractor"]


def kind_sent(fmt: dict[str, Any] | None) -> str:
    """Which of ``_FORMATS`` a ``response_format`` value is."""
    if fmt is None:
        return "none"
    if fmt["type"] == "json_object":
        return "json_object_schema" if "schema" in fmt else "json_object"
    return str(fmt["type"])

_FORMATS = ("json_schema", "json_object_schema", "json_object", "none")


@register("openai")
class OpenAIExtractor(Extractor):
    """Chat completions against ``base_url`` with schema-constrained JSON, retries and a timeout."""

    def __init__(self, base_url: str, model: str, api_key: str = "", concurrency: int = 8, timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 0.5, max_backoff: float = 8.0,
                 temperature: float = 0.0) -> None:
        if not base_url:
            raise BackendError("the openai backend needs a server: set ATELIER_LLM_BASE_URL (e.g. http://localhost:8000/v1)")
        if not model:
            raise BackendError("the openai backend needs a model name: set ATELIER_LLM_MODEL")
        from openai import OpenAI

        self.base_url = base_url
        self.model = model
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.temperature = temperature
        # Retries are ours (counted, testable, with the same backoff for every failure kind).
        self.client = OpenAI(base_url=base_url, api_key=api_key or "not-needed", timeout=timeout, max_retries=0)
        self._format = 0  # index into _FORMATS: the richest format the server has accepted
        self._lock = threading.Lock()
        self.retries = 0  # transient failures retried, over the backend's life (for summaries)

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAIExtractor:
        """Server, model, key, concurrency, timeout and retries from the ``ATELIER_LLM_*`` settings."""
        return cls(settings.llm_base_url, settings.llm_model, settings.llm_api_key,
                   concurrency=settings.llm_concurrency, timeout=settings.llm_timeout_s,
                   max_retries=settings.llm_max_retries)

    @property
    def model_id(self) -> str:
        """``openai:<model>`` (name your server's models distinctly: the cache trusts the name)."""
        return f"openai:{self.model}"

    def _response_format(self, schema: dict[str, Any]) -> dict[str, Any] | None:
        kind = _FORMATS[self._format]
        if kind == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": "item_attributes", "schema": schema, "strict": True}}
        if kind == "json_object_schema":
            return {"type": "json_object", "schema": schema}
        if kind == "json_object":
            return {"type": "json_object"}
        return None

    def complete(self, request: ExtractionRequest) -> str:
        """One chat completion; transient errors retried with backoff, then ``BackendError``."""
        import openai

        attempt = int(request.context.get("attempt", 1))
        failures = 0
        while True:
            fmt = self._response_format(request.schema)
            kwargs: dict[str, Any] = {"model": self.model, "messages": request.messages,
                                      "max_tokens": request.max_tokens,
                                      "temperature": self.temperature if attempt == 1 else 0.7}
            if fmt is not None:
                kwargs["response_format"] = fmt
            try:
                resp = self.client.chat.completions.create(**kwargs)
                content = resp.choices[0].message.content
                if content is None:
                    raise BackendError("the server returned a completion without content")
                return str(content)
            except openai.APIStatusError as exc:
                if "response_format" in str(exc) and exc.status_code in (400, 422, 500):
                    with self._lock:  # the server lacks this format: use a simpler one from now on
                        if _FORMATS[self._format] == kind_sent(fmt) and self._format < len(_FORMATS) - 1:
                            self._format += 1
                        downgraded = _FORMATS[self._format] != kind_sent(fmt)
                    if downgraded:
                        continue
                if isinstance(exc, openai.InternalServerError | openai.RateLimitError):
                    failures += 1
                    if failures > self.max_retries:
                        raise BackendError(f"{type(exc).__name__} after {failures} tries: {exc}") from exc
                    with self._lock:
                        self.retries += 1
                    delay = min(self.max_backoff, self.backoff * 2 ** (failures - 1))
                    time.sleep(delay * (0.5 + random.random() / 2))
                    continue
                raise BackendError(f"HTTP {exc.status_code}: {exc}") from exc
            except (openai.APIConnectionError, openai.APIResponseValidationError, ValueError, AttributeError,
                    IndexError, TypeError) as exc:
                # ValueError/AttributeError/IndexError/TypeError: a 200 whose body is not a chat completion.
                failures += 1
                if failures > self.max_retries:
                    raise BackendError(f"{type(exc).__name__} after {failures} tries: {exc}") from exc
                with self._lock:
                    self.retries += 1
                delay = min(self.max_backoff, self.backoff * 2 ** (failures - 1))
                time.sleep(delay * (0.5 + random.random() / 2))  # jitter: concurrent workers do not retry in step
