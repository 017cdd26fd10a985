"""The slides and JupyterLab, in headless Chromium, on loopback only.

The decks are stepped through with the keyboard, must load nothing
from outside their folder, and every slide, its fragments all shown,
must fit the screen without scrolling either way. JupyterLab must
render a notebook and run its first cells from the keyboard, then shut
down leaving no process behind.
Screenshots land in ``build/screenshots/``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import pytest
from browser_fixtures import (
    CHROMIUM,
    PLOT_HEADING,
    cell,
    chromium,
    free_port,
    plain_notebook,
    plot_notebook,
    watch,
    write_notebook,
)
from procfs import alive, children_of

from helpers import series
from helpers.paths import REPO_ROOT

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason=f"{CHROMIUM} is missing (apt-get install "
                       "chromium)"),
]

# How long the browser may take to show something: generous, because
# the machine is shared and Chromium starts cold. Waits, not assertions.
PAGE_WAIT_MS = 60_000
STEP_WAIT_MS = 5_000
# JupyterLab's first start builds nothing but still reads every
# extension; two minutes covers a loaded two-core machine.
LAB_START_S = 120.0
LAB_STOP_S = 30.0
# A deck longer than this is a loop, not a talk.
MAX_STEPS = 500

FULL_ENV = "FCLAB_BROWSER_FULL"
REAL_SLIDES = REPO_ROOT / "build" / series.SLIDES_SUBDIR
# The notebook JupyterLab opens when the series has it.
LAB_NOTEBOOK = REPO_ROOT / "notebooks" / "02_boot.ipynb"


def screenshots() -> Path:
    """build/screenshots/, created on demand."""
    folder = series.build_dir() / series.SCREENSHOTS_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------- slides


@dataclass
class Walk:
    """What stepping through one deck showed."""

    steps: int = 0
    slides: set[str] = field(default_factory=set)
    # Per slide with images: its heading and each image's natural size.
    images: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    plot_shot: Path | None = None


SLIDE_STATE = """() => {
  const slide = Reveal.getCurrentSlide();
  const found = slide.querySelector("h1, h2, h3");
  // nbconvert appends a hidden "¶" anchor to every heading.
  const heading = found ? found.cloneNode(true) : null;
  if (heading) heading.querySelectorAll(".anchor-link").forEach(
    a => a.remove());
  const images = [...slide.querySelectorAll("img")].map(img => {
    const box = img.getBoundingClientRect();
    return {complete: img.complete, width: img.naturalWidth,
            height: img.naturalHeight, shown: box.width * box.height,
            src: img.src.slice(0, 30)};
  });
  const at = Reveal.getIndices();
  return {indices: JSON.stringify(at),
          place: `${at.h}/${at.v || 0}`,
          heading: heading ? heading.textContent.trim() : "",
          text: slide.textContent,
          images: images,
          done: Reveal.isLastSlide() && !Reveal.availableFragments().next};
}"""

# Whether the current slide, every fragment shown, fits the screen. The
# decks cap a slide at the screen's height and let it scroll, so a slide
# too tall is one whose scrollHeight exceeds its clientHeight. Sideways,
# the slide and every element that clips or scrolls (a code cell, an
# output) is too narrow when text or an image inside it reaches past its
# client box: scrollWidth alone would also count a child's padding that
# hides nothing. Sizes are in slide pixels (the deck is scaled to fit
# the window); one pixel is rounding. The fragments are put back.
SLIDE_FIT = """() => {
  const at = Reveal.getIndices();
  Reveal.slide(at.h, at.v, Infinity);
  const slide = Reveal.getCurrentSlide();
  const name = el => el === slide ? "the slide" : [
    el.tagName.toLowerCase(), ...el.classList].join(".");
  const clips = el => el === slide
    || getComputedStyle(el).overflowX !== "visible";
  // The right edge of what an element shows, in window pixels.
  const shownRight = el => {
    const box = el.getBoundingClientRect();
    const scale = el.offsetWidth ? box.width / el.offsetWidth : 1;
    return [box.left + (el.clientLeft + el.clientWidth) * scale, scale];
  };
  // The first element that clips *node* where it reaches *right*.
  const beyond = new Map();
  const reach = (node, right) => {
    for (let el = node.parentElement; el; el = el.parentElement) {
      if (clips(el)) {
        const [edge, scale] = shownRight(el);
        const px = Math.round((right - edge) / scale);
        if (px > 1) {
          beyond.set(el, Math.max(px, beyond.get(el) || 0));
          return;
        }
      }
      if (el === slide) return;
    }
  };
  const texts = document.createTreeWalker(slide, NodeFilter.SHOW_TEXT);
  const range = document.createRange();
  for (let text = texts.nextNode(); text; text = texts.nextNode()) {
    // Words only: spaces where a line wraps may hang past the edge.
    for (const word of text.data.matchAll(/\\S+/g)) {
      range.setStart(text, word.index);
      range.setEnd(text, word.index + word[0].length);
      for (const rect of range.getClientRects()) reach(text, rect.right);
    }
  }
  for (const img of slide.querySelectorAll("img, svg, canvas, video")) {
    reach(img, img.getBoundingClientRect().right);
  }
  const result = {shown: slide.querySelectorAll(".fragment.visible").length,
                  fragments: slide.querySelectorAll(".fragment").length,
                  tall: slide.scrollHeight - slide.clientHeight,
                  wide: [...beyond].map(([el, px]) => [name(el), px])};
  Reveal.slide(at.h, at.v, at.f);
  result.back = JSON.stringify(Reveal.getIndices());
  return result;
}"""


def fit_problems(page: Any, state: dict[str, Any]) -> list[str]:
    """What does not fit on the current slide, all its fragments shown."""
    fit = page.evaluate(SLIDE_FIT)
    assert fit["shown"] == fit["fragments"], fit
    assert fit["back"] == state["indices"], fit
    place, heading = state["place"], state["heading"]
    where = f"slide {place} ({heading!r})"
    problems = [f"{where} is cut off: {fit['tall']} px too tall"
                ] if fit["tall"] > 1 else []
    problems += [f"{where} is cut off: its content reaches {px} px past "
                 f"the right edge of {element}"
                 for element, px in fit["wide"]]
    return problems


def walk_deck(page: Any, url: str, name: str, plot_words: str) -> Walk:
    """Open a deck and press Space until it ends; note what showed.

    The first slide with an image whose text mentions *plot_words* is
    the plot slide, and gets its screenshot.
    """
    walk = Walk()
    watch(page, walk.problems)
    page.goto(url, wait_until="load")
    page.wait_for_function("window.Reveal && Reveal.isReady()",
                           timeout=PAGE_WAIT_MS)
    # Screenshots of a slide halfway through a transition show two.
    page.evaluate("Reveal.configure({transition: 'none'})")
    page.screenshot(path=str(screenshots() / f"{name}-first.png"))
    measured: set[str] = set()
    while walk.steps < MAX_STEPS:
        state = page.evaluate(SLIDE_STATE)
        walk.slides.add(state["indices"])
        if state["place"] not in measured:
            measured.add(state["place"])
            walk.problems += fit_problems(page, state)
        if state["images"]:
            walk.images[state["heading"] or state["indices"]] = (
                state["images"])
            if (walk.plot_shot is None
                    and plot_words.lower() in state["text"].lower()):
                walk.plot_shot = screenshots() / f"{name}-plot.png"
                page.screenshot(path=str(walk.plot_shot))
        if state["done"]:
            break
        page.keyboard.press("Space")
        walk.steps += 1
        try:
            page.wait_for_function(
                "before => JSON.stringify(Reveal.getIndices()) !== before",
                arg=state["indices"], timeout=STEP_WAIT_MS,
            )
        except Exception:  # noqa: BLE001 - the deck stopped moving
            walk.problems.append(
                f"Space did not move past slide {state['indices']}")
            break
    return walk


def assert_images_drawn(walk: Walk) -> None:
    """Every image on every slide loaded, has a size and is on screen."""
    for heading, images in walk.images.items():
        for image in images:
            assert image["complete"], (heading, image)
            assert image["width"] > 0 and image["height"] > 0, (
                heading, image)
            assert image["shown"] > 0, (heading, image)


@pytest.fixture(scope="module")
def tiny_slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Slides from two throwaway notebooks, one with a boot-time plot."""
    if not shutil.which("npm") and not (
        series.cache_dir() / "npm" / series._lock_digest()
    ).is_dir():
        pytest.skip("npm is not installed and reveal.js is not cached")
    root = tmp_path_factory.mktemp("tiny-series")
    (root / "notebooks").mkdir()
    plot_notebook(root / "notebooks" / "01_tiny.ipynb")
    plain_notebook(root / "notebooks" / "02_plain.ipynb", "Plain one",
                   'print("second")')
    code = series.main(["slides", "--notebooks", str(root / "notebooks"),
                        "--out", str(root / "build"), "--quick"])
    assert code == 0
    return root / "build" / series.SLIDES_SUBDIR


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[str]:
    """Serve the folder named by the test's parameter on 127.0.0.1."""
    folder: Path = request.getfixturevalue(request.param)
    with series.serving(folder, "127.0.0.1", 0) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}"


