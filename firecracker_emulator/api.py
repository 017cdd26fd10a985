"""Firecracker's API routes: from an HTTP request to a VMM action.

``parse_request`` mirrors how Firecracker splits the path and picks a
handler, including the order in which it reports problems (the path id,
then the body, then the id in the body). The action it returns is run by
the VMM on the main thread; ``ROUTES`` lists every method and path of the
API description with whether the emulator implements it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import serde

# Every method and path of Firecracker v1.16.1's API description, and
# whether the emulator implements it (True) or answers 400 saying that it
# is not emulated (False).
ROUTES: tuple[tuple[str, str, bool], ...] = (
    ("GET", "/", True),
    ("PUT", "/actions", True),
    ("GET", "/balloon", False),
    ("PUT", "/balloon", False),
    ("PATCH", "/balloon", False),
    ("GET", "/balloon/statistics", False),
    ("PATCH", "/balloon/statistics", False),
    ("PATCH", "/balloon/hinting/start", False),
    ("GET", "/balloon/hinting/status", False),
    ("PATCH", "/balloon/hinting/stop", False),
    ("PUT", "/boot-source", True),
    ("PUT", "/cpu-config", False),
    ("PUT", "/drives/{drive_id}", True),
    ("PATCH", "/drives/{drive_id}", True),
    ("PUT", "/pmem/{id}", False),
    ("PATCH", "/pmem/{id}", False),
    ("PUT", "/logger", True),
    ("GET", "/machine-config", True),
    ("PUT", "/machine-config", True),
    ("PATCH", "/machine-config", True),
    ("PUT", "/metrics", True),
    ("PUT", "/mmds", False),
    ("PATCH", "/mmds", False),
    ("GET", "/mmds", False),
    ("PUT", "/mmds/config", False),
    ("PUT", "/entropy", False),
    ("PUT", "/serial", False),
    ("PUT", "/hotplug/memory", False),
    ("PATCH", "/hotplug/memory", False),
    ("GET", "/hotplug/memory", False),
    ("PUT", "/network-interfaces/{iface_id}", True),
    ("PATCH", "/network-interfaces/{iface_id}", True),
    ("PUT", "/snapshot/create", False),
    ("PUT", "/snapshot/load", False),
    ("GET", "/version", True),
    ("PATCH", "/vm", True),
    ("GET", "/vm/config", True),
    ("PUT", "/vsock", False),
)

# What each unemulated feature is called in the 400 message.
_FEATURES = {
    "balloon": "the balloon device",
    "cpu-config": "custom CPU templates",
    "pmem": "virtio-pmem devices",
    "mmds": "the microVM metadata service (MMDS)",
    "entropy": "the entropy device",
    "serial": "serial console configuration",
    "hotplug": "memory hotplug",
    "snapshot": "snapshots",
    "vsock": "vsock devices",
}


@dataclass(frozen=True)
class Action:
    """A parsed request for the VMM: what to do and with which body."""

    name: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    """An HTTP answer: status code and JSON body (None for no body)."""

    status: int
    body: Any = None


def fault(message: str, status: int = 400) -> Reply:
    """Return Firecracker's error body."""
    return Reply(status, {"fault_message": message})


def not_emulated(method: str, path: str, feature: str) -> Reply:
    """Answer a documented endpoint the emulator does not implement."""
    return fault(
        f"The requested operation is not supported: {method} {path} "
        f"({_FEATURES.get(feature, feature)}) is not emulated by "
        "firecracker-emulator."
    )


def _checked_id(raw: str | None) -> str | Reply:
    """Validate a resource id from the path, as Firecracker does."""
    if not raw:
        return fault("The ID cannot be empty.")
    if not all(c == "_" or c.isalnum() for c in raw):
        return fault(
            "API Resource IDs can only contain alphanumeric characters "
            "and underscores."
        )
    return raw


def _body(raw: bytes, kind: serde.Struct) -> dict[str, Any] | Reply:
    """Deserialize a body or return Firecracker's 400 for it."""
    try:
        return serde.deserialize(raw, kind)
    except serde.BodyError as err:
        return fault(
            "An error occurred when deserializing the json body of a "
            f"request: {err}."
        )


