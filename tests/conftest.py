"""Shared fixtures: paths to the real benchmark data and small slices of it in temp folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from atelier.config import _default_data_dir
from tests.helpers import write_head

DATA_DIR = Path(os.environ.get("ATELIER_DATA_DIR") or _default_data_dir() or "../shared/data")


def _needs(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"benchmark data not found at {path}")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The read-only shared benchmark data folder."""
    return _needs(DATA_DIR)




@pytest.fixture(scope="session")
def hm_slice(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """An H&M folder with the first 3,000 articles and the first 5,000 transactions."""
    folder = tmp_path_factory.mktemp("hm")
    write_head(_needs(data_dir / "hm" / "articles.csv.gz"), folder / "articles.csv.gz", 3000)
    write_head(data_dir / "hm" / "transactions.csv.gz", folder / "transactions.csv.gz", 5000)
    return folder


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test gets its own run folder and no stray settings from the developer's shell."""
    for key in list(os.environ):
        if key.startswith("ATELIER_") and key != "ATELIER_DATA_DIR":
            monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("ATELIER_RUN_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from atelier.config import get_settings

    get_settings.cache_clear()
