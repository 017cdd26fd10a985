"""What the boot-time harness itself adds to a measured boot.

Prints one table of figures: the cost of parsing the VMM's output, of
setting up a MicroVM before its VMM starts, of the thread pool used for
parallel boots, and, over a few real boots, how long a boot-timer line
takes from the VMM stamping it to the harness recording it.

    python bench/harness_bench.py [--boots 3] [--no-vm] [--backend auto]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import time
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

# Run from a checkout without installing: the repository root on the path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers import timing

# Repetitions of each micro-benchmark; the figure is the median per call.
PARSE_REPEATS = 5
# Calls per repetition: enough for a stable figure, each run a fraction
# of a second.
PARSE_NUMBER = 2000
# Threads started for the pool figure, as many as a sweep would use.
POOL_TASKS = 200
MICROVM_SETUPS = 20
US_PER_S = 1e6
MS_PER_S = 1e3

# A console like the lab guest's: ~240 kernel lines, then the init.
_KERNEL_LINE = "[{:5d}.{:06d}] subsystem: registered something ({})"
_TIMER_LINE = (
    "2026-12-03T18:44:27.693721154 [vm1:fc_vcpu 0:INFO] "
    "Guest-boot-time =  1604117 us 1604 ms,  1445077 CPU us 1445 CPU ms"
)


@dataclass
class Figure:
    """One row of the printed table."""

    what: str
    value: float
    unit: str
    note: str = ""


def synthetic_console(kernel_lines: int = 240) -> list[tuple[float, str]]:
    """Timed console lines of a boot, with the boot-timer line near the end."""
    lines = [
        (i * 1e-3, _KERNEL_LINE.format(0, i * 4000, i))
        for i in range(kernel_lines)
    ]
    lines.append((0.25, "[    1.048400] Run /init as init process"))
    lines.append((0.30, _TIMER_LINE))
    lines.append((0.31, "FCLAB-READY task=task ip=none"))
    return lines


def per_call_us(func: Callable[[], object]) -> float:
    """Median microseconds per call of *func*."""
    runs = timeit.repeat(func, number=PARSE_NUMBER, repeat=PARSE_REPEATS)
    return statistics.median(runs) / PARSE_NUMBER * US_PER_S


def parse_figures() -> list[Figure]:
    """Costs of parsing one line and a whole console."""
    console = synthetic_console()
    texts = [text for _, text in console]
    return [
        Figure("parse one boot-timer line", per_call_us(
            lambda: timing.parse_boot_timer_line(_TIMER_LINE)), "us"),
        Figure("parse one printk line", per_call_us(
            lambda: timing.parse_printk_line(texts[10])), "us"),
        Figure("find the boot-timer line in a console", per_call_us(
            lambda: timing.find_boot_timer(console)), "us",
            f"{len(console)} lines"),
        Figure("kernel start to init from a console", per_call_us(
            lambda: timing.kernel_to_init_ms(texts)), "us",
            f"{len(texts)} lines"),
    ]


def pool_figures() -> list[Figure]:
    """Delay from submitting a boot to a pool thread until it runs."""
    delays: list[float] = []

    def task(submitted: float) -> None:
        delays.append(time.monotonic() - submitted)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for _ in range(POOL_TASKS):
            pool.submit(task, time.monotonic()).result()
    return [Figure("thread pool: submit to start", statistics.median(
        delays) * US_PER_S, "us", f"median of {POOL_TASKS}")]


def setup_figures(guest: timing.GuestLike, backend: str) -> list[Figure]:
    """MicroVM construction and release with no VMM started."""
    from helpers.vm import MicroVM

    costs = []
    for _ in range(MICROVM_SETUPS):
        start = time.perf_counter()
        vm = MicroVM(guest.kernel, guest.rootfs, initrd=guest.initrd,
                     backend=backend)
        vm.close()
        costs.append(time.perf_counter() - start)
    return [Figure("MicroVM set-up and release, no VMM",
                   statistics.median(costs) * MS_PER_S, "ms",
                   f"median of {MICROVM_SETUPS}")]


def _stamp_seconds(timestamp: str) -> float:
    """Epoch seconds of a VMM log timestamp (local time, nanoseconds)."""
    whole, _, fraction = timestamp.partition(".")
    base = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").timestamp()
    return base + float(f"0.{fraction or 0}")


def boot_figures(guest: timing.GuestLike, backend: str,
                 boots: int) -> list[Figure]:
    """Over real boots: line latency, recording and pre-spawn costs."""
    from helpers.vm import MicroVM

    latency, gaps, record_cost, rss_cost, prespawn = [], [], [], [], []
    for _ in range(boots):
        with MicroVM(guest.kernel, guest.rootfs, initrd=guest.initrd,
                     backend=backend, boot_timer=True) as vm:
            called = time.monotonic()
            vm.spawn()
            prespawn.append(vm.events["spawn"] - called)
            vm.configure()
            vm.start()
            vm.wait_ready(timing.BOOT_TIMER_GRACE_S * 60)
            # The offset turns the harness's monotonic stamps into wall
            # time, the clock the VMM's log timestamps use.
            offset = time.time() - time.monotonic()

            start = time.perf_counter()
            rec = timing.record_from_vm(vm, 1, 128, grace_s=0)
            record_cost.append(time.perf_counter() - start)
            start = time.perf_counter()
            vm.rss_kib()
            rss_cost.append(time.perf_counter() - start)

            found = timing.find_boot_timer(vm.lines)
            stamp = found[1].timestamp if found is not None else None
            if found is not None and stamp:
                latency.append(found[0] + offset - _stamp_seconds(stamp))
            if rec.boot_timer_host_ms is not None and rec.boot_timer_ms:
                gaps.append(rec.boot_timer_host_ms - rec.boot_timer_ms)
            vm.shutdown()

    def median_ms(values: Sequence[float], scale: float = MS_PER_S) -> float:
        return statistics.median(values) * scale if values else float("nan")

    note = f"median of {boots} boots"
    return [
        Figure("disk copy and socket before spawn", median_ms(prespawn),
               "ms", note),
        Figure("boot-timer line: VMM stamp to harness stamp",
               median_ms(latency), "ms",
               note + "; pipe and reader thread"),
        Figure("host-observed minus boot timer", median_ms(gaps, 1.0),
               "ms", note + "; request and line in transit"),
        Figure("record_from_vm after ready", median_ms(record_cost), "ms",
               note),
        Figure("rss_kib() of the VMM tree", median_ms(rss_cost), "ms",
               note),
    ]


def print_table(figures: Sequence[Figure]) -> None:
    """Print the figures as an aligned table."""
    width = max(len(f.what) for f in figures)
    print(f"{'measure':<{width}}  {'value':>10}  unit  note")
    print(f"{'-' * width}  {'-' * 10}  ----  ----")
    for f in figures:
        print(f"{f.what:<{width}}  {f.value:>10.3f}  {f.unit:<4}  {f.note}")


def main(argv: list[str] | None = None) -> int:
    """Measure the harness and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=3,
                        help="real boots to measure (default 3)")
    parser.add_argument("--no-vm", action="store_true",
                        help="skip everything that needs the guest")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)

    figures = parse_figures() + pool_figures()
    if not args.no_vm:
        from helpers.images import build_guest

        guest = build_guest()
        figures += setup_figures(guest, args.backend)
        if args.boots > 0:
            figures += boot_figures(guest, args.backend, args.boots)
    print_table(figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
