"""Every notebook of the series is ready for papermill and for slides."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import nbformat
import pytest

from helpers.series import NOTEBOOK_GLOB, NOTEBOOKS_DIR

SLIDE_TYPES = {"slide", "subslide", "fragment", "skip", "notes", "-"}

NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob(NOTEBOOK_GLOB))
PARAMS = [pytest.param(p, id=p.stem) for p in NOTEBOOKS] or [
    pytest.param(None, id="none", marks=pytest.mark.skip(
        reason=f"no {NOTEBOOK_GLOB} in {NOTEBOOKS_DIR} yet")),
]


@pytest.fixture(params=PARAMS)
def nb(request: pytest.FixtureRequest) -> nbformat.NotebookNode:
    """One notebook of the series, as committed."""
    path: Path = request.param
    return nbformat.read(path, as_version=4)


def _tags(cell: Any) -> list[str]:
    """A cell's tags."""
    return list(cell.get("metadata", {}).get("tags", []))


def _slide_type(cell: Any) -> object:
    """A cell's slide type, or None when it has none."""
    return cell.get("metadata", {}).get("slideshow", {}).get("slide_type")


def _has_import(source: str) -> bool:
    """True when *source* imports something at its top level."""
    from IPython.core.inputtransformer2 import TransformerManager

    # %matplotlib and friends become plain Python calls first.
    python = TransformerManager().transform_cell(source)
    try:
        tree = ast.parse(python)
    except SyntaxError:
        return False
    return any(isinstance(n, ast.Import | ast.ImportFrom) for n in tree.body)


def test_every_cell_has_a_slide_type(nb: nbformat.NotebookNode) -> None:
    """slideshow.slide_type on every cell, from reveal's vocabulary."""
    wrong = {
        i: _slide_type(cell) for i, cell in enumerate(nb.cells)
        if _slide_type(cell) not in SLIDE_TYPES
    }
    assert wrong == {}, f"cells (by index) with a bad slide_type: {wrong}"


def test_one_parameters_cell_of_upper_case_literals(
    nb: nbformat.NotebookNode,
) -> None:
    """Exactly one parameters cell: NAME = literal lines, nothing else."""
    cells = [c for c in nb.cells if "parameters" in _tags(c)]
    assert len(cells) == 1, "tag exactly one cell 'parameters'"
    assert cells[0].cell_type == "code"
    tree = ast.parse(cells[0].source)
    assert tree.body, "the parameters cell assigns nothing"
    for node in tree.body:
        assert isinstance(node, ast.Assign), ast.unparse(node)
        assert len(node.targets) == 1, ast.unparse(node)
        target = node.targets[0]
        assert isinstance(target, ast.Name), ast.unparse(node)
        assert target.id.isupper(), f"{target.id} is not UPPER_CASE"
        ast.literal_eval(node.value)  # raises unless a plain literal
    assert not any("injected-parameters" in _tags(c) for c in nb.cells), (
        "an executed copy was committed: papermill's injected cell is in")


def test_no_outputs_committed(nb: nbformat.NotebookNode) -> None:
    """Outputs and execution counts stay out of git."""
    dirty = [
        i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
        and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert dirty == [], f"clear the outputs of cells {dirty}"


def test_opens_with_a_title_slide(nb: nbformat.NotebookNode) -> None:
    """The first cell is a Markdown '# Title' starting a slide."""
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    assert _slide_type(first) == "slide"
    assert first.source.lstrip().startswith("# "), first.source[:60]


def test_setup_cells_are_hidden_from_slides(
    nb: nbformat.NotebookNode,
) -> None:
    """The first code cell imports and is 'skip', as are other imports
    before the parameters cell."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and _has_import(code[0].source), (
        "the first code cell should hold the imports")
    for cell in code:
        if "parameters" in _tags(cell):
            break
        if _has_import(cell.source):
            assert _slide_type(cell) == "skip", cell.source[:60]


def test_names_the_portable_kernel(nb: nbformat.NotebookNode) -> None:
    """The kernelspec is python3, so the notebook runs anywhere."""
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
