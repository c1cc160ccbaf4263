"""Exit codes and messages a script can rely on: 0 success, 1 a stage failed, 2 bad usage."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from atelier.cli import app

runner = CliRunner()


def test_help_lists_the_pipeline() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("ingest", "vocab", "train", "encode", "index", "similar", "evaluate", "run"):
        assert command in result.output


def test_unknown_dataset_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["ingest", "-d", "amazon", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown dataset" in result.output


def test_missing_data_folder_fails_with_the_setting_named(tmp_path: Path) -> None:
    result = runner.invoke(app, ["ingest", "--data-dir", str(tmp_path / "nope"), "--run-dir", str(tmp_path)])
    assert result.exit_code == 1 and "ATELIER_DATA_DIR" in result.output


def test_custom_ingest_then_vocab(tmp_path: Path) -> None:
    (tmp_path / "items.csv").write_text("sku,name\nA1,Linen shirt\nA2,Wrap dress\n")
    (tmp_path / "shop.toml").write_text('name = "shop"\n[items]\npath = "items.csv"\nitem_id = "sku"\ntitle = "name"\n')
    result = runner.invoke(app, ["ingest", "--source", str(tmp_path / "shop.toml"), "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "shop" in result.output and (tmp_path / "r" / "data" / "shop" / "manifest.json").is_file()
    result = runner.invoke(app, ["vocab", "-d", "shop", "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "vocab" / "vocab.json").is_file()


def test_stage_without_its_inputs_says_what_to_run(tmp_path: Path) -> None:
    result = runner.invoke(app, ["vocab", "--run-dir", str(tmp_path)])
    assert result.exit_code == 1 and "atelier ingest" in result.output
    result = runner.invoke(app, ["encode", "--run-dir", str(tmp_path)])
    assert result.exit_code == 1 and "atelier train item" in result.output
    result = runner.invoke(app, ["similar", "0108775015", "--run-dir", str(tmp_path)])
    assert result.exit_code == 1 and "atelier index" in result.output
