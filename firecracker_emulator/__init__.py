"""A program that serves Firecracker's API and runs the guest in QEMU.

``firecracker-emulator`` (or ``python -m firecracker_emulator``) accepts
Firecracker's command-line flags, answers Firecracker's HTTP API on a Unix
socket and, on InstanceStart, turns the configuration into one QEMU
command with Firecracker's device model (microvm, virtio-MMIO, i8042).
Nothing happens at import time.
"""

from __future__ import annotations

# The emulator's own release, and the Firecracker release whose API,
# messages and behaviour it follows.
__version__ = "0.1.0"
FIRECRACKER_VERSION = "1.16.1"

__all__ = ["FIRECRACKER_VERSION", "__version__"]
