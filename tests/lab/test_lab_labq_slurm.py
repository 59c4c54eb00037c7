"""labq on Slurm in the lab (issue 16): `labq submit` becomes an sbatch, labqd runs the container inside
the Slurm job, and ls/show/cancel read Slurm.

The module switches the GPU nodes' job_queue role to ``job_queue_scheduler=slurm`` (a real converge of
playbooks/job_queue.yml) and back to the lab's default afterwards. Members log in over SSH as students
do. Jobs start in /tmp: the lab's homes are local to each node.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab_helpers import run_playbook, ssh
from mon_sinks import SlackSink
from test_lab_slurm import SLACK, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.slow]

CONTROLLER = "infra01"
NODES = {"gpu01": 2, "gpu02": 1}
IMAGE = "labkit-job:1"  # the lab job image (labctl job-image): Debian 12, python3, coreutils
GRACE = 30  # job_queue_kill_grace (role default)
FINAL = {"succeeded", "failed", "cancelled", "timeout"}
REPO = Path(__file__).resolve().parents[2]
SCRATCH = REPO / ".lab" / "scratch"  # the GPU nodes' shared /srv/scratch (labctl), /scratch in jobs

PROBE = ("echo job=$SLURM_JOB_ID gpus=$SLURM_JOB_GPUS labq=$LABQ_GPUS cvd=$CUDA_VISIBLE_DEVICES "
         "devs=$(echo /dev/fakegpu*)")

FORGE = """import json, os, socket, sys
job, gpus = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_UNIX); s.connect("/run/labq/labq.sock")
spec = {"command": ["/bin/dash", "-c", "true"], "cwd": "/tmp", "gpus": gpus}
s.sendall(json.dumps({"v": 1, "op": "slurm_run", "job": job, "spec": spec}).encode() + b"\\n")
print(s.makefile().readline().strip())
"""


def labq(lab, user: str, *args: str, node: str = "gpu01"):
    return ssh(lab[node]["address"], user, "cd /tmp && " + shlex.join(["labq", *args]))


def submit(lab, user: str, *args: str, node: str = "gpu01") -> int:
    out = labq(lab, user, "submit", "--json", "--image", IMAGE, *args, node=node)
    assert out.returncode == 0, out.stdout + out.stderr
    return int(json.loads(out.stdout)["ids"][0])


def show(lab, user: str, job_id: int) -> dict:
    out = labq(lab, user, "show", "--json", str(job_id))
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def final(lab, user: str, job_id: int, timeout: float = 120.0) -> dict:
    def done() -> dict | None:
        job = show(lab, user, job_id)
        return job if job["state"] in FINAL else None

    job = wait_for(done, timeout, 2.0)
    assert job, f"job {job_id} did not end within {timeout} s: {show(lab, user, job_id)}"
    return job  # type: ignore[return-value]


def sacct(host_exec, job_id: int, fields: str = "State,ExitCode,NodeList") -> list[str]:
    out = host_exec(CONTROLLER, "sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", fields)
    return out.stdout.strip().split("|") if out.stdout.strip() else []


def container_pid(host_exec, node: str, job_id: int) -> int | None:
    out = host_exec(node, "docker", "inspect", "-f", "{{.State.Pid}}", f"labq-slurm-{job_id}-alice")
    return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() not in ("", "0") else None


@pytest.fixture(scope="module")
def slurm_mode(second_run, job_image, host_exec) -> Iterator[None]:
    run = run_playbook("job_queue.yml", "-l", "gpu_nodes", "-e", "job_queue_scheduler=slurm")
    assert run.rc == 0, run.output[-3000:]
    for node in NODES:
        assert "scheduler = \"slurm\"" in host_exec(node, "cat", "/etc/labq/config.toml").stdout
    try:
        yield
    finally:
        host_exec(CONTROLLER, "scancel", "--full", "-u", "alice")
        host_exec(CONTROLLER, "scancel", "--full", "-u", "bob")
        back = run_playbook("job_queue.yml", "-l", "gpu_nodes")
        assert back.rc == 0, back.output[-3000:]


def test_six_jobs_on_three_gpus_run_inside_their_slurm_jobs(lab, slurm_mode, host_exec):
    """alice's 6 one-GPU jobs on the lab's 3 GPUs: 3 run (both nodes), 3 wait; each container's processes
    are in its Slurm job's cgroup, see exactly the GPU Slurm gave; `labq ls --json` agrees with squeue;
    all end succeeded."""
    ids = [submit(lab, "alice", "--gpus", "1", "--name", f"six{i}", "--", "/bin/dash", "-c",
                  f"{PROBE}; sleep 20") for i in range(6)]

    def three_running() -> list[dict] | None:
        jobs = json.loads(labq(lab, "alice", "ls", "--json", "--user", "alice").stdout)
        mine = [j for j in jobs if j["id"] in ids]
        running = [j for j in mine if j["state"] == "running"]
        return mine if len(running) == 3 and all(container_pid(host_exec, j["node"], j["id"])
                                                 for j in running) else None

    jobs = wait_for(three_running, 90)
    assert jobs, labq(lab, "alice", "ls").stdout
    running = [j for j in jobs if j["state"] == "running"]  # type: ignore[union-attr]
    assert sorted(j["node"] for j in running) == ["gpu01", "gpu01", "gpu02"], running
    pending = [j for j in jobs if j["state"] == "pending"]  # type: ignore[union-attr]
    assert len(pending) == 3, jobs
    assert {j["reason"] for j in pending} <= {"Resources", "Priority", "AssocGrpGRES"}, pending  # Slurm's

    squeue = host_exec(CONTROLLER, "squeue", "-h", "-u", "alice", "-o", "%A|%T|%N").stdout.split()
    slurm_view = {int(a): (t, n) for a, t, n in (line.split("|") for line in squeue)}
    labq_view = {j["id"]: (j["slurm_state"], j["node"] or "") for j in jobs}  # type: ignore[union-attr]
    assert {i: slurm_view[i] for i in ids if i in slurm_view} == labq_view

    for job in running:
        node, job_id = job["node"], job["id"]
        pid = container_pid(host_exec, node, job_id)
        cgroup = host_exec(node, "cat", f"/proc/{pid}/cgroup").stdout
        for ctl in ("memory", "devices", "freezer"):
            line = next(ln for ln in cgroup.splitlines() if f":{ctl}:" in ln or ln.startswith("0::"))
            assert f"/slurm_{node}/uid_" in line and f"/job_{job_id}/" in line, (ctl, cgroup)
        idx = host_exec(CONTROLLER, "scontrol", "show", "job", "-d", str(job_id)).stdout
        assert "GRES=gpu:1(IDX:" in idx
        devices_cg = next(ln for ln in cgroup.splitlines() if ":devices:" in ln).split(":", 2)[2]
        allowed = host_exec(node, "cat", f"/sys/fs/cgroup/devices{devices_cg}/devices.list").stdout
        assert "a *:* rwm" not in allowed and allowed.count("c 195:") == 1, allowed  # its GPU only
        mknod = host_exec(node, "docker", "exec", f"labq-slurm-{job_id}-alice", "mknod", "/tmp/g", "c",
                          "195", "1")
        assert mknod.returncode != 0  # no other GPU can be made and opened inside

    for job_id in ids:
        job = final(lab, "alice", job_id)
        assert (job["state"], job["exit_code"]) == ("succeeded", 0), job
        assert sacct(host_exec, job_id)[:2] == ["COMPLETED", "0:0"]
        out = labq(lab, "alice", "logs", str(job_id), node=job["node"]).stdout
        node_gpus = {"gpu01": ["GPU-fake-0", "GPU-fake-1"], "gpu02": ["GPU-fake-0", "GPU-fake-1"]}
        fields = dict(kv.split("=", 1) for kv in out.split())
        index = int(fields["gpus"])
        assert fields["job"] == str(job_id)
        assert fields["labq"] == fields["cvd"] == node_gpus[job["node"]][index], out
        assert fields["devs"] == f"/dev/fakegpu{index}", out
    metrics = host_exec("gpu01", "python3", "-c", "import urllib.request; print(urllib.request.urlopen("
                        "'http://127.0.0.1:9848/metrics').read().decode())").stdout
    assert 'labq_jobs_finished_total{outcome="succeeded",user="alice"}' in metrics, metrics[-1500:]


def test_cancel_and_scancel_stop_the_container_within_the_grace_time(lab, slurm_mode, host_exec):
    a = submit(lab, "alice", "--gpus", "1", "--", "/bin/sleep", "600")
    b = submit(lab, "alice", "--gpus", "1", "--", "/bin/sleep", "600")
    for job_id in (a, b):
        assert wait_for(lambda j=job_id: show(lab, "alice", j)["state"] == "running", 60)
    nodes = {j: show(lab, "alice", j)["node"] for j in (a, b)}
    assert wait_for(lambda: all(container_pid(host_exec, nodes[j], j) for j in (a, b)), 30)
    t0 = time.monotonic()
    assert labq(lab, "alice", "cancel", str(a)).returncode == 0
    host_exec(CONTROLLER, "scancel", str(b))  # as an admin would
    for job_id in (a, b):
        gone = wait_for(lambda j=job_id: host_exec(nodes[j], "docker", "inspect", f"labq-slurm-{j}-alice")
                        .returncode != 0, GRACE + 20)
        assert gone, f"job {job_id}'s container outlived scancel"
        assert final(lab, "alice", job_id)["state"] == "cancelled"
        assert sacct(host_exec, job_id)[0].startswith("CANCELLED")
    assert time.monotonic() - t0 < GRACE + 25


def test_bob_can_neither_cancel_nor_claim_alices_job(lab, slurm_mode, host_exec):
    """bob's `labq cancel` is refused; a slurm_run for alice's job from outside it, or from a job of
    one's own for another job or other GPUs, is refused by labqd and logged."""
    job_id = submit(lab, "alice", "--gpus", "1", "--", "/bin/sleep", "120")
    assert wait_for(lambda: show(lab, "alice", job_id)["state"] == "running", 60)
    node = show(lab, "alice", job_id)["node"]
    out = labq(lab, "bob", "cancel", str(job_id))
    assert out.returncode == 4 and "belongs to alice" in out.stderr, out.stderr
    assert show(lab, "alice", job_id)["state"] == "running"

    forge = shlex.quote(FORGE)
    reply = ssh(lab[node]["address"], "bob", f"python3 -c {forge} {job_id} 1").stdout
    assert '"ok":false' in reply and "is not a process of Slurm job" in reply, reply
    reply = ssh(lab[node]["address"], "alice", f"python3 -c {forge} {job_id} 1").stdout
    assert "is not a process of Slurm job" in reply, reply  # alice's own shell is not the job either

    # From inside a Slurm job of her own: another GPU count, then another job (on another node).
    script = f"python3 -c {forge} $SLURM_JOB_ID 2; python3 -c {forge} {job_id} 1"
    own = ssh(lab["gpu01"]["address"], "alice", shlex.join(
        ["sbatch", "--parsable", "--wait", "--chdir=/tmp", "--gres=gpu:1", "-w", "gpu01",
         "--output=/tmp/forge.out", "--wrap", script]))
    assert own.returncode == 0, own.stdout + own.stderr
    lines = host_exec("gpu01", "cat", "/tmp/forge.out").stdout.splitlines()
    assert "asks for 2 GPUs but Slurm job" in lines[0], lines
    assert "is not a process of Slurm job" in lines[1] or "runs on" in lines[1], lines
    log = host_exec(node, "journalctl", "-u", "labqd", "--since", "-5min", "--no-pager").stdout
    assert "slurm_run refused: pid" in log and "(bob) for Slurm job" in log, log[-2000:]
    host_exec(CONTROLLER, "scancel", str(job_id))


