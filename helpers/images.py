"""Build the guest's kernel, initial RAM disk and root file system offline.

Everything comes from Debian's packages and needs no root: the kernel is
Debian's cloud kernel, unpacked to the ELF ``vmlinux`` Firecracker wants;
the initial RAM disk carries busybox and the virtio drivers the kernel
keeps as modules; the root file system is a small ext4 image made with
``mkfs.ext4 -d``. Its init reports boot time to the VMM's boot timer,
configures ``eth0``, serves a web page naming the task and then prints
the readiness line the host waits for.

The three files land in ``cache_dir()/guest/<key>/``, where the key
hashes every input, so a set is built once and rebuilt only when an
input changes. A set appears whole or not at all.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from helpers import guest
from helpers.cli import run_json_command
from helpers.errors import LabError
from helpers.paths import cache_dir

log = logging.getLogger(__name__)

# Bump when the way the images are built changes, so old sets are not
# reused; it is one of the cache key's inputs.
BUILDER_VERSION = 1

# Debian's metapackage that always depends on the current cloud kernel.
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"

# Statically linked busybox: runs in the initrd and the root file system
# without any shared library.
BUSYBOX_PACKAGE = "busybox-static"

# Size of the ext4 root image. Busybox needs about 2 MiB; the rest leaves
# room for the files a learner writes on a writable copy. The image is
# sparse, so unused space costs no disk.
ROOTFS_SIZE_MIB = 64

# Drivers the initrd loads, with everything they depend on: the virtio
# transports (MMIO as Firecracker and QEMU's microvm use, PCI for QEMU's
# pc machine) and the block and network devices.
WANTED_MODULES = ("virtio_mmio", "virtio_pci", "virtio_blk", "virtio_net")

# File names inside a built set.
KERNEL_NAME = "vmlinux"
INITRD_NAME = "initrd.cpio.gz"
ROOTFS_NAME = "rootfs.ext4"
MANIFEST_NAME = "manifest.json"

# Where the initrd keeps its modules and the order to load them in.
INITRD_MODULE_DIR = "lib/modules"
INITRD_MODULE_LIST = "etc/modules.order"

# Flag written after a module's name in the load list when the module
# accepts the ``device=`` parameters Firecracker puts on the command line
# (only with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES; ACPI describes the
# devices otherwise).
CMDLINE_DEVICES_FLAG = "cmdline-devices"

# x86 boot protocol: setup header fields of a bzImage.
_SETUP_SECTS_OFFSET = 0x1F1  # u8, 512-byte sectors after the boot sector
_PAYLOAD_OFFSET_FIELD = 0x248  # u32, from the end of the setup sectors
_PAYLOAD_LENGTH_FIELD = 0x24C  # u32
_SECTOR = 512
_DEFAULT_SETUP_SECTS = 4  # a zero count means four, says the protocol

# Magic numbers of the compressed kernel payloads handled here.
_LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"
_GZIP_MAGIC = b"\x1f\x8b"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# An LZ4 legacy frame cuts its input into 8 MiB blocks; a compressed
# block is at most LZ4_COMPRESSBOUND of that. A larger "length" is the
# 32-bit uncompressed size the kernel build appends after the frame.
_LZ4_LEGACY_BLOCK = 8 << 20
_LZ4_LEGACY_BOUND = _LZ4_LEGACY_BLOCK + _LZ4_LEGACY_BLOCK // 255 + 16

_ELF_MAGIC = b"\x7fELF"
_EM_X86_64 = 0x3E  # e_machine of x86_64 ELF files

# newc cpio: magic and the fixed major/minor of /dev/console.
_CPIO_MAGIC = b"070701"
_CONSOLE_MAJOR, _CONSOLE_MINOR = 5, 1

# How long an apt or mkfs command may take before the build gives up.
_COMMAND_TIMEOUT_S = 600

# The Debian package providing each program the build runs.
_TOOL_PACKAGES = {
    "apt-cache": "apt",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "lz4": "lz4",
    "zstd": "zstd",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
}


class GuestBuildError(LabError):
    """Building the guest images failed; the message says what to do."""


@dataclass(frozen=True)
class GuestImages:
    """Paths of one built guest: kernel, initrd and root file system."""

    kernel: Path
    initrd: Path
    rootfs: Path
    kernel_release: str

    def as_dict(self) -> dict[str, str]:
        """Return the paths and release as plain strings (JSON-ready)."""
        return {
            "kernel": str(self.kernel),
            "initrd": str(self.initrd),
            "rootfs": str(self.rootfs),
            "kernel_release": self.kernel_release,
        }


@dataclass(frozen=True)
class PackageRecord:
    """One Debian package version as the local apt index describes it."""

    name: str
    version: str
    sha256: str
    filename: str


@dataclass(frozen=True)
class GuestInputs:
    """Everything that decides a guest's content; its hash is the key."""

    kernel: PackageRecord
    busybox: PackageRecord
    scripts: tuple[tuple[str, str], ...]
    modules: tuple[str, ...] = WANTED_MODULES
    rootfs_mib: int = ROOTFS_SIZE_MIB
    builder: int = BUILDER_VERSION

    def key(self) -> str:
        """Return a short hash of every input, used as folder name."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- Guest scripts ---------------------------------------------------------
#
# Placeholders of the form @NAME@ are filled from helpers.guest so the
# guest and the host share one definition.

INITRD_INIT = r"""#!/bin/sh
# First process of the initial RAM disk: load the virtio drivers, mount
# the root file system named on the kernel command line and hand over to
# its init. Any failure is reported on the console, then the guest
# reboots so the VMM exits instead of hanging.
export PATH=/bin
set -f

