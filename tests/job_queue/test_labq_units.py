"""Fast unit tests: durations, config, protocol validation, store, GPU inventory, container options."""

from __future__ import annotations

import json
import os
import pwd
import sqlite3
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from job_queue.config import ConfigError, parse_config
from job_queue.durations import DurationError, SizeError, format_duration, parse_duration, parse_size
from job_queue.gpus import NvmlInventory
from job_queue.models import Job, JobSpec, JobState, StopReason
from job_queue.protocol import ErrorCode, ProtocolError, Submit, decode_request, parse_array, wire
from job_queue.runtime import RuntimeError_, container_options, job_environment, working_dir
from job_queue.store import SqliteStore


# ---------------------------------------------------------------- durations
@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("45s", 45), ("30m", 1800), ("4h", 14400), ("1h30m", 5400), ("2d", 172800),
    ("1:30", 5400), ("0:00:05", 5), (" 4H ", 14400),
])
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "4x", "h", "-5", "1h1h", "1.5h", "400d", "1:75"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


def test_format_duration_and_sizes() -> None:
    assert format_duration(5) == "0:05"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(90061) == "1-01:01:01"
    assert parse_size("512m") == 512 * 2**20
    assert parse_size("2GiB") == 2 * 2**30
    for bad in ("0", "12q", "-1g", ""):
        with pytest.raises(SizeError):
            parse_size(bad)


# ---------------------------------------------------------------- config
def test_config_parses_and_refuses_bad_values() -> None:
    cfg = parse_config({"gpus": ["a", "b"], "mounts": {"datasets": "/srv/data:/data:ro"},
                        "max_gpus_per_user": 2, "allow_host_network": True})
    assert cfg.gpus == ("a", "b") and cfg.fake_gpus
    assert cfg.mounts["datasets"].read_only and cfg.mounts["datasets"].target == "/data"
    assert parse_config({}).gpus is None  # default: NVML
    for bad, word in (({"gpus": "all"}, "gpus"), ({"mounts": {"root": "/:/host"}}, "root"),
                      ({"max_gpus_per_user": "2"}, "max_gpus_per_user"), ({"bogus": 1}, "bogus"),
                      ({"allow_host_network": 1}, "allow_host_network"), ({"gpus": ["a", "a"]}, "duplicate")):
        with pytest.raises(ConfigError, match=word):
            parse_config(bad)


# ---------------------------------------------------------------- protocol
def req(**fields: Any) -> bytes:
    return json.dumps({"v": 1, **fields}).encode()


def submit(**extra: Any) -> bytes:
    fields: dict[str, Any] = {"command": ["true"], "cwd": "/home/a", "gpus": 1}
    fields.update(extra)
    return req(op="submit", **fields)


def test_valid_submit_gets_defaults() -> None:
    r = decode_request(submit(time_limit=60, env={"A": "b"}))
    assert r.op == "submit"
    assert isinstance(r.args, Submit)
    assert r.args.time_limit == 60 and r.args.priority == 0 and r.args.mounts == []
    assert r.args.env == {"A": "b"}
    again = decode_request(submit())
    assert isinstance(again.args, Submit) and again.args.env == {}
    assert again.args.env is not r.args.env  # defaults are fresh for every request
    assert wire("submit", again.args) == json.loads(submit())  # the CLI sends what it would validate


