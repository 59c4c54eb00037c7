"""End-to-end checks of playbooks/job_queue.yml (role job_queue: labqd and labq) on the local lab.

No GPUs here: the nodes get two fake GPU ids each (inventory/lab/group_vars/gpu_nodes/job_queue.yml) and
run jobs from the lab's job image (labkit-job:1, the node image loaded by `make lab-job-image`; no
registry). The LDAP members alice (in lab-admins) and bob log in over SSH with the lab's test key and
use `labq` like students do.
"""

from __future__ import annotations

import json
import shlex
import time
import uuid

import pytest
from lab_helpers import run_playbook, ssh
from test_lab_mail import arrived, sink

__all__ = ["sink"]  # the test smarthost fixture of test_lab_mail.py, used here too

pytestmark = [pytest.mark.lab, pytest.mark.slow]

NODES = ("gpu01", "gpu02")
IMAGE = "labkit-job:1"
FINAL = {"succeeded", "failed", "cancelled", "timeout"}
HELD_JOB = ("submit", "--json", "--hold", "--gpus", "0", "--", "/bin/dash", "-c", "true")

@pytest.fixture(scope="module")
def image(job_image):
    return job_image


def labq(lab, node: str, user: str, *args: str):
    # ssh joins its arguments into one remote shell line: quote them so they arrive unchanged.
    return ssh(lab[node]["address"], user, shlex.join(["labq", *args]))


