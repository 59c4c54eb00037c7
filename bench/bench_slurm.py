"""Slurm benchmark on the local lab (run by `make bench`; needs the converged lab: `make lab`).

Prints, measured in one run:
  1. sbatch submit-to-start over 100 jobs, p50 and p99, with labkit's scheduler settings
     (slurm_config_scheduler_parameters) and with Slurm's defaults (the line removed from slurm.conf on the
     controller for the measurement, `scontrol reconfigure`, then restored): the ratio of the p50s.
  2. makespan of 40 one-GPU 2-second jobs (one array) across both nodes' 3 GPUs through Slurm vs the same
     40 jobs on gpu01's labq (2 GPUs): the ratio.

Submit-to-start is measured inside gpu01: the submit time just before `sbatch`, the start time by the job
itself (`date +%s.%N` as its first command), both on the machine's one clock; each job waits for the one
before it to start, so no job queues behind another. Without the lab it says so and exits 0.
`bench_slurm.py makespan` runs only the second part.
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

CONTROLLER, NODE = "labkit-infra01", "labkit-gpu01"
USER = "alice"
N_LATENCY = 100
N_MAKESPAN = 40
IMAGE = "labkit-bench:1"

LATENCY_LOOP = r"""
set -eu
dir=$(mktemp -d /tmp/bench-slurm-XXXXXX); chmod 777 "$dir"
for i in $(seq {n}); do
  t0=$(date +%s.%N)
  runuser -u {user} -- sbatch --parsable -w gpu01 --output=/dev/null \
      --wrap "date +%s.%N > $dir/$i" >/dev/null
  while [ ! -s "$dir/$i" ]; do sleep 0.01; done
  echo "$t0 $(cat "$dir/$i")"
done
rm -rf "$dir"
"""

IMPORT_IMAGE = f"""set -e
docker image inspect {IMAGE} >/dev/null 2>&1 && exit 0
root=$(mktemp -d)
files=$( (echo /bin/dash /bin/sleep; ldd /bin/dash /bin/sleep) | grep -o '/[^ :]*' | sort -u)
cp --parents -L $files "$root"
chmod -R a+rX "$root"
tar -C "$root" -c . | docker import - {IMAGE} >/dev/null
rm -rf "$root"
"""


def sh(container: str, script: str, timeout: float = 900) -> str:
    proc = subprocess.run(["docker", "exec", container, "bash", "-c", script], capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{container}: {script[:80]}...: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def lab_is_up() -> bool:
    proc = subprocess.run(["docker", "exec", CONTROLLER, "scontrol", "ping"], capture_output=True, text=True)
    return proc.returncode == 0 and "is UP" in proc.stdout


def submit_to_start(n: int) -> list[float]:
    out = sh(NODE, LATENCY_LOOP.format(n=n, user=USER))
    return [float(end) - float(start) for start, end in (line.split() for line in out.splitlines())]


def with_default_scheduler(run: Callable[[], list[float]]) -> list[float]:
    """Run `run` with SchedulerParameters removed from the controller's slurm.conf (Slurm's defaults)."""
    original = sh(CONTROLLER, "cat /etc/slurm/slurm.conf")
    sh(CONTROLLER, "sed -i '/^SchedulerParameters=/d' /etc/slurm/slurm.conf && scontrol reconfigure")
    try:
        time.sleep(2)
        return run()
    finally:
        subprocess.run(["docker", "exec", "-i", CONTROLLER, "bash", "-c",
                        "cat > /etc/slurm/slurm.conf && scontrol reconfigure"],
                       input=original, text=True, check=True, capture_output=True)


def wait_idle(timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while sh(CONTROLLER, f"squeue -h -u {USER}").strip():
        if time.monotonic() > deadline:
            raise RuntimeError("Slurm jobs still queued")
        time.sleep(1)


def slurm_makespan(n: int) -> float:
    job = sh(NODE, f"runuser -u {USER} -- sbatch --parsable --array=0-{n - 1} --gres=gpu:1 "
                   f"--output=/dev/null --wrap 'sleep 2'").strip()
    wait_idle()
    deadline = time.monotonic() + 60  # slurmdbd records the tasks' ends a little after they leave the queue
    while True:
        rows = sh(CONTROLLER, f"sacct -n -P -X -j {job} -o Submit,End,State --noconvert").splitlines()
        if (len(rows) == n and all(r.endswith("|COMPLETED") for r in rows)) or time.monotonic() > deadline:
            break
        time.sleep(1)
    fmt = "%Y-%m-%dT%H:%M:%S"
    submit = min(time.mktime(time.strptime(r.split("|")[0], fmt)) for r in rows)
    end = max(time.mktime(time.strptime(r.split("|")[1], fmt)) for r in rows)
    states = {r.split("|")[2] for r in rows}
    if states != {"COMPLETED"} or len(rows) != n:
        raise RuntimeError(f"Slurm array {job}: {len(rows)} tasks, states {states}")
    return end - submit


def labq_makespan(n: int) -> float:
    sh(NODE, IMPORT_IMAGE)
    cmd = ["labq", "submit", "--json", "--array", f"0-{n - 1}", "--gpus", "1", "--image", IMAGE, "--",
           "/bin/sleep", "2"]
    ids = json.loads(sh(NODE, f"cd ~{USER} && runuser -u {USER} -- {shlex.join(cmd)}"))["ids"]
    deadline = time.monotonic() + 600
    while True:
        jobs = [json.loads(sh(NODE, f"runuser -u {USER} -- labq show {i} --json")) for i in (ids[0], ids[-1])]
        if all(j["state"] in ("succeeded", "failed", "cancelled", "timeout") for j in jobs):
            break
        if time.monotonic() > deadline:
            raise RuntimeError("labq array did not finish")
        time.sleep(2)
    listed = json.loads(sh(NODE, f"runuser -u {USER} -- labq history --json -n {n + 10}"))
    mine = [j for j in listed if j["id"] in set(ids)]
    if len(mine) != n or {j["state"] for j in mine} != {"succeeded"}:
        raise RuntimeError(f"labq array: {len(mine)} jobs, states {({j['state'] for j in mine})}")
    return max(j["end_time"] for j in mine) - min(j["submit_time"] for j in mine)


def main() -> int:
    if not lab_is_up():
        print("bench_slurm: the lab's Slurm is not up (make lab); nothing measured")
        return 0
    wait_idle()
    if sys.argv[1:] == ["makespan"]:
        return makespan()
    tuned = submit_to_start(N_LATENCY)
    default = with_default_scheduler(lambda: submit_to_start(N_LATENCY))
    t50, t99 = statistics.median(tuned), pct(tuned, 0.99)
    d50, d99 = statistics.median(default), pct(default, 0.99)
    print(f"1. sbatch submit-to-start over {N_LATENCY} jobs: labkit's settings p50 {t50:.3f} s "
          f"p99 {t99:.3f} s; Slurm's defaults p50 {d50:.3f} s p99 {d99:.3f} s; "
          f"ratio p50 {t50 / d50:.2f} p99 {t99 / d99:.2f}")
    return makespan()


def makespan() -> int:
    slurm = slurm_makespan(N_MAKESPAN)
    labq = labq_makespan(N_MAKESPAN)
    print(f"2. makespan of {N_MAKESPAN} one-GPU 2 s jobs: Slurm on both nodes (3 GPUs) {slurm:.1f} s, "
          f"gpu01's labq (2 GPUs) {labq:.1f} s, ratio {slurm / labq:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
