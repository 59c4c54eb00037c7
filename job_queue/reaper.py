"""Output and clean-up of job containers: follow logs into files, save the output of finished
containers, copy Docker's exact times into the record, then remove the container.

Removals run in one background thread and, like the Docker calls that complete a finished job's
record, wait while container starts are in flight, so they do not compete with the next job's start
for dockerd.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from .config import Config
from .models import Job, JobState
from .runtime import Runtime
from .service import log_path
from .store import Store

log = logging.getLogger("labqd.reaper")


class Reaper:
    def __init__(self, cfg: Config, store: Store, runtime: Runtime,
                 on_stream_end: Callable[[str, int], None]) -> None:
        self.cfg = cfg
        self.store = store
        self.runtime = runtime
        self._on_stream_end = on_stream_end
        self._pumps: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()
        self._removing: OrderedDict[str, None] = OrderedDict()
        self._oom: dict[str, None] = {}  # containers with a Docker "oom" event
        self._settled: dict[int, threading.Event] = {}  # finished jobs whose output is being saved
        self._idle = threading.Condition()
        self._starting = 0  # container starts in flight
        self._workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="labq-worker")
        self._removals: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._remover, name="labq-remover", daemon=True).start()

    # ------------------------------------------------------------ bookkeeping
    @contextmanager
    def starting(self) -> Iterator[None]:
        """Mark a container start in flight (removals wait for it)."""
        self.start_begun()
        try:
            yield
        finally:
            self.start_done()

    def start_begun(self) -> None:
        """A container start is decided (removals, output saving and prepares wait until it is done);
        called by the main loop, so nothing slips in between the decision and the worker."""
        with self._idle:
            self._starting += 1

    def start_done(self) -> None:
        with self._idle:
            self._starting -= 1
            self._idle.notify_all()

    def wait_for_starts(self, timeout: float = 10.0) -> None:
        """Wait (at most ``timeout``) until no container start is in flight: starts are on the
        critical path of a freed GPU, the other Docker calls are not."""
        with self._idle:
            self._idle.wait_for(lambda: self._starting == 0, timeout=timeout)

    def note_oom(self, cid: str) -> None:
        self._oom[cid] = None

    def was_oom(self, cid: str) -> bool:
        return cid in self._oom

    def expect_output(self, job_id: int) -> None:
        """Call before recording a job as finished: readers wait until its output is saved."""
        self._settled.setdefault(job_id, threading.Event())

    def wait_output(self, job_id: int, timeout: float) -> None:
        ev = self._settled.get(job_id)
        if ev is not None:
            ev.wait(timeout)

    # ------------------------------------------------------------ running containers
    def follow(self, job: Job, cid: str) -> None:
        """Follow the container's output into the job's log file; report when the stream ends."""
        with self._lock:
            t = self._pumps.get(job.id)
            if t is not None and t.is_alive():
                return

            def run() -> None:
                try:
                    self.runtime.write_logs(cid, log_path(self.cfg, job.id), job.spec.uid, job.spec.gid, True)
                except Exception:
                    log.exception("job %d: log stream failed", job.id)
                self._on_stream_end(cid, job.id)

            t = threading.Thread(target=run, name=f"labq-log-{job.id}", daemon=True)
            self._pumps[job.id] = t
            t.start()

    # ------------------------------------------------------------ finished containers
    def finish(self, job: Job, cid: str) -> None:
        """Save the whole output of a finished container, complete the record, then remove it."""
        with self._lock:
            if cid in self._removing:
                return
            self._removing[cid] = None
            while len(self._removing) > 10000:  # remember recent removals only
                self._removing.popitem(last=False)

        def run() -> None:
            t = self._pumps.get(job.id)
            if t is not None:
                t.join(60)
            else:  # exited while labqd was down: the file may be partial, rewrite it from Docker
                try:
                    self.runtime.write_logs(cid, log_path(self.cfg, job.id), job.spec.uid, job.spec.gid,
                                            False)
                except Exception:
                    log.exception("job %d: could not save the output", job.id)
            with self._lock:
                self._pumps.pop(job.id, None)
            settled = self._settled.pop(job.id, None)
            if settled is not None:
                settled.set()
            self.wait_for_starts(2.0)
            self._enrich(job.id, cid)
            self._removals.put(cid)

        self._workers.submit(run)

    def _enrich(self, job_id: int, cid: str) -> None:
        """Before removal: take Docker's own start/finish times and OOM flag for the record."""
        try:
            info = self.runtime.inspect(cid)
        except Exception:
            log.exception("job %d: inspect failed", job_id)
            return
        job = self.store.get(job_id)
        if info is None or not info.finished or job is None or not job.state.final:
            return
        fields: dict[str, Any] = {}
        if info.started_at:
            fields["start_time"] = info.started_at
        if info.finished_at:
            fields["end_time"] = info.finished_at
        if info.oom_killed and not job.oom_killed:
            fields["oom_killed"] = True
            if job.state == JobState.FAILED:
                fields["reason"] = "OOM killed"
        if fields:
            self.store.update(job_id, **fields)

    def _remover(self) -> None:
        """Remove finished containers one by one, letting container starts go first."""
        while True:
            cid = self._removals.get()
            self.wait_for_starts()
            try:
                self.runtime.remove(cid)
            except Exception:
                log.exception("could not remove container %s", cid[:12])
            finally:
                self._oom.pop(cid, None)
                self._removals.task_done()

    def settle(self) -> None:
        """Wait until all output is saved and all finished containers are removed."""
        self._workers.shutdown(wait=True)
        self._removals.join()

    def shutdown(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)
