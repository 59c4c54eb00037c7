"""labq on Slurm vs the per-node labq, on the local lab (run by `make bench`; needs `make lab`).

Prints, measured in one run (the GPU nodes' job_queue role is converged to each mode in turn, and left
in the lab's own mode at the end):
  1. `labq submit` to container start over N_LATENCY one-GPU jobs, p50 and p99, per mode, and their
     ratio. The submit time is taken just before `labq submit` inside gpu01, the start time by the job
     itself (`date +%s.%N`, its only command, read from its log); one job at a time.
  2. throughput of N_THROUGHPUT one-GPU jobs (one array of `/bin/true`) per mode: jobs per minute from
     the first submit to the last end (labq history), and the ratio. The per-node queue runs them on
     gpu01's GPUs within the lab's per-user limit (job_queue_max_gpus_per_user), Slurm on both nodes'
     3 GPUs within the lab's Slurm limit (lab_max_gpus_per_user).

Every clock is the one machine's (the lab hosts are containers on it). Without the lab it says so and
exits 0. `bench_labq_slurm.py latency|throughput` runs one part.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_slurm import lab_is_up, pct, sh  # the lab's Slurm bench: same helpers

REPO = Path(__file__).resolve().parent.parent
NODES = ("labkit-gpu01", "labkit-gpu02")
USER = "alice"
N_LATENCY = int(os.environ.get("BENCH_LATENCY_JOBS", "40"))
N_THROUGHPUT = int(os.environ.get("BENCH_THROUGHPUT_JOBS", "200"))
IMAGE = "labkit-benchdate:1"
LOG_DIR = "/var/lib/labq/logs"

IMPORT_IMAGE = f"""set -e
docker image inspect {IMAGE} >/dev/null 2>&1 && exit 0
root=$(mktemp -d)
bins="/bin/dash /bin/date /bin/true"
files=$( (echo $bins; ldd $bins) | grep -o '/[^ :]*' | sort -u)
cp --parents -L $files "$root"
chmod -R a+rX "$root"
tar -C "$root" -c . | docker import - {IMAGE} >/dev/null
rm -rf "$root"
"""


def mode(scheduler: str) -> None:
    """Converge the GPU nodes' job_queue role to ``scheduler`` (a real ansible-playbook run)."""
    proc = subprocess.run(
        ["ansible-playbook", "-i", str(REPO / "inventory" / "lab"), str(REPO / "playbooks" / "job_queue.yml"),
         "-l", "gpu_nodes", "-e", f"job_queue_scheduler={scheduler}"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg")))
    if proc.returncode != 0:
        raise RuntimeError(f"job_queue.yml with scheduler={scheduler}: {proc.stdout[-1500:]}")
    for node in NODES:
        sh(node, IMPORT_IMAGE)


def labq(args: str) -> str:
    return sh(NODES[0], f"cd /tmp && runuser -u {USER} -- labq {args}")


def started(job_id: int, log: str, timeout: float = 120) -> float:
    """The job's own start time, from its log (``log``: its file name) on whichever node ran it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in NODES:
            proc = subprocess.run(["docker", "exec", node, "cat", f"{LOG_DIR}/{log}"],
                                  capture_output=True, text=True)
            if proc.returncode == 0 and proc.stdout.strip():
                return float(proc.stdout.split()[0])
        time.sleep(0.05)
    raise RuntimeError(f"job {job_id} did not start within {timeout} s")


def latency(n: int, scheduler: str) -> list[float]:
    out = []
    for _ in range(n):
        line = sh(NODES[0], f"cd /tmp && date +%s.%N && runuser -u {USER} -- labq submit --gpus 1 "
                            f"--image {IMAGE} -- /bin/date +%s.%N").split()
        t0, job_id = float(line[0]), int(line[1])
        out.append(started(job_id, f"{'slurm-' if scheduler == 'slurm' else ''}{job_id}.log") - t0)
    return out


def throughput(n: int) -> float:
    """Jobs per minute for an array of n one-GPU `/bin/true` jobs, first submit to last end."""
    res = json.loads(labq(f"submit --json --array 0-{n - 1} --gpus 1 --image {IMAGE} -- /bin/true"))
    first = res["ids"][0]
    deadline = time.monotonic() + 1800
    while True:
        jobs = json.loads(labq(f"history --json -n {n + 50}"))
        mine = [j for j in jobs if j["id"] in set(res["ids"]) or j.get("array_id") == first]
        if len(mine) >= n:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"array {first}: {len(mine)} of {n} ended in time")
        time.sleep(3)
    states = {j["state"] for j in mine}
    if states != {"succeeded"}:
        raise RuntimeError(f"array {first}: states {states}")
    span = max(j["end_time"] for j in mine) - min(j["submit_time"] for j in mine)
    return n / span * 60


def main() -> int:
    if not lab_is_up():
        print("bench_labq_slurm: the lab's Slurm is not up (make lab); nothing measured")
        return 0
    parts = sys.argv[1:] or ["latency", "throughput"]
    results: dict[str, dict[str, object]] = {}
    try:
        for scheduler in ("labq", "slurm"):
            mode(scheduler)
            r: dict[str, object] = {}
            if "latency" in parts:
                r["latency"] = latency(N_LATENCY, scheduler)
            if "throughput" in parts:
                r["throughput"] = throughput(N_THROUGHPUT)
            results[scheduler] = r
    finally:
        mode("labq")  # the lab's own setting (inventory/lab)
    if "latency" in parts:
        lq, sl = results["labq"]["latency"], results["slurm"]["latency"]
        assert isinstance(lq, list) and isinstance(sl, list)
        print(f"1. labq submit -> container start over {N_LATENCY} one-GPU jobs: per-node labq p50 "
              f"{statistics.median(lq):.2f} s p99 {pct(lq, 0.99):.2f} s; labq on Slurm p50 "
              f"{statistics.median(sl):.2f} s p99 {pct(sl, 0.99):.2f} s; ratio Slurm/per-node p50 "
              f"{statistics.median(sl) / statistics.median(lq):.2f} p99 {pct(sl, 0.99) / pct(lq, 0.99):.2f}")
    if "throughput" in parts:
        lt, st = results["labq"]["throughput"], results["slurm"]["throughput"]
        assert isinstance(lt, float) and isinstance(st, float)
        print(f"2. {N_THROUGHPUT} one-GPU /bin/true jobs (one array): per-node labq {lt:.1f} jobs/min, "
              f"labq on Slurm {st:.1f} jobs/min, ratio Slurm/per-node {st / lt:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
