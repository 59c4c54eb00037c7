"""The students' experiment workflows (docs/examples/, docs/track-your-experiments.md) through labq on Slurm
in the lab, against the real PostgreSQL, MLflow and Optuna dashboard on infra01, and a real browser.

alice stores her login once per node with `labq credentials` (the lab's homes are local to each node; a
real lab's are on NFS, once is enough), then submits the examples unchanged. The module switches the GPU
nodes to ``job_queue_scheduler=slurm`` (test_lab_labq_slurm's fixture) and back afterwards.

The three workflows themselves (five workers across a database restart, CMA-ES with MLflow, the grid
and the browser; marker ``workflow``) take minutes each and run with ``make e2e-workflows``, not in
``make test``; the credentials checks run in both.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator

import pytest
from browser import Browser
from lab_helpers import REPO, SCRATCH, experiment_libs, ssh
from mon_sinks import SlackSink
from test_lab_experiments import ARTIFACTS, HOST, PASSWORDS, members, portal, set_password
from test_lab_labq_slurm import CONTROLLER, slurm_mode, submit
from test_lab_slurm import SLACK, wait_for

__all__ = ["members", "portal", "slurm_mode"]  # fixtures from the other lab modules, used here

pytestmark = [pytest.mark.lab, pytest.mark.slow]

NODES = ("gpu01", "gpu02")
EXAMPLES = REPO / "docs" / "examples"


@pytest.fixture(scope="module")
def libs(slurm_mode) -> str:
    return experiment_libs()


@pytest.fixture(scope="module")
def workdir() -> Iterator[str]:
    """The examples, unchanged, in the shared scratch (/scratch in jobs)."""
    work = SCRATCH / f"exp-{uuid.uuid4().hex[:8]}"
    work.mkdir(mode=0o1777)
    work.chmod(0o1777)
    for script in ("optuna_workers_pg.py", "cmaes_warm_mlflow.py", "optuna_grid_sweep.py"):
        shutil.copy(EXAMPLES / script, work)
    yield f"/scratch/{work.name}"
    shutil.rmtree(work, ignore_errors=True)


def store_credentials(lab, node: str, password: str):
    """`labq credentials` as alice on a node, the password on stdin, as the students' page says."""
    return ssh(lab[node]["address"], "alice", "labq credentials --password-stdin", stdin=password + "\n")


@pytest.fixture(scope="module")
def credentials(lab, members, slurm_mode) -> None:
    for node in NODES:
        out = store_credentials(lab, node, PASSWORDS["alice"])
        assert out.returncode == 0, out.stdout + out.stderr


def sql(host_exec, query: str, db: str = "alice") -> list[list[str]]:
    """A query in a member's database as PostgreSQL's superuser on infra01 (the test's view, not alice's)."""
    out = host_exec(HOST, "runuser", "-u", "postgres", "--", "psql", "-XAtq", "-F", "|", "-d", db, "-c",
                    query)
    assert out.returncode == 0, out.stderr
    return [line.split("|") for line in out.stdout.splitlines() if line]


def array_rows(host_exec, job_id: int) -> list[list[str]]:
    out = host_exec(CONTROLLER, "sacct", "-n", "-P", "-X", "-j", str(job_id), "-o",
                    "JobIDRaw,State,NodeList,Start,End")
    return [line.split("|") for line in out.stdout.split()]


def wait_array(host_exec, job_id: int, tasks: int, timeout: float) -> list[list[str]]:
    def ended() -> list[list[str]] | None:
        rows = array_rows(host_exec, job_id)
        done = len(rows) == tasks and all(r[1] not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED")
                                          for r in rows)
        return rows if done else None

    rows = wait_for(ended, timeout, 3.0)
    assert rows, host_exec(CONTROLLER, "squeue", "-u", "alice").stdout
    return rows  # type: ignore[return-value]


def trial_states(host_exec, study: str) -> dict[str, int]:
    rows = sql(host_exec, "SELECT t.state, count(*) FROM trials t JOIN studies s USING (study_id) "
                          f"WHERE s.study_name = '{study}' GROUP BY t.state")
    return {state: int(n) for state, n in rows}


