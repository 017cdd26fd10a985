"""Real namespaces, TAP devices and guests: reachability, isolation, cleanup.

Every address used here lives only inside namespaces these tests create
(prefix ``fclab-it-``); nothing is sent from or to the host's own networks.
Four guests boot in all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from procfs import wait_gone

from helpers.images import GuestImages, build_guest
from helpers.net import (
    NETNS_PREFIX,
    HttpProbeError,
    NetCommandError,
    NetPrivileges,
    Subnet,
    TaskNetwork,
    cleanup_leftovers,
    find_leftovers,
    http_get,
    list_netns,
    netns_pids,
    parse_ping,
    ping,
    reachability,
)
from helpers.paths import REPO_ROOT
from helpers.vm import MicroVM

pytestmark = [
    pytest.mark.net,
    pytest.mark.skipif(
        os.geteuid() != 0 or NetPrivileges.current().missing != [],
        reason="needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create "
        "network namespaces and TAP devices"),
]

# The tests' own namespaces; a cleanup here never touches anyone else's.
PREFIX = f"{NETNS_PREFIX}it-"

# Private addresses, used only inside the tests' namespaces.
CIDR = "10.0.0.0/24"

# Seconds a guest may take to boot under TCG on a busy 2-core machine.
BOOT_TIMEOUT = 180.0

# Seconds to wait for a killed process to disappear from /proc.
GONE_TIMEOUT = 15.0


def tap_exists_in(netns: str) -> bool:
    """True if namespace *netns* exists and holds tap0."""
    done = subprocess.run(["ip", "-n", netns, "link", "show", "tap0"],
                          capture_output=True, check=False)
    return done.returncode == 0


def assert_nothing_left(subnet: Subnet, pids: list[int]) -> None:
    """No test namespace, no process of *pids*, no address of *subnet*."""
    assert list_netns(PREFIX) == []
    assert wait_gone(pids, GONE_TIMEOUT, reaped=True) == [], (
        "a VMM or QEMU outlived its namespace")
    assert subnet.in_use == {}


@pytest.fixture(scope="module")
def images() -> GuestImages:
    """The offline guest (built once, then cached)."""
    return build_guest()


@pytest.fixture(autouse=True)
def no_test_namespaces() -> Iterator[None]:
    """Start clean and leave nothing, even when a test fails."""
    cleanup_leftovers(PREFIX, force=True)
    yield
    cleanup_leftovers(PREFIX, force=True)


def guest(images: GuestImages, net: TaskNetwork) -> MicroVM:
    """A MicroVM for *net*'s task (not yet booted)."""
    return MicroVM(images.kernel, images.rootfs, initrd=images.initrd,
                   task=net.task, **net.vm_kwargs())


@pytest.mark.vm
def test_each_task_reaches_its_own_guest_and_no_other(
        images: GuestImages) -> None:
    subnet = Subnet(CIDR)
    with TaskNetwork("a", subnet, prefix=PREFIX) as net_a, \
            TaskNetwork("b", subnet, prefix=PREFIX) as net_b, \
            guest(images, net_a) as vm_a, guest(images, net_b) as vm_b:
        vm_a.boot()
        vm_b.boot()
        ready_a = vm_a.wait_ready(BOOT_TIMEOUT)
        ready_b = vm_b.wait_ready(BOOT_TIMEOUT)
        assert ready_a["ip"] == str(net_a.guest_address)
        assert ready_b["ip"] == str(net_b.guest_address)
        assert net_a.guest_address != net_b.guest_address

        # Host side to guest, and guest to the host side (its gateway).
        assert ping(net_a.netns, net_a.guest_address, count=2).ok
        out = vm_a.run(f"ping -c 1 -W 2 {net_a.gateway}", timeout=30)
        assert parse_ping(out, source="guest a",
                          address=str(net_a.gateway)).received == 1

        status, page = http_get(net_b.netns, f"http://{net_b.guest_address}/")
        assert status == 200 and "Hello from task b" in page

        # Isolation: only the diagonal is reachable.
        matrix = reachability([net_a, net_b])
        assert matrix == {"a": {"a": True, "b": False},
                          "b": {"a": False, "b": True}}
        with pytest.raises(HttpProbeError) as caught:
            http_get(net_a.netns, f"http://{net_b.guest_address}/",
                     timeout=2)
        # The root cause alone; urllib3's account stays in the detail.
        assert "Max retries" not in str(caught.value)
        assert "Max retries" in caught.value.detail
        out = vm_a.run(f"ping -c 1 -W 1 {net_b.guest_address}",
                       timeout=30, check=False)
        assert parse_ping(out, source="guest a",
                          address=str(net_b.guest_address)).received == 0
        pids = netns_pids(net_a.netns) + netns_pids(net_b.netns)
        assert pids, "the VMMs should run inside the task namespaces"

    # Cleanup after success: namespaces, TAPs and VMMs are gone.
    assert_nothing_left(subnet, pids)


