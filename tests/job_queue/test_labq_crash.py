"""Crash safety: kill -9 labqd at random moments while jobs run; exactly-once starts, nothing lost."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from labq_helpers import Labqd, docker_client

pytestmark = [pytest.mark.docker, pytest.mark.slow]

FINAL = ("succeeded", "failed", "cancelled", "timeout")


def test_kill9_repeatedly_exactly_once_and_no_lost_jobs(labqd: Labqd, users: dict[str, Any]) -> None:
    alice = users["alice"]
    work = Path(alice.pw_dir) / f"crash-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    os.chown(work, alice.pw_uid, alice.pw_gid)
    root_work = Path(f"/root/crash-{os.getpid()}")  # root's jobs see only root's home
    shutil.rmtree(root_work, ignore_errors=True)
    root_work.mkdir()
    # Each job appends its id to a shared file when it starts, prints a line, runs briefly and
    # exits with a code derived from its id, so every recorded code can be checked.
    def job_script(where: Path) -> str:
        return (f'echo "$LABQ_JOB_ID" >> {where}/starts; echo "out-$LABQ_JOB_ID"; '
                'sleep 0.$((LABQ_JOB_ID % 7 + 2)); exit $((LABQ_JOB_ID % 3))')

    script = job_script(work)
    rng = random.Random(6)
    submitted: list[int] = []

    def submit_some(n: int) -> None:
        for _ in range(n):
            res = labqd.labq("submit", "--gpus", str(rng.choice([0, 1, 1, 2])), "--", "sh", "-c", script,
                             user="alice", cwd=str(work))
            assert res.returncode == 0, res.stderr
            submitted.append(int(res.stdout))

    # Meanwhile root keeps submitting straight to the socket, also while labqd is dead or dying:
    # every acknowledged submission must survive; an unacknowledged one may or may not exist.
    stop = threading.Event()
    acknowledged: list[int] = []

    def background() -> None:
        while not stop.is_set():
            try:
                reply = labqd.call("submit", command=["sh", "-c", job_script(root_work)], cwd="/root", gpus=0)
            except (OSError, ValueError):
                time.sleep(0.05)
                continue
            if reply.get("ok"):
                submitted.extend(reply["result"]["ids"])
                acknowledged.extend(reply["result"]["ids"])
            time.sleep(0.4)

    submit_some(12)
    thread = threading.Thread(target=background)
    thread.start()
    for _round in range(6):
        time.sleep(rng.uniform(0.1, 1.2))
        labqd.kill9()
        time.sleep(rng.uniform(0.0, 0.8))  # containers keep running and exiting while labqd is down
        labqd.start()
        submit_some(2)
    stop.set()
    thread.join()
    # active jobs first, then finished ones: a job can only move from the first set to the second
    known = {j["id"] for j in json.loads(labqd.labq("ls", "--json").stdout)}
    known |= {j["id"] for j in json.loads(labqd.labq("history", "--json", "-n", "10000").stdout)}
    assert set(submitted) <= known, "an acknowledged submission was lost"
    assert len(acknowledged) >= 3
    submitted[:] = sorted(known)

    deadline = time.monotonic() + 120
    jobs: dict[int, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        jobs = {i: labqd.job(i) for i in submitted}
        if all(j["state"] in FINAL for j in jobs.values()):
            break
        time.sleep(0.3)
    assert all(j["state"] in FINAL for j in jobs.values()), {i: j["state"] for i, j in jobs.items()}

    starts = [int(x) for where in (work, root_work) for x in (where / "starts").read_text().split()]
    assert sorted(starts) == sorted(submitted), "every job started exactly once"
    for job_id, job in jobs.items():
        assert job["exit_code"] == job_id % 3, job
        assert job["state"] == ("succeeded" if job_id % 3 == 0 else "failed"), job
        assert job["start_time"] is not None and job["end_time"] >= job["start_time"]
        log = labqd.labq("logs", str(job_id), user=job["user"] if job["user"] != "root" else None)
        assert log.stdout == f"out-{job_id}\n", (job_id, log.stdout, log.stderr)
    # finished containers are removed once their exit is recorded
    names = {f"labq-{i}-{jobs[i]['user']}" for i in submitted}

    def leftover() -> list[str]:
        listed = docker_client().api.containers(all=True, filters={"name": "labq-"})
        return [n.lstrip("/") for c in listed for n in c["Names"] if n.lstrip("/") in names]

    deadline = time.monotonic() + 30
    while leftover() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftover() == []
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(root_work, ignore_errors=True)
