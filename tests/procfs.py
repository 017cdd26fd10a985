"""Processes as /proc shows them, for checks that a test left none."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

# Seconds a stopped process (a VMM, its QEMU, a kernel) gets to
# disappear; generous for a loaded two-core host. Waiting is not what
# the tests check.
GONE_TIMEOUT_S = 20.0

# Seconds between two looks at /proc while waiting.
POLL_S = 0.05


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, or None.

    The name stands in parentheses and may hold spaces or ")"; what
    follows the last ")" starts with the state letter, then the parent.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def exists(pid: int) -> bool:
    """Whether *pid* is in /proc at all, as a zombie too."""
    return _stat_fields(pid) is not None


def alive(pid: int) -> bool:
    """Whether *pid* exists and has not exited (is not a zombie)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def children_of(pid: int) -> list[int]:
    """The PIDs whose parent is *pid*."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry.name)
        if fields is not None and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def wait_gone(
    pids: Iterable[int],
    timeout: float = GONE_TIMEOUT_S,
    *,
    reaped: bool = False,
) -> list[int]:
    """Poll /proc until every PID in *pids* has gone; return those left.

    A process counts as gone once it has exited, or with *reaped* only
    once its parent (or init, for an orphan) has reaped it too.
    """
    waiting = list(pids)
    there = exists if reaped else alive
    deadline = time.monotonic() + timeout
    while True:
        left = [pid for pid in waiting if there(pid)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(POLL_S)
