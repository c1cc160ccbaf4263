"""Attribute-extraction accuracy: embedded-LLM variants vs non-LLM baselines, on held-out halves.

Standalone: ``python -m benchmarks.bench_extraction --n 100 --seed 0 [--backends embedded]
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
  ``majority``: the most frequent gold value outside the sample;
- ``--supervised``: ``tfidf_lr`` (TF-IDF of word 1-2-grams + logistic regression) and ``minilm_lr``
  (MiniLM vector + logistic regression), one classifier per field, trained on exactly the LoRA
  adapter's labelled items (``training_pool``: 4,000 per catalogue, none sharing an evaluation
  item's id, ``group_id`` or normalised text); ``--lora`` the adapter on CPU (``embedded-ll-lora``),
  ``--lora-picks`` its GPU-scored picks from ``bench_lora_gpu.py run`` (``loglik_lora_gpu``).

The sample is split once (``--split-seed``) into a tuning half and a test half. ``--write-sources``
writes the per-field choice made on the tuning half (pooled over catalogues; an LLM method only
where it strictly beats every zero-shot and every supervised baseline) to
``atelier/enrich/field_sources.toml``; report the test half. Results go to
``benchmarks/results/extraction-<date>-<tag>.json``; Markdown tables of both halves are printed.

``python -m benchmarks.bench_extraction gold [--llm-n 40]`` scores the same methods against the gold set
(``benchmarks/gold/*.jsonl``: labels written by language-model sessions following the guide
``benchmarks/gold/GUIDE.md``, see its README; helpers ``benchmarks/gold_set.py``) on its test split, for
every STD field the annotators filled: the baselines on all test products (majority = the train split's
most frequent value), the LLM variants on the first ``--llm-n`` test products by item id (CPU time), and
what ``hybrid`` answers under ``field_sources.toml``. The generating backend is also asked every RE
field, and its phrases are scored against the gold phrases (token-overlap match, see ``phrase_match``;
echo share of prompt wording). Results: ``benchmarks/results/extraction-gold-<date>.json``.
``python -m benchmarks.bench_extraction agreement`` compares a second annotation pass
(``benchmarks/gold/second_pass.jsonl``) with the gold set. Tables: ``benchmarks/tables_extraction.py``.
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
from atelier.enrich.prompt import PROMPT_VERSION, UNKNOWN_LABEL
from atelier.enrich.rules import keyword_values
from atelier.ingest import load_tables
from atelier.schema import load_schema, normalise_text

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


# --- the labelled training pool (LoRA and the supervised baselines share it) -------------------------------------

POOL_N, POOL_SEED = 4000, 7  # per catalogue; the LoRA adapter's training items (bench_lora_gpu.py export)


def seen_text(dataset: str, title: Any, description: Any) -> tuple[str, str]:
    """(title, description) as the extractors see them: H&M name + description, Myntra the title alone."""
    desc = "" if dataset == "myntra" or description is None or pd.isna(description) else str(description)
    return ("" if title is None or pd.isna(title) else str(title)), desc


def text_key(title: str, description: str) -> str:
    """Normalised product text for duplicate detection: lower-case words and digits, single spaces."""
    import re

    return " ".join(re.findall(r"[a-z0-9]+", product_text(title, description).lower()))


def held_out(settings: Settings, dataset: str, n: int = 100, seed: int = 0) -> pd.DataFrame:
    """Every evaluation item of a catalogue: the benchmark sample (tuning and test halves) and the whole gold set."""
    items = load_tables(settings.dataset_dir(dataset))[0]
    sampled = set(items.sample(n=n, random_state=seed)["item_id"].astype(str))
    gold_path = ROOT / "benchmarks" / "gold" / f"{dataset}.jsonl"
    lines = gold_path.read_text().splitlines() if gold_path.is_file() else []
    gold = {json.loads(line)["item_id"] for line in lines}
    return items[items["item_id"].astype(str).isin(sampled | gold)]


def training_pool(settings: Settings, dataset: str, n_train: int = POOL_N, seed: int = POOL_SEED,
                  rule: str = "group+text") -> tuple[pd.DataFrame, dict[str, Any]]:
    """The labelled items the LoRA and the supervised baselines learn from, and what was kept out.

    ``rule="group+text"`` (issue #17): no item of an evaluation item's ``group_id`` (H&M product_code:
    the colourways share the description) and no item whose normalised text equals an evaluation
    item's. ``rule="id"``: the first adapter's pool (evaluation ids only), kept to count its leaks.
    """
    items = load_tables(settings.dataset_dir(dataset))[0]
    held = held_out(settings, dataset)
    ids = items["item_id"].astype(str)
    keys = pd.Series([text_key(*seen_text(dataset, t, d)) for t, d in zip(items["title"], items["description"],
                                                                          strict=True)], index=items.index)
    held_keys = set(keys[held.index])
    out_id = ids.isin(set(held["item_id"].astype(str)))
    out_group = items["group_id"].astype(str).isin(set(held["group_id"].astype(str))) & ~out_id
    out_text = keys.isin(held_keys) & ~out_id & ~out_group
    if rule == "id":
        keep = ~out_id
    elif rule == "group+text":
        keep = ~(out_id | out_group | out_text)
    else:
        raise ValueError(f"unknown pool rule {rule!r}")
    pool = items[keep].sample(n=n_train, random_state=seed)
    report = {"rule": rule, "catalogue": len(items), "evaluation_items": len(held),
              "excluded": {"evaluation_id": int(out_id.sum()), "same_group_id": int(out_group.sum()),
                           "same_normalised_text": int(out_text.sum())},
              "candidates": int(keep.sum()), "n_train": n_train, "seed": seed}
    return pool, report


def pool_leaks(settings: Settings, dataset: str, pool: pd.DataFrame) -> dict[str, Any]:
    """Per evaluation set, how many items share a normalised text or a group_id with a pool item."""
    items = load_tables(settings.dataset_dir(dataset))[0].set_index("item_id")
    pool_keys = {text_key(*seen_text(dataset, t, d)) for t, d in zip(pool["title"], pool["description"], strict=True)}
    pool_groups = set(pool["group_id"].astype(str))
    products, _, _ = sample(settings, dataset, 100, 0)
    halves = split_halves(len(products), 1)
    sets = {part: [products[i].item_id for i in halves[part]] for part in ("tune", "test")}
    gold_path = ROOT / "benchmarks" / "gold" / f"{dataset}.jsonl"
    if gold_path.is_file():
        recs = [json.loads(line) for line in gold_path.read_text().splitlines()]
        sets["gold_test"] = [r["item_id"] for r in recs if r["split"] == "test"]
    out = {}
    for name, ids in sets.items():
        rows = items.loc[ids]
        keys = [text_key(*seen_text(dataset, t, d)) for t, d in zip(rows["title"], rows["description"], strict=True)]
        out[name] = {"n": len(ids), "same_text_in_pool": sum(k in pool_keys for k in keys),
                     "same_group_in_pool": int(rows["group_id"].astype(str).isin(pool_groups).sum())}
    return out


def pool_rows(settings: Settings, datasets: list[str] | None = None) -> list[dict[str, Any]]:
    """The pool as labelled rows: dataset, item id, text, {field: column label} (the LoRA's training rows)."""
    schema = load_schema()
    rows = []
    for ds in datasets or list(FIELDS):
        pool, _ = training_pool(settings, ds)
        for item, r in zip(column_items(pool, ds, schema), pool.itertuples(index=False), strict=True):
            labels = {f: item.clothes[f][0] for f in FIELDS[ds]
                      if item.clothes.get(f) and item.clothes[f][0] in schema.std[f].values}
            rows.append({"dataset": ds, "item_id": str(r.item_id),
                         "text": product_text(*seen_text(ds, r.title, r.description)), "labels": labels})
    return rows


SUPERVISED = ("tfidf_lr", "minilm_lr")


def fit_supervised(rows: list[dict[str, Any]], fields: list[str], settings: Settings) -> dict[str, Any]:
    """Per method and field, a classifier trained on the pool rows that carry that field's label.

    ``tfidf_lr``: TF-IDF of word 1-2-grams (sublinear tf) + multinomial logistic regression;
    ``minilm_lr``: the MiniLM sentence vector + logistic regression. C (1 or 10) is picked per field by
    3-fold cross-validation on the pool alone (never on an evaluation item).
    """
    import hashlib
    import pickle
    import warnings

    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    from atelier.text import encode_texts

    # The main and the gold run fit the same models: keep them (keyed by the rows and fields) for the second.
    key = hashlib.sha256(json.dumps([rows, fields], sort_keys=True).encode()).hexdigest()[:16]
    cached = settings.run_dir / "features" / f"supervised-{key}.pkl"
    if cached.is_file():
        with cached.open("rb") as fh:
            return dict(pickle.load(fh))
    texts = [r["text"] for r in rows]
    tfidf = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit(texts)
    feats = {"tfidf_lr": tfidf.transform(texts),
             "minilm_lr": encode_texts(texts, settings.run_dir / "features")}
    models: dict[str, Any] = {"tfidf": tfidf, "fits": {}}
    for method, x in feats.items():
        for f in fields:
            idx = [i for i, r in enumerate(rows) if f in r["labels"]]
            if not idx:
                continue
            y = [rows[i]["labels"][f] for i in idx]
            counts = Counter(y)
            folds = StratifiedKFold(3, shuffle=True, random_state=0)  # classes under 3 items: sklearn warns, copes
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                grid = GridSearchCV(LogisticRegression(max_iter=1000, tol=1e-3), {"C": [1.0, 10.0]}, cv=folds,
                                    n_jobs=1).fit(x[idx], y)
            model, c = grid.best_estimator_, grid.best_params_["C"]
            models["fits"][(method, f)] = {"model": model, "C": c, "n": len(idx), "classes": len(counts)}
    cached.parent.mkdir(parents=True, exist_ok=True)
    with cached.open("wb") as fh:
        pickle.dump(models, fh)
    return models


def predict_supervised(models: dict[str, Any], texts: list[str], fields: list[str],
                       settings: Settings) -> dict[str, dict[str, list[str | None]]]:
    """Each supervised method's pick per field for ``texts`` (None for a field it was not trained on)."""
    from atelier.text import encode_texts

    x = {"tfidf_lr": models["tfidf"].transform(texts), "minilm_lr": encode_texts(texts, settings.run_dir / "features")}
    out: dict[str, dict[str, list[str | None]]] = {}
    for method in SUPERVISED:
        out[method] = {}
        for f in fields:
            fit = models["fits"].get((method, f))
            out[method][f] = [str(v) for v in fit["model"].predict(x[method])] if fit else [None] * len(texts)
    return out


def write_supervised(out: Path, models: dict[str, Any], rows: list[dict[str, Any]],
                     settings: Settings) -> dict[str, Any]:
    """Save the tfidf_lr models as the ``tfidf-lr`` backend's files; check the backend answers as they do."""
    from atelier.enrich.supervised import TfidfLogRegExtractor, save_model

    fits = {f: fit["model"] for (m, f), fit in models["fits"].items() if m == "tfidf_lr"}
    pools = {ds: training_pool(settings, ds)[1] for ds in FIELDS}
    manifest = {"trained_by": "benchmarks/bench_extraction.py --supervised --write-supervised",
                "git_commit": git_commit(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "training_pool": pools, "rows": len(rows),
                "labels": "catalogue columns through schema/mappings (H&M category, colour, print, gender; "
                          "Myntra category, colour, gender, season, occasion)",
                "C": {f: models["fits"][("tfidf_lr", f)]["C"] for f in fits},
                "classifier": "sklearn LogisticRegression (lbfgs, multinomial), C by 3-fold CV on the pool"}
    save_model(out, models["tfidf"], fits, manifest)
    backend = TfidfLogRegExtractor(model_dir=out)
    texts = [r["text"] for r in rows[::10]]
    want = predict_supervised(models, texts, sorted(fits), settings)["tfidf_lr"]
    got = backend.pick_many(texts, sorted(fits))
    same = sum(g.get(f) == want[f][i] for i, g in enumerate(got) for f in fits) / (len(texts) * len(fits))
    if same < 1.0:
        raise SystemExit(f"--write-supervised: the tfidf-lr backend agrees on only {same:.4f} of the answers")
    return {"dir": str(out), "model_id": backend.model_id, "agreement_on_pool_sample": same,
            "bytes": sum(p.stat().st_size for p in out.iterdir())}


def supervised_summary(models: dict[str, Any]) -> dict[str, Any]:
    """What each supervised fit was trained on (JSON-ready)."""
    return {f"{m}/{f}": {k: v for k, v in fit.items() if k != "model"} for (m, f), fit in models["fits"].items()}


def run_backend(products: list[RawProduct], fields: list[str], backend: str, settings: Settings,
                cache_file: Path, dataset: str, re_fields: tuple[str, ...] = ()
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Predictions per field and run statistics of one backend through the enrichment path (cached).

    With ``re_fields``, the RE phrases per product come back under the key ``"re"`` of the predictions.
    """
    schema = load_schema()
    extractor = get_extractor(backend, settings)
    options = EnrichOptions(full=True, fields=tuple(fields), re_fields=re_fields, show_known=False)
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
    preds: dict[str, Any] = {f: [next(iter(r.extracted.get("clothes", {}).get(f) or []), None) for r in results]
                             for f in fields}
    if re_fields:
        preds["re"] = [r.extracted.get("re", {}) for r in results]
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


def run_loglik(products: list[RawProduct], fields: list[str], settings: Settings, dataset: str,
               lora: bool = False) -> tuple[dict[str, dict[str, list[str | None]]], dict[str, Any]]:
    """Log-likelihood scores of every allowed value, once per product; four read-outs of the same pass.

    ``loglik`` = mean log-probability per token (the ``embedded-ll`` backend), ``loglik_cal`` = the
    same minus the content-free score (``embedded-ll-cal``), ``loglik_sum`` / ``loglik_sum_cal`` =
    unnormalised sums (reported, not offered as backends). With ``lora``, the same pass with the
    committed LoRA adapter (``embedded-ll-lora``); only its mean read-out is kept, as ``loglik_lora``.
    """
    if lora:
        from atelier.enrich.lora import LoRALogLikExtractor

        ex: LogLikExtractor = LoRALogLikExtractor.from_settings(settings)
        ex.load()
    else:
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
            print(f"  {dataset} loglik{'_lora' if lora else ''}: {i}/{len(products)} ({sum(seconds):.0f} s)",
                  file=sys.stderr)
    ex.close()
    if lora:
        out = {"loglik_lora": out["loglik"]}
    stats = {"backend": ex.model_id, "threads": ex.n_threads, "model_seconds": round(sum(seconds), 2),
             "items_per_s": round(len(seconds) / sum(seconds), 3),
             "seconds_per_item_median": round(sorted(seconds)[len(seconds) // 2], 3),
             "load_average_after": os.getloadavg()}
    return out, stats


def lora_picks(path: Path, key: str, item_ids: list[str], fields: list[str]) -> dict[str, list[str | None]]:
    """The GPU-scored LoRA picks (``bench_lora_gpu.py run``'s ``picks_lora[key]``) of ``item_ids``, per field."""
    got = {r["item_id"]: r["picks"] for r in json.loads(path.read_text())["picks_lora"].get(key, [])}
    missing = [i for i in item_ids if i not in got]
    if missing:
        raise SystemExit(f"--lora-picks {path}: {key} lacks {len(missing)} of the items (e.g. {missing[0]})")
    return {f: [got[i].get(f) for i in item_ids] for f in fields}


def run_dataset(settings: Settings, dataset: str, n: int, seed: int, split_seed: int, backends: list[str],
                loglik: bool, cache_file: Path, lora: bool = False, supervised: dict[str, Any] | None = None,
                lora_n: int | None = None, picks: Path | None = None) -> dict[str, Any]:
    """Extract, score and compare with the baselines on one catalogue.

    ``supervised``: fitted ``fit_supervised`` models, scored on every product. ``lora_n``: the CPU LoRA
    scores only the first N products of each half (both halves keep their items; None = all).
    ``picks``: a ``bench_lora_gpu.py run`` report whose GPU picks join as ``loglik_lora_gpu``.
    """
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
    lora_idx = sorted(i for part in halves.values() for i in part[:lora_n])
    if lora:
        lora_preds, runs["loglik_lora"] = run_loglik([products[i] for i in lora_idx], fields, settings, dataset,
                                                     lora=True)
        full: dict[str, list[str | None]] = {f: [None] * len(products) for f in fields}
        for f in fields:
            for j, i in enumerate(lora_idx):
                full[f][i] = lora_preds["loglik_lora"][f][j]
        preds["loglik_lora"] = full
        runs["loglik_lora"]["items"] = [products[i].item_id for i in lora_idx]
    if picks is not None:
        ids = [p.item_id for p in products]
        gpu: dict[str, list[str | None]] = {f: [None] * len(products) for f in fields}
        for key, part in (("sample_tune", halves["tune"]), ("sample_test", halves["test"])):
            got = lora_picks(picks, f"{dataset}/{key}", [ids[i] for i in part], fields)
            for f in fields:
                for j, i in enumerate(part):
                    gpu[f][i] = got[f][j]
        preds["loglik_lora_gpu"] = gpu
        runs["loglik_lora_gpu"] = {"report": str(picks)}
    if supervised is not None:
        start = time.perf_counter()
        preds.update(predict_supervised(supervised, [product_text(p.title, p.description) for p in products], fields,
                                        settings))
        runs["supervised"] = {"predict_seconds": round(time.perf_counter() - start, 2),
                              "fits": supervised_summary(supervised)}
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
    # Where the CPU LoRA scored only part of each half, every method is also scored on that part.
    parts = dict(halves)
    if lora and lora_n is not None:
        parts.update(tune_lora=halves["tune"][:lora_n], test_lora=halves["test"][:lora_n])
    table: dict[str, dict[str, Any]] = {}
    for f in fields:
        row: dict[str, Any] = {"source_column": SOURCE_COLUMN[dataset][f], "majority_value": majority[f],
                               "methods": {m: scored(p[f], gold, f, parts) for m, p in preds.items()}}
        row["top_answers"] = {m: Counter(v for v in p[f] if v).most_common(3) for m, p in preds.items()}
        row["tune_gold"] = [gold[i][f] for i in halves["tune"] if f in gold[i]]
        table[f] = row
    return {"dataset": dataset, "n": len(products), "seed": seed, "split_seed": split_seed,
            "halves": {k: [products[i].item_id for i in v] for k, v in halves.items()},
            "lora_parts": {k: [products[i].item_id for i in v] for k, v in parts.items() if k not in halves},
            "fields": table, "runs": runs}


# --- gold set (issue #5 part 7): model-written annotations, test split ---------------------------------------------

GOLD_FIELDS = ["category", "category_specification", "color", "gender", "print", "season", "occasion", "style",
               "fiber_composition", "detail", "fit", "elasticity", "transparency", "isfleece", "top.length_type",
               "top.sleeve_length_type", "top.neck_color_design", "top.sleeve_design", "bottom.length_type",
               "dress.length_type"]
# The generating LLM is asked these STD fields (plus every RE field) in one answer: all 20 would double the
# answer tokens on a 2-core CPU; these are the ones field_sources.toml or the README table use, plus four
# the H&M and Myntra text often states.
GOLD_GEN_FIELDS = ["category", "color", "gender", "print", "season", "occasion", "fiber_composition", "fit",
                   "top.sleeve_length_type", "top.neck_color_design"]
GOLD_LL_FIELDS = ["category", "color", "gender", "print", "season", "occasion"]
_STOP = {"a", "an", "the", "and", "or", "with", "in", "at", "on", "of", "to", "for", "from", "by"}


def gold_products(settings: Settings, dataset: str, records: list[dict[str, Any]]) -> list[RawProduct]:
    """The products of gold records, as the extractors see them (H&M name + description; Myntra title)."""
    items = load_tables(settings.dataset_dir(dataset))[0].set_index("item_id")
    out = []
    for rec in records:
        row = items.loc[rec["item_id"]]
        desc = "" if dataset == "myntra" or pd.isna(row["description"]) else str(row["description"] or "")
        out.append(RawProduct(item_id=rec["item_id"], title=str(row["title"] or ""), description=desc))
    return out


def phrase_tokens(phrase: str) -> set[str]:
    """Normalised content tokens of an RE phrase: lower case, letters/digits, no stop words, plural -s cut."""
    import re

    words = re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", phrase.lower().replace("™", ""))
    return {w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words} - _STOP


def phrase_match(pred: str, gold: str, threshold: float = 0.5) -> bool:
    """Token-overlap match: Dice coefficient of the normalised token sets >= ``threshold``."""
    a, b = phrase_tokens(pred), phrase_tokens(gold)
    return bool(a and b) and 2 * len(a & b) / (len(a) + len(b)) >= threshold


def prompt_examples(schema: Any) -> set[str]:
    """Phrases a model could copy from the prompt or schema rather than the product.

    The enrich-v1 guide has no example phrases, but it names every field and describes each RE field;
    the schema's RE descriptions list examples in parentheses (older prompts showed them).
    """
    import re

    out: set[str] = {UNKNOWN_LABEL, "none", "n/a", "no", "yes", "re"}
    for name, spec in schema.re.items():
        out |= {name, name.replace("_", " "), name.replace(".", " ").replace("_", " ")}
        head, _, examples = spec.description.partition("(")
        out.add(head.strip())
        out |= {e.strip() for e in re.split(r",", examples.rstrip(")")) if e.strip()}
        out |= {w for w in head.split() if len(w) > 3}
    out |= set(schema.std)
    return {normalise_text(x) for x in out}


def re_quality(preds: list[dict[str, list[str]]], golds: list[dict[str, list[str]]], texts: list[str],
               schema: Any) -> dict[str, Any]:
    """Precision / recall of RE phrases against the gold phrases, per field and pooled, plus echo shares.

    Strict: a predicted phrase counts when it matches (``phrase_match``) a gold phrase of the same RE
    field; loose: of any RE field of the product. Echo: the phrase is a prompt/schema phrase
    (``prompt_examples``: field names, instruction wording, schema examples). Guide copy: the phrase
    occurs in the prompt's fixed guide (which lists every STD label) but not in the product text.
    """
    import re

    from atelier.enrich.prompt import _guide

    examples = prompt_examples(schema)
    guide = f" {' '.join(re.findall(r'[a-z0-9]+', _guide(schema).lower()))} "
    rows: dict[str, dict[str, int]] = {}
    n_pred = n_echo = n_in_text = n_guide = 0
    for pred, gold, text in zip(preds, golds, texts, strict=True):
        all_gold = [g for phrases in gold.values() for g in phrases]
        low = normalise_text(text)
        words = f" {' '.join(re.findall(r'[a-z0-9]+', low))} "
        for name in schema.re:
            p, g = pred.get(name, []), gold.get(name, [])
            r = rows.setdefault(name, {"pred": 0, "gold": 0, "tp_strict": 0, "tp_loose": 0, "found_gold": 0})
            r["pred"] += len(p)
            r["gold"] += len(g)
            r["tp_strict"] += sum(any(phrase_match(x, y) for y in g) for x in p)
            r["tp_loose"] += sum(any(phrase_match(x, y) for y in all_gold) for x in p)
            r["found_gold"] += sum(any(phrase_match(x, y) for x in p) for y in g)
            for x in p:
                n_pred += 1
                n_echo += normalise_text(x) in examples
                n_in_text += normalise_text(x) in low
                w = f" {' '.join(re.findall(r'[a-z0-9]+', x.lower()))} "
                n_guide += w.strip() != "" and w in guide and w not in words
    total = {k: sum(r[k] for r in rows.values()) for k in ("pred", "gold", "tp_strict", "tp_loose", "found_gold")}

    def pr(r: dict[str, int]) -> dict[str, Any]:
        return {**r, "precision_strict": r["tp_strict"] / r["pred"] if r["pred"] else None,
                "precision_loose": r["tp_loose"] / r["pred"] if r["pred"] else None,
                "recall": r["found_gold"] / r["gold"] if r["gold"] else None}

    return {"pooled": pr(total), "fields": {n: pr(r) for n, r in rows.items()},
            "echo_share": n_echo / n_pred if n_pred else None,
            "guide_copy_share": n_guide / n_pred if n_pred else None,
            "verbatim_in_text_share": n_in_text / n_pred if n_pred else None,
            "products": len(preds), "products_with_any_phrase": sum(any(p.values()) for p in preds)}


def gold_accuracy(preds: list[str | None], gold: list[list[str] | None]) -> dict[str, Any]:
    """Share of products with a gold value whose prediction is one of the gold values."""
    pairs = [(p, g) for p, g in zip(preds, gold, strict=True) if g]
    correct = sum(p in g for p, g in pairs)
    return {"acc": correct / len(pairs) if pairs else float("nan"), "correct": correct, "n": len(pairs)}


def hybrid_preds(preds: dict[str, dict[str, list[str | None]]], field: str, n: int) -> list[str | None]:
    """What ``atelier enrich --backend hybrid`` would answer for ``field`` under field_sources.toml."""
    from atelier.enrich.hybrid import load_sources

    src = load_sources().source(field)
    method = src.method if src.method in preds else ("keyword" if src.method == "default" else src.method)
    if method in ("majority", "keyword_or_majority"):
        base = preds["keyword"][field] if method == "keyword_or_majority" else [None] * n
        return [b or src.fallback for b in base]
    return preds[method][field] if method in preds else [None] * n


def gold_dataset(settings: Settings, dataset: str, path: Path, args: argparse.Namespace,
                 cache_file: Path, supervised: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score every method on the test split of one gold file."""
    from benchmarks.gold_set import load as load_gold

    schema = load_schema()
    records = load_gold(path)
    train = [r for r in records if r["split"] == "train"]
    test = [r for r in records if r["split"] == "test"]
    products = gold_products(settings, dataset, test)
    gold = {f: [r["std"].get(f) for r in test] for f in GOLD_FIELDS}
    majority = {}
    for f in GOLD_FIELDS:
        counts = Counter(r["std"][f][0] for r in train if r["std"].get(f))
        majority[f] = counts.most_common(1)[0][0] if counts else None
    texts = [product_text(p.title, p.description) for p in products]
    preds: dict[str, dict[str, list[str | None]]] = {}
    runs: dict[str, Any] = {}
    start = time.perf_counter()
    near = NearestLabelExtractor(schema).pick_many(texts, GOLD_FIELDS)
    runs["minilm"] = {"items_per_s": round(len(products) / (time.perf_counter() - start), 1)}
    preds["minilm"] = {f: [d.get(f) for d in near] for f in GOLD_FIELDS}
    kw = {f: [keyword_values(f"{p.title} {p.description}", schema, [f]).get(f) for p in products]
          for f in GOLD_FIELDS}
    preds["keyword"] = kw
    preds["keyword_or_majority"] = {f: [k or majority[f] for k in kw[f]] for f in GOLD_FIELDS}
    preds["keyword_or_minilm"] = {f: [k or m for k, m in zip(kw[f], preds["minilm"][f], strict=True)]
                                  for f in GOLD_FIELDS}
    preds["majority"] = {f: [majority[f]] * len(products) for f in GOLD_FIELDS}
    # LLM variants on a fixed subset of the test split (first --llm-n by item id): CPU time is bounded.
    llm_idx = sorted(range(len(test)), key=lambda i: test[i]["item_id"])[: args.llm_n]
    llm_products = [products[i] for i in llm_idx]
    re_out: dict[str, Any] = {}
    if args.llm_n and "embedded" in args.backends:
        gen, runs["embedded"] = run_backend(llm_products, GOLD_GEN_FIELDS, "embedded", settings, cache_file,
                                            dataset, re_fields=tuple(schema.re))
        full: dict[str, list[str | None]] = {f: [None] * len(test) for f in GOLD_FIELDS}
        for f in GOLD_GEN_FIELDS:
            for j, i in enumerate(llm_idx):
                full[f][i] = gen[f][j]
        preds["embedded"] = full
        re_out["embedded"] = re_quality(gen["re"], [test[i]["re"] for i in llm_idx],
                                        [texts[i] for i in llm_idx], schema)
        re_out["embedded"]["outputs"] = [{"item_id": test[i]["item_id"], "re": gen["re"][j]}
                                         for j, i in enumerate(llm_idx)]
    from atelier.enrich.shipped import load_re

    shipped = load_re(dataset) if (ROOT / "data" / "enriched" / f"{dataset}-re.jsonl.gz").exists() else {}
    if shipped:  # the committed full-catalogue GPU run: every test product, same prompt, no CPU cost
        have = [i for i, r in enumerate(test) if r["item_id"] in shipped]
        re_out["shipped"] = re_quality([shipped[test[i]["item_id"]] for i in have], [test[i]["re"] for i in have],
                                       [texts[i] for i in have], schema)
        re_out["shipped"]["subset_of_embedded"] = re_quality(
            [shipped.get(test[i]["item_id"], {}) for i in llm_idx], [test[i]["re"] for i in llm_idx],
            [texts[i] for i in llm_idx], schema)["pooled"]
    if args.llm_n and not args.no_loglik:
        ll, runs["loglik"] = run_loglik(llm_products, GOLD_LL_FIELDS, settings, dataset)
        for k, per_field in ll.items():
            if k.startswith("loglik_sum"):
                continue
            full = {f: [None] * len(test) for f in GOLD_FIELDS}
            for f in GOLD_LL_FIELDS:
                for j, i in enumerate(llm_idx):
                    full[f][i] = per_field[f][j]
            preds[k] = full
    if args.llm_n and args.lora:
        lora_ll, runs["loglik_lora"] = run_loglik(llm_products, GOLD_LL_FIELDS, settings, dataset, lora=True)
        full = {f: [None] * len(test) for f in GOLD_FIELDS}
        for f in GOLD_LL_FIELDS:
            for j, i in enumerate(llm_idx):
                full[f][i] = lora_ll["loglik_lora"][f][j]
        preds["loglik_lora"] = full
    if args.lora_picks is not None:  # GPU-scored LoRA picks: every test product
        got = lora_picks(args.lora_picks, f"{dataset}/gold_test", [r["item_id"] for r in test], GOLD_LL_FIELDS)
        preds["loglik_lora_gpu"] = {f: got.get(f, [None] * len(test)) for f in GOLD_FIELDS}
        runs["loglik_lora_gpu"] = {"report": str(args.lora_picks)}
    if supervised is not None:
        sup = predict_supervised(supervised, texts, GOLD_LL_FIELDS, settings)
        for m, per_field in sup.items():
            preds[m] = {f: per_field.get(f, [None] * len(test)) for f in GOLD_FIELDS}
    preds["hybrid"] = {f: hybrid_preds(preds, f, len(test)) for f in GOLD_FIELDS}
    llm_set = set(llm_idx)
    table: dict[str, Any] = {}
    for f in GOLD_FIELDS:
        if not any(gold[f]):
            continue
        row: dict[str, Any] = {"majority_value": majority[f], "methods": {}}
        for m, p in preds.items():
            row["methods"][m] = {"test": gold_accuracy(p[f], gold[f]),
                                 "llm_subset": gold_accuracy([p[f][i] for i in llm_idx],
                                                             [gold[f][i] for i in llm_idx])}
        # Text-grounded only: leave out products whose gold value the annotator took from a column.
        grounded = [g if f not in test[i].get("from_columns", []) else None for i, g in enumerate(gold[f])]
        row["text_grounded_n"] = sum(bool(g) for g in grounded)
        for m, p in preds.items():
            row["methods"][m]["text_grounded"] = gold_accuracy(p[f], grounded)
        row["llm_subset_n"] = sum(bool(gold[f][i]) for i in llm_set)
        if f not in FIELDS[dataset]:  # the GPU run scored only the catalogue's own benchmark fields
            row["methods"].pop("loglik_lora_gpu", None)
        table[f] = row
    return {"dataset": dataset, "gold_file": str(path.relative_to(ROOT)), "n_train": len(train), "n_test": len(test),
            "llm_subset": [test[i]["item_id"] for i in llm_idx], "fields": table, "re": re_out, "runs": runs}


GOLD_BASELINES = ["majority", "keyword", "keyword_or_majority", "minilm", "keyword_or_minilm"]
GOLD_LLM = ["embedded", "loglik", "loglik_cal", "loglik_lora"]


def gold_markdown(report: dict[str, Any]) -> str:
    """Two tables: baselines on the whole gold test split; LLM variants vs baselines on the LLM subset."""
    names = {**METHOD_NAMES, "hybrid": "`hybrid` now"}
    asked = {"embedded": GOLD_GEN_FIELDS, "loglik": GOLD_LL_FIELDS, "loglik_cal": GOLD_LL_FIELDS,
             "loglik_lora": GOLD_LL_FIELDS}
    out = []
    for title, methods, part in (("Gold test split, all products", [*GOLD_BASELINES, "hybrid"], "test"),
                                 ("LLM subset of the test split", [*GOLD_LLM, *GOLD_BASELINES, "hybrid"],
                                  "llm_subset")):
        lines = [f"{title}:", "", "| dataset | field | n | " + " | ".join(names[m] for m in methods) + " |",
                 "|---" * (len(methods) + 3) + "|"]
        for ds in report["datasets"]:
            for f, row in ds["fields"].items():
                if part == "llm_subset" and f not in GOLD_GEN_FIELDS + GOLD_LL_FIELDS:
                    continue
                cells = [row["methods"][m][part]["acc"] if m in row["methods"] and f in asked.get(m, [f])
                         else float("nan") for m in methods]
                best = max((c for c in cells if c == c), default=None)
                shown = ["–" if c != c else (f"**{c:.2f}**" if c == best else f"{c:.2f}") for c in cells]
                n = row["methods"]["majority"][part]["n"]
                if n:
                    lines.append(f"| {ds['dataset']} | {f} | {n} | " + " | ".join(shown) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


LLM_COLUMNS = ("embedded", "loglik", "loglik_cal", "loglik_lora")


def gold_winners(report: dict[str, Any]) -> dict[str, Any]:
    """Per field, pooled over catalogues: the best baseline on the test split and the best LLM on its subset,
    each compared on the same items, next to what field_sources.toml uses."""
    from atelier.enrich.hybrid import BASELINES, load_sources

    sources = load_sources()
    out: dict[str, Any] = {}
    for f in GOLD_FIELDS:
        tot: dict[str, list[int]] = {}
        sub: dict[str, list[int]] = {}
        for ds in report["datasets"]:
            row = ds["fields"].get(f)
            if row is None:
                continue
            for m, res in row["methods"].items():
                t, s = tot.setdefault(m, [0, 0]), sub.setdefault(m, [0, 0])
                t[0] += res["test"]["correct"]
                t[1] += res["test"]["n"]
                s[0] += res["llm_subset"]["correct"]
                s[1] += res["llm_subset"]["n"]
        if not tot:
            continue
        acc = {m: c / n for m, (c, n) in tot.items() if n and m in BASELINES}
        best = max(acc, key=lambda m: (acc[m], -BASELINES.index(m)))
        entry: dict[str, Any] = {"best_baseline": best, "best_baseline_acc": round(acc[best], 3),
                                 "field_sources": sources.source(f).method,
                                 "field_sources_acc": round(tot["hybrid"][0] / tot["hybrid"][1], 3)}
        llm_fields = {"embedded": GOLD_GEN_FIELDS, "loglik": GOLD_LL_FIELDS, "loglik_cal": GOLD_LL_FIELDS,
                      "loglik_lora": GOLD_LL_FIELDS}
        llm = {m: sub[m][0] / sub[m][1] for m in LLM_COLUMNS if m in sub and sub[m][1] and f in llm_fields[m]}
        sup = {m: c / n for m, (c, n) in tot.items() if n and m in SUPERVISED and f in GOLD_LL_FIELDS}
        if sup:
            top_sup = max(sup, key=lambda m: sup[m])
            entry.update(best_supervised=top_sup, best_supervised_acc=round(sup[top_sup], 3))
        if "loglik_lora_gpu" in tot and tot["loglik_lora_gpu"][1] and f in GOLD_LL_FIELDS:
            entry["loglik_lora_gpu_acc"] = round(tot["loglik_lora_gpu"][0] / tot["loglik_lora_gpu"][1], 3)
        if llm:
            top = max(llm, key=lambda m: llm[m])
            base_sub = sub[best][0] / sub[best][1]
            entry.update(best_llm=top, best_llm_acc_subset=round(llm[top], 3),
                         best_baseline_acc_subset=round(base_sub, 3), llm_beats_baseline=llm[top] > base_sub)
            if sup:
                sup_sub = max(sub[m][0] / sub[m][1] for m in sup if sub[m][1])
                entry.update(best_supervised_acc_subset=round(sup_sub, 3),
                             llm_beats_supervised=llm[top] > sup_sub)
        out[f] = entry
    return out


def gold_main(argv: list[str]) -> None:
    """``bench_extraction.py gold``: score the extractors on the gold test split(s)."""
    ap = argparse.ArgumentParser(prog="bench_extraction.py gold", description=gold_main.__doc__)
    ap.add_argument("--datasets", nargs="+", default=["hm", "myntra"], choices=sorted(FIELDS))
    ap.add_argument("--llm-n", type=int, default=40, help="test products per dataset given to the LLM variants "
                    "(the first N by item id; 0 = none)")
    ap.add_argument("--backends", nargs="*", default=["embedded"], help="generating backends (RE phrases too)")
    ap.add_argument("--no-loglik", action="store_true", help="skip the log-likelihood scorer")
    ap.add_argument("--lora", action="store_true", help="also score with the LoRA adapter (embedded-ll-lora)")
    ap.add_argument("--lora-picks", type=Path, help="bench_lora_gpu.py run report: its GPU picks join as "
                    "loglik_lora_gpu (every test product)")
    ap.add_argument("--supervised", action="store_true", help="add the supervised baselines (tfidf_lr, minilm_lr) "
                    "trained on the LoRA's training pool")
    ap.add_argument("--tag", default="", help="suffix for the result file name")
    ap.add_argument("--table", type=Path, help="only print the tables of a saved gold report")
    args = ap.parse_args(argv)
    if args.table:
        print(gold_markdown(json.loads(args.table.read_text())))
        return
    settings = Settings()
    commit = git_commit()
    cache_file = settings.run_dir / "enrich" / "bench-cache.jsonl"
    gold_dir = ROOT / "benchmarks" / "gold"
    supervised, pool_info = None, None
    if args.supervised:
        rows = pool_rows(settings)
        supervised = fit_supervised(rows, sorted({f for fs in FIELDS.values() for f in fs}), settings)
        pool_info = {"rows": len(rows), "pools": {ds: training_pool(settings, ds)[1] for ds in FIELDS},
                     "fits": supervised_summary(supervised)}
    datasets = [gold_dataset(settings, ds, gold_dir / f"{ds}.jsonl", args, cache_file, supervised)
                for ds in args.datasets if (gold_dir / f"{ds}.jsonl").exists()]
    report: dict[str, Any] = {
        "command": " ".join(["bench_extraction.py", "gold", *argv]),
        "git_commit": commit, "machine": machine(), "load_average": os.getloadavg(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "prompt_version": PROMPT_VERSION,
        "gold_guide": "benchmarks/gold/GUIDE.md", "training_pool": pool_info,
        "scoring": {"std": "a prediction is right when it is one of the gold values; gold null is skipped; "
                           "no answer or unknown is wrong; majority = most frequent gold value of the train split "
                           "of the same catalogue; LLM columns are measured on the first --llm-n test products "
                           "by item id (llm_subset), baselines on all test products (test) and on that subset",
                    "re": "phrases normalised (lower case, tokens, stop words and plural -s dropped); a predicted "
                          "phrase matches a gold phrase when the Dice overlap of their token sets is >= 0.5; "
                          "precision_strict = matched in the same RE field, precision_loose = in any RE field of "
                          "the product; recall = gold phrases matched by a predicted phrase of the same field; "
                          "echo_share = predicted phrases equal to a field name, guide wording or schema example; "
                          "guide_copy_share = phrases found in the prompt's fixed guide (it lists every STD "
                          "label) but not in the product text"},
        "datasets": datasets,
    }
    report["winners"] = gold_winners(report)
    name = f"extraction-gold-{dt.date.today()}{'-' + args.tag if args.tag else ''}.json"
    out = ROOT / "benchmarks" / "results" / name
    out.write_text(json.dumps(report, indent=2, default=float))
    print(gold_markdown(report))
    for ds in datasets:
        for m, q in ds["re"].items():
            print(ds["dataset"], m, "RE pooled:", {k: q["pooled"][k] for k in ("precision_strict",
                  "precision_loose", "recall", "pred", "gold")}, "echo", q["echo_share"], "guide copy",
                  q["guide_copy_share"])
    print(json.dumps(report["winners"], indent=1))
    print(f"written: {out}")


def speed_main(argv: list[str]) -> None:
    """``bench_extraction.py speed``: CPU speed of the tfidf-lr backend (load, batch, through the enrichment path)."""
    from atelier.enrich.batch import load_products
    from atelier.enrich.supervised import TfidfLogRegExtractor

    ap = argparse.ArgumentParser(prog="bench_extraction.py speed", description=speed_main.__doc__)
    ap.add_argument("--n", type=int, default=1000, help="H&M products for the batch timing")
    ap.add_argument("--n-path", type=int, default=100, help="of those, products sent through enrich_products")
    args = ap.parse_args(argv)
    settings = Settings()
    fields = ["category", "color", "print", "gender", "occasion"]
    products = load_products(settings, "hm", args.n)
    texts = [product_text(p.title, p.description) for p in products]
    start = time.perf_counter()
    ex = TfidfLogRegExtractor()
    load_s = time.perf_counter() - start
    ex.pick_many(texts[:10], fields)  # warm
    start = time.perf_counter()
    ex.pick_many(texts, fields)
    batch_s = time.perf_counter() - start
    options = EnrichOptions(full=True, fields=tuple(fields), re_fields=(), show_known=False)
    start = time.perf_counter()
    results = enrich_products(products[: args.n_path], ex, None, load_schema(), options)
    path_s = time.perf_counter() - start
    report = {"command": " ".join(["bench_extraction.py", "speed", *argv]), "git_commit": git_commit(),
              "machine": machine(), "load_average": os.getloadavg(),
              "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "backend": ex.model_id,
              "fields": fields, "load_seconds": round(load_s, 3),
              "batch": {"products": len(texts), "seconds": round(batch_s, 3),
                        "products_per_s": round(len(texts) / batch_s, 1)},
              "enrich_path": {"products": len(results), "seconds": round(path_s, 3),
                              "products_per_s": round(len(results) / path_s, 1),
                              "statuses": dict(Counter(r.status for r in results)),
                              "note": "enrich_products without a cache: prompt building, the backend, parsing and "
                                      "validation per product, up to 4 at a time"}}
    path = ROOT / "benchmarks" / "results" / f"extraction-speed-{dt.date.today()}.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=1))


def agreement_main(argv: list[str]) -> None:
    """``bench_extraction.py agreement``: the second annotation pass against the gold set, per field."""
    ap = argparse.ArgumentParser(prog="bench_extraction.py agreement", description=agreement_main.__doc__)
    ap.add_argument("--second", type=Path, default=ROOT / "benchmarks" / "gold" / "second_pass.jsonl")
    args = ap.parse_args(argv)
    second = [json.loads(line) for line in args.second.read_text().splitlines() if line.strip()]
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for ds in {r["dataset"] for r in second}:
        for line in (ROOT / "benchmarks" / "gold" / f"{ds}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            first[(ds, rec["item_id"])] = rec
    fields: dict[str, dict[str, Any]] = {}
    for r in second:
        gold = first[(r["dataset"], r["item_id"])]
        for f, vals in r["std"].items():
            row = fields.setdefault(f"{r['dataset']}/{f}", {"pairs": [], "second_null": 0, "first_null": 0})
            g = gold["std"].get(f)
            if not vals:
                row["second_null"] += 1
            elif not g:
                row["first_null"] += 1
            else:
                row["pairs"].append((vals[0], g, f in gold.get("from_columns", [])))
    out: dict[str, Any] = {}
    for key, row in sorted(fields.items()):
        pairs = row["pairs"]
        n = len(pairs)
        agree = sum(a in g for a, g, _ in pairs)
        exact = sum(a == g[0] for a, g, _ in pairs)
        # Cohen's kappa on the first values: observed agreement against chance from both passes' marginals.
        a_counts, b_counts = Counter(a for a, _, _ in pairs), Counter(g[0] for _, g, _ in pairs)
        chance = sum(a_counts[v] * b_counts[v] for v in a_counts) / n / n if n else float("nan")
        kappa = (exact / n - chance) / (1 - chance) if n and chance < 1 else float("nan")
        out[key] = {"n_both": n, "agree_any": agree, "agree_share": round(agree / n, 3) if n else None,
                    "exact_first": exact, "kappa_first": round(kappa, 3) if kappa == kappa else None,
                    "second_null": row["second_null"], "first_null": row["first_null"],
                    "first_from_columns": sum(c for _, _, c in pairs),
                    "disagreements": [{"second": a, "first": g} for a, g, _ in pairs if a not in g]}
    report = {"command": " ".join(["bench_extraction.py", "agreement", *argv]), "git_commit": git_commit(),
              "machine": machine(), "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "second_pass": str(args.second.relative_to(ROOT)),
              "how": "second pass: one language-model session (issue #17's extraction session, not the sessions that "
                     "wrote the gold files), reading only the text the extractors see (H&M prod_name + detail_desc, "
                     "Myntra title), following GUIDE.md, without the first pass's labels or the catalogue columns; "
                     "the first 30 gold test items by item id per catalogue. agree_any: the second value is one of "
                     "the first pass's values; kappa_first: Cohen's kappa of the two first values",
              "fields": out}
    path = ROOT / "benchmarks" / "results" / f"extraction-gold-agreement-{dt.date.today()}.json"
    path.write_text(json.dumps(report, indent=2))
    for key, row in out.items():
        print(key, {k: v for k, v in row.items() if k != "disagreements"})
    print(f"written: {path}")


# --- issue #19: grounded RE phrases and the STD fields the columns lack, chosen on the gold train split -------------

# The STD fields the H&M and Myntra columns do not give (or give for few products): the LLM's remaining job.
LACKING = ["season", "occasion", "style", "fiber_composition", "detail", "fit", "elasticity", "transparency",
           "isfleece", "top.length_type", "top.sleeve_length_type", "top.neck_color_design", "top.sleeve_design",
           "bottom.length_type", "dress.length_type"]
RE_LLM = ("phrases_ll", "phrases_ll_lora", "phrases_ll_rest", "phrases_ll_lora_rest")


def gold_split(settings: Settings, dataset: str) -> dict[str, tuple[list[dict[str, Any]], list[RawProduct]]]:
    """{split: (gold records, their products as the extractors see them)} of one gold file."""
    from benchmarks.gold_set import load as load_gold

    recs = load_gold(ROOT / "benchmarks" / "gold" / f"{dataset}.jsonl")
    out = {}
    for split in ("train", "test"):
        part = [r for r in recs if r["split"] == split]
        out[split] = (part, gold_products(settings, dataset, part))
    return out


def load_gold_picks(path: Path | None) -> dict[str, Any]:
    """``bench_enrich_gpu.py collect``'s gold-picks.json ({} without one)."""
    return json.loads(path.read_text()) if path else {}


def picked(picks: dict[str, Any], variant: str, dataset: str) -> dict[str, dict[str, Any]]:
    """item_id -> the GPU picks of one variant (base, lora) for one catalogue."""
    return {r["item_id"]: r for r in picks.get("variants", {}).get(variant, {}).get(dataset, [])}


def re_counts(q: dict[str, Any]) -> dict[str, int]:
    """The pooled counts of a ``re_quality`` result."""
    return {k: q["pooled"][k] for k in ("pred", "gold", "tp_strict", "tp_loose", "found_gold")}


def prf(c: dict[str, int]) -> dict[str, Any]:
    """Precision (strict), recall and F1 from pooled counts."""
    p = c["tp_strict"] / c["pred"] if c["pred"] else 0.0
    r = c["found_gold"] / c["gold"] if c["gold"] else 0.0
    return {**c, "precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0}


def gold_re_main(argv: list[str]) -> None:
    """``bench_extraction.py gold-re``: grounded RE phrases (cut + assign) against the gold phrases, both splits.

    Every method cuts the same candidate phrases (``phrases.candidate_phrases``) and differs in who assigns
    the "part" candidates to RE fields: word lists (``phrases``), MiniLM prototypes (``phrases_minilm``; its
    similarity floor chosen on the train split), the LLM (``phrases_ll*``: GPU picks of ``bench_enrich_gpu.py``,
    base model or the STD LoRA; ``_rest``: the LLM judges only what the word lists drop). The default is chosen
    by pooled F1 on the train split (an LLM method only if strictly better); the test split is reported.
    """
    from atelier.enrich.phrase_llm import ANSWERS
    from atelier.enrich.phrases import MiniLMJudge, _garment_words, _rule_field, assign, candidate_phrases

    ap = argparse.ArgumentParser(prog="bench_extraction.py gold-re", description=gold_re_main.__doc__)
    ap.add_argument("--picks", type=Path, help="gold-picks.json of bench_enrich_gpu.py collect (LLM assigners)")
    ap.add_argument("--cpu", type=Path, nargs="*", default=[], help="CPU llama.cpp runs of the LLM assigners "
                    "(JSON: method -> dataset -> split -> [{item_id, re}]) shown beside the GPU picks")
    ap.add_argument("--floors", type=float, nargs="*", default=[0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65])
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    settings, schema = Settings(), load_schema()
    picks = load_gold_picks(args.picks)
    garments = _garment_words(schema)
    data = {ds: gold_split(settings, ds) for ds in ("hm", "myntra")}
    cands = {ds: {sp: [candidate_phrases(p.title, p.description, schema) for p in prods]
                  for sp, (_, prods) in splits.items()} for ds, splits in data.items()}
    minilm = MiniLMJudge()
    methods: dict[str, Any] = {}

    def score(method: str, make: Any) -> None:
        res: dict[str, Any] = {}
        for ds, splits in data.items():
            for sp, (recs, prods) in splits.items():
                preds = [make(ds, sp, i, c) for i, c in enumerate(cands[ds][sp])]
                if preds and preds[0] is None:
                    return
                q = re_quality(preds, [r["re"] for r in recs], [product_text(p.title, p.description) for p in prods],
                               schema)
                res[f"{ds}/{sp}"] = {**prf(re_counts(q)), "fields": q["fields"], "echo_share": q["echo_share"],
                                     "verbatim_in_text_share": q["verbatim_in_text_share"]}
        for sp in ("train", "test"):
            tot = {k: sum(res[f"{ds}/{sp}"][k] for ds in data) for k in ("pred", "gold", "tp_strict", "tp_loose",
                                                                          "found_gold")}
            res[f"pooled/{sp}"] = prf(tot)
        methods[method] = res

    score("phrases", lambda ds, sp, i, c: assign(c, schema))
    floors = {}
    for floor in args.floors:
        minilm.floor = floor
        score(f"phrases_minilm@{floor}", lambda ds, sp, i, c: assign(c, schema, minilm))
        floors[floor] = methods[f"phrases_minilm@{floor}"]["pooled/train"]["f1"]
    best_floor = max(floors, key=lambda f: (floors[f], -f))
    methods["phrases_minilm"] = {**methods[f"phrases_minilm@{best_floor}"], "floor": best_floor}
    for variant, tag in (("base", "phrases_ll"), ("lora", "phrases_ll_lora")):
        for rest in (False, True):
            name = tag + ("_rest" if rest else "")

            def make(ds: str, sp: str, i: int, c: Any, variant: str = variant, rest: bool = rest) -> Any:
                got = picked(picks, variant, ds)
                rec = got.get(data[ds][sp][0][i]["item_id"])
                if rec is None:
                    return None
                answers = rec["re"]

                def judge(parts: Any) -> list[str | None]:
                    out = []
                    for p in parts:
                        field = _rule_field(p, garments, schema) if rest else None
                        out.append(field if field is not None else ANSWERS.get(answers.get(p.text, "")))
                    return out
                return assign(c, schema, judge)
            if picks:
                score(name, make)
    for path in args.cpu:  # CPU llama.cpp runs of the same assigners (cross-check of the GPU picks)
        for method, per_ds in json.loads(path.read_text()).items():
            res = {}
            for ds, per_split in per_ds.items():
                for sp, rows in per_split.items():
                    recs, prods = data[ds][sp]
                    by_id = {r["item_id"]: r["re"] for r in rows}
                    idx = [i for i, r in enumerate(recs) if r["item_id"] in by_id]
                    q = re_quality([by_id[recs[i]["item_id"]] for i in idx], [recs[i]["re"] for i in idx],
                                   [product_text(prods[i].title, prods[i].description) for i in idx], schema)
                    res[f"{ds}/{sp}"] = {**prf(re_counts(q)), "n": len(idx)}
            methods[f"{method} (CPU)"] = res
    shipped_path = ROOT / "data" / "enriched" / "hm-re.jsonl.gz"
    if shipped_path.exists():  # the generated phrases of the first GPU run (history)
        from atelier.enrich.shipped import load_re

        old = load_re("hm")
        res = {}
        for sp in ("train", "test"):
            recs, prods = data["hm"][sp]
            q = re_quality([old.get(r["item_id"], {}) for r in recs], [r["re"] for r in recs],
                           [product_text(p.title, p.description) for p in prods], schema)
            res[f"hm/{sp}"] = prf(re_counts(q))
        methods["generated_gpu_2026_11_27"] = res
    non_llm = [m for m in ("phrases", "phrases_minilm") if m in methods]
    best_non = max(non_llm, key=lambda m: methods[m]["pooled/train"]["f1"])
    llm = [m for m in RE_LLM if m in methods]
    best_llm = max(llm, key=lambda m: methods[m]["pooled/train"]["f1"]) if llm else None
    chosen = best_llm if best_llm and methods[best_llm]["pooled/train"]["f1"] > \
        methods[best_non]["pooled/train"]["f1"] else best_non
    test = methods[chosen]
    report = {
        "command": " ".join(["bench_extraction.py", "gold-re", *argv]), "git_commit": git_commit(),
        "machine": machine(), "load_average": os.getloadavg(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "gold": "benchmarks/gold/{hm,myntra}.jsonl: RE phrases written by language-model sessions following "
                "GUIDE.md (short quotes or trims of the product text; see benchmarks/gold/README.md); train split "
                "for choosing, test split for reporting",
        "scoring": "phrases normalised (lower case, tokens, stop words and plural -s dropped); a predicted phrase "
                   "matches a gold phrase when the Dice overlap of their token sets is >= 0.5; precision = predicted "
                   "phrases matching a gold phrase of the same RE field; recall = gold phrases matched by a "
                   "predicted phrase of the same field; pooled = counts summed over catalogues",
        "rule": "the default is the method with the best pooled F1 on the train split; an LLM method only if "
                "strictly better than every non-LLM one",
        "picks": str(args.picks) if args.picks else None,
        "gpu_run": picks.get("report"),
        "minilm_floors_train_f1": floors, "methods": methods, "chosen": chosen,
        "best_non_llm": best_non, "best_llm": best_llm,
        "target": {"precision": 0.5, "recall": 0.3,
                   "met_on_test": {k: test[k]["precision"] >= 0.5 and test[k]["recall"] >= 0.3
                                   for k in ("hm/test", "myntra/test", "pooled/test")}},
    }
    tag = f"-{args.tag}" if args.tag else ""
    out = ROOT / "benchmarks" / "results" / f"extraction-gold-re-{dt.date.today()}{tag}.json"
    out.write_text(json.dumps(report, indent=2))
    for m, res in methods.items():
        if "@" in m:
            continue
        print(f"{m:28s}", "  ".join(f"{k} P={v['precision']:.2f} R={v['recall']:.2f}" for k, v in res.items()
                                     if isinstance(v, dict) and "precision" in v))
    print("chosen:", chosen, "written:", out)


def gold_std_main(argv: list[str]) -> None:
    """``bench_extraction.py gold-std``: the STD fields the columns lack, every method, gold train and test splits.

    Baselines on every product; ``tfidf_lr`` where the shipped classifier has the field; the LLM variants
    (``loglik``, ``loglik_cal``, ``loglik_lora``) from the GPU picks of ``bench_enrich_gpu.py`` (bf16, every
    product). Majority = the most frequent value of the train split pooled over both catalogues (what
    ``hybrid``'s single fallback value can be). ``--write-sources`` writes the choice made on the train split
    (``hybrid.choose_sources``, pooled over catalogues) into ``field_sources.toml`` for these fields, keeping
    the other fields' sections; the test split is reported.
    """
    from atelier.enrich.fieldwise import NearestLabelExtractor
    from atelier.enrich.supervised import TfidfLogRegExtractor

    ap = argparse.ArgumentParser(prog="bench_extraction.py gold-std", description=gold_std_main.__doc__)
    ap.add_argument("--picks", type=Path, help="gold-picks.json of bench_enrich_gpu.py collect (LLM variants)")
    ap.add_argument("--cpu", type=Path, nargs="*", default=[], help="CPU runs (JSON: method -> dataset -> split -> "
                    "[{item_id, picks}]) shown beside the GPU picks, on the items they cover")
    ap.add_argument("--write-sources", action="store_true")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    settings, schema = Settings(), load_schema()
    picks = load_gold_picks(args.picks)
    data = {ds: gold_split(settings, ds) for ds in ("hm", "myntra")}
    majority: dict[str, str] = {}
    for f in LACKING:
        c = Counter(r["std"][f][0] for ds in data for r in data[ds]["train"][0] if r["std"].get(f))
        majority[f] = c.most_common(1)[0][0]
    near = NearestLabelExtractor(schema)
    sup = TfidfLogRegExtractor()
    preds: dict[str, dict[str, dict[str, list[str | None]]]] = {}  # ds/split -> method -> field -> values
    for ds, splits in data.items():
        for sp, (recs, prods) in splits.items():
            texts = [product_text(p.title, p.description) for p in prods]
            kw = {f: [keyword_values(f"{p.title} {p.description}", schema, [f]).get(f) for p in prods] for f in LACKING}
            mn = near.pick_many(texts, LACKING)
            tf = sup.pick_many(texts, [f for f in LACKING if f in sup.fields])
            m: dict[str, dict[str, list[str | None]]] = {
                "majority": {f: [majority[f]] * len(prods) for f in LACKING}, "keyword": kw,
                "keyword_or_majority": {f: [k or majority[f] for k in kw[f]] for f in LACKING},
                "minilm": {f: [d.get(f) for d in mn] for f in LACKING},
                "keyword_or_minilm": {f: [k or d.get(f) for k, d in zip(kw[f], mn, strict=True)] for f in LACKING},
                "tfidf_lr": {f: [d.get(f) for d in tf] for f in LACKING if f in sup.fields},
            }
            for variant, key, names in (("base", "std", "loglik"), ("base", "std_cal", "loglik_cal"),
                                        ("lora", "std", "loglik_lora")):
                got = picked(picks, variant, ds)
                if got:
                    m[names] = {f: [got[r["item_id"]][key].get(f) for r in recs] for f in LACKING}
            for path in args.cpu:
                for method, per_ds in json.loads(path.read_text()).items():
                    rows = {r["item_id"]: r["picks"] for r in per_ds.get(ds, {}).get(sp, [])}
                    if rows:
                        m[f"{method}_cpu"] = {
                            f: [rows.get(r["item_id"], {}).get(f) if r["item_id"] in rows else "__na__" for r in recs]
                            for f in LACKING}
            preds[f"{ds}/{sp}"] = m
    # A field counts for a catalogue only where its columns lack it (there the hybrid asks a model): Myntra's
    # columns give season, occasion and style, so those are chosen on H&M alone.
    from atelier.enrich.batch import load_products

    known_share = {}
    for ds in data:
        prods = load_products(settings, ds, None, schema)
        known_share[ds] = {f: round(sum(bool(p.known.get(f)) for p in prods) / len(prods), 4) for f in LACKING}
    asked_in = {f: [ds for ds in data if known_share[ds][f] < 0.5] for f in LACKING}
    table: dict[str, Any] = {}
    tune: dict[str, dict[str, tuple[int, int]]] = {}
    flags: dict[str, dict[str, list[bool]]] = {}  # field -> method -> per train item (asked catalogues): right?
    for f in LACKING:
        row: dict[str, Any] = {}
        for key, m in preds.items():
            ds, sp = key.split("/")
            gold_vals = [r["std"].get(f) for r in data[ds][sp][0]]
            for method, per_field in m.items():
                if f not in per_field:
                    continue
                pairs = [(p, g) for p, g in zip(per_field[f], gold_vals, strict=True) if g and p != "__na__"]
                correct = sum(p in g for p, g in pairs)
                row.setdefault(method, {})[key] = {"correct": correct, "n": len(pairs),
                                                   "acc": round(correct / len(pairs), 4) if pairs else None}
                if sp == "train" and ds in asked_in[f] and not method.endswith("_cpu"):
                    flags.setdefault(f, {}).setdefault(method, []).extend(p in g for p, g in pairs)
        for res in row.values():
            for sp in ("train", "test"):
                c = sum(res.get(f"{ds}/{sp}", {}).get("correct", 0) for ds in asked_in[f])
                n = sum(res.get(f"{ds}/{sp}", {}).get("n", 0) for ds in asked_in[f])
                res[f"pooled/{sp}"] = {"correct": c, "n": n, "acc": round(c / n, 4) if n else None}
        table[f] = row
        tune[f] = {m: (res["pooled/train"]["correct"], res["pooled/train"]["n"]) for m, res in row.items()
                   if not m.endswith("_cpu") and res["pooled/train"]["n"]}
    chosen = choose_sources(tune, majority)
    # An LLM costs CPU seconds per product: it replaces the best non-LLM method only where it wins clearly, by a
    # one-sided exact McNemar test on the paired train items (p < 0.05), not by an item or two.
    from math import comb

    from atelier.enrich.hybrid import LLM_METHODS

    tests: dict[str, Any] = {}
    for f, row in chosen.items():
        if row["method"] not in LLM_METHODS:
            continue
        rest = {m: v for m, v in tune[f].items() if m not in LLM_METHODS}
        best = max(rest, key=lambda m: rest[m][0] / rest[m][1])
        a, b = flags[f][row["method"]], flags[f][best]
        wins, losses = sum(x and not y for x, y in zip(a, b, strict=True)), sum(y and not x for x, y in zip(a, b,
                                                                                                            strict=True))
        p_value = sum(comb(wins + losses, k) for k in range(wins, wins + losses + 1)) / 2 ** (wins + losses)
        tests[f] = {"llm": row["method"], "against": best, "llm_only_right": wins, "other_only_right": losses,
                    "p_one_sided": round(p_value, 4), "kept": p_value < 0.05}
        if p_value >= 0.05:
            chosen[f] = {**choose_sources({f: rest}, majority)[f], "llm_not_significant": tests[f]}
    report = {
        "command": " ".join(["bench_extraction.py", "gold-std", *argv]), "git_commit": git_commit(),
        "machine": machine(), "load_average": os.getloadavg(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "fields": LACKING, "majority_pooled_train": majority, "picks": str(args.picks) if args.picks else None,
        "gpu_run": picks.get("report"),
        "scoring": "a prediction is right when it is one of the gold values; gold null or absent is skipped; no "
                   "answer is wrong; LLM variants are the GPU picks (bf16 weights dequantised from the Q4_K_M GGUF, "
                   "the committed LoRA merged), every product of both splits",
        "rule": "hybrid.choose_sources on the train split, pooled over the catalogues whose columns lack the field "
                "(catalogues_asked: where the hybrid asks a model): an LLM method only where strictly better than the "
                "best zero-shot and the best supervised method and, paired with the best non-LLM method on the same "
                "items, better by a one-sided exact McNemar test at p < 0.05; ties go to the cheaper",
        "catalogues_asked": asked_in, "known_share_of_products": known_share, "llm_significance": tests,
        "table": table, "chosen": chosen,
    }
    if args.write_sources:
        write_sources_sections(chosen, f"gold train split of extraction-gold-std-{dt.date.today()}"
                               f"{'-' + args.tag if args.tag else ''}.json")
        from atelier.enrich.hybrid import load_sources

        sources = load_sources()
        report["hybrid_after"] = {f: sources.source(f).method for f in LACKING}
    tag = f"-{args.tag}" if args.tag else ""
    out = ROOT / "benchmarks" / "results" / f"extraction-gold-std-{dt.date.today()}{tag}.json"
    out.write_text(json.dumps(report, indent=2))
    for f in LACKING:
        row = table[f]
        print(f"{f:24s} chosen {chosen[f]['method']:20s}",
              " ".join(f"{m}={res['pooled/train']['acc']}/{res['pooled/test']['acc']}" for m, res in row.items()))
    print("written:", out)


def write_sources_sections(chosen: dict[str, dict[str, Any]], where: str) -> None:
    """Replace (or add) the ``[fields.<f>]`` sections of ``chosen`` in field_sources.toml; keep every other line."""
    import re

    text = SOURCES_FILE.read_text()
    for name, row in chosen.items():
        key = f'"{name}"' if "." in name else name  # a dotted field name is one TOML key
        lines = [f"[fields.{key}]",
                 f'method = "{row["method"]}"  # {where}: train acc {row["acc"]:.3f}; best baseline '
                 f'{row["baseline"]} {row["baseline_acc"]:.3f}'
                 + (f'; best supervised {row["best_supervised"]} {row["best_supervised_acc"]:.3f}'
                    if "best_supervised" in row else "")
                 + (f'; best LLM {row["best_llm"]} {row["best_llm_acc"]:.3f}' if "best_llm" in row else "")]
        from atelier.enrich.hybrid import LLM_METHODS

        if row["method"] in LLM_METHODS:
            lines.append(f'baseline = "{row["baseline"]}"  # used where the LLM backend cannot run')
        if row.get("fallback"):
            lines.append(f'fallback = "{row["fallback"]}"')
        section = "\n".join(lines) + "\n"
        pattern = re.compile(rf"^(?:#[^\n]*\n)*\[fields\.{re.escape(key)}\]\n(?:(?!\[)[^\n]*\n)*", re.MULTILINE)
        if pattern.search(text):
            text = pattern.sub(lambda _m, s=section: s + "\n", text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + section
    SOURCES_FILE.write_text(re.sub(r"\n{3,}", "\n\n", text))


METHOD_NAMES = {
    "embedded": "generation (grammar)", "loglik": "log-likelihood", "loglik_cal": "log-likelihood, calibrated",
    "loglik_lora": "log-likelihood + LoRA", "loglik_lora_gpu": "log-likelihood + LoRA (GPU picks)",
    "tfidf_lr": "TF-IDF + LR (supervised)", "minilm_lr": "MiniLM + LR (supervised)",
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


def merge_methods(datasets: list[dict[str, Any]], earlier: dict[str, Any]) -> list[str]:
    """Add the methods of an earlier report of the same sample (same items and halves) that ``datasets`` lacks.

    Lets ``--write-sources`` choose among every method measured on the tuning half without rerunning
    the slow ones. Returns the "dataset/method" names added; refuses a report of a different sample.
    """
    added = []
    old = {d["dataset"]: d for d in earlier["datasets"]}
    for ds in datasets:
        prev = old.get(ds["dataset"])
        if prev is None:
            continue
        if prev["halves"] != ds["halves"]:
            raise SystemExit(f"--also: {ds['dataset']}: the earlier report is of a different sample or split")
        for f, row in ds["fields"].items():
            for m, res in prev["fields"].get(f, {}).get("methods", {}).items():
                if m not in row["methods"]:
                    row["methods"][m] = res
                    added.append(f"{ds['dataset']}/{m}")
    return sorted(set(added))


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run each dataset, write the JSON report, print the table."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gold"]:
        gold_main(argv[1:])
        return
    if argv[:1] == ["agreement"]:
        agreement_main(argv[1:])
        return
    if argv[:1] == ["speed"]:
        speed_main(argv[1:])
        return
    if argv[:1] == ["gold-re"]:
        gold_re_main(argv[1:])
        return
    if argv[:1] == ["gold-std"]:
        gold_std_main(argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100, help="products per dataset (fixed random sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-seed", type=int, default=1, help="seed of the tuning/test split of the sample")
    ap.add_argument("--backends", nargs="*", default=["embedded"],
                    help="generating backends run through the enrichment path (cached)")
    ap.add_argument("--no-loglik", action="store_true", help="skip the log-likelihood scorer")
    ap.add_argument("--lora", action="store_true", help="also score with the LoRA adapter (embedded-ll-lora)")
    ap.add_argument("--lora-n", type=int, help="CPU LoRA on the first N products of each half only (all methods "
                    "are then also scored on those: parts tune_lora / test_lora)")
    ap.add_argument("--lora-picks", type=Path, help="bench_lora_gpu.py run report: its GPU picks join as "
                    "loglik_lora_gpu")
    ap.add_argument("--supervised", action="store_true", help="add the supervised baselines (tfidf_lr, minilm_lr) "
                    "trained on the LoRA's training pool")
    ap.add_argument("--write-supervised", type=Path, help="with --supervised: write the tfidf_lr models as the "
                    "tfidf-lr backend's files (data/adapters/tfidf-lr-std) and check it answers the same")
    ap.add_argument("--datasets", nargs="+", default=["hm", "myntra"], choices=sorted(FIELDS))
    ap.add_argument("--write-sources", action="store_true",
                    help=f"write the per-field choice (tuning half) to {SOURCES_FILE.name}")
    ap.add_argument("--tag", default="heldout", help="suffix for the result file name")
    ap.add_argument("--also", type=Path, help="earlier report of the same sample whose other methods join the "
                    "tables and the --write-sources choice (e.g. the LLM variants, not rerun)")
    ap.add_argument("--from-report", type=Path, help="run nothing: reuse this report (with --also / --write-sources)")
    args = ap.parse_args(argv)
    settings = Settings()
    commit = git_commit()  # at the start: the code that ran, not what was committed meanwhile
    cache_file = settings.run_dir / "enrich" / "bench-cache.jsonl"
    if args.from_report:
        report = json.loads(args.from_report.read_text())
        datasets = report["datasets"]
    else:
        supervised, pool_info = None, None
        if args.supervised:
            rows = pool_rows(settings)
            start = time.perf_counter()
            supervised = fit_supervised(rows, sorted({f for fs in FIELDS.values() for f in fs}), settings)
            pool_info = {"rows": len(rows), "fit_seconds": round(time.perf_counter() - start, 1),
                         "pools": {ds: training_pool(settings, ds)[1] for ds in FIELDS},
                         "fits": supervised_summary(supervised)}
            if args.write_supervised:
                pool_info["shipped"] = write_supervised(args.write_supervised, supervised, rows, settings)
        datasets = [run_dataset(settings, ds, args.n, args.seed, args.split_seed, args.backends,
                                not args.no_loglik, cache_file, args.lora, supervised, args.lora_n, args.lora_picks)
                    for ds in args.datasets]
        report = {
            "command": " ".join([Path(sys.argv[0]).name, *argv]),
            "git_commit": commit, "machine": machine(), "load_average": os.getloadavg(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "prompt_version": PROMPT_VERSION,
            "training_pool": pool_info, "datasets": datasets,
        }
    if args.also:
        report["merged_from"] = {"report": str(args.also), "methods": merge_methods(
            datasets, json.loads(args.also.read_text()))}
    report["selection"] = select(datasets)
    name = f"extraction-{dt.date.today()}{'-' + args.tag if args.tag else ''}.json"
    out = args.from_report or ROOT / "benchmarks" / "results" / name
    name = out.name
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
