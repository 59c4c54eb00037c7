"""Cost of labkit's alert rules at lab scale.

Backfills a synthetic history (node, dcgm, labq and GPU-user exporter series for N hosts with
G GPUs each, one sample per --step over --hours) into a fresh TSDB with
`promtool tsdb create-blocks-from openmetrics`, starts a real Prometheus on 127.0.0.1 on that
TSDB (no scraping), and times every alert rule of monitoring/prometheus/rules (rendered) as an
instant query at the end of the history.  Also times `promtool test rules` on the unit tests.

    .venv/bin/python bench/bench_alerts.py --hosts 10 --gpus 4 --hours 24

Prints one line per rule: median and max latency over --repeat runs, and how many series the
expression returns (a sanity check: the history contains a lost GPU, a hot GPU, an idle
allocated GPU, and one host that is down).
"""

from __future__ import annotations

import argparse
import math
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
TESTS_DIR = REPO / "monitoring" / "prometheus" / "tests"
sys.path.insert(0, str(REPO / "monitoring" / "prometheus"))
import render_rules  # noqa: E402  (the rule templates, rendered with the monitoring_server role's defaults)


def labels(**kv: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in kv.items()) + "}"


def samples(hosts: int, gpus: int, hours: float, step: int, end: int) -> Iterator[str]:
    """OpenMetrics lines, all series at each timestamp; deterministic."""
    start = end - int(hours * 3600)
    cpus = 16
    for ts in range(start, end + 1, step):
        t = ts - start
        for h in range(hosts):
            host = f"gpu{h + 1:02d}"
            base = {"instance": host, "host": host, "role": "gpu", "gpu_model": "NVIDIA A100-SXM4-80GB"}
            down = h == hosts - 1 and t > hours * 3600 * 0.9  # last host goes down near the end
            yield f"up{labels(job='node', **base)} {0 if down else 1} {ts}"
            for job in ("dcgm", "gpu_users", "labq"):
                yield f"up{labels(job=job, **base)} {0 if down else 1} {ts}"
            if down:
                continue
            node = {"job": "node", **base}
            for mount, dev, size in (("/", "/dev/nvme0n1p2", 200e9), ("/scratch", "/dev/md0", 8e12)):
                fs = labels(device=dev, mountpoint=mount, fstype="ext4", **node)
                avail = size * (0.5 - 0.3 * t / (hours * 3600) * (h % 3 == 0))
                yield f"node_filesystem_size_bytes{fs} {size} {ts}"
                yield f"node_filesystem_avail_bytes{fs} {avail:.0f} {ts}"
                yield f"node_filesystem_readonly{fs} 0 {ts}"
            yield f"labkit_nfs_home_ok{labels(path='/home', **node)} {0 if h == 3 else 1} {ts}"
            yield f"labkit_nfs_home_probe_timestamp_seconds{labels(**node)} {ts} {ts}"
            yield f"node_memory_MemTotal_bytes{labels(**node)} 512e9 {ts}"
            mem_avail = 300e9 + 50e9 * math.sin(t / 3600)
            yield f"node_memory_MemAvailable_bytes{labels(**node)} {mem_avail:.0f} {ts}"
            yield f"node_load15{labels(**node)} {8 + 4 * math.sin(t / 1800):.2f} {ts}"
            for c in range(cpus):
                yield f"node_cpu_seconds_total{labels(cpu=str(c), mode='idle', **node)} {t * 0.6:.1f} {ts}"
            yield f"node_timex_offset_seconds{labels(**node)} 0.0001 {ts}"
            yield f"node_timex_sync_status{labels(**node)} 1 {ts}"
            yield f"node_timex_maxerror_seconds{labels(**node)} 0.01 {ts}"
            yield f"labkit_gpu_nvml_up{labels(job='gpu_users', **base)} 1 {ts}"
            free = 0
            for g in range(gpus):
                lost = h == 0 and g == gpus - 1 and t > hours * 3600 * 0.8  # host 1 loses a GPU
                if lost:
                    continue
                uuid = f"GPU-{h:04d}{g:04d}-0000-0000-0000-000000000000"
                dcgm = labels(
                    gpu=str(g),
                    UUID=uuid,
                    modelName="NVIDIA A100-SXM4-80GB",
                    Hostname=host,
                    job="dcgm",
                    **base,
                )
                idle = g == 0  # GPU 0 of every host: allocated and idle
                yield f"DCGM_FI_DEV_GPU_UTIL{dcgm} {0 if idle else 80 + (t // step) % 20} {ts}"
                yield f"DCGM_FI_DEV_GPU_TEMP{dcgm} {90 if (h == 1 and g == 1) else 65} {ts}"
                yield f"DCGM_FI_DEV_CLOCK_THROTTLE_REASONS{dcgm} {64 if (h == 1 and g == 1) else 4} {ts}"
                yield f"DCGM_FI_DEV_XID_ERRORS{dcgm} 0 {ts}"
                yield f"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL{dcgm} 0 {ts}"
                if g % 2 == 0:
                    alloc = labels(
                        gpu=str(g), uuid=uuid, user=f"user{g}", labq_job=f"{h}{g}", job="labq", **base
                    )
                    yield f"labq_gpu_allocated{alloc} 1 {ts}"
                else:
                    free += 1
            labq = {"job": "labq", **base}
            yield f"labq_jobs{labels(state='pending', user='alice', **labq)} {1 if h == 2 else 0} {ts}"
            yield f"labq_gpus{labels(state='free', **labq)} {free} {ts}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alert_rules() -> list[tuple[str, str, str]]:
    rules = []
    for _name, text in sorted(render_rules.render().items()):
        for group in yaml.safe_load(text)["groups"]:
            for r in group["rules"]:
                rules.append((r["alert"], r["labels"]["severity"], " ".join(r["expr"].split())))
    return rules


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=10)
    p.add_argument("--gpus", type=int, default=4)
    p.add_argument("--hours", type=float, default=24)
    p.add_argument("--step", type=int, default=60, help="seconds between samples (default 60)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    promtool, prometheus = shutil.which("promtool"), shutil.which("prometheus")
    if not promtool or not prometheus:
        print("needs promtool and prometheus (apt: prometheus)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="bench_alerts.") as tmp_name:
        tmp = Path(tmp_name)
        end = int(time.time()) // 60 * 60 - 3600  # an hour ago: outside the head block
        t0 = time.monotonic()
        lines = 0
        with (tmp / "data.om").open("w") as out:
            for line in samples(args.hosts, args.gpus, args.hours, args.step, end):
                out.write(line + "\n")
                lines += 1
            out.write("# EOF\n")
        t1 = time.monotonic()
        subprocess.run(
            [promtool, "tsdb", "create-blocks-from", "openmetrics", str(tmp / "data.om"), str(tmp / "tsdb")],
            check=True,
            capture_output=True,
        )
        t2 = time.monotonic()
        print(
            f"history: {lines} samples, {args.hosts} hosts x {args.gpus} GPUs, "
            f"{args.hours} h at {args.step} s"
        )
        print(f"generate {t1 - t0:.1f} s, backfill {t2 - t1:.1f} s")

        port = free_port()
        (tmp / "prometheus.yml").write_text("global: {evaluation_interval: 1m}\n")
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                "--storage.tsdb.retention.time=30d",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                try:
                    if requests.get(f"{url}/-/ready", timeout=1).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.1)
            print(f"\n{'alert':28} {'severity':9} {'median ms':>9} {'max ms':>8} {'series':>6}")
            for name, severity, expr in alert_rules():
                times: list[float] = []
                result: Any = None
                for _ in range(args.repeat):
                    s = time.perf_counter()
                    result = requests.get(
                        f"{url}/api/v1/query", params={"query": expr, "time": str(end)}, timeout=60
                    ).json()
                    times.append((time.perf_counter() - s) * 1000)
                n = len(result["data"]["result"]) if result and result["status"] == "success" else "error"
                print(f"{name:28} {severity:9} {statistics.median(times):9.1f} {max(times):8.1f} {n!s:>6}")
        finally:
            proc.terminate()
            proc.wait(timeout=10)

        # the unit tests' `../rules/` is the rendered rules
        render_rules.write(tmp / "rules")
        shutil.copytree(TESTS_DIR, tmp / "tests")
        s = time.perf_counter()
        subprocess.run(
            [promtool, "test", "rules", *sorted(f.name for f in TESTS_DIR.glob("*.test.yml"))],
            check=True,
            capture_output=True,
            cwd=tmp / "tests",
        )
        print(f"\npromtool test rules (unit tests): {time.perf_counter() - s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
