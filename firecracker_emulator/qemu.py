"""QEMU as the emulator's machine: command line, process and monitor.

``build_command`` turns the recorded configuration into one QEMU command
with Firecracker's device model: ``-M microvm`` with virtio-MMIO block
and net devices, an i8042 keyboard controller for Ctrl-Alt-Del, the
serial port on the emulator's standard input and output, and no reboot.
``QemuProcess`` starts it so that it dies with the emulator, talks QMP to
it over a private socket pair, and watches its standard error.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import EmulatorError
from .resources import Resources

log = logging.getLogger(__name__)

# Under TCG the guest cannot calibrate its TSC on the microvm machine and
# hangs; these give it a frequency, trust the TSC and skip the delay-loop
# calibration (values observed to work: a 2 GHz nominal clock).
TCG_TSC_ARGS = "tsc_early_khz=2000000 tsc=reliable lpj=8000000"

# Firecracker's boot-timer address on x86_64 since v1.13, as QEMU's
# guest-error log prints it for an unclaimed write. The log does not show
# the byte written, so any one-byte write there stops the clock (the
# guest writes 123, Firecracker's magic value).
BOOT_TIMER_LINE = "Invalid write at addr 0xC0000000"

# Seconds to wait for QEMU's monitor greeting after spawning it.
QMP_GREETING_TIMEOUT = 20.0
# Seconds a QMP command may take before we give up on it.
QMP_COMMAND_TIMEOUT = 10.0
# Seconds QEMU gets to quit after "quit" before it is killed.
QUIT_GRACE = 3.0
# Lines of QEMU's standard error kept to explain a failure.
STDERR_TAIL = 20

# prctl(2) option asking the kernel to signal us when our parent dies.
PR_SET_PDEATHSIG = 1


class QemuError(EmulatorError):
    """QEMU could not be started or stopped answering."""


def find_qemu(explicit: str | None) -> str:
    """Return the QEMU binary: the flag, $FCEMU_QEMU, or on $PATH."""
    import shutil

    candidate = explicit or os.environ.get("FCEMU_QEMU")
    if candidate:
        return candidate
    found = shutil.which("qemu-system-x86_64")
    if found is None:
        raise QemuError(
            "qemu-system-x86_64 was not found on PATH; install QEMU "
            "(Debian: apt-get install qemu-system-x86) or pass --qemu PATH."
        )
    return found


def qemu_id(prefix: str, firecracker_id: str) -> str:
    """Turn a Firecracker resource id into a valid QEMU id."""
    return f"{prefix}_{firecracker_id}"


def _throttling(limiter: dict[str, Any] | None) -> str:
    """Map a Firecracker rate limiter onto QEMU's drive throttling.

    A token bucket of ``size`` tokens refilled every ``refill_time`` ms
    sustains ``size * 1000 / refill_time`` tokens a second; its one-time
    burst becomes QEMU's burst allowance.
    """
    if not limiter:
        return ""
    opts = []
    for key, qemu_key in (("bandwidth", "bps-total"), ("ops", "iops-total")):
        bucket = limiter.get(key)
        if not bucket or not bucket.get("refill_time") or not bucket["size"]:
            continue
        rate = max(1, bucket["size"] * 1000 // bucket["refill_time"])
        opts.append(f"throttling.{qemu_key}={rate}")
        burst = bucket.get("one_time_burst")
        if burst:
            opts.append(f"throttling.{qemu_key}-max={rate + burst}")
            opts.append(f"throttling.{qemu_key}-max-length=1")
    return "".join("," + o for o in opts)


def build_command(
    qemu: str,
    res: Resources,
    accel: str,
    monitor_fd: int,
    boot_timer: bool,
) -> list[str]:
    """Return the QEMU command for the configured microVM."""
    assert res.boot_source is not None
    mach = res.machine
    cmdline = res.kernel_cmdline()
    if accel == "tcg":
        cmdline += " " + TCG_TSC_ARGS
    if mach.smt and mach.vcpu_count > 1:
        smp = f"{mach.vcpu_count},sockets=1,cores={mach.vcpu_count // 2}," \
            "threads=2"
    else:
        smp = f"{mach.vcpu_count},sockets=1,cores={mach.vcpu_count}," \
            "threads=1"
    cmd = [
        qemu,
        "-M", "microvm,acpi=on",
        "-accel", accel,
        "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        "-smp", smp,
        "-m", f"{mach.mem_size_mib}M",
        "-kernel", res.boot_source.kernel_image_path,
    ]
    if res.boot_source.initrd_path:
        cmd += ["-initrd", res.boot_source.initrd_path]
    cmd += ["-append", cmdline]
    cmd += [
        "-chardev", "stdio,id=ser0,signal=off",
        "-serial", "chardev:ser0",
        "-device", "i8042",
        "-chardev", f"socket,id=qmp,fd={monitor_fd}",
        "-mon", "chardev=qmp,mode=control",
    ]
    for drive in res.drives:
        ident = qemu_id("drive", drive.drive_id)
        cache = "unsafe" if drive.cache_type == "Unsafe" else "writeback"
        spec = (
            f"id={ident},file={_escape(drive.path_on_host)},format=raw,"
            f"if=none,cache={cache}"
        )
        if drive.is_read_only:
            spec += ",readonly=on"
        spec += _throttling(drive.rate_limiter)
        cmd += ["-drive", spec]
        cmd += ["-device", f"virtio-blk-device,drive={ident}"]
    for net in res.nets:
        ident = qemu_id("net", net.iface_id)
        cmd += [
            "-netdev",
            (
                f"tap,id={ident},ifname={net.host_dev_name},script=no,"
                "downscript=no"
            ),
        ]
        device = f"virtio-net-device,netdev={ident}"
        if net.guest_mac:
            device += f",mac={net.guest_mac}"
        if net.mtu is not None:
            device += f",host_mtu={net.mtu}"
        cmd += ["-device", device]
    if boot_timer:
        cmd += ["-d", "guest_errors"]
    return cmd


def _escape(value: str) -> str:
    """Escape commas for a QEMU option value."""
    return value.replace(",", ",,")


def _child_setup(parent: int) -> Callable[[], None]:
    """Return a pre-exec hook tying the child's life to its parent's."""
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl

    def setup() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody
        # would ever send the signal, so leave at once.
        if os.getppid() != parent:
            os._exit(1)

    return setup


class Qmp:
    """A blocking QMP client on a connected socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")
        self.lock = threading.Lock()
        self.version = ""

    def handshake(self, timeout: float) -> None:
        """Read the greeting and leave negotiation mode."""
        self.sock.settimeout(timeout)
        greeting = self._read()
        ver = greeting.get("QMP", {}).get("version", {}).get("qemu", {})
        if ver:
            self.version = f"{ver['major']}.{ver['minor']}.{ver['micro']}"
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        """Read one JSON message (raises QemuError at end of stream)."""
        line = self.file.readline()
        if not line:
            raise QemuError("QEMU closed its monitor connection.")
        message: dict[str, Any] = json.loads(line)
        return message

    def command(self, name: str, **args: Any) -> Any:
        """Run a QMP command and return its result, skipping events."""
        with self.lock:
            self.sock.settimeout(QMP_COMMAND_TIMEOUT)
            request: dict[str, Any] = {"execute": name}
            if args:
                request["arguments"] = args
            self.sock.sendall(json.dumps(request).encode() + b"\n")
            while True:
                reply = self._read()
                if "return" in reply:
                    return reply["return"]
                if "error" in reply:
                    raise QemuError(
                        f"QEMU refused {name}: {reply['error'].get('desc')}"
                    )

    def close(self) -> None:
        """Close the monitor connection."""
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


