"""A small, typed client for Firecracker's HTTP API over a Unix socket.

Every call is kept in ``FirecrackerClient.history`` as an ``ApiCall``
that renders itself as the raw HTTP request and as its ``curl`` twin, so
a notebook can show what the helper sent next to what it got back.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import requests
import requests_unixsocket

from helpers.errors import LabError

log = logging.getLogger(__name__)

# Seconds a single API request may take. Firecracker answers in well
# under a millisecond; the emulator and a loaded host need more slack.
DEFAULT_TIMEOUT_S = 10.0

# Linux's sockaddr_un holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107

# Advice added to a fault message, keyed by a fragment of that message.
_HINTS: dict[str, str] = {
    "unknown field": (
        "Firecracker rejects fields it does not know: compare the body "
        "with the API description of this release (for example, "
        "ht_enabled was renamed smt in v1.0)."
    ),
    "not supported after starting": (
        "This call configures a microVM before boot; start a new VMM "
        "process to change it."
    ),
    "not supported before starting": (
        "This call acts on a running microVM; send InstanceStart first."
    ),
    "Invalid request method and/or path": (
        "Check the method and the path against the API description."
    ),
}

JsonBody = dict[str, Any] | list[Any] | str | None


def _status_text(status: int) -> str:
    """Return ``"204 No Content"`` style text for an HTTP status code."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _single_quoted(text: str) -> str:
    """Quote *text* for a POSIX shell, always with single quotes."""
    return "'" + text.replace("'", "'\"'\"'") + "'"


class ApiError(LabError):
    """A request the VMM answered with a status outside 2xx."""

    def __init__(
        self, method: str, path: str, status: int, fault_message: str
    ) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.fault_message = fault_message
        super().__init__(self._compose())

    def _compose(self) -> str:
        """Build the message: request, status, fault, and what to do."""
        text = (
            f"{self.method} {self.path} -> {_status_text(self.status)}: "
            f"{self.fault_message}"
        )
        for fragment, hint in _HINTS.items():
            if fragment.lower() in self.fault_message.lower():
                return f"{text}\n{hint}"
        return text


class ApiUnreachable(LabError):
    """The API socket did not answer (missing, refused or timed out)."""


@dataclass
class ApiCall:
    """One request sent to the API and the answer it got."""

    method: str
    path: str
    body: JsonBody
    socket_path: str
    status: int | None = None
    latency_s: float | None = None
    response: JsonBody = None
    started: float = field(default_factory=time.monotonic)

    @property
    def ok(self) -> bool:
        """Whether the VMM answered with a 2xx status."""
        return self.status is not None and 200 <= self.status < 300

    def summary(self) -> dict[str, Any]:
        """Method, path, status and latency in ms, for a table row."""
        return {
            "method": self.method,
            "path": self.path,
            "status": self.status if self.status is not None else "none",
            "latency_ms": (round(self.latency_s * 1000, 2)
                           if self.latency_s is not None else None),
        }

    def body_text(self) -> str | None:
        """Return the request body as the JSON text that was sent."""
        if self.body is None:
            return None
        if isinstance(self.body, str):
            return self.body
        return json.dumps(self.body)

    def curl(self) -> str:
        """Return the equivalent ``curl --unix-socket`` command line."""
        url = "http://localhost" + self.path
        parts = [
            "curl",
            "--unix-socket",
            shlex.quote(self.socket_path),
            "-i",
            "-X",
            self.method,
            _single_quoted(url),
        ]
        text = self.body_text()
        if text is not None:
            parts += ["-H", _single_quoted("Content-Type: application/json")]
            parts += ["-d", _single_quoted(text)]
        return " ".join(parts)

    def http_request(self) -> str:
        """Return the request as HTTP/1.1 text, the way it goes on the wire."""
        lines = [f"{self.method} {self.path} HTTP/1.1", "Host: localhost"]
        text = self.body_text()
        if text is not None:
            if not isinstance(self.body, str):
                # Pretty-printed for reading; the wire carries one line.
                text = json.dumps(self.body, indent=2)
            lines += ["Content-Type: application/json", "", text]
        return "\n".join(lines)

    def answer(self) -> str:
        """Return a one-line summary of the answer and its latency."""
        if self.status is None:
            return "no answer"
        text = _status_text(self.status)
        if self.latency_s is not None:
            text += f" in {self.latency_s * 1000:.1f} ms"
        if self.response not in (None, "", {}):
            shown = (self.response if isinstance(self.response, str)
                     else json.dumps(self.response))
            text += f": {shown}"
        return text

    def __str__(self) -> str:
        """Render request, curl twin and answer as plain text."""
        return (
            f"{self.http_request()}\n\n$ {self.curl()}\n\n-> {self.answer()}"
        )

    def _repr_markdown_(self) -> str:
        """Render the call for Jupyter: request, curl twin, answer."""
        return (
            "```http\n"
            f"{self.http_request()}\n"
            "```\n"
            "```bash\n"
            f"{self.curl()}\n"
            "```\n"
            f"**&rarr; {self.answer()}**\n"
        )