@pytest.mark.workflow
def test_five_workers_share_one_study_and_survive_a_database_restart(lab, credentials, libs, workdir,
                                                                     host_exec):
    """--array 0-4: five workers on both nodes, one PostgreSQL study, a median pruner; PostgreSQL is
    restarted while they run; the array still ends with exactly N finished trials, none twice, and the
    end of the array reaches Slack."""
    study, total = f"five-{uuid.uuid4().hex[:6]}", 30
    receiver = SlackSink(*SLACK)
    try:
        array = submit(lab, "alice", "--array", "0-4", "--gpus", "0", "--mount", "scratch", "--name", study,
                       "--notify", "finished", "--env", f"PYTHONPATH={libs}", "--", "python3",
                       f"{workdir}/optuna_workers_pg.py", "--study", study, "--trials", str(total),
                       "--step-seconds", "0.3")

        def some_done() -> bool:
            try:
                states = trial_states(host_exec, study)
            except AssertionError:  # the tables do not exist before the first worker made them
                return False
            return sum(states.get(s, 0) for s in ("COMPLETE", "PRUNED")) >= 5

        assert wait_for(some_done, 240, 2.0), array_rows(host_exec, array)
        restart = host_exec(HOST, "systemctl", "restart", "postgresql@15-main")
        assert restart.returncode == 0, restart.stderr
        rows = wait_array(host_exec, array, 5, 600)
        assert {r[1] for r in rows} == {"COMPLETED"}, rows
        assert {r[2] for r in rows} == set(NODES), rows  # the workers ran on both nodes
        states = trial_states(host_exec, study)
        assert states.get("COMPLETE", 0) + states.get("PRUNED", 0) == total, states
        assert states.get("RUNNING", 0) == 0 and states.get("WAITING", 0) == 0, states
        assert states.get("PRUNED", 0) > 0, states  # the median pruner pruned
        numbers = sql(host_exec, "SELECT count(DISTINCT t.number), count(*) FROM trials t JOIN studies s "
                                 f"USING (study_id) WHERE s.study_name = '{study}'")
        assert numbers[0][0] == numbers[0][1], numbers  # no trial number twice
        workers = sql(host_exec, "SELECT DISTINCT a.value_json FROM trial_user_attributes a JOIN trials t "
                                 "USING (trial_id) JOIN studies s USING (study_id) "
                                 f"WHERE s.study_name = '{study}' AND a.key = 'worker'")
        assert len(workers) >= 2, workers
        texts: list[str] = []
        deadline = time.monotonic() + 90
        while not texts and (left := deadline - time.monotonic()) > 0:
            path, body = receiver.next(timeout=left)
            if path == "/slurm" and study in body["text"]:
                texts.append(body["text"])
        assert texts, "no Slack notice for the array's end"
    finally:
        receiver.close()


def mlflow(portal, user: str, endpoint: str, **body) -> dict:
    answer = portal(f"/mlflow/api/2.0/mlflow/{endpoint}", user, method="POST" if body else "GET",
                    json=body or None)
    assert answer.status_code == 200, (endpoint, answer.status_code, answer.text[:500])
    return answer.json()


@pytest.mark.workflow
def test_cma_es_warm_started_every_trial_an_mlflow_run_and_bob_cannot_delete_it(
        lab, credentials, libs, workdir, host_exec, portal):
    """CMA-ES warm-started from an earlier study's trials, each trial logged as an MLflow run through the
    portal with alice's stored login; bob can read her experiment but not delete it."""
    name = f"cmaes-{uuid.uuid4().hex[:6]}"
    job = submit(lab, "alice", "--gpus", "0", "--mount", "scratch", "--name", name, "--env",
                 f"PYTHONPATH={libs}", "--", "python3", f"{workdir}/cmaes_warm_mlflow.py", "--study", name,
                 "--experiment", name, "--warm-trials", "10", "--trials", "8")
    rows = wait_array(host_exec, job, 1, 300)
    assert rows[0][1] == "COMPLETED", rows
    experiment = mlflow(portal, "alice", f"experiments/get-by-name?experiment_name={name}")["experiment"]
    runs = mlflow(portal, "alice", "runs/search", experiment_ids=[experiment["experiment_id"]],
                  max_results=100)["runs"]
    states = trial_states(host_exec, name)
    assert len(runs) == states.get("COMPLETE", 0) >= 8, (len(runs), states)
    assert all(r["info"].get("user_id", "alice") == "alice" for r in runs), runs[0]["info"]
    warm = sql(host_exec, "SELECT count(*) FROM trials t JOIN studies s USING (study_id) "
                          f"WHERE s.study_name = '{name}-warm' AND t.state = 'COMPLETE'")
    assert int(warm[0][0]) >= 10, warm  # the earlier study it started from
    # bob reads it (the lab's default permission) but may not delete it
    assert mlflow(portal, "bob", f"experiments/get?experiment_id={experiment['experiment_id']}")
    denied = portal("/mlflow/api/2.0/mlflow/experiments/delete", "bob", method="POST",
                    json={"experiment_id": experiment["experiment_id"]})
    assert denied.status_code == 403, (denied.status_code, denied.text[:300])
    again = mlflow(portal, "alice", f"experiments/get?experiment_id={experiment['experiment_id']}")
    assert again["experiment"]["lifecycle_stage"] == "active"


