"""Typed JSON bodies with the error messages Firecracker's parser gives.

Firecracker deserializes request bodies with serde and rejects unknown
fields, so a client that sends a wrong body reads messages such as
``unknown field `ht_enabled`, expected one of `vcpu_count`, ...
at line 1 column 13``. This module parses JSON itself (to know where each
key and value ends) and checks a body against a small struct description,
reporting the first problem in the order serde would meet it.
"""

from __future__ import annotations

import json.decoder
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import EmulatorError

# The standard library's JSON string scanner (absent from type stubs).
_scanstring = json.decoder.scanstring  # type: ignore[attr-defined]

# serde_json's number grammar (the same as JSON's).
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?")
_WS = " \t\n\r"

# Inclusive bounds of Rust's unsigned integer types, by name.
_UNSIGNED_MAX = {
    "u8": 2**8 - 1,
    "u16": 2**16 - 1,
    "u32": 2**32 - 1,
    "u64": 2**64 - 1,
    "usize": 2**64 - 1,
}


class BodyError(EmulatorError):
    """A request body that does not deserialize; the text is serde's."""


# ---------------------------------------------------------------- parsing


@dataclass
class Node:
    """A parsed JSON value with the offsets where it starts and ends."""

    value: Any
    start: int
    end: int  # offset of the value's last character


@dataclass
class ObjectNode:
    """A parsed JSON object: its members in order, and its closing brace."""

    members: list[tuple[str, int, JNode]]  # key, key's end offset, value
    start: int
    end: int


@dataclass
class ArrayNode:
    """A parsed JSON array."""

    items: list[JNode]
    start: int
    end: int


JNode = Node | ObjectNode | ArrayNode


class _Parser:
    """A small recursive-descent JSON parser that keeps offsets."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, message: str, at: int | None = None) -> BodyError:
        """Build a syntax error positioned like serde_json's."""
        where = self.pos if at is None else at
        return BodyError(f"{message} {position(self.text, where)}")

    def skip_ws(self) -> None:
        """Advance past whitespace."""
        text, pos = self.text, self.pos
        while pos < len(text) and text[pos] in _WS:
            pos += 1
        self.pos = pos

    def document(self) -> JNode:
        """Parse one value and insist nothing but whitespace follows."""
        self.skip_ws()
        node = self.value()
        self.skip_ws()
        if self.pos < len(self.text):
            raise self.fail("trailing characters")
        return node

    def value(self) -> JNode:
        """Parse any JSON value at the current position."""
        text = self.text
        if self.pos >= len(text):
            raise self.fail("EOF while parsing a value", len(text) - 1)
        char = text[self.pos]
        if char == "{":
            return self.obj()
        if char == "[":
            return self.arr()
        if char == '"':
            start = self.pos
            string = self.string()
            return Node(string, start, self.pos - 1)
        for word, val in (("true", True), ("false", False), ("null", None)):
            if text.startswith(word, self.pos):
                start = self.pos
                self.pos += len(word)
                return Node(val, start, self.pos - 1)
        match = _NUMBER.match(text, self.pos)
        if match:
            start = self.pos
            self.pos = match.end()
            literal = match.group()
            number: int | float
            if any(c in literal for c in ".eE"):
                number = float(literal)
            else:
                number = int(literal)
            return Node(number, start, self.pos - 1)
        raise self.fail("expected value")

    def string(self) -> str:
        """Parse a string starting at the opening quote."""
        try:
            string, end = _scanstring(self.text, self.pos + 1)
        except json.JSONDecodeError as err:
            if "Unterminated" in err.msg:
                raise self.fail(
                    "EOF while parsing a string", len(self.text) - 1
                ) from None
            if "control character" in err.msg.lower():
                raise self.fail(
                    "control character (\\u0000-\\u001F) found while "
                    "parsing a string",
                    err.pos,
                ) from None
            raise self.fail("invalid escape", err.pos) from None
        self.pos = end
        return string

    def obj(self) -> ObjectNode:
        """Parse an object starting at its opening brace."""
        start = self.pos
        self.pos += 1
        members: list[tuple[str, int, JNode]] = []
        self.skip_ws()
        if self._peek() == "}":
            self.pos += 1
            return ObjectNode(members, start, self.pos - 1)
        while True:
            self.skip_ws()
            char = self._peek()
            if char is None:
                raise self.fail(
                    "EOF while parsing an object", len(self.text) - 1
                )
            if char != '"':
                raise self.fail("key must be a string")
            key = self.string()
            key_end = self.pos - 1
            self.skip_ws()
            if self._peek() != ":":
                if self._peek() is None:
                    raise self.fail(
                        "EOF while parsing an object", len(self.text) - 1
                    )
                raise self.fail("expected `:`")
            self.pos += 1
            self.skip_ws()
            members.append((key, key_end, self.value()))
            self.skip_ws()
            char = self._peek()
            if char == ",":
                self.pos += 1
                continue
            if char == "}":
                self.pos += 1
                return ObjectNode(members, start, self.pos - 1)
            if char is None:
                raise self.fail(
                    "EOF while parsing an object", len(self.text) - 1
                )
            raise self.fail("expected `,` or `}`")

    def arr(self) -> ArrayNode:
        """Parse an array starting at its opening bracket."""
        start = self.pos
        self.pos += 1
        items: list[JNode] = []
        self.skip_ws()
        if self._peek() == "]":
            self.pos += 1
            return ArrayNode(items, start, self.pos - 1)
        while True:
            self.skip_ws()
            items.append(self.value())
            self.skip_ws()
            char = self._peek()
            if char == ",":
                self.pos += 1
                continue
            if char == "]":
                self.pos += 1
                return ArrayNode(items, start, self.pos - 1)
            if char is None:
                raise self.fail(
                    "EOF while parsing a list", len(self.text) - 1
                )
            raise self.fail("expected `,` or `]`")

    def _peek(self) -> str | None:
        """Return the current character, or None at the end."""
        return self.text[self.pos] if self.pos < len(self.text) else None


