"""labq's commands when the lab's scheduler is Slurm (``scheduler = "slurm"`` in config.toml).

``SlurmClient.call(op, **fields)`` answers the same operations as labqd's socket (submit, ls, show,
history, cancel, hold, release, gpus, logs) with the same result shapes, so cli.py prints both modes with
one code path; records carry a ``node`` key (the NODE column). It reads and changes jobs with Slurm's own
commands as the calling user, so Slurm decides who may cancel, hold or release what.

``submit`` becomes an ``sbatch`` whose batch step is job_queue/slurm_step.py: it asks the node's labqd to
run the container inside this Slurm job (job_queue/slurm_runner.py). The container's spec travels in the
batch script (base64 JSON); a short copy (image, command, mounts) is the job's comment, for ls/show.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shlex
import socket
import sys
from collections.abc import Callable
from typing import Any

from .client import RequestFailed
from .config import Config
from .protocol import ErrorCode, Submit, validate_request, wire
from .slurm import (
    SlurmFailed,
    SlurmUnreachable,
    expand_hostlist,
    gpu_count,
    gres_indices,
    labq_state,
    parse_limit,
    parse_mem,
    parse_record,
    parse_time,
    run,
)

COMMENT_PREFIX = "labq1:"
_COMMENT_COMMAND_BYTES = 1024
_NOTIFY_MAIL = {"started": "BEGIN", "finished": "END", "failed": "FAIL"}
# squeue -o: one job per line; the name comes last (it may contain the separator).
_SQUEUE_FIELDS = ("%A", "%F", "%K", "%u", "%T", "%r", "%b", "%C", "%m", "%l", "%V", "%S", "%e", "%Q",
                  "%N", "%y", "%k", "%j")
_SACCT_FIELDS = ("JobIDRaw", "JobID", "User", "State", "ExitCode", "Submit", "Start", "End", "Timelimit",
                 "AllocTRES", "ReqTRES", "NodeList", "AdminComment", "Comment", "JobName")
OOM_MARK = "labq:oom_killed"  # slurm_runner.OOM_MARK (not imported: the CLI stays light)
_FINAL_WAIT = ("succeeded", "failed", "cancelled", "timeout")


def step_program() -> list[str]:
    """The batch step's command: this Python, so the step runs the labq installed on every node."""
    return [sys.executable, "-m", "job_queue.slurm_step"]


def encode_spec(fields: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(fields, separators=(",", ":")).encode()).decode()


def decode_spec(text: str) -> dict[str, Any]:
    data = json.loads(base64.urlsafe_b64decode(text.encode()))
    if not isinstance(data, dict):
        raise ValueError("spec: not a JSON object")
    return data


def batch_script(spec: dict[str, Any]) -> str:
    argv = [*step_program(), encode_spec(spec)]
    return ("#!/bin/sh\n"
            "# labq (scheduler = slurm): labqd on the node runs the container inside this job.\n"
            f"exec {shlex.join(argv)}\n")


def comment_for(spec: Submit, image: str) -> str:
    command = shlex.join(spec.command)
    if len(command.encode()) > _COMMENT_COMMAND_BYTES:
        command = command.encode()[:_COMMENT_COMMAND_BYTES].decode(errors="ignore") + " ..."
    short = {"image": image, "command": command, "mounts": spec.mounts}
    return COMMENT_PREFIX + encode_spec(short)


def parse_comment(text: str) -> dict[str, Any]:
    if not text.startswith(COMMENT_PREFIX):
        return {}
    try:
        return decode_spec(text[len(COMMENT_PREFIX):])
    except (ValueError, UnicodeDecodeError):
        return {}


def slurm_time(seconds: int) -> str:
    """Seconds -> sbatch's ``D-HH:MM`` (Slurm counts whole minutes: rounded up)."""
    minutes = max(1, math.ceil(seconds / 60))
    days, rest = divmod(minutes, 24 * 60)
    return f"{days}-{rest // 60:02d}:{rest % 60:02d}:00"


