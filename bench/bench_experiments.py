"""Optuna storage benchmark on the local lab (run by `make bench`; needs the converged lab: `make lab`).

Prints, measured in one run: trials per second of a five-worker study (five processes on gpu01, the same
tiny objective, TRIALS trials in all) on the lab's PostgreSQL (alice's database on infra01, over TLS with
her LDAP login, as a job reaches it) and on a journal file in the GPU nodes' shared scratch (the storage
docs/examples/optuna_sweep.py uses), and the ratio PostgreSQL / journal.

The workers run inside gpu01 with the lab job image's Python and the services' Optuna (tests/lab's
experiment_libs), started together; the time is from the first worker's start to the last one's end.
Without the lab it says so and exits 0.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "lab"))

from bench_slurm import lab_is_up, sh
from lab_helpers import experiment_libs

NODE, DB = "labkit-gpu01", "labkit-infra01"
WORKERS = 5
TRIALS = 300
PASSWORD = "bench-alice-pw-1"  # set as the LDAP admin, like the reset-a-password runbook
BASE = "dc=lab,dc=test"

WORKER = r"""
import sys, time, optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
from optuna.study import MaxTrialsCallback
kind, target, name, total, mode = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
if kind == "journal":
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    storage = JournalStorage(JournalFileBackend(target))
else:
    storage = optuna.storages.RDBStorage(target, engine_kwargs={"pool_pre_ping": True})
study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True)
if mode == "work":
    study.optimize(lambda t: (t.suggest_float("x", -10, 10) - 2) ** 2,
                   callbacks=[MaxTrialsCallback(total, states=None)])
"""


def run_study(kind: str, target: str, libs: str, env: str = "") -> float:
    name = f"bench-{kind}-{uuid.uuid4().hex[:8]}"
    script = "/srv/scratch/bench-experiments-worker.py"
    line = (f"{env} PYTHONPATH={libs} runuser -u alice -- python3 {script} {kind} {shlex.quote(target)} "
            f"{name} {TRIALS}")
    sh(NODE, f"{line} create")  # made before the clock starts: not five workers racing to make it
    one = f"{line} work"
    start = time.monotonic()
    sh(NODE, " & ".join([one] * WORKERS) + " & wait", timeout=1800)
    return time.monotonic() - start


def main() -> int:
    if not lab_is_up():
        print("bench_experiments: the lab is not up (make lab); nothing measured")
        return 0
    libs = experiment_libs().replace("/scratch/", "/srv/scratch/", 1)
    scratch = Path(__file__).resolve().parents[1] / ".lab" / "scratch"
    (scratch / "bench-experiments-worker.py").write_text(WORKER)
    sh(DB, f"ldappasswd -x -H ldapi:/// -D cn=admin,{BASE} -w lab-test-only-ldap-admin -s {PASSWORD} "
           f"uid=alice,ou=people,{BASE}")
    ca = subprocess.run(["docker", "exec", DB, "cat", "/etc/postgresql/tls/labkit-db-ca.crt"],
                        capture_output=True, text=True, check=True).stdout
    subprocess.run(["docker", "exec", "-i", NODE, "bash", "-c", "cat > /tmp/bench-db-ca.crt && chmod 644 "
                    "/tmp/bench-db-ca.crt"], input=ca, text=True, check=True)
    url = ("postgresql+psycopg2://alice@infra01.lab.test:5432/alice"
           "?sslmode=verify-full&sslrootcert=/tmp/bench-db-ca.crt")
    journal = f"/srv/scratch/bench-{uuid.uuid4().hex[:8]}.journal"
    pg = run_study("postgresql", url, libs, env=f"PGPASSWORD={PASSWORD}")
    js = run_study("journal", journal, libs)
    sh(NODE, f"rm -f {journal}*")
    print(f"five-worker study, {TRIALS} trials of the same objective:")
    print(f"  PostgreSQL (TLS, LDAP login): {TRIALS / pg:7.1f} trials/s ({pg:.1f} s)")
    print(f"  journal file (shared scratch): {TRIALS / js:7.1f} trials/s ({js:.1f} s)")
    print(f"  ratio PostgreSQL / journal: {(TRIALS / pg) / (TRIALS / js):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
