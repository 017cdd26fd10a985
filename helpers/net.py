"""Task networking: a subnet's addresses, one namespace and TAP per task.

The model follows Fargate's ``awsvpc`` mode. A :class:`Subnet` hands out
private addresses the way a VPC subnet does, keeping AWS's five
reservations. A :class:`TaskNetwork` gives one task its own network
namespace (its slice of the VPC) holding a TAP device (its ENI). The TAP's
host side carries the subnet's router address, the guest gets the next
free address, and the guest's MAC carries that address too
(``06:00:<four IPv4 bytes>``, as in Firecracker's CI images).

Nothing leaves the namespaces: two tasks cannot reach each other and the
host's own networks never see the traffic. Egress to the outside is a
separate opt-in (:class:`Egress`) that tests and notebooks never use.

Probes from the host side (:func:`ping`, :func:`http_get`) run inside a
task's namespace through ``ip netns exec``, the same way the VMM is
started there; :func:`http_get` runs a short-lived Python child that uses
``requests`` (Python 3.11 has no ``os.setns``).
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from helpers.errors import LabError
from helpers.guest import mac_for_ip
from helpers.paths import REPO_ROOT

if TYPE_CHECKING:
    from typing import Self

    from helpers.vm import NetworkInterface

log = logging.getLogger(__name__)

# AWS accepts IPv4 subnet blocks from /16 (65,536 addresses) to /28 (16).
MIN_PREFIXLEN = 16
MAX_PREFIXLEN = 28

# Every namespace, and any stray device, the lab makes starts with this.
NETNS_PREFIX = "fclab-"

# The task's ENI inside its namespace; each namespace has its own, so every
# task can use the same name, as every Firecracker test VM does.
TAP_NAME = "tap0"

# Firecracker's iface_id (letters, digits and "_") and the guest's device.
IFACE_ID = "eth0"
GUEST_DEVICE = "eth0"

# Capability bit numbers (linux/capability.h) read from CapEff.
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21

# Records which process owns each lab namespace, so a cleanup can tell an
# interrupted run's leftovers from a namespace another notebook still uses.
OWNER_DIR = Path("/run/fclab")

# An `ip` call finishes in milliseconds; one still running after this many
# seconds is stuck and gets reported instead of hanging the notebook.
IP_TIMEOUT = 30.0

# Seconds a process inside a namespace gets after SIGTERM before SIGKILL.
TERM_GRACE = 3.0

# The task networks this process holds open, by namespace name, so a
# cleanup can close them properly (a notebook re-run in the same kernel).
_OPEN: weakref.WeakValueDictionary[str, TaskNetwork] = (
    weakref.WeakValueDictionary())

# Task names become namespace names and kernel arguments: keep them plain.
_TASK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")


class NetworkError(LabError):
    """Base class of the networking errors."""


class InvalidSubnetError(NetworkError):
    """A CIDR block that AWS would not accept as a subnet."""


class SubnetExhaustedError(NetworkError):
    """Every usable address of a subnet is taken."""

    def __init__(self, subnet: Subnet, task: str) -> None:
        self.cidr = str(subnet.network)
        self.size = subnet.size
        self.reserved_count = len(subnet.reserved)
        self.in_use_count = len(subnet.in_use)
        self.task = task
        bigger = subnet.network.supernet()
        super().__init__(
            f"Subnet {self.cidr} has no free address for task {task!r}: "
            f"the block has {self.size} addresses, AWS reserves "
            f"{self.reserved_count} of them, and all {self.in_use_count} "
            f"usable ones are in use. Stop a task, launch into a larger "
            f"subnet (a /{bigger.prefixlen} such as {bigger} has "
            f"{bigger.num_addresses - self.reserved_count} usable "
            "addresses), or spread the service over more subnets."
        )


class NetworkPermissionError(NetworkError):
    """This process may not create namespaces and TAP devices."""

    def __init__(self, message: str, commands: list[str]) -> None:
        super().__init__(message)
        self.commands = commands


class NetCommandError(NetworkError):
    """An ``ip`` (or similar) command failed."""

    def __init__(self, command: str, returncode: int, output: str,
                 hint: str) -> None:
        self.command = command
        self.returncode = returncode
        self.output = output
        super().__init__(
            f"{command!r} failed with exit code {returncode}: "
            f"{output.strip() or '(no output)'}. {hint}"
        )


class NamespaceBusyError(NetworkError):
    """The task's namespace already exists."""


