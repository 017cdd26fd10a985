"""Small utilities for the notebooks: expected errors and result records.

``expect_error`` shows a failure made on purpose and keeps the notebook
running; ``record`` writes what a notebook observed to a JSON file that
the papermill tests read back.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.errors import LabError
from helpers.paths import build_dir

log = logging.getLogger(__name__)

# Environment variable naming the JSON file that record() writes.
RECORD_ENV = "FCLAB_RECORD"

# Set by Jupyter to the notebook's path; names the default record file.
SESSION_ENV = "JPY_SESSION_NAME"

# Width the printed error is wrapped to: it still fits a slide's code
# cell in reveal.js at its default size, indentation included.
WRAP_COLUMNS = 72

# Record files this process has started: the first write of a run
# replaces the file, so keys from an earlier run never linger.
_started: set[Path] = set()


@dataclass
class ExpectedError:
    """What ``expect_error`` caught (``error`` stays None until then)."""

    error: BaseException | None = None

    @property
    def text(self) -> str:
        """The caught error's message."""
        return str(self.error) if self.error is not None else ""

    @property
    def kind(self) -> str:
        """The caught error's class name."""
        return type(self.error).__name__ if self.error is not None else ""

    def _repr_markdown_(self) -> str:
        """Show the caught error as a quoted block."""
        quoted = "\n".join(f"> {line}" for line in self.text.splitlines())
        return f"**Expected error `{self.kind}`**\n\n{quoted}\n"


class NoErrorRaised(LabError):
    """A block meant to fail succeeded: the lesson's premise broke."""


@contextmanager
def expect_error(
    *kinds: type[BaseException],
) -> Iterator[ExpectedError]:
    """Run a block that must fail with one of *kinds* (LabError if none).

    The error is printed and kept in the yielded ``ExpectedError``; the
    notebook goes on. A block that does not fail raises NoErrorRaised.
    """
    wanted = kinds or (LabError,)
    caught = ExpectedError()
    try:
        yield caught
    except wanted as exc:
        caught.error = exc
        print(f"Expected error ({type(exc).__name__}):")
        for line in str(exc).splitlines():
            # Whole words only, so commands and paths stay copyable; a
            # wrapped line keeps the indentation it started with.
            lead = line[: len(line) - len(line.lstrip())]
            print(textwrap.fill(
                line, WRAP_COLUMNS, initial_indent="    ",
                subsequent_indent="    " + lead, break_long_words=False,
                break_on_hyphens=False,
            ))
        return
    names = ", ".join(kind.__name__ for kind in wanted)
    raise NoErrorRaised(
        f"the block was expected to raise {names} but succeeded; the "
        "VMM may accept what this step shows it refusing")


def record_path(notebook: str | None = None) -> Path:
    """Where ``record`` writes: FCLAB_RECORD, else build/records/NAME.json.

    NAME is *notebook*, else the notebook Jupyter reports, else
    ``notebook``.
    """
    named = os.environ.get(RECORD_ENV)
    if named:
        return Path(named)
    if notebook is None:
        session = os.environ.get(SESSION_ENV)
        notebook = Path(session).stem if session else "notebook"
    return build_dir() / "records" / f"{notebook}.json"


def record(key: str, value: Any, *, notebook: str | None = None) -> None:
    """Store *value* (JSON-ready) under *key* in the record file."""
    path = record_path(notebook)
    data: dict[str, Any] = {}
    if path in _started and path.exists():
        data = json.loads(path.read_text())
    data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)

    # Write a sibling file and rename it, so readers never see half.
    handle, temp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(data, out, indent=2, sort_keys=True, default=str)
            out.write("\n")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _started.add(path)
    log.debug("recorded %s in %s", key, path)
