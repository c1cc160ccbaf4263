"""The latest evaluation report of a dataset, shaped for the page, and the report's plots (read-only).

``atelier evaluate`` and ``atelier run`` write ``<run_dir>/reports/<dataset>.json`` with PNG plots beside it
(``atelier.evaluate.write_report``). This router reads that file and answers one table per cohort (MAP@12,
Recall@100, cold-item recall per model, ``rules`` and ``popularity`` marked as the baselines and ``atelier`` as
the served chain) and the split in one sentence. Plots are looked up by name in a listing of the reports
folder, never by a path built from the request, so nothing outside that folder can be read. Serving never
imports the harness: the report's keys are read here, defensively.
"""

from __future__ import annotations

import json
import math
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import FileResponse

from atelier.config import Settings
from atelier.serve.deps import ServiceDep
from atelier.serve.schemas import (
    CohortName,
    CohortRow,
    CohortTable,
    ErrorOut,
    EvaluationView,
    ReportPlot,
    Role,
)
from atelier.serve.service import ServiceError

router = APIRouter(prefix="/evaluation", tags=["evaluation"])
DATASET_PATTERN = r"^[a-z0-9][a-z0-9_\-]{0,39}$"  # what `atelier ingest` names datasets: a file-name-safe word
PLOT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,120}\.png$"
BASELINES = ("rules", "popularity")  # the strongest simple baseline, and the floor every stage must clear
SERVED = "atelier"  # the served chain's row (atelier.pipeline.suites.model_suite)
# (page key, report key, title, who is in it): atelier.evaluate's cohorts
COHORTS: tuple[tuple[CohortName, str, str, str], ...] = (
    ("all", "all", "All test users", "every user who bought in the test days"),
    ("history", "with_history", "Shoppers with history", "users who bought in the training days"),
    ("new", "without_history", "New shoppers", "users with no purchase before the cut"),
    ("cart", "cart", "Carts", "new shoppers with two or more items on their first test day, asked with the first "
                              "as their cart and scored on the rest"),
)
Responses = dict[int | str, dict[str, Any]]
NOT_FOUND: Responses = {404: {"model": ErrorOut, "description": "unknown dataset, or no report (or plot) for it yet"}}
UNREADABLE: Responses = {500: {"model": ErrorOut, "description": "the report file is not an evaluation report"}}


def report_file(settings: Settings, dataset: str) -> FilePath:
    """Where the harness writes a dataset's report."""
    return settings.paths.evaluation_report(dataset)


def report_plots(settings: Settings, prefix: str = "") -> dict[str, FilePath]:
    """The PNG files directly in the reports folder (named ``prefix``...), by name; links are left out, so a
    plot cannot point outside the folder."""
    folder = settings.paths.reports
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.glob(f"{prefix}*.png")) if p.is_file() and not p.is_symlink()}


def known_datasets(settings: Settings, served: str) -> list[str]:
    """The served dataset and every dataset ingested in the run folder."""
    data = settings.paths.data
    ingested = sorted(p.name for p in data.iterdir() if (p / "manifest.json").is_file()) if data.is_dir() else []
    return list(dict.fromkeys([served, *ingested]))


