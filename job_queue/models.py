"""Core data types shared by the store, the scheduler and the daemon."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class JobState(StrEnum):
    PENDING = "pending"
    HELD = "held"
    STARTING = "starting"
    """Recorded (with its GPUs) before the container is created; resumed after a crash."""
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES

    @property
    def active(self) -> bool:
        """Starting or running: the job holds its GPUs and (soon) a container. Jobs that are not
        final yet (also pending and held) are "unfinished" (``Store.unfinished_jobs``)."""
        return self in (JobState.STARTING, JobState.RUNNING)


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT})


class StopReason(StrEnum):
    """Why the daemon asked a running container to stop (recorded before it acts)."""

    CANCEL = "cancel"
    TIME_LIMIT = "time_limit"


@dataclass(slots=True)
class JobSpec:
    """What a user asked for; validated by the protocol layer, filled in by the API."""

    user: str
    uid: int
    gid: int
    groups: list[int]
    home: str
    cwd: str
    image: str
    command: list[str]
    gpus: int = 0
    name: str = ""
    time_limit: int | None = None
    cpus: float | None = None
    mem: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    mounts: list[str] = field(default_factory=list)
    after: int | None = None
    priority: int = 0
    host_network: bool = False
    array_id: int | None = None
    array_index: int | None = None
    array_cap: int | None = None
    held: bool = False
    notify: list[str] | None = None
    """Events to notify the owner of (``--notify``); None: the node's default."""


@dataclass(slots=True)
class Job:
    id: int
    spec: JobSpec
    state: JobState
    submit_time: float
    reason: str = ""
    start_time: float | None = None
    end_time: float | None = None
    exit_code: int | None = None
    oom_killed: bool = False
    assigned_gpus: list[str] = field(default_factory=list)
    container_id: str | None = None
    stop_reason: StopReason | None = None
    start_count: int = 0
    """How many times the daemon recorded a start for this job (must stay <= 1)."""
    dispatch_time: float | None = None
    """When labqd decided to start the job (``start_time`` becomes Docker's StartedAt at exit)."""

    @property
    def user(self) -> str:
        return self.spec.user

    def to_dict(self) -> dict[str, Any]:
        s = self.spec
        return {
            "id": self.id,
            "user": s.user,
            "uid": s.uid,
            "name": s.name,
            "state": self.state.value,
            "reason": self.reason,
            "image": s.image,
            "command": s.command,
            "gpus": s.gpus,
            "assigned_gpus": self.assigned_gpus,
            "cpus": s.cpus,
            "mem": s.mem,
            "time_limit": s.time_limit,
            "priority": s.priority,
            "after": s.after,
            "array_id": s.array_id,
            "array_index": s.array_index,
            "array_cap": s.array_cap,
            "mounts": s.mounts,
            "env": s.env,
            "cwd": s.cwd,
            "host_network": s.host_network,
            "notify": s.notify,
            "submit_time": self.submit_time,
            "start_time": self.start_time,
            "end_time": self.end_time,
            "exit_code": self.exit_code,
            "oom_killed": self.oom_killed,
            "container_id": self.container_id,
            "stop_reason": self.stop_reason.value if self.stop_reason else None,
            "dispatch_time": self.dispatch_time,
        }
