"""MicroVM and the backend choice, against a real VMM and the guest."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from procfs import alive

from helpers.backend import (
    BackendChoice,
    BackendError,
    choose_backend,
    probe_kvm,
)
from helpers.errors import LabError
from helpers.images import GuestImages, build_guest
from helpers.paths import REPO_ROOT
from helpers.vm import (
    GuestCommandError,
    LaunchError,
    MicroVM,
    VmmExited,
    _descendants,
)

# Generous: under TCG on a busy two-core host a boot takes seconds, and a
# hung guest is caught by this rather than by the suite's own timeout.
BOOT_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def guest() -> GuestImages:
    """The lab's guest images, built once and cached."""
    return build_guest()


@pytest.fixture
def backend() -> BackendChoice:
    """The best backend here (FCLAB_BACKEND decides when set)."""
    return choose_backend("auto")


def fake_vmm(code: str) -> BackendChoice:
    """A backend running a Python snippet in place of the VMM."""
    return BackendChoice("emulator", (sys.executable, "-c", code), "test")


def assert_released(vm: MicroVM, pids: list[int]) -> None:
    """No process, socket or working directory of *vm* is left."""
    assert [pid for pid in pids if alive(pid)] == []
    assert not vm.socket_path.exists()
    assert not vm.workdir.exists()


@pytest.fixture
def tmp_short(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A working-directory parent with a short path (socket path limit)."""
    yield tmp_path_factory.mktemp("vm", numbered=True)


# -- full boots ---------------------------------------------------------------


@pytest.mark.vm
def test_boot_run_and_shutdown(guest: GuestImages, backend: BackendChoice,
                               tmp_short: Path) -> None:
    """Boot to the readiness line, run commands, stop with Ctrl-Alt-Del."""
    with MicroVM(guest.kernel, guest.rootfs, initrd=guest.initrd,
                 task="unit-test", backend=backend,
                 workdir=tmp_short) as vm:
        vm.boot()
        info = vm.wait_ready(BOOT_TIMEOUT_S)
        assert info == {"task": "unit-test", "ip": None}
        assert vm.api.describe_instance()["state"] == "Running"

        assert vm.run("uname -r") == guest.kernel_release
        assert vm.run("printf 'a\\nb'") == "a\nb"
        with pytest.raises(GuestCommandError) as failed:
            vm.run("ls /does-not-exist")
        assert failed.value.status != 0
        assert "does-not-exist" in failed.value.output

        assert vm.rootfs_path.parent == vm.workdir
        assert vm.rss_kib() > 0
        pids = _descendants(vm.pid or 0)
        assert vm.shutdown() == 0
        assert not vm.socket_path.exists()

    order = ["spawn", "api_ready", "configured", "instance_start", "ready",
             "exit"]
    assert sorted(order, key=vm.events.__getitem__) == order
    assert_released(vm, pids)


@pytest.mark.vm
def test_exception_inside_with_releases_everything(
    guest: GuestImages, backend: BackendChoice, tmp_short: Path
) -> None:
    """An error in the block stops the VMM and its QEMU, removes files."""
    pids: list[int] = []
    vm = MicroVM(guest.kernel, guest.rootfs, initrd=guest.initrd,
                 backend=backend, workdir=tmp_short)
    with pytest.raises(RuntimeError, match="on purpose"), vm:
        vm.boot()
        vm.wait_for(r"Linux version", BOOT_TIMEOUT_S)
        pids = _descendants(vm.pid or 0)
        raise RuntimeError("on purpose")

    if backend.name == "emulator":
        assert len(pids) > 1, "the emulator should have started QEMU"
    assert_released(vm, pids)


@pytest.mark.vm
def test_killed_vmm_is_noticed(guest: GuestImages, backend: BackendChoice,
                               tmp_short: Path) -> None:
    """wait_for raises VmmExited when the VMM dies, and nothing leaks."""
    with MicroVM(guest.kernel, guest.rootfs, initrd=guest.initrd,
                 backend=backend, workdir=tmp_short) as vm:
        vm.boot()
        vm.wait_for(r"Linux version", BOOT_TIMEOUT_S)
        pids = _descendants(vm.pid or 0)
        os.kill(vm.pid or 0, signal.SIGKILL)

        with pytest.raises(VmmExited, match="code -9"):
            vm.wait_for(r"this line never comes", BOOT_TIMEOUT_S)

    assert_released(vm, pids)


# -- launches that fail or need no guest --------------------------------------


def test_launch_failure_carries_command_code_and_output(
    guest: GuestImages, tmp_short: Path
) -> None:
    """A VMM that dies at start gives LaunchError and leaves nothing."""
    backend = fake_vmm("import sys; print('cannot start: boom'); sys.exit(3)")
    vm = MicroVM(guest.kernel, guest.rootfs, backend=backend,
                 workdir=tmp_short)

    with pytest.raises(LaunchError) as caught:
        vm.spawn()

    err = caught.value
    assert err.returncode == 3
    assert "cannot start: boom" in err.output
    assert err.command[:3] == list(backend.argv)
    assert "--api-sock" in err.command
    assert "boom" in str(err) and "exit 3" in str(err)
    assert_released(vm, [vm.pid or 0])


def test_silent_vmm_times_out_and_is_stopped(
    guest: GuestImages, tmp_short: Path
) -> None:
    """A VMM that never opens its socket is killed after api_timeout."""
    vm = MicroVM(guest.kernel, guest.rootfs, workdir=tmp_short,
                 backend=fake_vmm("import time; time.sleep(600)"),
                 api_timeout=0.5)

    with pytest.raises(LaunchError, match="did not answer") as caught:
        vm.spawn()

    assert caught.value.returncode is None
    assert_released(vm, [vm.pid or 0])


def test_non_socket_in_the_way_is_refused(
    guest: GuestImages, tmp_short: Path
) -> None:
    """A regular file at the socket path is neither used nor deleted."""
    vm = MicroVM(guest.kernel, guest.rootfs, workdir=tmp_short,
                 backend=fake_vmm("raise SystemExit('must not run')"))
    vm.socket_path.write_text("precious")

    with pytest.raises(LaunchError, match="not a socket"):
        vm.spawn()

    assert vm.pid is None
    assert_released(vm, [])


def test_stale_socket_is_replaced_and_api_answers(
    guest: GuestImages, backend: BackendChoice, tmp_short: Path
) -> None:
    """A socket left by a dead VMM is removed; the new VMM answers GET /."""
    with MicroVM(guest.kernel, guest.rootfs, backend=backend,
                 workdir=tmp_short, vm_id="stale-test") as vm:
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(vm.socket_path))
        stale.close()

        vm.spawn()
        info = vm.api.describe_instance()

        assert (info["id"], info["state"]) == ("stale-test", "Not started")
        assert any("API server started." in line for line in vm.tail(50))
        pids = _descendants(vm.pid or 0)
    assert_released(vm, pids)


def test_keyboard_interrupt_releases_everything(
    guest: GuestImages, backend: BackendChoice, tmp_short: Path
) -> None:
    """Ctrl-C inside the block still stops the VMM and removes files."""
    vm = MicroVM(guest.kernel, guest.rootfs, backend=backend,
                 workdir=tmp_short)
    pids: list[int] = []

    with pytest.raises(KeyboardInterrupt), vm:
        vm.spawn()
        pids = _descendants(vm.pid or 0)
        raise KeyboardInterrupt

    assert pids
    assert_released(vm, pids)


def test_forgotten_vm_is_released_when_python_exits(
    guest: GuestImages, tmp_short: Path
) -> None:
    """A VM never closed (a notebook kernel that exits) leaves nothing."""
    script = f"""
import sys
from helpers.vm import MicroVM
vm = MicroVM({str(guest.kernel)!r}, {str(guest.rootfs)!r},
             backend="emulator", workdir={str(tmp_short)!r})
vm.spawn()
print(vm.pid, vm.workdir, flush=True)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True,
        timeout=120, check=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})

    pid, workdir = done.stdout.split()
    assert not alive(int(pid))
    assert not Path(workdir).exists()


