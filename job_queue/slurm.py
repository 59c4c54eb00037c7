"""Slurm's own commands (squeue, sacct, scontrol, sbatch, scancel), run and parsed for labq.

With ``scheduler = "slurm"`` labq is a front door to the lab's Slurm: the CLI reads and changes jobs
through these commands (Slurm checks who may do what), and labqd asks ``scontrol`` about a job before it
runs that job's container (job_queue/slurm_runner.py). Nothing here talks to slurmctld any other way.

Every command runs with a timeout; "cannot reach slurmctld/slurmdbd" becomes SlurmUnreachable (labq's
exit code 6), any other refusal SlurmFailed with Slurm's own first line.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

TIMEOUT_S = 30.0
_UNREACHABLE = re.compile(
    r"Unable to contact slurm controller|Socket timed out|Connection refused|Zero Bytes were transmitted"
    r"|Communication connection failure|Unable to establish connection|slurmdbd.*(down|not running)"
    r"|Connection timed out", re.IGNORECASE)
_FIELD = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z:/_]*)=")


class SlurmError(Exception):
    """A Slurm command failed."""


class SlurmUnreachable(SlurmError):
    """slurmctld (or slurmdbd, for sacct) did not answer."""


class SlurmFailed(SlurmError):
    """Slurm answered and refused (no such job, permission denied, invalid option, ...)."""


def run(argv: Sequence[str], timeout: float = TIMEOUT_S, stdin: str | None = None) -> str:
    """Run a Slurm command; its stdout, or SlurmUnreachable / SlurmFailed with its first error line."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=stdin,
                              check=False)
    except FileNotFoundError as exc:
        raise SlurmUnreachable(f"slurm: '{argv[0]}' is not installed on this host") from exc
    except subprocess.TimeoutExpired as exc:
        raise SlurmUnreachable(f"slurm: '{argv[0]}' got no answer within {timeout:g} s "
                               "(is slurmctld running?)") from exc
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        first = lines[0] if lines else f"exit code {proc.returncode}"
        first = re.sub(r"^(s\w+|scontrol): (error: )?", "", first)
        if any(_UNREACHABLE.search(ln) for ln in lines):
            raise SlurmUnreachable(f"slurm: cannot reach the Slurm controller ({first})")
        raise SlurmFailed(first)
    return proc.stdout


def parse_record(line: str) -> dict[str, str]:
    """One ``scontrol show ... -o`` line: ``Key=Value Key2=Value with spaces`` -> dict.

    A value runs to the next `` Key=``; values with spaces (Reason, Command) stay whole.
    """
    out: dict[str, str] = {}
    matches = list(_FIELD.finditer(line))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(line)
        key = m.group(1)
        value = line[m.end():end].strip()
        if key not in out:  # -d repeats Nodes=/GRES= per node: keep the first, see gres_indices
            out[key] = value
    return out


def expand_indices(text: str) -> list[int]:
    """``0-1,3`` -> ``[0, 1, 3]``."""
    out: list[int] = []
    for part in text.split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def gres_indices(line: str, node: str) -> list[int]:
    """The GPU indices (Slurm's ``IDX``) a job holds on ``node``, from ``scontrol show job -d -o``.

    Its per-node part reads ``Nodes=gpu01 CPU_IDs=0 Mem=512 GRES=gpu:1(IDX:1)``; a node list such
    as ``gpu[01-02]`` is expanded by the caller's ``scontrol show hostnames`` beforehand.
    """
    for m in re.finditer(r"Nodes=(\S+) .*?GRES=(\S*)", line):
        nodes, gres = m.group(1), m.group(2)
        if node not in expand_hostlist(nodes):
            continue
        idx: list[int] = []
        for g in re.finditer(r"gpu(?::[^:(,]+)?:\d+\(IDX:([0-9,\-]+)\)", gres):
            idx.extend(expand_indices(g.group(1)))
        return sorted(idx)
    return []


