"""Tests of the guest image builder: the files it makes, its cache, a boot.

The images are built once per module into a private cache (sharing only
the downloaded packages with the real cache). The ``vm`` tests boot them
with QEMU under TCG, with the machine model and command line a
Firecracker-style VMM uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import lzma
import os
import queue
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import guest, images
from helpers.images import GuestBuildError, GuestImages
from helpers.paths import cache_dir

# Drivers the initrd must load (the kernel may add helpers such as
# virtio_pci_modern_dev), and pairs (a, b) where a must be loaded before
# b, as the modules' own dependency records require.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
)
MUST_PRECEDE = (
    ("virtio_ring", "virtio"),
    ("virtio", "virtio_mmio"),
    ("virtio", "virtio_pci"),
    ("virtio", "virtio_blk"),
    ("failover", "net_failover"),
    ("net_failover", "virtio_net"),
    ("virtio", "virtio_net"),
)

# Kernel arguments QEMU's TCG needs to calibrate its clock quickly.
TCG_CLOCK_ARGS = "tsc_early_khz=2000000 tsc=reliable lpj=8000000"

# Upper bounds for waiting on a TCG guest on a busy two-core host; they
# only stop a hung test, they are no performance assertion.
BOOT_WAIT_S = 180.0
EXIT_WAIT_S = 90.0


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private cache whose package downloads are the real cache's."""
    path = tmp_path_factory.mktemp("cache")
    debs = cache_dir() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    (path / "debs").symlink_to(debs)
    return path


@pytest.fixture(scope="module")
def built(cache: Path) -> GuestImages:
    """The guest images, built once for this module."""
    return images.build_guest(cache)