def test_boot_args_carry_the_task(guest: GuestImages, tmp_short: Path) -> None:
    """task= and extra_boot_args extend the command line; bad ids fail."""
    with MicroVM(guest.kernel, guest.rootfs, task="web-1",
                 extra_boot_args="quiet", backend=fake_vmm("pass"),
                 workdir=tmp_short) as vm:
        assert vm.boot_args.endswith(" quiet fclab.task=web-1")
    with pytest.raises(LabError, match="task"):
        MicroVM(guest.kernel, guest.rootfs, task="two words",
                backend=fake_vmm("pass"))


# -- backend choice -----------------------------------------------------------


def test_emulator_choice_runs_this_interpreter() -> None:
    """The emulator backend is `python -m firecracker_emulator`."""
    choice = choose_backend("emulator")

    assert choice.name == "emulator"
    assert choice.argv == (sys.executable, "-m", "firecracker_emulator")
    assert choice.reason


def test_auto_follows_fclab_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """FCLAB_BACKEND decides what "auto" means."""
    monkeypatch.setenv("FCLAB_BACKEND", "emulator")

    assert choose_backend("auto").name == "emulator"


def test_auto_without_binary_explains_the_fallback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without a Firecracker binary, auto picks the emulator and says why."""
    monkeypatch.delenv("FCLAB_BACKEND", raising=False)
    monkeypatch.setenv("FIRECRACKER_BIN", str(tmp_path / "missing"))

    choice = choose_backend("auto")

    assert choice.name == "emulator"
    assert "FIRECRACKER_BIN" in choice.reason
    assert "emulator" in choice.reason


def test_explicit_firecracker_without_binary_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Asking for Firecracker without its binary is a clear error."""
    monkeypatch.setenv("FIRECRACKER_BIN", str(tmp_path / "missing"))

    with pytest.raises(BackendError, match="FIRECRACKER_BIN"):
        choose_backend("firecracker")


def test_unknown_backend_is_refused() -> None:
    """A typo in the backend name fails with the valid names."""
    with pytest.raises(BackendError, match="emulator"):
        choose_backend("qemu")


def test_kvm_probe_on_devices_that_are_not_kvm(tmp_path: Path) -> None:
    """The probe tells a missing device and a non-KVM device apart."""
    assert probe_kvm(str(tmp_path / "kvm")) == (
        False, f"{tmp_path / 'kvm'} does not exist (no KVM on this host)")
    ok, text = probe_kvm("/dev/null")
    assert not ok and "not a KVM device" in text


@pytest.mark.skipif(os.geteuid() == 0,
                    reason="root opens /dev/kvm whatever its mode")
def test_kvm_probe_without_permission_says_how_to_fix(tmp_path: Path) -> None:
    """EACCES on the device names the usermod and setfacl fixes."""
    device = tmp_path / "kvm"
    device.write_text("")
    device.chmod(0)

    ok, text = probe_kvm(str(device))

    assert not ok
    assert "usermod -aG kvm" in text and "setfacl" in text
