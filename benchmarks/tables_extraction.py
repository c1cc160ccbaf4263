"""Markdown tables of the attribute-extraction results, generated from the result files (issue #17).

``TABLES[name]()`` reads the newest relevant file(s) under ``benchmarks/results/`` and returns one
Markdown table, then a line naming the files it read (command, commit, machine, date); a missing file
raises ``FileNotFoundError`` naming it. ``benchmarks/tables.py`` merges ``TABLES`` into its own.
``python -m benchmarks.tables_extraction [NAME ...]`` prints them. The tables:

- ``extraction-heldout``: per field, every method on the benchmark sample's test half;
- ``extraction-tuning``: the same on the tuning half, with the method chosen there;
- ``extraction-choice``: per field, pooled, what the default was chosen from and what it is;
- ``extraction-gold``: the gold set's test split (all products; the CPU LoRA on its subset);
- ``extraction-lora-pool``: evaluation items with a twin (same normalised text / group_id) in the
  LoRA's training pool, first adapter vs the de-duplicated one, and what that did to its accuracy;
- ``extraction-agreement``: the second annotation pass against the gold set.

The "fair" files are those with a ``training_pool`` (``bench_extraction.py --supervised``): every
supervised baseline there learnt from the LoRA's own training items.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

NAMES = {
    "majority": "majority", "keyword": "keyword", "keyword_or_majority": "keyword → majority",
    "minilm": "MiniLM label", "keyword_or_minilm": "keyword → MiniLM",
    "tfidf_lr": "TF-IDF + LR", "minilm_lr": "MiniLM + LR",
    "embedded": "LLM generation", "loglik": "LLM log-lik.", "loglik_cal": "LLM log-lik. cal.",
    "loglik_lora": "LLM + LoRA (CPU)", "loglik_lora_gpu": "LLM + LoRA (GPU)", "hybrid": "`hybrid` default",
}
ZERO_SHOT = ["majority", "keyword", "keyword_or_majority", "minilm", "keyword_or_minilm"]
SUPERVISED = ["tfidf_lr", "minilm_lr"]
ZERO_SHOT_LLM = ["embedded", "loglik", "loglik_cal"]
LORA = ["loglik_lora", "loglik_lora_gpu"]
DATASET = {"hm": "H&M", "myntra": "Myntra"}


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path.relative_to(RESULTS.parent.parent)}: result file not found")
    data: dict[str, Any] = json.loads(path.read_text())
    data["_file"] = path.name
    return data


def provenance(data: dict[str, Any]) -> str:
    """``file`` (command, commit, machine, date) as the result file records them."""
    import re

    command = " ".join(str(data.get("command") or "command not recorded").split()).replace("`", "'")
    commit = re.sub(r"\b([0-9a-f]{7})[0-9a-f]{33}\b", r"\1", str(data.get("git_commit") or "commit not recorded"))
    machine = data.get("machine")
    if isinstance(machine, dict):
        machine = ", ".join(str(x) for x in (machine.get("cpu"), f"{machine.get('cores')} cores") if x)
    date = str(data.get("date") or "date not recorded")[:10]
    return f"`benchmarks/results/{data['_file']}` (`{command}`, {commit}, {machine or 'machine not recorded'}, {date})"


def sources(*reports: dict[str, Any]) -> str:
    """The line naming every file a table read."""
    return ("Source: " if len(reports) == 1 else "Sources: ") + "; ".join(provenance(r) for r in reports) + "."


def newest(pattern: str, need: Callable[[dict[str, Any]], bool] = lambda d: True, what: str = "") -> dict[str, Any]:
    """The newest file of ``benchmarks/results/<pattern>`` that satisfies ``need`` (by its date, then name)."""
    found = []
    for path in RESULTS.glob(pattern):
        data = _load(path)
        if need(data):
            found.append((str(data.get("date", "")), path.name, data))
    if not found:
        raise FileNotFoundError(f"benchmarks/results/{pattern}{' (' + what + ')' if what else ''}: no result file")
    return max(found, key=lambda t: (t[0], t[1]))[2]


def _fair(data: dict[str, Any]) -> bool:
    return bool(data.get("training_pool")) and "datasets" in data


def _sample(data: dict[str, Any]) -> bool:
    """A benchmark-sample report (tuning and test halves), not a gold one."""
    return "datasets" in data and all("halves" in ds for ds in data["datasets"])


def _gold(data: dict[str, Any]) -> bool:
    return "gold_guide" in data and "datasets" in data


def _cell(value: float, best: float | None) -> str:
    if value != value:  # NaN: not measured
        return "–"
    text = f"{value:.2f}"
    return f"**{text}**" if best is not None and abs(value - best) < 1e-9 else text


def _row(cells: list[float]) -> list[str]:
    best = max((c for c in cells if c == c), default=None)
    return [_cell(c, best) for c in cells]


def _sample_table(part: str) -> str:
    report = newest("extraction-*.json", lambda d: _fair(d) and _sample(d), "bench_extraction.py --supervised")
    methods = [m for m in ZERO_SHOT + SUPERVISED + ZERO_SHOT_LLM + LORA
               if any(m in row["methods"] for ds in report["datasets"] for row in ds["fields"].values())]
    chosen = report.get("selection", {})
    head = ["dataset", "field (gold column)", "n", *(NAMES[m] for m in methods)]
    if part == "tune":
        head.append("chosen on this half")
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for ds in report["datasets"]:
        for f, row in ds["fields"].items():
            res = row["methods"]
            cells = [res[m][part]["acc"] if m in res and res[m][part]["n"] else float("nan") for m in methods]
            n = res["majority"][part]["n"]
            line = [DATASET[ds["dataset"]], f"{f} ({row['source_column']})", str(n), *_row(cells)]
            if part == "tune":
                line.append(NAMES.get(chosen.get(f, {}).get("method", ""), chosen.get(f, {}).get("method", "")))
            lines.append("| " + " | ".join(line) + " |")
    half = "test half" if part == "test" else "tuning half"
    merged = report.get("merged_from", {}).get("report")
    if part == "tune":  # where the packaged field_sources.toml overrides this half's choice, say so
        from atelier.enrich.hybrid import load_sources

        packaged = load_sources()
        for f, row in chosen.items():
            now = packaged.source(f).method
            if now != row["method"]:
                lines.append("")
                lines.append(f"`field_sources.toml` uses {NAMES.get(now, now)} for {f}, not the {half}'s "
                             f"{NAMES.get(row['method'], row['method'])}: see the comment there.")
    lines.append("")
    earlier = [_load(RESULTS / Path(merged).name)] if merged else []
    lines.append(f"Accuracy on the {half}; best per row in bold; 50 items a catalogue, so one item is 0.02"
                 + ("; the zero-shot LLM columns were measured on the same items in the second file" if merged else "")
                 + ". " + sources(report, *earlier))
    return "\n".join(lines)


def extraction_heldout() -> str:
    """Every method, per field, on the benchmark sample's test half."""
    return _sample_table("test")


