"""The labq socket protocol, version 1: newline-delimited JSON, one request per line.

Every request is a JSON object ``{"v": 1, "op": "<op>", ...fields}``; the reply is
``{"v": 1, "ok": true, "result": ...}`` or ``{"v": 1, "ok": false, "error": {"code": ..., "message": ...}}``.
Each op has a fixed set of fields; unknown fields are refused. See docs/labq-protocol.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

PROTOCOL_VERSION = 1
MAX_GPUS_PER_JOB = 64
MAX_ARRAY_TASKS = 10000
PRIORITY_RANGE = (-1000, 1000)
MAX_NAME = 128
MAX_ENV = 256
MAX_ENV_VALUE = 32 * 1024
MAX_IMAGE = 512
MAX_PATH = 4096
MAX_IDS = 1000
MAX_HISTORY = 100000
MAX_TIME_LIMIT = 366 * 86400

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_IMAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]*")
_ARRAY_RE = re.compile(r"(\d+)(?:-(\d+))?(?:%(\d+))?")
_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?")
RESERVED_ENV_PREFIXES = ("LABQ_", "NVIDIA_")
RESERVED_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "HOME", "USER"})


class ErrorCode:
    INVALID = "invalid_request"
    VERSION = "unsupported_version"
    NOT_FOUND = "not_found"
    PERMISSION = "permission_denied"
    CONFLICT = "conflict"
    LIMIT = "limit_exceeded"
    """A per-user limit (open connections, pending jobs) was reached; nothing was changed."""
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A request that is refused; carries the error code and a one-line message naming the field."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.INVALID, message)


# ---------------------------------------------------------------- field validators

Validator = Callable[[str, Any], Any]


def _check_text(field: str, value: str, max_len: int) -> str:
    if len(value) > max_len:
        raise invalid(f"{field}: longer than {max_len} characters")
    if "\x00" in value:
        raise invalid(f"{field}: contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid(f"{field}: not valid UTF-8") from exc
    return value


def v_int(lo: int, hi: int) -> Validator:
    def check(field: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(f"{field}: must be an integer")
        if not lo <= value <= hi:
            raise invalid(f"{field}: must be between {lo} and {hi}, got {value}")
        return value

    return check


def v_opt(inner: Validator) -> Validator:
    def check(field: str, value: Any) -> Any:
        return None if value is None else inner(field, value)

    return check


def v_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid(f"{field}: must be true or false")
    return value


def v_str(max_len: int, pattern: re.Pattern[str] | None = None, what: str = "") -> Validator:
    def check(field: str, value: Any) -> str:
        if not isinstance(value, str):
            raise invalid(f"{field}: must be a string")
        _check_text(field, value, max_len)
        if pattern is not None and not pattern.fullmatch(value):
            raise invalid(f"{field}: invalid {what or 'value'} '{value[:80]}'")
        return value

    return check


def v_cpus(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{field}: must be a number")
    if not 0 < value <= 4096 or value != value:
        raise invalid(f"{field}: must be > 0 and <= 4096, got {value}")
    return float(value)


def v_ids(field: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not value:
        raise invalid(f"{field}: must be a non-empty list of job ids")
    if len(value) > MAX_IDS:
        raise invalid(f"{field}: at most {MAX_IDS} ids")
    check = v_int(1, 2**62)
    return [check(field, v) for v in value]


def v_command(field: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise invalid(f"{field}: must be a non-empty list of strings")
    out: list[str] = []
    for arg in value:
        if not isinstance(arg, str):
            raise invalid(f"{field}: every argument must be a string")
        out.append(_check_text(field, arg, 1 << 30))
    if not out[0]:
        raise invalid(f"{field}: the program name is empty")
    return out


def v_env(field: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise invalid(f"{field}: must be an object of NAME: value strings")
    if len(value) > MAX_ENV:
        raise invalid(f"{field}: at most {MAX_ENV} variables")
    out: dict[str, str] = {}
    for key, val in value.items():
        if not _ENV_KEY_RE.fullmatch(key):
            raise invalid(f"{field}: invalid variable name '{key[:80]}'")
        if key in RESERVED_ENV or key.startswith(RESERVED_ENV_PREFIXES):
            raise invalid(f"{field}: variable '{key}' is set by labq and may not be overridden")
        if not isinstance(val, str):
            raise invalid(f"{field}: value of '{key}' must be a string")
        out[key] = _check_text(f"{field}.{key}", val, MAX_ENV_VALUE)
    return out


def v_mounts(field: str, value: Any) -> list[str]:
    if not isinstance(value, list):
        raise invalid(f"{field}: must be a list of mount names")
    check = v_str(64)
    names = [check(field, v) for v in value]
    if len(set(names)) != len(names):
        raise invalid(f"{field}: mount listed twice")
    return names


NOTIFY_EVENTS = ("started", "finished", "failed")


def v_notify(field: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid(f"{field}: must be a list of events ({', '.join(NOTIFY_EVENTS)})")
    for v in value:
        if v not in NOTIFY_EVENTS:
            raise invalid(f"{field}: unknown event '{v[:40]}' (use {', '.join(NOTIFY_EVENTS)})")
    if len(set(value)) != len(value):
        raise invalid(f"{field}: event listed twice")
    return list(value)


@dataclass(frozen=True)
class ArraySpec:
    first: int
    last: int
    cap: int | None

    @property
    def indices(self) -> range:
        return range(self.first, self.last + 1)


def parse_array(text: str) -> ArraySpec:
    """Parse ``0-15%4`` (indices 0..15, at most 4 running at once)."""
    m = _ARRAY_RE.fullmatch(text.strip())
    if m is None:
        raise invalid(f"array: invalid range '{text[:80]}' (use e.g. 0-15 or 0-15%4)")
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) is not None else first
    cap = int(m.group(3)) if m.group(3) is not None else None
    if last < first:
        raise invalid(f"array: range end {last} is before its start {first}")
    if last - first + 1 > MAX_ARRAY_TASKS:
        raise invalid(f"array: at most {MAX_ARRAY_TASKS} tasks")
    if cap is not None and cap < 1:
        raise invalid("array: concurrency cap must be at least 1")
    return ArraySpec(first, last, cap)


def v_array(field: str, value: Any) -> str:
    text: str = v_str(64)(field, value)
    parse_array(text)
    return text


# ---------------------------------------------------------------- one typed request per op
# The records are the one definition of each operation's fields and defaults: the service's
# handlers take them, the CLI builds them (and checks them with validate_request before sending).


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Submit:
    command: list[str]
    cwd: str
    gpus: int
    image: str | None = None
    name: str | None = None
    time_limit: int | None = None
    cpus: float | None = None
    mem: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    mounts: list[str] = field(default_factory=list)
    after: int | None = None
    priority: int = 0
    array: str | None = None
    host_network: bool = False
    hold: bool = False
    notify: list[str] | None = None


@dataclass(frozen=True)
class Ls:
    user: str | None = None
    array_tasks: bool = False


@dataclass(frozen=True)
class Show:
    id: int


@dataclass(frozen=True)
class Logs:
    id: int
    offset: int = 0
    max_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class Ids:
    """cancel, hold and release."""

    ids: list[int]


@dataclass(frozen=True)
class Gpus:
    pass


@dataclass(frozen=True)
class History:
    user: str | None = None
    limit: int = 50


@dataclass(frozen=True)
class SlurmRun:
    """A Slurm job's batch step asks labqd to run its container (job_queue/slurm_runner.py)."""

    job: int
    spec: Submit


