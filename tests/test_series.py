"""The series runner: papermill runs, failures, slides, the room server."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import urllib.request
from pathlib import Path

import nbformat
import pytest
from browser_fixtures import PLOT_HEADING, plain_notebook, plot_notebook

from helpers import series
from helpers.series import (
    NoNotebooksError,
    ParameterError,
    find_notebooks,
    main,
    offline_problems,
    parameters_cell_values,
    parse_assignments,
    series_parameters,
)


def _npm_or_cache() -> bool:
    """True when reveal.js can be had: npm, or an earlier install."""
    if shutil.which("npm"):
        return True
    try:
        home = series.cache_dir() / "npm" / series._lock_digest()
    except OSError:
        return False
    return (home / "node_modules" / series.REVEAL_PACKAGE).is_dir()


needs_reveal = pytest.mark.skipif(
    not _npm_or_cache(),
    reason="npm is not installed and reveal.js is not cached yet",
)


@pytest.fixture
def fine(tmp_path: Path) -> Path:
    """A folder holding one notebook that runs: 01_fine.ipynb."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    plain_notebook(folder / "01_fine.ipynb", "Fine", "1 + 1")
    return folder


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """Two throwaway notebooks: one with parameters and a plot."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    plot_notebook(folder / "01_tiny.ipynb")
    plain_notebook(folder / "02_plain.ipynb", "Plain one", 'print("second")')
    return folder


# ------------------------------------------------------------ no kernel


def test_parameters_cell_accepts_only_upper_case_literals() -> None:
    """Literal assignments parse; code, lower case and calls are refused."""
    values = parameters_cell_values(
        '# sizes\nN_BOOTS = 3\nCONFIGS = [(1, 128)]\nBACKEND = "auto"\n'
    )
    assert values == {"N_BOOTS": 3, "CONFIGS": [(1, 128)], "BACKEND": "auto"}
    for bad in ("n_boots = 3", "N = len('ab')", "import os",
                "A = B = 1", "X: int = 1", "A, B = 1, 2"):
        with pytest.raises(ParameterError):
            parameters_cell_values(bad)


def test_assignments_parse_literals_and_keep_strings() -> None:
    """-p values become literals when they read as such."""
    assert parse_assignments(
        ["N_BOOTS=3", "BACKEND=tcg", "CONFIGS=[[1, 128]]", "FLAG=True"]
    ) == {"N_BOOTS": 3, "BACKEND": "tcg", "CONFIGS": [[1, 128]],
          "FLAG": True}
    for bad in ("N_BOOTS", "n_boots=3", "=3"):
        with pytest.raises(ParameterError):
            parse_assignments([bad])


def test_parameters_reach_only_notebooks_that_declare_them(
    tiny: Path,
) -> None:
    """BACKEND and the quick preset skip a notebook without parameters."""
    notebooks = find_notebooks(tiny)
    plan = series_parameters(notebooks, "tcg", {"N_BOOTS": 4}, quick=True)
    assert plan[notebooks[0]] == {
        "BACKEND": "tcg", "N_BOOTS": 4,
        "CONFIGS": series.QUICK_PARAMETERS["CONFIGS"],
    }
    assert plan[notebooks[1]] == {}
    with pytest.raises(ParameterError, match="N_BOTS"):
        series_parameters(notebooks, "auto", {"N_BOTS": 4})


def test_notebooks_are_found_in_order_and_filtered(tmp_path: Path) -> None:
    """Two-digit prefixes order the series; --only keeps some."""
    for name in ("10_last", "02_boot", "01_download", "notes", "3_bad"):
        plain_notebook(tmp_path / f"{name}.ipynb", name, "1")
    names = [p.stem for p in find_notebooks(tmp_path)]
    assert names == ["01_download", "02_boot", "10_last"]
    only = find_notebooks(tmp_path, ["10", "01_download"])
    assert [p.stem for p in only] == ["01_download", "10_last"]
    with pytest.raises(NoNotebooksError, match="77"):
        find_notebooks(tmp_path, ["77"])


def test_offline_check_finds_cdn_loads_and_missing_files(
    tmp_path: Path,
) -> None:
    """A CDN script, a remote CSS import and a missing file are named."""
    (tmp_path / "local.css").write_text(
        "@import url(https://fonts.example.org/css?family=X);\n"
        "body { background: url(data:image/png;base64,AAAA); }\n"
    )
    (tmp_path / "deck.html").write_text(
        '<html><head><link rel="stylesheet" href="local.css">'
        '<script src="https://cdn.example.org/require.js"></script>'
        '<script src="reveal.js/dist/reveal.js"></script>'
        "<style>@import '//cdn.example.org/x.css';</style>"
        '</head><body><a href="https://example.org/">a link loads '
        "nothing</a></body></html>"
    )
    problems = "\n".join(offline_problems(tmp_path))
    assert "https://cdn.example.org/require.js" in problems
    assert "//cdn.example.org/x.css" in problems
    assert "local.css loads https://fonts.example.org" in problems
    assert "missing reveal.js/dist/reveal.js" in problems
    assert "example.org/\n" not in problems + "\n"
    assert len(problems.splitlines()) == 4


# ------------------------------------------------------------ papermill


@pytest.mark.notebook
def test_run_executes_each_notebook_with_its_parameters(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Executed copies, records, timing table and result locations."""
    out = tmp_path / "build"
    code = main(["run", "--notebooks", str(tiny), "--out", str(out),
                 "--backend", "tcg", "--quick", "-p", "N_BOOTS=3",
                 "-p", "CONFIGS=[(1, 64), (2, 256)]"])
    printed = capsys.readouterr().out
    assert code == 0, printed

    first = nbformat.read(out / "notebooks" / "01_tiny.ipynb", 4)
    injected = [c for c in first.cells
                if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1
    assert 'BACKEND = "tcg"' in injected[0].source
    assert "N_BOOTS = 3" in injected[0].source
    plots = [o for c in first.cells if c.cell_type == "code"
             for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(plots) == 1

    second = nbformat.read(out / "notebooks" / "02_plain.ipynb", 4)
    assert not any("injected-parameters" in c.metadata.get("tags", [])
                   for c in second.cells)
    assert second.cells[1].outputs[0]["text"] == "second\n"

    record = json.loads((out / "records" / "01_tiny.json").read_text())
    # A tuple reaches the notebook as a sequence, not as its repr.
    assert record == {"backend": "tcg", "n_boots": 3,
                      "configs": [[1, 64], [2, 256]]}
    assert not (out / "records" / "02_plain.json").exists()

    rows = {line.split()[0]: line.split()[1:]
            for line in printed.splitlines() if line.strip()}
    assert rows["01_tiny.ipynb"][1:] == ["ok", "3"]
    assert float(rows["total"][0]) >= float(rows["01_tiny.ipynb"][0])
    assert f"executed notebooks: {out / 'notebooks'}" in printed
    assert str(out / "tiny_boot_times.png") in printed


@pytest.mark.notebook
def test_a_failing_notebook_stops_the_run_and_names_the_cell(
    fine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The error names notebook, cell and error; later ones never run."""
    folder = fine
    marker = tmp_path / "third-ran"
    nb = plain_notebook(folder / "02_broken.ipynb", "Broken", "x = 1")
    broken = nbformat.read(nb, 4)
    broken.cells.append(nbformat.v4.new_code_cell(
        'raise RuntimeError("disk full: free some space")'))
    nbformat.write(broken, nb)
    plain_notebook(folder / "03_after.ipynb", "After",
                   f"open({str(marker)!r}, 'w').close()")
    out = tmp_path / "build"

    code = main(["run", "--notebooks", str(folder), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    error = captured.err
    assert "02_broken.ipynb failed at In [2] (cell 3 of 3)" in error
    assert 'raise RuntimeError("disk full: free some space")' in error
    assert "RuntimeError: disk full: free some space" in error
    partial = out / "notebooks" / "02_broken.ipynb"
    assert str(partial) in error
    assert "--only 02" in error
    assert re.search(r"02_broken\.ipynb\s+[0-9.]+\s+FAILED", captured.out)

    executed = nbformat.read(partial, 4)
    errors = [o for c in executed.cells if c.cell_type == "code"
              for o in c.outputs if o.output_type == "error"]
    assert errors and errors[0].ename == "RuntimeError"
    assert not (out / "notebooks" / "03_after.ipynb").exists()
    assert not marker.exists()


@pytest.mark.notebook
def test_kernels_run_quietly_over_unix_sockets(
    fine: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """No TCP transport, so no warning about unencrypted kernel traffic."""
    series.run_series(find_notebooks(fine), tmp_path / "build")

    err = capfd.readouterr().err
    assert "without encryption" not in err
    assert "Kernel is running over TCP" not in err


def _requiring(folder: Path, requirement: str) -> Path:
    """A notebook in *folder* that declares one host requirement."""
    nb = plain_notebook(folder / "02_needs.ipynb", "Needs", "1 + 1")
    content = nbformat.read(nb, 4)
    content.metadata["fclab"] = {"requires": [requirement]}
    nbformat.write(content, nb)
    return nb


@pytest.mark.notebook
def test_a_notebook_the_host_cannot_run_is_skipped_with_the_reason(
    fine: Path, tmp_path: Path,
) -> None:
    """The others still run; the table says which was skipped and why."""
    folder = fine
    _requiring(folder, "net-admin")
    out = tmp_path / "build"
    checks = {"net-admin": lambda: "needs CAP_NET_ADMIN: run as root"}

    done = series.run_series(find_notebooks(folder), out, checks=checks)

    assert [r.notebook.name for r in done.runs] == ["01_fine.ipynb"]
    assert done.skipped == [
        (folder / "02_needs.ipynb", "needs CAP_NET_ADMIN: run as root")]
    assert not (out / "notebooks" / "02_needs.ipynb").exists()
    table = series.timing_table(done)
    assert re.search(r"02_needs\.ipynb\s+-\s+skipped", table)
    assert "skipped 02_needs.ipynb: needs CAP_NET_ADMIN" in table


def test_an_unknown_requirement_is_refused(tmp_path: Path) -> None:
    nb = _requiring(tmp_path, "gpu")
    with pytest.raises(series.SeriesError, match="known requirements"):
        series.unmet_requirements(nb)


def test_the_networking_notebook_declares_its_requirement() -> None:
    nb = nbformat.read(series.NOTEBOOKS_DIR / "03_networking.ipynb", 4)
    assert nb.metadata["fclab"]["requires"] == ["net-admin"]


# --------------------------------------------------------------- slides


def _links(index: str) -> list[tuple[str, str]]:
    """(href, text) of each deck link of the index page, in order."""
    return re.findall(r'<a href="([^"]+)">([^<]+)</a>', index)


@pytest.mark.notebook
@needs_reveal
def test_slides_are_offline_and_listed_in_order(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Decks load nothing from outside; the index lists them in order."""
    out = tmp_path / "build"
    code = main(["slides", "--notebooks", str(tiny), "--out", str(out),
                 "--quick"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    slides = out / "slides"

    decks = sorted(slides.glob("*.slides.html"))
    assert [d.name for d in decks] == [
        "01_tiny.slides.html", "02_plain.slides.html"]
    assert offline_problems(slides) == []
    remote = re.compile(
        r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*"
        r"[\"']?(?:https?:)?//", re.IGNORECASE)
    for deck in decks:
        text = deck.read_text()
        assert not remote.search(text), deck.name
        assert 'src="reveal.js/dist/reveal.js"' in text
    assert (slides / "reveal.js" / "dist" / "reveal.js").is_file()
    assert (slides / "reveal.js" / "plugin" / "notes" / "notes.js").is_file()

    first = decks[0].read_text()
    assert PLOT_HEADING in first
    assert first.count('src="data:image/png;base64,') == 1
    # papermill's injected cell stays off the slides.
    assert "N_BOOTS = 2" not in first

    index = (slides / "index.html").read_text()
    assert _links(index) == [
        ("01_tiny.slides.html", "Tiny lab"),
        ("02_plain.slides.html", "Plain one"),
    ]
    assert "index.html" in printed


@needs_reveal
def test_slides_without_execution_use_the_sources(
    tiny: Path, tmp_path: Path
) -> None:
    """--no-execute exports the notebooks as written, no kernel started."""
    out = tmp_path / "build"
    assert main(["slides", "--no-execute", "--notebooks", str(tiny),
                 "--out", str(out)]) == 0
    deck = (out / "slides" / "01_tiny.slides.html").read_text()
    assert "Tiny lab" in deck
    assert 'src="data:image/png' not in deck
    assert not (out / "notebooks").exists()


# --------------------------------------------------------------- mirror


def test_mirror_serves_artifacts_a_client_can_fetch(tmp_path: Path) -> None:
    """write_mirror's layout, served on loopback, fetched and checked."""
    from helpers.artifacts import Artifacts, fetch_artifacts

    files = {"kernel": b"\x7fELF kernel" * 100, "rootfs": b"\0" * 8192}
    paths = {}
    for role, data in files.items():
        paths[role] = tmp_path / f"{role}.bin"
        paths[role].write_bytes(data)
    artifacts = Artifacts(
        source="local", version=None, firecracker=None, jailer=None,
        kernel=paths["kernel"], rootfs=paths["rootfs"], initrd=None,
        api_spec=None,
        checksums={r: hashlib.sha256(d).hexdigest()
                   for r, d in files.items()},
    )
    site = tmp_path / "build"
    (site / "slides").mkdir(parents=True)
    (site / "slides" / "index.html").write_text("<h1>decks</h1>")
    page = series.write_site(site, artifacts)
    assert 'href="mirror/"' in page.read_text()

    with series.serving(site, "127.0.0.1", 0) as server:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(f"{base}/slides/") as response:
            assert b"decks" in response.read()
        fetched = fetch_artifacts(
            "mirror", base_url=f"{base}/mirror", cache=tmp_path / "cache",
            progress=False,
        )
    assert fetched.kernel.read_bytes() == files["kernel"]
    assert fetched.checksums["rootfs"] == artifacts.checksums["rootfs"]


def test_learner_urls_name_the_bound_address() -> None:
    """A specific bind address is what learners type; 0.0.0.0 is not."""
    assert series.learner_urls("127.0.0.1", 8000) == [
        "http://127.0.0.1:8000"]
    assert all("0.0.0.0" not in u
               for u in series.learner_urls("0.0.0.0", 8000))


@needs_reveal
def test_rebuilding_one_deck_keeps_the_others(
    tiny: Path, tmp_path: Path
) -> None:
    """--only re-exports one deck; the index still lists the series."""
    out = tmp_path / "build"
    args = ["slides", "--no-execute", "--notebooks", str(tiny),
            "--out", str(out)]
    assert main(args) == 0
    kept = out / "slides" / "01_tiny.slides.html"
    before = kept.read_text()
    assert main([*args, "--only", "02"]) == 0
    assert kept.read_text() == before
    index = (out / "slides" / "index.html").read_text()
    assert [href for href, _ in _links(index)] == [
        "01_tiny.slides.html", "02_plain.slides.html"]


@needs_reveal
def test_a_web_image_is_refused_and_old_slides_survive(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Markdown image from the web fails the build, naming the URL."""
    out = tmp_path / "build"
    args = ["slides", "--no-execute", "--notebooks", str(tiny),
            "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    plain = tiny / "02_plain.ipynb"
    nb = nbformat.read(plain, 4)
    nb.cells.append(nbformat.v4.new_markdown_cell(
        "![diagram](https://example.org/diagram.png)"))
    nbformat.write(nb, plain)

    assert main(args) == 1
    error = capsys.readouterr().err
    assert ("02_plain.slides.html loads https://example.org/diagram.png"
            in error)
    deck = (out / "slides" / "02_plain.slides.html").read_text()
    assert "example.org" not in deck
    assert not list(out.glob(".slides-*"))
