"""Attribute-extraction accuracy: the LLM extractor vs non-LLM baselines, against labelled columns.

Standalone: ``python benchmarks/bench_extraction.py --n 100 --seed 0 [--backend embedded]``
(needs ``atelier ingest -d hm -d myntra``; the embedded backend needs ``make llm``).

For a fixed random sample (``--seed``) of each catalogue, the labelled columns are hidden: the
extractor sees the title and description only (H&M ``prod_name`` + ``detail_desc``; Myntra the
``productDisplayName`` title alone) and is asked, in full-extraction mode, for the evaluated STD
fields only (no RE fields, to keep CPU time per item down). The gold value of a field is what the
project's column mapping (``schema/mappings/<dataset>.toml``) derives from the hidden columns:

- H&M: category (product_type_name), color (colour_group_name), print (graphical_appearance_name),
  gender (section / index group);
- Myntra: category (articleType), color (baseColour), gender, season, occasion (usage).

Per field: accuracy of the LLM (no answer or ``unknown`` counts as wrong), and in the same table
the baselines: majority class (the most frequent gold value outside the sample), keyword/synonym
rules from the schema (``atelier.enrich.rules``; no match counts as wrong), and keyword rules
falling back to the majority class. Also: JSON validity before repair (first answer usable) and
after (status not error), error records, and items/s.
Results go to ``benchmarks/results/extraction-<date>[-tag].json``; a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from atelier.catalogue import column_items
from atelier.config import Settings
from atelier.enrich import EnrichCache, EnrichOptions, RawProduct, enrich_products, get_extractor
from atelier.enrich.prompt import PROMPT_VERSION
from atelier.enrich.rules import keyword_values
from atelier.ingest import load_tables
from atelier.schema import load_schema

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {
    "hm": ["category", "color", "print", "gender"],
    "myntra": ["category", "color", "gender", "season", "occasion"],
}
SOURCE_COLUMN = {
    "hm": {"category": "product_type_name", "color": "colour_group_name", "print": "graphical_appearance_name",
           "gender": "section_name / index_group_name"},
    "myntra": {"category": "articleType", "color": "baseColour", "gender": "gender", "season": "season",
               "occasion": "usage"},
}


def git_commit() -> str | None:
    """The checked-out commit (None outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine() -> dict[str, Any]:
    """CPU model, core count and platform of this machine."""
    model = ""
    with contextlib.suppress(OSError, StopIteration):
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))

    return {"platform": platform.platform(), "cpu": model, "cores": os.cpu_count(), "python": sys.version.split()[0]}


def sample(settings: Settings, dataset: str, n: int, seed: int) -> tuple[list[RawProduct], list[dict[str, str]],
                                                                           dict[str, str]]:
    """(products with columns hidden, gold values per product, majority value per field outside the sample)."""
    schema = load_schema()
    items_df = load_tables(settings.dataset_dir(dataset))[0]
    picked = items_df.sample(n=n, random_state=seed)
    rest = items_df.drop(picked.index)
    fields = FIELDS[dataset]
    gold = [{f: v[0] for f, v in it.clothes.items() if f in fields and v}
            for it in column_items(picked, dataset, schema)]
    majority: dict[str, str] = {}
    rest_items = column_items(rest, dataset, schema)
    for f in fields:
        counts = Counter(it.clothes[f][0] for it in rest_items if it.clothes.get(f))
        majority[f] = counts.most_common(1)[0][0]
    products = [RawProduct(item_id=str(r.item_id), title=str(r.title or ""),
                           description="" if pd.isna(r.description) else str(r.description or ""))
                for r in picked[["item_id", "title", "description"]].itertuples(index=False)]
    return products, gold, majority


def accuracy(preds: list[str | None], gold: list[dict[str, str]], field: str) -> tuple[float, int]:
    """Share of products with a gold value for ``field`` whose prediction equals it."""
    pairs = [(p, g[field]) for p, g in zip(preds, gold, strict=True) if field in g]
    return (sum(p == g for p, g in pairs) / len(pairs) if pairs else float("nan")), len(pairs)