def _open_index(page: Any, served: str) -> tuple[list[str], list[str]]:
    """Open the index in *page*; return its links and a problems list.

    The list (see ``watch``) keeps filling while the page stays open.
    """
    problems: list[str] = []
    watch(page, problems)
    page.goto(f"{served}/index.html")
    links = page.eval_on_selector_all(
        "li a", "links => links.map(a => a.getAttribute('href'))")
    return links, problems


@pytest.mark.parametrize("served", ["tiny_slides"], indirect=True)
def test_tiny_deck_steps_through_offline_and_draws_the_plot(
    served: str,
) -> None:
    """Index, then every slide by keyboard: no error, the plot drawn."""
    with chromium() as browser:
        page = browser.new_page()
        links, problems = _open_index(page, served)
        assert links == ["01_tiny.slides.html", "02_plain.slides.html"]
        assert problems == []

        walk = walk_deck(page, f"{served}/01_tiny.slides.html", "tiny",
                         PLOT_HEADING)
        assert walk.problems == []
        # Title, "What was asked", plot, summary + its fragment.
        assert len(walk.slides) == 5
        assert list(walk.images) == [PLOT_HEADING]
        assert_images_drawn(walk)
        assert walk.plot_shot is not None and walk.plot_shot.stat().st_size

        plain = walk_deck(browser.new_page(),
                          f"{served}/02_plain.slides.html", "tiny-plain",
                          PLOT_HEADING)
        assert plain.problems == []
        assert plain.images == {}


