"""The boot-time figures carry their title as alternative text.

In JupyterLab's and the slides' ``<img>`` alike: a tiny notebook makes
the figures as notebook 04 does, runs in a real kernel and is exported
with the series' own slide export, which must find no image without alt.
"""

from __future__ import annotations

import base64
import html
import logging
import os
import re
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from browser_fixtures import cell, write_notebook
from IPython.core.formatters import DisplayFormatter

from helpers import plots, series
from helpers.paths import REPO_ROOT

# What nbconvert logs when an exported image has no alternative text.
MISSING_ALT = "Alternative text is missing"

# The figure functions notebook 04 shows, by name.
FIGURES = ("cdf", "time_breakdown", "published_comparison", "memory_cost")


def sweep_frame() -> pd.DataFrame:
    """A small frame shaped like helpers.timing.sweep's result."""
    rng = np.random.default_rng(4)
    rows = []
    for mode in ("serial", "parallel"):
        for timer in rng.normal(900.0, 40.0, 5):
            rows.append({
                "vcpus": 1, "mem_mib": 128, "mode": mode,
                "boot_timer_ms": timer, "boot_timer_host_ms": timer + 20,
                "spawn_to_api_ms": 200.0, "configure_ms": 30.0,
                "start_to_ready_ms": timer + 400,
                "launch_to_ready_ms": timer + 630,
                "vmm_rss_kib": 90_000.0, "error": None,
                "backend": "emulator", "accel": "tcg",
            })
    return pd.DataFrame(rows)


def test_every_figure_is_described_by_its_title() -> None:
    df = sweep_frame()
    cdf = plots.cdf(df)
    assert cdf.alt_text == "CDF of boot_timer_ms - emulator (tcg)"
    # No figure title: the panel's title stands in.
    breakdown = plots.time_breakdown(df)
    assert breakdown.alt_text == "Where the boot time goes - emulator (tcg)"
    # A two-line title becomes one line, its lines kept apart.
    published = plots.published_comparison(df)
    assert published.alt_text.startswith(
        "Ours: emulator (tcg), 1 vCPU, 128 MiB; Published: Agache et al.")
    assert plots.memory_cost(df).alt_text.startswith("Memory per microVM")


def test_ipython_shows_a_png_with_alt_in_both_forms() -> None:
    fig = plots.cdf(sweep_frame())
    fig.suptitle('Boots "under" <load> & more')
    data, metadata = DisplayFormatter().format(fig)
    png = base64.b64decode(data["image/png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert metadata["image/png"]["alt"] == 'Boots "under" <load> & more'
    assert data["text/html"] == (
        f'<img src="data:image/png;base64,{data["image/png"]}" '
        'alt="Boots &quot;under&quot; &lt;load&gt; &amp; more">')


def test_save_figure_still_writes_the_png(tmp_path: Path) -> None:
    fig = plots.cdf(sweep_frame())
    path = plots.save_figure(fig, "cdf", tmp_path)
    assert path == tmp_path / "cdf.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.notebook
def test_exported_slides_carry_every_figures_alt_text(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import papermill

    data = tmp_path / "runs.csv"
    sweep_frame().to_csv(data, index=False)
    shows = [
        cell("code", f'fig = plots.{name}(df)\n'
             f'plots.save_figure(fig, "{name}", FOLDER)\nfig', "slide")
        for name in FIGURES
    ]
    source = write_notebook(tmp_path / "figures.ipynb", [
        cell("code", "from pathlib import Path\n\nimport pandas as pd\n\n"
             "from helpers import plots", "skip"),
        cell("code", f"df = pd.read_csv({str(data)!r})\n"
             f"FOLDER = Path({str(tmp_path / 'figures')!r})", "skip"),
        *shows,
    ])
    executed = tmp_path / "executed.ipynb"
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT), prepend=os.pathsep)
    papermill.execute_notebook(source, executed, kernel_name="python3",
                               progress_bar=False)
    titles = {name: getattr(plots, name)(sweep_frame()).alt_text
              for name in FIGURES}
    outputs = [o for c in nbformat.read(executed, 4).cells[2:]
               for o in c.outputs]
    assert [o.metadata["image/png"]["alt"] for o in outputs] == list(
        titles.values())

    with caplog.at_level(logging.WARNING):
        deck = series.export_deck(executed, tmp_path, "Figures")
    images = re.findall(r"<img\b[^>]*>", deck.read_text())
    assert len(images) == len(FIGURES)
    for tag, title in zip(images, titles.values()):
        alt = re.search(r'\balt="([^"]*)"', tag)
        assert alt is not None, tag[:80]
        assert html.unescape(alt.group(1)) == title
    assert MISSING_ALT not in caplog.text
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(
        f"{name}.png" for name in FIGURES)
