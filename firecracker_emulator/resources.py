"""The microVM's configuration, checked as Firecracker checks it.

Each ``set_*``/``insert_*`` method takes a body already deserialized by
``serde`` and either records it or raises ``ActionError`` with the
message Firecracker gives. ``full_config()`` returns GET /vm/config.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import EmulatorError

# Firecracker limits a microVM to this many vCPUs.
MAX_VCPUS = 32
# Defaults Firecracker starts with before any PUT /machine-config.
DEFAULT_VCPUS = 1
DEFAULT_MEM_MIB = 128
# MTU bounds of the API description (the IPv4 minimum, the u16 maximum).
MIN_MTU = 68
MAX_MTU = 65535

# Firecracker's kernel command line when boot_args is absent (without PCI).
DEFAULT_BOOT_ARGS = (
    "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux "
    "i8042.dumbkbd swiotlb=noforce pci=off"
)

_MAC = re.compile(r"^([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}$")

# Linux interface names hold at most 15 bytes (IFNAMSIZ less the NUL).
MAX_IFNAME = 15
# ioctl(2) request and flags for attaching to a TAP device, as QEMU does:
# TUNSETIFF with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR.
TUNSETIFF = 0x400454CA
TAP_FLAGS = 0x0002 | 0x1000 | 0x4000


class ActionError(EmulatorError):
    """A request that Firecracker would answer with 400 and this text."""


# Firecracker is linked with musl, whose strerror() words a few errors
# differently from glibc's; its messages carry musl's words.
_MUSL_TEXT = {
    16: "Resource busy",  # EBUSY
    25: "Not a tty",  # ENOTTY
    98: "Address in use",  # EADDRINUSE
}


def os_error_text(err: OSError) -> str:
    """Format an OSError the way Firecracker's io::Error displays."""
    errno = err.errno or 0
    text = _MUSL_TEXT.get(errno) or (os.strerror(errno) if errno else str(err))
    return f"{text} (os error {errno})"


def _check_readable(path: str) -> OSError | None:
    """Open *path* for reading as Firecracker does; return the failure."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        return err
    os.close(fd)
    return None


def _probe_tap(name: str) -> None:
    """Attach to the TAP *name* and let go, as Firecracker's open does.

    Firecracker opens the TAP when the interface is configured, so a busy
    or forbidden device fails the PUT. A missing one is created by the
    kernel for as long as the descriptor lives, and so vanishes again.
    """
    import fcntl
    import struct

    if not name or len(name.encode()) > MAX_IFNAME:
        raise ActionError(
            "Network config error: Cannot open/create the tap device: "
            f"Invalid interface name {name!r}: use 1 to {MAX_IFNAME} bytes."
        )
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(
                fd, TUNSETIFF, struct.pack("16sH", name.encode(), TAP_FLAGS)
            )
        finally:
            os.close(fd)
    except OSError as err:
        raise ActionError(
            "Network config error: Cannot open/create the tap device: "
            "Open tap device failed: Error while creating ifreq structure: "
            f"{os_error_text(err)}. Invalid TUN/TAP Backend provided by "
            f"{name}. Check our documentation on setting up the network "
            "devices."
        ) from None


def _open_drive(path: str, read_only: bool) -> None:
    """Open a drive's file as Firecracker does, or fail with its text."""
    flags = os.O_RDONLY if read_only else os.O_RDWR
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as err:
        raise ActionError(
            "Drive config error: Unable to create the virtio block "
            "device: Virtio backend error: Error manipulating the "
            f"backing file: {os_error_text(err)} {path}"
        ) from None
    os.close(fd)


@dataclass
class MachineConfig:
    """PUT/PATCH /machine-config state."""

    vcpu_count: int = DEFAULT_VCPUS
    mem_size_mib: int = DEFAULT_MEM_MIB
    smt: bool = False
    cpu_template: str | None = None
    track_dirty_pages: bool = False
    huge_pages: str = "None"

    def as_json(self) -> dict[str, Any]:
        """Return Firecracker's MachineConfiguration object."""
        out: dict[str, Any] = {
            "vcpu_count": self.vcpu_count,
            "mem_size_mib": self.mem_size_mib,
            "smt": self.smt,
            "track_dirty_pages": self.track_dirty_pages,
            "huge_pages": self.huge_pages,
        }
        if self.cpu_template is not None:
            out["cpu_template"] = self.cpu_template
        return out


@dataclass
class BootSource:
    """PUT /boot-source state."""

    kernel_image_path: str
    initrd_path: str | None = None
    boot_args: str | None = None

    def as_json(self) -> dict[str, Any]:
        """Return Firecracker's BootSource object (absent keys left out)."""
        out: dict[str, Any] = {"kernel_image_path": self.kernel_image_path}
        if self.initrd_path is not None:
            out["initrd_path"] = self.initrd_path
        if self.boot_args is not None:
            out["boot_args"] = self.boot_args
        return out


