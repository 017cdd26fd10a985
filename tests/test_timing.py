"""Boot-time parsing, statistics, host caps and the regression verdict."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from helpers import timing
from helpers.timing import (
    BaselineError,
    BootTimerLineError,
    cap_configs,
    compare,
    describe,
    kernel_to_init_ms,
    mann_whitney_greater,
    parse_boot_timer_line,
    parse_printk_line,
)

# The message exactly as Firecracker formats it (right-aligned us fields).
FORMAT = "Guest-boot-time = {:>6} us {} ms, {:>6} CPU us {} CPU ms"

# Log prefixes in the shapes Firecracker can print: with and without
# level and origin, a thread name with a space, and no prefix at all.
PREFIXES = [
    "",
    "2026-12-03T18:40:01.123456789 [anonymous-instance:fc_vcpu 0] ",
    "2026-12-03T18:40:01.123456789 [anonymous-instance:fc_vcpu 0:INFO] ",
    (
        "2026-12-03T18:40:01.123456789 [vm1:fc_vcpu 0:INFO:"
        "src/vmm/src/devices/pseudo/boot_timer.rs:41] "
    ),
    "2026-12-03T18:40:01.1 [vm_2:main:Info:src/vmm/src/lib.rs:7] ",
]


def line_for(us: int, cpu_us: int, prefix: str = "") -> str:
    """A boot-timer log line built from the documented format."""
    return prefix + FORMAT.format(us, us // 1000, cpu_us, cpu_us // 1000)


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize(
    "us,cpu_us", [(5, 3), (125_000, 7_999), (123_456_789, 98_765_432)]
)
def test_boot_timer_line_round_trips(
    prefix: str, us: int, cpu_us: int
) -> None:
    """Small, typical and huge values parse back, padded or not."""
    reading = parse_boot_timer_line(line_for(us, cpu_us, prefix) + "\n")
    assert (reading.wall_us, reading.cpu_us) == (us, cpu_us)
    assert reading.wall_ms == us / 1000
    assert reading.cpu_ms == cpu_us / 1000


def test_padding_is_as_documented() -> None:
    """Values under six digits are padded; the parser accepts both forms."""
    padded = line_for(5, 3)
    assert "=      5 us 0 ms,      3 CPU us" in padded
    unpadded = "Guest-boot-time = 5 us 0 ms, 3 CPU us 0 CPU ms"
    assert parse_boot_timer_line(unpadded) == parse_boot_timer_line(padded)


def test_prefix_fields_are_kept() -> None:
    """Timestamp, instance id, thread, level and origin are split out."""
    reading = parse_boot_timer_line(line_for(110_000, 2_000, PREFIXES[3]))
    assert reading.timestamp == "2026-12-03T18:40:01.123456789"
    assert reading.instance_id == "vm1"
    assert reading.thread == "fc_vcpu 0"
    assert reading.level == "INFO"
    assert reading.origin == "src/vmm/src/devices/pseudo/boot_timer.rs:41"
    bare = parse_boot_timer_line(line_for(110_000, 2_000, PREFIXES[1]))
    assert (bare.thread, bare.level, bare.origin) == ("fc_vcpu 0", None, None)


def test_rounded_milliseconds_are_accepted() -> None:
    """A VMM that rounds the ms fields instead of truncating still parses."""
    line = "Guest-boot-time = 1999 us 2 ms, 1500 CPU us 2 CPU ms"
    assert parse_boot_timer_line(line).wall_us == 1999


@pytest.mark.parametrize(
    "line",
    [
        "Guest-boot-time = 12345 us 12 ms",
        "Guest-boot-time = 12x45 us 12 ms, 100 CPU us 0 CPU ms",
        "Guest-boot-time = 12345 us 99 ms, 100 CPU us 0 CPU ms",
        "Guest-boot-time = 12345 us 12 ms, 5000 CPU us 9 CPU ms",
        "Guest-boot-time = 12345 us 12 ms, 100 CPU us 0 CPU ms trailing",
        "Guest-boot-time: 12345 us 12 ms, 100 CPU us 0 CPU ms",
        "Guest-boot-time = -5 us 0 ms, 100 CPU us 0 CPU ms",
        "Guest boot time = 12345 us 12 ms, 100 CPU us 0 CPU ms",
        "[    0.000000] Linux version 6.1.0",
        "",
    ],
)
def test_malformed_lines_are_rejected(line: str) -> None:
    """Anything not in the documented shape raises a clear error."""
    with pytest.raises(BootTimerLineError, match="boot-timer|format"):
        parse_boot_timer_line(line)


def test_find_boot_timer_returns_first_with_its_time() -> None:
    """The first boot-timer line among console lines is found, with time."""
    lines = [
        (1.0, "[    0.100000] Run /init as init process"),
        (2.5, line_for(140_000, 1_000, PREFIXES[2])),
        (3.0, "FCLAB-READY task=a ip=none"),
        (4.0, line_for(999_000, 1_000)),
    ]
    found = timing.find_boot_timer(lines)
    assert found is not None
    assert found[0] == 2.5 and found[1].wall_us == 140_000
    assert timing.find_boot_timer(lines[:1]) is None


def test_find_boot_timer_raises_on_a_garbled_line() -> None:
    """A garbled boot-timer line is an error, not a silent miss."""
    with pytest.raises(BootTimerLineError):
        timing.find_boot_timer([(1.0, "Guest-boot-time = soon")])


# -- kernel timestamps ------------------------------------------------------


def test_printk_line() -> None:
    """Timestamps with and without a caller id; other lines give None."""
    stamp = parse_printk_line("[    1.048400] Run /init as init process\r\n")
    assert stamp is not None
    assert stamp.seconds == pytest.approx(1.0484)
    assert stamp.text == "Run /init as init process"
    caller = parse_printk_line("[   12.000001][    T1] hello")
    assert caller is not None and caller.text == "hello"
    assert caller.seconds == pytest.approx(12.000001)
    assert parse_printk_line("FCLAB-READY task=a ip=none") is None
    assert parse_printk_line("[ 1.5] too few digits") is None


CONSOLE = [
    "[    0.000000] Linux version 6.1.0-57-cloud-amd64",
    "[    0.000000] Command line: console=ttyS0",
    "some VMM log line",
    "[    1.037942] Freeing unused kernel image (initmem) memory: 2612K",
    "[    1.043080] Freeing unused kernel image (rodata/data gap) memory",
    "[    1.048400] Run /init as init process",
    "[    1.198174] virtio_blk virtio0: 1/0/0 default/read/poll queues",
]


def test_kernel_to_init_uses_the_run_init_line() -> None:
    """Kernel start (first stamp) to "Run /init as init process"."""
    assert kernel_to_init_ms(CONSOLE) == pytest.approx(1048.4)


def test_kernel_to_init_falls_back_and_offsets() -> None:
    """Without the Run line the last Freeing line ends the span."""
    without_run = [line for line in CONSOLE if "Run /" not in line]
    assert kernel_to_init_ms(without_run) == pytest.approx(1043.08)
    shifted = ["[    0.500000] early"] + CONSOLE[3:]
    assert kernel_to_init_ms(shifted) == pytest.approx(548.4)
    assert kernel_to_init_ms(["no kernel here"]) is None
    assert kernel_to_init_ms(CONSOLE[:2]) is None


# -- statistics -------------------------------------------------------------


def test_describe_on_known_samples() -> None:
    """Percentiles, IQR and spread of 1..101 are known in closed form."""
    stats = describe([float(v) for v in range(1, 102)])
    assert stats["n"] == 101
    assert (stats["p50"], stats["p90"], stats["p99"]) == (51, 91, 100)
    assert stats["iqr"] == 50
    assert (stats["min"], stats["max"], stats["range"]) == (1, 101, 100)
    assert stats["std"] == pytest.approx(np.std(range(1, 102), ddof=1))
    assert describe([7.0])["std"] == 0.0
    assert describe([float("nan")])["n"] == 0
    assert math.isnan(describe([])["p50"])


def test_summarize_groups_by_configuration_and_mode() -> None:
    """One row per group and metric, counts ignoring missing values."""
    df = pd.DataFrame({
        "vcpus": [1, 1, 1, 2],
        "mem_mib": [128, 128, 128, 2048],
        "mode": ["serial", "serial", "parallel", "serial"],
        "boot_timer_ms": [10.0, 20.0, 30.0, float("nan")],
    })
    table = timing.summarize(df, metrics=["boot_timer_ms"])
    assert len(table) == 3
    serial = table[(table["vcpus"] == 1) & (table["mode"] == "serial")]
    assert serial["n"].item() == 2 and serial["p50"].item() == 15.0
    assert table[table["vcpus"] == 2]["n"].item() == 0


def test_mann_whitney_exact_values() -> None:
    """Full separation of 3 vs 3 has p = 1/C(6,3); reversal gives 1."""
    test = mann_whitney_greater([4, 5, 6], [1, 2, 3])
    assert test.method == "exact"
    assert test.u == 9 and test.p_value == pytest.approx(1 / 20)
    assert mann_whitney_greater([1, 2, 3], [4, 5, 6]).p_value == 1.0
    # One inversion: U = 8, and P(U >= 8) = 2/20.
    assert mann_whitney_greater([3.5, 5, 6], [1, 2, 4]).p_value == (
        pytest.approx(2 / 20))


def test_mann_whitney_ties_use_the_normal_approximation() -> None:
    """Tied values switch to the corrected normal approximation."""
    test = mann_whitney_greater([1, 2, 2, 3], [1, 1, 2, 2])
    assert test.method == "normal"
    assert 0 < test.p_value < 1
    assert mann_whitney_greater([5, 5], [5, 5]).p_value == 1.0


def test_mann_whitney_agrees_with_scipy() -> None:
    """Where scipy is installed, its p-values match ours."""
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(7)
    for m, n in [(4, 6), (10, 10), (60, 70)]:
        x, y = rng.normal(1.1, 0.2, m), rng.normal(1.0, 0.2, n)
        ours = mann_whitney_greater(x, y)
        method = "exact" if ours.method == "exact" else "asymptotic"
        theirs = stats.mannwhitneyu(x, y, alternative="greater",
                                    method=method)
        assert ours.u == theirs.statistic
        assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-9)


# -- the verdict ------------------------------------------------------------


def frame(values: np.ndarray, **identity: object) -> pd.DataFrame:
    """A run of boots of one group with the given metric values."""
    base = {"backend": "firecracker-emulator", "accel": "TCG",
            "hostname": "lab", "vcpus": 1, "mem_mib": 128,
            "mode": "serial"}
    base.update(identity)
    df = pd.DataFrame({"boot_timer_ms": values})
    for key, value in base.items():
        df[key] = value
    return df


def test_same_distribution_is_no_regression() -> None:
    """Two draws from one distribution: no regression."""
    rng = np.random.default_rng(1)
    base = frame(rng.normal(1000, 50, 10))
    run = frame(rng.normal(1000, 50, 10))
    verdict = compare(run, base, "boot_timer_ms")
    assert not verdict.regression
    assert "no regression" in verdict.text


def test_clearly_slower_is_a_regression() -> None:
    """A 30% slower run with little noise is a regression."""
    rng = np.random.default_rng(2)
    base = frame(rng.normal(1000, 30, 10))
    run = frame(rng.normal(1300, 30, 10))
    verdict = compare(run, base, "boot_timer_ms")
    assert verdict.regression
    assert verdict.p_value < timing.ALPHA
    assert verdict.change == pytest.approx(0.3, abs=0.05)
    assert "REGRESSION" in verdict.text and "Mann-Whitney" in verdict.text


def test_slower_within_noise_is_no_regression() -> None:
    """A 15% higher median inside wide run-to-run noise is not enough."""
    base = frame(np.array([600.0, 900, 1000, 1100, 1400]))
    run = frame(np.array([700.0, 1000, 1150, 1300, 1500]))
    verdict = compare(run, base, "boot_timer_ms")
    assert verdict.change >= timing.MIN_EFFECT
    assert verdict.p_value >= timing.ALPHA
    assert not verdict.regression


def test_tiny_but_certain_shift_is_no_regression() -> None:
    """A steady 3% shift is significant but under the minimum effect."""
    rng = np.random.default_rng(3)
    base = frame(rng.normal(1000, 5, 40))
    run = frame(rng.normal(1030, 5, 40))
    verdict = compare(run, base, "boot_timer_ms")
    assert verdict.p_value < timing.ALPHA
    assert not verdict.regression


def test_too_few_boots_cannot_regress() -> None:
    """One boot on either side gives no verdict."""
    verdict = compare(frame(np.array([5000.0])),
                      frame(np.array([1.0, 2.0])), "boot_timer_ms")
    assert not verdict.regression and "too few" in verdict.text


@pytest.mark.parametrize(
    "other", [{"hostname": "elsewhere"}, {"accel": "KVM"}, {"vcpus": 2}]
)
def test_baseline_from_elsewhere_is_refused(other: dict[str, object]) -> None:
    """A baseline of another host, acceleration or size is not comparable."""
    values = np.array([1.0, 2.0, 3.0])
    with pytest.raises(BaselineError):
        compare(frame(values), frame(values, **other), "boot_timer_ms")


def test_compare_groups_pairs_matching_groups() -> None:
    """Each (vCPUs, MiB, mode) group is judged against its own baseline."""
    rng = np.random.default_rng(4)
    base = pd.concat([frame(rng.normal(1000, 20, 8)),
                      frame(rng.normal(3000, 20, 8), mode="parallel")])
    run = pd.concat([frame(rng.normal(1000, 20, 8)),
                     frame(rng.normal(4000, 20, 8), mode="parallel"),
                     frame(rng.normal(50, 1, 8), vcpus=2)])
    verdicts = timing.compare_groups(run, base, "boot_timer_ms")
    # Serial first, as a sweep runs them; the 2-vCPU group has no baseline.
    assert [v.group for v in verdicts] == [
        "1 vCPU, 128 MiB, serial", "1 vCPU, 128 MiB, parallel"]
    assert [v.regression for v in verdicts] == [False, True]


# -- host caps and files ----------------------------------------------------


def test_cap_configs_respects_cores_and_memory() -> None:
    """vCPUs above nproc and parallel memory above the budget are dropped."""
    kept, dropped = cap_configs(
        [(1, 128), (1, 1024), (2, 2048), (4, 128), (0, 128)],
        nproc=2, mem_available_mib=4096, parallel=2,
    )
    assert kept == [(1, 128), (1, 1024)]
    assert len(dropped) == 3
    assert any("4 vCPUs but the host has 2" in d for d in dropped)
    assert any("2 x 2048 MiB" in d for d in dropped)
    kept, _ = cap_configs([(2, 2048)], nproc=2, mem_available_mib=4096)
    assert kept == [(2, 2048)]


def test_host_info_describes_this_machine() -> None:
    """The host description has a name, a CPU, a kernel and resources."""
    host = timing.host_info()
    assert host.hostname and host.cpu_model and host.host_kernel
    assert host.nproc >= 1 and host.mem_available_mib > 0


def test_record_from_vm_spans() -> None:
    """Spans come from the VM's event stamps and the boot-timer line."""
    events = {"spawn": 100.0, "api_ready": 100.05, "configured": 100.07,
              "instance_start": 100.09, "ready": 104.09}
    lines = [(100.2 + i / 100, text) for i, text in enumerate(CONSOLE)]
    lines.append((102.09, line_for(1_990_000, 1_500_000, PREFIXES[2])))
    calls = [SimpleNamespace(path="/boot-source", started=100.06,
                             latency_s=0.004),
             SimpleNamespace(path="/actions", started=100.09,
                             latency_s=0.5)]
    vm = SimpleNamespace(events=events, lines=lines,
                         api=SimpleNamespace(history=calls),
                         backend=SimpleNamespace(name="firecracker",
                                                 reason="", argv=[]))
    rec = timing.record_from_vm(vm, 1, 128, grace_s=0)
    assert rec.accel == "KVM"
    assert rec.spawn_to_api_ms == pytest.approx(50)
    assert rec.config_calls_ms == pytest.approx(4)
    assert rec.config_wall_ms == pytest.approx(20)
    assert rec.configure_ms == pytest.approx(40)
    assert rec.boot_timer_ms == 1990 and rec.boot_timer_cpu_ms == 1500
    assert rec.boot_timer_host_ms == pytest.approx(2000)
    assert rec.start_to_ready_ms == pytest.approx(4000)
    assert rec.launch_to_ready_ms == pytest.approx(4090)
    assert rec.kernel_to_init_ms == pytest.approx(1048.4)
    assert "Guest-boot-time" in (rec.boot_timer_line or "")


