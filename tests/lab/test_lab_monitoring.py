"""The monitoring stack in the lab: Prometheus scraping every host, dashboards' queries answered,
and a stopped host reaching "Slack" (a receiver on this machine's lab address) and resolving again."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from labctl import docker_client, wait_for_systemd
from mon_dashboards import sources_used, targets
from mon_sinks import SlackSink

pytestmark = [pytest.mark.lab, pytest.mark.slow]

HOSTS = ("infra01", "gpu01", "gpu02")
RECEIVER = ("172.30.57.1", 18080)  # monitoring_server_slack_webhook_url in inventory/lab


@pytest.fixture(scope="module")
def prometheus(lab: dict[str, Any]) -> str:
    return f"http://{lab['infra01']['address']}:9090"


def query(prometheus: str, expr: str) -> dict[str, Any]:
    answer: dict[str, Any] = requests.get(
        f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10
    ).json()
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


def test_rules_are_loaded_with_the_labs_values(prometheus):
    groups = requests.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
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
    # The lab scrapes node_exporter and Prometheus itself; panels fed by DCGM, labq or the GPU-user
    # exporter (no GPUs here) are checked for valid PromQL only.
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
