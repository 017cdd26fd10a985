"""Run the notebook series, export it as slides, serve it to a room.

Maintainers execute every numbered notebook as a regression suite,
instructors turn the executed copies into reveal.js slides that need no
internet, and one machine can serve the guest artifacts and the slides to
a whole room. Command line::

    python -m helpers.series run [--backend auto] [--out build] [--quick]
                                 [--only 02] [-p NAME=VALUE ...]
    python -m helpers.series slides [--no-execute] [run options]
    python -m helpers.series mirror [--port 8000] [--bind 0.0.0.0]
    python -m helpers.series lab [--port 8888] [--no-browser]
    python -m helpers.series kernel
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import functools
import hashlib
import html
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from helpers.cli import configure_logging
from helpers.errors import LabError
from helpers.notebook import RECORD_ENV
from helpers.paths import BUILD_ENV, REPO_ROOT, build_dir, cache_dir

if TYPE_CHECKING:
    import nbformat

    from helpers.artifacts import Artifacts

log = logging.getLogger(__name__)

# The series: two-digit prefixes give the order.
NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"

# Folders inside the build folder.
EXECUTED_SUBDIR = "notebooks"
RECORDS_SUBDIR = "records"
SLIDES_SUBDIR = "slides"
MIRROR_SUBDIR = "mirror"
SCREENSHOTS_SUBDIR = "screenshots"
# Results the notebooks write elsewhere in the build folder count as
# CSVs and figures; these folders hold the series' own outputs instead.
OWN_SUBDIRS = frozenset({
    EXECUTED_SUBDIR, RECORDS_SUBDIR, SLIDES_SUBDIR, MIRROR_SUBDIR,
    SCREENSHOTS_SUBDIR,
})
FIGURE_SUFFIXES = (".png", ".svg", ".pdf")

# The project's kernel, registered inside the environment by `lab`.
KERNEL_NAME = "firecracker-lab"
KERNEL_DISPLAY_NAME = "Firecracker Lab"
# What every notebook names in its metadata, so it runs anywhere.
FALLBACK_KERNEL = "python3"


# The parameter every notebook that boots guests declares.
BACKEND_PARAMETER = "BACKEND"
DEFAULT_BACKEND = "auto"

# Small sizes for tests and CI: two boots of the smallest configuration
# per mode draw every table and plot, and finish in minutes under TCG.
# A name reaches only the notebooks whose parameters cell declares it.
QUICK_PARAMETERS: dict[str, Any] = {
    "N_BOOTS": 2,
    "CONFIGS": [[1, 128]],
    "WARMUP": 0,
    "N_TASKS": 2,
    # Progress bars only clutter an executed copy nobody watches live.
    "PROGRESS": False,
}

# A cell booting guests under TCG can take minutes; one still running
# after half an hour is stuck, and the run says so instead of hanging.
CELL_TIMEOUT_S = 1800
# A kernel that has not answered within two minutes will not answer.
KERNEL_START_TIMEOUT_S = 120

# Lines of a failing cell's source quoted in the error message.
SOURCE_LINES_SHOWN = 6

# Front-end assets, pinned in package.json and package-lock.json.
PACKAGE_JSON = REPO_ROOT / "package.json"
PACKAGE_LOCK = REPO_ROOT / "package-lock.json"
REVEAL_PACKAGE = "reveal.js"
# The folder, next to the decks, that the decks load reveal.js from.
REVEAL_DIR = "reveal.js"
# The folders of the reveal.js package that the decks use.
REVEAL_PARTS = ("dist", "plugin")
# "white" ships its fonts inside the package; nbconvert's default,
# "simple", imports them from Google and breaks offline.
REVEAL_THEME = "white"
# Characters of the lock file's digest naming its npm install in the cache.
LOCK_DIGEST_CHARS = 16
DECK_SUFFIX = ".slides.html"
# The slide size reveal.js scales to the screen: 4:3 fits old projectors.
SLIDE_WIDTH = 1024
SLIDE_HEIGHT = 768

DEFAULT_MIRROR_PORT = 8000
DEFAULT_MIRROR_BIND = "0.0.0.0"
# The guest built offline needs no internet, which a room may lack.
DEFAULT_MIRROR_SOURCE = "local"
DEFAULT_LAB_PORT = 8888

# nbconvert's reveal template loads jQuery, require.js, MathJax, mermaid
# and reveal.js from CDNs. This variant drops the first four (the decks
# need none of them) and loads reveal.js from the folder next to the deck.
OFFLINE_TEMPLATE_FILE = "fclab_offline_reveal.html.j2"
OFFLINE_TEMPLATE = """\
{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_css -%}
<link rel="icon" href="data:,">
<style>
/* A slide taller than the screen scrolls instead of being cut off. */
.reveal .slides section:not(.stack) { max-height: 100%; overflow-y: auto; }
</style>
{%- endblock html_head_css -%}
{%- block footer_js -%}
<script src="{{ resources.reveal.url_prefix }}/dist/reveal.js"></script>
<script src="{{ resources.reveal.url_prefix }}/plugin/notes/notes.js">
</script>
<script>
Reveal.initialize({
  controls: true,
  progress: true,
  history: true,
  slideNumber: "c/t",
  transition: "{{ resources.reveal.transition }}",
  width: {{ resources.reveal.width }},
  height: {{ resources.reveal.height }},
  plugins: [RevealNotes]
});
</script>
{%- endblock footer_js -%}
"""


class SeriesError(LabError):
    """Base class of the errors running or presenting the series."""


class NoNotebooksError(SeriesError):
    """No numbered notebook matched."""


class ParameterError(SeriesError):
    """A parameter or a parameters cell is not usable."""


class NotebookFailed(SeriesError):
    """A notebook of the series stopped with an error."""

    def __init__(
        self, message: str, notebook: Path, output: Path, seconds: float
    ) -> None:
        super().__init__(message)
        self.notebook = notebook
        self.output = output
        self.seconds = seconds


class SlidesError(SeriesError):
    """The slides could not be built, or would need the internet."""


class ToolMissingError(SeriesError):
    """A program the command needs is not installed."""


@dataclass(frozen=True)
class NotebookRun:
    """One notebook's execution: where its outputs went and how long."""

    notebook: Path
    output: Path
    record: Path
    seconds: float
    parameters: dict[str, Any]
    ok: bool = True

    @property
    def recorded(self) -> int:
        """Number of results the notebook recorded (0 when none)."""
        try:
            data = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return 0
        return len(data) if isinstance(data, dict) else 0