def test_labqd_killed_while_jobs_run_readopts_and_nothing_runs_twice(lab, slurm_mode, host_exec):
    job_id = submit(lab, "alice", "--gpus", "1", "--", "/bin/dash", "-c", "echo start; sleep 20; exit 3")
    assert wait_for(lambda: show(lab, "alice", job_id)["state"] == "running", 60)
    node = show(lab, "alice", job_id)["node"]
    assert wait_for(lambda: container_pid(host_exec, node, job_id), 30)
    first = container_pid(host_exec, node, job_id)
    assert host_exec(node, "systemctl", "kill", "-s", "KILL", "labqd").returncode == 0
    job = final(lab, "alice", job_id)
    assert (job["state"], job["exit_code"]) == ("failed", 3), job
    assert sacct(host_exec, job_id)[:2] == ["FAILED", "3:0"]
    log = host_exec(node, "journalctl", "-u", "labqd", "--since", "-3min", "--no-pager").stdout
    assert f"Slurm job {job_id} (alice): container" in log and "adopted" in log, log[-2000:]
    assert log.count(f"Slurm job {job_id} (alice): container") == 2  # started once, adopted once
    assert first is not None
    out = labq(lab, "alice", "logs", str(job_id), node=node).stdout
    assert out.count("start") == 1, out


