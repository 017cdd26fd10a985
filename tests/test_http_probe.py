"""What a failed HTTP probe says: the root cause, not the library's wrappers.

The failures are real: requests to ports on 127.0.0.1 that these tests
open (or open and close again) themselves. Nothing else is contacted.
The end-to-end check through a namespace needs root and is marked net.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Iterator

import pytest
import requests

from helpers.net import (
    NETNS_PREFIX,
    HttpProbeError,
    NetPrivileges,
    Subnet,
    TaskNetwork,
    _cause_chain,
    cleanup_leftovers,
    failure_reason,
    http_get,
    main,
)

# The end-to-end test's own namespaces; its cleanup touches no others.
PREFIX = f"{NETNS_PREFIX}probe-"

# Seconds the timeout test waits for an answer that never comes.
SHORT_TIMEOUT = 0.3

# Words of urllib3's wrappers that a learner should not have to read.
WRAPPER_WORDS = ("HTTPConnectionPool", "Max retries", "NewConnectionError")


@pytest.fixture
def closed_port() -> int:
    """A loopback port that was just free: nothing listens on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def failed_get(url: str, timeout: float) -> requests.RequestException:
    """The exception ``requests.get(url)`` raises (it must fail)."""
    with pytest.raises(requests.RequestException) as caught:
        requests.get(url, timeout=timeout)
    return caught.value


def test_a_refused_connection_is_told_by_its_errno(closed_port: int) -> None:
    exc = failed_get(f"http://127.0.0.1:{closed_port}/", 2.0)
    assert any(word in str(exc) for word in WRAPPER_WORDS)
    chain = _cause_chain(exc)
    assert chain[0] is exc
    assert isinstance(chain[-1], ConnectionRefusedError)
    reason = failure_reason(exc, 2.0)
    refused = os.strerror(errno.ECONNREFUSED)
    assert reason == f"{refused} (errno {errno.ECONNREFUSED})"


def test_a_silent_server_is_told_as_the_timeout(silent_port: int) -> None:
    exc = failed_get(f"http://127.0.0.1:{silent_port}/", SHORT_TIMEOUT)
    assert failure_reason(exc, SHORT_TIMEOUT) == (
        f"timed out after {SHORT_TIMEOUT:g} s waiting for the answer")


def test_an_error_without_a_cause_keeps_its_own_words() -> None:
    exc = failed_get("no-scheme", 2.0)
    assert failure_reason(exc, 2.0) == str(exc)


def test_the_probe_child_reports_cause_and_detail(
        closed_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{closed_port}/"
    assert main(["get", url, "--timeout", "2"]) == 2
    answer = json.loads(capsys.readouterr().out)
    assert answer["error"].startswith(os.strerror(errno.ECONNREFUSED))
    assert not any(word in answer["error"] for word in WRAPPER_WORDS)
    assert "Max retries" in answer["detail"]


def test_the_error_names_request_namespace_and_cause() -> None:
    err = HttpProbeError("http://10.0.0.5/", "fclab-web-1",
                         "No route to host (errno 113)", "full detail")
    assert str(err).startswith(
        "GET http://10.0.0.5/ from namespace fclab-web-1 failed: "
        "No route to host (errno 113). ")
    assert (err.url, err.netns, err.reason, err.detail) == (
        "http://10.0.0.5/", "fclab-web-1", "No route to host (errno 113)",
        "full detail")


@pytest.mark.net
@pytest.mark.skipif(
    os.geteuid() != 0 or NetPrivileges.current().missing != [],
    reason="needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create a "
    "network namespace")
def test_a_probe_inside_a_namespace_says_connection_refused() -> None:
    cleanup_leftovers(PREFIX, force=True)
    # The namespace's own loopback, where nothing listens.
    with TaskNetwork("x", Subnet("10.0.0.0/28"), prefix=PREFIX) as net, \
            pytest.raises(HttpProbeError) as caught:
        http_get(net.netns, "http://127.0.0.1:9/", timeout=2)
    err = caught.value
    assert err.reason == (f"{os.strerror(errno.ECONNREFUSED)} "
                          f"(errno {errno.ECONNREFUSED})")
    assert f"from namespace {net.netns} failed: {err.reason}" in str(err)
    assert not any(word in str(err) for word in WRAPPER_WORDS)
    assert "Max retries" in err.detail
    assert cleanup_leftovers(PREFIX).namespaces == []
