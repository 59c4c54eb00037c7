"""labqd: the per-node daemon. Main loop, carrying out exit records and reconciliation, signals.

The loop blocks on a queue of typed messages (messages.py) fed by Docker die events, log-stream
ends and API requests; it never sleep-polls. Its only timer is the next job time-limit deadline
(and, on NVML nodes with a GPU blocked by a foreign process, a slow re-read of NVML). The start/stop
path is starts.py; after each pass the containers of the jobs forecast to start next are made
ahead (prepare.py); how an exit is classified (exits.py) and what reconciliation does
(reconcile.py) are pure functions.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

from .api import ApiServer, raise_fd_limit
from .config import Config, ConfigError, load_config
from .exits import classify_exit
from .gpus import GpuInfo, Inventory, make_inventory
from .messages import Died, Message, Oom, Reconcile, Started, Wake
from .metrics import Metrics
from .models import Job, JobState, StopReason
from .notify import Notifier, NotifyConfigError, load_secrets
from .prepare import Preparer
from .reaper import Reaper
from .reconcile import (
    DISAPPEARED,
    Adopt,
    DiscardPrepared,
    Leftover,
    MarkCancelled,
    MarkDisappeared,
    ResumeStart,
)
from .reconcile import plan as plan_reconcile
from .runtime import ContainerEvent, ContainerInfo, DockerRuntime, Runtime
from .scheduler import Policy, schedule
from .service import Service, log_path
from .starts import StartStop
from .store import SqliteStore, Store

log = logging.getLogger("labqd")

IMAGE_CACHE_S = 60.0




class Daemon(StartStop):
    def __init__(self, cfg: Config, store: Store, runtime: Runtime, inventory: Inventory,
                 clock: Callable[[], float] = time.time, parallel_starts: int = 8,
                 prepare_ahead: int | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self.runtime = runtime
        self.inventory = inventory
        self.clock = clock
        self.queue: queue.Queue[Message] = queue.Queue()
        self._stopping = False
        self.next_deadline: float | None = None
        self.reaper = Reaper(cfg, store, runtime, lambda cid, job_id: self.queue.put(Died(cid, job_id)))
        # `docker stop` blocks for up to kill_grace: stops get their own threads.
        self._stoppers = ThreadPoolExecutor(max_workers=16, thread_name_prefix="labq-stop")
        self._starters = None
        if parallel_starts > 0:
            self._starters = ThreadPoolExecutor(parallel_starts, thread_name_prefix="labq-start")
        self.preparer = Preparer(runtime, background=parallel_starts > 0,
                                 wait_for_starts=lambda: self.reaper.wait_for_starts(2.0))
        self._images_seen: dict[str, float] = {}
        self._start_attempts: dict[int, int] = {}
        self._gpus: list[GpuInfo] = inventory.snapshot(())
        self._gpus_read = clock()
        # Forecast next starts whose containers are made ahead: one per GPU by default (0: none).
        self.prepare_ahead = max(1, len(self._gpus)) if prepare_ahead is None else prepare_ahead
        self.service = Service(cfg, store, self, clock)
        self.policy = Policy(max_gpus_per_user=cfg.max_gpus_per_user, node_cpus=cfg.effective_cpus(),
                             node_mem=cfg.effective_mem())
        self.api: ApiServer | None = None
        self.metrics = Metrics(self.store.unfinished_jobs, self.gpu_report)
        self.notifier = Notifier(cfg.notify, self.store.get, socket.gethostname(), self.wait_log,
                                 lambda job_id: log_path(cfg, job_id), self.metrics.notification)
        self.notifier.start()

    # ------------------------------------------------------------ Backend for the service
    def wake(self) -> None:
        self.queue.put(Wake())

    def image_exists(self, image: str) -> bool:
        """Whether the image is on the node; a yes is remembered for IMAGE_CACHE_S, so a burst of
        submits costs one Docker call, not one each (an image removed meanwhile fails the start
        with "image ... not found on this node")."""
        now = time.monotonic()
        seen = self._images_seen.get(image)
        if seen is not None and now - seen < IMAGE_CACHE_S:
            return True
        if not self.runtime.image_exists(image):
            return False
        self._images_seen[image] = now
        if len(self._images_seen) > 1024:
            self._images_seen.clear()
        return True

    def wait_log(self, job_id: int, timeout: float) -> None:
        """Wait until a finished job's log file holds all its output (saved just after the exit)."""
        self.reaper.wait_output(job_id, timeout)

    def gpu_ids(self) -> list[str]:
        return [g.id for g in self._gpus]

    def gpu_report(self) -> list[dict[str, Any]]:
        by_gpu: dict[str, Job] = {}
        for active in self.store.unfinished_jobs():
            for gid in active.assigned_gpus:
                by_gpu[gid] = active
        out = []
        for g in self._gpus:
            job = by_gpu.get(g.id)
            state = "job" if job else ("foreign" if g.foreign else "free")
            out.append({
                "index": g.index, "id": g.id, "name": g.name, "memory_total": g.memory_total, "state": state,
                "job": job.id if job else None, "user": job.user if job else None,
                "foreign": [{"pid": p.pid, "user": p.user, "memory_bytes": p.memory_bytes}
                            for p in g.foreign],
            })
        return out

    # ------------------------------------------------------------ main loop
    def handle_signal(self, signum: int, frame: FrameType | None) -> None:
        """Only sets a flag and wakes the loop (from a helper thread: Queue.put is not reentrant)."""
        self._stopping = True
        threading.Thread(target=self.wake, daemon=True).start()

    def stopping(self) -> bool:
        return self._stopping

    def run(self) -> None:
        subscribed = threading.Event()
        threading.Thread(target=self._events_loop, args=(subscribed,), name="labq-events",
                         daemon=True).start()
        subscribed.wait(30)
        self.reconcile()
        self.api = ApiServer(self.cfg.socket_path, self.service)
        self.api.serve_in_thread()
        if self.cfg.metrics_port:
            try:
                self.metrics.serve(self.cfg.metrics_port, self.cfg.metrics_address)
            except OSError:
                log.exception("cannot serve metrics on port %d; continuing without", self.cfg.metrics_port)
        log.info("labqd listening on %s", self.cfg.socket_path)
        self.schedule_pass()
        while not self.stopping():
            try:
                msgs = [self.queue.get(timeout=self._timeout())]
            except queue.Empty:
                msgs = []
            with contextlib.suppress(queue.Empty):
                while True:
                    msgs.append(self.queue.get_nowait())
            if self.stopping():
                break
            for msg in msgs:
                try:
                    self._handle(msg)
                except Exception:  # one bad message must not cost the others
                    log.exception("error handling %s; continuing", type(msg).__name__)
            try:
                self.schedule_pass()
            except Exception:
                log.exception("error in scheduling pass; continuing")
        self.shutdown()

    def _handle(self, msg: Message) -> None:
        match msg:
            case Died(cid, job_id, event):
                self.on_exit(cid, job_id, event=event)
            case Oom(cid):
                self.reaper.note_oom(cid)
            case Started(job_id, cid, error):
                self._on_started(job_id, cid, error)
            case Reconcile():
                self.reconcile()
            case Wake():
                pass  # the pass after the batch is what it asked for

    def shutdown(self) -> None:
        """Drain: stop listening, leave running containers running, close the store."""
        log.info("labqd stopping; running containers keep running")
        if self.api is not None:
            self.api.close()
        self.reaper.shutdown()
        self.preparer.forget()  # what was made ahead is removed by the next labqd's reconcile
        self.notifier.stop()
        self._stoppers.shutdown(wait=False, cancel_futures=True)
        if self._starters is not None:
            # Starts already recorded finish or are resumed by the next labqd (reconcile).
            self._starters.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    def _timeout(self) -> float | None:
        now = self.clock()
        waits = []
        if self.next_deadline is not None:
            waits.append(max(0.0, self.next_deadline - now) + 0.01)
        if not self.inventory.fake and any(g.foreign for g in self._gpus):
            waits.append(max(0.0, self._gpus_read + self.cfg.foreign_refresh_s - now))
        return min(waits) if waits else None

    def _events_loop(self, subscribed: threading.Event) -> None:
        while not self.stopping():
            try:
                events = self.runtime.events()
                subscribed.set()
                for ev in events:
                    if ev.kind == "oom":
                        self.queue.put(Oom(ev.cid))
                    elif ev.kind == "die":
                        self.queue.put(Died(ev.cid, ev.job_id, ev))
            except Exception:
                log.exception("docker event stream failed; reconnecting")
            if self.stopping():
                return
            time.sleep(1)  # back-off before reconnecting to dockerd, then catch up
            self.queue.put(Reconcile())

    # ------------------------------------------------------------ scheduling
    def _refresh_gpus(self, jobs: list[Job]) -> None:
        if self.inventory.fake:
            return
        own = [j.container_id for j in jobs if j.container_id]
        try:
            self._gpus = self.inventory.snapshot(own)
            self._gpus_read = self.clock()
        except Exception:
            log.exception("NVML read failed; keeping the previous inventory")

    def schedule_pass(self) -> None:
        with self.metrics.schedule_pass.time():
            self._schedule_pass()

    def _schedule_pass(self) -> None:
        for _ in range(100):  # a cancellation can make dependants fail in turn
            jobs = self.store.unfinished_jobs()
            self._refresh_gpus(jobs)
            deps = self.store.states(j.spec.after for j in jobs if j.spec.after is not None)
            unavailable = {g.id: "; ".join(p.describe() for p in g.foreign) for g in self._gpus if g.foreign}
            now = self.clock()
            d = schedule(jobs, [g.id for g in self._gpus], self.policy, now, deps, unavailable,
                         self.prepare_ahead)
            self.next_deadline = d.next_deadline
            if d.changed:
                self.store.set_reasons(d.changed)
            with self.store.tx():
                for job_id, reason in d.cancels:
                    self.store.transition(job_id, [JobState.PENDING], state=JobState.CANCELLED,
                                          reason=reason, end_time=now)
            for job_id in d.timeouts:
                if self.store.transition(job_id, [JobState.RUNNING], stop_reason=StopReason.TIME_LIMIT,
                                         reason="TimeLimit"):
                    self.request_stop(job_id)
            for job_id, gpus in d.starts:
                self.start_job(job_id, gpus)
            if not d.cancels:
                forecast = {job_id for job_id, _ in d.prepares}
                self.preparer.plan(d.prepares, {j.id: j for j in jobs if j.id in forecast})
                return

    def settle(self) -> None:
        """Wait for background work (stops, log saving, removals) to finish; for tests and tools."""
        self._stoppers.shutdown(wait=True)
        self.preparer.settle()
        self.reaper.settle()

    # ------------------------------------------------------------ exits and recovery
    def on_exit(self, cid: str, job_id: int, info: ContainerInfo | None = None,
                event: ContainerEvent | None = None) -> None:
        """Record a container's exit and free its GPUs.

        From a Docker ``die`` event the exit code and time come with the event, so no Docker call
        sits between the exit and the next start; Docker's exact start/finish times and OOM flag
        are filled in afterwards (``_remove_later``). Otherwise the container is inspected.
        """
        job = self.store.get(job_id)
        if job is None:
            return
        if job.state.final and info is None:
            self.reaper.finish(job, cid)  # a second notice for a recorded exit: no need to ask Docker
            return
        if info is None and event is not None and event.exit_code is not None:
            info = ContainerInfo(id=cid, job_id=job_id, status="exited", instance=self.store.instance,
                                 exit_code=event.exit_code, oom_killed=self.reaper.was_oom(cid),
                                 started_at=None, finished_at=event.time)
        if info is None:
            t0 = time.monotonic()
            info = self.runtime.inspect(cid)
            if info is not None and info.finished_at:
                log.debug("job %d: exit noticed %.3f s after it happened (inspect %.3f s)", job_id,
                          self.clock() - info.finished_at, time.monotonic() - t0)
        if info is None:
            if job.state.active:
                self.store.update(job_id, state=JobState.FAILED, end_time=self.clock(),
                                  reason="container disappeared")
                self._notify(job_id)
            return
        if not info.finished:
            if info.status == "running" and job.state.active:
                self.reaper.follow(job, cid)  # log stream ended early (dockerd restart): follow again
            return
        if job.state.final:
            self.reaper.finish(job, cid)
            return
        code = info.exit_code
        state, reason = classify_exit(job.stop_reason, code, info.oom_killed, job.reason)
        log.debug("job %d: exit %s recorded", job_id, code)
        self.reaper.expect_output(job_id)
        self.store.update(job_id, state=state, reason=reason, exit_code=code, oom_killed=info.oom_killed,
                          end_time=info.finished_at or self.clock(),
                          start_time=info.started_at or job.start_time, container_id=cid)
        self.reaper.finish(job, cid)
        self._notify(job_id, missed_start=job.state == JobState.STARTING)

    def reconcile(self) -> None:
        """Match the store against labq-labelled containers after a (re)start or lost event stream
        (the plan is reconcile.plan, pure; this carries it out)."""
        jobs = self.store.unfinished_jobs()
        by_id = {j.id: j for j in jobs}
        containers = []
        for info in self.runtime.list_jobs():
            job = by_id.get(info.job_id) if info.job_id is not None else None
            if info.status == "created" and job is not None and job.state.active:
                # labqd died between create and start. Started only if made for the GPUs recorded with
                # the start; one prepared for other GPUs is removed and the start resumed.
                if not self.runtime.matches(job, info):
                    log.info("job %d: container %s was prepared for other GPUs; removing it", job.id,
                             info.id[:12])
                    self.runtime.discard(info.id)
                    continue
                with contextlib.suppress(Exception):
                    self.runtime.start_created(info.id)
                info = self.runtime.inspect(info.id) or info
            containers.append(info)
        prepared = self.preparer.known()
        for action in plan_reconcile(jobs, containers):
            match action:
                case MarkCancelled(job_id):
                    self.store.update(job_id, state=JobState.CANCELLED, end_time=self.clock())
                case ResumeStart(job_id):
                    log.info("job %d: resuming interrupted start", job_id)
                    self._on_started(*self._create(by_id[job_id]))
                case MarkDisappeared(job_id):
                    self.store.update(job_id, state=JobState.FAILED, end_time=self.clock(),
                                      reason=DISAPPEARED)
                case Adopt(job_id, info, record_running, exited, stop):
                    if record_running:
                        self.store.update(job_id, state=JobState.RUNNING, container_id=info.id)
                    if exited:
                        self.on_exit(info.id, job_id, info)
                        continue
                    log.info("job %d: re-adopted container %s", job_id, info.id[:12])
                    self.reaper.follow(by_id[job_id], info.id)
                    if stop:
                        self.request_stop(job_id)
                case DiscardPrepared(info):
                    assert info.job_id is not None
                    if info.id in prepared:
                        continue  # made ahead by this labqd for a job it forecasts: kept
                    if self.store.get(info.job_id) is None:
                        log.warning("container %s is labelled labq.job=%d but there is no such job; "
                                    "leaving it", info.id[:12], info.job_id)
                        continue
                    log.info("job %d: removing container %s, prepared but never started", info.job_id,
                             info.id[:12])
                    self.runtime.discard(info.id)
                case Leftover(info):
                    assert info.job_id is not None
                    known = self.store.get(info.job_id)
                    if known is None:
                        log.warning("container %s is labelled labq.job=%d but there is no such job; "
                                    "leaving it", info.id[:12], info.job_id)
                    elif info.finished:
                        self.reaper.finish(known, info.id)


