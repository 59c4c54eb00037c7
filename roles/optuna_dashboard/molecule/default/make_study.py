"""Alice's study: five trials of a tiny objective in her database (her LDAP password from PGPASSWORD,
TLS verified). Prints the study's name and number of complete trials."""

from __future__ import annotations

import sys

import optuna

URL = "postgresql+psycopg2://alice@localhost:5432/alice?sslmode=verify-full&sslrootcert=" + sys.argv[1]


def objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -10.0, 10.0)
    return (x - 2.0) ** 2


def main() -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="molecule-lr", storage=URL, load_if_exists=True)
    study.optimize(objective, n_trials=5)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    print(study.study_name, len(complete))
    return 0


if __name__ == "__main__":
    sys.exit(main())
