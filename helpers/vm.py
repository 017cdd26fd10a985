"""One microVM: its VMM process, API socket, console and disk copy.

``MicroVM`` starts the VMM (real Firecracker or the emulator), talks to
its API, reads its serial console, types into the guest's shell and
releases everything it made on any exit: the process and its children,
the socket, and the working directory with the copy of the root disk.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

from helpers.api import (
    DEFAULT_TIMEOUT_S,
    ApiCall,
    ApiError,
    ApiUnreachable,
    FirecrackerClient,
)
from helpers.backend import BackendChoice, choose_backend
from helpers.errors import LabError
from helpers.guest import DEFAULT_BOOT_ARGS, READY_MARKER, TASK_ARG

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations only

log = logging.getLogger(__name__)

# Name of the API socket inside the VM's working directory.
SOCKET_NAME = "firecracker.socket"

# Drive id of the root disk (ids take letters, digits and "_").
ROOT_DRIVE_ID = "rootfs"

# How often to look for the API socket while the VMM starts: Firecracker
# has it up in about 12 ms, so 10 ms polls waste little.
SOCKET_POLL_S = 0.01

# Longest a single wait on the console sleeps before checking whether the
# VMM is still alive (its children may keep the output pipe open).
ALIVE_CHECK_S = 0.2

# Seconds a VMM gets to exit after SIGTERM before it is killed.
TERM_GRACE_S = 3.0

# Seconds the guest gets to reboot after Ctrl-Alt-Del (a busybox guest
# stops in well under a second on KVM; under TCG a few seconds).
SHUTDOWN_GRACE_S = 20.0

# Console lines an error message quotes.
TAIL_LINES = 25

# Readiness line: "FCLAB-READY task=<name> ip=<address or none>".
READY_PATTERN = re.compile(
    re.escape(READY_MARKER) + r" task=(?P<task>\S+) ip=(?P<ip>\S+)")

# Terminal control sequences the guest's shell writes (such as its
# cursor-position query); they carry nothing a reader wants.
_CONTROL_SEQUENCE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")

# A Firecracker instance id: letters, digits and "-", at most 64 long.
_VM_ID = re.compile(r"[A-Za-z0-9-]{1,64}")


class LaunchError(LabError):
    """The VMM did not bring its API up; carries command, code, output."""

    def __init__(self, message: str, *, command: Sequence[str],
                 returncode: int | None, output: Sequence[str]) -> None:
        self.command = list(command)
        self.returncode = returncode
        self.output = list(output)
        code = "still running" if returncode is None else f"exit {returncode}"
        tail = "\n".join(f"  | {line}" for line in self.output) or "  | "
        super().__init__(
            f"{message}\ncommand: {shlex.join(self.command)} ({code})\n"
            f"last output:\n{tail}")


class ConsoleTimeout(LabError):
    """The console did not show what was awaited in time."""


class VmmExited(LabError):
    """The VMM exited while something was still awaited from it."""


class GuestCommandError(LabError):
    """A command typed into the guest's shell exited non-zero."""

    def __init__(self, command: str, status: int, output: str) -> None:
        self.command = command
        self.status = status
        self.output = output
        super().__init__(
            f"guest command {command!r} exited with status {status}:\n"
            f"{output}")


@dataclass(frozen=True)
class NetworkInterface:
    """A TAP device on the host, seen as a virtio-net NIC by the guest."""

    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None


@dataclass
class _Resources:
    """What a MicroVM holds; released once, even if the VM is forgotten."""

    workdir: Path
    socket_path: Path
    proc: subprocess.Popen[bytes] | None = None
    released: bool = field(default=False)

    def release(self) -> None:
        """Stop the process tree, remove the socket and the workdir."""
        if self.released:
            return
        self.released = True
        try:
            if self.proc is not None:
                stop_process_group(self.proc)
        finally:
            self.socket_path.unlink(missing_ok=True)
            shutil.rmtree(self.workdir, ignore_errors=True)