def v_spec(field_name: str, value: Any) -> Submit:
    """A container spec: the fields of a submit, checked by the same validators."""
    if not isinstance(value, dict):
        raise invalid(f"{field_name}: must be an object with the fields of a submit")
    req = validate_request({**value, "v": PROTOCOL_VERSION, "op": "submit"})
    assert isinstance(req.args, Submit)
    return req.args


RequestArgs = Ping | Submit | Ls | Show | Logs | Ids | Gpus | History | SlurmRun

_USER = v_opt(v_str(64, _USER_RE, "user name"))
_ID = v_int(1, 2**62)
RECORDS: dict[str, tuple[type[RequestArgs], dict[str, Validator]]] = {
    "ping": (Ping, {}),
    "submit": (Submit, {
        "command": v_command, "cwd": v_str(MAX_PATH), "gpus": v_int(0, MAX_GPUS_PER_JOB),
        "image": v_opt(v_str(MAX_IMAGE, _IMAGE_RE, "image name")),
        "name": v_opt(v_str(MAX_NAME, _NAME_RE, "job name")),
        "time_limit": v_opt(v_int(1, MAX_TIME_LIMIT)), "cpus": v_opt(v_cpus), "mem": v_opt(v_int(1, 2**50)),
        "env": v_env, "mounts": v_mounts, "after": v_opt(_ID), "priority": v_int(*PRIORITY_RANGE),
        "array": v_opt(v_array), "host_network": v_bool, "hold": v_bool, "notify": v_opt(v_notify),
    }),
    "ls": (Ls, {"user": _USER, "array_tasks": v_bool}),
    "show": (Show, {"id": _ID}),
    "logs": (Logs, {"id": _ID, "offset": v_int(0, 2**62), "max_bytes": v_int(1, 4 * 1024 * 1024)}),
    "cancel": (Ids, {"ids": v_ids}),
    "hold": (Ids, {"ids": v_ids}),
    "release": (Ids, {"ids": v_ids}),
    "gpus": (Gpus, {}),
    "history": (History, {"user": _USER, "limit": v_int(1, MAX_HISTORY)}),
    "slurm_run": (SlurmRun, {"job": _ID, "spec": v_spec}),
    "slurm_logs": (Logs, {"id": _ID, "offset": v_int(0, 2**62), "max_bytes": v_int(1, 4 * 1024 * 1024)}),
}


