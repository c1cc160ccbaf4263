"""The README's result tables are generated from result files (``benchmarks/tables.py``) and must match them."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import tables


def test_documents_match_their_result_files() -> None:
    """README.md and benchmarks/README.md are what the generator writes (run it to fix a failure)."""
    stream = io.StringIO()
    status = tables.regenerate(tables.DOCUMENTS, *tables.all_tables(), check=True, stream=stream)
    assert status == 0, ("a result table is stale or cannot be generated; run "
                         "`.venv/bin/python -m benchmarks.tables`:\n" + stream.getvalue())


# --------------------------------------------------------------------------- marker replacement

DOC = """# Title

Prose before.

<!-- table:alpha -->
| stale |
<!-- /table:alpha -->

Prose between.

<!-- table:beta -->
<!-- /table:beta -->
Prose after.
"""


def builders() -> dict[str, tables.Builder]:
    return {"alpha": lambda: "| a |\n|---|\n| 1 |\n\nSource: `a.json`.", "beta": lambda: "| b |\n|---|\n| 2 |"}


def test_markers_are_replaced_and_everything_else_kept() -> None:
    text, errors = tables.render(DOC, builders())
    assert errors == []
    assert text == """# Title

Prose before.

<!-- table:alpha -->

| a |
|---|
| 1 |

Source: `a.json`.

<!-- /table:alpha -->

Prose between.

<!-- table:beta -->

| b |
|---|
| 2 |

<!-- /table:beta -->
Prose after.
"""
    assert tables.render(text, builders()) == (text, [])  # idempotent: a second run changes nothing


def test_unknown_names_and_unpaired_markers_are_errors() -> None:
    doc = ("<!-- table:gamma -->\nold\n<!-- /table:gamma -->\n<!-- /table:alpha -->\n"
           "<!-- table:alpha -->\n<!-- table:beta -->\n<!-- /table:beta -->\n")
    text, errors = tables.render(doc, builders(), where="doc.md")
    assert len(errors) == 3, errors
    assert "doc.md: line 1: table 'gamma'" in errors[0] and "unknown table 'gamma'" in errors[0]
    assert "<!-- /table:alpha --> has no opening marker" in errors[1]
    assert "table 'alpha' has no <!-- /table:alpha -->" in errors[2]
    assert "old" in text and "| b |" in text  # the unknown table keeps its content; the good one is rebuilt


def test_a_failing_builder_keeps_the_old_table_and_is_reported() -> None:
    def broken() -> str:
        raise tables.MissingResultError("benchmarks/results/x-2026-01-01.json: result file not found")

    text, errors = tables.render(DOC, {**builders(), "alpha": broken})
    assert "| stale |" in text and "| b |" in text
    assert len(errors) == 1 and "x-2026-01-01.json: result file not found" in errors[0]


def test_check_mode_reports_a_stale_document_and_writes_nothing(tmp_path: Path) -> None:
    doc = tmp_path / "README.md"
    doc.write_text(DOC)
    stream = io.StringIO()
    assert tables.regenerate([doc], builders(), check=True, stream=stream) == 1
    assert doc.read_text() == DOC
    assert "-| stale |" in stream.getvalue() and "+| a |" in stream.getvalue() and "is stale" in stream.getvalue()
    assert tables.regenerate([doc], builders(), stream=io.StringIO()) == 0
    assert tables.regenerate([doc], builders(), check=True, stream=io.StringIO()) == 0


def test_a_missing_extra_module_is_skipped_but_its_markers_fail() -> None:
    found, missing = tables.all_tables(modules=("benchmarks.no_such_tables_module",))
    assert set(found) == set(tables.TABLES)
    assert missing == {"benchmarks.no_such_tables_module": "benchmarks.no_such_tables_module does not exist yet"}
    _, errors = tables.render("<!-- table:extraction-x -->\n<!-- /table:extraction-x -->\n", found, missing)
    assert len(errors) == 1 and "does not exist yet" in errors[0]


# --------------------------------------------------------------------------- result files


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty results folder that the builders read instead of benchmarks/results."""
    folder = tmp_path / "results"
    folder.mkdir()
    monkeypatch.setattr(tables, "RESULTS", folder)
    return folder


