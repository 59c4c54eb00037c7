"""The Unix socket server: one thread per connection, caller identified by SO_PEERCRED.

Fair to every user under abuse: each uid may hold ``max_connections_per_user`` connections and all
of them together at most ``max_connections``, kept below the descriptor limit less ``reserved_fds``
(labqd's own Docker, SQLite and log descriptors), so no user can make labqd's own calls fail with
"Too many open files". A connection over a limit gets one ``limit_exceeded`` reply and is closed
before any thread is started for it. A request that has begun must be complete within
``request_timeout_s``; a connection without a request in progress is closed after ``idle_timeout_s``.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import socket
import socketserver
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .identity import Caller, peer_credentials, resolve_caller
from .protocol import ErrorCode, ProtocolError, SlurmRun, decode_request, encode, error, ok
from .service import Service

log = logging.getLogger("labqd.api")

_CHUNK = 65536
FD_LIMIT_WANTED = 65536
"""Soft RLIMIT_NOFILE labqd raises itself to (within the hard limit; the unit sets LimitNOFILE)."""


class _Closed(Exception):
    """The peer closed the connection, or it sat idle past ``idle_timeout_s``."""


class _TooSlow(Exception):
    """A request was begun but not completed within ``request_timeout_s``."""


class _Oversized:
    """Marker: the request line was longer than ``max_request_bytes`` (read to its end, not kept)."""


OVERSIZED = _Oversized()


class _Handler(socketserver.BaseRequestHandler):
    server: ApiServer
    client_address: tuple[int, int, int] | None  # (pid, uid, gid) from SO_PEERCRED

    def setup(self) -> None:
        self.sock: socket.socket = self.request
        self.buf = bytearray()
        cfg = self.server.service.cfg
        self.limit = cfg.max_request_bytes
        self.idle = cfg.idle_timeout_s
        self.request_timeout = cfg.request_timeout_s

    def handle(self) -> None:
        srv = self.server
        ident_error = ""
        caller: Caller | None = None
        creds = self.client_address
        if creds is None:
            ident_error = "cannot read the peer's credentials"
        else:
            try:
                caller = resolve_caller(*creds, srv.service.cfg.admin_group)
            except (OSError, LookupError) as exc:
                ident_error = str(exc)
        while True:
            try:
                line = self.read_request()
            except _Closed:
                return
            except _TooSlow:
                self._reply(error(ErrorCode.INVALID, f"request: not complete within "
                                  f"{self.request_timeout:g} s; closing the connection"))
                return
            if line is OVERSIZED:
                self._reply(error(ErrorCode.INVALID, f"request: larger than {self.limit} bytes"))
                continue
            assert isinstance(line, bytes)
            self._reply(self._dispatch(caller, line, ident_error))

    def read_request(self) -> bytes | _Oversized:
        """The next request line (without its line end), or OVERSIZED.

        Raises _Closed at the end of the stream or after ``idle_timeout_s`` without a request begun,
        _TooSlow when a begun request is not complete within ``request_timeout_s``.
        """
        buf, sock = self.buf, self.sock
        deadline: float | None = None
        skipped = False
        while True:
            nl = buf.find(b"\n")
            if nl >= 0:
                line = bytes(buf[:nl])
                del buf[:nl + 1]
                if skipped or len(line) > self.limit:
                    return OVERSIZED
                return line.rstrip(b"\r")
            if len(buf) > self.limit:  # keep reading the oversized line, never storing it
                skipped = True
                buf.clear()
            begun = bool(buf) or skipped
            if begun:
                if deadline is None:
                    deadline = time.monotonic() + self.request_timeout
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _TooSlow
                sock.settimeout(remaining)
            else:
                sock.settimeout(self.idle)
            try:
                chunk = sock.recv(_CHUNK)
            except TimeoutError as exc:
                raise (_TooSlow if begun else _Closed) from exc
            except OSError as exc:
                raise _Closed from exc
            if not chunk:
                raise _Closed
            buf += chunk

    def _dispatch(self, caller: Caller | None, line: bytes, ident_error: str) -> dict[str, Any]:
        srv = self.server
        try:
            req = decode_request(line, srv.service.cfg.max_request_bytes)
            if caller is None:
                raise ProtocolError(ErrorCode.PERMISSION, f"caller: {ident_error}")
            if isinstance(req.args, SlurmRun):  # answered when its container ends; reads "stop" meanwhile
                return ok(srv.service.slurm_run(caller, req.args, self.sock))
            return ok(srv.service.handle(caller, req))
        except ProtocolError as exc:
            return error(exc.code, exc.message)
        except Exception as exc:  # the daemon must keep running whatever a request does
            log.exception("internal error")
            return error(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    def _reply(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.sock.settimeout(self.idle)  # a large reply to a slow reader, within reason
            self.sock.sendall(encode(message))


def raise_fd_limit(wanted: int = FD_LIMIT_WANTED) -> int:
    """Raise the soft descriptor limit towards ``wanted`` (never above the hard limit); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def connection_budget(max_connections: int, reserved_fds: int, soft: int | None = None) -> int:
    """Connections allowed in total: the setting, kept below the soft descriptor limit (``soft``,
    default this process's) less the reserve; at most half of a small limit is reserved, so a node
    with a low limit still serves."""
    if soft is None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return max_connections
    reserve = min(reserved_fds, soft // 2)
    return max(1, min(max_connections, soft - reserve))


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False
    request_queue_size = 512  # listen backlog: a burst of connections waits instead of being refused

    def __init__(self, path: str, service: Service) -> None:
        self.service = service
        self.path = path
        cfg = service.cfg
        self.per_user = cfg.max_connections_per_user
        self.total_limit = connection_budget(cfg.max_connections, cfg.reserved_fds)
        self._lock = threading.Lock()
        self._open: Counter[int] = Counter()
        self._total = 0
        self.refused = 0
        _prepare_socket_path(path)
        super().__init__(path, _Handler)
        Path(path).chmod(0o666)  # world-connectable by design: identity comes from SO_PEERCRED
        log.info("serving at most %d connections (%d per user)", self.total_limit, self.per_user)

    def open_connections(self, uid: int | None = None) -> int:
        with self._lock:
            return self._total if uid is None else self._open[uid]

    def process_request(self, request: Any, client_address: Any) -> None:
        """Count the connection against its uid and the total, or refuse it before a thread starts."""
        try:
            creds: tuple[int, int, int] | None = peer_credentials(request)
        except OSError:
            creds = None
        uid = creds[1] if creds is not None else -1
        refusal = ""
        with self._lock:
            if self._open[uid] >= self.per_user:
                refusal = (f"connections: uid {uid} already has {self._open[uid]} open connections to "
                           f"labqd (limit {self.per_user}); close some and try again")
            elif self._total >= self.total_limit:
                refusal = (f"connections: labqd is serving its limit of {self.total_limit} connections; "
                           f"try again shortly")
            else:
                self._open[uid] += 1
                self._total += 1
        if refusal:
            self.refused += 1
            with contextlib.suppress(OSError):
                request.settimeout(0.2)
                request.sendall(encode(error(ErrorCode.LIMIT, refusal)))
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, creds)
        except BaseException:
            self._release(uid)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(client_address[1] if client_address is not None else -1)

    def _release(self, uid: int) -> None:
        with self._lock:
            self._open[uid] -= 1
            if self._open[uid] <= 0:
                del self._open[uid]
            self._total -= 1

    def serve_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="labq-api", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        with contextlib.suppress(FileNotFoundError):
            Path(self.path).unlink()


def _prepare_socket_path(path: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        p.parent.chmod(0o755)
    if p.exists() or p.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            p.unlink()  # stale socket from a killed daemon
        else:
            raise SystemExit(f"labqd: another daemon is listening on {path}")
        finally:
            probe.close()
