"""One worker of an Optuna study run as a labq job array: every array task is one worker on one GPU.

    labq submit --array 0-3 --gpus 1 --image <image with optuna> --name sweep -- \
        python3 optuna_sweep.py --storage ~/sweeps/lr-search.journal --study lr-search --trials 40

starts four workers at once (one GPU each). They share one study through Optuna's journal file
storage, which supports parallel workers on one machine's disk (it locks by creating a file next to
the journal). Do not use SQLite for parallel workers, and keep the journal off NFS if you can: the
lock needs a file system with atomic exclusive create. Together the workers complete ``--trials``
trials; each stops when the study has that many complete trials.

Replace ``objective`` with your training: read the GPU from ``CUDA_VISIBLE_DEVICES`` (labq sets it
to this worker's GPU), train with ``trial.suggest_*`` values, return the validation metric.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState


def objective(trial: optuna.Trial) -> float:
    lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
    dropout = trial.suggest_float("dropout", 0.0, 0.5)
    layers = trial.suggest_int("layers", 1, 4)
    # Who ran it: labq's array index and the GPU this worker was given.
    trial.set_user_attr("worker", int(os.environ.get("LABQ_ARRAY_INDEX", "0")))
    trial.set_user_attr("gpu", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    trial.set_user_attr("job", int(os.environ.get("LABQ_JOB_ID", "0")))
    # A stand-in for "train and return the validation loss" (best near lr=3e-3, dropout=0.1, 2 layers).
    return (math.log10(lr) + 2.5) ** 2 + (dropout - 0.1) ** 2 + 0.1 * (layers - 2) ** 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True, help="journal file shared by the workers")
    parser.add_argument("--study", required=True, help="study name")
    parser.add_argument("--trials", type=int, default=40, help="complete trials of the whole study")
    args = parser.parse_args()

    path = Path(args.storage).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(path)))
    worker = int(os.environ.get("LABQ_ARRAY_INDEX", "0"))
    study = optuna.create_study(
        study_name=args.study,
        storage=storage,
        direction="minimize",
        load_if_exists=True,  # the first worker creates it, the others join
        sampler=optuna.samplers.TPESampler(seed=worker),  # different seeds: workers explore differently
    )
    study.optimize(objective, callbacks=[MaxTrialsCallback(args.trials, states=(TrialState.COMPLETE,))])
    best = study.best_trial
    print(f"worker {worker}: study has {len(study.trials)} trials; best {best.value:.4f} {best.params}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
