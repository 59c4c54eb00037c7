"""End to end: a real labqd, the real Docker engine, real users alice and bob, the real CLI."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from labq_helpers import Labqd

pytestmark = pytest.mark.docker


def wait_for(get: Any, pred: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = get()
        if pred(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def submit(d: Labqd, user: str, *args: str, cwd: str | None = None) -> int:
    res = d.labq("submit", *args, user=user, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return int(res.stdout.strip())


def test_job_runs_as_user_in_cwd_with_labels_and_env(labqd: Labqd, users: dict[str, Any]) -> None:
    alice = users["alice"]
    work = Path(alice.pw_dir) / "proj"
    work.mkdir(exist_ok=True)
    os.chown(work, alice.pw_uid, alice.pw_gid)
    out = work / "out.txt"
    out.unlink(missing_ok=True)
    script = ('id -u > out.txt; id -G >> out.txt; pwd >> out.txt; '
              'echo "$LABQ_JOB_ID $CUDA_VISIBLE_DEVICES $CUDA_DEVICE_ORDER $MYVAR" >> out.txt; '
              'echo hello-log')
    job_id = submit(labqd, "alice", "--gpus", "2", "--env", "MYVAR=x1", "--", "sh", "-c", script,
                    cwd=str(work))
    job = labqd.wait_state(job_id, ("succeeded", "failed"))
    assert job["state"] == "succeeded", job
    assert job["exit_code"] == 0
    lines = out.read_text().splitlines()
    st = out.stat()
    assert (st.st_uid, st.st_gid) == (alice.pw_uid, alice.pw_gid)  # a file she owns
    assert lines[0] == str(alice.pw_uid)
    import grp

    assert str(grp.getgrnam("labqtest-members").gr_gid) in lines[1].split()
    assert lines[2] == str(work)
    assert lines[3] == f"{job_id} {','.join(job['assigned_gpus'])} PCI_BUS_ID x1"
    assert len(job["assigned_gpus"]) == 2
    logs = labqd.labq("logs", str(job_id), user="alice")
    assert logs.returncode == 0 and logs.stdout == "hello-log\n"
    log_file = Path(job["log"])
    assert log_file.stat().st_uid == alice.pw_uid and log_file.stat().st_mode & 0o077 == 0


def test_log_keeps_a_last_line_without_newline(labqd: Labqd) -> None:
    """Docker's follow stream often ends before a last line that has no newline (a progress bar's
    last state, a final print(..., end="")); the saved log still ends with it. Several jobs, since
    the stream drops it only some of the time."""
    ids = [submit(labqd, "alice", "--gpus", "0", "--", "sh", "-c",
                  'echo hello; sleep 0.5; printf "done-$LABQ_JOB_ID"') for _ in range(8)]
    for job_id in ids:
        assert labqd.wait_state(job_id, ("succeeded", "failed"))["state"] == "succeeded"
        logs = labqd.labq("logs", str(job_id), user="alice")
        assert logs.returncode == 0 and logs.stdout == f"hello\ndone-{job_id}", (job_id, logs.stdout)


def test_container_security_options(labqd: Labqd, users: dict[str, Any]) -> None:
    from labq_helpers import docker_client

    job_id = submit(labqd, "bob", "--gpus", "0", "--", "sleep", "30")
    job = labqd.wait_state(job_id, ("running",))
    c = docker_client().containers.get(job["container_id"])
    hc = c.attrs["HostConfig"]
    assert c.name == f"labq-{job_id}-bob"
    assert c.labels["labq.job"] == str(job_id) and c.labels["labq.user"] == "bob"
    assert c.attrs["Config"]["User"] == f"{users['bob'].pw_uid}:{users['bob'].pw_gid}"
    assert hc["Privileged"] is False
    assert "no-new-privileges" in hc["SecurityOpt"]
    assert not hc.get("CapAdd") and hc["CapDrop"] == ["ALL"]
    assert hc["NetworkMode"] != "host"
    assert [m["Source"] for m in c.attrs["Mounts"]] == [users["bob"].pw_dir]
    res = labqd.labq("cancel", str(job_id), user="bob")
    assert res.returncode == 0, res.stderr
    assert labqd.wait_state(job_id, ("cancelled",))["state"] == "cancelled"


def test_two_queues_on_one_engine_do_not_take_each_others_names(make_labqd: Any) -> None:
    """A second queue (or a reset queue database) numbers jobs from 1 again: its container gets a
    longer name instead of failing, and the other queue's container is left alone."""
    from labq_helpers import docker_client

    first, second = make_labqd(), make_labqd()
    ids = [submit(d, "alice", "--gpus", "0", "--", "sleep", "30") for d in (first, second)]
    assert ids[0] == ids[1]  # both fresh queues: the same job id, the same short name
    jobs = [d.wait_state(i, ("running",)) for d, i in zip((first, second), ids, strict=True)]
    containers = [docker_client().containers.get(j["container_id"]) for j in jobs]
    instances = [c.labels["labq.instance"] for c in containers]
    assert instances[0] != instances[1]
    assert containers[0].name == f"labq-{ids[0]}-alice"
    assert containers[1].name == f"labq-{ids[1]}-alice-{instances[1][:8]}"
    for d, job_id in zip((first, second), ids, strict=True):
        assert d.labq("cancel", str(job_id)).returncode == 0
        assert d.wait_state(job_id, ("cancelled",))["state"] == "cancelled"


