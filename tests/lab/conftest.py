"""Fixtures for end-to-end checks against the converged local lab (`make lab`)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB_INVENTORY = REPO / "inventory" / "lab"
ADMIN_KEY = REPO / ".lab" / "admin_ed25519"
RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)",
    re.M,
)


@dataclass
class PlaybookRun:
    rc: int
    output: str

    def recap(self) -> dict[str, dict[str, int]]:
        return {
            m["host"]: {k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")}
            for m in RECAP.finditer(self.output)
        }


def run_playbook(playbook: str, *args: str, inventory: Path = LAB_INVENTORY) -> PlaybookRun:
    env = dict(
        os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0"
    )
    proc = subprocess.run(
        ["ansible-playbook", "-i", str(inventory), str(REPO / "playbooks" / playbook), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return PlaybookRun(proc.returncode, proc.stdout + proc.stderr)


@pytest.fixture(scope="session")
def lab() -> dict[str, Any]:
    """The running lab's hosts as labctl reports them; skips nothing: the lab must be up (`make lab`)."""
    if not (LAB_INVENTORY / "hosts.yml").exists():
        pytest.fail("the lab is not up: run `make lab` first (make e2e does)")
    import json

    out = subprocess.run(
        [
            "python3" if not (REPO / ".venv").exists() else str(REPO / ".venv/bin/python"),
            "tests/lab/labctl.py",
            "status",
            "--json",
        ],
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


def ssh(
    address: str, user: str, *cmd: str, key: Path = ADMIN_KEY, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """A real SSH login from this machine to a lab host."""
    return subprocess.run(
        [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
            "-i",
            str(key),
            *extra,
            f"{user}@{address}",
            *cmd,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
