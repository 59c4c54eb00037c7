"""End-to-end checks of playbooks/slurm.yml on the local lab: one Slurm queue for both GPU nodes.

slurmctld, slurmdbd and MariaDB run on infra01, slurmd on gpu01 (two fake GPUs) and gpu02 (one). The fake
GPUs are character devices 195:N (inventory/lab/group_vars/slurm_nodes): Slurm binds and constrains them
like real ones. The LDAP members alice and bob log in over SSH and use sbatch, squeue and scancel as
students do.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
from lab_helpers import lab_portal, run_playbook, ssh
from mon_sinks import SlackSink
from test_lab_mail import arrived, sink
from test_lab_monitoring import query

__all__ = ["sink"]  # the test smarthost fixture of test_lab_mail.py, used here too

pytestmark = [pytest.mark.lab, pytest.mark.slow]

CONTROLLER = "infra01"
NODES = {"gpu01": 2, "gpu02": 1}
SLURM_HOSTS = (CONTROLLER, *NODES)
SLACK = ("172.30.57.1", 18080)  # slurm_mail_slack_webhook_url in inventory/lab: the lab network's gateway

GPU_PROBE = """#!/bin/bash
# Which GPU this job got, and which devices it can open (ENXIO: allowed, no driver; EPERM: denied).
echo "user=$(id -un) node=$SLURMD_NODENAME gpus=$SLURM_JOB_GPUS cvd=$CUDA_VISIBLE_DEVICES"
for d in /dev/fakegpu*; do
  python3 -c 'import sys
try:
    open(sys.argv[1], "rb")
except OSError as e:
    print("open", sys.argv[1], e.strerror)' "$d"