@dataclass
class SeriesRun:
    """The executions of one run of the series, in order."""

    out: Path
    runs: list[NotebookRun] = dataclasses.field(default_factory=list)
    # Notebooks not run because the host lacks what they need, and why.
    skipped: list[tuple[Path, str]] = dataclasses.field(
        default_factory=list
    )

    @property
    def seconds(self) -> float:
        """Total wall time of the notebooks run so far."""
        return sum(r.seconds for r in self.runs)


# ---------------------------------------------------------------- notebooks


def find_notebooks(
    directory: Path | None = None, only: Sequence[str] = ()
) -> list[Path]:
    """Return the numbered notebooks of *directory* in order.

    *only* keeps those whose number (``02``) or stem (``02_boot``) is
    listed; entries may also be comma-separated.
    """
    directory = directory or NOTEBOOKS_DIR
    found = sorted(directory.glob(NOTEBOOK_GLOB))
    wanted = {w.strip() for item in only for w in item.split(",")} - {""}
    if wanted:
        found = [
            p for p in found if p.stem in wanted or p.stem[:2] in wanted
        ]
    if not found:
        which = f" matching {sorted(wanted)}" if wanted else ""
        raise NoNotebooksError(
            f"no notebook {NOTEBOOK_GLOB}{which} in {directory}; check "
            "the folder (--notebooks) and the --only filter"
        )
    return found


def _read(path: Path) -> nbformat.NotebookNode:
    """Read notebook *path* as nbformat 4."""
    import nbformat

    return nbformat.read(path, as_version=4)


def _source(cell: Mapping[str, Any]) -> str:
    """Return a cell's source as one string."""
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def parameters_cell_values(source: str) -> dict[str, Any]:
    """Parse a parameters cell: only UPPER_CASE literal assignments.

    Raises ParameterError naming the first statement that is anything
    else, since papermill can only override plain assignments.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ParameterError(
            f"the parameters cell is not valid Python: {exc}"
        ) from exc
    values: dict[str, Any] = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        if (
            not isinstance(node, ast.Assign)
            or len(node.targets) != 1
            or not isinstance(target, ast.Name)
            or not target.id.isupper()
        ):
            raise ParameterError(
                f"line {node.lineno} of the parameters cell is not an "
                "UPPER_CASE = literal assignment; move other code to the "
                "next cell"
            )
        try:
            values[target.id] = ast.literal_eval(node.value)
        except ValueError as exc:
            raise ParameterError(
                f"{target.id} on line {node.lineno} of the parameters cell "
                "is not a literal; write its value out (numbers, strings, "
                "lists, dicts, True/False/None)"
            ) from exc
    return values


def declared_parameters(path: Path) -> dict[str, Any]:
    """Return the names and default values of *path*'s parameters cell.

    A notebook without a ``parameters``-tagged cell declares nothing.
    """
    cells = [
        c for c in _read(path).cells
        if "parameters" in c.get("metadata", {}).get("tags", [])
    ]
    if len(cells) > 1:
        raise ParameterError(
            f"{path.name} has {len(cells)} cells tagged 'parameters'; "
            "papermill uses one, so keep the tag on one cell"
        )
    return parameters_cell_values(_source(cells[0])) if cells else {}


def notebook_title(path: Path) -> str:
    """Return the first Markdown heading of *path*, else its stem."""
    for cell in _read(path).cells:
        if cell.get("cell_type") != "markdown":
            continue
        for line in _source(cell).splitlines():
            if line.startswith("#"):
                title = line.lstrip("#").strip()
                if title:
                    return title
    return path.stem


def parse_assignments(pairs: Sequence[str]) -> dict[str, Any]:
    """Turn ``NAME=VALUE`` strings into parameters.

    A value that reads as a Python literal (``2``, ``[1, 128]``,
    ``True``) becomes that literal, anything else stays a string.
    """
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier() or not name.isupper():
            raise ParameterError(
                f"-p {pair!r}: write NAME=VALUE with an UPPER_CASE name, "
                "as in -p N_BOOTS=3"
            )
        try:
            values[name] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            values[name] = text
    return values


def series_parameters(
    notebooks: Sequence[Path],
    backend: str,
    overrides: Mapping[str, Any],
    quick: bool = False,
) -> dict[Path, dict[str, Any]]:
    """Decide which parameters each notebook receives.

    The backend, the quick preset and the overrides (strongest last)
    reach only the notebooks that declare them. An override that no
    notebook declares is refused: it is almost always a typo.
    """
    declared = {nb: declared_parameters(nb) for nb in notebooks}
    known = set().union(*(d.keys() for d in declared.values()))
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ParameterError(
            f"no notebook declares {', '.join(unknown)}; declared are: "
            f"{', '.join(sorted(known)) or 'none'}"
        )
    wanted: dict[str, Any] = {BACKEND_PARAMETER: backend}
    if quick:
        wanted.update(QUICK_PARAMETERS)
    wanted.update(overrides)
    return {
        nb: {k: v for k, v in wanted.items() if k in names}
        for nb, names in declared.items()
    }


def _as_papermill_value(value: Any) -> Any:
    """*value* with tuples as lists: papermill would inject a tuple as
    the string of its repr."""
    if isinstance(value, tuple | list):
        return [_as_papermill_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_papermill_value(v) for k, v in value.items()}
    return value


def pick_kernel() -> str:
    """Return the project's kernel when registered and usable."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    try:
        spec = manager.get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        return FALLBACK_KERNEL
    program = spec.argv[0] if spec.argv else ""
    found = shutil.which(program) or program
    # A kernel registered from another environment would run the series
    # with other packages than the ones installed here: use ours instead.
    # (Paths compared unresolved: a venv's python links to its base.)
    same = os.path.abspath(found) == os.path.abspath(sys.executable)
    if not same:
        log.warning(
            "kernel %s runs %s, not this interpreter; using %s (re-register "
            "it with `python -m helpers.series kernel`)",
            KERNEL_NAME, program, FALLBACK_KERNEL,
        )
        return FALLBACK_KERNEL
    return KERNEL_NAME


