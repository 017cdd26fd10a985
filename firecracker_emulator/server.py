"""A small HTTP/1.1 server on a Unix stream socket.

It reads requests with Content-Length bodies (Firecracker's API needs
nothing more), keeps connections alive, and hands each request to a
callback that returns a status and a JSON body. The standard library's
``http.server`` would do, but it pulls in heavy imports; this keeps the
time from spawn to a listening socket short.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from typing import Any

from .errors import StartupError
from .resources import os_error_text

log = logging.getLogger(__name__)

# Firecracker refuses bodies above 50 KiB outside MMDS; so does this.
MAX_BODY = 51200
# Request line and headers larger than this are not an API client.
MAX_HEAD = 8192
# Pending connections the kernel queues for accept().
BACKLOG = 64

_REASONS = {
    100: "Continue",
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    404: "Not Found",
    413: "Payload Too Large",
    500: "Internal Server Error",
}

Handler = Callable[[str, str, "bytes | None"], "tuple[int, Any]"]


class ApiServer:
    """Serves Firecracker's API on a Unix socket, one thread a client."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.sock: socket.socket | None = None
        self._closing = False
        self._inode: tuple[int, int] | None = None

    def bind(self) -> None:
        """Create the socket; fail like Firecracker if the path exists."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
        except OSError as err:
            sock.close()
            detail = os_error_text(err)
            raise StartupError(
                f"Failed to open the API socket at: {self.path}: {detail}. "
                "Check that it is not already used; remove a stale socket "
                "file left by an earlier run before starting again.",
                exit_code=1,
            ) from None
        sock.listen(BACKLOG)
        info = os.stat(self.path)
        self._inode = (info.st_dev, info.st_ino)
        self.sock = sock

    def start(self) -> None:
        """Accept connections on a background thread named ``fc_api``."""
        thread = threading.Thread(
            target=self._accept_loop, name="fc_api", daemon=True
        )
        thread.start()

    def close(self) -> None:
        """Stop accepting and remove the socket file we created."""
        self._closing = True
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
            self.sock = None
        self._remove_file()

    def _remove_file(self) -> None:
        """Unlink the socket path if it is still the socket we bound."""
        if self._inode is None:
            return
        try:
            info = os.stat(self.path)
            if stat.S_ISSOCK(info.st_mode) and (
                (info.st_dev, info.st_ino) == self._inode
            ):
                os.unlink(self.path)
        except OSError:
            pass
        self._inode = None

    def _accept_loop(self) -> None:
        """Accept clients until the socket closes."""
        assert self.sock is not None
        sock = self.sock
        while not self._closing:
            try:
                conn, _ = sock.accept()
            except OSError:
                break
            thread = threading.Thread(
                target=self._serve, args=(conn,), name="fc_api", daemon=True
            )
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        """Answer requests on one connection until the client leaves."""
        buf = b""
        try:
            while True:
                request, buf = _read_request(conn, buf)
                if request is None:
                    return
                method, uri, body, keep_alive, problem = request
                if problem is not None:
                    conn.sendall(_response(400, {"fault_message": problem}))
                    return
                status, payload = self.handler(method, uri, body)
                conn.sendall(_response(status, payload))
                if not keep_alive:
                    return
        except OSError:
            return
        finally:
            conn.close()


Request = tuple[str, str, "bytes | None", bool, "str | None"]


def _read_request(
    conn: socket.socket, buf: bytes
) -> tuple[Request | None, bytes]:
    """Read one request; return (None, b"") when the client closed."""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD:
            return ("", "", None, False, "Request headers too large."), b""
        chunk = conn.recv(65536)
        if not chunk:
            return None, b""
        buf += chunk
    head, buf = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return ("", "", None, False, "Invalid HTTP request line."), b""
    method, uri, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if uri.startswith("http://"):
        # An absolute URI names a host; only its path matters here.
        slash = uri.find("/", len("http://"))
        uri = uri[slash:] if slash >= 0 else "/"
    keep_alive = headers.get("connection", "").lower() != "close" and (
        version == "HTTP/1.1"
    )
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return (
            method, uri, None, False,
            (
                "Chunked transfer encoding is not supported; send a "
                "Content-Length."
            ),
        ), b""
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        return (method, uri, None, False, "Invalid Content-Length."), b""
    if length > MAX_BODY:
        return (
            method, uri, None, False,
            f"Request payload is larger than {MAX_BODY} bytes.",
        ), b""
    if length and headers.get("expect", "").lower() == "100-continue":
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    while len(buf) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None, b""
        buf += chunk
    body, buf = buf[:length], buf[length:]
    return (method, uri, body if length else None, keep_alive, None), buf


def _response(status: int, payload: Any) -> bytes:
    """Serialize an HTTP response the way Firecracker's server shapes it."""
    reason = _REASONS.get(status, "Unknown")
    head = [
        f"HTTP/1.1 {status} {reason}",
        "Server: Firecracker API",
        "Connection: keep-alive",
    ]
    data = b""
    if payload is not None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        head.append("Content-Type: application/json")
        head.append(f"Content-Length: {len(data)}")
    elif status != 204:
        head.append("Content-Length: 0")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data
