"""firecracker-emulator with a real guest: boot, console, drives, exits.

The guest comes from helpers.images (kernel, initrd, ext4 root). Boots
are few and shared: one guest serves most checks, the others each
exercise one way a VMM must end without leaving anything behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from emulator_fixtures import Emulator, running
from procfs import alive, children_of, wait_gone

from helpers.guest import READY_MARKER, mac_for_ip
from helpers.images import GuestImages, build_guest

pytestmark = pytest.mark.vm

BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"
AFTER = "The requested operation is not supported after starting the microVM."
# Size of the scratch disk the guest may only read.
SCRATCH_BYTES = 1 << 20


@pytest.fixture(scope="module")
def guest() -> GuestImages:
    """The lab's guest images, built once and cached."""
    return build_guest()


def _sha256(path: Path) -> str:
    """Hash a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def configure(
    emu: Emulator,
    guest: GuestImages,
    workdir: Path,
    boot_args: str = BOOT_ARGS,
    read_only_root: bool = True,
) -> None:
    """PUT a boot source and the root drive, as a Firecracker client."""
    assert emu.call("PUT", "/boot-source", {
        "kernel_image_path": str(guest.kernel),
        "initrd_path": str(guest.initrd),
        "boot_args": boot_args,
    }) == (204, None)
    root = guest.rootfs
    if not read_only_root:
        root = workdir / "rootfs.ext4"
        shutil.copyfile(guest.rootfs, root)
    assert emu.call("PUT", "/drives/rootfs", {
        "drive_id": "rootfs", "path_on_host": str(root),
        "is_root_device": True, "is_read_only": read_only_root,
    }) == (204, None)


def start(emu: Emulator) -> None:
    """InstanceStart, expecting success."""
    assert emu.call("PUT", "/actions", {"action_type": "InstanceStart"}) \
        == (204, None), emu.output()[-3000:]


class Booted:
    """A running guest shared by the checks below."""

    def __init__(self, emu: Emulator, scratch: Path, scratch_hash: str,
                 metrics: Path) -> None:
        self.emu = emu
        self.scratch = scratch
        self.scratch_hash = scratch_hash
        self.metrics = metrics


@pytest.fixture(scope="module")
def booted(
    guest: GuestImages, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Booted]:
    """Boot one guest with --boot-timer, a read-only root and scratch."""
    work = tmp_path_factory.mktemp("vm")
    scratch = work / "scratch.img"
    scratch.write_bytes(os.urandom(SCRATCH_BYTES))
    metrics = work / "metrics.json"
    with running(work, "--boot-timer", "--id", "vm-test") as emu:
        configure(emu, guest, work, BOOT_ARGS + " fclab.task=emutest")
        assert emu.call("PUT", "/drives/scratch", {
            "drive_id": "scratch", "path_on_host": str(scratch),
            "is_root_device": False, "is_read_only": True,
        })[0] == 204
        assert emu.call("PUT", "/machine-config", {
            "vcpu_count": 2, "mem_size_mib": 256})[0] == 204
        assert emu.call("PUT", "/metrics", {
            "metrics_path": str(metrics)})[0] == 204
        before = _sha256(scratch)
        start(emu)
        yield Booted(emu, scratch, before, metrics)


def test_readiness_marker(booted: Booted) -> None:
    """The guest's serial console reaches the emulator's stdout."""
    line = booted.emu.wait_for(READY_MARKER)
    assert "task=emutest" in line


def test_boot_timer(booted: Booted) -> None:
    """--boot-timer logs Firecracker's Guest-boot-time line."""
    line = booted.emu.wait_for("Guest-boot-time = ")
    words = line.split("Guest-boot-time = ", 1)[1].split()
    assert words[1] == "us" and words[3].rstrip(",") == "ms"
    assert int(words[0]) // 1000 == int(words[2])
    assert words[5:] == ["CPU", "us", words[7], "CPU", "ms"]


def test_state_and_identity(booted: Booted) -> None:
    """GET / reports Running and the backend actually used."""
    status, info = booted.emu.call("GET", "/")
    assert status == 200 and info["state"] == "Running"
    assert info["emulator"].endswith(("TCG)", "KVM)"))
    assert "QEMU " in info["emulator"]


@pytest.mark.parametrize(("method", "path", "body"), [
    ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}),
    ("PATCH", "/machine-config", {"vcpu_count": 1}),
    ("PUT", "/boot-source", {"kernel_image_path": "/dev/null"}),
    ("PUT", "/actions", {"action_type": "InstanceStart"}),
    ("PUT", "/logger", {"level": "Debug"}),
    ("PUT", "/network-interfaces/eth0",
     {"iface_id": "eth0", "host_dev_name": "tap0"}),
])
def test_pre_boot_calls_after_boot(
    booted: Booted, method: str, path: str, body: dict[str, Any]
) -> None:
    """Configuration calls are refused once the guest runs."""
    assert booted.emu.call(method, path, body) == (
        400, {"fault_message": AFTER})


def test_pause_and_resume(booted: Booted) -> None:
    """PATCH /vm stops and continues the vCPUs."""
    emu = booted.emu
    emu.wait_for(READY_MARKER)
    assert emu.call("PATCH", "/vm", {"state": "Paused"}) == (204, None)
    assert emu.call("GET", "/")[1]["state"] == "Paused"
    assert emu.call("PATCH", "/vm", {"state": "Resumed"}) == (204, None)
    assert emu.call("GET", "/")[1]["state"] == "Running"


def test_console_input(booted: Booted) -> None:
    """What the host types on stdin reaches the guest's shell."""
    emu = booted.emu
    emu.wait_for(READY_MARKER)
    emu.type("echo typed-$((6*7))\n")
    emu.wait_for("typed-42", 60)