CROWDED_CELLS = (
    ("markdown", "# Crowded\n\nEach slide below tests the fit check.",
     "slide"),
    ("markdown", "## Too tall\n\n" + "".join(
        f"- point {i}\n" for i in range(1, 61)), "slide"),
    ("markdown", "## Too wide", "slide"),
    ("code", "x = " + " + ".join(f"value_{i}" for i in range(40)), "-"),
    ("markdown", "## Fits, with fragments", "slide"),
    ("markdown", "- first", "fragment"),
    ("markdown", "- second", "fragment"),
)


@pytest.fixture(scope="module")
def crowded_deck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deck with a slide too tall and one too wide for the screen."""
    if not shutil.which("npm") and not (
        series.cache_dir() / "npm" / series._lock_digest()
    ).is_dir():
        pytest.skip("npm is not installed and reveal.js is not cached")
    root = tmp_path_factory.mktemp("crowded-series")
    (root / "notebooks").mkdir()
    write_notebook(root / "notebooks" / "01_crowded.ipynb",
                   [cell(*spec) for spec in CROWDED_CELLS])
    code = series.main(["slides", "--no-execute", "--notebooks",
                        str(root / "notebooks"), "--out",
                        str(root / "build")])
    assert code == 0
    return root / "build" / series.SLIDES_SUBDIR


@pytest.mark.parametrize("served", ["crowded_deck"], indirect=True)
def test_the_fit_check_flags_slides_too_tall_or_too_wide(
    served: str,
) -> None:
    """Only the overlong slide and the one with a long line are flagged."""
    with chromium() as browser:
        walk = walk_deck(browser.new_page(),
                         f"{served}/01_crowded.slides.html", "crowded",
                         "nothing")
    tall = [p for p in walk.problems if "'Too tall'" in p]
    wide = [p for p in walk.problems if "'Too wide'" in p]
    assert len(tall) == 1 and "px too tall" in tall[0], walk.problems
    assert len(wide) == 1 and "right edge of div.jp-" in wide[0], (
        walk.problems)
    assert sorted(walk.problems) == sorted(tall + wide)
    # Title, the two crowded slides, and the last one's three states.
    assert len(walk.slides) == 6


def _slides_current() -> bool:
    """True when build/slides exists and is newer than every notebook."""
    decks = list(REAL_SLIDES.glob("*" + series.DECK_SUFFIX))
    if not (REAL_SLIDES / "index.html").is_file() or not decks:
        return False
    sources = series.find_notebooks()
    newest_source = max(nb.stat().st_mtime for nb in sources)
    return min(d.stat().st_mtime for d in decks) >= newest_source


def _real_slides() -> Path:
    """build/slides of the real series, (re)built here when asked to.

    Decks older than a notebook show what the notebook used to be, so
    they are rebuilt (with the variable set) or the test skips.
    """
    if os.environ.get(FULL_ENV) == "1" and not _slides_current():
        assert series.main(["slides", "--quick"]) == 0
    if not _slides_current():
        pytest.skip(f"build/slides is missing or older than notebooks/: "
                    f"run `make slides` or set {FULL_ENV}=1")
    return REAL_SLIDES


@pytest.fixture(scope="module")
def real_slides() -> Path:
    """The series' own slides (see _real_slides)."""
    return _real_slides()


