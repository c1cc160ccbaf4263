"""Attribute-extraction accuracy: embedded-LLM variants vs non-LLM baselines, on held-out halves.

Standalone: ``python benchmarks/bench_extraction.py --n 100 --seed 0 [--backends embedded]
[--write-sources]`` (needs ``atelier ingest -d hm -d myntra``; the LLM columns need ``make llm``).

For a fixed random sample (``--seed``) of each catalogue, the labelled columns are hidden: the
extractors see the title and description only (H&M ``prod_name`` + ``detail_desc``; Myntra the
``productDisplayName`` title alone) and are asked, in full-extraction mode, for the evaluated STD
fields only (no RE fields). The gold value of a field is what the project's column mapping
(``schema/mappings/<dataset>.toml``) derives from the hidden columns:

- H&M: category (product_type_name), color (colour_group_name), print (graphical_appearance_name),
  gender (section / index group);
- Myntra: category (articleType), color (baseColour), gender, season, occasion (usage).

Methods, per field (no answer or ``unknown`` counts as wrong):

- ``embedded`` (and any other ``--backends``): grammar-constrained generation through the
  enrichment path (cached in ``runs/enrich/bench-cache.jsonl``; JSON validity and items/s reported);
- ``loglik`` / ``loglik_cal``: the ``embedded-ll`` scorer (mean log-probability per label token;
  calibrated = minus the content-free score), ``loglik_sum*`` the unnormalised sums, all four
  read from one scoring pass per product;
- ``minilm``: nearest label or synonym in MiniLM space; ``keyword``: the schema's keyword rules;
  ``keyword_or_majority`` / ``keyword_or_minilm``: keyword rules, else the majority class / MiniLM;
  ``majority``: the most frequent gold value outside the sample.

The sample is split once (``--split-seed``) into a tuning half and a test half. ``--write-sources``
writes the per-field choice made on the tuning half (pooled over catalogues; an LLM method only
where it strictly beats every baseline) to ``atelier/enrich/field_sources.toml``; report the test
half. Results go to ``benchmarks/results/extraction-<date>-<tag>.json``; Markdown tables of both
halves are printed.
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

import numpy as np
import pandas as pd

from atelier.catalogue import column_items
from atelier.config import Settings
from atelier.enrich import EnrichCache, EnrichOptions, RawProduct, enrich_products, get_extractor
from atelier.enrich.fieldwise import NearestLabelExtractor, product_text
from atelier.enrich.hybrid import SOURCES_FILE, choose_sources, sources_toml
from atelier.enrich.loglik import LogLikExtractor
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


def split_halves(n: int, seed: int) -> dict[str, list[int]]:
    """Indices of the sample split once into a tuning half and a test half (fixed seed)."""
    perm = np.random.default_rng(seed).permutation(n)
    return {"tune": sorted(int(i) for i in perm[: n // 2]), "test": sorted(int(i) for i in perm[n // 2:])}


def scored(preds: list[str | None], gold: list[dict[str, str]], field: str,
           halves: dict[str, list[int]]) -> dict[str, Any]:
    """Accuracy and counts (correct, n) on all items and on each half."""
    out: dict[str, Any] = {}
    for part, idx in {"all": list(range(len(gold))), **halves}.items():
        pairs = [(preds[i], gold[i][field]) for i in idx if field in gold[i]]
        correct = sum(p == g for p, g in pairs)
        out[part] = {"acc": correct / len(pairs) if pairs else float("nan"), "correct": correct, "n": len(pairs)}
    return out


def run_backend(products: list[RawProduct], fields: list[str], backend: str, settings: Settings,
                cache_file: Path, dataset: str) -> tuple[dict[str, list[str | None]], dict[str, Any]]:
    """Predictions per field and run statistics of one backend through the enrichment path (cached)."""
    schema = load_schema()
    extractor = get_extractor(backend, settings)
    options = EnrichOptions(full=True, fields=tuple(fields), re_fields=(), show_known=False)
    start = time.perf_counter()
    done = 0

    def tick(_: object) -> None:
        nonlocal done
        done += 1
        if done % 10 == 0 or done == len(products):
            print(f"  {dataset} {backend}: {done}/{len(products)} ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr)

    with EnrichCache(cache_file) as cache:
        results = enrich_products(products, extractor, cache, schema, options, on_result=tick)
    extractor.close()
    wall = time.perf_counter() - start
    fresh = [r for r in results if not r.cached]
    model_seconds = sum(r.seconds for r in fresh)
    preds = {f: [(r.extracted.get("clothes", {}).get(f) or [None])[0] for r in results] for f in fields}
    stats = {
        "backend": extractor.model_id,
        "json_valid_first_answer": sum(r.status != "error" and r.attempts == 1 for r in results) / len(results),
        "json_valid_after_repair": sum(r.status != "error" for r in results) / len(results),
        "statuses": dict(Counter(r.status for r in results)),
        "error_records": [r.error_record() for r in results if r.status == "error"],
        "cached": len(results) - len(fresh),
        "model_seconds": round(model_seconds, 2), "wall_seconds": round(wall, 2),
        "items_per_s": round(len(fresh) / model_seconds, 3) if model_seconds else None,
        # Per-item seconds are kept in the cache, so cached results still say how fast they were made.
        "items_per_s_incl_cached": round(len(results) / max(sum(r.seconds for r in results), 1e-9), 3),
        "seconds_per_item_median": round(sorted(r.seconds for r in results)[len(results) // 2], 3),
    }
    return preds, stats


def run_loglik(products: list[RawProduct], fields: list[str],
               settings: Settings, dataset: str) -> tuple[dict[str, dict[str, list[str | None]]], dict[str, Any]]:
    """Log-likelihood scores of every allowed value, once per product; four read-outs of the same pass.

    ``loglik`` = mean log-probability per token (the ``embedded-ll`` backend), ``loglik_cal`` = the
    same minus the content-free score (``embedded-ll-cal``), ``loglik_sum`` / ``loglik_sum_cal`` =
    unnormalised sums (reported, not offered as backends).
    """
    ex = LogLikExtractor.from_settings(settings)
    prior = ex.score("Product: N/A", fields)
    counts = {f: ex.token_counts(f) for f in fields}
    values = {f: ex.values(f) for f in fields}
    out: dict[str, dict[str, list[str | None]]] = {k: {f: [] for f in fields}
                                                    for k in ("loglik", "loglik_cal", "loglik_sum", "loglik_sum_cal")}
    seconds: list[float] = []
    for i, p in enumerate(products, 1):
        start = time.perf_counter()
        mean = ex.score(f"Product: {product_text(p.title, p.description)}", fields)
        seconds.append(time.perf_counter() - start)
        for f in fields:
            variants = {"loglik": mean[f], "loglik_cal": mean[f] - prior[f], "loglik_sum": mean[f] * counts[f],
                        "loglik_sum_cal": (mean[f] - prior[f]) * counts[f]}
            for k, s in variants.items():
                out[k][f].append(values[f][int(np.argmax(s))])
        if i % 10 == 0 or i == len(products):
            print(f"  {dataset} loglik: {i}/{len(products)} ({sum(seconds):.0f} s)", file=sys.stderr)
    ex.close()
    stats = {"backend": ex.model_id, "threads": ex.n_threads, "model_seconds": round(sum(seconds), 2),
             "items_per_s": round(len(seconds) / sum(seconds), 3),
             "seconds_per_item_median": round(sorted(seconds)[len(seconds) // 2], 3),
             "load_average_after": os.getloadavg()}
    return out, stats


def run_dataset(settings: Settings, dataset: str, n: int, seed: int, split_seed: int, backends: list[str],
                loglik: bool, cache_file: Path) -> dict[str, Any]:
    """Extract, score and compare with the baselines on one catalogue."""
    schema = load_schema()
    products, gold, majority = sample(settings, dataset, n, seed)
    fields = FIELDS[dataset]
    halves = split_halves(len(products), split_seed)
    preds: dict[str, dict[str, list[str | None]]] = {}
    runs: dict[str, Any] = {}
    for backend in backends:
        preds[backend], runs[backend] = run_backend(products, fields, backend, settings, cache_file, dataset)
    if loglik:
        ll_preds, runs["loglik"] = run_loglik(products, fields, settings, dataset)
        preds.update(ll_preds)
    start = time.perf_counter()
    near = NearestLabelExtractor(schema).pick_many([product_text(p.title, p.description) for p in products], fields)
    runs["minilm"] = {"items_per_s": round(len(products) / (time.perf_counter() - start), 1),
                      "note": "batch encode incl. label vectors, warm encoder"}
    preds["minilm"] = {f: [d.get(f) for d in near] for f in fields}
    kw = {f: [keyword_values(f"{p.title} {p.description}", schema, [f]).get(f) for p in products] for f in fields}
    preds["keyword"] = kw
    preds["keyword_or_majority"] = {f: [k or majority[f] for k in kw[f]] for f in fields}
    preds["keyword_or_minilm"] = {f: [k or m for k, m in zip(kw[f], preds["minilm"][f], strict=True)]
                                  for f in fields}
    preds["majority"] = {f: [majority[f]] * len(products) for f in fields}
    table: dict[str, dict[str, Any]] = {}
    for f in fields:
        row: dict[str, Any] = {"source_column": SOURCE_COLUMN[dataset][f], "majority_value": majority[f],
                               "methods": {m: scored(p[f], gold, f, halves) for m, p in preds.items()}}
        row["top_answers"] = {m: Counter(v for v in p[f] if v).most_common(3) for m, p in preds.items()}
        row["tune_gold"] = [gold[i][f] for i in halves["tune"] if f in gold[i]]
        table[f] = row
    return {"dataset": dataset, "n": len(products), "seed": seed, "split_seed": split_seed,
            "halves": {k: [products[i].item_id for i in v] for k, v in halves.items()},
            "fields": table, "runs": runs}


METHOD_NAMES = {
    "embedded": "generation (grammar)", "loglik": "log-likelihood", "loglik_cal": "log-likelihood, calibrated",
    "minilm": "MiniLM nearest label", "keyword": "keyword rules", "keyword_or_majority": "keyword → majority",
    "keyword_or_minilm": "keyword → MiniLM",
    "majority": "majority class",
}


def markdown(report: dict[str, Any], part: str = "test") -> str:
    """The per-field table for the README (accuracy on one half; best per row in bold)."""
    methods = [m for m in METHOD_NAMES if any(m in row["methods"] for ds in report["datasets"]
                                               for row in ds["fields"].values())]
    lines = ["| dataset | field (gold column) | n | " + " | ".join(METHOD_NAMES[m] for m in methods) + " | default |",
             "|---" * (len(methods) + 4) + "|"]
    chosen = report.get("selection", {})
    for ds in report["datasets"]:
        for f, row in ds["fields"].items():
            cells = [row["methods"][m][part]["acc"] if m in row["methods"] else float("nan") for m in methods]
            best = max(c for c in cells if c == c)
            shown = [f"**{c:.2f}**" if c == best else f"{c:.2f}" for c in cells]
            n = next(iter(row["methods"].values()))[part]["n"]
            pick = METHOD_NAMES.get(chosen.get(f, {}).get("method", ""), "")
            lines.append(f"| {ds['dataset']} | {f} ({row['source_column']}) | {n} | " + " | ".join(shown)
                         + f" | {pick} |")
    return "\n".join(lines)


def select(datasets: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per field, the method chosen on the tuning halves (pooled over catalogues)."""
    tune: dict[str, dict[str, tuple[int, int]]] = {}
    gold_values: dict[str, Counter[str]] = {}
    for ds in datasets:
        for f, row in ds["fields"].items():
            for m, res in row["methods"].items():
                c, n = tune.setdefault(f, {}).get(m, (0, 0))
                tune[f][m] = (c + res["tune"]["correct"], n + res["tune"]["n"])
            gold_values.setdefault(f, Counter()).update(row["tune_gold"])
    fallbacks = {f: c.most_common(1)[0][0] for f, c in gold_values.items() if c}
    return choose_sources(tune, fallbacks)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run each dataset, write the JSON report, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100, help="products per dataset (fixed random sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-seed", type=int, default=1, help="seed of the tuning/test split of the sample")
    ap.add_argument("--backends", nargs="*", default=["embedded"],
                    help="generating backends run through the enrichment path (cached)")
    ap.add_argument("--no-loglik", action="store_true", help="skip the log-likelihood scorer")
    ap.add_argument("--datasets", nargs="+", default=["hm", "myntra"], choices=sorted(FIELDS))
    ap.add_argument("--write-sources", action="store_true",
                    help=f"write the per-field choice (tuning half) to {SOURCES_FILE.name}")
    ap.add_argument("--tag", default="heldout", help="suffix for the result file name")
    args = ap.parse_args(argv)
    settings = Settings()
    commit = git_commit()  # at the start: the code that ran, not what was committed meanwhile
    cache_file = settings.run_dir / "enrich" / "bench-cache.jsonl"
    datasets = [run_dataset(settings, ds, args.n, args.seed, args.split_seed, args.backends, not args.no_loglik,
                            cache_file) for ds in args.datasets]
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": commit, "machine": machine(), "load_average": os.getloadavg(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "prompt_version": PROMPT_VERSION,
        "datasets": datasets,
    }
    report["selection"] = select(datasets)
    name = f"extraction-{dt.date.today()}{'-' + args.tag if args.tag else ''}.json"
    out = ROOT / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if args.write_sources:
        SOURCES_FILE.write_text(sources_toml(report["selection"], f"Chosen on the tuning half of {name}."))
        print(f"written: {SOURCES_FILE}")
    print("test half:")
    print(markdown(report, "test"))
    print("tuning half:")
    print(markdown(report, "tune"))
    for ds in datasets:
        for run, st in ds["runs"].items():
            print(f"{ds['dataset']} {run}: {st.get('items_per_s')} items/s", {k: st[k] for k in
                  ("json_valid_first_answer", "json_valid_after_repair", "statuses") if k in st})
    print(f"written: {out}")


if __name__ == "__main__":
    main()