@pytest.mark.parametrize(("raw", "field"), [
    (b"\xff\xfe{}", "request: not valid UTF-8"),
    (b"{nope", "request: malformed JSON"),
    (b"[]", "request: must be a JSON object"),
    (json.dumps({"op": "ls"}).encode(), "v: missing"),
    (req(op="frobnicate"), "op: unknown operation"),
    (req(op="ls", colour="red"), "colour: unknown field"),
    (req(op="show"), "id: required"),
    (req(op="show", id="3"), "id: must be an integer"),
    (req(op="show", id=True), "id: must be an integer"),
    (submit(gpus=65), "gpus: must be between 0 and 64"),
    (submit(gpus=1.5), "gpus: must be an integer"),
    (submit(time_limit=0), "time_limit: must be between"),
    (submit(cpus=float("nan")), "cpus:"),
    (submit(cpus=0), "cpus: must be > 0"),
    (submit(env={"1BAD": "x"}), "env: invalid variable name"),
    (submit(env={"NVIDIA_VISIBLE_DEVICES": "all"}), "env: variable 'NVIDIA_VISIBLE_DEVICES'"),
    (submit(image="bad image"), "image: invalid image name"),
    (submit(array="5-1"), "array:"),
    (submit(name="a\x00b"), "name: contains a NUL"),
    (req(op="cancel", ids=[]), "ids: must be a non-empty list"),
])
def test_malformed_requests_name_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        decode_request(raw)
    assert exc.value.message.startswith(field), exc.value.message
    assert exc.value.code == ErrorCode.INVALID


def test_gpus_negative_and_command_empty() -> None:
    with pytest.raises(ProtocolError, match="gpus: must be between 0"):
        decode_request(req(op="submit", command=["x"], cwd="/", gpus=-1))
    with pytest.raises(ProtocolError, match="command: must be a non-empty list"):
        decode_request(req(op="submit", command=[], cwd="/", gpus=0))
    with pytest.raises(ProtocolError, match="not valid UTF-8"):
        decode_request(req(op="submit", command=["\ud800"], cwd="/", gpus=0))


def test_wrong_version_and_size_limit() -> None:
    with pytest.raises(ProtocolError) as exc:
        decode_request(json.dumps({"v": 2, "op": "ls"}).encode())
    assert exc.value.code == ErrorCode.VERSION
    with pytest.raises(ProtocolError, match="larger than"):
        decode_request(b" " * 2000, max_bytes=1000)


def test_client_constants_match_the_daemon() -> None:
    from job_queue import client, config, protocol

    assert client.PROTOCOL_VERSION == protocol.PROTOCOL_VERSION
    assert (client.DEFAULT_SOCKET, client.DEFAULT_CONFIG_PATH, client.CONFIG_ENV, client.SOCKET_ENV) == (
        config.DEFAULT_SOCKET, config.DEFAULT_CONFIG_PATH, config.CONFIG_ENV, config.SOCKET_ENV)


def test_parse_array() -> None:
    a = parse_array("0-15%4")
    assert list(a.indices) == list(range(16)) and a.cap == 4
    assert parse_array("7").cap is None and list(parse_array("7").indices) == [7]


# ---------------------------------------------------------------- store
def spec(user: str = "alice", **kw: Any) -> JobSpec:
    base: dict[str, Any] = {"user": user, "uid": 1000, "gid": 1000, "groups": [1000, 5], "home": "/home/a",
                            "cwd": "/home/a", "image": "img", "command": ["true"]}
    base.update(kw)
    return JobSpec(**base)


def test_store_roundtrip_wal_and_transitions(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "q.db"))
    ids = store.add_jobs([spec(), spec("bob", gpus=2, env={"A": "1"}, held=True)], now=5.0)
    assert ids == [1, 2]
    j = store.get(2)
    assert j is not None and j.state == JobState.HELD and j.spec.env == {"A": "1"} and j.submit_time == 5.0
    assert store.mark_starting(1, ["g0"], 6.0)
    assert not store.mark_starting(1, ["g0"], 7.0)  # only a pending job can be started: exactly once
    j1 = store.get(1)
    assert j1 is not None and j1.state == JobState.STARTING and j1.start_count == 1
    assert j1.dispatch_time == 6.0 == j1.start_time
    assert j1.assigned_gpus == ["g0"]
    assert not store.transition(1, [JobState.PENDING], state=JobState.CANCELLED)
    assert store.transition(1, [JobState.STARTING], state=JobState.RUNNING, stop_reason=StopReason.CANCEL)
    assert store.get(1).stop_reason == StopReason.CANCEL  # type: ignore[union-attr]
    store.update(1, state=JobState.SUCCEEDED, exit_code=0, end_time=9.0)
    assert [x.id for x in store.unfinished_jobs()] == [2]
    assert [x.id for x in store.history(None, 10)] == [1]
    assert store.history("bob", 10) == []
    assert store.states([1, 2, 99]) == {1: JobState.SUCCEEDED, 2: JobState.HELD}
    mode = sqlite3.connect(tmp_path / "q.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    instance = store.instance
    store.close()
    again = SqliteStore(str(tmp_path / "q.db"))
    assert again.instance == instance and again.get(2) is not None


def test_reasons_only_touch_waiting_jobs(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "q.db"))
    a, b = store.add_jobs([spec(), spec()], now=1.0)
    store.update(b, state=JobState.CANCELLED, reason="cancelled by alice")
    store.set_reasons({a: "Resources", b: "Resources"})
    assert store.get(a).reason == "Resources"  # type: ignore[union-attr]
    assert store.get(b).reason == "cancelled by alice"  # type: ignore[union-attr]


