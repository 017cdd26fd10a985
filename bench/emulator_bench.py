"""How fast firecracker-emulator answers, and what it adds to a boot.

Run as ``python bench/emulator_bench.py``. It prints one table:

- spawn to ``API server started.`` (median of several starts);
- ``GET /`` round trips on one connection (p50, p99);
- InstanceStart to the guest's readiness line through the emulator,
  against the very same QEMU command started directly (the emulator
  reports the command it ran in its metrics), and their ratio.

Every process it starts is stopped before it moves on.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from emulator_fixtures import Emulator, UnixHTTPConnection

from helpers.guest import READY_MARKER
from helpers.images import build_guest

# Seconds a boot may take before the run is abandoned.
BOOT_TIMEOUT = 180.0


def percentile(values: list[float], pct: float) -> float:
    """Return the *pct* percentile (nearest rank) of *values*."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered)) - 1))
    return ordered[rank]


def spawn_to_api(runs: int) -> list[float]:
    """Seconds from spawning the emulator to its API-ready log line."""
    times = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            emu = Emulator(Path(tmp))
            try:
                emu.wait_api()
                times.append(time.perf_counter() - started)
            finally:
                emu.stop()
    return times


def get_round_trips(count: int) -> list[float]:
    """Seconds per ``GET /`` on one keep-alive connection."""
    with tempfile.TemporaryDirectory() as tmp:
        emu = Emulator(Path(tmp), "--level", "Warning")
        try:
            deadline = time.monotonic() + 30
            while not emu.sock.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            conn = UnixHTTPConnection(str(emu.sock))
            times = []
            for _ in range(count):
                started = time.perf_counter()
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
                times.append(time.perf_counter() - started)
                assert resp.status == 200
            conn.close()
            return times
        finally:
            emu.stop()


def boot_through_emulator(guest: Any, tmp: Path) -> tuple[float, list[str]]:
    """Seconds from InstanceStart to readiness, and QEMU's command."""
    metrics = tmp / "metrics.json"
    emu = Emulator(tmp)
    try:
        emu.wait_api()
        calls: list[tuple[str, str, dict[str, Any]]] = [
            ("PUT", "/boot-source", {
                "kernel_image_path": str(guest.kernel),
                "initrd_path": str(guest.initrd),
                "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"}),
            ("PUT", "/drives/rootfs", {
                "drive_id": "rootfs", "path_on_host": str(guest.rootfs),
                "is_root_device": True, "is_read_only": True}),
            ("PUT", "/machine-config", {"vcpu_count": 1,
                                        "mem_size_mib": 256}),
            ("PUT", "/metrics", {"metrics_path": str(metrics)}),
        ]
        for method, path, body in calls:
            status, reply = emu.call(method, path, body)
            assert status == 204, reply
        started = time.perf_counter()
        status, reply = emu.call("PUT", "/actions",
                                 {"action_type": "InstanceStart"})
        assert status == 204, reply
        emu.wait_for(READY_MARKER, BOOT_TIMEOUT)
        took = time.perf_counter() - started
        emu.call("PUT", "/actions", {"action_type": "FlushMetrics"})
        line = json.loads(metrics.read_text().splitlines()[-1])
        return took, line["emulator"]["qemu_command"]
    finally:
        emu.stop()


def boot_directly(command: list[str]) -> float:
    """Seconds from spawning QEMU itself to the guest's readiness line."""
    ours, theirs = socket.socketpair()
    fd_arg = next(a for a in command if a.startswith("socket,id=qmp,fd="))
    cmd = [a.replace(fd_arg, f"socket,id=qmp,fd={theirs.fileno()}")
           for a in command]
    started = time.perf_counter()
    # Standard input is a pipe, as the emulator's is under the harness,
    # so QEMU's console backend sees the same kind of file.
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    assert proc.stdout is not None
    seen = b""
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while READY_MARKER.encode() not in seen:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk or time.monotonic() > deadline:
                raise RuntimeError("direct QEMU boot never got ready")
            seen = seen[-4096:] + chunk
        return time.perf_counter() - started
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        if proc.stdin is not None:
            proc.stdin.close()
        ours.close()


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--boots", type=int, default=3)
    args = parser.parse_args()

    spawn = spawn_to_api(args.starts)
    trips = get_round_trips(args.requests)
    guest = build_guest()
    via_emulator, direct = [], []
    command: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        # A first boot through the emulator yields the QEMU command and
        # warms the page cache; it is not counted.
        _, command = boot_through_emulator(guest, Path(tmp))
    for run in range(args.boots):
        # Alternate which goes first so neither always finds a warmer
        # machine.
        if run % 2:
            direct.append(boot_directly(command))
        with tempfile.TemporaryDirectory() as tmp:
            took, command = boot_through_emulator(guest, Path(tmp))
        via_emulator.append(took)
        if not run % 2:
            direct.append(boot_directly(command))

    accel = command[command.index("-accel") + 1] if command else "?"
    emu_med = statistics.median(via_emulator)
    direct_med = statistics.median(direct)
    rows = [
        ("spawn -> 'API server started.' (median, ms)",
         f"{statistics.median(spawn) * 1000:.1f}", f"n={len(spawn)}"),
        ("GET / round trip p50 (ms)",
         f"{percentile(trips, 50) * 1000:.3f}", f"n={len(trips)}"),
        ("GET / round trip p99 (ms)",
         f"{percentile(trips, 99) * 1000:.3f}", f"n={len(trips)}"),
        (f"InstanceStart -> ready, emulator ({accel}, median, s)",
         f"{emu_med:.2f}", f"n={len(via_emulator)}"),
        (f"same QEMU command started directly ({accel}, median, s)",
         f"{direct_med:.2f}", f"n={len(direct)}"),
        ("ratio emulator / direct", f"{emu_med / direct_med:.3f}",
         "aim <= 1.1"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>10}  note")
    print("-" * (width + 24))
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")


if __name__ == "__main__":
    main()
