"""Column mappings: packaged files load, known real rows map, the merge rule, validation errors."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pytest

from atelier.mapping import (
    ColumnMapping,
    MappingError,
    coverage,
    load_mapping,
    map_columns,
    unmapped_values,
)
from atelier.schema import load_schema

PACKAGED = ("hm", "myntra", "rtr")


def _data_dir() -> Path | None:
    env = os.environ.get("ATELIER_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates += [base.parent / "shared" / "data" for base in Path(__file__).resolve().parents]
    return next((c for c in candidates if (c / "hm").is_dir()), None)


DATA = _data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="shared benchmark data not found")


def _data(rel: str) -> Path:
    assert DATA is not None
    path = DATA / rel
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- packaged files ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PACKAGED)
def test_packaged_mapping_loads_and_validates(name: str) -> None:
    schema = load_schema()
    mapping = load_mapping(name, schema)
    assert mapping.dataset == name
    assert mapping.columns
    assert mapping.source.endswith(f"{name}.toml")
    for table in mapping.columns.values():
        for targets in table.values():
            for field, values in targets.items():
                assert set(values) <= set(schema.std[field].values)


def test_unknown_packaged_name() -> None:
    with pytest.raises(MappingError, match="no packaged mapping 'nope'"):
        load_mapping("nope")


def test_load_by_path_equals_by_name() -> None:
    by_name = load_mapping("rtr")
    assert load_mapping(Path(by_name.source)) == by_name
    assert by_name.constants == {"gender": ("female",)}


# --- known real rows -----------------------------------------------------------------------------


@needs_data
def test_hm_known_rows() -> None:
    frame = pd.read_csv(_data("hm/articles.csv.gz"), dtype=str, nrows=2000)
    clothes = map_columns(frame, load_mapping("hm"))
    assert len(clothes) == len(frame)
    by_id = dict(zip(frame["article_id"], clothes, strict=True))
    strap_top = by_id["0108775015"]  # Strap top: Vest top, Black, Solid, Ladieswear, Jersey Basic
    assert strap_top["category"] == ["02top_08vesttop"]
    assert strap_top["category_specification"] == ["top"]
    assert strap_top["top.sleeve_length_type"] == ["sleeveless"]
    assert strap_top["color"] == ["black"]
    assert strap_top["print"] == ["solid"]
    assert strap_top["gender"] == ["female"]
    assert strap_top["fiber_composition"] == ["jersey"]
    # Sport index, "Men H&M Sport" section: the section settles gender before the index's "both".
    assert by_id["0145872037"]["gender"] == ["male"]
    assert by_id["0145872037"]["print"] == ["melange"]
    assert by_id["0145872037"]["color"] == ["gray"]
    # Denim appearance gives fibre, not print; kids' index gives kids.
    denim = by_id["0156289011"]
    assert denim["fiber_composition"] == ["denim"]
    assert "print" not in denim
    assert denim["gender"] == ["kids"]
    # product type "Unknown" gives nothing; the garment group fills category_specification.
    unknown = by_id["0156224002"]
    assert "category" not in unknown
    assert unknown["category_specification"] == ["socks_tights"]
    # colour group "Other" gives nothing; the perceived colour is only a fallback.
    other = by_id["0212042036"]
    assert other["category"] == ["08shoes_01sneakers"]
    assert "color" not in other


@needs_data
def test_myntra_known_row() -> None:
    frame = pd.read_csv(_data("myntra/styles.csv"), dtype=str, nrows=2000)
    clothes = map_columns(frame, load_mapping("myntra"))
    row = dict(zip(frame["id"], clothes, strict=True))["15970"]  # Men Shirts Navy Blue Fall Casual
    assert row == {
        "category": ["02top_03shirt"],
        "category_specification": ["top"],
        "color": ["navy"],
        "gender": ["male"],
        "season": ["autumn"],
        "occasion": ["everyday"],
        "style": ["casual"],
    }


@needs_data
def test_rtr_known_rows() -> None:
    frame = pd.read_csv(_data("rtr/rentals.csv.gz"), dtype=str, nrows=2000)
    clothes = map_columns(frame, load_mapping("rtr"))
    assert all(c["gender"] == ["female"] for c in clothes)
    for category, row in zip(frame["category"], clothes, strict=True):
        if category == "gown":
            assert row["category"] == ["04onepiece_01dress"]
            assert row["dress.length_type"] == ["maxi"]
        elif category == "romper":
            assert row["category"] == ["04onepiece_02jumpsuit"]
            assert row["dress.length_type"] == ["mini"]
        elif category == "dress":
            assert row["category"] == ["04onepiece_01dress"]
            assert "dress.length_type" not in row


# --- no gaps on the full real files --------------------------------------------------------------


@needs_data
def test_hm_mapping_covers_every_value() -> None:
    cols = ["product_type_name", "colour_group_name", "graphical_appearance_name", "index_group_name"]
    frame = pd.read_csv(_data("hm/articles.csv.gz"), dtype=str, usecols=cols)
    gaps = unmapped_values(frame, load_mapping("hm"))
    assert gaps["product_type_name"] == {}
    assert set(gaps["colour_group_name"]) <= {"Unknown", "Other"}
    assert set(gaps["graphical_appearance_name"]) <= {"Unknown"}
    assert gaps["index_group_name"] == {}


@needs_data
def test_myntra_and_rtr_mappings_cover_every_value() -> None:
    myntra = pd.read_csv(_data("myntra/styles.csv"), dtype=str, usecols=["articleType", "baseColour"])
    gaps = unmapped_values(myntra, load_mapping("myntra"))
    assert gaps == {"articleType": {}, "baseColour": {}}
    rtr = pd.read_csv(_data("rtr/rentals.csv.gz"), dtype=str, usecols=["category"])
    assert unmapped_values(rtr, load_mapping("rtr")) == {"category": {}}


# --- merge rule, constants, missing values ------------------------------------------------------

_TWO_COLUMNS = """
dataset = "toy"
[columns.kind]
"vest" = { category = "02top_08vesttop", "top.sleeve_length_type" = "sleeveless" }
"tee" = { category = "02top_06tshirt" }
[columns.colour]
"navy" = { color = "navy", category = "01outer_01coat" }
"multi" = { color = ["multi", "red"] }
[columns.group]
"top" = { category_specification = "top", color = "black", gender = "male" }
[constants]
gender = "female"
color = "white"
"""


def test_first_column_wins_and_later_columns_fill(tmp_path: Path) -> None:
    mapping = load_mapping(_write(tmp_path, _TWO_COLUMNS))
    frame = pd.DataFrame(
        {
            "kind": ["vest", "tee", None, "unmapped"],
            "colour": ["navy", "multi", "navy", float("nan")],
            "group": ["top", "top", None, None],
        }
    )
    rows = map_columns(frame, mapping)
    # kind wins category over colour; colour wins color over group; group fills the rest.
    assert rows[0] == {
        "category": ["02top_08vesttop"],
        "top.sleeve_length_type": ["sleeveless"],
        "color": ["navy"],
        "category_specification": ["top"],
        "gender": ["male"],
    }
    assert rows[1]["color"] == ["multi", "red"]
    assert rows[1]["category"] == ["02top_06tshirt"]
    # missing kind: colour's category fills in; constants fill gender only.
    assert rows[2] == {"color": ["navy"], "category": ["01outer_01coat"], "gender": ["female"]}
    # unmapped and NaN values give nothing: only the constants remain.
    assert rows[3] == {"gender": ["female"], "color": ["white"]}
    # each row gets its own lists
    rows[1]["color"].append("x")
    assert map_columns(frame, mapping)[1]["color"] == ["multi", "red"]


def test_absent_columns_skipped_and_constants_apply(tmp_path: Path) -> None:
    mapping = load_mapping(_write(tmp_path, _TWO_COLUMNS))
    rows = map_columns(pd.DataFrame({"kind": ["tee", "tee"], "other": [1, 2]}), mapping)
    assert rows == [{"category": ["02top_06tshirt"], "gender": ["female"], "color": ["white"]}] * 2
    assert map_columns(pd.DataFrame({"x": [1]}), mapping) == [{"gender": ["female"], "color": ["white"]}]
    assert map_columns(pd.DataFrame({"kind": []}), mapping) == []


def test_non_string_column_values(tmp_path: Path) -> None:
    path = _write(tmp_path, 'dataset = "t"\n[columns.year]\n"2012" = { season = "summer" }\n')
    rows = map_columns(pd.DataFrame({"year": [2012.0, float("nan"), 2011.0]}), load_mapping(path))
    assert rows == [{"season": ["summer"]}, {}, {}]


# --- bad mapping files ---------------------------------------------------------------------------


def test_unknown_field(tmp_path: Path) -> None:
    path = _write(tmp_path, 'dataset = "t"\n[columns.kind]\n"Tee" = { colour = "black" }\n')
    with pytest.raises(MappingError) as err:
        load_mapping(path)
    msg = str(err.value)
    assert str(path) in msg and "[columns.kind]" in msg and "'Tee'" in msg
    assert "'colour' is not an STD field" in msg


def test_value_not_allowed_and_synonym_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, 'dataset = "t"\n[columns.c]\n"Dark Blue" = { color = "dark blue" }\n')
    with pytest.raises(MappingError) as err:
        load_mapping(path)
    msg = str(err.value)
    assert str(path) in msg and "[columns.c]" in msg and "'Dark Blue'" in msg and "'color'" in msg
    assert "'dark blue' is not an allowed value" in msg and "'navy'" in msg
    path = _write(tmp_path, 'dataset = "t"\n[columns.c]\n"X" = { color = ["black", "plaid-ish"] }\n')
    with pytest.raises(MappingError, match="'plaid-ish' is not an allowed value"):
        load_mapping(path)


def test_bad_constants_and_shapes(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match=r"\[constants\].*'gender'.*'women' is not an allowed"):
        load_mapping(_write(tmp_path, 'dataset = "t"\n[constants]\ngender = "women"\n'))
    with pytest.raises(MappingError, match="value must be a string or a non-empty list"):
        load_mapping(_write(tmp_path, 'dataset = "t"\n[columns.c]\n"X" = { color = 3 }\n'))
    with pytest.raises(MappingError, match="'dataset' must be a non-empty string"):
        load_mapping(_write(tmp_path, '[columns.c]\n"X" = { color = "black" }\n'))
    with pytest.raises(MappingError, match="unknown keys"):
        load_mapping(_write(tmp_path, 'dataset = "t"\nextra = 1\n'))


def test_malformed_toml(tmp_path: Path) -> None:
    path = _write(tmp_path, 'dataset = "t"\n[columns.c\n"X" = { color = "black" }\n')
    with pytest.raises(MappingError, match="not valid TOML") as err:
        load_mapping(path)
    assert str(path) in str(err.value)
    with pytest.raises(MappingError, match="not found"):
        load_mapping(tmp_path / "missing.toml")


# --- unmapped values, coverage -------------------------------------------------------------------


def test_unmapped_values_reports_gaps_with_counts(tmp_path: Path) -> None:
    mapping = load_mapping(_write(tmp_path, _TWO_COLUMNS))
    frame = pd.DataFrame(
        {
            "kind": ["vest", "Jorts", "Jorts", "tee", None, "Skort"],
            "colour": ["navy"] * 6,
        }
    )
    assert unmapped_values(frame, mapping) == {"kind": {"Jorts": 2, "Skort": 1}, "colour": {}}


def test_coverage_arithmetic() -> None:
    schema = load_schema()
    rows = [
        {"category": ["02top_06tshirt"], "color": ["black", "white"]},
        {"category": ["03bottom_01jeans"], "color": []},
        {"gender": ["female"], "not_a_field": ["x"]},
        {},
    ]
    cov = coverage(rows, schema)
    assert set(cov) == set(schema.std)
    assert cov["category"] == 0.5
    assert cov["color"] == 0.25
    assert cov["gender"] == 0.25
    assert cov["season"] == 0.0
    assert all(v == 0.0 for v in coverage([], schema).values())
    assert math.isclose(sum(cov.values()), 1.0)


def test_column_mapping_is_frozen() -> None:
    mapping = load_mapping("hm")
    assert isinstance(mapping, ColumnMapping)
    with pytest.raises(AttributeError):
        mapping.dataset = "x"  # type: ignore[misc]
