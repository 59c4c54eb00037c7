"""`labq --host NODE ...` and `labq ls --all-nodes`: the CLI reaches other nodes' daemons over ssh.

Two real labqd stand in for two nodes. `$LABQ_SSH` points the CLI at a stand-in for ssh that checks
the options labq passes, then runs the remote command line through a shell with the node's socket,
as sshd would on that node. (Real SSH logins between lab nodes: see docs/roles/job_queue.md.)
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from labq_helpers import PYTHON, REPO

pytestmark = pytest.mark.docker

FAKE_SSH = """#!/bin/sh
# ssh stand-in: -o OPTION pairs, then the host, then one remote command line.
while [ "$1" = "-o" ]; do
  case "$2" in BatchMode=yes) batch=1 ;; esac
  shift 2
done
[ "$batch" = 1 ] || { echo "fake-ssh: BatchMode=yes missing" >&2; exit 254; }
host=$1; shift
sock=$(cat "{dir}/$host.sock" 2>/dev/null) || { echo "ssh: connect to host $host: no route" >&2; exit 255; }
echo "$host $*" >> "{dir}/calls.log"
export LABQ_SOCKET="$sock" PATH="{dir}/bin:$PATH"
exec sh -c "$*"
"""


@pytest.fixture
def nodes(make_labqd: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    (tmp_path / "bin").mkdir()
    labq = tmp_path / "bin" / "labq"
    labq.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO}" exec "{PYTHON}" -m job_queue.cli "$@"\n')
    ssh = tmp_path / "ssh"
    ssh.write_text(FAKE_SSH.replace("{dir}", str(tmp_path)))
    for f in (labq, ssh):
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    daemons = {}
    for name in ("gpu01", "gpu02"):
        d = make_labqd()
        (tmp_path / f"{name}.sock").write_text(d.socket)
        daemons[name] = d
    monkeypatch.setenv("LABQ_SSH", str(ssh))
    return {"dir": tmp_path, **daemons}


def held(d: Any, name: str) -> int:
    res = d.labq("submit", "--json", "--hold", "--gpus", "0", "--name", name, "--", "true")
    assert res.returncode == 0, res.stderr
    return int(json.loads(res.stdout)["ids"][0])


def test_host_runs_the_command_on_that_node(nodes: dict[str, Any]) -> None:
    one, two = nodes["gpu01"], nodes["gpu02"]
    held(one, "on-one")
    job = held(two, "on-two")
    res = one.labq("--host", "gpu02", "ls", "--json")
    assert res.returncode == 0, res.stderr
    assert [j["name"] for j in json.loads(res.stdout)] == ["on-two"]
    # Arguments survive the remote shell unchanged (quoting), exit codes come back.
    res = one.labq("--host=gpu02", "show", str(job), "--json")
    assert json.loads(res.stdout)["name"] == "on-two"
    assert one.labq("--host", "gpu02", "show", "999").returncode == 3
    calls = (nodes["dir"] / "calls.log").read_text()
    assert f"gpu02 labq show {job} --json" in calls
    unreachable = one.labq("--host", "gpu09", "ls")
    assert unreachable.returncode == 6 and "gpu09" in unreachable.stderr


def test_ls_all_nodes_merges_every_node(nodes: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    one, two = nodes["gpu01"], nodes["gpu02"]
    held(one, "alpha")
    held(two, "beta")
    monkeypatch.setenv("LABQ_NODES", "gpu01,gpu02")
    res = one.labq("ls", "--all-nodes")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:4] == ["NODE", "ID", "USER", "STATE"]
    assert any(ln.startswith("gpu01") and "alpha" in ln for ln in lines)
    assert any(ln.startswith("gpu02") and "beta" in ln for ln in lines)
    monkeypatch.setenv("LABQ_NODES", "gpu01,gpu02,gpu09")
    res = one.labq("ls", "--all-nodes", "--json")
    assert res.returncode == 6  # one node missing: said so, the others still listed
    data = json.loads(res.stdout)
    assert [j["name"] for j in data["jobs"]["gpu02"]] == ["beta"]
    assert "gpu09" in data["errors"] and "gpu09" in res.stderr
