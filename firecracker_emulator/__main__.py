"""Command line of ``firecracker-emulator``: Firecracker's flags, and a few.

Exit status: 0 when the guest shut down or rebooted (QEMU exited
cleanly), 1 on a runtime failure (the API socket cannot be bound, QEMU
failed), 152 when ``--config-file`` holds a bad configuration, 153 for
bad command-line arguments. On SIGTERM, SIGINT or SIGHUP the emulator
stops QEMU, removes its socket and then dies of that same signal.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from typing import Any, NoReturn

from . import FIRECRACKER_VERSION, __version__
from .errors import StartupError

log = logging.getLogger("firecracker_emulator.main")

# Firecracker's exit codes for these failures.
EXIT_GENERIC = 1
EXIT_BAD_CONFIGURATION = 152
EXIT_ARG_PARSING = 153

DEFAULT_SOCKET = "/run/firecracker.socket"
DEFAULT_ID = "anonymous-instance"
# Firecracker's limit on instance ids: letters, digits and hyphens.
MAX_ID_LEN = 64

# Sections of Firecracker's configuration file, in its field order.
CONFIG_SECTIONS = (
    "balloon", "drives", "boot-source", "cpu-config", "logger",
    "machine-config", "metrics", "mmds-config", "network-interfaces",
    "vsock", "entropy", "pmem", "serial", "memory-hotplug",
)
UNEMULATED_SECTIONS = {
    "balloon", "cpu-config", "mmds-config", "vsock", "entropy", "pmem",
    "serial", "memory-hotplug",
}


class _Parser(argparse.ArgumentParser):
    """argparse, exiting with Firecracker's argument-parsing status."""

    def error(self, message: str) -> NoReturn:
        """Report a bad argument and exit 153."""
        sys.stderr.write(
            f"Arguments parsing error: {message}\n\n"
            "For more information try --help.\n"
        )
        raise SystemExit(EXIT_ARG_PARSING)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser."""
    parser = _Parser(
        prog="firecracker-emulator",
        description=(
            f"Serve Firecracker v{FIRECRACKER_VERSION}'s API on a Unix "
            "socket and run the microVM in QEMU."
        ),
        epilog=(
            "Emulator-only flags: --accel and --qemu. Accepted and "
            "ignored for compatibility: --no-seccomp, --seccomp-filter, "
            "--start-time-us, --start-time-cpu-us, --parent-cpu-time-us."
        ),
    )
    add = parser.add_argument
    add("--api-sock", default=DEFAULT_SOCKET,
        help="path of the API socket (default %(default)s)")
    add("--id", default=DEFAULT_ID,
        help="microVM id shown in logs and GET / (default %(default)s)")
    add("--config-file", help="JSON configuration to boot at once")
    add("--no-api", action="store_true",
        help="serve no API; needs --config-file")
    add("--boot-timer", action="store_true",
        help="log Guest-boot-time when the guest writes 123 to 0xC0000000")
    add("--log-path", help="write the log here instead of stdout")
    add("--level", default="Info",
        help="Error, Warning, Info, Debug, Trace or Off (default Info)")
    add("--module", help="log only records from this module")
    add("--show-level", action="store_true",
        help="print the level in each log line")
    add("--show-log-origin", action="store_true",
        help="print the source file and line in each log line")
    add("--metrics-path", help="write metrics here")
    add("--http-api-max-payload-size", type=int,
        help="largest request body accepted, in bytes")
    add("--version", action="store_true", help="print the version and exit")
    add("--accel", choices=("auto", "kvm", "tcg"),
        default=os.environ.get("FCEMU_ACCEL", "auto"),
        help="emulator only: QEMU accelerator; auto probes KVM once and "
        "falls back to TCG (env FCEMU_ACCEL, default auto)")
    add("--qemu", help="emulator only: QEMU binary (env FCEMU_QEMU, "
        "default qemu-system-x86_64 on PATH)")
    add("--no-seccomp", action="store_true", help=argparse.SUPPRESS)
    add("--seccomp-filter", help=argparse.SUPPRESS)
    add("--start-time-us", help=argparse.SUPPRESS)
    add("--start-time-cpu-us", help=argparse.SUPPRESS)
    add("--parent-cpu-time-us", help=argparse.SUPPRESS)
    return parser


def _ensure_std_fds() -> None:
    """Open /dev/null on any closed standard descriptor.

    Otherwise a socket created later could land on 0, 1 or 2 and QEMU,
    which inherits them, would read or write it as its console.
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _process_age_us() -> int:
    """Return the microseconds since this process was created."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        # Field 22 of stat(5) (index 19 after the command name) is the
        # start time in clock ticks since boot.
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
        return int((now - started) * 1_000_000)
    except (OSError, ValueError, IndexError):
        return 0


def load_config_file(vmm: Any, path: str) -> None:
    """Apply a Firecracker JSON configuration file, then boot."""
    from . import serde
    from .api import Action

    try:
        with open(path, "rb") as config:
            raw = config.read()
    except OSError as err:
        raise StartupError(
            f"Unable to read the configuration file {path}: {err}",
            EXIT_BAD_CONFIGURATION,
        ) from None
    try:
        text, root = serde.parse(raw)
        if not isinstance(root, serde.ObjectNode):
            raise serde.BodyError(
                "invalid type: expected struct VmmConfig "
                + serde.position(text, root.start)
            )
        sections: dict[str, Any] = {}
        for key, key_end, node in root.members:
            if key not in CONFIG_SECTIONS:
                names = ", ".join(f"`{n}`" for n in CONFIG_SECTIONS)
                raise serde.BodyError(
                    f"unknown field `{key}`, expected one of {names} "
                    + serde.position(text, key_end)
                )
            sections[key] = (node, key_end)
        actions: list[Action] = []
        for key, (node, key_end) in sections.items():
            if isinstance(node, serde.Node) and node.value is None:
                continue
            if key in UNEMULATED_SECTIONS:
                raise serde.BodyError(
                    f"the `{key}` section is not emulated by "
                    "firecracker-emulator " + serde.position(text, key_end)
                )
        kinds = (
            ("logger", serde.LOGGER, "put_logger"),
            ("boot-source", serde.BOOT_SOURCE, "put_boot_source"),
            ("machine-config", serde.MACHINE_CONFIG, "put_machine_config"),
            ("drives", serde.DRIVE, "put_drive"),
            ("network-interfaces", serde.NETWORK_INTERFACE, "put_net"),
            ("metrics", serde.METRICS, "put_metrics"),
        )
        for key, kind, name in kinds:
            if key not in sections:
                continue
            node = sections[key][0]
            if isinstance(node, serde.ArrayNode):
                items = node.items
            elif key in ("drives", "network-interfaces"):
                raise serde.BodyError(
                    f"invalid type: expected a sequence for `{key}` "
                    + serde.position(text, node.start)
                )
            else:
                items = [node]
            for item in items:
                actions.append(
                    Action(name, serde.deserialize_value(text, item, kind))
                )
    except serde.BodyError as err:
        raise StartupError(
            f"Configuration for VMM from one single json failed: {err}",
            EXIT_BAD_CONFIGURATION,
        ) from None
    for action in actions + [Action("InstanceStart", {})]:
        reply = vmm.dispatch(action)
        if reply.status >= 400:
            raise StartupError(
                "Configuration for VMM from one single json failed: "
                + reply.body["fault_message"],
                EXIT_BAD_CONFIGURATION,
            )
    log.info("Successfully started microvm that was configured from one "
             "single json")


def run(argv: list[str] | None = None) -> int:
    """Run the emulator; return its exit status."""
    _ensure_std_fds()
    import threading

    # Firecracker names its VMM thread "main"; log lines show it.
    threading.current_thread().name = "main"
    args = build_parser().parse_args(argv)
    if args.version:
        print(f"Firecracker v{FIRECRACKER_VERSION}")
        print(f"firecracker-emulator {__version__}: Firecracker's API "
              "served over QEMU")
        return 0
    if args.accel not in ("auto", "kvm", "tcg"):
        build_parser().error(
            f"invalid accelerator {args.accel!r} (from FCEMU_ACCEL): use "
            "auto, kvm or tcg"
        )
    if args.no_api and not args.config_file:
        build_parser().error("--no-api requires --config-file")
    if not args.id or len(args.id) > MAX_ID_LEN or not all(
        c.isascii() and (c.isalnum() or c == "-") for c in args.id
    ):
        build_parser().error(
            f"Invalid instance ID: {args.id!r}: use 1 to {MAX_ID_LEN} "
            "letters, digits or hyphens"
        )

    from .logs import LogSettings, level_from_name

    logging.addLevelName(5, "TRACE")
    logs = LogSettings(args.id)
    try:
        level_from_name(args.level)
        logs.apply(
            level=args.level,
            path=args.log_path,
            show_level=args.show_level,
            show_origin=args.show_log_origin,
            module=args.module,
        )
    except ValueError as err:
        build_parser().error(str(err))
    except OSError as err:
        sys.stderr.write(f"Failed to open the log file {args.log_path}: "
                         f"{err}\n")
        return EXIT_GENERIC
    log.info(
        "Running Firecracker v%s (firecracker-emulator %s: Firecracker's "
        "API over QEMU)", FIRECRACKER_VERSION, __version__,
    )

    from .vmm import Vmm

    vmm = Vmm(
        args.id, logs, boot_timer=args.boot_timer, accel=args.accel,
        qemu_path=args.qemu,
    )
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, vmm.on_signal)
    server = None
    try:
        if args.metrics_path:
            from .api import Action

            reply = vmm.dispatch(
                Action("put_metrics", {"metrics_path": args.metrics_path})
            )
            if reply.status >= 400:
                raise StartupError(reply.body["fault_message"], EXIT_GENERIC)
        if not args.no_api:
            from . import server as server_mod

            if args.http_api_max_payload_size:
                server_mod.MAX_BODY = args.http_api_max_payload_size
            server = server_mod.ApiServer(args.api_sock, _handler(vmm))
            server.bind()
            server.start()
            vmm.startup_us = _process_age_us()
            vmm.startup_cpu_us = int(time.process_time() * 1_000_000)
            log.info("API server started.")
        if args.config_file:
            load_config_file(vmm, args.config_file)
        status = vmm.run()
    except StartupError as err:
        log.error("%s", err)
        vmm.shutdown()
        status = err.exit_code
    finally:
        if server is not None:
            server.close()
    if vmm.signal_received:
        logs.close()
        signal.signal(vmm.signal_received, signal.SIG_DFL)
        os.kill(os.getpid(), vmm.signal_received)
    if status == 0:
        log.info("Firecracker exiting successfully. exit_code=0")
    else:
        log.error("Firecracker exiting with error. exit_code=%d", status)
    logs.close()
    return status


def _handler(vmm: Any) -> Any:
    """Return the HTTP callback: parse, run on the VMM, answer."""
    from .api import Reply, parse_request

    def handle(method: str, uri: str, body: bytes | None) -> tuple[int, Any]:
        if body is not None and uri.rstrip("/") != "/mmds":
            log.info(
                "The API server received a %s request on \"%s\" with body "
                "\"%s\".", method.capitalize(), uri,
                body.decode("utf-8", "replace"),
            )
        else:
            log.info("The API server received a %s request on \"%s\".",
                     method.capitalize(), uri)
        parsed = parse_request(method, uri, body)
        if isinstance(parsed, Reply):
            log.error(
                "Received Error. Status code: 400 Bad Request. Message: %s",
                parsed.body["fault_message"],
            )
            return parsed.status, parsed.body
        reply = vmm.submit(parsed)
        if reply.status == 204:
            log.info("The request was executed successfully. Status code: "
                     "204 No Content.")
        elif reply.status == 200:
            log.info("The request was executed successfully. Status code: "
                     "200 OK.")
        return reply.status, reply.body

    return handle


def main() -> None:
    """Entry point of the ``firecracker-emulator`` command."""
    raise SystemExit(run())


if __name__ == "__main__":
    main()
