"""Alert rules: promtool accepts them, their promtool unit tests pass, every alert is tested firing."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from mon_helpers import PROMTOOL_TESTS_DIR, REPO, RULES_DIR, need_binary

RULE_FILES = sorted(RULES_DIR.glob("*.rules.yml"))
TEST_FILES = sorted(PROMTOOL_TESTS_DIR.glob("*.test.yml"))
NODE_DOWN_FOR = re.compile(r"^(\s+)for: \S+(\s+# override: monitoring_node_down_for)$", re.MULTILINE)


def alert_names() -> set[str]:
    names = set()
    for f in RULE_FILES:
        for group in yaml.safe_load(f.read_text())["groups"]:
            names |= {r["alert"] for r in group["rules"] if "alert" in r}
    return names


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need_binary("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_there_are_rules_and_tests() -> None:
    assert len(RULE_FILES) >= 4
    assert len(alert_names()) >= 18


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", *map(str, TEST_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(TEST_FILES)


@pytest.mark.parametrize("rule_file", RULE_FILES, ids=lambda p: p.name)
def test_every_rule_file_has_a_unit_test(rule_file: Path) -> None:
    test_file = PROMTOOL_TESTS_DIR / rule_file.name.replace(".rules.yml", ".test.yml")
    assert test_file.exists(), f"write {test_file.relative_to(REPO)}"
    assert f"../rules/{rule_file.name}" in yaml.safe_load(test_file.read_text())["rule_files"]


def test_every_alert_is_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for f in TEST_FILES:
        for case in yaml.safe_load(f.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alert_names() - firing == set(), "alerts never tested firing"
    assert alert_names() - quiet == set(), "alerts never tested staying quiet"


def test_node_down_for_is_overridable(tmp_path: Path) -> None:
    """The role rewrites the tagged `for:` line (docs/monitoring.md); promtool then sees the new delay."""
    source = (RULES_DIR / "node.rules.yml").read_text()
    assert len(NODE_DOWN_FOR.findall(source)) == 1
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "node.rules.yml").write_text(NODE_DOWN_FOR.sub(r"\1for: 15m\2", source))
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
    test_file = tmp_path / "override.test.yml"
    test_file.write_text(
        yaml.safe_dump(
            {"rule_files": ["rules/node.rules.yml"], "evaluation_interval": "1m", "tests": [node_down]}
        )
    )
    result = promtool("test", "rules", str(test_file), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # and the unmodified rule would fire at minute 8: the override really changed something
    shutil.copy(RULES_DIR / "node.rules.yml", tmp_path / "rules" / "node.rules.yml")
    assert promtool("test", "rules", str(test_file), cwd=tmp_path).returncode != 0
