"""Every request the client can send matches the official API description.

The description (Swagger 2.0) comes from the file named by
``FCLAB_API_SPEC``. Firecracker rejects unknown fields, so object schemas
are checked strictly here (no properties beyond those described).
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from unix_http_server import Received, UnixHttpServer

from helpers.api import FirecrackerClient

Spec = dict[str, Any]
Call = Callable[[FirecrackerClient], object]

# Each client method called with every optional field set, and with none.
CALLS: dict[str, Call] = {
    "describe_instance": lambda api: api.describe_instance(),
    "version": lambda api: api.version(),
    "vm_config": lambda api: api.vm_config(),
    "get_machine_config": lambda api: api.get_machine_config(),
    "put_machine_config_none": lambda api: api.put_machine_config(1, 128),
    "put_machine_config_all": lambda api: api.put_machine_config(
        2, 256, smt=True, track_dirty_pages=True, huge_pages="2M"),
    "patch_machine_config_none": lambda api: api.patch_machine_config(),
    "patch_machine_config_all": lambda api: api.patch_machine_config(
        vcpu_count=2, mem_size_mib=256, smt=False, track_dirty_pages=False,
        huge_pages="None"),
    "put_boot_source_none": lambda api: api.put_boot_source("/vmlinux"),
    "put_boot_source_all": lambda api: api.put_boot_source(
        "/vmlinux", boot_args="console=ttyS0", initrd_path="/initrd"),
    "put_drive_none": lambda api: api.put_drive(
        "rootfs", "/rootfs.ext4", is_root_device=True),
    "put_drive_all": lambda api: api.put_drive(
        "scratch", "/scratch.ext4", is_root_device=False, is_read_only=True,
        cache_type="Writeback", io_engine="Async"),
    "patch_drive": lambda api: api.patch_drive("scratch", "/other.ext4"),
    "put_network_interface_none": lambda api: api.put_network_interface(
        "eth0", "tap0"),
    "put_network_interface_all": lambda api: api.put_network_interface(
        "eth0", "tap0", guest_mac="06:00:ac:10:00:02", mtu=1500),
    "put_logger_none": lambda api: api.put_logger(),
    "put_logger_all": lambda api: api.put_logger(
        log_path="/fc.log", level="Debug", show_level=True,
        show_log_origin=True, module="api_server::request"),
    "put_metrics": lambda api: api.put_metrics("/metrics.json"),
    "instance_start": lambda api: api.instance_start(),
    "send_ctrl_alt_del": lambda api: api.send_ctrl_alt_del(),
    "flush_metrics": lambda api: api.flush_metrics(),
    "pause": lambda api: api.pause(),
    "resume": lambda api: api.resume(),
}

# The description reuses the PUT schema for PATCH /machine-config, whose
# text says it takes "a subset" of the fields: none is required there.
SUBSET_BODIES = {("patch", "/machine-config")}


@pytest.fixture(scope="module")
def spec(api_spec: Spec) -> Spec:
    """The official API description (see conftest.api_spec)."""
    return api_spec


def strict(definitions: dict[str, Any]) -> dict[str, Any]:
    """Copy *definitions*, forbidding properties that are not described."""
    result = copy.deepcopy(definitions)
    for schema in result.values():
        if "properties" in schema:
            schema.setdefault("additionalProperties", False)
    return result


def find_operation(spec: Spec, method: str, path: str) -> tuple[str, Any]:
    """Return the templated path and operation matching a real request."""
    for template, operations in spec["paths"].items():
        # Resource ids take letters, digits and underscores only.
        pattern = "".join(
            "[A-Za-z0-9_]+" if part.startswith("{") else re.escape(part)
            for part in re.split(r"(\{[^}]+\})", template))
        if re.fullmatch(pattern, path) and method.lower() in operations:
            return template, operations[method.lower()]
    raise AssertionError(f"{method} {path} is not in the API description")


def body_schema(spec: Spec, template: str, method: str,
                operation: dict[str, Any]) -> dict[str, Any] | None:
    """Build a JSON schema for the operation's body, or None if it has none."""
    for parameter in operation.get("parameters", []):
        if parameter.get("in") == "body":
            schema = dict(parameter["schema"])
            definitions = strict(spec["definitions"])
            if (method.lower(), template) in SUBSET_BODIES:
                name = schema["$ref"].rsplit("/", 1)[-1]
                definitions[name].pop("required", None)
            schema["definitions"] = definitions
            return schema
    return None


def check_request(spec: Spec, got: Received) -> None:
    """Assert that one received request fits the API description."""
    template, operation = find_operation(spec, got.method, got.path)
    schema = body_schema(spec, template, got.method, operation)
    if schema is None:
        assert got.body == b"", f"{got.method} {template} takes no body"
        return
    body = got.json()
    jsonschema.Draft4Validator(schema).validate(body)
    # Firecracker wants a resource id in the body equal to the one in the
    # path.
    for name in re.findall(r"\{([^}]+)\}", template):
        assert body.get(name) == got.path.rsplit("/", 1)[-1]


@pytest.fixture(scope="module")
def server() -> Iterator[UnixHttpServer]:
    """A recording server standing in for the VMM."""
    with (
        tempfile.TemporaryDirectory(prefix="fclab-contract-") as name,
        UnixHttpServer(Path(name) / "api.sock") as srv,
    ):
        yield srv


@pytest.mark.parametrize("name", sorted(CALLS))
def test_request_matches_the_description(
    name: str, spec: Spec, server: UnixHttpServer
) -> None:
    """The body the client sends validates against the path's schema."""
    client = FirecrackerClient(str(server.socket_path), timeout=5)
    before = len(server.received)
    CALLS[name](client)
    client.close()

    [got] = server.received[before:]
    check_request(spec, got)


@pytest.mark.parametrize("body, field", [
    ({"vcpu_count": 1, "mem_size_mib": 128, "ht_enabled": False},
     "ht_enabled"),
    ({"vcpu_count": 0, "mem_size_mib": 128}, "vcpu_count"),
    ({"mem_size_mib": 128}, "vcpu_count"),
])
def test_the_check_rejects_what_firecracker_rejects(
    body: dict[str, Any], field: str, spec: Spec
) -> None:
    """An old field name, a bad value or a missing field fails the check."""
    got = Received("PUT", "/machine-config", {},
                   json.dumps(body).encode())

    with pytest.raises(jsonschema.ValidationError, match=field):
        check_request(spec, got)


def test_unknown_path_is_reported(spec: Spec) -> None:
    """A path the description lacks fails the check."""
    with pytest.raises(AssertionError, match="not in the API description"):
        find_operation(spec, "PUT", "/machine-configuration")
