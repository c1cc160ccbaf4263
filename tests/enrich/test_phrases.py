"""Grounded RE phrases (``phrases``): cut from the product's own text, assigned to RE fields by word lists."""

from __future__ import annotations

from atelier.enrich import EnrichOptions, enrich_product, get_extractor
from atelier.enrich.phrases import PhraseExtractor, candidate_phrases, grounded_re
from atelier.enrich.prompt import RawProduct
from atelier.schema import load_schema

TITLE = "METS 2-p shorttop"
DESCRIPTION = "Crop tops in soft cotton jersey with a racer back and an elasticated hem."


def test_grounded_re_cuts_phrases_from_the_text() -> None:
    schema = load_schema()
    got = grounded_re(TITLE, DESCRIPTION, schema)
    assert set(got) == set(schema.re)  # every RE field present, most of them empty
    assert got["category_specification"] == ["crop tops"]
    assert got["fiber_composition"] == ["soft cotton jersey"]
    assert got["detail"] == ["racer back", "elasticated hem"]
    text = f"{TITLE} {DESCRIPTION}".lower()
    assert all(p in text for phrases in got.values() for p in phrases)  # nothing the listing does not say
    assert grounded_re(TITLE, DESCRIPTION, schema, ["detail"]) == {"detail": ["racer back", "elasticated hem"]}
    roles = {c.text: c.role for c in candidate_phrases(TITLE, DESCRIPTION, schema)}
    assert roles["crop tops"] == "name" and roles["soft cotton jersey"] == "material"


def test_phrases_backend_answers_re_through_the_enrichment_path() -> None:
    ex = get_extractor("phrases")
    assert isinstance(ex, PhraseExtractor) and ex.model_id.startswith("phrases:rules@")
    product = RawProduct(item_id="1", title=TITLE, description=DESCRIPTION)
    result = enrich_product(product, ex, options=EnrichOptions(fields=("fit",)))
    assert result.item is not None, result.error
    assert result.item.reinforced_feature_value["detail"] == ["racer back", "elasticated hem"]
