from __future__ import annotations

from pathlib import Path

import pytest

from atelier.config import Settings, SettingsError, _default_data_dir


def test_shared_data_found_from_any_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    found_here = _default_data_dir()
    monkeypatch.chdir(tmp_path)
    assert _default_data_dir() == found_here  # falls back to the checkout's ../shared/data


def test_clear_errors_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="ATELIER_DATA_DIR"):
        Settings(data_dir=None).require_data_dir()
    with pytest.raises(SettingsError, match="is not a folder"):
        Settings(data_dir=tmp_path / "missing").require_data_dir()


def test_env_and_database_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ATELIER_RUN_DIR", str(tmp_path / "r"))
    monkeypatch.setenv("DATABASE_URL", "postgresql://db.example/atelier")
    settings = Settings()
    assert settings.run_dir == (tmp_path / "r").resolve()
    assert settings.database_url == "postgresql://db.example/atelier"
    assert settings.paths.dataset("hm") == (tmp_path / "r" / "data" / "hm").resolve()