@pytest.mark.notebook
@pytest.mark.parametrize("served", ["real_slides"], indirect=True)
def test_series_decks_step_through_offline(served: str) -> None:
    """Every deck of the series, every slide, nothing failing."""
    decks = sorted(p.name for p in REAL_SLIDES.glob("*.slides.html"))
    assert decks
    walks: dict[str, Walk] = {}
    with chromium() as browser:
        links, problems = _open_index(browser.new_page(), served)
        assert links == decks
        assert problems == []
        for deck in decks:
            stem = deck.removesuffix(series.DECK_SUFFIX)
            walks[deck] = walk_deck(browser.new_page(), f"{served}/{deck}",
                                    stem, "boot time")
    # Every deck's problems at once, so one run lists them all.
    found = [f"{deck}: {problem}" for deck, walk in walks.items()
             for problem in walk.problems]
    assert found == [], "\n".join(found)
    for deck, walk in walks.items():
        assert len(walk.slides) > 1, deck
        assert_images_drawn(walk)
        if "boot_time" in deck:
            assert walk.images, f"{deck} shows no plot"
            assert walk.plot_shot is not None, (
                f"no slide of {deck} with an image mentions 'boot "
                f"time': {list(walk.images)}")


# ----------------------------------------------------------- JupyterLab


