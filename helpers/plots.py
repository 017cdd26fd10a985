"""Figures of boot-time runs: CDFs, where the time goes, published figures.

Every function takes the DataFrame that helpers.timing.sweep returns and
gives back a matplotlib Figure built without pyplot, so nothing global
changes and a notebook shows the figure by ending a cell with it. The
figure shows itself as a PNG whose alternative text is its title, both
in JupyterLab and on the exported slides.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

from helpers.paths import build_dir

if TYPE_CHECKING:
    from collections.abc import Container

    import pandas as pd

log = logging.getLogger(__name__)

# Figure size in inches for one row of panels; wide enough for slides.
PANEL_SIZE = (4.2, 3.2)
# Resolution of the saved PNGs: sharp on a projector, small in a folder.
DPI = 120

# Colours per mode, so serial and parallel keep theirs in every figure.
MODE_COLOURS = {"serial": "tab:blue", "parallel": "tab:orange"}

# The stacked phases of a boot: column (or difference), label.
PHASES = (
    ("spawn_to_api_ms", "spawn -> API ready"),
    ("configure_ms", "configuration calls"),
    ("boot_timer_host_ms", "InstanceStart -> boot timer"),
    ("timer_to_ready_ms", "boot timer -> ready"),
)


@dataclass(frozen=True)
class PublishedFigure:
    """One published boot-time figure (ms) with where it comes from."""

    label: str
    mode: str
    p50_ms: float
    p99_ms: float
    source: str


# NSDI 2020, "Firecracker: Lightweight Virtualization for Serverless
# Applications" (Agache et al.): m5d.metal, 1 vCPU, 256 MB guests;
# serial is 500 boots, parallel is 1000 boots 50 at a time.
NSDI_2020 = "Agache et al., NSDI 2020"
PUBLISHED: tuple[PublishedFigure, ...] = (
    PublishedFigure("Firecracker end to end", "serial", 160.9, 172.5,
                    NSDI_2020),
    PublishedFigure("Firecracker boot timer", "serial", 110.0, 116.0,
                    NSDI_2020),
    PublishedFigure("Cloud Hypervisor", "serial", 102.5, 110.0, NSDI_2020),
    PublishedFigure("QEMU + qboot", "serial", 213.9, 221.4, NSDI_2020),
    PublishedFigure("Firecracker end to end", "parallel", 205.9, 247.3,
                    NSDI_2020),
    PublishedFigure("Firecracker boot timer", "parallel", 113.0, 148.0,
                    NSDI_2020),
    PublishedFigure("Cloud Hypervisor", "parallel", 127.7, 158.9,
                    NSDI_2020),
    PublishedFigure("QEMU + qboot", "parallel", 231.0, 280.5, NSDI_2020),
)
# Firecracker's specification: InstanceStart to /sbin/init within 125 ms.
SPEC_BOOT_MS = 125.0
SPEC_SOURCE = "Firecracker specification (SPECIFICATION.md)"
# Memory overhead per VMM process, MiB: the specification's bound, and the
# NSDI 2020 measurements for Firecracker and QEMU.
SPEC_OVERHEAD_MIB = 5.0
NSDI_FIRECRACKER_OVERHEAD_MIB = 2.5
NSDI_QEMU_OVERHEAD_MIB = 131.0
KIB_PER_MIB = 1024.0


def published_table() -> pd.DataFrame:
    """The published boot-time figures as a table, with sources."""
    import pandas as pd

    rows = [
        {"system": p.label, "mode": p.mode, "p50_ms": p.p50_ms,
         "p99_ms": p.p99_ms, "source": p.source}
        for p in PUBLISHED
    ]
    rows.append({"system": "Firecracker bound", "mode": "serial",
                 "p50_ms": math.nan, "p99_ms": SPEC_BOOT_MS,
                 "source": SPEC_SOURCE})
    return pd.DataFrame(rows)


class LabFigure(Figure):
    """A matplotlib Figure that a notebook shows with alternative text.

    Ending a cell with it displays a PNG twice over: as ``image/png``
    carrying ``alt`` in its metadata (the field Jupyter's classic HTML
    template reads) and as ``text/html``, an ``<img>`` with ``alt`` set,
    which JupyterLab and the reveal.js slides prefer and show. The text
    is :attr:`alt_text`: the figure's title, else its panels' titles.
    """

    @property
    def alt_text(self) -> str:
        """The figure's title, else its panels' titles, on one line."""
        titles = [self.get_suptitle()]
        if not titles[0]:
            titles = [ax.get_title() for ax in self.axes]
        lines = [" ".join(line.split()) for t in titles
                 for line in t.splitlines()]
        return "; ".join(line for line in lines if line) or "figure"

    def png_base64(self) -> str:
        """The figure as a base64 PNG, trimmed as Jupyter trims figures."""
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", bbox_inches="tight",
                     facecolor=self.get_facecolor(),
                     edgecolor=self.get_edgecolor())
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    def _repr_mimebundle_(
        self, include: Container[str] | None = None,
        exclude: Container[str] | None = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The PNG as ``image/png`` and as an ``<img>``, both with alt."""
        png = self.png_base64()
        alt = self.alt_text
        data = {
            "image/png": png,
            "text/html": (f'<img src="data:image/png;base64,{png}" '
                          f'alt="{html.escape(alt, quote=True)}">'),
        }
        return data, {"image/png": {"alt": alt}}


