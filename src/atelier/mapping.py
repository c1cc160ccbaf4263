"""Deterministic column mappings: structured catalogue columns -> STD attribute values.

A catalogue that already has structured columns (H&M ``product_type_name``, Myntra
``articleType``, RentTheRunway ``category``) needs no LLM for the facts those columns state.
Each dataset has a mapping file in ``schema/mappings/<name>.toml``::

    dataset = "hm"
    [columns.product_type_name]          # source column, most specific first
    "Vest top" = { category = "02top_08vesttop", "top.sleeve_length_type" = "sleeveless" }
    "Unknown" = {}                       # listed on purpose: known value, no facts
    [columns.colour_group_name]
    "Dark Blue" = { color = "navy" }     # a value is one allowed value or a list of them
    [constants]
    gender = "female"                    # every row, as the last fallback

Per field, the first column (in file order) that gives the field a value wins; later columns
only fill fields still empty; ``[constants]`` fill what is still empty after all columns.
Targets must be STD fields and allowed values (not synonyms): ``load_mapping`` checks them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from atelier.schema import Schema, load_schema, read_toml

__all__ = [
    "MAPPINGS_DIR",
    "ColumnMapping",
    "MappingError",
    "available_mappings",
    "coverage",
    "load_mapping",
    "map_columns",
    "unmapped_values",
]

MAPPINGS_DIR = Path(__file__).with_name("schema") / "mappings"

FieldValues = dict[str, tuple[str, ...]]


class MappingError(ValueError):
    """A mapping file is malformed; the message names the file, column, raw value and field."""


@dataclass(frozen=True)
class ColumnMapping:
    """A validated mapping: per source column, raw value -> {STD field: allowed values}."""

    dataset: str
    columns: dict[str, dict[str, dict[str, tuple[str, ...]]]]
    constants: dict[str, tuple[str, ...]]
    source: str


def available_mappings() -> list[str]:
    """Names of the packaged mapping files (``hm``, ``myntra``, ``rtr`` ...)."""
    return sorted(p.stem for p in MAPPINGS_DIR.glob("*.toml"))


def _resolve(name_or_path: str | Path) -> Path:
    if isinstance(name_or_path, Path):
        return name_or_path
    text = str(name_or_path)
    if "/" in text or "\\" in text or text.endswith(".toml"):
        return Path(text)
    path = MAPPINGS_DIR / f"{text}.toml"
    if not path.is_file():
        raise MappingError(f"no packaged mapping {text!r}; available: {available_mappings()}")
    return path


def _targets(path: Path, where: str, body: object, schema: Schema) -> FieldValues:
    """Validate one ``{field = value | [values]}`` table; ``where`` names the column and raw value."""
    if not isinstance(body, dict):
        raise MappingError(f"{path}: {where}: must be a table of field = value(s), got {body!r}")
    out: FieldValues = {}
    for field_name, raw in body.items():
        spec = schema.std.get(field_name)
        if spec is None:
            raise MappingError(f"{path}: {where}: field {field_name!r} is not an STD field")
        values = [raw] if isinstance(raw, str) else raw
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise MappingError(
                f"{path}: {where}: field {field_name!r}: value must be a string or a non-empty list "
                f"of strings, got {raw!r}"
            )
        allowed = set(spec.values)
        for value in values:
            if value not in allowed:
                canonical = spec.normalise(value)
                hint = f" (synonym of {canonical!r}: use that)" if canonical else ""
                raise MappingError(
                    f"{path}: {where}: field {field_name!r}: {value!r} is not an allowed value{hint}"
                )
        out[field_name] = tuple(dict.fromkeys(values))
    return out


def load_mapping(name_or_path: str | Path, schema: Schema | None = None) -> ColumnMapping:
    """Load and validate a mapping: a bare name ("hm") is a packaged file, else a path."""
    schema = schema or load_schema()
    path = _resolve(name_or_path)
    raw = read_toml(path, MappingError, "mapping file")
    unknown_top = set(raw) - {"dataset", "columns", "constants"}
    if unknown_top:
        raise MappingError(f"{path}: top level: unknown keys {sorted(unknown_top)}")
    dataset = raw.get("dataset")
    if not isinstance(dataset, str) or not dataset:
        raise MappingError(f"{path}: top level: 'dataset' must be a non-empty string")
    columns_raw = raw.get("columns", {})
    if not isinstance(columns_raw, dict):
        raise MappingError(f"{path}: [columns]: must be a table of [columns.<source column>] tables")
    columns: dict[str, dict[str, FieldValues]] = {}
    for column, table in columns_raw.items():
        if not isinstance(table, dict):
            raise MappingError(f"{path}: [columns.{column}]: must be a table of raw value = {{...}}")
        columns[column] = {
            str(value): _targets(path, f"[columns.{column}] {value!r}", body, schema)
            for value, body in table.items()
        }
    constants = _targets(path, "[constants]", raw.get("constants", {}), schema)
    return ColumnMapping(dataset=dataset, columns=columns, constants=constants, source=str(path))


def _key(value: object) -> str | None:
    """The mapping key a cell value is looked up under; None for missing values."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return None
        if float(value).is_integer():
            return str(int(value))
    return str(value)