def expand_hostlist(text: str) -> list[str]:
    """Slurm's host list ``gpu[01-02],infra01`` -> names (one bracket group per name, as labkit uses)."""
    out: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?([^,]*)", text):
        prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
        if not prefix and not ranges:
            continue
        if ranges is None:
            out.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            width = len(lo)
            for n in range(int(lo), int(hi or lo) + 1):
                out.append(f"{prefix}{n:0{width}d}{suffix}")
    return out


@dataclass(frozen=True)
class SlurmJob:
    """What labqd needs to know of a running job (``scontrol show job -d -o ID``)."""

    id: int
    user: str
    uid: int
    state: str
    nodes: tuple[str, ...]
    batch_host: str
    gpu_indices: tuple[int, ...]
    raw: dict[str, str]


def show_job(job_id: int, node: str) -> SlurmJob:
    line = run(["scontrol", "show", "job", "-d", "-o", str(job_id)]).strip().splitlines()
    if not line:
        raise SlurmFailed(f"Invalid job id specified ({job_id})")
    rec = parse_record(line[0])
    m = re.fullmatch(r"(.*)\((\d+)\)", rec.get("UserId", ""))
    if m is None:
        raise SlurmFailed(f"job {job_id}: no UserId in scontrol's answer")
    return SlurmJob(id=int(rec.get("JobId", job_id)), user=m.group(1), uid=int(m.group(2)),
                    state=rec.get("JobState", ""), nodes=tuple(expand_hostlist(rec.get("NodeList", ""))),
                    batch_host=rec.get("BatchHost", ""), gpu_indices=tuple(gres_indices(line[0], node)),
                    raw=rec)


def parse_time(text: str) -> float | None:
    """Slurm's local ``2026-12-04T21:05:03`` -> epoch seconds; Unknown/None/N/A -> None."""
    if not text or not text[0].isdigit():
        return None
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def parse_limit(text: str) -> int | None:
    """Slurm's time limit ``[D-]HH:MM:SS`` / ``MM:SS`` -> seconds; UNLIMITED/Partition_Limit -> None."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if m is None:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def parse_mem(text: str) -> int | None:
    """``512M`` / ``16G`` / ``2048`` (MiB) -> bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", text.strip())
    if m is None or float(m.group(1)) == 0:
        return None
    scale = {"K": 1 << 10, "": 1 << 20, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * scale)


def gpu_count(tres: str) -> int:
    """GPUs in a TRES/GRES string (``gres/gpu:2``, ``gres:gpu:2``, ``gres/gpu=2``, ``gpu:1``)."""
    m = re.search(r"gpu(?::[A-Za-z][\w-]*)?[:=](\d+)", tres)
    return int(m.group(1)) if m else 0


# Slurm's job states -> labq's (docs/job-queue.md, "Slurm states").
STATES = {
    "PENDING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "held", "REQUEUE_FED": "pending",
    "CONFIGURING": "starting", "RUNNING": "running", "COMPLETING": "running", "SUSPENDED": "running",
    "STAGE_OUT": "running", "SIGNALING": "running", "RESIZING": "running",
    "COMPLETED": "succeeded", "FAILED": "failed", "OUT_OF_MEMORY": "failed", "NODE_FAIL": "failed",
    "BOOT_FAIL": "failed", "DEADLINE": "timeout", "TIMEOUT": "timeout", "CANCELLED": "cancelled",
    "PREEMPTED": "cancelled", "REVOKED": "cancelled", "SPECIAL_EXIT": "failed",
}
HELD_REASONS = ("JobHeldUser", "JobHeldAdmin")


def labq_state(slurm_state: str, reason: str = "") -> str:
    base = slurm_state.split()[0].rstrip("+") if slurm_state else ""
    state = STATES.get(base, "failed" if base else "pending")
    if state == "pending" and reason in HELD_REASONS:
        return "held"
    return state