def test_store_transaction_rolls_back(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "q.db"))
    store.add_jobs([spec()], now=1.0)
    with pytest.raises(RuntimeError), store.tx():
        store.update(1, state=JobState.CANCELLED)
        raise RuntimeError("boom")
    assert store.get(1).state == JobState.PENDING  # type: ignore[union-attr]


def test_store_array_ids_and_concurrent_writers(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "q.db"))
    ids = store.add_jobs([spec(array_index=i, array_cap=2) for i in range(3)], now=1.0)
    assert {store.get(i).spec.array_id for i in ids} == {ids[0]}  # type: ignore[union-attr]
    other = SqliteStore(str(tmp_path / "q.db"))  # a second connection, as after a restart

    def add(s: SqliteStore) -> None:
        for _ in range(20):
            s.add_jobs([spec()], now=2.0)

    threads = [threading.Thread(target=add, args=(s,)) for s in (store, other, store)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.unfinished_jobs()) == 63


# ---------------------------------------------------------------- GPU inventory (NVML behind a fake module)
class FakeNvml:
    def __init__(self, procs: dict[int, list[Any]]) -> None:
        self.procs = procs
        self.inited = False

    def nvmlInit(self) -> None:
        self.inited = True

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUUID(self, h: int) -> bytes:
        return f"GPU-uuid-{h}".encode()

    def nvmlDeviceGetName(self, h: int) -> str:
        return "NVIDIA H100"

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(total=80 * 2**30)

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[Any]:
        return self.procs.get(h, [])


def test_nvml_inventory_reports_foreign_processes_only(tmp_path: Path) -> None:
    own_cid = "a" * 64
    me = pwd.getpwuid(os.getuid())
    for pid, cgroup, uid in ((101, f"0::/docker/{own_cid}\n", 0),
                             (202, "0::/user.slice/session-3.scope\n", me.pw_uid),
                             (303, f"0::/system.slice/docker-{'b' * 64}.scope\n", 4242424)):
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "cgroup").write_text(cgroup)
        (d / "status").write_text(f"Name:\tpython\nUid:\t{uid}\t0\t0\t0\n")  # the real uid counts
    nv = FakeNvml({0: [SimpleNamespace(pid=101, usedGpuMemory=1 << 30)],
                   1: [SimpleNamespace(pid=202, usedGpuMemory=300 << 20),
                       SimpleNamespace(pid=303, usedGpuMemory=2**64 - 1)]})  # NVML: "not available"
    inv = NvmlInventory(nvml=nv, proc_root=str(tmp_path))
    snap = inv.snapshot([own_cid])
    assert nv.inited and [g.id for g in snap] == ["GPU-uuid-0", "GPU-uuid-1"]
    assert snap[0].foreign == ()
    proc, other = snap[1].foreign
    assert proc.pid == 202 and proc.user == me.pw_name and proc.memory_bytes == 300 << 20
    assert proc.describe() == f"pid 202 of {me.pw_name}, 300 MiB"
    assert other.describe() == "pid 303 of 4242424"  # another container's process; no memory figure
    # without knowing our containers, every process is foreign
    assert len(inv.snapshot([])[0].foreign) == 1


