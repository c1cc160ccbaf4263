"""The shipped enriched catalogue: loader, RE merge and the ``shipped`` backend (synthetic file)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from atelier.enrich import EnrichOptions, enrich_product, get_extractor
from atelier.enrich.prompt import RawProduct, input_hash
from atelier.enrich.shipped import ShippedExtractor, load_re, with_shipped_re
from atelier.schema import ItemJSON, load_schema


def _write(tmp: Path, products: list[RawProduct], re_values: list[dict[str, list[str]]]) -> None:
    schema = load_schema()
    with gzip.open(tmp / "hm-re.jsonl.gz", "wt") as fh:
        for p, rfv in zip(products, re_values, strict=True):
            h = input_hash(RawProduct(item_id=p.item_id, title=p.title, description=p.description), [],
                           list(schema.re), False, schema)
            fh.write(json.dumps({"item_id": p.item_id, "status": "ok", "input_hash": h, "clothes": {},
                                 "reinforced_feature_value": rfv}) + "\n")
    (tmp / "hm-re.manifest.json").write_text(json.dumps({"file": "hm-re.jsonl.gz", "backend": "test", "sha256": "ab"}))


def test_load_and_merge(tmp_path: Path) -> None:
    a = RawProduct(item_id="1", title="Strap top", description="Jersey top.")
    _write(tmp_path, [a], [{"fiber_composition": ["jersey"]}])
    assert load_re("hm", tmp_path) == {"1": {"fiber_composition": ["jersey"]}}
    items = [ItemJSON(item_id="1"), ItemJSON(item_id="2"),
             ItemJSON(item_id="1", reinforced_feature_value={"vibe": ["own"]})]
    merged = with_shipped_re(items, "hm", tmp_path)
    assert merged[0].reinforced_feature_value == {"fiber_composition": ["jersey"]}
    assert merged[1].reinforced_feature_value == {}
    assert merged[2].reinforced_feature_value == {"vibe": ["own"]}  # an item's own RE values win
    assert load_re("myntra", tmp_path) == {}


def test_shipped_backend(tmp_path: Path) -> None:
    a = RawProduct(item_id="1", title="Strap top", description="Jersey top.", known={"color": ["black"]})
    b = RawProduct(item_id="9", title="Strap top", description="Jersey top.")  # same text, other colourway
    _write(tmp_path, [a], [{"fiber_composition": ["jersey"], "fit": ["relaxed"]}])
    ex = ShippedExtractor("hm", tmp_path)
    assert ex.model_id == "shipped:test@ab"
    for product in (a, b):
        res = enrich_product(product, ex)
        assert res.status == "ok", (res.error, res.issues)
        assert res.item is not None and res.item.reinforced_feature_value["fiber_composition"] == ["jersey"]
    assert enrich_product(a, ex).item.clothes["color"] == ["black"]  # type: ignore[union-attr]
    changed = RawProduct(item_id="1", title="Strap top", description="Now in linen.")
    res = enrich_product(changed, ex, options=EnrichOptions())
    assert res.status == "error" and "not in the shipped file" in (res.error or "")


def test_registered() -> None:
    assert isinstance(get_extractor("shipped"), ShippedExtractor)
