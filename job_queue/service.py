"""Request handlers: what each protocol op means, with permission checks. Called by the API threads."""

from __future__ import annotations

import base64
import dataclasses
import fnmatch
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .config import Config
from .identity import Caller
from .models import Job, JobSpec, JobState, StopReason
from .protocol import (
    ErrorCode,
    Gpus,
    History,
    Ids,
    Logs,
    Ls,
    Ping,
    ProtocolError,
    Request,
    Show,
    SlurmRun,
    Submit,
    invalid,
    parse_array,
)
from .runtime import working_dir
from .store import Store

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .slurm_runner import SlurmRunner


class Backend(Protocol):
    """What the service needs from the daemon."""

    def wake(self) -> None: ...
    def request_stop(self, job_id: int) -> None: ...
    def image_exists(self, image: str) -> bool: ...
    def gpu_ids(self) -> list[str]: ...
    def gpu_report(self) -> list[dict[str, Any]]: ...
    def wait_log(self, job_id: int, timeout: float) -> None: ...


_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.+-]")


def log_path(cfg: Config, job_id: int, slurm: bool = False) -> str:
    """A job's output file; a Slurm job's is ``slurm-ID.log`` (its ids are Slurm's, not this queue's)."""
    return str(Path(cfg.log_dir) / f"{'slurm-' if slurm else ''}{job_id}.log")


def _default_name(command: list[str]) -> str:
    base = _NAME_CHARS.sub("_", command[0].rsplit("/", 1)[-1])[:64].lstrip("_.+-")
    return base or "job"


def summary(job: Job) -> dict[str, Any]:
    """The fields `labq ls` needs (kept small so listing 10,000 jobs stays fast)."""
    s = job.spec
    return {
        "id": job.id, "user": s.user, "state": job.state.value, "gpus": s.gpus, "name": s.name,
        "reason": job.reason, "submit_time": job.submit_time, "start_time": job.start_time,
        "end_time": job.end_time, "time_limit": s.time_limit, "priority": s.priority,
        "assigned_gpus": job.assigned_gpus, "exit_code": job.exit_code, "array_id": s.array_id,
        "array_index": s.array_index,
    }


def index_ranges(values: list[int]) -> str:
    """``[5, 6, 7, 9]`` -> ``5-7,9`` (sorted input), as squeue prints array task ranges."""
    parts: list[str] = []
    start = prev = values[0]
    for v in values[1:]:
        if v != prev + 1:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
            start = v
        prev = v
    parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(parts)


def listing(jobs: list[Job], user: str | None, array_tasks: bool) -> list[dict[str, Any]]:
    """What `labq ls` shows, in id order: every job, except that the waiting (pending or held) tasks of
    an array are one record per array and state, like squeue (``17_[5-9999]``), unless ``array_tasks``.

    A collapsed record is its first task's summary with ``array_tasks`` (the indices, e.g. ``5-9999``),
    ``task_ids`` (the job ids, e.g. ``21-10015``) and ``task_count``; its reason is the first task's.
    """
    out: list[dict[str, Any]] = []
    groups: dict[tuple[int, JobState], tuple[dict[str, Any], list[int], list[int]]] = {}
    pending, held = JobState.PENDING, JobState.HELD
    # An array's tasks are next to each other in id order: the current group is kept at hand.
    cur_array: int | None = None
    cur_state: JobState | None = None
    indices: list[int] = []
    ids: list[int] = []
    for job in jobs:
        s = job.spec
        if user is not None and s.user != user:
            continue
        state = job.state
        array_id = s.array_id
        if array_id is not None and array_id == cur_array and state is cur_state:
            indices.append(s.array_index)  # type: ignore[arg-type]  # array tasks have an index
            ids.append(job.id)
            continue
        if array_tasks or array_id is None or not (state is pending or state is held):
            out.append(summary(job))
            continue
        group = groups.get((array_id, state))
        if group is None:
            record = summary(job)
            group = groups[(array_id, state)] = (record, [], [])
            out.append(record)
        cur_array, cur_state, indices, ids = array_id, state, group[1], group[2]
        indices.append(s.array_index)  # type: ignore[arg-type]
        ids.append(job.id)
    for record, group_indices, group_ids in groups.values():
        record["array_tasks"] = index_ranges(sorted(group_indices))
        record["task_ids"] = index_ranges(group_ids)
        record["task_count"] = len(group_ids)
    return out


