"""GPU inventory: NVML (nvidia-ml-py) on real nodes, fake ids from the config elsewhere.

Processes on a GPU that do not belong to a labq container are "foreign": that GPU is not given
to jobs and the process (user, pid, memory) is reported by ``labq gpus`` and in pending reasons.
"""

from __future__ import annotations

import pwd
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class ForeignProcess:
    pid: int
    user: str
    memory_bytes: int | None

    def describe(self) -> str:
        mem = f", {self.memory_bytes // (1024 * 1024)} MiB" if self.memory_bytes is not None else ""
        return f"pid {self.pid} of {self.user}{mem}"


@dataclass(frozen=True)
class GpuInfo:
    id: str
    index: int
    name: str = "fake"
    memory_total: int | None = None
    foreign: tuple[ForeignProcess, ...] = field(default=())


class Inventory(Protocol):
    fake: bool

    def snapshot(self, own_containers: Collection[str]) -> list[GpuInfo]:
        """All GPUs, each with the processes on it that are not in one of ``own_containers``."""
        ...


class FakeInventory:
    """GPUs declared in the config; no device requests, no foreign processes."""

    fake = True

    def __init__(self, ids: Collection[str]) -> None:
        self._ids = list(ids)

    def snapshot(self, own_containers: Collection[str]) -> list[GpuInfo]:
        return [GpuInfo(id=g, index=i) for i, g in enumerate(self._ids)]


def _user_of(pid: int, proc_root: Path) -> str:
    try:
        uid = (proc_root / str(pid)).stat().st_uid
    except OSError:
        return "?"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _in_containers(pid: int, own_containers: Collection[str], proc_root: Path) -> bool:
    if not own_containers:
        return False
    try:
        cgroup = (proc_root / str(pid) / "cgroup").read_text()
    except OSError:
        return False
    return any(cid in cgroup for cid in own_containers)


class NvmlInventory:
    """Reads GPUs and their compute/graphics processes through NVML."""

    fake = False

    def __init__(self, nvml: Any = None, proc_root: str = "/proc") -> None:
        if nvml is None:
            import pynvml

            nvml = pynvml
        self._nvml = nvml
        self._proc = Path(proc_root)
        self._nvml.nvmlInit()

    def snapshot(self, own_containers: Collection[str]) -> list[GpuInfo]:
        nv = self._nvml
        out: list[GpuInfo] = []
        for index in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            uuid = nv.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            name = nv.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            total = int(nv.nvmlDeviceGetMemoryInfo(handle).total)
            procs: dict[int, ForeignProcess] = {}
            for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
                fn = getattr(nv, getter, None)
                if fn is None:
                    continue
                for p in fn(handle):
                    pid = int(p.pid)
                    if pid in procs or _in_containers(pid, own_containers, self._proc):
                        continue
                    mem = getattr(p, "usedGpuMemory", None)
                    procs[pid] = ForeignProcess(pid=pid, user=_user_of(pid, self._proc),
                                                memory_bytes=int(mem) if mem is not None else None)
            out.append(GpuInfo(id=uuid, index=index, name=name, memory_total=total,
                               foreign=tuple(procs.values())))
        return out


def make_inventory(fake_ids: Collection[str] | None) -> Inventory:
    if fake_ids is not None:
        return FakeInventory(fake_ids)
    return NvmlInventory()
