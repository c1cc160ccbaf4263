"""`atelier run --source` on catalogues the project has never seen: every stage the data allows, end to end.

A generated shop (products with titles, descriptions, colourway groups and prices; two weeks of orders in
which shoppers buy within a style) runs the whole pipeline with a default cut taken from the data; the
same catalogue without orders runs ingest, vocabulary, item tower and index, and `atelier similar` answers.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from atelier.cli import app

STYLES = ["linen shirt", "wrap dress", "denim jacket", "wool coat", "pleated skirt", "running shoe"]
COLOURS = ["black", "white", "navy", "red", "green"]


def _shop(folder: Path, with_orders: bool) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for s, style in enumerate(STYLES):
        for v in range(12):
            for colour in COLOURS[: 2 + v % 3]:
                rows.append({"sku": f"S{s}V{v}-{colour}", "name": f"{colour} {style} {v}", "group": f"S{s}V{v}",
                             "text": f"A {colour} {style} in a relaxed fit, model {v}.", "price": f"{20 + 5 * v}"})
    with (folder / "products.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    spec = ('name = "{name}"\n[items]\npath = "products.csv"\nitem_id = "sku"\ntitle = "name"\n'
            'description = "text"\ngroup_id = "group"\nprice = "price"\n')
    if with_orders:
        by_style = [[r["sku"] for r in rows if r["sku"].startswith(f"S{s}V")] for s in range(len(STYLES))]
        with (folder / "orders.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["customer", "sku", "day"])
            for user in range(240):
                style = by_style[user % len(STYLES)]  # each shopper keeps to one style
                for day in sorted(rng.choice(14, size=int(rng.integers(2, 5)), replace=False)):
                    for sku in rng.choice(style, size=int(rng.integers(1, 3)), replace=False):
                        writer.writerow([f"c{user}", sku, f"2024-03-{day + 1:02d}"])
        spec += '[interactions]\npath = "orders.csv"\nuser_id = "customer"\nitem_id = "sku"\ntimestamp = "day"\n'
    path = folder / "shop.toml"
    path.write_text(spec.format(name="shop" if with_orders else "lookbook"))
    return path


@pytest.mark.parametrize("with_orders", [True, False], ids=["with-orders", "catalogue-only"])
def test_run_on_a_custom_catalogue(tmp_path: Path, with_orders: bool) -> None:
    source = _shop(tmp_path, with_orders)
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["run", "--source", str(source), "--run-dir", str(runs), "--tower-epochs", "1"])
    assert result.exit_code == 0, result.output
    name = "shop" if with_orders else "lookbook"
    assert (runs / "models" / f"item_tower-{name}.pt").is_file() and (runs / "index" / f"{name}.json").is_file()
    similar = CliRunner().invoke(app, ["similar", "S0V0-black", "-d", name, "--run-dir", str(runs), "-k", "5"])
    assert similar.exit_code == 0, similar.output
    if not with_orders:
        assert not (runs / "models" / f"user_tower-{name}.pt").exists() and "evaluation" not in result.output
        return
    # the whole pipeline: a default cut from the data (14 days -> the last 3 test), both towers, the ranker,
    # the report with the rules, the served chain and the cart cohort; nothing filed as a main-job result
    assert (runs / "models" / f"user_tower-{name}.pt").is_file() and (runs / "models" / f"ranker-{name}.pt").is_file()
    import json

    report = json.loads((runs / "reports" / f"{name}.json").read_text())
    assert report["split"]["cut"] == "2024-03-12" and report["split"]["validation"] is True
    assert {"rules", "item-tower", "two-tower", "atelier"} <= set(report["models"])
    assert "result file" not in result.output
    rules = report["models"]["rules"]["cohorts"]["with_history"]["recall@100"]
    assert rules > report["models"]["random"]["cohorts"]["with_history"]["recall@100"]
