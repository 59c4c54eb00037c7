"""The monitoring stack in the lab: Prometheus scraping every host and exporter (node_exporter, cAdvisor,
the GPU-user exporter, labqd), dashboards' queries answered (the job queue's and "who uses which GPU"
while a student's labq job runs on a fake GPU), the job's container seen by cAdvisor with its labq labels,
bad exporter settings refused, and a stopped host reaching "Slack" (a receiver on this machine's lab
address) and resolving again."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from lab_helpers import Portal, lab_portal, run_playbook, ssh
from labkit_lab.lab import docker_client, wait_for_systemd
from mon_dashboards import sources_used, targets
from mon_sinks import SlackSink

pytestmark = [pytest.mark.lab, pytest.mark.slow]

HOSTS = ("infra01", "gpu01", "gpu02")
GPU_NODES = ("gpu01", "gpu02")
ROLE = {"infra01": "infra", "gpu01": "gpu", "gpu02": "gpu"}
# Exporter jobs besides `node` and the hosts that run them in the lab (inventory/lab: docker_hosts is
# gpu_nodes + monitoring_servers; no DCGM without GPUs).
EXPORTERS = {"cadvisor": HOSTS, "gpu_users": GPU_NODES, "labq": GPU_NODES, "postgres": ("infra01",)}
# What the blackbox exporter on the portal's host (infra01) probes (the inventory's probes).
PROBES = {
    "portal": "https://infra01.lab.test/",
    "mlflow": "http://127.0.0.1:5000/health",
    "optuna_dashboard": "http://127.0.0.1:8080/-/healthy",
}
# An image with dash and sleep, imported inside gpu01 (no registry); labq's allow-list takes labkit-*.
SLEEP_IMAGE = "labkit-monsleep:1"
IMPORT_SLEEP_IMAGE = f"""set -e
root=$(mktemp -d)
for b in /bin/dash /bin/sleep; do cp --parents -L "$b" $(ldd "$b" | grep -o '/[^ ]*') "$root"; done
chmod -R a+rX "$root"
tar -C "$root" -c . | docker import - {SLEEP_IMAGE} >/dev/null
rm -rf "$root"
"""
# Panels of the job queue and GPU-user dashboards that the lab can feed while a labq job runs on a fake
# GPU (no real GPU: per-process GPU memory and DCGM stay empty, and nothing is pending).
LAB_ANSWERABLE = {
    ("labkit-cluster-overview", "NVML working (GPU-user exporter)"),
    ("labkit-gpu-users", "Allocations now (labq)"),
    ("labkit-gpu-users", "GPU owner over time (labq)"),
    ("labkit-job-queue", "Running jobs"),
    ("labkit-job-queue", "GPUs by state"),
    ("labkit-job-queue", "Running jobs by node"),
    ("labkit-job-queue", "Running jobs by user"),
    ("labkit-job-queue", "Allocated GPUs by node and user"),
    ("labkit-job-queue", "Wait time before start (median, 90th percentile)"),
    ("labkit-job-queue", "Job containers' CPU by user (cAdvisor)"),
    ("labkit-job-queue", "Job containers' memory by user (cAdvisor)"),
}
RECEIVER = ("172.30.57.1", 18080)  # monitoring_server_slack_webhook_url in inventory/lab


@pytest.fixture(scope="module")
def prometheus(lab: dict[str, Any]) -> Portal:
    """Prometheus through the web portal, as a lab admin: it listens on infra01's loopback only."""
    return lab_portal(lab["infra01"]["address"])


def query(prometheus: Portal, expr: str) -> dict[str, Any]:
    answer: dict[str, Any] = prometheus.get("/prometheus/api/v1/query", params={"query": expr}).json()
    return answer


