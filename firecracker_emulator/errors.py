"""The one error hierarchy of the emulator."""

from __future__ import annotations


class EmulatorError(Exception):
    """Base class of every error the emulator raises on purpose."""


class StartupError(EmulatorError):
    """The emulator cannot start (bad flags, socket in use, bad config)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
