"""Choose the program that serves the Firecracker API: the real one or
the lab's QEMU-backed emulator.

Real Firecracker needs its binary and a working ``/dev/kvm``. The probe
here opens the device read-write and asks for the KVM API version, which
is what Firecracker itself does first. That proves access, not that
guests run: some nested or paravirtual KVMs answer the ioctl yet hang
every guest. The lab therefore treats the first boot as the final probe:
when a guest on real Firecracker does not come up, the error says to set
``FCLAB_BACKEND=emulator``.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from helpers.errors import LabError

log = logging.getLogger(__name__)

# The two programs that can serve the API.
FIRECRACKER = "firecracker"
EMULATOR = "emulator"
BACKENDS = (FIRECRACKER, EMULATOR)

# Environment variables: the backend to use when "auto" is asked for, and
# the path of the Firecracker binary when it is not on PATH.
BACKEND_ENV = "FCLAB_BACKEND"
BINARY_ENV = "FIRECRACKER_BIN"

KVM_DEVICE = "/dev/kvm"

# _IO(KVMIO, 0x00) from <linux/kvm.h>: KVMIO is 0xAE, no argument.
KVM_GET_API_VERSION = 0xAE00

# The only KVM API version Linux has ever reported since 2.6.22.
KVM_API_VERSION = 12

KVM_FIX = (
    "give your user access to /dev/kvm: `sudo usermod -aG kvm $USER` "
    "(then log in again) or `sudo setfacl -m u:$USER:rw /dev/kvm`"
)


class BackendError(LabError):
    """The requested backend cannot run here; the message says why."""


@dataclass(frozen=True)
class BackendChoice:
    """The VMM program to start, and why it was chosen."""

    name: str
    argv: tuple[str, ...]
    reason: str
    # Variables added to the VMM's environment (name, value).
    env: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        """Name and reason, for the notebook to print."""
        return f"{self.name}: {self.reason}"


def find_firecracker() -> Path | None:
    """Return the Firecracker binary from FIRECRACKER_BIN or PATH."""
    named = os.environ.get(BINARY_ENV)
    if named:
        path = Path(named)
        return path if path.is_file() and os.access(path, os.X_OK) else None
    found = shutil.which("firecracker")
    return Path(found) if found else None


def probe_kvm(device: str = KVM_DEVICE) -> tuple[bool, str]:
    """Open *device* read-write and check its API version.

    Returns whether KVM is usable and a sentence saying what was found.
    """
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, f"{device} does not exist (no KVM on this host)"
    except PermissionError:
        return False, f"{device} exists but is not accessible: {KVM_FIX}"
    except OSError as exc:
        return False, f"{device} cannot be opened: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        if exc.errno == errno.ENOTTY:
            return False, f"{device} is not a KVM device"
        return False, f"KVM_GET_API_VERSION failed: {exc.strerror}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return False, (f"{device} reports KVM API version {version}, "
                       f"not {KVM_API_VERSION}")
    return True, f"{device} answers with KVM API version {version}"


def emulator_argv() -> tuple[str, ...]:
    """Command that starts the emulator with this interpreter."""
    return (sys.executable, "-m", "firecracker_emulator")


def emulator_env() -> tuple[tuple[str, str], ...]:
    """PYTHONPATH that lets the VMM's interpreter find the emulator.

    The package may be importable here only through the current
    directory (a source checkout without install); the VMM runs in its
    own working directory, so it gets the package's folder explicitly.
    """
    spec = importlib.util.find_spec("firecracker_emulator")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(
            "the emulator package firecracker_emulator is not importable: "
            "run `make setup` (or `pip install -e .`)."
        )
    folder = str(Path(next(iter(spec.submodule_search_locations))).parent)
    paths = [folder, *filter(None, os.environ.get(
        "PYTHONPATH", "").split(os.pathsep))]
    return (("PYTHONPATH", os.pathsep.join(dict.fromkeys(paths))),)


def _use_emulator(why: str) -> BackendChoice:
    """Return the emulator choice, or fail if it is not installed."""
    return BackendChoice(EMULATOR, emulator_argv(), why, emulator_env())


def choose_backend(requested: str = "auto") -> BackendChoice:
    """Pick the VMM: ``firecracker``, ``emulator``, or ``auto``.

    ``auto`` follows ``FCLAB_BACKEND`` when set; otherwise it takes real
    Firecracker when its binary is found and /dev/kvm answers, and the
    emulator in every other case, with the reason spelled out.
    """
    if requested == "auto":
        requested = os.environ.get(BACKEND_ENV, "").strip() or "auto"
    if requested not in (*BACKENDS, "auto"):
        raise BackendError(
            f"unknown backend {requested!r}: use one of "
            f"{', '.join(BACKENDS)} or auto"
        )
    if requested == EMULATOR:
        return _use_emulator("the emulator was asked for")

    binary = find_firecracker()
    kvm_ok, kvm_text = probe_kvm()
    log.debug("firecracker binary %s; %s", binary, kvm_text)

    if binary is not None and kvm_ok:
        return BackendChoice(
            FIRECRACKER, (str(binary),),
            f"found {binary} and {kvm_text}")
    if requested == FIRECRACKER:
        raise BackendError(_firecracker_missing(binary, kvm_text))
    if binary is None:
        why = ("no Firecracker binary (set FIRECRACKER_BIN or put "
               "`firecracker` on PATH)")
        if not kvm_ok:
            why += f" and {kvm_text}"
    else:
        why = f"found {binary} but {kvm_text}"
    return _use_emulator(
        f"{why}; the QEMU-backed emulator serves the same API meanwhile")


def _firecracker_missing(binary: Path | None, kvm_text: str) -> str:
    """Explain why real Firecracker cannot run, and what to do."""
    if binary is None:
        return (
            "Firecracker was asked for but its binary is missing: download "
            "a release (notebook 01 shows how), then set FIRECRACKER_BIN to "
            "it or put it on PATH; or use backend='emulator'."
        )
    return (
        f"Firecracker was asked for but {kvm_text}. Fix KVM access or use "
        "backend='emulator'; the emulator serves the same API."
    )
