"""The `stack` fixture: a real Prometheus on loopback, configured from
monitoring/prometheus/prometheus.example.yml and the repo's rules, scraping a real
node_exporter, the real labkit GPU-user exporter (no GPU here), and static stand-ins:
the dcgm-exporter, labq and cAdvisor contract samples (tests/monitoring/data/*.prom), and a second
gpu_users target serving what our collector produces with a fake NVML (host "gpusample"), and the
real labkit Slurm exporter replaying Slurm output recorded from a real Slurm (tests/monitoring/mon_slurm.py).

Test modules that use it declare `pytest_plugins = ("mon_stack",)`, so it is one session
fixture for all of them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from mon_fake_nvml import gpu_users_sample
from mon_helpers import (
    MONITORING,
    exporter_env,
    free_port,
    http_ok,
    need_binary,
    running,
    wait_for,
    write_rules,
)
from mon_sinks import StaticExporter
from mon_slurm import replay_bin_dir, slurm_exporter

DATA = Path(__file__).resolve().parent / "data"
TEST_HOST = "testhost"
TEST_GPU_MODEL = "NVIDIA A100-SXM4-80GB"
# A second gpu_users target: our collector's output with a fake NVML (mon_fake_nvml.gpu_users_sample)
GPU_SAMPLE_HOST = "gpusample"


@dataclass
class Stack:
    prometheus: str  # base URL

    def query(self, expr: str) -> dict[str, Any]:
        """Instant query; returns Prometheus' JSON answer whatever its status."""
        resp = requests.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        answer: dict[str, Any] = resp.json()
        return answer

    def series(self, expr: str) -> list[dict[str, Any]]:
        answer = self.query(expr)
        assert answer["status"] == "success", f"{expr}: {answer}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result


def _prometheus_config(tmp: Path, targets: dict[str, list[tuple[int, str]]], prom_port: int) -> Path:
    cfg: dict[str, Any] = yaml.safe_load((MONITORING / "prometheus" / "prometheus.example.yml").read_text())
    cfg["global"].update(scrape_interval="2s", scrape_timeout="2s", evaluation_interval="1s")
    write_rules(tmp / "rules")
    cfg["rule_files"] = [str(tmp / "rules" / "*.rules.yml")]
    cfg.pop("alerting")
    kept = []
    for job in cfg["scrape_configs"]:
        name = job["job_name"]
        if "file_sd_configs" in job:
            groups = [
                {
                    "targets": [f"127.0.0.1:{port}"],
                    "labels": {"host": host, "role": "gpu", "gpu_model": TEST_GPU_MODEL},
                }
                for port, host in targets.get(name, [])
            ]
            target_file = tmp / f"{name}.yml"
            target_file.write_text(yaml.safe_dump(groups))
            job["file_sd_configs"] = [{"files": [str(target_file)]}]
        elif name == "prometheus":
            job["static_configs"][0]["targets"] = [f"127.0.0.1:{prom_port}"]
        else:
            continue  # alertmanager: not running here
        kept.append(job)
    cfg["scrape_configs"] = kept
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = need_binary("prometheus")
    node_exporter = need_binary("prometheus-node-exporter", "node_exporter")
    tmp = tmp_path_factory.mktemp("stack")
    ports = {"node": free_port(), "gpu_users": free_port(), "slurm": free_port()}
    prom_port = free_port()
    dcgm = StaticExporter((DATA / "dcgm_sample.prom").read_text())
    labq = StaticExporter((DATA / "labq_sample.prom").read_text())
    cadvisor = StaticExporter((DATA / "cadvisor_sample.prom").read_text())
    gpu_sample = StaticExporter(gpu_users_sample(tmp))
    ports.update(dcgm=dcgm.port, labq=labq.port, cadvisor=cadvisor.port)
    targets = {job: [(port, TEST_HOST)] for job, port in ports.items()}
    targets["gpu_users"].append((gpu_sample.port, GPU_SAMPLE_HOST))
    (tmp / "textfile").mkdir()
    (tmp / "home").mkdir()
    # The NFS home probe, as the node_exporter role runs it; here /home is a local directory,
    # so it reports 0 and NfsHomeNotMounted must go pending.
    subprocess.run(
        [str(MONITORING / "node" / "labkit-nfs-home-probe")],
        env={
            **os.environ,
            "LABKIT_NFS_PROBE_PATH": str(tmp / "home"),
            "LABKIT_TEXTFILE_DIR": str(tmp / "textfile"),
        },
        check=True,
        capture_output=True,
        timeout=30,
    )
    config = _prometheus_config(tmp, targets, prom_port)
    with contextlib.ExitStack() as stop:
        stop.callback(dcgm.close)
        stop.callback(labq.close)
        stop.callback(cadvisor.close)
        stop.callback(gpu_sample.close)
        stop.enter_context(
            running(
                [
                    node_exporter,
                    f"--web.listen-address=127.0.0.1:{ports['node']}",
                    "--collector.cpu.info",
                    f"--collector.textfile.directory={tmp / 'textfile'}",
                ],
                tmp / "node_exporter.log",
            )
        )
        stop.enter_context(
            running(
                [
                    sys.executable,
                    "-m",
                    "labkit_exporters.gpu_users",
                    "--listen-address",
                    "127.0.0.1",
                    "--port",
                    str(ports["gpu_users"]),
                    "--docker-url",
                    "none",
                ],
                tmp / "gpu_users.log",
                env=exporter_env(),
            )
        )
        stop.enter_context(
            running(
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                tmp / "prometheus.log",
            )
        )
        # The Slurm exporter replaying the "busy" recording: one node down, one drained, GPU jobs pending.
        stop.enter_context(
            slurm_exporter(replay_bin_dir(tmp / "slurm-bin", "busy"), tmp / "slurm.log", port=ports["slurm"])
        )
        s = Stack(prometheus=f"http://127.0.0.1:{prom_port}")
        wait_for(lambda: http_ok(f"{s.prometheus}/-/ready"), timeout=40, what="prometheus ready")

        expected = {(job, host) for job, hosts in targets.items() for _, host in hosts}

        def scraped_twice() -> bool:
            up = {(r["metric"]["job"], r["metric"]["instance"]): r["value"][1] for r in s.series("up")}
            scrapes = {
                (r["metric"]["job"], r["metric"]["instance"]): float(r["value"][1])
                for r in s.series("count_over_time(up[1m])")
            }
            return all(up.get(t) == "1" and scrapes.get(t, 0) >= 2 for t in expected)

        wait_for(scraped_twice, timeout=40, what="all targets scraped twice")
        yield s
