"""Choose the program that serves the Firecracker API: the real one or
the lab's QEMU-backed emulator.

Real Firecracker needs its binary and a working ``/dev/kvm``. The first
check opens the device read-write and asks for the KVM API version, which
is what Firecracker itself does first. That proves access, not that
guests run: some nested or paravirtual KVMs answer the ioctl yet hang
every guest. So when a guest kernel is known, ``auto`` also boots it
once on Firecracker, with no disk and a bounded wait, and takes real
Firecracker only if the kernel gets as far as looking for its root file
system. The verdict is cached per Firecracker binary, host kernel and
guest kernel, so the probe costs a second once, not on every VM.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.util
import json
import logging
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.errors import LabError
from helpers.paths import cache_dir

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

# Longest wait for the probe boot. On a working KVM, Firecracker takes a
# kernel to its root-mount panic in well under a second (a whole guest
# reaches user space in about 125 ms); ten seconds leave room for a busy
# host, and a KVM that hangs guests never gets there at all.
PROBE_TIMEOUT_S = 10.0

# Kernel arguments of the probe: console on the serial port, reboot
# through the keyboard controller so Firecracker exits, reboot 1 s after
# a panic, no PCI, and an init that exists nowhere. With no drive
# attached, a kernel that runs properly ends in panic(): it cannot mount
# a root file system, or (with a built-in initramfs) cannot run that init.
PROBE_BOOT_ARGS = (
    "console=ttyS0 reboot=k panic=1 pci=off init=/fclab-probe-none")

# The probe VM: the smallest shape every Firecracker release accepts.
PROBE_VCPUS = 1
PROBE_MEM_MIB = 128

# The success mark. panic() prints this at KERN_EMERG, which reaches the
# console whatever the log level. Getting there means the kernel set up
# memory, interrupts, timers and the scheduler and ran its drivers'
# initialisation: the stages where a broken KVM hangs. "Linux version" is
# printed before any of that, and Firecracker exiting proves nothing by
# itself (a guest that triple-faults early makes it exit too).
PROBE_SUCCESS = re.compile(r"Kernel panic - not syncing")

# Seconds Firecracker gets to exit by itself once the kernel panicked
# (panic=1 reboots after one second; reboot=k makes Firecracker exit).
PROBE_EXIT_GRACE_S = 3.0

# Output lines of a failed probe that its reason quotes.
PROBE_TAIL_LINES = 5

# How often the probe checks the process while its output is silent.
PROBE_POLL_S = 0.1

# Cache of probe verdicts, in cache_dir(); a lock file beside it makes
# concurrent callers wait for one probe instead of each running their own.
PROBE_CACHE_NAME = "backend-probe.json"
PROBE_LOCK_NAME = "backend-probe.lock"

# Verdicts kept in the cache; the oldest go first (each is a few hundred
# bytes; this covers many kernels and Firecracker releases).
PROBE_CACHE_MAX = 32

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


@dataclass(frozen=True)
class ProbeResult:
    """What a probe boot showed: did the guest kernel get far enough?"""

    works: bool
    # A clause for the reason, e.g. "reached the kernel's panic ... in 1.2 s".
    detail: str
    seconds: float


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


def choose_backend(requested: str = "auto", kernel: Path | None = None,
                   *, probe_timeout: float | None = None) -> BackendChoice:
    """Pick the VMM: ``firecracker``, ``emulator``, or ``auto``.

    ``auto`` follows ``FCLAB_BACKEND`` when set; otherwise it takes real
    Firecracker when its binary is found, /dev/kvm answers and a probe
    boot of *kernel* shows that guests run (or, with no kernel given,
    without that proof), and the emulator in every other case, with the
    reason spelled out. *probe_timeout* defaults to ``PROBE_TIMEOUT_S``.
    An explicit ``firecracker`` skips the probe boot.
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
        found = f"found {binary} and {kvm_text}"
        if requested == FIRECRACKER:
            return BackendChoice(
                FIRECRACKER, (str(binary),),
                f"{found}; Firecracker was asked for, so no probe boot")
        if kernel is None:
            return BackendChoice(
                FIRECRACKER, (str(binary),),
                f"{found}; no probe boot was made (no guest kernel given), "
                "so guests are not proven to run on this KVM")
        timeout = PROBE_TIMEOUT_S if probe_timeout is None else probe_timeout
        result, cached = cached_probe(binary, Path(kernel), timeout)
        note = (f" (cached in {probe_cache_path()}; delete that file to "
                "probe again)" if cached else "")
        if result.works:
            return BackendChoice(
                FIRECRACKER, (str(binary),),
                f"{found}; a probe boot of {kernel} {result.detail}{note}")
        return _use_emulator(
            f"Firecracker found at {binary}, /dev/kvm answers, but a probe "
            f"boot of {kernel} {result.detail}{note}; using the emulator")
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


