"""Finding the official API description: the variable, then the cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.spec import SPEC_ENV, find_api_spec


def _release_spec(cache: Path, version: str) -> Path:
    """Lay out a spec file where a fetched release keeps it."""
    folder = cache / "artifacts" / f"official-v{version}" / "release"
    folder.mkdir(parents=True)
    path = folder / f"firecracker_spec-v{version}.yaml"
    path.write_text("swagger: '2.0'\n")
    return path


def test_variable_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    named = tmp_path / "api.yaml"
    named.write_text("swagger: '2.0'\n")
    _release_spec(tmp_path, "1.16.1")
    monkeypatch.setenv(SPEC_ENV, str(named))
    assert find_api_spec(tmp_path) == named


def test_variable_naming_nothing_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SPEC_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(FileNotFoundError, match=SPEC_ENV):
        find_api_spec(tmp_path)


def test_newest_fetched_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SPEC_ENV, raising=False)
    _release_spec(tmp_path, "1.9.0")
    newest = _release_spec(tmp_path, "1.16.1")
    assert find_api_spec(tmp_path) == newest


def test_none_without_either(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SPEC_ENV, raising=False)
    assert find_api_spec(tmp_path) is None
