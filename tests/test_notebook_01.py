"""Notebook 01 (what a microVM is made of), executed with papermill.

One run uses the offline guest; another fetches the same guest from a
mirror served on loopback, built with write_mirror from the first.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from httpfixtures import LoopbackServer
from notebook_runs import error_outputs, execute_recording

from helpers.artifacts import Artifacts, fetch_artifacts, write_mirror
from helpers.paths import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "01_download.ipynb"
SLIDE_TYPES = {"slide", "subslide", "fragment", "skip", "notes", "-"}
# Cells stay short enough to read on a slide.
MAX_CODE_LINES = 8
# A run reads and copies about 120 MiB; ten minutes means it is stuck.
CELL_TIMEOUT_S = 600


def _execute(out: Path, parameters: dict[str, Any]) -> dict[str, Any]:
    """Run the notebook into *out*; return its record and executed copy."""
    return execute_recording(NOTEBOOK, out, parameters,
                             cell_timeout=CELL_TIMEOUT_S)


@pytest.fixture(scope="module")
def local() -> Artifacts:
    """The offline guest, as the notebook's local run sees it."""
    return fetch_artifacts("local", progress=False)


@pytest.fixture(scope="module")
def local_run(
    tmp_path_factory: pytest.TempPathFactory, local: Artifacts,
) -> dict[str, Any]:
    """The notebook run with SOURCE = "local"."""
    return _execute(
        tmp_path_factory.mktemp("nb01-local"),
        {"SOURCE": "local", "PROGRESS": False},
    )


@pytest.fixture(scope="module")
def mirror(
    tmp_path_factory: pytest.TempPathFactory, local: Artifacts,
) -> Iterator[LoopbackServer]:
    """A mirror of the offline guest on a loopback port."""
    folder = tmp_path_factory.mktemp("nb01-mirror")
    write_mirror(folder, local)
    server = LoopbackServer(folder).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mirror_run(
    tmp_path_factory: pytest.TempPathFactory, mirror: LoopbackServer,
) -> dict[str, Any]:
    """The notebook run with SOURCE = "mirror", into an empty cache."""
    out = tmp_path_factory.mktemp("nb01-mirror-run")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FCLAB_CACHE", str(out / "cache"))
        return _execute(out, {
            "SOURCE": "mirror", "MIRROR_URL": mirror.url, "PROGRESS": False,
        })


def test_committed_clean_with_slide_metadata() -> None:
    """No outputs, a deliberate slide type everywhere, short cells."""
    nb = nbformat.read(NOTEBOOK, as_version=4)

    assert nb.cells[0].source.startswith("# 01 ")
    for cell in nb.cells:
        assert cell.metadata["slideshow"]["slide_type"] in SLIDE_TYPES
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
            assert len(cell.source.splitlines()) <= MAX_CODE_LINES
    [parameters] = [
        c for c in nb.cells if "parameters" in c.metadata.get("tags", [])
    ]
    assert parameters.metadata["slideshow"]["slide_type"] == "skip"
    names = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in ast.parse(parameters.source).body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
    }
    assert names["SOURCE"] == "local" and names["VERSION"] == "1.16.1"
    assert names["MIRROR_URL"] == ""


@pytest.mark.notebook
def test_local_run_records_the_files(
    local_run: dict[str, Any], local: Artifacts,
) -> None:
    """The record names the source and each file's size and checksum."""
    assert local_run["source"] == "local"
    assert local_run["checksums"] == local.checksums
    for role, path in local.files().items():
        entry = local_run["files"][role]
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == local.checksums[role]
    assert local_run["sha256sum_matches"] is True


@pytest.mark.notebook
def test_local_run_reads_the_headers(local_run: dict[str, Any]) -> None:
    """The kernel is an x86-64 ELF file; the root filesystem is ext4."""
    assert local_run["elf_machine"] == "x86-64"
    assert local_run["elf"]["class"] == "64-bit"
    assert local_run["elf"]["program headers"] > 0
    assert local_run["ext4_magic"] == "0xEF53"
    assert "extent" in local_run["ext4"]["features"]
    assert {"bin", "etc", "sbin"} <= set(local_run["rootfs_entries"])


@pytest.mark.notebook
def test_local_run_mirror_demo(local_run: dict[str, Any]) -> None:
    """The demo mirror serves identical files and refuses a damaged one."""
    assert local_run["mirror_checksums_match"] is True
    assert "SHA-256 mismatch" in local_run["checksum_error"]
    assert "guest/vmlinux" in local_run["checksum_error"]
    assert local_run["files_left_after_mismatch"] == []
    assert local_run["demo_removed"] is True
    assert error_outputs(local_run["_executed"]) == []


@pytest.mark.notebook
def test_mirror_run_matches_the_local_files(
    mirror_run: dict[str, Any], mirror: LoopbackServer, local: Artifacts,
) -> None:
    """Fetched from the mirror, every checksum equals the local one."""
    assert mirror_run["source"] == "mirror"
    assert mirror_run["version"] is None
    assert mirror_run["checksums"] == local.checksums
    assert mirror_run["elf_machine"] == "x86-64"
    assert mirror_run["ext4_magic"] == "0xEF53"
    assert "/manifest.json" in mirror.paths
    assert "/guest/rootfs.ext4" in mirror.paths
    assert error_outputs(mirror_run["_executed"]) == []
