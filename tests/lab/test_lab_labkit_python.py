"""Role labkit_python from one controller, two runs at once (two admins, or CI's molecule scenarios side by
side): each builds in a directory of its own and removes it, so neither deletes or half-writes the other's
source tree, wheel or wheelhouse. A failing run removes its build directory too.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from lab_helpers import run_playbook

pytestmark = [pytest.mark.lab, pytest.mark.slow]

NODES = ("gpu01", "gpu02")
BASE = "/opt/labkit-python-test"

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


def test_two_runs_at_once_from_one_controller_both_install(play, host_exec, tmp_path):
    build = tmp_path / "build"
    extra = json.dumps({"labkit_python_controller_build_dir": str(build)})
    with ThreadPoolExecutor(len(NODES)) as pool:
        runs = list(pool.map(lambda node: run_playbook(str(play), "-l", node, "-e", extra), NODES))
    for node, run in zip(NODES, runs, strict=True):
        assert run.rc == 0, f"{node}:\n{run.output[-4000:]}"
        assert run.recap()[node]["failed"] == 0
    # Both runs' directories are gone: nothing is left to grow or to be picked up by a later run.
    assert list(build.iterdir()) == []
    for node in NODES:
        out = host_exec(node, f"{BASE}/venv/bin/python", "-c", "import pynvml, job_queue, labkit_exporters")
        assert out.returncode == 0, f"{node}: {out.stderr}"


def test_a_failing_run_removes_its_build_directory(play, host_exec, tmp_path):
    build = tmp_path / "build"
    extra = json.dumps(
        {
            "labkit_python_controller_build_dir": str(build),
            "labkit_python_packages": ["labkit-no-such-package"],
        }
    )
    run = run_playbook(str(play), "-l", "gpu01", "-e", extra)
    assert run.rc != 0, run.output[-4000:]
    assert "labkit-no-such-package" in run.output
    assert build.is_dir() and list(build.iterdir()) == []
    assert host_exec("gpu01", "test", "-e", f"{BASE}/venv").returncode != 0
