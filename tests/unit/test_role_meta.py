"""Each role's meta/main.yml claims only what is tested: Debian 12 (bookworm), the lab's and molecule's
image; a role that installs labkit's own wheel says it works only from this repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ROLES = sorted(p.parent.parent for p in (REPO / "roles").glob("*/meta/main.yml"))


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_meta_claims_the_tested_platform_only(role: Path) -> None:
    info = yaml.safe_load((role / "meta" / "main.yml").read_text())["galaxy_info"]
    assert info["platforms"] == [{"name": "Debian", "versions": ["bookworm"]}], role.name


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_roles_that_need_this_repository_say_so(role: Path) -> None:
    tasks = " ".join(p.read_text() for p in (role / "tasks").glob("*.yml"))
    info = yaml.safe_load((role / "meta" / "main.yml").read_text())["galaxy_info"]
    installs_labkit = re.search(r"name: labkit_python\n(?!\s+tasks_from: pinned_wheels\n)", tasks) is not None
    if installs_labkit or role.name == "labkit_python":
        assert "works only from the labkit repository" in info["description"], role.name
    elif "labkit_python" in tasks:  # only its `pinned_wheels` entry point: no labkit wheel
        assert "needs role labkit_python beside it" in info["description"], role.name
