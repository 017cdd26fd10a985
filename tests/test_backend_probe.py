"""The probe boot that decides whether real Firecracker runs guests here.

This host has no Firecracker binary, so small shell scripts stand in for
it through FIRECRACKER_BIN: one runs the real emulator (the probe then
boots the real guest kernel under TCG), one hangs, one fails at once.
Each script notes its pid and arguments in a file, so the tests count
probes and look for leftover processes. The probe runs only when
/dev/kvm answers, so these tests skip where it does not.
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
from pathlib import Path

import pytest
from procfs import alive

from helpers import backend as backend_mod
from helpers.backend import (
    BackendError,
    choose_backend,
    probe_cache_path,
    probe_kvm,
)
from helpers.images import GuestImages, build_guest
from helpers.paths import REPO_ROOT
from helpers.vm import MicroVM

# Generous: under TCG on a busy two-core host the kernel needs a few
# seconds to reach its panic; a hung boot is caught by this.
TCG_PROBE_TIMEOUT_S = 120.0

# Short enough to keep the suite quick, long enough for /bin/sh to start.
HANG_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def guest() -> GuestImages:
    """The lab's guest images, built once and cached."""
    return build_guest()


@pytest.fixture
def kvm() -> None:
    """Skip unless /dev/kvm opens and answers (the probe needs that)."""
    ok, text = probe_kvm()
    if not ok:
        pytest.skip(f"the probe boot runs only when /dev/kvm answers: {text}")


@pytest.fixture
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A private cache directory; FCLAB_BACKEND unset so auto decides."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("FCLAB_CACHE", str(folder))
    monkeypatch.delenv("FCLAB_BACKEND", raising=False)
    return folder


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    """A stand-in kernel file for probes that never read it."""
    path = tmp_path / "vmlinux"
    path.write_bytes(b"not a kernel\n")
    return path


def fake_firecracker(folder: Path, body: str,
                     monkeypatch: pytest.MonkeyPatch) -> Path:
    """Write a shell script that plays Firecracker; point FIRECRACKER_BIN
    at it. It appends "<pid> <arguments>" to ``calls`` on every run."""
    script = folder / "firecracker"
    calls = shlex.quote(str(folder / "calls"))
    script.write_text(f'#!/bin/sh\necho "$$ $*" >> {calls}\n{body}\n')
    script.chmod(0o755)
    monkeypatch.setenv("FIRECRACKER_BIN", str(script))
    return script


def calls(folder: Path) -> list[str]:
    """The runs the fake binary noted, one "<pid> <arguments>" each."""
    path = folder / "calls"
    return path.read_text().splitlines() if path.exists() else []


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is *pgid*."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the name: state, ppid, pgrp.
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


FAILING_BODY = 'echo "firecracker: unsupported option --no-api" >&2\nexit 1'


