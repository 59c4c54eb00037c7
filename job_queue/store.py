"""Job storage: a small interface and its SQLite implementation (WAL, busy timeout, one tx helper)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from .models import FINAL_STATES, Job, JobSpec, JobState, StopReason

UNFINISHED_STATES = (JobState.PENDING, JobState.HELD, JobState.STARTING, JobState.RUNNING)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL,
    submit_time REAL NOT NULL,
    spec TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    start_time REAL,
    end_time REAL,
    exit_code INTEGER,
    oom_killed INTEGER NOT NULL DEFAULT 0,
    assigned_gpus TEXT NOT NULL DEFAULT '[]',
    container_id TEXT,
    stop_reason TEXT,
    start_count INTEGER NOT NULL DEFAULT 0,
    dispatch_time REAL,
    array_id INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_end ON jobs(end_time);
CREATE INDEX IF NOT EXISTS jobs_user_state ON jobs(user, state);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
SCHEMA_VERSION = "1"

_COLUMNS = (
    "id, user, state, priority, submit_time, spec, reason, start_time, end_time, exit_code, "
    "oom_killed, assigned_gpus, container_id, stop_reason, start_count, dispatch_time"
)
_UPDATABLE = {
    "state", "reason", "start_time", "end_time", "exit_code", "oom_killed", "assigned_gpus",
    "container_id", "stop_reason",
}


class StoreError(RuntimeError):
    pass


class Store(Protocol):
    """What the daemon, the service and the reaper need from storage (they are typed against this,
    SqliteStore is the one implementation); every method commits before it returns, unless called
    inside ``tx()``, whose changes commit (or roll back) together."""

    def tx(self) -> AbstractContextManager[Any]: ...
    def transition(self, job_id: int, allowed: Sequence[JobState], **fields: Any) -> bool: ...

    def add_jobs(self, specs: Sequence[JobSpec], now: float) -> list[int]: ...
    def get(self, job_id: int) -> Job | None: ...
    def unfinished_jobs(self) -> list[Job]: ...
    def count_waiting(self, user: str) -> int: ...
    def states(self, ids: Iterable[int]) -> dict[int, JobState]: ...
    def history(self, user: str | None, limit: int) -> list[Job]: ...
    def update(self, job_id: int, **fields: Any) -> None: ...
    def set_reasons(self, reasons: dict[int, str]) -> None: ...
    def mark_starting(self, job_id: int, gpus: Sequence[str], now: float) -> bool: ...
    def close(self) -> None: ...

    @property
    def instance(self) -> str: ...


def _row_to_job(row: Sequence[Any], spec: JobSpec | None = None) -> Job:
    if spec is None:
        spec = JobSpec(**json.loads(row[5]))
    return Job(
        id=row[0],
        spec=spec,
        state=JobState(row[2]),
        submit_time=row[4],
        reason=row[6],
        start_time=row[7],
        end_time=row[8],
        exit_code=row[9],
        oom_killed=bool(row[10]),
        assigned_gpus=json.loads(row[11]) if row[11] != "[]" else _NO_GPUS,
        container_id=row[12],
        stop_reason=StopReason(row[13]) if row[13] else None,
        start_count=row[14],
        dispatch_time=row[15],
    )


_NO_GPUS: list[str] = []
"""The assigned_gpus of every waiting job in the index (one shared empty list: records in the index
are replaced, never changed in place), so 100,000 pending jobs do not hold 100,000 empty lists."""


def _release_freed_memory() -> None:
    """Hand memory freed after a large submit back to the system (glibc keeps it otherwise)."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _share(spec: JobSpec, seen: dict[int, JobSpec]) -> JobSpec:
    """Let an array's tasks read back from the database share their first task's lists and strings."""
    if spec.array_id is None:
        return spec
    first = seen.setdefault(spec.array_id, spec)
    if first is not spec:
        for name in ("groups", "command", "env", "mounts", "notify", "user", "home", "cwd", "image", "name"):
            if getattr(spec, name) == getattr(first, name):
                setattr(spec, name, getattr(first, name))
    return spec


