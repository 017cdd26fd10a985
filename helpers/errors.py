"""The one error hierarchy of the helpers package."""

from __future__ import annotations


class LabError(Exception):
    """Base class of every error the helpers raise on purpose."""