def sbatch_argv(spec: Submit, cfg: Config, user: str) -> list[str]:
    """sbatch's options for a labq submit (the batch script goes to its stdin)."""
    comment = comment_for(spec, spec.image or cfg.default_image)
    argv = ["sbatch", "--parsable", f"--job-name={spec.name or _default_name(spec.command)}",
            f"--chdir={spec.cwd}", "--export=NONE", f"--comment={comment}"]
    if spec.gpus:
        argv.append(f"--gres=gpu:{spec.gpus}")
    if spec.cpus is not None:
        argv.append(f"--cpus-per-task={max(1, math.ceil(spec.cpus))}")
    if spec.mem is not None:
        argv.append(f"--mem={max(1, math.ceil(spec.mem / 2**20))}M")
    if spec.time_limit is not None:
        argv.append(f"--time={slurm_time(spec.time_limit)}")
    if spec.array is not None:
        argv.append(f"--array={spec.array}")
    if spec.after is not None:
        argv.append(f"--dependency=afterok:{spec.after}")
    if spec.hold:
        argv.append("--hold")
    if spec.priority:
        argv.append(f"--nice={-spec.priority}")
    events = spec.notify if spec.notify is not None else list(cfg.notify.default_events)
    mail = [_NOTIFY_MAIL[e] for e in events if e in _NOTIFY_MAIL]
    if mail and cfg.notify.enabled:
        argv += [f"--mail-type={','.join(mail)}", f"--mail-user={user}"]
    return argv


def _default_name(command: list[str]) -> str:
    from .service import _default_name as name

    return name(command)


def local_node(cfg: Config) -> str:
    return cfg.slurm_node_name or socket.gethostname().split(".")[0]