def read_report(path: FilePath, dataset: str) -> dict[str, Any]:
    """The report's JSON, or a ServiceError that says what is wrong and which command writes it."""
    again = f"`atelier evaluate -d {dataset}` (or `atelier run`) writes it again"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ServiceError(404, f"no evaluation report for {dataset} yet: `atelier evaluate -d {dataset}` "
                                f"(or `atelier run`) writes one to {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ServiceError(500, f"the evaluation report {path} cannot be read ({exc}); {again}") from None
    if not (isinstance(report, dict) and isinstance(report.get("models"), dict)
            and isinstance(report.get("split"), dict)):
        raise ServiceError(500, f"{path} is not an evaluation report (no models or split); {again}")
    return report


def number(value: object) -> float | None:
    """A finite metric, or None (missing, or NaN where nothing could be scored)."""
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def role(model: str) -> Role:
    """How the page marks a model's row."""
    return "served" if model == SERVED else "baseline" if model in BASELINES else "other"


def cohort_rows(models: dict[str, Any], key: str) -> list[CohortRow]:
    """Every model's row in one cohort, in report order (a model without the cohort is left out)."""
    rows = []
    for name, result in models.items():
        scores = (result.get("cohorts") or {}).get(key) if isinstance(result, dict) else None
        if not isinstance(scores, dict) or "map@12" not in scores:
            continue
        # the all cohort's cold-item recall is the model's; the cart cohort carries its own
        cold = (result.get("cold_items") if key == "all" else scores.get("cold_items") if key == "cart" else None) or {}
        rows.append(CohortRow(model=name, role=role(name), map_at_12=number(scores.get("map@12")),
                              recall_at_100=number(scores.get("recall@100")),
                              cold_recall_at_100=number(cold.get("recall@100"))))
    return rows


def days(span: object) -> str:
    """``2020-09-16 to 2020-09-18`` (one day: just the day)."""
    if not isinstance(span, list) or not span:
        return "unknown days"
    return str(span[0]) if span[0] == span[-1] else f"{span[0]} to {span[-1]}"


def count(value: object) -> str:
    """A count with thousands separators, or a dash."""
    return f"{int(value):,}" if isinstance(value, int | float) and math.isfinite(value) else "–"


def cohort_users(split: dict[str, Any], key: CohortName) -> int | None:
    """How many users a cohort holds, from the split's counts."""
    scored, history = split.get("scored_users"), split.get("users_with_history")
    value = {"all": scored, "history": history, "cart": split.get("cart_users"),
             "new": scored - history if isinstance(scored, int) and isinstance(history, int) else None}[key]
    return int(value) if isinstance(value, int | float) and math.isfinite(value) else None


def split_sentence(split: dict[str, Any], validation: bool) -> str:
    """The split in one sentence: which kind, the days, how many users each cohort holds."""
    kind = ("Validation split (its days were also used to tune settings; not a held-out test)" if validation
            else "Test split")
    return (f"{kind}, {split.get('source', 'unknown split')}: trained on {days(split.get('train_days'))} "
            f"({count(split.get('train_interactions'))} interactions), tested on {days(split.get('test_days'))} "
            f"({count(split.get('test_interactions'))} interactions); {count(cohort_users(split, 'all'))} users "
            f"scored: {count(cohort_users(split, 'history'))} with history, {count(cohort_users(split, 'new'))} new, "
            f"{count(cohort_users(split, 'cart'))} with a cart; "
            f"{count(split.get('cold_test_items'))} cold test items.")


def stale_notes(settings: Settings, dataset: str, path: FilePath) -> list[str]:
    """Models saved after the report: what it scored is no longer what is served."""
    paths = settings.paths
    written = path.stat().st_mtime
    changed = [p.name for p in (paths.item_tower(dataset), paths.user_tower(dataset), paths.ranker(dataset))
               if p.is_file() and p.stat().st_mtime > written]
    return [f"saved after this report: {', '.join(changed)}; `atelier evaluate -d {dataset}` scores what is served "
            f"now"] if changed else []


@router.get("", response_model=EvaluationView, responses={**NOT_FOUND, **UNREADABLE})
def evaluation(
    service: ServiceDep,
    dataset: Annotated[str | None, Query(pattern=DATASET_PATTERN, description="default: the served dataset")] = None,
) -> EvaluationView:
    """The latest evaluation report of a dataset (default: the served one): MAP@12, Recall@100 and cold-item
    recall per model in each cohort (all, history, new, cart), the split in a sentence, the report's plots."""
    settings = service.settings
    dataset = dataset or service.dataset
    known = known_datasets(settings, service.dataset)
    if dataset not in known:
        raise ServiceError(404, f"unknown dataset {dataset!r}: this run folder has {', '.join(known)}")
    path = report_file(settings, dataset)
    report = read_report(path, dataset)
    split, models = report["split"], report["models"]
    validation = bool(split.get("validation", not str(split.get("source", "")).startswith("test file")))
    cohorts = [CohortTable(cohort=page, title=title, about=about, users=cohort_users(split, page),
                           rows=cohort_rows(models, key)) for page, key, title, about in COHORTS]
    notes = stale_notes(settings, dataset, path)
    missing = [c.title for c in cohorts if not c.rows]
    if missing:
        notes.append(f"this report has no scores for: {', '.join(missing)} (an older report, or no such users)")
    if SERVED not in models:
        notes.append(f"no `{SERVED}` row: the run folder had no trained chain when this report was written")
    plots = [ReportPlot(name=name, url=f"{router.prefix}/plots/{name}")
             for name in report_plots(settings, f"{dataset}_")]
    created, commit = report.get("created"), report.get("git_commit")
    return EvaluationView(
        dataset=dataset, report=str(path), created=str(created) if created else None,
        git_commit=str(commit) if commit else None,
        validation=validation, split=split_sentence(split, validation),
        baselines=[b for b in BASELINES if b in models], served=SERVED if SERVED in models else None,
        cohorts=[c for c in cohorts if c.rows], plots=plots, notes=notes)


@router.get("/plots/{name}", response_class=FileResponse, responses={
    200: {"content": {"image/png": {}}, "description": "the plot"}, **NOT_FOUND})
def plot(service: ServiceDep, name: Annotated[str, Path(pattern=PLOT_PATTERN)]) -> FileResponse:
    """A PNG plot of the reports folder, by its name in ``GET /evaluation``'s ``plots``."""
    found = report_plots(service.settings).get(name)
    if found is None:
        raise ServiceError(404, f"no plot {name!r} in the reports folder ({service.settings.paths.reports})")
    return FileResponse(found, media_type="image/png")
