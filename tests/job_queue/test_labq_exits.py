"""Pure exit classification and the meaning of a failed Docker call (job_queue/exits.py)."""

from __future__ import annotations

import errno

import pytest

from job_queue.exits import MAX_START_ATTEMPTS, classify_exit, docker_unreachable, start_failure
from job_queue.models import JobState, StopReason


@pytest.mark.parametrize(("stop", "code", "oom", "reason", "expected"), [
    (None, 0, False, "", (JobState.SUCCEEDED, "")),
    (None, 3, False, "", (JobState.FAILED, "exit code 3")),
    (None, 137, False, "", (JobState.FAILED, "killed by signal 9 (exit code 137)")),
    (None, 137, True, "", (JobState.FAILED, "OOM killed")),
    (None, 0, True, "", (JobState.FAILED, "OOM killed")),  # the kernel killed a child, the job exited 0
    (None, None, False, "", (JobState.FAILED, "exit code None")),
    (None, 200, False, "", (JobState.FAILED, "exit code 200")),
    (StopReason.CANCEL, 143, False, "cancelled by bob", (JobState.CANCELLED, "cancelled by bob")),
    (StopReason.CANCEL, 0, False, "", (JobState.CANCELLED, "cancelled")),
    (StopReason.TIME_LIMIT, 0, False, "TimeLimit", (JobState.TIMEOUT, "TimeLimit")),
])
def test_classify_exit(stop: StopReason | None, code: int | None, oom: bool, reason: str,
                       expected: tuple[JobState, str]) -> None:
    assert classify_exit(stop, code, oom, reason) == expected


class ConnectionError(OSError):  # the name requests gives its wrapper
    pass


def wrapped(inner: BaseException) -> BaseException:
    """An error as requests raises it: its own type, the socket error as argument and cause."""
    outer = ConnectionError(inner)
    outer.__cause__ = inner
    return outer


def test_docker_errors_unreachable_or_not() -> None:
    refused = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    assert docker_unreachable(refused) and docker_unreachable(wrapped(refused))
    assert docker_unreachable(FileNotFoundError(errno.ENOENT, "No such file or directory"))
    emfile = OSError(errno.EMFILE, "Too many open files")
    assert not docker_unreachable(emfile) and not docker_unreachable(wrapped(emfile))
    assert not docker_unreachable(RuntimeError("500 Server Error: Internal Server Error"))
    for attempt in range(1, MAX_START_ATTEMPTS):
        assert start_failure(emfile, attempt) is None
    assert start_failure(emfile, MAX_START_ATTEMPTS) == (
        f"docker: [Errno 24] Too many open files (after {MAX_START_ATTEMPTS} tries)")
    assert start_failure(refused, 100) is None  # dockerd away: resumed whenever it is back


def test_reconcile_plan() -> None:
    from job_queue.models import Job, JobSpec
    from job_queue.reconcile import (
        Adopt,
        DiscardPrepared,
        Leftover,
        MarkCancelled,
        MarkDisappeared,
        ResumeStart,
        plan,
    )
    from job_queue.runtime import ContainerInfo

    spec = JobSpec(user="alice", uid=1000, gid=1000, groups=[], home="/h", cwd="/h", image="i", command=["x"])

    def job(job_id: int, state: JobState, cid: str | None = None, stop: StopReason | None = None) -> Job:
        return Job(id=job_id, spec=spec, state=state, submit_time=0.0, container_id=cid, stop_reason=stop)

    def box(cid: str, job_id: int | None, status: str) -> ContainerInfo:
        return ContainerInfo(id=cid, job_id=job_id, status=status, instance="i", exit_code=0,
                             oom_killed=False, started_at=None, finished_at=None)

    running7, exited8 = box("c7", 7, "running"), box("c8", 8, "exited")
    stray, done9 = box("cx", None, "running"), box("c9", 9, "exited")
    jobs = [
        job(1, JobState.PENDING),  # not started: nothing to match
        job(2, JobState.STARTING, stop=StopReason.CANCEL),  # cancelled before its container existed
        job(3, JobState.STARTING),  # labqd died before creating it
        job(4, JobState.RUNNING, "c4"),  # its container is gone
        job(7, JobState.STARTING, stop=StopReason.TIME_LIMIT),  # created and started: adopt, then stop
        job(8, JobState.RUNNING, "c8"),  # ended while labqd was away
    ]
    assert plan(jobs, [running7, exited8, stray, done9]) == [
        MarkCancelled(2), ResumeStart(3), MarkDisappeared(4),
        Adopt(7, running7, record_running=True, exited=False, stop=True),
        Adopt(8, exited8, record_running=False, exited=True, stop=False),
        Leftover(done9),  # a job no longer starting or running (the stray container has no job label)
    ]
    assert plan([job(5, JobState.RUNNING, "old")], [box("new", 5, "running")]) == [
        Adopt(5, box("new", 5, "running"), record_running=True, exited=False, stop=False)]
    # Made ahead and never started, for a job pending, held, or no longer unfinished: removed.
    ahead1, ahead6, ahead9 = box("p1", 1, "created"), box("p6", 6, "created"), box("p9", 9, "created")
    assert plan([job(1, JobState.PENDING), job(6, JobState.HELD)], [ahead1, ahead6, ahead9]) == [
        DiscardPrepared(ahead1), DiscardPrepared(ahead6), DiscardPrepared(ahead9)]
