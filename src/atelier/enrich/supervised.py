"""A supervised non-LLM extractor (``tfidf-lr``): TF-IDF of the product text + one logistic regression per field.

Trained by ``benchmarks/bench_extraction.py --supervised --write-supervised`` on exactly the labelled
items the LoRA adapter learnt from (catalogue-column labels of 4,000 H&M articles and 4,000 Myntra
styles, none sharing an id, ``group_id`` or normalised text with an evaluation item), and committed
as ``data/adapters/tfidf-lr-std/``: ``model.npz`` (vocabulary, idf, and per field the classes,
weights and intercepts) and ``manifest.json`` (what it was trained on, scikit-learn's settings).
Here it is numpy and scikit-learn's ``TfidfVectorizer`` with that fixed vocabulary and idf, so it
answers exactly as the benchmarked model did; it writes no RE phrases. ``ATELIER_SUPERVISED_MODEL``
points elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from atelier.enrich.base import BackendUnavailable, register
from atelier.enrich.fieldwise import FieldwiseExtractor, product_text
from atelier.paths import SUPERVISED_MODEL_DIR
from atelier.schema import Schema

if TYPE_CHECKING:
    from atelier.config import Settings

__all__ = ["MODEL_DIR", "TfidfLogRegExtractor", "load_model", "save_model"]

MODEL_DIR = SUPERVISED_MODEL_DIR


def save_model(out: Path, vectorizer: Any, fits: dict[str, Any], manifest: dict[str, Any]) -> Path:
    """Write a fitted ``TfidfVectorizer`` and per-field ``LogisticRegression`` models as ``model.npz`` + manifest."""
    vocab = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.get)
    arrays: dict[str, Any] = {"vocabulary": np.array(vocab, dtype=str),
                                     "idf": vectorizer.idf_.astype(np.float32)}
    for field, model in fits.items():
        arrays[f"{field}.classes"] = np.array(model.classes_, dtype=str)
        arrays[f"{field}.coef"] = model.coef_.astype(np.float32)  # (classes or 1, vocabulary)
        arrays[f"{field}.intercept"] = model.intercept_.astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "model.npz", **arrays)
    params = {k: vectorizer.get_params()[k] for k in ("ngram_range", "min_df", "sublinear_tf", "lowercase",
                                                        "token_pattern", "norm", "use_idf", "smooth_idf")}
    (out / "manifest.json").write_text(json.dumps({**manifest, "fields": sorted(fits), "vectorizer": params},
                                                  indent=1, default=list) + "\n")
    return out


def load_model(model_dir: Path) -> tuple[Any, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], str]:
    """(vectorizer, {field: (classes, coef, intercept)}, short hash); ``BackendUnavailable`` if unusable."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    npz, manifest = model_dir / "model.npz", model_dir / "manifest.json"
    if not npz.is_file() or not manifest.is_file():
        raise BackendUnavailable(f"supervised model not found: {model_dir} needs model.npz and manifest.json "
                                 "(the committed one is data/adapters/tfidf-lr-std)")
    try:
        meta = json.loads(manifest.read_text())
        with np.load(npz, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        params = meta["vectorizer"]
        vec = TfidfVectorizer(ngram_range=tuple(params["ngram_range"]), min_df=params["min_df"],
                              sublinear_tf=params["sublinear_tf"], lowercase=params["lowercase"],
                              token_pattern=params["token_pattern"], norm=params["norm"], use_idf=params["use_idf"],
                              smooth_idf=params["smooth_idf"],
                              vocabulary={t: i for i, t in enumerate(arrays["vocabulary"].tolist())})
        vec.idf_ = arrays["idf"].astype(np.float64)
        fields = {f: (arrays[f"{f}.classes"], arrays[f"{f}.coef"], arrays[f"{f}.intercept"]) for f in meta["fields"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackendUnavailable(f"{model_dir}: not a readable supervised model ({exc})") from exc
    for f, (classes, coef, intercept) in fields.items():
        if coef.shape[1] != len(arrays["idf"]) or coef.shape[0] != intercept.shape[0] or (
                coef.shape[0] != len(classes) and not (len(classes) == 2 and coef.shape[0] == 1)):
            raise BackendUnavailable(f"{model_dir}: field {f} has inconsistent shapes")
    digest = hashlib.sha256(npz.read_bytes() + manifest.read_bytes()).hexdigest()[:12]
    return vec, fields, digest


@register("tfidf-lr")
class TfidfLogRegExtractor(FieldwiseExtractor):
    """The committed TF-IDF + logistic-regression classifiers, one per field they were trained for."""

    concurrency = 4  # numpy and a sparse matrix: thread-safe, cheap

    def __init__(self, schema: Schema | None = None, model_dir: Path | None = None) -> None:
        super().__init__(schema)
        self.model_dir = Path(model_dir or MODEL_DIR)
        self._vec, self._fields, self._digest = load_model(self.model_dir)  # refuse at start, with the path
        for f, (classes, _, _) in self._fields.items():
            unknown = sorted(set(classes.tolist()) - set(self.schema.std[f].values)) if f in self.schema.std else [f]
            if unknown:
                raise BackendUnavailable(f"{self.model_dir}: field {f} predicts values outside the schema: {unknown}")
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> TfidfLogRegExtractor:
        """The committed classifiers, or the folder ``ATELIER_SUPERVISED_MODEL`` names."""
        return cls(model_dir=settings.supervised_model)

    @property
    def model_id(self) -> str:
        """``tfidf-lr:<model hash>@<schema version>``."""
        return f"tfidf-lr:{self._digest}@{self.schema.version}"

    @property
    def fields(self) -> list[str]:
        """The fields it has a classifier for."""
        return sorted(self._fields)

    def pick_many(self, texts: list[str], fields: list[str]) -> list[dict[str, str]]:
        """Per text, the most probable class of each asked field it was trained for."""
        with self._lock:
            x = self._vec.transform(texts)  # (n, vocabulary), sparse, L2-normalised rows
        out: list[dict[str, str]] = [{} for _ in texts]
        for f in fields:
            if f not in self._fields:
                continue
            classes, coef, intercept = self._fields[f]
            scores = np.asarray(x @ coef.T) + intercept  # (n, classes) or (n, 1) for two classes
            best = (scores[:, 0] > 0).astype(int) if coef.shape[0] == 1 else scores.argmax(axis=1)
            for i, j in enumerate(best):
                out[i][f] = str(classes[int(j)])
        return out

    def pick(self, title: str, description: str, fields: list[str]) -> dict[str, str]:
        """``pick_many`` for one product."""
        return self.pick_many([product_text(title, description)], fields)[0]