def _pythonpath() -> str:
    """PYTHONPATH that lets a kernel import the helpers from this tree."""
    current = os.environ.get("PYTHONPATH", "")
    parts = [str(REPO_ROOT)] + [p for p in current.split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables (which kernels inherit) for a while."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _describe_failure(
    notebook: Path, output: Path, exc: Exception
) -> str:
    """Explain which cell of *notebook* failed, how, and what to do."""
    from papermill.exceptions import PapermillExecutionError

    if not isinstance(exc, PapermillExecutionError):
        return (
            f"{notebook.name} stopped: {type(exc).__name__}: {exc}\n"
            f"The executed copy up to that point is {output}"
        )
    cells = _read(notebook).cells
    source = exc.source or ""
    matches = [i for i, c in enumerate(cells) if _source(c) == source]
    where = (
        f"cell {matches[0] + 1} of {len(cells)}" if matches
        else "an injected cell"
    )
    lines = source.splitlines()
    shown = "\n".join("    " + line for line in lines[:SOURCE_LINES_SHOWN])
    if len(lines) > SOURCE_LINES_SHOWN:
        shown += "\n    ..."
    return (
        f"{notebook.name} failed at In [{exc.exec_count}] ({where}):\n"
        f"{shown}\n"
        f"{exc.ename}: {exc.evalue}\n"
        f"The partial executed notebook, with the traceback, is {output}; "
        "open it in JupyterLab, fix the cause and run again "
        f"(--only {notebook.stem[:2]} repeats just this notebook)."
    )


