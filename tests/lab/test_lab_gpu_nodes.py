"""End-to-end checks of playbooks/gpu_nodes.yml (docker, nvidia_driver, ...) on the converged local lab.

The lab has no GPU and cannot reach Docker's or NVIDIA's repositories: Docker comes from Debian
(`docker_source: distro`), the driver from Debian non-free without a GPU
(`nvidia_driver_install_without_gpu: true`). What needs a GPU is listed in the roles' pages.
"""

from __future__ import annotations

import json
import re

import pytest
from lab_helpers import run_playbook, ssh

pytestmark = [pytest.mark.lab, pytest.mark.slow]

NODES = ("gpu01", "gpu02")
IMAGE = "labkit-lab-test:1"


def daemon_json(host_exec, host: str = "gpu01") -> str:
    return host_exec(host, "cat", "/etc/docker/daemon.json").stdout


@pytest.mark.parametrize("host", NODES)
def test_engine_runs_a_container_from_a_locally_imported_image(second_run, host_exec, host):
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


def test_engine_settings_in_force(second_run, host_exec):
    info = json.loads(host_exec("gpu01", "docker", "info", "--format", "{{json .}}").stdout)
    assert info["Driver"] == "vfs"
    assert info["LoggingDriver"] == "json-file"
    assert info["LiveRestoreEnabled"] is True
    bridge = host_exec(
        "gpu01", "docker", "network", "inspect", "--format", "{{(index .IPAM.Config 0).Subnet}}", "bridge"
    )
    assert bridge.stdout.strip() == "10.250.0.0/24", "docker0 must come from the pool, not 172.17.0.0/16"


def test_only_the_listed_admin_may_use_the_engine(second_run, lab, host_exec):
    admin = ssh(lab["gpu01"]["address"], "labadmin", "docker", "version", "--format", "{{.Server.Version}}")
    assert admin.returncode == 0, admin.stderr
    other = host_exec("gpu01", "docker", "ps", user="nobody")
    assert other.returncode != 0 and "permission denied" in other.stderr


TWICE = """---
- name: The engine, as gpu_nodes.yml applies it
  hosts: gpu01
  become: true
  roles: [docker]

- name: The engine again in the same run, as job_queue.yml and monitoring.yml apply it
  hosts: gpu01
  become: true
  roles: [docker]
"""


def test_docker_role_does_its_work_once_per_host_in_a_run(second_run, tmp_path):
    play = tmp_path / "twice.yml"
    play.write_text(TWICE)
    run = run_playbook(str(play))
    assert run.rc == 0, run.output[-4000:]
    assert run.task_results("docker : Check, install and configure the engine (once per host in a run)") == [
        {"gpu01": "included"},
        {"gpu01": "skipping"},
    ], run.output[-4000:]
    checked = run.task_results("docker : Ask dockerd whether it can check a configuration file")
    assert checked == [{"gpu01": "ok"}], run.output[-4000:]
    run.assert_changed_nothing({"gpu01"})


def test_docker_group_is_exactly_the_admin_list(second_run, host_exec):
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
def test_bad_docker_input_is_refused_before_any_change(second_run, host_exec, extra, variable):
    before = daemon_json(host_exec)
    # The first case runs the whole playbook (the preflight comes before any change); the others
    # only the preflight, which is all that runs before a refusal anyway.
    tags = () if variable == "docker_default_address_pools" else ("--tags", "preflight")
    run = run_playbook("gpu_nodes.yml", "-l", "gpu01", *tags, "-e", json.dumps(extra))
    assert run.rc != 0
    assert variable in run.output, run.output[-3000:]
    assert run.recap()["gpu01"]["changed"] == 0
    assert daemon_json(host_exec) == before


# --- nvidia_driver -------------------------------------------------------------------------------------


def driver_state(host_exec, host: str = "gpu01") -> str:
    """What the driver role manages; equal before and after means nothing changed."""
    return host_exec(
        host,
        "sh",
        "-c",
        "dpkg-query -W 'nvidia-*' 2>/dev/null; apt-mark showhold; cat /etc/apt/preferences.d/* "
        "/etc/apt/sources.list.d/* /etc/modprobe.d/* 2>/dev/null | md5sum",
    ).stdout