@dataclass
class QemuProcess:
    """A running QEMU: the process, its monitor and its stderr watcher."""

    command: list[str]
    on_boot_timer: Callable[[], None] | None = None
    proc: subprocess.Popen[bytes] | None = None
    qmp: Qmp | None = None
    stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=STDERR_TAIL)
    )
    started_ns: int = 0
    _reader: threading.Thread | None = None

    def start(self, monitor: socket.socket, child_end: socket.socket) -> None:
        """Spawn QEMU (must run on the long-lived main thread).

        The parent-death signal follows the thread that forked, so
        spawning from a short-lived request thread would kill QEMU when
        that thread ends.
        """
        import shlex

        log.debug("QEMU command line: %s", shlex.join(self.command))
        self.started_ns = time.monotonic_ns()
        try:
            self.proc = subprocess.Popen(
                self.command,
                stdin=None,
                stdout=None,
                stderr=subprocess.PIPE,
                pass_fds=(child_end.fileno(),),
                # Only prctl and getppid run in the child before exec.
                preexec_fn=_child_setup(os.getpid()),  # noqa: PLW1509
            )
        except OSError as err:
            raise QemuError(f"Cannot run {self.command[0]}: {err}") from err
        finally:
            child_end.close()
        self._reader = threading.Thread(
            target=self._watch_stderr, name="qemu_stderr", daemon=True
        )
        self._reader.start()
        self.qmp = Qmp(monitor)
        try:
            self.qmp.handshake(QMP_GREETING_TIMEOUT)
        except (OSError, QemuError, ValueError) as err:
            self.kill()
            raise QemuError(self.failure_text(err)) from None

    def failure_text(self, err: BaseException | None = None) -> str:
        """Explain why QEMU stopped, using the tail of its stderr."""
        if self._reader is not None:
            self._reader.join(timeout=2)
        rc = self.proc.poll() if self.proc else None
        tail = " | ".join(self.stderr_tail) or "no output"
        what = f"QEMU exited with status {rc}" if rc is not None else (
            f"QEMU did not answer its monitor ({err})"
        )
        return f"{what}: {tail}"

    def _watch_stderr(self) -> None:
        """Relay QEMU's stderr to the log and spot the boot-timer write."""
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if BOOT_TIMER_LINE in line:
                if self.on_boot_timer is not None:
                    self.on_boot_timer()
                    self.on_boot_timer = None
                continue
            if line:
                self.stderr_tail.append(line)
                log.debug("QEMU: %s", line)

    def cpu_time_us(self) -> int:
        """Return QEMU's user plus system CPU time so far, in µs."""
        if self.proc is None:
            return 0
        try:
            with open(f"/proc/{self.proc.pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            return 0
        # utime and stime are fields 14 and 15 of stat(5), counted from
        # 1; after the ")" that ends the command name they sit at 11, 12.
        ticks = int(fields[11]) + int(fields[12])
        return ticks * 1_000_000 // os.sysconf("SC_CLK_TCK")

    def wait(self) -> int:
        """Wait for QEMU to exit and return its status."""
        assert self.proc is not None
        rc = self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=2)
        return rc

    def quit(self) -> None:
        """Ask QEMU to quit, then kill it if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            if self.qmp is not None:
                self.qmp.command("quit")
        except (OSError, QemuError, ValueError):
            pass
        try:
            self.proc.wait(timeout=QUIT_GRACE)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """Kill QEMU and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.qmp is not None:
            self.qmp.close()