def _ipc_kernel_manager() -> type:
    """A kernel manager that talks to its kernel over Unix sockets.

    Over TCP (the default) every kernel warns that its traffic is not
    encrypted; the series only ever runs kernels on this machine, so
    Unix sockets in Jupyter's runtime folder say nothing and expose
    nothing.
    """
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.paths import jupyter_runtime_dir

    class IpcKernelManager(AsyncKernelManager):  # type: ignore[misc]
        """AsyncKernelManager with ``ipc`` transport in the runtime dir."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            runtime = Path(jupyter_runtime_dir())
            runtime.mkdir(parents=True, exist_ok=True)
            self.transport = "ipc"
            self.ip = str(runtime / f"fclab-{os.getpid()}-{id(self):x}")

    return IpcKernelManager


def execute_notebook(
    notebook: Path,
    out: Path,
    parameters: Mapping[str, Any],
    kernel: str,
    cell_timeout: float | None = CELL_TIMEOUT_S,
) -> NotebookRun:
    """Execute *notebook* with papermill into ``out/notebooks``.

    The kernel finds the record file in FCLAB_RECORD and the build folder
    in FCLAB_BUILD. Raises NotebookFailed after saving the partial copy.
    """
    import papermill

    output = out / EXECUTED_SUBDIR / notebook.name
    record = out / RECORDS_SUBDIR / f"{notebook.stem}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    record.parent.mkdir(parents=True, exist_ok=True)
    # A record left by an earlier run would pass for this run's results.
    record.unlink(missing_ok=True)
    env = {
        RECORD_ENV: str(record),
        BUILD_ENV: str(out),
        "PYTHONPATH": _pythonpath(),
    }
    log.info("executing %s with %s", notebook.name, dict(parameters))
    start = time.monotonic()
    try:
        with _environment(env):
            papermill.execute_notebook(
                notebook, output,
                parameters={
                    k: _as_papermill_value(v) for k, v in parameters.items()
                } or None,
                kernel_name=kernel,
                cwd=notebook.parent,
                progress_bar=False,
                log_output=False,
                request_save_on_cell_execute=True,
                execution_timeout=cell_timeout,
                start_timeout=KERNEL_START_TIMEOUT_S,
                kernel_manager_class=_ipc_kernel_manager(),
            )
    except Exception as exc:
        raise NotebookFailed(
            _describe_failure(notebook, output, exc), notebook, output,
            time.monotonic() - start,
        ) from exc
    return NotebookRun(
        notebook, output, record, time.monotonic() - start, dict(parameters)
    )


def _net_admin() -> str | None:
    """Why task networks cannot be made here, or None when they can."""
    from helpers.net import NetPrivileges

    missing = NetPrivileges.current().missing
    if not missing:
        return None
    return (
        f"needs {' and '.join(missing)} for network namespaces and TAP "
        "devices: run the series as root (`sudo make run`)"
    )


# What a notebook may declare in its metadata (``fclab.requires``), each
# with the check that says why the host cannot provide it.
REQUIREMENTS: dict[str, Callable[[], str | None]] = {
    "net-admin": _net_admin,
}


def unmet_requirements(
    notebook: Path,
    checks: Mapping[str, Callable[[], str | None]] | None = None,
) -> str | None:
    """Say why *notebook* cannot run on this host, or None if it can."""
    checks = REQUIREMENTS if checks is None else checks
    declared = _read(notebook).metadata.get("fclab", {}).get("requires", [])
    reasons = []
    for name in declared:
        if name not in checks:
            raise SeriesError(
                f"{notebook.name} requires {name!r}, which the series does "
                f"not know; known requirements: {', '.join(sorted(checks))}"
            )
        reason = checks[name]()
        if reason:
            reasons.append(reason)
    return "; ".join(reasons) or None


def run_series(
    notebooks: Sequence[Path],
    out: Path,
    backend: str = DEFAULT_BACKEND,
    overrides: Mapping[str, Any] | None = None,
    quick: bool = False,
    kernel: str | None = None,
    cell_timeout: float | None = CELL_TIMEOUT_S,
    on_done: Callable[[NotebookRun], None] | None = None,
    series: SeriesRun | None = None,
    checks: Mapping[str, Callable[[], str | None]] | None = None,
) -> SeriesRun:
    """Execute *notebooks* in order, stopping at the first failure.

    Each finished notebook is appended to *series* (pass your own to keep
    the finished ones when NotebookFailed propagates) and handed to
    *on_done*. A notebook whose declared requirements the host lacks is
    skipped with the reason, not failed: the rest still runs.
    """
    plan = series_parameters(notebooks, backend, overrides or {}, quick)
    kernel = kernel or pick_kernel()
    series = series if series is not None else SeriesRun(out)
    for notebook in notebooks:
        reason = unmet_requirements(notebook, checks)
        if reason:
            log.warning("skipping %s: %s", notebook.name, reason)
            series.skipped.append((notebook, reason))
            continue
        run = execute_notebook(
            notebook, out, plan[notebook], kernel, cell_timeout
        )
        series.runs.append(run)
        if on_done is not None:
            on_done(run)
    return series


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Lay out *rows* under *headers* in aligned columns."""
    widths = [
        max(len(str(x)) for x in column)
        for column in zip(headers, *rows)
    ]
    lines = [
        "  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
        for row in (headers, ["-" * w for w in widths], *rows)
    ]
    return "\n".join(lines)


def timing_table(
    series: SeriesRun, failed: NotebookFailed | None = None
) -> str:
    """Wall time per notebook and in total, as a table."""
    rows = [
        [r.notebook.name, f"{r.seconds:.1f}", "ok", str(r.recorded)]
        for r in series.runs
    ]
    rows += [[nb.name, "-", "skipped", "-"] for nb, _ in series.skipped]
    total = series.seconds
    if failed is not None:
        rows.append([failed.notebook.name, f"{failed.seconds:.1f}",
                     "FAILED", "-"])
        total += failed.seconds
    rows.append(["total", f"{total:.1f}", "", ""])
    table = format_table(["notebook", "seconds", "status", "records"], rows)
    notes = [f"skipped {nb.name}: {why}" for nb, why in series.skipped]
    return "\n".join([table, *notes])


def _results(out: Path, suffixes: Sequence[str]) -> list[Path]:
    """Files with *suffixes* the notebooks wrote into *out*."""
    found = []
    for path in sorted(out.rglob("*")):
        parts = path.relative_to(out).parts
        if parts[0] in OWN_SUBDIRS or not path.is_file():
            continue
        if path.suffix in suffixes:
            found.append(path)
    return found


def results_summary(out: Path) -> str:
    """Say where the executed notebooks, records, CSVs and figures are."""
    csvs = _results(out, (".csv",))
    figures = _results(out, FIGURE_SUFFIXES)
    listed = {
        "CSVs": ", ".join(str(p) for p in csvs) or "none written",
        "figures": ", ".join(str(p) for p in figures) or "none written",
    }
    lines = [
        f"executed notebooks: {out / EXECUTED_SUBDIR}",
        f"records:            {out / RECORDS_SUBDIR}",
        f"CSVs:               {listed['CSVs']}",
        f"figures:            {listed['figures']}",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------- slides


def _lock_digest() -> str:
    """Digest of the npm manifest and lock file naming their install."""
    digest = hashlib.sha256()
    for path in (PACKAGE_JSON, PACKAGE_LOCK):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:LOCK_DIGEST_CHARS]


