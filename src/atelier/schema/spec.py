"""The attribute schema as data: STD fields with finite vocabularies and synonyms, RE fields with parents.

The schema lives in ``std_re.toml`` beside this module (DESIGN.md section 2); code never lists
attribute values. ``load_schema`` validates the file and fails with a message naming the field.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

DEFAULT_SCHEMA_PATH = Path(__file__).with_name("std_re.toml")
UNKNOWN = "unknown"  # an STD value that was given but is not in the vocabulary
_FIELD_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)?$")
_SPACES = re.compile(r"\s+")


class SchemaError(ValueError):
    """The schema file is malformed; the message names the file and the offending field."""


def normalise_text(raw: str) -> str:
    """Lower-case, trim and collapse white space: the form values and synonyms are compared in."""
    return _SPACES.sub(" ", raw.strip().lower())


@dataclass(frozen=True)
class StdField:
    """A standard field: a finite set of allowed values plus synonyms that map onto them."""

    name: str
    values: tuple[str, ...]
    synonyms: dict[str, str] = field(default_factory=dict)
    description: str = ""
    _allowed: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_allowed", frozenset(self.values))

    def normalise(self, raw: str) -> str | None:
        """The allowed value ``raw`` means, via synonyms; None when it means none of them."""
        text = normalise_text(raw)
        if text in self._allowed:
            return text
        return self.synonyms.get(text)


@dataclass(frozen=True)
class ReField:
    """A reinforced (free-text) field; its tokens are learned as a delta on the ``parent`` STD field."""

    name: str
    parent: str
    description: str = ""


@dataclass(frozen=True)
class Schema:
    """The whole attribute schema: STD fields, RE fields and a version recorded by vocabularies."""

    version: str
    std: dict[str, StdField]
    re: dict[str, ReField]
    source: str = ""

    @property
    def field_names(self) -> list[str]:
        """Every field name, STD first then RE-only ones, in file order (stable ids)."""
        names = list(self.std)
        names += [name for name in self.re if name not in self.std]
        return names


def _fail(path: Path, where: str, what: str) -> SchemaError:
    return SchemaError(f"{path}: {where}: {what}")


def _parse_std(path: Path, name: str, body: object) -> StdField:
    where = f"[std.{name}]"
    if not _FIELD_NAME.match(name):
        raise _fail(path, where, "field names are lower-case words joined by '_' (one optional '.')")
    if not isinstance(body, dict):
        raise _fail(path, where, "must be a table")
    unknown_keys = set(body) - {"values", "synonyms", "description"}
    if unknown_keys:
        raise _fail(path, where, f"unknown keys {sorted(unknown_keys)}")
    values = body.get("values")
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise _fail(path, where, "'values' must be a non-empty list of strings")
    normalised = [normalise_text(v) for v in values]
    if normalised != values:
        bad = [v for v, n in zip(values, normalised, strict=True) if v != n]
        raise _fail(path, where, f"values must be lower-case and trimmed: {bad}")
    if len(set(values)) != len(values):
        raise _fail(path, where, "duplicate values")
    if UNKNOWN in values:
        raise _fail(path, where, f"'{UNKNOWN}' is reserved for out-of-vocabulary values")
    synonyms_raw = body.get("synonyms", {})
    if not isinstance(synonyms_raw, dict):
        raise _fail(path, where, "'synonyms' must be a table of alias = value")
    synonyms: dict[str, str] = {}
    for alias, target in synonyms_raw.items():
        if not isinstance(target, str) or target not in values:
            raise _fail(path, f"[std.{name}.synonyms]", f"'{alias}' maps to {target!r}, not an allowed value")
        key = normalise_text(alias)
        if key in values and key != target:
            raise _fail(path, f"[std.{name}.synonyms]", f"'{alias}' is itself an allowed value")
        synonyms[key] = target
    return StdField(name, tuple(values), synonyms, str(body.get("description", "")))


def _parse_re(path: Path, name: str, body: object, std: dict[str, StdField]) -> ReField:
    where = f"[re.{name}]"
    if not _FIELD_NAME.match(name):
        raise _fail(path, where, "field names are lower-case words joined by '_' (one optional '.')")
    if not isinstance(body, dict):
        raise _fail(path, where, "must be a table")
    unknown_keys = set(body) - {"parent", "description"}
    if unknown_keys:
        raise _fail(path, where, f"unknown keys {sorted(unknown_keys)}")
    parent = body.get("parent")
    if parent not in std:
        raise _fail(path, where, f"'parent' must name an STD field, got {parent!r}")
    return ReField(name, str(parent), str(body.get("description", "")))


def read_toml(path: Path, error: type[Exception], what: str) -> dict[str, Any]:
    """A TOML file as a dict; ``error`` names the file when it is missing or not valid TOML."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid TOML: {exc}") from None


def parse_schema(path: Path) -> Schema:
    """Read and validate a schema file (no caching)."""
    raw = read_toml(path, SchemaError, "schema file")
    unknown_top = set(raw) - {"version", "std", "re"}
    if unknown_top:
        raise _fail(path, "top level", f"unknown keys {sorted(unknown_top)}")
    version = raw.get("version")
    if not isinstance(version, str) or not version:
        raise _fail(path, "top level", "'version' must be a non-empty string")
    std_raw = raw.get("std")
    if not isinstance(std_raw, dict) or not std_raw:
        raise _fail(path, "[std]", "at least one STD field is required")
    std = {name: _parse_std(path, name, body) for name, body in std_raw.items()}
    re_raw = raw.get("re", {})
    if not isinstance(re_raw, dict):
        raise _fail(path, "[re]", "must be a table of RE fields")
    re_fields = {name: _parse_re(path, name, body, std) for name, body in re_raw.items()}
    return Schema(version=version, std=std, re=re_fields, source=str(path))


@lru_cache(maxsize=8)
def load_schema(path: Path | None = None) -> Schema:
    """The schema at ``path`` (default: the packaged ``std_re.toml``), validated and cached."""
    return parse_schema(path or DEFAULT_SCHEMA_PATH)
