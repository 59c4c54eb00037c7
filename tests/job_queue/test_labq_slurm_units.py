"""labq on Slurm, the parts that need no Slurm: parsing Slurm's answers, the sbatch line, and labqd's
checks of a slurm_run (the caller's cgroup, the job's owner, node and GPUs). The real thing runs in the
lab (tests/lab/test_lab_labq_slurm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from job_queue.config import ConfigError, parse_config
from job_queue.identity import Caller
from job_queue.protocol import ProtocolError, Submit, validate_request
from job_queue.slurm import (
    SlurmFailed,
    SlurmJob,
    SlurmUnreachable,
    expand_hostlist,
    gpu_count,
    gres_indices,
    labq_state,
    parse_limit,
    parse_record,
    run,
)
from job_queue.slurm_client import batch_script, decode_spec, sbatch_argv, slurm_time
from job_queue.slurm_runner import GpuMap, SlurmRunner, job_cgroup

SCONTROL = ("JobId=42 JobName=train UserId=alice(20001) GroupId=lab(20000) Priority=1 Nice=0 "
            "JobState=RUNNING Reason=None Dependency=(null) NodeList=gpu01 BatchHost=gpu01 "
            "Comment=labq1:e30= Nodes=gpu01 CPU_IDs=0 Mem=512 GRES=gpu:1(IDX:1) WorkDir=/tmp")


def test_scontrol_records_and_gpu_indices():
    rec = parse_record(SCONTROL)
    assert rec["UserId"] == "alice(20001)" and rec["JobState"] == "RUNNING" and rec["WorkDir"] == "/tmp"
    assert gres_indices(SCONTROL, "gpu01") == [1]
    assert gres_indices(SCONTROL, "gpu02") == []
    two = "JobId=7 Nodes=gpu[01-02] CPU_IDs=0-1 Mem=0 GRES=gpu:2(IDX:0-1)"
    assert gres_indices(two, "gpu02") == [0, 1]
    assert expand_hostlist("gpu[01-02],infra01") == ["gpu01", "gpu02", "infra01"]
    assert gpu_count("gres/gpu:2") == gpu_count("gres/gpu=2") == gpu_count("gres:gpu:a100:2") == 2
    assert gpu_count("cpu=1,mem=1G") == 0


def test_states_limits_and_time():
    assert labq_state("PENDING", "JobHeldUser") == "held"
    assert labq_state("PENDING", "Resources") == "pending"
    assert labq_state("CANCELLED by 20001") == "cancelled"
    assert labq_state("OUT_OF_MEMORY") == "failed" and labq_state("TIMEOUT") == "timeout"
    assert parse_limit("1-02:03:04") == 93784 and parse_limit("05:00") == 300
    assert parse_limit("UNLIMITED") is None
    assert slurm_time(30) == "0-00:01:00" and slurm_time(90 * 60) == "0-01:30:00"


def test_run_tells_unreachable_from_refused(tmp_path: Path):
    fake = tmp_path / "squeue"
    fake.write_text("#!/bin/sh\n"
                    "echo 'squeue: error: Unable to contact slurm controller (connect failure)' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    with pytest.raises(SlurmUnreachable, match="cannot reach the Slurm controller"):
        run([str(fake)])
    fake.write_text("#!/bin/sh\n"
                    "echo 'scancel: error: Kill job error on job id 5: Access/permission denied' >&2\n"
                    "exit 1\n")
    with pytest.raises(SlurmFailed, match="Access/permission denied"):
        run([str(fake)])
    with pytest.raises(SlurmUnreachable, match="not installed"):
        run([str(tmp_path / "nope")])


def _submit(**kw) -> Submit:
    req = validate_request({"v": 1, "op": "submit", "command": ["python", "t.py"], "cwd": "/tmp", "gpus": 1,
                            **kw})
    assert isinstance(req.args, Submit)
    return req.args


def test_sbatch_line_carries_every_option():
    notify = {"channels": ["mail"], "mail_domain": "lab.example", "default_events": ["failed"]}
    cfg = parse_config({"gpus": ["g0"], "scheduler": "slurm", "notify": notify})
    argv = sbatch_argv(_submit(name="t", time_limit=3600, cpus=1.5, mem=2**30, array="0-4%2", after=9,
                               hold=True, priority=-5), cfg, "alice")
    assert {"--gres=gpu:1", "--job-name=t", "--time=0-01:00:00", "--cpus-per-task=2", "--mem=1024M",
            "--array=0-4%2", "--dependency=afterok:9", "--hold", "--nice=5", "--mail-type=FAIL",
            "--mail-user=alice", "--chdir=/tmp", "--export=NONE"} <= set(argv)
    spec = {"command": ["python", "t.py"], "cwd": "/tmp", "gpus": 1}
    script = batch_script(spec)
    assert script.startswith("#!/bin/sh\n") and "-m job_queue.slurm_step " in script
    assert decode_spec(script.split()[-1]) == spec


def test_scheduler_setting_refused_by_name():
    assert parse_config({"scheduler": "slurm"}).scheduler == "slurm"
    assert parse_config({}).scheduler == "labq"
    with pytest.raises(ConfigError, match="'scheduler' must be one of labq, slurm"):
        parse_config({"scheduler": "pbs"})
    with pytest.raises(ConfigError, match="slurm_gpu_devices"):
        parse_config({"slurm_gpu_devices": ["fakegpu0"]})


def test_job_cgroup_from_proc():
    v1 = ("12:freezer:/slurm_gpu01/uid_20001/job_42/step_batch\n"
          "5:memory:/slurm_gpu01/uid_20001/job_42/step_batch/task_0\n")
    assert job_cgroup(v1, 42) == "/slurm_gpu01/uid_20001/job_42/step_batch"
    v2 = "0::/system.slice/slurmstepd.scope/job_42/step_batch/user/task_0\n"
    assert job_cgroup(v2, 42) == "/system.slice/slurmstepd.scope/job_42/step_batch"
    assert job_cgroup(v2, 4) is None
    assert job_cgroup("0::/user.slice/user-20001.slice/session-3.scope\n", 42) is None


class _Runtime:
    def image_exists(self, image: str) -> bool:
        return True


def _runner(tmp_path: Path, job: SlurmJob, cgroup: str) -> SlurmRunner:
    (tmp_path / "proc" / "77").mkdir(parents=True)
    (tmp_path / "proc" / "77" / "cgroup").write_text(cgroup)
    cfg = parse_config({"gpus": ["g0", "g1"], "scheduler": "slurm", "state_dir": str(tmp_path),
                        "slurm_gpu_devices": ["/dev/fakegpu0", "/dev/fakegpu1"]})
    return SlurmRunner(cfg, "gpu01", runtime=_Runtime(),  # type: ignore[arg-type]
                       lookup=lambda job_id, node: job, proc_root=str(tmp_path / "proc"))


ALICE = Caller(pid=77, uid=20001, gid=20000, user="alice", home="/tmp", groups=(20000,), is_admin=False)
BOB = Caller(pid=77, uid=20002, gid=20000, user="bob", home="/tmp", groups=(20000,), is_admin=False)
IN_JOB = "12:freezer:/slurm_gpu01/uid_20001/job_42/step_batch\n"


def _job(**kw) -> SlurmJob:
    base = {"id": 42, "user": "alice", "uid": 20001, "state": "RUNNING", "nodes": ("gpu01",),
            "batch_host": "gpu01", "gpu_indices": (1,), "raw": {}}
    base.update(kw)
    return SlurmJob(**base)  # type: ignore[arg-type]


def test_slurm_run_checks_caller_job_node_and_gpus(tmp_path: Path, caplog):
    ok = _runner(tmp_path / "a", _job(), IN_JOB)
    job, parent = ok.verify(ALICE, 42, _submit())
    assert parent == "/slurm_gpu01/uid_20001/job_42/step_batch" and job.gpu_indices == (1,)
    assert GpuMap(ok.cfg).resolve([1]) == [("g1", "/dev/fakegpu1")]
    refusals = [
        (_runner(tmp_path / "b", _job(), "12:freezer:/user.slice\n"), ALICE, 1,
         "not a process of Slurm job 42"),
        (_runner(tmp_path / "c", _job(), IN_JOB), BOB, 1, "belongs to alice, not bob"),
        (_runner(tmp_path / "d", _job(nodes=("gpu02",)), IN_JOB), ALICE, 1, "runs on gpu02, not on gpu01"),
        (_runner(tmp_path / "e", _job(), IN_JOB), ALICE, 2, "asks for 2 GPUs but Slurm job 42 holds 1"),
        (_runner(tmp_path / "f", _job(state="COMPLETED"), IN_JOB), ALICE, 1, "is COMPLETED, not running"),
    ]
    for runner, caller, gpus, message in refusals:
        with pytest.raises(ProtocolError, match=message) as err:
            runner.verify(caller, 42, _submit(gpus=gpus))
        assert err.value.code == "permission_denied"
    assert "slurm_run refused: pid 77 uid 20002 (bob) for Slurm job 42" in caplog.text


def test_a_finished_slurm_job_is_answered_from_its_record_not_run_again(tmp_path: Path):
    runner = _runner(tmp_path, _job(), IN_JOB)
    runner._record(42, {"exit_code": 3, "oom_killed": False, "container": "abc"})
    assert runner.run(ALICE, 42, _submit(), conn=None) == {  # type: ignore[arg-type]
        "exit_code": 3, "oom_killed": False, "container": "abc"}


def test_an_image_that_cannot_run_the_command_is_explained_at_once():
    from job_queue.exits import explain_start_error, start_failure

    not_on_path = ('failed to create shim task: OCI runtime create failed: runc create failed: unable to '
                   'start container process: exec: "sh": executable file not found in $PATH: unknown')
    assert "has no 'sh' on its PATH" in (start_failure(RuntimeError(not_on_path), 1) or "")
    missing = 'exec: "/bin/sh": stat /bin/sh: no such file or directory: unknown'
    assert "has no file /bin/sh" in (explain_start_error(missing) or "")
    denied = 'exec: "/usr/bin/python3": permission denied: unknown'
    assert "readable by root only" in (explain_start_error(denied) or "")
    assert explain_start_error("500 Server Error: devices.allow: operation not permitted") is None
    assert start_failure(RuntimeError("500 Server Error: something else"), 1) is None  # retried


def test_squeue_and_sacct_lines_become_labq_records():
    from job_queue.slurm_client import _from_sacct, _from_squeue, comment_for

    t0, t1, t2 = "2026-12-04T10:00:00", "2026-12-04T10:00:05", "2026-12-04T10:00:09"
    comment = comment_for(_submit(), "labkit-job:1")
    running = _from_squeue(["42", "42", "N/A", "alice", "RUNNING", "None", "gres:gpu:1", "1", "1G",
                            "1:00:00", t0, t1, "N/A", "4294", "gpu01", "0", comment, "train"])
    assert (running["id"], running["state"], running["node"], running["gpus"], running["image"]) == (
        42, "running", "gpu01", 1, "labkit-job:1")
    assert running["time_limit"] == 3600 and running["reason"] == ""
    held = _from_squeue(["43", "43", "N/A", "bob", "PENDING", "JobHeldUser", "gres:gpu:2", "1", "1G",
                         "UNLIMITED", t0, "N/A", "N/A", "0", "", "5", "", "eval"])
    assert (held["state"], held["reason"], held["node"]) == ("held", "JobHeldUser", None)
    assert held["priority"] == -5
    tasks = _from_squeue(["50", "50", "[2-9%2]", "alice", "PENDING", "JobArrayTaskLimit", "gres:gpu:1", "1",
                          "1G", "UNLIMITED", t0, "N/A", "N/A", "0", "", "0", "", "sweep"])
    assert (tasks["array_id"], tasks["array_tasks"]) == (50, "2-9")
    oom = _from_sacct(["57", "57", "alice", "FAILED", "137:0", t0, t1, t2, "00:01:00", "cpu=1,gres/gpu=1",
                       "", "gpu01", "labq:oom_killed", "", "big"])
    assert (oom["state"], oom["oom_killed"], oom["exit_code"], oom["reason"]) == (
        "failed", True, 137, "OOM killed")
    killed = _from_sacct(["58", "58_3", "alice", "CANCELLED by 20001", "0:15", t0, t1, t2, "00:01:00", "",
                          "", "gpu02", "", "", "t"])
    assert (killed["state"], killed["exit_code"], killed["array_id"], killed["array_index"]) == (
        "cancelled", 143, 58, 3)
