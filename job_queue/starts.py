"""labqd's start/stop path: record a start, create and start the container in a worker (or start
the container prepared for it, prepare.py), record the result, stop containers. A part of Daemon
(daemon.py holds the loop), kept apart from the loop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .config import Config
from .exits import start_failure
from .messages import Message, Reconcile, Started
from .metrics import Metrics
from .models import Job, JobState
from .notify import Notifier
from .prepare import Prepared, Preparer
from .reaper import Reaper
from .runtime import Runtime, RuntimeError_
from .store import Store

log = logging.getLogger("labqd")


class StartStop:
    """Mixed into Daemon, which sets these attributes."""

    cfg: Config
    store: Store
    runtime: Runtime
    clock: Callable[[], float]
    queue: queue.Queue[Message]
    reaper: Reaper
    metrics: Metrics
    notifier: Notifier
    preparer: Preparer
    _starters: ThreadPoolExecutor | None
    _stoppers: ThreadPoolExecutor
    _start_attempts: dict[int, int]

    def request_stop(self, job_id: int) -> None:
        self._stoppers.submit(self._stop, job_id)

    def start_job(self, job_id: int, gpus: list[str]) -> None:
        # Recorded as starting (with its GPUs) before the container is created.
        if not self.store.mark_starting(job_id, gpus, self.clock()):
            return
        job = self.store.get(job_id)
        assert job is not None
        self.metrics.job_started(job, self.clock())
        prepared = self.preparer.take(job_id)
        if self._starters is None:
            self._on_started(*self._create(job, prepared))
        else:  # create/start in parallel; the main loop records the result ("started")
            self.reaper.start_begun()  # counted from the decision: nothing else slips in before it

            def run() -> None:
                try:
                    result = self._create(job, prepared)
                finally:
                    self.reaper.start_done()
                self.queue.put(Started(*result))

            self._starters.submit(run)

    def _create(self, job: Job,
                prepared: Prepared | None = None) -> tuple[int, str | None, str | None]:
        """Create and start the container, or start the one prepared for it with these GPUs:
        (job id, container id, error). Runs in a worker."""
        try:
            t0 = time.monotonic()
            cid = self.preparer.claim(prepared, job.assigned_gpus) if prepared is not None else None
            if cid is not None:
                cid = self.runtime.start_prepared(job, cid)
                log.debug("job %d: prepared container started in %.3f s", job.id, time.monotonic() - t0)
                return job.id, cid, None
            cid = self.runtime.create_and_start(job)
            log.debug("job %d: container created and started in %.3f s", job.id, time.monotonic() - t0)
            return job.id, cid, None
        except RuntimeError_ as exc:
            return job.id, None, str(exc)
        except Exception as exc:
            attempts = self._start_attempts.get(job.id, 0) + 1
            self._start_attempts[job.id] = attempts
            failure = start_failure(exc, attempts)
            if failure is not None:  # not "unreachable": the GPUs are not held forever
                log.error("job %d: start failed %d times, the last with %s", job.id, attempts, exc)
                self._start_attempts.pop(job.id, None)
                return job.id, None, failure
            log.exception("job %d: docker call failed (try %d); the start resumes on the next reconcile",
                          job.id, attempts)
            retry = threading.Timer(5.0, self.queue.put, args=(Reconcile(),))
            retry.daemon = True
            retry.start()
            return job.id, None, None

    def _on_started(self, job_id: int, cid: str | None, err: str | None) -> None:
        if err is not None:
            if self.store.transition(job_id, [JobState.STARTING], state=JobState.FAILED, reason=err,
                                     end_time=self.clock()):
                self._notify(job_id)
            return
        if cid is None:
            return
        self._start_attempts.pop(job_id, None)
        # A very short job may already be recorded as finished (its exit was seen first).
        # The run time (and so the time limit) counts from here, not from the decision to start.
        if not self.store.transition(job_id, [JobState.STARTING], state=JobState.RUNNING, container_id=cid,
                                     start_time=self.clock()):
            return
        job = self.store.get(job_id)
        assert job is not None
        self.reaper.follow(job, cid)
        if self.notifier.cfg.enabled:
            self.notifier.job_changed(job)
        if job.stop_reason is not None:
            self.request_stop(job_id)

    def _stop(self, job_id: int) -> None:
        job = self.store.get(job_id)
        if job is None or job.container_id is None or job.state.final:
            return
        try:
            self.runtime.stop(job.container_id, self.cfg.kill_grace)
        except Exception:
            log.exception("job %d: stop failed", job_id)

    def _notify(self, job_id: int, missed_start: bool = False) -> None:
        """A job's container ended (or never started): count its outcome and hand it to the notifier
        (queued; sending never blocks the main loop). ``missed_start``: it ran but ended before it was
        recorded running, so its "started" notice was not sent yet."""
        job = self.store.get(job_id)
        if job is None:
            return
        self.metrics.job_finished(job)
        if self.notifier.cfg.enabled:
            self.notifier.job_changed(job, missed_start)