def wait_until(check, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def test_every_host_is_scraped_with_readable_labels(prometheus):
    def all_up():
        result = query(prometheus, 'up{job="node"} == 1')["data"]["result"]
        return {r["metric"]["instance"]: r["metric"] for r in result} if len(result) == len(HOSTS) else None

    series = wait_until(all_up, 60, "node_exporter up on every host")
    assert set(series) == set(HOSTS)
    assert series["gpu01"]["role"] == "gpu" and series["infra01"]["role"] == "infra"


@pytest.mark.parametrize("job", sorted(EXPORTERS))
def test_every_exporter_is_scraped_with_readable_labels(prometheus, job):
    def all_up():
        result = query(prometheus, f'up{{job="{job}"}} == 1')["data"]["result"]
        return (
            {r["metric"]["instance"]: r["metric"] for r in result}
            if len(result) == len(EXPORTERS[job])
            else None
        )

    series = wait_until(all_up, 90, f"{job} up on {', '.join(EXPORTERS[job])}")
    assert set(series) == set(EXPORTERS[job])
    for host, labels in series.items():
        assert labels["host"] == host and labels["role"] == ROLE[host], labels


def test_the_experiment_services_are_probed_and_the_database_watched(prometheus):
    # Blackbox probes: every service answers, `instance` is the URL, the portal's certificate (the lab
    # CA's, trusted by the probe) has its expiry; PostgreSQL is up with each member's connection limit.
    def probed():
        result = query(prometheus, 'probe_success{job="blackbox"}')["data"]["result"]
        found = {r["metric"]["service"]: r for r in result}
        return found if set(found) == set(PROBES) and all(r["value"][1] == "1" for r in result) else None

    found = wait_until(probed, 120, f"probes of {', '.join(PROBES)} succeeding")
    for service, series in found.items():
        assert series["metric"]["instance"] == PROBES[service] and series["metric"]["host"] == "infra01"
    days = query(prometheus, 'min((probe_ssl_earliest_cert_expiry{service="portal"} - time()) / 86400)')
    assert 20 < float(days["data"]["result"][0]["value"][1]) < 900, days
    assert [r["value"][1] for r in query(prometheus, 'pg_up{job="postgres"}')["data"]["result"]] == ["1"]
    limits = query(prometheus, 'pg_role_connection_limit{job="postgres"}')["data"]["result"]
    by_role = {r["metric"]["rolname"]: r["value"][1] for r in limits}
    assert by_role.get("alice") == "20" and by_role.get("postgres_exporter") == "5", by_role


def test_gpu_user_exporter_says_no_gpu_and_keeps_running(prometheus, host_exec):
    result = query(prometheus, 'labkit_gpu_nvml_up{job="gpu_users"}')["data"]["result"]
    assert {r["metric"]["instance"]: r["value"][1] for r in result} == {"gpu01": "0", "gpu02": "0"}
    for node in GPU_NODES:
        state = host_exec(
            node, "systemctl", "show", "labkit-gpu-user-exporter", "-p", "ActiveState", "-p", "User"
        )
        assert set(state.stdout.split()) == {"ActiveState=active", "User=labkit-gpu-exporter"}, state.stdout


def labq(lab, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    return ssh(lab["gpu01"]["address"], user, shlex.join(["labq", *args]))


@pytest.fixture(scope="module")
def running_job(lab, host_exec) -> Iterator[str]:
    """alice's labq job on gpu01, running (a fake GPU) while the module's checks look at it."""
    out = host_exec("gpu01", "bash", "-c", IMPORT_SLEEP_IMAGE)
    assert out.returncode == 0, out.stderr
    sub = labq(
        lab,
        "alice",
        "submit",
        "--json",
        "--gpus",
        "1",
        "--image",
        SLEEP_IMAGE,
        "--name",
        "mon-sleep",
        "--",
        "/bin/sleep",
        "600",
    )
    assert sub.returncode == 0, sub.stderr
    job_id = str(json.loads(sub.stdout)["ids"][0])

    def running():
        show = labq(lab, "alice", "show", job_id, "--json")
        assert show.returncode == 0, show.stderr
        job = json.loads(show.stdout)
        assert job["state"] in ("pending", "starting", "running"), job
        return job["state"] == "running"

    try:
        wait_until(running, 60, f"labq job {job_id} running")
        yield job_id
    finally:
        labq(lab, "alice", "cancel", job_id)


def test_running_job_is_seen_by_labq_and_cadvisor_with_its_owner(prometheus, running_job):
    def allocation():
        result = query(prometheus, f'labq_gpu_allocated{{instance="gpu01", labq_job="{running_job}"}}')
        return result["data"]["result"]

    alloc = wait_until(allocation, 60, "labq_gpu_allocated of the job")[0]["metric"]
    assert alloc["user"] == "alice" and alloc["uuid"].startswith("GPU-fake-"), alloc

    def container():
        labels = f'job="cadvisor", instance="gpu01", container_label_labq_job="{running_job}"'
        expr = f"container_last_seen{{{labels}}}"
        return query(prometheus, expr)["data"]["result"]

    seen = wait_until(container, 90, "cAdvisor series of the job's container")[0]["metric"]
    assert seen["container_label_labq_user"] == "alice", seen
    assert seen["image"] == SLEEP_IMAGE and seen["role"] == "gpu", seen
    memory = query(prometheus, f'container_memory_usage_bytes{{container_label_labq_job="{running_job}"}}')
    assert memory["data"]["result"], "no memory series for the job's container"


ANSWERABLE = [t for t in targets() if (t.dashboard, t.panel) in LAB_ANSWERABLE]


@pytest.mark.parametrize("t", ANSWERABLE, ids=[f"{t.dashboard}:{t.panel}:{t.ref}" for t in ANSWERABLE])
def test_job_queue_and_gpu_user_panels_show_the_running_job(prometheus, running_job, t):
    answer = wait_until(lambda: query(prometheus, t.expr)["data"]["result"], 60, f"series for {t.expr!r}")
    assert answer


def test_the_answerable_panels_exist():
    assert {(t.dashboard, t.panel) for t in ANSWERABLE} == LAB_ANSWERABLE


@pytest.mark.parametrize(
    ("playbook", "tag", "extra", "variable"),
    [
        ("monitoring.yml", "cadvisor", {"cadvisor_tag": "latest"}, "cadvisor_tag"),
        ("monitoring.yml", "cadvisor", {"cadvisor_port": 80}, "cadvisor_port"),
        (
            "monitoring.yml",
            "cadvisor",
            {"cadvisor_housekeeping_interval": "15"},
            "cadvisor_housekeeping_interval",
        ),
        ("monitoring.yml", "cadvisor", {"cadvisor_disable_metrics": ["gpu"]}, "cadvisor_disable_metrics"),
        ("gpu_nodes.yml", "gpu_user_exporter", {"gpu_user_exporter_user": "root"}, "gpu_user_exporter_user"),
        (
            "gpu_nodes.yml",
            "gpu_user_exporter",
            {"gpu_user_exporter_docker_url": "/var/run/docker.sock"},
            "gpu_user_exporter_docker_url",
        ),
        (
            "gpu_nodes.yml",
            "gpu_user_exporter",
            {"gpu_user_exporter_extras": ["cuda"]},
            "gpu_user_exporter_extras",
        ),
    ],
    ids=[
        "cadvisor-unpinned",
        "cadvisor-port",
        "cadvisor-duration",
        "cadvisor-metric",
        "exporter-root",
        "exporter-docker-url",
        "exporter-extra",
    ],
)
def test_bad_exporter_input_is_refused_before_any_change(lab, host_exec, playbook, tag, extra, variable):
    units = ("/etc/systemd/system/cadvisor.service", "/etc/systemd/system/labkit-gpu-user-exporter.service")
    before = host_exec("gpu01", "cat", *units).stdout
    run = run_playbook(playbook, "-l", "gpu01", "--tags", tag, "-e", json.dumps(extra))
    assert run.rc != 0
    assert variable in run.output, run.output[-3000:]
    assert run.recap()["gpu01"]["changed"] == 0
    assert host_exec("gpu01", "cat", *units).stdout == before


def test_rules_are_loaded_with_the_labs_values(prometheus):
    groups = prometheus.get("/prometheus/api/v1/rules").json()["data"]["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert rules["NodeDown"]["duration"] == 30
    assert all(r["health"] == "ok" for r in rules.values()), [
        r["name"] for r in rules.values() if r["health"] != "ok"
    ]


TARGETS = targets()


@pytest.mark.parametrize("t", TARGETS, ids=[f"{t.dashboard}:{t.panel}:{t.ref}" for t in TARGETS])
def test_dashboard_queries_against_the_lab(prometheus, t):
    answer = query(prometheus, t.expr)
    assert answer["status"] == "success", f"{t.expr!r}: {answer.get('error')}"
    # Panels fed by node_exporter and Prometheus itself must show the lab; those fed by DCGM (no GPUs
    # here), labq, cAdvisor or the GPU-user exporter are checked for valid PromQL here, and with a
    # running labq job in test_job_queue_and_gpu_user_panels_show_the_running_job.
    if not sources_used(t.expr):
        assert answer["data"]["result"], f"no series in the lab for {t.expr!r}"


@pytest.fixture
def slack() -> Iterator[SlackSink]:
    sink = SlackSink(*RECEIVER)
    yield sink
    sink.close()


def next_message(slack: SlackSink, status: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        _path, body = slack.next(timeout=left)
        text = str(body)
        if "NodeDown" in text and "gpu02" in text and (status == "resolved") == ("RESOLVED" in text.upper()):
            return body
    pytest.fail(f"no {status} NodeDown message for gpu02 within {timeout:.0f} s")


@pytest.mark.disruptive
def test_a_stopped_host_pages_slack_and_resolves(lab, slack, prometheus):
    subprocess.run(["docker", "stop", "labkit-gpu02"], check=True, capture_output=True)
    try:
        firing = next_message(slack, "firing", timeout=180)
    finally:
        subprocess.run(["docker", "start", "labkit-gpu02"], check=True, capture_output=True)
        wait_for_systemd(docker_client().containers.get("labkit-gpu02"))
    attachment = firing["attachments"][0]
    text = " ".join(str(attachment.get(k, "")) for k in ("title", "text", "fallback"))
    assert "gpu02" in text
    assert "docs/runbooks/NodeDown.md" in str(firing)
    assert "FIRING" in attachment["title"].upper()
    resolved = next_message(slack, "resolved", timeout=180)
    assert "gpu02" in str(resolved)