fail() {
    echo "fclab-initrd: FAILED: $*" >/dev/console
    echo "fclab-initrd: rebooting so the VMM exits" >/dev/console
    sync
    reboot -f
    sleep 10
    exit 1
}

mount -t proc proc /proc || fail "mounting /proc"
mount -t sysfs sysfs /sys || fail "mounting /sys"
mount -t devtmpfs devtmpfs /dev || fail "mounting devtmpfs on /dev"

root=/dev/vda
fstype=ext4
mode=ro
init=/sbin/init
wait=10
mmio=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root=${arg#root=} ;;
        rootfstype=*) fstype=${arg#rootfstype=} ;;
        ro) mode=ro ;;
        rw) mode=rw ;;
        init=*) init=${arg#init=} ;;
        fclab.rootwait=*) wait=${arg#fclab.rootwait=} ;;
        virtio_mmio.device=*)
            mmio="$mmio device=${arg#virtio_mmio.device=}" ;;
    esac
done

while read -r name flags; do
    [ -n "$name" ] || continue
    params=""
    case " $flags " in
        *" @CMDLINE_DEVICES_FLAG@ "*) params=$mmio ;;
    esac
    insmod "/@MODULE_DIR@/$name.ko" $params \
        || fail "loading kernel module $name"
done < "/@MODULE_LIST@"