class SqliteStore:
    def __init__(self, path: str, busy_timeout_ms: int = 10000) -> None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None,
                                     check_same_thread=False)
        self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA synchronous = FULL")
        self._depth = 0
        self._on_commit: list[Callable[[], None]] = []
        self._unfinished: dict[int, Job] = {}
        """Pending, held, starting and running jobs by id (in id order), kept in step with every
        commit of this store; reloaded when another connection changed the database."""
        self._data_version = -1
        for stmt in SCHEMA.strip().split(";"):
            if stmt.strip():
                self._conn.execute(stmt)
        with self.tx() as cur:
            cur.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
            cur.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('instance', ?)",
                        (uuid.uuid4().hex[:16],))
            row = cur.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()
            self.instance: str = row[0]
            """Random id of this queue's database; its containers carry it as the ``labq.instance`` label."""
        self._reload_unfinished()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Cursor]:
        """The one transaction helper: BEGIN IMMEDIATE, commit on success, roll back on error.

        Nested use inside the same thread joins the outer transaction.
        """
        with self._lock:
            cur = self._conn.cursor()
            if self._depth:
                self._depth += 1
                try:
                    yield cur
                finally:
                    self._depth -= 1
                    cur.close()
                return
            cur.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield cur
            except BaseException:
                self._depth = 0
                self._on_commit.clear()
                cur.execute("ROLLBACK")
                cur.close()
                raise
            self._depth = 0
            try:
                cur.execute("COMMIT")
            except BaseException:
                self._on_commit.clear()
                raise
            finally:
                cur.close()
            hooks, self._on_commit = self._on_commit, []
            for hook in hooks:  # the in-memory index follows what was committed, never more
                hook()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def add_jobs(self, specs: Sequence[JobSpec], now: float) -> list[int]:
        """Add jobs with consecutive ids (an array's tasks: array_id is the first id); one transaction."""
        if not specs:
            return []
        with self.tx() as cur:
            # The write lock is held from BEGIN IMMEDIATE: nobody else can take these ids.
            row = cur.execute("SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'jobs'), 0),"
                              " coalesce((SELECT max(id) FROM jobs), 0))").fetchone()
            first = int(row[0]) + 1
            ids = list(range(first, first + len(specs)))
            rows = []
            encoded: dict[str, Any] | None = None
            for job_id, spec in zip(ids, specs, strict=True):
                if spec.array_index is not None:
                    spec.array_id = first
                    if encoded is None:
                        encoded = asdict(spec)  # the tasks differ in their index only
                    text = json.dumps({**encoded, "array_index": spec.array_index,
                                       "array_cap": spec.array_cap})
                else:
                    text = json.dumps(asdict(spec))
                state = JobState.HELD if spec.held else JobState.PENDING
                rows.append((job_id, spec.user, state.value, spec.priority, now, text, spec.array_id))
            cur.executemany("INSERT INTO jobs(id, user, state, priority, submit_time, spec, array_id) "
                            "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            jobs = [Job(id=job_id, spec=spec, state=JobState.HELD if spec.held else JobState.PENDING,
                        submit_time=now, assigned_gpus=_NO_GPUS)
                    for job_id, spec in zip(ids, specs, strict=True)]
            del rows
            self._on_commit.append(lambda: self._unfinished.update((j.id, j) for j in jobs))
        if len(ids) >= 1000:
            _release_freed_memory()  # the encoded rows of a large array, back to the system
        return ids

    def _select(self, where: str, params: Sequence[Any] = ()) -> list[Job]:
        with self._lock:
            # Only constant SQL fragments are interpolated; values are bound parameters.
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM jobs {where}", params).fetchall()  # noqa: S608
        return [_row_to_job(r) for r in rows]

    def get(self, job_id: int) -> Job | None:
        jobs = self._select("WHERE id = ?", (job_id,))
        return jobs[0] if jobs else None

    def unfinished_jobs(self) -> list[Job]:
        """Pending, held, starting and running jobs (not final; "active" means starting or running,
        JobState.active), by id, from the in-memory index (no query:
        the daemon asks on every scheduling pass and every `labq ls`). The Job records are
        replaced, never changed, when a commit changes them (a waiting job's reason excepted,
        see _apply_reasons), so a caller's list stays consistent."""
        with self._lock:
            if self._changed_elsewhere():
                self._reload_unfinished()
            return list(self._unfinished.values())

    def _changed_elsewhere(self) -> bool:
        """True when another connection committed since this store last looked (PRAGMA data_version)."""
        version = int(self._conn.execute("PRAGMA data_version").fetchone()[0])
        changed = version != self._data_version
        self._data_version = version
        return changed

    def _reload_unfinished(self) -> None:
        marks = ",".join("?" for _ in UNFINISHED_STATES)
        with self._lock:
            self._changed_elsewhere()
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY id",  # noqa: S608
                                      [s.value for s in UNFINISHED_STATES]).fetchall()
            shared: dict[int, JobSpec] = {}
            unfinished: dict[int, Job] = {}
            for row in rows:
                spec = _share(JobSpec(**json.loads(row[5])), shared)
                unfinished[row[0]] = _row_to_job(row, spec)
            self._unfinished = unfinished

    def _refresh(self, job_id: int) -> None:
        """After a commit that changed ``job_id``: its new record in the index, or out of it if final."""
        rows = self._conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchall()  # noqa: S608
        old = self._unfinished.get(job_id)
        if not rows or JobState(rows[0][2]).final:
            self._unfinished.pop(job_id, None)
            return
        self._unfinished[job_id] = _row_to_job(rows[0], old.spec if old is not None else None)

    def count_waiting(self, user: str) -> int:
        """How many pending or held jobs ``user`` has (the per-user limit on the queue)."""
        with self._lock:
            row = self._conn.execute("SELECT count(*) FROM jobs WHERE user = ? AND state IN (?, ?)",
                                     (user, JobState.PENDING.value, JobState.HELD.value)).fetchone()
        return int(row[0])

    def states(self, ids: Iterable[int]) -> dict[int, JobState]:
        wanted = sorted(set(ids))
        out: dict[int, JobState] = {}
        with self._lock:
            for i in range(0, len(wanted), 500):
                chunk = wanted[i:i + 500]
                marks = ",".join("?" for _ in chunk)
                for job_id, state in self._conn.execute(
                        f"SELECT id, state FROM jobs WHERE id IN ({marks})", chunk):  # noqa: S608
                    out[job_id] = JobState(state)
        return out

    def history(self, user: str | None, limit: int) -> list[Job]:
        """Finished jobs, newest first: walks the end_time index and stops after ``limit`` rows."""
        marks = ",".join("?" for _ in FINAL_STATES)
        params: list[Any] = [s.value for s in FINAL_STATES]
        where = f"INDEXED BY jobs_end WHERE end_time IS NOT NULL AND state IN ({marks})"
        if user is not None:
            where += " AND user = ?"
            params.append(user)
        params.append(limit)
        return self._select(where + " ORDER BY end_time DESC LIMIT ?", params)

    def update(self, job_id: int, **fields: Any) -> None:
        bad = set(fields) - _UPDATABLE
        if bad:
            raise StoreError(f"cannot update {sorted(bad)}")
        values: list[Any] = []
        for key, value in fields.items():
            if key == "assigned_gpus":
                value = json.dumps(list(value))
            elif isinstance(value, (JobState, StopReason)):
                value = value.value
            elif isinstance(value, bool):
                value = int(value)
            values.append(value)
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self.tx() as cur:
            # Column names were checked against _UPDATABLE above.
            cur.execute(f"UPDATE jobs SET {sets} WHERE id = ?", [*values, job_id])  # noqa: S608
            if cur.rowcount != 1:
                raise StoreError(f"job {job_id} not found")
            self._on_commit.append(lambda: self._refresh(job_id))

    def set_reasons(self, reasons: dict[int, str]) -> None:
        """Set the pending reasons of jobs that are still pending or held (one transaction)."""
        with self.tx() as cur:
            waiting = (JobState.PENDING.value, JobState.HELD.value)
            cur.executemany(  # a generator: 100,000 changed reasons are not copied into a list first
                "UPDATE jobs SET reason = ? WHERE id = ? AND state IN (?, ?)",
                ((r, i, *waiting) for i, r in reasons.items()))
            self._on_commit.append(lambda: self._apply_reasons(reasons))

    def _apply_reasons(self, reasons: dict[int, str]) -> None:
        """A waiting job's reason is the one field changed in place (by the scheduling pass, the only
        writer): a pass over 100,000 new jobs would otherwise make 100,000 new records at once. A
        reader may see some reasons of one pass and some of the last; every other change replaces
        the record."""
        unfinished = self._unfinished
        for job_id, reason in reasons.items():
            job = unfinished.get(job_id)
            if job is not None and job.state in (JobState.PENDING, JobState.HELD):
                job.reason = reason

    def transition(self, job_id: int, allowed: Sequence[JobState], **fields: Any) -> bool:
        """Update ``job_id`` only if it is in one of ``allowed`` states (atomically). Returns success."""
        with self.tx():
            job = self.get(job_id)
            if job is None or job.state not in allowed:
                return False
            self.update(job_id, **fields)
            return True

    def mark_starting(self, job_id: int, gpus: Sequence[str], now: float) -> bool:
        """Record that the job is starting on ``gpus`` (before the container exists).

        Only a pending job can be marked; the start counter proves exactly-once starts.
        """
        with self.tx() as cur:
            cur.execute(
                "UPDATE jobs SET state = ?, assigned_gpus = ?, start_time = ?, dispatch_time = ?, "
                "reason = '', start_count = start_count + 1 WHERE id = ? AND state = ?",
                (JobState.STARTING.value, json.dumps(list(gpus)), now, now, job_id, JobState.PENDING.value),
            )
            if cur.rowcount != 1:
                return False
            self._on_commit.append(lambda: self._refresh(job_id))
            return True