def cohort(value: float, cart: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {"map@12": value, "recall@12": value, "ndcg@12": value, "hitrate@12": value,
                           "recall@100": 2 * value, "users": 10.0}
    if cart:
        row["cold_items"] = {"recall@100": 0.5, "pairs": 4}
    return row


def report(dataset: str, date: str, new_format: bool) -> dict[str, Any]:
    """A main-job report: the format ``atelier evaluate`` writes now, or the older one (no cart, no sources)."""
    cohorts = ["all", "with_history", "without_history", *(["cart"] if new_format else [])]
    models = {name: {"cohorts": {c: cohort(v, c == "cart") for c in cohorts},
                     "cold_items": {"recall@12": 0.0, "recall@100": v / 10, "pairs": 7},
                     "coverage@12": 0.1, "fit_seconds": 1.0, "recommend_seconds": 1.0}
              for name, v in (("popularity", 0.01), ("rules", 0.03), ("atelier", 0.02))}
    split: dict[str, Any] = {"dataset": dataset, "source": "default cut", "train_days": ["2020-09-16", "2020-09-18"],
                             "test_days": ["2020-09-19", "2020-09-20"], "train_interactions": 100,
                             "scored_users": 30, "users_with_history": 10, "cold_test_items": 5}
    data: dict[str, Any] = {"dataset": dataset, "split": split, "git_commit": "abcdef1", "machine": "test box",
                            "created": f"{date}T10:00:00+00:00", "command": "atelier run", "models": models}
    if new_format:
        split.update(validation=True, cart_users=8)
        data["sources"] = {"own": {c: {"recall@50": 0.1, "recall@100": 0.2, "recall@200": 0.3, "users": 10}
                                   for c in ("with_history", "without_history", "cart")}}
        data["chain_sources"] = {
            "union": {c: {"recall@all": 0.6, "candidates": 250.0, "users": 10} for c in ("with_history", "cart")},
            "near:item_tower": {c: {"recall@50": 0.04, "recall@100": 0.05, "recall@200": 0.06, "users": 10}
                                for c in ("with_history", "without_history", "cart")}}
    return data


def write(folder: Path, name: str, data: dict[str, Any]) -> None:
    (folder / name).write_text(json.dumps(data))


def test_a_missing_result_file_is_an_error_naming_it(results: Path) -> None:
    with pytest.raises(tables.MissingResultError, match=r"main-job-<date>-hm\.json: no result file"):
        tables.TABLES["main-hm"]()
    with pytest.raises(tables.MissingResultError, match=r"hm-item-tower-ablation\.json: result file not found"):
        tables.TABLES["item-tower-ablation"]()
    doc = results.parent / "doc.md"
    doc.write_text("<!-- table:main-hm -->\n<!-- /table:main-hm -->\n")
    stream = io.StringIO()
    assert tables.regenerate([doc], tables.TABLES, check=True, stream=stream) == 1
    assert "main-job-<date>-hm.json: no result file" in stream.getvalue()


def test_the_newest_file_by_the_date_in_its_name_is_read(results: Path) -> None:
    write(results, "main-job-2026-11-27-hm.json", report("hm", "2026-11-27", new_format=False))
    write(results, "main-job-2026-12-03-hm.json", report("hm", "2026-12-03", new_format=True))
    write(results, "main-job-2026-12-09-rtr.json", report("rtr", "2026-12-09", new_format=True))
    out = tables.TABLES["main-hm"]()
    assert "main-job-2026-12-03-hm.json` (`atelier run`, abcdef1, test box, 2026-12-03)" in out
    assert "validation split" in out and "8 cart users" in out
    # every model, the cart cohort and its recall; the best value of a column in bold
    best = " | ".join(["**0.0300** | **0.0600**"] * 4)
    assert f"| `rules` | {best} | **0.0030** |" in out
    assert "| `atelier` |" in out and "| `popularity` |" in out
    sources = tables.TABLES["sources-hm"]()
    assert "| `own` (rules) | **0.100** | **0.200** | **0.300** |" in sources
    assert "| `near:item_tower` (chain) | 0.040 | 0.050 | 0.060 |" in sources
    assert "union (every candidate the ranker orders) finds 0.600 of the history purchases with 250 candidates" \
        in sources


def test_an_older_report_shows_dashes_for_what_it_lacks(results: Path) -> None:
    write(results, "main-job-2026-11-27-hm.json", report("hm", "2026-11-27", new_format=False))
    out = tables.TABLES["main-hm"]()
    assert "| `rules` | **0.0300** | **0.0600** | **0.0300** | **0.0600** | **0.0300** | **0.0600** | – | – |" in out
    assert "– cart users" in out
    assert "predates per-source recall" in tables.TABLES["sources-hm"]()


def test_tagged_files_are_not_taken_for_the_untagged_run(results: Path) -> None:
    write(results, "perf-threads-2026-11-27.json", {"command": "now", "one_thread": {}, "two_threads": {}})
    write(results, "perf-threads-2026-12-01-before.json", {"command": "before", "one_thread": {}, "two_threads": {}})
    assert tables.newest("perf-threads").path.name == "perf-threads-2026-11-27.json"
    assert tables.newest("perf-threads", "-before").path.name == "perf-threads-2026-12-01-before.json"