def test_bob_cannot_cancel_alices_job(labqd: Labqd) -> None:
    job_id = submit(labqd, "alice", "--gpus", "1", "--", "sleep", "30")
    labqd.wait_state(job_id, ("running",))
    res = labqd.labq("cancel", str(job_id), user="bob")
    assert res.returncode == 4
    assert "only its owner or an admin" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    for verb in ("hold", "release"):
        assert labqd.labq(verb, str(job_id), user="bob").returncode == 4
    assert labqd.job(job_id)["state"] == "running"
    # everyone may list
    ls = labqd.labq("ls", "--json", user="bob")
    assert [j["id"] for j in json.loads(ls.stdout)] == [job_id]
    assert labqd.labq("cancel", str(job_id)).returncode == 0  # root is an admin
    assert labqd.wait_state(job_id, ("cancelled",))["reason"] == "cancelled by root"


def test_no_root_mount_and_no_privileges(make_labqd: Any) -> None:
    d = make_labqd('mounts = { scratch = "/tmp:/scratch:ro" }')
    for args, field in (
        (["--mount", "root"], "mounts"),
        (["--mount", "/"], "mounts"),
        (["--host-network"], "host_network"),
        (["--priority", "5"], "priority"),
    ):
        res = d.labq("submit", "--gpus", "0", *args, "--", "true", user="alice")
        assert res.returncode in (2, 4), res
        assert res.stderr.startswith(f"labq: {field}:"), res.stderr
    for field, value in (("privileged", True), ("cap_add", ["SYS_ADMIN"]), ("user", "root"),
                         ("volumes", ["/:/host"])):
        reply = d.call("submit", command=["true"], cwd="/root", gpus=0, **{field: value})
        assert reply["error"]["message"] == f"{field}: unknown field for 'submit'"
    assert json.loads(d.labq("ls", "--json").stdout) == []
    job_id = submit(d, "alice", "--gpus", "0", "--mount", "scratch", "--", "sh", "-c", "touch /scratch/x")
    job = d.wait_state(job_id, ("succeeded", "failed"))
    assert job["state"] == "failed" and job["exit_code"] != 0  # read-only allow-list mount