def test_a_container_whose_job_ended_while_labqd_was_down_is_swept(lab, slurm_mode, host_exec):
    job_id = submit(lab, "alice", "--gpus", "1", "--", "/bin/sleep", "600")
    assert wait_for(lambda: show(lab, "alice", job_id)["state"] == "running", 60)
    node = show(lab, "alice", job_id)["node"]
    assert wait_for(lambda: container_pid(host_exec, node, job_id), 30)
    assert host_exec(node, "systemctl", "stop", "labqd").returncode == 0
    try:
        host_exec(CONTROLLER, "scancel", str(job_id))
        assert wait_for(lambda: sacct(host_exec, job_id)[:1] == ["CANCELLED by 0"], 60)
        assert container_pid(host_exec, node, job_id), "the container should outlive the step here"
    finally:
        assert host_exec(node, "systemctl", "start", "labqd").returncode == 0
    name = f"labq-slurm-{job_id}-alice"
    gone = wait_for(lambda: host_exec(node, "docker", "inspect", name).returncode != 0, GRACE + 40)
    assert gone, "labqd did not sweep the container of an ended Slurm job"
    log = host_exec(node, "journalctl", "-u", "labqd", "--since", "-3min", "--no-pager").stdout
    assert f"of Slurm job {job_id}: its job no longer runs here" in log


