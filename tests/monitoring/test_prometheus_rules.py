"""Alert rules: rendered with the role's defaults, promtool accepts them and their unit tests pass, every
alert is tested firing; changed parameters (role variables) reach the rendered rules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from mon_helpers import (
    PROMTOOL_TESTS_DIR,
    REPO,
    RULE_TEMPLATES_DIR,
    alerting_rules,
    need_binary,
    rendered_rules,
    write_rules,
)

TEMPLATES = sorted(RULE_TEMPLATES_DIR.glob("*.rules.yml.j2"))
TEST_FILES = sorted(PROMTOOL_TESTS_DIR.glob("*.test.yml"))


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need_binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def promtool_tree(root: Path, overrides: dict[str, Any] | None = None) -> Path:
    """root/rules: the rendered rules; root/tests: the promtool tests (their `../rules/...` resolve there)."""
    write_rules(root / "rules", overrides)
    (root / "tests").mkdir()
    for f in TEST_FILES:
        shutil.copy(f, root / "tests" / f.name)
    return root / "tests"


def rules_by_alert(overrides: dict[str, Any] | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["alert"], r["labels"]["severity"]): r for r in alerting_rules(overrides)}


def test_there_are_rules_and_tests() -> None:
    assert len(TEMPLATES) >= 4
    assert set(rendered_rules()) == {t.name.removesuffix(".j2") for t in TEMPLATES}
    assert len({r["alert"] for r in alerting_rules()}) >= 18


def test_promtool_check_rules(tmp_path: Path) -> None:
    result = promtool("check", "rules", *map(str, write_rules(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass_on_the_rules_rendered_with_the_defaults(tmp_path: Path) -> None:
    tests_dir = promtool_tree(tmp_path)
    result = promtool("test", "rules", *(f.name for f in TEST_FILES), cwd=tests_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(TEST_FILES)


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_every_rule_file_has_a_unit_test(template: Path) -> None:
    rule_file = template.name.removesuffix(".j2")
    test_file = PROMTOOL_TESTS_DIR / rule_file.replace(".rules.yml", ".test.yml")
    assert test_file.exists(), f"write {test_file.relative_to(REPO)}"
    assert f"../rules/{rule_file}" in yaml.safe_load(test_file.read_text())["rule_files"]


def test_every_alert_is_tested_firing_and_quiet() -> None:
    names = {r["alert"] for r in alerting_rules()}
    firing: set[str] = set()
    quiet: set[str] = set()
    for f in TEST_FILES:
        for case in yaml.safe_load(f.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested staying quiet"


def test_changed_thresholds_and_delays_reach_the_rules(tmp_path: Path) -> None:
    """monitoring_server_alert_overrides is merged over monitoring_server_alerts key by key."""
    overrides = {
        "monitoring_server_alert_overrides": {
            "GpuTemperatureHigh": {"critical_celsius": 97, "critical_for": "7m"},
            "NodeHighLoad": {"for": "45m"},
        },
    }
    default, changed = rules_by_alert(), rules_by_alert(overrides)
    assert default.keys() == changed.keys()
    crit = changed[("GpuTemperatureHigh", "critical")]
    assert crit["expr"].split() == ["DCGM_FI_DEV_GPU_TEMP", ">", "97"]
    assert crit["for"] == "7m"
    assert crit["annotations"]["description"].endswith("°C for 7m.")
    assert changed[("GpuTemperatureHigh", "warning")] == default[("GpuTemperatureHigh", "warning")]
    load = changed[("NodeHighLoad", "warning")]
    assert (load["for"], default[("NodeHighLoad", "warning")]["for"]) == ("45m", "30m")
    assert load["annotations"]["description"].endswith("CPU count for 45m.")
    assert load["expr"] == default[("NodeHighLoad", "warning")]["expr"]
    untouched = default.keys() - {("GpuTemperatureHigh", "critical"), ("NodeHighLoad", "warning")}
    assert all(changed[k] == default[k] for k in untouched)
    result = promtool("check", "rules", *map(str, write_rules(tmp_path, overrides)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_runbook_base_url_reaches_every_alert() -> None:
    rules = alerting_rules({"monitoring_server_runbook_base_url": "https://wiki.example.test/runbooks"})
    assert {r["annotations"]["runbook_url"] for r in rules} == {
        f"https://wiki.example.test/runbooks/{r['alert']}.md" for r in rules
    }
    assert all(
        "git.lab.example.org" not in text
        for text in rendered_rules(
            {"monitoring_server_runbook_base_url": "https://wiki.example.test/runbooks"}
        ).values()
    )


def test_node_down_for_changes_when_node_down_fires(tmp_path: Path) -> None:
    """monitoring_server_node_down_for (the lab sets 30s) is NodeDown's `for`: promtool sees the new delay."""
    tests_dir = promtool_tree(tmp_path, {"monitoring_server_node_down_for": "15m"})
    case = yaml.safe_load((PROMTOOL_TESTS_DIR / "node.test.yml").read_text())
    node_down = next(t for t in case["tests"] if t["name"].startswith("NodeDown"))
    expected = next(c for c in node_down["alert_rule_test"] if c["exp_alerts"])["exp_alerts"]
    # down from minute 2: with 15m it is still pending at minute 8 and 16, firing at 18.
    node_down["alert_rule_test"] = [
        {"eval_time": "8m", "alertname": "NodeDown", "exp_alerts": []},
        {"eval_time": "16m", "alertname": "NodeDown", "exp_alerts": []},
        {"eval_time": "18m", "alertname": "NodeDown", "exp_alerts": expected},
    ]
    node_down["input_series"][0]["values"] = "1 1 0x20"
    node_down["input_series"][1]["values"] = "1x22"
    case["tests"] = [node_down]
    (tests_dir / "override.test.yml").write_text(yaml.safe_dump(case))
    result = promtool("test", "rules", "override.test.yml", cwd=tests_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    # and the rule rendered with the default (5m) fires at minute 8: the variable really changed something
    write_rules(tmp_path / "rules")
    assert promtool("test", "rules", "override.test.yml", cwd=tests_dir).returncode != 0


def test_a_missing_parameter_names_the_template_and_the_value() -> None:
    alerts = yaml.safe_load((REPO / "roles/monitoring_server/defaults/main.yml").read_text())[
        "monitoring_server_alerts"
    ]
    del alerts["NodeHighLoad"]["load_per_cpu"]
    with pytest.raises(ValueError, match=r"node\.rules\.yml\.j2: .*load_per_cpu"):
        rendered_rules({"monitoring_server_alerts": alerts})