# -- the probe boot -----------------------------------------------------------


def probe_config(kernel: Path) -> dict[str, Any]:
    """Firecracker's JSON configuration for the probe: a kernel, no disk."""
    return {
        "boot-source": {
            # Absolute: Firecracker runs in the probe's own directory.
            "kernel_image_path": str(kernel.resolve()),
            "boot_args": PROBE_BOOT_ARGS,
        },
        "machine-config": {
            "vcpu_count": PROBE_VCPUS,
            "mem_size_mib": PROBE_MEM_MIB,
        },
    }


def probe_boot(binary: Path, kernel: Path,
               timeout: float = PROBE_TIMEOUT_S) -> ProbeResult:
    """Boot *kernel* once on *binary* without an API; report how far.

    The process runs in its own session and temporary directory; its
    whole process group is killed and the directory removed on return,
    whatever happened.
    """
    with tempfile.TemporaryDirectory(prefix="fclab-probe-") as folder:
        config = Path(folder) / "probe.json"
        config.write_text(json.dumps(probe_config(kernel), indent=2))
        argv = [str(binary), "--no-api", "--config-file", str(config)]
        log.debug("probe boot: %s", shlex.join(argv))
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, cwd=folder,
                start_new_session=True)
        except OSError as exc:
            return ProbeResult(
                False, f"could not start: {exc.strerror}", 0.0)
        try:
            return _watch_probe(proc, started, timeout)
        finally:
            _kill_group(proc)


