"""firecracker-emulator's API: Firecracker's answers, over a real socket.

Every test runs the emulator as its own process on a socket under
tmp_path and talks HTTP to it; no guest boots here.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from emulator_fixtures import REPO, Emulator, UnixHTTPConnection, running

from firecracker_emulator.api import ROUTES

DESERIALIZE = (
    "An error occurred when deserializing the json body of a request: "
)
BEFORE = (
    "The requested operation is not supported before starting the microVM."
)


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """One emulator for the tests that do not change its configuration."""
    with running(tmp_path_factory.mktemp("emu"), "--id", "api-test") as e:
        yield e


@pytest.fixture()
def fresh(tmp_path: Path) -> Iterator[Emulator]:
    """An emulator of the test's own, for tests that configure it."""
    with running(tmp_path) as e:
        yield e


def fault(reply: tuple[int, object]) -> str:
    """Assert a 400 with a fault_message and return the message."""
    status, body = reply
    assert status == 400, reply
    assert isinstance(body, dict) and set(body) == {"fault_message"}, body
    return str(body["fault_message"])


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the emulator to completion with *args*."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "firecracker_emulator", *args],
        check=False, capture_output=True, text=True, env=env, timeout=60,
        stdin=subprocess.DEVNULL,
    )


# ------------------------------------------------------------ GET shapes


def test_instance_info(emu: Emulator) -> None:
    """GET / has Firecracker's keys and the emulator's own marker."""
    status, body = emu.call("GET", "/")
    assert status == 200
    assert body["id"] == "api-test"
    assert body["state"] == "Not started"
    assert body["vmm_version"] == "1.16.1"
    assert body["app_name"] == "Firecracker"
    assert body["emulator"].startswith("firecracker-emulator ")


def test_version(emu: Emulator) -> None:
    """GET /version names the Firecracker release followed."""
    assert emu.call("GET", "/version") == (
        200, {"firecracker_version": "1.16.1"})


def test_default_machine_config(emu: Emulator) -> None:
    """Before any PUT, Firecracker reports 1 vCPU and 128 MiB."""
    assert emu.call("GET", "/machine-config") == (200, {
        "vcpu_count": 1, "mem_size_mib": 128, "smt": False,
        "track_dirty_pages": False, "huge_pages": "None"})


def test_log_line_shape(emu: Emulator) -> None:
    """Log lines read like Firecracker's, level hidden by default."""
    line = emu.wait_for("Running Firecracker v1.16.1", 5)
    assert re.match(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9} \[api-test:main\] "
        r"Running Firecracker v1\.16\.1", line), line
    assert emu.wait_for("API server started.", 5)


def test_keep_alive(emu: Emulator) -> None:
    """Several requests travel over one connection."""
    conn = UnixHTTPConnection(str(emu.sock))
    try:
        for _ in range(3):
            conn.request("GET", "/version")
            resp = conn.getresponse()
            assert resp.status == 200
            assert json.loads(resp.read())["firecracker_version"]
    finally:
        conn.close()


# ------------------------------------------------------- bad bodies


def test_ht_enabled_is_an_unknown_field(emu: Emulator) -> None:
    """The pre-1.0 field name fails the way serde reports it."""
    msg = fault(emu.call("PUT", "/machine-config", {
        "vcpu_count": 2, "mem_size_mib": 256, "ht_enabled": False}))
    assert msg.startswith(DESERIALIZE + "unknown field `ht_enabled`, ")
    assert "expected one of `vcpu_count`, `mem_size_mib`, `smt`" in msg


