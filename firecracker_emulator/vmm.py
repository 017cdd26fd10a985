"""The VMM: the microVM's state machine, run on the main thread.

API threads parse requests and queue an ``Action``; the main thread runs
each one in turn, as Firecracker's VMM thread does, and also notices
QEMU's exit and termination signals. Running everything on one thread
also matters for QEMU's parent-death signal, which follows the thread
that spawned it.
"""

from __future__ import annotations

import logging
import queue
import signal
import socket
import threading
import time
from typing import Any

from . import FIRECRACKER_VERSION, __version__
from .api import Action, Reply, fault
from .errors import EmulatorError
from .logs import LogSettings
from .metrics import Metrics
from .resources import ActionError, Resources, os_error_text

log = logging.getLogger(__name__)

NOT_STARTED, RUNNING, PAUSED = "Not started", "Running", "Paused"

PRE_BOOT_ONLY = {
    "put_machine_config", "patch_machine_config", "put_boot_source",
    "put_drive", "put_net", "put_logger", "put_metrics", "InstanceStart",
}
POST_BOOT_ONLY = {"patch_drive", "patch_net", "patch_vm", "SendCtrlAltDel"}

AFTER_BOOT = (
    "The requested operation is not supported after starting the microVM."
)
BEFORE_BOOT = (
    "The requested operation is not supported before starting the microVM."
)
# Logged when a network rate limiter is set: it is kept, not applied.
RATE_LIMITERS_WARNING = (
    "Network rate limiters are recorded but not enforced by "
    "firecracker-emulator."
)

# Seconds between the main loop's checks for signals and timed work.
TICK = 0.25
# Firecracker writes metrics on its own this often once configured.
METRICS_PERIOD = 60.0

_EXITED = object()  # queued by the QEMU waiter thread


