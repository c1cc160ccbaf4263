"""The gold set (labels written by language-model sessions following GUIDE.md; issue #5 part 7): split rule,
applicable fields, file check, loading.

Format and annotation rules: ``benchmarks/gold/GUIDE.md``. ``python -m benchmarks.gold_set check
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
HM_ARTICLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "hm" / "articles.csv.gz"
HM_SEED = 20261127  # the H&M sample: shuffle articles with this seed, first article per product_code
HM_N = 220
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


def hm_sample(n: int = HM_N, seed: int = HM_SEED) -> list[str]:
    """The H&M gold sample: article ids, one per product_code, with a description, outside the bench samples.

    Excluded: the products of ``bench_extraction.py``'s seed-0 sample of 100 (the items the per-field
    defaults were tuned on), so the gold test split is held out from that tuning.
    """
    import pandas as pd

    from atelier.config import Settings
    from atelier.ingest import load_tables

    items = load_tables(Settings().paths.dataset("hm"))[0]
    tuned = set(items.sample(n=100, random_state=0)["product_code"])
    art = pd.read_csv(HM_ARTICLES, dtype=str, usecols=["article_id", "product_code", "detail_desc"])
    art = art[art["detail_desc"].fillna("").str.strip().ne("") & ~art["product_code"].isin(tuned)]
    art = art.sample(frac=1.0, random_state=seed).drop_duplicates("product_code")
    return art["article_id"].head(n).tolist()


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


KEYS = {"c": "category", "co": "color", "g": "gender", "p": "print", "fb": "fiber_composition", "se": "season",
        "oc": "occasion", "st": "style", "el": "elasticity", "tr": "transparency", "fl": "isfleece", "fit": "fit",
        "de": "detail", "tl": "top.length_type", "sl": "top.sleeve_length_type", "nk": "top.neck_color_design",
        "sd": "top.sleeve_design", "bl": "bottom.length_type", "dl": "dress.length_type"}
RE_KEYS = {"cs": "category_specification", "fb": "fiber_composition", "co": "color", "p": "print", "de": "detail",
           "st": "style", "vibe": "vibe", "fit": "fit", "oc": "occasion", "md": "specification.metadata"}
SHORT = {"gender": {"f": "female", "m": "male", "b": "both", "k": "kids"},
         "season": {"all": "all season"}, "isfleece": {"n": "fleece_none", "c": "fleece_contain"},
         "transparency": {"none": "none at all", "opaque": "none at all"},
         "top.sleeve_length_type": {"long": "long sleeves", "short": "short sleeves", "3/4": "3/4 sleeves",
                                    "cap": "cap sleeves", "no": "sleeveless"},
         "top.sleeve_design": {"basic": "basic sleeve", "raglan": "raglan sleeve", "puff": "puff sleeve",
                               "dropped": "dropped shoulder", "balloon": "balloon sleeve", "flutter": "flutter sleeve"}}


def from_notes(dataset: str, text: str, schema: Schema) -> list[dict[str, Any]]:
    """Gold records from an annotator's compact notes, one product a line (formats decisions, adds none).

    ``ITEM_ID; c=vest top; co=black; g=f; fb=jersey,cotton; ...; fc=co,g | cs=strap top; de=narrow straps``:
    STD keys are ``KEYS`` (values: allowed values, their schema synonyms or ``SHORT`` forms, ``?`` for
    null), ``fc`` lists the fields taken from columns; after ``|`` come RE phrases (``RE_KEYS``), comma
    separated. An applicable STD field the notes leave out is written as null; RE fields left out as [].
    """
    from atelier.enrich.prompt import label_maps

    labels = label_maps(schema)
    out, errors = [], []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            out.append(_record(dataset, line, schema, labels))
        except (ValueError, KeyError) as e:
            errors.append(str(e))
    if errors:
        raise ValueError("\n".join(errors))
    return out


def _record(dataset: str, line: str, schema: Schema, labels: dict[str, dict[str, str]]) -> dict[str, Any]:
    """One gold record from one line of notes."""
    std_part, _, re_part = line.partition("|")
    item_id, *pairs = [p.strip() for p in std_part.split(";") if p.strip()]
    std: dict[str, Any] = {}
    cols: list[str] = []
    for pair in pairs:
        key, _, raw = (x.strip() for x in pair.partition("="))
        if key == "fc":
            cols = [KEYS[k.strip()] for k in raw.split(",")]
            continue
        name = KEYS[key]
        if raw == "?":
            std[name] = None
            continue
        values = []
        for v in (x.strip() for x in raw.split(",")):
            v = SHORT.get(name, {}).get(v, v)
            value = labels[name].get(v) or schema.std[name].normalise(v)
            if value is None:
                raise ValueError(f"{item_id}: {name}={v!r} is not a value")
            values.append(value)
        std[name] = values
    group = group_of(std["category"][0])
    full: dict[str, Any] = {"category": std["category"], "category_specification": [group]}
    for name in applicable(group, schema):
        full.setdefault(name, std.get(name))
    extra = set(std) - set(full)
    if extra:
        raise ValueError(f"{item_id}: {sorted(extra)} do not apply to {group}")
    re_: dict[str, list[str]] = {name: [] for name in schema.re}
    for pair in (p.strip() for p in re_part.split(";") if p.strip()):
        key, _, raw = (x.strip() for x in pair.partition("="))
        re_[RE_KEYS[key]] = [x.strip().lower() for x in raw.split(",") if x.strip()]
    rec = {"dataset": dataset, "item_id": item_id, "split": split_of(dataset, item_id), "std": full, "re": re_}
    if cols:
        rec["from_columns"] = cols
    problems = check_line(rec, schema)
    if problems:
        raise ValueError(f"{item_id}: {'; '.join(problems)}")
    return rec


def show(ids: list[str]) -> None:
    """Print the H&M text and check columns of some articles (to the terminal only, never to a file)."""
    import pandas as pd

    art = pd.read_csv(HM_ARTICLES, dtype=str).set_index("article_id")
    for i in ids:
        r = art.loc[i]
        print(f"{i} [{split_of('hm', i)}] {r.prod_name} :: {r.detail_desc}\n    cols: {r.product_type_name} | "
              f"{r.colour_group_name} | {r.graphical_appearance_name} | {r.index_group_name} / {r.section_name} | "
              f"{r.garment_group_name}")


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
    if sys.argv[1:] == ["sample"]:
        print("\n".join(hm_sample()))
        sys.exit(0)
    if sys.argv[1:2] == ["show"]:  # show START COUNT: a batch of the H&M sample
        start, count = int(sys.argv[2]), int(sys.argv[3])
        show((GOLD_DIR / "hm_sample.txt").read_text().split()[start:start + count])
        sys.exit(0)
    if sys.argv[1:2] == ["add"]:  # add DATASET NOTES: append the formatted records to gold/DATASET.jsonl
        recs = from_notes(sys.argv[2], Path(sys.argv[3]).read_text(), load_schema())
        target = GOLD_DIR / f"{sys.argv[2]}.jsonl"
        done = {json.loads(x)["item_id"] for x in target.read_text().splitlines()} if target.exists() else set()
        new = [r for r in recs if r["item_id"] not in done]
        with target.open("a") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in new)
        print(f"{target}: +{len(new)} ({len(recs) - len(new)} already there)")
        sys.exit(0)
    if len(sys.argv) < 3 or sys.argv[1] != "check":
        sys.exit("usage: gold_set.py sample | show START N | add DATASET NOTES | check FILE.jsonl ...")
    sys.exit(1 if sum(check(Path(p)) for p in sys.argv[2:]) else 0)
