"""Reading the Grafana dashboards of monitoring/grafana for the tests."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from mon_helpers import DASHBOARDS_DIR, MONITORING

DASHBOARD_FILES = sorted(DASHBOARDS_DIR.glob("*.json"))
SOURCES_FILE = MONITORING / "grafana" / "panel-sources.yml"

# What the test puts in place of Grafana's variables: match-all regexes and fixed intervals.
SUBSTITUTIONS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "1h",
}
MATCH_ALL = ".*"
_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")

# Metric names -> source name used in panel-sources.yml (`labq_job` is a label, not a metric)
SOURCE_METRICS = {
    re.compile(r"\bDCGM_FI_\w+"): "dcgm",
    re.compile(r"\blabq_(?!job\b)\w+"): "labq",
    re.compile(r"\blabkit_gpu_\w+"): "gpu_users",
    re.compile(r"\bcontainer_\w+"): "cadvisor",
    re.compile(r"\blabkit_slurm_\w+"): "slurm",
}


@dataclass(frozen=True)
class Target:
    dashboard: str
    panel: str
    ref: str
    expr: str


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}


def substitute(expr: str, names: set[str]) -> str:
    def repl(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in SUBSTITUTIONS:
            return SUBSTITUTIONS[name]
        if name in names:
            return MATCH_ALL
        return match.group(0)  # e.g. $1 of label_replace

    return _VAR.sub(repl, expr)


def targets() -> list[Target]:
    found = []
    for path in DASHBOARD_FILES:
        d = load(path)
        names = set(variables(d))
        for p in panels(d):
            for t in p.get("targets", []):
                found.append(Target(d["uid"], p["title"], t["refId"], substitute(t["expr"], names)))
    return found


def sources_manifest() -> dict[str, dict[str, list[str]]]:
    data: dict[str, dict[str, list[str]]] = yaml.safe_load(SOURCES_FILE.read_text())
    return data


def sources_used(expr: str) -> set[str]:
    return {src for pattern, src in SOURCE_METRICS.items() if pattern.search(expr)}
