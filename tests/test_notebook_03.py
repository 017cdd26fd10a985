"""Notebook 03 runs top to bottom and records what the learner should see."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any

import pytest

from helpers.net import NetPrivileges, cleanup_leftovers, list_netns
from helpers.paths import REPO_ROOT

pytestmark = [
    pytest.mark.notebook, pytest.mark.net, pytest.mark.vm,
    pytest.mark.skipif(
        os.geteuid() != 0 or NetPrivileges.current().missing != [],
        reason="needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create "
        "network namespaces and TAP devices"),
]

NOTEBOOK = REPO_ROOT / "notebooks" / "03_networking.ipynb"

# Two boots in all; the /28 is filled with addresses only.
PARAMETERS: dict[str, Any] = {
    "N_TASKS": 2,
    "FILL_WITH_VMS": False,
    "BOOT_TIMEOUT": 180,
}


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Execute the notebook once and read back its record."""
    from helpers.series import execute_notebook, pick_kernel

    out = tmp_path_factory.mktemp("nb03")
    before = set(list_netns())
    try:
        run = execute_notebook(NOTEBOOK, out, PARAMETERS, pick_kernel())
    finally:
        # A failed run's kernel is gone: whatever it left has no owner.
        cleanup_leftovers()
    assert set(list_netns()) <= before
    data: dict[str, Any] = json.loads(Path(run.record).read_text())
    return data


def test_tasks_get_addresses_in_the_subnet(record: dict[str, Any]) -> None:
    subnet = ipaddress.IPv4Network(record["subnet"])
    tasks = record["tasks"]
    assert [t["task"] for t in tasks] == ["web-1", "web-2"]
    addresses = [ipaddress.IPv4Address(t["address"]) for t in tasks]
    assert len(set(addresses)) == 2
    for task, address in zip(tasks, addresses):
        assert address in subnet
        # Past AWS's four reserved addresses, never the last one.
        assert subnet.network_address + 4 <= address
        assert address < subnet.broadcast_address
        assert task["guest reports"] == task["address"]
        octets = [f"{b:02x}" for b in address.packed]
        assert task["MAC"] == "06:00:" + ":".join(octets)
        assert task["router"] == str(subnet.network_address + 1)


def test_pings_and_page(record: dict[str, Any]) -> None:
    assert [p["ok"] for p in record["pings"]] == [True, True]
    assert record["pings"][0]["received"] == 3
    assert record["page"]["status"] == 200
    assert "Hello from task web-1" in record["page"]["text"]
    assert record["commands"][0] == "ip netns add fclab-web-1"


def test_tasks_reach_only_themselves(record: dict[str, Any]) -> None:
    matrix = record["isolation"]
    for source, row in matrix.items():
        for target, reached in row.items():
            assert reached is (source == target), (source, target)


def test_the_small_subnet_runs_out(record: dict[str, Any]) -> None:
    assert record["small_subnet"] == {
        "cidr": "10.0.1.0/28", "size": 16, "reserved": 5, "usable": 11}
    text = record["exhaustion_error"]
    for words in ("16 addresses", "reserves 5", "all 11 usable",
                  "larger subnet"):
        assert words in text


def test_nothing_is_left(record: dict[str, Any]) -> None:
    assert record["leftovers"] == {
        "namespaces": [], "TAPs in the host namespace": [],
        "VMM processes": [], "addresses in use": {}}