find_root() {
    case "$root" in
        /dev/*) [ -b "$root" ] && echo "$root" ;;
        UUID=*|LABEL=*) findfs "$root" 2>/dev/null ;;
        *) return 1 ;;
    esac
}

tries=$((wait * 10))
dev=""
while :; do
    dev=$(find_root) && [ -n "$dev" ] && break
    [ "$tries" -gt 0 ] || fail "root device $root did not appear \
within ${wait}s; attach a drive (is_root_device) or fix root="
    tries=$((tries - 1))
    sleep 0.1
done

mkdir -p /newroot
mount -t "$fstype" -o "$mode" "$dev" /newroot \
    || fail "mounting $dev as $fstype ($mode) on /"
[ -e "/newroot$init" ] || [ -L "/newroot$init" ] \
    || fail "$init is missing on the root file system $dev"
for fs in dev proc sys; do
    mount --move "/$fs" "/newroot/$fs" || fail "moving /$fs to the root"
done
exec switch_root /newroot "$init"
fail "switch_root to $init"
"""

ROOTFS_RCS = r"""#!/bin/sh
# Start-up of the guest: report the boot to the VMM, name the host after
# the task, configure eth0, serve a web page and note that it is ready.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
set -f

[ -e /proc/self ] || mount -t proc proc /proc
[ -e /sys/kernel ] || mount -t sysfs sysfs /sys
[ -e /dev/null ] || mount -t devtmpfs devtmpfs /dev

# Firecracker's boot timer: writing the magic byte to its address ends
# the measurement. Where nothing is mapped the write is simply dropped.
[ -e /dev/mem ] && devmem @BOOT_TIMER_ADDR@ 8 @BOOT_TIMER_MAGIC@

mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp

# Keep kernel chatter (below "error") off the console the host reads.
echo 4 > /proc/sys/kernel/printk

task=task
ipspec=""
prefix=30
gw=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        @TASK_ARG@=*) task=${arg#@TASK_ARG@=} ;;
        ip=*) ipspec=${arg#ip=} ;;
        fclab.prefix=*) prefix=${arg#fclab.prefix=} ;;
        fclab.gw=*) gw=${arg#fclab.gw=} ;;
    esac
done
task=$(printf '%s' "$task" | tr -c 'A-Za-z0-9._-' '_')
[ -n "$task" ] || task=task
hostname "$(printf '%s' "$task" | tr '._' '--' | cut -c1-63)"

# One below the given address: the host side of a /30 (guest .2, host .1).
address_before() {
    old=$IFS; IFS=.; set -- $1; IFS=$old
    n=$(( (($1 << 24) | ($2 << 16) | ($3 << 8) | $4) - 1 ))
    echo "$((n >> 24 & 255)).$((n >> 16 & 255)).$((n >> 8 & 255)).$((n & 255))"
}

# Firecracker's convention: MAC 06:00 followed by the IPv4 address bytes.
address_from_mac() {
    old=$IFS; IFS=:; set -- $1; IFS=$old
    [ "$1:$2" = "@MAC_PREFIX@" ] || return 1
    echo "$((0x$3)).$((0x$4)).$((0x$5)).$((0x$6))"
}

ip link set lo up
addr=""
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    if [ -n "$ipspec" ]; then
        # ip=<guest>:<server>:<gateway>:<netmask>:<host>:<device>:<autoconf>
        old=$IFS; IFS=:; set -- $ipspec; IFS=$old
        case "$1" in
            *.*.*.*)
                addr=$1
                [ -n "$3" ] && gw=$3
                [ -n "$4" ] && eval "$(ipcalc -p "$addr" "$4")" \
                    && prefix=$PREFIX ;;
        esac
    else
        addr=$(address_from_mac "$(cat /sys/class/net/eth0/address)") \
            || addr=""
        [ -n "$addr" ] && [ -z "$gw" ] && gw=$(address_before "$addr")
    fi
    if [ -n "$addr" ]; then
        if ! ip addr add "$addr/$prefix" dev eth0; then
            echo "fclab-init: cannot set $addr/$prefix on eth0"
            addr=""
        elif [ -n "$gw" ] && ! ip route add default via "$gw"; then
            echo "fclab-init: cannot route through $gw"
        fi
    fi
fi

mkdir -p /run/www
printf '<!doctype html>\n<title>%s</title>\n<h1>Hello from task %s</h1>\n' \
    "$task" "$task" > /run/www/index.html
httpd -p 80 -h /run/www || echo "fclab-init: the web server did not start"

# The console script prints this line once its shell can take commands.
echo "@READY_MARKER@ task=$task ip=${addr:-none}" > /run/fclab-ready
"""

ROOTFS_RCK = r"""#!/bin/sh
# Shutdown: stop the web server, flush and detach the file systems so a
# writable root stays consistent; init then reboots and the VMM exits.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
echo "fclab-init: stopping"
killall httpd 2>/dev/null
sync
umount /tmp /run 2>/dev/null
mount -o remount,ro / 2>/dev/null
sync
"""

ROOTFS_INITTAB = """\
# Busybox init: start-up script, a root shell on the console, and a clean
# stop on Ctrl-Alt-Del or "reboot" (with reboot=k the VMM then exits).
::sysinit:/etc/init.d/rcS
::respawn:/bin/cttyhack /etc/init.d/console
::ctrlaltdel:/sbin/reboot
::shutdown:/etc/init.d/rcK
"""

ROOTFS_CONSOLE = r"""#!/bin/sh
# The console's shell. With fclab.console=raw the terminal stops echoing
# and the prompt is empty, so busybox reads plain lines and the console
# carries only what commands print (for a program driving it). The
# readiness line comes first, once per boot, when typed commands can no
# longer get lost.
case " $(cat /proc/cmdline) " in
    *" fclab.console=raw "*) stty -echo; export FCLAB_CONSOLE=raw ;;
esac
if [ -f /run/fclab-ready ]; then
    cat /run/fclab-ready
    rm -f /run/fclab-ready
fi
exec /bin/sh -l
"""

ROOTFS_PROFILE = """\
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root
cd /root 2>/dev/null
if [ "$FCLAB_CONSOLE" = raw ]; then PS1=''; else PS1='\\h:\\w# '; fi
"""

ROOTFS_PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
ROOTFS_GROUP = "root:x:0:\n"
ROOTFS_HOSTS = "127.0.0.1\tlocalhost\n"


def _fill(text: str) -> str:
    """Replace the @NAME@ placeholders of a guest script."""
    values = {
        "BOOT_TIMER_ADDR": f"0x{guest.BOOT_TIMER_ADDR:x}",
        "BOOT_TIMER_MAGIC": str(guest.BOOT_TIMER_MAGIC),
        "TASK_ARG": guest.TASK_ARG,
        "READY_MARKER": guest.READY_MARKER,
        "MAC_PREFIX": guest.MAC_PREFIX,
        "MODULE_DIR": INITRD_MODULE_DIR,
        "MODULE_LIST": INITRD_MODULE_LIST,
        "CMDLINE_DEVICES_FLAG": CMDLINE_DEVICES_FLAG,
    }
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    return text


def guest_scripts() -> tuple[tuple[str, str], ...]:
    """Return (path, text) of every script and config file of the guest."""
    return (
        ("initrd:init", _fill(INITRD_INIT)),
        ("rootfs:etc/init.d/rcS", _fill(ROOTFS_RCS)),
        ("rootfs:etc/init.d/rcK", ROOTFS_RCK),
        ("rootfs:etc/init.d/console", ROOTFS_CONSOLE),
        ("rootfs:etc/inittab", ROOTFS_INITTAB),
        ("rootfs:etc/profile", ROOTFS_PROFILE),
        ("rootfs:etc/passwd", ROOTFS_PASSWD),
        ("rootfs:etc/group", ROOTFS_GROUP),
        ("rootfs:etc/hosts", ROOTFS_HOSTS),
    )


# --- Commands and packages -------------------------------------------------


def _run(
    cmd: list[str], *, cwd: Path | None = None, input: bytes | None = None
) -> bytes:
    """Run *cmd* and return its standard output; raise on failure."""
    log.debug("running %s", " ".join(cmd))
    try:
        done = subprocess.run(
            cmd,
            cwd=cwd,
            input=input,
            capture_output=True,
            timeout=_COMMAND_TIMEOUT_S,
            check=False,
        )
    except FileNotFoundError as exc:
        package = _TOOL_PACKAGES.get(cmd[0], cmd[0])
        raise GuestBuildError(
            f"{cmd[0]} is missing; install it ('apt-get install {package}') "
            "and build again"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise GuestBuildError(
            f"{' '.join(cmd)} took over {_COMMAND_TIMEOUT_S}s; "
            "check the network to the Debian mirror"
        ) from exc
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip()[-800:]
        raise GuestBuildError(
            f"{' '.join(cmd)} failed with exit code {done.returncode}: {tail}"
        )
    return done.stdout


def apt_records(*packages: str) -> dict[str, PackageRecord]:
    """Return the candidate version of each package from the apt index."""
    text = _run(["apt-cache", "show", "--no-all-versions", *packages])
    records: dict[str, PackageRecord] = {}
    for paragraph in text.decode().split("\n\n"):
        fields: dict[str, str] = {}
        for line in paragraph.splitlines():
            name, sep, value = line.partition(":")
            if sep and not line.startswith(" ") and name not in fields:
                fields[name] = value.strip()
        if {"Package", "Version", "SHA256", "Filename"} <= fields.keys():
            records.setdefault(
                fields["Package"],
                PackageRecord(
                    fields["Package"],
                    fields["Version"],
                    fields["SHA256"],
                    fields["Filename"],
                ),
            )
    missing = set(packages) - records.keys()
    if missing:
        raise GuestBuildError(
            f"apt knows no downloadable version of {', '.join(missing)}; "
            "run 'apt-get update' and build again"
        )
    return records


def resolve_kernel_package(meta: str = KERNEL_METAPACKAGE) -> str:
    """Return the versioned kernel package a metapackage depends on."""
    text = _run(["apt-cache", "depends", meta]).decode()
    for line in text.splitlines():
        kind, _, name = line.strip().partition(":")
        name = name.strip()
        if kind.endswith("Depends") and name.startswith("linux-image-"):
            return name
    raise GuestBuildError(
        f"{meta} depends on no linux-image package here; "
        "run 'apt-get update' and build again"
    )


def resolve_inputs() -> GuestInputs:
    """Look up every input of the build in the local apt index."""
    kernel = resolve_kernel_package()
    records = apt_records(kernel, BUSYBOX_PACKAGE)
    return GuestInputs(
        kernel=records[kernel],
        busybox=records[BUSYBOX_PACKAGE],
        scripts=guest_scripts(),
    )


def _sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_package(record: PackageRecord, cache: Path) -> Path:
    """Return the package's .deb, downloading it once into *cache*/debs."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    target = debs / Path(record.filename).name
    if target.exists() and _sha256(target) == record.sha256:
        log.debug("reusing %s", target)
        return target
    log.info("downloading %s %s", record.name, record.version)
    with tempfile.TemporaryDirectory(dir=debs, prefix=".get-") as tmp:
        _run(
            ["apt-get", "download", f"{record.name}={record.version}"],
            cwd=Path(tmp),
        )
        got = list(Path(tmp).glob("*.deb"))
        if len(got) != 1 or _sha256(got[0]) != record.sha256:
            raise GuestBuildError(
                f"the download of {record.name} does not match the apt "
                "index; run 'apt-get update' and build again"
            )
        os.replace(got[0], target)
    return target


def _unpack_deb(deb: Path, into: Path) -> None:
    """Extract a .deb's files (no maintainer scripts) into *into*."""
    into.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(into)])