class HttpProbeError(NetworkError):
    """An HTTP request from inside a task's namespace got no answer."""

    def __init__(self, url: str, netns: str, reason: str,
                 detail: str = "") -> None:
        self.url = url
        self.netns = netns
        self.reason = reason
        # The HTTP library's own account, every wrapper included.
        self.detail = detail or reason
        super().__init__(
            f"GET {url} from namespace {netns} failed: {reason}. "
            "Is the guest up and its address inside this task's subnet?"
        )


# --------------------------------------------------------------- subnet


@dataclass(frozen=True)
class AddressRow:
    """One address of a subnet and what it is used for."""

    address: str
    role: str
    task: str = ""


class Subnet:
    """A VPC subnet's IPv4 addresses: AWS's reservations, then one per task.

    AWS reserves the first four addresses and the last one of every
    subnet; the rest go to ENIs, one per Fargate task. Addresses are handed
    out lowest first, and a released address is reused (AWS picks them in
    no promised order; lowest-first keeps the lab's output stable).
    Blocks outside /16 to /28 are refused, as AWS refuses them.
    """

    def __init__(self, cidr: str) -> None:
        """Check *cidr* and prepare an empty allocation table."""
        try:
            network = ipaddress.ip_network(cidr, strict=True)
        except ValueError as exc:
            raise InvalidSubnetError(
                f"{cidr!r} is not a valid IPv4 CIDR block ({exc}). Write "
                "the network address and prefix, such as 10.0.0.0/24."
            ) from exc
        if not isinstance(network, ipaddress.IPv4Network):
            raise InvalidSubnetError(
                f"{cidr} is IPv6; this lab models IPv4 subnets only. Use a "
                "block such as 10.0.0.0/24."
            )
        if not MIN_PREFIXLEN <= network.prefixlen <= MAX_PREFIXLEN:
            raise InvalidSubnetError(
                f"{cidr}: AWS accepts subnet sizes from /{MIN_PREFIXLEN} "
                f"to /{MAX_PREFIXLEN} only. Pick a prefix length in that "
                "range, such as /24 (251 task addresses) or /28 (11)."
            )
        self.network: ipaddress.IPv4Network = network
        self._by_task: dict[str, ipaddress.IPv4Address] = {}

    def __repr__(self) -> str:
        """Show the block and its use."""
        return (f"Subnet({str(self.network)!r}: {len(self._by_task)} in "
                f"use, {self.available} available)")

    @property
    def size(self) -> int:
        """Number of addresses in the block, reserved ones included."""
        return self.network.num_addresses

    @property
    def router(self) -> ipaddress.IPv4Address:
        """The VPC router's address (network address + 1)."""
        return self.network.network_address + 1

    @property
    def netmask(self) -> ipaddress.IPv4Address:
        """The subnet mask, such as 255.255.255.0."""
        return self.network.netmask

    @property
    def reserved(self) -> dict[ipaddress.IPv4Address, str]:
        """AWS's five reserved addresses, each with its reason."""
        base = self.network.network_address
        return {
            base: "network address",
            base + 1: "VPC router",
            base + 2: "Amazon DNS server",
            base + 3: "reserved by AWS for future use",
            # A VPC carries no broadcast, yet AWS keeps the address.
            self.network.broadcast_address: "broadcast (unused in a VPC)",
        }

    @property
    def usable(self) -> int:
        """Number of addresses tasks can get."""
        return self.size - len(self.reserved)

    @property
    def in_use(self) -> dict[str, ipaddress.IPv4Address]:
        """The address of every task that holds one."""
        return dict(self._by_task)

    @property
    def available(self) -> int:
        """Number of addresses still free for new tasks."""
        return self.usable - len(self._by_task)

    def allocate(self, task: str) -> ipaddress.IPv4Address:
        """Give *task* the lowest free address (the same one if it has one).

        Asking twice for the same task returns its current address: one
        task has one ENI, so it never holds two addresses.
        """
        if task in self._by_task:
            log.debug("task %s already holds %s", task, self._by_task[task])
            return self._by_task[task]
        taken = set(self._by_task.values()) | set(self.reserved)
        for address in self.network:
            if address not in taken:
                self._by_task[task] = address
                log.debug("gave %s to task %s", address, task)
                return address
        raise SubnetExhaustedError(self, task)

    def release(self, task: str) -> ipaddress.IPv4Address | None:
        """Free *task*'s address; return it, or None if it held none."""
        address = self._by_task.pop(task, None)
        if address is not None:
            log.debug("released %s from task %s", address, task)
        return address

    def owner(self, address: str | ipaddress.IPv4Address) -> str | None:
        """The task holding *address*, or None."""
        wanted = ipaddress.IPv4Address(address)
        for task, held in self._by_task.items():
            if held == wanted:
                return task
        return None

    def table(self, limit: int = 256) -> list[AddressRow]:
        """Every address of the block with its role (small blocks only)."""
        if self.size > limit:
            raise InvalidSubnetError(
                f"{self.network} has {self.size} addresses; table() lists "
                f"at most {limit}. Pass a larger limit on purpose."
            )
        reserved = self.reserved
        rows = []
        for address in self.network:
            if address in reserved:
                rows.append(AddressRow(str(address), reserved[address]))
                continue
            task = self.owner(address)
            role = "task ENI" if task else "free"
            rows.append(AddressRow(str(address), role, task or ""))
        return rows


