"""The evaluation harness: every recommender fitted on the same window and scored the same way.

Definitions (DESIGN.md section 8):
- Split (``atelier.datasets``): train on interactions before the cut day, test on the cut day and after.
  H&M default: train 2020-09-16..18, test 09-19..20; RentTheRunway: train before 2017-08-01, test after.
  With a test file (``--test-file``, the dataset's own format), training uses every ingested
  interaction before the test file's first day. Models see the catalogue, log and users *as of the
  cut* (``datasets.train_data``). The default split's numbers are validation numbers: choices were
  tuned on them.
- Test users: every user with at least one test interaction. Their query holds their training
  history (oldest first), their body profile and, for RentTheRunway, the occasion of their
  first test rental as context (the shopper states it when renting).
- Metrics (``atelier.metrics``): MAP@12 (Kaggle), Recall@12/100, NDCG@12, HitRate@12, coverage@12;
  cohorts: all users, users with training history, users without, and ``cart``: test users with no
  history who bought two or more distinct items on their first test day, asked with the first of them
  as their cart (and nothing else) and scored on the rest (``datasets.cart_queries``; the cart's
  items are removed from every model's list, as the API does). Cold items: recall of test (user,
  item) pairs whose item had no training interaction.
- Candidate sources (``atelier.sources``): what each finds on its own, recall@50/100/200 per cohort; the
  ranking chain's own sources the same way (``chain_sources``), with the recall of their union.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd

from atelier.atomic import atomic_write, write_json
from atelier.datasets import (
    EvaluationError,
    Split,
    build_queries,
    cart_queries,
    file_split,
    rules_for,
    time_split,
    train_data,
)
from atelier.ingest import IngestError, load_manifest, load_tables
from atelier.metrics import cold_item_recall, coverage, score_users, summarise
from atelier.paths import report_name
from atelier.recommend.sources import CandidateSource, rule_sources
from atelier.recommender import Query, Recommender, TrainData

KS = (12, 100)
SOURCE_KS = (50, 100, 200)  # per-source recall cut-offs


def score(
    predicted: dict[str, list[str]], actual: dict[str, set[str]], queries: Sequence[Query],
    cold_items: set[str], catalogue_size: int,
) -> dict[str, object]:
    """Metrics per cohort, cold-item recall and coverage for one recommender's predictions."""
    per_user = score_users(actual, predicted, ks=KS)
    has_history = pd.Series({q.user_id: bool(q.history) for q in queries})
    cohorts = {
        "all": summarise(per_user),
        "with_history": summarise(per_user[has_history.reindex(per_user.index).fillna(False).to_numpy(bool)]),
        "without_history": summarise(per_user[~has_history.reindex(per_user.index).fillna(False).to_numpy(bool)]),
    }
    cold = {f"recall@{k}": cold_item_recall(actual, predicted, cold_items, k) for k in KS}
    n_pairs = sum(len(items & cold_items) for items in actual.values())
    return {
        "cohorts": cohorts,
        "cold_items": {**cold, "pairs": n_pairs},
        "coverage@12": coverage(predicted, catalogue_size, k=12),
    }


def score_cart(predicted: dict[str, list[str]], actual: dict[str, set[str]], cold_items: set[str]) -> dict[str, object]:
    """The cart cohort's metrics (the other cohorts' keys) plus recall@100 of its cold truth items."""
    if not actual:
        return {"users": 0.0}
    summary: dict[str, object] = dict(summarise(score_users(actual, predicted, ks=KS)))
    summary["cold_items"] = {"recall@100": cold_item_recall(actual, predicted, cold_items, 100),
                             "pairs": sum(len(items & cold_items) for items in actual.values())}
    return summary


def without_cart(queries: Sequence[Query], ranked: Sequence[list[str]], k: int) -> dict[str, list[str]]:
    """Each query's list with its cart's items removed (the API never recommends what is in the cart)."""
    return {q.user_id: [i for i in r if i not in q.cart][:k] for q, r in zip(queries, ranked, strict=True)}