# --- Kernel ----------------------------------------------------------------


def _lz4_legacy_frame(payload: bytes) -> bytes:
    """Return the LZ4 legacy frame without the size the kernel appends."""
    pos = len(_LZ4_LEGACY_MAGIC)
    while pos + 4 <= len(payload):
        (size,) = struct.unpack_from("<I", payload, pos)
        if size > _LZ4_LEGACY_BOUND or pos + 4 + size > len(payload):
            break
        pos += 4 + size
    return payload[:pos]


def decompress_payload(payload: bytes) -> bytes:
    """Decompress a bzImage payload, recognising its format by magic."""
    if payload.startswith(_LZ4_LEGACY_MAGIC):
        return _run(["lz4", "-dc"], input=_lz4_legacy_frame(payload))
    if payload.startswith(_GZIP_MAGIC):
        # wbits 16 + MAX_WBITS: gzip wrapper; trailing bytes are ignored.
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    if payload.startswith(_XZ_MAGIC):
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if payload.startswith(_ZSTD_MAGIC):
        return _run(["zstd", "-dcq"], input=payload)
    raise GuestBuildError(
        f"unknown kernel payload format (magic {payload[:6].hex()}); "
        "only LZ4, gzip, xz and zstd kernels are supported"
    )


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the uncompressed ELF kernel carried inside a bzImage."""
    setup_sects = bzimage[_SETUP_SECTS_OFFSET] or _DEFAULT_SETUP_SECTS
    (offset,) = struct.unpack_from("<I", bzimage, _PAYLOAD_OFFSET_FIELD)
    (length,) = struct.unpack_from("<I", bzimage, _PAYLOAD_LENGTH_FIELD)
    start = (setup_sects + 1) * _SECTOR + offset
    if length == 0 or start + length > len(bzimage):
        raise GuestBuildError(
            "the kernel image has no payload where its setup header "
            "says; is it an x86 bzImage (boot protocol 2.08 or later)?"
        )
    elf = decompress_payload(bzimage[start : start + length])
    check_vmlinux(elf)
    return elf


def check_vmlinux(elf: bytes) -> None:
    """Raise unless *elf* is a 64-bit x86_64 ELF executable."""
    if elf[:4] != _ELF_MAGIC or elf[4] != 2:  # EI_CLASS 2: 64-bit
        raise GuestBuildError(
            "the decompressed kernel is not a 64-bit ELF file"
        )
    (machine,) = struct.unpack_from("<H", elf, 18)  # e_machine
    if machine != _EM_X86_64:
        raise GuestBuildError(
            f"the kernel is built for ELF machine {machine:#x}, not x86_64"
        )


# --- Modules ---------------------------------------------------------------


def modinfo(ko: bytes) -> dict[str, list[str]]:
    """Return the ``.modinfo`` entries of a kernel module's ELF image."""
    check_vmlinux(ko)
    shoff = struct.unpack_from("<Q", ko, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        """Return name offset, file offset and size of a section."""
        base = shoff + index * shentsize
        name = struct.unpack_from("<I", ko, base)[0]
        offset, size = struct.unpack_from("<QQ", ko, base + 0x18)
        return name, offset, size

    _, names_at, _ = section(shstrndx)
    for index in range(shnum):
        name_off, offset, size = section(index)
        end = ko.index(b"\0", names_at + name_off)
        if ko[names_at + name_off : end] != b".modinfo":
            continue
        info: dict[str, list[str]] = {}
        for entry in ko[offset : offset + size].split(b"\0"):
            key, sep, value = entry.decode(errors="replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
        return info
    return {}


def module_depends(ko: bytes) -> list[str]:
    """Return the names of the modules that *ko* needs loaded first."""
    deps = modinfo(ko).get("depends", [""])[0]
    return [name for name in deps.split(",") if name]


def _module_name(path: Path) -> str:
    """Return a module's name from its file name (dashes as underscores)."""
    return path.name.split(".ko")[0].replace("-", "_")


def _read_module(path: Path) -> bytes:
    """Return a module file's ELF image, decompressing it if needed."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return _run(["zstd", "-dcq"], input=data)
    return data


def module_load_order(
    module_root: Path, wanted: Iterable[str]
) -> list[tuple[str, bytes]]:
    """Return (name, ELF image) of *wanted* and their deps, deps first."""
    files = {_module_name(p): p for p in module_root.rglob("*.ko*")}
    order: list[tuple[str, bytes]] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        """Depth-first: append a module after everything it needs."""
        if name in done:
            return
        if name in chain:
            raise GuestBuildError(f"module dependency loop: {chain}")
        if name not in files:
            raise GuestBuildError(
                f"kernel module {name} is not in the kernel package; "
                "is it built in? Remove it from WANTED_MODULES"
            )
        image = _read_module(files[name])
        for dep in module_depends(image):
            visit(dep, (*chain, name))
        done.add(name)
        order.append((name, image))

    for name in wanted:
        visit(name, ())
    return order


# --- newc cpio -------------------------------------------------------------


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc cpio archive."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def write_newc(entries: Iterable[CpioEntry]) -> bytes:
    """Return a newc cpio archive of *entries*, owned by root, time 0."""
    out = io.BytesIO()

    def pad() -> None:
        """Align the archive to four bytes."""
        out.write(b"\0" * (-out.tell() % 4))

    def member(ino: int, entry: CpioEntry) -> None:
        """Write one header, name and body."""
        name = entry.name.encode() + b"\0"
        fields = (
            ino,
            entry.mode,
            0,
            0,  # inode, mode, uid, gid
            2 if stat.S_ISDIR(entry.mode) else 1,  # links
            0,
            len(entry.data),
            0,
            0,  # mtime, size, dev major, minor
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,  # rdev, name, crc
        )
        out.write(_CPIO_MAGIC + b"".join(b"%08X" % f for f in fields))
        out.write(name)
        pad()
        out.write(entry.data)
        pad()

    for ino, entry in enumerate(entries, start=1):
        member(ino, entry)
    member(0, CpioEntry("TRAILER!!!", 0))
    return out.getvalue()


def read_newc(archive: bytes) -> dict[str, CpioEntry]:
    """Return the members of a newc cpio archive by name."""
    members: dict[str, CpioEntry] = {}
    pos = 0
    while True:
        if archive[pos : pos + 6] != _CPIO_MAGIC:
            raise ValueError(f"no newc header at offset {pos}")
        fields = [
            int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16)
            for i in range(13)
        ]
        mode, size, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = archive[pos : pos + namesize - 1].decode()
        pos += namesize + (-(pos + namesize) % 4)
        data = archive[pos : pos + size]
        pos += size + (-(pos + size) % 4)
        if name == "TRAILER!!!":
            return members
        members[name] = CpioEntry(name, mode, data, (fields[9], fields[10]))


# --- Building --------------------------------------------------------------


def busybox_applets(busybox: Path) -> list[str]:
    """Return the applets' install paths (``usr/bin/cat``…) of a busybox."""
    text = _run([str(busybox), "--list-full"]).decode()
    return [line.strip() for line in text.splitlines() if line.strip()]


def _relative_link(path: str, target: str) -> str:
    """Return the relative symlink text from *path* to *target*."""
    return os.path.relpath(target, os.path.dirname(path) or ".")


def _script_text(inputs: GuestInputs, name: str) -> str:
    """Return the text of one guest script from the inputs."""
    return dict(inputs.scripts)[name]


def build_initrd(
    busybox: Path,
    applets: list[str],
    modules: list[tuple[str, bytes]],
    mmio_devices: bool,
    init: str,
) -> bytes:
    """Return the gzip-compressed newc initrd."""
    dirs = [
        "bin",
        "dev",
        "etc",
        "lib",
        INITRD_MODULE_DIR,
        "newroot",
        "proc",
        "sys",
    ]
    entries = [CpioEntry(d, stat.S_IFDIR | 0o755) for d in dirs]
    entries.append(
        CpioEntry(
            "dev/console",
            stat.S_IFCHR | 0o600,
            rdev=(_CONSOLE_MAJOR, _CONSOLE_MINOR),
        )
    )
    entries.append(
        CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes())
    )
    for applet in sorted({Path(a).name for a in applets} - {"busybox"}):
        entries.append(
            CpioEntry(f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox")
        )
    order_lines = []
    for name, image in modules:
        entries.append(
            CpioEntry(
                f"{INITRD_MODULE_DIR}/{name}.ko", stat.S_IFREG | 0o644, image
            )
        )
        flag = ""
        if name == "virtio_mmio" and mmio_devices:
            flag = " " + CMDLINE_DEVICES_FLAG
        order_lines.append(name + flag + "\n")
    entries.append(
        CpioEntry(
            INITRD_MODULE_LIST,
            stat.S_IFREG | 0o644,
            "".join(order_lines).encode(),
        )
    )
    entries.append(CpioEntry("init", stat.S_IFREG | 0o755, init.encode()))
    return gzip.compress(write_newc(entries), compresslevel=9, mtime=0)


def _release_text(inputs: GuestInputs, release: str) -> str:
    """Return the /etc/fclab-release file naming this build."""
    return (
        "NAME=fclab-guest\n"
        f"BUILD_KEY={inputs.key()}\n"
        f"BUILDER_VERSION={inputs.builder}\n"
        f"KERNEL_RELEASE={release}\n"
        f"KERNEL_PACKAGE={inputs.kernel.name}={inputs.kernel.version}\n"
        f"BUSYBOX_PACKAGE={inputs.busybox.name}={inputs.busybox.version}\n"
    )


def populate_rootfs(
    tree: Path,
    busybox: Path,
    applets: list[str],
    inputs: GuestInputs,
    release: str,
) -> None:
    """Lay out the root file system's files under *tree*."""
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc/init.d",
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "root",
        "data",
        "var",
    ):
        (tree / d).mkdir(parents=True, exist_ok=True)
    (tree / "tmp").chmod(0o1777)
    (tree / "data").chmod(0o1777)
    (tree / "root").chmod(0o700)
    shutil.copyfile(busybox, tree / "bin/busybox")
    (tree / "bin/busybox").chmod(0o755)
    for applet in applets:
        if applet == "bin/busybox":
            continue
        link = tree / applet
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(_relative_link(applet, "bin/busybox"))
    (tree / "var/run").symlink_to("../run")
    for name, text in inputs.scripts:
        where, _, path = name.partition(":")
        if where != "rootfs":
            continue
        (tree / path).write_text(text)
        (tree / path).chmod(0o755 if "init.d/" in path else 0o644)
    (tree / "etc/hostname").write_text("task\n")
    (tree / "etc/fclab-release").write_text(_release_text(inputs, release))


def make_ext4(tree: Path, image: Path, size_mib: int, key: str) -> None:
    """Make an ext4 image of *tree* without root and without mounting."""
    # 4 KiB blocks and 256-byte inodes, as on bigger disks: mke2fs would
    # pick 1 KiB blocks and 128-byte inodes (2038 timestamps) this small.
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            "4096",
            "-I",
            "256",
            "-m",
            "0",
            "-L",
            "fclab-root",
            "-U",
            str(uuid.UUID(key.ljust(32, "0"))),
            "-E",
            "root_owner=0:0",
            "-d",
            str(tree),
            str(image),
            f"{size_mib}M",
        ]
    )
    if os.getuid() != 0:
        _chown_to_root(tree, image)


