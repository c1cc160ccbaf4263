"""The supervised extractor (``tfidf-lr``): saved models answer as fitted, bad files are refused, the shipped loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from atelier.enrich import BackendUnavailable, EnrichOptions, RawProduct, available_backends, enrich_product
from atelier.enrich.supervised import MODEL_DIR, TfidfLogRegExtractor, save_model
from atelier.schema import load_schema

SCHEMA = load_schema()
TEXTS = ["Navy blue men's shirt", "Black leather boots for women", "Red floral summer dress", "Navy cotton shirt",
         "Black ankle boots", "Red wrap dress", "Men's navy polo shirt", "Women's black boots"]
COLOR = ["navy", "black", "red", "navy", "black", "red", "navy", "black"]
GENDER = ["male", "female", "female", "male", "female", "female", "male", "female"]  # two classes: one weight row


def _fit(tmp_path: Path) -> tuple[Path, TfidfVectorizer, dict[str, LogisticRegression]]:
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True).fit(TEXTS)
    x = vec.transform(TEXTS)
    fits = {"color": LogisticRegression(C=10.0).fit(x, COLOR), "gender": LogisticRegression(C=10.0).fit(x, GENDER)}
    return save_model(tmp_path / "model", vec, fits, {"trained_by": "test"}), vec, fits


def test_registered() -> None:
    assert "tfidf-lr" in available_backends()


def test_saved_model_answers_as_the_fitted_one(tmp_path: Path) -> None:
    out, vec, fits = _fit(tmp_path)
    ex = TfidfLogRegExtractor(SCHEMA, model_dir=out)
    queries = [*TEXTS, "a navy shirt", "something else entirely"]
    got = ex.pick_many(queries, ["color", "gender", "season"])
    for f, model in fits.items():
        assert [g[f] for g in got] == list(model.predict(vec.transform(queries)))
    assert all("season" not in g for g in got)  # no classifier: no answer
    assert ex.model_id.startswith("tfidf-lr:") and ex.fields == ["color", "gender"]
    result = enrich_product(RawProduct(item_id="p1", title="Navy blue shirt", description=""), ex, schema=SCHEMA,
                            options=EnrichOptions(full=True, fields=("color",), re_fields=(), show_known=False))
    assert result.status == "ok" and result.extracted["clothes"]["color"] == ["navy"]


def test_missing_or_foreign_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="supervised model not found"):
        TfidfLogRegExtractor(SCHEMA, model_dir=tmp_path / "nowhere")
    out, _, _ = _fit(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["fields"] = ["color", "fit"]  # fit has no arrays in model.npz
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendUnavailable, match="not a readable supervised model"):
        TfidfLogRegExtractor(SCHEMA, model_dir=out)
    manifest["fields"] = ["gender", "color"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    TfidfLogRegExtractor(SCHEMA, model_dir=out)  # back to a good manifest: loads
    (out / "model.npz").write_bytes(b"not a zip")
    with pytest.raises(BackendUnavailable, match="not a readable supervised model"):
        TfidfLogRegExtractor(SCHEMA, model_dir=out)


@pytest.mark.skipif(not (MODEL_DIR / "model.npz").is_file(), reason="the committed model is not in this checkout")
def test_committed_model_loads_and_reads_plain_titles() -> None:
    ex = TfidfLogRegExtractor(SCHEMA)
    assert set(ex.fields) >= {"category", "color", "gender"}
    got = ex.pick("Nike Men Black Running Shoes", "", ["category", "color", "gender"])
    assert got["color"] == "black" and got["gender"] == "male" and got["category"].startswith("08shoes")
