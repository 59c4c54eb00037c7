"""An Optuna study with 4 parallel GPU workers as one command, through a real labqd (fake GPUs).

The job image is the lab's node image (labkit/node:debian12: Debian's python3.11, no pip); Optuna
and its dependencies come from a directory built once with `pip install --target` on this machine
and mounted read-only through the admin's mount allow-list (`--mount optuna`), the way a lab would
offer a shared software tree. The study lives in a journal file in alice's home (the node's disk),
shared by the four workers of `labq submit --array 0-3 --gpus 1`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from labq_helpers import Labqd

pytestmark = [pytest.mark.docker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "docs" / "examples" / "optuna_sweep.py"
IMAGE = "labkit/node:debian12"
TRIALS = 24


@pytest.fixture(scope="session")
def optuna_tree() -> Path:
    optuna = pytest.importorskip("optuna", reason="optuna is not installed in this venv")
    target = Path(f"/var/tmp/labq-test-optuna-{optuna.__version__}")
    if not (target / "optuna").is_dir():
        tmp = target.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        res = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--target", str(tmp),
             f"optuna=={optuna.__version__}"],
            capture_output=True, text=True, timeout=600,
        )
        if res.returncode != 0:
            pytest.skip(f"cannot build the optuna tree for the job image: {res.stderr[-500:]}")
        tmp.rename(target)
    subprocess.run(["chmod", "-R", "a+rX", str(target)], check=True)
    return target


@pytest.fixture(scope="session")
def node_image() -> str:
    res = subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"{IMAGE} is not built here (make lab-image)")
    return IMAGE


def test_optuna_study_with_four_gpu_workers(make_labqd: Any, users: dict[str, Any], optuna_tree: Path,
                                            node_image: str) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    alice = users["alice"]
    work = Path(alice.pw_dir) / f"optuna-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    shutil.copy(EXAMPLE, work / "optuna_sweep.py")
    for p in (work, work / "optuna_sweep.py"):
        os.chown(p, alice.pw_uid, alice.pw_gid)

    d: Labqd = make_labqd(f'[mounts]\noptuna = "{optuna_tree}:/opt/optuna:ro"\n')
    journal = work / "sweep.journal"
    res = d.labq(
        "submit", "--json", "--array", "0-3", "--gpus", "1", "--image", node_image, "--mount", "optuna",
        "--env", "PYTHONPATH=/opt/optuna", "--name", "sweep", "--time", "10m", "--",
        "python3", "optuna_sweep.py", "--storage", str(journal), "--study", "sweep", "--trials", str(TRIALS),
        user="alice", cwd=str(work),
    )
    assert res.returncode == 0, res.stderr
    ids: list[int] = json.loads(res.stdout)["ids"]
    assert len(ids) == 4
    jobs = [d.wait_state(i, ("succeeded", "failed", "cancelled", "timeout"), timeout=300) for i in ids]
    for job in jobs:
        if job["state"] != "succeeded":
            log = d.labq("logs", str(job["id"]), user="alice").stdout
            pytest.fail(f"worker job {job['id']}: {job['state']} ({job['reason']}):\n{log[-3000:]}")

    # Four workers on four different (fake) GPUs, running at the same time.
    assert sorted(g for j in jobs for g in j["assigned_gpus"]) == [f"GPU-fake-{i}" for i in range(4)]
    assert max(j["start_time"] for j in jobs) < min(j["end_time"] for j in jobs)

    # The shared study, read back from the journal on the node's disk.
    storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name="sweep", storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # Each worker stops once the study has TRIALS complete trials; trials already running elsewhere
    # may still finish, so at most one extra per other worker.
    assert TRIALS <= len(complete) <= TRIALS + 3, len(complete)
    assert len({t.number for t in complete}) == len(complete)
    workers = {t.user_attrs["worker"] for t in complete}
    assert workers == {0, 1, 2, 3}, workers
    gpus = {t.user_attrs["worker"]: t.user_attrs["gpu"] for t in complete}
    assert len(set(gpus.values())) == 4
    assert {t.user_attrs["job"] for t in complete} == set(ids)
    assert study.best_value < 1.0
    # Files the workers wrote belong to alice.
    assert journal.stat().st_uid == alice.pw_uid
    shutil.rmtree(work, ignore_errors=True)


def test_grid_sweep_runs_each_point_once(make_labqd: Any, users: dict[str, Any], node_image: str) -> None:
    alice = users["alice"]
    work = Path(alice.pw_dir) / f"grid-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "out").mkdir(parents=True)
    shutil.copy(REPO / "docs" / "examples" / "grid_sweep.py", work / "grid_sweep.py")
    for p in (work, work / "out", work / "grid_sweep.py"):
        os.chown(p, alice.pw_uid, alice.pw_gid)
    matrix = '{"lr": [0.1, 0.01, 0.001], "batch": [32, 64]}'
    count = subprocess.run([sys.executable, str(work / "grid_sweep.py"), "--matrix", matrix, "--count"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert count == "6"
    d: Labqd = make_labqd()
    # The "training" writes the arguments it got to out/<index>.
    train = 'echo "$@" > out/$LABQ_ARRAY_INDEX'
    res = d.labq("submit", "--json", "--array", "0-5%2", "--gpus", "1", "--image", node_image,
                 "--name", "grid", "--", "python3", "grid_sweep.py", "--matrix", matrix, "--",
                 "sh", "-c", train, "train", user="alice", cwd=str(work))
    assert res.returncode == 0, res.stderr
    ids: list[int] = json.loads(res.stdout)["ids"]
    jobs = [d.wait_state(i, ("succeeded", "failed"), timeout=120) for i in ids]
    assert [j["state"] for j in jobs] == ["succeeded"] * 6, [j["reason"] for j in jobs]
    got = {int(p.name): p.read_text().split() for p in (work / "out").iterdir()}
    assert got == {
        0: ["--lr", "0.1", "--batch", "32"], 1: ["--lr", "0.1", "--batch", "64"],
        2: ["--lr", "0.01", "--batch", "32"], 3: ["--lr", "0.01", "--batch", "64"],
        4: ["--lr", "0.001", "--batch", "32"], 5: ["--lr", "0.001", "--batch", "64"],
    }
    # %2: never more than two tasks at once.
    for j in jobs:
        overlapping = [k for k in jobs if k["start_time"] < j["end_time"] and k["end_time"] > j["start_time"]]
        assert len(overlapping) <= 2
    shutil.rmtree(work, ignore_errors=True)