def wait_final(lab, node: str, user: str, job_id: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        out = labq(lab, node, user, "show", str(job_id), "--json")
        assert out.returncode == 0, out.stderr
        job = json.loads(out.stdout)
        if job["state"] in FINAL or time.monotonic() > deadline:
            return job
        time.sleep(1)


@pytest.mark.parametrize("node", NODES)
def test_ldap_user_job_runs_as_her_on_each_node(lab, image, host_exec, node):
    host_exec(node, "rm", "-f", "/home/alice/labq-lab.txt")
    sub = labq(
        lab,
        node,
        "alice",
        "submit",
        "--json",
        "--gpus",
        "1",
        "--",
        "/bin/dash",
        "-c",
        'echo "$LABQ_USER $LABQ_GPUS" > "$HOME/labq-lab.txt"',
    )
    assert sub.returncode == 0, sub.stderr
    job = wait_final(lab, node, "alice", json.loads(sub.stdout)["ids"][0])
    assert (job["state"], job["exit_code"], job["user"]) == ("succeeded", 0, "alice"), job
    owner = host_exec(node, "stat", "-c", "%U %a", "/home/alice/labq-lab.txt").stdout.split()
    assert owner[0] == "alice"
    # The job names itself through labq's environment (as the user it runs as).
    who, gpu = host_exec(node, "cat", "/home/alice/labq-lab.txt").stdout.split()
    assert who == "alice" and gpu in ("GPU-fake-0", "GPU-fake-1")


def test_policy_from_inventory_is_in_force(lab, image):
    too_many = labq(lab, "gpu01", "bob", "submit", "--gpus", "2", "--", "/bin/dash", "-c", "true")
    assert too_many.returncode == 2 and "gpus" in too_many.stderr, too_many
    bad_image = labq(lab, "gpu01", "bob", "submit", "--gpus", "0", "--image", "debian:12", "--", "true")
    assert bad_image.returncode == 2 and "image" in bad_image.stderr, bad_image
    bad_mount = labq(lab, "gpu01", "bob", "submit", "--gpus", "0", "--mount", "etc", "--", "true")
    assert bad_mount.returncode == 2 and "mount" in bad_mount.stderr, bad_mount


def test_only_owner_or_lab_admin_may_cancel(lab, image):
    sub = labq(lab, "gpu01", "bob", *HELD_JOB)
    assert sub.returncode == 0, sub.stderr
    job_id = str(json.loads(sub.stdout)["ids"][0])
    # alice is in lab-admins (LDAP), the queue's admin group in the lab inventory.
    assert labq(lab, "gpu01", "alice", "cancel", job_id).returncode == 0
    assert wait_final(lab, "gpu01", "bob", int(job_id))["state"] == "cancelled"
    sub = labq(lab, "gpu01", "alice", *HELD_JOB)
    job_id = str(json.loads(sub.stdout)["ids"][0])
    denied = labq(lab, "gpu01", "bob", "cancel", job_id)
    assert denied.returncode == 4, denied
    assert labq(lab, "gpu01", "alice", "cancel", job_id).returncode == 0


def test_metrics_are_scraped_from_the_lab_network(lab, image, host_exec):
    out = host_exec(
        "infra01",
        "python3",
        "-c",
        f"import urllib.request;print(urllib.request.urlopen('http://{lab['gpu01']['address']}:9848/metrics',"
        " timeout=10).read().decode())",
    )
    assert out.returncode == 0, out.stderr
    assert 'labq_gpus{state="free"}' in out.stdout


def labq_via(lab, agent, node: str, user: str, *args: str):
    """`labq ARGS` typed by USER logged in on NODE with her agent forwarded."""
    return ssh(lab[node]["address"], user, shlex.join(["labq", *args]), extra=("-A",), env=agent)


def test_labq_host_reaches_another_nodes_queue_over_the_labs_ssh(lab, image, agent):
    """From gpu01, alice queues on gpu02 with `labq --host gpu02` over real SSH (LDAP account, key from
    LDAP via sss_ssh_authorizedkeys): gpu02's labqd sees alice, and bob cannot cancel her job from there."""
    sub = labq_via(lab, agent, "gpu01", "alice", "--host", "gpu02", *HELD_JOB)
    assert sub.returncode == 0, sub.stderr
    job_id = json.loads(sub.stdout)["ids"][0]
    on_gpu02 = {j["id"]: j for j in json.loads(labq(lab, "gpu02", "alice", "ls", "--json").stdout)}
    assert on_gpu02[job_id]["user"] == "alice" and on_gpu02[job_id]["state"] == "held", on_gpu02
    every = labq_via(lab, agent, "gpu01", "bob", "ls", "--all-nodes", "--json")
    assert every.returncode == 0, every.stderr
    listing = json.loads(every.stdout)
    assert listing["errors"] == {} and set(listing["jobs"]) == set(NODES), listing
    assert job_id in [j["id"] for j in listing["jobs"]["gpu02"] if j["user"] == "alice"]
    denied = labq_via(lab, agent, "gpu01", "bob", "--host", "gpu02", "cancel", str(job_id))
    assert denied.returncode == 4 and "owner" in denied.stderr, denied
    ok = labq_via(lab, agent, "gpu01", "alice", "--host", "gpu02", "cancel", str(job_id))
    assert ok.returncode == 0, ok.stderr
    assert wait_final(lab, "gpu02", "alice", job_id)["state"] == "cancelled"


def test_labq_host_names_an_unreachable_node(lab, image, agent):
    out = labq_via(lab, agent, "gpu01", "alice", "--host", "gpu99", "ls")
    assert out.returncode == 6 and "cannot reach labq on gpu99" in out.stderr, out
    every = labq_via(lab, agent, "gpu01", "alice", "ls", "--all-nodes")
    assert every.returncode == 0, every.stderr  # the lab's own nodes all answer


def test_failed_job_is_mailed_to_its_owner_through_the_lab_mta(lab, image, host_exec, sink):
    token = f"doomed-{uuid.uuid4().hex[:8]}"
    sub = labq(
        lab,
        "gpu01",
        "alice",
        "submit",
        "--json",
        "--gpus",
        "1",
        "--name",
        token,
        "--",
        "/bin/dash",
        "-c",
        "echo out of ideas; exit 5",
    )
    assert sub.returncode == 0, sub.stderr
    job = wait_final(lab, "gpu01", "alice", json.loads(sub.stdout)["ids"][0])
    assert (job["state"], job["exit_code"]) == ("failed", 5), job
    deadline = time.monotonic() + 90
    messages: list[dict] = []
    while not messages and time.monotonic() < deadline:
        host_exec("gpu01", "postqueue", "-f")
        host_exec("infra01", "postqueue", "-f")
        messages = arrived(sink, token, timeout=5)
    assert messages, (
        "the notice never reached the smarthost: "
        + host_exec("gpu01", "journalctl", "-u", "labqd", "-n", "20", "--no-pager").stdout
    )
    assert messages[0]["to"] == ["alice@lab.test"]
    assert "exit code: 5" in messages[0]["data"] and "out of ideas" in messages[0]["data"]


def config(host_exec) -> str:
    return host_exec("gpu01", "cat", "/etc/labq/config.toml").stdout


@pytest.mark.parametrize(
    ("extra", "variable"),
    [
        ({"job_queue_gpus": "all"}, "job_queue_gpus"),
        ({"job_queue_gpus": ["GPU-0", "GPU-0"]}, "job_queue_gpus"),
        ({"job_queue_mounts": {"host": "/:/host:ro"}}, "job_queue_mounts"),
        ({"job_queue_mounts": {"data": "srv/data:/data"}}, "job_queue_mounts"),
        ({"job_queue_extras": ["cuda"]}, "job_queue_extras"),
        ({"job_queue_default_image": "debian:12"}, "job_queue_default_image"),
        ({"job_queue_socket_dir": "/var/run/labq/sock"}, "job_queue_socket_dir"),
        ({"job_queue_max_gpus_per_user": "two"}, "job_queue_max_gpus_per_user"),
    ],
    ids=[
        "gpus-word",
        "gpus-duplicate",
        "mount-root",
        "mount-relative",
        "unknown-extra",
        "image-not-allowed",
        "socket-dir",
        "max-gpus-type",
    ],
)
def test_bad_job_queue_input_is_refused_before_any_change(second_run, host_exec, extra, variable):
    before = config(host_exec)
    run = run_playbook("job_queue.yml", "-l", "gpu01", "-e", json.dumps(extra))
    assert run.rc != 0
    assert variable in run.output, run.output[-3000:]
    assert run.recap()["gpu01"]["changed"] == 0
    assert config(host_exec) == before
