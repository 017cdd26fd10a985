"""Run a notebook of the series with papermill and read what it recorded."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nbformat
import pytest

from helpers.notebook import RECORD_ENV
from helpers.paths import BUILD_ENV, REPO_ROOT


def execute_recording(
    notebook: Path,
    out: Path,
    parameters: dict[str, Any],
    *,
    cell_timeout: float | None = None,
    build: Path | None = None,
) -> dict[str, Any]:
    """Run *notebook* into *out* with papermill; return what it recorded.

    The kernel finds its record file (``out/record.json``) in
    FCLAB_RECORD, its build folder (*build*, else *out*) in FCLAB_BUILD,
    and this checkout first on PYTHONPATH, so it imports the helpers
    even without an installed project. ``_executed`` in the returned
    record names the executed copy, which lands in *out*.
    """
    import papermill

    recorded = out / "record.json"
    executed = out / notebook.name
    with pytest.MonkeyPatch.context() as env:
        env.setenv(RECORD_ENV, str(recorded))
        env.setenv(BUILD_ENV, str(build or out))
        env.setenv("PYTHONPATH", str(REPO_ROOT), prepend=os.pathsep)
        papermill.execute_notebook(
            notebook, executed, parameters=parameters,
            kernel_name="python3", cwd=notebook.parent,
            progress_bar=False, execution_timeout=cell_timeout,
        )
    data: dict[str, Any] = json.loads(recorded.read_text())
    data["_executed"] = str(executed)
    return data


def error_outputs(executed: str | Path) -> list[str]:
    """The errors an executed copy shows, as ``"Name: value"`` lines."""
    nb = nbformat.read(executed, as_version=4)
    return [
        f"{o.ename}: {o.evalue}" for c in nb.cells if c.cell_type == "code"
        for o in c.outputs if o.output_type == "error"
    ]