@pytest.mark.parametrize("host", NODES)
def test_driver_branch_is_installed_held_and_pinned(second_run, host_exec, host):
    version = host_exec(host, "dpkg-query", "-W", "-f", "${Version}", "nvidia-driver").stdout
    assert version.startswith("535."), version
    holds = host_exec(host, "apt-mark", "showhold").stdout.split()
    assert {"nvidia-driver", "nvidia-smi", "nvidia-persistenced", "firmware-misc-nonfree"} <= set(holds)
    policy = host_exec(host, "apt-cache", "policy", "nvidia-driver").stdout
    assert re.search(r"\*\*\* 535\.\S+ 1001", policy), policy


def test_apt_refuses_to_change_the_held_driver(second_run, host_exec):
    # What an unattended `apt-get -y` would run into: held packages are not changed without an override.
    sim = host_exec("gpu01", "apt-get", "-s", "-y", "remove", "nvidia-smi")
    assert sim.returncode != 0
    assert "Held packages were changed" in sim.stderr, sim.stdout + sim.stderr


def test_nouveau_is_blacklisted_and_no_unit_failed(second_run, host_exec):
    config = host_exec("gpu01", "modprobe", "--showconfig").stdout.splitlines()
    assert "blacklist nouveau" in config
    failed = host_exec("gpu01", "systemctl", "list-units", "--state=failed", "--no-legend", "--plain")
    assert "nvidia" not in failed.stdout, failed.stdout


def test_nvidia_smi_runs_and_reports_no_driver_without_a_gpu(second_run, host_exec):
    smi = host_exec("gpu01", "nvidia-smi")
    assert smi.returncode != 0 and "NVIDIA driver" in smi.stdout, smi.stdout + smi.stderr


def test_node_without_gpu_is_skipped_with_a_message(second_run, host_exec):
    before = driver_state(host_exec)
    run = run_playbook(
        "gpu_nodes.yml",
        "-l",
        "gpu01",
        "--tags",
        "nvidia_driver",
        "-e",
        '{"nvidia_driver_install_without_gpu": false}',
    )
    assert run.rc == 0, run.output[-3000:]
    assert "skipping the NVIDIA driver" in run.output
    assert run.recap()["gpu01"]["changed"] == 0
    assert driver_state(host_exec) == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"nvidia_driver_source": "nvidia_cloud"}, "nvidia_driver_source"),
        ({"nvidia_driver_branch": "latest"}, "nvidia_driver_branch"),
        ({"nvidia_driver_branch": "535.54"}, "nvidia_driver_branch"),
        ({"nvidia_driver_branch": 55}, "nvidia_driver_branch"),
        ({"nvidia_driver_source": "ubuntu"}, "nvidia_driver_source ubuntu needs an Ubuntu host"),
    ],
    ids=["unknown-source", "branch-word", "branch-full-version", "branch-two-digits", "ubuntu-on-debian"],
)
def test_bad_driver_input_is_refused_before_any_change(second_run, host_exec, extra, message):
    before = driver_state(host_exec)
    tags = () if extra.get("nvidia_driver_branch") == "535.54" else ("--tags", "preflight")
    run = run_playbook("gpu_nodes.yml", "-l", "gpu01", *tags, "-e", json.dumps(extra))
    assert run.rc != 0
    assert message in run.output, run.output[-3000:]
    assert run.recap()["gpu01"]["changed"] == 0
    assert driver_state(host_exec) == before


# --- nvidia_container_toolkit (TEST MODE in the lab: no nvidia-ctk, the runtime entry points at runc) ------


def test_toolkit_says_what_it_does_not_do_here(second_run):
    assert "nvidia_container_toolkit_install is false" in second_run.output
    assert "TEST MODE" in second_run.output


@pytest.mark.parametrize("host", NODES)
def test_docker_reports_the_nvidia_runtime(second_run, host_exec, host):
    info = json.loads(host_exec(host, "docker", "info", "--format", "{{json .}}").stdout)
    assert info["Runtimes"]["nvidia"]["path"] == "/usr/bin/runc"
    assert info["DefaultRuntime"] == "runc"
    # The docker role's settings survived the toolkit's edit of the same file.
    assert info["Driver"] == "vfs" and info["LiveRestoreEnabled"] is True