def test_hold_release_and_gpus_read_slurm(lab, slurm_mode, host_exec):
    job_id = submit(lab, "alice", "--gpus", "1", "--hold", "--", "/bin/sleep", "30")
    listed = {j["id"]: j for j in json.loads(labq(lab, "alice", "ls", "--json").stdout)}
    assert (listed[job_id]["state"], listed[job_id]["reason"]) == ("held", "JobHeldUser"), listed[job_id]
    assert labq(lab, "bob", "release", str(job_id)).returncode == 4  # not his
    assert labq(lab, "alice", "release", str(job_id)).returncode == 0
    assert wait_for(lambda: show(lab, "alice", job_id)["state"] == "running", 60)
    job = show(lab, "alice", job_id)
    gpus = json.loads(labq(lab, "bob", "gpus", "--json").stdout)
    assert len(gpus) == sum(NODES.values())
    held = [g for g in gpus if g["state"] == "job"]
    assert [(g["id"], g["job"], g["user"]) for g in held if g["job"] == job_id] == [
        (job["assigned_gpus"][0], job_id, "alice")], gpus
    table = labq(lab, "alice", "ls").stdout.splitlines()
    assert table[0].split()[:5] == ["ID", "USER", "STATE", "GPUS", "NODE"], table
    assert labq(lab, "alice", "cancel", str(job_id)).returncode == 0


def test_notices_of_labq_jobs_on_slurm_reach_the_owner(lab, slurm_mode):
    """--notify becomes --mail-type; Slurm's MailProg (role slurm_mail) posts labq's notice."""
    receiver = SlackSink(*SLACK)
    try:
        token = uuid.uuid4().hex[:8]
        submit(lab, "alice", "--gpus", "0", "--notify", "failed", "--name", f"bad-{token}", "--",
               "/bin/dash", "-c", "exit 3")
        texts: list[str] = []
        deadline = time.monotonic() + 90
        while not texts and (left := deadline - time.monotonic()) > 0:
            path, body = receiver.next(timeout=left)
            if path == "/slurm" and token in body["text"]:
                texts.append(body["text"])
        assert texts and "FAILED" in texts[0] and "exit code: 3" in texts[0], texts
    finally:
        receiver.close()


def test_memory_past_mem_is_oom_in_labq_and_sacct(lab, slurm_mode, host_exec):
    job_id = submit(lab, "alice", "--gpus", "0", "--mem", "64m", "--", "/bin/dash", "-c",
                    "head -c 600000000 /dev/zero | tail")
    job = final(lab, "alice", job_id)
    assert job["state"] == "failed" and job["oom_killed"] and job["exit_code"] == 137, job
    # The step re-raises the container's OOM kill inside the job's limit, so Slurm records it as its own;
    # labqd also notes it on the job (AdminComment).
    state, admin_comment = sacct(host_exec, job_id, "State,AdminComment")
    assert state == "OUT_OF_MEMORY" and "labq:oom_killed" in admin_comment, (state, admin_comment)
    history = json.loads(labq(lab, "alice", "history", "--json").stdout)
    assert next(j for j in history if j["id"] == job_id)["oom_killed"]


def test_time_limit_ends_as_timeout(lab, slurm_mode, host_exec):
    job_id = submit(lab, "alice", "--gpus", "0", "--time", "1m", "--", "/bin/sleep", "600")
    job = final(lab, "alice", job_id, timeout=200)
    assert job["state"] == "timeout", job
    assert sacct(host_exec, job_id)[0] == "TIMEOUT"


