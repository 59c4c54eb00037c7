"""A minimal blocking client for the labq socket protocol (stdlib only, imported lazily by the CLI)."""

from __future__ import annotations

import json
import os
import socket

TYPE_CHECKING = False  # see cli.py
if TYPE_CHECKING:
    from typing import Any

# Duplicated from config.py/protocol.py on purpose: importing those costs tens of milliseconds of
# CLI start-up (dataclasses, tomllib). A unit test keeps the copies equal.
PROTOCOL_VERSION = 1
DEFAULT_SOCKET = "/run/labq/labq.sock"
DEFAULT_CONFIG_PATH = "/etc/labq/config.toml"
CONFIG_ENV = "LABQ_CONFIG"
SOCKET_ENV = "LABQ_SOCKET"


class DaemonUnreachable(Exception):
    pass


class RequestFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def socket_path(explicit_socket: str | None, explicit_config: str | None) -> str:
    """--socket, then $LABQ_SOCKET, then the config file's ``socket``, then the default."""
    if explicit_socket:
        return explicit_socket
    if os.environ.get(SOCKET_ENV):
        return os.environ[SOCKET_ENV]
    cfg = explicit_config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH
    try:
        import tomllib

        with open(cfg, "rb") as fh:  # noqa: PTH123 - keep imports minimal for CLI start-up
            value = tomllib.load(fh).get("socket")
        if isinstance(value, str):
            return value
    except (OSError, ValueError):
        pass
    return DEFAULT_SOCKET


def _connect(path: str, timeout: float) -> socket.socket:
    """Connect, waiting while the daemon's listen backlog is full (EAGAIN on a Unix socket)."""
    import time

    deadline = time.monotonic() + min(timeout, 10.0)
    delay = 0.005
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except BlockingIOError as exc:
            sock.close()
            if time.monotonic() >= deadline:
                raise DaemonUnreachable(f"cannot reach labqd at {path}: it is not accepting connections "
                                        f"({exc.strerror or exc})") from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
            continue
        except OSError as exc:
            sock.close()
            raise DaemonUnreachable(f"cannot reach labqd at {path}: {exc.strerror or exc}") from exc
        return sock


class Client:
    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.path = path
        self.sock = _connect(path, timeout)
        self.rfile = self.sock.makefile("rb")

    def call(self, op: str, **fields: Any) -> Any:
        msg = {"v": PROTOCOL_VERSION, "op": op, **fields}
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
            line = self.rfile.readline()
        except OSError as exc:
            raise DaemonUnreachable(f"lost connection to labqd at {self.path}: {exc}") from exc
        if not line:
            raise DaemonUnreachable(f"labqd at {self.path} closed the connection")
        reply = json.loads(line)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise RequestFailed(str(err.get("code", "internal")), str(err.get("message", "unknown error")))
        return reply.get("result")

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()
