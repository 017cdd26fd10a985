"""The API client against a real HTTP server on a Unix socket."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from unix_http_server import UnixHttpServer

from helpers.api import ApiError, ApiUnreachable, FirecrackerClient
from helpers.errors import LabError

Call = Callable[[FirecrackerClient], object]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose path leaves room under the socket path limit."""
    with tempfile.TemporaryDirectory(prefix="fclab-api-") as name:
        yield Path(name)


@pytest.fixture
def server(short_dir: Path) -> Iterator[UnixHttpServer]:
    """A recording server on a fresh socket."""
    with UnixHttpServer(short_dir / "api.sock") as srv:
        yield srv


@pytest.fixture
def client(server: UnixHttpServer) -> Iterator[FirecrackerClient]:
    """A client talking to the recording server."""
    api = FirecrackerClient(str(server.socket_path), timeout=5)
    yield api
    api.close()


# Each entry: a call, and the method, path and body the server must see.
REQUESTS: dict[str, tuple[Call, str, str, Any]] = {
    "machine_config_minimal": (
        lambda api: api.put_machine_config(2, 256),
        "PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256},
    ),
    "machine_config_full": (
        lambda api: api.put_machine_config(
            2, 256, smt=True, track_dirty_pages=False, huge_pages="2M"),
        "PUT", "/machine-config",
        {"vcpu_count": 2, "mem_size_mib": 256, "smt": True,
         "track_dirty_pages": False, "huge_pages": "2M"},
    ),
    "patch_machine_config": (
        lambda api: api.patch_machine_config(mem_size_mib=512),
        "PATCH", "/machine-config", {"mem_size_mib": 512},
    ),
    "boot_source_minimal": (
        lambda api: api.put_boot_source("/k/vmlinux"),
        "PUT", "/boot-source", {"kernel_image_path": "/k/vmlinux"},
    ),
    "boot_source_full": (
        lambda api: api.put_boot_source(
            "/k/vmlinux", boot_args="console=ttyS0", initrd_path="/k/rd"),
        "PUT", "/boot-source",
        {"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0",
         "initrd_path": "/k/rd"},
    ),
    "boot_source_awkward": (
        lambda api: api.put_boot_source(
            "/k/my vmlinux", boot_args="console=ttyS0 fclab.task=it's"),
        "PUT", "/boot-source",
        {"kernel_image_path": "/k/my vmlinux",
         "boot_args": "console=ttyS0 fclab.task=it's"},
    ),
    "drive_minimal": (
        lambda api: api.put_drive("rootfs", "/r.ext4", is_root_device=True),
        "PUT", "/drives/rootfs",
        {"drive_id": "rootfs", "path_on_host": "/r.ext4",
         "is_root_device": True},
    ),
    "drive_full": (
        lambda api: api.put_drive(
            "data", "/d.ext4", is_root_device=False, is_read_only=True,
            cache_type="Writeback", io_engine="Async"),
        "PUT", "/drives/data",
        {"drive_id": "data", "path_on_host": "/d.ext4",
         "is_root_device": False, "is_read_only": True,
         "cache_type": "Writeback", "io_engine": "Async"},
    ),
    "patch_drive": (
        lambda api: api.patch_drive("data", "/e.ext4"),
        "PATCH", "/drives/data",
        {"drive_id": "data", "path_on_host": "/e.ext4"},
    ),
    "network_interface_minimal": (
        lambda api: api.put_network_interface("eth0", "tap0"),
        "PUT", "/network-interfaces/eth0",
        {"iface_id": "eth0", "host_dev_name": "tap0"},
    ),
    "network_interface_full": (
        lambda api: api.put_network_interface(
            "eth0", "tap0", guest_mac="06:00:0a:00:00:02", mtu=1500),
        "PUT", "/network-interfaces/eth0",
        {"iface_id": "eth0", "host_dev_name": "tap0",
         "guest_mac": "06:00:0a:00:00:02", "mtu": 1500},
    ),
    "logger_empty": (
        lambda api: api.put_logger(),
        "PUT", "/logger", {},
    ),
    "logger_full": (
        lambda api: api.put_logger(
            log_path="/l.log", level="Debug", show_level=True,
            show_log_origin=False, module="api_server"),
        "PUT", "/logger",
        {"log_path": "/l.log", "level": "Debug", "show_level": True,
         "show_log_origin": False, "module": "api_server"},
    ),
    "metrics": (
        lambda api: api.put_metrics("/m.json"),
        "PUT", "/metrics", {"metrics_path": "/m.json"},
    ),
    "instance_start": (
        lambda api: api.instance_start(),
        "PUT", "/actions", {"action_type": "InstanceStart"},
    ),
    "ctrl_alt_del": (
        lambda api: api.send_ctrl_alt_del(),
        "PUT", "/actions", {"action_type": "SendCtrlAltDel"},
    ),
    "flush_metrics": (
        lambda api: api.flush_metrics(),
        "PUT", "/actions", {"action_type": "FlushMetrics"},
    ),
    "pause": (
        lambda api: api.pause(), "PATCH", "/vm", {"state": "Paused"},
    ),
    "resume": (
        lambda api: api.resume(), "PATCH", "/vm", {"state": "Resumed"},
    ),
    "describe_instance": (
        lambda api: api.describe_instance(), "GET", "/", None,
    ),
    "version": (lambda api: api.version(), "GET", "/version", None),
    "vm_config": (lambda api: api.vm_config(), "GET", "/vm/config", None),
    "get_machine_config": (
        lambda api: api.get_machine_config(), "GET", "/machine-config", None,
    ),
}


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_each_method_sends_its_request(
    name: str, server: UnixHttpServer, client: FirecrackerClient
) -> None:
    """Method, path and exact JSON body arrive as documented."""
    call, method, path, body = REQUESTS[name]
    call(client)

    [got] = server.received
    assert (got.method, got.path) == (method, path)
    if body is None:
        assert got.body == b""
        assert "Content-Type" not in got.headers
    else:
        assert got.json() == body
        assert got.headers["Content-Type"] == "application/json"


