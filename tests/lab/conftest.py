"""Fixtures for end-to-end checks against the converged local lab (`make lab`)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from lab_helpers import ADMIN_KEY, LAB_INVENTORY, REPO, PlaybookRun, run_playbook, ssh

__all__ = ["ADMIN_KEY", "LAB_INVENTORY", "REPO", "PlaybookRun", "run_playbook", "ssh"]


@pytest.fixture(scope="session")
def lab() -> dict[str, Any]:
    """The running lab's hosts as labctl reports them; skips nothing: the lab must be up (`make lab`)."""
    if not (LAB_INVENTORY / "hosts.yml").exists():
        pytest.fail("the lab is not up: run `make lab` first (make e2e does)")
    out = subprocess.run(
        [sys.executable, "tests/lab/labctl.py", "status", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {row["host"]: row for row in json.loads(out)}


@pytest.fixture(scope="session")
def host_exec() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run a command inside a lab host (as root), like an admin at its console."""

    def run(host: str, *cmd: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        prefix = ["docker", "exec"] + (["-u", user] if user else []) + [f"labkit-{host}"]
        return subprocess.run(prefix + list(cmd), capture_output=True, text=True, timeout=120)

    return run


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that stop lab hosts run last, so the others see a whole lab."""
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)
