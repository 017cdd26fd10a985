"""Notebook 02 (boot through the API) and the notebook utilities."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import nbformat
import pytest
from notebook_runs import error_outputs, execute_recording
from procfs import alive

from helpers.errors import LabError
from helpers.notebook import NoErrorRaised, expect_error, record
from helpers.paths import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "02_boot.ipynb"
SLIDE_TYPES = {"slide", "subslide", "fragment", "skip", "notes"}

# Small and patient: the fewest resources, time for QEMU without KVM.
PARAMETERS = {"VCPUS": 1, "MEM_MIB": 128, "BOOT_TIMEOUT": 300,
              "COMMAND_TIMEOUT": 120}
# Seconds one cell may run before the run counts as stuck: above the
# notebook's own timeouts, so those fire first and say what hung.
CELL_TIMEOUT_S = 900


# -- the utilities ---------------------------------------------------------


def test_expect_error_catches_and_keeps_the_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The expected error is printed and kept; the block does not raise."""
    with expect_error(LabError) as caught:
        raise LabError("bad call\nwhat to do")

    assert caught.kind == "LabError"
    assert caught.text == "bad call\nwhat to do"
    assert "Expected error (LabError)" in capsys.readouterr().out
    assert "> what to do" in caught._repr_markdown_()


def test_expect_error_wraps_long_lines_at_word_boundaries(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A long message fits a slide; words, paths and indents survive."""
    path = "/run/netns/" + "x" * 90
    message = ("word " * 30).strip() + "\n  then run " + path
    with expect_error(LabError):
        raise LabError(message)

    lines = capsys.readouterr().out.splitlines()[1:]
    assert all(len(line) <= 72 or path in line for line in lines)
    assert " ".join(w for line in lines for w in line.split()) == " ".join(
        message.split())
    assert any(line.strip() == path for line in lines)
    assert lines[-2].startswith("      then run")


def test_expect_error_lets_other_errors_through() -> None:
    """An error of another kind is a real failure."""
    with pytest.raises(KeyError), expect_error(LabError):
        raise KeyError("not expected")


def test_expect_error_fails_when_nothing_fails() -> None:
    """A block that succeeds breaks the lesson, so it raises."""
    with pytest.raises(NoErrorRaised), expect_error(LabError):
        pass


def test_record_writes_json_and_starts_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values accumulate in FCLAB_RECORD; a stale file is replaced."""
    target = tmp_path / "records" / "nb.json"
    target.parent.mkdir()
    target.write_text(json.dumps({"stale": 1}))
    monkeypatch.setenv("FCLAB_RECORD", str(target))

    record("state", "Running")
    record("timings", {"ready": 12})

    assert json.loads(target.read_text()) == {
        "state": "Running", "timings": {"ready": 12}}
    assert list(target.parent.iterdir()) == [target]


# -- the committed notebook --------------------------------------------------


def test_notebook_is_committed_clean_with_slide_metadata() -> None:
    """No outputs, a slide type on every cell, UPPER_CASE parameters."""
    nb = nbformat.read(NOTEBOOK, as_version=4)

    for cell in nb.cells:
        assert cell.metadata["slideshow"]["slide_type"] in SLIDE_TYPES
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
            assert len(cell.source.splitlines()) <= 8, cell.source
    [parameters] = [c for c in nb.cells
                    if "parameters" in c.metadata.get("tags", [])]
    for node in ast.parse(parameters.source).body:
        assert isinstance(node, ast.Assign)
        [target] = node.targets
        assert isinstance(target, ast.Name) and target.id.isupper()
        ast.literal_eval(node.value)
    assert set(PARAMETERS) <= {
        n.targets[0].id for n in ast.parse(parameters.source).body
        if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)}


# -- the notebook, executed --------------------------------------------------


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the notebook once with papermill; return what it recorded."""
    return execute_recording(NOTEBOOK, tmp_path_factory.mktemp("nb02"),
                             PARAMETERS, cell_timeout=CELL_TIMEOUT_S)


@pytest.mark.notebook
@pytest.mark.vm
def test_states_seen_before_and_after_boot(executed: dict[str, Any]) -> None:
    """GET / says Not started, then Running; after shutdown, no answer."""
    assert executed["state_before"] == "Not started"
    assert executed["state_after"] == "Running"
    assert executed["state_after_shutdown"] == "no answer"
    assert executed["backend"] in ("firecracker", "emulator")


@pytest.mark.notebook
@pytest.mark.vm
def test_both_deliberate_failures_say_why(executed: dict[str, Any]) -> None:
    """ht_enabled is an unknown field; boot-source after start is refused."""
    assert "400" in executed["ht_enabled_error"]
    assert "unknown field" in executed["ht_enabled_error"]
    assert "ht_enabled" in executed["ht_enabled_error"]
    assert ("not supported after starting the microVM"
            in executed["post_boot_error"])


@pytest.mark.notebook
@pytest.mark.vm
def test_guest_came_up_and_answered(executed: dict[str, Any]) -> None:
    """The marker arrived and commands ran inside the guest."""
    assert executed["marker_seen"] is True
    output = executed["guest_output"]
    assert output["uname"].startswith("Linux hello ")
    assert output["cpus"] == str(PARAMETERS["VCPUS"])
    assert output["free"].splitlines()[0].split()[0] == "total"
    timings = executed["timings_ms"]
    assert timings["spawn"] <= timings["api_ready"] <= 0 <= timings["ready"]


@pytest.mark.notebook
@pytest.mark.vm
def test_nothing_is_left_behind(executed: dict[str, Any]) -> None:
    """Exit code 0, no VMM process, no working directory."""
    assert executed["exit_code"] == 0
    assert executed["leftovers"] == {
        "VMM running": False, "working directory exists": False}
    assert not alive(executed["vmm_pid"])


@pytest.mark.notebook
@pytest.mark.vm
def test_executed_copy_has_no_errors(executed: dict[str, Any]) -> None:
    """Every cell ran without an error output."""
    assert error_outputs(executed["_executed"]) == []
