"""Property-based tests without Docker: no CLI argument and no socket request ends in a traceback
or an internal error, and a refused submit queues nothing.

A real ApiServer and Service on a real SQLite store answer on a temporary socket in this process
(the daemon side that needs Docker is the FakeBackend); the CLI runs in-process against it.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from labq_helpers import FakeBackend

from job_queue import cli
from job_queue.api import ApiServer
from job_queue.config import parse_config
from job_queue.protocol import OPS
from job_queue.service import Service
from job_queue.store import SqliteStore

KNOWN_CODES = {"invalid_request", "unsupported_version", "not_found", "permission_denied", "conflict",
               "limit_exceeded"}
# Bounded so the unit suite stays fast (the whole module runs in a few seconds).
PROPS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Server:
    def __init__(self, root: Path) -> None:
        self.socket = str(root / "labq.sock")
        cfg = parse_config({"gpus": ["g0", "g1"], "default_image": "ok:1", "node_cpus": 4,
                            "node_mem_bytes": 2**34, "state_dir": str(root), "socket": self.socket,
                            "log_dir": str(root / "logs")})
        self.store = SqliteStore(cfg.db_path)
        self.api = ApiServer(self.socket, Service(cfg, self.store, FakeBackend()))
        self.api.serve_in_thread()

    def queued(self) -> int:
        return len(self.store.unfinished_jobs())

    def request(self, payload: bytes) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(self.socket)
            s.sendall(payload + b"\n")
            reply: dict[str, Any] = json.loads(s.makefile("rb").readline())
        return reply


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="labq-props-") as tmp:
        srv = Server(Path(tmp))
        yield srv
        srv.api.close()
        srv.store.close()


def run_cli(srv: Server, argv: list[str]) -> tuple[int, str, str]:
    raw_out = io.BytesIO()
    out = io.TextIOWrapper(raw_out, encoding="utf-8", write_through=True)  # `labq logs` writes bytes
    err = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(["--socket", srv.socket, *argv])
        except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
            code = exc.code if isinstance(exc.code, int) else 2
    out.flush()
    return code, raw_out.getvalue().decode("utf-8", "replace"), err.getvalue()


# Text that broke the parsers before: Unicode digits, numbers past int()'s 4,300 digits, controls.
tricky = st.sampled_from(["²", "٣", "9" * 5000, "1" * 70, "4h", "1:30", "16g", "\x1b[2J", "a\nb", "-1", "0",
                          "1e999", "nan", "", " ", "\u202e", "\udcff"])
value = tricky | st.text(max_size=12) | st.integers(-5, 10**6).map(str)
SUBMIT_OPTIONS = ("--gpus", "--image", "--name", "--time", "--cpus", "--mem", "--env", "--mount", "--after",
                  "--priority", "--array", "--notify")


@st.composite
def cli_argv(draw: st.DrawFn) -> list[str]:
    cmd = draw(st.sampled_from(["submit", "submit", "submit", "ls", "show", "history", "cancel", "hold",
                                "release", "logs", "gpus"]))
    argv = [cmd]
    if cmd == "submit":
        argv += ["--hold"]  # nothing the property submits may run
        for opt in draw(st.lists(st.sampled_from(SUBMIT_OPTIONS), max_size=5)):
            argv += [opt, draw(value)]
        if draw(st.booleans()):
            argv += ["--gpus", draw(value)]
        argv += ["--", *draw(st.lists(value, max_size=3))]
    elif cmd in ("ls", "history"):
        argv += draw(st.lists(st.sampled_from(["-u", "-n", "--json"]) | value, max_size=3))
    elif cmd != "gpus":
        argv += draw(st.lists(value, min_size=0, max_size=2))
    return argv


@PROPS
@given(argv=cli_argv())
@example(argv=["submit", "--gpus", "0", "--time", "²", "--", "true"])
@example(argv=["submit", "--gpus", "0", "--time", "9" * 5000, "--", "true"])
@example(argv=["submit", "--gpus", "0", "--mem", "9" * 5000, "--", "true"])
@example(argv=["submit", "--gpus", "0", "--cpus", "1e999", "--", "true"])
def test_no_cli_argument_gives_a_traceback(server: Server, argv: list[str]) -> None:
    before = server.queued()
    code, _, err = run_cli(server, argv)  # any exception other than SystemExit fails the test
    assert "Traceback" not in err and "internal error" not in err, err
    if code != 0:
        assert server.queued() == before  # a refused command queues nothing
        if code != 2 or not err.startswith("usage:"):  # argparse prints its usage first
            assert err.startswith("labq: ") and err.count("\n") == 1, err
        assert code in (1, 2, 3, 4, 5), (code, err)
    elif argv[0] == "submit" and "--help" not in argv and "-h" not in argv:
        assert server.queued() > before


def test_listed_inputs_are_one_line_errors_naming_the_field(server: Server) -> None:
    before = server.queued()
    for opt, text, field in (("--time", "²", "time"), ("--time", "9" * 5000, "time"),
                             ("--mem", "9" * 5000, "mem")):
        code, out, err = run_cli(server, ["submit", "--gpus", "0", opt, text, "--", "true"])
        assert code == 2 and out == "" and err.startswith(f"labq: {field}: ") and err.count("\n") == 1, err
        assert len(err) < 200
    huge = b'{"v": 1, "op": "show", "id": ' + b"9" * 5000 + b"}"
    reply = server.request(huge)
    assert reply["error"] == {"code": "invalid_request",
                              "message": "request: a number in it has too many digits"}
    assert server.queued() == before


HUGE = "<5000-digit integer>"  # json.dumps cannot write one: put into the request text afterwards
json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
                | st.sampled_from([HUGE, 2**63, -(2**63) - 1, 1e308]) | st.text(max_size=20) | tricky)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
field_names = st.sampled_from(sorted({f for schema in OPS.values() for f in schema} | {"bogus", "v", "op"}))


@PROPS
@given(op=st.sampled_from([*OPS, "nope"]), fields=st.dictionaries(field_names, json_values, max_size=6),
       version=st.sampled_from([1, 1, 1, 2, "1", None]))
def test_no_socket_request_gives_an_internal_error(server: Server, op: str, fields: dict[str, Any],
                                                    version: Any) -> None:
    fields.update({"v": version, "op": op})
    if op == "submit":
        fields["hold"] = True
    before = server.queued()
    reply = server.request(json.dumps(fields).replace(f'"{HUGE}"', "-" + "7" * 5000).encode())
    assert reply["v"] == 1 and isinstance(reply["ok"], bool)
    if not reply["ok"]:
        assert reply["error"]["code"] in KNOWN_CODES, reply
        assert reply["error"]["message"] and "\n" not in reply["error"]["message"]
        if op == "submit":
            assert server.queued() == before
    elif op == "submit":
        ids = reply["result"]["ids"]
        assert server.queued() == before + len(ids)
        assert server.request(json.dumps({"v": 1, "op": "cancel", "ids": ids}).encode())["ok"]
    assert server.request(b'{"v": 1, "op": "ping"}')["ok"]  # and the server keeps answering


HOSTILE = "\x1b]0;owned\x07\x1b[2J\r\nfake line\u202e\x9b"


def test_safe_escapes_controls_and_keeps_printable_text() -> None:
    from job_queue.display import safe

    assert safe("train.py --lr 0.1 ü 日本") == "train.py --lr 0.1 ü 日本"
    assert safe(HOSTILE) == "\\x1b]0;owned\\x07\\x1b[2J\\r\\nfake line\\u202e\\x9b"
    assert safe("a\tb", keep="\t") == "a\tb" and safe("a\tb") == "a\\tb" and safe(17) == "17"


def printable(text: str, extra: str = "\n") -> bool:
    return all(ch.isprintable() or ch in extra for ch in text)


def test_human_output_escapes_user_text_and_json_keeps_it(server: Server) -> None:
    reply = server.request(json.dumps({"v": 1, "op": "submit", "command": ["echo", HOSTILE], "gpus": 0,
                                       "cwd": f"/root/{HOSTILE}", "hold": True}).encode())
    (job_id,) = reply["result"]["ids"]
    plain = server.request(json.dumps({"v": 1, "op": "submit", "command": ["echo"], "gpus": 0,
                                       "cwd": "/root", "hold": True}).encode())["result"]["ids"][0]
    code, out, _ = run_cli(server, ["show", str(job_id)])
    assert code == 0 and printable(out) and "\\x1b]0;owned\\x07" in out, out
    assert len(out.splitlines()) == len(run_cli(server, ["show", str(plain)])[1].splitlines())
    code, out, _ = run_cli(server, ["show", str(job_id), "--json"])
    shown = json.loads(out)
    assert shown["command"] == ["echo", HOSTILE] and shown["cwd"].endswith(HOSTILE)
    server.store.update(job_id, reason=f"docker create failed: {HOSTILE}")  # errors quote the command
    code, out, _ = run_cli(server, ["ls"])
    assert code == 0 and printable(out) and "\\x1b[2J" in out
    listed = {j["id"]: j for j in json.loads(run_cli(server, ["ls", "--json"])[1])}
    assert listed[job_id]["reason"].endswith(HOSTILE)
    server.store.update(job_id, state="failed", end_time=60.0)
    code, out, _ = run_cli(server, ["history"])
    assert code == 0 and printable(out) and "\\x1b]0;owned" in out
    backend = server.api.service.backend
    assert isinstance(backend, FakeBackend)
    backend.report = [{"index": 0, "id": "g0", "name": "fake", "memory_total": None, "state": "foreign",
                       "job": None, "user": None,
                       "foreign": [{"pid": 7, "user": HOSTILE, "memory_bytes": 2**20}]}]
    try:
        code, out, _ = run_cli(server, ["gpus"])
    finally:
        backend.report = []
    assert code == 0 and printable(out) and "pid 7 of \\x1b]0;owned" in out and "1 MiB" in out


def test_notifications_escape_user_text() -> None:
    from job_queue.models import Job, JobSpec, JobState
    from job_queue.notify import _slack_text, build_message

    spec = JobSpec(user="alice", uid=1000, gid=1000, groups=[], home="/home/alice", cwd="/home/alice",
                   image="ok:1", command=["echo", HOSTILE], name="job")
    job = Job(id=3, spec=spec, state=JobState.FAILED, submit_time=1.0, reason=f"exit: {HOSTILE}")
    msg = build_message("failed", job, "gpu01", [f"out\t{HOSTILE}"])
    for text in (msg.subject, msg.text, _slack_text(msg)):
        assert printable(text, "\n\t") and "\x1b" not in text
    assert "reason: exit: \\x1b]0;owned" in msg.text
    assert msg.log_tail == ["out\t\\x1b]0;owned\\x07\\x1b[2J\\r\\nfake line\\u202e\\x9b"]
    assert msg.job["reason"] == f"exit: {HOSTILE}"  # the record keeps the exact text
