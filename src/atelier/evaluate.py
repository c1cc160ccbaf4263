"""The evaluation harness: time splits, cohorts, every recommender scored the same way, reports.

Definitions (DESIGN.md section 8):
- Split: train on interactions before the cut day, test on the cut day and after. H&M default:
  train 2020-09-16..18, test 09-19..20; RentTheRunway: train before 2017-08-01, test after.
  With a test file (``--test-file``, the dataset's own format), training uses every ingested
  interaction before the test file's first day.
- Test users: every user with at least one test interaction. Their query holds their training
  history (oldest first), their body profile and, for RentTheRunway, the occasion of their
  first test rental as context (the shopper states it when renting).
- Metrics (``atelier.metrics``): MAP@12 (Kaggle), Recall@12/100, NDCG@12, HitRate@12, coverage@12;
  cohorts: all users, users with training history, users without; cold items: recall of test
  (user, item) pairs whose item had no training interaction.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atelier.atomic import atomic_write, write_json
from atelier.ingest import IngestError, load_manifest, load_tables, read_interactions_file
from atelier.metrics import cold_item_recall, coverage, score_users, summarise
from atelier.recommender import Query, Recommender, RepurchaseFirst, TrainData

DEFAULT_CUTS = {"hm": "2020-09-19", "rtr": "2017-08-01"}
POPULARITY_WINDOW_DAYS = {"hm": 3.0, "rtr": 90.0}  # H&M: the design's 3 days; RTR rentals are sparse
KS = (12, 100)
PROFILE_FIELDS = ("height_cm", "weight_kg", "age", "body_type")


class EvaluationError(ValueError):
    """The split or the data cannot be evaluated (empty test window, unknown dataset)."""


@dataclass
class Split:
    """A train/test split of one dataset's interactions."""

    dataset: str
    train: pd.DataFrame
    test: pd.DataFrame
    cut: pd.Timestamp
    source: str  # "default cut", "cut <day>" or "test file <path>"

    def describe(self) -> dict[str, object]:
        """Sizes and dates for the report."""
        return {
            "dataset": self.dataset, "source": self.source, "cut": str(self.cut.date()),
            "train_interactions": len(self.train), "test_interactions": len(self.test),
            "train_days": [str(self.train["ts"].min().date()), str(self.train["ts"].max().date())]
            if len(self.train) else [],
            "test_days": [str(self.test["ts"].min().date()), str(self.test["ts"].max().date())],
            "test_users": int(self.test["user_id"].nunique()),
        }


def time_split(dataset: str, interactions: pd.DataFrame, cut: str | None = None) -> Split:
    """Train before ``cut`` (a YYYY-MM-DD day; the dataset default when None), test from it on."""
    if cut is None and dataset not in DEFAULT_CUTS:
        raise EvaluationError(f"no default cut for {dataset!r}; pass --cut YYYY-MM-DD")
    day = pd.Timestamp(cut or DEFAULT_CUTS[dataset])
    train = interactions[interactions["ts"] < day]
    test = interactions[interactions["ts"] >= day]
    if test.empty or train.empty:
        raise EvaluationError(
            f"cut {day.date()} leaves {len(train)} training and {len(test)} test interactions "
            f"(data spans {interactions['ts'].min().date()}..{interactions['ts'].max().date()})"
        )
    return Split(dataset, train, test, day, "default cut" if cut is None else f"cut {day.date()}")


def file_split(dataset: str, interactions: pd.DataFrame, items: pd.DataFrame, test_file: Path) -> Split:
    """Test on a file in the dataset's own format; train on everything before its first day."""
    test, rejects = read_interactions_file(dataset, test_file, items)
    if test.empty:
        raise EvaluationError(f"{test_file}: no usable test interactions ({len(rejects)} rejected)")
    day = test["ts"].min().normalize()
    train = interactions[interactions["ts"] < day]
    if train.empty:
        raise EvaluationError(f"{test_file}: no ingested interaction precedes its first day {day.date()}")
    return Split(dataset, train, test, day, f"test file {test_file} ({len(rejects)} rows rejected)")


