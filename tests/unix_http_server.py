"""A real HTTP/1.1 server on a Unix socket that records what it receives.

Tests start it in a thread, script the answers it gives, and read back
each request (method, path, headers, body) exactly as it arrived.
"""

from __future__ import annotations

import http.server
import json
import socketserver
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations only


@dataclass
class Received:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """Decode the body as JSON."""
        return json.loads(self.body)


@dataclass
class Scripted:
    """The answer to give to the next request that matches."""

    status: int
    body: Any = None


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Threaded Unix stream server carrying the script and the log."""

    daemon_threads = True
    received: list[Received]
    script: dict[tuple[str, str], list[Scripted]]
    lock: threading.Lock


class _Handler(http.server.BaseHTTPRequestHandler):
    """Record the request, answer from the script (default 204)."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def address_string(self) -> str:
        """Unix sockets have no peer address to print."""
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""

    def _handle(self) -> None:
        """Record one request and send the scripted answer."""
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.server.lock:
            self.server.received.append(Received(
                self.command, self.path, dict(self.headers.items()), body))
            queue = self.server.script.get((self.command, self.path), [])
            answer = queue.pop(0) if queue else Scripted(
                200 if self.command == "GET" else 204,
                {"id": "test", "state": "Not started"}
                if self.command == "GET" else None)
        payload = b"" if answer.body is None else json.dumps(
            answer.body).encode()
        self.send_response(answer.status)
        if payload:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = do_PATCH = do_POST = do_DELETE = _handle


class UnixHttpServer:
    """Context manager running the recording server on *socket_path*."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self._server = _Server(str(socket_path), _Handler)
        self._server.received = []
        self._server.script = {}
        self._server.lock = threading.Lock()
        # A short poll interval lets the server stop quickly.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def received(self) -> list[Received]:
        """Requests received so far, oldest first."""
        with self._server.lock:
            return list(self._server.received)

    def answer(self, method: str, path: str, status: int,
               body: Any = None) -> None:
        """Queue an answer for the next *method* request on *path*."""
        with self._server.lock:
            self._server.script.setdefault((method, path), []).append(
                Scripted(status, body))

    def __enter__(self) -> Self:
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop serving and remove the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self.socket_path.unlink(missing_ok=True)
