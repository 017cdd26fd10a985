"""Conventions shared by the guest images and the host side.

The guest's init and the host agree on these: the line the guest prints
when it is ready, the kernel arguments it reads, and the MAC scheme that
carries the guest's IPv4 address (as Firecracker's CI images do).
"""

from __future__ import annotations

import ipaddress

# Printed on the serial console by the root filesystem's init once the
# workload answers: "FCLAB-READY task=<name> ip=<address or none>".
READY_MARKER = "FCLAB-READY"

# Kernel argument naming the task; the guest's web page shows it.
TASK_ARG = "fclab.task"

# Boot arguments that tutorials pass to Firecracker: serial console on,
# reboot through the keyboard controller (so the VMM exits), no PCI.
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"

# x86_64 boot-timer address since Firecracker v1.13, and the magic byte.
BOOT_TIMER_ADDR = 0xC0000000
BOOT_TIMER_MAGIC = 123

# Firecracker's CI images derive the guest IPv4 address from a MAC that
# starts with these two bytes and continues with the address's four.
MAC_PREFIX = "06:00"


def mac_for_ip(ip: str) -> str:
    """Return the ``06:00:a:b:c:d`` MAC that encodes IPv4 address *ip*."""
    packed = ipaddress.IPv4Address(ip).packed
    return MAC_PREFIX + ":" + ":".join(f"{b:02x}" for b in packed)


def ip_for_mac(mac: str) -> str:
    """Return the IPv4 address encoded in a ``06:00:…`` MAC."""
    parts = mac.lower().split(":")
    if len(parts) != 6 or ":".join(parts[:2]) != MAC_PREFIX:
        raise ValueError(
            f"MAC {mac!r} does not follow the {MAC_PREFIX}:<IPv4 bytes> "
            "scheme; build it with mac_for_ip()"
        )
    return str(ipaddress.IPv4Address(bytes(int(p, 16) for p in parts[2:])))
