"""The embedded LLM as the RE assigner of grounded phrases (``phrases-ll``, ``phrases-ll-lora``).

The phrases are cut from the product's text exactly as for ``phrases`` (``phrases.candidate_phrases``);
the candidates whose place fixes their field (the garment name, its material, title words) keep it, and
the LLM judges every other ("part") candidate: after the product it reads the question ``QUESTION``
and each RE field's one-word name (``phrases.FIELD_WORDS``, plus "sleeves" and "neckline", which drop
the phrase: STD fields say those) is scored as the answer by its mean log-probability, the
``embedded-ll`` method; all of a product's questions share one llama.cpp decode. ``phrases-ll-lora``
scores with the committed STD LoRA adapter attached (it was trained on STD questions, not on this one).

The GPU batch path (``atelier.enrich.gpu``) asks the same questions with the same token ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from atelier.enrich.base import register
from atelier.enrich.loglik import LogLikExtractor
from atelier.enrich.phrases import (
    DROP_WORDS,
    FIELD_WORDS,
    PHRASES_VERSION,
    Candidate,
    PhraseExtractor,
    assign,
    candidate_phrases,
)
from atelier.schema import Schema

if TYPE_CHECKING:
    from atelier.config import Settings

__all__ = ["ANSWERS", "QUESTION", "LLMJudge", "LLMPhraseExtractor", "LoRALLMPhraseExtractor", "question"]

QUESTION = ('In this listing, what does "{phrase}" describe: the garment, fabric, colour, pattern, detail, style, '
            "mood, fit, occasion, sleeves, neckline or other? Answer with one word.")
# Answer word -> RE field (None: drop the phrase).
ANSWERS: dict[str, str | None] = {**{w: f for f, w in FIELD_WORDS.items()}, **dict.fromkeys(DROP_WORDS)}


def question(phrase: str) -> str:
    """The question one part candidate is judged by."""
    return QUESTION.format(phrase=phrase)


class LLMJudge:
    """Part candidates -> RE fields by log-likelihood of the field words under a ``LogLikExtractor``.

    ``rest=True``: the word lists judge first and the LLM only the candidates they drop.
    """

    def __init__(self, scorer: LogLikExtractor, rest: bool = False, schema: Schema | None = None) -> None:
        self.scorer = scorer
        self.rest = rest
        self.schema = schema
        self._answers: list[list[int]] | None = None
        self.text = ""  # the product text of the candidates being judged (set by the extractor)

    def answer_tokens(self) -> list[list[int]]:
        """Token ids of each answer word (``ANSWERS`` order)."""
        if self._answers is None:
            self.scorer.load()
            self._answers = [self.scorer._tok(w) for w in ANSWERS]
        return self._answers

    def __call__(self, cands: list[Candidate]) -> list[str | None]:
        """The field of each candidate (None: dropped)."""
        out: list[str | None] = [None] * len(cands)
        ask = list(range(len(cands)))
        if self.rest:
            from atelier.enrich.phrases import _garment_words, _rule_field
            from atelier.schema import load_schema

            schema = self.schema or load_schema()
            garments = _garment_words(schema)
            out = [_rule_field(c, garments, schema) for c in cands]
            ask = [i for i, f in enumerate(out) if f is None]
        if not ask:
            return out
        answers = self.answer_tokens()
        scores = self.scorer.score_questions(f"Product: {self.text}",
                                             [(question(cands[i].text), answers) for i in ask])
        fields = list(ANSWERS.values())
        for i, s in zip(ask, scores, strict=True):
            out[i] = fields[int(np.argmax(s))]
        return out


@register("phrases-ll")
class LLMPhraseExtractor(PhraseExtractor):
    """Grounded phrases with the part candidates assigned by the embedded LLM's log-likelihood."""

    concurrency = 1  # one llama.cpp context

    def __init__(self, scorer: LogLikExtractor, schema: Schema | None = None) -> None:
        super().__init__(schema)
        self.judge = LLMJudge(scorer)

    @classmethod
    def from_settings(cls, settings: Settings) -> LLMPhraseExtractor:
        """The embedded model (no adapter)."""
        return cls(LogLikExtractor.from_settings(settings))

    @property
    def model_id(self) -> str:
        """``phrases-ll:<scorer model id>@<phrases version>``."""
        return f"{self.name or 'phrases-ll'}:{self.judge.scorer.model_id}@{PHRASES_VERSION}/{self.schema.version}"

    def phrases(self, title: str, description: str, re_fields: list[str]) -> dict[str, list[str]]:
        """RE field -> grounded phrases, parts judged by the LLM."""
        from atelier.enrich.fieldwise import product_text

        with self.judge.scorer._lock:
            self.judge.text = product_text(title, description)
            got = assign(candidate_phrases(title, description, self.schema), self.schema, self.judge)
        return {f: got.get(f, []) for f in re_fields}

    def close(self) -> None:
        """Free the model."""
        self.judge.scorer.close()


@register("phrases-ll-lora")
class LoRALLMPhraseExtractor(LLMPhraseExtractor):
    """``phrases-ll`` with the committed STD LoRA adapter attached to the scorer."""

    @classmethod
    def from_settings(cls, settings: Settings) -> LoRALLMPhraseExtractor:
        """The embedded model with the committed adapter."""
        from atelier.enrich.lora import LoRALogLikExtractor

        return cls(LoRALogLikExtractor.from_settings(settings))


def judge_all(scorer: LogLikExtractor, title: str, description: str, schema: Schema) -> dict[str, Any]:
    """(For benchmarks) candidates, their LLM fields and the assigned phrases of one product."""
    from atelier.enrich.fieldwise import product_text

    judge = LLMJudge(scorer)
    judge.text = product_text(title, description)
    cands = candidate_phrases(title, description, schema)
    return {"candidates": cands, "re": assign(cands, schema, judge)}