def stop_process_group(proc: subprocess.Popen[bytes],
                       grace: float = TERM_GRACE_S) -> int:
    """SIGTERM *proc*, SIGKILL its group after *grace*; return its code.

    The VMM runs as a session leader, so its group holds exactly the
    processes it started (the emulator's QEMU) and nothing else.
    """
    try:
        if proc.poll() is None:
            log.debug("terminating VMM pid %d", proc.pid)
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.debug("VMM pid %d ignored SIGTERM", proc.pid)
    finally:
        # Children left behind (or a leader that ignored SIGTERM) go now.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    return proc.returncode


def _copy_disk(source: Path, target: Path) -> None:
    """Copy a disk image, sharing blocks or keeping holes where possible."""
    try:
        subprocess.run(
            ["cp", "--reflink=auto", "--sparse=always", str(source),
             str(target)],
            check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        log.debug("cp failed (%s); copying with Python", exc)
        shutil.copyfile(source, target)


def _descendants(pid: int) -> list[int]:
    """Return *pid* and every process below it."""
    found = [pid]
    for current in found:
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                found += [int(c) for c in (task / "children").read_text()
                          .split()]
            except (OSError, ValueError):
                continue
    return found


def _rss_kib(pid: int) -> int:
    """Resident set size of one process in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class MicroVM:
    """A microVM and its VMM process, as a context manager.

    ``boot()`` runs the three steps a platform agent runs: start the VMM
    (``spawn``), configure it over the API (``configure``), and send
    InstanceStart (``start``). Leaving the ``with`` block, or ``close()``,
    releases the process tree, the socket and the working directory.
    """

    def __init__(
        self,
        kernel: str | os.PathLike[str],
        rootfs: str | os.PathLike[str],
        *,
        initrd: str | os.PathLike[str] | None = None,
        vcpus: int = 1,
        mem_mib: int = 128,
        boot_args: str = DEFAULT_BOOT_ARGS,
        extra_boot_args: str = "",
        task: str | None = None,
        backend: str | BackendChoice = "auto",
        workdir: str | os.PathLike[str] | None = None,
        rootfs_read_only: bool = False,
        copy_rootfs: bool = True,
        interfaces: Sequence[NetworkInterface] = (),
        netns: str | None = None,
        boot_timer: bool = True,
        vm_id: str | None = None,
        api_timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.vm_id = vm_id or f"fclab-{uuid.uuid4().hex[:8]}"
        if not _VM_ID.fullmatch(self.vm_id):
            raise LabError(
                f"vm_id {self.vm_id!r}: use 1 to 64 letters, digits or '-'")
        if task is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", task):
            raise LabError(
                f"task {task!r}: use letters, digits, '.', '_' or '-'")
        self.kernel = Path(kernel)
        self.source_rootfs = Path(rootfs)
        self.initrd = Path(initrd) if initrd is not None else None
        for path in (self.kernel, self.source_rootfs, self.initrd):
            if path is not None and not path.is_file():
                raise LabError(
                    f"{path} does not exist: build the guest first "
                    "(helpers.images.build_guest())")
        self.vcpus = vcpus
        self.mem_mib = mem_mib
        self.task = task
        self.boot_args = " ".join(
            part for part in (
                boot_args, extra_boot_args,
                f"{TASK_ARG}={task}" if task else "")
            if part)
        self.backend = (backend if isinstance(backend, BackendChoice)
                        else choose_backend(backend, kernel=self.kernel))
        self.rootfs_read_only = rootfs_read_only
        self.copy_rootfs = copy_rootfs and not rootfs_read_only
        self.interfaces = tuple(interfaces)
        self.netns = netns
        self.boot_timer = boot_timer

        # Everything made from here on is released by close().
        parent = Path(workdir) if workdir is not None else None
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(
            prefix=f"{self.vm_id}-", dir=parent))
        self.socket_path = self.workdir / SOCKET_NAME
        self.rootfs_path = (self.workdir / "rootfs.ext4" if self.copy_rootfs
                            else self.source_rootfs)
        self._res = _Resources(self.workdir, self.socket_path)
        self._finalizer = weakref.finalize(self, self._res.release)
        try:
            self.api = FirecrackerClient(str(self.socket_path), api_timeout)
        except LabError:
            self._finalizer()
            raise

        self.lines: list[tuple[float, str]] = []
        self.events: dict[str, float] = {}
        self.ready_info: dict[str, str | None] | None = None
        self.command: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader: threading.Thread | None = None
        self._stdin_lock = threading.Lock()

    # -- properties ----------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """Process id of the VMM, once spawned."""
        return self._res.proc.pid if self._res.proc is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit code of the VMM, or None while it runs (or before spawn)."""
        proc = self._res.proc
        if proc is None or proc.poll() is None:
            return None
        self.events.setdefault("exit", time.monotonic())
        return proc.returncode

    @property
    def running(self) -> bool:
        """Whether the VMM process is alive."""
        return self._res.proc is not None and self._res.proc.poll() is None

    def __repr__(self) -> str:
        """Short description: id, backend, pid and state."""
        state = ("running" if self.running else
                 "not spawned" if self._res.proc is None else
                 f"exited {self.returncode}")
        return (f"<MicroVM {self.vm_id} backend={self.backend.name} "
                f"pid={self.pid} {state}>")

    # -- lifecycle -----------------------------------------------------------

    def spawn(self) -> None:
        """Start the VMM and wait until its API answers ``GET /``.

        On any failure, including an interrupt, everything made so far is
        released before the error propagates.
        """
        if self._res.proc is not None or self._res.released:
            raise LabError("this MicroVM was already spawned; make a new one")
        try:
            self._launch()
            self._wait_for_api()
        except BaseException:
            self.close()
            raise
        self.events["api_ready"] = time.monotonic()

    def _launch(self) -> None:
        """Copy the disk, start the VMM process and its output reader."""
        self._prepare_socket_path()
        if self.copy_rootfs:
            _copy_disk(self.source_rootfs, self.rootfs_path)

        argv = [*self.backend.argv, "--api-sock", str(self.socket_path),
                "--id", self.vm_id]
        if self.boot_timer:
            argv.append("--boot-timer")
        if self.netns is not None:
            # What the jailer's --netns does: enter the namespace, then exec.
            argv = ["ip", "netns", "exec", self.netns, *argv]
        self.command = argv
        log.debug("starting %s", " ".join(argv))

        self.events["spawn"] = time.monotonic()
        try:
            # A session of its own: the VMM and its children form one
            # process group that close() can stop as a whole.
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, cwd=self.workdir,
                env={**os.environ, **dict(self.backend.env)},
                start_new_session=True)
        except OSError as exc:
            raise LaunchError(
                f"cannot start the VMM: {exc.strerror}", command=argv,
                returncode=None, output=[]) from exc
        self._res.proc = proc
        assert proc.stdout is not None
        self._reader = threading.Thread(
            target=self._read_output, args=(proc.stdout,),
            name=f"{self.vm_id}-output", daemon=True)
        self._reader.start()

    def _prepare_socket_path(self) -> None:
        """Remove a stale socket; refuse to delete anything else."""
        try:
            mode = self.socket_path.lstat().st_mode
        except FileNotFoundError:
            return
        if stat.S_ISSOCK(mode):
            log.debug("removing stale socket %s", self.socket_path)
            self.socket_path.unlink()
            return
        raise LaunchError(
            f"{self.socket_path} exists and is not a socket; move it away "
            "(the VMM needs that path for its API)",
            command=[*self.backend.argv, "--api-sock", str(self.socket_path)],
            returncode=None, output=[])

    def _wait_for_api(self) -> None:
        """Poll the socket until GET / answers, the VMM dies or time's up."""
        deadline = time.monotonic() + self.api.timeout
        last_error = "the socket never appeared"
        while True:
            code = self.returncode
            if code is not None:
                self._join_reader()
                raise LaunchError(
                    "the VMM exited before its API socket answered",
                    command=self.command, returncode=code,
                    output=self.tail())
            if self.socket_path.exists():
                try:
                    self.api.request("GET", "/", timeout=1.0)
                    return
                except (ApiError, ApiUnreachable) as exc:
                    last_error = str(exc)
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"the API socket did not answer within "
                    f"{self.api.timeout:g} s ({last_error})",
                    command=self.command, returncode=self.returncode,
                    output=self.tail())
            time.sleep(SOCKET_POLL_S)

    def configure(self) -> list[ApiCall]:
        """Send machine config, boot source, root drive and interfaces."""
        calls = [
            self.api.put_machine_config(self.vcpus, self.mem_mib),
            self.api.put_boot_source(
                str(self.kernel), boot_args=self.boot_args,
                initrd_path=str(self.initrd) if self.initrd else None),
            self.api.put_drive(
                ROOT_DRIVE_ID, str(self.rootfs_path), is_root_device=True,
                is_read_only=self.rootfs_read_only),
        ]
        for nic in self.interfaces:
            calls.append(self.api.put_network_interface(
                nic.iface_id, nic.host_dev_name, guest_mac=nic.guest_mac))
        self.events["configured"] = time.monotonic()
        return calls

    def start(self) -> ApiCall:
        """Send InstanceStart, noting the send time as ``instance_start``."""
        self.events["instance_start"] = time.monotonic()
        return self.api.instance_start()

    def boot(self) -> Self:
        """Spawn, configure and start: the whole launch in one call."""
        self.spawn()
        self.configure()
        self.start()
        return self

    # -- the console ---------------------------------------------------------

    def _read_output(self, stream: IO[bytes]) -> None:
        """Collect the VMM's output lines until the pipe closes."""
        try:
            for raw in iter(stream.readline, b""):
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                text = _CONTROL_SEQUENCE.sub("", text)
                with self._cond:
                    self.lines.append((time.monotonic(), text))
                    self._cond.notify_all()
                log.debug("%s| %s", self.vm_id, text)
        except (OSError, ValueError):
            pass  # the pipe was closed under us: the VM is being released
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _join_reader(self, timeout: float = 2.0) -> None:
        """Let the reader thread drain what the VMM wrote last."""
        if self._reader is not None:
            self._reader.join(timeout)

    def tail(self, count: int = TAIL_LINES) -> list[str]:
        """The last *count* lines of the VMM's output."""
        with self._cond:
            return [text for _, text in self.lines[-count:]]

    def console(self, since: int = 0) -> str:
        """The VMM's output from line *since* on, as one string."""
        with self._cond:
            return "\n".join(text for _, text in self.lines[since:])

    def _wait_line(self, pattern: str | re.Pattern[str], timeout: float,
                   since: int) -> tuple[int, re.Match[str]]:
        """Return the index and match of the first line from *since* on."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        index = since
        drained = False
        while True:
            with self._cond:
                while index < len(self.lines):
                    match = regex.search(self.lines[index][1])
                    if match:
                        return index, match
                    index += 1
                if not drained and not self._eof and self.running:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ConsoleTimeout(
                            f"no console line matched {regex.pattern!r} "
                            f"within {timeout:g} s{self._slow_hint()}; "
                            "last output:\n"
                            + "\n".join(self._tail_locked()))
                    self._cond.wait(min(remaining, ALIVE_CHECK_S))
                    continue
            if drained:
                raise VmmExited(
                    f"the VMM exited (code {self.returncode}) before the "
                    f"console showed {regex.pattern!r}; last output:\n"
                    + "\n".join(self.tail()))
            # The VMM is gone: read what it wrote last, then look once more.
            self._join_reader()
            drained = True

    def _tail_locked(self, count: int = TAIL_LINES) -> list[str]:
        """Like ``tail`` for callers already holding the console lock."""
        return [text for _, text in self.lines[-count:]]

    def _slow_hint(self) -> str:
        """Advice for a timeout, depending on the backend."""
        if self.backend.name == "firecracker":
            return (" (if this host's KVM cannot run guests, as with some "
                    "nested setups, set FCLAB_BACKEND=emulator)")
        return (" (the emulator may be running QEMU without KVM; give it "
                "a longer timeout)")

    def wait_for(self, pattern: str | re.Pattern[str],
                 timeout: float = 60.0, *, since: int = 0) -> re.Match[str]:
        """Wait for a console line matching *pattern*, past or future."""
        return self._wait_line(pattern, timeout, since)[1]

    def wait_ready(self, timeout: float = 120.0) -> dict[str, str | None]:
        """Wait for the guest's readiness line; return its task and ip."""
        index, match = self._wait_line(READY_PATTERN, timeout, 0)
        self.events["ready"] = self.lines[index][0]
        ip = match["ip"]
        self.ready_info = {"task": match["task"],
                           "ip": None if ip == "none" else ip}
        return self.ready_info

    def send(self, text: str) -> None:
        """Type *text* into the guest's serial console."""
        proc = self._res.proc
        if proc is None or proc.stdin is None or not self.running:
            raise VmmExited("the VMM is not running; nothing reads input")
        with self._stdin_lock:
            try:
                proc.stdin.write(text.encode())
                proc.stdin.flush()
            except (BrokenPipeError, ValueError) as exc:
                raise VmmExited(
                    "the VMM stopped reading its console input") from exc

    def run(self, command: str, timeout: float = 30.0, *,
            check: bool = True) -> str:
        """Run *command* in the guest's shell and return its output.

        The command is framed by two echo markers; the quotes inside them
        make the shell's echo of the typed line differ from its output.
        """
        token = uuid.uuid4().hex[:10]
        begin, end = f"FCLAB-BEGIN-{token}", f"FCLAB-END-{token}"
        since = len(self.lines)
        self.send(f"echo FCLAB-BEGIN-''{token}; {command}; "
                  f"echo FCLAB-END-''{token} $?\n")
        first, _ = self._wait_line(
            re.compile(re.escape(begin) + "$"), timeout, since)
        # Output without a final newline ends up in front of the end marker.
        last, match = self._wait_line(
            re.compile("(.*)" + re.escape(end) + r" (\d+)$"), timeout,
            first + 1)
        with self._cond:
            shown = [t for _, t in self.lines[first + 1:last]]
        if match[1]:
            shown.append(match[1])
        output = "\n".join(shown)
        status = int(match[2])
        log.debug("guest command %r exited %d", command, status)
        if check and status != 0:
            raise GuestCommandError(command, status, output)
        return output

    # -- measurements --------------------------------------------------------

    def rss_kib(self) -> int:
        """Resident memory of the VMM and its children, in KiB."""
        if not self.running or self.pid is None:
            return 0
        return sum(_rss_kib(pid) for pid in _descendants(self.pid))

    # -- stopping ------------------------------------------------------------

    def shutdown(self, grace: float = SHUTDOWN_GRACE_S) -> int | None:
        """Ctrl-Alt-Del, wait up to *grace* s, then stop the VMM by force.

        Returns the VMM's exit code (None if it was never spawned). The
        socket file goes too: a stale one would block the next start.
        """
        proc = self._res.proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                self.api.send_ctrl_alt_del()
            except (ApiError, ApiUnreachable) as exc:
                log.debug("SendCtrlAltDel failed: %s", exc)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %g s; terminating",
                            self.vm_id, grace)
        stop_process_group(proc)
        self.events.setdefault("exit", time.monotonic())
        self._join_reader()
        self.socket_path.unlink(missing_ok=True)
        return proc.returncode

    def close(self) -> None:
        """Release the process tree, the socket and the working directory."""
        try:
            self._finalizer()
        finally:
            if self._res.proc is not None:
                self.events.setdefault("exit", time.monotonic())
            self.api.close()
            self._join_reader()

    def __enter__(self) -> Self:
        """Nothing to do: resources are made by ``spawn``."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Release everything, whatever ended the block."""
        self.close()
