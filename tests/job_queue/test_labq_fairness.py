"""Fairness under abuse without Docker: per-user limits on pending jobs and open connections,
timeouts on half-written and idle connections, descriptors kept for labqd's own use."""

from __future__ import annotations

import json
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from labq_helpers import FakeBackend, read_line

from job_queue.api import ApiServer, connection_budget
from job_queue.config import ConfigError, parse_config
from job_queue.identity import Caller
from job_queue.protocol import ErrorCode, ProtocolError, validate_request
from job_queue.service import Service
from job_queue.store import SqliteStore


def caller(user: str, uid: int) -> Caller:
    return Caller(pid=1, uid=uid, gid=uid, user=user, home=f"/home/{user}", groups=(uid,), is_admin=False)


def test_pending_jobs_per_user_are_limited_and_a_refused_submit_queues_nothing(tmp_path: Path) -> None:
    cfg = parse_config({"gpus": ["g0"], "default_image": "ok:1", "max_pending_per_user": 5})
    service = Service(cfg, SqliteStore(str(tmp_path / "q.db")), FakeBackend(), clock=lambda: 1.0)

    def submit(who: Caller, **fields: Any) -> Any:
        return service.handle(who, validate_request({"v": 1, "op": "submit", "command": ["true"],
                                                     "cwd": who.home, "gpus": 0, **fields}))

    alice, bob = caller("alice", 1000), caller("bob", 1001)
    ids = submit(alice, array="0-3")["ids"]
    held = submit(alice, hold=True)["ids"]
    with pytest.raises(ProtocolError) as exc:
        submit(alice, array="0-1")
    assert exc.value.code == ErrorCode.LIMIT
    assert exc.value.message == ("array: alice has 5 pending or held jobs; 2 more would pass the per-user "
                                 "limit of 5 (max_pending_per_user)")
    with pytest.raises(ProtocolError, match=r"^submit: alice has 5 pending or held jobs; 1 more"):
        submit(alice)
    assert len(service.store.unfinished_jobs()) == 5  # nothing of the refused submits was queued
    assert len(submit(bob, array="0-4")["ids"]) == 5  # the limit is per user
    service.handle(alice, validate_request({"v": 1, "op": "cancel", "ids": [ids[0], *held]}))
    assert len(submit(alice, array="0-1")["ids"]) == 2  # finished jobs no longer count
    with pytest.raises(ConfigError, match="max_pending_per_user"):
        parse_config({"max_pending_per_user": -1})


class Server:
    def __init__(self, root: Path, **settings: Any) -> None:
        self.socket = str(root / "labq.sock")
        cfg = parse_config({"gpus": ["g0"], "default_image": "ok:1", "state_dir": str(root),
                            "socket": self.socket, **settings})
        self.store = SqliteStore(cfg.db_path)
        self.api = ApiServer(self.socket, Service(cfg, self.store, FakeBackend()))
        self.api.serve_in_thread()

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(self.socket)
        return s

    def wait_open(self, n: int) -> None:
        deadline = time.monotonic() + 10
        while self.api.open_connections() != n:
            assert time.monotonic() < deadline, self.api.open_connections()
            time.sleep(0.01)


@pytest.fixture
def server() -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="labq-fair-") as tmp:
        srv = Server(Path(tmp), max_connections_per_user=3, request_timeout_s=0.3, idle_timeout_s=1.0)
        yield srv
        srv.api.close()
        srv.store.close()


def ping(s: socket.socket) -> dict[str, Any]:
    s.sendall(b'{"v": 1, "op": "ping"}\n')
    return read_reply(s)


def read_reply(s: socket.socket) -> dict[str, Any]:
    data = read_line(s)
    reply: dict[str, Any] = json.loads(data) if data else {}
    return reply


def test_connections_per_user_are_limited(server: Server) -> None:
    held = [server.connect() for _ in range(3)]
    assert all(ping(s)["ok"] for s in held)
    with server.connect() as extra:  # the fourth of this uid: one refusal, then closed
        reply = read_reply(extra)
        assert extra.recv(1) == b""
    assert reply["error"]["code"] == "limit_exceeded"
    assert reply["error"]["message"].startswith("connections: uid 0 already has 3 open connections")
    assert ping(held[0])["ok"]  # the ones it holds keep working
    held.pop().close()
    server.wait_open(2)
    with server.connect() as again:
        assert ping(again)["ok"]
    for s in held:
        s.close()
    server.wait_open(0)


def test_half_written_and_idle_connections_are_closed(server: Server) -> None:
    slow = server.connect()
    slow.sendall(b'{"v": 1, "op": "pi')  # never finished
    idle = server.connect()
    t0 = time.monotonic()
    reply = read_reply(slow)
    assert reply["error"] == {"code": "invalid_request",
                              "message": "request: not complete within 0.3 s; closing the connection"}
    assert slow.recv(1) == b"" and time.monotonic() - t0 < 1.2
    assert ping(idle)["ok"]  # a request in two writes within the timeout is answered
    idle.sendall(b'{"v": 1, ')
    time.sleep(0.05)
    idle.sendall(b'"op": "ping"}\n')
    assert read_reply(idle)["ok"]
    assert idle.recv(1) == b""  # then idle for idle_timeout_s: closed without a reply
    assert 0.9 < time.monotonic() - t0 < 5
    slow.close()
    idle.close()
    server.wait_open(0)


def test_descriptors_are_reserved_for_labqd() -> None:
    assert connection_budget(1024, 256, soft=65536) == 1024
    assert connection_budget(1024, 256, soft=1024) == 768
    assert connection_budget(1024, 256, soft=200) == 100  # at most half of a small limit is reserved
    with pytest.raises(ConfigError, match="reserved_fds"):
        parse_config({"reserved_fds": 2})
    with pytest.raises(ConfigError, match="request_timeout_s"):
        parse_config({"request_timeout_s": 0})
