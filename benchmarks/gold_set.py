"""The hand-annotated gold set (issue #5 part 7): split rule, applicable fields, file check, loading.

Format and annotation rules: ``benchmarks/gold/GUIDE.md``. ``python benchmarks/gold_set.py check
benchmarks/gold/hm.jsonl`` validates a file; ``bench_extraction.py gold`` scores extractors on it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from atelier.enrich.prompt import RawProduct, asked_fields
from atelier.schema import Schema, load_schema

GOLD_DIR = Path(__file__).resolve().parent / "gold"
SPLIT_SALT = "gold-v1"  # the split is fixed once; changing the salt would leak tuned-on items into test
MULTI_VALUED = {"fiber_composition", "detail", "style", "occasion"}
RE_MAX_WORDS = 4
RE_MAX_CHARS = 32
RE_MAX_PHRASES = 4
GROUP_OF = {"01outer": "outer", "02top": "top", "03bottom": "bottom", "04onepiece": "onepiece", "05set": "set",
            "06inner_01": "underwear", "06inner_02": "underwear", "06inner_07": "underwear",
            "06inner_03": "socks_tights", "06inner_04": "socks_tights", "06inner_05": "nightwear",
            "06inner_06": "nightwear", "07swim": "swimwear", "08shoes": "shoes", "09acc": "accessories",
            "10other": "other"}


def split_of(dataset: str, item_id: str) -> str:
    """``test`` or ``train``: a seeded hash of the item id, so the split never depends on file order."""
    digest = hashlib.sha256(f"{SPLIT_SALT}:{dataset}:{item_id}".encode()).hexdigest()
    return "test" if int(digest, 16) % 2 == 0 else "train"


def group_of(category: str) -> str:
    """The category_specification a category value belongs to."""
    return next(g for prefix, g in GROUP_OF.items() if category.startswith(prefix))


def applicable(group: str, schema: Schema) -> list[str]:
    """STD fields that apply to a garment group (the enrichment prompt's own rule)."""
    rest = asked_fields(RawProduct(item_id="gold", known={"category_specification": [group]}), schema)
    return ["category_specification", *rest]


def check_line(rec: dict[str, Any], schema: Schema) -> list[str]:
    """Problems with one gold record (empty when it follows the guide)."""
    problems: list[str] = []
    std, re_ = rec.get("std", {}), rec.get("re", {})
    if rec.get("dataset") not in {"hm", "myntra"}:
        problems.append(f"dataset {rec.get('dataset')!r}")
    if rec.get("split") != split_of(rec.get("dataset", ""), str(rec.get("item_id", ""))):
        problems.append("split does not follow split_of()")
    cat = (std.get("category") or [None])[0]
    if cat not in schema.std["category"].values:
        return [*problems, f"category {cat!r}"]
    group = group_of(cat)
    if std.get("category_specification") != [group]:
        problems.append(f"category_specification should be [{group!r}]")
    fields = applicable(group, schema)
    for name in set(fields) - set(std):
        problems.append(f"std.{name} missing (write null if undecidable)")
    for name, values in std.items():
        if name not in fields:
            problems.append(f"std.{name} does not apply to {group}")
            continue
        if values is None:
            continue
        if not values or len(values) > (4 if name in MULTI_VALUED else 1):
            problems.append(f"std.{name}: {len(values)} values")
        for v in values:
            if v not in schema.std[name].values:
                problems.append(f"std.{name}: {v!r} not allowed")
    if set(re_) != set(schema.re):
        problems.append(f"re fields {sorted(set(re_) ^ set(schema.re))}")
    for name, phrases in re_.items():
        if len(phrases) > RE_MAX_PHRASES:
            problems.append(f"re.{name}: {len(phrases)} phrases")
        for p in phrases:
            if p != p.strip().lower() or len(p) > RE_MAX_CHARS or len(p.split()) > RE_MAX_WORDS or not p:
                problems.append(f"re.{name}: bad phrase {p!r}")
    for name in rec.get("from_columns", []):
        if name not in std:
            problems.append(f"from_columns names {name!r}, not in std")
    return problems


def load(path: Path) -> list[dict[str, Any]]:
    """Records of one gold file (raises on a line that does not follow the guide)."""
    schema = load_schema()
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for rec in records:
        problems = check_line(rec, schema)
        if problems:
            raise ValueError(f"{path.name} {rec.get('item_id')}: {'; '.join(problems)}")
    return records


def check(path: Path) -> int:
    """Print every problem in a gold file; the number of bad lines."""
    schema = load_schema()
    bad, seen = 0, set()
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines, 1):
        rec = json.loads(line)
        key = (rec.get("dataset"), rec.get("item_id"))
        problems = check_line(rec, schema) + (["duplicate item"] if key in seen else [])
        seen.add(key)
        if problems:
            bad += 1
            print(f"line {i} {rec.get('item_id')}: {'; '.join(problems)}")
    splits = [json.loads(line)["split"] for line in lines]
    print(f"{path}: {len(lines)} items ({splits.count('train')} train, {splits.count('test')} test), {bad} bad")
    return bad


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "check":
        sys.exit("usage: python benchmarks/gold_set.py check FILE.jsonl ...")
    sys.exit(1 if sum(check(Path(p)) for p in sys.argv[2:]) else 0)