def _prepare_dirs(cfg: Config) -> None:
    Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
    Path(cfg.state_dir).chmod(0o755)
    Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
    Path(cfg.log_dir).chmod(0o711)  # owners open their own files by name; nobody lists them


def _lock_state_dir(cfg: Config) -> int | None:
    """Hold an exclusive lock on the state dir for the life of this process (None: another has it).

    A second labqd on the same state would re-adopt the first one's containers and rewrite their
    log files under it, so it must stop before it opens the store or asks Docker anything.
    The lock goes with the process (exit, kill -9), so no stale lock ever needs clearing.
    """
    import fcntl

    fd = os.open(str(Path(cfg.state_dir) / "labqd.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _lock_holder(cfg: Config) -> str:
    with contextlib.suppress(OSError, ValueError):
        return f" (pid {int((Path(cfg.state_dir) / 'labqd.lock').read_text())})"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labqd", description="labq GPU job queue daemon")
    parser.add_argument("--config", help="config file (default $LABQ_CONFIG or /etc/labq/config.toml)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"labqd: {exc}", file=sys.stderr)
        return 2
    try:
        cfg = dataclasses.replace(cfg, notify=load_secrets(cfg.notify))
    except NotifyConfigError as exc:
        print(f"labqd: {exc}", file=sys.stderr)
        return 2
    os.umask(0o022)
    raise_fd_limit()  # before anything opens descriptors; connections are kept below it (api.py)
    _prepare_dirs(cfg)
    lock = _lock_state_dir(cfg)  # open until this process ends
    if lock is None:
        print(f"labqd: another labqd{_lock_holder(cfg)} is running on {cfg.state_dir}; "
              f"stop it first (systemctl stop labqd)", file=sys.stderr)
        return 1
    store = SqliteStore(cfg.db_path)
    try:
        runtime = DockerRuntime(cfg, store.instance)
    except Exception as exc:
        print(f"labqd: cannot talk to Docker: {exc}", file=sys.stderr)
        return 1
    try:
        inventory = make_inventory(cfg.gpus)
    except Exception as exc:
        print(f"labqd: cannot read GPUs through NVML ({exc}); on a node without GPUs set "
              f"gpus = [\"fake-0\", ...] in the config", file=sys.stderr)
        return 1
    daemon = Daemon(cfg, store, runtime, inventory)
    signal.signal(signal.SIGTERM, daemon.handle_signal)
    signal.signal(signal.SIGINT, daemon.handle_signal)
    daemon.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