@pytest.mark.vm
def test_probe_boots_the_real_kernel_and_picks_firecracker(
    guest: GuestImages, kvm: None, cache: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A binary that boots the kernel to its panic is trusted, once."""
    python = shlex.quote(sys.executable)
    binary = fake_firecracker(tmp_path, (
        f"PYTHONPATH={shlex.quote(str(REPO_ROOT))} exec {python} "
        '-m firecracker_emulator --accel tcg "$@"'), monkeypatch)

    choice = choose_backend("auto", guest.kernel,
                            probe_timeout=TCG_PROBE_TIMEOUT_S)

    assert choice.name == "firecracker", choice.reason
    assert choice.argv == (str(binary),)
    assert f"probe boot of {guest.kernel}" in choice.reason
    assert "reached the kernel's panic" in choice.reason
    [run] = calls(tmp_path)
    pid, args = run.split(" ", 1)
    assert args.startswith("--no-api --config-file ")
    assert group_members(int(pid)) == []

    again = choose_backend("auto", guest.kernel,
                           probe_timeout=TCG_PROBE_TIMEOUT_S)

    assert again.name == "firecracker"
    assert "cached in" in again.reason
    assert len(calls(tmp_path)) == 1


def test_hanging_probe_times_out_and_leaves_nothing(
    kvm: None, cache: Path, kernel: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A guest that never gets far means the emulator, and no leftovers."""
    sleep_pid = tmp_path / "sleep.pid"
    fake_firecracker(tmp_path, (
        "echo 'Linux version 6.1 (pretend)'\n"
        f"sleep 1000 & echo $! > {shlex.quote(str(sleep_pid))}\nwait"),
        monkeypatch)
    monkeypatch.setattr(backend_mod, "PROBE_TIMEOUT_S", HANG_TIMEOUT_S)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    choice = choose_backend("auto", kernel)

    assert choice.name == "emulator"
    assert f"probe boot of {kernel} did not reach" in choice.reason
    assert f"within {HANG_TIMEOUT_S:g} s" in choice.reason
    assert "Linux version 6.1 (pretend)" in choice.reason
    assert "KVM does not run guests here" in choice.reason
    [run] = calls(tmp_path)
    leader = int(run.split()[0])
    assert not alive(leader)
    assert not alive(int(sleep_pid.read_text()))
    assert group_members(leader) == []
    assert list(scratch.iterdir()) == []


def test_failing_binary_gives_the_emulator_and_its_output(
    kvm: None, cache: Path, kernel: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A binary that exits at once is quoted in the reason."""
    fake_firecracker(tmp_path, FAILING_BODY, monkeypatch)

    choice = choose_backend("auto", kernel)

    assert choice.name == "emulator"
    assert choice.argv == (sys.executable, "-m", "firecracker_emulator")
    assert "exited with code 1" in choice.reason
    assert "firecracker: unsupported option --no-api" in choice.reason
    assert "using the emulator" in choice.reason


def test_verdict_is_cached_until_binary_or_kernel_changes(
    kvm: None, cache: Path, kernel: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One probe per binary and kernel; changing either probes again."""
    binary = fake_firecracker(tmp_path, FAILING_BODY, monkeypatch)

    first = choose_backend("auto", kernel)
    second = choose_backend("auto", kernel)

    assert len(calls(tmp_path)) == 1
    assert "cached in" not in first.reason
    assert f"cached in {probe_cache_path()}" in second.reason
    assert second.name == "emulator"
    stored = json.loads(probe_cache_path().read_text())
    [(key, verdict)] = stored["verdicts"].items()
    assert json.loads(key)["firecracker"][0] == str(binary.resolve())
    assert verdict["works"] is False
    # Only the cache and its lock: no temporary file was left behind.
    assert sorted(p.name for p in cache.iterdir()) == [
        "backend-probe.json", "backend-probe.lock"]

    binary.write_text(binary.read_text().replace("exit 1", "exit 2"))
    third = choose_backend("auto", kernel)

    assert len(calls(tmp_path)) == 2
    assert "exited with code 2" in third.reason

    kernel.write_bytes(b"another kernel\n")
    choose_backend("auto", kernel)

    assert len(calls(tmp_path)) == 3
    assert len(json.loads(probe_cache_path().read_text())["verdicts"]) == 3


def test_unreadable_cache_is_replaced(
    kvm: None, cache: Path, kernel: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A damaged cache file means a new probe and a whole file again."""
    fake_firecracker(tmp_path, FAILING_BODY, monkeypatch)
    probe_cache_path().write_text('{"verdicts": {"half')

    choice = choose_backend("auto", kernel)

    assert choice.name == "emulator"
    assert len(calls(tmp_path)) == 1
    assert len(json.loads(probe_cache_path().read_text())["verdicts"]) == 1


def test_without_kernel_no_probe_is_made(
    kvm: None, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a guest kernel, auto trusts /dev/kvm and says so."""
    binary = fake_firecracker(tmp_path, FAILING_BODY, monkeypatch)

    choice = choose_backend("auto")

    assert choice.name == "firecracker"
    assert choice.argv == (str(binary),)
    assert "no probe boot was made" in choice.reason
    assert calls(tmp_path) == []


def test_explicit_firecracker_skips_the_probe(
    kvm: None, cache: Path, kernel: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Asking for Firecracker, by argument or FCLAB_BACKEND, runs no probe."""
    fake_firecracker(tmp_path, FAILING_BODY, monkeypatch)

    assert choose_backend("firecracker", kernel).name == "firecracker"
    monkeypatch.setenv("FCLAB_BACKEND", "firecracker")
    assert choose_backend("auto", kernel).name == "firecracker"
    assert calls(tmp_path) == []


def test_missing_kernel_is_a_clear_error(
    kvm: None, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Probing a kernel that does not exist says to build the guest."""
    fake_firecracker(tmp_path, FAILING_BODY, monkeypatch)

    with pytest.raises(BackendError, match="build_guest"):
        choose_backend("auto", tmp_path / "missing")
    assert calls(tmp_path) == []


def test_microvm_probes_with_its_own_kernel(
    kvm: None, cache: Path, kernel: Path, tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MicroVM's backend="auto" runs the probe on the VM's kernel."""
    fake_firecracker(tmp_path, FAILING_BODY, monkeypatch)
    rootfs = tmp_path / "rootfs.ext4"
    rootfs.write_bytes(b"")

    # A short working directory: the API socket path has a length limit.
    vm = MicroVM(kernel, rootfs, workdir=tmp_path_factory.mktemp("vm"))
    try:
        assert vm.backend.name == "emulator"
        assert f"probe boot of {kernel}" in vm.backend.reason
    finally:
        vm.close()
    assert len(calls(tmp_path)) == 1
    assert not vm.workdir.exists()