def _get(url: str) -> int:
    """HTTP status of GET *url* (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


@dataclass
class Lab:
    """A JupyterLab server started for one test."""

    process: subprocess.Popen[bytes]
    base: str
    token: str
    log: Path
    notebook: Path


def _lab_notebook(root: Path) -> Path:
    """A copy of 02_boot.ipynb, or a tiny notebook when it is absent.

    A copy, so nothing JupyterLab writes can touch the series.
    """
    if LAB_NOTEBOOK.is_file():
        return Path(shutil.copy2(LAB_NOTEBOOK, root / LAB_NOTEBOOK.name))
    return plot_notebook(root / "01_tiny.ipynb")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """JupyterLab on 127.0.0.1 with private config, settings and runtime."""
    root = tmp_path / "root"
    root.mkdir()
    notebook = _lab_notebook(root)
    dirs = {name: tmp_path / name for name in
            ("config", "runtime", "settings", "workspaces")}
    for folder in dirs.values():
        folder.mkdir()
    # No announcements or update checks: they would fetch from the web.
    (dirs["config"] / "jupyter_server_config.json").write_text(json.dumps({
        "LabApp": {"news_url": None,
                   "check_for_updates_class":
                   "jupyterlab.NeverCheckForUpdate"},
    }))
    # No autosave: the test must not write into the notebook.
    plugin = dirs["settings"] / "@jupyterlab" / "docmanager-extension"
    plugin.mkdir(parents=True)
    (plugin / "plugin.jupyterlab-settings").write_text('{"autosave": false}')
    # Nor the question whether to fetch news (it would cover cells).
    plugin = dirs["settings"] / "@jupyterlab" / "apputils-extension"
    plugin.mkdir(parents=True)
    (plugin / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false"}')
    token = secrets.token_hex(16)
    port = free_port()
    env = {
        **series.lab_environment(),
        "JUPYTER_CONFIG_DIR": str(dirs["config"]),
        "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
        "JUPYTERLAB_SETTINGS_DIR": str(dirs["settings"]),
        "JUPYTERLAB_WORKSPACES_DIR": str(dirs["workspaces"]),
    }
    command = series.lab_command(port, root, open_browser=False, extra=[
        "--ServerApp.ip=127.0.0.1",
        f"--IdentityProvider.token={token}",
        "--ServerApp.allow_remote_access=False",
    ])
    log = tmp_path / "jupyterlab.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + LAB_START_S
        while _get(f"{base}/api/status?token={token}") != 200:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield Lab(process, base, token, log, notebook)
    finally:
        if process.poll() is None:
            # The server's own shutdown stops its kernels first.
            request = urllib.request.Request(
                f"{base}/api/shutdown?token={token}", method="POST")
            try:
                urllib.request.urlopen(request, timeout=10).close()
                process.wait(LAB_STOP_S)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(LAB_STOP_S)


def _quick_cells(notebook: Path) -> int:
    """How many leading code cells are imports and parameters (max 2)."""
    code = [c for c in nbformat.read(notebook, 4).cells
            if c.cell_type == "code"]
    for i, code_cell in enumerate(code[:2]):
        if "parameters" in code_cell.metadata.get("tags", []):
            return i + 1
    return 1


def test_jupyterlab_renders_and_runs_the_first_cells(lab: Lab) -> None:
    """Title rendered, first code cells run by Shift+Enter, clean stop."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    title = series.notebook_title(lab.notebook)
    runs = _quick_cells(lab.notebook)
    outside: list[str] = []
    with chromium() as browser:
        page = browser.new_page()
        page.on("request", lambda r: outside.append(r.url)
                if not r.url.startswith((lab.base, "data:", "blob:"))
                else None)
        page.goto(f"{lab.base}/lab/tree/{lab.notebook.name}"
                  f"?token={lab.token}")
        heading = page.locator(".jp-Notebook .jp-RenderedMarkdown h1").first
        heading.wait_for(timeout=PAGE_WAIT_MS)
        assert heading.inner_text().strip().rstrip("¶").strip() == title
        page.locator(
            ".jp-Notebook-ExecutionIndicator[data-status='idle']"
        ).wait_for(state="attached", timeout=PAGE_WAIT_MS)

        cells = page.locator(".jp-Notebook .jp-CodeCell")
        for i in range(runs):
            cells.nth(i).locator(".cm-content").click()
            # Keys go where the focus is: wait until it is in this cell
            # (a notebook still settling may move it back to the top).
            page.wait_for_function(
                "el => el.classList.contains('jp-mod-active')"
                " && el.contains(document.activeElement)",
                arg=cells.nth(i).element_handle(), timeout=PAGE_WAIT_MS,
            )
            page.keyboard.press("Shift+Enter")
            prompt = cells.nth(i).locator(".jp-InputArea-prompt")
            try:
                page.wait_for_function(
                    "el => /\\[\\d+\\]/.test(el.textContent)",
                    arg=prompt.element_handle(), timeout=PAGE_WAIT_MS,
                )
            except PlaywrightTimeout:
                page.screenshot(
                    path=str(screenshots() / "jupyterlab-failed.png"))
                raise AssertionError(
                    f"code cell {i} shows {prompt.inner_text()!r} after "
                    f"Shift+Enter; server log:\n"
                    f"{lab.log.read_text()[-3000:]}") from None
            assert re.fullmatch(r"\[\d+\]:", prompt.inner_text().strip())
            assert not cells.nth(i).locator(
                "[data-mime-type='application/vnd.jupyter.stderr']"
            ).count(), cells.nth(i).inner_text()
        page.screenshot(path=str(screenshots() / "jupyterlab.png"))
        kernels = json.loads(urllib.request.urlopen(
            f"{lab.base}/api/kernels?token={lab.token}").read())
        assert len(kernels) == 1
    assert outside == []

    # Shut down through the API, as the lab command's Ctrl-C would.
    children = children_of(lab.process.pid)
    assert children, "the kernel should run as a child of the server"
    urllib.request.urlopen(urllib.request.Request(
        f"{lab.base}/api/shutdown?token={lab.token}", method="POST"),
        timeout=10).close()
    assert lab.process.wait(LAB_STOP_S) == 0, lab.log.read_text()[-3000:]
    assert not [pid for pid in children if alive(pid)]
