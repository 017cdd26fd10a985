"""Check whether this host can run the series, and say what to fix.

``python -m helpers.doctor`` (or ``make doctor``) prints one row per
thing the lab uses: the system tools, ``/dev/kvm``, a Firecracker binary,
the privileges networking needs, the cache's free space, and the backend
the notebooks will pick with the reason. It exits 0 when the series can
run (on the emulator at least) and 1 when something essential is missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from helpers.paths import cache_dir

# How each row ends: all good, works with limits, or blocks the series.
OK, LIMITED, MISSING = "ok", "limited", "missing"

# The guest build, the emulator and the notebooks need these; the value
# is the Debian package that brings the command.
ESSENTIAL_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "busybox": "busybox-static",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "ip": "iproute2",
    "cpio": "cpio",
    "lz4": "lz4",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
}

# Only some parts need these: the official root filesystem, the browser
# tests and the offline slides.
OPTIONAL_TOOLS = {
    "unsquashfs": ("squashfs-tools", "official root filesystem"),
    "chromium": ("chromium", "browser tests"),
    "npm": ("npm", "offline slides (reveal.js)"),
}

# A guest set, the official root filesystem and a few executed runs fit
# comfortably in this much space.
MIN_FREE_GIB = 2.0


@dataclass(frozen=True)
class Check:
    """One row of the report."""

    name: str
    status: str
    detail: str
    fix: str = ""


def _which(command: str) -> str | None:
    """Path of *command*, looking in the sbin folders too."""
    return shutil.which(command) or next(
        (str(p) for d in ("/usr/sbin", "/sbin")
         if (p := Path(d) / command).is_file()),
        None,
    )


def check_tools(which: Callable[[str], str | None] = _which) -> list[Check]:
    """One row for the essential tools and one per optional tool."""
    missing = sorted({pkg for cmd, pkg in ESSENTIAL_TOOLS.items()
                      if which(cmd) is None})
    rows = [
        Check("system tools", MISSING,
              "missing: " + ", ".join(missing),
              "sudo apt-get install -y " + " ".join(missing))
        if missing else
        Check("system tools", OK, ", ".join(sorted(ESSENTIAL_TOOLS)))
    ]
    for cmd, (pkg, purpose) in OPTIONAL_TOOLS.items():
        found = which(cmd)
        rows.append(
            Check(cmd, OK, found) if found else
            Check(cmd, LIMITED, f"not found: needed for the {purpose}",
                  f"sudo apt-get install -y {pkg}")
        )
    return rows


def check_qemu(which: Callable[[str], str | None] = _which) -> Check:
    """QEMU's version, which the emulator runs every guest with."""
    path = which("qemu-system-x86_64")
    if path is None:
        return Check("QEMU", MISSING, "qemu-system-x86_64 not found",
                     "sudo apt-get install -y qemu-system-x86")
    out = subprocess.run([path, "--version"], capture_output=True,
                         text=True, check=False).stdout
    return Check("QEMU", OK, out.splitlines()[0] if out else path)


def check_kvm() -> Check:
    """Whether /dev/kvm opens; a probe boot decides whether it works."""
    from helpers.backend import probe_kvm

    usable, text = probe_kvm()
    if usable:
        return Check("/dev/kvm", OK, text + " (a probe boot still decides)")
    return Check("/dev/kvm", LIMITED, text,
                 "guests run under TCG: slower, but every notebook works")


def check_firecracker() -> Check:
    """A Firecracker binary on PATH or in FIRECRACKER_BIN."""
    from helpers.backend import BINARY_ENV, find_firecracker

    binary = find_firecracker()
    if binary is None:
        return Check(
            "firecracker", LIMITED, "no binary: the emulator stands in",
            f"notebook 01 with SOURCE='official' fetches it; then put it on "
            f"PATH or set {BINARY_ENV}",
        )
    out = subprocess.run([str(binary), "--version"], capture_output=True,
                         text=True, check=False).stdout
    return Check("firecracker", OK,
                 f"{binary}: {out.splitlines()[0] if out else '?'}")


def check_privileges() -> Check:
    """What the networking notebook needs: CAP_NET_ADMIN, CAP_SYS_ADMIN."""
    from helpers.net import NetPrivileges

    missing = NetPrivileges.current().missing
    if not missing:
        return Check("networking", OK, "may create namespaces and TAPs")
    return Check(
        "networking", LIMITED, "lacks " + " and ".join(missing),
        "run as root (sudo make run) for notebook 03; the others run as is",
    )


def check_space(folder: Path | None = None) -> Check:
    """Free space where the cache lives."""
    folder = folder or cache_dir()
    free_gib = shutil.disk_usage(folder).free / 2**30
    detail = f"{free_gib:.1f} GiB free in {folder}"
    if free_gib < MIN_FREE_GIB:
        return Check("disk", MISSING, detail,
                     f"free at least {MIN_FREE_GIB:g} GiB, or point "
                     "FCLAB_CACHE at a larger disk")
    return Check("disk", OK, detail)


def check_backend(kernel: Path | None = None) -> Check:
    """The backend the notebooks would pick, and why."""
    from helpers.backend import choose_backend
    from helpers.errors import LabError

    try:
        choice = choose_backend("auto", kernel=kernel)
    except LabError as err:
        return Check("backend", MISSING, str(err))
    return Check("backend", OK, f"{choice.name}: {choice.reason}")


def run_checks(probe: bool = False) -> list[Check]:
    """Every check, in the order the report shows them.

    With *probe*, the guest is built (or taken from the cache) so that a
    Firecracker binary is proven by a probe boot, as the notebooks do.
    """
    kernel = None
    if probe:
        from helpers.images import build_guest

        kernel = build_guest().kernel
    return [
        *check_tools(), check_qemu(), check_kvm(), check_firecracker(),
        check_privileges(), check_space(), check_backend(kernel),
    ]


def report(checks: Sequence[Check]) -> str:
    """The checks as an aligned table, fixes on their own lines."""
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{c.name.ljust(width)}  {c.status:<7}  {c.detail}")
        if c.fix and c.status != OK:
            lines.append(f"{'':{width}}  {'':7}  -> {c.fix}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report; exit 1 when the series cannot run here."""
    parser = argparse.ArgumentParser(
        prog="python -m helpers.doctor", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--probe", action="store_true",
                        help="build the guest and probe-boot Firecracker "
                        "if a binary is present")
    args = parser.parse_args(argv)
    checks = run_checks(probe=args.probe)
    print(report(checks))
    blocked = [c.name for c in checks if c.status == MISSING]
    if blocked:
        print(f"\nThe series cannot run until these are fixed: "
              f"{', '.join(blocked)}.")
        return 1
    print("\nThe series can run here: make run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
