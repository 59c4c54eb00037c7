"""Fakes at the exporter's boundaries: pynvml (the calls NvmlGpuSource uses), Docker, /proc."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mon_helpers  # noqa: F401  (puts the exporter source on sys.path)
import pynvml
from labkit_exporters.gpu_users import ContainerInfo, build_registry
from prometheus_client import generate_latest

DATA = Path(__file__).resolve().parent / "data"


@dataclass
class _Proc:
    pid: int
    usedGpuMemory: int | None


class FakeNvml:
    NVMLError = pynvml.NVMLError

    def __init__(self, recording: str = "nvml_two_gpus.json") -> None:
        self.gpus: list[dict[str, Any]] = json.loads((DATA / recording).read_text())["gpus"]
        self.init_error: int | None = None  # e.g. pynvml.NVML_ERROR_LIBRARY_NOT_FOUND
        self.lost: set[int] = set()  # GPU indexes that "fell off the bus"
        self.init_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index >= len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return str(self.gpus[handle]["uuid"])

    def nvmlDeviceGetName(self, handle: int) -> str:
        return str(self.gpus[handle]["name"])

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[_Proc]:
        if handle in self.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return [_Proc(p["pid"], p["usedGpuMemory"]) for p in self.gpus[handle]["processes"]]


class StaticContainers:
    """ContainerLookup answering from a dict (container id -> name and labels)."""

    def __init__(self, known: dict[str, ContainerInfo]) -> None:
        self.known = known

    def lookup(self, container_id: str) -> ContainerInfo | None:
        return self.known.get(container_id)

    def retain(self, container_ids: Iterable[str]) -> None:
        return None


def write_proc(root: Path, pid: int, cgroup: str, uid: int) -> None:
    """A /proc/<pid> with the two files the exporter reads."""
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "cgroup").write_text(cgroup)
    (d / "status").write_text(
        f"Name:\tpython\nState:\tS (sleeping)\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t0\n"
    )


def gpu_users_sample(tmp: Path) -> str:
    """What labkit-gpu-user-exporter would serve on a GPU host: its own collector, fake NVML.

    Every process of nvml_two_gpus.json runs in one labq container (user alice, job 42).
    """
    cid = "c0" * 32
    nvml = FakeNvml()
    for gpu in nvml.gpus:
        for p in gpu["processes"]:
            write_proc(tmp / "proc", p["pid"], f"0::/system.slice/docker-{cid}.scope\n", 0)
    containers = StaticContainers({cid: ContainerInfo("labq-42", {"labq.user": "alice", "labq.job": "42"})})
    registry, _ = build_registry(nvml, tmp / "proc", containers)
    return generate_latest(registry).decode()
