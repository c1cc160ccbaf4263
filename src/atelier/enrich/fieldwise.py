"""Extractors that pick each STD field's value on their own, without generating JSON.

A ``FieldwiseExtractor`` answers the same ``ExtractionRequest`` as the generating backends (so the
parse -> repair -> cache path is shared) but fills it by choosing, per asked field, one allowed
value: by log-likelihood under the small LLM (``embedded-ll``, module ``loglik``), by MiniLM
similarity to the value's label and synonyms (``minilm``), by the schema's keyword rules
(``keyword``), or keyword rules with the MiniLM choice where no term matches (``keyword-minilm``).
These extractors write no RE phrases: RE fields come back as empty lists.
"""

from __future__ import annotations

import json
import threading
from abc import abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from atelier.enrich.base import ExtractionRequest, Extractor, register
from atelier.enrich.prompt import UNKNOWN_LABEL, label_maps
from atelier.enrich.rules import keyword_values
from atelier.schema import Schema, load_schema

if TYPE_CHECKING:
    from atelier.config import Settings

__all__ = ["FieldwiseExtractor", "KeywordExtractor", "KeywordThenNearestExtractor", "NearestLabelExtractor",
           "product_text"]


def product_text(title: str, description: str) -> str:
    """The text every fieldwise extractor reads: title, then description."""
    title, description = title.strip(), description.strip()
    return f"{title}. {description}" if title and description else title or description


class FieldwiseExtractor(Extractor):
    """Base: ``pick`` returns allowed values per field; ``complete`` writes them as the answer JSON."""

    constrained = True

    def __init__(self, schema: Schema | None = None) -> None:
        self.schema = schema or load_schema()

    @abstractmethod
    def pick(self, title: str, description: str, fields: list[str]) -> dict[str, str]:
        """Per field in ``fields``, the chosen allowed value (a field may be left out: no answer)."""

    def complete(self, request: ExtractionRequest) -> str:
        """The flat answer JSON: one label per asked field (``unknown`` when none), empty RE lists."""
        ctx = request.context
        fields = [f for f in ctx.get("fields", []) if f in self.schema.std]
        chosen = self.pick(str(ctx.get("title", "")), str(ctx.get("description", "")), fields) if fields else {}
        to_label = {name: {v: k for k, v in label_maps(self.schema)[name].items()} for name in fields}
        answer: dict[str, Any] = {name: to_label[name].get(chosen[name], UNKNOWN_LABEL) if name in chosen
                                  else UNKNOWN_LABEL for name in fields}
        re_fields = list(ctx.get("re_fields", []))
        if re_fields:
            answer["re"] = {name: [] for name in re_fields}
        return json.dumps(answer)


@register("keyword")
class KeywordExtractor(FieldwiseExtractor):
    """The schema's keyword/synonym rules (``atelier.enrich.rules``); no match -> no answer."""

    @property
    def model_id(self) -> str:
        """``keyword:rules@<schema version>``."""
        return f"keyword:rules@{self.schema.version}"

    def pick(self, title: str, description: str, fields: list[str]) -> dict[str, str]:
        """Longest matching term per field."""
        return keyword_values(f"{title} {description}", self.schema, fields)


def value_terms(schema: Schema, name: str) -> dict[str, list[str]]:
    """Per allowed value of STD field ``name``: its readable label, then every synonym naming it."""
    terms: dict[str, list[str]] = {value: [label] for label, value in label_maps(schema)[name].items()}
    for alias, target in schema.std[name].synonyms.items():
        if target in terms and alias not in terms[target]:
            terms[target].append(alias)
    return terms


@register("minilm")
class NearestLabelExtractor(FieldwiseExtractor):
    """The allowed value whose label or synonym is nearest to the product text in MiniLM space.

    Each term (label or synonym) is embedded on its own; a value scores the cosine of its best
    term. Label vectors are computed once per field.
    """

    def __init__(self, schema: Schema | None = None, device: str = "cpu",
                 encode: Callable[[list[str]], np.ndarray] | None = None) -> None:
        super().__init__(schema)
        self.device = device
        self._encode = encode  # texts -> L2-normalised rows; None = MiniLM (tests pass a toy encoder)
        self._terms: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> NearestLabelExtractor:
        """No settings needed: the encoder ships offline."""
        return cls()

    @property
    def model_id(self) -> str:
        """``minilm:all-MiniLM-L6-v2@<schema version>``."""
        from atelier.text import ENCODER_ID

        return f"minilm:{ENCODER_ID}@{self.schema.version}"

    def _field(self, name: str) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(values, term -> value index, term vectors) of one field."""
        hit = self._terms.get(name)
        if hit is None:
            terms = value_terms(self.schema, name)
            values = list(terms)
            owner = np.array([i for i, v in enumerate(values) for _ in terms[v]])
            vecs = self.encode([t for v in values for t in terms[v]])  # (terms, 384)
            hit = self._terms[name] = (values, owner, vecs)
        return hit

    def encode(self, texts: list[str]) -> np.ndarray:
        """L2-normalised vectors of ``texts``, shape (len(texts), dim)."""
        if self._encode is not None:
            return self._encode(texts)
        from atelier.text import encode_texts

        return encode_texts(texts, device=self.device)

    def pick_many(self, texts: list[str], fields: list[str]) -> list[dict[str, str]]:
        """``pick`` for many texts at once (one encoder pass)."""
        with self._lock:
            doc = self.encode(texts)  # (n, 384), L2-normalised
            out: list[dict[str, str]] = [{} for _ in texts]
            for name in fields:
                values, owner, vecs = self._field(name)
                sims = doc @ vecs.T  # (n, terms)
                best = np.full((len(texts), len(values)), -np.inf, dtype=np.float32)
                for j in range(len(values)):
                    best[:, j] = sims[:, owner == j].max(axis=1)
                for i, j in enumerate(best.argmax(axis=1)):
                    out[i][name] = values[int(j)]
        return out

    def pick(self, title: str, description: str, fields: list[str]) -> dict[str, str]:
        """Nearest value per field."""
        return self.pick_many([product_text(title, description)], fields)[0]


@register("keyword-minilm")
class KeywordThenNearestExtractor(NearestLabelExtractor):
    """Keyword rules where a term matches, else the MiniLM nearest label (always answers)."""

    @property
    def model_id(self) -> str:
        """``keyword-minilm:all-MiniLM-L6-v2@<schema version>``."""
        return "keyword-" + super().model_id

    def pick_many(self, texts: list[str], fields: list[str]) -> list[dict[str, str]]:
        """Nearest labels, overridden by keyword matches."""
        near = super().pick_many(texts, fields)
        return [{**n, **keyword_values(t, self.schema, fields)} for t, n in zip(texts, near, strict=True)]
