"""Container labels through the real Docker API (a labelled container created, never started)."""

from __future__ import annotations

import io
import secrets
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mon_helpers  # noqa: F401  (puts the exporter source on sys.path)
import pytest
from labkit_exporters.gpu_users import DockerContainerLookup, build_registry
from mon_fake_nvml import FakeNvml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

docker = pytest.importorskip("docker")

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    try:
        c = docker.from_env(timeout=10)
        c.ping()
    except Exception as exc:
        pytest.skip(f"no Docker engine: {exc}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def labelled_container(client: Any) -> Iterator[str]:
    """A created (not started) container of an empty image: nothing runs, nothing is pulled."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w"):
        pass
    tag = f"labkit-test-empty:{secrets.token_hex(4)}"
    client.api.import_image_from_data(buf.getvalue(), repository=tag.split(":")[0], tag=tag.split(":")[1])
    container = client.containers.create(
        tag,
        command=["/nothing"],
        name=f"labq-test-{secrets.token_hex(4)}",
        labels={"labq.user": "dora", "labq.job": "1234"},
    )
    try:
        yield str(container.id)
    finally:
        container.remove(force=True)
        client.images.remove(tag, force=True)


def test_lookup_real_container(labelled_container: str) -> None:
    lookup = DockerContainerLookup("unix:///var/run/docker.sock")
    info = lookup.lookup(labelled_container)
    assert info is not None
    assert info.labels["labq.user"] == "dora"
    assert info.labels["labq.job"] == "1234"
    assert info.name.startswith("labq-test-")
    assert lookup.lookup("0" * 64) is None


def test_exporter_attributes_process_to_labq_job(labelled_container: str, tmp_path: Path) -> None:
    nvml = FakeNvml()
    proc = tmp_path / "proc"
    for gpu in nvml.gpus:
        for p in gpu["processes"]:
            d = proc / str(p["pid"])
            d.mkdir(parents=True)
            (d / "cgroup").write_text(f"0::/system.slice/docker-{labelled_container}.scope\n")
            (d / "status").write_text("Uid:\t0\t0\t0\t0\n")
    registry, _ = build_registry(nvml, proc, DockerContainerLookup("unix:///var/run/docker.sock"))
    users = {
        (s.labels["gpu"], s.labels["user"], s.labels["labq_job"])
        for fam in text_string_to_metric_families(generate_latest(registry).decode())
        for s in fam.samples
        if s.name == "labkit_gpu_user_processes"
    }
    assert users == {("0", "dora", "1234"), ("1", "dora", "1234")}


def test_unreachable_docker_is_an_error_not_a_crash(tmp_path: Path) -> None:
    from labkit_exporters.gpu_users import ContainerLookupError

    lookup = DockerContainerLookup(f"unix://{tmp_path}/no-such.sock", timeout=1)
    with pytest.raises(ContainerLookupError):
        lookup.lookup("a" * 64)
