"""Shared fixtures, and a final check that the suite leaked nothing."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from helpers.spec import SPEC_ENV, find_api_spec, load_api_spec

# Process names of the VMMs the lab starts.
VMM_NAMES = ("qemu-system-x86", "firecracker", "jailer")

# A VMM whose parent just died is reparented and reaped within a second or
# two; the final check waits this long before it calls anything a leak.
REAP_GRACE_S = 5.0


@pytest.fixture(scope="session")
def api_spec() -> dict[str, Any]:
    """The official API description, or a skip saying how to get one."""
    path = find_api_spec()
    if path is None:
        pytest.skip(
            f"no API description: set {SPEC_ENV} to "
            "firecracker-api-v1.16.1.yaml, or fetch a release with "
            "`python -m helpers.artifacts fetch --source official`"
        )
    return load_api_spec(path)


def _vmm_pids() -> set[int]:
    """PIDs of every live (not zombie) VMM process on the host."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The state letter follows the parenthesised command name.
        state = stat.rsplit(")", 1)[1].split()[0]
        if comm.startswith(VMM_NAMES) and state != "Z":
            pids.add(int(entry.name))
    return pids


def _lab_netns() -> set[str]:
    """Network namespaces whose names mark them as the lab's."""
    try:
        out = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True,
            check=False,
        ).stdout
    except FileNotFoundError:
        return set()
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    return {n for n in names if n.startswith(("fclab", "fcemu", "test"))}


def _taps() -> set[str]:
    """TAP devices in the root network namespace."""
    out = subprocess.run(
        ["ip", "-o", "link", "show", "type", "tun"],
        capture_output=True, text=True, check=False,
    ).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


def pytest_sessionstart(session: pytest.Session) -> None:
    """Note what already runs, so only the suite's own leaks count."""
    session.config._fclab_before = (  # type: ignore[attr-defined]
        _vmm_pids(), _lab_netns(), _taps())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a VMM, namespace or TAP outlived the tests."""
    before = getattr(session.config, "_fclab_before", None)
    if before is None or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    pids, netns, taps = before
    deadline = time.monotonic() + REAP_GRACE_S
    while _vmm_pids() - pids and time.monotonic() < deadline:
        time.sleep(0.2)
    leaked = {
        "VMM processes": sorted(_vmm_pids() - pids),
        "network namespaces": sorted(_lab_netns() - netns),
        "TAP devices": sorted(_taps() - taps),
    }
    leaked = {k: v for k, v in leaked.items() if v}
    if leaked:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = "; ".join(f"{k}: {v}" for k, v in leaked.items())
        if reporter is not None:
            reporter.write_line(f"LEAKED after the test run: {text}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
