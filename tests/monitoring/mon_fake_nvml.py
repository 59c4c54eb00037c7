"""A stand-in for the pynvml module: the six calls NvmlGpuSource uses, answering from canned data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml

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

    def nvmlDeviceGetComputeProcesses(self, handle: int) -> list[_Proc]:
        if handle in self.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return [_Proc(p["pid"], p["usedGpuMemory"]) for p in self.gpus[handle]["processes"]]
