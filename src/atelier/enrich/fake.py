"""The deterministic fake backend: for unit tests and offline demos, never for real enrichment.

It is a real ``Extractor`` subclass, so tests run the exact prompt -> parse -> repair -> cache
path. Answers come from keyword rules over the product text (same input, same answer), or from
a list of canned raw outputs (to test repair, retries and error records).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence

from atelier.enrich.base import BackendError, ExtractionRequest, Extractor, register
from atelier.enrich.prompt import UNKNOWN_LABEL, label_maps
from atelier.enrich.rules import keyword_values
from atelier.schema import load_schema

__all__ = ["FakeExtractor"]


@register("fake")
class FakeExtractor(Extractor):
    """Keyword-rule answers, or canned ``responses`` in order (an ``Exception`` item is raised)."""

    constrained = True

    def __init__(self, responses: Sequence[str | Exception] | None = None, delay: float = 0.0,
                 concurrency: int = 1, version: str = "1") -> None:
        self.responses = list(responses) if responses is not None else None
        self.delay = delay
        self.concurrency = concurrency
        self.version = version  # lets tests change the "model" and watch the cache miss
        self.calls: list[ExtractionRequest] = []
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        """``fake:rules@<version>``."""
        return f"fake:rules@{self.version}"

    def complete(self, request: ExtractionRequest) -> str:
        """A canned answer, else a schema-valid JSON answer from keyword rules."""
        with self._lock:
            self.calls.append(request)
            canned = self.responses.pop(0) if self.responses else None
        if self.delay:
            time.sleep(self.delay)
        if isinstance(canned, Exception):
            raise canned if isinstance(canned, BackendError) else BackendError(str(canned))
        if canned is not None:
            return canned
        schema = load_schema()
        ctx = request.context
        text = f"{ctx.get('title', '')} {ctx.get('description', '')}"
        fields = list(ctx.get("fields", []))
        found = keyword_values(text, schema, fields)
        labels = {name: {v: k for k, v in label_maps(schema)[name].items()} for name in fields}
        answer: dict[str, object] = {name: labels[name].get(found[name], UNKNOWN_LABEL) if name in found
                                     else UNKNOWN_LABEL for name in fields}
        re_fields = list(ctx.get("re_fields", []))
        if re_fields:
            title = str(ctx.get("title", "")).strip().lower()[:32]
            answer["re"] = {name: ([title] if name == "category_specification" and title else [])
                            for name in re_fields}
        return json.dumps(answer)
