"""The Unix socket server: one thread per connection, caller identified by SO_PEERCRED."""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any

from .identity import Caller, peer_credentials, resolve_caller
from .protocol import ErrorCode, ProtocolError, decode_request, encode, error, ok
from .service import Service

log = logging.getLogger("labqd.api")


class _Handler(socketserver.StreamRequestHandler):
    server: ApiServer
    timeout = 300

    def handle(self) -> None:
        srv = self.server
        sock: socket.socket = self.request
        ident_error = ""
        try:
            pid, uid, gid = peer_credentials(sock)
            caller: Caller | None = resolve_caller(pid, uid, gid, srv.service.cfg.admin_group)
        except (OSError, LookupError) as exc:
            caller = None
            ident_error = str(exc)
        limit = srv.service.cfg.max_request_bytes
        while True:
            try:
                line = self.rfile.readline(limit + 1)
            except (OSError, TimeoutError):
                return
            if not line:
                return
            if len(line) > limit:
                # Skip the rest of the oversized line (reading, never storing it), then answer.
                while line and not line.endswith(b"\n"):
                    try:
                        line = self.rfile.readline(65536)
                    except (OSError, TimeoutError):
                        return
                self._reply(error(ErrorCode.INVALID, f"request: larger than {limit} bytes"))
                continue
            self._reply(self._dispatch(caller, line, ident_error))

    def _dispatch(self, caller: Caller | None, line: bytes, ident_error: str) -> dict[str, Any]:
        srv = self.server
        try:
            req = decode_request(line.rstrip(b"\r\n"), srv.service.cfg.max_request_bytes)
            if caller is None:
                raise ProtocolError(ErrorCode.PERMISSION, f"caller: {ident_error}")
            return ok(srv.service.handle(caller, req))
        except ProtocolError as exc:
            return error(exc.code, exc.message)
        except Exception as exc:  # the daemon must keep running whatever a request does
            log.exception("internal error")
            return error(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    def _reply(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.wfile.write(encode(message))
            self.wfile.flush()


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path: str, service: Service) -> None:
        self.service = service
        self.path = path
        _prepare_socket_path(path)
        super().__init__(path, _Handler)
        Path(path).chmod(0o666)  # world-connectable by design: identity comes from SO_PEERCRED

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
