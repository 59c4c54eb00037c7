"""gpu_check.py against recorded NVML and nvidia-smi answers: what CI can check of `make gpu-check`.

Real here: /proc and the started process, labq's NvmlInventory, the GPU-user exporter's collector,
Ansible running the nvidia_driver role's own tasks, a real labqd (Docker test). Recorded: NVML, nvidia-smi,
the PCI scan's sysfs and the driver's version file (tests/gpu_check/data/nvml_two_h100.json).
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import pwd
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gpu_check
import pynvml
import pytest
from recorded_nvml import RecordedNvml

RECORDING = Path(__file__).resolve().parent / "data" / "nvml_two_h100.json"
BASE: dict[str, Any] = json.loads(RECORDING.read_text())
ROLE_QUERY = "--query-gpu=pci.bus_id,name,driver_version --format=csv,noheader"


def holder_user() -> str:
    """Who the started process runs as: nobody when the tests run as root, else the tester."""
    if os.geteuid() == 0 and shutil.which("python3", path="/usr/bin:/bin"):
        return "nobody"
    return pwd.getpwuid(os.getuid()).pw_name


def variant(tmp_path: Path, change: Any) -> Path:
    data = copy.deepcopy(BASE)
    change(data)
    path = tmp_path / "recording.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def metrics_url() -> Iterator[Any]:
    """Serve a GPU metrics exporter's text on loopback; yields a function text -> URL."""
    servers: list[http.server.HTTPServer] = []

    def serve(text: str) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/metrics"

    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


def run(tmp_path: Path, recording: Path, url: str, docker: bool = False) -> dict[str, gpu_check.Row]:
    opts = gpu_check.Options(recording=recording, dcgm_url=url, docker=docker)
    work = tmp_path / "work"
    work.mkdir()
    rows = gpu_check.run_checks(opts, work)
    by_name = {r.check: r for r in rows}
    assert len(by_name) == len(rows), [r.check for r in rows]  # one row per check
    return by_name


def test_recorded_run(tmp_path: Path, metrics_url: Any) -> None:
    rows = run(tmp_path, RECORDING, metrics_url(BASE["dcgm_metrics"]))
    results = {name: r.result for name, r in rows.items()}
    assert results == {
        "labq NVML discovery": "PASS",
        "GPU metrics exporter vs nvidia-smi": "PASS",
        "nvidia_driver role check": "PASS",
        "nvidia_driver check rejects another branch": "PASS",
        "labq sees a foreign process": "PASS",
        "GPU-user exporter series": "PASS",
        "labq gpus shows the foreign process": "SKIP",
        "labq job --gpus 1 sees exactly its GPU": "SKIP",
        "labq job --gpus 0 sees no GPU": "SKIP",
        "computation on the job's GPU": "SKIP",
    }
    uuids = [g["uuid"] for g in BASE["gpus"]]
    assert all(u in rows["labq NVML discovery"].evidence for u in uuids)
    assert "1 process(es) with memory not available" in rows["labq NVML discovery"].evidence
    assert "PCI scan finds 2 GPUs (0000:17:00.0, 0000:65:00.0)" in rows["nvidia_driver role check"].evidence
    assert "branch 550" in rows["nvidia_driver role check"].evidence
    foreign = rows["labq sees a foreign process"].evidence
    assert "GPU 0: pid " in foreign and f"of {holder_user()}, 510 MiB" in foreign
    assert all(
        "--no-docker" in rows[n].evidence
        for n in ("labq gpus shows the foreign process", "computation on the job's GPU")
    )


def test_gpu_user_exporter_shows_the_foreign_process(tmp_path: Path, metrics_url: Any) -> None:
    row = run(tmp_path, RECORDING, metrics_url(BASE["dcgm_metrics"]))["GPU-user exporter series"]
    assert row.result == "PASS", row.evidence
    assert f"user={holder_user()}" in row.evidence and "510 MiB" in row.evidence


def test_recording_answers_only_what_pynvml_has() -> None:
    nvml = RecordedNvml(RECORDING)
    answered = [n for n in dir(type(nvml)) if n.startswith("nvml") and hasattr(nvml, n)]
    assert answered and all(hasattr(pynvml, n) for n in answered)
    assert "nvmlDeviceGetComputeRunningProcesses" in answered
    assert not hasattr(nvml, "nvmlDeviceGetComputeProcesses")  # a name pynvml does not have


