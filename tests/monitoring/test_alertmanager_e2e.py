"""A real Alertmanager on loopback, with our config, notifying a local Slack webhook and SMTP relay."""

from __future__ import annotations

import email
import email.policy
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from mon_helpers import ALERTMANAGER_DIR, free_port, http_ok, need_binary, running, wait_for
from mon_sinks import SlackSink, SmtpSink

RUNBOOK = "https://git.lab.example.org/labkit/labkit/-/blob/main/docs/runbooks/GpuTemperatureHigh.md"
WEBHOOK_PATH = "/services/T0LAB/B0LAB/not-a-real-secret"


@pytest.fixture
def slack() -> Iterator[SlackSink]:
    sink = SlackSink()
    yield sink
    sink.close()


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    yield sink
    sink.close()


@pytest.fixture
def alertmanager(tmp_path: Path, slack: SlackSink, smtp: SmtpSink) -> Iterator[str]:
    binary = need_binary("prometheus-alertmanager", "alertmanager")
    secret = tmp_path / "slack_webhook_url"
    secret.write_text(f"http://127.0.0.1:{slack.port}{WEBHOOK_PATH}\n")
    cfg = yaml.safe_load((ALERTMANAGER_DIR / "alertmanager.example.yml").read_text())
    # Only the paths of this machine and short timings differ from the shipped example.
    cfg["global"]["slack_api_url_file"] = str(secret)
    cfg["global"]["smtp_smarthost"] = f"127.0.0.1:{smtp.port}"
    cfg["route"].update(group_wait="1s", group_interval="1s", repeat_interval="1h")
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(cfg))
    shutil.copytree(ALERTMANAGER_DIR / "templates", tmp_path / "templates")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        binary,
        f"--config.file={tmp_path / 'alertmanager.yml'}",
        f"--storage.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
    ]
    with running(cmd, tmp_path / "alertmanager.log") as proc:
        wait_for(lambda: http_ok(f"{url}/-/ready"), timeout=40, what="alertmanager ready")
        yield url
        assert proc.poll() is None, (tmp_path / "alertmanager.log").read_text()


def alert(
    name: str, severity: str, instance: str, ends: datetime | None = None, **labels: str
) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "labels": {"alertname": name, "severity": severity, "instance": instance, **labels},
        "annotations": {
            "summary": f"{name} on {instance}",
            "description": f"test alert {name} on {instance}",
            "value": "94",
            "runbook_url": f"https://git.lab.example.org/labkit/labkit/-/blob/main/docs/runbooks/{name}.md",
        },
        "startsAt": (now - timedelta(minutes=1)).isoformat(),
        "endsAt": (ends or now + timedelta(hours=1)).isoformat(),
    }


def post(url: str, *alerts: dict[str, Any]) -> None:
    requests.post(f"{url}/api/v2/alerts", json=list(alerts), timeout=5).raise_for_status()


def test_slack_and_email_firing_then_resolved(alertmanager: str, slack: SlackSink, smtp: SmtpSink) -> None:
    # `lab` is Prometheus' external label, attached to every alert it sends
    gpu_hot = alert(
        "GpuTemperatureHigh",
        "critical",
        "gpu07",
        gpu="3",
        UUID="GPU-77aa",
        modelName="H100",
        lab="vision-lab",
    )
    post(alertmanager, gpu_hot)

    path, payload = slack.next()
    assert path == WEBHOOK_PATH  # the URL came from slack_api_url_file
    assert payload["channel"] == "#lab-alerts"
    (attachment,) = payload["attachments"]
    assert attachment["title"] == "[FIRING:1] vision-lab: GpuTemperatureHigh on gpu07"
    assert attachment["title_link"] == RUNBOOK
    assert attachment["color"] == "danger"
    text = attachment["text"]
    for line in (
        "*CRITICAL*: GpuTemperatureHigh on gpu07",
        "Host: gpu07",
        "GPU: 3 (H100) GPU-77aa",
        "Value: 94",
    ):
        assert line in text
    assert f"Runbook: {RUNBOOK}" in text

    mail = email.message_from_string(smtp.next()["data"], policy=email.policy.default)
    assert mail["To"] == "cluster-admins@vision.uni.example"
    assert mail["Subject"] == "[FIRING:1] vision-lab: GpuTemperatureHigh on gpu07"
    assert f"Runbook: {RUNBOOK}" in mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]

    gpu_hot["endsAt"] = datetime.now(UTC).isoformat()
    post(alertmanager, gpu_hot)
    _, payload = slack.next()
    (attachment,) = payload["attachments"]
    assert attachment["title"] == "[RESOLVED] vision-lab: GpuTemperatureHigh on gpu07"
    assert attachment["color"] == "good"
    assert "*RESOLVED*: GpuTemperatureHigh on gpu07" in attachment["text"]
    mail = email.message_from_string(smtp.next()["data"], policy=email.policy.default)
    assert mail["Subject"] == "[RESOLVED] vision-lab: GpuTemperatureHigh on gpu07"
    assert "Resolved: " in mail.get_body(("plain",)).get_content()  # type: ignore[union-attr]


def test_inhibition_node_down_and_critical_over_warning(alertmanager: str, slack: SlackSink) -> None:
    # Sources first: Alertmanager's inhibitor learns of alerts asynchronously, and with the
    # test's 1 s group_wait a target posted in the same request could be flushed before it.
    post(
        alertmanager,
        alert("NodeDown", "critical", "gpu09"),
        alert("GpuTemperatureHigh", "critical", "gpu11", gpu="1"),
    )
    wait_for(
        lambda: len(requests.get(f"{alertmanager}/api/v2/alerts", timeout=5).json()) == 2 or None,
        what="source alerts stored",
    )
    post(
        alertmanager,
        alert("NodeHighLoad", "warning", "gpu09"),
        alert("NodeHighLoad", "warning", "gpu10"),
        alert("GpuTemperatureHigh", "warning", "gpu11", gpu="1"),
        alert("GpuTemperatureHigh", "warning", "gpu11", gpu="2"),
    )

    def states() -> dict[tuple[str, str, str, str], bool] | None:
        got = requests.get(f"{alertmanager}/api/v2/alerts", timeout=5).json()
        if len(got) < 6:
            return None
        return {
            (
                a["labels"]["alertname"],
                a["labels"]["instance"],
                a["labels"]["severity"],
                a["labels"].get("gpu", ""),
            ): bool(a["status"]["inhibitedBy"])
            for a in got
        }

    inhibited = wait_for(states, what="alerts in alertmanager")
    assert inhibited == {
        ("NodeDown", "gpu09", "critical", ""): False,
        ("NodeHighLoad", "gpu09", "warning", ""): True,
        ("NodeHighLoad", "gpu10", "warning", ""): False,
        ("GpuTemperatureHigh", "gpu11", "critical", "1"): False,
        ("GpuTemperatureHigh", "gpu11", "warning", "1"): True,
        ("GpuTemperatureHigh", "gpu11", "warning", "2"): False,
    }
    # and nothing about the inhibited NodeHighLoad of gpu09 reaches Slack
    # (one notification per route and group; critical and warning take different routes)
    titles = sorted(slack.next()[1]["attachments"][0]["title"] for _ in range(4))
    assert titles == [
        "[FIRING:1] GpuTemperatureHigh on gpu11",
        "[FIRING:1] GpuTemperatureHigh on gpu11",
        "[FIRING:1] NodeDown on gpu09",
        "[FIRING:1] NodeHighLoad on gpu10",
    ]
