"""GPU use by user: which user, labq job and container holds memory on which GPU.

For every compute process NVML reports on a GPU, the exporter finds its owner:

* inside a Docker container (found from ``/proc/<pid>/cgroup``): the container's
  labels ``labq.user`` and ``labq.job`` (looked up through the Docker API);
* outside containers: the user name of the process' real uid (``/proc/<pid>/status``).

Series are aggregated per GPU and owner, never per pid, so a job that forks does
not create new series.  On a host without a usable NVML (no GPU, no driver) the
exporter reports ``labkit_gpu_nvml_up 0`` and its error counters, and keeps running.

The three outside worlds sit behind small boundaries so the tests can replace them:
``NvmlGpuSource`` (takes the ``pynvml`` module or a fake with the same few calls),
``ProcFs`` (takes a proc root directory) and ``ContainerLookup`` (Docker).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from job_queue.gpuprocs import GpuProcess, ProcFs, gpu_processes, user_name
from labkit_exporters.serving import serve_until_signalled

LOG = logging.getLogger("labkit_gpu_user_exporter")

DEFAULT_PORT = 9847
DEFAULT_LISTEN_ADDRESS = "0.0.0.0"  # noqa: S104 - scraped by the monitoring server; see docs
DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"

LABQ_USER_LABEL = "labq.user"
LABQ_JOB_LABEL = "labq.job"

ERROR_STAGES = ("nvml", "proc", "docker", "internal")

# --------------------------------------------------------------------------- NVML


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    processes: tuple[GpuProcess, ...]


@dataclass
class GpuReading:
    nvml_up: bool
    gpus: list[Gpu] = field(default_factory=list)
    errors: int = 0


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


class NvmlGpuSource:
    """Reads GPUs and their compute processes through the few pynvml calls below.

    ``nvml`` is the ``pynvml`` module, a fake object with the same functions and an
    ``NVMLError`` exception class, or ``None`` when nvidia-ml-py is not installed.
    Calls used: nvmlInit, nvmlDeviceGetCount, nvmlDeviceGetHandleByIndex,
    nvmlDeviceGetUUID, nvmlDeviceGetName, and the process calls of the shared reader
    (job_queue.gpuprocs.gpu_processes: compute and graphics running processes).
    """

    def __init__(self, nvml: Any | None) -> None:
        self._nvml = nvml
        self._initialised = False

    def _init(self) -> bool:
        if self._nvml is None:
            return False
        if not self._initialised:
            try:
                self._nvml.nvmlInit()
            except self._nvml.NVMLError as exc:
                LOG.debug("NVML init failed: %s", exc)
                return False
            self._initialised = True
        return True

    def read(self) -> GpuReading:
        if not self._init():
            return GpuReading(nvml_up=False)
        nvml = self._nvml
        assert nvml is not None
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            LOG.warning("nvmlDeviceGetCount failed: %s", exc)
            return GpuReading(nvml_up=False, errors=1)
        reading = GpuReading(nvml_up=True)
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                name = _text(nvml.nvmlDeviceGetName(handle))
                procs = gpu_processes(nvml, handle)
            except nvml.NVMLError as exc:
                # e.g. GPU fell off the bus: report the others, count the error.
                LOG.warning("NVML failed for GPU %d: %s", index, exc)
                reading.errors += 1
                continue
            reading.gpus.append(Gpu(index=index, uuid=uuid, name=name, processes=procs))
        return reading


# /proc: ProcFs (container id from the cgroup, real uid from status) and user_name are the shared
# reader's (job_queue/gpuprocs.py), so labqd and this exporter agree on owners and containers.


# --------------------------------------------------------------------------- Docker


@dataclass(frozen=True)
class ContainerInfo:
    name: str
    labels: Mapping[str, str]


class ContainerLookupError(Exception):
    """The container runtime could not be asked (down, permission denied...)."""


class ContainerLookup(Protocol):
    def lookup(self, container_id: str) -> ContainerInfo | None:
        """Info for the container, None if it does not exist; ContainerLookupError on failure."""

    def retain(self, container_ids: Iterable[str]) -> None:
        """Forget cached containers not in ``container_ids``."""


class NoContainers:
    """Lookup used with ``--docker-url none``: every container is unknown."""

    def lookup(self, container_id: str) -> ContainerInfo | None:
        return None

    def retain(self, container_ids: Iterable[str]) -> None:
        return None


class DockerContainerLookup:
    """Container name and labels through the Docker API, cached per container id.

    Labels of a container never change, so the cache is only pruned of containers
    that no longer hold a GPU.
    """

    def __init__(self, base_url: str, timeout: float = 3.0) -> None:
        self._base_url = base_url
        self._timeout = timeout
        self._client: Any | None = None
        self._cache: dict[str, ContainerInfo] = {}

    def _docker(self) -> Any:
        if self._client is None:
            import docker

            try:
                self._client = docker.DockerClient(base_url=self._base_url, timeout=self._timeout)
            except docker.errors.DockerException as exc:
                raise ContainerLookupError(str(exc)) from exc
        return self._client

    def lookup(self, container_id: str) -> ContainerInfo | None:
        cached = self._cache.get(container_id)
        if cached is not None:
            return cached
        import docker
        import requests

        client = self._docker()
        try:
            container = client.containers.get(container_id)
        except docker.errors.NotFound:
            return None
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise ContainerLookupError(str(exc)) from exc
        info = ContainerInfo(name=str(container.name), labels=dict(container.labels or {}))
        self._cache[container_id] = info
        return info

    def retain(self, container_ids: Iterable[str]) -> None:
        keep = set(container_ids)
        for cid in list(self._cache):
            if cid not in keep:
                del self._cache[cid]


# --------------------------------------------------------------------------- collector


@dataclass(frozen=True, order=True)
class Owner:
    user: str
    job: str
    container: str


UNKNOWN_USER = "unknown"


class GpuUserCollector(Collector):
    """prometheus-client collector; every scrape reads NVML, /proc and Docker afresh."""

    def __init__(
        self,
        gpus: NvmlGpuSource,
        proc: ProcFs,
        containers: ContainerLookup,
        user_name_of: Callable[[int], str] = user_name,
    ) -> None:
        self._gpus = gpus
        self._proc = proc
        self._containers = containers
        self._user_name_of = user_name_of
        self._errors = dict.fromkeys(ERROR_STAGES, 0)
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        # No describe-time scrape (that would touch NVML at registration).
        return []

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            try:
                metrics = self._collect()
            except Exception:
                LOG.exception("unexpected error while scraping")
                self._errors["internal"] += 1
                metrics = [_nvml_up(False)]
            errors = CounterMetricFamily(
                "labkit_gpu_exporter_errors",
                "Errors while scraping, by stage (nvml, proc, docker, internal).",
                labels=["stage"],
            )
            for stage in ERROR_STAGES:
                errors.add_metric([stage], self._errors[stage])
        yield from metrics
        yield errors

    def _owner(self, pid: int, docker_failed: list[bool], seen: set[str]) -> Owner:
        try:
            cid = self._proc.container_id(pid)
        except (FileNotFoundError, ProcessLookupError):
            return Owner(UNKNOWN_USER, "", "")  # process exited meanwhile
        except OSError as exc:
            LOG.warning("cannot read cgroup of pid %d: %s", pid, exc)
            self._errors["proc"] += 1
            return Owner(UNKNOWN_USER, "", "")
        labels: Mapping[str, str] = {}
        container = ""
        if cid is not None:
            seen.add(cid)
            container = cid[:12]
            if not docker_failed[0]:
                try:
                    info = self._containers.lookup(cid)
                except ContainerLookupError as exc:
                    LOG.warning("docker lookup failed: %s", exc)
                    self._errors["docker"] += 1
                    docker_failed[0] = True  # do not hammer a dead daemon for every pid
                    info = None
                if info is not None:
                    container = info.name
                    labels = info.labels
        job = labels.get(LABQ_JOB_LABEL, "")
        user = labels.get(LABQ_USER_LABEL, "")
        if not user:
            try:
                user = self._user_name_of(self._proc.uid(pid))
            except (FileNotFoundError, ProcessLookupError):
                user = UNKNOWN_USER
            except (OSError, ValueError) as exc:
                LOG.warning("cannot read uid of pid %d: %s", pid, exc)
                self._errors["proc"] += 1
                user = UNKNOWN_USER
        return Owner(user=user, job=job, container=container)

    def _collect(self) -> list[Metric]:
        reading = self._gpus.read()
        self._errors["nvml"] += reading.errors
        if not reading.nvml_up:
            return [_nvml_up(False)]
        info = GaugeMetricFamily(
            "labkit_gpu_info", "GPUs NVML sees on this host (value 1).", labels=["gpu", "uuid", "name"]
        )
        memory = GaugeMetricFamily(
            "labkit_gpu_user_memory_used_bytes",
            "GPU memory used by the compute processes of one owner (user, labq job, container) on a GPU.",
            labels=["gpu", "uuid", "user", "labq_job", "container"],
        )
        processes = GaugeMetricFamily(
            "labkit_gpu_user_processes",
            "Number of compute processes of one owner on a GPU.",
            labels=["gpu", "uuid", "user", "labq_job", "container"],
        )
        docker_failed = [False]
        seen: set[str] = set()
        for gpu in reading.gpus:
            info.add_metric([str(gpu.index), gpu.uuid, gpu.name], 1)
            used: dict[Owner, int] = {}
            count: dict[Owner, int] = {}
            for proc in gpu.processes:
                owner = self._owner(proc.pid, docker_failed, seen)
                used[owner] = used.get(owner, 0) + (proc.used_bytes or 0)
                count[owner] = count.get(owner, 0) + 1
            for owner in sorted(count):
                labels = [str(gpu.index), gpu.uuid, owner.user, owner.job, owner.container]
                memory.add_metric(labels, used[owner])
                processes.add_metric(labels, count[owner])
        if not docker_failed[0]:
            self._containers.retain(seen)
        return [_nvml_up(True), info, memory, processes]


def _nvml_up(up: bool) -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "labkit_gpu_nvml_up", "1 if NVML (driver and GPUs) could be read, 0 otherwise.", value=1 if up else 0
    )


# --------------------------------------------------------------------------- CLI


def _load_pynvml() -> Any | None:
    try:
        import pynvml
    except ImportError:
        LOG.warning("nvidia-ml-py is not installed; reporting labkit_gpu_nvml_up 0")
        return None
    return pynvml


def build_registry(
    nvml: Any | None, proc_root: Path, containers: ContainerLookup
) -> tuple[CollectorRegistry, GpuUserCollector]:
    registry = CollectorRegistry(auto_describe=False)
    collector = GpuUserCollector(NvmlGpuSource(nvml), ProcFs(proc_root), containers)
    registry.register(collector)
    return registry, collector


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="labkit-gpu-user-exporter",
        description="Prometheus exporter: GPU memory per user, labq job and container.",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (default %(default)s)")
    parser.add_argument(
        "--listen-address",
        default=DEFAULT_LISTEN_ADDRESS,
        help="address to bind; give the node's cluster-network address in production (default %(default)s)",
    )
    parser.add_argument("--proc-root", type=Path, default=Path("/proc"), help="proc filesystem root")
    parser.add_argument(
        "--docker-url",
        default=DEFAULT_DOCKER_URL,
        help="Docker API URL, or 'none' to not look up containers (default %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    containers: ContainerLookup
    if args.docker_url.lower() == "none":
        containers = NoContainers()
    else:
        containers = DockerContainerLookup(args.docker_url)
    registry, _ = build_registry(_load_pynvml(), args.proc_root, containers)
    return serve_until_signalled(registry, args.port, args.listen_address, LOG)


if __name__ == "__main__":
    sys.exit(main())
