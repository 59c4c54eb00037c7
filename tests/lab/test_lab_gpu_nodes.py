"""End-to-end checks of playbooks/gpu_nodes.yml (docker, nvidia_driver, ...) on the converged local lab.

The lab has no GPU and cannot reach Docker's or NVIDIA's repositories: Docker comes from Debian
(`docker_source: distro`), the driver from Debian non-free without a GPU
(`nvidia_driver_install_without_gpu: true`). What needs a GPU is listed in the roles' pages.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_playbook, ssh

pytestmark = [pytest.mark.lab, pytest.mark.slow]

NODES = ("gpu01", "gpu02")
IMAGE = "labkit-lab-test:1"


def daemon_json(host_exec, host: str = "gpu01") -> str:
    return host_exec(host, "cat", "/etc/docker/daemon.json").stdout


@pytest.fixture(scope="module")
def converged(lab):
    """gpu_nodes.yml converges the GPU nodes; a second run changes nothing."""
    first = run_playbook("gpu_nodes.yml")
    assert first.rc == 0, first.output[-4000:]
    second = run_playbook("gpu_nodes.yml")
    assert second.rc == 0, second.output[-4000:]
    return second


def test_second_run_changes_nothing(converged):
    recap = converged.recap()
    assert set(recap) == set(NODES)
    for host, counts in recap.items():
        assert counts["changed"] == 0, f"{host} changed on a second run:\n{converged.output[-4000:]}"
        assert counts["failed"] == 0


@pytest.mark.parametrize("host", NODES)
def test_engine_runs_a_container_from_a_locally_imported_image(converged, host_exec, host):
    # An image made on the node itself (dash and its libraries): no registry is involved.
    made = host_exec(
        host,
        "bash",
        "-c",
        "set -o pipefail; cd / && tar -ch $(ldd /bin/dash | grep -o '/[^ ]*') bin/dash 2>/dev/null"
        f" | docker import - {IMAGE}",
    )
    assert made.returncode == 0, made.stderr
    run = host_exec(
        host, "docker", "run", "--rm", IMAGE, "/bin/dash", "-c", 'read h </etc/hostname; echo "job on $h"'
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("job on "), run.stdout
    assert run.stdout.split()[-1] != host, "the command ran on the node, not in a container"


def test_engine_settings_in_force(converged, host_exec):
    info = json.loads(host_exec("gpu01", "docker", "info", "--format", "{{json .}}").stdout)
    assert info["Driver"] == "vfs"
    assert info["LoggingDriver"] == "json-file"
    assert info["LiveRestoreEnabled"] is True
    bridge = host_exec(
        "gpu01", "docker", "network", "inspect", "--format", "{{(index .IPAM.Config 0).Subnet}}", "bridge"
    )
    assert bridge.stdout.strip() == "10.250.0.0/24", "docker0 must come from the pool, not 172.17.0.0/16"


def test_only_the_listed_admin_may_use_the_engine(converged, lab, host_exec):
    admin = ssh(lab["gpu01"]["address"], "labadmin", "docker", "version", "--format", "{{.Server.Version}}")
    assert admin.returncode == 0, admin.stderr
    other = host_exec("gpu01", "docker", "ps", user="nobody")
    assert other.returncode != 0 and "permission denied" in other.stderr


def test_docker_group_is_exactly_the_admin_list(converged, host_exec):
    host_exec("gpu01", "useradd", "--no-create-home", "labkit-intruder")
    try:
        assert host_exec("gpu01", "gpasswd", "-a", "labkit-intruder", "docker").returncode == 0
        run = run_playbook("gpu_nodes.yml", "-l", "gpu01", "--tags", "docker")
        assert run.rc == 0, run.output[-3000:]
        members = host_exec("gpu01", "getent", "group", "docker").stdout.strip().split(":")[-1].split(",")
        assert members == ["labadmin"]
    finally:
        host_exec("gpu01", "userdel", "labkit-intruder")


@pytest.mark.parametrize(
    ("extra", "variable"),
    [
        (
            {"docker_default_address_pools": [{"base": "172.30.0.0/16", "size": 24}]},
            "docker_default_address_pools",
        ),
        ({"docker_bridge_ip": "172.30.57.200/29"}, "docker_bridge_ip"),
        ({"docker_source": "snap"}, "docker_source"),
        ({"docker_log_max_size": "lots"}, "docker_log_max_size"),
        ({"docker_admin_users": ["nosuchadmin"]}, "docker_admin_users"),
        ({"docker_daemon_options": {"runtimes": {}}}, "docker_daemon_options"),
    ],
    ids=[
        "pool-overlaps-lab-subnet",
        "bridge-in-lab-subnet",
        "unknown-source",
        "bad-log-size",
        "unknown-admin",
        "foreign-key",
    ],
)
def test_bad_docker_input_is_refused_before_any_change(converged, host_exec, extra, variable):
    before = daemon_json(host_exec)
    run = run_playbook("gpu_nodes.yml", "-l", "gpu01", "-e", json.dumps(extra))
    assert run.rc != 0
    assert variable in run.output, run.output[-3000:]
    assert run.recap()["gpu01"]["changed"] == 0
    assert daemon_json(host_exec) == before
