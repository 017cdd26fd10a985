"""The host check: what it finds, what it blames, what it suggests."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import doctor
from helpers.doctor import LIMITED, MISSING, OK, Check


def test_missing_essential_tool_names_its_package() -> None:
    checks = doctor.check_tools(
        lambda cmd: None if cmd == "qemu-system-x86_64" else f"/bin/{cmd}"
    )
    tools = checks[0]
    assert tools.status == MISSING
    assert tools.fix == "sudo apt-get install -y qemu-system-x86"
    assert all(c.status == OK for c in checks[1:])


def test_missing_optional_tool_only_limits() -> None:
    checks = doctor.check_tools(
        lambda cmd: None if cmd == "chromium" else f"/bin/{cmd}"
    )
    by_name = {c.name: c for c in checks}
    assert by_name["system tools"].status == OK
    assert by_name["chromium"].status == LIMITED
    assert "browser tests" in by_name["chromium"].detail


def test_too_little_space_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert doctor.check_space(tmp_path).status == OK
    monkeypatch.setattr(doctor, "MIN_FREE_GIB", 1e9)
    low = doctor.check_space(tmp_path)
    assert low.status == MISSING
    assert "FCLAB_CACHE" in low.fix


def test_report_shows_fixes_only_for_problems() -> None:
    text = doctor.report([
        Check("fine", OK, "all good", "never shown"),
        Check("broken", MISSING, "gone", "install it"),
    ])
    assert "never shown" not in text
    assert "-> install it" in text


def test_this_host_can_run_the_series(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Here: tools installed, no Firecracker, so the emulator is chosen."""
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    assert "The series can run here" in out
    assert "backend" in out


def test_without_qemu_the_series_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # QEMU lives in /usr/bin, which an empty PATH hides.
    monkeypatch.setenv("PATH", str(tmp_path))
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert "cannot run until these are fixed: system tools, QEMU" in out