def test_container_runs_through_the_nvidia_runtime_entry(second_run, host_exec):
    host_exec(
        "gpu01",
        "bash",
        "-c",
        "set -o pipefail; cd / && tar -ch $(ldd /bin/dash | grep -o '/[^ ]*') bin/dash 2>/dev/null"
        f" | docker import - {IMAGE}",
    )
    run = host_exec(
        "gpu01", "docker", "run", "--rm", "--runtime", "nvidia", IMAGE, "/bin/dash", "-c", "echo via-nvidia"
    )
    assert run.returncode == 0 and run.stdout.strip() == "via-nvidia", run.stderr


def test_docker_role_leaves_nvidia_ctk_formatting_alone(second_run, host_exec):
    # nvidia-ctk writes daemon.json with its own layout; the docker role compares data, not text.
    reformat = host_exec(
        "gpu01",
        "python3",
        "-c",
        "import json; p='/etc/docker/daemon.json'; d=json.load(open(p));"
        " open(p,'w').write(json.dumps(d, indent=4))",
    )
    assert reformat.returncode == 0, reformat.stderr
    before = daemon_json(host_exec)
    started = host_exec("gpu01", "systemctl", "show", "-p", "ActiveEnterTimestamp", "docker").stdout
    run = run_playbook("gpu_nodes.yml", "-l", "gpu01", "--tags", "docker,nvidia_container_toolkit")
    assert run.rc == 0, run.output[-3000:]
    assert run.recap()["gpu01"]["changed"] == 0, run.output[-3000:]
    assert daemon_json(host_exec) == before
    assert host_exec("gpu01", "systemctl", "show", "-p", "ActiveEnterTimestamp", "docker").stdout == started


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"nvidia_container_toolkit_install": True, "nvidia_container_toolkit_test_runtime_entry": True},
            "nvidia_container_toolkit_test_runtime_entry is a test mode",
        ),
        ({"nvidia_container_toolkit_repo_url": "ftp://mirror"}, "nvidia_container_toolkit_repo_url"),
        (
            {"nvidia_container_toolkit_default_runtime": "sometimes"},
            "nvidia_container_toolkit_default_runtime",
        ),
    ],
    ids=["test-mode-with-packages", "bad-repo-url", "bad-bool"],
)
def test_bad_toolkit_input_is_refused_before_any_change(second_run, host_exec, extra, message):
    before = daemon_json(host_exec)
    run = run_playbook("gpu_nodes.yml", "-l", "gpu01", "--tags", "preflight", "-e", json.dumps(extra))
    assert run.rc != 0
    assert message in run.output, run.output[-3000:]
    assert run.recap()["gpu01"]["changed"] == 0
    assert daemon_json(host_exec) == before


# --- dcgm_exporter (no GPU in the lab: skipped with a message) -----------------------------------------


def test_exporter_is_skipped_with_a_message_without_a_gpu(second_run, host_exec):
    assert "skipping the GPU exporter" in second_run.output
    unit = host_exec("gpu01", "systemctl", "cat", "dcgm-exporter")
    assert unit.returncode != 0, unit.stdout
    listening = host_exec("gpu01", "bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9400")
    assert listening.returncode != 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"dcgm_exporter_tag": "latest"}, "dcgm_exporter_tag"),
        ({"dcgm_exporter_backend": "nvml"}, "dcgm_exporter_backend"),
        (
            {"dcgm_exporter_counters_extra": [{"name": "GPU_TEMP", "type": "gauge"}]},
            "dcgm_exporter_counters_extra",
        ),
    ],
    ids=["unpinned-image", "unknown-backend", "bad-counter"],
)
def test_bad_exporter_input_is_refused(second_run, extra, message):
    run = run_playbook("gpu_nodes.yml", "-l", "gpu01", "--tags", "preflight", "-e", json.dumps(extra))
    assert run.rc != 0
    assert message in run.output, run.output[-3000:]
    assert run.recap()["gpu01"]["changed"] == 0