@dataclass
class Drive:
    """One PUT /drives/{id} entry."""

    drive_id: str
    is_root_device: bool
    path_on_host: str
    is_read_only: bool
    partuuid: str | None = None
    cache_type: str = "Unsafe"
    io_engine: str = "Sync"
    rate_limiter: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        """Return Firecracker's Drive object."""
        out: dict[str, Any] = {
            "drive_id": self.drive_id,
            "is_root_device": self.is_root_device,
            "cache_type": self.cache_type,
            "is_read_only": self.is_read_only,
            "path_on_host": self.path_on_host,
            "io_engine": self.io_engine,
        }
        if self.partuuid is not None:
            out["partuuid"] = self.partuuid
        if self.rate_limiter is not None:
            out["rate_limiter"] = self.rate_limiter
        return out


@dataclass
class NetworkInterface:
    """One PUT /network-interfaces/{id} entry."""

    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None
    mtu: int | None = None
    rx_rate_limiter: dict[str, Any] | None = None
    tx_rate_limiter: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        """Return Firecracker's NetworkInterface object."""
        out: dict[str, Any] = {
            "iface_id": self.iface_id,
            "host_dev_name": self.host_dev_name,
        }
        for key in ("guest_mac", "mtu", "rx_rate_limiter", "tx_rate_limiter"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass
class Resources:
    """Everything configured before InstanceStart."""

    machine: MachineConfig = field(default_factory=MachineConfig)
    boot_source: BootSource | None = None
    drives: list[Drive] = field(default_factory=list)
    nets: list[NetworkInterface] = field(default_factory=list)
    metrics_path: str | None = None

    # ------------------------------------------------------ machine-config

    def update_machine(self, body: dict[str, Any]) -> None:
        """Apply a PUT (all fields present) or PATCH (some) update."""
        cur = self.machine
        vcpus = body.get("vcpu_count", cur.vcpu_count)
        smt = body.get("smt", cur.smt)
        if vcpus == 0 or vcpus > MAX_VCPUS or (
            smt and vcpus > 1 and vcpus % 2 == 1
        ):
            raise ActionError(
                "Machine config error: The number of vCPUs must be greater "
                f"than 0, less than {MAX_VCPUS} and must be 1 or an even "
                "number if SMT is enabled."
            )
        mem = body.get("mem_size_mib", cur.mem_size_mib)
        huge = body.get("huge_pages", cur.huge_pages)
        if mem == 0 or (huge == "2M" and mem % 2):
            raise ActionError(
                "Machine config error: The memory size (MiB) is either 0, "
                "or not a multiple of the configured page size."
            )
        template = body.get("cpu_template", "")
        if template == "":
            template = cur.cpu_template
        elif template == "None":
            template = None
        self.machine = MachineConfig(
            vcpu_count=vcpus,
            mem_size_mib=mem,
            smt=smt,
            cpu_template=template,
            track_dirty_pages=body.get(
                "track_dirty_pages", cur.track_dirty_pages
            ),
            huge_pages=huge,
        )

    # --------------------------------------------------------- boot-source

    def set_boot_source(self, body: dict[str, Any]) -> None:
        """Record the kernel, initrd and command line (files must open)."""
        err = _check_readable(body["kernel_image_path"])
        if err:
            raise ActionError(
                "Boot source error: The kernel file cannot be opened: "
                + os_error_text(err)
            )
        if "initrd_path" in body:
            err = _check_readable(body["initrd_path"])
            if err:
                raise ActionError(
                    "Boot source error: The initrd file cannot be opened "
                    "due to invalid path or invalid permissions. "
                    + os_error_text(err)
                )
        self.boot_source = BootSource(
            kernel_image_path=body["kernel_image_path"],
            initrd_path=body.get("initrd_path"),
            boot_args=body.get("boot_args"),
        )

    def kernel_cmdline(self) -> str:
        """Return the command line Firecracker would hand the kernel."""
        assert self.boot_source is not None
        args = self.boot_source.boot_args
        cmdline = DEFAULT_BOOT_ARGS if args is None else args
        root = self.root_drive()
        if root is not None:
            # Firecracker appends the root device after the user's
            # arguments: a PARTUUID when given, else the first virtio
            # disk, which is the root drive since it is always first.
            if root.partuuid:
                cmdline += f" root=PARTUUID={root.partuuid}"
            else:
                cmdline += " root=/dev/vda"
            cmdline += " ro" if root.is_read_only else " rw"
        return cmdline

    # -------------------------------------------------------------- drives

    def root_drive(self) -> Drive | None:
        """Return the root drive, which Firecracker keeps first."""
        if self.drives and self.drives[0].is_root_device:
            return self.drives[0]
        return None

    def insert_drive(self, body: dict[str, Any]) -> None:
        """Add or replace a drive, keeping the root drive first."""
        if "socket" in body:
            raise ActionError(
                "The requested operation is not supported: vhost-user "
                "block devices (the drive's `socket` field) are not "
                "emulated by firecracker-emulator."
            )
        if "path_on_host" not in body or "is_read_only" not in body:
            raise ActionError(
                "Drive config error: Unable to create the virtio block "
                "device: Virtio backend error: a virtio-block drive needs "
                "both `path_on_host` and `is_read_only`."
            )
        drive_id = body["drive_id"]
        index = next(
            (i for i, d in enumerate(self.drives) if d.drive_id == drive_id),
            None,
        )
        root = self.root_drive()
        if body["is_root_device"] and root and index != 0:
            raise ActionError(
                "Drive config error: A root block device already exists!"
            )
        path = body["path_on_host"]
        _open_drive(path, body["is_read_only"])
        drive = Drive(
            drive_id=drive_id,
            is_root_device=body["is_root_device"],
            path_on_host=path,
            is_read_only=body["is_read_only"],
            partuuid=body.get("partuuid"),
            cache_type=body.get("cache_type", "Unsafe"),
            io_engine=body.get("io_engine", "Sync"),
            rate_limiter=body.get("rate_limiter"),
        )
        if index is None:
            if drive.is_root_device:
                self.drives.insert(0, drive)
            else:
                self.drives.append(drive)
        else:
            self.drives[index] = drive
            if drive.is_root_device and index != 0:
                self.drives.insert(0, self.drives.pop(index))

    def recheck_files(self) -> None:
        """Check that the kernel, initrd and drives still open."""
        assert self.boot_source is not None
        self.set_boot_source(self.boot_source.as_json())
        for drive in self.drives:
            _open_drive(drive.path_on_host, drive.is_read_only)

    def find_drive(self, drive_id: str) -> Drive:
        """Return the drive with *drive_id* or fail as Firecracker does."""
        for drive in self.drives:
            if drive.drive_id == drive_id:
                return drive
        raise ActionError(
            "Drive config error: Unable to patch the block device: "
            f"Device manager error: Invalid device ID: {drive_id} "
            "Please verify the request arguments."
        )

    # ---------------------------------------------------------------- nets

    def insert_net(self, body: dict[str, Any]) -> None:
        """Add or replace a network interface."""
        mac = body.get("guest_mac")
        if mac is not None and not _MAC.match(mac):
            raise ActionError(
                "An error occurred when deserializing the json body of a "
                f"request: invalid value: string {mac!r}, expected a MAC "
                "address of the form xx:xx:xx:xx:xx:xx."
            )
        mtu = body.get("mtu")
        if mtu is not None and not MIN_MTU <= mtu <= MAX_MTU:
            raise ActionError(
                "Network config error: Could not create the network "
                f"device: The MTU {mtu} is out of range: it must lie "
                f"between {MIN_MTU} and {MAX_MTU}."
            )
        iface_id = body["iface_id"]
        for other in self.nets:
            if other.iface_id == iface_id:
                continue
            if mac and other.guest_mac and other.guest_mac.lower() == (
                mac.lower()
            ):
                raise ActionError(
                    "Network config error: The MAC address is already in "
                    f"use: {mac}"
                )
            if other.host_dev_name == body["host_dev_name"]:
                raise ActionError(
                    "Network config error: Cannot open/create the tap "
                    "device: Open tap device failed: Error while creating "
                    "ifreq structure: Resource busy (os error 16). Invalid "
                    f"TUN/TAP Backend provided by {other.host_dev_name}. "
                    "Check our documentation on setting up the network "
                    "devices."
                )
        _probe_tap(body["host_dev_name"])
        net = NetworkInterface(
            iface_id=iface_id,
            host_dev_name=body["host_dev_name"],
            guest_mac=mac,
            mtu=mtu,
            rx_rate_limiter=body.get("rx_rate_limiter"),
            tx_rate_limiter=body.get("tx_rate_limiter"),
        )
        for i, other in enumerate(self.nets):
            if other.iface_id == iface_id:
                self.nets[i] = net
                return
        self.nets.append(net)

    def find_net(self, iface_id: str) -> NetworkInterface:
        """Return the interface with *iface_id* or fail."""
        for net in self.nets:
            if net.iface_id == iface_id:
                return net
        raise ActionError(
            "Network config error: Unable to update the net device: "
            f"Device manager error: Invalid device ID: {iface_id}"
        )

    # ------------------------------------------------------------- export

    def full_config(self, logger: dict[str, Any] | None) -> dict[str, Any]:
        """Return GET /vm/config: Firecracker's keys, absent ones omitted."""
        out: dict[str, Any] = {
            "drives": [d.as_json() for d in self.drives],
            "machine-config": self.machine.as_json(),
            "network-interfaces": [n.as_json() for n in self.nets],
        }
        if self.boot_source is not None:
            out["boot-source"] = self.boot_source.as_json()
        if logger is not None:
            out["logger"] = logger
        if self.metrics_path is not None:
            out["metrics"] = {"metrics_path": self.metrics_path}
        return out
