"""Every alert has summary, description, value and a runbook_url to a runbook that says what to do."""

from __future__ import annotations

import re
from typing import Any

import pytest
from mon_helpers import REPO, RUNBOOKS_DIR, alerting_rules

# The rules rendered with a runbook base URL of our own: every link is <base>/<AlertName>.md.
RUNBOOK_BASE = "https://runbooks.test/docs/runbooks/"
# In this order: what to check comes first (tests/unit/test_runbook_blocks.py checks every runbook's shape).
SECTIONS = ("Check first", "What it means", "What to do", "When to escalate")

RULES = alerting_rules({"monitoring_server_runbook_base_url": RUNBOOK_BASE.rstrip("/")})
ALERTS = sorted({r["alert"] for r in RULES})


def sections(markdown: str) -> dict[str, str]:
    parts = re.split(r"^## +(.+?)\s*$", markdown, flags=re.MULTILINE)
    return {title: body.strip() for title, body in zip(parts[1::2], parts[2::2], strict=True)}


@pytest.mark.parametrize("rule", RULES, ids=[f"{r['alert']}-{r['labels']['severity']}" for r in RULES])
def test_rule_annotations_and_labels(rule: dict[str, Any]) -> None:
    annotations = rule["annotations"]
    assert set(annotations) == {"summary", "description", "value", "runbook_url"}
    assert "{{" in annotations["summary"]
    assert "$value" in annotations["description"] or "$labels" in annotations["description"]
    assert annotations["runbook_url"] == f"{RUNBOOK_BASE}{rule['alert']}.md"
    assert rule["labels"]["severity"] in ("warning", "critical")


@pytest.mark.parametrize("alert", ALERTS)
def test_runbook_exists_and_says_what_to_do(alert: str) -> None:
    path = RUNBOOKS_DIR / f"{alert}.md"
    assert path.exists(), f"write {path.relative_to(REPO)}"
    text = path.read_text()
    assert text.startswith(f"# {alert}\n")
    found = sections(text)
    for title in SECTIONS:
        assert len(found.get(title, "")) > 40, f"{path.name}: section '{title}' missing or empty"
    in_order = [title for title in found if title in SECTIONS]
    assert in_order == list(SECTIONS), f"{path.name}: sections {in_order}, not in the order {SECTIONS}"
    assert "```" in found["Check first"], f"{path.name}: give the exact commands to check"


def test_no_runbook_without_alert() -> None:
    """Alert runbooks are named like their alert (CamelCase); task runbooks are lower-case-with-hyphens."""
    howtos = {"add-a-dashboard", "add-an-alert"}
    runbooks = {p.stem for p in RUNBOOKS_DIR.glob("*.md")}
    alert_runbooks = {name for name in runbooks if name[:1].isupper()}
    assert alert_runbooks == set(ALERTS)
    tasks = runbooks - alert_runbooks
    assert all(name == name.lower() and " " not in name for name in tasks), tasks
    assert howtos <= runbooks


def test_relative_links_in_runbooks_resolve() -> None:
    for path in RUNBOOKS_DIR.glob("*.md"):
        for target in re.findall(r"\]\(([^)#]+?)(?:#[^)]*)?\)", path.read_text()):
            if "://" not in target:
                assert (path.parent / target).resolve().exists(), f"{path.name}: broken link {target}"