def test_queue_order_and_gpu_reuse(labqd: Labqd) -> None:
    first = [submit(labqd, "alice", "--gpus", "4", "--", "sleep", "1")]
    waiting = submit(labqd, "bob", "--gpus", "3", "--", "true")
    job = wait_for(lambda: labqd.job(waiting), lambda j: j["reason"] != "")
    assert job["state"] == "pending" and job["reason"] == "Resources"
    ls = labqd.labq("ls")
    row = next(line for line in ls.stdout.splitlines() if line.startswith(str(waiting)))
    assert "PENDING" in row and "Resources" in row and "bob" in row
    done = labqd.wait_state(waiting, ("succeeded",))
    head = labqd.job(first[0])
    assert done["start_time"] >= head["end_time"] - 0.01
    gpus = json.loads(labqd.labq("gpus", "--json").stdout)
    assert [g["state"] for g in gpus] == ["free"] * 4


def test_next_job_is_prepared_while_the_gpus_are_busy(labqd: Labqd) -> None:
    from labq_helpers import docker_client

    api = docker_client().api

    def container(job_id: int, user: str) -> dict[str, Any] | None:
        try:
            return api.inspect_container(f"labq-{job_id}-{user}")  # type: ignore[no-any-return]
        except Exception:
            return None

    busy = submit(labqd, "alice", "--gpus", "4", "--", "sleep", "4")
    labqd.wait_state(busy, ("running",))
    dropped = submit(labqd, "bob", "--gpus", "3", "--", "true")
    made = wait_for(lambda: container(dropped, "bob"), lambda c: c is not None)
    assert made is not None and made["State"]["Status"] == "created"  # made, never started
    assert labqd.labq("cancel", str(dropped), user="bob").returncode == 0
    assert wait_for(lambda: container(dropped, "bob"), lambda c: c is None) is None  # removed
    nxt = submit(labqd, "bob", "--gpus", "3", "--", "sh", "-c", 'echo "gpus=$CUDA_VISIBLE_DEVICES"')
    ahead = wait_for(lambda: container(nxt, "bob"), lambda c: c is not None)
    assert ahead is not None and ahead["State"]["Status"] == "created"
    assert labqd.job(busy)["state"] == "running"
    done = labqd.wait_state(nxt, ("succeeded",))
    assert done["container_id"] == ahead["Id"]  # the prepared container is the one that ran
    assert done["assigned_gpus"] == labqd.job(busy)["assigned_gpus"][:3]
    out = wait_for(lambda: labqd.labq("logs", str(nxt), user="bob").stdout, lambda o: o != "")
    assert out == f"gpus={','.join(done['assigned_gpus'])}\n"
    assert labqd.job(dropped)["state"] == "cancelled" and labqd.job(dropped)["start_time"] is None


def test_bad_input_is_refused_and_nothing_queued(labqd: Labqd) -> None:
    cases = [
        (["--gpus", "5", "--", "true"], "gpus"),
        (["--gpus", "-1", "--", "true"], "gpus"),
        (["--gpus", "0", "--image", "no-such-image:1", "--", "true"], "image"),
        (["--gpus", "0", "--time", "4x", "--", "true"], "time"),
        (["--gpus", "0", "--time", "0", "--", "true"], "time"),
        (["--gpus", "0", "--cpus", "0", "--", "true"], "cpus"),
        (["--gpus", "0", "--after", "999", "--", "true"], "after"),
        (["--gpus", "0", "--", "echo", "x" * 70000], "command"),
        (["--gpus", "0", "--env", "LABQ_JOB_ID=1", "--", "true"], "env"),
    ]
    for args, field in cases:
        res = labqd.labq("submit", *args, user="alice")
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.startswith(f"labq: {field}:"), (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1
    import subprocess
    import sys

    from labq_helpers import REPO

    raw = subprocess.run([sys.executable, "-m", "job_queue.cli", "submit", "--gpus", "0", "--", "echo",
                          b"caf\xff"], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "LABQ_SOCKET": labqd.socket, "PYTHONPATH": str(REPO)})
    assert raw.returncode == 2 and raw.stderr == "labq: command: not valid UTF-8\n"
    assert json.loads(labqd.labq("ls", "--json").stdout) == []
    assert labqd.labq("show", "12345").returncode == 3
    assert labqd.call("ping")["ok"]