done
grep -m1 devices /proc/self/cgroup
"""


def sbatch(lab, user: str, *args: str, node: str = "gpu01") -> int:
    """Submit as a member logged in on a node; the job's id. The job starts in /tmp: the lab's homes are
    local to each node (no NFS in containers), so a home the member never logged in to does not exist."""
    out = ssh(lab[node]["address"], user, shlex.join(["sbatch", "--parsable", "--chdir=/tmp", *args]))
    assert out.returncode == 0, out.stdout + out.stderr
    return int(out.stdout.strip().split(";")[0])


def job_info(host_exec, job_id: int) -> dict[str, str]:
    """The job as slurmctld sees it ({} when it has left the queue)."""
    out = host_exec(CONTROLLER, "squeue", "-h", "-j", str(job_id), "-o", "%T|%r|%N|%u")
    if out.returncode != 0 or not out.stdout.strip():
        return {}
    state, reason, nodes, user = out.stdout.strip().split("|")
    return {"state": state, "reason": reason, "nodes": nodes, "user": user}


def wait_for(check: Callable[[], object], timeout: float = 60.0, every: float = 1.0) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def sacct(host_exec, job_id: int, fields: str = "State,User,NodeList,AllocTRES,ExitCode") -> list[str]:
    out = host_exec(CONTROLLER, "sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", fields)
    return out.stdout.strip().split("|") if out.stdout.strip() else []


def final_state(host_exec, job_id: int, timeout: float = 90.0) -> str:
    def done() -> str:
        row = sacct(host_exec, job_id, "State")
        return row[0] if row and row[0] not in ("PENDING", "RUNNING", "REQUEUED", "") else ""

    return str(wait_for(done, timeout, 2.0))


def wait_state_saved(host_exec) -> None:
    """Wait for slurmctld to write its job state after the jobs just submitted: it batches its saves a few
    seconds after a change, and every job older than the last save survives a crash."""
    now = int(host_exec(CONTROLLER, "date", "+%s").stdout)
    state_file = "/var/lib/slurm/slurmctld/job_state"

    def saved() -> bool:
        return int(host_exec(CONTROLLER, "stat", "-c", "%Y", state_file).stdout) > now

    assert wait_for(saved, 30), host_exec(CONTROLLER, "ls", "-l", "--time-style=+%s", state_file).stdout


@pytest.fixture(scope="module")
def slurm(second_run, host_exec):
    """The converged lab's Slurm, with every node idle before the module's jobs (nothing left running)."""
    host_exec(CONTROLLER, "scancel", "--full", "--state=PENDING,RUNNING,SUSPENDED", "-u", "alice")
    host_exec(CONTROLLER, "scancel", "--full", "--state=PENDING,RUNNING,SUSPENDED", "-u", "bob")

    def idle() -> bool:
        out = host_exec(CONTROLLER, "sinfo", "-h", "-N", "-o", "%N %T")
        return sorted(out.stdout.split()) == sorted(" ".join(f"{n} idle" for n in NODES).split())

    assert wait_for(idle, 120, 2.0), host_exec(CONTROLLER, "sinfo", "-N").stdout
    return second_run


@pytest.fixture
def cleanup(host_exec) -> Iterator[list[int]]:
    """Job ids a test submitted; cancelled at its end whatever happened."""
    ids: list[int] = []
    yield ids
    if ids:
        host_exec(CONTROLLER, "scancel", *map(str, ids))


def test_both_nodes_are_idle_with_their_gpus(slurm, host_exec):
    out = host_exec(CONTROLLER, "sinfo", "-h", "-N", "-o", "%N|%T|%G|%c|%P")
    rows = {line.split("|")[0]: line.split("|")[1:] for line in out.stdout.split()}
    assert set(rows) == set(NODES), out.stdout
    for node, gpus in NODES.items():
        state, gres, cpus, partition = rows[node]
        assert (state, gres, cpus, partition) == ("idle", f"gpu:{gpus}", "2", "gpu*"), rows[node]
    ping = host_exec(CONTROLLER, "scontrol", "ping")
    assert "is UP" in ping.stdout, ping.stdout


def test_a_members_gpu_job_runs_as_her_and_opens_only_its_own_gpu(slurm, lab, host_exec, cleanup):
    name = f"probe-{uuid.uuid4().hex[:6]}"
    for node in NODES:
        script = f"cat >/tmp/{name}.sh <<'EOF'\n{GPU_PROBE}EOF\nchmod 755 /tmp/{name}.sh"
        host_exec(node, "bash", "-c", script)
    job_id = sbatch(lab, "alice", "--wait", "--gres=gpu:1", f"--output=/tmp/{name}.out", f"/tmp/{name}.sh")
    state, user, node, tres, exit_code = sacct(host_exec, job_id)
    assert (state, user, exit_code) == ("COMPLETED", "alice", "0:0")
    assert node in NODES and "gres/gpu=1" in tres, tres
    lines = host_exec(node, "cat", f"/tmp/{name}.out").stdout.splitlines()
    head = dict(field.split("=", 1) for field in lines[0].split())
    assert (head["user"], head["node"], head["cvd"]) == ("alice", node, "0"), lines  # one GPU, seen as 0
    opened = dict(line.split(" ", 2)[1:] for line in lines if line.startswith("open "))
    own = f"/dev/fakegpu{head['gpus']}"
    assert opened.pop(own) == "No such device or address", lines  # its own GPU: allowed (no driver)
    assert len(opened) == NODES[node] - 1, lines
    assert set(opened.values()) <= {"Operation not permitted"}, lines  # every other GPU: denied
    assert f"/slurm_{node}/uid_20001/job_{job_id}" in lines[-1], lines


def test_jobs_wait_for_resources_and_start_when_a_gpu_frees(slurm, lab, host_exec, cleanup):
    running = [sbatch(lab, "alice", "--gres=gpu:1", "--wrap", "sleep 120") for _ in range(3)]
    cleanup += running

    def all_running() -> list[dict[str, str]]:
        infos = [job_info(host_exec, j) for j in running]
        return infos if all(i.get("state") == "RUNNING" for i in infos) else []

    infos = wait_for(all_running, 60)
    assert infos, [job_info(host_exec, j) for j in running]
    assert {i["nodes"] for i in infos} == set(NODES)  # spread over both nodes: 2 + 1 GPUs
    # alice's fourth job waits on her limit (lab_max_gpus_per_user: 3), bob's for a GPU to free.
    over_limit = sbatch(lab, "alice", "--gres=gpu:1", "--wrap", "sleep 1")
    cleanup.append(over_limit)
    limited = wait_for(lambda: job_info(host_exec, over_limit).get("reason") == "AssocGrpGRES", 30)
    assert limited, job_info(host_exec, over_limit)
    waiting = sbatch(lab, "bob", "--gres=gpu:1", "--wrap", "sleep 1", node="gpu02")
    cleanup.append(waiting)
    pending = wait_for(lambda: job_info(host_exec, waiting).get("reason") == "Resources", 30)
    assert pending, job_info(host_exec, waiting)
    host_exec(CONTROLLER, "scancel", str(running[0]))
    assert final_state(host_exec, waiting) == "COMPLETED"
    assert sacct(host_exec, waiting, "User")[0] == "bob"


def test_bob_cannot_cancel_alices_job(slurm, lab, host_exec, cleanup):
    job_id = sbatch(lab, "alice", "--gres=gpu:1", "--wrap", "sleep 120")
    cleanup.append(job_id)
    assert wait_for(lambda: job_info(host_exec, job_id).get("state") == "RUNNING", 60)
    out = ssh(lab["gpu02"]["address"], "bob", f"scancel {job_id}")
    assert out.returncode != 0
    assert "Access/permission denied" in out.stdout + out.stderr, out.stdout + out.stderr
    time.sleep(2)
    assert job_info(host_exec, job_id)["state"] == "RUNNING"


def test_a_killed_slurmctld_is_restarted_and_loses_no_job(slurm, lab, host_exec, cleanup):
    running = sbatch(lab, "alice", "--gres=gpu:1", "--wrap", "sleep 120")
    held = sbatch(lab, "alice", "--hold", "--wrap", "true")
    pending = sbatch(lab, "bob", f"--dependency=afterok:{running}", "--wrap", "true", node="gpu02")
    cleanup += [running, held, pending]
    assert wait_for(lambda: job_info(host_exec, running).get("state") == "RUNNING", 60)
    before = {j: job_info(host_exec, j) for j in (running, held, pending)}
    assert [before[held]["reason"], before[pending]["reason"]] == ["JobHeldUser", "Dependency"], before
    wait_state_saved(host_exec)
    main_pid = ("systemctl", "show", "-p", "MainPID", "--value", "slurmctld")
    pid = host_exec(CONTROLLER, *main_pid).stdout.strip()
    assert host_exec(CONTROLLER, "kill", "-9", pid).returncode == 0

    def back() -> bool:
        new = host_exec(CONTROLLER, *main_pid).stdout.strip()
        return new not in ("", "0", pid) and "is UP" in host_exec(CONTROLLER, "scontrol", "ping").stdout

    assert wait_for(back, 60), host_exec(CONTROLLER, "systemctl", "status", "slurmctld").stdout
    assert {j: job_info(host_exec, j) for j in before} == before



def test_an_absent_member_can_no_longer_submit_and_keeps_her_history(slurm, lab, host_exec):
    earlier = sbatch(lab, "bob", "--wait", "--wrap", "true", node="gpu02")
    members = [{"name": "alice", "uid": 20001, "groups": ["lab-admins"], "state": "present"},
               {"name": "bob", "uid": 20002, "groups": [], "state": "absent"}]
    try:
        run = run_playbook("slurm.yml", "--tags", "users", "-e", json.dumps({"lab_users": members}))
        assert run.rc == 0, run.output[-3000:]
        refused = ssh(lab["gpu02"]["address"], "bob", "sbatch --parsable --chdir=/tmp --wrap true")
        assert refused.returncode != 0
        assert "Invalid account" in refused.stderr, refused.stderr
        assert sacct(host_exec, earlier, "User,State") == ["bob", "COMPLETED"]  # the history stays
    finally:
        back = run_playbook("slurm.yml", "--tags", "users")
        assert back.rc == 0, back.output[-3000:]
    again = sbatch(lab, "bob", "--wait", "--wrap", "true", node="gpu02")
    assert sacct(host_exec, again, "State") == ["COMPLETED"]


@pytest.fixture
def slurm_slack() -> Iterator[SlackSink]:
    receiver = SlackSink(*SLACK)
    yield receiver
    receiver.close()


def test_job_notices_reach_the_owner_by_mail_and_the_labs_slack(slurm, lab, sink, slurm_slack):
    token = uuid.uuid4().hex[:8]
    sbatch(lab, "alice", "--mail-type=END,FAIL", f"--job-name=ok-{token}", "--wrap", "true")
    sbatch(lab, "alice", "--mail-type=END,FAIL", f"--job-name=bad-{token}", "--wrap", "exit 3")
    texts: list[str] = []
    deadline = time.monotonic() + 90
    while len(texts) < 2 and (left := deadline - time.monotonic()) > 0:
        path, body = slurm_slack.next(timeout=left)  # Alertmanager posts to the same receiver, at /slack
        if path == "/slurm":
            texts.append(body["text"])
    [failed] = [text for text in texts if f"(bad-{token}) FAILED on labkit" in text]
    [finished] = [text for text in texts if f"(ok-{token}) finished on labkit" in text]
    assert "state: failed, exit code: 3" in failed and "state: completed, exit code: 0" in finished, texts
    [mail] = arrived(sink, f"bad-{token}")
    assert mail["to"] == ["alice@lab.test"], mail
    assert "Subject: Slurm job" in mail["data"] and "FAILED" in mail["data"], mail["data"][:500]


def prom(lab, expr: str) -> dict[str, float]:
    """A PromQL query at the lab's Prometheus: {labels as text: value}."""
    answer = query(lab_portal(lab["infra01"]["address"]), expr)
    return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in answer["data"]["result"]}


