"""Choosing between KVM and TCG, with a probe boot when KVM is offered.

Some hosts expose a ``/dev/kvm`` on which ordinary guests hang, so the
mere presence of the device proves nothing. With ``--accel auto`` the
emulator boots the guest kernel once under KVM, without a root device,
and waits a few seconds for the kernel to get far enough to complain that
it has no root (or to start init). Success means KVM; anything else means
TCG. The verdict is cached per host kernel, QEMU binary and kernel image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import select
import subprocess
import tempfile
import time
from pathlib import Path

from . import qemu as qemu_mod

log = logging.getLogger(__name__)

# Seconds the probe boot may take. A kernel under working KVM reaches its
# root-mount attempt in well under two seconds; a hung one never does.
PROBE_TIMEOUT = 8.0
# Serial console lines that prove the kernel ran its initialisation.
PROBE_MARKERS = (
    b"VFS: Unable to mount root",
    b"Kernel panic",
    b"Run /init",
    b"Freeing unused kernel",
)
# Bump when the probe changes, so old verdicts are not trusted.
PROBE_REVISION = 1
# Bytes read at a time when hashing the kernel image.
HASH_CHUNK = 1 << 20


def cache_file() -> Path:
    """Return the verdict cache: $FCEMU_CACHE_DIR or the XDG cache."""
    base = os.environ.get("FCEMU_CACHE_DIR")
    if base:
        return Path(base) / "accel.json"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "firecracker-emulator" / "accel.json"


def _load(path: Path) -> dict[str, dict[str, str]]:
    """Read the cache, treating a missing or broken file as empty."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"kernels": {}, "verdicts": {}}
    data.setdefault("kernels", {})
    data.setdefault("verdicts", {})
    return data  # type: ignore[no-any-return]


def _store(path: Path, data: dict[str, dict[str, str]]) -> None:
    """Write the cache atomically (a temporary file, then a rename)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".accel-")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(data, out, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as err:
        log.warning("Cannot write the accelerator cache %s: %s", path, err)


def _file_identity(path: str) -> str:
    """Identify a file by device, inode, size and modification time."""
    info = os.stat(path)
    return f"{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"


def _kernel_hash(path: str, data: dict[str, dict[str, str]]) -> str:
    """Return the image's SHA-256, reusing it while the file is unchanged."""
    ident = f"{os.path.realpath(path)}@{_file_identity(path)}"
    known = data["kernels"].get(ident)
    if known:
        return known
    digest = hashlib.sha256()
    with open(path, "rb") as image:
        while chunk := image.read(HASH_CHUNK):
            digest.update(chunk)
    data["kernels"][ident] = digest.hexdigest()
    return digest.hexdigest()


def _kvm_usable() -> bool:
    """Tell whether /dev/kvm exists and we may open it."""
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def choose(requested: str, qemu: str, kernel: str) -> tuple[str, str]:
    """Return ("kvm" or "tcg", the reason) for this boot."""
    if requested in ("kvm", "tcg"):
        return requested, f"requested with --accel {requested}"
    if not _kvm_usable():
        return "tcg", "/dev/kvm is missing or not accessible"
    path = cache_file()
    data = _load(path)
    uname = os.uname()
    key = "|".join(
        [
            f"probe{PROBE_REVISION}",
            uname.release,
            uname.version,
            f"{os.path.realpath(qemu)}@{_file_identity(qemu)}",
            _kernel_hash(kernel, data),
        ]
    )
    cached = data["verdicts"].get(key)
    if cached in ("kvm", "tcg"):
        _store(path, data)
        return cached, f"cached probe verdict in {path}"
    started = time.monotonic()
    ok = probe_kvm(qemu, kernel)
    verdict = "kvm" if ok else "tcg"
    data["verdicts"][key] = verdict
    _store(path, data)
    took = time.monotonic() - started
    reason = (
        f"KVM probe boot {'succeeded' if ok else 'failed'} in {took:.1f} s"
        f" (cached in {path})"
    )
    return verdict, reason


def probe_kvm(qemu: str, kernel: str) -> bool:
    """Boot *kernel* under KVM without a root disk; True if it ran."""
    cmd = [
        qemu,
        "-M", "microvm,acpi=on",
        "-accel", "kvm",
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-m", "128M",
        "-kernel", kernel,
        "-append", "console=ttyS0 reboot=k panic=-1 pci=off",
        "-serial", "stdio",
    ]
    log.debug("KVM probe: %s", " ".join(cmd))
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        # The hook only calls prctl and getppid: safe after a fork in a
        # threaded process, and the way to set the parent-death signal.
        preexec_fn=qemu_mod._child_setup(os.getpid()),  # noqa: PLW1509
    )
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + PROBE_TIMEOUT
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if not ready:
                return False
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                return False
            # Keep a window big enough for a marker split across reads.
            seen = seen[-256:] + chunk
            if any(m in seen for m in PROBE_MARKERS):
                return True
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