def position(text: str, offset: int) -> str:
    """Return serde_json's ``at line L column C`` for a character offset."""
    offset = max(0, min(offset, len(text) - 1)) if text else 0
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return f"at line {line} column {column}"


def parse(raw: bytes) -> tuple[str, JNode]:
    """Parse a request body, returning its text and its root node."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BodyError(
            f"invalid unicode code point {position('', err.start)}"
        ) from None
    return text, _Parser(text).document()


# ----------------------------------------------------------- struct types


@dataclass(frozen=True)
class Enum:
    """A Rust unit-variant enum that deserializes from its variant names."""

    name: str
    variants: tuple[str, ...]
    case_insensitive: bool = False


@dataclass(frozen=True)
class Field:
    """One field of a struct: its type and whether it may be omitted."""

    name: str
    kind: str | Enum | Struct  # "u8", "bool", "string", ...
    required: bool = False
    nullable: bool = True  # an Option<T> accepts null; a default T not


@dataclass(frozen=True)
class Struct:
    """A Rust struct deserialized with ``deny_unknown_fields``."""

    name: str
    fields: tuple[Field, ...] = field(default_factory=tuple)

    def field_names(self) -> list[str]:
        """Return the field names in declaration order."""
        return [f.name for f in self.fields]


def _expected(kind: str | Enum | Struct) -> str:
    """Return how serde names the type it expected."""
    if isinstance(kind, Struct):
        return f"struct {kind.name}"
    if isinstance(kind, Enum):
        return f"enum {kind.name}"
    return {"bool": "a boolean", "string": "a string"}.get(kind, kind)


def _unexpected(node: JNode) -> str:
    """Return how serde describes the value it found instead."""
    if isinstance(node, ObjectNode):
        return "map"
    if isinstance(node, ArrayNode):
        return "sequence"
    value = node.value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{_float_text(value)}`"
    return f"string {json.dumps(value)}"


def _float_text(value: float) -> str:
    """Format a float the way Rust's Display does."""
    if value == int(value) and abs(value) < 1e16:
        return f"{int(value)}"
    return repr(value)


