"""One user floods a real labqd's socket; another user's job starts and ends normally.

The daemon runs with a low descriptor limit (256, soft = hard, so raising it does not help): without
per-user connection limits alice's connections would take every descriptor and labqd's own Docker
calls would fail ("Too many open files"), leaving bob's job in `starting` with its GPUs held.
"""

from __future__ import annotations

import json
import os
import pwd
import select
import socket
import time
from typing import Any

import pytest
from labq_helpers import Labqd

pytestmark = pytest.mark.docker

FLOOD = 300  # connections alice tries to hold at once, more than the daemon's 256 descriptors


def flood_as(user: str, path: str, stop_fd: int, report_fd: int) -> None:
    """Child: as ``user``, keep FLOOD connections open, each with half a request, until ``stop_fd``
    closes; count the daemon's refusals and timeouts and write them to ``report_fd``."""
    pw = pwd.getpwnam(user)
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    counts = {"attempts": 0, "limit_exceeded": 0, "timed_out": 0, "other": 0}
    held: list[socket.socket] = []
    while not select.select([stop_fd], [], [], 0)[0]:
        while len(held) < FLOOD:
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(path)
                s.send(b'{"v": 1, "op": "li')
            except OSError:
                s.close()
                break
            counts["attempts"] += 1
            held.append(s)
        readable = select.select(held, [], [], 0.05)[0] if held else []
        for s in readable:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if data:
                msg = json.loads(data.split(b"\n")[0])["error"]["message"]
                key = ("limit_exceeded" if msg.startswith("connections:")
                       else "timed_out" if "not complete within" in msg else "other")
                counts[key] += 1
            held.remove(s)
            s.close()
    os.write(report_fd, json.dumps(counts).encode())


def test_flood_of_one_user_does_not_starve_another(make_labqd: Any, users: dict[str, Any]) -> None:
    d: Labqd = make_labqd("max_connections_per_user = 16\nrequest_timeout_s = 2\nreserved_fds = 64\n",
                          nofile=256)
    stop_r, stop_w = os.pipe()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(stop_w)
            os.close(report_r)
            flood_as("alice", d.socket, stop_r, report_w)
            code = 0
        finally:
            os._exit(code)
    os.close(stop_r)
    os.close(report_w)
    try:
        time.sleep(1.0)  # the flood is on
        res = d.labq("submit", "--gpus", "1", "--", "sh", "-c", "echo bob-ran; sleep 3", user="bob")
        assert res.returncode == 0, res.stderr
        job_id = int(res.stdout)
        job = d.wait_state(job_id, ("running", "succeeded", "failed"), timeout=30)
        assert job["state"] == "running", job  # started while alice still floods
        job = d.wait_state(job_id, ("succeeded", "failed"), timeout=60)
    finally:
        os.close(stop_w)
        counts = json.loads(os.read(report_r, 4096) or b"{}")
        os.close(report_r)
        os.waitpid(pid, 0)
    assert job["state"] == "succeeded" and job["exit_code"] == 0, job
    assert "bob-ran" in d.labq("logs", str(job_id), user="bob").stdout
    assert counts["limit_exceeded"] > FLOOD // 2, counts  # refused, one line each, past her 16
    assert counts["timed_out"] >= 16 and counts["other"] == 0, counts  # half-written ones: closed
    jobs = d.call("ls")["result"]["jobs"]
    assert [j for j in jobs if j["state"] == "starting"] == []
    assert "Too many open files" not in d.stderr.read_text()
