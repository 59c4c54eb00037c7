"""Alertmanager example config and notification templates, checked with amtool."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from mon_helpers import ALERTMANAGER_DIR, need_binary

CONFIG = ALERTMANAGER_DIR / "alertmanager.example.yml"
DATA = Path(__file__).resolve().parent / "data"


def amtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need_binary("amtool"), *args], cwd=ALERTMANAGER_DIR, capture_output=True, text=True, timeout=60
    )


def config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    return loaded


def test_check_config() -> None:
    result = amtool("check-config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 templates" in result.stdout


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=NodeDown", "severity=critical", "instance=gpu01"], "slack-and-email"),
        (["alertname=GpuEccErrors", "severity=critical", "instance=gpu01", "gpu=2"], "slack-and-email"),
        (["alertname=NodeHighLoad", "severity=warning", "instance=gpu01"], "slack"),
        (["alertname=JobQueueStuck", "severity=warning"], "slack"),
    ],
)
def test_routes(labels: list[str], receiver: str) -> None:
    result = amtool(
        "config", "routes", "test", f"--config.file={CONFIG}", f"--verify.receivers={receiver}", *labels
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


def test_webhook_secret_is_read_from_a_file_and_grouping() -> None:
    cfg = config()
    text = CONFIG.read_text()
    assert "hooks.slack.com" not in text
    assert cfg["global"]["slack_api_url_file"].startswith("/")
    assert "slack_api_url" not in cfg["global"]
    assert cfg["route"]["group_by"] == ["alertname", "instance"]
    for receiver in cfg["receivers"]:
        for slack in receiver.get("slack_configs", []):
            assert "api_url" not in slack
            assert slack["send_resolved"] is True
        for mail in receiver.get("email_configs", []):
            assert mail["send_resolved"] is True
    assert {r["name"] for r in cfg["receivers"]} == {"slack", "slack-and-email"}


def test_inhibit_rules() -> None:
    rules = config()["inhibit_rules"]
    node_down = [r for r in rules if r["source_matchers"] == ['alertname = "NodeDown"']]
    assert node_down and node_down[0]["equal"] == ["instance"]
    crit = [r for r in rules if r["source_matchers"] == ['severity = "critical"']]
    assert crit and crit[0]["target_matchers"] == ['severity = "warning"']
    assert "alertname" in crit[0]["equal"]
    assert "instance" in crit[0]["equal"]


def render(template: str, data: Path) -> str:
    result = amtool(
        "template",
        "render",
        "--template.glob=templates/*.tmpl",
        f"--template.text={template}",
        f"--template.data={data}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_slack_template_shows_host_gpu_user_value_runbook() -> None:
    data = DATA / "alert_group_idle.json"
    alerts = json.loads(data.read_text())["alerts"]
    title = render('{{ template "labkit.slack.title" . }}', data).strip()
    assert title == "[FIRING:1] vision-lab: GpuAllocatedIdle on gpu07"
    assert render('{{ template "labkit.slack.color" . }}', data).strip() == "warning"
    assert (
        render('{{ template "labkit.slack.title_link" . }}', data).strip()
        == alerts[0]["annotations"]["runbook_url"]
    )
    text = render('{{ template "labkit.slack.text" . }}', data)
    firing, resolved = text.split("\n\n")[:2]
    assert firing.splitlines() == [
        "*WARNING*: Job 4711 of alice leaves GPU 5 on gpu07 idle",
        "Host: gpu07",
        "GPU: 5 (NVIDIA H100 80GB HBM3) GPU-77aa",
        "User: alice, labq job 4711",
        "Value: 0.4",
        alerts[0]["annotations"]["description"],
        "Runbook: " + alerts[0]["annotations"]["runbook_url"],
    ]
    assert resolved.startswith("*RESOLVED*: Job 4712 of bob")
    assert "User: bob, labq job 4712" in resolved


def test_email_template() -> None:
    data = DATA / "alert_group_idle.json"
    assert (
        render('{{ template "labkit.email.subject" . }}', data).strip()
        == "[FIRING:1] vision-lab: GpuAllocatedIdle on gpu07"
    )
    body = render('{{ template "labkit.email.text" . }}', data)
    assert "Since: 2026-11-23 10:00:00 UTC" in body
    assert "Resolved: 2026-11-23 10:30:00 UTC" in body
    assert body.count("Runbook: https://") == 2
