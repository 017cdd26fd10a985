"""Log lines in Firecracker's shape, to standard output or a file.

A line reads ``<timestamp> [<id>:<thread>(:<LEVEL>)(:<file>:<line>)] msg``,
the level shown when ``show_level`` is on and the origin when
``show_log_origin`` is on (both off by default, as in Firecracker).
Records are written with one ``os.write`` each, unbuffered, so they
interleave cleanly with the guest's serial output on the same stream.
"""

from __future__ import annotations

import logging
import os
import threading
import time

# Python has no TRACE level; Firecracker has one below DEBUG.
TRACE = 5

# Level names as Firecracker spells them on its command line and API,
# mapped to Python levels. "Off" sits above every real level.
OFF = logging.CRITICAL + 10
LEVELS = {
    "off": OFF,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
}

# How a level appears inside the brackets when show_level is on.
_LEVEL_TAGS = {
    logging.CRITICAL: "ERROR",
    logging.ERROR: "ERROR",
    logging.WARNING: "WARN",
    logging.INFO: "INFO",
    logging.DEBUG: "DEBUG",
    TRACE: "TRACE",
}

# Every logger of the package hangs below this one.
ROOT = "firecracker_emulator"


def level_from_name(name: str) -> int:
    """Return the Python level for a Firecracker level name."""
    try:
        return LEVELS[name.lower()]
    except KeyError:
        raise ValueError(
            f"Invalid log level: {name}. Use one of Error, Warning, Info, "
            "Debug, Trace or Off."
        ) from None


class FirecrackerFormatter(logging.Formatter):
    """Formats records the way Firecracker's logger prints them."""

    def __init__(
        self, instance_id: str, show_level: bool, show_origin: bool
    ) -> None:
        super().__init__()
        self.instance_id = instance_id
        self.show_level = show_level
        self.show_origin = show_origin

    def format(self, record: logging.LogRecord) -> str:
        """Return one log line, without the trailing newline."""
        seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds))
        tags = [self.instance_id, record.threadName or "main"]
        if self.show_level:
            tags.append(_LEVEL_TAGS.get(record.levelno, record.levelname))
        if self.show_origin:
            tags.append(f"{record.pathname}:{record.lineno}")
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return f"{stamp}.{nanos:09d} [{':'.join(tags)}] {message}"


class FdHandler(logging.Handler):
    """Writes each record with a single write to a file descriptor."""

    def __init__(self, fd: int, owned: bool) -> None:
        super().__init__()
        self.fd = fd
        self.owned = owned
        self.module: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        """Apply the optional module filter, then the usual filters."""
        if self.module and not record.name.startswith(self.module):
            return False
        return bool(super().filter(record))

    def emit(self, record: logging.LogRecord) -> None:
        """Write one formatted record."""
        try:
            line = (self.format(record) + "\n").encode("utf-8", "replace")
            os.write(self.fd, line)
        except OSError:
            # A closed reader (a consumer that went away) must not take
            # the emulator down with it; the record is lost, as in
            # Firecracker when its log pipe is full.
            pass

    def close(self) -> None:
        """Close the file descriptor if this handler opened it."""
        if self.owned:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.owned = False
        super().close()


class LogSettings:
    """The logger configuration, changeable by flags and PUT /logger."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.level = logging.INFO
        self.level_name = "Info"
        self.show_level = False
        self.show_origin = False
        self.module: str | None = None
        self.path: str | None = None
        self._lock = threading.Lock()
        self._handler: FdHandler | None = None

    def apply(
        self,
        *,
        level: str | None = None,
        path: str | None = None,
        show_level: bool | None = None,
        show_origin: bool | None = None,
        module: str | None = None,
    ) -> None:
        """Change the settings and (re)install the handler.

        Raises OSError when *path* cannot be opened for appending.
        """
        with self._lock:
            fd = None
            if path is not None:
                fd = os.open(
                    path,
                    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                    0o644,
                )
            if level is not None:
                self.level = level_from_name(level)
                self.level_name = level
            if show_level is not None:
                self.show_level = show_level
            if show_origin is not None:
                self.show_origin = show_origin
            if module is not None:
                self.module = module.replace("::", ".")
            if path is not None:
                self.path = path
            self._install(fd)

    def _install(self, fd: int | None) -> None:
        """Replace the package's handler with one for the settings."""
        root = logging.getLogger(ROOT)
        old = self._handler
        if fd is None:
            fd, owned = (old.fd, old.owned) if old else (1, False)
            if old:
                old.owned = False
        else:
            owned = True
        handler = FdHandler(fd, owned)
        handler.module = self.module
        handler.setFormatter(
            FirecrackerFormatter(
                self.instance_id, self.show_level, self.show_origin
            )
        )
        root.addHandler(handler)
        if old:
            root.removeHandler(old)
            old.close()
        root.setLevel(self.level)
        root.propagate = False
        self._handler = handler

    def close(self) -> None:
        """Remove and close the handler."""
        with self._lock:
            if self._handler:
                logging.getLogger(ROOT).removeHandler(self._handler)
                self._handler.close()
                self._handler = None

    def as_config(self) -> dict[str, object]:
        """Return the settings as Firecracker's Logger object."""
        config: dict[str, object] = {
            "level": self.level_name,
            "show_level": self.show_level,
            "show_log_origin": self.show_origin,
        }
        if self.path is not None:
            config["log_path"] = self.path
        if self.module is not None:
            config["module"] = self.module.replace(".", "::")
        return config
