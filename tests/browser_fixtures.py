"""Throwaway notebooks and a headless Chromium for the series' tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbformat

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext

CHROMIUM = Path("/usr/bin/chromium")
# As the machine's notes prescribe: without the background-networking
# flags Chromium keeps dialling Google's hosts on a closed network.
CHROMIUM_ARGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
    "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
)

TITLE = "Tiny lab"
PLOT_HEADING = "Boot times"


def cell(
    kind: str, source: str, slide: str = "-", tags: Sequence[str] = ()
) -> nbformat.NotebookNode:
    """One cell with its slide type (and tags)."""
    make = (
        nbformat.v4.new_markdown_cell if kind == "markdown"
        else nbformat.v4.new_code_cell
    )
    node = make(source)
    node.metadata["slideshow"] = {"slide_type": slide}
    if tags:
        node.metadata["tags"] = list(tags)
    return node


def write_notebook(path: Path, cells: Sequence[nbformat.NotebookNode]) -> Path:
    """Write *cells* as a python3 notebook at *path*."""
    nb = nbformat.v4.new_notebook(cells=list(cells))
    nb.metadata["kernelspec"] = {
        "name": "python3", "display_name": "Python 3", "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, path)
    return path


RECORD_CELL = """\
import json, os
record = {"backend": BACKEND, "n_boots": N_BOOTS,
          "configs": [list(c) for c in CONFIGS]}
with open(os.environ["FCLAB_RECORD"], "w") as f:
    json.dump(record, f)
record"""

PLOT_CELL = """\
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.bar(range(N_BOOTS), [120 + 7 * i for i in range(N_BOOTS)])
ax.set_xlabel("boot")
ax.set_ylabel("boot time (ms)")
fig.savefig(os.path.join(os.environ["FCLAB_BUILD"], "tiny_boot_times.png"))
plt.show()"""


def plot_notebook(path: Path, title: str = TITLE) -> Path:
    """A notebook with parameters, a record and a boot-time bar plot."""
    return write_notebook(path, [
        cell("markdown", f"# {title}\n\nA throwaway deck.", "slide"),
        cell("code", "import os\nimport matplotlib.pyplot as plt", "skip"),
        cell("code", 'BACKEND = "auto"\nN_BOOTS = 5\nCONFIGS = [(1, 128)]',
             "skip", ["parameters"]),
        cell("markdown", "## What was asked", "slide"),
        cell("code", RECORD_CELL, "-"),
        cell("markdown", "Spoken, not shown.", "notes"),
        cell("markdown", f"## {PLOT_HEADING}", "slide"),
        cell("code", PLOT_CELL, "-"),
        cell("markdown", "## Summary\n\n- one\n- two", "slide"),
        cell("markdown", "Said last.", "fragment"),
    ])


def plain_notebook(path: Path, title: str, code: str) -> Path:
    """A notebook without parameters: a title and one code cell."""
    return write_notebook(path, [
        cell("markdown", f"# {title}", "slide"),
        cell("code", code, "-"),
    ])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def chromium() -> Iterator[BrowserContext]:
    """Headless Debian Chromium driven by Playwright, with a fresh profile."""
    from playwright.sync_api import sync_playwright

    profile = Path(tempfile.mkdtemp(prefix="fclab-chromium-"))
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(profile),
                executable_path=str(CHROMIUM),
                args=list(CHROMIUM_ARGS),
                headless=True,
                viewport={"width": 1280, "height": 900},
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def watch(page: Any, problems: list[str]) -> None:
    """Collect console errors, failed requests and HTTP errors of *page*."""
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(
        f"request failed: {r.url} ({r.failure})"))
    page.on("response", lambda r: problems.append(
        f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)


def env_without_proxy() -> dict[str, str]:
    """The environment minus proxies, so loopback stays loopback."""
    return {
        k: v for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
