"""labqd and the GPU-user exporter read GPU processes the same way (job_queue/gpuprocs.py): same
processes (compute and graphics, once each), same owner (the real uid), same container matching,
and NVML's "not available" memory is no figure in either."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mon_helpers  # noqa: F401  (puts the exporter source on sys.path)
import pynvml
from labkit_exporters.gpu_users import GpuUserCollector, NoContainers, NvmlGpuSource, ProcFs

from job_queue.gpuprocs import used_bytes
from job_queue.gpus import NvmlInventory

LABQ_CID = "c" * 64
NOT_AVAILABLE = 2**64 - 1


class RealNamedNvml:
    """pynvml's own call names (compute and graphics running processes)."""

    NVMLError = pynvml.NVMLError

    def __init__(self) -> None:
        self.compute = [SimpleNamespace(pid=11, usedGpuMemory=2 << 30),
                        SimpleNamespace(pid=12, usedGpuMemory=NOT_AVAILABLE),
                        SimpleNamespace(pid=13, usedGpuMemory=None)]
        self.graphics = [SimpleNamespace(pid=12, usedGpuMemory=NOT_AVAILABLE),  # also a compute process
                         SimpleNamespace(pid=14, usedGpuMemory=64 << 20)]

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return "GPU-shared-0"

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "NVIDIA H100"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(total=80 << 30)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        return self.compute

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[Any]:
        return self.graphics


def proc_tree(root: Path) -> None:
    # pid 11 runs in a labq container. These /proc dirs belong to root (who runs the tests): the
    # real uid in status is what counts, as for a non-dumpable process on a node
    for pid, cgroup, uid in ((11, f"0::/system.slice/docker-{LABQ_CID}.scope", 1001),
                             (12, "0::/user.slice/user-1001.slice/session-4.scope", 1001),
                             (13, f"0::/docker/{'d' * 64}", 1002),
                             (14, "0::/user.slice", 1003)):
        d = root / str(pid)
        d.mkdir()
        (d / "cgroup").write_text(cgroup + "\n")
        (d / "status").write_text(f"Name:\tpython\nUid:\t{uid}\t0\t0\t0\nGid:\t0\n")


def names(uid: int) -> str:
    return {1001: "alice", 1002: "bob", 1003: "carol"}.get(uid, str(uid))


def test_labqd_and_the_exporter_agree(tmp_path: Path, monkeypatch: Any) -> None:
    proc_tree(tmp_path)
    import job_queue.gpus as gpus

    monkeypatch.setattr(gpus, "user_name", names)
    nvml = RealNamedNvml()
    (gpu,) = NvmlInventory(nvml=nvml, proc_root=str(tmp_path)).snapshot([LABQ_CID])
    labqd = {(p.pid, p.user, p.memory_bytes) for p in gpu.foreign}
    reading = NvmlGpuSource(nvml).read()
    (seen,) = reading.gpus
    collector = GpuUserCollector(NvmlGpuSource(nvml), ProcFs(tmp_path), NoContainers(), names)
    exporter = {(p.pid, collector._owner(p.pid, [False], set()).user, p.used_bytes) for p in seen.processes}
    assert exporter == {(11, "alice", 2 << 30), *labqd}  # pid 11 is labq's own job, not foreign
    assert labqd == {(12, "alice", None), (13, "bob", None), (14, "carol", 64 << 20)}


def test_used_bytes() -> None:
    assert [used_bytes(v) for v in (0, 5, NOT_AVAILABLE, 2**63, -1, None, True, "7")] == [
        0, 5, None, None, None, None, None, None]
