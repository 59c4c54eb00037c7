"""Containers made ahead: the next jobs' containers are created while their GPUs are still busy, so
when a job exits only ``docker start`` of the next one remains between the exit and the next start.

Which jobs, on which GPUs: the scheduler's own forecast (``scheduler.schedule(prepare_ahead=...)``):
the running jobs end in their expected order, and after each end the job that the scheduler would
then start takes the freed GPUs. The GPUs are part of a container (``CUDA_VISIBLE_DEVICES``,
``NVIDIA_VISIBLE_DEVICES``, the device request), and a job has exactly one container name (what
makes starts exactly-once), so a job is prepared once, for the GPUs it is forecast to get. When the
scheduler really starts it, the prepared container is started only if it was made for exactly the
GPUs the job got now (and, checked by Docker label ``labq.config``, the same settings); otherwise
it is removed and the container created as without preparation. A prepared container whose job is
no longer forecast (cancelled, held, overtaken by a higher priority, or forecast on other GPUs) is
removed. The other choice, preparing only where the GPUs are certain (one running job per node),
would prepare nothing on a busy multi-GPU node; a wrong forecast costs one removal off the critical
path and a create as before, and the forecast is right when similar jobs end in the order they
started.

Prepared containers are created, never started, so they are not runs: removal never forces (a
started container is left), and after a labqd restart reconcile removes every created container of
a job that is not recorded as starting (reconcile.py), and starts the one of a starting job only if
it was made for the GPUs recorded with the start.

Creates run one at a time in one worker thread, each after the container starts in flight (those
are on a freed GPU's critical path; a job that starts before its create ran is created by its start,
which never waits for a create), removals in another (a removal waits for its
create); a start of a job whose prepared container is being removed waits for that removal, so a
start never meets its own container half removed. The main loop owns the bookkeeping.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from .models import Job
from .runtime import Runtime

log = logging.getLogger("labqd")


@dataclasses.dataclass
class Prepared:
    gpus: tuple[str, ...]
    container: Future[str | None]
    """The prepared container's id once made (None: not made, e.g. the name was taken)."""
    dropped: threading.Event = dataclasses.field(default_factory=threading.Event)
    """Set when the job starts or is no longer forecast: a create not yet issued is skipped."""
    removal: bool = False
    """``container`` is the removal of the job's prepared container (a start waits for it)."""


class Preparer:
    def __init__(self, runtime: Runtime, background: bool = True,
                 wait_for_starts: Callable[[], None] | None = None) -> None:
        self.runtime = runtime
        self._wait_for_starts = wait_for_starts
        self._creator = ThreadPoolExecutor(1, thread_name_prefix="labq-prepare") if background else None
        # Removals apart from creates, so a start that waits for one does not wait behind creates.
        self._remover = ThreadPoolExecutor(1, thread_name_prefix="labq-unprepare") if background else None
        self._entries: dict[int, Prepared] = {}
        self._removing: dict[int, Future[str | None]] = {}

    @staticmethod
    def _run(pool: ThreadPoolExecutor | None, fn: Callable[[], str | None]) -> Future[str | None]:
        if pool is not None:
            return pool.submit(fn)
        f: Future[str | None] = Future()
        try:
            f.set_result(fn())
        except Exception as exc:
            f.set_exception(exc)
        return f

    def plan(self, wanted: Sequence[tuple[int, Sequence[str]]], jobs: Mapping[int, Job]) -> None:
        """Main loop, after a pass: keep the containers of the forecast jobs (made for the forecast
        GPUs), make the missing ones, remove the rest."""
        want = {job_id: tuple(gpus) for job_id, gpus in wanted if job_id in jobs}
        for job_id, entry in list(self._entries.items()):
            if want.get(job_id) != entry.gpus:
                del self._entries[job_id]
                self._discard(job_id, entry)
        self._removing = {job_id: f for job_id, f in self._removing.items() if not f.done()}
        for job_id, gpus in want.items():
            if job_id not in self._entries and job_id not in self._removing:  # made after its removal
                job = dataclasses.replace(jobs[job_id], assigned_gpus=list(gpus))
                dropped = threading.Event()
                made = self._run(self._creator, functools.partial(self._create, job, dropped))
                self._entries[job_id] = Prepared(gpus, made, dropped)

    def take(self, job_id: int) -> Prepared | None:
        """Main loop, as the job starts: what was prepared for it (``claim`` it in the start worker);
        while a container prepared for it is being removed, that removal (the start waits for it)."""
        entry = self._entries.pop(job_id, None)
        if entry is None:
            removing = self._removing.pop(job_id, None)
            if removing is None or removing.done():
                return None
            return Prepared((), removing, removal=True)
        entry.dropped.set()
        if entry.container.cancel():  # never began: the start creates it
            return None
        return entry

    def claim(self, entry: Prepared, gpus: Sequence[str]) -> str | None:
        """Start worker: the prepared container to start if it was made for ``gpus``; else None, after
        removing the one made for other GPUs (so the start creates the job's container anew)."""
        if not entry.removal and not entry.container.done():
            return None  # not made yet (it waits for other starts): the start makes it, no waiting
        cid = entry.container.result()
        if cid is None or entry.gpus == tuple(gpus):
            return cid
        log.debug("container %s was prepared for GPUs %s, not %s; removing it", cid[:12],
                  ",".join(entry.gpus) or "-", ",".join(gpus) or "-")
        self.runtime.discard(cid)
        return None

    def known(self) -> set[str]:
        """Ids of the prepared containers made so far (reconcile leaves them)."""
        return {cid for e in self._entries.values()
                if e.container.done() and not e.container.cancelled() and (cid := e.container.result())}

    def forget(self) -> None:
        """Drop the bookkeeping (labqd stopping: the next labqd removes what was prepared)."""
        self._entries.clear()
        for pool in (self._creator, self._remover):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def settle(self) -> None:
        for pool in (self._creator, self._remover):
            if pool is not None:
                pool.shutdown(wait=True)

    def _create(self, job: Job, dropped: threading.Event) -> str | None:
        if self._wait_for_starts is not None:
            self._wait_for_starts()  # a start in flight is someone's freed GPU: it goes first
        if dropped.is_set():
            return None  # started (its start made the container) or no longer forecast meanwhile
        try:
            cid = self.runtime.prepare(job)
        except Exception as exc:  # the start makes it then, and reports any error
            log.info("job %d: could not prepare its container: %s", job.id, exc)
            return None
        if cid is not None:
            log.debug("job %d: container %s prepared for GPUs %s", job.id, cid[:12],
                      ",".join(job.assigned_gpus) or "-")
        return cid

    def _discard(self, job_id: int, entry: Prepared) -> None:
        entry.dropped.set()
        if entry.container.cancel():
            return  # never made

        def run() -> None:
            cid = entry.container.result()  # waits for its create
            if cid is not None:
                try:
                    self.runtime.discard(cid)
                except Exception as exc:
                    log.warning("could not remove prepared container %s: %s", cid[:12], exc)
                else:
                    log.debug("prepared container %s removed", cid[:12])

        self._removing[job_id] = self._run(self._remover, run)