def _one_of(names: list[str] | tuple[str, ...]) -> str:
    """Format serde's list of expected names."""
    quoted = [f"`{n}`" for n in names]
    if not quoted:
        return "there are no fields"
    if len(quoted) == 1:
        return f"expected {quoted[0]}"
    if len(quoted) == 2:
        return f"expected {quoted[0]} or {quoted[1]}"
    return "expected one of " + ", ".join(quoted)


class _Checker:
    """Turns a parsed node into plain Python values, or fails like serde."""

    def __init__(self, text: str) -> None:
        self.text = text

    def error(self, message: str, offset: int) -> BodyError:
        """Build an error positioned at *offset*."""
        return BodyError(f"{message} {position(self.text, offset)}")

    def convert(self, node: JNode, kind: str | Enum | Struct) -> Any:
        """Check *node* against *kind* and return its value."""
        if isinstance(kind, Struct):
            return self.struct(node, kind)
        if isinstance(node, (ObjectNode, ArrayNode)):
            raise self.error(
                f"invalid type: {_unexpected(node)}, "
                f"expected {_expected(kind)}",
                node.start,
            )
        value = node.value
        if isinstance(kind, Enum):
            if not isinstance(value, str):
                raise self.error(
                    f"invalid type: {_unexpected(node)}, "
                    f"expected {_expected(kind)}",
                    node.end,
                )
            for variant in kind.variants:
                if value == variant or (
                    kind.case_insensitive and value.lower() == variant.lower()
                ):
                    return variant
            raise self.error(
                f"unknown variant `{value}`, {_one_of(kind.variants)}",
                node.end,
            )
        if kind == "bool":
            if not isinstance(value, bool):
                raise self._type_error(node, kind)
            return value
        if kind == "string":
            if not isinstance(value, str):
                raise self._type_error(node, kind)
            return value
        # Unsigned integers: a float or a string is the wrong type, a
        # negative or too large integer the wrong value.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._type_error(node, kind)
        if value < 0 or value > _UNSIGNED_MAX[kind]:
            raise self.error(
                f"invalid value: integer `{value}`, expected {kind}",
                node.end,
            )
        return value

    def _type_error(self, node: JNode, kind: str) -> BodyError:
        """Build serde's ``invalid type`` error."""
        return self.error(
            f"invalid type: {_unexpected(node)}, expected {_expected(kind)}",
            node.end,
        )

    def struct(self, node: JNode, kind: Struct) -> dict[str, Any]:
        """Check an object against a struct description."""
        if not isinstance(node, ObjectNode):
            offset = node.start if not isinstance(node, Node) else node.end
            raise self.error(
                f"invalid type: {_unexpected(node)}, "
                f"expected {_expected(kind)}",
                offset,
            )
        by_name = {f.name: f for f in kind.fields}
        result: dict[str, Any] = {}
        for key, key_end, value in node.members:
            spec = by_name.get(key)
            if spec is None:
                raise self.error(
                    f"unknown field `{key}`, "
                    f"{_one_of(kind.field_names())}",
                    key_end,
                )
            if key in result:
                raise self.error(f"duplicate field `{key}`", key_end)
            is_null = isinstance(value, Node) and value.value is None
            if is_null and spec.nullable and not spec.required:
                result[key] = None
                continue
            result[key] = self.convert(value, spec.kind)
        for spec in kind.fields:
            if spec.required and spec.name not in result:
                raise self.error(f"missing field `{spec.name}`", node.end)
        return {k: v for k, v in result.items() if v is not None}


def deserialize(raw: bytes, kind: Struct) -> dict[str, Any]:
    """Parse *raw* as JSON and check it against *kind*.

    Returns the fields present (nulls of optional fields dropped). Raises
    BodyError with serde's message, position included.
    """
    text, node = parse(raw)
    return _Checker(text).struct(node, kind)


def deserialize_value(text: str, node: JNode, kind: Struct) -> dict[str, Any]:
    """Check an already parsed node (part of a larger document)."""
    return _Checker(text).struct(node, kind)


