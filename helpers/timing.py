"""Boot-time measurement: parse the logs, boot, repeat, summarize, compare.

The VMM's boot timer reports how long the guest took from InstanceStart to
its first write of the magic byte; the host sees the same moment as the
arrival of that log line. The kernel's own printk timestamps on the serial
console give the time from kernel start to init. This module turns those
into typed records, runs series of boots into a pandas DataFrame, and
decides whether a run is slower than a stored baseline.

Command line (a baseline is written only on request, never by a notebook)::

    python -m helpers.timing baseline --from build/boot_times.csv
    python -m helpers.timing compare --run build/boot_times.csv
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import logging
import math
import os
import platform
import re
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from helpers.cli import configure_logging
from helpers.errors import LabError
from helpers.paths import build_dir

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

# The default sweep, as in Firecracker's own boot-time test: (vCPUs, MiB).
DEFAULT_CONFIGS: tuple[tuple[int, int], ...] = ((1, 128), (1, 1024), (2, 2048))

# Parallel boots together may reserve at most this share of MemAvailable:
# guests touch little of their memory while booting, but a sweep must not
# push the host (shared with other work) into swapping.
MEM_FRACTION = 0.5

# The CSV the notebook writes and the command line reads by default.
BOOT_TIMES_CSV = "boot_times.csv"

# A slowdown counts only if the one-sided test is this sure (per group;
# a default sweep makes six comparisons per metric, and 0.01 keeps the
# chance of a false alarm among them near 6%)...
ALPHA = 0.01
# ...and the median moved by at least this fraction: a shift smaller than
# this is within the day-to-day drift of a shared host.
MIN_EFFECT = 0.10

# Exact Mann-Whitney distribution up to this many pairs (m * n); beyond
# it the normal approximation is within a fraction of a percent.
EXACT_PAIRS_LIMIT = 2500

# Columns identifying where a run was measured; a baseline must match them.
IDENTITY_COLUMNS = ("backend", "accel", "hostname")
# Columns identifying one group of comparable boots.
GROUP_COLUMNS = ("vcpus", "mem_mib", "mode")

# Milliseconds per second and microseconds per millisecond.
MS_PER_S = 1000.0
US_PER_MS = 1000.0


class TimingError(LabError):
    """Base class of the boot-time measurement errors."""


class BootTimerLineError(TimingError, ValueError):
    """A log line mentions the boot timer but does not follow its format."""


class BaselineError(TimingError):
    """A baseline is missing or was measured somewhere else."""


# --------------------------------------------------------------------------
# The boot-timer log line
# --------------------------------------------------------------------------

# Firecracker formats the message as
#   "Guest-boot-time = {:>6} us {} ms, {:>6} CPU us {} CPU ms"
# so each microsecond field is right-aligned in at least six columns
# (spaces pad short values, long values simply grow).
_BOOT_TIMER_MESSAGE = re.compile(
    r"Guest-boot-time = +(?P<us>\d+) us (?P<ms>\d+) ms, "
    r"+(?P<cpu_us>\d+) CPU us (?P<cpu_ms>\d+) CPU ms"
)
_BOOT_TIMER_KEY = "Guest-boot-time"

# The log prefix: "<timestamp> [<instance-id>:<thread>(:LEVEL)(:file:line)]".
# The thread name may hold spaces ("fc_vcpu 0"), the id may not.
_LOG_PREFIX = re.compile(
    r"^(?P<timestamp>\S+)\s+\[(?P<fields>[^\]]*)\]\s*$"
)
_LEVELS = ("ERROR", "WARN", "WARNING", "INFO", "DEBUG", "TRACE")


@dataclass(frozen=True)
class BootTimerReading:
    """One ``Guest-boot-time`` line, as the VMM logged it."""

    wall_us: int
    cpu_us: int
    timestamp: str | None = None
    instance_id: str | None = None
    thread: str | None = None
    level: str | None = None
    origin: str | None = None

    @property
    def wall_ms(self) -> float:
        """Wall-clock time from InstanceStart to the guest's write, in ms."""
        return self.wall_us / US_PER_MS

    @property
    def cpu_ms(self) -> float:
        """CPU time the VMM spent over the same interval, in ms."""
        return self.cpu_us / US_PER_MS