def _chown_to_root(tree: Path, image: Path) -> None:
    """Make every inode of *image* root-owned (mkfs copies our uid)."""
    commands = []
    for path in sorted(tree.rglob("*")):
        inside = "/" + path.relative_to(tree).as_posix()
        commands.append(f"sif {inside} uid 0\nsif {inside} gid 0\n")
    script = image.with_suffix(".debugfs")
    script.write_text("".join(commands))
    _run(["debugfs", "-w", "-f", str(script), str(image)])
    script.unlink()


def _build_set(inputs: GuestInputs, cache: Path, work: Path) -> Path:
    """Build all three images in *work*/out and return that folder."""
    kernel_deb = fetch_package(inputs.kernel, cache)
    busybox_deb = fetch_package(inputs.busybox, cache)
    kroot, broot = work / "kernel", work / "busybox"
    _unpack_deb(kernel_deb, kroot)
    _unpack_deb(busybox_deb, broot)
    out = work / "out"
    out.mkdir()

    # The kernel release is the name of the package's module folder.
    module_dirs = sorted((kroot / "lib/modules").iterdir())
    if len(module_dirs) != 1:
        raise GuestBuildError(
            f"{inputs.kernel.name} holds {len(module_dirs)} module "
            "folders, expected one"
        )
    release = module_dirs[0].name
    bzimages = list((kroot / "boot").glob("vmlinuz-*"))
    if len(bzimages) != 1:
        raise GuestBuildError(f"{inputs.kernel.name} holds no vmlinuz")
    log.info("extracting the ELF kernel of %s", release)
    elf = extract_vmlinux(bzimages[0].read_bytes())
    if f"Linux version {release}".encode() not in elf:
        raise GuestBuildError(
            f"the extracted kernel does not name release {release}"
        )
    (out / KERNEL_NAME).write_bytes(elf)
    del elf

    log.info("building the initrd")
    busybox = broot / "bin/busybox"
    applets = busybox_applets(busybox)
    modules = module_load_order(module_dirs[0] / "kernel", inputs.modules)
    mmio_devices = any(
        name == "virtio_mmio"
        and any(p.startswith("device:") for p in modinfo(img).get("parm", []))
        for name, img in modules
    )
    (out / INITRD_NAME).write_bytes(
        build_initrd(
            busybox,
            applets,
            modules,
            mmio_devices,
            _script_text(inputs, "initrd:init"),
        )
    )

    log.info("building the %d MiB ext4 root file system", inputs.rootfs_mib)
    tree = work / "rootfs"
    populate_rootfs(tree, busybox, applets, inputs, release)
    make_ext4(tree, out / ROOTFS_NAME, inputs.rootfs_mib, inputs.key())

    manifest = {
        "key": inputs.key(),
        "kernel_release": release,
        "inputs": dataclasses.asdict(inputs),
        "modules": [name for name, _ in modules],
        "files": {
            name: {
                "size": (out / name).stat().st_size,
                "sha256": _sha256(out / name),
            }
            for name in (KERNEL_NAME, INITRD_NAME, ROOTFS_NAME)
        },
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _images_in(folder: Path) -> GuestImages | None:
    """Return the complete set in *folder*, or None if there is none."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    images = GuestImages(
        kernel=folder / KERNEL_NAME,
        initrd=folder / INITRD_NAME,
        rootfs=folder / ROOTFS_NAME,
        kernel_release=manifest["kernel_release"],
    )
    for name, info in manifest["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != info["size"]:
            return None
    return images


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock so one process builds a set at a time."""
    with (folder / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def guest_dir(cache: Path | None = None) -> Path:
    """Return the folder holding the built guest sets."""
    folder = (cache or cache_dir()) / "guest"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def build_guest(
    cache: Path | None = None, *, force: bool = False
) -> GuestImages:
    """Build the guest images if needed and return their paths."""
    cache = cache or cache_dir()
    inputs = resolve_inputs()
    folder = guest_dir(cache)
    target = folder / inputs.key()
    if not force and (images := _images_in(target)):
        log.debug("reusing guest images in %s", target)
        return images

    with _build_lock(folder):
        if not force and (images := _images_in(target)):
            return images
        log.info("building guest images %s", inputs.key())
        with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as w:
            out = _build_set(inputs, cache, Path(w))
            # The whole set appears with one rename; an old set (forced
            # rebuild, or a leftover without manifest) is moved aside first.
            if target.exists():
                os.replace(target, Path(w) / "old")
            os.replace(out, target)
    images = _images_in(target)
    if images is None:
        raise GuestBuildError(f"the set built in {target} is incomplete")
    log.info("guest images ready in %s", target)
    return images


def main(argv: list[str] | None = None) -> int:
    """Build the guest images if needed and print their paths as JSON."""
    parser = argparse.ArgumentParser(
        prog="fclab-images", description=main.__doc__
    )
    parser.add_argument("--cache", type=Path, help="cache folder")
    parser.add_argument("--force", action="store_true", help="rebuild")
    return run_json_command(
        parser, argv,
        lambda args: build_guest(args.cache, force=args.force).as_dict(),
        log,
    )


if __name__ == "__main__":
    raise SystemExit(main())
