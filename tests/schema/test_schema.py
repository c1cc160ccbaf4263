from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from atelier.schema import UNKNOWN, ItemJSON, SchemaError, load_schema, parse_schema
from atelier.schema.item import RE_MAX_CHARS, normalise_item


def test_packaged_schema_has_the_k_fashion_fields() -> None:
    schema = load_schema()
    for name in ("category", "season", "fiber_composition", "elasticity", "transparency", "isfleece",
                 "color", "gender", "category_specification", "print", "fit", "top.length_type",
                 "top.sleeve_length_type", "top.neck_color_design", "top.sleeve_design",
                 "bottom.length_type", "dress.length_type"):
        assert name in schema.std, name
    for name in ("style", "vibe", "fit", "occasion", "specification.metadata"):
        assert name in schema.re and schema.re[name].parent in schema.std


def test_synonyms_and_unknowns() -> None:
    color = load_schema().std["color"]
    assert color.normalise("  Dark   Blue ") == "navy"
    assert color.normalise("BLACK") == "black"
    assert color.normalise("ultraviolet glow") is None


def _schema(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "schema.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version = '1'\n[std.color\n", "not valid TOML"),
        ("[std.color]\nvalues = ['red']\n", "'version' must be a non-empty string"),
        ("version = '1'\n", "at least one STD field"),
        ("version = '1'\n[std.color]\nvalues = []\n", r"\[std.color\]: 'values' must be a non-empty list"),
        ("version = '1'\n[std.color]\nvalues = ['Red']\n", "lower-case and trimmed"),
        ("version = '1'\n[std.color]\nvalues = ['red', 'red']\n", "duplicate values"),
        ("version = '1'\n[std.color]\nvalues = ['red']\nsynonyms = {crimson = 'scarlet'}\n",
         "'crimson' maps to 'scarlet', not an allowed value"),
        ("version = '1'\n[std.color]\nvalues = ['red']\nwords = 1\n", r"unknown keys \['words'\]"),
        ("version = '1'\n[std.color]\nvalues = ['red']\n[re.vibe]\nparent = 'mood'\n",
         r"\[re.vibe\]: 'parent' must name an STD field"),
        ("version = '1'\n[std.Color]\nvalues = ['red']\n", "field names are lower-case"),
        ("version = '1'\n[std.color]\nvalues = ['unknown']\n", "reserved"),
    ],
)
def test_bad_schema_files_give_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        parse_schema(_schema(tmp_path, text))


def test_missing_schema_file(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="schema file not found"):
        parse_schema(tmp_path / "none.toml")


def test_item_json_validation_and_normalisation() -> None:
    schema = load_schema()
    item = ItemJSON.model_validate({
        "item_id": " 0108775015 ",
        "clothes": {"color": ["Dark Blue", "navy", "ultraviolet"], "sparkle": ["yes"]},
        "reinforced_feature_value": {"style": ["  Gorpcore ", "gorpcore", "x" * 100], "mood": ["calm"]},
        "service": {"title": "Strap top", "price": 0.05},
    })
    assert item.item_id == "0108775015"
    clean, issues = normalise_item(item, schema)
    assert clean.clothes == {"color": ["navy", UNKNOWN]}
    assert clean.reinforced_feature_value["style"] == ["gorpcore", "x" * RE_MAX_CHARS]
    assert "mood" not in clean.reinforced_feature_value
    assert any("sparkle" in i for i in issues) and any("ultraviolet" in i for i in issues)
    assert any("mood" in i for i in issues)


@pytest.mark.parametrize(
    "payload",
    [
        {"item_id": ""},
        {"item_id": "   "},
        {"item_id": "a", "clothes": {"color": "black"}},
        {"item_id": "a", "service": {"price": -1}},
        {"item_id": "a", "surprise": 1},
    ],
)
def test_malformed_item_json_is_rejected(payload: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ItemJSON.model_validate(payload)
