"""Request handling without a socket: policy checks that the e2e tests cannot set up easily."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from labq_helpers import FakeBackend

from job_queue.config import parse_config
from job_queue.identity import Caller
from job_queue.models import JobState
from job_queue.protocol import ErrorCode, ProtocolError, validate_request
from job_queue.service import Service
from job_queue.store import SqliteStore


def caller(user: str = "alice", uid: int = 1000, home: str = "/home/alice", admin: bool = False) -> Caller:
    return Caller(pid=1, uid=uid, gid=uid, user=user, home=home, groups=(uid,), is_admin=admin)


@pytest.fixture
def service(tmp_path: Path) -> Service:
    cfg = parse_config({"gpus": ["g0", "g1"], "default_image": "ok:1", "allowed_images": ["ok*"],
                        "node_cpus": 4, "node_mem_bytes": 2**30})
    return Service(cfg, SqliteStore(str(tmp_path / "q.db")), FakeBackend(), clock=lambda: 50.0)


def submit(service: Service, who: Caller, **fields: Any) -> Any:
    base: dict[str, Any] = {"v": 1, "op": "submit", "command": ["true"], "cwd": who.home, "gpus": 1}
    req = validate_request({**base, **fields})
    return service.handle(who, req)


def test_home_of_slash_is_never_mounted(service: Service) -> None:
    with pytest.raises(ProtocolError) as exc:
        submit(service, caller("daemon", 1, "/"))
    assert exc.value.code == ErrorCode.PERMISSION and exc.value.message.startswith("home:")
    assert service.store.unfinished_jobs() == []


def test_image_policy_and_cwd_outside_home(service: Service) -> None:
    with pytest.raises(ProtocolError, match="image: 'other:1' is not allowed"):
        submit(service, caller(), image="other:1")
    service.backend.image_exists = lambda image: False  # type: ignore[method-assign]
    with pytest.raises(ProtocolError, match="image: unknown image 'ok-no:1'"):
        submit(service, caller(), image="ok-no:1")
    service.backend.image_exists = lambda image: True  # type: ignore[method-assign]
    ids = submit(service, caller(), cwd="/etc")["ids"]
    job = service.store.get(ids[0])
    assert job is not None and job.spec.cwd == "/home/alice" and job.spec.name == "true"
    assert job.spec.image == "ok:1" and job.submit_time == 50.0


def test_cancel_running_records_before_stopping(service: Service) -> None:
    (job_id,) = submit(service, caller())["ids"]
    assert service.store.mark_starting(job_id, ["g0"], 51.0)
    with pytest.raises(ProtocolError) as exc:
        service.handle(caller("bob", 1001, "/home/bob"),
                       validate_request({"v": 1, "op": "cancel", "ids": [job_id]}))
    assert exc.value.code == ErrorCode.PERMISSION
    res = service.handle(caller(), validate_request({"v": 1, "op": "cancel", "ids": [job_id]}))
    assert res == {"jobs": [{"id": job_id, "result": "stopping"}]}
    job = service.store.get(job_id)
    assert job is not None and job.stop_reason is not None and job.reason == "cancelled by alice"
    assert service.backend.stops == [job_id]  # type: ignore[attr-defined]


def test_array_submission_creates_one_job_per_index(service: Service) -> None:
    res = submit(service, caller(), array="3-6%2", gpus=0)
    jobs = [service.store.get(i) for i in res["ids"]]
    assert res["array_id"] == res["ids"][0]
    assert [(j.spec.array_index, j.spec.array_cap, j.spec.array_id) for j in jobs if j] == [
        (i, 2, res["ids"][0]) for i in range(3, 7)]


def test_history_is_your_own_unless_you_ask_or_are_an_admin(service: Service) -> None:
    alice, bob = caller(), caller("bob", 1001, "/home/bob")
    for who in (alice, bob):
        (job_id,) = submit(service, who)["ids"]
        assert service.store.mark_starting(job_id, ["g0"], 51.0)
        assert service.store.transition(job_id, [JobState.STARTING], state=JobState.SUCCEEDED, end_time=52.0)

    def users(who: Caller, **fields: Any) -> list[str]:
        req = validate_request({"v": 1, "op": "history", **fields})
        return [j["user"] for j in service.handle(who, req)["jobs"]]

    assert users(alice) == ["alice"]
    assert users(alice, user="bob") == ["bob"]
    assert sorted(users(caller("root", 0, "/root", admin=True))) == ["alice", "bob"]
