"""GpuUserCollector with a fake NVML (canned answers in pynvml's shapes), a temp proc root, fake Docker."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import mon_helpers  # noqa: F401  (puts the exporter source on sys.path)
import pynvml
import pytest
from hypothesis import given
from hypothesis import strategies as st
from labkit_exporters.gpu_users import (
    ContainerInfo,
    ContainerLookupError,
    GpuUserCollector,
    NvmlGpuSource,
    ProcFs,
    build_registry,
)
from mon_fake_nvml import FakeNvml, write_proc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

ALICE_JOB = "a1" * 32  # container of labq job 42 (systemd cgroup driver)
JUPYTER = "b2" * 32  # container without labq labels (cgroupfs driver)
GPU0 = "GPU-5d3e2c4a-1b7f-4c1e-9a0d-0f4b6c1a2e01"
GPU1 = "GPU-9c1f7e22-6a40-4d8b-8f13-77e0d5b9a402"
GiB = 1024**3

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class FakeContainers:
    def __init__(self, known: Mapping[str, ContainerInfo]) -> None:
        self.known = dict(known)
        self.calls: list[str] = []
        self.down = False
        self.retained: list[set[str]] = []

    def lookup(self, container_id: str) -> ContainerInfo | None:
        self.calls.append(container_id)
        if self.down:
            raise ContainerLookupError("Cannot connect to the Docker daemon")
        return self.known.get(container_id)

    def retain(self, container_ids: Iterable[str]) -> None:
        self.retained.append(set(container_ids))


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    v2 = f"0::/system.slice/docker-{ALICE_JOB}.scope\n"
    write_proc(root, 4101, v2, 0)
    write_proc(root, 4102, v2, 0)
    write_proc(root, 7400, v2, 0)
    write_proc(root, 5200, "0::/user.slice/user-1001.slice/session-4.scope\n", 1001)
    v1 = "".join(
        f"{n}:{c}:/docker/{JUPYTER}\n" for n, c in [(12, "memory"), (11, "pids"), (1, "name=systemd")]
    )
    write_proc(root, 6300, v1, 0)
    # pid 9999 has no /proc entry: it exited between NVML's answer and our read.
    return root


@pytest.fixture
def containers() -> FakeContainers:
    return FakeContainers(
        {
            ALICE_JOB: ContainerInfo("labq-42", {"labq.user": "alice", "labq.job": "42"}),
            JUPYTER: ContainerInfo("jupyter-carol", {"maintainer": "someone"}),
        }
    )


def names(uid: int) -> str:
    return {0: "root", 1001: "bob"}.get(uid, str(uid))


def scrape(registry: CollectorRegistry) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def owner(gpu: str, uuid: str, user: str, job: str, container: str) -> frozenset[tuple[str, str]]:
    return frozenset(
        {"gpu": gpu, "uuid": uuid, "user": user, "labq_job": job, "container": container}.items()
    )


def make(nvml: FakeNvml | None, proc_root: Path, containers: FakeContainers) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GpuUserCollector(NvmlGpuSource(nvml), ProcFs(proc_root), containers, names))
    return registry


def test_memory_and_processes_per_owner(proc_root: Path, containers: FakeContainers) -> None:
    samples = scrape(make(FakeNvml(), proc_root, containers))
    assert samples[("labkit_gpu_nvml_up", frozenset())] == 1
    assert series(samples, "labkit_gpu_user_memory_used_bytes") == {
        owner("0", GPU0, "alice", "42", "labq-42"): 21 * GiB,  # two pids of one job, summed
        owner("0", GPU0, "bob", "", ""): 0.5 * GiB,  # host process, user from its uid
        owner("1", GPU1, "root", "", "jupyter-carol"): 8 * GiB,  # container without labq labels
        owner("1", GPU1, "alice", "42", "labq-42"): 0,  # NVML did not know the memory
        owner("1", GPU1, "unknown", "", ""): 1024 * 1024,  # exited before we read /proc
    }
    assert series(samples, "labkit_gpu_user_processes")[owner("0", GPU0, "alice", "42", "labq-42")] == 2
    assert sum(series(samples, "labkit_gpu_user_processes").values()) == 6
    assert set(series(samples, "labkit_gpu_info")) == {
        frozenset({"gpu": "0", "uuid": GPU0, "name": "NVIDIA A100-SXM4-80GB"}.items()),
        frozenset({"gpu": "1", "uuid": GPU1, "name": "NVIDIA A100-SXM4-80GB"}.items()),
    }
    assert all(v == 0 for v in series(samples, "labkit_gpu_exporter_errors_total").values())
    label_names = {name for (_, labels) in samples for name, _ in labels}
    assert "pid" not in label_names  # no per-process series churn
    # `job` and `instance` belong to Prometheus' targets: an exporter label of that name is renamed
    assert not label_names & {"job", "instance"}


def test_docker_is_asked_once_per_container_and_cache_pruned(
    proc_root: Path, containers: FakeContainers
) -> None:
    scrape(make(FakeNvml(), proc_root, containers))
    assert sorted(containers.calls) == sorted([ALICE_JOB, ALICE_JOB, ALICE_JOB, JUPYTER])
    assert containers.retained == [{ALICE_JOB, JUPYTER}]


@pytest.mark.parametrize(
    "nvml_error", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED]
)
def test_host_without_gpu_reports_only_that(
    nvml_error: int, proc_root: Path, containers: FakeContainers
) -> None:
    nvml = FakeNvml()
    nvml.init_error = nvml_error
    registry = make(nvml, proc_root, containers)
    for _ in range(2):
        samples = scrape(registry)
    assert {name for name, _ in samples} == {"labkit_gpu_nvml_up", "labkit_gpu_exporter_errors_total"}
    assert samples[("labkit_gpu_nvml_up", frozenset())] == 0
    assert nvml.init_calls == 2  # retried at every scrape: a driver loaded later is picked up
    assert containers.calls == []


def test_without_pynvml_installed(proc_root: Path, containers: FakeContainers) -> None:
    samples = scrape(make(None, proc_root, containers))
    assert samples[("labkit_gpu_nvml_up", frozenset())] == 0


def test_driver_appearing_later_is_picked_up(proc_root: Path, containers: FakeContainers) -> None:
    nvml = FakeNvml()
    nvml.init_error = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    registry = make(nvml, proc_root, containers)
    assert scrape(registry)[("labkit_gpu_nvml_up", frozenset())] == 0
    nvml.init_error = None
    samples = scrape(registry)
    assert samples[("labkit_gpu_nvml_up", frozenset())] == 1
    assert len(series(samples, "labkit_gpu_info")) == 2


def test_gpu_fallen_off_the_bus_is_counted_and_others_still_reported(
    proc_root: Path, containers: FakeContainers
) -> None:
    nvml = FakeNvml()
    nvml.lost = {1}
    registry = make(nvml, proc_root, containers)
    scrape(registry)
    samples = scrape(registry)
    assert samples[("labkit_gpu_nvml_up", frozenset())] == 1
    assert {dict(k)["gpu"] for k in series(samples, "labkit_gpu_info")} == {"0"}
    assert {dict(k)["gpu"] for k in series(samples, "labkit_gpu_user_memory_used_bytes")} == {"0"}
    errors = series(samples, "labkit_gpu_exporter_errors_total")
    assert errors[frozenset({("stage", "nvml")})] == 2  # one per scrape, a counter
    assert errors[frozenset({("stage", "docker")})] == 0


def test_docker_down_is_counted_once_per_scrape_and_falls_back(
    proc_root: Path, containers: FakeContainers
) -> None:
    containers.down = True
    samples = scrape(make(FakeNvml(), proc_root, containers))
    assert len(containers.calls) == 1  # the daemon is not asked again for every pid
    errors = series(samples, "labkit_gpu_exporter_errors_total")
    assert errors[frozenset({("stage", "docker")})] == 1
    mem = series(samples, "labkit_gpu_user_memory_used_bytes")
    # container known by its short id, user from the process uid
    assert mem[owner("0", GPU0, "root", "", ALICE_JOB[:12])] == 21 * GiB
    assert mem[owner("1", GPU1, "root", "", JUPYTER[:12])] == 8 * GiB
    assert containers.retained == []  # cache not pruned on a failed scrape


def test_unreadable_proc_entry_is_counted(proc_root: Path, containers: FakeContainers) -> None:
    (proc_root / "5200" / "cgroup").unlink()
    (proc_root / "5200" / "cgroup").mkdir()  # reading a directory raises IsADirectoryError
    samples = scrape(make(FakeNvml(), proc_root, containers))
    errors = series(samples, "labkit_gpu_exporter_errors_total")
    assert errors[frozenset({("stage", "proc")})] == 1
    assert (
        series(samples, "labkit_gpu_user_memory_used_bytes")[owner("0", GPU0, "unknown", "", "")] == 0.5 * GiB
    )


def test_unexpected_failure_never_breaks_the_scrape(proc_root: Path, containers: FakeContainers) -> None:
    class Broken(FakeNvml):
        def nvmlDeviceGetCount(self) -> int:
            raise RuntimeError("boom")

    samples = scrape(make(Broken(), proc_root, containers))
    assert samples[("labkit_gpu_nvml_up", frozenset())] == 0
    assert series(samples, "labkit_gpu_exporter_errors_total")[frozenset({("stage", "internal")})] == 1


def test_build_registry_has_no_default_process_metrics(proc_root: Path, containers: FakeContainers) -> None:
    registry, _ = build_registry(FakeNvml(), proc_root, containers)
    assert {name.split("_")[0] for name, _ in scrape(registry)} == {"labkit"}


HEX64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


@given(cid=HEX64, prefix=st.sampled_from(["/system.slice/", "/kubepods.slice/x/", "/"]))
def test_container_id_from_systemd_scope(
    tmp_path_factory: pytest.TempPathFactory, cid: str, prefix: str
) -> None:
    root = tmp_path_factory.mktemp("proc")
    write_proc(root, 1, f"0::{prefix}docker-{cid}.scope\n", 0)
    assert ProcFs(root).container_id(1) == cid


@given(cid=HEX64, suffix=st.sampled_from(["", "/init.scope"]))
def test_container_id_from_cgroupfs_path(
    tmp_path_factory: pytest.TempPathFactory, cid: str, suffix: str
) -> None:
    root = tmp_path_factory.mktemp("proc")
    write_proc(root, 1, f"4:memory:/docker/{cid}{suffix}\n3:cpu:/docker/{cid}{suffix}\n", 0)
    assert ProcFs(root).container_id(1) == cid


@given(
    path=st.sampled_from(
        ["/user.slice/user-1000.slice/session-2.scope", "/", "/docker/abc", "/system.slice/docker.service"]
    )
)
def test_no_container_id_outside_docker(tmp_path_factory: pytest.TempPathFactory, path: str) -> None:
    root = tmp_path_factory.mktemp("proc")
    write_proc(root, 1, f"0::{path}\n", 1000)
    assert ProcFs(root).container_id(1) is None
    assert ProcFs(root).uid(1) == 1000