# ------------------------------------------------ Firecracker's structs

TOKEN_BUCKET = Struct(
    "TokenBucketConfig",
    (
        Field("size", "u64", required=True),
        Field("one_time_burst", "u64"),
        Field("refill_time", "u64", required=True),
    ),
)

RATE_LIMITER = Struct(
    "RateLimiterConfig",
    (Field("bandwidth", TOKEN_BUCKET), Field("ops", TOKEN_BUCKET)),
)

CPU_TEMPLATE = Enum(
    "StaticCpuTemplate", ("C3", "T2", "T2S", "T2CL", "T2A", "V1N1", "None")
)
HUGE_PAGES = Enum("HugePageConfig", ("None", "2M"))

MACHINE_CONFIG = Struct(
    "MachineConfig",
    (
        Field("vcpu_count", "u8", required=True),
        Field("mem_size_mib", "usize", required=True),
        Field("smt", "bool", nullable=False),
        Field("cpu_template", CPU_TEMPLATE),
        Field("track_dirty_pages", "bool", nullable=False),
        Field("huge_pages", HUGE_PAGES, nullable=False),
    ),
)

MACHINE_CONFIG_UPDATE = Struct(
    "MachineConfigUpdate",
    tuple(
        Field(f.name, f.kind) for f in MACHINE_CONFIG.fields
    ),
)

BOOT_SOURCE = Struct(
    "BootSourceConfig",
    (
        Field("kernel_image_path", "string", required=True),
        Field("initrd_path", "string"),
        Field("boot_args", "string"),
    ),
)

DRIVE = Struct(
    "BlockDeviceConfig",
    (
        Field("drive_id", "string", required=True),
        Field("partuuid", "string"),
        Field("is_root_device", "bool", required=True),
        Field("cache_type", Enum("CacheType", ("Unsafe", "Writeback")),
              nullable=False),
        Field("is_read_only", "bool"),
        Field("path_on_host", "string"),
        Field("rate_limiter", RATE_LIMITER),
        Field("io_engine", Enum("FileEngineType", ("Async", "Sync"))),
        Field("socket", "string"),
    ),
)

DRIVE_UPDATE = Struct(
    "BlockDeviceUpdateConfig",
    (
        Field("drive_id", "string", required=True),
        Field("path_on_host", "string"),
        Field("rate_limiter", RATE_LIMITER),
    ),
)

NETWORK_INTERFACE = Struct(
    "NetworkInterfaceConfig",
    (
        Field("iface_id", "string", required=True),
        Field("host_dev_name", "string", required=True),
        Field("guest_mac", "string"),
        Field("rx_rate_limiter", RATE_LIMITER),
        Field("tx_rate_limiter", RATE_LIMITER),
        Field("mtu", "u16"),
    ),
)

NETWORK_INTERFACE_UPDATE = Struct(
    "NetworkInterfaceUpdateConfig",
    (
        Field("iface_id", "string", required=True),
        Field("rx_rate_limiter", RATE_LIMITER),
        Field("tx_rate_limiter", RATE_LIMITER),
    ),
)

LOG_LEVEL = Enum(
    "LevelFilter",
    ("Off", "Trace", "Debug", "Info", "Warn", "Warning", "Error"),
    case_insensitive=True,
)

LOGGER = Struct(
    "LoggerConfig",
    (
        Field("log_path", "string"),
        Field("level", LOG_LEVEL),
        Field("show_level", "bool"),
        Field("show_log_origin", "bool"),
        Field("module", "string"),
    ),
)

METRICS = Struct(
    "MetricsConfig", (Field("metrics_path", "string", required=True),)
)

ACTION = Struct(
    "ActionBody",
    (
        Field(
            "action_type",
            Enum(
                "ActionType",
                ("FlushMetrics", "InstanceStart", "SendCtrlAltDel"),
            ),
            required=True,
        ),
    ),
)

VM_STATE = Struct(
    "Vm",
    (
        Field(
            "state",
            Enum("VmState", ("Paused", "Resumed")),
            required=True,
        ),
    ),
)
