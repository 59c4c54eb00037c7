"""A grid sweep as one Optuna study: each labq array task evaluates one point of the grid.

    python3 optuna_grid_sweep.py --count                     # prints 8: the grid's size, use --array 0-7
    labq submit --array 0-7%2 --gpus 1 --image <image with optuna and psycopg2> --name grid -- \
        python3 optuna_grid_sweep.py --study grid-lr-batch

runs the eight points, at most two at once (``%2``), as the trials of one study in your study database
(``LABKIT_STUDY_DB``): the lab's Optuna dashboard shows them side by side. ``GridSampler`` gives trial
number i the i-th point of the grid, and Optuna numbers a study's trials one by one, so the eight tasks
evaluate the eight points once each, whichever task runs first. A task that finds the grid done (a task
run again) stops without a trial. Change ``--grid`` (JSON: parameter -> list of values) for your own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from typing import Any

import optuna

GRID = {"lr": [1e-4, 1e-3, 1e-2, 1e-1], "batch": [32, 64]}


def storage_url(url: str) -> str:
    """LABKIT_STUDY_DB is a libpq URL; SQLAlchemy (Optuna's RDB storage) is told the driver: psycopg2."""
    return "postgresql+psycopg2://" + url[len("postgresql://"):] if url.startswith("postgresql://") else url


def size(grid: dict[str, list[Any]]) -> int:
    return math.prod(len(v) for v in grid.values())


def objective(trial: optuna.Trial, grid: dict[str, list[Any]]) -> float:
    point = {name: trial.suggest_categorical(name, values) for name, values in grid.items()}
    trial.set_user_attr("array_index", int(os.environ.get("LABQ_ARRAY_INDEX", "-1")))
    # A stand-in for training with these values: return the validation loss.
    lr, batch = float(point.get("lr", 1e-3)), float(point.get("batch", 64))
    return (math.log10(lr) + 2.5) ** 2 + abs(batch - 48) / 100


def open_study(name: str, storage: str, grid: dict[str, list[Any]]) -> optuna.Study:
    """Create or join the study; two first tasks making Optuna's tables at once: the loser tries again."""
    for attempt in range(5):
        try:
            return optuna.create_study(study_name=name, storage=storage, direction="minimize",
                                       sampler=optuna.samplers.GridSampler(grid, seed=0), load_if_exists=True)
        except Exception:  # a concurrent first creation of the tables (raised on the last try)
            if attempt == 4:
                raise
            time.sleep(1 + random.random())  # noqa: S311 - spreading retries, not security
    raise AssertionError("not reached")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=os.environ.get("LABKIT_STUDY_DB", ""),
                        help="study database URL (default: $LABKIT_STUDY_DB, set by labq)")
    parser.add_argument("--study", help="study name (the same for every task)")
    parser.add_argument("--grid", default=json.dumps(GRID), help="JSON: parameter -> list of values")
    parser.add_argument("--count", action="store_true", help="print the number of grid points and exit")
    args = parser.parse_args()
    grid = json.loads(args.grid)
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        parser.error("--grid must map each parameter to a non-empty list of values")
    if args.count:
        print(size(grid))
        return 0
    if not args.study or not args.storage:
        parser.error("--study is needed, and a study database (LABKIT_STUDY_DB under labq, or --storage)")
    study = open_study(args.study, storage_url(args.storage), grid)
    if len(study.get_trials(deepcopy=False)) >= size(grid):
        print(f"{args.study}: the grid's {size(grid)} points have all been run; nothing to do")
        return 0
    ran: list[optuna.trial.FrozenTrial] = []
    study.optimize(lambda t: objective(t, grid), n_trials=1, callbacks=[lambda _, t: ran.append(t)])
    print(f"{args.study}: trial {ran[0].number}: {ran[0].params} -> {ran[0].value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
