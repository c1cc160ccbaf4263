"""``atelier serve``: options reach uvicorn and the worker processes' environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from atelier.cli import app


def test_serve_passes_options_to_uvicorn(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import uvicorn

    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: calls.append((a, kw)))  # no server in a unit test
    monkeypatch.setenv("ATELIER_API_KEY", "k")
    for name in ("ATELIER_RUN_DIR", "ATELIER_SERVE_DATASET"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # restored after the test
    result = CliRunner().invoke(app, ["serve", "--port", "8123", "--workers", "2", "-d", "rtr",
                                      "--run-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    args, kwargs = calls[0]
    assert args == ("atelier.serve.app:app_from_env",)
    assert kwargs["factory"] is True and kwargs["port"] == 8123 and kwargs["workers"] == 2
    assert kwargs["host"] == "127.0.0.1"
    assert os.environ["ATELIER_SERVE_DATASET"] == "rtr" and os.environ["ATELIER_RUN_DIR"] == str(tmp_path.resolve())
    assert "need the X-API-Key header" in result.output and "k" not in result.output.split()


def test_serve_help() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0 and "--workers" in result.output
