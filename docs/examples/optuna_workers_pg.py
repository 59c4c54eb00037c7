"""One of N parallel Optuna workers sharing one study in the lab's study database (PostgreSQL).

    labq submit --array 0-4 --gpus 1 --image <image with optuna and psycopg2> --name lr-search -- \
        python3 optuna_workers_pg.py --study lr-search --trials 40

starts five workers (one GPU each). labq gives every job ``LABKIT_STUDY_DB`` (your own database, no
password in it: libpq reads ``~/.pgpass``, written once by ``labq credentials``). Together the workers
run exactly ``--trials`` trials: each ends COMPLETE, or PRUNED by the median pruner; none runs twice.

Why exactly: a worker only starts a trial while holding a PostgreSQL advisory lock for the study and
only while fewer than ``--trials`` trials are live (complete, pruned, running or waiting to be retried);
the lock is let go as soon as the trial exists. Failed trials do not count, so a trial lost with the
database is replaced, and a worker that is done waits until no other trial is running before it exits.

A PostgreSQL restart in the middle: every database call of a trial is retried until the server is back
(``pool_pre_ping`` replaces the dead connections), and so are the trial's heartbeats; a trial whose
worker stopped sending them is failed after ``--grace`` seconds by another worker and retried once with
the same parameters (``RetryHeartbeatStaleTrialCallback``); a trial the database made while its worker
was told the call failed (it never got a parameter) is failed after ``--grace`` seconds; a result that
could not be stored is run again, never counted twice.

Replace ``objective`` with your training: report the validation metric each epoch, return the last.
Run it anywhere else with ``--storage sqlite:///study.db`` (one worker) to try it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import optuna
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import TrialState

T = TypeVar("T")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # fail_stale_trials
LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def db_errors() -> tuple[type[BaseException], ...]:
    """What a database that went away raises (through Optuna, SQLAlchemy or psycopg2)."""
    errors: list[type[BaseException]] = [StorageInternalError, ConnectionError]
    try:
        import sqlalchemy.exc

        errors += [sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError]
    except ImportError:
        pass
    try:
        import psycopg2

        errors += [psycopg2.OperationalError, psycopg2.InterfaceError]
    except ImportError:
        pass
    return tuple(errors)


def retrying(call: Callable[[], T], what: str, patience: float = 600.0) -> T:
    """``call()``, again and again while the database is unreachable (at most ``patience`` seconds)."""
    deadline, pause = time.monotonic() + patience, 1.0
    while True:
        try:
            return call()
        except db_errors() as exc:
            if time.monotonic() > deadline:
                raise
            print(f"{what}: database unreachable ({type(exc).__name__}); again in {pause:.0f} s",
                  file=sys.stderr, flush=True)
            time.sleep(pause)
            pause = min(pause * 2, 15.0)


class StudyLock:
    """A PostgreSQL advisory lock for one study, on a connection of its own (the server lets go of it
    if the connection dies). Elsewhere (SQLite, tests) a lock of this process stands in."""

    def __init__(self, url: str, study: str) -> None:
        self.url = url if url.startswith("postgresql") else ""
        digest = hashlib.sha256(f"optuna-study:{study}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "big", signed=True)
        self.conn: Any = None
        self.local = threading.Lock()
        self.held = False

    def acquire(self) -> None:
        if not self.url:
            self.local.acquire()
            self.held = True
            return

        def take() -> None:
            if self.conn is None or self.conn.closed:
                import psycopg2

                self.conn = psycopg2.connect(self.url.replace("postgresql+psycopg2://", "postgresql://"))
                self.conn.autocommit = True
            with self.conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_lock(%s)", (self.key,))

        def reset_and_take() -> None:
            try:
                take()
            except BaseException:
                self.conn = None  # broken: connect again next time
                raise

        retrying(reset_and_take, "study lock")
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if not self.url:
            self.local.release()
            return
        try:
            with self.conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
        except db_errors():
            self.conn = None  # the server dropped the connection, and the lock with it


def objective(trial: optuna.Trial, steps: int, step_seconds: float) -> float:
    lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
    dropout = trial.suggest_float("dropout", 0.0, 0.5)
    trial.set_user_attr("worker", int(os.environ.get("LABQ_ARRAY_INDEX", "0")))
    trial.set_user_attr("gpu", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    # A stand-in for training: the loss falls each epoch towards a floor set by the parameters.
    floor = (math.log10(lr) + 2.5) ** 2 + (dropout - 0.1) ** 2
    loss = floor + 1.0
    for step in range(steps):
        time.sleep(step_seconds)  # your epoch
        loss = floor + 1.0 / (step + 1)
        retrying(functools.partial(trial.report, loss, step), f"trial {trial.number}: report")
        if retrying(trial.should_prune, f"trial {trial.number}: should_prune"):
            raise optuna.TrialPruned()
    return loss


def storage_for(url: str, grace: int) -> RDBStorage | str:
    if not url.startswith("postgresql"):
        return url
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]
    return RDBStorage(
        url,
        # Two connections per worker (the trial and its heartbeat), each checked before use: after a
        # server restart a dead connection is replaced instead of failing the next call.
        engine_kwargs={"pool_size": 2, "max_overflow": 0, "pool_pre_ping": True},
        heartbeat_interval=max(1, grace // 6),
        grace_period=grace,
        **retry_lost_trials(),
    )


def retry_lost_trials() -> dict[str, Any]:
    """A trial that lost its heartbeat comes back once, same parameters (Optuna 4.x and 5 name it apart)."""
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
        return {"heartbeat_stale_trial_callback": retry}
    return {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=1)}


def counts(study: optuna.Study) -> dict[TrialState, int]:
    out = dict.fromkeys(TrialState, 0)
    for t in study.get_trials(deepcopy=False):
        out[t.state] += 1
    return out


class Heartbeat:
    """Records the running trial's heartbeat every ``interval`` seconds, retrying while the database is
    away (Optuna's own heartbeat thread ends at its first error, and a trial without heartbeats would
    look lost, or, without any, never)."""

    def __init__(self, storage: Any, trial_id: int, interval: float) -> None:
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.done.is_set():
            try:
                self.storage.record_heartbeat(self.trial_id)
            except db_errors():
                pass  # again at the next beat
            self.done.wait(self.interval)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def fail_orphans(study: optuna.Study, grace: float, say: Callable[[str], None]) -> None:
    """A trial the database made while its worker was told the call failed runs nowhere: RUNNING
    without a single parameter long after its start. Failed (not counted), so another takes its place."""
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = t.datetime_start.timestamp() if t.datetime_start else now
        if not t.params and now - started > grace:
            try:
                study.tell(t.number, state=TrialState.FAIL)
                say(f"trial {t.number} was made but never run; failed, another takes its place")
            except (UpdateFinishedTrialError, ValueError):
                pass  # finished meanwhile


def run_worker(study: optuna.Study, trials: int, lock: StudyLock,
               objective_fn: Callable[[optuna.Trial], float], poll: float = 2.0,
               say: Callable[[str], None] = print, storage: Any = None, grace: float = 60.0) -> int:
    """Run trials until the study has ``trials`` live ones and none is still running; trials run here.
    ``storage``: the study's RDBStorage with heartbeats (None: no heartbeats, e.g. in memory). Optuna's
    ``study.optimize`` is not used: when storing a result fails it loses the error (Optuna 5.0)."""
    ran = 0
    while True:
        lock.acquire()
        try:
            # Trials whose worker stopped sending heartbeats: failed, and retried (no-op without heartbeats).
            retrying(lambda: optuna.storages.fail_stale_trials(study), "stale trials")
            retrying(lambda: fail_orphans(study, grace, say), "orphaned trials")
            n = retrying(lambda: counts(study), "count trials")
            if n[TrialState.WAITING] == 0 and sum(n[s] for s in LIVE) >= trials:
                if n[TrialState.RUNNING] == 0:
                    return ran
                lock.release()  # others still run theirs: one may fail and need running again
                time.sleep(poll)
                continue
            try:
                trial = study.ask()  # a trial waiting to be retried first, else a new one
            except db_errors() as exc:
                say(f"the database went away while making a trial ({type(exc).__name__})")
                continue
        finally:
            lock.release()  # the trial exists: other workers may start theirs
        run_trial(study, trial, objective_fn, storage, say)
        ran += 1


def run_trial(study: optuna.Study, trial: optuna.Trial, objective_fn: Callable[[optuna.Trial], float],
              storage: Any, say: Callable[[str], None]) -> None:
    """Run one trial and store its result, retrying while the database is away. A trial whose database
    calls gave up is FAIL (not counted: another takes its place); any other error is a bug: the trial
    is FAIL and the worker ends with the error."""
    beat = Heartbeat(storage, trial._trial_id, storage.get_heartbeat_interval()) if storage else None
    value, state, bug = None, TrialState.COMPLETE, None
    if beat:
        beat.__enter__()
    try:
        value = objective_fn(trial)
    except optuna.TrialPruned:
        state = TrialState.PRUNED
    except db_errors() as exc:
        say(f"trial {trial.number}: the database stayed away ({type(exc).__name__}); failed")
        state = TrialState.FAIL
    except Exception as exc:
        state, bug = TrialState.FAIL, exc
    finally:
        if beat:
            beat.__exit__()
    try:
        retrying(lambda: study.tell(trial, value, state=state) if state == TrialState.COMPLETE
                 else study.tell(trial, state=state), f"trial {trial.number}: store its result")
    except UpdateFinishedTrialError:
        # Failed meanwhile by another worker (heartbeats lost) and retried there, or stored already
        # by a first attempt whose answer the restart swallowed.
        say(f"trial {trial.number}: already finished in the study; this result is not counted again")
    if bug is not None:
        raise bug

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=os.environ.get("LABKIT_STUDY_DB", ""),
                        help="study database URL (default: $LABKIT_STUDY_DB, set by labq)")
    parser.add_argument("--study", required=True, help="study name (the same for every worker)")
    parser.add_argument("--trials", type=int, default=40, help="trials of the whole study, all workers")
    parser.add_argument("--steps", type=int, default=8, help="epochs of the stand-in training")
    parser.add_argument("--step-seconds", type=float, default=0.2, help="seconds per stand-in epoch")
    parser.add_argument("--grace", type=int, default=60,
                        help="seconds without a heartbeat before a trial counts as lost")
    args = parser.parse_args()
    if not args.storage:
        parser.error("no study database: run under labq (LABKIT_STUDY_DB) or give --storage")

    worker = int(os.environ.get("LABQ_ARRAY_INDEX", "0"))
    lock = StudyLock(args.storage, args.study)
    lock.acquire()  # one worker at a time makes Optuna's tables and the study; the others join it
    try:
        storage = retrying(lambda: storage_for(args.storage, args.grace), "open the database")
        study = retrying(lambda: optuna.create_study(
            study_name=args.study, storage=storage, direction="minimize",
            load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=worker),  # different seeds: workers explore differently
            pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2),
        ), "open the study")
    finally:
        lock.release()
    ran = run_worker(study, args.trials, lock, lambda t: objective(t, args.steps, args.step_seconds),
                     storage=storage if isinstance(storage, RDBStorage) else None, grace=args.grace)
    n = counts(study)
    best = study.best_trial if n[TrialState.COMPLETE] else None
    print(f"worker {worker}: ran {ran}; study: {n[TrialState.COMPLETE]} complete, {n[TrialState.PRUNED]} "
          f"pruned, {n[TrialState.FAIL]} failed; best {best.value if best else '-'} "
          f"{best.params if best else ''}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