def npm_package(name: str = REVEAL_PACKAGE) -> Path:
    """Return package *name* installed from the pinned lock file.

    ``npm ci`` runs once per lock file into the cache; a failed install
    leaves nothing behind.
    """
    for path in (PACKAGE_JSON, PACKAGE_LOCK):
        if not path.is_file():
            raise SlidesError(
                f"{path} is missing; restore it from git (it pins the "
                "slides' front-end packages)"
            )
    home = cache_dir() / "npm" / _lock_digest()
    package = home / "node_modules" / name
    if (package / "package.json").is_file():
        return package
    npm = shutil.which("npm")
    if npm is None:
        raise ToolMissingError(
            "npm is needed once to fetch reveal.js for the slides; install "
            "Node.js 20 with npm (apt-get install nodejs npm) and retry"
        )
    home.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=home.parent))
    try:
        for path in (PACKAGE_JSON, PACKAGE_LOCK):
            shutil.copy2(path, partial / path.name)
        command = [
            npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund",
            "--loglevel=error",
        ]
        log.info("installing front-end packages: %s", " ".join(command))
        done = subprocess.run(
            command, cwd=partial, capture_output=True, text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SlidesError(
                f"`{' '.join(command)}` exited with {done.returncode}:\n"
                f"{done.stderr[-2000:]}\nThe npm registry must be "
                "reachable once; later builds reuse the cache."
            )
        try:
            partial.rename(home)
        except OSError:
            # Another build installed the same lock file meanwhile.
            if not (package / "package.json").is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return package


def install_reveal(slides: Path) -> Path:
    """Copy reveal.js's dist/ and plugin/ next to the decks."""
    package = npm_package(REVEAL_PACKAGE)
    dest = slides / REVEAL_DIR
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for part in REVEAL_PARTS:
        shutil.copytree(package / part, dest / part)
    for name in ("LICENSE", "package.json"):
        if (package / name).is_file():
            shutil.copy2(package / name, dest / name)
    return dest


def _hide_machinery(nb: nbformat.NotebookNode) -> None:
    """Keep papermill's injected parameters off the slides."""
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags:
            cell.metadata.setdefault("slideshow", {})["slide_type"] = "skip"


def export_deck(notebook: Path, dest: Path, title: str) -> Path:
    """Export *notebook* as an offline reveal.js deck into *dest*."""
    import jinja2
    from nbconvert import SlidesExporter
    from traitlets.config import Config

    config = Config()
    config.SlidesExporter.reveal_url_prefix = REVEAL_DIR
    config.SlidesExporter.reveal_theme = REVEAL_THEME
    config.SlidesExporter.reveal_width = str(SLIDE_WIDTH)
    config.SlidesExporter.reveal_height = str(SLIDE_HEIGHT)
    exporter = SlidesExporter(
        config=config,
        extra_loaders=[
            jinja2.DictLoader({OFFLINE_TEMPLATE_FILE: OFFLINE_TEMPLATE})
        ],
    )
    exporter.template_file = OFFLINE_TEMPLATE_FILE
    nb = _read(notebook)
    _hide_machinery(nb)
    nb.metadata["title"] = title
    body, _ = exporter.from_notebook_node(nb)
    deck = dest / deck_name(notebook)
    deck.write_text(body, encoding="utf-8")
    return deck


INDEX_TEMPLATE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<link rel="icon" href="data:,">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 40em; margin: 3em auto;
       line-height: 1.5; color: #222; }}
li {{ margin: 0.4em 0; }}
.number {{ color: #888; font-variant-numeric: tabular-nums; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>Open a deck, then use the arrow keys or the space bar;
press <kbd>S</kbd> for speaker notes and <kbd>Esc</kbd> for an overview.</p>
<ol>
{items}
</ol>
</body>
</html>
"""


def _deck_number(deck: Path, title: str) -> str:
    """The deck's number before its title, unless the title has one."""
    return "" if title[:1].isdigit() else deck.name[:2] + " "


def write_index(
    dest: Path, decks: Sequence[tuple[Path, str]],
    title: str = "Firecracker Lab slides",
) -> Path:
    """Write ``index.html`` linking *decks* (path, title) in order."""
    items = "\n".join(
        f'<li><span class="number">{html.escape(_deck_number(deck, name))}'
        f'</span><a href="{html.escape(deck.name)}">{html.escape(name)}</a>'
        "</li>"
        for deck, name in decks
    )
    index = dest / "index.html"
    index.write_text(
        INDEX_TEMPLATE.format(title=html.escape(title), items=items),
        encoding="utf-8",
    )
    return index


# Attributes through which HTML makes the browser fetch something.
_LOADING_ATTRIBUTES = {
    "script": ("src",), "link": ("href",), "img": ("src", "srcset"),
    "iframe": ("src",), "source": ("src", "srcset"), "video": ("src",
    "poster"), "audio": ("src",), "embed": ("src",), "object": ("data",),
    "track": ("src",), "input": ("src",),
}
# CSS and script text that fetches: url(...), @import "...", import ... from.
_TEXT_REFERENCES = re.compile(
    r"""url\(\s*['"]?([^'")\s]+)"""
    r"""|@import\s+['"]([^'"]+)"""
    r"""|\bimport\b[^;'"]*?\bfrom\s*['"]([^'"]+)"""
    r"""|\bimport\(\s*['"]([^'"]+)""",
)


class _ReferenceParser(HTMLParser):
    """Collect every URL an HTML page makes the browser load."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.urls: list[str] = []
        self._in_text: str | None = None

    def handle_starttag(
        self, tag: str, attrs: list[tuple[str, str | None]]
    ) -> None:
        """Note loading attributes, style attributes and script/style."""
        for name, value in attrs:
            if value is None:
                continue
            if name in _LOADING_ATTRIBUTES.get(tag, ()):
                if name == "srcset":
                    self.urls += [
                        part.split()[0] for part in value.split(",")
                        if part.strip()
                    ]
                else:
                    self.urls.append(value)
            elif name == "style":
                self.urls += _text_references(value)
        if tag in ("script", "style"):
            self._in_text = tag

    def handle_endtag(self, tag: str) -> None:
        """Leave a script or style element."""
        if tag == self._in_text:
            self._in_text = None

    def handle_data(self, data: str) -> None:
        """Scan script and style text for loads."""
        if self._in_text is not None:
            self.urls += _text_references(data)


def _text_references(text: str) -> list[str]:
    """URLs loaded by CSS or JavaScript *text*."""
    return [
        next(g for g in match.groups() if g)
        for match in _TEXT_REFERENCES.finditer(text)
    ]


def _is_external(url: str) -> bool:
    """True for a URL that leaves the page's own server."""
    parts = urlsplit(url.strip())
    return bool(parts.netloc) or parts.scheme in ("http", "https", "ftp")


def _is_inline(url: str) -> bool:
    """True for a URL that loads nothing (data, fragments, blobs)."""
    scheme = urlsplit(url.strip()).scheme
    return url.startswith("#") or scheme in ("data", "blob", "about",
                                             "javascript")


def offline_problems(slides: Path) -> list[str]:
    """List every external or missing resource the decks would load.

    Follows each deck's scripts and style sheets, and the style sheets'
    own imports and fonts, inside *slides*.
    """
    problems: list[str] = []
    seen: set[Path] = set()
    pending = sorted(slides.glob("*.html"))
    while pending:
        page = pending.pop()
        if page in seen:
            continue
        seen.add(page)
        text = page.read_text(encoding="utf-8", errors="replace")
        if page.suffix == ".html":
            parser = _ReferenceParser()
            parser.feed(text)
            urls = parser.urls
        else:
            urls = _text_references(text)
        where = page.relative_to(slides)
        for url in urls:
            if _is_inline(url):
                continue
            if _is_external(url):
                problems.append(f"{where} loads {url}")
                continue
            path = unquote(urlsplit(url).path)
            target = (page.parent / path).resolve()
            if not target.is_file():
                problems.append(f"{where} loads missing {url}")
            elif target.suffix == ".css":
                pending.append(target)
    return problems


def deck_name(notebook: Path) -> str:
    """File name of *notebook*'s deck."""
    return notebook.stem + DECK_SUFFIX


def _swap_in(built: Path, dest: Path) -> None:
    """Replace folder *dest* by *built*, keeping the old one on failure."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=".old-", dir=dest.parent))
        dest.rename(old / dest.name)
    try:
        built.rename(dest)
    except OSError:
        if old is not None:
            (old / dest.name).rename(dest)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def build_slides(
    notebooks: Sequence[Path],
    executed: Mapping[Path, Path],
    out: Path,
    series: Sequence[Path] | None = None,
) -> list[Path]:
    """Export the decks, reveal.js and the index into ``out/slides``.

    *executed* maps each source notebook to its executed copy; a
    notebook without one is exported from its source, without outputs.
    Decks of the rest of *series* (default: *notebooks*) are kept as
    they are, and the index lists them all in order. The folder is built
    beside the old one and replaces it only once it passed the offline
    check.
    """
    series = list(series or notebooks)
    dest = out / SLIDES_SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".slides-", dir=out))
    try:
        install_reveal(work)
        for notebook in series:
            kept = dest / deck_name(notebook)
            if notebook not in notebooks and kept.is_file():
                shutil.copy2(kept, work / kept.name)
        for notebook in notebooks:
            source = executed.get(notebook)
            if source is None:
                log.warning("%s has no executed copy: its deck has no "
                            "outputs", notebook.name)
                source = notebook
            export_deck(source, work, notebook_title(notebook))
        write_index(work, [
            (work / deck_name(nb), notebook_title(nb)) for nb in series
            if (work / deck_name(nb)).is_file()
        ])
        problems = offline_problems(work)
        if problems:
            raise SlidesError(
                "the slides would need the internet:\n  "
                + "\n  ".join(problems)
                + "\nMake each resource local (npm, package.json) or "
                "drop it; the previous slides are left as they were."
            )
        _swap_in(work, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [dest / deck_name(nb) for nb in notebooks]


def executed_copies(notebooks: Sequence[Path], out: Path) -> dict[Path, Path]:
    """Map each notebook to its executed copy in *out*, where one exists."""
    copies = {nb: out / EXECUTED_SUBDIR / nb.name for nb in notebooks}
    return {nb: copy for nb, copy in copies.items() if copy.is_file()}


# ------------------------------------------------------------------- mirror


def write_site(out: Path, artifacts: Artifacts | None = None) -> Path:
    """Prepare *out* for serving: the artifact mirror and a front page.

    With *artifacts*, ``out/mirror`` gets the layout that notebook 01
    downloads from when its SOURCE is "mirror".
    """
    out.mkdir(parents=True, exist_ok=True)
    if artifacts is not None:
        from helpers.artifacts import write_mirror

        write_mirror(out / MIRROR_SUBDIR, artifacts)
    links = [
        (name + "/", label) for name, label in (
            (SLIDES_SUBDIR, "Slides"),
            (MIRROR_SUBDIR, "Guest artifacts mirror"),
            (EXECUTED_SUBDIR, "Executed notebooks"),
        ) if (out / name).is_dir()
    ]
    items = "\n".join(
        f'<li><a href="{html.escape(href)}">{html.escape(label)}</a></li>'
        for href, label in links
    )
    page = out / "index.html"
    page.write_text(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<link rel=\"icon\" href=\"data:,\">"
        "<title>Firecracker Lab</title></head>\n<body><h1>Firecracker "
        f"Lab</h1>\n<ul>\n{items}\n</ul>\n</body></html>\n",
        encoding="utf-8",
    )
    return page


class _Handler(SimpleHTTPRequestHandler):
    """Static files, with requests logged through this module's logger."""

    def log_message(self, format: str, *args: Any) -> None:
        """Log one request at INFO level."""
        log.info("%s " + format, self.address_string(), *args)


@contextlib.contextmanager
def serving(
    root: Path, bind: str = DEFAULT_MIRROR_BIND,
    port: int = DEFAULT_MIRROR_PORT,
) -> Iterator[ThreadingHTTPServer]:
    """Serve *root* over HTTP in a thread; port 0 picks a free one."""
    handler = functools.partial(_Handler, directory=str(root))
    try:
        server = ThreadingHTTPServer((bind, port), handler)
    except OSError as exc:
        raise SeriesError(
            f"cannot listen on {bind}:{port} ({exc.strerror}); pick "
            "another --port or stop what uses it"
        ) from exc
    thread = threading.Thread(
        target=server.serve_forever, name="fclab-mirror", daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def host_addresses() -> list[str]:
    """IPv4 addresses of this machine that other machines can reach."""
    found: list[str] = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["ip", "-4", "-o", "addr", "show", "scope", "global"],
            capture_output=True, text=True, check=False,
        )
        found += re.findall(r"\binet (\d+\.\d+\.\d+\.\d+)/", done.stdout)
    if not found:
        with contextlib.suppress(OSError):
            infos = socket.getaddrinfo(
                socket.gethostname(), None, socket.AF_INET
            )
            found += [str(info[4][0]) for info in infos]
    return [a for a in dict.fromkeys(found) if not a.startswith("127.")]


def learner_urls(bind: str, port: int) -> list[str]:
    """Base URLs under which learners reach a server on *bind*:*port*."""
    if bind in ("", "0.0.0.0", "::"):
        hosts = host_addresses() or [socket.gethostname()]
    else:
        hosts = [bind]
    return [f"http://{host}:{port}" for host in hosts]


# ---------------------------------------------------------------------- lab


def register_kernel() -> Path:
    """Register this environment as the ``firecracker-lab`` kernel."""
    command = [
        sys.executable, "-m", "ipykernel", "install", "--sys-prefix",
        "--name", KERNEL_NAME, "--display-name", KERNEL_DISPLAY_NAME,
    ]
    done = subprocess.run(command, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise SeriesError(
            f"`{' '.join(command)}` exited with {done.returncode}:\n"
            f"{done.stderr[-2000:]}\nInstall the project (make setup) so "
            "ipykernel is present, then retry."
        )
    return Path(sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME


def lab_command(
    port: int = DEFAULT_LAB_PORT,
    root: Path | None = None,
    open_browser: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command starting JupyterLab on the notebooks."""
    command = [
        sys.executable, "-m", "jupyterlab",
        f"--ServerApp.root_dir={root or NOTEBOOKS_DIR}",
        f"--ServerApp.port={port}",
        f"--ServerApp.open_browser={open_browser}",
    ]
    if os.geteuid() == 0:
        # Containers and lab machines often run as root; Jupyter refuses
        # that unless told, and there is no other user to switch to.
        command.append("--ServerApp.allow_root=True")
    return [*command, *extra]


def lab_environment() -> dict[str, str]:
    """Environment for JupyterLab, whose kernels import the helpers."""
    return {**os.environ, "PYTHONPATH": _pythonpath()}


# -------------------------------------------------------------- command line


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by `run` and `slides`."""
    parser.add_argument("--backend", default=DEFAULT_BACKEND,
                        help="BACKEND parameter of every notebook "
                        "(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="build folder (default: build/)")
    parser.add_argument("--notebooks", type=Path, default=NOTEBOOKS_DIR,
                        help="folder of the numbered notebooks")
    parser.add_argument("--only", action="append", default=[],
                        metavar="NN", help="run only notebook NN "
                        "(repeat or comma-separate for more)")
    parser.add_argument("-p", "--parameter", action="append", default=[],
                        metavar="NAME=VALUE", help="set a parameter in "
                        "the notebooks that declare it")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes for tests and CI: "
                        + ", ".join(f"{k}={v!r}"
                                    for k, v in QUICK_PARAMETERS.items()))
    parser.add_argument("--kernel", default=None,
                        help=f"kernel name (default: {KERNEL_NAME} when "
                        f"registered, else {FALLBACK_KERNEL})")
    parser.add_argument("--cell-timeout", type=float,
                        default=CELL_TIMEOUT_S, metavar="SECONDS",
                        help="stop a cell running longer "
                        "(default: %(default)s)")


def _parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m helpers.series", description=__doc__.splitlines()[0]
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log what happens")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute every notebook")
    _add_run_options(run)
    slides = commands.add_parser("slides", help="export reveal.js slides")
    _add_run_options(slides)
    slides.add_argument("--no-execute", action="store_true",
                        help="export the executed copies already in the "
                        "build folder")
    mirror = commands.add_parser("mirror", help="serve artifacts and "
                                 "slides to a room")
    mirror.add_argument("--port", type=int, default=DEFAULT_MIRROR_PORT)
    mirror.add_argument("--bind", default=DEFAULT_MIRROR_BIND)
    mirror.add_argument("--out", type=Path, default=None,
                        help="build folder to serve (default: build/)")
    mirror.add_argument("--source", default=DEFAULT_MIRROR_SOURCE,
                        choices=("local", "official"),
                        help="where the mirrored artifacts come from "
                        "(default: %(default)s, the offline guest)")
    mirror.add_argument("--version", default=None,
                        help="Firecracker release for --source official")
    mirror.add_argument("--slides-only", action="store_true",
                        help="serve the slides without an artifact mirror")
    lab = commands.add_parser("lab", help="start JupyterLab on the series")
    lab.add_argument("--port", type=int, default=DEFAULT_LAB_PORT)
    lab.add_argument("--no-browser", action="store_true")
    commands.add_parser("kernel", help="only register the Jupyter kernel")
    return parser


def _run_command(args: argparse.Namespace, out: Path) -> SeriesRun:
    """Execute the series for `run` and `slides`, printing as it goes."""
    notebooks = find_notebooks(args.notebooks, args.only)
    series = SeriesRun(out)

    def done(run: NotebookRun) -> None:
        print(f"{run.notebook.name}: {run.seconds:.1f} s", flush=True)

    overrides = parse_assignments(args.parameter)
    # Refuse a mistyped parameter before anything runs.
    series_parameters(notebooks, args.backend, overrides, args.quick)
    print(f"executing {', '.join(nb.name for nb in notebooks)} into "
          f"{out / EXECUTED_SUBDIR}", flush=True)
    try:
        run_series(
            notebooks, out, args.backend, overrides, args.quick,
            args.kernel, args.cell_timeout or None, done, series,
        )
    except NotebookFailed as exc:
        print()
        print(timing_table(series, exc), flush=True)
        raise
    print()
    print(timing_table(series))
    return series


def _slides_command(args: argparse.Namespace, out: Path) -> None:
    """Execute unless told not to, then export the decks."""
    notebooks = find_notebooks(args.notebooks, args.only)
    if not args.no_execute:
        _run_command(args, out)
    start = time.monotonic()
    decks = build_slides(
        notebooks, executed_copies(notebooks, out), out,
        find_notebooks(args.notebooks),
    )
    print(f"\n{len(decks)} decks in {time.monotonic() - start:.1f} s: "
          f"open {out / SLIDES_SUBDIR / 'index.html'}")
    print("No internet needed: reveal.js is in "
          f"{out / SLIDES_SUBDIR / REVEAL_DIR}")


def _mirror_command(args: argparse.Namespace, out: Path) -> None:
    """Serve the build folder until interrupted."""
    artifacts = None
    if not args.slides_only:
        from helpers.artifacts import fetch_artifacts

        extra = {"version": args.version} if args.version else {}
        print(f"collecting the {args.source} artifacts...", flush=True)
        artifacts = fetch_artifacts(args.source, **extra)
    write_site(out, artifacts)
    if not (out / SLIDES_SUBDIR / "index.html").is_file():
        print("No slides yet: build them with `make slides`.")
    with serving(out, args.bind, args.port) as server:
        port = server.server_address[1]
        urls = learner_urls(args.bind, port)
        print(f"Serving {out} on {args.bind}:{port}.")
        print("Slides for the room:")
        for url in urls:
            print(f"  {url}/{SLIDES_SUBDIR}/")
        if artifacts is not None:
            print("Learners point notebook 01 at the mirror by setting, "
                  "in its parameters cell:")
            print('  SOURCE = "mirror"')
            print(f'  MIRROR_URL = "{urls[0]}/{MIRROR_SUBDIR}"')
        print("Stop with Ctrl-C.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


def _lab_command(args: argparse.Namespace) -> int:
    """Register the kernel, then run JupyterLab in the foreground."""
    spec = register_kernel()
    print(f"kernel {KERNEL_DISPLAY_NAME!r} registered in {spec}")
    command = lab_command(args.port, open_browser=not args.no_browser)
    print(" ".join(command), flush=True)
    # JupyterLab handles Ctrl-C itself (it asks before shutting down).
    os.execve(command[0], command, lab_environment())
    return 0  # not reached: execve replaces this process


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m helpers.series``."""
    args = _parser().parse_args(argv)
    configure_logging(logging.INFO if args.verbose else logging.WARNING)
    out = (getattr(args, "out", None) or build_dir()).resolve()
    try:
        if args.command == "run":
            _run_command(args, out)
            print()
            print(results_summary(out))
        elif args.command == "slides":
            _slides_command(args, out)
        elif args.command == "mirror":
            _mirror_command(args, out)
        elif args.command == "lab":
            return _lab_command(args)
        elif args.command == "kernel":
            print(f"kernel {KERNEL_DISPLAY_NAME!r} registered in "
                  f"{register_kernel()}")
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
