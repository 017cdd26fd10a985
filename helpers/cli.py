"""What the lab's small commands share: logging setup and JSON output."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from helpers.errors import LabError

# One line a record: its level, the module that logged it, the message.
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def configure_logging(level: int) -> None:
    """Log records at *level* and above to standard error, one a line."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)


def run_json_command(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    action: Callable[[argparse.Namespace], Mapping[str, Any]],
    log: logging.Logger,
) -> int:
    """Parse *argv*, run *action* and print what it returns as JSON.

    Adds ``-v/--verbose`` (debug logging) to *parser*. A LabError is
    logged on the command's own *log* and makes the exit status 1.
    """
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        result = action(args)
    except LabError as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(result, indent=2))
    return 0
