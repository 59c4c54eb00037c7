"""Scrape config example and file-SD targets: promtool, and a real Prometheus using them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import requests
import yaml
from mon_helpers import MONITORING, need_binary, rendered_rules, wait_for, write_rules
from mon_stack import GPU_SAMPLE_HOST, TEST_GPU_MODEL, TEST_HOST, Stack

pytest_plugins = ("mon_stack",)

PROM_DIR = MONITORING / "prometheus"
EXAMPLE = PROM_DIR / "prometheus.example.yml"
TARGETS = sorted((PROM_DIR / "targets").glob("*.yml"))
GPU_JOBS = {"dcgm", "gpu_users"}


def test_promtool_check_config_with_rules_and_targets(tmp_path: Path) -> None:
    """The example as installed: rules/ (rendered with the role's defaults) and targets/ beside it."""
    shutil.copy(EXAMPLE, tmp_path / "prometheus.yml")
    shutil.copytree(PROM_DIR / "targets", tmp_path / "targets")
    rules = write_rules(tmp_path / "rules")
    result = subprocess.run(
        [need_binary("promtool"), "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rule files found" in result.stdout


def test_every_file_sd_job_has_its_target_file() -> None:
    cfg = yaml.safe_load(EXAMPLE.read_text())
    files = {f for job in cfg["scrape_configs"] for sd in job.get("file_sd_configs", []) for f in sd["files"]}
    assert files == {f"targets/{p.name}" for p in TARGETS}


@pytest.mark.parametrize("path", TARGETS, ids=[p.stem for p in TARGETS])
def test_target_labels(path: Path) -> None:
    node_hosts = {
        g["labels"]["host"]: g["labels"] for g in yaml.safe_load((PROM_DIR / "targets/node.yml").read_text())
    }
    for group in yaml.safe_load(path.read_text()):
        labels = group["labels"]
        assert set(labels) <= {"host", "role", "gpu_model"}
        assert labels["host"] and labels["role"]
        for target in group["targets"]:
            assert target.split(".")[0].split(":")[0] == labels["host"], "target and host label disagree"
        assert labels == node_hosts[labels["host"]], "a host has the same labels in every job"
        if path.stem in GPU_JOBS:
            assert labels.get("gpu_model"), f"{path.name}: GPU hosts carry gpu_model"


def test_real_prometheus_targets_carry_host_labels(stack: Stack) -> None:
    active = requests.get(f"{stack.prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert {t["labels"]["job"] for t in active} == {
        "node",
        "gpu_users",
        "dcgm",
        "labq",
        "cadvisor",
        "slurm",
        "prometheus",
    }
    for target in active:
        assert target["health"] == "up", target
        assert target["labels"]["instance"] == target["labels"]["host"]  # instance = host, whatever the port
        if target["labels"]["job"] != "prometheus":
            assert target["labels"]["gpu_model"] == TEST_GPU_MODEL
    assert {t["labels"]["instance"] for t in active if t["labels"]["job"] == "node"} == {TEST_HOST}
    assert {r["metric"]["instance"] for r in stack.series('up{job="gpu_users"}')} == {
        TEST_HOST,
        GPU_SAMPLE_HOST,
    }


def test_labq_job_label_is_stored_as_labq_job(stack: Stack) -> None:
    rows = stack.series("labq_gpu_allocated")
    assert {r["metric"]["labq_job"] for r in rows} == {"17", "18"}
    assert all(r["metric"]["job"] == "labq" and "exported_job" not in r["metric"] for r in rows)


def test_rules_load_and_evaluate_in_real_prometheus(stack: Stack) -> None:
    groups = requests.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    expected = sum(
        len(g["rules"]) for text in rendered_rules().values() for g in yaml.safe_load(text)["groups"]
    )
    assert len(rules) == expected
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] not in ("ok", "unknown")]
    assert bad == []


def test_alerts_go_pending_on_this_gpu_less_host(stack: Stack) -> None:
    """Real exporters + contract samples make some alerts pending (their `for` keeps them from firing)."""

    def pending() -> set[tuple[str, str]]:
        alerts = requests.get(f"{stack.prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        return {(a["labels"]["alertname"], a["labels"].get("instance", "")) for a in alerts}

    expected = {
        ("GpuDriverUnavailable", TEST_HOST),  # our exporter: nvml_up 0 on a host labelled with a GPU model
        ("NfsHomeNotMounted", TEST_HOST),  # the probe found no NFS on its (local) home directory
        ("JobQueueStuck", TEST_HOST),  # sample: 2 pending jobs, 5 free GPUs
        ("GpuAllocatedIdle", TEST_HOST),  # sample: bob's GPU 1 at 0 %
        ("SlurmNodeDown", TEST_HOST),  # recording: slurmrec2 down (not responding)
        ("SlurmNodeDrained", TEST_HOST),  # recording: slurmrec3 drained
        ("SlurmJobsPendingWhileGpusFree", TEST_HOST),  # recording: GPU jobs wait, slurmrec has 1 free
    }
    got = wait_for(
        lambda: pending() if expected <= pending() else None, timeout=15, what=f"pending {expected}"
    )
    assert ("NodeDown", TEST_HOST) not in got
    assert ("ExporterDown", TEST_HOST) not in got
