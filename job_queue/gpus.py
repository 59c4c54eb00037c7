"""GPU inventory: NVML (nvidia-ml-py) on real nodes, fake ids from the config elsewhere.

Processes on a GPU that do not belong to a labq container are "foreign": that GPU is not given
to jobs and the process (user, pid, memory) is reported by ``labq gpus`` and in pending reasons.
Processes, their containers, owners and memory are read by job_queue/gpuprocs.py, shared with the
GPU-user exporter.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from .gpuprocs import ProcFs, gpu_processes, user_name


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


class NvmlInventory:
    """Reads GPUs and their compute/graphics processes through NVML."""

    fake = False

    def __init__(self, nvml: Any = None, proc_root: str = "/proc") -> None:
        if nvml is None:
            import pynvml

            nvml = pynvml
        self._nvml = nvml
        self._proc = ProcFs(proc_root)
        self._nvml.nvmlInit()

    def snapshot(self, own_containers: Collection[str]) -> list[GpuInfo]:
        nv = self._nvml
        own = set(own_containers)
        out: list[GpuInfo] = []
        for index in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            uuid = nv.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            name = nv.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            total = int(nv.nvmlDeviceGetMemoryInfo(handle).total)
            foreign = tuple(ForeignProcess(pid=p.pid, user=self._owner(p.pid), memory_bytes=p.used_bytes)
                            for p in gpu_processes(nv, handle) if not self._ours(p.pid, own))
            out.append(GpuInfo(id=uuid, index=index, name=name, memory_total=total, foreign=foreign))
        return out

    def _ours(self, pid: int, own: set[str]) -> bool:
        if not own:
            return False
        try:
            return self._proc.container_id(pid) in own
        except OSError:
            return False  # exited meanwhile, or unreadable: counts as foreign until the next read

    def _owner(self, pid: int) -> str:
        try:
            return user_name(self._proc.uid(pid))
        except (OSError, ValueError):
            return "?"


def make_inventory(fake_ids: Collection[str] | None) -> Inventory:
    if fake_ids is not None:
        return FakeInventory(fake_ids)
    return NvmlInventory()
