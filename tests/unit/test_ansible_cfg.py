"""ansible.cfg names no lab: a run without `-i` targets no host (never inventory/example's addresses) and
says to pass -i; each inventory defines its groups in one file, and the example and the local lab have
the same groups."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import labkit_lab.lab
import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
INVENTORY_CMD = (
    str(BIN / "ansible-inventory") if (BIN / "ansible-inventory").exists() else "ansible-inventory"
)


def ansible_inventory(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """ansible-inventory --list with the repository's ansible.cfg, no fact cache (a lab's cached facts
    would show up under hosts of the same name) and no inventory from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env |= {"ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_CACHE_PLUGIN": "memory", "NO_COLOR": "1"}
    return subprocess.run(
        [INVENTORY_CMD, "--list", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def inventory_list(source: Path) -> dict[str, Any]:
    res = ansible_inventory("-i", str(source), cwd=REPO)
    assert res.returncode == 0, res.stderr
    listed: dict[str, Any] = json.loads(res.stdout)
    return listed


def children(listed: dict[str, Any]) -> dict[str, set[str]]:
    """Each group and the groups it is made of."""
    return {name: set(group.get("children", [])) for name, group in listed.items() if name != "_meta"}


@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_a_run_without_inventory_targets_no_example_host_and_says_pass_i(cwd: str, tmp_path: Path) -> None:
    example = inventory_list(REPO / "inventory" / "example")["_meta"]["hostvars"]
    assert example, "inventory/example lists no hosts"
    addresses = {v["ansible_host"] for v in example.values()}
    res = ansible_inventory(cwd=REPO if cwd == "repo" else tmp_path)
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)
    assert listed["_meta"]["hostvars"] == {}
    assert all(not group.get("hosts") for name, group in listed.items() if name != "_meta"), listed
    for name in [*example, *addresses]:
        assert name not in res.stdout, f"{name} (inventory/example) targeted without -i"
    assert "Pass -i inventory/<your-lab>" in res.stderr, res.stderr


def test_an_inventory_given_with_i_replaces_the_default() -> None:
    res = ansible_inventory("-i", str(REPO / "inventory" / "example"), cwd=REPO)
    assert res.returncode == 0 and "no inventory given" not in res.stderr, res.stderr


def test_each_inventory_defines_its_groups_in_one_file() -> None:
    """inventory/example: hosts.yml; inventory/lab: groups.yml beside the hosts.yml `make lab` writes."""
    sources = {
        name: sorted(p.name for p in (REPO / "inventory" / name).iterdir() if p.is_file())
        for name in ("example", "lab")
    }
    lab_files = [f for f in sources["lab"] if f != "hosts.yml"]  # hosts.yml: written by labctl, untracked
    assert sources["example"] == ["hosts.yml"], sources
    assert lab_files == ["groups.yml"], sources


def test_the_example_and_the_local_lab_have_the_same_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lab's inventory as `make lab` leaves it: a copy beside a hosts.yml from labctl's own writer."""
    lab = tmp_path / "inventory" / "lab"
    shutil.copytree(REPO / "inventory" / "lab", lab, ignore=shutil.ignore_patterns("hosts.yml"))
    monkeypatch.setattr(labkit_lab.lab, "REPO", tmp_path)  # write_inventory, admin key: under tmp_path
    labkit_lab.lab.write_inventory(labkit_lab.lab.lab_hosts())
    example = children(inventory_list(REPO / "inventory" / "example"))
    local = children(inventory_list(lab))
    assert example == local