@pytest.mark.parametrize(("body", "expected"), [
    ({"mem_size_mib": 128}, "missing field `vcpu_count`"),
    ({"vcpu_count": 1}, "missing field `mem_size_mib`"),
    ({"vcpu_count": "2", "mem_size_mib": 128},
     'invalid type: string "2", expected u8'),
    ({"vcpu_count": 300, "mem_size_mib": 128},
     "invalid value: integer `300`, expected u8"),
    ({"vcpu_count": 1, "mem_size_mib": -1},
     "invalid value: integer `-1`, expected usize"),
    ({"vcpu_count": 1, "mem_size_mib": 128, "smt": "yes"},
     'invalid type: string "yes", expected a boolean'),
    ({"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "4M"},
     "unknown variant `4M`, expected `None` or `2M`"),
])
def test_machine_config_body_errors(
    emu: Emulator, body: dict[str, object], expected: str
) -> None:
    """Missing fields, wrong types and values fail like serde."""
    msg = fault(emu.call("PUT", "/machine-config", body))
    assert msg.startswith(DESERIALIZE + expected), msg


def test_syntax_error(emu: Emulator) -> None:
    """A body that is not JSON fails at deserialization."""
    msg = fault(emu.call("PUT", "/machine-config", raw=b"{nope"))
    assert msg.startswith(DESERIALIZE + "key must be a string"), msg


@pytest.mark.parametrize("body", [
    {"vcpu_count": 0, "mem_size_mib": 128},
    {"vcpu_count": 33, "mem_size_mib": 128},
    {"vcpu_count": 3, "mem_size_mib": 128, "smt": True},
])
def test_vcpu_count_range(emu: Emulator, body: dict[str, object]) -> None:
    """vCPUs must lie in 1..32, and be 1 or even with SMT."""
    assert fault(emu.call("PUT", "/machine-config", body)).startswith(
        "Machine config error: The number of vCPUs must be greater than 0")


def test_memory_size(emu: Emulator) -> None:
    """Zero MiB, or an odd size with 2M huge pages, is refused."""
    for body in ({"vcpu_count": 1, "mem_size_mib": 0},
                 {"vcpu_count": 1, "mem_size_mib": 129, "huge_pages": "2M"}):
        assert "memory size" in fault(emu.call("PUT", "/machine-config",
                                               body))


def test_empty_bodies(emu: Emulator) -> None:
    """A PUT or PATCH without a body, or PATCH {}, is refused."""
    assert fault(emu.call("PUT", "/machine-config")) == "Empty PUT request."
    assert fault(emu.call("PATCH", "/machine-config")) == (
        "Empty PATCH request.")
    assert fault(emu.call("PATCH", "/machine-config", {})) == (
        "Empty PATCH request.")


def test_get_with_body(emu: Emulator) -> None:
    """A GET carrying a body is refused."""
    assert fault(emu.call("GET", "/", {"x": 1})) == (
        "GET request cannot have a body.")


@pytest.mark.parametrize(("method", "path", "shown"), [
    ("GET", "/foo", "GET foo"),
    ("GET", "/drives/rootfs", "GET drives"),
    ("DELETE", "/", "DELETE "),
    ("POST", "/actions", "POST actions"),
])
def test_unknown_path_or_method(
    emu: Emulator, method: str, path: str, shown: str
) -> None:
    """Firecracker names the method and the first path segment."""
    body = {"action_type": "InstanceStart"} if method == "POST" else None
    assert fault(emu.call(method, path, body)) == (
        f"Invalid request method and/or path: {shown}.")


def test_resource_ids(emu: Emulator) -> None:
    """Ids take letters, digits and _, and must match the body's."""
    drive = {"drive_id": "ro-ot", "is_root_device": True,
             "path_on_host": "/dev/null", "is_read_only": True}
    assert fault(emu.call("PUT", "/drives/ro-ot", drive)) == (
        "API Resource IDs can only contain alphanumeric characters and "
        "underscores.")
    drive["drive_id"] = "other"
    assert fault(emu.call("PUT", "/drives/rootfs", drive)) == (
        "The id from the path [rootfs] does not match the id from the "
        "body [other]!")
    net = {"iface_id": "eth1", "host_dev_name": "tap0"}
    assert "does not match" in fault(
        emu.call("PUT", "/network-interfaces/eth0", net))


def test_mtu_range(emu: Emulator) -> None:
    """MTU must lie in 68..65535."""
    net = {"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 67}
    assert "MTU" in fault(emu.call("PUT", "/network-interfaces/eth0", net))
    net["mtu"] = 65536
    assert fault(emu.call("PUT", "/network-interfaces/eth0", net)) \
        .startswith(DESERIALIZE + "invalid value: integer `65536`, "
                    "expected u16")


def test_bad_mac(emu: Emulator) -> None:
    """A guest_mac that is no MAC address is refused."""
    net = {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00"}
    assert "MAC address" in fault(
        emu.call("PUT", "/network-interfaces/eth0", net))


def test_missing_files(emu: Emulator, tmp_path: Path) -> None:
    """Kernel, initrd and drive files must open when configured."""
    missing = str(tmp_path / "missing")
    assert fault(emu.call("PUT", "/boot-source", {
        "kernel_image_path": missing})) == (
        "Boot source error: The kernel file cannot be opened: No such "
        "file or directory (os error 2)")
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    assert fault(emu.call("PUT", "/boot-source", {
        "kernel_image_path": str(kernel), "initrd_path": missing})) \
        .startswith("Boot source error: The initrd file cannot be opened")
    msg = fault(emu.call("PUT", "/drives/rootfs", {
        "drive_id": "rootfs", "is_root_device": True,
        "path_on_host": missing, "is_read_only": True}))
    assert msg.startswith("Drive config error: Unable to create the "
                          "virtio block device")
    assert "No such file or directory (os error 2)" in msg


@pytest.mark.parametrize(("method", "path", "body"), [
    ("PATCH", "/vm", {"state": "Paused"}),
    ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
    ("PATCH", "/drives/rootfs", {"drive_id": "rootfs"}),
    ("PATCH", "/network-interfaces/eth0", {"iface_id": "eth0"}),
])
def test_post_boot_calls_before_boot(
    emu: Emulator, method: str, path: str, body: dict[str, str]
) -> None:
    """Post-boot calls are refused before InstanceStart."""
    assert fault(emu.call(method, path, body)) == BEFORE


def test_start_without_kernel(emu: Emulator) -> None:
    """InstanceStart needs a boot source."""
    assert fault(emu.call("PUT", "/actions", {
        "action_type": "InstanceStart"})) == (
        "Start microvm error: Cannot start microvm without kernel "
        "configuration.")


def test_unknown_action(emu: Emulator) -> None:
    """An action_type outside the enumeration fails at deserialization."""
    msg = fault(emu.call("PUT", "/actions", {"action_type": "Reboot"}))
    assert msg.startswith(DESERIALIZE + "unknown variant `Reboot`, "
                          "expected one of `FlushMetrics`")


def _concrete(path: str) -> str:
    """Fill a path template's parameters with a valid id."""
    return re.sub(r"\{[^}]+\}", "x1", path)


@pytest.mark.parametrize(
    ("method", "path"),
    [(m, p) for m, p, emulated in ROUTES if not emulated],
)
def test_unemulated_endpoints(emu: Emulator, method: str, path: str) -> None:
    """Documented endpoints outside the emulator's scope say so."""
    body: dict[str, object] | None = None if method == "GET" else {}
    msg = fault(emu.call(method, _concrete(path), body))
    assert "not emulated by firecracker-emulator" in msg, msg


# ------------------------------------------------ stateful behaviour


def test_put_machine_config_resets_optional_fields(fresh: Emulator) -> None:
    """PUT resets omitted optional fields; PATCH keeps them."""
    assert fresh.call("PUT", "/machine-config", {
        "vcpu_count": 2, "mem_size_mib": 256, "smt": True,
        "track_dirty_pages": True})[0] == 204
    assert fresh.call("PATCH", "/machine-config", {"vcpu_count": 4})[0] \
        == 204
    _status, body = fresh.call("GET", "/machine-config")
    assert body["smt"] is True and body["vcpu_count"] == 4
    assert fresh.call("PUT", "/machine-config", {
        "vcpu_count": 1, "mem_size_mib": 128})[0] == 204
    _status, body = fresh.call("GET", "/machine-config")
    assert body == {"vcpu_count": 1, "mem_size_mib": 128, "smt": False,
                    "track_dirty_pages": False, "huge_pages": "None"}


def test_vm_config(fresh: Emulator, tmp_path: Path) -> None:
    """GET /vm/config returns the whole configuration, root drive first."""
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    disks = {}
    for name in ("data", "rootfs"):
        disks[name] = tmp_path / f"{name}.img"
        disks[name].write_bytes(b"\0" * 4096)
    assert fresh.call("PUT", "/boot-source", {
        "kernel_image_path": str(kernel), "boot_args": "console=ttyS0"}) \
        == (204, None)
    for name in ("data", "rootfs"):
        assert fresh.call("PUT", f"/drives/{name}", {
            "drive_id": name, "is_root_device": name == "rootfs",
            "path_on_host": str(disks[name]), "is_read_only": True})[0] == 204
    # Configuring a TAP opens it, which needs root (CAP_NET_ADMIN).
    nets = []
    if os.geteuid() == 0:
        nets = [{"iface_id": "eth0", "host_dev_name": "fcemu0",
                 "guest_mac": "06:00:ac:1e:00:02"}]
    for net in nets:
        assert fresh.call("PUT", "/network-interfaces/eth0", net) == (
            204, None)
    status, body = fresh.call("GET", "/vm/config")
    assert status == 200
    assert body["boot-source"] == {"kernel_image_path": str(kernel),
                                   "boot_args": "console=ttyS0"}
    assert [d["drive_id"] for d in body["drives"]] == ["rootfs", "data"]
    assert body["drives"][0]["is_root_device"] is True
    assert body["network-interfaces"] == nets
    assert body["machine-config"]["vcpu_count"] == 1
    second_root = {"drive_id": "data", "is_root_device": True,
                   "path_on_host": str(disks["data"]), "is_read_only": True}
    assert fault(fresh.call("PUT", "/drives/data", second_root)) == (
        "Drive config error: A root block device already exists!")


def test_busy_tap(emu: Emulator) -> None:
    """A TAP another process holds is refused when configured."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a TAP device")
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        # TUNSETIFF with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR: the device
        # exists while this descriptor holds it, and vanishes with it.
        fcntl.ioctl(fd, 0x400454CA,
                    struct.pack("16sH", b"fcemu-busy0", 0x5002))
        msg = fault(emu.call("PUT", "/network-interfaces/eth0", {
            "iface_id": "eth0", "host_dev_name": "fcemu-busy0"}))
    finally:
        os.close(fd)
    assert msg.startswith("Network config error: Cannot open/create the "
                          "tap device")
    assert "Resource busy (os error 16)" in msg
    assert fault(emu.call("PUT", "/network-interfaces/eth0", {
        "iface_id": "eth0", "host_dev_name": "x" * 16})).startswith(
        "Network config error: Cannot open/create the tap device: Invalid "
        "interface name")


def test_kernel_removed_before_start(fresh: Emulator, tmp_path: Path) -> None:
    """A kernel deleted after configuration fails InstanceStart."""
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    assert fresh.call("PUT", "/boot-source", {
        "kernel_image_path": str(kernel)})[0] == 204
    kernel.unlink()
    assert fault(fresh.call("PUT", "/actions", {
        "action_type": "InstanceStart"})).startswith(
        "Boot source error: The kernel file cannot be opened")
    assert fresh.call("GET", "/")[1]["state"] == "Not started"


def test_logger_and_metrics(fresh: Emulator, tmp_path: Path) -> None:
    """PUT /logger moves the log to a file; metrics flush as JSON lines."""
    log_file = tmp_path / "fc.log"
    metrics_file = tmp_path / "metrics.json"
    assert fresh.call("PUT", "/logger", {
        "log_path": str(log_file), "level": "debug",
        "show_level": True})[0] == 204
    assert fresh.call("GET", "/version")[0] == 200
    assert fresh.call("PUT", "/metrics", {
        "metrics_path": str(metrics_file)})[0] == 204
    assert fault(fresh.call("PUT", "/metrics", {
        "metrics_path": str(metrics_file)})).startswith("Metrics error")
    assert fresh.call("PUT", "/actions", {
        "action_type": "FlushMetrics"})[0] == 204
    text = log_file.read_text()
    assert ":INFO] The API server received a Get request on \"/version\"" \
        in text
    line = json.loads(metrics_file.read_text().splitlines()[-1])
    assert line["get_api_requests"]["vmm_version_count"] == 1
    assert line["put_api_requests"]["metrics_fails"] == 1
    assert line["api_server"]["process_startup_time_us"] > 0
    _status, config = fresh.call("GET", "/vm/config")
    assert config["logger"]["log_path"] == str(log_file)
    assert config["metrics"] == {"metrics_path": str(metrics_file)}


# --------------------------------------------------- the command line


def test_stale_socket(tmp_path: Path) -> None:
    """An existing socket path stops startup, as with Firecracker."""
    stale = tmp_path / "fc.sock"
    stale.write_text("")
    result = _run("--api-sock", str(stale))
    assert result.returncode == 1
    assert "Address in use (os error 98)" in result.stdout
    assert stale.exists(), "the caller's file must be left alone"


def test_version_flag() -> None:
    """--version prints the release followed and exits 0."""
    result = _run("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("Firecracker v1.16.1\n")


@pytest.mark.parametrize("args", [
    ("--no-api",), ("--bogus",), ("--level", "Loud"), ("--id", "a b"),
])
def test_bad_arguments(args: tuple[str, ...]) -> None:
    """Argument errors exit with Firecracker's status 153."""
    result = _run(*args)
    assert result.returncode == 153, result
    assert "Arguments parsing error" in result.stderr


def test_bad_config_file(tmp_path: Path) -> None:
    """An invalid configuration file exits with status 152."""
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({"machine-config": {
        "vcpu_count": 1, "mem_size_mib": 128, "ht_enabled": True}}))
    result = _run("--no-api", "--config-file", str(config))
    assert result.returncode == 152
    assert "unknown field `ht_enabled`" in result.stdout
    config.write_text(json.dumps({"vsock": {"guest_cid": 3,
                                            "uds_path": "/x"}}))
    result = _run("--no-api", "--config-file", str(config))
    assert result.returncode == 152
    assert "not emulated" in result.stdout


def test_sigterm_removes_socket(tmp_path: Path) -> None:
    """SIGTERM ends the emulator by that signal and removes the socket."""
    emu = Emulator(tmp_path)
    try:
        emu.wait_api()
        assert emu.sock.exists()
        emu.proc.terminate()
        assert emu.wait() == -15
        assert not emu.sock.exists()
    finally:
        emu.stop()