def test_sigterm_drains_and_running_containers_survive(labqd: Labqd, users: dict[str, Any]) -> None:
    job_id = submit(labqd, "alice", "--gpus", "1", "--", "sleep", "3")
    job = labqd.wait_state(job_id, ("running",))
    assert labqd.terminate() == 0
    from labq_helpers import docker_client

    assert docker_client().containers.get(job["container_id"]).status == "running"
    assert not Path(labqd.socket).exists()
    labqd.start()
    done = labqd.wait_state(job_id, ("succeeded",))
    assert done["container_id"] == job["container_id"]
    assert time.time() - done["end_time"] < 60


def test_second_labqd_on_the_same_state_refuses_and_touches_nothing(labqd: Labqd) -> None:
    """An admin starting labqd by hand while the service runs: the second one stops before it
    re-adopts the running job (which would rewrite its log file under the first daemon)."""
    job_id = submit(labqd, "alice", "--gpus", "1", "--", "sh", "-c",
                    "for i in 1 2 3; do echo line$i; done; sleep 8; echo done")
    labqd.wait_state(job_id, ("running",))
    log = labqd.log_dir / f"{job_id}.log"
    # "running" is recorded when the container starts; the log file appears a moment later, when
    # labqd's follower opens it. The job sleeps long enough for the second daemon to come and go.
    first = wait_for(lambda: log.read_bytes() if log.exists() else b"",
                     lambda data: data == b"line1\nline2\nline3\n", timeout=10)
    assert first == b"line1\nline2\nline3\n"
    import subprocess

    from labq_helpers import PYTHON, REPO

    second = subprocess.run([PYTHON, "-m", "job_queue.daemon", "--config", str(labqd.config)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert labqd.proc is not None
    assert second.returncode == 1
    assert second.stderr == (f"labqd: another labqd (pid {labqd.proc.pid}) is running on "
                             f"{labqd.root / 'state'}; stop it first (systemctl stop labqd)\n")
    assert log.read_bytes() == b"line1\nline2\nline3\n"  # not rewritten
    assert labqd.call("ping")["ok"] and Path(labqd.socket).exists()
    assert labqd.wait_state(job_id, ("succeeded",))["exit_code"] == 0
    assert log.read_bytes() == b"line1\nline2\nline3\ndone\n"


def test_admin_group_member_may_manage_others_jobs(labqd: Labqd) -> None:
    (job_id,) = [submit(labqd, "alice", "--gpus", "0", "--hold", "--", "true")]
    assert labqd.labq("release", str(job_id), user="bob").returncode == 4
    ping = labqd.call("ping")["result"]
    assert ping["admin"] is True  # root
    hi = labqd.labq("submit", "--gpus", "0", "--priority", "7", "--hold", "--json", "--", "true",
                    user="carol")
    assert hi.returncode == 0, hi.stderr
    assert labqd.job(json.loads(hi.stdout)["ids"][0])["priority"] == 7
    assert labqd.labq("cancel", str(job_id), user="carol").returncode == 0
    job = labqd.job(job_id)
    assert job["state"] == "cancelled" and job["reason"] == "cancelled by carol"


def test_cli_errors_are_one_line_with_exit_codes(labqd: Labqd) -> None:
    down = labqd.labq("--socket", "/nonexistent/labq.sock", "ls")
    assert down.returncode == 6 and down.stderr.startswith("labq: cannot reach labqd")
    assert len(down.stderr.strip().splitlines()) == 1
    nocmd = labqd.labq("submit", "--gpus", "1", user="alice")
    assert nocmd.returncode == 2 and "no command given" in nocmd.stderr
    assert labqd.labq("cancel", "999", user="alice").returncode == 3
    help_ = labqd.labq("--help")
    assert help_.returncode == 0 and "submit" in help_.stdout and "gpus" in help_.stdout