class FirecrackerClient:
    """Firecracker's API, one typed method per endpoint the lab uses."""

    def __init__(
        self, socket_path: str, timeout: float = DEFAULT_TIMEOUT_S
    ) -> None:
        if len(socket_path.encode()) > MAX_SOCKET_PATH:
            raise LabError(
                f"API socket path is {len(socket_path.encode())} bytes, "
                f"over Linux's limit of {MAX_SOCKET_PATH}: choose a "
                "shorter working directory."
            )
        self.socket_path = socket_path
        self.timeout = timeout
        self.history: list[ApiCall] = []
        self._session = requests_unixsocket.Session()
        self._base = "http+unix://" + urllib.parse.quote(socket_path, safe="")

    def close(self) -> None:
        """Close the pooled connection to the socket."""
        self._session.close()

    # -- the raw call ------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: JsonBody = None,
        *,
        timeout: float | None = None,
    ) -> ApiCall:
        """Send one request; raise ``ApiError`` unless the answer is 2xx."""
        call = ApiCall(method, path, body, self.socket_path)
        self.history.append(call)
        text = call.body_text()
        headers = {"Accept": "application/json"}
        if text is not None:
            headers["Content-Type"] = "application/json"
        log.debug("%s %s %s", method, path, text or "")

        started = time.perf_counter()
        try:
            reply = self._session.request(
                method,
                self._base + path,
                data=text.encode() if text is not None else None,
                headers=headers,
                timeout=timeout if timeout is not None else self.timeout,
            )
        except requests.RequestException as exc:
            raise ApiUnreachable(
                f"{method} {path}: no answer on {self.socket_path} "
                f"({type(exc).__name__}). Is the VMM running? Its output "
                "usually says why it stopped."
            ) from exc
        call.latency_s = time.perf_counter() - started
        call.status = reply.status_code
        call.response = self._decode(reply)
        log.debug("%s %s -> %s", method, path, reply.status_code)

        if not call.ok:
            raise ApiError(method, path, reply.status_code,
                           self._fault(call.response))
        return call

    @staticmethod
    def _decode(reply: requests.Response) -> JsonBody:
        """Return the reply's JSON body, its text, or None when empty."""
        if not reply.content:
            return None
        try:
            decoded: JsonBody = reply.json()
        except ValueError:
            return reply.text
        return decoded

    @staticmethod
    def _fault(response: JsonBody) -> str:
        """Extract Firecracker's ``fault_message`` from an error body."""
        if isinstance(response, dict) and "fault_message" in response:
            return str(response["fault_message"])
        if response in (None, ""):
            return "(empty answer)"
        return response if isinstance(response, str) else json.dumps(
            response)

    def _send(self, method: str, path: str, **fields: Any) -> ApiCall:
        """Send the *fields* that are set (not ``None``) as a JSON object."""
        body = {key: value for key, value in fields.items()
                if value is not None}
        return self.request(method, path, body)

    def _get(self, path: str) -> dict[str, Any]:
        """GET *path* and return its JSON object."""
        response = self.request("GET", path).response
        return response if isinstance(response, dict) else {}

    # -- information -------------------------------------------------------

    def describe_instance(self) -> dict[str, Any]:
        """GET / : id, state, vmm_version and app_name."""
        return self._get("/")

    def version(self) -> dict[str, Any]:
        """GET /version : the VMM's version."""
        return self._get("/version")

    def vm_config(self) -> dict[str, Any]:
        """GET /vm/config : the whole configuration of the microVM."""
        return self._get("/vm/config")

    def get_machine_config(self) -> dict[str, Any]:
        """GET /machine-config : vCPUs, memory and their options."""
        return self._get("/machine-config")

    # -- pre-boot configuration --------------------------------------------

    def put_machine_config(
        self,
        vcpu_count: int,
        mem_size_mib: int,
        *,
        smt: bool | None = None,
        track_dirty_pages: bool | None = None,
        huge_pages: str | None = None,
    ) -> ApiCall:
        """PUT /machine-config : replace the machine configuration."""
        return self._send(
            "PUT", "/machine-config",
            vcpu_count=vcpu_count, mem_size_mib=mem_size_mib, smt=smt,
            track_dirty_pages=track_dirty_pages, huge_pages=huge_pages,
        )

    def patch_machine_config(
        self,
        *,
        vcpu_count: int | None = None,
        mem_size_mib: int | None = None,
        smt: bool | None = None,
        track_dirty_pages: bool | None = None,
        huge_pages: str | None = None,
    ) -> ApiCall:
        """PATCH /machine-config : change only the fields given."""
        return self._send(
            "PATCH", "/machine-config",
            vcpu_count=vcpu_count, mem_size_mib=mem_size_mib, smt=smt,
            track_dirty_pages=track_dirty_pages, huge_pages=huge_pages,
        )

    def put_boot_source(
        self,
        kernel_image_path: str,
        *,
        boot_args: str | None = None,
        initrd_path: str | None = None,
    ) -> ApiCall:
        """PUT /boot-source : the kernel, its command line and initrd."""
        return self._send(
            "PUT", "/boot-source",
            kernel_image_path=kernel_image_path, boot_args=boot_args,
            initrd_path=initrd_path,
        )

    def put_drive(
        self,
        drive_id: str,
        path_on_host: str,
        *,
        is_root_device: bool,
        is_read_only: bool | None = None,
        cache_type: str | None = None,
        io_engine: str | None = None,
    ) -> ApiCall:
        """PUT /drives/{drive_id} : attach a block device."""
        return self._send(
            "PUT", f"/drives/{drive_id}",
            drive_id=drive_id, path_on_host=path_on_host,
            is_root_device=is_root_device, is_read_only=is_read_only,
            cache_type=cache_type, io_engine=io_engine,
        )

    def put_network_interface(
        self,
        iface_id: str,
        host_dev_name: str,
        *,
        guest_mac: str | None = None,
        mtu: int | None = None,
    ) -> ApiCall:
        """PUT /network-interfaces/{iface_id} : attach a TAP device."""
        return self._send(
            "PUT", f"/network-interfaces/{iface_id}",
            iface_id=iface_id, host_dev_name=host_dev_name,
            guest_mac=guest_mac, mtu=mtu,
        )

    def put_logger(
        self,
        *,
        log_path: str | None = None,
        level: str | None = None,
        show_level: bool | None = None,
        show_log_origin: bool | None = None,
        module: str | None = None,
    ) -> ApiCall:
        """PUT /logger : where the VMM logs, and how much."""
        return self._send(
            "PUT", "/logger",
            log_path=log_path, level=level, show_level=show_level,
            show_log_origin=show_log_origin, module=module,
        )

    def put_metrics(self, metrics_path: str) -> ApiCall:
        """PUT /metrics : the file that receives JSON metrics lines."""
        return self._send("PUT", "/metrics", metrics_path=metrics_path)

    # -- actions and post-boot calls ---------------------------------------

    def _action(self, action_type: str) -> ApiCall:
        """PUT /actions with the given ``action_type``."""
        return self._send("PUT", "/actions", action_type=action_type)

    def instance_start(self) -> ApiCall:
        """PUT /actions InstanceStart : boot the configured microVM."""
        return self._action("InstanceStart")

    def send_ctrl_alt_del(self) -> ApiCall:
        """PUT /actions SendCtrlAltDel : ask the guest to reboot (x86)."""
        return self._action("SendCtrlAltDel")

    def flush_metrics(self) -> ApiCall:
        """PUT /actions FlushMetrics : write a metrics line now."""
        return self._action("FlushMetrics")

    def patch_drive(self, drive_id: str, path_on_host: str) -> ApiCall:
        """PATCH /drives/{drive_id} : swap the backing file after boot."""
        return self._send("PATCH", f"/drives/{drive_id}",
                          drive_id=drive_id, path_on_host=path_on_host)

    def pause(self) -> ApiCall:
        """PATCH /vm Paused : stop the vCPUs."""
        return self._send("PATCH", "/vm", state="Paused")

    def resume(self) -> ApiCall:
        """PATCH /vm Resumed : let the vCPUs run again."""
        return self._send("PATCH", "/vm", state="Resumed")