def _watch_probe(proc: subprocess.Popen[bytes], started: float,
                 timeout: float) -> ProbeResult:
    """Read the probe's output until the panic, its exit, or the deadline."""
    assert proc.stdout is not None
    tail: deque[str] = deque(maxlen=PROBE_TAIL_LINES)
    deadline = started + timeout
    pending = b""
    fd = proc.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if pending.strip():
                    tail.append(pending.decode("utf-8", "replace").strip())
                return ProbeResult(
                    False,
                    f"did not reach the kernel's panic at the missing root "
                    f"disk within {timeout:g} s ({_seen(tail)}): KVM does "
                    "not run guests here", timeout)
            if not selector.select(min(remaining, PROBE_POLL_S)):
                if proc.poll() is None:
                    continue
                chunk = b""  # exited; a child may hold the pipe open
            else:
                chunk = os.read(fd, 65536)
            if chunk:
                pending += chunk
                *done, pending = pending.split(b"\n")
                for raw in done:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line:
                        continue
                    tail.append(line)
                    if PROBE_SUCCESS.search(line):
                        return _probe_success(proc, started)
                continue
            # End of output: the probe is over, panicked or not.
            if pending.strip():
                tail.append(pending.decode("utf-8", "replace").strip())
                if PROBE_SUCCESS.search(tail[-1]):
                    return _probe_success(proc, started)
            try:
                code = proc.wait(max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                code = None
            ended = ("closed its output" if code is None
                     else f"exited with code {code}")
            return ProbeResult(
                False,
                f"{ended} before the kernel's panic at the missing root "
                f"disk ({_seen(tail)}): real Firecracker cannot run "
                "guests here", time.monotonic() - started)


def _probe_success(proc: subprocess.Popen[bytes],
                   started: float) -> ProbeResult:
    """The kernel panicked as planned; note whether Firecracker exited."""
    seconds = time.monotonic() - started
    try:
        proc.wait(PROBE_EXIT_GRACE_S)
        exited = "and Firecracker exited by itself"
    except subprocess.TimeoutExpired:
        exited = "(Firecracker was stopped after it)"
    return ProbeResult(
        True,
        f"reached the kernel's panic at the missing root disk in "
        f"{seconds:.1f} s {exited}: KVM runs guests here", seconds)


def _seen(tail: deque[str]) -> str:
    """Describe the last output lines for a failure message."""
    if not tail:
        return "no output at all"
    return "last output: " + " | ".join(tail)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill the probe's whole process group and reap its leader."""
    # The probe VM holds nothing worth a graceful stop: no disk, no socket.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


# -- the verdict cache --------------------------------------------------------


def probe_cache_path() -> Path:
    """The JSON file that keeps probe verdicts."""
    return cache_dir() / PROBE_CACHE_NAME


def probe_key(binary: Path, kernel: Path) -> str:
    """Identify a probe: Firecracker binary, host kernel, guest kernel."""
    def file_id(path: Path) -> list[Any]:
        info = path.stat()
        return [str(path.resolve()), info.st_size, info.st_mtime_ns]

    return json.dumps({
        "firecracker": file_id(binary),
        "host_kernel": os.uname().release,
        "guest_kernel": file_id(kernel),
    }, sort_keys=True)


def cached_probe(binary: Path, kernel: Path,
                 timeout: float = PROBE_TIMEOUT_S) -> tuple[ProbeResult, bool]:
    """Return the verdict for this binary and kernel, probing if unknown.

    The second value says whether the verdict came from the cache.
    """
    try:
        key = probe_key(binary, kernel)
    except OSError as exc:
        raise BackendError(
            f"cannot read {exc.filename}: {exc.strerror}; build the guest "
            "first (helpers.images.build_guest()) or pass an existing kernel"
        ) from exc
    path = probe_cache_path()
    with _probe_lock(path.with_name(PROBE_LOCK_NAME)):
        verdicts = _read_verdicts(path)
        known = verdicts.get(key)
        if known is not None:
            log.debug("probe verdict from %s: %s", path, known)
            return ProbeResult(**known), True
        result = probe_boot(binary, kernel, timeout)
        log.info("probe boot of %s on %s %s", kernel, binary, result.detail)
        verdicts[key] = {"works": result.works, "detail": result.detail,
                         "seconds": round(result.seconds, 3)}
        while len(verdicts) > PROBE_CACHE_MAX:
            verdicts.pop(next(iter(verdicts)))
        _write_verdicts(path, verdicts)
        return result, False


@contextlib.contextmanager
def _probe_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock so one process probes at a time."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_verdicts(path: Path) -> dict[str, dict[str, Any]]:
    """Load the cached verdicts; an unreadable file counts as empty."""
    try:
        data = json.loads(path.read_text())
        verdicts = data["verdicts"]
        if not isinstance(verdicts, dict):
            raise TypeError("verdicts is not an object")
        return {key: {"works": bool(v["works"]), "detail": str(v["detail"]),
                      "seconds": float(v["seconds"])}
                for key, v in verdicts.items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable probe cache %s: %s", path, exc)
        return {}


def _write_verdicts(path: Path, verdicts: dict[str, dict[str, Any]]) -> None:
    """Write the verdicts atomically: a temporary file, then a rename."""
    fd, name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private; the cache is as readable as
        # everything else the lab keeps there.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as handle:
            json.dump({"verdicts": verdicts}, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


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
