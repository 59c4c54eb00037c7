"""Reconciliation as a pure plan: the store's jobs and Docker's labelled containers in, what to do out.

labqd runs it after a (re)start and after a lost event stream; the daemon carries the plan out. No
I/O here (containers Docker created but never started for a starting job are started by the daemon
before planning if they were made for the GPUs recorded with the start, and removed otherwise), so
every case is unit-tested like the scheduler. A created, never started container of a job that is
not starting (made ahead for a job forecast to start next, prepare.py, which was then cancelled,
held, or whose labqd stopped) is removed: it never ran, and the job's start makes it again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .models import Job, JobState, StopReason
from .runtime import ContainerInfo


@dataclass(frozen=True)
class MarkCancelled:
    """Cancelled while starting and no container was made: record it cancelled."""

    job_id: int


@dataclass(frozen=True)
class ResumeStart:
    """Recorded as starting but no container exists: create and start it now (exactly once)."""

    job_id: int


@dataclass(frozen=True)
class MarkDisappeared:
    """Running, but its container is gone: record it failed."""

    job_id: int


@dataclass(frozen=True)
class Adopt:
    """The job's container exists: record it running with this container if the record differs,
    then record its exit (``exited``) or follow it again (and stop it if a stop was asked)."""

    job_id: int
    container: ContainerInfo
    record_running: bool
    exited: bool
    stop: bool


@dataclass(frozen=True)
class Leftover:
    """A labelled container of this queue without a starting or running job (finished: remove it
    once its output is saved; no such job: leave it)."""

    container: ContainerInfo


@dataclass(frozen=True)
class DiscardPrepared:
    """A container created and never started, of a job that is not starting or running (made ahead
    for it, prepare.py): remove it (unless the running labqd keeps it for its forecast)."""

    container: ContainerInfo


Action = MarkCancelled | ResumeStart | MarkDisappeared | Adopt | DiscardPrepared | Leftover

DISAPPEARED = "container disappeared while labqd was not running"


def plan(jobs: Iterable[Job], containers: Iterable[ContainerInfo]) -> list[Action]:
    """What to do for each starting or running job and for each container no such job claims."""
    by_job = {c.job_id: c for c in containers if c.job_id is not None}
    out: list[Action] = []
    for job in jobs:
        if not job.state.active:
            continue
        info = by_job.pop(job.id, None)
        if info is None:
            if job.state == JobState.STARTING and job.stop_reason == StopReason.CANCEL:
                out.append(MarkCancelled(job.id))
            elif job.state == JobState.STARTING:
                out.append(ResumeStart(job.id))
            else:
                out.append(MarkDisappeared(job.id))
            continue
        out.append(Adopt(job.id, info,
                         record_running=job.state == JobState.STARTING or job.container_id != info.id,
                         exited=info.finished, stop=not info.finished and job.stop_reason is not None))
    out.extend(DiscardPrepared(info) if info.status == "created" else Leftover(info)
               for info in by_job.values())
    return out