def test_get_returns_the_json_object(
    server: UnixHttpServer, client: FirecrackerClient
) -> None:
    """A GET hands back the decoded JSON body."""
    info = {"id": "vm1", "state": "Running", "vmm_version": "1.16.1",
            "app_name": "Firecracker"}
    server.answer("GET", "/", 200, info)

    assert client.describe_instance() == info


def test_error_carries_fault_message_and_advice(
    server: UnixHttpServer, client: FirecrackerClient
) -> None:
    """A 400 becomes an ApiError with method, path, status and fault."""
    fault = ("An error occurred when deserializing the json body of a "
             "request: unknown field `ht_enabled`, expected one of ...")
    server.answer("PUT", "/machine-config", 400, {"fault_message": fault})

    with pytest.raises(ApiError) as caught:
        client.request("PUT", "/machine-config",
                       {"vcpu_count": 1, "mem_size_mib": 128,
                        "ht_enabled": False})

    err = caught.value
    assert isinstance(err, LabError)
    assert (err.method, err.path, err.status) == (
        "PUT", "/machine-config", 400)
    assert err.fault_message == fault
    assert "400 Bad Request" in str(err)
    assert "renamed smt" in str(err)


def test_error_without_json_body_is_still_readable(
    server: UnixHttpServer, client: FirecrackerClient
) -> None:
    """A non-JSON error answer still yields a message."""
    server.answer("GET", "/version", 500, "boom")

    with pytest.raises(ApiError) as caught:
        client.version()

    assert caught.value.status == 500
    assert "boom" in str(caught.value)


def test_missing_socket_says_the_vmm_is_not_answering(
    short_dir: Path,
) -> None:
    """No server behind the path gives ApiUnreachable, not a raw error."""
    client = FirecrackerClient(str(short_dir / "nobody.sock"), timeout=1)

    with pytest.raises(ApiUnreachable, match="Is the VMM running"):
        client.describe_instance()


def test_overlong_socket_path_is_refused() -> None:
    """Paths over Linux's sockaddr_un limit fail early and say why."""
    with pytest.raises(LabError, match="shorter"):
        FirecrackerClient("/tmp/" + "x" * 120)


def test_history_records_every_call_including_failures(
    server: UnixHttpServer, client: FirecrackerClient
) -> None:
    """history keeps method, path, body, status, latency and response."""
    server.answer("PUT", "/boot-source", 400, {"fault_message": "nope"})
    client.put_machine_config(1, 128)
    with pytest.raises(ApiError):
        client.put_boot_source("/missing")

    first, second = client.history
    assert (first.method, first.path, first.status) == (
        "PUT", "/machine-config", 204)
    assert first.body == {"vcpu_count": 1, "mem_size_mib": 128}
    assert first.latency_s is not None and first.latency_s >= 0
    assert first.ok and not second.ok
    assert second.response == {"fault_message": "nope"}


def test_curl_rendering_is_exact(client: FirecrackerClient) -> None:
    """The curl twin has the documented shape."""
    call = client.put_machine_config(1, 128)
    sock = client.socket_path

    assert call.curl() == (
        f"curl --unix-socket {sock} -i -X PUT "
        "'http://localhost/machine-config' "
        "-H 'Content-Type: application/json' "
        "-d '{\"vcpu_count\": 1, \"mem_size_mib\": 128}'"
    )
    assert client.describe_instance() is not None
    assert client.history[-1].curl() == (
        f"curl --unix-socket {sock} -i -X GET 'http://localhost/'")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not found")
@pytest.mark.parametrize(
    "name", ["drive_full", "boot_source_awkward", "version"])
def test_rendered_curl_sends_the_same_request(
    name: str, server: UnixHttpServer, client: FirecrackerClient
) -> None:
    """Running the rendered curl command reproduces the request."""
    call_fn = REQUESTS[name][0]
    call_fn(client)
    rendered = client.history[-1].curl()

    result = subprocess.run(
        ["bash", "-c", rendered], capture_output=True, text=True,
        timeout=30, check=True)

    ours, theirs = server.received
    assert (theirs.method, theirs.path) == (ours.method, ours.path)
    assert theirs.body == ours.body
    assert theirs.headers.get("Content-Type") == ours.headers.get(
        "Content-Type")
    assert result.stdout.startswith("HTTP/1.")


def test_markdown_shows_request_curl_and_answer(
    client: FirecrackerClient,
) -> None:
    """The notebook rendering contains all three parts."""
    call = client.put_boot_source("/k/vmlinux", boot_args="console=ttyS0")

    text = call._repr_markdown_()

    assert "PUT /boot-source HTTP/1.1" in text
    assert call.curl() in text
    assert "204 No Content" in text
    assert '"boot_args": "console=ttyS0"' in text