# ---------------------------------------------------------- permissions


def read_cap_eff(status_text: str | None = None) -> int:
    """The effective capability mask from ``/proc/self/status`` text."""
    if status_text is None:
        status_text = Path("/proc/self/status").read_text()
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


@dataclass(frozen=True)
class NetPrivileges:
    """What this process may do to the network: uid and capabilities."""

    euid: int
    cap_eff: int
    user: str

    @classmethod
    def current(cls) -> NetPrivileges:
        """Read this process's privileges."""
        euid = os.geteuid()
        try:
            user = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            user = str(os.getuid())
        return cls(euid=euid, cap_eff=read_cap_eff(), user=user)

    def has(self, cap: int) -> bool:
        """True if capability number *cap* is effective."""
        return bool(self.cap_eff >> cap & 1)

    @property
    def missing(self) -> list[str]:
        """Names of the capabilities a task network needs but lacks."""
        needed = {"CAP_NET_ADMIN": CAP_NET_ADMIN,
                  "CAP_SYS_ADMIN": CAP_SYS_ADMIN}
        return [name for name, bit in needed.items() if not self.has(bit)]


def require_privileges(privileges: NetPrivileges,
                       commands: Sequence[str]) -> None:
    """Raise :class:`NetworkPermissionError` unless *privileges* suffice.

    Making TAP devices and setting addresses needs CAP_NET_ADMIN; creating
    and entering a named namespace needs CAP_SYS_ADMIN (``ip netns add``
    bind-mounts it under /run/netns). Root has both.
    """
    missing = privileges.missing
    if not missing:
        return
    sudo = [f"sudo {cmd}" for cmd in commands]
    netns = next((c.split()[-1] for c in commands
                  if c.startswith("ip netns add")), "fclab-TASK")
    lines = [
        (f"This process (uid {privileges.euid}) lacks "
         f"{' and '.join(missing)}, so it cannot give a task its own "
         "network namespace and TAP device."),
        "Run the notebook server with those capabilities, as root:",
        '    sudo -E "$(command -v jupyter)" lab --allow-root',
        "or in a container started with",
        "    --cap-add NET_ADMIN --cap-add SYS_ADMIN --device /dev/net/tun",
        "To see what this step does, run its commands once by hand:",
        *(f"    {cmd}" for cmd in sudo),
        "and remove everything again with",
        f"    sudo ip netns del {netns}",
        ("The VMM itself must start inside the namespace (Firecracker's "
         "jailer enters it as root with --netns, then drops privileges), "
         "so the notebook needs the capabilities, not only a TAP device "
         "you own."),
    ]
    raise NetworkPermissionError("\n".join(lines), sudo)


# ------------------------------------------------------------- commands