class Vmm:
    """Holds the configuration and the running QEMU, if any."""

    def __init__(
        self,
        instance_id: str,
        logs: LogSettings,
        *,
        boot_timer: bool,
        accel: str,
        qemu_path: str | None,
    ) -> None:
        self.instance_id = instance_id
        self.logs = logs
        self.boot_timer = boot_timer
        self.accel_request = accel
        self.qemu_path = qemu_path
        self.resources = Resources()
        self.metrics = Metrics()
        self.state = NOT_STARTED
        self.accel = ""
        self.qemu: Any = None  # a qemu.QemuProcess once started
        self.start_ns = 0
        self.start_cpu = 0.0
        self.exit_code: int | None = None
        self.signal_received = 0
        self.inbox: queue.Queue[Any] = queue.Queue()
        self._next_metrics = 0.0
        # Filled in when the API socket opens (µs of wall and CPU time).
        self.startup_us = 0
        self.startup_cpu_us = 0

    # ------------------------------------------------------- API threads

    def submit(self, action: Action) -> Reply:
        """Queue *action* for the main thread and wait for its reply."""
        done = threading.Event()
        box: list[Reply] = []
        self.inbox.put((action, done, box))
        while not done.wait(timeout=1.0):
            if self.exit_code is not None:
                return fault("The microVM is shutting down.")
        return box[0]

    def instance_info(self) -> dict[str, str]:
        """Return GET / with the extra ``emulator`` key."""
        if self.qemu is not None and self.qemu.qmp is not None:
            backend = f"QEMU {self.qemu.qmp.version}, {self.accel.upper()}"
        else:
            backend = "QEMU backend, not started"
        return {
            "id": self.instance_id,
            "state": self.state,
            "vmm_version": FIRECRACKER_VERSION,
            "app_name": "Firecracker",
            "emulator": f"firecracker-emulator {__version__} ({backend})",
        }

    # -------------------------------------------------------- main thread

    def run(self) -> int:
        """Serve queued actions until QEMU exits or a signal arrives."""
        while True:
            if self.signal_received:
                return self._stop_on_signal()
            try:
                item = self.inbox.get(timeout=TICK)
            except queue.Empty:
                self._periodic()
                continue
            if item is _EXITED:
                return self._on_qemu_exit()
            action, done, box = item
            box.append(self.dispatch(action))
            done.set()

    def on_signal(self, signum: int, _frame: object) -> None:
        """Remember a termination signal; the main loop acts on it."""
        self.signal_received = signum

    def dispatch(self, action: Action) -> Reply:
        """Run one action and count it in the metrics."""
        try:
            reply = self._dispatch(action)
        except ActionError as err:
            reply = fault(str(err))
        except EmulatorError as err:
            reply = fault(str(err))
        failed = reply.status >= 400
        self.metrics.record_action(action.name, failed)
        if failed:
            log.error(
                "Received Error. Status code: 400 Bad Request. Message: %s",
                reply.body.get("fault_message") if reply.body else "",
            )
        return reply

    def _dispatch(self, action: Action) -> Reply:
        """Check the boot state, then perform the action."""
        name, body = action.name, action.body
        if self.state != NOT_STARTED and name in PRE_BOOT_ONLY:
            return fault(AFTER_BOOT)
        if self.state == NOT_STARTED and name in POST_BOOT_ONLY:
            return fault(BEFORE_BOOT)
        res = self.resources
        if name == "get_instance_info":
            return Reply(200, self.instance_info())
        if name == "get_version":
            return Reply(200, {"firecracker_version": FIRECRACKER_VERSION})
        if name == "get_machine_config":
            return Reply(200, res.machine.as_json())
        if name == "get_vm_config":
            return Reply(200, res.full_config(self.logs.as_config()))
        if name == "put_machine_config":
            full = {
                "smt": False, "track_dirty_pages": False,
                "huge_pages": "None", "cpu_template": "None",
            }
            full.update(body)
            res.update_machine(full)
            self._warn_unemulated_machine()
        elif name == "patch_machine_config":
            res.update_machine(body)
            self._warn_unemulated_machine()
        elif name == "put_boot_source":
            res.set_boot_source(body)
        elif name == "put_drive":
            res.insert_drive(body)
        elif name == "put_net":
            res.insert_net(body)
            if "rx_rate_limiter" in body or "tx_rate_limiter" in body:
                log.warning(RATE_LIMITERS_WARNING)
        elif name == "patch_drive":
            self._patch_drive(body)
        elif name == "patch_net":
            net = res.find_net(body["iface_id"])
            for key in ("rx_rate_limiter", "tx_rate_limiter"):
                if key in body:
                    setattr(net, key, body[key])
            log.warning(RATE_LIMITERS_WARNING)
        elif name == "put_logger":
            self._put_logger(body)
        elif name == "put_metrics":
            self._put_metrics(body["metrics_path"])
        elif name == "InstanceStart":
            self.start()
        elif name == "SendCtrlAltDel":
            self.qemu.qmp.command(
                "send-key",
                keys=[
                    {"type": "qcode", "data": key}
                    for key in ("ctrl", "alt", "delete")
                ],
            )
        elif name == "FlushMetrics":
            self.flush_metrics()
        elif name == "patch_vm":
            self._set_paused(body["state"] == "Paused")
        else:
            return fault(f"Unknown action {name}.")
        return Reply(204)

    def _warn_unemulated_machine(self) -> None:
        """Say which machine-config fields QEMU does not honour."""
        mach = self.resources.machine
        if mach.cpu_template:
            log.warning(
                "CPU template %s is recorded but not applied by "
                "firecracker-emulator.", mach.cpu_template
            )
        if mach.huge_pages != "None":
            log.warning(
                "Huge pages are recorded but guest memory is not backed "
                "by hugetlbfs in firecracker-emulator."
            )

    def _patch_drive(self, body: dict[str, Any]) -> None:
        """Apply a post-boot drive update that QEMU can carry out."""
        drive = self.resources.find_drive(body["drive_id"])
        path = body.get("path_on_host")
        if path is not None and path != drive.path_on_host:
            raise ActionError(
                "The requested operation is not supported: changing a "
                "drive's backing file after boot is not emulated by "
                "firecracker-emulator."
            )
        if "rate_limiter" in body:
            from .qemu import qemu_id

            limiter = body["rate_limiter"] or {}
            rates = {}
            for key, name in (("bandwidth", "bps"), ("ops", "iops")):
                bucket = limiter.get(key) or {}
                refill = bucket.get("refill_time") or 0
                rates[name] = (
                    bucket["size"] * 1000 // refill if refill else 0
                )
            self.qemu.qmp.command(
                "block_set_io_throttle",
                device=qemu_id("drive", drive.drive_id),
                bps=rates["bps"], bps_rd=0, bps_wr=0,
                iops=rates["iops"], iops_rd=0, iops_wr=0,
            )
            drive.rate_limiter = body["rate_limiter"]

    def _put_logger(self, body: dict[str, Any]) -> None:
        """Reconfigure logging as PUT /logger asks."""
        try:
            self.logs.apply(
                level=body.get("level"),
                path=body.get("log_path"),
                show_level=body.get("show_level"),
                show_origin=body.get("show_log_origin"),
                module=body.get("module"),
            )
        except OSError as err:
            raise ActionError(
                "Logger error: Failed to open target file: "
                + os_error_text(err)
            ) from None

    def _put_metrics(self, path: str) -> None:
        """Start the metrics system, once."""
        if self.metrics.path is not None:
            raise ActionError(
                "Metrics error: Reinitialization of metrics not allowed."
            )
        try:
            self.metrics.open(path)
        except OSError as err:
            raise ActionError(
                "Metrics error: Failed to open target file: "
                + os_error_text(err)
            ) from None
        self.resources.metrics_path = path
        self._next_metrics = time.monotonic() + METRICS_PERIOD

    def _set_paused(self, paused: bool) -> None:
        """Pause or resume the vCPUs through QEMU's monitor."""
        started = time.monotonic_ns()
        self.qemu.qmp.command("stop" if paused else "cont")
        took = (time.monotonic_ns() - started) // 1000
        key = "pause_vm" if paused else "resume_vm"
        self.metrics.set_value("latencies_us", key, took)
        self.metrics.set_value("latencies_us", "vmm_" + key, took)
        self.state = PAUSED if paused else RUNNING
        log.info("%s microVM.", "Paused" if paused else "Resumed")

    # ------------------------------------------------------------ booting

    def start(self) -> None:
        """InstanceStart: check the files, pick the accelerator, boot."""
        from . import accel as accel_mod
        from . import qemu as qemu_mod

        res = self.resources
        if res.boot_source is None:
            raise ActionError(
                "Start microvm error: Cannot start microvm without kernel "
                "configuration."
            )
        # Firecracker holds the files open from configuration on; the
        # emulator hands paths to QEMU, so it checks them again here.
        res.recheck_files()
        qemu = qemu_mod.find_qemu(self.qemu_path)
        chose_ns = time.monotonic_ns()
        self.accel, reason = accel_mod.choose(
            self.accel_request, qemu, res.boot_source.kernel_image_path
        )
        log.info(
            "Accelerator: %s (%s; chosen in %d ms).", self.accel.upper(),
            reason, (time.monotonic_ns() - chose_ns) // 1_000_000,
        )
        # The boot timer starts here, not before the choice: a first KVM
        # probe on a new host takes seconds and is no part of any boot.
        self.start_ns = time.monotonic_ns()
        self.start_cpu = time.process_time()
        ours, theirs = socket.socketpair()
        command = qemu_mod.build_command(
            qemu, res, self.accel, theirs.fileno(), self.boot_timer
        )
        process = qemu_mod.QemuProcess(
            command,
            on_boot_timer=self._boot_timer_hit if self.boot_timer else None,
        )
        try:
            process.start(ours, theirs)
        except qemu_mod.QemuError as err:
            ours.close()
            raise ActionError(f"Start microvm error: {err}") from None
        self.qemu = process
        self.state = RUNNING
        threading.Thread(
            target=self._wait_qemu, name="qemu_wait", daemon=True
        ).start()
        log.info("Successfully started microvm.")

    def _wait_qemu(self) -> None:
        """Wait for QEMU to exit and tell the main loop."""
        self.exit_code = self.qemu.wait()
        self.inbox.put(_EXITED)

    def _boot_timer_hit(self) -> None:
        """Log Firecracker's boot-time line when the guest signals."""
        wall_us = (time.monotonic_ns() - self.start_ns) // 1000
        own_cpu = int((time.process_time() - self.start_cpu) * 1_000_000)
        cpu_us = self.qemu.cpu_time_us() + own_cpu if self.qemu else own_cpu
        log.info(
            "Guest-boot-time = %6d us %d ms, %6d CPU us %d CPU ms",
            wall_us, wall_us // 1000, cpu_us, cpu_us // 1000,
        )

    # ----------------------------------------------------------- metrics

    def _periodic(self) -> None:
        """Flush metrics every minute once they are configured."""
        if self.metrics.path and time.monotonic() >= self._next_metrics:
            self._next_metrics = time.monotonic() + METRICS_PERIOD
            self.flush_metrics()

    def flush_metrics(self) -> None:
        """Collect device statistics and write one metrics line."""
        if self.metrics.path is None:
            return
        extra: dict[str, Any] = {"api_server": self.api_server_metrics()}
        if self.qemu is not None and self.qemu.proc is not None:
            extra.update(self._device_metrics())
            extra["emulator"] = {
                "accel": self.accel,
                "qemu_pid": self.qemu.proc.pid,
                "qemu_cpu_us": self.qemu.cpu_time_us(),
                "qemu_command": self.qemu.command,
            }
        self.metrics.flush(extra)

    def api_server_metrics(self) -> dict[str, int]:
        """Return the startup figures measured when the socket opened."""
        return {
            "process_startup_time_us": self.startup_us,
            "process_startup_time_cpu_us": self.startup_cpu_us,
        }

    def _device_metrics(self) -> dict[str, Any]:
        """Read block statistics from QEMU and net ones from the TAPs."""
        from .qemu import QemuError, qemu_id

        out: dict[str, Any] = {}
        try:
            stats = self.qemu.qmp.command("query-blockstats")
        except (OSError, QemuError, ValueError):
            stats = []
        by_device = {s.get("device"): s.get("stats", {}) for s in stats}
        for drive in self.resources.drives:
            raw = by_device.get(qemu_id("drive", drive.drive_id), {})
            totals = {
                "read_bytes": raw.get("rd_bytes", 0),
                "write_bytes": raw.get("wr_bytes", 0),
                "read_count": raw.get("rd_operations", 0),
                "write_count": raw.get("wr_operations", 0),
                "flush_count": raw.get("flush_operations", 0),
            }
            group = f"block_{drive.drive_id}"
            out[group] = self.metrics.delta(group, totals)
        for net in self.resources.nets:
            base = f"/sys/class/net/{net.host_dev_name}/statistics/"
            # The TAP's transmit side is what the guest receives.
            names = {
                "rx_bytes_count": "tx_bytes",
                "rx_packets_count": "tx_packets",
                "tx_bytes_count": "rx_bytes",
                "tx_packets_count": "rx_packets",
            }
            totals = {}
            for ours, sysfs in names.items():
                try:
                    with open(base + sysfs) as counter:
                        totals[ours] = int(counter.read())
                except (OSError, ValueError):
                    totals[ours] = 0
            group = f"net_{net.iface_id}"
            out[group] = self.metrics.delta(group, totals)
        return out

    # ------------------------------------------------------------ ending

    def _on_qemu_exit(self) -> int:
        """QEMU is gone (guest reboot, shutdown or crash): wind down."""
        rc = self.exit_code or 0
        if rc == 0:
            log.info("Vmm is stopping.")
        else:
            log.error("QEMU exited with status %d: %s", rc,
                      " | ".join(self.qemu.stderr_tail) or "no output")
        self.shutdown()
        return 0 if rc == 0 else 1

    def _stop_on_signal(self) -> int:
        """Stop QEMU after SIGTERM, SIGINT or SIGHUP."""
        name = signal.Signals(self.signal_received).name
        log.info("Received %s; stopping the microVM.", name)
        self.shutdown()
        return 128 + self.signal_received

    def shutdown(self) -> None:
        """Stop QEMU if it runs, flush metrics and close files."""
        if self.qemu is not None:
            self.qemu.quit()
            self.qemu.kill()
        self.flush_metrics()
        self.metrics.close()
        if self.exit_code is None:
            self.exit_code = 0
        # Let API threads that still wait learn the answer.
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item is not _EXITED:
                _action, done, box = item
                box.append(fault("The microVM is shutting down."))
                done.set()
