"""The main loop's messages: it blocks on a queue of these (it never sleep-polls)."""

from __future__ import annotations

from dataclasses import dataclass

from .runtime import ContainerEvent


@dataclass(frozen=True)
class Wake:
    """Something changed (a request, a signal): run a scheduling pass."""


@dataclass(frozen=True)
class Died:
    """A job's container ended (Docker ``die`` event with its exit code, or its log stream ended)."""

    cid: str
    job_id: int
    event: ContainerEvent | None = None


@dataclass(frozen=True)
class Oom:
    cid: str


@dataclass(frozen=True)
class Started:
    """A start worker's result: the container id, or the error that fails the job (both None: retry)."""

    job_id: int
    cid: str | None
    error: str | None


@dataclass(frozen=True)
class Reconcile:
    """Match the store against Docker again (event stream reconnected, start to resume)."""


Message = Wake | Died | Oom | Started | Reconcile
