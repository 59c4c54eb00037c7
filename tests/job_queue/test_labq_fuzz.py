"""Property-based tests: malformed and random requests thrown at a real labqd's socket."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from labq_helpers import Labqd

from job_queue.protocol import OPS

pytestmark = pytest.mark.docker

KNOWN_CODES = {"invalid_request", "unsupported_version", "not_found", "permission_denied", "conflict",
               "limit_exceeded"}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(sorted({f for schema in OPS.values() for f in schema} | {"bogus", "v", "op"}))


def valid_text(s: str) -> bool:
    """No NUL and encodable as UTF-8 (lone surrogates are not)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in s


def check_reply(d: Labqd, reply: dict[str, Any]) -> None:
    assert reply["v"] == 1 and isinstance(reply["ok"], bool)
    if not reply["ok"]:
        err = reply["error"]
        assert err["code"] in KNOWN_CODES, err  # never an internal error
        assert err["message"] and "\n" not in err["message"]
    assert d.call("ping")["ok"]  # the daemon keeps running


@FUZZ
@given(payload=st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" ")))
def test_random_bytes_are_refused(shared_labqd: Labqd, payload: bytes) -> None:
    reply = shared_labqd.request(payload)
    try:
        valid = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        valid = None
    if not isinstance(valid, dict):
        assert reply["ok"] is False and reply["error"]["code"] == "invalid_request"
    check_reply(shared_labqd, reply)


@FUZZ
@given(op=st.sampled_from([*OPS, "nope"]), fields=st.dictionaries(field_names, json_values, max_size=6))
def test_random_requests_get_a_clean_answer(shared_labqd: Labqd, op: str, fields: dict[str, Any]) -> None:
    fields.update({"v": 1, "op": op})
    if op == "submit":
        fields["hold"] = True  # never actually run what the fuzzer submits
    reply = shared_labqd.request(json.dumps(fields).encode())
    check_reply(shared_labqd, reply)
    if op == "submit" and reply["ok"]:
        for job_id in reply["result"]["ids"]:
            assert shared_labqd.job(job_id)["state"] == "held"
        assert shared_labqd.call("cancel", ids=reply["result"]["ids"])["ok"]


@FUZZ
@given(gpus=st.integers(-3, 8), time_limit=st.one_of(st.none(), st.integers(-5, 10**8)),
       cpus=st.one_of(st.none(), st.floats(-1, 10**5, allow_nan=False)),
       command=st.lists(st.text(max_size=8), max_size=3),
       mounts=st.lists(st.sampled_from(["datasets", "/", "home", ""]), max_size=2, unique=True),
       image=st.sampled_from([None, "labq-test-busybox:1", "nope:latest", "", "a b"]))
def test_submit_validation_matches_the_rules(shared_labqd: Labqd, gpus: int, time_limit: int | None,
                                             cpus: float | None, command: list[str], mounts: list[str],
                                             image: str | None) -> None:
    req: dict[str, Any] = {"v": 1, "op": "submit", "gpus": gpus, "command": command, "cwd": "/root",
                           "mounts": mounts, "hold": True, "time_limit": time_limit, "cpus": cpus}
    if image is not None:
        req["image"] = image
    before = {j["id"] for j in shared_labqd.call("ls")["result"]["jobs"]}
    reply = shared_labqd.request(json.dumps(req).encode())
    check_reply(shared_labqd, reply)
    should_pass = (0 <= gpus <= 4 and (time_limit is None or 1 <= time_limit <= 366 * 86400)
                   and (cpus is None or 0 < cpus <= (os.cpu_count() or 1)) and bool(command)
                   and command[0] != "" and all(valid_text(a) for a in command)
                   and not mounts and image in (None, "labq-test-busybox:1"))
    assert reply["ok"] is should_pass, (req, reply)
    after = {j["id"] for j in shared_labqd.call("ls")["result"]["jobs"]}
    if reply["ok"]:
        assert after - before == set(reply["result"]["ids"])
        assert shared_labqd.call("cancel", ids=reply["result"]["ids"])["ok"]
    else:
        assert after == before  # nothing queued


def test_oversized_and_split_requests(shared_labqd: Labqd) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(shared_labqd.socket)
        s.sendall(b'{"v": 1, "op": "ls", "user": "' + b"a" * (2 * 1024 * 1024) + b'"}\n')
        reply = json.loads(s.makefile("rb").readline())
    assert reply["error"]["message"].startswith("request: larger than")
    with socket.socket(socket.AF_UNIX) as s:  # one request in two writes, then a second request
        s.connect(shared_labqd.socket)
        s.sendall(b'{"v": 1, "op"')
        s.sendall(b': "ping"}\n{"v": 1, "op": "ping", "x": 1}\n')
        f = s.makefile("rb")
        first, second = json.loads(f.readline()), json.loads(f.readline())
    assert first["ok"] and first["result"]["user"] == "root" and first["result"]["admin"] is True
    assert second["error"]["message"] == "x: unknown field for 'ping'"
