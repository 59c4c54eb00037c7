"""Crash safety: kill -9 labqd at random moments while jobs run; exactly-once starts, nothing lost."""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Labqd, docker_client

pytestmark = [pytest.mark.docker, pytest.mark.slow]

FINAL = ("succeeded", "failed", "cancelled", "timeout")


def test_kill9_repeatedly_exactly_once_and_no_lost_jobs(labqd: Labqd, users: dict[str, Any]) -> None:
    alice = users["alice"]
    work = Path(alice.pw_dir) / f"crash-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    os.chown(work, alice.pw_uid, alice.pw_gid)
    # Each job appends its id to a shared file when it starts, prints a line, runs briefly and
    # exits with a code derived from its id, so every recorded code can be checked.
    script = (f'echo "$LABQ_JOB_ID" >> {work}/starts; echo "out-$LABQ_JOB_ID"; '
              'sleep 0.$((LABQ_JOB_ID % 7 + 2)); exit $((LABQ_JOB_ID % 3))')
    rng = random.Random(6)
    submitted: list[int] = []

    def submit_some(n: int) -> None:
        for _ in range(n):
            res = labqd.labq("submit", "--gpus", str(rng.choice([0, 1, 1, 2])), "--", "sh", "-c", script,
                             user="alice", cwd=str(work))
            assert res.returncode == 0, res.stderr
            submitted.append(int(res.stdout))

    submit_some(12)
    for _round in range(6):
        time.sleep(rng.uniform(0.1, 1.2))
        labqd.kill9()
        time.sleep(rng.uniform(0.0, 0.8))  # containers keep running and exiting while labqd is down
        labqd.start()
        submit_some(2)

    deadline = time.monotonic() + 120
    jobs: dict[int, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        jobs = {i: labqd.job(i) for i in submitted}
        if all(j["state"] in FINAL for j in jobs.values()):
            break
        time.sleep(0.3)
    assert all(j["state"] in FINAL for j in jobs.values()), {i: j["state"] for i, j in jobs.items()}

    starts = [int(x) for x in (work / "starts").read_text().split()]
    assert sorted(starts) == sorted(submitted), "every job started exactly once"
    for job_id, job in jobs.items():
        assert job["exit_code"] == job_id % 3, job
        assert job["state"] == ("succeeded" if job_id % 3 == 0 else "failed"), job
        assert job["start_time"] is not None and job["end_time"] >= job["start_time"]
        log = labqd.labq("logs", str(job_id), user="alice")
        assert log.stdout == f"out-{job_id}\n", (job_id, log.stdout, log.stderr)
    # finished containers are removed once their exit is recorded
    names = {f"labq-{i}-alice" for i in submitted}

    def leftover() -> list[str]:
        return [c.name for c in docker_client().containers.list(all=True) if c.name in names]

    deadline = time.monotonic() + 30
    while leftover() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftover() == []
    shutil.rmtree(work, ignore_errors=True)