def _ms_matches(us: int, ms: int) -> bool:
    """Whether *ms* is *us* in milliseconds, truncated or rounded."""
    return ms in (us // 1000, round(us / US_PER_MS))


def _parse_prefix(prefix: str) -> dict[str, str | None]:
    """Split a log prefix into timestamp, id, thread, level and origin."""
    out: dict[str, str | None] = dict.fromkeys(
        ("timestamp", "instance_id", "thread", "level", "origin")
    )
    if not prefix.strip():
        return out
    m = _LOG_PREFIX.match(prefix)
    if m is None:
        # Serial noise or another logger's prefix: keep no fields.
        return out
    out["timestamp"] = m["timestamp"]
    fields = m["fields"].split(":")
    out["instance_id"] = fields[0] or None
    rest = fields[1:]
    level_at = next(
        (i for i, f in enumerate(rest) if f.upper() in _LEVELS), None
    )
    if level_at is None:
        # No level shown: "thread" or "thread:file:line".
        out["thread"] = rest[0] if rest else None
        out["origin"] = ":".join(rest[1:]) or None
    else:
        out["thread"] = ":".join(rest[:level_at]) or None
        out["level"] = rest[level_at].upper()
        out["origin"] = ":".join(rest[level_at + 1:]) or None
    return out


def parse_boot_timer_line(line: str) -> BootTimerReading:
    """Parse one ``Guest-boot-time`` log line into a reading.

    Raises BootTimerLineError when the line is not one, or when its numbers
    disagree with each other (the ms fields must be the us fields / 1000).
    """
    text = line.rstrip("\r\n")
    key_at = text.find(_BOOT_TIMER_KEY)
    if key_at < 0:
        raise BootTimerLineError(
            f"not a boot-timer line (no {_BOOT_TIMER_KEY!r}): {text!r}"
        )
    m = _BOOT_TIMER_MESSAGE.match(text, key_at)
    if m is None or text[m.end():].strip():
        raise BootTimerLineError(
            "boot-timer line does not follow the format "
            "'Guest-boot-time = <us> us <ms> ms, <cpu_us> CPU us "
            f"<cpu_ms> CPU ms': {text!r}; check the VMM's version"
        )
    us, ms = int(m["us"]), int(m["ms"])
    cpu_us, cpu_ms = int(m["cpu_us"]), int(m["cpu_ms"])
    if not _ms_matches(us, ms) or not _ms_matches(cpu_us, cpu_ms):
        raise BootTimerLineError(
            f"boot-timer line is inconsistent: {us} us is not {ms} ms "
            f"or {cpu_us} CPU us is not {cpu_ms} CPU ms: {text!r}"
        )
    return BootTimerReading(
        wall_us=us, cpu_us=cpu_us, **_parse_prefix(text[:key_at])
    )


def find_boot_timer(
    lines: Iterable[tuple[float, str]],
) -> tuple[float, BootTimerReading] | None:
    """Return the first boot-timer reading in timed lines, with its time."""
    for stamp, text in lines:
        if _BOOT_TIMER_KEY in text:
            return stamp, parse_boot_timer_line(text)
    return None


# --------------------------------------------------------------------------
# The kernel's printk timestamps
# --------------------------------------------------------------------------

# "[    0.123456] text", optionally followed by a caller id "[    T1]".
_PRINTK = re.compile(
    r"\[\s*(?P<s>\d+)\.(?P<frac>\d{6})\](?:\[\s*[TC]\d+\])?\s?(?P<text>.*)$"
)
# The kernel prints "Run <path> as init process" just before it executes
# init; "Freeing unused kernel image" comes a moment earlier and serves
# when the first is filtered out by the console log level.
_INIT_LINE = re.compile(r"Run \S+ as init process")
_FREEING_LINE = "Freeing unused kernel image"


@dataclass(frozen=True)
class KernelStamp:
    """One console line carrying a printk timestamp."""

    seconds: float
    text: str


def parse_printk_line(line: str) -> KernelStamp | None:
    """Return the printk time and text of a console line, or None."""
    m = _PRINTK.search(line.rstrip("\r\n"))
    if m is None:
        return None
    seconds = int(m["s"]) + int(m["frac"]) / 1e6
    return KernelStamp(seconds=seconds, text=m["text"])


def kernel_to_init_ms(lines: Iterable[str]) -> float | None:
    """Milliseconds from the first printk line to init, or None.

    The kernel's clock starts near zero when it sets up timekeeping, so
    the first timestamp marks kernel start. The end is the "Run ... as
    init process" line, else the last "Freeing unused kernel image" line.
    """
    first: float | None = None
    freeing: float | None = None
    for line in lines:
        stamp = parse_printk_line(line)
        if stamp is None:
            continue
        if first is None:
            first = stamp.seconds
        if _INIT_LINE.search(stamp.text):
            return (stamp.seconds - first) * MS_PER_S
        if _FREEING_LINE in stamp.text:
            freeing = stamp.seconds
    if first is None or freeing is None:
        return None
    return (freeing - first) * MS_PER_S


# --------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------

# The metrics a sweep records, in milliseconds unless the name says KiB.
METRICS: tuple[str, ...] = (
    "spawn_to_api_ms",
    "config_calls_ms",
    "config_wall_ms",
    "configure_ms",
    "boot_timer_ms",
    "boot_timer_cpu_ms",
    "boot_timer_host_ms",
    "start_to_ready_ms",
    "kernel_to_init_ms",
    "launch_to_ready_ms",
    "vmm_rss_kib",
)
# The ones a summary table shows by default.
SUMMARY_METRICS: tuple[str, ...] = (
    "spawn_to_api_ms",
    "boot_timer_ms",
    "boot_timer_host_ms",
    "start_to_ready_ms",
    "kernel_to_init_ms",
    "launch_to_ready_ms",
)


def percentile(values: Sequence[float], q: float) -> float:
    """The *q*-th percentile (0..100), linear between order statistics."""
    import numpy as np

    data = np.asarray([v for v in values if not _missing(v)], dtype=float)
    if data.size == 0:
        return math.nan
    return float(np.percentile(data, q))


def _missing(value: Any) -> bool:
    """Whether *value* is None or NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def describe(values: Sequence[float]) -> dict[str, float]:
    """Count, p50, p90, p99, IQR, std, min, max and range of *values*.

    Percentiles interpolate linearly, so with ten boots p99 lies between
    the two slowest: read it as "about the worst", not as a tail estimate.
    """
    import numpy as np

    data = np.asarray([v for v in values if not _missing(v)], dtype=float)
    if data.size == 0:
        nan = math.nan
        return {"n": 0, "p50": nan, "p90": nan, "p99": nan, "iqr": nan,
                "std": nan, "min": nan, "max": nan, "range": nan}
    p25, p50, p75, p90, p99 = np.percentile(data, [25, 50, 75, 90, 99])
    return {
        "n": int(data.size),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "iqr": float(p75 - p25),
        # Sample standard deviation; zero for a single boot.
        "std": float(data.std(ddof=1)) if data.size > 1 else 0.0,
        "min": float(data.min()),
        "max": float(data.max()),
        "range": float(data.max() - data.min()),
    }


# Serial boots come before parallel ones in tables, as a sweep runs them.
_MODE_ORDER = {"serial": 0, "parallel": 1}


def _group_order(keys: Sequence[str], key: tuple[Any, ...]) -> tuple[Any, ...]:
    """Sort key of a group: its values, with serial before parallel."""
    return tuple(
        _MODE_ORDER.get(v, len(_MODE_ORDER)) if k == "mode" else v
        for k, v in zip(keys, key)
    )


def summarize(
    df: pd.DataFrame,
    metrics: Sequence[str] = SUMMARY_METRICS,
    by: Sequence[str] = GROUP_COLUMNS,
) -> pd.DataFrame:
    """One row per metric and group: count, percentiles and spread."""
    import pandas as pd

    keys = [k for k in by if k in df.columns]
    groups: list[tuple[tuple[Any, ...], pd.DataFrame]] = []
    if keys:
        for key, part in df.groupby(keys, sort=True):
            groups.append((key if isinstance(key, tuple) else (key,), part))
    else:
        groups.append(((), df))
    groups.sort(key=lambda item: _group_order(keys, item[0]))
    rows = []
    for metric in metrics:
        if metric not in df.columns:
            continue
        for key, part in groups:
            row: dict[str, Any] = dict(zip(keys, key))
            row["metric"] = metric
            row.update(describe(part[metric].tolist()))
            rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------
# The regression check
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RankTest:
    """A one-sided Mann-Whitney U test: is the first sample larger?"""

    u: float
    p_value: float
    method: str


def _u_distribution(m: int, n: int) -> list[float]:
    """Counts of each U value over all orderings of m x's and n y's.

    Building the merged order from the smallest element up, appending an
    x as the new largest adds j (the y's already placed) to U, appending
    a y adds nothing: f(i, j) = shift(f(i-1, j), j) + f(i, j-1).
    """
    import numpy as np

    prev = [np.ones(1) for _ in range(n + 1)]
    for i in range(1, m + 1):
        cur = [np.ones(1)]
        for j in range(1, n + 1):
            out = np.zeros(i * j + 1)
            with_x = prev[j]
            out[j:j + with_x.size] += with_x
            with_y = cur[j - 1]
            out[:with_y.size] += with_y
            cur.append(out)
        prev = cur
    return [float(c) for c in prev[n]]


def mann_whitney_greater(
    x: Iterable[float], y: Iterable[float]
) -> RankTest:
    """One-sided Mann-Whitney U test that *x* tends to exceed *y*.

    U counts the pairs (x_i, y_j) with x_i > y_j, ties counting one half.
    Without ties and up to EXACT_PAIRS_LIMIT pairs the p-value is exact
    (enumerated U distribution); otherwise it uses the normal
    approximation with tie and continuity corrections.
    """
    import numpy as np

    xs = np.asarray(list(x), dtype=float)
    ys = np.asarray(list(y), dtype=float)
    m, n = xs.size, ys.size
    if m == 0 or n == 0:
        raise TimingError("a rank test needs at least one value per sample")
    both = np.concatenate([xs, ys])
    u = float(
        (xs[:, None] > ys[None, :]).sum()
        + 0.5 * (xs[:, None] == ys[None, :]).sum()
    )
    _, tie_counts = np.unique(both, return_counts=True)
    ties = bool((tie_counts > 1).any())

    if not ties and m * n <= EXACT_PAIRS_LIMIT:
        counts = _u_distribution(m, n)
        total = math.fsum(counts)
        tail = math.fsum(counts[math.ceil(u):])
        return RankTest(u=u, p_value=min(1.0, tail / total), method="exact")

    size = m + n
    tie_term = float((tie_counts ** 3 - tie_counts).sum())
    variance = m * n / 12.0 * ((size + 1) - tie_term / (size * (size - 1)))
    if variance <= 0:
        # Every value equal: nothing points either way.
        return RankTest(u=u, p_value=1.0, method="normal")
    z = (u - m * n / 2.0 - 0.5) / math.sqrt(variance)
    p = 0.5 * math.erfc(z / math.sqrt(2.0))
    return RankTest(u=u, p_value=p, method="normal")


@dataclass(frozen=True)
class Verdict:
    """Whether a run of boots is slower than its baseline, and why."""

    metric: str
    group: str
    n_run: int
    n_baseline: int
    median_run: float
    median_baseline: float
    change: float
    p_value: float
    method: str
    regression: bool
    text: str

    def __str__(self) -> str:
        """The verdict in one sentence."""
        return self.text


def _single_value(df: pd.DataFrame, column: str, what: str) -> Any:
    """The one value *column* holds in *df*; raise if it holds several."""
    values = df[column].dropna().unique()
    if len(values) != 1:
        raise BaselineError(
            f"the {what} holds {len(values)} values of {column!r} "
            f"({', '.join(map(str, values))}); compare one backend on one "
            "host at a time, filtering the frame first"
        )
    return values[0]


def _group_label(df: pd.DataFrame) -> str:
    """A readable label of the one group of boots *df* holds."""
    parts = []
    if "vcpus" in df.columns:
        parts.append(f"{_single_value(df, 'vcpus', 'run')} vCPU")
    if "mem_mib" in df.columns:
        parts.append(f"{_single_value(df, 'mem_mib', 'run')} MiB")
    if "mode" in df.columns:
        parts.append(str(_single_value(df, "mode", "run")))
    return ", ".join(parts) or "all boots"


def compare(
    run_df: pd.DataFrame,
    baseline_df: pd.DataFrame,
    metric: str,
    *,
    alpha: float = ALPHA,
    min_effect: float = MIN_EFFECT,
) -> Verdict:
    """Decide whether *run_df* is slower than *baseline_df* in *metric*.

    Both frames must come from one backend, acceleration and host, and
    hold one group (vCPUs, MiB, mode) each: the same one. A regression is
    reported only when both hold: a one-sided Mann-Whitney U test says the
    run is larger with p < *alpha*, and the run's median is at least
    *min_effect* (a fraction) above the baseline's. The test guards
    against noise, the effect size against trivially small shifts.
    """
    for column in IDENTITY_COLUMNS + GROUP_COLUMNS:
        if column in run_df.columns and column in baseline_df.columns:
            ours = _single_value(run_df, column, "run")
            theirs = _single_value(baseline_df, column, "baseline")
            if str(ours) != str(theirs):
                raise BaselineError(
                    f"run and baseline differ in {column}: {ours!r} vs "
                    f"{theirs!r}; a baseline only speaks for the same "
                    "backend, host and configuration"
                )
    if metric not in run_df.columns or metric not in baseline_df.columns:
        raise TimingError(
            f"metric {metric!r} is missing; choose one of {METRICS}"
        )
    label = _group_label(run_df)
    run = [float(v) for v in run_df[metric].dropna()]
    base = [float(v) for v in baseline_df[metric].dropna()]
    rule = (f"a regression needs p < {alpha:g} and a median at least "
            f"{min_effect:.0%} higher")
    if len(run) < 2 or len(base) < 2:
        text = (f"{metric} ({label}): too few boots to judge "
                f"({len(run)} vs {len(base)}; at least 2 each); {rule}")
        return Verdict(metric, label, len(run), len(base),
                       percentile(run, 50), percentile(base, 50),
                       math.nan, math.nan, "none", False, text)

    med_run, med_base = percentile(run, 50), percentile(base, 50)
    change = (med_run - med_base) / med_base if med_base else math.inf
    test = mann_whitney_greater(run, base)
    regression = test.p_value < alpha and change >= min_effect
    outcome = "REGRESSION" if regression else "no regression"
    text = (
        f"{metric} ({label}): median {med_run:.1f} vs baseline "
        f"{med_base:.1f} ({change:+.1%}), one-sided Mann-Whitney "
        f"p = {test.p_value:.3g} ({test.method}, {len(run)} vs "
        f"{len(base)} boots): {outcome}; {rule}"
    )
    return Verdict(metric, label, len(run), len(base), med_run, med_base,
                   change, test.p_value, test.method, regression, text)


def compare_groups(
    run_df: pd.DataFrame,
    baseline_df: pd.DataFrame,
    metric: str,
    **kwargs: float,
) -> list[Verdict]:
    """One verdict per (vCPUs, MiB, mode) group found in both frames."""
    keys = [c for c in GROUP_COLUMNS if c in run_df.columns]
    if not keys:
        return [compare(run_df, baseline_df, metric, **kwargs)]
    verdicts = []
    groups = [
        (key if isinstance(key, tuple) else (key,), part)
        for key, part in run_df.groupby(keys, sort=True)
    ]
    groups.sort(key=lambda item: _group_order(keys, item[0]))
    for key, part in groups:
        mask = (baseline_df[keys] == list(key)).all(axis=1)
        if mask.any():
            verdicts.append(
                compare(part, baseline_df[mask], metric, **kwargs)
            )
        else:
            log.info("no baseline for group %s", key)
    return verdicts


# --------------------------------------------------------------------------
# One boot
# --------------------------------------------------------------------------

# After the ready marker, how long to keep looking for the boot-timer line.
# The guest writes the magic byte before it starts its services, so the
# line normally precedes the marker; Firecracker's own test polls its log
# for about five seconds (50 tries, 0.1 s apart).
BOOT_TIMER_GRACE_S = 5.0
BOOT_TIMER_POLL_S = 0.02


class _VmLike(Protocol):
    """What measure_boot reads from a MicroVM."""

    events: dict[str, float]
    lines: list[tuple[float, str]]


@dataclass
class BootRecord:
    """What one boot measured, in ms (RSS in KiB); None where unseen."""

    vcpus: int
    mem_mib: int
    backend: str = ""
    accel: str = ""
    spawn_to_api_ms: float | None = None
    config_calls_ms: float | None = None
    config_wall_ms: float | None = None
    configure_ms: float | None = None
    boot_timer_ms: float | None = None
    boot_timer_cpu_ms: float | None = None
    boot_timer_host_ms: float | None = None
    start_to_ready_ms: float | None = None
    kernel_to_init_ms: float | None = None
    launch_to_ready_ms: float | None = None
    vmm_rss_kib: int | None = None
    boot_timer_line: str | None = None
    error: str | None = None

    def as_row(self) -> dict[str, Any]:
        """The record as a flat dict, one DataFrame row."""
        return dataclasses.asdict(self)


def _span_ms(events: dict[str, float], start: str, end: str) -> float | None:
    """Milliseconds between two recorded events, or None if one is missing."""
    if start not in events or end not in events:
        return None
    return (events[end] - events[start]) * MS_PER_S


def _config_calls_ms(vm: Any) -> float | None:
    """Sum of the latencies of the calls between API ready and start."""
    api = getattr(vm, "api", None)
    history = getattr(api, "history", None)
    if history is None or "api_ready" not in vm.events:
        return None
    begin = vm.events["api_ready"]
    end = vm.events.get("instance_start", math.inf)
    total = 0.0
    for call in history:
        if call.path == "/actions" or call.latency_s is None:
            continue
        if begin <= call.started < end:
            total += call.latency_s
    return total * MS_PER_S


# The emulator logs "Accelerator: KVM (...)" or "Accelerator: TCG (...)"
# when it handles InstanceStart, after probing whether KVM runs guests.
_ACCEL_LINE = re.compile(r"Accelerator: (?P<accel>[A-Za-z]+)\b")


def acceleration(vm: Any) -> str:
    """Return "KVM" or "TCG" for a started VMM, or "unknown"."""
    choice = getattr(vm, "backend", None)
    name = str(getattr(choice, "name", choice) or "").lower()
    if name == "firecracker":
        # Firecracker runs only on KVM.
        return "KVM"
    for _, text in list(getattr(vm, "lines", ())):
        m = _ACCEL_LINE.search(text)
        if m is not None:
            return m["accel"].upper()
    return "unknown"


def _wait_boot_timer(
    vm: _VmLike, grace_s: float
) -> tuple[float, BootTimerReading] | None:
    """Poll the VMM's lines for the boot-timer line for up to *grace_s*."""
    deadline = time.monotonic() + grace_s
    while True:
        found = find_boot_timer(list(vm.lines))
        if found is not None or time.monotonic() >= deadline:
            return found
        time.sleep(BOOT_TIMER_POLL_S)


def record_from_vm(
    vm: Any, vcpus: int, mem_mib: int, *, grace_s: float = BOOT_TIMER_GRACE_S
) -> BootRecord:
    """Build a BootRecord from a MicroVM that has reached its ready marker."""
    events = vm.events
    record = BootRecord(vcpus=vcpus, mem_mib=mem_mib)
    choice = getattr(vm, "backend", None)
    record.backend = str(getattr(choice, "name", choice) or "")
    record.accel = acceleration(vm)
    record.spawn_to_api_ms = _span_ms(events, "spawn", "api_ready")
    record.config_calls_ms = _config_calls_ms(vm)
    record.config_wall_ms = _span_ms(events, "api_ready", "configured")
    record.configure_ms = _span_ms(events, "api_ready", "instance_start")
    record.start_to_ready_ms = _span_ms(events, "instance_start", "ready")
    record.launch_to_ready_ms = _span_ms(events, "spawn", "ready")

    # The VMM's own figure, and when the host saw it.
    found = _wait_boot_timer(vm, grace_s)
    if found is not None:
        arrived, reading = found
        record.boot_timer_ms = reading.wall_ms
        record.boot_timer_cpu_ms = reading.cpu_ms
        record.boot_timer_line = _line_text(vm.lines, arrived)
        if "instance_start" in events:
            record.boot_timer_host_ms = (
                (arrived - events["instance_start"]) * MS_PER_S
            )
    else:
        log.warning("no Guest-boot-time line within %.1f s of ready",
                    grace_s)

    record.kernel_to_init_ms = kernel_to_init_ms(t for _, t in vm.lines)
    return record


def _line_text(lines: Sequence[tuple[float, str]], stamp: float) -> str:
    """The text of the boot-timer line that arrived at *stamp*."""
    for when, text in lines:
        if when == stamp and _BOOT_TIMER_KEY in text:
            return text.rstrip("\r\n")
    return ""


def measure_boot(
    kernel: Path | str,
    rootfs: Path | str,
    *,
    initrd: Path | str | None = None,
    vcpus: int = 1,
    mem_mib: int = 128,
    backend: str = "auto",
    timeout: float = 180.0,
) -> BootRecord:
    """Boot one microVM with the boot timer on, measure it, shut it down."""
    from helpers.vm import MicroVM

    with MicroVM(
        kernel, rootfs, initrd=initrd, vcpus=vcpus, mem_mib=mem_mib,
        backend=backend, boot_timer=True,
    ) as vm:
        vm.spawn()
        vm.configure()
        vm.start()
        vm.wait_ready(timeout)
        record = record_from_vm(vm, vcpus, mem_mib)
        # Memory after the guest settled, for the per-VM cost.
        record.vmm_rss_kib = vm.rss_kib()
        vm.shutdown()
    return record


# --------------------------------------------------------------------------
# The host, its limits, and series of boots
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class HostInfo:
    """The machine the boots ran on."""

    hostname: str
    cpu_model: str
    host_kernel: str
    nproc: int
    mem_available_mib: int


def _cpu_model() -> str:
    """The first "model name" in /proc/cpuinfo, or the platform's."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_available_mib() -> int:
    """MemAvailable from /proc/meminfo in MiB (0 when unknown)."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def host_info() -> HostInfo:
    """Describe this host: name, CPU, kernel, cores and free memory."""
    return HostInfo(
        hostname=socket.gethostname(),
        cpu_model=_cpu_model(),
        host_kernel=platform.release(),
        nproc=os.cpu_count() or 1,
        mem_available_mib=_mem_available_mib(),
    )


def cap_configs(
    configs: Iterable[tuple[int, int]],
    *,
    nproc: int,
    mem_available_mib: int,
    parallel: int = 1,
    fraction: float = MEM_FRACTION,
) -> tuple[list[tuple[int, int]], list[str]]:
    """Keep the (vCPUs, MiB) configurations this host can run.

    A configuration needs vCPUs <= nproc, and *parallel* guests of its
    size must fit in *fraction* of the available memory. Returns the kept
    configurations and one reason per dropped one.
    """
    budget = mem_available_mib * fraction
    kept: list[tuple[int, int]] = []
    dropped: list[str] = []
    for vcpus, mem in configs:
        if vcpus < 1 or mem < 1:
            dropped.append(f"({vcpus}, {mem}): sizes must be positive")
        elif vcpus > nproc:
            dropped.append(
                f"({vcpus}, {mem}): {vcpus} vCPUs but the host has {nproc}"
            )
        elif mem * max(parallel, 1) > budget:
            dropped.append(
                f"({vcpus}, {mem}): {max(parallel, 1)} x {mem} MiB exceeds "
                f"{fraction:.0%} of {mem_available_mib} MiB available"
            )
        else:
            kept.append((vcpus, mem))
    return kept, dropped


class GuestLike(Protocol):
    """The parts of helpers.images.GuestImages a sweep uses."""

    @property
    def kernel(self) -> Path:
        """The guest kernel image."""

    @property
    def initrd(self) -> Path:
        """The initial RAM disk."""

    @property
    def rootfs(self) -> Path:
        """The root filesystem image."""

    @property
    def kernel_release(self) -> str:
        """The kernel's release string."""


def _file_size(path: Path | str | None) -> int | None:
    """Size of *path* in bytes, or None."""
    if path is None:
        return None
    try:
        return Path(path).stat().st_size
    except OSError:
        return None


def _one_boot(
    guest: GuestLike, vcpus: int, mem_mib: int, backend: str,
    timeout: float,
) -> BootRecord:
    """One measured boot; a deliberate lab error is kept in the record."""
    try:
        return measure_boot(
            guest.kernel, guest.rootfs, initrd=guest.initrd, vcpus=vcpus,
            mem_mib=mem_mib, backend=backend, timeout=timeout,
        )
    except LabError as exc:
        log.warning("boot (%d vCPU, %d MiB) failed: %s", vcpus, mem_mib, exc)
        return BootRecord(vcpus=vcpus, mem_mib=mem_mib,
                          error=f"{type(exc).__name__}: {exc}")


def run_boots(
    guest: GuestLike,
    *,
    n: int,
    parallel: int = 1,
    vcpus: int = 1,
    mem_mib: int = 128,
    backend: str = "auto",
    timeout: float = 180.0,
    on_done: Callable[[], object] | None = None,
) -> list[BootRecord]:
    """Boot *n* microVMs, *parallel* at a time, each in its own thread."""
    if n < 1 or parallel < 1:
        raise TimingError(f"need n >= 1 and parallel >= 1, got {n}, "
                          f"{parallel}")
    if parallel == 1:
        records = []
        for _ in range(n):
            records.append(_one_boot(guest, vcpus, mem_mib, backend,
                                     timeout))
            if on_done is not None:
                on_done()
        return records

    # Results are collected in this thread, as the boots finish.
    results: list[BootRecord] = []
    with concurrent.futures.ThreadPoolExecutor(
        max_workers=parallel, thread_name_prefix="boot"
    ) as pool:
        futures = [
            pool.submit(_one_boot, guest, vcpus, mem_mib, backend, timeout)
            for _ in range(n)
        ]
        try:
            for future in concurrent.futures.as_completed(futures):
                results.append(future.result())
                if on_done is not None:
                    on_done()
        except BaseException:
            # Interrupted: boots under way finish and release their VMs,
            # the ones still queued never start.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def sweep(
    guest: GuestLike,
    *,
    n_boots: int = 10,
    parallel: int = 2,
    configs: Iterable[tuple[int, int]] = DEFAULT_CONFIGS,
    backend: str = "auto",
    timeout: float = 180.0,
    progress: bool = True,
    host: HostInfo | None = None,
    warmup: int = 1,
) -> pd.DataFrame:
    """Boot every configuration serially, then *parallel* at a time.

    Configurations the host cannot hold are dropped (and logged). First
    *warmup* boots are made and thrown away: the first boot on a host pays
    one-off costs (a cold page cache, the emulator's KVM probe) that say
    nothing about boot time. Every row carries the backend, acceleration,
    host and guest description.
    """
    import pandas as pd

    with warnings.catch_warnings():
        # Without ipywidgets tqdm warns and draws a text bar: good enough.
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm

    host = host or host_info()
    wanted = [(int(c[0]), int(c[1])) for c in configs]
    kept, dropped = cap_configs(
        wanted, nproc=host.nproc, mem_available_mib=host.mem_available_mib,
        parallel=parallel,
    )
    for reason in dropped:
        log.warning("skipping configuration %s", reason)
    modes = [("serial", 1)] + ([("parallel", parallel)] if parallel > 1
                               else [])
    total = n_boots * len(kept) * len(modes) + (warmup if kept else 0)
    rows: list[dict[str, Any]] = []
    with tqdm(total=total, desc="boots", unit="boot",
              disable=not progress) as bar:
        if kept and warmup > 0:
            bar.set_postfix_str("warm-up")
            for _ in range(warmup):
                rec = _one_boot(guest, *kept[0], backend, timeout)
                log.info("warm-up boot: boot timer %s ms, error %s",
                         rec.boot_timer_ms, rec.error)
                bar.update(1)
        for vcpus, mem in kept:
            for mode, k in modes:
                bar.set_postfix_str(f"{vcpus} vCPU {mem} MiB {mode}")
                records = run_boots(
                    guest, n=n_boots, parallel=k, vcpus=vcpus, mem_mib=mem,
                    backend=backend, timeout=timeout,
                    on_done=lambda: bar.update(1),
                )
                for index, rec in enumerate(records):
                    row = rec.as_row()
                    row.update(mode=mode, parallel=k, boot=index)
                    rows.append(row)

    df = pd.DataFrame(rows)
    if df.empty:
        return df
    # Fill the identity of failed boots from their successful siblings.
    for column in ("backend", "accel"):
        known = df.loc[df[column] != "", column]
        if not known.empty:
            df.loc[df[column] == "", column] = known.iloc[0]
    df["hostname"] = host.hostname
    df["cpu_model"] = host.cpu_model
    df["host_kernel"] = host.host_kernel
    df["guest_kernel"] = guest.kernel_release
    df["kernel_bytes"] = _file_size(guest.kernel)
    df["initrd_bytes"] = _file_size(guest.initrd)
    df["rootfs_bytes"] = _file_size(guest.rootfs)
    return df


def both_measured(df: pd.DataFrame) -> pd.Series:
    """Per boot: whether the VMM's figure and the host's were both seen."""
    return df["boot_timer_ms"].notna() & df["boot_timer_host_ms"].notna()


# --------------------------------------------------------------------------
# Files: the run CSV and the baselines
# --------------------------------------------------------------------------


def _write_atomic(df: pd.DataFrame, path: Path) -> Path:
    """Write *df* as CSV through a temporary file and one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_csv(df: pd.DataFrame, path: Path | str | None = None) -> Path:
    """Save a run as CSV; a bare file name lands in build/.

    Without *path* the file is build/boot_times.csv, the one the command
    line reads by default.
    """
    target = Path(path) if path is not None else Path(BOOT_TIMES_CSV)
    if len(target.parts) == 1:
        target = build_dir() / target
    return _write_atomic(df, target)


def load_csv(path: Path | str) -> pd.DataFrame:
    """Read a run or baseline CSV back."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise BaselineError(
            f"{path} does not exist; run notebooks/04_boot_time.ipynb "
            "(or helpers.timing.sweep) first"
        )
    return pd.read_csv(path)


