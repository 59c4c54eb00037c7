"""CMA-ES warm-started from an earlier study's trials, every trial logged as an MLflow run.

    labq submit --gpus 1 --image <image with optuna, cmaes, psycopg2 and mlflow-skinny> --name cmaes -- \
        python3 cmaes_warm_mlflow.py --source-study lr-search --study lr-cmaes --trials 30

The new study (in your study database, ``LABKIT_STUDY_DB``) starts CMA-ES from what the earlier study
``--source-study`` learnt (``CmaEsSampler(source_trials=...)``: its complete trials, 10 or more, same
parameters), e.g. the study of optuna_workers_pg.py. To try it alone, ``--warm-trials 20`` first runs 20
random trials in ``<study>-warm`` (no MLflow runs) and starts from those.

Each trial is one run in the MLflow experiment ``--experiment`` (default ``<login>-<study>``) with its
parameters, one loss per epoch and its final loss. labq gives the job ``MLFLOW_TRACKING_URI`` (the
portal's /mlflow) and ``MLFLOW_TRACKING_SERVER_CERT_PATH`` (the lab CA); MLflow's client reads your
login from ``~/.mlflow/credentials`` (``labq credentials``).
"""

from __future__ import annotations

import argparse
import getpass
import math
import os
import time

import mlflow
import optuna
from optuna.trial import TrialState


def storage_url(url: str) -> str:
    """LABKIT_STUDY_DB is a libpq URL; SQLAlchemy (Optuna's RDB storage) is told the driver: psycopg2."""
    return "postgresql+psycopg2://" + url[len("postgresql://"):] if url.startswith("postgresql://") else url


def train(lr: float, dropout: float, epoch: int) -> float:
    """A stand-in for one epoch of training: the validation loss after ``epoch`` + 1 epochs."""
    time.sleep(0.05)
    return (math.log10(lr) + 2.5) ** 2 + (dropout - 0.1) ** 2 + 1.0 / (epoch + 1)


def make_objective(epochs: int, study_name: str) -> optuna.study.study.ObjectiveFuncType:
    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
        dropout = trial.suggest_float("dropout", 0.0, 0.5)
        with mlflow.start_run(run_name=f"{study_name}-trial-{trial.number}") as run:
            mlflow.set_tags({"optuna.study": study_name, "optuna.trial": trial.number,
                             "labq.job": os.environ.get("LABQ_JOB_ID", "")})
            mlflow.log_params(trial.params)
            loss = math.inf
            for epoch in range(epochs):
                loss = train(lr, dropout, epoch)
                mlflow.log_metric("val_loss", loss, step=epoch)
            mlflow.log_metric("final_val_loss", loss)
            trial.set_user_attr("mlflow_run_id", run.info.run_id)  # the run, from the dashboard
        return loss

    return objective


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=os.environ.get("LABKIT_STUDY_DB", ""),
                        help="study database URL (default: $LABKIT_STUDY_DB, set by labq)")
    parser.add_argument("--source-study", help="the earlier study to warm-start from (default: <study>-warm)")
    parser.add_argument("--warm-trials", type=int, default=0,
                        help="first run this many random trials in the earlier study if it has fewer")
    parser.add_argument("--study", required=True, help="the new study's name")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--experiment", help="MLflow experiment (default: <login>-<study>)")
    args = parser.parse_args()
    if not args.storage:
        parser.error("no study database: run under labq (LABKIT_STUDY_DB) or give --storage")

    if 0 < args.warm_trials < 10:
        parser.error("--warm-trials must be 10 or more (CMA-ES starts from the best tenth of them)")
    storage = storage_url(args.storage)
    source_name = args.source_study or f"{args.study}-warm"
    if args.warm_trials:
        source = optuna.create_study(study_name=source_name, storage=storage, direction="minimize",
                                     sampler=optuna.samplers.RandomSampler(seed=1), load_if_exists=True)
        missing = args.warm_trials - len(source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if missing > 0:  # the "earlier" study, without MLflow runs
            source.optimize(lambda t: train(t.suggest_float("lr", 1e-5, 1e-1, log=True),
                                            t.suggest_float("dropout", 0.0, 0.5), args.epochs - 1),
                            n_trials=missing)
    else:
        source = optuna.load_study(study_name=source_name, storage=storage)
    warm = source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(warm) < 10:  # CMA-ES's warm start takes the best tenth of them: at least one
        parser.error(f"study {source_name} has {len(warm)} complete trials; warm-starting needs 10+")
    sampler = optuna.samplers.CmaEsSampler(source_trials=warm, seed=0)
    study = optuna.create_study(study_name=args.study, storage=storage, sampler=sampler,
                                direction="minimize", load_if_exists=True)
    mlflow.set_experiment(args.experiment or f"{getpass.getuser()}-{args.study}")
    study.optimize(make_objective(args.epochs, args.study), n_trials=args.trials)
    best = study.best_trial
    print(f"{args.study}: warm-started from {len(warm)} trials of {source_name}; "
          f"best {best.value:.4f} {best.params} (MLflow run {best.user_attrs['mlflow_run_id']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