class SlurmClient:
    """Same calls as client.Client, answered by Slurm's commands."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        import pwd

        self.user = pwd.getpwuid(os.getuid()).pw_name

    def close(self) -> None:
        pass

    def call(self, op: str, **fields: Any) -> Any:
        try:
            return getattr(self, f"op_{op}")(**fields)
        except SlurmFailed as exc:
            raise _refusal(str(exc)) from exc

    # ---------------------------------------------------------------- submit
    def op_submit(self, **fields: Any) -> dict[str, Any]:
        req = validate_request({"v": 1, "op": "submit", **fields}).args
        assert isinstance(req, Submit)
        self._policy(req)
        spec = wire("submit", req)
        del spec["v"], spec["op"]
        out = run(sbatch_argv(req, self.cfg, self.user), stdin=batch_script(spec)).strip()
        job_id = int(out.split(";")[0])
        if req.array is None:
            return {"ids": [job_id], "array_id": None}
        from .protocol import parse_array

        count = len(parse_array(req.array).indices)
        return {"ids": [job_id], "array_id": job_id, "task_count": count}

    def _policy(self, r: Submit) -> None:
        """The lab policy checks labqd makes at submit that do not depend on one node (the node's labqd
        checks them again, with the image, when the job starts)."""
        import fnmatch

        cfg = self.cfg
        size = sum(len(a.encode()) + 1 for a in r.command)
        if size > cfg.max_command_bytes:
            raise RequestFailed(ErrorCode.INVALID, f"command: {size} bytes, over the limit of "
                                f"{cfg.max_command_bytes}")
        for m in r.mounts:
            if m not in cfg.mounts:
                allowed = ", ".join(sorted(cfg.mounts)) or "none"
                raise RequestFailed(ErrorCode.INVALID, f"mounts: '{m}' is not on the allow-list "
                                    f"(allowed: {allowed})")
        if r.host_network and not cfg.allow_host_network:
            raise RequestFailed(ErrorCode.INVALID, "host_network: not allowed by lab policy")
        img = r.image or cfg.default_image
        if cfg.allowed_images and not any(fnmatch.fnmatchcase(img, p) for p in cfg.allowed_images):
            raise RequestFailed(ErrorCode.INVALID, f"image: '{img}' is not allowed in this lab")
        if r.priority > 0 and os.getuid() != 0:
            raise RequestFailed(ErrorCode.PERMISSION, "priority: only admins may set a priority above 0")

    # ---------------------------------------------------------------- reading
    def _squeue(self, user: str | None, array_tasks: bool) -> list[dict[str, Any]]:
        argv = ["squeue", "-h", "-o", "|".join(_SQUEUE_FIELDS)]
        if user:
            argv += ["-u", user]
        if array_tasks:
            argv.append("-r")
        return _rows(argv, len(_SQUEUE_FIELDS), _from_squeue)

    def op_ls(self, user: str | None = None, array_tasks: bool = False) -> dict[str, Any]:
        import time

        return {"jobs": sorted(self._squeue(user, array_tasks), key=lambda j: j["id"]), "now": time.time()}

    def _sacct(self, argv_tail: list[str]) -> list[dict[str, Any]]:
        argv = ["sacct", "-X", "-n", "-P", "-o", ",".join(_SACCT_FIELDS), *argv_tail]
        return _rows(argv, len(_SACCT_FIELDS), _from_sacct)

    def op_history(self, user: str | None = None, limit: int = 50) -> dict[str, Any]:
        import time

        tail = ["-S", "now-30days"]  # sacct's -s filters by state *during* the window: filtered here
        tail += ["-u", user] if user else []
        jobs = [j for j in self._sacct(tail) if j["state"] in _FINAL_WAIT]
        jobs.sort(key=lambda j: (j["end_time"] or 0, j["id"]))
        return {"jobs": jobs[-limit:], "now": time.time()}

    def op_show(self, id: int) -> dict[str, Any]:
        import time

        try:
            line = run(["scontrol", "show", "job", "-d", "-o", str(id)]).strip().splitlines()
        except SlurmFailed:
            line = []
        if line:
            job = _from_scontrol(line[0])
        else:
            found = self._sacct(["-j", str(id)])
            if not found:
                raise RequestFailed(ErrorCode.NOT_FOUND, f"id: no job {id}")
            job = found[0]
            job.update(_full_defaults(job))
        job["now"] = time.time()
        job["log"] = f"{job.get('node') or '?'}:{self.cfg.log_dir}/slurm-{job['id']}.log"
        return job

    def op_gpus(self) -> dict[str, Any]:
        nodes = run(["scontrol", "show", "node", "-o"]).splitlines()
        jobs = run(["scontrol", "show", "job", "-d", "-o"]).splitlines()
        held: dict[tuple[str, int], tuple[int, str]] = {}
        for line in jobs:
            rec = parse_record(line)
            if rec.get("JobState") != "RUNNING":
                continue
            user = rec.get("UserId", "?").split("(")[0]
            for node in expand_hostlist(rec.get("NodeList", "")):
                for idx in gres_indices(line, node):
                    held[(node, idx)] = (int(rec["JobId"]), user)
        out = []
        for line in nodes:
            rec = parse_record(line)
            name = rec.get("NodeName", "?")
            for idx in range(gpu_count(rec.get("Gres", ""))):
                holder = held.get((name, idx))
                state = rec.get("State", "")
                entry: dict[str, Any] = {"node": name, "index": idx, "id": f"{name}:{idx}", "foreign": [],
                                         "state": "job" if holder else "free", "job": None, "user": None,
                                         "node_state": state}
                if holder:
                    entry["job"], entry["user"] = holder
                elif any(s in state for s in ("DOWN", "DRAIN", "FAIL")):
                    entry["state"] = "unavailable"
                out.append(entry)
        return {"gpus": out}

    # ---------------------------------------------------------------- changing
    def op_cancel(self, ids: list[int]) -> dict[str, Any]:
        results = []
        for job_id in dict.fromkeys(ids):
            self._owned(job_id, "cancel")
            run(["scancel", str(job_id)])
            results.append({"id": job_id, "result": "cancelled"})
        return {"jobs": results}

    def op_hold(self, ids: list[int]) -> dict[str, Any]:
        for job_id in dict.fromkeys(ids):
            self._owned(job_id, "hold")
            run(["scontrol", "hold", str(job_id)])
        return {"ids": list(dict.fromkeys(ids))}

    def op_release(self, ids: list[int]) -> dict[str, Any]:
        for job_id in dict.fromkeys(ids):
            self._owned(job_id, "release")
            run(["scontrol", "release", str(job_id)])
        return {"ids": list(dict.fromkeys(ids))}

    def _owned(self, job_id: int, verb: str) -> None:
        """labq's own message for another user's job (Slurm would refuse it too, less clearly)."""
        try:
            line = run(["scontrol", "show", "job", "-o", str(job_id)]).strip()
        except SlurmFailed as exc:
            raise RequestFailed(ErrorCode.NOT_FOUND, f"id: no job {job_id}") from exc
        owner = parse_record(line).get("UserId", "").split("(")[0]
        if owner != self.user and os.getuid() != 0 and not self._is_admin():
            raise RequestFailed(ErrorCode.PERMISSION, f"id: job {job_id} belongs to {owner}; only its "
                                f"owner or an admin may {verb} it")

    def _is_admin(self) -> bool:
        import grp

        try:
            gid = grp.getgrnam(self.cfg.admin_group).gr_gid
        except KeyError:
            return False
        return gid in os.getgroups()

    def op_logs(self, id: int, offset: int = 0, max_bytes: int = 1024 * 1024) -> dict[str, Any]:
        raise RequestFailed(ErrorCode.INVALID, "logs: handled by cli (the job's node's labqd)")


def _rows(argv: list[str], width: int,
          parse: Callable[[list[str]], dict[str, Any]]) -> list[dict[str, Any]]:
    """A Slurm listing, ``width`` fields split on ``|`` (the last may hold one): a record per line."""
    out = []
    for line in run(argv).splitlines():
        parts = line.split("|", width - 1)
        if len(parts) == width:
            out.append(parse(parts))
    return out


def _refusal(message: str) -> RequestFailed:
    low = message.lower()
    if "invalid job id" in low:
        return RequestFailed(ErrorCode.NOT_FOUND, f"id: {message}")
    if "permission denied" in low or "access denied" in low or "not authorized" in low:
        return RequestFailed(ErrorCode.PERMISSION, f"slurm: {message}")
    return RequestFailed(ErrorCode.INVALID, f"slurm: {message}")


def _base(job_id: int, array_id: str, array_index: str, user: str, state: str, reason: str,
          gpus: int, node: str, name: str, comment: str) -> dict[str, Any]:
    meta = parse_comment(comment)
    rec: dict[str, Any] = {
        "id": job_id, "user": user, "state": state, "reason": reason, "gpus": gpus, "name": name,
        "node": node or None, "image": meta.get("image"), "assigned_gpus": [], "exit_code": None,
        "array_id": None, "array_index": None,
    }
    if array_id and array_id not in ("N/A", "0") and array_index not in ("N/A", ""):
        rec["array_id"] = int(array_id)
        if array_index.isdigit():
            rec["array_index"] = int(array_index)
        else:  # squeue's collapsed pending tasks: 5-9 or [5-9%2]
            rec["array_tasks"] = array_index.strip("[]").split("%")[0]
    return rec


def _from_squeue(p: list[str]) -> dict[str, Any]:
    (job_id, array_id, array_index, user, sstate, reason, tres, cpus, mem, limit, submit, start, _end,
     priority, node, nice, comment, name) = p
    state = labq_state(sstate, reason)
    shown_reason = "" if reason == "None" or state == "running" else reason
    rec = _base(int(job_id), array_id, array_index, user, state, shown_reason, gpu_count(tres),
                node if state not in ("pending", "held") else "", name, comment)
    rec.update({
        "slurm_state": sstate, "submit_time": parse_time(submit),
        "start_time": parse_time(start) if state not in ("pending", "held") else None,
        "end_time": None, "time_limit": parse_limit(limit),
        "priority": -int(nice) if nice.lstrip("-").isdigit() else 0,
        "cpus": float(cpus) if cpus.isdigit() else None, "mem": parse_mem(mem),
        "slurm_priority": int(priority) if priority.isdigit() else None,
    })
    return rec


def _from_sacct(p: list[str]) -> dict[str, Any]:
    (raw_id, job_id, user, sstate, exit_code, submit, start, end, limit, alloc, req, node, admin_comment,
     comment, name) = p
    oom = sstate.startswith("OUT_OF_MEMORY") or OOM_MARK in admin_comment  # sacct: ExitCode 0:125
    array_id, _, array_index = job_id.partition("_")
    state = labq_state(sstate)
    code, _, signal = exit_code.partition(":")
    rec = _base(int(raw_id), array_id if array_index else "", array_index, user, state,
                "OOM killed" if oom else "", gpu_count(alloc or req),
                "" if node in ("None assigned", "") else node, name, comment)
    rec.update({
        "slurm_state": sstate.split()[0], "submit_time": parse_time(submit), "start_time": parse_time(start),
        "end_time": parse_time(end), "time_limit": parse_limit(limit),
        "exit_code": 137 if oom else _exit_code(code, signal), "oom_killed": oom, "priority": 0,
    })
    return rec


def _from_scontrol(line: str) -> dict[str, Any]:
    r = parse_record(line)
    user = r.get("UserId", "?").split("(")[0]
    sstate = r.get("JobState", "")
    state = labq_state(sstate, r.get("Reason", ""))
    node = r.get("NodeList", "") if state not in ("pending", "held") else ""
    rec = _base(int(r["JobId"]), r.get("ArrayJobId", ""), r.get("ArrayTaskId", ""), user, state,
                "" if r.get("Reason") == "None" else r.get("Reason", ""), gpu_count(r.get("TresPerNode", "")
                                                                              or r.get("TRES", "")),
                node, r.get("JobName", ""), r.get("Comment", ""))
    meta = parse_comment(r.get("Comment", ""))
    code, _, signal = r.get("ExitCode", "").partition(":")
    # Slurm reports an OOM kill as signal 125 (0:125); labq says 137, as Docker does
    oom = sstate.startswith("OUT_OF_MEMORY") or OOM_MARK in r.get("AdminComment", "")
    final = labq_state(sstate) in _FINAL_WAIT
    dep = r.get("Dependency", "")
    rec.update({
        "slurm_state": sstate, "submit_time": parse_time(r.get("SubmitTime", "")),
        "start_time": parse_time(r.get("StartTime", "")) if state not in ("pending", "held") else None,
        "end_time": parse_time(r.get("EndTime", "")) if labq_state(sstate) in _FINAL_WAIT else None,
        "time_limit": parse_limit(r.get("TimeLimit", "")), "cpus": float(r.get("NumCPUs", "0") or 0) or None,
        "mem": parse_mem(r.get("MinMemoryNode", "") or r.get("MinMemoryCPU", "")),
        "priority": -int(r.get("Nice", "0")) if r.get("Nice", "0").lstrip("-").isdigit() else 0,
        "after": int(dep.split(":")[1].split("(")[0]) if dep.startswith("afterok:") else None,
        "command": shlex.split(meta.get("command", "")) if meta.get("command") else [],
        "mounts": meta.get("mounts", []), "cwd": r.get("WorkDir", ""),
        "assigned_gpus": [f"{node}:{i}" for node in expand_hostlist(node) for i in gres_indices(line, node)],
        "exit_code": (137 if oom else _exit_code(code, signal)) if final else None,
        "oom_killed": oom,
    })
    return rec


def _exit_code(code: str, signal: str) -> int | None:
    """sacct's ``ExitCode`` ``2:0`` -> 2; killed by signal 9 (``0:9``) -> 137, as Docker reports it."""
    if not code.isdigit():
        return None
    return 128 + int(signal) if signal not in ("", "0") and signal.isdigit() else int(code)


def _full_defaults(job: dict[str, Any]) -> dict[str, Any]:
    return {"command": job.get("command") or [], "cwd": job.get("cwd", ""), "cpus": job.get("cpus"),
            "mem": job.get("mem"), "after": None, "mounts": job.get("mounts", []),
            "image": job.get("image") or "?"}


__all__ = ["RequestFailed", "SlurmClient", "SlurmUnreachable", "batch_script", "decode_spec", "sbatch_argv"]
