"""Run firecracker-emulator as a real process and talk to its socket."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from procfs import children_of, wait_gone

# Seconds allowed for the socket to appear; generous, since a loaded CI
# machine may start Python slowly. Waiting is not what the tests check.
SOCKET_TIMEOUT = 30.0
# Seconds allowed for a TCG guest to reach its readiness line.
BOOT_TIMEOUT = 120.0
# Seconds a stopped emulator (and its QEMU) get to disappear.
EXIT_TIMEOUT = 20.0

REPO = Path(__file__).resolve().parent.parent


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over an AF_UNIX stream socket."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        """Connect to the Unix socket instead of TCP."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def call(
    sock_path: str | Path,
    method: str,
    path: str,
    body: Any = None,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    """Send one request; return the status and the decoded JSON body."""
    conn = UnixHTTPConnection(str(sock_path))
    try:
        data = raw if raw is not None else (
            None if body is None else json.dumps(body).encode()
        )
        headers = {"Content-Type": "application/json"} if data else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, json.loads(payload) if payload else None
    finally:
        conn.close()


class Emulator:
    """A firecracker-emulator process, its output and its socket."""

    def __init__(
        self,
        workdir: Path,
        *extra: str,
        prefix: tuple[str, ...] = (),
        api: bool = True,
    ) -> None:
        self.sock = workdir / "fc.sock"
        cmd = [*prefix, sys.executable, "-m", "firecracker_emulator"]
        if api:
            cmd += ["--api-sock", str(self.sock)]
        cmd += list(extra)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """Collect the emulator's output (log and serial console)."""
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def output(self) -> str:
        """Return everything printed so far."""
        with self._cond:
            return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = BOOT_TIMEOUT) -> str:
        """Wait for an output line containing *text*; return that line."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if text in line:
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                ended = self.proc.poll() is not None
                if left <= 0 or (ended and not self._reader.is_alive()):
                    raise AssertionError(
                        f"{text!r} never appeared; output:\n"
                        + "".join(self.lines)[-4000:]
                    )
                self._cond.wait(min(left, 0.5))

    def wait_api(self) -> None:
        """Wait for ``API server started.``."""
        self.wait_for("API server started.", SOCKET_TIMEOUT)

    def call(self, method: str, path: str, body: Any = None,
             raw: bytes | None = None) -> tuple[int, Any]:
        """Send a request to this emulator's socket."""
        return call(self.sock, method, path, body, raw)

    def type(self, text: str) -> None:
        """Type *text* on the guest's serial console."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def qemu_pids(self) -> list[int]:
        """Return the QEMU processes this emulator started."""
        return children_of(self.proc.pid)

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Wait for the emulator to exit by itself; return its status."""
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return rc

    def stop(self) -> None:
        """SIGTERM the emulator (then SIGKILL), and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@contextlib.contextmanager
def running(workdir: Path, *extra: str, **kwargs: Any) -> Iterator[Emulator]:
    """Start an emulator, wait for its API, and always stop it."""
    emu = Emulator(workdir, *extra, **kwargs)
    try:
        if kwargs.get("api", True):
            emu.wait_api()
        yield emu
    finally:
        qemus = emu.qemu_pids()
        emu.stop()
        wait_gone(qemus, EXIT_TIMEOUT)
        assert not emu.sock.exists(), "the emulator left its socket behind"