def test_read_only_drive(booted: Booted) -> None:
    """The guest cannot change a read-only drive."""
    emu = booted.emu
    emu.wait_for(READY_MARKER)
    emu.type(
        "dd if=/dev/zero of=/dev/vdb bs=4096 count=16 conv=fsync; "
        "sync; echo ro-done-$((1+1))\n"
    )
    emu.wait_for("ro-done-2", 60)
    assert _sha256(booted.scratch) == booted.scratch_hash


def test_metrics_from_qemu(booted: Booted) -> None:
    """FlushMetrics writes block statistics read from QEMU."""
    emu = booted.emu
    emu.wait_for(READY_MARKER)
    assert emu.call("PUT", "/actions", {"action_type": "FlushMetrics"}) \
        == (204, None)
    line = json.loads(booted.metrics.read_text().splitlines()[-1])
    assert line["block_rootfs"]["read_bytes"] > 0
    assert line["emulator"]["qemu_command"][0].endswith("qemu-system-x86_64")


def test_ctrl_alt_del_ends_everything(booted: Booted) -> None:
    """SendCtrlAltDel reboots the guest; QEMU and the emulator exit 0."""
    emu = booted.emu
    emu.wait_for(READY_MARKER)
    qemus = emu.qemu_pids()
    assert len(qemus) == 1
    assert emu.call("PUT", "/actions", {
        "action_type": "SendCtrlAltDel"}) == (204, None)
    assert emu.wait(120) == 0
    assert wait_gone(qemus) == []
    assert not emu.sock.exists()


def test_sigkill_takes_qemu_down(
    guest: GuestImages, tmp_path: Path
) -> None:
    """A SIGKILLed emulator's QEMU dies too (parent-death signal)."""
    emu = Emulator(tmp_path)
    try:
        emu.wait_api()
        configure(emu, guest, tmp_path)
        start(emu)
        qemus = emu.qemu_pids()
        assert len(qemus) == 1 and alive(qemus[0])
        emu.proc.send_signal(signal.SIGKILL)
        emu.proc.wait()
        assert wait_gone(qemus) == [], "QEMU outlived its emulator"
    finally:
        emu.stop()
        if emu.sock.exists():
            emu.sock.unlink()  # a SIGKILLed VMM cannot clean up


def test_panicking_guest_ends_the_emulator(
    guest: GuestImages, tmp_path: Path
) -> None:
    """With panic=1 a kernel panic reboots, and the emulator exits 0.

    The guest boots from a configuration file (no API) and without its
    initrd, so the kernel finds no root file system and panics.
    """
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({
        "boot-source": {"kernel_image_path": str(guest.kernel),
                        "boot_args": BOOT_ARGS},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
    }))
    emu = Emulator(tmp_path, "--no-api", "--config-file", str(config),
                   api=False)
    try:
        emu.wait_for("Kernel panic")
        qemus = children_of(emu.proc.pid)
        assert emu.wait(120) == 0
        assert wait_gone(qemus) == []
    finally:
        emu.stop()


def test_kvm_probe_leaves_nothing(
    guest: GuestImages, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The KVM probe ends its QEMU and caches its verdict."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no accessible /dev/kvm: the probe is not needed")
    from firecracker_emulator import accel

    monkeypatch.setenv("FCEMU_CACHE_DIR", str(tmp_path))
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu is not None
    before = set(children_of(os.getpid()))
    verdict, reason = accel.choose("auto", qemu, str(guest.kernel))
    assert verdict in ("kvm", "tcg") and "probe" in reason
    assert set(children_of(os.getpid())) <= before
    again, reason = accel.choose("auto", qemu, str(guest.kernel))
    assert again == verdict and reason.startswith("cached")


# ------------------------------------------------------------ network

NETNS = f"fcemu-{os.getpid()}"
TAP = "fcemu-tap0"
HOST_IP = "172.30.0.1"
GUEST_IP = "172.30.0.2"


def _ip(*args: str) -> None:
    """Run an ip(8) command, failing the test on error."""
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture()
def netns() -> Iterator[str]:
    """A private network namespace holding a TAP at 172.30.0.1/30."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace and a TAP")
    _ip("netns", "add", NETNS)
    try:
        _ip("-n", NETNS, "tuntap", "add", "dev", TAP, "mode", "tap")
        _ip("-n", NETNS, "addr", "add", f"{HOST_IP}/30", "dev", TAP)
        _ip("-n", NETNS, "link", "set", TAP, "up")
        _ip("-n", NETNS, "link", "set", "lo", "up")
        yield NETNS
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], check=False)


@pytest.mark.net
def test_tap_carries_ping_both_ways(
    guest: GuestImages, netns: str, tmp_path: Path
) -> None:
    """A TAP in a namespace carries ping from host to guest and back."""
    with running(tmp_path, prefix=("ip", "netns", "exec", netns)) as emu:
        configure(emu, guest, tmp_path)
        assert emu.call("PUT", "/network-interfaces/eth0", {
            "iface_id": "eth0", "host_dev_name": TAP,
            "guest_mac": mac_for_ip(GUEST_IP),
        }) == (204, None)
        start(emu)
        assert f"ip={GUEST_IP}" in emu.wait_for(READY_MARKER)
        ping = subprocess.run(
            ["ip", "netns", "exec", netns, "ping", "-c", "2", "-W", "5",
             GUEST_IP],
            capture_output=True, text=True, check=False,
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr
        emu.type(f"ping -c 2 -W 5 {HOST_IP} && echo pong-$((2*3))\n")
        emu.wait_for("pong-6", 60)
        qemus = emu.qemu_pids()
    assert wait_gone(qemus) == []
