"""Fixtures for end-to-end checks against the converged local lab (`make lab`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
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
        [sys.executable, "tools/labctl.py", "status", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {row["host"]: row for row in json.loads(out)}


@pytest.fixture(scope="session")
def second_run(lab: dict[str, Any]) -> PlaybookRun:
    """site.yml once more on the lab `make lab` converged: a second run, shared by every module's checks.
    site.yml imports identity.yml, nfs.yml, gpu_nodes.yml, job_queue.yml and monitoring.yml, so its recap
    is each of those playbooks' second run too (one run instead of one per playbook: shorter CI). The
    first test that asks for it runs it (test_lab_common's, as its module sorts first)."""
    run = run_playbook("site.yml")
    assert run.rc == 0, run.output[-4000:]
    return run


@pytest.fixture(scope="session")
def job_image(second_run) -> str:
    """The lab's job image on the GPU nodes (`make lab-job-image`; loaded if `make lab` did not)."""
    out = subprocess.run([sys.executable, "tools/labctl.py", "job-image"], cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    return "labkit-job:1"


@pytest.fixture(scope="session")
def host_exec() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run a command inside a lab host (as root), like an admin at its console."""

    def run(host: str, *cmd: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        prefix = ["docker", "exec"] + (["-u", user] if user else []) + [f"labkit-{host}"]
        return subprocess.run(prefix + list(cmd), capture_output=True, text=True, timeout=120)

    return run


@pytest.fixture(scope="session")
def agent() -> Iterator[dict[str, str]]:
    """An ssh-agent on this machine holding the members' test key; logins forward it (ssh -A), as a
    student's laptop does, so labq on the login node reaches other nodes with the student's own key."""
    out = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True, check=True).stdout
    env = dict(re.findall(r"(SSH_AUTH_SOCK|SSH_AGENT_PID)=([^;]+);", out))
    try:
        subprocess.run(
            ["ssh-add", "-q", str(ADMIN_KEY)], env={**os.environ, **env}, check=True, capture_output=True
        )
        yield env
    finally:
        subprocess.run(["ssh-agent", "-k"], env={**os.environ, **env}, capture_output=True, check=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that stop lab hosts run last, so the others see a whole lab."""
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)
