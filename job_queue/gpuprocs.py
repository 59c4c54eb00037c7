"""The GPU-process reader shared by labqd (processes outside its containers block a GPU) and the
GPU-user exporter (monitoring/exporters/labkit_exporters/gpu_users.py), so both agree on:

* which processes a GPU has: NVML's compute and graphics processes, one entry per pid;
* their memory: NVML's "not available" value (2**64 - 1, or None from newer pynvml) is None,
  never a figure;
* a process's container: the 64-hex Docker id in ``/proc/<pid>/cgroup`` (systemd or cgroupfs
  driver), never a substring match;
* a process's owner: the real uid from ``/proc/<pid>/status`` (a ``/proc/<pid>`` directory of a
  non-dumpable process belongs to root, so its owner is not the process's user).
"""

from __future__ import annotations

import pwd
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONTAINER_ID_PATTERNS = (
    re.compile(r"docker-([0-9a-f]{64})\.scope"),  # systemd cgroup driver: .../docker-<id>.scope
    re.compile(r"/docker/([0-9a-f]{64})(?:/|$)"),  # cgroupfs driver: /docker/<id>
)
_PROCESS_GETTERS = (
    "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetGraphicsRunningProcesses",
)


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_bytes: int | None
    """GPU memory it holds; None where NVML does not know."""


def used_bytes(value: object) -> int | None:
    """NVML's usedGpuMemory as bytes, or None for "not available" (2**64 - 1) and nonsense."""
    if value is None or isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    if value >= 2**63:
        return None
    return value


def gpu_processes(nvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
    """Compute and graphics processes of one GPU, one per pid (NVML errors propagate)."""
    seen: dict[int, GpuProcess] = {}
    for getter in _PROCESS_GETTERS:
        fn = getattr(nvml, getter, None)
        if fn is None:
            continue
        for p in fn(handle):
            pid = int(p.pid)
            if pid not in seen:
                seen[pid] = GpuProcess(pid=pid, used_bytes=used_bytes(getattr(p, "usedGpuMemory", None)))
    return tuple(seen.values())


class ProcFs:
    """What the readers need from a proc filesystem rooted at ``root``."""

    def __init__(self, root: Path | str = "/proc") -> None:
        self.root = Path(root)

    def container_id(self, pid: int) -> str | None:
        """Docker container id of ``pid`` or None.  Raises OSError if unreadable."""
        text = (self.root / str(pid) / "cgroup").read_text(encoding="utf-8", errors="replace")
        for line in text.splitlines():
            path = line.split(":", 2)[-1]
            for pattern in CONTAINER_ID_PATTERNS:
                match = pattern.search(path)
                if match:
                    return match.group(1)
        return None

    def uid(self, pid: int) -> int:
        """Real uid of ``pid``.  Raises OSError if unreadable, ValueError if malformed."""
        text = (self.root / str(pid) / "status").read_text(encoding="utf-8", errors="replace")
        for line in text.splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
        raise ValueError(f"no Uid line in status of pid {pid}")


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