def build_queries(split: Split, users: pd.DataFrame) -> tuple[list[Query], dict[str, set[str]]]:
    """One query per test user (history, profile, context) and each user's actual test items."""
    history = (split.train.sort_values("ts", kind="stable")
               .drop_duplicates(["user_id", "item_id"], keep="last")
               .groupby("user_id")["item_id"].agg(tuple))
    profile_cols = [c for c in PROFILE_FIELDS if c in users.columns]
    profiles = users.set_index("user_id")[profile_cols].to_dict("index") if profile_cols else {}
    test = split.test.sort_values("ts", kind="stable")
    contexts = test.groupby("user_id")["occasion"].first() if "occasion" in test else pd.Series(dtype=str)
    actual = {str(u): set(map(str, items)) for u, items in test.groupby("user_id")["item_id"]}
    queries = []
    for user in actual:
        prof = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in profiles.get(user, {}).items()}
        ctx = contexts.get(user)
        queries.append(Query(user_id=user, history=tuple(map(str, history.get(user, ()))), profile=prof,
                             context=None if ctx is None or pd.isna(ctx) else str(ctx)))
    return queries, actual


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
    if max_users is not None and len(queries) > max_users:
        rng = np.random.default_rng(0)
        keep = sorted(rng.choice(len(queries), size=max_users, replace=False))
        queries = [queries[i] for i in keep]
        actual = {q.user_id: actual[q.user_id] for q in queries}
    cold_items = set(map(str, split.test["item_id"])) - set(map(str, split.train["item_id"]))
    data = TrainData(dataset, items, split.train.reset_index(drop=True), users, cache_dir)
    manifest = load_manifest(data_dir) or {}
    report: dict[str, object] = {
        "dataset": dataset,
        "split": {**split.describe(), "scored_users": len(queries),
                  "users_with_history": sum(bool(q.history) for q in queries),
                  "cold_test_items": len(cold_items)},
        "data": {"sources": manifest.get("sources", []), "counts": manifest.get("counts", {})},
        "git_commit": git_commit(),
        "machine": machine(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
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
        result.update(fit_seconds=round(t1 - t0, 2), recommend_seconds=round(t2 - t1, 2))
        report["models"][rec.name] = result  # type: ignore[index]
    return report


def write_report(report: dict[str, object], out_dir: Path) -> Path:
    """Write ``<dataset>.json`` atomically plus PNG plots; returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{report['dataset']}.json"
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

    cohorts = ["all", "with_history", "without_history"]
    fig, (ax, ax_cold) = plt.subplots(1, 2, figsize=(12, 0.5 * len(names) + 1.8), width_ratios=[2, 1], sharey=True)
    height = 0.8 / len(cohorts)
    for ci, cohort in enumerate(cohorts):
        values = [models[n]["cohorts"][cohort].get("map@12", 0.0) for n in names]  # type: ignore[index]
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


def model_suite(settings: Any, dataset: str, names: Sequence[str] | None = None,
                ablations: bool = False) -> list[Recommender]:
    """Baselines plus every trained stage of a dataset found in the run folder, in report order
    (with ``ablations``, the two-tower retriever once more per removed input)."""
    suite = baseline_suite(dataset)
    from atelier.content import ItemTowerRecommender, checkpoint_path, file_id
    from atelier.two_tower import two_tower_suite, user_checkpoint_path

    window = POPULARITY_WINDOW_DAYS.get(dataset, 7.0)
    checkpoint = checkpoint_path(settings, dataset)
    if checkpoint.is_file():
        encoded = settings.run_dir / "vectors" / dataset / f"{file_id(checkpoint)}.npz"
        suite.append(ItemTowerRecommender(checkpoint, window_days=window, vectors_file=encoded))
    if user_checkpoint_path(settings, dataset).is_file():
        # The harness refits on its own training window; `atelier train user` left the fit in the cache.
        suite += two_tower_suite(settings, dataset, ablations=ablations)
    from atelier.rerank import rerank_suite

    suite += rerank_suite(settings, dataset)  # only once `atelier train ranker` has saved one
    return _select(suite, names)


def _select(suite: list[Recommender], names: Sequence[str] | None) -> list[Recommender]:
    if names is None:
        return suite
    known = {r.name: r for r in suite}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise EvaluationError(f"unknown model(s) {unknown}; choose from {list(known)}")
    chosen = [known[n] for n in names]
    for rec in chosen:
        # A shared wrapper whose base is not in the run must fit its base itself.
        if isinstance(rec, RepurchaseFirst) and rec.base not in chosen:
            rec.shared = False
    return chosen


def baseline_suite(dataset: str, names: Sequence[str] | None = None) -> list[Recommender]:
    """The baselines of a dataset, in report order (all of them when ``names`` is None)."""
    from atelier.baselines import (
        PopularityRecommender,
        RandomRecommender,
        RepurchaseRecommender,
        SegmentPopularityRecommender,
        TextKNNRecommender,
    )

    window = POPULARITY_WINDOW_DAYS.get(dataset, 7.0)
    suite: list[Recommender] = [
        RandomRecommender(),
        PopularityRecommender(window),
        RepurchaseRecommender(window),
        TextKNNRecommender(window),
    ]
    if dataset == "rtr":
        suite += [SegmentPopularityRecommender("profile", window), SegmentPopularityRecommender("context", window)]
    try:
        from atelier.lightfm_peer import LightFMRecommender
    except ImportError:  # lightfm is optional: it needs a compiler to install
        pass
    else:
        lightfm = LightFMRecommender(window_days=window)
        suite += [lightfm, RepurchaseFirst(lightfm, shared=True)]
    return _select(suite, names)


__all__ = ["DEFAULT_CUTS", "EvaluationError", "IngestError", "Split", "baseline_suite", "build_queries",
           "evaluate", "file_split", "time_split", "write_report"]
