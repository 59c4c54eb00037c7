"""Recorded NVML and nvidia-smi for running gpu_check.py without a GPU (CI, and tests of the check itself).

``RecordedNvml`` extends the monitoring tests' ``FakeNvml`` (tests/monitoring/mon_fake_nvml.py: the same
recording format, the same lost-GPU behaviour) with the calls labq's ``NvmlInventory`` and the checks make,
and answers only the calls the installed pynvml really has, so code that calls a function pynvml lacks
fails here as it would on a GPU node.  A recording also holds nvidia-smi's answers, keyed by argument list.

A live process can be put on a recorded GPU (``holder``): the recording's ``holder`` entry says on which GPU
and with how much memory; its pid is the real pid of a process the check started, so /proc lookups are real.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = HERE / "data"
for _p in (REPO / "tests" / "monitoring", REPO / "tests" / "job_queue"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import pynvml  # noqa: E402
from mon_fake_nvml import FakeNvml  # noqa: E402

HOLDER_PID_PLACEHOLDER = "{holder_pid}"


@dataclass(frozen=True)
class Holder:
    """A live process that NVML reports on a recorded GPU."""

    gpu: int
    pid: int
    used_bytes: int | None


class RecordedNvml(FakeNvml):
    """pynvml's calls answered from a recording (tests/gpu_check/data/*.json)."""

    def __init__(self, recording: Path, holder_pid: int | None = None) -> None:
        super().__init__(
            str(recording.resolve())
        )  # FakeNvml reads DATA / recording: an absolute path stays as it is
        self.recording: dict[str, Any] = json.loads(recording.read_text())
        self.holder: Holder | None = None
        if holder_pid is not None:
            h = self.recording["holder"]
            self.holder = Holder(gpu=int(h["gpu"]), pid=holder_pid, used_bytes=h["usedGpuMemory"])
            self.gpus[self.holder.gpu]["processes"].append(
                {"pid": holder_pid, "usedGpuMemory": self.holder.used_bytes}
            )

    def __getattribute__(self, name: str) -> Any:
        # Only what the real library offers: a call pynvml lacks fails here as on a GPU node.
        if name.startswith("nvml") and not hasattr(pynvml, name):
            raise AttributeError(f"module 'pynvml' has no attribute '{name}'")
        return super().__getattribute__(name)

    def nvmlSystemGetDriverVersion(self) -> str:
        return str(self.recording["driver_version"])

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(**self.gpus[handle]["memory"])

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(**self.gpus[handle]["utilization"])

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[Any]:
        return []


def smi_answer(recording: dict[str, Any], args: list[str], holder_pid: int | None) -> tuple[int, str]:
    """nvidia-smi's recorded exit code and output for ``args`` (2 and a message if not recorded)."""
    answers: dict[str, Any] = recording["nvidia_smi"]
    key = " ".join(args)
    if key not in answers:
        return 2, f"recorded nvidia-smi: no answer recorded for {key!r}\n"
    out = str(answers[key])
    if HOLDER_PID_PLACEHOLDER in out:
        if holder_pid is None:
            # No holder: its line is not there.
            out = "".join(
                line for line in out.splitlines(keepends=True) if HOLDER_PID_PLACEHOLDER not in line
            )
        else:
            out = out.replace(HOLDER_PID_PLACEHOLDER, str(holder_pid))
    return 0, out


def write_sysfs(recording: dict[str, Any], root: Path) -> Path:
    """A /sys/bus/pci/devices with the recorded devices' vendor and class files; returns that folder."""
    devices = root / "sys" / "bus" / "pci" / "devices"
    for dev in recording["pci"]:
        d = devices / dev["address"]
        d.mkdir(parents=True)
        (d / "vendor").write_text(dev["vendor"] + "\n")
        (d / "class").write_text(dev["class"] + "\n")
    return devices


RECORDING_ENV = "LABKIT_GPU_CHECK_RECORDING"
HOLDER_PID_ENV = "LABKIT_GPU_CHECK_HOLDER_PID"


def holder_pid_from_env() -> int | None:
    import os

    value = os.environ.get(HOLDER_PID_ENV, "")
    return int(value) if value else None


def write_smi_replay(bin_dir: Path) -> Path:
    """An executable ``nvidia-smi`` in ``bin_dir`` answering from $LABKIT_GPU_CHECK_RECORDING."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f'#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} "$@"\n')
    smi.chmod(0o755)
    return smi


def main(argv: list[str]) -> int:
    """nvidia-smi replay: the recorded answer to ``argv``."""
    import os

    recording = json.loads(Path(os.environ[RECORDING_ENV]).read_text())
    code, out = smi_answer(recording, argv, holder_pid_from_env())
    (sys.stdout if code == 0 else sys.stderr).write(out)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
