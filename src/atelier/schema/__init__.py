"""The attribute schema as data: STD fields with their allowed values and synonyms, RE fields with their STD
parent (``spec``, read from ``std_re.toml``), and the item JSON every stage exchanges (``item``)."""

from atelier.schema.item import ItemJSON, Service
from atelier.schema.spec import (
    DEFAULT_SCHEMA_PATH,
    UNKNOWN,
    ReField,
    Schema,
    SchemaError,
    StdField,
    load_schema,
    normalise_text,
    parse_schema,
    read_toml,
)

__all__ = [
    "DEFAULT_SCHEMA_PATH", "UNKNOWN", "ItemJSON", "ReField", "Schema", "SchemaError", "Service", "StdField",
    "load_schema", "normalise_text", "parse_schema", "read_toml",
]