# ---------------------------------------------------------------- container options
def test_container_options_security_and_gpus() -> None:
    cfg = parse_config({"gpus": "nvml", "mounts": {"datasets": "/srv/d:/data:ro"}})
    j = Job(id=7, spec=spec(gpus=2, mounts=["datasets"], cwd="/home/a/proj", array_id=5, array_index=3,
                            host_network=True, cpus=2.5, mem=2**30),
            state=JobState.STARTING, submit_time=0, assigned_gpus=["GPU-u1", "GPU-u2"])
    o = container_options(j, cfg, "inst")
    assert o["name"] == "labq-7-alice" and o["user"] == "1000:1000" and o["group_add"] == ["5"]
    digest = o["labels"].pop("labq.config")
    assert o["labels"] == {"labq.job": "7", "labq.user": "alice", "labq.instance": "inst"}
    # labq.config: the settings it was made with, so a container prepared for other GPUs is told apart
    assert digest == container_options(j, cfg, "inst")["labels"]["labq.config"]
    other = Job(id=7, spec=j.spec, state=JobState.STARTING, submit_time=0, assigned_gpus=["GPU-u2", "GPU-u3"])
    assert container_options(other, cfg, "inst")["labels"]["labq.config"] != digest
    assert o["security_opt"] == ["no-new-privileges"] and o["cap_drop"] == ["ALL"]
    assert o["privileged"] is False and "network_mode" not in o  # policy forbids host network
    assert o["working_dir"] == "/home/a/proj" and o["nano_cpus"] == 2_500_000_000 and o["mem_limit"] == 2**30
    assert [(m["Source"], m["Target"], m["ReadOnly"]) for m in o["mounts"]] == [
        ("/home/a", "/home/a", False), ("/srv/d", "/data", True)]
    (dr,) = o["device_requests"]
    assert dr["DeviceIDs"] == ["GPU-u1", "GPU-u2"] and dr["Capabilities"] == [["gpu"]]
    env = o["environment"]
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-u1,GPU-u2" == env["NVIDIA_VISIBLE_DEVICES"]
    assert env["LABQ_ARRAY_INDEX"] == "3" and env["LABQ_JOB_ID"] == "7"
    fake = container_options(j, parse_config({"gpus": ["GPU-u1", "GPU-u2"], "allow_host_network": True,
                                              "mounts": {"datasets": "/srv/d:/data:ro"}}))
    assert "device_requests" not in fake and fake["network_mode"] == "host"
    assert fake["environment"] == job_environment(j)


def test_mount_removed_from_allow_list_fails_the_start() -> None:
    j = Job(id=1, spec=spec(mounts=["gone"]), state=JobState.STARTING, submit_time=0)
    with pytest.raises(RuntimeError_, match="no longer on the allow-list"):
        container_options(j, parse_config({"gpus": []}))


def test_working_dir_only_under_home() -> None:
    assert working_dir("/home/a", "/home/a/x/../y") == "/home/a/y"
    assert working_dir("/home/a", "/home/ab") == "/home/a"
    assert working_dir("/home/a", "/etc") == "/home/a"


def test_cli_socket_path_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from job_queue.client import socket_path

    cfg = tmp_path / "c.toml"
    cfg.write_text('socket = "/from/config.sock"\n')
    monkeypatch.delenv("LABQ_SOCKET", raising=False)
    monkeypatch.delenv("LABQ_CONFIG", raising=False)
    assert socket_path(None, str(tmp_path / "missing.toml")) == "/run/labq/labq.sock"
    assert socket_path(None, str(cfg)) == "/from/config.sock"
    monkeypatch.setenv("LABQ_CONFIG", str(cfg))
    assert socket_path(None, None) == "/from/config.sock"
    monkeypatch.setenv("LABQ_SOCKET", "/from/env.sock")
    assert socket_path(None, str(cfg)) == "/from/env.sock"
    assert socket_path("/explicit.sock", str(cfg)) == "/explicit.sock"