def _schema(record: type[RequestArgs],
            validators: dict[str, Validator]) -> dict[str, tuple[Validator, bool, Any]]:
    out: dict[str, tuple[Validator, bool, Any]] = {}
    for f in fields(record):
        factory = f.default_factory
        required = f.default is MISSING and not callable(factory)
        default = factory() if callable(factory) else (None if required else f.default)
        out[f.name] = (validators[f.name], required, default)  # a field without a validator fails here
    if set(validators) - set(out):
        raise TypeError(f"{record.__name__}: validators for no field: {sorted(set(validators) - set(out))}")
    return out


OPS: dict[str, dict[str, tuple[Validator, bool, Any]]] = {op: _schema(*spec) for op, spec in RECORDS.items()}
"""op -> field -> (validator, required, default), derived from the records (docs, tests, fuzzing)."""


def wire(op: str, args: RequestArgs) -> dict[str, Any]:
    """The request line's object for ``args``: its fields that differ from their defaults."""
    defaults = OPS[op]
    out: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": op}
    for f in fields(args):
        value = getattr(args, f.name)
        _, required, default = defaults[f.name]
        if required or value != default:
            out[f.name] = value
    return out


@dataclass(frozen=True)
class Request:
    op: str
    args: RequestArgs


def decode_request(raw: bytes, max_bytes: int = 1024 * 1024) -> Request:
    """Parse and validate one request line; raise ProtocolError with a clear message otherwise."""
    if len(raw) > max_bytes:
        raise invalid(f"request: larger than {max_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid("request: not valid UTF-8") from exc
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise invalid("request: malformed JSON") from exc
    except ValueError as exc:  # an integer of more than 4,300 digits (int() refuses it)
        raise invalid("request: a number in it has too many digits") from exc
    return validate_request(data)


def validate_request(data: Any) -> Request:
    if not isinstance(data, dict):
        raise invalid("request: must be a JSON object")
    version = data.get("v")
    if "v" not in data:
        raise invalid("v: missing protocol version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise invalid("v: must be an integer")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(ErrorCode.VERSION, f"v: protocol version {version} not supported (use 1)")
    op = data.get("op")
    if not isinstance(op, str):
        raise invalid("op: missing or not a string")
    schema = OPS.get(op)
    if schema is None:
        raise invalid(f"op: unknown operation '{op[:40]}'")
    for key in data:
        if key in ("v", "op"):
            continue
        if key not in schema:
            raise invalid(f"{str(key)[:40]}: unknown field for '{op}'")
    values: dict[str, Any] = {}
    for key, (check, required, _default) in schema.items():
        if key in data:
            values[key] = check(key, data[key])
        elif required:
            raise invalid(f"{key}: required for '{op}'")
    return Request(op, RECORDS[op][0](**values))  # missing optional fields: the record's defaults


def ok(result: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "ok": True, "result": result}


def error(code: str, message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "ok": False, "error": {"code": code, "message": message}}


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