def baseline_dir() -> Path:
    """Folder of this machine's baselines: build/baselines.

    Baselines describe one host, so they stay out of version control.
    """
    return build_dir() / "baselines"


def _slug(text: str) -> str:
    """A file-name-safe form of *text*."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "x"


def baseline_path(
    backend: str, accel: str, hostname: str, folder: Path | None = None
) -> Path:
    """Path of the baseline for one backend, acceleration and host."""
    name = f"{_slug(backend)}-{_slug(accel)}-{_slug(hostname)}.csv"
    return (folder or baseline_dir()) / name


def write_baseline(
    df: pd.DataFrame, folder: Path | None = None
) -> list[Path]:
    """Store a run as baseline(s), one file per backend/accel/host."""
    ok = df[df["error"].isna()] if "error" in df.columns else df
    if ok.empty:
        raise BaselineError(
            "the run holds no successful boot; nothing to keep as baseline"
        )
    paths = []
    for (backend, accel, host), part in ok.groupby(list(IDENTITY_COLUMNS)):
        path = baseline_path(backend, accel, host, folder)
        paths.append(_write_atomic(part, path))
        log.info("baseline of %d boots written to %s", len(part), path)
    return paths


def find_baseline(
    run_df: pd.DataFrame, folder: Path | None = None
) -> Path | None:
    """The stored baseline matching a run's backend and host, if any."""
    try:
        backend = _single_value(run_df, "backend", "run")
        accel = _single_value(run_df, "accel", "run")
        host = _single_value(run_df, "hostname", "run")
    except BaselineError:
        return None
    path = baseline_path(backend, accel, host, folder)
    return path if path.is_file() else None


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