@pytest.mark.workflow
def test_grid_sweep_with_a_concurrency_limit_shows_in_her_dashboard(lab, credentials, libs, workdir,
                                                                   host_exec, portal):
    """A grid sweep as --array 0-7%2: never more than two tasks at once, every grid point once, and the
    study in alice's Optuna dashboard (not in bob's); then alice logs in with Chromium and sees it."""
    study = f"grid-{uuid.uuid4().hex[:6]}"
    array = submit(lab, "alice", "--array", "0-7%2", "--gpus", "0", "--mount", "scratch", "--name", study,
                   "--env", f"PYTHONPATH={libs}", "--", "python3", f"{workdir}/optuna_grid_sweep.py",
                   "--study", study)
    rows = wait_array(host_exec, array, 8, 600)
    assert {r[1] for r in rows} == {"COMPLETED"}, rows
    spans = [(r[3], r[4]) for r in rows]
    overlapping = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert overlapping <= 2, spans
    states = trial_states(host_exec, study)
    assert states == {"COMPLETE": 8}, states  # the grid's eight points
    distinct = sql(host_exec, "SELECT count(*), count(DISTINCT p.params) FROM (SELECT t.trial_id, "
                              "string_agg(tp.param_name || '=' || tp.param_value, ',' "
                              "ORDER BY tp.param_name) "
                              "AS params FROM trials t JOIN studies s USING (study_id) JOIN trial_params tp "
                              f"USING (trial_id) WHERE s.study_name = '{study}' GROUP BY t.trial_id) p")
    assert distinct[0][0] == distinct[0][1], distinct  # every grid point once
    listed = portal("/optuna/api/studies", "alice")
    assert listed.status_code == 200 and study in listed.text, listed.text[:500]
    others = portal("/optuna/api/studies", "bob")
    assert study not in others.text, others.text[:500]
    browser_sees_her_study_and_runs(lab, host_exec, study)


def browser_sees_her_study_and_runs(lab, host_exec, study: str) -> None:
    """Headless Chromium: alice logs in to the portal (the login dialog answered with her LDAP password),
    sees the study in the Optuna dashboard and her experiments in MLflow; screenshots are kept in
    .lab/artifacts/. With a wrong password the page is the portal's 401."""
    cert = ARTIFACTS / "portal.crt"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    cert.write_text(host_exec(HOST, "cat", "/etc/labkit-portal/tls/portal.crt").stdout)
    base = f"https://{lab[HOST]['address']}"
    browser = Browser(cert)
    try:
        browser.login("alice", "not-her-password")
        browser.open(f"{base}/optuna/")
        page = browser.wait_for_text("Unauthorized", 20)
        assert "Unauthorized" in page, page[:500]
    finally:
        browser.close()
    browser = Browser(cert)
    try:
        browser.login("alice", PASSWORDS["alice"])
        browser.open(f"{base}/optuna/")
        page = browser.wait_for_text(study, 60)
        browser.screenshot(ARTIFACTS / "optuna-dashboard-alice.png")
        assert study in page, page[:1000]
        browser.open(f"{base}/mlflow/")
        page = browser.wait_for_text("cmaes-", 60)
        browser.screenshot(ARTIFACTS / "mlflow-alice.png")
        assert "cmaes-" in page, page[:1000]
    finally:
        browser.close()


def test_stored_credentials_show_nowhere(lab, credentials, host_exec):
    """The password is in 0600 files of alice's home only: not in `labq show`, a job's environment or
    labqd's log."""
    out = ssh(lab["gpu01"]["address"], "alice", "stat -c '%a %n' ~/.pgpass ~/.mlflow/credentials; "
              "labq credentials --check")
    assert out.returncode == 0, out.stderr
    modes = {line.split()[0] for line in out.stdout.splitlines() if line.startswith("6")}
    assert modes == {"600"}, out.stdout
    assert PASSWORDS["alice"] not in out.stdout
    job = submit(lab, "alice", "--gpus", "0", "--", "/bin/dash", "-c", "env")
    rows = wait_array(host_exec, job, 1, 120)
    assert rows[0][1] == "COMPLETED", rows
    shown = ssh(lab[rows[0][2]]["address"], "alice", f"labq show --json {job}; labq logs {job}")
    assert shown.returncode == 0, shown.stderr
    assert "LABKIT_STUDY_DB=postgresql://alice@" in shown.stdout, shown.stdout[-2000:]
    assert PASSWORDS["alice"] not in shown.stdout
    for node in NODES:
        journal = host_exec(node, "journalctl", "-u", "labqd", "--no-pager", "-n", "2000")
        assert PASSWORDS["alice"] not in journal.stdout


def test_a_new_password_is_refused_until_stored_again(lab, members, credentials, host_exec):
    """After a password reset the old stored one is refused by the portal; `labq credentials` with a
    wrong password writes nothing and says so."""
    set_password(host_exec, "alice", "alice-exp-pw-2")
    try:
        wrong = store_credentials(lab, "gpu01", "not-her-password")
        assert wrong.returncode != 0 and "password" in wrong.stderr.lower(), wrong.stderr
        kept = ssh(lab["gpu01"]["address"], "alice", "sha256sum ~/.pgpass")
        assert kept.returncode == 0
    finally:
        set_password(host_exec, "alice", PASSWORDS["alice"])
