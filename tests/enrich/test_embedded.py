"""The embedded backend for real: Gemma 3 270M through llama.cpp on a handful of real H&M products.

Marked slow (about 10 s a product on 2 CPU cores) and skipped when llama-cpp-python is not
installed (``make llm`` builds it; CI does not).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from atelier.enrich import EnrichCache, EnrichOptions, RawProduct, enrich_products, get_extractor
from atelier.enrich.embedded import llama_available
from atelier.paths import GGUF_NAME
from atelier.schema import UNKNOWN, load_schema

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not llama_available(), reason="llama-cpp-python is not installed (run `make llm`)"),
]
# Reuse the GGUF a developer already assembled under runs/models; else assemble it once per session.
REPO_GGUF = Path(__file__).resolve().parents[2] / "runs" / "models" / GGUF_NAME


@pytest.fixture(scope="session")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of the model file (assembled from the PyPI part packages if needed)."""
    from atelier.enrich.embedded import ensure_gguf

    return ensure_gguf(REPO_GGUF if REPO_GGUF.is_file() else tmp_path_factory.mktemp("gguf") / GGUF_NAME)


def test_real_model_enriches_real_hm_products(gguf: Path, data_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATELIER_LLM_MODEL_PATH", str(gguf))
    from atelier.config import get_settings

    get_settings.cache_clear()
    articles = pd.read_csv(data_dir / "hm" / "articles.csv.gz", dtype=str, nrows=200).sample(4, random_state=1)
    products = [RawProduct(item_id=r.article_id, title=r.prod_name, description=r.detail_desc or "",
                           known={"category_specification": ["top"]})
                for r in articles.itertuples(index=False)]
    extractor = get_extractor("embedded")
    assert extractor.model_id.startswith("embedded:gemma3-270m")
    schema = load_schema()
    with EnrichCache(tmp_path / "cache.jsonl") as cache:
        results = enrich_products(products, extractor, cache, schema,
                                  EnrichOptions(fields=("color", "season", "fit"), re_fields=("style", "color")))
        again = enrich_products(products, extractor, cache, schema,
                                EnrichOptions(fields=("color", "season", "fit"), re_fields=("style", "color")))
    assert all(r.status in ("ok", "repaired") for r in results), [r.error for r in results]
    for r in results:
        assert r.item is not None and r.attempts == 1  # the grammar makes the first answer parse
        for name, values in r.extracted["clothes"].items():
            assert name in ("color", "season", "fit")
            assert all(v in schema.std[name].values and v != UNKNOWN for v in values)
        for phrases in r.item.reinforced_feature_value.values():
            assert all(0 < len(p) <= 32 for p in phrases)
    assert all(r.cached for r in again)


def test_loglik_scorer_scores_every_value_and_matches_one_at_a_time(gguf: Path) -> None:
    """The one-batch scorer (shared prefix, one sequence per candidate) agrees with scoring a field alone."""
    import numpy as np

    from atelier.enrich.loglik import LogLikExtractor

    ex = LogLikExtractor(gguf, n_threads=1)
    try:
        text = "Product: Black leather ankle boots with a side zip."
        both = ex.score(text, ["color", "category"])
        alone = ex.score(text, ["color"])
        assert set(both) == {"color", "category"}
        assert both["color"].shape == (len(ex.values("color")),) and np.isfinite(both["category"]).all()
        assert (both["color"] <= 0).all()  # mean log-probabilities
        # Batch composition changes llama.cpp's Q4 kernels: scores move by up to ~0.3 nats (also against
        # one-sequence evaluation), but the order is what the extractor uses.
        assert int(np.argmax(both["color"])) == int(np.argmax(alone["color"]))
        assert np.corrcoef(both["color"], alone["color"])[0, 1] > 0.95
        np.testing.assert_allclose(both["color"], alone["color"], atol=0.5)
        picked = ex.pick("Black leather ankle boots", "With a side zip.", ["color", "category"])
        assert picked["color"] in load_schema().std["color"].values
    finally:
        ex.close()
