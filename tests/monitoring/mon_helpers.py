"""Shared helpers for the monitoring tests: repo paths, free ports, child processes.

Importing this module also puts monitoring/exporters on sys.path, so `labkit_exporters`
imports from the source tree whether or not the project is installed.  Test modules that
import `labkit_exporters` therefore start with `import mon_helpers`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
import yaml

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "monitoring"
PROMETHEUS_DIR = MONITORING / "prometheus"
# The alert rules are templates (*.rules.yml.j2); tests use them rendered (rendered_rules, write_rules).
RULE_TEMPLATES_DIR = PROMETHEUS_DIR / "rules"
PROMTOOL_TESTS_DIR = PROMETHEUS_DIR / "tests"
ALERTMANAGER_DIR = MONITORING / "alertmanager"
DASHBOARDS_DIR = MONITORING / "grafana" / "dashboards"
RUNBOOKS_DIR = REPO / "docs" / "runbooks"
EXPORTERS_SRC = MONITORING / "exporters"

T = TypeVar("T")

for _src in (EXPORTERS_SRC, PROMETHEUS_DIR):  # labkit_exporters; render_rules (the rules' renderer)
    if str(_src) not in sys.path:
        sys.path.insert(0, str(_src))

# The helper modules hold assertions too; pytest rewrites them only if told before their import.
pytest.register_assert_rewrite(
    *(m for m in ("mon_stack", "mon_sinks", "mon_dashboards", "mon_fake_nvml") if m not in sys.modules)
)


def _renderer() -> Any:
    """monitoring/prometheus/render_rules.py, which renders the rule templates like the role does."""
    import render_rules  # type: ignore[import-not-found]  # not on mypy's path

    return render_rules


def rendered_rules(overrides: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Rule file name -> text, rendered as the monitoring_server role renders them (defaults + overrides)."""
    rules: dict[str, str] = _renderer().render(overrides)
    return rules


def write_rules(dest: Path, overrides: Mapping[str, Any] | None = None) -> list[Path]:
    """Render the rules into dest/ (made if missing); returns the files, sorted."""
    paths: list[Path] = _renderer().write(dest, overrides)
    return paths


def alerting_rules(overrides: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every alerting rule of the rendered rule files, in file order."""
    rules: list[dict[str, Any]] = []
    for _name, text in sorted(rendered_rules(overrides).items()):
        for group in yaml.safe_load(text)["groups"]:
            rules += [r for r in group["rules"] if "alert" in r]
    return rules


def need_binary(*names: str) -> str:
    """Path of the first binary found.  Missing: skip on a developer machine, fail in CI.

    CI (environment CI or LABKIT_REQUIRE_TOOLS set) must install the Debian packages
    prometheus, prometheus-alertmanager and prometheus-node-exporter (docs/monitoring.md).
    """
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    message = f"{' / '.join(names)} not installed (apt: prometheus, prometheus-alertmanager, ...)"
    if os.environ.get("CI") or os.environ.get("LABKIT_REQUIRE_TOOLS"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    check: Callable[[], T | None], timeout: float = 20.0, interval: float = 0.1, what: str = ""
) -> T:
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except (requests.RequestException, OSError, ValueError, KeyError) as exc:
            last_exc = exc
            result = None
        if result is not None and result is not False:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what or check!r} (last error: {last_exc})")


def http_ok(url: str) -> bool | None:
    resp = requests.get(url, timeout=2)
    return True if resp.status_code == 200 else None


@contextlib.contextmanager
def running(
    cmd: Sequence[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` for the duration of the block; stop it (SIGTERM, then SIGKILL) afterwards."""
    with log.open("wb") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def exporter_env() -> dict[str, str]:
    """Environment to run labkit_exporters from the source tree (installed or not)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(EXPORTERS_SRC), env.get("PYTHONPATH", "")]))
    return env