@pytest.mark.vm
def test_an_exception_in_the_block_leaves_nothing(images: GuestImages) -> None:
    subnet = Subnet(CIDR)
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="on purpose"), \
            TaskNetwork("err", subnet, prefix=PREFIX) as net, \
            guest(images, net) as vm:
        vm.boot()
        vm.wait_ready(BOOT_TIMEOUT)
        pids = netns_pids(net.netns)
        assert tap_exists_in(net.netns)
        raise RuntimeError("failing on purpose inside the block")
    assert pids
    assert_nothing_left(subnet, pids)


@pytest.mark.vm
def test_a_killed_vmm_still_leaves_nothing(images: GuestImages) -> None:
    subnet = Subnet(CIDR)
    with TaskNetwork("kill", subnet, prefix=PREFIX) as net:
        with guest(images, net) as vm:
            vm.boot()
            vm.wait_ready(BOOT_TIMEOUT)
            # The VMM and QEMU both live in the task's namespace.
            pids = netns_pids(net.netns)
            vmm = vm.pid
            assert vmm in pids and len(pids) >= 2
            os.kill(vmm, signal.SIGKILL)
            # Exited; this process reaps it when the VM closes.
            assert wait_gone([vmm], GONE_TIMEOUT) == []
        assert ping(net.netns, net.guest_address, timeout=1).ok is False
    assert not tap_exists_in(net.netns)
    assert_nothing_left(subnet, pids)


class BrokenNetwork(TaskNetwork):
    """A task network whose last build step fails for real."""

    def planned_commands(self, user: str | None = None) -> list[str]:
        """The usual commands, then one naming a device that is not there."""
        return [*super().planned_commands(user),
                f"ip -n {self.netns} link set nosuchdev up"]


def test_a_failed_step_undoes_the_earlier_ones() -> None:
    subnet = Subnet(CIDR)
    net = BrokenNetwork("broken", subnet, prefix=PREFIX)
    with pytest.raises(NetCommandError, match="nosuchdev") as caught:
        net.open()
    assert "nothing of it is left behind" in str(caught.value)
    assert net.commands[-1] == f"ip netns del {PREFIX}broken"
    assert list_netns(PREFIX) == []
    assert subnet.in_use == {}


# A run interrupted hard: the child opens a task network, then dies by
# SIGKILL before any cleanup can run.
_DIE_AFTER_OPEN = """
import os, signal
from helpers.net import Subnet, TaskNetwork
net = TaskNetwork("left", Subnet("10.0.0.0/24"), prefix="{prefix}")
net.open()
os.kill(os.getpid(), signal.SIGKILL)
"""

# A run still in progress: it holds its network until told to stop.
_HOLD_UNTIL_STDIN = """
import sys
from helpers.net import Subnet, TaskNetwork
with TaskNetwork("busy", Subnet("10.0.0.0/24"), prefix="{prefix}"):
    print("open", flush=True)
    sys.stdin.readline()
"""


# A notebook kernel shut down before its cleanup cell: the interpreter
# exits normally with the network still open.
_EXIT_WITHOUT_CLOSE = """
from helpers.net import Subnet, TaskNetwork
net = TaskNetwork("exit", Subnet("10.0.0.0/24"), prefix="{prefix}")
net.open()
print(net.netns, flush=True)
"""


def _python(code: str, **kwargs: object) -> subprocess.Popen[str]:
    """Start a Python child that can import the helpers."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", code.format(prefix=PREFIX)], env=env,
        text=True, **kwargs)  # type: ignore[call-overload]


def test_an_interpreter_exit_removes_an_open_network() -> None:
    child = _python(_EXIT_WITHOUT_CLOSE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert out.strip() == f"{PREFIX}exit"
    assert "never closed" in err
    assert list_netns(PREFIX) == []


def test_cleanup_removes_what_an_interrupted_run_left() -> None:
    killed = _python(_DIE_AFTER_OPEN)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    left = f"{PREFIX}left"
    assert list_netns(PREFIX) == [left]
    assert tap_exists_in(left)

    # A process still running inside it, and a stray TAP in this namespace.
    sleeper = subprocess.Popen(["ip", "netns", "exec", left, "sleep", "600"])
    stray = f"{PREFIX}tap"
    subprocess.run(["ip", "tuntap", "add", stray, "mode", "tap"], check=True)
    try:
        deadline = time.monotonic() + GONE_TIMEOUT
        while sleeper.pid not in netns_pids(left):
            assert time.monotonic() < deadline, "sleep never started"
            time.sleep(0.05)

        # Another run that is still alive must keep its namespace.
        holder = _python(_HOLD_UNTIL_STDIN, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "open"

        found = find_leftovers(PREFIX)
        assert found.namespaces == [left]
        assert found.in_use == [f"{PREFIX}busy"]
        assert found.devices == [stray]
        assert found.processes == {left: [sleeper.pid]}

        removed = cleanup_leftovers(PREFIX)
        assert removed.namespaces == [left]
        assert list_netns(PREFIX) == [f"{PREFIX}busy"]
        assert sleeper.wait(timeout=GONE_TIMEOUT) is not None
        links = subprocess.run(["ip", "-o", "link"], capture_output=True,
                               text=True, check=True).stdout
        assert stray not in links

        # The live run finishes and removes its own namespace.
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
        assert list_netns(PREFIX) == []
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        subprocess.run(["ip", "link", "del", stray], capture_output=True,
                       check=False)