def source_recall(
    sources: Sequence[CandidateSource], data: TrainData, cohorts: dict[str, tuple[list[Query], dict[str, set[str]]]],
) -> dict[str, dict[str, dict[str, float]]]:
    """Recall@50/100/200 of each candidate source on its own, per cohort (``users`` = users scored)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    k = max(SOURCE_KS)
    for source in sources:
        source.fit(data)
        out[source.name] = {}
        for cohort, (queries, actual) in cohorts.items():
            if not queries:
                continue
            ranked = [[item for item, _ in c] for c in source.candidates(queries, k + 1)]
            predicted = without_cart(queries, ranked, k)
            per_user = score_users({q.user_id: actual[q.user_id] for q in queries}, predicted, ks=SOURCE_KS)
            out[source.name][cohort] = {c: float(per_user[c].mean()) for c in (f"recall@{k}" for k in SOURCE_KS)}
            out[source.name][cohort]["users"] = float(len(per_user))
    return out


@runtime_checkable
class CandidateLister(Protocol):
    """A fitted recommender that can show its candidate sources' lists (the ranking chain)."""

    def candidate_lists(self, queries: Sequence[Query]) -> dict[str, list[list[str]]]:
        """Per source (and ``union``: all candidates), each query's candidate items in the source's order."""
        ...