def _new_figure(ncols: float, nrows: float = 1) -> LabFigure:
    """A figure sized for *ncols* x *nrows* panels."""
    width, height = PANEL_SIZE
    return LabFigure(figsize=(width * ncols, height * nrows),
                     layout="constrained")


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of boots that did not fail."""
    if "error" not in df.columns:
        return df
    return df[df["error"].isna()]


def _configs(df: pd.DataFrame) -> list[tuple[int, int]]:
    """The (vCPUs, MiB) configurations in *df*, sorted."""
    pairs = df[["vcpus", "mem_mib"]].drop_duplicates()
    return sorted((int(v), int(m)) for v, m in pairs.itertuples(index=False))


def _config_label(vcpus: int, mem: int) -> str:
    """"1 vCPU, 128 MiB" style label."""
    return f"{vcpus} vCPU, {mem} MiB"


def _accel_note(df: pd.DataFrame) -> str:
    """Backend and acceleration for titles, e.g. "emulator (TCG)"."""
    if "backend" not in df.columns or df.empty:
        return ""
    backend = str(df["backend"].iloc[0])
    accel = str(df["accel"].iloc[0]) if "accel" in df.columns else "?"
    return f"{backend} ({accel})"


def cdf(df: pd.DataFrame, metric: str = "boot_timer_ms") -> LabFigure:
    """Empirical CDF of *metric*, one panel per configuration.

    Serial and parallel boots are drawn as two step curves on each panel.
    """
    import numpy as np

    df = _ok(df)
    configs = _configs(df)
    fig = _new_figure(max(len(configs), 1))
    axes = fig.subplots(1, max(len(configs), 1), squeeze=False)[0]
    for ax, (vcpus, mem) in zip(axes, configs):
        part = df[(df["vcpus"] == vcpus) & (df["mem_mib"] == mem)]
        for mode, colour in MODE_COLOURS.items():
            group = part[part["mode"] == mode]
            values = np.sort(group[metric].dropna().to_numpy(dtype=float))
            if values.size == 0:
                continue
            # Start the staircase at zero, at the fastest boot.
            xs = np.concatenate([values[:1], values])
            share = np.arange(values.size + 1) / values.size
            ax.step(xs, share, where="post", label=mode, color=colour)
        ax.set_title(_config_label(vcpus, mem))
        ax.set_xlabel(f"{metric.removesuffix('_ms')} (ms)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share of boots")
    if configs:
        axes[0].legend(loc="lower right")
    fig.suptitle(f"CDF of {metric} - {_accel_note(df)}")
    return fig


def breakdown_table(df: pd.DataFrame) -> pd.DataFrame:
    """Median ms of each boot phase per configuration and mode."""
    from pandas.api.types import CategoricalDtype

    df = _ok(df).copy()
    df["timer_to_ready_ms"] = (
        df["start_to_ready_ms"] - df["boot_timer_host_ms"]
    )
    columns = [name for name, _ in PHASES]
    # Serial before parallel, whatever the alphabet says.
    df["mode"] = df["mode"].astype(
        CategoricalDtype(list(MODE_COLOURS), ordered=True)
    )
    table = df.groupby(["vcpus", "mem_mib", "mode"], observed=True)[
        columns].median()
    return table.rename(columns=dict(PHASES))


def time_breakdown(df: pd.DataFrame) -> LabFigure:
    """Stacked bars of where a boot's time goes, median per phase.

    The four phases add up to launch -> ready: spawning the VMM until its
    API answers, the configuration calls, InstanceStart until the host
    sees the boot-timer line, and from there to the readiness marker.
    """
    table = breakdown_table(df)
    labels = [f"{v} vCPU {m} MiB\n{mode}" for v, m, mode in table.index]
    fig = _new_figure(2)
    ax = fig.subplots()
    left = [0.0] * len(table)
    for column in table.columns:
        widths = table[column].fillna(0).tolist()
        ax.barh(labels, widths, left=left, label=column)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("median time (ms)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2,
              fontsize="small")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Where the boot time goes - {_accel_note(df)}")
    return fig


def published_comparison(
    df: pd.DataFrame, vcpus: int = 1, mem_mib: int | None = None
) -> LabFigure:
    """Our p50/p99 next to the published ones, on a log scale.

    Ours are the boot timer and launch -> ready (the closest to the
    paper's "end to end") of the smallest memory size with *vcpus*.
    """
    import numpy as np

    df = _ok(df)
    part = df[df["vcpus"] == vcpus]
    if mem_mib is None and not part.empty:
        mem_mib = int(part["mem_mib"].min())
    part = part[part["mem_mib"] == mem_mib]
    note = _accel_note(df)
    rows: list[tuple[str, str, float, float]] = []
    for mode in ("serial", "parallel"):
        sub = part[part["mode"] == mode]
        for metric, name in (("boot_timer_ms", "boot timer"),
                             ("launch_to_ready_ms", "end to end")):
            values = sub[metric].dropna()
            if values.empty:
                continue
            rows.append((f"ours: {name}", mode,
                         float(np.percentile(values, 50)),
                         float(np.percentile(values, 99))))
    rows += [(p.label, p.mode, p.p50_ms, p.p99_ms) for p in PUBLISHED]

    fig = _new_figure(2, 1.4)
    axes = fig.subplots(1, 2, sharex=True, squeeze=False)[0]
    for ax, mode in zip(axes, ("serial", "parallel")):
        chosen = [r for r in rows if r[1] == mode]
        names = [r[0] for r in chosen]
        y = np.arange(len(chosen))
        colours = ["tab:red" if n.startswith("ours") else "tab:gray"
                   for n in names]
        ax.barh(y - 0.2, [r[2] for r in chosen], height=0.4,
                color=colours, label="p50")
        ax.barh(y + 0.2, [r[3] for r in chosen], height=0.4,
                color=colours, alpha=0.5, label="p99")
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.axvline(SPEC_BOOT_MS, color="black", linestyle="--",
                   linewidth=1, label="spec: 125 ms")
        ax.set_xscale("log")
        ax.set_xlabel("ms (log scale)")
        ax.set_title(mode)
        ax.grid(axis="x", alpha=0.3)
    axes[0].legend(loc="lower right", fontsize="small")
    fig.suptitle(
        f"Ours: {note}, {vcpus} vCPU, {mem_mib} MiB\n"
        f"Published: {NSDI_2020}, 1 vCPU, 256 MB, KVM on m5d.metal"
    )
    return fig


def memory_cost(df: pd.DataFrame) -> LabFigure:
    """VMM resident memory after ready against the guest's memory size.

    The resident set holds the guest pages touched so far plus the VMM's
    own overhead; the reference lines are published overheads alone.
    """
    import numpy as np
    from matplotlib.ticker import ScalarFormatter

    df = _ok(df)
    fig = _new_figure(2, 1.3)
    ax = fig.subplots()
    for mode, colour in MODE_COLOURS.items():
        group = df[df["mode"] == mode]
        ax.scatter(group["mem_mib"], group["vmm_rss_kib"] / KIB_PER_MIB,
                   label=f"ours, {mode}", alpha=0.7, color=colour)
    sizes = np.unique(df["mem_mib"].to_numpy(dtype=float))
    if sizes.size:
        ax.plot(sizes, sizes, color="tab:green", linewidth=1,
                label="guest memory, if all touched")
    ax.axhline(SPEC_OVERHEAD_MIB, color="black", linestyle="--",
               linewidth=1, label="Firecracker bound: 5 MiB overhead")
    ax.axhline(NSDI_QEMU_OVERHEAD_MIB, color="tab:gray", linestyle=":",
               linewidth=1, label="QEMU overhead, NSDI 2020: ~131 MB")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("guest memory (MiB)")
    ax.set_ylabel("VMM RSS after ready (MiB)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2,
              fontsize="small")
    ax.grid(alpha=0.3)
    ax.set_title(f"Memory per microVM - {_accel_note(df)}")
    return fig


def save_figure(fig: Figure, name: str, folder: Path | None = None) -> Path:
    """Save *fig* as PNG under build/figures (or *folder*); return the path."""
    target = (folder or build_dir() / "figures") / f"{name}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    log.debug("figure saved to %s", target)
    return target
