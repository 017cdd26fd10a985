"""Where the official Firecracker API description comes from.

Contract tests check requests and answers against it. It is taken from
the path in ``FCLAB_API_SPEC`` or, failing that, from a Firecracker
release already fetched into the cache (the tarball ships it as
``firecracker_spec-v<version>.yaml``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from helpers.paths import cache_dir

SPEC_ENV = "FCLAB_API_SPEC"
SPEC_GLOB = "firecracker_spec-v*.yaml"


def _version_key(path: Path) -> tuple[int, ...]:
    """Numeric version of a spec file's name, for picking the newest."""
    found = re.search(r"v(\d+(?:\.\d+)*)", path.name)
    return tuple(int(p) for p in found.group(1).split(".")) if found else ()


def find_api_spec(cache: Path | None = None) -> Path | None:
    """Return the API description to use, or None when there is none."""
    named = os.environ.get(SPEC_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            raise FileNotFoundError(
                f"{SPEC_ENV}={named} names no file; point it at "
                "firecracker-api-*.yaml or a release's firecracker_spec-*.yaml"
            )
        return path
    root = (cache or cache_dir()) / "artifacts"
    found = (
        sorted(root.rglob(SPEC_GLOB), key=_version_key)
        if root.is_dir() else []
    )
    return found[-1] if found else None


def load_api_spec(path: Path) -> dict[str, Any]:
    """Parse a Swagger 2.0 description."""
    import yaml

    with open(path) as handle:
        loaded: dict[str, Any] = yaml.safe_load(handle)
    return loaded
