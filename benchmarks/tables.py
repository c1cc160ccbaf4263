"""Every result table of README.md and benchmarks/README.md, generated from the result files (issue #17).

A table lives between two marker lines, ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``; this
script replaces what is between them with the output of the builder registered for NAME in
``TABLES``: a Markdown table, then one line naming the result file(s) it read with the command, git
commit, machine and date recorded in them. Builders read the newest matching file under
``benchmarks/results/`` (newest by the date in the file name); a cited file that is missing is an
error naming it, and so is a marker whose NAME no builder knows. The builders of
``benchmarks.tables_extraction`` (attribute extraction) are merged in when that module exists.

Run from the repository root::

    .venv/bin/python -m benchmarks.tables           # rewrite the tables of both documents
    .venv/bin/python -m benchmarks.tables --check   # exit 1 with a diff if either document is stale
    .venv/bin/python -m benchmarks.tables --list    # the table names

``tests/test_docs.py`` runs ``--check`` in the default suite, so a README that no longer matches its
result files fails the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import json
import re
import statistics
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENTS = (ROOT / "README.md", ROOT / "benchmarks" / "README.md")

Builder = Callable[[], str]
DATE = r"\d{4}-\d{2}-\d{2}"
OPEN = re.compile(r"^<!-- table:(?P<name>[\w.-]+) -->$")
CLOSE = re.compile(r"^<!-- /table:(?P<name>[\w.-]+) -->$")
DASH = "–"  # a value the result file does not hold


class TableError(Exception):
    """A table cannot be generated: unknown name, bad markers, or a result file missing or malformed."""


class MissingResultError(TableError, FileNotFoundError):
    """A result file that a table cites is not there."""


# --------------------------------------------------------------------------- result files


@dataclass(frozen=True)
class Result:
    """One result file: where it is and what it holds."""

    path: Path
    data: Any

    @property
    def cited(self) -> str:
        """The path as the documents cite it."""
        return _shown(self.path)


def load(name: str) -> Result:
    """The result file ``benchmarks/results/<name>``; MissingResultError naming it when absent."""
    path = RESULTS / name
    if not path.is_file():
        raise MissingResultError(f"{_shown(path)}: result file not found")
    try:
        return Result(path, json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise TableError(f"{path}: not valid JSON ({exc})") from exc


def _shown(path: Path) -> str:
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def _dated(pattern: str) -> list[tuple[str, str, str]]:
    """(date, group, file name) of every result file whose name matches ``pattern`` (groups ``date``,
    optionally ``tag``)."""
    rx = re.compile(pattern)
    found = []
    for path in RESULTS.glob("*.json") if RESULTS.is_dir() else []:
        m = rx.fullmatch(path.name)
        if m:
            found.append((m.group("date"), m.groupdict().get("tag") or "", path.name))
    return found


def newest(prefix: str, suffix: str = "") -> Result:
    """The newest ``<prefix>-<YYYY-MM-DD><suffix>.json`` by the date in its name."""
    found = _dated(f"{re.escape(prefix)}-(?P<date>{DATE}){re.escape(suffix)}\\.json")
    if not found:
        raise MissingResultError(f"{_shown(RESULTS / f'{prefix}-<date>{suffix}.json')}: no result file")
    return load(max(found)[2])


def newest_per_tag(prefix: str) -> list[Result]:
    """For each ``<prefix>-<tag>-<YYYY-MM-DD>.json`` run kind (tag), its newest file; sorted by tag."""
    found = _dated(f"{re.escape(prefix)}-(?P<tag>.+)-(?P<date>{DATE})\\.json")
    if not found:
        raise MissingResultError(f"{_shown(RESULTS / f'{prefix}-<tag>-<date>.json')}: no result file")
    best: dict[str, tuple[str, str, str]] = {}
    for item in found:
        if item[1] not in best or item > best[item[1]]:
            best[item[1]] = item
    return [load(best[tag][2]) for tag in sorted(best)]


# --------------------------------------------------------------------------- the source note


def _commit(data: Mapping[str, Any]) -> str:
    commit = data.get("git_commit")
    if commit is None:
        return "commit not recorded"
    if isinstance(commit, Mapping):
        return ", ".join(f"{k} {_short(str(v))}" for k, v in commit.items())
    text = _short(str(commit))
    return text + ("+dirty" if data.get("git_dirty") and "dirty" not in text else "")


def _short(commit: str) -> str:
    return re.sub(r"\b([0-9a-f]{7})[0-9a-f]{33}\b", r"\1", commit)


def _machine(data: Mapping[str, Any]) -> str:
    machine = data.get("machine")
    if isinstance(machine, str):
        return machine
    if isinstance(machine, Mapping):
        cores = machine.get("cpu_count") or machine.get("cores") or machine.get("cpus")
        parts = [str(machine.get("cpu") or machine.get("processor") or ""), f"{cores} cores" if cores else ""]
        if machine.get("memory_gb"):
            parts.append(f"{machine['memory_gb']} GB")
        start = machine.get("loadavg_at_start") or machine.get("loadavg_before")
        end = machine.get("loadavg_at_end") or machine.get("loadavg_after") or machine.get("load_avg_at_end")
        if start and end:
            parts.append(f"load average {start[0]:.1f} → {end[0]:.1f}")
        elif end:
            parts.append(f"load average {end[0]:.1f} at the end")
        if machine.get("note"):
            parts.append(str(machine["note"]))
        return ", ".join(p for p in parts if p) or "machine not recorded"
    if data.get("device"):
        return f"{data.get('world_size', 1)} × {data['device']}"
    return "machine not recorded"


def _date(data: Mapping[str, Any], path: Path) -> str:
    stamp = str(data.get("date") or data.get("created") or "")
    m = re.search(DATE, stamp) or re.search(DATE, path.name)
    return m.group(0) if m else "date not recorded"


def _command(data: Mapping[str, Any]) -> str:
    command = " ".join(str(data.get("command") or "").split()).replace("`", "'")
    return f"`{command}`" if command else "command not recorded"


def provenance(result: Result, data: Mapping[str, Any] | None = None) -> str:
    """``file`` (command, commit, machine, date) as recorded in the file (or in ``data``, one run of it)."""
    d = result.data if data is None else data
    return f"`{result.cited}` ({_command(d)}, {_commit(d)}, {_machine(d)}, {_date(d, result.path)})"


def source_note(*results: Result, lead: str = "") -> str:
    """The one line under a table: what it shows (``lead``), then every file it read."""
    word = "Source" if len(results) == 1 else "Sources"
    lead = lead.strip()
    if lead and lead[-1] not in ".!?)":
        lead += "."
    return f"{lead + ' ' if lead else ''}{word}: " + "; ".join(provenance(r) for r in results) + "."


# --------------------------------------------------------------------------- Markdown


def num(value: Any, digits: int = 4) -> str:
    """A number with fixed decimals; ``–`` for a value the file does not hold."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return DASH
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def markdown(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def numeric_table(head: Sequence[str], labels: Sequence[Sequence[str]], values: Sequence[Sequence[Any]],
                  digits: int | Sequence[int] = 4, bold: bool = True) -> str:
    """Label columns then numeric columns; the best (largest) value of each numeric column in bold."""
    ndig = [digits] * len(values[0]) if isinstance(digits, int) and values else list(digits)  # type: ignore[arg-type]
    best: list[float | None] = []
    for j in range(len(ndig)):
        col = [v[j] for v in values if isinstance(v[j], int | float) and not isinstance(v[j], bool) and v[j] == v[j]]
        shown = {num(x, ndig[j]) for x in col}
        best.append(max(col) if bold and len(values) > 1 and len(shown) > 1 else None)
    rows = []
    for label, vals in zip(labels, values, strict=True):
        cells = []
        for j, v in enumerate(vals):
            text = num(v, ndig[j])
            if best[j] is not None and text != DASH and text == num(best[j], ndig[j]):
                text = f"**{text}**"
            cells.append(text)
        rows.append([*label, *cells])
    return markdown(head, rows)


def get(data: Any, *keys: str) -> Any:
    """``data[k1][k2]...``, or None where a key is missing (older file formats)."""
    for key in keys:
        if not isinstance(data, Mapping) or key not in data:
            return None
        data = data[key]
    return data


# --------------------------------------------------------------------------- evaluation reports

DATASET_NAMES = {"hm": "H&M", "rtr": "RentTheRunway", "myntra": "Myntra"}
COHORTS = {"all": "all", "with_history": "history", "without_history": "new", "cart": "cart"}

Column = tuple[str, tuple[str, ...]]  # header, path inside one model's entry
MAIN_COLUMNS: list[Column] = [
    (f"{metric} {label}", ("cohorts", cohort, key))
    for cohort, label in COHORTS.items() for metric, key in (("MAP@12", "map@12"), ("R@100", "recall@100"))
] + [("cold R@100", ("cold_items", "recall@100"))]
TWO_TOWER_COLUMNS: list[Column] = [
    ("MAP@12", ("cohorts", "all", "map@12")), ("R@12", ("cohorts", "all", "recall@12")),
    ("NDCG@12", ("cohorts", "all", "ndcg@12")), ("R@100", ("cohorts", "all", "recall@100")),
    ("MAP@12 history", ("cohorts", "with_history", "map@12")),
    ("R@100 history", ("cohorts", "with_history", "recall@100")),
    ("R@100 new", ("cohorts", "without_history", "recall@100")), ("cold R@100", ("cold_items", "recall@100")),
]
CONTENT_COLUMNS: list[Column] = [
    ("MAP@12", ("cohorts", "all", "map@12")), ("MAP@12 history", ("cohorts", "with_history", "map@12")),
    ("R@100", ("cohorts", "all", "recall@100")), ("R@100 history", ("cohorts", "with_history", "recall@100")),
    ("cold R@100", ("cold_items", "recall@100")),
]


def split_sentence(report: Mapping[str, Any]) -> str:
    """What the report scored: validation or test split, windows, users per cohort, cold items."""
    split = report.get("split") or {}
    validation = split.get("validation", split.get("source") == "default cut")
    kind = "validation split" if validation else "test split"
    train, test = split.get("train_days") or ["?", "?"], split.get("test_days") or ["?", "?"]
    carts = split.get("cart_users")
    dataset = split.get("dataset") or report.get("dataset", "?")
    return (f"{DATASET_NAMES.get(dataset, dataset)}, {kind} "
            f"({split.get('source', '?')}): train {train[0]}..{train[1]} ({num(split.get('train_interactions'), 0)} "
            f"interactions), test {test[0]}..{test[1]}; {num(split.get('scored_users'), 0)} users scored, "
            f"{num(split.get('users_with_history'), 0)} with history, "
            f"{num(carts, 0) if carts is not None else DASH} cart users, "
            f"{num(split.get('cold_test_items'), 0)} cold test items.")


def eval_table(result: Result, columns: Sequence[Column], models: Sequence[str] | None = None,
               lead: str = "") -> str:
    """One row per model of an evaluation report (every model it holds unless ``models`` is given)."""
    all_models: Mapping[str, Any] = result.data.get("models") or {}
    if not all_models:
        raise TableError(f"{result.cited}: no models in the report")
    names = [m for m in (models or list(all_models)) if m in all_models]
    values = [[get(all_models[m], *path) for _, path in columns] for m in names]
    table = numeric_table(["model", *(h for h, _ in columns)], [[f"`{m}`"] for m in names], values)
    return f"{table}\n\n{source_note(result, lead=lead or split_sentence(result.data))}"


def main_table(dataset: str) -> Builder:
    """Every model of the newest main job of ``dataset``: MAP@12 and R@100 per cohort, cold-item R@100."""
    def build() -> str:
        return eval_table(newest("main-job", f"-{dataset}"), MAIN_COLUMNS)
    build.__doc__ = f"Main job, {DATASET_NAMES[dataset]}: every model, MAP@12 and R@100 per cohort, cold R@100."
    return build


HEADLINE_MODELS = ("popularity", "rules", "text-knn", "union", "lightgbm (lambdarank)", "lightgbm (binary)", "atelier")


def headline() -> str:
    """The README's small table: popularity, the simple rules and the served chain on both datasets."""
    head = ["dataset", "model", "MAP@12 all", "MAP@12 history", "MAP@12 new", "MAP@12 cart", "R@100 cart",
            "cold R@100"]
    rows, results, splits = [], [], []
    for dataset in ("hm", "rtr"):
        result = newest("main-job", f"-{dataset}")
        results.append(result)
        splits.append(split_sentence(result.data))
        models = result.data.get("models") or {}
        for name in HEADLINE_MODELS:
            if name in models:
                m = models[name]
                rows.append([DATASET_NAMES[dataset], f"`{name}`",
                             *(num(get(m, "cohorts", c, k)) for c, k in (
                                 ("all", "map@12"), ("with_history", "map@12"), ("without_history", "map@12"),
                                 ("cart", "map@12"), ("cart", "recall@100"))), num(get(m, "cold_items", "recall@100"))])
    return f"{markdown(head, rows)}\n\n{source_note(*results, lead=' '.join(splits))}"


def main_job_time() -> str:
    """How long the newest main job took, stage by stage, up to each dataset's report (its ``run`` record)."""
    rows: list[list[str]] = []
    results: list[Result] = []
    seen: set[str] = set()  # the later report repeats the earlier stages: show only the ones after them
    for dataset in ("hm", "rtr"):
        result = newest("main-job", f"-{dataset}")
        run = result.data.get("run")
        if not isinstance(run, Mapping):
            raise TableError(f"{result.cited}: no `run` timing in the file (a main job before stage timing)")
        results.append(result)
        shown = [stage for stage in run["stages"] if stage not in seen]
        seen.update(shown)
        rows += [[stage, num(run["stages"][stage] / 60, 1)] for stage in shown]
        rows.append([f"**until the {DATASET_NAMES[dataset]} report is filed**", f"**{num(run['seconds'] / 60, 1)}**"])
    cores = results[-1].data["run"].get("cpu_count")
    return f"{markdown(['stage', 'minutes'], rows)}\n\n{source_note(*results, lead=f'{cores} cores.')}"


SOURCE_COHORTS = ("with_history", "without_history", "cart")


def sources_markdown(result: Result, report: Mapping[str, Any]) -> str:
    """Recall@50/100/200 per cohort of the rule set's sources and the chain's own sources in ``report``
    (a harness report held by ``result``), with the union of the chain's candidates in the lead."""
    sources: Mapping[str, Any] = report.get("sources") or {}
    chain: dict[str, Any] = dict(report.get("chain_sources") or {})
    union = chain.pop("union", None)
    head = ["source", *(f"R@{k} {COHORTS[c]}" for c in SOURCE_COHORTS for k in (50, 100, 200))]
    if not sources:
        return f"{markdown(head, [[DASH] * len(head)])}\n\n" + source_note(
            result, lead="This report predates per-source recall (no `sources` in the file).")
    rows = [*((f"`{s}` (rules)", per) for s, per in sources.items()),
            *((f"`{s}` (chain)", per) for s, per in chain.items())]
    values = [[get(per, c, f"recall@{k}") for c in SOURCE_COHORTS for k in (50, 100, 200)] for _, per in rows]
    table = numeric_table(head, [[label] for label, _ in rows], values, digits=3)
    users = {c: next((get(per, c, "users") for per in sources.values() if get(per, c, "users")), None)
             for c in SOURCE_COHORTS}
    lead = "Users per cohort: " + ", ".join(f"{COHORTS[c]} {num(users[c], 0)}" for c in SOURCE_COHORTS) + ". "
    if union:
        lead += ("The chain's union (every candidate the ranker orders) finds " + ", ".join(
            f"{num(get(union, c, 'recall@all'), 3)} of the {COHORTS[c]} purchases with "
            f"{num(get(union, c, 'candidates'), 0)} candidates" for c in SOURCE_COHORTS if c in union) + ". ")
    else:
        lead += "This report predates the chain's per-source recall (no `chain_sources` in the file). "
    return f"{table}\n\n{source_note(result, lead=lead + split_sentence(report))}"


def sources_table(dataset: str) -> Builder:
    """What each candidate source of the newest main job finds on its own: recall@50/100/200 per cohort."""
    def build() -> str:
        result = newest("main-job", f"-{dataset}")
        return sources_markdown(result, result.data)
    build.__doc__ = f"Candidate sources, {DATASET_NAMES[dataset]}: recall@50/100/200 per cohort (newest main job)."
    return build


ABLATION_GROUPS = {"seeds": "seeds", "sources": "sources removed", "features": "features blanked"}


def chain_ablation(dataset: str) -> Builder:
    """The served chain's ablations (issue #20): seeds, candidate sources, feature groups, each group with the
    rule set of its own run (newest chain-ablation file of ``dataset``)."""
    def build() -> str:
        result = newest("chain-ablation", f"-{dataset}")
        groups: Mapping[str, Any] = result.data.get("groups") or {}
        if not groups:
            raise TableError(f"{result.cited}: no groups")
        labels, values = [], []
        for group, label in ABLATION_GROUPS.items():
            for model, m in (get(groups, group, "summary") or {}).items():
                labels.append([label, f"`{model}`"])
                values.append([m.get(key) for _, key in LLM_COLUMNS])
        table = numeric_table(["group", "model", *(h for h, _ in LLM_COLUMNS)], labels, values)
        return f"{table}\n\n{source_note(result, lead=split_sentence(result.data))}"
    build.__doc__ = f"Chain ablations, {DATASET_NAMES[dataset]}: seeds, sources removed, feature groups blanked."
    return build


def chain_sources(dataset: str) -> Builder:
    """Each source of the served chain on its own, and their union (the seeds group of the newest
    chain-ablation file of ``dataset``)."""
    def build() -> str:
        result = newest("chain-ablation", f"-{dataset}")
        report = get(result.data, "groups", "seeds", "report")
        if not report:
            raise TableError(f"{result.cited}: no seeds group")
        return sources_markdown(result, report)
    build.__doc__ = f"Chain sources, {DATASET_NAMES[dataset]}: recall@50/100/200 per cohort and the union."
    return build


def two_tower_table(dataset: str) -> Builder:
    """Every model of the newest two-tower evaluation of ``dataset`` (with its ablations)."""
    def build() -> str:
        return eval_table(newest("two-tower", f"-{dataset}"), TWO_TOWER_COLUMNS)
    build.__doc__ = f"Two-tower evaluation, {DATASET_NAMES[dataset]}: every model of the run, ablations included."
    return build


def item_tower_ablation() -> str:
    """Item-tower variants through the harness (hm-item-tower-ablation.json), with their same-run baselines."""
    return eval_table(load("hm-item-tower-ablation.json"), CONTENT_COLUMNS)


def item_tower_re() -> str:
    """The item tower trained with the shipped RE phrases against the one without (hm-item-tower-re)."""
    return eval_table(newest("hm-item-tower-re"), CONTENT_COLUMNS)


LLM_VARIANTS = {"columns": "(a) columns only", "std": "(b) + LLM STD", "re": "(c) + LLM RE", "both": "(d) + both"}
LLM_COLUMNS = (("MAP@12 history", "with_history map@12"), ("R@100 history", "with_history recall@100"),
               ("MAP@12 cart", "cart map@12"), ("R@100 cart", "cart recall@100"), ("MAP@12 all", "all map@12"),
               ("cold R@100", "cold recall@100"))


def llm_value() -> str:
    """What the LLM attributes are worth (issue #19 (a)-(d)): every model of the newest llm-value ablation, per
    variant of the item JSON."""
    result = newest("llm-value-chain", "-hm")
    summary: Mapping[str, Any] = result.data.get("summary") or {}
    if not summary:
        raise TableError(f"{result.cited}: no summary")
    labels, values = [], []
    for variant, label in LLM_VARIANTS.items():
        for model, m in (summary.get(variant) or {}).items():
            labels.append([label, f"`{model}`"])
            values.append([m.get(key) for _, key in LLM_COLUMNS])
    table = numeric_table(["item JSON", "model", *(h for h, _ in LLM_COLUMNS)], labels, values)
    return f"{table}\n\n{source_note(result, lead=split_sentence(result.data))}"


BEHAVIOUR_COLUMNS: list[Column] = [
    ("MAP@12 history", ("cohorts", "with_history", "map@12")), ("R@100 history", ("cohorts", "with_history",
                                                                                  "recall@100")),
    ("MAP@12 cart", ("cohorts", "cart", "map@12")), ("R@100 cart", ("cohorts", "cart", "recall@100")),
    ("MAP@12 all", ("cohorts", "all", "map@12")), ("cold R@100", ("cold_items", "recall@100")),
]


def item_behaviour() -> str:
    """The SimCSE item tower against the same tower tuned on behaviour pairs (newest item-behaviour file)."""
    return eval_table(newest("item-behaviour", "-hm"), BEHAVIOUR_COLUMNS)


def search() -> str:
    """Ranked search (issue #23): latency per part and precision@10 of text-only against fused search, per run
    of the newest search file (a catalogue slice and the whole catalogue)."""
    result = newest("search")
    runs: Mapping[str, Any] = result.data.get("runs") or {}
    if not runs:
        raise TableError(f"{result.cited}: no runs")
    head = ["run", "items", "fused p50 ms", "fused p99 ms", "text-only p50 ms", "P@10 type (text / fused)",
            "P@10 colour+type", "P@10 typo", "women's bikini tops in 'bikini top' top 10"]
    rows = []
    for label, run in runs.items():
        lat, prec = run.get("latency") or {}, run.get("precision_at_10") or {}

        def pair(kind: str, prec: Mapping[str, Any] = prec) -> str:
            got = prec.get(kind) or {}
            return f"{num(got.get('text'), 2)} / {num(got.get('fused'), 2)}"
        rows.append([label, num(run.get("items_in_store"), 0), num(get(lat, "fused_total", "p50_ms"), 1),
                     num(get(lat, "fused_total", "p99_ms"), 1), num(get(lat, "text_only", "p50_ms"), 1),
                     pair("type"), pair("colour+type"), pair("typo"),
                     num(get(run, "named_queries", "bikini top", "womens_bikini_tops_in_top10"), 0)])
    notes = " ".join(f"`{label}`: {run.get('note', '')}." for label, run in runs.items())
    return f"{markdown(head, rows)}\n\n{notes} Source: `{result.cited}` (commands in the file)."


def ranker_latency() -> str:
    """The served chain's time per request on one thread, by part (newest ranker-latency file)."""
    result = newest("ranker-latency", "-hm")
    # the parts of one request, then (newer files) each candidate source timed on its own
    lat: Mapping[str, Any] = {**(result.data.get("latency") or {}), **(result.data.get("sources") or {})}
    keys = ("p50_ms", "p90_ms", "p99_ms", "max_ms")
    table = numeric_table(["part", "p50 ms", "p90 ms", "p99 ms", "max ms"], [[part] for part in lat],
                          [[stats.get(k) for k in keys] for stats in lat.values()], digits=1, bold=False)
    rows = result.data.get("candidate_rows") or {}
    lead = (f"{num(result.data.get('requests'), 0)} requests (half shoppers with history, half one-item carts), "
            f"{num(rows.get('mean'), 0)} candidate rows on average ({rows.get('min')}–{rows.get('max')}); "
            f"target: scoring {num(get(result.data, 'target', 'p99_ms'), 0)} ms p99.")
    return f"{table}\n\n{source_note(result, lead=lead)}"


# --------------------------------------------------------------------------- item tower speed


def item_tower_gpu() -> str:
    """SimCSE item-tower training speed on GPUs: every variant of the newest file of each run kind."""
    results = newest_per_tag("item_tower")
    head = ["run (file)", "GPUs", "variant", "epochs", "first epoch s", "later epochs s", "items/s (later epochs)"]
    rows = []
    for r in results:
        for variant, v in (r.data.get("variants") or {}).items():
            epochs = v.get("epochs") or []
            later = [e for e in epochs[1:]] or epochs
            secs = [e["seconds"] for e in later]
            rate = [e["items_per_s"] for e in later]
            rows.append([f"`{r.path.name}`", f"{r.data.get('world_size', 1)} × {r.data.get('device', '?')}",
                         f"`{variant}`", str(len(epochs)), num(epochs[0]["seconds"] if epochs else None, 2),
                         f"{num(min(secs), 2)}–{num(max(secs), 2)}" if secs else DASH,
                         f"{num(min(rate), 0)}–{num(max(rate), 0)}" if rate else DASH])
    items = {r.data.get("items") for r in results}
    lead = f"Full H&M catalogue ({', '.join(num(i, 0) for i in items)} items), batch 512."
    return f"{markdown(head, rows)}\n\n{source_note(*results, lead=lead)}"


# --------------------------------------------------------------------------- vector store


def store() -> str:
    """bench_store.py: pgvector HNSW against FAISS HNSW and exact numpy, same queries, same run."""
    results = [newest("store"), newest("store", "-real")]
    head = ["vectors", "COPY s", "HNSW build s", "recall@100", "p50 / p99 ms", "queries/s at 1 / 4 / 16 clients",
            "FAISS HNSW p50 ms (recall)", "numpy exact p50 ms", "pgvector p50 ÷ FAISS", "pgvector p50 ÷ numpy"]
    rows = []
    for r in results:
        kind = str(get(r.data, "data", "kind") or "?").split(" (")[0]
        if "minilm" in str(get(r.data, "data", "path")):
            kind += " MiniLM text vectors"
        for run in r.data.get("results") or []:
            pg, faiss, exact = run["pgvector"], run["faiss_hnsw"], run["numpy_exact"]
            qps = {c["clients"]: c["qps"] for c in pg.get("concurrency") or []}
            rows.append([f"{num(run['n'], 0)} × {run['dim']} ({kind})", num(pg.get("copy_s"), 2),
                         num(pg.get("index_build_s"), 1), num(pg.get("recall_at_100"), 3),
                         f"{num(pg.get('p50_ms'), 1)} / {num(pg.get('p99_ms'), 1)}",
                         " / ".join(num(qps.get(c), 0) for c in (1, 4, 16)),
                         f"{num(faiss.get('p50_ms'), 2)} ({num(faiss.get('recall_at_100'), 3)})",
                         num(exact.get("p50_ms"), 2), num(get(run, "ratios", "p50_pg_over_faiss"), 1),
                         num(get(run, "ratios", "p50_pg_over_numpy"), 2)])
    return f"{markdown(head, rows)}\n\n{source_note(*results)}"


# --------------------------------------------------------------------------- reranker

RERANK_GROUPS = (("retrieval only", "retrieval"), ("rerank, transfer init", "rerank transfer"),
                 ("rerank, random init", "rerank random"))
RERANK_METRICS = (("MAP@12", "all", "map@12"), ("NDCG@12", "all", "ndcg@12"), ("R@12", "all", "recall@12"),
                  ("MAP@12 history", "with_history", "map@12"))


def _run_label(key: str, run: Mapping[str, Any]) -> str:
    dataset = DATASET_NAMES.get(key.split("/")[0], key.split("/")[0])
    retriever = str(run.get("retriever", "")).removeprefix("retrieval: ")
    extras = []
    if run.get("transfer_source") not in (None, "table"):
        extras.append(f"{run['transfer_source']} transfer")
    if run.get("loss") not in (None, "pointwise"):
        extras.append(f"{run['loss']} loss")
    return f"{dataset}, `{retriever}`" + (f" ({', '.join(extras)})" if extras else "")


def _mean_sd(values: Sequence[float]) -> str:
    if not values:
        return DASH
    if len(values) == 1:
        return num(values[0])
    return f"{num(statistics.mean(values))} ± {num(statistics.stdev(values))}"


def rerank() -> str:
    """rerank_eval.py: retrieval alone and + DeepFM (transfer and random init, mean ± sd over seeds) per run."""
    result = newest("rerank")
    head = ["run", "model", "seeds", *(h for h, _, _ in RERANK_METRICS)]
    rows = []
    for key, run in result.data.items():
        models: Mapping[str, Any] = run.get("models") or {}
        first = True
        for label, prefix in RERANK_GROUPS:
            group = [m for name, m in models.items() if name.startswith(prefix)]
            if not group:
                continue
            cells = [_mean_sd([get(m, c, k) for m in group if get(m, c, k) is not None]) for _, c, k in RERANK_METRICS]
            rows.append([_run_label(key, run) if first else "", label, str(len(group)), *cells])
            first = False
    users = {(get(r, "split", "scored_users"), get(r, "split", "users_with_history")) for r in result.data.values()}
    lead = ("Harness split (validation), a seeded sample of test users per run: "
            + "; ".join(f"{num(a, 0)} users, {num(b, 0)} with history" for a, b in sorted(users, key=str))
            + ". Every run: " + "; ".join(f"`{k}` ({_command(r)}, {_commit(r)}, {_date(r, result.path)})"
                                          for k, r in result.data.items()) + ".")
    machines = sorted({_machine(r) for r in result.data.values()})
    return f"{markdown(head, rows)}\n\n{lead} Source: `{result.cited}` ({'; '.join(machines)})."


def rerank_latency() -> str:
    """Reranking latency for 100 candidates (features + DeepFM, one thread), every run of the rerank file."""
    result = newest("rerank")
    head = ["run", "key", "median ms", "p95 ms", "queries", "commit", "date"]
    rows = [[_run_label(key, run), f"`{key}`", num(get(run, "latency_100_candidates", "median_ms"), 2),
             num(get(run, "latency_100_candidates", "p95_ms"), 2),
             num(get(run, "latency_100_candidates", "queries"), 0), _commit(run), _date(run, result.path)]
            for key, run in result.data.items()]
    medians = [get(r, "latency_100_candidates", "median_ms") for r in result.data.values()]
    medians = [m for m in medians if m is not None]
    lead = (f"All {len(rows)} runs of the file: medians {num(min(medians), 2)}–{num(max(medians), 2)} ms, "
            "retrieval excluded, one CPU thread, on cores shared with other jobs.")
    machines = sorted({_machine(r) for r in result.data.values()})
    return f"{markdown(head, rows)}\n\n{lead} Source: `{result.cited}` ({'; '.join(machines)})."


# --------------------------------------------------------------------------- serving


def serve_latency() -> str:
    """bench_serve.py: POST /recommend latency, sequential and from concurrent clients."""
    result = newest("serve")
    head = ["load", "requests", "p50 ms", "p90 ms", "p99 ms", "max ms", "requests/s", "stages that served"]
    rows = []
    for key, label in (("recommend_sequential", "sequential, 1 client"), ("recommend_concurrent", "concurrent")):
        part = result.data.get(key) or {}
        o = part.get("overall") or {}
        stages = ", ".join(f"{k} {v}" for k, v in (part.get("stages") or {}).items())
        rows.append([f"{label}" + (f" ({part['clients']} clients)" if key.endswith("concurrent") else ""),
                     num(o.get("n"), 0), num(o.get("p50_ms"), 1), num(o.get("p90_ms"), 1), num(o.get("p99_ms"), 1),
                     num(o.get("max_ms"), 1), num(part.get("requests_per_s"), 1), stages])
    service = result.data.get("service") or {}
    lead = (f"One uvicorn worker ({service.get('transport', '?')}), model `{service.get('model_id', '?')}`, "
            f"start-up {num(service.get('startup_s'), 1)} s.")
    return f"{markdown(head, rows)}\n\n{source_note(result, lead=lead)}"


def _live_rows(products: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [[f"`{p['item_id']}`", num(p.get("post_s"), 3), num(p.get("live_s"), 3),
             str(p["rank"]) if p.get("rank") is not None else DASH,
             *(num(get(p, "server_timings_ms", k), 1) for k in ("enrich_ms", "encode_ms", "upsert_ms"))]
            for p in products]


def serve_live() -> str:
    """bench_serve.py: from POST /items of a re-listed article to its appearance in /recommend, per product."""
    result = newest("serve")
    live = result.data.get("ingest_to_live") or {}
    head = ["product", "POST s", "live after s", "rank", "enrich ms", "encode ms", "upsert ms"]
    lead = (f"Median {num(live.get('median_s'), 3)} s, max {num(live.get('max_s'), 3)} s, all live: "
            f"{live.get('all_live')}; server-side split of each POST in the last three columns.")
    return f"{markdown(head, _live_rows(live.get('products') or []))}\n\n{source_note(result, lead=lead)}"


def soak() -> str:
    """soak.py: errors, latency, memory, connections and consistency over a long mixed load."""
    result = newest("soak")
    d = result.data
    cfg, lat, rss, conn, cons = (d.get(k) or {} for k in ("config", "latency_ms", "rss_mb", "connections",
                                                          "consistency"))
    rows = [
        ["load", f"{num(cfg.get('minutes'), 0)} min at {num(d.get('achieved_req_per_s'), 1)} req/s "
                 f"({num(cfg.get('load_fraction'), 2)} of the measured peak {num(d.get('peak_req_per_s'), 1)} req/s), "
                 f"{cfg.get('clients', '?')} clients, {cfg.get('run', '?')}"],
        ["requests / errors", f"{num(d.get('requests'), 0)} / {num(d.get('errors'), 0)}"],
        ["by kind", ", ".join(f"{k}: {num(v, 0)}" for k, v in (d.get("statuses") or {}).items())],
        ["latency p50 / p90 / p99 / max ms", " / ".join(num(lat.get(k), 1) for k in ("p50", "p90", "p99", "max"))],
        ["RSS MB start / end / max; slope over the second half",
         f"{num(rss.get('start'), 1)} / {num(rss.get('end'), 1)} / {num(rss.get('max'), 1)}; "
         f"{num(rss.get('slope_mb_per_min_second_half'), 2)} MB/min"],
        ["server TCP connections, PostgreSQL backends, open files (min–max)",
         f"{conn.get('tcp_min')}–{conn.get('tcp_max')}, {conn.get('pg_backends_min')}–{conn.get('pg_backends_max')}, "
         f"{conn.get('fds_min')}–{conn.get('fds_max')}"],
        ["items / vectors after; lost, unexpected, duplicated",
         f"{num(get(cons, 'after', 'items'), 0)} / {num(get(cons, 'after', 'vectors'), 0)}; "
         f"{cons.get('lost')}, {cons.get('unexpected_items')}, "
         f"{num((get(cons, 'after', 'duplicate_items') or 0) + (get(cons, 'after', 'duplicate_vectors') or 0), 0)}"],
    ]
    return f"{markdown(['figure', 'value'], rows)}\n\n{source_note(result)}"


# --------------------------------------------------------------------------- performance suite


def perf_enrich() -> str:
    """perf enrich: every backend of the run on the same products, plus the GPU reference it quotes."""
    result = newest("perf-enrich")
    head = ["backend", "products", "model load s", "wall s", "items/s", "s/item", "prompt + completion tokens/item"]
    rows = []
    for name, b in (result.data.get("backends") or {}).items():
        tokens = b.get("tokens") or {}
        rows.append([f"`{name}` ({b.get('backend', '?')})", num(b.get("items"), 0), num(b.get("model_load_s"), 2),
                     num(b.get("wall_s"), 3), num(b.get("items_per_s"), 3), num(b.get("s_per_item"), 4),
                     f"{num(tokens.get('prompt_per_item'), 0)} + {num(tokens.get('completion_per_item'), 0)}"
                     if tokens else DASH])
    gpu = result.data.get("gpu_reference") or {}
    for ds, best in (gpu.get("best") or {}).items():
        rows.append([f"GPU reference, {DATASET_NAMES.get(ds, ds)} ({gpu.get('method', '?')}, {gpu.get('device', '?')}; "
                     f"from `{gpu.get('file', '?')}`)", DASH, DASH, DASH, num(best.get("items_per_s"), 1), DASH, DASH])
    products = result.data.get("products") or {}
    lead = (f"{products.get('n', '?')} {DATASET_NAMES.get(products.get('dataset', ''), '?')} products; embedded ÷ fake "
            f"seconds per item {num(result.data.get('embedded_over_fake_s_per_item'), 1)}; warm ÷ cold wall "
            f"{result.data.get('warm_over_cold_wall')}.")
    return f"{markdown(head, rows)}\n\n{source_note(result, lead=lead)}"


def perf_item_tower() -> str:
    """perf item-tower: SimCSE training and encoding speed on CPU per catalogue size, every thread setting."""
    results = [newest("perf-item_tower")]
    with contextlib.suppress(MissingResultError):  # the one-thread run is a peer when it exists
        results.append(newest("perf-item_tower", "-1thread"))
    head = ["threads", "items", "data", "train items/s", "s/step (median)", "epoch s (extrapolated)",
            "encode items/s", "encode catalogue s"]
    rows = []
    for r in results:
        for size in (r.data.get("sizes") or {}).values():
            t, e = size.get("train") or {}, size.get("encode") or {}
            rows.append([str(r.data.get("threads", "?")), num(size.get("n"), 0), str(size.get("data", "?")),
                         num(t.get("items_per_s"), 1), num(t.get("s_per_step_median"), 2),
                         num(t.get("epoch_s_extrapolated"), 0), num(e.get("items_per_s"), 0),
                         num(e.get("catalogue_s_extrapolated"), 1)])
    peers = []
    for r in results:
        mini = r.data.get("minilm_peer") or {}
        threads = r.data.get("threads")
        peers.append(f"MiniLM text encoder {num(mini.get('items_per_s'), 1)} texts/s "
                     f"({threads} thread{'' if threads == 1 else 's'})")
    gpu = results[0].data.get("gpu_reference") or {}
    peers += [f"{g.get('world_size')} × {g.get('device')}: {num(g.get('items_per_s_steady'), 0)} items/s, epoch "
              f"{num(g.get('epoch_s_steady'), 2)} s (`{k.split(':')[0]}`)" for k, g in gpu.items()]
    lead = "Peers: " + "; ".join(peers) + "."
    return f"{markdown(head, rows)}\n\n{source_note(*results, lead=lead)}"


def perf_store() -> str:
    """perf store: pgvector (client and server side) against FAISS HNSW and numpy, same queries."""
    result = newest("perf-store")
    head = ["vectors", "pgvector recall@100", "FAISS recall@100", "pgvector p50 / p99 ms", "server-side p50 ms",
            "FAISS p50 ms", "numpy p50 ms", "queries/s at 1 / 4 / 16 clients", "COPY s + HNSW build s",
            "FAISS build s"]
    rows = []
    for s in result.data.get("summary") or []:
        qps = s.get("pg_qps") or {}
        rows.append([f"{num(s.get('n'), 0)} × {s.get('dim')} ({s.get('data')})", num(s.get("pg_recall"), 4),
                     num(s.get("faiss_recall"), 4), f"{num(s.get('pg_p50_ms'), 2)} / {num(s.get('pg_p99_ms'), 2)}",
                     num(s.get("pg_server_p50_ms"), 2), num(s.get("faiss_p50_ms"), 3), num(s.get("numpy_p50_ms"), 2),
                     " / ".join(num(qps.get(str(c), qps.get(c)), 1) for c in (1, 4, 16)),
                     f"{num(s.get('load_s'), 2)} + {num(s.get('pg_build_s'), 1)}", num(s.get("faiss_build_s"), 1)])
    lead = str(result.data.get("skipped") or "")
    return f"{markdown(head, rows)}\n\n{source_note(result, lead=lead)}"


def perf_recommend_load() -> str:
    """perf recommend: every locust ladder of the run (full chain with each thread setting, retrieval only,
    popularity only)."""
    result = newest("perf-recommend")
    head = ["service", "users", "requests/s", "p50 ms", "p95 ms", "p99 ms", "failures"]
    rows = []
    for name, ladder in (get(result.data, "load") or {}).items():
        for i, level in enumerate(ladder.get("levels") or []):
            rows.append([name if i == 0 else "", str(level.get("users")), num(level.get("requests_per_s"), 1),
                         num(level.get("p50_ms"), 0), num(level.get("p95_ms"), 0), num(level.get("p99_ms"), 0),
                         num(level.get("failures"), 0)])
    cfg = result.data.get("config") or {}
    lead = (f"POST /recommend over loopback, one uvicorn worker, {cfg.get('client', '?')}; mix: {cfg.get('mix', '?')}; "
            f"{num(cfg.get('level_seconds'), 0)} s per level.")
    return f"{markdown(head, rows)}\n\n{source_note(result, lead=lead)}"


def perf_recommend_breakdown() -> str:
    """perf recommend: where one request's time goes, per part, in process."""
    result = newest("perf-recommend")
    b = result.data.get("breakdown") or {}
    head = ["part", "p50 ms", "p95 ms", "mean ms", "share of the total"]
    rows = [[name, num(p.get("p50_ms"), 2), num(p.get("p95_ms"), 2), num(p.get("mean_ms"), 2),
             num(p.get("share_of_total"), 3)] for name, p in (b.get("parts") or {}).items()]
    served = ", ".join(f"{k} {v}" for k, v in (b.get("served_by") or {}).items())
    lead = (f"{b.get('requests', '?')} requests of the mix in one process, torch threads "
            f"{result.data.get('torch_threads_default', '?')}; served by {served}.")
    return f"{markdown(head, rows)}\n\n{source_note(result, lead=lead)}"


def perf_threads() -> str:
    """perf threads: torch on one thread per request against two, requests interleaved in one process."""
    result = newest("perf-threads")
    d = result.data
    head = ["torch threads", "requests", "p50 ms", "p95 ms", "p99 ms"]
    rows = [[label, num(get(d, key, "n"), 0), *(num(get(d, key, p), 1) for p in ("p50_ms", "p95_ms", "p99_ms"))]
            for label, key in (("1", "one_thread"), ("2", "two_threads"))]
    lead = (f"Two threads ÷ one: p50 {d.get('p50_two_over_one')}×, mean {d.get('mean_two_over_one')}×.")
    return f"{markdown(head, rows)}\n\n{source_note(result, lead=lead)}"


def perf_threads_load() -> str:
    """perf threads-load: two services (1 and 2 torch threads), their locust ladders interleaved level by level."""
    result = newest("perf-threads-load")
    head = ["service", "users", "requests/s", "p50 ms", "p95 ms", "p99 ms", "failures"]
    rows = []
    for name, ladder in (result.data.get("ladders") or {}).items():
        for i, level in enumerate(ladder.get("levels") or []):
            rows.append([name if i == 0 else "", str(level.get("users")), num(level.get("requests_per_s"), 1),
                         num(level.get("p50_ms"), 0), num(level.get("p95_ms"), 0), num(level.get("p99_ms"), 0),
                         num(level.get("failures"), 0)])
    return f"{markdown(head, rows)}\n\n{source_note(result)}"


def perf_ab() -> str:
    """perf ab: the store code before and after the search optimisation, requests interleaved."""
    result = newest("perf-ab")
    d = result.data
    head = ["case", "before p50 / p95 / p99 ms", "after p50 / p95 / p99 ms", "p50 before ÷ after",
            "mean before ÷ after", "identical answers"]
    cases = [*((name, c) for name, c in (d.get("search") or {}).items()), ("POST /recommend (in process)",
                                                                            d.get("recommend") or {})]
    rows = [[name, " / ".join(num(get(c, "before", p), 1) for p in ("p50_ms", "p95_ms", "p99_ms")),
             " / ".join(num(get(c, "after", p), 1) for p in ("p50_ms", "p95_ms", "p99_ms")),
             num(c.get("p50_before_over_after"), 2), num(c.get("mean_before_over_after"), 2),
             num(c.get("identical_answers"), 2)] for name, c in cases]
    lead = f"Before = the store code at `{d.get('before_commit', '?')}`."
    return f"{markdown(head, rows)}\n\n{source_note(result, lead=lead)}"


def perf_search_micro() -> str:
    """The store search before and after the optimisation, query by query in one script (old code from a copy)."""
    result = newest("perf-search-before-after")
    head = ["case", "before p50 / p99 ms", "after p50 / p99 ms", "p50 before ÷ after", "same answers"]
    rows = [[name, f"{num(c.get('old_p50_ms'), 1)} / {num(c.get('old_p99_ms'), 1)}",
             f"{num(c.get('new_p50_ms'), 1)} / {num(c.get('new_p99_ms'), 1)}", num(c.get("old_over_new"), 2),
             num(c.get("result_overlap"), 2)] for name, c in (result.data.get("results") or {}).items()]
    return f"{markdown(head, rows)}\n\n{source_note(result, lead=str(result.data.get('data', '')))}"


def perf_live() -> str:
    """perf live: ingest to live for each enricher (columns, fake LLM, embedded LLM)."""
    result = newest("perf-live")
    head = ["enricher", "products live / posted", "median live after s", "max s", "median POST s",
            "median enrich / encode / upsert ms"]
    rows = []
    for name, cfg in (result.data.get("configs") or {}).items():
        products = cfg.get("products") or []
        live = [p for p in products if p.get("live_s") is not None]
        split = [statistics.median([get(p, "server_timings_ms", k) for p in products])
                 if products else None for k in ("enrich_ms", "encode_ms", "upsert_ms")]
        rows.append([name, f"{len(live)} / {len(products)}", num(cfg.get("median_live_s"), 3),
                     num(cfg.get("max_live_s"), 3), num(cfg.get("median_post_s"), 3),
                     " / ".join(num(v, 1) for v in split)])
    lead = f"Live = {result.data.get('live_means', '?')}."
    return f"{markdown(head, rows)}\n\n{source_note(result, lead=lead)}"


# --------------------------------------------------------------------------- enrichment


def enrich_speed() -> str:
    """Embedded-LLM enrichment speed on CPU and the log-likelihood scorer on a GPU, from each run's file."""
    cpu = newest("enrich-cpu-hm30")
    first = load("extraction-2026-11-27.json")
    heldout = load("extraction-2026-11-27-heldout.json")
    gpu = newest("loglik-gpu-h100")
    head = ["run", "items", "items/s", "s/item", "outcome", "file"]
    d = cpu.data
    rows = [[f"`{d.get('command', '?')}`", num(d.get("total"), 0), num(d.get("items_per_s"), 3),
             num(d["wall_seconds"] / d["total"] if d.get("total") else None, 1),
             f"{d.get('ok')} ok, {d.get('errors')} errors", f"`{cpu.path.name}`"]]
    for ds in first.data.get("datasets") or []:
        fields = len(ds.get("fields") or {})
        rows.append([f"generation (`embedded`), {DATASET_NAMES[ds['dataset']]}, {fields} STD fields",
                     num(ds.get("n"), 0), f"{num(ds.get('items_per_s_incl_cached'), 3)} (incl. cached)",
                     f"{num(ds.get('seconds_per_item_median'), 2)} (median)",
                     ", ".join(f"{v} {k}" for k, v in (ds.get("statuses") or {}).items()), f"`{first.path.name}`"])
    for ds in heldout.data.get("datasets") or []:
        run = get(ds, "runs", "loglik") or {}
        if run:
            rows.append([f"log-likelihood scoring (`embedded-ll`), {DATASET_NAMES[ds['dataset']]}, "
                         f"{run.get('threads', '?')} thread", num(ds.get("n"), 0), num(run.get("items_per_s"), 3),
                         f"{num(run.get('seconds_per_item_median'), 2)} (median)", DASH, f"`{heldout.path.name}`"])
    for run_name, run in (gpu.data.get("runs") or {}).items():
        for ds, info in (run.get("datasets") or {}).items():
            fields = len(info.get("fields") or [])
            rows.append([f"`embedded-ll` on 1 × {run.get('device', '?')}, {DATASET_NAMES[ds]}, "
                         f"{fields} fields, token budget {run.get('token_budget')} (`{run_name}`)",
                         num(info.get("extra_n"), 0), num(info.get("items_per_s"), 1), DASH,
                         f"model load {num(run.get('load_seconds'), 0)} s excluded", f"`{gpu.path.name}`"])
    return f"{markdown(head, rows)}\n\n{source_note(cpu, first, heldout, gpu)}"


def enrich_gpu() -> str:
    """bench_enrich_gpu.py: RE phrases for the whole H&M catalogue on one GPU."""
    result = newest("enrich-gpu-h200")
    d = result.data
    ca, ci = d.get("counts_articles") or {}, d.get("counts_distinct_inputs") or {}
    rows = [
        ["articles / distinct inputs", f"{num(d.get('articles'), 0)} / {num(d.get('distinct_inputs'), 0)}"],
        ["generation s (+ first model load s)", f"{num(d.get('generation_seconds'), 1)} "
                                                f"(+ {num(d.get('model_load_seconds_first_call'), 1)})"],
        ["distinct inputs/s, articles/s, new tokens/s", f"{num(d.get('distinct_inputs_per_s'), 1)}, "
                                                        f"{num(d.get('articles_per_s'), 1)}, "
                                                        f"{num(d.get('new_tokens_per_s'), 0)}"],
        ["batch, peak GPU memory GB", f"{d.get('batch')}, {num(d.get('max_memory_gb'), 1)}"],
        ["articles: ok / repaired / error", " / ".join(num(ca.get(k), 0) for k in ("ok", "repaired", "error"))],
        ["distinct inputs: ok / repaired / error", " / ".join(num(ci.get(k), 0) for k in ("ok", "repaired", "error"))],
    ]
    return f"{markdown(['figure', 'value'], rows)}\n\n{source_note(result, lead=str(d.get('errors', '')))}"


def lora_cpu_speed() -> str:
    """The log-likelihood scorer on CPU with and without the LoRA adapter, same products, interleaved."""
    result = newest("lora-cpu-speed")
    res = result.data.get("results") or {}
    head = ["catalogue", "products", "fields", "without adapter: items/s (median s)",
            "with adapter: items/s (median s)"]
    rows = [[DATASET_NAMES.get(ds, ds), str(res.get("n_per_dataset", "?")), str(len(r.get("fields") or [])),
             f"{num(get(r, 'base', 'items_per_s'), 3)} ({num(get(r, 'base', 'median_s'), 2)})",
             f"{num(get(r, 'lora', 'items_per_s'), 3)} ({num(get(r, 'lora', 'median_s'), 2)})"]
            for ds, r in res.items() if isinstance(r, Mapping) and "base" in r]
    lead = f"{res.get('threads', '?')} thread{'' if res.get('threads') == 1 else 's'}."
    return f"{markdown(head, rows)}\n\n{source_note(result, lead=lead)}"


def lora_cpu_vs_gpu() -> str:
    """The first LoRA adapter scored on one H200 (bf16) and on CPU (llama.cpp, Q4_K_M), test half, per field."""
    gpu = load("lora-gpu-h200-2026-11-27.json")
    cpu = load("extraction-2026-11-27-lora.json")
    cpu_acc = {f"{ds['dataset']}/{f}": get(row, "methods", "loglik_lora", "test", "acc")
               for ds in cpu.data.get("datasets") or [] for f, row in (ds.get("fields") or {}).items()}
    head = ["catalogue", "field", "n", "GPU (bf16)", "CPU (Q4_K_M + LoRA)", "same"]
    rows, same = [], 0
    for key, f in (gpu.data.get("per_field_test_half") or {}).items():
        ds, field = key.split("/", 1)
        g, c = f.get("lora_loglik"), cpu_acc.get(key)
        equal = g is not None and c is not None and num(g, 2) == num(c, 2)
        same += equal
        rows.append([DATASET_NAMES.get(ds, ds), field, num(f.get("n"), 0), num(g, 2), num(c, 2),
                     "yes" if equal else "no"])
    lead = f"Same accuracy (two decimals) on {same} of {len(rows)} fields."
    return f"{markdown(head, rows)}\n\n{source_note(gpu, cpu, lead=lead)}"


def gold_re() -> str:
    """RE phrases of the generating backend against the gold phrases (extraction-gold-2026-11-27.json)."""
    result = load("extraction-gold-2026-11-27.json")
    head = ["catalogue", "phrases from", "products", "phrases", "gold phrases", "precision", "recall",
            "echo share", "guide-copy share", "in the product text"]
    rows = []
    for ds in result.data.get("datasets") or []:
        for source, re_ in (ds.get("re") or {}).items():
            p = re_.get("pooled") or {}
            rows.append([DATASET_NAMES.get(ds["dataset"], ds["dataset"]), f"`{source}`", num(re_.get("products"), 0),
                         num(p.get("pred"), 0), num(p.get("gold"), 0), num(p.get("precision_strict"), 2),
                         num(p.get("recall"), 2), num(re_.get("echo_share"), 2), num(re_.get("guide_copy_share"), 2),
                         num(re_.get("verbatim_in_text_share"), 2)])
    lead = f"Scoring: {get(result.data, 'scoring', 're') or '?'}".replace("|", "/")
    return f"{markdown(head, rows)}\n\n{source_note(result, lead=lead)}"


# --------------------------------------------------------------------------- the registry

TABLES: dict[str, Builder] = {
    "headline": headline,
    "main-hm": main_table("hm"),
    "main-rtr": main_table("rtr"),
    "main-job-time": main_job_time,
    "sources-hm": sources_table("hm"),
    "sources-rtr": sources_table("rtr"),
    "two-tower-rtr": two_tower_table("rtr"),
    "two-tower-hm": two_tower_table("hm"),
    "item-tower-gpu": item_tower_gpu,
    "item-tower-ablation": item_tower_ablation,
    "item-tower-re": item_tower_re,
    "llm-value": llm_value,
    "chain-ablation-hm": chain_ablation("hm"),
    "chain-ablation-rtr": chain_ablation("rtr"),
    "chain-sources-hm": chain_sources("hm"),
    "chain-sources-rtr": chain_sources("rtr"),
    "item-behaviour": item_behaviour,
    "search": search,
    "ranker-latency": ranker_latency,
    "store": store,
    "rerank": rerank,
    "rerank-latency": rerank_latency,
    "serve-latency": serve_latency,
    "serve-live": serve_live,
    "soak": soak,
    "perf-enrich": perf_enrich,
    "perf-item-tower": perf_item_tower,
    "perf-store": perf_store,
    "perf-recommend-load": perf_recommend_load,
    "perf-recommend-breakdown": perf_recommend_breakdown,
    "perf-threads": perf_threads,
    "perf-threads-load": perf_threads_load,
    "perf-ab": perf_ab,
    "perf-search-micro": perf_search_micro,
    "perf-live": perf_live,
    "enrich-speed": enrich_speed,
    "enrich-gpu": enrich_gpu,
    "lora-cpu-speed": lora_cpu_speed,
    "lora-cpu-vs-gpu": lora_cpu_vs_gpu,
    "gold-re": gold_re,
}

EXTRA_MODULES = ("benchmarks.tables_extraction",)


def all_tables(modules: Sequence[str] = EXTRA_MODULES) -> tuple[dict[str, Builder], dict[str, str]]:
    """This module's builders merged with each extra module's ``TABLES``; and, per module that is missing
    or fails to import, why (so a marker that needs it is reported, not silently left stale)."""
    tables = dict(TABLES)
    missing: dict[str, str] = {}
    for module in modules:
        try:
            extra: Mapping[str, Builder] = importlib.import_module(module).TABLES
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):  # the module exists; an import inside it fails
                missing[module] = f"{module} fails to import: {exc}"
            else:
                missing[module] = f"{module} does not exist yet"
            continue
        except Exception as exc:  # another module's failure is reported per marker
            missing[module] = f"{module} fails to import: {type(exc).__name__}: {exc}"
            continue
        clash = set(extra) & set(tables)
        if clash:
            raise TableError(f"{module}: table names already registered: {sorted(clash)}")
        tables.update(extra)
    return tables, missing


# --------------------------------------------------------------------------- markers


def _build(name: str, tables: Mapping[str, Builder], missing: Mapping[str, str] | None) -> list[str]:
    """The lines of table ``name``: TableError when no builder knows it."""
    if name not in tables:
        why = "; ".join((missing or {}).values())
        raise TableError(f"unknown table {name!r}" + (f" ({why})" if why else "")
                         + f"; known: {', '.join(sorted(tables))}")
    return ["", *tables[name]().strip("\n").split("\n"), ""]  # blank lines: Markdown sees a block of its own


def render(text: str, tables: Mapping[str, Builder], missing: Mapping[str, str] | None = None,
           where: str = "") -> tuple[str, list[str]]:
    """``text`` with every marked table rebuilt, and the errors: unknown names, markers without their
    partner, failing builders (whose tables keep their old content; the others are still rebuilt)."""
    lines = text.split("\n")
    out: list[str] = []
    errors: list[str] = []
    prefix = f"{where}: " if where else ""
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        out.append(lines[i])
        i += 1
        if CLOSE.match(line):
            errors.append(f"{prefix}line {i}: {line} has no opening marker")
            continue
        opened = OPEN.match(line)
        if not opened:
            continue
        name, j = opened.group("name"), i
        while j < len(lines) and not OPEN.match(lines[j].strip()) and not CLOSE.match(lines[j].strip()):
            j += 1
        closed = CLOSE.match(lines[j].strip()) if j < len(lines) else None
        if closed is None or closed.group("name") != name:
            errors.append(f"{prefix}line {i}: table {name!r} has no <!-- /table:{name} --> before "
                          + (f"line {j + 1}" if j < len(lines) else "the end"))
            continue
        try:
            out.extend(_build(name, tables, missing))
        except Exception as exc:  # every failing table is reported; the others are still rebuilt
            errors.append(f"{prefix}line {i}: table {name!r}: {type(exc).__name__}: {exc}")
            out.extend(lines[i:j])
        out.append(lines[j])
        i = j + 1
    return "\n".join(out), errors


def regenerate(documents: Sequence[Path], tables: Mapping[str, Builder], missing: Mapping[str, str] | None = None,
               check: bool = False, stream: TextIO = sys.stdout) -> int:
    """Rebuild the tables of each document (write it, or with ``check`` only compare); 0 when nothing
    failed and, with ``check``, nothing would change."""
    status = 0
    for doc in documents:
        try:
            where = doc.relative_to(ROOT).as_posix()
        except ValueError:
            where = str(doc)
        old = doc.read_text(encoding="utf-8")
        new, errors = render(old, tables, missing, where)
        for error in errors:
            print(f"error: {error}", file=stream)
        status |= bool(errors)
        if new == old:
            continue
        if check:
            status = 1
            stream.writelines(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                                   f"{where} (now)", f"{where} (regenerated)"))
            print(f"{where} is stale: run `.venv/bin/python -m benchmarks.tables`", file=stream)
        else:
            doc.write_text(new, encoding="utf-8")
            print(f"{where}: tables regenerated", file=stream)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: rewrite both documents, or ``--check`` them, or ``--list`` the tables."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 with a diff if a document is stale; write nothing")
    parser.add_argument("--list", action="store_true", help="list the table names and exit")
    args = parser.parse_args(argv)
    tables, missing = all_tables()
    if args.list:
        for name, build in tables.items():
            print(f"{name}: {(build.__doc__ or '').strip().splitlines()[0] if build.__doc__ else ''}")
        for why in missing.values():
            print(f"({why})")
        return 0
    return regenerate(DOCUMENTS, tables, missing, check=args.check)


if __name__ == "__main__":
    sys.exit(main())
