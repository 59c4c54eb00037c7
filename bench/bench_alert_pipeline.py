"""Alert pipeline latency in the local lab: a host stops -> the Slack receiver gets NodeDown.

Needs the converged lab (`make lab`). Stops gpu02 N times (default 2) and measures, each time:
  stop -> NodeDown message at the receiver, and start -> resolved message,
and prints them beside the lab's configured `for:`, scrape interval and group_wait, so the part the
pipeline adds on top of the configured delay is visible.

    .venv/bin/python bench/bench_alert_pipeline.py --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tools"), str(REPO / "tests" / "monitoring")]

from labkit_lab.lab import docker_client, wait_for_systemd  # noqa: E402
from mon_sinks import SlackSink  # noqa: E402

SETTINGS = REPO / "inventory" / "lab" / "group_vars" / "monitoring_servers" / "monitoring.yml"


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in ("ms", "s", "m", "h"):
        if duration.endswith(unit):
            return float(duration[: -len(unit)]) * units[unit]
    raise ValueError(duration)


def wait_message(sink: SlackSink, resolved: bool, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        _path, body = sink.next(timeout=left)
        text = str(body)
        if "NodeDown" in text and "gpu02" in text and resolved == ("RESOLVED" in text.upper()):
            return time.monotonic()
    raise TimeoutError("no message")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not (REPO / "inventory" / "lab" / "hosts.yml").exists():
        print("bench_alert_pipeline: the lab is not up (make lab); skipped")
        return 0
    settings = yaml.safe_load(SETTINGS.read_text())
    configured_for = seconds(settings["monitoring_server_node_down_for"])
    scrape = seconds(settings["monitoring_server_scrape_interval"])
    group_wait = seconds(settings["monitoring_server_group_wait"])
    host, port = settings["monitoring_server_slack_webhook_url"].split("//")[1].split("/")[0].split(":")
    container = docker_client().containers.get("labkit-gpu02")
    fire, resolve = [], []
    sink = SlackSink(host, int(port))
    try:
        for _ in range(args.rounds):
            stopped = time.monotonic()
            subprocess.run(["docker", "stop", "labkit-gpu02"], check=True, capture_output=True)
            try:
                fire.append(wait_message(sink, resolved=False, timeout=300) - stopped)
            finally:
                started = time.monotonic()
                subprocess.run(["docker", "start", "labkit-gpu02"], check=True, capture_output=True)
                wait_for_systemd(container)
            resolve.append(wait_message(sink, resolved=True, timeout=300) - started)
    finally:
        sink.close()
    fire_med, res_med = statistics.median(fire), statistics.median(resolve)
    print(f"configured: for={configured_for:.0f}s scrape_interval={scrape:.0f}s group_wait={group_wait:.0f}s")
    print(f"host stopped -> NodeDown at Slack: median {fire_med:.1f}s  max {max(fire):.1f}s")
    print(f"  ratio to for: {fire_med / configured_for:.2f}  (overhead {fire_med - configured_for:.1f}s)")
    print(f"host started -> resolved at Slack: median {res_med:.1f}s  max {max(resolve):.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
