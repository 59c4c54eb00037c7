"""Role labkit_python's builds on the controller.

Two runs at once from one controller (two admins, or CI's molecule scenarios side by side): each builds in a
directory of its own, one of them keeps its build in the cache, and neither deletes or half-writes the
other's source tree, wheel or wheelhouse. A run that fails while building leaves neither its directory nor
a cache entry. The cache follows the commit: a commit that leaves the wheel's files as they were is not
built again, one that changes the Python is, and the node then runs the changed code.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from lab_helpers import REPO, PlaybookRun, run_playbook

pytestmark = [pytest.mark.lab, pytest.mark.slow]

NODES = ("gpu01", "gpu02")
BASE = "/opt/labkit-python-test"
BUILD_TASK = "labkit_python : Build the labkit wheel on the controller"

PLAY = """---
- name: Install labkit into a scratch venv
  hosts: gpu_nodes
  become: true
  roles:
    - role: labkit_python
      vars:
        labkit_python_venv: {base}/venv
        labkit_python_extras: [gpu]
"""


@pytest.fixture
def play(lab, host_exec, tmp_path):
    path = tmp_path / "labkit_python.yml"
    path.write_text(PLAY.format(base=BASE))
    yield path
    for node in NODES:
        host_exec(node, "rm", "-rf", BASE)


def cache_entries(build: Path) -> list[Path]:
    """The builds the cache keeps; and nothing else is left in the build directory (no run-* directory)."""
    assert sorted(p.name for p in build.iterdir()) == ["cache"], list(build.iterdir())
    return sorted((build / "cache").iterdir())


def built(run: PlaybookRun, node: str) -> bool:
    (results,) = run.task_results(BUILD_TASK)
    return results[node] != "skipping"


def test_two_runs_at_once_from_one_controller_both_install(play, host_exec, tmp_path):
    build = tmp_path / "build"
    extra = json.dumps({"labkit_python_controller_build_dir": str(build)})
    with ThreadPoolExecutor(len(NODES)) as pool:
        runs = list(pool.map(lambda node: run_playbook(str(play), "-l", node, "-e", extra), NODES))
    for node, run in zip(NODES, runs, strict=True):
        assert run.rc == 0, f"{node}:\n{run.output[-4000:]}"
        assert run.recap()[node]["failed"] == 0
    # Same commit, same extras, same Python: one key, one complete entry, whichever run renamed it first.
    (entry,) = cache_entries(build)
    assert sorted(p.name for p in entry.iterdir()) == ["deps", "labkit", "wheelhouse.tar"]
    for node in NODES:
        out = host_exec(node, f"{BASE}/venv/bin/python", "-c", "import pynvml, job_queue, labkit_exporters")
        assert out.returncode == 0, f"{node}: {out.stderr}"


def test_a_run_that_fails_while_building_leaves_nothing(play, host_exec, tmp_path):
    build = tmp_path / "build"
    constraints = tmp_path / "constraints.txt"
    constraints.write_text((REPO / "requirements" / "constraints.txt").read_text() + "nvidia-ml-py==0.0.0\n")
    extra = json.dumps(
        {"labkit_python_controller_build_dir": str(build), "labkit_python_constraints_file": str(constraints)}
    )
    run = run_playbook(str(play), "-l", "gpu01", "-e", extra)
    assert run.rc != 0, run.output[-4000:]
    # The two pins of nvidia-ml-py cannot both hold: pip download refuses, after the wheel was built.
    assert run.task_results("labkit_python : Download the wheels on the controller") == [
        {"gpu01": "fatal"}
    ], run.output[-4000:]
    assert "conflicting dependencies" in run.output
    assert cache_entries(build) == []
    assert host_exec("gpu01", "test", "-e", f"{BASE}/venv").returncode != 0


def git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=labkit test", "-c", "user.email=test@labkit.invalid",
         *args],
        check=True,
        capture_output=True,
    )


def test_the_cache_follows_the_commit(play, host_exec, tmp_path):
    source = tmp_path / "source"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(source)], check=True)
    build = tmp_path / "build"
    extra = json.dumps(
        {"labkit_python_controller_build_dir": str(build), "labkit_python_source_dir": str(source)}
    )

    def converge() -> PlaybookRun:
        run = run_playbook(str(play), "-l", "gpu01", "-e", extra)
        assert run.rc == 0, run.output[-4000:]
        return run

    assert built(converge(), "gpu01")
    # A commit that changes only docs: the wheel's files are the same, nothing to build, nothing changes.
    readme = source / "docs" / "README.md"
    readme.write_text(readme.read_text() + "\nA line only the docs have.\n")
    git(source, "commit", "--quiet", "--all", "-m", "docs only")
    second = converge()
    assert not built(second, "gpu01")
    assert second.recap()["gpu01"]["changed"] == 0, second.output[-4000:]
    assert len(cache_entries(build)) == 1
    # Changed code: built again, and the node runs it.
    init = source / "job_queue" / "__init__.py"
    init.write_text(init.read_text() + '\nLABKIT_CACHE_TEST = "changed code"\n')
    git(source, "commit", "--quiet", "--all", "-m", "changed code")
    third = converge()
    assert built(third, "gpu01")
    assert third.recap()["gpu01"]["changed"] > 0
    out = host_exec(
        "gpu01", f"{BASE}/venv/bin/python", "-c", "import job_queue; print(job_queue.LABKIT_CACHE_TEST)"
    )
    assert out.stdout.strip() == "changed code", out.stderr
    assert len(cache_entries(build)) == 2