def test_gpu_fallen_off_the_bus_fails_the_driver_check(tmp_path: Path, metrics_url: Any) -> None:
    def one_line(data: dict[str, Any]) -> None:
        data["nvidia_smi"][ROLE_QUERY] = data["nvidia_smi"][ROLE_QUERY].splitlines(keepends=True)[0]

    rows = run(tmp_path, variant(tmp_path, one_line), metrics_url(BASE["dcgm_metrics"]))
    row = rows["nvidia_driver role check"]
    assert row.result == "FAIL"
    assert "but the PCI scan found 2 GPUs" in row.evidence  # the role's own fail_msg


def test_other_branch_loaded_fails_the_driver_check(tmp_path: Path, metrics_url: Any) -> None:
    def module_535(data: dict[str, Any]) -> None:
        data["driver_version_file"] = data["driver_version_file"].replace("550.90.07", "535.183.01")

    row = run(tmp_path, variant(tmp_path, module_535), metrics_url(BASE["dcgm_metrics"]))[
        "nvidia_driver role check"
    ]
    assert row.result == "FAIL" and "the branch is 535" in row.evidence


def test_raw_not_available_value_is_shown_without_a_figure(tmp_path: Path, metrics_url: Any) -> None:
    def raw(data: dict[str, Any]) -> None:
        data["gpus"][1]["processes"][0]["usedGpuMemory"] = 2**64 - 1  # as NVML's C API reports it

    row = run(tmp_path, variant(tmp_path, raw), metrics_url(BASE["dcgm_metrics"]))["labq NVML discovery"]
    assert row.result == "PASS", row.evidence  # labq's shared reader (job_queue/gpuprocs.py) guards it
    assert str(2**64 - 1) not in row.evidence
    assert "process(es) with memory not available" in row.evidence


def test_discovery_fails_when_labq_and_nvidia_smi_disagree(tmp_path: Path, metrics_url: Any) -> None:
    def smaller(data: dict[str, Any]) -> None:
        data["gpus"][1]["memory"]["total"] //= 2

    row = run(tmp_path, variant(tmp_path, smaller), metrics_url(BASE["dcgm_metrics"]))["labq NVML discovery"]
    assert row.result == "FAIL" and "GPU 1: 40779 MiB, nvidia-smi 81559 MiB" in row.evidence


def test_metrics_exporter_off_by_more_than_the_tolerance_fails(tmp_path: Path, metrics_url: Any) -> None:
    stale = BASE["dcgm_metrics"].replace('Hostname="gpu01"} 511', 'Hostname="gpu01"} 40960')
    row = run(tmp_path, RECORDING, metrics_url(stale))["GPU metrics exporter vs nvidia-smi"]
    assert row.result == "FAIL" and "memory 40960 MiB, nvidia-smi 511 MiB" in row.evidence


def test_no_metrics_exporter_is_a_skip_with_its_reason(tmp_path: Path) -> None:
    with socket.socket() as s:  # a loopback port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    row = run(tmp_path, RECORDING, f"http://127.0.0.1:{port}/metrics")["GPU metrics exporter vs nvidia-smi"]
    assert row.result == "SKIP" and "role dcgm_exporter (DCGM) is not deployed here" in row.evidence


def test_exit_code_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str], metrics_url: Any) -> None:
    def one_line(data: dict[str, Any]) -> None:
        data["nvidia_smi"][ROLE_QUERY] = data["nvidia_smi"][ROLE_QUERY].splitlines(keepends=True)[0]

    url = metrics_url(BASE["dcgm_metrics"])
    assert (
        gpu_check.main(["--recording", str(variant(tmp_path, one_line)), "--no-docker", "--dcgm-url", url])
        == 1
    )
    out = capsys.readouterr().out
    header = out.splitlines()[1]
    assert header.startswith("check ") and header.endswith(" | result | evidence")
    assert "nvidia_driver role check" in out and "| FAIL   |" in out
    assert "failed (nvidia_driver role check" in out


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_machine_without_gpu_says_so_and_claims_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert "Nothing was checked" in out and "no NVIDIA driver here" in out
    assert "PASS" not in out and "|" not in out


@pytest.mark.docker
def test_labq_gpus_shows_the_foreign_process(tmp_path: Path, metrics_url: Any) -> None:
    """A real labqd (gpus = "nvml", the recording's pynvml) and the real `labq gpus`."""
    row = run(tmp_path, RECORDING, metrics_url(BASE["dcgm_metrics"]), docker=True)[
        "labq gpus shows the foreign process"
    ]
    assert row.result == "PASS", row.evidence
    assert "BUSY outside labq: pid " in row.evidence and f"of {holder_user()} 510 MiB" in row.evidence