def extraction_tuning() -> str:
    """Every method, per field, on the tuning half, with the default it chose."""
    return _sample_table("tune")


def _pooled(report: dict[str, Any], part: str) -> dict[str, dict[str, tuple[int, int]]]:
    """{field: {method: (correct, n)}} summed over catalogues for one part of a sample report."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    for ds in report["datasets"]:
        for f, row in ds["fields"].items():
            for m, res in row["methods"].items():
                c, n = out.setdefault(f, {}).get(m, (0, 0))
                out[f][m] = (c + res[part]["correct"], n + res[part]["n"])
    return out


def extraction_choice() -> str:
    """Per field, pooled over both catalogues: the best zero-shot, supervised and LLM method on the tuning half
    (where the default is chosen) and the same methods on the test half, with what field_sources.toml uses."""
    from atelier.enrich.hybrid import load_sources

    report = newest("extraction-*.json", lambda d: _fair(d) and _sample(d), "bench_extraction.py --supervised")
    packaged = load_sources()
    tune, test = _pooled(report, "tune"), _pooled(report, "test")
    head = ["field", "best zero-shot (tuning)", "best supervised (tuning)", "best LLM (tuning)", "chosen",
            "`field_sources.toml`", "same three on the test half"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for f, row in report["selection"].items():
        picks = [(row["baseline"], row["baseline_acc"]), (row.get("best_supervised"), row.get("best_supervised_acc")),
                 (row.get("best_llm"), row.get("best_llm_acc"))]
        shown = [f"{NAMES[m]} {a:.2f}" if m else "–" for m, a in picks]
        on_test = [f"{test[f][m][0] / test[f][m][1]:.2f}" if m and test[f][m][1] else "–" for m, _ in picks]
        now = packaged.source(f).method
        lines.append("| " + " | ".join([f, *shown, NAMES.get(row["method"], row["method"]), NAMES.get(now, now),
                                         " / ".join(on_test)]) + " |")
    n_tune = {f: max(n for _, n in ms.values()) for f, ms in tune.items()}
    lines.append("")
    lines.append("Pooled over H&M and Myntra (tuning items per field: "
                 + ", ".join(f"{f} {n}" for f, n in n_tune.items()) + "). An LLM method becomes the default only "
                 "where it beats both the zero-shot and the supervised baselines on the tuning half; ties go to the "
                 "cheaper method. " + sources(report))
    return "\n".join(lines)


GOLD_FIELDS = ["category", "color", "gender", "print", "season", "occasion"]


def extraction_gold() -> str:
    """The gold test split: zero-shot and supervised baselines, GPU-scored LoRA on every product, CPU LoRA and
    the zero-shot LLM variants on the LLM subset beside the best baseline there."""
    report = newest("extraction-gold-*.json", lambda d: _fair(d) and _gold(d), "bench_extraction.py gold --supervised")
    older = None
    with contextlib.suppress(FileNotFoundError):  # the first gold run's zero-shot LLM variants, same subset
        older = newest("extraction-gold-*.json", lambda d: not _fair(d) and _gold(d) and any(
            "loglik" in row["methods"] for ds in d["datasets"] for row in ds["fields"].values()))
    full = [*ZERO_SHOT, *SUPERVISED, "loglik_lora_gpu"]
    sub = ["loglik_lora", *ZERO_SHOT_LLM]
    head = ["dataset", "field", "n", *(NAMES[m] for m in full), NAMES["hybrid"], "n (LLM subset)",
            *(NAMES[m] for m in sub), "best non-LLM, same subset"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    old_ds = {d["dataset"]: d for d in older["datasets"]} if older else {}
    for ds in report["datasets"]:
        prev = old_ds.get(ds["dataset"])
        same_subset = prev is not None and prev.get("llm_subset") == ds.get("llm_subset")
        for f in GOLD_FIELDS:
            row = ds["fields"].get(f)
            if row is None:
                continue
            res = row["methods"]
            n = res["majority"]["test"]["n"]
            cells = [res[m]["test"]["acc"] if m in res and res[m]["test"]["n"] else float("nan") for m in full]
            default = res["hybrid"]["test"]["acc"] if "hybrid" in res else float("nan")
            sub_cells = []
            earlier = prev["fields"].get(f, {}).get("methods", {}) if same_subset and prev else {}
            for m in sub:
                src = res if m in res else earlier
                sub_cells.append(src[m]["llm_subset"]["acc"] if m in src and src[m]["llm_subset"]["n"]
                                 else float("nan"))
            non_llm = [res[m]["llm_subset"]["acc"] for m in ZERO_SHOT + SUPERVISED
                       if m in res and res[m]["llm_subset"]["n"]]
            best_sub = max(non_llm, default=float("nan"))
            shown_sub = _row([*sub_cells, best_sub])
            lines.append("| " + " | ".join([DATASET[ds["dataset"]], f, str(n), *_row(cells), _cell(default, None),
                                             str(row.get("llm_subset_n", "")), *shown_sub]) + " |")
    lines.append("")
    lines.append("Gold test split" + ("; the zero-shot LLM columns come from the second file, same subset"
                                      if older else "")
                 + ". A prediction is right when it is one of the gold values; null gold values are skipped. "
                 "`hybrid` default: what field_sources.toml answered when the file was written. The LLM subset is the "
                 "first test products by item id; the last column is the best zero-shot or supervised method there. "
                 + sources(report, *([older] if older else [])))
    return "\n".join(lines)


def extraction_lora_pool() -> str:
    """Evaluation items with a twin in the LoRA's training pool, and the LoRA's GPU accuracy, first pool vs fair."""
    fair = newest("lora-gpu-*.json", lambda d: "pool" in d, "bench_lora_gpu.py run with a de-duplicated pool")
    first = _load(RESULTS / "lora-gpu-h200-2026-11-27.json")
    head = ["dataset", "evaluation set", "n", "same text in pool (first → fair)", "same group_id (first → fair)",
            "field", "LoRA acc., first adapter", "LoRA acc., fair adapter"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for ds, info in fair["pool"].items():
        for key, name in (("tune", "sample_tune"), ("test", "sample_test"), ("gold_test", "gold_test")):
            new, old = info["leaks"].get(key), info["first_adapter_pool"]["leaks"].get(key)
            if new is None:
                continue
            acc_new = fair["accuracy_lora"].get(f"{ds}/{name}", {})
            acc_old = first["accuracy_lora"].get(f"{ds}/{name}", {})
            for i, f in enumerate(acc_new):
                cn, nn = acc_new[f]
                co, no = acc_old.get(f, (0, 0))
                lead = ([DATASET[ds], key, str(new["n"]),
                         f"{old['same_text_in_pool']} → {new['same_text_in_pool']}",
                         f"{old['same_group_in_pool']} → {new['same_group_in_pool']}"] if i == 0 else [""] * 5)
                lines.append("| " + " | ".join([*lead, f, f"{co / no:.2f}" if no else "–",
                                                 f"{cn / nn:.2f}" if nn else "–"]) + " |")
    lines.append("")
    lines.append("Both adapters scored on one H200 (bf16); same recipe, only the training pool differs (first "
                 "file: the first adapter, id-only exclusion). " + sources(first, fair))
    return "\n".join(lines)


def extraction_agreement() -> str:
    """The second annotation pass against the gold set, per field."""
    report = newest("extraction-gold-agreement-*.json")
    head = ["dataset", "field", "items labelled by both", "second value among the gold values",
            "Cohen's kappa (first values)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for key, row in report["fields"].items():
        ds, f = key.split("/", 1)
        kappa = row["kappa_first"]
        lines.append(f"| {DATASET[ds]} | {f} | {row['n_both']} | {row['agree_any']} ({row['agree_share']:.2f}) | "
                     + (f"{kappa:.2f}" if kappa is not None else "–") + " |")
    lines.append("")
    lines.append(f"{report['how'][0].upper()}{report['how'][1:]}. " + sources(report))
    return "\n".join(lines)


TABLES: dict[str, Callable[[], str]] = {
    "extraction-heldout": extraction_heldout,
    "extraction-tuning": extraction_tuning,
    "extraction-choice": extraction_choice,
    "extraction-gold": extraction_gold,
    "extraction-lora-pool": extraction_lora_pool,
    "extraction-agreement": extraction_agreement,
}


def main(argv: list[str]) -> None:
    """Print the named tables (all by default)."""
    for name in argv or list(TABLES):
        print(f"<!-- {name} -->\n{TABLES[name]()}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
