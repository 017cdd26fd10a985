"""Helpers for the Firecracker Lab notebooks.

Each module owns one concern; nothing happens at import time.
"""

__all__: list[str] = []