# The metrics the command line compares unless told otherwise.
COMPARE_METRICS = ("boot_timer_ms", "launch_to_ready_ms")


def _cmd_baseline(args: argparse.Namespace) -> int:
    """Write the baseline(s) from a run CSV."""
    df = load_csv(args.source)
    for path in write_baseline(df, args.dir):
        print(path)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    """Compare a run with its baseline; exit 1 on a regression."""
    run = load_csv(args.run)
    if args.baseline is not None:
        base_path: Path | None = Path(args.baseline)
    else:
        base_path = find_baseline(run, args.dir)
    if base_path is None:
        print("no baseline for this backend and host; write one with "
              "'python -m helpers.timing baseline --from "
              f"{args.run}'", file=sys.stderr)
        return 2
    base = load_csv(base_path)
    run_ok = run[run["error"].isna()] if "error" in run.columns else run
    print(f"baseline: {base_path}")
    regressed = False
    for metric in args.metric or COMPARE_METRICS:
        for verdict in compare_groups(run_ok, base, metric):
            print(verdict.text)
            regressed |= verdict.regression
    return 1 if regressed else 0


def main(argv: list[str] | None = None) -> int:
    """Write a boot-time baseline, or compare a run against it."""
    default_csv = build_dir() / BOOT_TIMES_CSV
    parser = argparse.ArgumentParser(
        prog="python -m helpers.timing", description=main.__doc__
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_base = sub.add_parser("baseline", help="store a run as the baseline")
    p_base.add_argument("--from", dest="source", type=Path,
                        default=default_csv, help="run CSV to store")
    p_base.add_argument("--dir", type=Path, default=None,
                        help="baseline folder (default build/baselines)")
    p_base.set_defaults(func=_cmd_baseline)
    p_cmp = sub.add_parser("compare", help="compare a run with its baseline")
    p_cmp.add_argument("--run", type=Path, default=default_csv)
    p_cmp.add_argument("--baseline", type=Path, default=None,
                       help="baseline CSV (default: the matching one)")
    p_cmp.add_argument("--dir", type=Path, default=None,
                       help="baseline folder (default build/baselines)")
    p_cmp.add_argument("--metric", action="append",
                       help=f"metric to compare (default {COMPARE_METRICS})")
    p_cmp.set_defaults(func=_cmd_compare)
    args = parser.parse_args(argv)
    configure_logging(logging.INFO)
    try:
        return int(args.func(args))
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