def run_dataset(settings: Settings, dataset: str, n: int, seed: int, backend: str,
                cache_file: Path) -> dict[str, Any]:
    """Extract, score and compare with the baselines on one catalogue."""
    schema = load_schema()
    products, gold, majority = sample(settings, dataset, n, seed)
    fields = FIELDS[dataset]
    extractor = get_extractor(backend, settings)
    options = EnrichOptions(full=True, fields=tuple(fields), re_fields=(), show_known=False)
    start = time.perf_counter()
    done = 0

    def tick(_: object) -> None:
        nonlocal done
        done += 1
        if done % 10 == 0 or done == len(products):
            print(f"  {dataset}: {done}/{len(products)} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    with EnrichCache(cache_file) as cache:
        results = enrich_products(products, extractor, cache, schema, options, on_result=tick)
    wall = time.perf_counter() - start
    fresh = [r for r in results if not r.cached]
    model_seconds = sum(r.seconds for r in fresh)
    table: dict[str, dict[str, Any]] = {}
    for f in fields:
        llm = [(r.extracted.get("clothes", {}).get(f) or [None])[0] for r in results]
        kw = [keyword_values(f"{p.title} {p.description}", schema, [f]).get(f) for p in products]
        row: dict[str, Any] = {"source_column": SOURCE_COLUMN[dataset][f]}
        row["llm"], row["n"] = accuracy(llm, gold, f)
        row["majority"] = accuracy([majority[f]] * len(products), gold, f)[0]
        row["majority_value"] = majority[f]
        row["keyword"] = accuracy(kw, gold, f)[0]
        row["keyword_or_majority"] = accuracy([k or majority[f] for k in kw], gold, f)[0]
        row["llm_answered"] = sum(v is not None for v in llm) / len(llm)
        row["llm_top_answers"] = Counter(v for v in llm if v).most_common(3)
        table[f] = row
    statuses = Counter(r.status for r in results)
    return {
        "dataset": dataset, "n": len(products), "seed": seed, "backend": extractor.model_id,
        "fields": table,
        "json_valid_first_answer": sum(r.status != "error" and r.attempts == 1 for r in results) / len(results),
        "json_valid_after_repair": sum(r.status != "error" for r in results) / len(results),
        "statuses": dict(statuses),
        "error_records": [r.error_record() for r in results if r.status == "error"],
        "cached": len(results) - len(fresh),
        "model_seconds": round(model_seconds, 2), "wall_seconds": round(wall, 2),
        "items_per_s": round(len(fresh) / model_seconds, 3) if model_seconds else None,
        # Per-item seconds are kept in the cache, so cached results still say how fast they were made.
        "items_per_s_incl_cached": round(len(results) / sum(r.seconds for r in results), 3),
        "seconds_per_item_median": round(sorted(r.seconds for r in results)[len(results) // 2], 3),
    }


def markdown(report: dict[str, Any]) -> str:
    """The per-field table for the README."""
    lines = ["| dataset | field (gold column) | n | LLM | majority class | keyword rules | keyword → majority |",
             "|---|---|---|---|---|---|---|"]
    for ds in report["datasets"]:
        for f, row in ds["fields"].items():
            cells = [row["llm"], row["majority"], row["keyword"], row["keyword_or_majority"]]
            best = max(cells)
            shown = [f"**{c:.2f}**" if c == best else f"{c:.2f}" for c in cells]
            lines.append(f"| {ds['dataset']} | {f} ({row['source_column']}) | {row['n']} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run each dataset, write the JSON report, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100, help="products per dataset (fixed random sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="embedded")
    ap.add_argument("--datasets", nargs="+", default=["hm", "myntra"], choices=sorted(FIELDS))
    ap.add_argument("--tag", default="", help="suffix for the result file name")
    args = ap.parse_args(argv)
    settings = Settings()
    cache_file = settings.run_dir / "enrich" / "bench-cache.jsonl"
    datasets = [run_dataset(settings, ds, args.n, args.seed, args.backend, cache_file) for ds in args.datasets]
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": git_commit(), "machine": machine(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "prompt_version": PROMPT_VERSION,
        "datasets": datasets,
    }
    out = ROOT / "benchmarks" / "results" / f"extraction-{dt.date.today()}{'-' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    for ds in datasets:
        print(f"{ds['dataset']}: {ds['items_per_s']} items/s, JSON valid first answer "
              f"{ds['json_valid_first_answer']:.2f}, after repair {ds['json_valid_after_repair']:.2f}, "
              f"statuses {ds['statuses']}")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