class Service:
    def __init__(self, cfg: Config, store: Store, backend: Backend,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.store = store
        self.backend = backend
        self.clock = clock
        self._slurm: SlurmRunner | None = None
        if cfg.scheduler == "slurm":  # sweeps containers whose Slurm job ended while labqd was down
            timer = threading.Timer(10.0, self._start_slurm)
            timer.daemon = True
            timer.start()

    def handle(self, caller: Caller, req: Request) -> Any:
        handler = getattr(self, f"op_{req.op}")
        return handler(caller, req.args)

    # ------------------------------------------------------------ helpers
    def _job(self, job_id: int) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"id: no job {job_id}")
        return job

    def _owned(self, caller: Caller, ids: list[int], verb: str) -> list[Job]:
        jobs = [self._job(i) for i in dict.fromkeys(ids)]
        for job in jobs:
            if not caller.is_admin and job.spec.uid != caller.uid:
                raise ProtocolError(ErrorCode.PERMISSION, f"id: job {job.id} belongs to {job.user}; "
                                    f"only its owner or an admin may {verb} it")
        return jobs

    # ------------------------------------------------------------ ops
    def op_ping(self, caller: Caller, _: Ping) -> dict[str, Any]:
        return {"user": caller.user, "admin": caller.is_admin, "version": 1}

    def op_submit(self, caller: Caller, r: Submit) -> dict[str, Any]:
        cfg = self.cfg
        command, cwd, gpus, cpus, mem, mounts, array = (r.command, r.cwd, r.gpus, r.cpus, r.mem, r.mounts,
                                                        r.array)
        size = sum(len(a.encode()) + 1 for a in command)
        if size > cfg.max_command_bytes:
            raise invalid(f"command: {size} bytes, over the limit of {cfg.max_command_bytes}")
        node_gpus = len(self.backend.gpu_ids())
        if gpus > node_gpus:
            raise invalid(f"gpus: asked for {gpus} but this node has {node_gpus}")
        if cfg.max_gpus_per_user and gpus > cfg.max_gpus_per_user:
            raise invalid(f"gpus: {gpus} is over the per-user limit of {cfg.max_gpus_per_user}")
        if cpus is not None and cpus > cfg.effective_cpus():
            raise invalid(f"cpus: asked for {cpus:g} but this node has {cfg.effective_cpus():g}")
        if mem is not None and mem > cfg.effective_mem():
            raise invalid(f"mem: asked for {mem} bytes but this node has {cfg.effective_mem()}")
        for m in mounts:
            if m not in cfg.mounts:
                allowed = ", ".join(sorted(cfg.mounts)) or "none"
                raise invalid(f"mounts: '{m}' is not on the allow-list (allowed: {allowed})")
        if r.host_network and not cfg.allow_host_network:
            raise invalid("host_network: not allowed by lab policy on this node")
        if r.priority > 0 and not caller.is_admin:
            raise ProtocolError(ErrorCode.PERMISSION, "priority: only admins may set a priority above 0")
        if not cwd.startswith("/"):
            raise invalid("cwd: must be an absolute path")
        home = os.path.normpath(caller.home)
        if home == "/" or not home.startswith("/"):
            # A home of "/" would mount the whole host into the container.
            raise ProtocolError(ErrorCode.PERMISSION, f"home: the home directory of {caller.user} "
                                f"('{caller.home}') cannot be mounted")
        img = r.image or cfg.default_image
        if cfg.allowed_images and not any(fnmatch.fnmatchcase(img, p) for p in cfg.allowed_images):
            raise invalid(f"image: '{img}' is not allowed on this node")
        if not self.backend.image_exists(img):
            raise invalid(f"image: unknown image '{img}' (not present on this node)")
        if r.after is not None and self.store.get(r.after) is None:
            raise invalid(f"after: no job {r.after}")
        base = JobSpec(
            user=caller.user, uid=caller.uid, gid=caller.gid, groups=list(caller.groups), home=caller.home,
            cwd=working_dir(caller.home, cwd), image=img, command=command, gpus=gpus,
            name=r.name or _default_name(command), time_limit=r.time_limit, cpus=cpus, mem=mem,
            env=dict(r.env), mounts=list(mounts), after=r.after, priority=r.priority,
            host_network=r.host_network, held=r.hold, notify=r.notify,
        )
        specs = [base]
        if array is not None:
            arr = parse_array(array)
            # The tasks share the base's lists and dicts (specs never change after submission):
            # 10,000 tasks cost 10,000 small records, not 10,000 copies of the command and environment.
            specs = [dataclasses.replace(base, array_index=index, array_cap=arr.cap) for index in arr.indices]
        with self.store.tx():  # counted and added in one transaction: concurrent submits cannot pass it
            limit = cfg.max_pending_per_user
            if limit:
                waiting = self.store.count_waiting(caller.user)
                if waiting + len(specs) > limit:
                    what = "array" if array is not None else "submit"
                    raise ProtocolError(ErrorCode.LIMIT, f"{what}: {caller.user} has {waiting} pending or "
                                        f"held jobs; {len(specs)} more would pass the per-user limit of "
                                        f"{limit} (max_pending_per_user)")
            ids = self.store.add_jobs(specs, self.clock())
        self.backend.wake()
        return {"ids": ids, "array_id": ids[0] if array is not None else None}

    def op_ls(self, caller: Caller, r: Ls) -> dict[str, Any]:
        return {"now": self.clock(), "jobs": listing(self.store.unfinished_jobs(), r.user, r.array_tasks)}

    def op_history(self, caller: Caller, r: History) -> dict[str, Any]:
        """The caller's own finished jobs (admins: everyone's); ``--user`` names whose."""
        user = r.user if r.user is not None or caller.is_admin else caller.user
        return {"now": self.clock(), "jobs": [summary(j) for j in self.store.history(user, r.limit)]}

    def op_show(self, caller: Caller, r: Show) -> dict[str, Any]:
        job = self._job(r.id)
        out = job.to_dict()
        out["log"] = log_path(self.cfg, job.id)
        out["now"] = self.clock()
        if not caller.is_admin and caller.uid != job.spec.uid:
            out["env"] = {}  # other users' environments may hold secrets
        return out

    def op_logs(self, caller: Caller, r: Logs) -> dict[str, Any]:
        offset, max_bytes = r.offset, r.max_bytes
        job = self._owned(caller, [r.id], "read the output of")[0]
        if job.state.final:
            self.backend.wait_log(job.id, 10.0)
        return self._read_log(job.id, offset, max_bytes, job.state.value)

    def _read_log(self, job_id: int, offset: int, max_bytes: int, state: str,
                  slurm: bool = False) -> dict[str, Any]:
        path = log_path(self.cfg, job_id, slurm)
        data = b""
        size = 0
        try:
            with Path(path).open("rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                fh.seek(min(offset, size))
                data = fh.read(max_bytes)
        except FileNotFoundError:
            pass
        new_offset = min(offset, size) + len(data)
        return {"data": base64.b64encode(data).decode(), "offset": new_offset,
                "eof": new_offset >= size, "state": state}

    def op_cancel(self, caller: Caller, r: Ids) -> dict[str, Any]:
        jobs = self._owned(caller, r.ids, "cancel")
        results = []
        now = self.clock()
        for job in jobs:
            by = f"cancelled by {caller.user}"
            if self.store.transition(job.id, [JobState.PENDING, JobState.HELD], state=JobState.CANCELLED,
                                     reason=by, end_time=now):
                results.append({"id": job.id, "result": "cancelled"})
            elif self.store.transition(job.id, [JobState.STARTING, JobState.RUNNING],
                                       stop_reason=StopReason.CANCEL, reason=by):
                self.backend.request_stop(job.id)
                results.append({"id": job.id, "result": "stopping"})
            else:
                results.append({"id": job.id, "result": "already finished"})
        self.backend.wake()
        return {"jobs": results}

    def _toggle(self, caller: Caller, ids: list[int], verb: str, src: JobState,
                dst: JobState) -> dict[str, Any]:
        jobs = self._owned(caller, ids, verb)
        for job in jobs:
            if job.state not in (src, dst):
                raise ProtocolError(ErrorCode.CONFLICT, f"id: job {job.id} is {job.state.value}; "
                                    f"only {src.value} jobs can be {dst.value}")
        done = []
        for job in jobs:
            if self.store.transition(job.id, [src], state=dst, reason=""):
                done.append(job.id)
        self.backend.wake()
        return {"ids": done}

    def op_hold(self, caller: Caller, r: Ids) -> dict[str, Any]:
        return self._toggle(caller, r.ids, "hold", JobState.PENDING, JobState.HELD)

    def op_release(self, caller: Caller, r: Ids) -> dict[str, Any]:
        return self._toggle(caller, r.ids, "release", JobState.HELD, JobState.PENDING)

    def op_gpus(self, caller: Caller, _: Gpus) -> dict[str, Any]:
        return {"gpus": self.backend.gpu_report()}

    # ------------------------------------------------------------ scheduler = "slurm"
    def slurm(self) -> SlurmRunner:
        if self.cfg.scheduler != "slurm":
            raise invalid("op: this node's scheduler is labq, not slurm")
        if self._slurm is None:
            from .slurm_client import local_node
            from .slurm_runner import SlurmRunner

            self._slurm = SlurmRunner(self.cfg, local_node(self.cfg),
                                      metrics=getattr(self.backend, "metrics", None))
            self._slurm.start_sweeper()
        return self._slurm

    def _start_slurm(self) -> None:
        try:
            self.slurm()
        except Exception:
            import logging

            logging.getLogger("labqd").exception("starting labq's Slurm side failed")

    def slurm_run(self, caller: Caller, r: SlurmRun, conn: Any) -> dict[str, Any]:
        """Long-running: answers when the container has ended (api.py hands over the connection)."""
        return self.slurm().run(caller, r.job, r.spec, conn)

    def op_slurm_run(self, caller: Caller, r: SlurmRun) -> dict[str, Any]:
        raise invalid("op: slurm_run needs its connection (sent by a Slurm batch step)")

    def op_slurm_logs(self, caller: Caller, r: Logs) -> dict[str, Any]:
        """`labq logs` of a Slurm job that ran (or runs) on this node: its owner or an admin."""
        from .slurm import SlurmError, labq_state, parse_record, run

        try:
            line = run(["scontrol", "show", "job", "-o", str(r.id)]).strip()
            rec = parse_record(line)
            owner, state = rec.get("UserId", "").split("(")[0], labq_state(rec.get("JobState", ""))
        except SlurmError:
            out = run(["sacct", "-X", "-n", "-P", "-a", "-o", "User,State", "-j", str(r.id)]).split()
            if not out:
                raise ProtocolError(ErrorCode.NOT_FOUND, f"id: no Slurm job {r.id}") from None
            owner, sstate = out[0].split("|")
            state = labq_state(sstate)
        if not caller.is_admin and owner != caller.user:
            raise ProtocolError(ErrorCode.PERMISSION, f"id: job {r.id} belongs to {owner}; only its owner "
                                "or an admin may read the output of it")
        return self._read_log(r.id, r.offset, r.max_bytes, state, slurm=True)