def _column_codes(
    series: pd.Series, table: Mapping[str, FieldValues]
) -> tuple[np.ndarray, list[FieldValues]]:
    """Per-row codes into a list of mapped dicts (code 0 = nothing); each unique value is mapped once."""
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    mapped: list[FieldValues] = [{}]
    for value in uniques:
        key = _key(value)
        mapped.append(table.get(key, {}) if key is not None else {})
    return codes.astype(np.int64) + 1, mapped


def map_columns(frame: pd.DataFrame, mapping: ColumnMapping) -> list[dict[str, list[str]]]:
    """The ``clothes`` dict of every row of ``frame``, from its mapped columns and the constants."""
    present = [c for c in mapping.columns if c in frame.columns]
    all_codes: list[np.ndarray] = []
    all_mapped: list[list[FieldValues]] = []
    # Rows repeat few combinations of column values: number each distinct combination and
    # merge each combination once.
    combo = np.zeros(len(frame), dtype=np.int64)
    for column in present:
        codes, mapped = _column_codes(frame[column], mapping.columns[column])
        all_codes.append(codes)
        all_mapped.append(mapped)
        combo = pd.factorize(combo * len(mapped) + codes)[0].astype(np.int64)
    n_combos = int(combo.max()) + 1 if len(combo) else 0
    first_row = np.full(n_combos, -1, dtype=np.int64)
    first_row[combo[::-1]] = np.arange(len(combo) - 1, -1, -1)
    combo_codes = [codes[first_row].tolist() for codes in all_codes]
    merged: list[FieldValues] = []
    for i in range(n_combos):
        clothes: FieldValues = {}
        for codes_at, mapped in zip(combo_codes, all_mapped, strict=True):
            for field_name, values in mapped[codes_at[i]].items():
                if field_name not in clothes:
                    clothes[field_name] = values
        for field_name, values in mapping.constants.items():
            if field_name not in clothes:
                clothes[field_name] = values
        merged.append(clothes)
    return [{k: [*v] for k, v in merged[i].items()} for i in combo.tolist()]


def unmapped_values(frame: pd.DataFrame, mapping: ColumnMapping) -> dict[str, dict[str, int]]:
    """Per mapped column present in ``frame``: raw values the mapping does not list, with row counts."""
    out: dict[str, dict[str, int]] = {}
    for column, table in mapping.columns.items():
        if column not in frame.columns:
            continue
        gaps: dict[str, int] = {}
        for value, count in frame[column].value_counts(dropna=True).items():
            key = _key(value)
            if key is not None and key not in table:
                gaps[key] = gaps.get(key, 0) + int(count)
        out[column] = dict(sorted(gaps.items(), key=lambda kv: (-kv[1], kv[0])))
    return out


def coverage(clothes: Sequence[Mapping[str, Sequence[str]]], schema: Schema) -> dict[str, float]:
    """Per STD field of ``schema``: the share of rows with at least one value (0.0 when none)."""
    counts = dict.fromkeys(schema.std, 0)
    for row in clothes:
        for field_name, values in row.items():
            if field_name in counts and len(values) > 0:
                counts[field_name] += 1
    total = len(clothes)
    return {name: (count / total if total else 0.0) for name, count in counts.items()}