def test_the_slurm_exporter_is_scraped_and_sees_jobs_and_gpus(slurm, lab, host_exec, cleanup):
    job_id = sbatch(lab, "alice", "--gres=gpu:1", "--wrap", "sleep 90")
    cleanup.append(job_id)
    assert wait_for(lambda: job_info(host_exec, job_id).get("state") == "RUNNING", 60)
    alices = 'labkit_slurm_user_gpus_allocated{user="alice"}'
    assert wait_for(lambda: sum(prom(lab, alices).values()) == 1, 60), prom(lab, alices)
    assert list(prom(lab, 'up{job="slurm"}').values()) == [1.0]
    assert list(prom(lab, "labkit_slurm_controller_up").values()) == [1.0]
    assert list(prom(lab, "labkit_slurm_dbd_up").values()) == [1.0]
    gpus = prom(lab, "labkit_slurm_node_gpus")
    assert sorted(gpus.values()) == sorted(float(n) for n in NODES.values()), gpus


@pytest.mark.disruptive
def test_a_restart_of_the_controller_host_loses_no_job(slurm, lab, host_exec, cleanup):
    running = sbatch(lab, "alice", "--gres=gpu:1", "--wrap", "sleep 45")
    pending = sbatch(lab, "alice", f"--dependency=afterok:{running}", "--wrap", "true")
    cleanup += [running, pending]
    assert wait_for(lambda: job_info(host_exec, running).get("state") == "RUNNING", 60)
    wait_state_saved(host_exec)
    subprocess.run(["docker", "restart", "labkit-infra01"], check=True, capture_output=True, timeout=180)
    assert wait_for(lambda: "is UP" in host_exec(CONTROLLER, "scontrol", "ping").stdout, 120)
    assert job_info(host_exec, running).get("state") == "RUNNING", job_info(host_exec, running)
    assert final_state(host_exec, running, 120) == "COMPLETED"
    assert final_state(host_exec, pending, 60) == "COMPLETED"


