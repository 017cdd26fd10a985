"""Firecracker-shaped metrics, written as one JSON object per line.

Counters are deltas since the previous flush, as in Firecracker. Which
groups hold real figures: ``api_server`` (startup times), the
``*_api_requests`` counters, ``latencies_us`` (pause and resume through
QEMU's monitor), ``block_<id>`` (QEMU's block statistics) and
``net_<id>`` (the TAP device's counters, seen from the guest). ``vcpu``
is present for shape only and stays at zero: QEMU does not expose vCPU
exits. The ``emulator`` group is the emulator's own (accelerator, QEMU's
pid, CPU time and command line).
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

# Which counter each API action increments (group, counter prefix).
ACTION_COUNTERS = {
    "get_instance_info": ("get_api_requests", "instance_info"),
    "get_version": ("get_api_requests", "vmm_version"),
    "get_machine_config": ("get_api_requests", "machine_cfg"),
    "get_vm_config": ("get_api_requests", "vm_config"),
    "put_machine_config": ("put_api_requests", "machine_cfg"),
    "patch_machine_config": ("patch_api_requests", "machine_cfg"),
    "put_boot_source": ("put_api_requests", "boot_source"),
    "put_drive": ("put_api_requests", "drive"),
    "patch_drive": ("patch_api_requests", "drive"),
    "put_net": ("put_api_requests", "network"),
    "patch_net": ("patch_api_requests", "network"),
    "put_logger": ("put_api_requests", "logger"),
    "put_metrics": ("put_api_requests", "metrics"),
    "patch_vm": ("patch_api_requests", "vmm"),
    "InstanceStart": ("put_api_requests", "actions"),
    "SendCtrlAltDel": ("put_api_requests", "actions"),
    "FlushMetrics": ("put_api_requests", "actions"),
}

# vCPU exit counters Firecracker reports; QEMU does not expose them.
VCPU_FIELDS = (
    "exit_io_in", "exit_io_out", "exit_mmio_read", "exit_mmio_write",
    "failures",
)


class Metrics:
    """Counters and the file they are flushed to."""

    def __init__(self) -> None:
        self.path: str | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}
        self._last_totals: dict[str, dict[str, int]] = {}

    def open(self, path: str) -> None:
        """Start writing to *path* (appending; created when missing)."""
        self._fd = os.open(
            path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644
        )
        self.path = path

    def inc(self, group: str, name: str, amount: int = 1) -> None:
        """Add *amount* to a counter."""
        with self._lock:
            bucket = self._counts.setdefault(group, {})
            bucket[name] = bucket.get(name, 0) + amount

    def record_action(self, action: str, failed: bool) -> None:
        """Count an API request and, if it failed, its failure."""
        where = ACTION_COUNTERS.get(action)
        if where is None:
            return
        group, prefix = where
        self.inc(group, f"{prefix}_count")
        if failed and group != "get_api_requests":
            self.inc(group, f"{prefix}_fails")

    def set_value(self, group: str, name: str, value: int) -> None:
        """Set a gauge (kept until the next flush)."""
        with self._lock:
            self._counts.setdefault(group, {})[name] = value

    def delta(self, group: str, totals: dict[str, int]) -> dict[str, int]:
        """Turn cumulative *totals* into changes since the last flush."""
        with self._lock:
            before = self._last_totals.get(group, {})
            self._last_totals[group] = dict(totals)
        return {k: v - before.get(k, 0) for k, v in totals.items()}

    def flush(self, extra: dict[str, Any]) -> bool:
        """Write one line; return False when no metrics file is set."""
        if self._fd is None:
            return False
        with self._lock:
            counts, self._counts = self._counts, {}
        line: dict[str, Any] = {"utc_timestamp_ms": time.time_ns() // 10**6}
        for group in ("get_api_requests", "put_api_requests",
                      "patch_api_requests"):
            line[group] = counts.pop(group, {})
        line["vcpu"] = {name: 0 for name in VCPU_FIELDS}
        line.update(counts)
        line.update(extra)
        data = (json.dumps(line, separators=(",", ":")) + "\n").encode()
        try:
            os.write(self._fd, data)
        except OSError:
            return False
        return True

    def close(self) -> None:
        """Close the metrics file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