def _run(argv: Sequence[str], *, hint: str, check: bool = True,
         timeout: float = IP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run *argv*, raising :class:`NetCommandError` when it fails."""
    command = shlex.join(argv)
    log.debug("running %s", command)
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL, check=False,
        )
    except FileNotFoundError as exc:
        raise NetCommandError(
            command, 127, str(exc),
            f"Install the program that provides {argv[0]!r}.",
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise NetCommandError(
            command, -1, f"no answer after {timeout:.0f} s", hint,
        ) from exc
    if check and done.returncode != 0:
        raise NetCommandError(
            command, done.returncode, done.stderr + done.stdout, hint)
    return done


def list_netns(prefix: str = NETNS_PREFIX) -> list[str]:
    """Names of the network namespaces that start with *prefix*."""
    out = _run(["ip", "netns", "list"], hint="Is iproute2 installed?").stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(prefix))


def netns_pids(netns: str) -> list[int]:
    """PIDs of the processes living in namespace *netns* (zombies left out).

    Compares each process's ``/proc/PID/ns/net`` with the namespace's
    bind mount, as ``ip netns pids`` does.
    """
    try:
        target = os.stat(f"/run/netns/{netns}")
    except FileNotFoundError:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ns = os.stat(entry / "ns" / "net")
            if (ns.st_dev, ns.st_ino) != (target.st_dev, target.st_ino):
                continue
            if _is_zombie(int(entry.name)):
                continue
        except OSError:
            continue
        pids.append(int(entry.name))
    return sorted(pids)


def process_running(pid: int) -> bool:
    """True if process *pid* exists and has not exited."""
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """True if *pid* has exited and waits to be reaped (or is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The state letter follows the command name, which sits in parentheses.
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _stop_processes(pids: Sequence[int], netns: str) -> list[int]:
    """SIGTERM, then SIGKILL, the processes still inside *netns*."""
    stopped: list[int] = []
    for pid in pids:
        log.warning("process %d still runs in %s; stopping it", pid, netns)
        try:
            os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + TERM_GRACE
    while time.monotonic() < deadline:
        if not any(not _is_zombie(pid) for pid in stopped):
            return stopped
        time.sleep(0.05)
    for pid in stopped:
        if not _is_zombie(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return stopped


def _process_start(pid: int) -> str | None:
    """The start time of *pid* in clock ticks, to detect reused PIDs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) counted after the parenthesised command name.
    return stat.rsplit(")", 1)[1].split()[19]


def _write_owner(netns: str, owner_dir: Path) -> None:
    """Note that this process owns namespace *netns*."""
    owner_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()} {_process_start(os.getpid())}\n"
    (owner_dir / netns).write_text(stamp)


def _owner_alive(netns: str, owner_dir: Path) -> int | None:
    """PID of the live process (not this one) that owns *netns*, if any."""
    try:
        pid_text, start = (owner_dir / netns).read_text().split()
    except (OSError, ValueError):
        return None
    pid = int(pid_text)
    if pid == os.getpid():
        return None
    if _is_zombie(pid) or _process_start(pid) != start:
        return None
    return pid


def _forget_owner(netns: str, owner_dir: Path) -> None:
    """Drop the ownership note of *netns*."""
    try:
        (owner_dir / netns).unlink()
    except FileNotFoundError:
        pass


def _remove_netns(netns: str, owner_dir: Path) -> None:
    """Stop what runs in *netns*, then delete it (an exit-time fallback)."""
    log.warning("removing namespace %s that was never closed", netns)
    _stop_processes(netns_pids(netns), netns)
    _run(["ip", "netns", "del", netns], check=False, hint="")
    _forget_owner(netns, owner_dir)


# ---------------------------------------------------------- task network


class TaskNetwork:
    """One task's network: a namespace with a TAP device and an address.

    Entering the context creates ``fclab-<task>`` with ``tap0`` inside it,
    gives the TAP the subnet's router address and takes the next free
    address for the guest. Leaving it, on any exit, stops whatever still
    runs in the namespace, deletes the namespace (which removes the TAP)
    and returns the address to the subnet. Every command run is kept in
    :attr:`commands`, as a shell would show it.
    """

    def __init__(self, task: str, subnet: Subnet, *,
                 prefix: str = NETNS_PREFIX,
                 privileges: NetPrivileges | None = None,
                 owner_dir: Path = OWNER_DIR) -> None:
        """Describe the network of *task*; nothing is created yet."""
        if not _TASK_RE.match(task):
            raise NetworkError(
                f"Task name {task!r} cannot name a namespace: use up to 32 "
                "letters, digits, '-' or '_', starting with a letter or "
                "digit."
            )
        self.task = task
        self.subnet = subnet
        self.netns = f"{prefix}{task}"
        self.tap = TAP_NAME
        self.commands: list[str] = []
        self.address: ipaddress.IPv4Address | None = None
        self._privileges = privileges
        self._owner_dir = owner_dir
        self._created = False
        self._finalizer: (
            weakref.finalize[[str, Path], TaskNetwork] | None) = None

    def __repr__(self) -> str:
        """Name the task, namespace and address."""
        return (f"TaskNetwork(task={self.task!r}, netns={self.netns!r}, "
                f"address={self.address})")

    # The guest-facing values --------------------------------------------

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The host side of the TAP: the subnet's router address."""
        return self.subnet.router

    @property
    def guest_address(self) -> ipaddress.IPv4Address:
        """The guest's address (the network must be open)."""
        if self.address is None:
            raise NetworkError(
                f"{self!r} is not open: use it in a with-block first.")
        return self.address

    @property
    def mac(self) -> str:
        """The guest's MAC, ``06:00:`` followed by its IPv4 bytes."""
        return mac_for_ip(str(self.guest_address))

    @property
    def boot_arg(self) -> str:
        """The ``ip=`` kernel argument that configures the guest's eth0."""
        return (f"ip={self.guest_address}::{self.gateway}:"
                f"{self.subnet.netmask}::{GUEST_DEVICE}:off")

    @property
    def interfaces(self) -> tuple[NetworkInterface, ...]:
        """The MicroVM's network interfaces: the TAP as the guest's eth0."""
        # Imported here: the probe child (python -m helpers.net) stays light.
        from helpers.vm import NetworkInterface

        return (NetworkInterface(IFACE_ID, self.tap, self.mac),)

    def vm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that put a MicroVM on this network."""
        return {"interfaces": self.interfaces, "netns": self.netns,
                "extra_boot_args": self.boot_arg}

    # Creating and removing ----------------------------------------------

    def planned_commands(self, user: str | None = None) -> list[str]:
        """The ``ip`` commands that build this network, in order."""
        owner = f" user {user}" if user else ""
        prefixlen = self.subnet.network.prefixlen
        return [
            f"ip netns add {self.netns}",
            f"ip -n {self.netns} link set lo up",
            f"ip -n {self.netns} tuntap add dev {self.tap} mode tap{owner}",
            (f"ip -n {self.netns} addr add {self.gateway}/{prefixlen} "
             f"dev {self.tap}"),
            f"ip -n {self.netns} link set {self.tap} up",
        ]

    def open(self) -> None:
        """Create the namespace and TAP; undo everything if a step fails."""
        privileges = self._privileges or NetPrivileges.current()
        require_privileges(
            privileges, self.planned_commands(user=privileges.user))
        if os.path.exists(f"/run/netns/{self.netns}"):
            raise NamespaceBusyError(
                f"Namespace {self.netns} already exists: an earlier run was "
                "interrupted, or another notebook runs this task. Call "
                "cleanup_leftovers() or choose another task name."
            )
        self.address = self.subnet.allocate(self.task)
        try:
            for command in self.planned_commands():
                self._ip(command)
                if command.startswith("ip netns add"):
                    self._created = True
                    _OPEN[self.netns] = self
                    # Also removed when the interpreter exits (a notebook
                    # kernel shut down before its cleanup cell ran).
                    self._finalizer = weakref.finalize(
                        self, _remove_netns, self.netns, self._owner_dir)
                    _write_owner(self.netns, self._owner_dir)
        except BaseException:
            self.close()
            raise
        log.info("task %s: namespace %s, %s on %s, guest %s", self.task,
                 self.netns, self.gateway, self.tap, self.address)

    def close(self) -> list[int]:
        """Remove the namespace and free the address; safe to repeat.

        Returns the PIDs of processes that still ran inside the namespace
        and had to be stopped (normally none: the VM closes first).
        """
        stopped: list[int] = []
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        try:
            if self._created:
                stopped = _stop_processes(netns_pids(self.netns), self.netns)
                if os.path.exists(f"/run/netns/{self.netns}"):
                    self._ip(f"ip netns del {self.netns}", hint=(
                        "Remove it with cleanup_leftovers(), or by hand: "
                        f"sudo ip netns del {self.netns}"))
        finally:
            # Even if the delete failed: without an owner note the
            # namespace counts as a leftover that cleanup_leftovers removes.
            if self._created:
                _forget_owner(self.netns, self._owner_dir)
                _OPEN.pop(self.netns, None)
                self._created = False
            if self.address is not None:
                self.subnet.release(self.task)
                self.address = None
        return stopped

    def __enter__(self) -> Self:
        """Create the network."""
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Remove the network, whatever happened inside the block."""
        self.close()

    def _ip(self, command: str, hint: str | None = None) -> None:
        """Run one ``ip`` command and keep it in :attr:`commands`."""
        self.commands.append(command)
        _run(shlex.split(command), hint=hint or (
            f"The task network of {self.task!r} could not be built; "
            "nothing of it is left behind. Check that iproute2 and "
            "/dev/net/tun exist."))


# ------------------------------------------------------------ leftovers


@dataclass
class Leftovers:
    """What an interrupted run left: namespaces, devices, processes."""

    namespaces: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    processes: dict[str, list[int]] = field(default_factory=dict)
    in_use: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        """True if anything was found."""
        return bool(self.namespaces or self.devices or self.processes)


def _root_devices(prefix: str) -> list[str]:
    """TAP and veth devices in this namespace whose names start *prefix*."""
    out = _run(["ip", "-j", "-d", "link", "show"],
               hint="Is iproute2 installed?").stdout
    names = []
    for link in json.loads(out or "[]"):
        kind = link.get("linkinfo", {}).get("info_kind")
        name = link.get("ifname", "")
        if kind in ("tun", "veth") and name.startswith(prefix):
            names.append(name)
    return sorted(names)


def find_leftovers(prefix: str = NETNS_PREFIX,
                   owner_dir: Path = OWNER_DIR) -> Leftovers:
    """List the lab's namespaces and stray devices, without removing any.

    A namespace whose owner process still runs (another notebook, say)
    goes to ``in_use`` instead of ``namespaces``.
    """
    found = Leftovers()
    for netns in list_netns(prefix):
        owner = _owner_alive(netns, owner_dir)
        if owner is not None:
            found.in_use.append(netns)
            continue
        found.namespaces.append(netns)
        pids = netns_pids(netns)
        if pids:
            found.processes[netns] = pids
    found.devices = _root_devices(prefix)
    return found


def cleanup_leftovers(prefix: str = NETNS_PREFIX, *, force: bool = False,
                      owner_dir: Path = OWNER_DIR) -> Leftovers:
    """Remove what an interrupted run left behind; return what was removed.

    Processes inside a leftover namespace are stopped, the namespace is
    deleted (taking its TAP along) and stray TAP or veth devices named
    *prefix*… in this namespace are deleted. Namespaces still owned by
    another live process are kept unless *force* is true.
    """
    found = find_leftovers(prefix, owner_dir)
    if force:
        found.namespaces += found.in_use
        found.in_use = []
    for netns in found.in_use:
        log.info("keeping %s: its owner process still runs", netns)
    for netns in found.namespaces:
        network = _OPEN.get(netns)
        if network is not None:
            # Still open in this process (an earlier run of the same
            # notebook kernel): close it, which also frees its address.
            log.warning("closing %r left open by an earlier run", network)
            stopped = network.close()
            if stopped:
                found.processes[netns] = stopped
            continue
        pids = netns_pids(netns)
        if pids:
            found.processes[netns] = _stop_processes(pids, netns)
        log.warning("removing leftover namespace %s", netns)
        _run(["ip", "netns", "del", netns], check=False,
             hint="Remove it by hand with: sudo ip netns del NAME")
        _forget_owner(netns, owner_dir)
    for device in found.devices:
        log.warning("removing leftover device %s", device)
        _run(["ip", "link", "del", device], check=False,
             hint="Remove it by hand with: sudo ip link del NAME")
    return found


# --------------------------------------------------------------- probes


@dataclass(frozen=True)
class PingResult:
    """The summary of one ``ping`` run."""

    source: str
    address: str
    transmitted: int
    received: int
    loss_percent: float
    rtt_min_ms: float | None
    rtt_avg_ms: float | None
    rtt_max_ms: float | None
    output: str = field(repr=False)

    @property
    def ok(self) -> bool:
        """True if at least one reply came back."""
        return self.received > 0

    def summary(self) -> dict[str, Any]:
        """The figures without the raw output, for a table or a record."""
        return {"from": self.source, "to": self.address,
                "sent": self.transmitted, "received": self.received,
                "loss %": self.loss_percent, "rtt avg ms": self.rtt_avg_ms,
                "ok": self.ok}


_COUNTS_RE = re.compile(
    r"(\d+) packets transmitted, (\d+) (?:packets )?received.*?"
    r"([\d.]+)% packet loss")
_RTT_RE = re.compile(
    r"(?:rtt|round-trip) min/avg/max(?:/mdev)? = "
    r"([\d.]+)/([\d.]+)/([\d.]+)")


def parse_ping(output: str, *, source: str, address: str) -> PingResult:
    """Read the summary of iputils or busybox ``ping`` output."""
    counts = _COUNTS_RE.search(output)
    if counts is None:
        raise NetworkError(
            f"No ping summary found in this output:\n{output.strip()}\n"
            "Check that ping ran (iputils-ping on the host, busybox in "
            "the guest)."
        )
    rtt = _RTT_RE.search(output)
    low, avg, high = ((float(x) for x in rtt.groups()) if rtt
                      else (None, None, None))
    return PingResult(
        source=source, address=address,
        transmitted=int(counts.group(1)), received=int(counts.group(2)),
        loss_percent=float(counts.group(3)),
        rtt_min_ms=low, rtt_avg_ms=avg, rtt_max_ms=high, output=output,
    )


def ping(netns: str, address: str | ipaddress.IPv4Address, *,
         count: int = 1, timeout: float = 2.0) -> PingResult:
    """Ping *address* from inside namespace *netns*.

    *timeout* is how long each reply is awaited, in seconds. A ping that
    gets no reply is a result (``ok`` false), not an error.
    """
    argv = ["ip", "netns", "exec", netns, "ping", "-n", "-c", str(count),
            "-W", f"{timeout:g}", str(address)]
    if count > 1:
        # 0.2 s is the shortest interval iputils allows without root.
        argv[6:6] = ["-i", "0.2"]
    done = _run(argv, check=False, timeout=count * timeout + IP_TIMEOUT,
                hint="")
    if done.returncode not in (0, 1):
        raise NetCommandError(
            shlex.join(argv), done.returncode, done.stderr + done.stdout,
            f"Check that namespace {netns} exists (ip netns list).")
    return parse_ping(done.stdout, source=netns, address=str(address))


def http_get(netns: str, url: str, timeout: float = 5.0) -> tuple[int, str]:
    """GET *url* with ``requests`` from inside *netns*: (status, text).

    A child Python runs under ``ip netns exec`` and reports back as JSON.
    Raises :class:`HttpProbeError` when no HTTP answer comes back.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    argv = ["ip", "netns", "exec", netns, sys.executable, "-m",
            "helpers.net", "get", url, "--timeout", f"{timeout:g}"]
    log.debug("running %s", shlex.join(argv))
    done = subprocess.run(
        argv, capture_output=True, text=True, env=env, check=False,
        stdin=subprocess.DEVNULL, timeout=timeout + IP_TIMEOUT,
    )
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise NetCommandError(
            shlex.join(argv), done.returncode, done.stderr + done.stdout,
            f"Check that namespace {netns} exists (ip netns list).",
        ) from None
    if "error" in answer:
        detail = str(answer.get("detail", ""))
        log.debug("GET %s from %s failed: %s", url, netns, detail)
        raise HttpProbeError(url, netns, str(answer["error"]), detail)
    return int(answer["status"]), str(answer["text"])


def reachability(networks: Sequence[TaskNetwork], *,
                 timeout: float = 1.0) -> dict[str, dict[str, bool]]:
    """Ping every task's guest from every task's namespace.

    Returns ``{from_task: {to_task: reached}}``.
    """
    matrix: dict[str, dict[str, bool]] = {}
    for source in networks:
        matrix[source.task] = {
            target.task: ping(source.netns, target.guest_address,
                              timeout=timeout).ok
            for target in networks
        }
    return matrix


# --------------------------------------------------------------- egress


def egress_commands(network: TaskNetwork, *, uplink: str,
                    transfer: str = "169.254.200.0/30",
                    firewall: str = "iptables"
                    ) -> tuple[list[str], list[str]]:
    """The commands that give *network* egress, and those that undo it.

    A veth pair links the task's namespace to this namespace over the
    link-local *transfer* /30 (so it cannot clash with routed networks);
    forwarding is switched on in both, and the guest's address is
    masqueraded behind *uplink*. *firewall* is ``iptables`` or ``nft``.
    """
    link = ipaddress.IPv4Network(transfer)
    if link.num_addresses != 4:
        raise NetworkError(f"{transfer} must be a /30 (host side, task "
                           "side): pick another, such as 169.254.200.0/30.")
    host_ip, task_ip = link.network_address + 1, link.network_address + 2
    digest = hashlib.sha1(network.netns.encode()).hexdigest()
    # Interface names hold at most 15 bytes: prefix plus 8 hex digits.
    veth = f"{NETNS_PREFIX}{digest[:8]}"
    ns, guest = network.netns, network.guest_address
    setup = [
        f"ip link add {veth} type veth peer name veth0 netns {ns}",
        f"ip addr add {host_ip}/30 dev {veth}",
        f"ip link set {veth} up",
        f"ip -n {ns} addr add {task_ip}/30 dev veth0",
        f"ip -n {ns} link set veth0 up",
        f"ip -n {ns} route add default via {host_ip}",
        f"ip netns exec {ns} sysctl -w net.ipv4.ip_forward=1",
        f"ip route add {guest}/32 via {task_ip} dev {veth}",
        "sysctl -w net.ipv4.ip_forward=1",
    ]
    undo = [f"ip link del {veth}"]
    if firewall == "iptables":
        rule = f"POSTROUTING -s {guest}/32 -o {uplink} -j MASQUERADE"
        setup.append(f"iptables -t nat -A {rule}")
        undo.insert(0, f"iptables -t nat -D {rule}")
    elif firewall == "nft":
        table = f"fclab_{digest[:8]}"
        setup += [
            f"nft add table ip {table}",
            (f"nft add chain ip {table} post {{ type nat hook postrouting "
             "priority 100 ; }"),
            (f"nft add rule ip {table} post ip saddr {guest} "
             f"oifname {uplink} masquerade"),
        ]
        undo.insert(0, f"nft delete table ip {table}")
    else:
        raise NetworkError(
            f"Unknown firewall {firewall!r}: use 'iptables' or 'nft'.")
    return setup, undo


class Egress:
    """Opt-in NAT from one task's namespace to the outside world.

    WARNING: this changes the host. It switches on IPv4 forwarding for the
    whole host, adds a route and a MASQUERADE rule, and lets the guest
    send traffic through *uplink* to any network the host reaches. Use it
    only on a machine you own, never in tests or shared CI. A host
    firewall whose FORWARD policy is DROP (Docker sets one) also needs an
    ACCEPT rule for the veth, which this class does not add. The notebook
    shows :func:`egress_commands` without running them.
    """

    def __init__(self, network: TaskNetwork, *, uplink: str,
                 transfer: str = "169.254.200.0/30",
                 firewall: str | None = None) -> None:
        """Plan egress for *network* through host interface *uplink*."""
        if firewall is None:
            firewall = "iptables" if shutil.which("iptables") else "nft"
        if shutil.which(firewall) is None:
            raise NetworkError(
                "Egress needs iptables or nftables on the host; install "
                "one (apt-get install iptables) or keep the task offline.")
        self.network = network
        self.setup, self.undo = egress_commands(
            network, uplink=uplink, transfer=transfer, firewall=firewall)
        self.commands: list[str] = []
        self._forward_before: str | None = None
        self._done = 0

    def __enter__(self) -> Self:
        """Run the setup commands; undo them all if one fails."""
        log.warning(
            "enabling egress for %s: host-wide IPv4 forwarding and NAT "
            "through the uplink; the guest can now reach the outside",
            self.network.netns)
        path = Path("/proc/sys/net/ipv4/ip_forward")
        self._forward_before = path.read_text().strip()
        try:
            for command in self.setup:
                self.commands.append(command)
                _run(shlex.split(command), hint="Egress was rolled back.")
                self._done += 1
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Remove the NAT rule and veth; restore forwarding if unused."""
        if self._done == 0:
            return
        for command in self.undo:
            self.commands.append(command)
            _run(shlex.split(command), check=False, hint="")
        self._done = 0
        # Forwarding stays on while another task's egress veth exists.
        others = _root_devices(NETNS_PREFIX)
        if self._forward_before == "0" and not others:
            command = "sysctl -w net.ipv4.ip_forward=0"
            self.commands.append(command)
            _run(shlex.split(command), check=False, hint="")


# -------------------------------------------------- child-process entry


def _cause_chain(exc: BaseException) -> list[BaseException]:
    """*exc* and what caused it, outermost first, innermost last.

    Follows ``raise ... from`` and the exception being handled when the
    next was raised; an error that only names its cause (urllib3's
    ``reason``, or an exception among ``args``) is followed too.
    """
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not c for c in chain):
        chain.append(current)
        nested = [getattr(current, "reason", None), *current.args]
        current = (current.__cause__ or current.__context__ or next(
            (n for n in nested if isinstance(n, BaseException)), None))
    return chain


def failure_reason(exc: BaseException, timeout: float) -> str:
    """The root cause of a failed request, in a few words.

    ``Connection refused (errno 111)`` rather than the HTTP library's
    pool, retry and connection wrappers around it; a timeout is told as
    the *timeout* seconds that ran out.
    """
    import requests

    chain = _cause_chain(exc)
    for link in reversed(chain):
        if isinstance(link, TimeoutError) and link.errno is None:
            # A socket timeout: the seconds given to requests ran out.
            stage = ("while connecting"
                     if isinstance(exc, requests.ConnectTimeout)
                     else "waiting for the answer")
            return f"timed out after {timeout:g} s {stage}"
        if isinstance(link, socket.gaierror):
            return f"cannot resolve the host name ({link.strerror})"
        if isinstance(link, OSError) and link.errno is not None:
            words = link.strerror or os.strerror(link.errno)
            return f"{words} (errno {link.errno})"
    innermost = chain[-1]
    return str(innermost) or type(innermost).__name__


def _http_child(url: str, timeout: float) -> int:
    """GET *url*; print ``{"status", "text"}`` or ``{"error", "detail"}``.

    ``error`` is the root cause alone (see :func:`failure_reason`),
    ``detail`` the full text of the exception ``requests`` raised.
    """
    import requests

    try:
        response = requests.get(url, timeout=timeout)
    except requests.RequestException as exc:
        print(json.dumps({"error": failure_reason(exc, timeout),
                          "detail": f"{type(exc).__name__}: {exc}"}))
        return 2
    print(json.dumps({"status": response.status_code,
                      "text": response.text}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the probe child that :func:`http_get` starts."""
    parser = argparse.ArgumentParser(prog="python -m helpers.net")
    sub = parser.add_subparsers(dest="command", required=True)
    get = sub.add_parser("get", help="GET a URL and print JSON")
    get.add_argument("url")
    get.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    return _http_child(args.url, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