def test_baseline_command_line_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """baseline writes the matching file; compare exits 0, then 1."""
    monkeypatch.setenv("FCLAB_BUILD", str(tmp_path))
    rng = np.random.default_rng(5)
    run = frame(rng.normal(1000, 20, 10))
    run["launch_to_ready_ms"] = run["boot_timer_ms"] + 100
    run["error"] = None
    csv = timing.save_csv(run)
    assert csv == tmp_path / "boot_times.csv"
    assert timing.main(["compare"]) == 2
    assert timing.main(["baseline", "--from", str(csv)]) == 0
    written = timing.baseline_path("firecracker-emulator", "TCG", "lab")
    assert written.is_file() and written.parent == tmp_path / "baselines"
    assert timing.main(["compare"]) == 0
    slower = run.copy()
    slower["boot_timer_ms"] *= 1.5
    timing.save_csv(slower)
    assert timing.main(["compare"]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "baseline:" in out
    assert not list(tmp_path.rglob("*.tmp"))


def test_figures_render_and_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every figure renders from a sweep-shaped frame and saves a PNG."""
    from helpers import plots

    monkeypatch.setenv("FCLAB_BUILD", str(tmp_path))
    rng = np.random.default_rng(6)
    parts = []
    for vcpus, mem in [(1, 128), (2, 2048)]:
        for mode in ("serial", "parallel"):
            df = frame(rng.normal(3000, 100, 4), vcpus=vcpus, mem_mib=mem,
                       mode=mode)
            df["boot_timer_host_ms"] = df["boot_timer_ms"] + 30
            df["spawn_to_api_ms"] = 300.0
            df["configure_ms"] = 50.0
            df["start_to_ready_ms"] = df["boot_timer_host_ms"] + 700
            df["launch_to_ready_ms"] = df["start_to_ready_ms"] + 350
            df["vmm_rss_kib"] = 150_000.0 + mem * 50
            df["error"] = None
            parts.append(df)
    runs = pd.concat(parts, ignore_index=True)
    table = plots.breakdown_table(runs)
    assert list(table.index.get_level_values("mode")[:2]) == [
        "serial", "parallel"]
    row = table.loc[(1, 128, "serial")]
    assert row.sum() == pytest.approx(
        runs.query("vcpus == 1 and mode == 'serial'")[
            "launch_to_ready_ms"].median())
    for name, fig in [("cdf", plots.cdf(runs)),
                      ("breakdown", plots.time_breakdown(runs)),
                      ("published", plots.published_comparison(runs)),
                      ("memory", plots.memory_cost(runs))]:
        path = plots.save_figure(fig, name)
        assert path == tmp_path / "figures" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(plots.published_table()) == len(plots.PUBLISHED) + 1