def _with_id(
    raw: bytes,
    kind: serde.Struct,
    path_id: str | None,
    id_key: str,
    action: str,
) -> Action | Reply:
    """Parse a body whose id must equal the id in the path."""
    checked = _checked_id(path_id)
    if isinstance(checked, Reply):
        return checked
    body = _body(raw, kind)
    if isinstance(body, Reply):
        return body
    if body[id_key] != checked:
        return fault(
            f"The id from the path [{checked}] does not match the id from "
            f"the body [{body[id_key]}]!"
        )
    return Action(action, body)


def parse_request(
    method: str, uri: str, raw: bytes | None
) -> Action | Reply:
    """Map a request to an Action, or to an immediate error Reply."""
    path_only = uri.split("?", 1)[0]
    tokens = [t for t in path_only.lstrip("/").split("/")]
    if tokens and tokens[-1] == "":
        tokens.pop()
    head = tokens[0] if tokens else ""
    second = tokens[1] if len(tokens) > 1 else None

    if method == "GET" and raw is None:
        if head == "":
            return Action("get_instance_info", {})
        if head == "version":
            return Action("get_version", {})
        if head == "vm" and second == "config":
            return Action("get_vm_config", {})
        if head == "machine-config":
            return Action("get_machine_config", {})
        if head in ("balloon", "mmds") or (
            head == "hotplug" and second == "memory"
        ):
            return not_emulated(method, path_only, head)
    elif method == "GET":
        return fault("GET request cannot have a body.")

    if method == "PUT" and raw is not None:
        return _parse_put(head, second, raw, path_only)
    if method == "PUT":
        return fault("Empty PUT request.")

    if method == "PATCH" and head == "balloon":
        return not_emulated(method, path_only, head)
    if method == "PATCH" and raw is not None:
        return _parse_patch(head, second, raw, path_only)
    if method == "PATCH":
        return fault("Empty PATCH request.")

    return fault(f"Invalid request method and/or path: {method} {head}.")


def _parse_put(
    head: str, second: str | None, raw: bytes, path: str
) -> Action | Reply:
    """Route a PUT request with a body."""
    simple = {
        "boot-source": (serde.BOOT_SOURCE, "put_boot_source"),
        "logger": (serde.LOGGER, "put_logger"),
        "metrics": (serde.METRICS, "put_metrics"),
        "machine-config": (serde.MACHINE_CONFIG, "put_machine_config"),
    }
    if head == "actions":
        body = _body(raw, serde.ACTION)
        if isinstance(body, Reply):
            return body
        return Action(body["action_type"], {})
    if head in simple:
        kind, name = simple[head]
        body = _body(raw, kind)
        return body if isinstance(body, Reply) else Action(name, body)
    if head == "drives":
        return _with_id(raw, serde.DRIVE, second, "drive_id", "put_drive")
    if head == "network-interfaces":
        return _with_id(
            raw, serde.NETWORK_INTERFACE, second, "iface_id", "put_net"
        )
    if head in ("balloon", "cpu-config", "pmem", "mmds", "vsock",
                "entropy", "serial"):
        return not_emulated("PUT", path, head)
    if head == "snapshot" and second in ("create", "load"):
        return not_emulated("PUT", path, head)
    if head == "hotplug" and second == "memory":
        return not_emulated("PUT", path, head)
    return fault(f"Invalid request method and/or path: PUT {head}.")


def _parse_patch(
    head: str, second: str | None, raw: bytes, path: str
) -> Action | Reply:
    """Route a PATCH request with a body."""
    if head == "drives":
        return _with_id(
            raw, serde.DRIVE_UPDATE, second, "drive_id", "patch_drive"
        )
    if head == "network-interfaces":
        return _with_id(
            raw,
            serde.NETWORK_INTERFACE_UPDATE,
            second,
            "iface_id",
            "patch_net",
        )
    if head == "machine-config":
        body = _body(raw, serde.MACHINE_CONFIG_UPDATE)
        if isinstance(body, Reply):
            return body
        if not body:
            return fault("Empty PATCH request.")
        return Action("patch_machine_config", body)
    if head == "vm":
        body = _body(raw, serde.VM_STATE)
        if isinstance(body, Reply):
            return body
        return Action("patch_vm", body)
    if head == "mmds" or (head == "hotplug" and second == "memory"):
        return not_emulated("PATCH", path, head)
    if head == "pmem":
        return not_emulated("PATCH", path, head)
    return fault(f"Invalid request method and/or path: PATCH {head}.")