def test_bad_input_queues_nothing_and_unreachable_controller_is_exit_6(lab, slurm_mode, host_exec):
    before = host_exec(CONTROLLER, "squeue", "-h", "-o", "%A").stdout.split()
    cases = [
        (["--gpus", "1", "--mount", "nope", "--", "true"], "mounts: 'nope'"),
        (["--gpus", "1", "--image", "debian:12", "--", "true"], "image: 'debian:12' is not allowed"),
        (["--gpus", "-1", "--", "true"], "gpus"),
        (["--gpus", "1", "--time", "soon", "--", "true"], "time"),
        (["--gpus", "1", "--array", "5-1", "--", "true"], "array"),
        (["--gpus", "1", "--env", "NOEQUALS", "--", "true"], "env"),
        (["--gpus", "1", "--priority", "5", "--", "true"], "priority"),
    ]
    for args, expected in cases:
        out = labq(lab, "bob", "submit", *args)
        assert out.returncode in (2, 4) and expected in out.stderr, (args, out.stderr)
    assert host_exec(CONTROLLER, "squeue", "-h", "-o", "%A").stdout.split() == before
    conf = "ClusterName=labkit\\nSlurmctldHost=gpu01(127.0.0.1)\\nSlurmctldPort=1\\n"
    host_exec("gpu01", "bash", "-c", f"printf '{conf}' > /tmp/unreachable.conf")
    out = ssh(lab["gpu01"]["address"], "bob", "SLURM_CONF=/tmp/unreachable.conf labq ls")
    assert out.returncode == 6 and "cannot reach the Slurm controller" in out.stderr, out.stderr


@pytest.fixture(scope="module")
def optuna_job(slurm_mode) -> str:
    """Optuna (the venv's version) in the shared scratch, for the lab's job image's python3."""
    optuna = pytest.importorskip("optuna")
    tree = SCRATCH / f"optuna-{optuna.__version__}"
    if not (tree / "optuna").is_dir():
        tmp = tree.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--target", str(tmp)]
        subprocess.run([*pip, f"optuna=={optuna.__version__}"], check=True, capture_output=True, timeout=600)
        tmp.rename(tree)
    subprocess.run(["chmod", "-R", "a+rX", str(tree)], check=True)
    return f"/scratch/{tree.name}"


def test_the_optuna_array_example_runs_across_both_nodes(lab, optuna_job, host_exec):
    """docs/examples/optuna_sweep.py, unchanged, as a labq array on Slurm: its four workers run on both
    nodes and share one study (a journal on the shared scratch, as on the lab's NFS scratch)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    work = SCRATCH / f"sweep-{uuid.uuid4().hex[:8]}"
    work.mkdir(mode=0o1777)
    work.chmod(0o1777)
    shutil.copy(REPO / "docs" / "examples" / "optuna_sweep.py", work)
    jobs = f"/scratch/{work.name}"
    array = submit(lab, "alice", "--array", "0-3", "--gpus", "1", "--mount", "scratch", "--name", "sweep",
                   "--env", f"PYTHONPATH={optuna_job}", "--", "python3",
                   f"{jobs}/optuna_sweep.py", "--storage", f"{jobs}/study.journal", "--study", "sweep",
                   "--trials", "16")

    def ended() -> list[list[str]] | None:
        out = host_exec(CONTROLLER, "sacct", "-n", "-P", "-X", "-j", str(array), "-o",
                        "JobIDRaw,State,NodeList")
        rows = [line.split("|") for line in out.stdout.split()]
        done = len(rows) == 4 and all(r[1] not in ("PENDING", "RUNNING", "COMPLETING") for r in rows)
        return rows if done else None

    rows = wait_for(ended, 300, 3.0)
    assert rows, host_exec(CONTROLLER, "squeue", "-u", "alice").stdout
    assert {r[1] for r in rows} == {"COMPLETED"}, rows  # type: ignore[union-attr]
    node_of = {int(r[0]): r[2] for r in rows}  # type: ignore[union-attr]
    assert set(node_of.values()) == {"gpu01", "gpu02"}, node_of
    study = optuna.load_study(study_name="sweep",
                              storage=JournalStorage(JournalFileBackend(str(work / "study.journal"))))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) >= 16
    assert {node_of[t.user_attrs["job"]] for t in complete} == {"gpu01", "gpu02"}  # one study, both nodes
    assert {t.user_attrs["worker"] for t in complete} <= {0, 1, 2, 3}