def chain_source_recall(
    rec: CandidateLister, cohorts: dict[str, tuple[list[Query], dict[str, set[str]], Sequence[bool]]],
) -> dict[str, dict[str, dict[str, float]]]:
    """Recall@50/100/200 of each of a chain's own sources per cohort, as ``source_recall`` scores the rule
    sources; the ``union`` row holds the recall of all candidates (``recall@all``) and their mean count.

    A cohort is the queries of a list the chain was just asked for (its candidates are remembered, so they
    are not built again) where its mask is true."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    k = max(SOURCE_KS)
    lists_of: dict[int, dict[str, list[list[str]]]] = {}  # per query list: every source's lists, asked once
    for cohort, (queries, actual, mask) in cohorts.items():
        rows = [i for i, keep in enumerate(mask) if keep]
        if not rows:
            continue
        if id(queries) not in lists_of:
            lists_of[id(queries)] = rec.candidate_lists(queries)
        chosen = [queries[i] for i in rows]
        truth = {q.user_id: actual[q.user_id] for q in chosen}
        for name, every in lists_of[id(queries)].items():
            lists = [every[i] for i in rows]
            if name == "union":  # every candidate, however many: what the ranker can reach at best
                union = without_cart(chosen, lists, max(map(len, lists), default=0))
                found = [len(truth[u] & set(union[u])) / len(truth[u]) for u in truth if truth[u]]
                row = {"recall@all": float(np.mean(found)) if found else 0.0,
                       "candidates": float(np.mean([len(v) for v in union.values()])), "users": float(len(found))}
            else:
                per_user = score_users(truth, without_cart(chosen, lists, k), ks=SOURCE_KS)
                row = {**{f"recall@{c}": float(per_user[f"recall@{c}"].mean()) for c in SOURCE_KS},
                       "users": float(len(per_user))}
            out.setdefault(name, {})[cohort] = row
    return out


def git_commit() -> str:
    """The checkout's commit (with '+dirty' when it has uncommitted changes), or 'unknown'."""
    try:
        here = Path(__file__).parent
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """A short description of this machine for reports."""
    return (f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


ProgressFn = Callable[[str], None]


def evaluate(
    dataset: str,
    data_dir: Path,
    recommenders: Sequence[Recommender],
    cache_dir: Path,
    *,
    cut: str | None = None,
    test_file: Path | None = None,
    max_users: int | None = None,
    on_model: ProgressFn | None = None,
) -> dict[str, object]:
    """Fit and score each recommender on one split of an ingested dataset; returns the report dict."""
    items, interactions, users = load_tables(data_dir)
    split = (file_split(dataset, interactions, items, test_file) if test_file is not None
             else time_split(dataset, interactions, cut))
    queries, actual = build_queries(split, users)
    carts, cart_actual = cart_queries(split)
    if max_users is not None:
        queries, actual = _sample(queries, actual, max_users)
        carts, cart_actual = _sample(carts, cart_actual, max_users)
    cold_items = set(map(str, split.test["item_id"])) - set(map(str, split.train["item_id"]))
    data = train_data(split, items, users, cache_dir)
    manifest = load_manifest(data_dir) or {}
    window = rules_for(dataset).popularity_days
    with_history = [q for q in queries if q.history]
    without = [q for q in queries if not q.history]
    report: dict[str, object] = {
        "dataset": dataset,
        "split": {**split.describe(), "scored_users": len(queries),
                  "users_with_history": len(with_history), "cart_users": len(carts),
                  "cold_test_items": len(cold_items), "validation": test_file is None},
        "data": {"sources": manifest.get("sources", []), "counts": manifest.get("counts", {})},
        "git_commit": git_commit(),
        "machine": machine(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "sources": source_recall(rule_sources(window), data, {
            "with_history": (with_history, actual), "without_history": (without, actual),
            "cart": (carts, cart_actual)}),
        "models": {},
    }
    for rec in recommenders:
        if on_model is not None:
            on_model(rec.name)
        t0 = time.perf_counter()
        rec.fit(data)
        t1 = time.perf_counter()
        ranked = rec.recommend(queries, max(KS))
        t2 = time.perf_counter()
        predicted = {q.user_id: r for q, r in zip(queries, ranked, strict=True)}
        result = score(predicted, actual, queries, cold_items, len(items))
        cart_ranked = rec.recommend(carts, max(KS) + 1) if carts else []
        t3 = time.perf_counter()
        result["cohorts"]["cart"] = score_cart(without_cart(carts, cart_ranked, max(KS)),  # type: ignore[index]
                                               cart_actual, cold_items)
        result.update(fit_seconds=round(t1 - t0, 2), recommend_seconds=round(t2 - t1 + t3 - t2, 2))
        report["models"][rec.name] = result  # type: ignore[index]
        if isinstance(rec, CandidateLister) and "chain_sources" not in report:
            # every chain model of a window shares its candidates (just built for these queries): once is enough
            report["chain_sources"] = chain_source_recall(rec, {
                "with_history": (queries, actual, [bool(q.history) for q in queries]),
                "without_history": (queries, actual, [not q.history for q in queries]),
                "cart": (carts, cart_actual, [True] * len(carts))})
    return report


def _sample(queries: list[Query], actual: dict[str, set[str]], n: int) -> tuple[list[Query], dict[str, set[str]]]:
    """A seeded sample of ``n`` queries (all of them when there are fewer)."""
    if len(queries) <= n:
        return queries, actual
    keep = sorted(np.random.default_rng(0).choice(len(queries), size=n, replace=False))
    chosen = [queries[i] for i in keep]
    return chosen, {q.user_id: actual[q.user_id] for q in chosen}


def write_report(report: dict[str, object], out_dir: Path) -> Path:
    """Write ``<dataset>.json`` atomically plus PNG plots; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / report_name(str(report["dataset"]))
    write_json(path, report, indent=2, default=float)
    plot_report(report, out_dir)
    return path


def plot_report(report: dict[str, object], out_dir: Path) -> list[Path]:
    """Bar charts: each headline metric by model, and MAP@12 by cohort."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models: dict[str, dict[str, object]] = report["models"]  # type: ignore[assignment]
    names = list(models)
    metrics = ["map@12", "recall@12", "recall@100", "ndcg@12"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 0.45 * len(names) + 1.8))
    for ax, metric in zip(axes, metrics, strict=True):
        values = [models[n]["cohorts"]["all"].get(metric, 0.0) for n in names]  # type: ignore[index]
        ax.barh(names, values, color="#4c72b0")
        ax.set_title(metric)
        ax.invert_yaxis()
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.4f}", va="center", fontsize=8)
        ax.margins(x=0.35)
    fig.suptitle(f"{report['dataset']}: all test users")
    fig.tight_layout()
    paths = [out_dir / f"{report['dataset']}_metrics.png"]
    with atomic_write(paths[0]) as fh:
        fig.savefig(fh, dpi=110, format="png")
    plt.close(fig)

    cohorts = ["all", "with_history", "without_history", "cart"]
    fig, (ax, ax_cold) = plt.subplots(1, 2, figsize=(12, 0.5 * len(names) + 1.8), width_ratios=[2, 1], sharey=True)
    height = 0.8 / len(cohorts)
    for ci, cohort in enumerate(cohorts):
        values = [models[n]["cohorts"].get(cohort, {}).get("map@12", 0.0) for n in names]  # type: ignore[attr-defined]
        ax.barh(np.arange(len(names)) + ci * height, values, height=height, label=cohort)
    ax.set_yticks(np.arange(len(names)) + height, names)
    ax.invert_yaxis()
    ax.set_xlabel("MAP@12")
    ax.set_title(f"{report['dataset']}: MAP@12 by cohort")
    ax.legend()
    cold = [float(np.nan_to_num(models[n]["cold_items"]["recall@100"])) for n in names]  # type: ignore[index]
    ax_cold.barh(np.arange(len(names)) + height, cold, height=0.6, color="#8172b2")
    ax_cold.set_xlabel("Recall@100 on cold items")
    ax_cold.set_title("cold items (no training interaction)")
    fig.tight_layout()
    paths.append(out_dir / f"{report['dataset']}_cohorts.png")
    with atomic_write(paths[1]) as fh:
        fig.savefig(fh, dpi=110, format="png")
    plt.close(fig)
    return paths




__all__ = ["EvaluationError", "IngestError", "Split", "evaluate", "write_report"]
