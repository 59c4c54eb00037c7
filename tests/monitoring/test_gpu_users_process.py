"""The real exporter process on this GPU-less machine: it serves, says nvml_up 0, and stops cleanly."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import requests
from mon_helpers import exporter_env, free_port, running, wait_for
from prometheus_client.parser import text_string_to_metric_families


def test_exporter_process_on_host_without_gpu(tmp_path: Path) -> None:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "labkit_exporters.gpu_users",
        "--listen-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--proc-root",
        str(tmp_path),
        "--docker-url",
        "none",
    ]
    url = f"http://127.0.0.1:{port}/metrics"
    with running(cmd, tmp_path / "exporter.log", env=exporter_env()) as proc:
        text = wait_for(lambda: requests.get(url, timeout=2).text, what="exporter /metrics")
        again = requests.get(url, timeout=2).text  # a second scrape does not crash it either
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(again)
        for s in fam.samples
    }
    assert samples[("labkit_gpu_nvml_up", ())] == 0
    assert {name for name, _ in samples} == {"labkit_gpu_nvml_up", "labkit_gpu_exporter_errors_total"}
    assert "labkit_gpu_nvml_up 0.0" in text


def test_exporter_cli_help_documents_options() -> None:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "labkit_exporters.gpu_users", "--help"],
        env=exporter_env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    for option in ("--port", "--listen-address", "--proc-root", "--docker-url"):
        assert option in out
