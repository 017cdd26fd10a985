"""Where the lab keeps what it builds, downloads and measures."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Environment variable that moves the build folder (the series sets it).
BUILD_ENV = "FCLAB_BUILD"


def cache_dir() -> Path:
    """Directory for downloaded and built artifacts (created on demand).

    ``FCLAB_CACHE`` overrides it; otherwise ``$XDG_CACHE_HOME`` or
    ``~/.cache`` holds a ``firecracker-lab`` folder.
    """
    env = os.environ.get("FCLAB_CACHE")
    if env:
        path = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base) / "firecracker-lab"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_dir() -> Path:
    """Directory for executed notebooks, CSVs, figures and slides."""
    env = os.environ.get(BUILD_ENV)
    path = Path(env) if env else REPO_ROOT / "build"
    path.mkdir(parents=True, exist_ok=True)
    return path