def _debugfs(rootfs: Path, request: str) -> str:
    """Run one read-only debugfs request against an ext4 image."""
    done = subprocess.run(
        ["debugfs", "-R", request, str(rootfs)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def _initrd_members(initrd: Path) -> dict[str, images.CpioEntry]:
    """Return the initrd's members by name."""
    return images.read_newc(gzip.decompress(initrd.read_bytes()))


def _depends(ko: bytes) -> list[str]:
    """Read a module's dependency list straight from its bytes."""
    found = re.search(rb"\0depends=([^\0]*)\0", ko)
    assert found, "module without a depends= record"
    return [d for d in found.group(1).decode().split(",") if d]


# --- Kernel ----------------------------------------------------------------


def test_kernel_is_an_x86_64_elf_executable(built: GuestImages) -> None:
    """The kernel is the uncompressed ELF vmlinux Firecracker loads."""
    head = built.kernel.read_bytes()[:64]
    assert head[:4] == b"\x7fELF"
    assert head[4] == 2, "not a 64-bit ELF"
    e_type, e_machine = struct.unpack_from("<HH", head, 16)
    assert e_type == 2, "not an executable"
    assert e_machine == 0x3E, "not x86_64"
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+-cloud-amd64", built.kernel_release)


def test_kernel_names_its_release(built: GuestImages) -> None:
    """The ELF is the kernel of the release the modules belong to."""
    banner = f"Linux version {built.kernel_release} ".encode()
    assert banner in built.kernel.read_bytes()


def _legacy_lz4(data: bytes) -> bytes:
    """Compress *data* to an LZ4 legacy frame with the CLI."""
    return subprocess.run(
        ["lz4", "-l", "-c"], input=data, capture_output=True, check=True
    ).stdout


@pytest.mark.parametrize("fmt", ["lz4", "gzip", "xz"])
def test_payload_formats_decompress(fmt: str) -> None:
    """Payloads carry the kernel's size after the data; it is skipped."""
    data = os.urandom(1 << 16) * 200  # 12.5 MiB: two LZ4 legacy blocks
    packed = {
        "lz4": _legacy_lz4,
        "gzip": lambda d: gzip.compress(d, mtime=0),
        "xz": lambda d: lzma.compress(d, check=lzma.CHECK_CRC32),
    }[fmt](data)
    payload = packed + struct.pack("<I", len(data))
    assert images.decompress_payload(payload) == data


def test_unknown_payload_is_refused() -> None:
    """A payload in an unknown format fails with a clear error."""
    with pytest.raises(GuestBuildError, match="unknown kernel payload"):
        images.decompress_payload(b"BZh91AY&SY" + bytes(64))


# --- Initrd ----------------------------------------------------------------


def test_initrd_is_a_gzip_newc_archive(built: GuestImages) -> None:
    """cpio itself lists the init, busybox, console and every module."""
    listing = (
        subprocess.run(
            ["cpio", "-it", "--quiet"],
            input=gzip.decompress(built.initrd.read_bytes()),
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split()
    )
    for name in (
        "init",
        "bin/busybox",
        "bin/sh",
        "bin/insmod",
        "bin/switch_root",
        "dev/console",
        "etc/modules.order",
    ):
        assert name in listing
    for module in MODULES:
        assert f"lib/modules/{module}.ko" in listing


def test_initrd_init_is_executable_and_parses(
    built: GuestImages, tmp_path: Path
) -> None:
    """/init is an executable shell script that a shell can parse."""
    members = _initrd_members(built.initrd)
    init = members["init"]
    assert init.mode & 0o111
    assert init.data.startswith(b"#!/bin/sh\n")
    script = tmp_path / "init"
    script.write_bytes(init.data)
    subprocess.run(["sh", "-n", str(script)], check=True)
    console = members["dev/console"]
    assert (console.mode & 0o170000, console.rdev) == (0o020000, (5, 1))


def test_initrd_loads_modules_in_dependency_order(
    built: GuestImages,
) -> None:
    """Every module comes after each module it depends on."""
    members = _initrd_members(built.initrd)
    lines = members["etc/modules.order"].data.decode().splitlines()
    order = [line.split()[0] for line in lines]
    assert set(MODULES) <= set(order)
    assert len(set(order)) == len(order), "a module is loaded twice"
    for later, name in enumerate(order):
        ko = members[f"lib/modules/{name}.ko"].data
        for dep in _depends(ko):
            assert order.index(dep) < later, f"{dep} after {name}"
    for first, then in MUST_PRECEDE:
        assert order.index(first) < order.index(then)
    assert b'insmod "/lib/modules/$name.ko"' in members["init"].data


# --- Root file system ------------------------------------------------------


def test_rootfs_holds_init_and_applet_links(built: GuestImages) -> None:
    """/sbin/init and the applets link to a root-owned busybox."""
    bin_listing = _debugfs(built.rootfs, "ls -l /bin")
    busybox = next(
        line.split()
        for line in bin_listing.splitlines()
        if line.split()[-1:] == ["busybox"]
    )
    mode, uid, gid = busybox[1], busybox[3], busybox[4]
    assert (mode, uid, gid) == ("100755", "0", "0")
    links = [
        line
        for line in bin_listing.splitlines()
        if line.split()[1:2] == ["120777"]
    ]
    assert len(links) > 50, "the applet links are missing"
    assert "../bin/busybox" in _debugfs(built.rootfs, "stat /sbin/init")
    for path in (
        "/bin/sh",
        "/sbin/init",
        "/sbin/devmem",
        "/usr/sbin/httpd",
        "/bin/cttyhack",
    ):
        assert "Type: symlink" in _debugfs(built.rootfs, f"stat {path}")


def test_rootfs_inittab_and_scripts(
    built: GuestImages, tmp_path: Path
) -> None:
    """inittab starts rcS, a console shell and stops on Ctrl-Alt-Del."""
    inittab = _debugfs(built.rootfs, "cat /etc/inittab")
    assert "::sysinit:/etc/init.d/rcS" in inittab
    assert "::respawn:" in inittab
    assert "::ctrlaltdel:/sbin/reboot" in inittab
    assert "::shutdown:/etc/init.d/rcK" in inittab
    for script in ("rcS", "rcK", "console"):
        text = _debugfs(built.rootfs, f"cat /etc/init.d/{script}")
        (tmp_path / script).write_text(text)
        subprocess.run(["sh", "-n", str(tmp_path / script)], check=True)
        mode = _debugfs(built.rootfs, f"stat /etc/init.d/{script}")
        assert "Mode:  0755" in mode
    rcs = (tmp_path / "rcS").read_text()
    assert (
        f"devmem 0x{guest.BOOT_TIMER_ADDR:x} 8 {guest.BOOT_TIMER_MAGIC}" in rcs
    )
    assert f'echo "{guest.READY_MARKER} task=' in rcs
    assert rcs.index("devmem") < rcs.index("httpd")


def test_rootfs_names_its_build(built: GuestImages, cache: Path) -> None:
    """/etc/fclab-release names the key; /data and /root exist."""
    release = _debugfs(built.rootfs, "cat /etc/fclab-release")
    key = built.kernel.parent.name
    assert f"BUILD_KEY={key}" in release
    assert f"KERNEL_RELEASE={built.kernel_release}" in release
    root = _debugfs(built.rootfs, "ls -l /")
    assert re.search(r"\b41777\b.*\bdata\b", root)
    assert re.search(r"\b40700\b.*\broot\b", root)


# --- Cache -----------------------------------------------------------------


def _stamps(built: GuestImages) -> dict[str, int]:
    """Modification times (ns) of the three files of a set."""
    return {
        p.name: p.stat().st_mtime_ns
        for p in (built.kernel, built.initrd, built.rootfs)
    }


def test_cache_is_reused(
    built: GuestImages, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second call returns the same files without building anything."""
    before = _stamps(built)

    def no_build(*args: object) -> Path:
        raise AssertionError("rebuilt although nothing changed")

    monkeypatch.setattr(images, "_build_set", no_build)
    again = images.build_guest(cache)
    assert again == built
    assert _stamps(again) == before


def test_changed_input_changes_the_key() -> None:
    """Each input (versions, scripts, builder) takes part in the key."""
    inputs = images.resolve_inputs()
    assert images.resolve_inputs().key() == inputs.key()
    newer = dataclasses.replace(inputs.busybox, version="9:9.99")
    scripts = (
        (inputs.scripts[0][0], inputs.scripts[0][1] + "\n"),
        *inputs.scripts[1:],
    )
    variants = [
        dataclasses.replace(inputs, busybox=newer),
        dataclasses.replace(inputs, scripts=scripts),
        dataclasses.replace(inputs, builder=inputs.builder + 1),
        dataclasses.replace(inputs, rootfs_mib=inputs.rootfs_mib * 2),
    ]
    keys = {v.key() for v in variants} | {inputs.key()}
    assert len(keys) == len(variants) + 1


def _fail_in_rootfs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the root file system step write half a file, then fail."""

    def broken(tree: Path, image: Path, size_mib: int, key: str) -> None:
        image.write_bytes(b"half an image")
        raise GuestBuildError("simulated failure")

    monkeypatch.setattr(images, "make_ext4", broken)


def test_failed_build_leaves_no_set(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build that fails half-way leaves no set and no work folder."""
    fresh = tmp_path / "cache"
    fresh.mkdir()
    (fresh / "debs").symlink_to((cache / "debs").resolve())
    _fail_in_rootfs(monkeypatch)
    with pytest.raises(GuestBuildError, match="simulated"):
        images.build_guest(fresh)
    left = [p.name for p in (fresh / "guest").iterdir()]
    assert left == [".lock"]


def test_failed_rebuild_keeps_the_old_set(
    built: GuestImages, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forced rebuild that fails leaves the previous set untouched."""
    before = _stamps(built)
    _fail_in_rootfs(monkeypatch)
    with pytest.raises(GuestBuildError):
        images.build_guest(cache, force=True)
    monkeypatch.undo()
    assert _stamps(built) == before
    assert images.build_guest(cache) == built
    assert not list((cache / "guest").glob(".build-*"))


def test_main_prints_json_only(
    built: GuestImages, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The command prints the set's paths as JSON on standard output."""
    assert images.main(["--cache", str(cache)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == built.as_dict()


# --- Booting ---------------------------------------------------------------


class Console:
    """QEMU's serial console: lines read in a thread, commands written."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        """Start reading *proc*'s standard output."""
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        """Queue each output line until QEMU closes its output."""
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\r\n"))

    def wait_for(self, pattern: str, limit: float = BOOT_WAIT_S) -> str:
        """Return the first new line matching *pattern*."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.seen.append(line)
            if re.search(pattern, line):
                return line
        tail = "\n".join(self.seen[-30:])
        raise AssertionError(f"no line matching {pattern!r}:\n{tail}")

    def send(self, command: str) -> None:
        """Type one command line on the console."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()


@pytest.fixture
def qemu_bin() -> str:
    """Path of qemu-system-x86_64, or skip."""
    found = shutil.which("qemu-system-x86_64")
    if not found:
        pytest.skip("qemu-system-x86_64 is not installed")
    return found


@contextlib.contextmanager
def booted(qemu: list[str]) -> Iterator[Console]:
    """Run QEMU with *qemu* as command line; kill it on the way out."""
    proc = subprocess.Popen(
        qemu,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield Console(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def _monitor(path: Path, command: str) -> None:
    """Send one command to QEMU's human monitor on a Unix socket."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        banner = b""
        while b"(qemu)" not in banner:
            banner += sock.recv(4096)
        sock.sendall(command.encode() + b"\n")
        echoed = b""
        while echoed.count(b"(qemu)") < 1:
            echoed += sock.recv(4096)


def _qemu_command(
    qemu_bin: str, machine: str, built: GuestImages, args: str
) -> list[str]:
    """QEMU booting *built* under TCG: one vCPU, 128 MiB, serial on stdio.

    The caller appends the devices; ``-no-reboot`` turns the guest's
    reboot into QEMU's exit.
    """
    return [
        qemu_bin,
        "-M",
        machine,
        "-accel",
        "tcg",
        "-m",
        "128",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(built.kernel),
        "-initrd",
        str(built.initrd),
        "-append",
        args,
        "-serial",
        "stdio",
    ]


def _sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.vm
def test_microvm_boot_reports_ready_and_stops_on_ctrl_alt_del(
    built: GuestImages, qemu_bin: str, tmp_path: Path
) -> None:
    """Firecracker-style boot: marker, boot timer, shell, clean exit."""
    disk = tmp_path / "rootfs.ext4"
    shutil.copyfile(built.rootfs, disk)
    errors = tmp_path / "guest-errors.log"
    monitor = tmp_path / "monitor.sock"
    args = (
        f"{guest.DEFAULT_BOOT_ARGS} root=/dev/vda rw {TCG_CLOCK_ARGS} "
        f"{guest.TASK_ARG}=web-1"
    )
    qemu = [
        *_qemu_command(qemu_bin, "microvm,acpi=on", built, args),
        "-device",
        "i8042",
        "-drive",
        f"id=root,file={disk},format=raw,if=none",
        "-device",
        "virtio-blk-device,drive=root",
        "-monitor",
        f"unix:{monitor},server,nowait",
        "-d",
        "guest_errors",
        "-D",
        str(errors),
    ]
    with booted(qemu) as console:
        ready = console.wait_for(guest.READY_MARKER)
        assert ready.strip() == f"{guest.READY_MARKER} task=web-1 ip=none"

        console.send("cat /etc/fclab-release; echo written > /data/probe")
        key = built.kernel.parent.name
        console.wait_for(f"^BUILD_KEY={key}$")

        _monitor(monitor, "sendkey ctrl-alt-delete")
        assert console.proc.wait(timeout=EXIT_WAIT_S) == 0
    assert "Invalid write at addr 0xC0000000" in errors.read_text()
    assert "written" in _debugfs(disk, "cat /data/probe")


@pytest.mark.vm
def test_pc_boot_from_a_read_only_drive(
    built: GuestImages, qemu_bin: str, tmp_path: Path
) -> None:
    """PCI virtio, read-only root: init runs, the image stays unchanged."""
    before = _sha256(built.rootfs)
    mac = guest.mac_for_ip("10.0.0.6")
    args = (
        f"console=ttyS0 reboot=k panic=1 root=/dev/vda ro "
        f"{TCG_CLOCK_ARGS} fclab.console=raw"
    )
    qemu = [
        *_qemu_command(qemu_bin, "pc", built, args),
        "-drive",
        f"id=root,file={built.rootfs},format=raw,if=none,readonly=on",
        "-device",
        "virtio-blk-pci,drive=root",
        # A NIC with no backend: enough for the guest to configure eth0.
        "-netdev",
        "hubport,id=n0,hubid=0",
        "-device",
        f"virtio-net-pci,netdev=n0,mac={mac}",
    ]
    with booted(qemu) as console:
        ready = console.wait_for(guest.READY_MARKER)
        assert ready.strip() == f"{guest.READY_MARKER} task=task ip=10.0.0.6"

        console.send("touch /data/probe; echo touch=$?; ip route")
        assert console.wait_for("touch=") == "touch=1"
        console.wait_for("^default via 10.0.0.5 dev eth0")

        console.send("reboot")
        assert console.proc.wait(timeout=EXIT_WAIT_S) == 0
    assert _sha256(built.rootfs) == before
