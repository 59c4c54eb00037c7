"""Large queues without Docker: the store's in-memory index of active jobs, array tasks collapsed in
`labq ls` like squeue. (The 100,000-job timings are measured by `make bench`, never here.)"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from job_queue import cli
from job_queue.models import JobSpec, JobState
from job_queue.service import index_ranges, listing
from job_queue.store import SqliteStore


def spec(user: str = "alice", **kw: object) -> JobSpec:
    base = JobSpec(user=user, uid=1000, gid=1000, groups=[1000], home=f"/home/{user}", cwd=f"/home/{user}",
                   image="img:1", command=["python", "train.py"], gpus=1, name="train")
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def array(n: int, user: str = "alice", first: int = 0) -> list[JobSpec]:
    base = spec(user)
    return [dataclasses.replace(base, array_index=i) for i in range(first, first + n)]


def test_index_follows_commits_only(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "q.db"))
    ids = store.add_jobs(array(3), 10.0)
    (single,) = store.add_jobs([spec("bob")], 11.0)
    assert ids == [1, 2, 3] and single == 4
    assert [(j.id, j.spec.array_id, j.spec.array_index) for j in store.unfinished_jobs()] == [
        (1, 1, 0), (2, 1, 1), (3, 1, 2), (4, None, None)]
    before = store.unfinished_jobs()
    with pytest.raises(RuntimeError), store.tx():
        store.update(1, state=JobState.CANCELLED, end_time=12.0)
        store.add_jobs([spec()], 12.0)
        raise RuntimeError("rolled back")
    assert [(j.id, j.state) for j in store.unfinished_jobs()] == [(j.id, j.state) for j in before]
    assert store.mark_starting(2, ["g0"], 13.0)
    store.update(3, state=JobState.FAILED, end_time=14.0)
    store.set_reasons({1: "Priority", 2: "ignored: not waiting"})
    now = {j.id: (j.state, j.reason, j.assigned_gpus) for j in store.unfinished_jobs()}
    assert now == {1: (JobState.PENDING, "Priority", []), 2: (JobState.STARTING, "", ["g0"]),
                   4: (JobState.PENDING, "", [])}
    assert before[1].state == JobState.PENDING  # records handed out earlier are never changed
    other = SqliteStore(str(tmp_path / "q.db"))  # another connection writes: the index is reloaded
    other.update(1, state=JobState.CANCELLED, end_time=15.0)
    other.add_jobs([spec("carol")], 16.0)
    assert [j.id for j in store.unfinished_jobs()] == [2, 4, 5]
    assert store.get(1) is not None and store.get(1).state == JobState.CANCELLED  # type: ignore[union-attr]


def test_array_tasks_share_their_spec_parts_after_a_reload(tmp_path: Path) -> None:
    db = str(tmp_path / "q.db")
    SqliteStore(db).add_jobs(array(4), 1.0)
    tasks = SqliteStore(db).unfinished_jobs()
    assert [t.spec.array_index for t in tasks] == [0, 1, 2, 3]
    assert all(t.spec.command is tasks[0].spec.command and t.spec.cwd is tasks[0].spec.cwd for t in tasks)
    assert json.loads(json.dumps(dataclasses.asdict(tasks[2].spec)))["array_id"] == 1


def test_index_ranges() -> None:
    assert index_ranges([5]) == "5"
    assert index_ranges([5, 6, 7, 9, 11, 12]) == "5-7,9,11-12"


def test_ls_collapses_waiting_array_tasks_per_array_and_state(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    store = SqliteStore(str(tmp_path / "q.db"))
    ids = store.add_jobs(array(10000, first=0), 1.0)  # 17_[0-9999] in squeue terms, here array 1
    (other,) = store.add_jobs([spec("bob")], 2.0)
    for job_id in ids[:2]:
        assert store.mark_starting(job_id, ["g0"], 3.0)
    store.update(ids[5], state=JobState.HELD)
    store.update(ids[6], state=JobState.CANCELLED, end_time=4.0)
    store.set_reasons({ids[2]: "Resources"})
    jobs = store.unfinished_jobs()
    listed = listing(jobs, None, array_tasks=False)
    assert [(j["id"], j["state"], j.get("array_tasks"), j.get("task_ids"), j.get("task_count"))
            for j in listed] == [
        (1, "starting", None, None, None), (2, "starting", None, None, None),
        (3, "pending", "2-4,7-9999", "3-5,8-10000", 9996), (6, "held", "5", "6", 1),
        (other, "pending", None, None, None)]
    assert listed[2]["reason"] == "Resources"
    assert len(listing(jobs, None, array_tasks=True)) == 10000 - 1 + 1
    assert [j["id"] for j in listing(jobs, "bob", array_tasks=False)] == [other]
    now = 10.0
    cli._table(listed, now)
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].split()[:4] == ["1_[2-4,7-9999]", "alice", "PENDING", "1"]
    assert lines[3].split()[5:] == ["train", "Resources"]
    assert lines[1].split()[0] == "1" and lines[1].split()[5] == "train[0]"