@pytest.fixture
def fingerprint(host_exec) -> Callable[[], dict[str, str]]:
    """What a refused run must leave as it was: Slurm's and munge's files and the daemons' start times."""
    units = {CONTROLLER: "slurmctld slurmdbd munge", "gpu01": "slurmd munge", "gpu02": "slurmd munge"}

    def take() -> dict[str, str]:
        prints = {}
        for host in SLURM_HOSTS:
            files = host_exec(host, "bash", "-c", "sha256sum /etc/slurm/*.conf /etc/munge/munge.key")
            started = host_exec(host, "bash", "-c", f"systemctl show -p ActiveEnterTimestamp {units[host]}")
            prints[host] = files.stdout + started.stdout
        return prints

    return take


BAD_INPUTS = [
    pytest.param({"slurm_config_nodes": ["gpu01", "infra01"]}, "gpu_nodes", id="node-not-a-gpu-node"),
    pytest.param(
        {"slurm_config_partitions": [{"name": "gpu", "nodes": ["gpu01", "gpu09"], "default": True}]},
        "gpu09",
        id="unknown-partition-member",
    ),
    pytest.param({"slurm_config_node_gpus": "two"}, "slurm_config_node_gpus", id="gpu-count-not-a-number"),
    pytest.param({"munge_key": ""}, "munge_key", id="missing-munge-key"),
    pytest.param({"munge_key": "not base64 at all!"}, "munge_key", id="munge-key-not-base64"),
    pytest.param(
        {"slurm_config_partitions": [{"name": "a", "nodes": "ALL", "default": True},
                                     {"name": "b", "nodes": "ALL", "default": True}]},
        "slurm_config_partitions",
        id="two-default-partitions",
    ),
    pytest.param(
        {"slurm_config_partitions": [{"name": "gpu", "nodes": "ALL", "default": True,
                                      "max_time": "forever"}]},
        "max_time",
        id="partition-time-limit",
    ),
    pytest.param({"slurm_config_node_cpus": 64}, "slurm_config_node_cpus", id="cpus-differ-from-the-node"),
    pytest.param({"slurm_config_node_gpu_files": []}, "slurm_config_node_gpu_files", id="gpu-files-missing"),
    pytest.param(
        {"slurm_node_test_fake_gpus": False, "slurm_config_node_gpus": 1,
         "slurm_config_node_gpu_files": ["/dev/nvidia0"]},
        "devices the node does not have: [\"/dev/nvidia0\"]",
        id="gpu-device-not-on-the-node",
    ),
    pytest.param(
        {"slurm_config_scheduler_parameters": ["batch_sched_delay=0, bf_continue"]},
        "slurm_config_scheduler_parameters",
        id="scheduler-parameter-malformed",
    ),
]


@pytest.mark.parametrize(("extra_vars", "named"), BAD_INPUTS)
def test_bad_input_is_refused_by_name_and_changes_nothing(slurm, fingerprint, extra_vars, named):
    before = fingerprint()
    run = run_playbook("slurm.yml", "-e", json.dumps(extra_vars))
    assert run.rc != 0, run.output[-3000:]
    assert named in run.output, run.output[-3000:]
    for host, counts in run.recap().items():
        assert counts["changed"] == 0, f"{host} changed despite bad input:\n{run.output[-3000:]}"
    assert fingerprint() == before
