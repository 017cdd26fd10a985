"""A real HTTP server on 127.0.0.1 that serves a folder, for tests.

It binds an ephemeral port, runs in a thread, serves files from a folder
like ``python -m http.server``, lets a test add routes for anything else
(redirects, listings, broken answers), and records every request path.
A guard fixture makes sure no test talks to anything but loopback.
"""

from __future__ import annotations

import http.server
import ipaddress
import socket
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

# A route answers a request; it gets the handler and the parsed query.
Route = Callable[["_Handler", dict[str, list[str]]], None]

# Host names a test may resolve: only loopback ones.
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serve routes first, then files; note every path asked for."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: the test reads ``server.paths`` instead."""

    def _route(self) -> bool:
        """Answer from a route if one matches; return whether it did."""
        parts = urlsplit(self.path)
        with self.server.lock:
            self.server.paths.append(self.path)
            route = self.server.routes.get(parts.path)
        if route is None:
            return False
        route(self, parse_qs(parts.query))
        return True

    def do_GET(self) -> None:
        """Serve a route or a file."""
        if not self._route():
            super().do_GET()

    def do_HEAD(self) -> None:
        """Serve a route or a file's headers."""
        if not self._route():
            super().do_HEAD()

    def send_body(
        self, status: int, body: bytes, content_type: str = "text/plain"
    ) -> None:
        """Answer with a complete body."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def redirect(self, location: str, status: int = 302) -> None:
        """Answer with a redirect to *location*."""
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(http.server.ThreadingHTTPServer):
    """Threaded server carrying the routes and the request log."""

    daemon_threads = True
    routes: dict[str, Route]
    paths: list[str]
    lock: threading.Lock


class LoopbackServer:
    """An HTTP server on an ephemeral loopback port, serving *root*."""

    def __init__(self, root: Path) -> None:
        """Bind 127.0.0.1 on a free port; serve nothing until started."""
        self.root = root
        handler = partial(_Handler, directory=str(root))
        self._server = _Server(("127.0.0.1", 0), handler)
        self._server.routes = {}
        self._server.paths = []
        self._server.lock = threading.Lock()
        self._thread: threading.Thread | None = None
        host, port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{port}"

    @property
    def paths(self) -> list[str]:
        """Every request path (with query) received so far."""
        with self._server.lock:
            return list(self._server.paths)

    def route(self, path: str, answer: Route) -> None:
        """Answer requests for *path* (without query) with *answer*."""
        self._server.routes[path] = answer

    def start(self) -> LoopbackServer:
        """Start serving in a daemon thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="loopback-http",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port (later connections fail)."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()


@pytest.fixture
def loopback_server(tmp_path: Path) -> Iterator[LoopbackServer]:
    """A started server on a fresh folder ``tmp_path/www``."""
    root = tmp_path / "www"
    root.mkdir()
    server = LoopbackServer(root).start()
    try:
        yield server
    finally:
        server.stop()


def _is_loopback(host: str) -> bool:
    """Return whether *host* is a loopback address or name."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Refuse every name lookup and connection that is not loopback.

    Yields the list of hosts the test connected to, for assertions.
    """
    hosts: list[str] = []
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> None:
        """Connect only to loopback (Unix sockets pass)."""
        if isinstance(address, tuple):
            hosts.append(str(address[0]))
            if not _is_loopback(str(address[0])):
                raise AssertionError(f"test tried to reach {address}")
        real_connect(self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        """Resolve only loopback names."""
        if host is not None and not _is_loopback(str(host)):
            raise AssertionError(f"test tried to resolve {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield hosts
