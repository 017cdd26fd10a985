"""environment.yml and pyproject.toml must list the same dependencies."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)")


def _split(spec: str) -> tuple[str, str]:
    """(normalised name, version bounds) of a requirement string."""
    match = NAME.fullmatch(spec)
    assert match, f"unparsable requirement {spec!r}"
    name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
    return name, match.group(2).replace(" ", "")


def _pyproject() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs.extend(extra)
    return dict(_split(s) for s in specs)


def _conda() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    specs: list[str] = []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            specs.extend(p for p in dep["pip"] if not p.startswith("-"))
        else:
            specs.append(dep)
    pairs = dict(_split(s) for s in specs)
    return {k: v for k, v in pairs.items() if k not in {"python", "pip"}}


def test_same_packages() -> None:
    """Every dependency appears in both files."""
    py, conda = _pyproject(), _conda()
    assert sorted(set(py) - set(conda)) == [], "missing in environment.yml"
    assert sorted(set(conda) - set(py)) == [], "missing in pyproject.toml"


def test_same_version_bounds() -> None:
    """The version bounds agree, so both installs resolve alike."""
    py, conda = _pyproject(), _conda()
    differ = {n: (py[n], conda[n]) for n in py if py[n] != conda.get(n)}
    assert differ == {}
