"""The students' experiment examples (docs/examples/) run for real against Optuna's own storages here; the
five-worker one also against a real PostgreSQL server on loopback, restarted in the middle of the study.
(On the lab's PostgreSQL and MLflow through labq: tests/lab/test_lab_experiments.py.)"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

optuna = pytest.importorskip("optuna", reason="optuna is not installed in this venv")
from optuna.trial import TrialState  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(module: ModuleType, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    return int(module.main())


def test_grid_sweep_runs_each_point_once_whatever_the_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    grid = example("optuna_grid_sweep")
    storage = f"sqlite:///{tmp_path / 'grid.db'}"
    assert run_main(grid, monkeypatch, "--count") == 0
    size = int(capsys.readouterr().out)
    assert size == 8
    for index in (5, 0, 7, 2, 1, 6, 3, 4, 0):  # the tasks in any order, one run again
        monkeypatch.setenv("LABQ_ARRAY_INDEX", str(index))
        assert run_main(grid, monkeypatch, "--storage", storage, "--study", "grid") == 0
    assert "have all been run; nothing to do" in capsys.readouterr().out
    study = optuna.load_study(study_name="grid", storage=storage)
    points = sorted((t.params["lr"], t.params["batch"]) for t in study.trials)
    assert len(study.trials) == size and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert points == sorted((lr, b) for lr in grid.GRID["lr"] for b in grid.GRID["batch"])


def test_parallel_workers_run_exactly_n_trials_in_all() -> None:
    """Four workers (threads, one in-memory study): exactly N trials finish, none twice, none failed."""
    workers = example("optuna_workers_pg")
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=1),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    lock = workers.StudyLock("memory", "s")
    ran: list[int] = []

    def work() -> None:
        ran.append(workers.run_worker(study, 17, lock, lambda t: workers.objective(t, 4, 0.002), poll=0.01))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    states = [t.state for t in study.get_trials()]
    assert len(states) == 17 and all(s in FINISHED for s in states), states
    assert TrialState.PRUNED in states  # the median pruner did prune
    assert sum(ran) == 17 and len(ran) == 4
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 17


def test_cmaes_warm_start_logs_every_trial_as_an_mlflow_run(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cmaes", reason="cmaes (CmaEsSampler) is not installed in this venv")
    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed in this venv")
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    source = optuna.create_study(study_name="earlier", storage=storage)
    source.optimize(lambda t: (t.suggest_float("lr", 1e-5, 1e-1, log=True) - 3e-3) ** 2
                    + t.suggest_float("dropout", 0.0, 0.5), n_trials=12)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cm = example("cmaes_warm_mlflow")
    monkeypatch.setattr(cm, "train", lambda lr, dropout, epoch: lr + dropout + 1.0 / (epoch + 1))
    assert run_main(cm, monkeypatch, "--storage", storage, "--source-study", "earlier", "--study", "warm",
                    "--trials", "5", "--epochs", "3", "--experiment", "alice-warm") == 0
    study = optuna.load_study(study_name="warm", storage=storage)
    assert len(study.trials) == 5 and all(t.state == TrialState.COMPLETE for t in study.trials)
    runs = mlflow.search_runs(experiment_names=["alice-warm"], output_format="list")
    by_id = {r.info.run_id: r for r in runs}
    assert len(by_id) == 5
    for t in study.trials:
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"])
        assert run.data.metrics["final_val_loss"] == pytest.approx(t.value)
        assert run.data.tags["optuna.trial"] == str(t.number)
    # Alone: the earlier study made first (random trials, no MLflow runs); too few for CMA-ES refused.
    assert run_main(cm, monkeypatch, "--storage", storage, "--study", "demo", "--warm-trials", "12",
                    "--trials", "3", "--epochs", "2", "--experiment", "alice-demo") == 0
    assert len(optuna.load_study(study_name="demo-warm", storage=storage).trials) == 12
    assert len(optuna.load_study(study_name="demo", storage=storage).trials) == 3
    assert len(mlflow.search_runs(experiment_names=["alice-demo"], output_format="list")) == 3
    with pytest.raises(SystemExit):
        run_main(cm, monkeypatch, "--storage", storage, "--study", "few", "--warm-trials", "8")


# ---------------------------------------------------------------- a real PostgreSQL, restarted mid-study
PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture
def postgres() -> Any:
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed in this venv")
    if not (PG_BIN / "initdb").exists() or shutil.which("su") is None:
        pytest.skip("PostgreSQL 15's server is not installed here")
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no postgres user to run the server as")
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="labq-test-pg-"))  # pytest's own tmp is root's alone
    os.chmod(root, 0o777)  # the server runs as postgres
    data, port = root / "data", 55000 + os.getpid() % 400

    def as_postgres(*argv: str) -> None:
        subprocess.run(["su", "postgres", "-s", "/bin/sh", "-c", " ".join(argv)], check=True, timeout=120,
                       capture_output=True)

    opts = f"'-c listen_addresses=127.0.0.1 -p {port} -k {root}'"
    as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start")

    class Server:
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

        def restart(self) -> None:
            as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-o", opts, "-l",
                        str(root / "log"), "-w", "restart")

    yield Server()
    as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_five_workers_survive_a_postgresql_restart_with_exactly_n_trials(postgres: Any) -> None:
    trials = 20
    procs = [subprocess.Popen(
        [sys.executable, str(EXAMPLES / "optuna_workers_pg.py"), "--study", "restart",
         "--trials", str(trials), "--steps", "5", "--step-seconds", "0.2", "--grace", "10"],
        env={**os.environ, "LABKIT_STUDY_DB": postgres.url, "LABQ_ARRAY_INDEX": str(i)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(5)]
    study = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # restart once the study is under way, trials running
        try:
            study = optuna.load_study(study_name="restart", storage=postgres.url.replace(
                "postgresql://", "postgresql+psycopg2://"))
            if len(study.get_trials(deepcopy=False, states=FINISHED)) >= 4:
                break
        except Exception:  # not created yet
            pass
        time.sleep(0.2)
    postgres.restart()
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * 5, [o[-3000:] for o in outs]
    assert any("database unreachable" in o for o in outs), outs  # the restart did hit the workers
    assert study is not None  # read again below on new connections: the old ones died with the server
    study = optuna.load_study(study_name="restart", storage=postgres.url.replace(
        "postgresql://", "postgresql+psycopg2://"))
    done = study.get_trials(deepcopy=False, states=FINISHED)
    assert len(done) == trials, [t.state for t in study.get_trials(deepcopy=False)]
    assert not study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    assert len({tuple(sorted(t.params.items())) for t in done}) == trials  # none ran twice
