"""labq benchmark (run by `make bench`; needs root, a running Docker engine and busybox-static).

Prints, measured in one run:
  1. 200 jobs of `true` on 4 fake GPUs through labq vs the same 200 `docker run --rm`, four at a
     time from a shell: wall-time ratio (goal <= 1.05).
  2. gap from a job's exit to the next job's start on the freed GPU: p50 and p99 (goal p99 <= 0.5 s).
  3. `labq ls` wall time with 10,000 jobs in history (goal <= 150 ms); daemon RSS with 10,000 queued.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "job_queue")]

from labq_helpers import import_busybox_image  # noqa: E402

from job_queue.models import JobSpec, JobState  # noqa: E402
from job_queue.store import SqliteStore  # noqa: E402

IMAGE = "labq-bench-busybox:1"
N_JOBS = 200
N_HISTORY = 10_000
N_QUEUED = 10_000


def ensure_image() -> None:
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode == 0:
        return
    import_busybox_image(IMAGE, ("sh", "true", "sleep"))

class Daemon:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = str(root / "labq.sock")
        self.config = root / "config.toml"
        self.config.write_text(
            f'gpus = ["GPU-b0", "GPU-b1", "GPU-b2", "GPU-b3"]\ndefault_image = "{IMAGE}"\n'
            f'metrics_port = 0\nstate_dir = "{root / "state"}"\nsocket = "{self.socket}"\n'
            f'log_dir = "{root / "logs"}"\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "job_queue.daemon", "--config", str(self.config),
                                      "--log-level", "WARNING"], cwd=REPO)
        for _ in range(600):
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(self.socket)
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("labqd did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)

    def call(self, op: str, **fields: Any) -> Any:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.socket)
            s.sendall(json.dumps({"v": 1, "op": op, **fields}).encode() + b"\n")
            reply = json.loads(s.makefile("rb").readline())
        if not reply["ok"]:
            raise SystemExit(f"labq {op}: {reply['error']['message']}")
        return reply["result"]

    def containers(self) -> list[str]:
        instance = SqliteStore(str(self.root / "state" / "labq.db")).instance
        out = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=labq.instance={instance}"],
                             capture_output=True, text=True, check=True).stdout
        return out.split()

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return -1


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_labq(d: Daemon, cwd: str, n: int) -> tuple[float, float, list[dict[str, Any]]]:
    """Submit n jobs of `true` (1 GPU each); wall time until all finished, and until all removed."""
    t0 = time.monotonic()
    ids = []
    for _ in range(n):
        ids.extend(d.call("submit", command=["true"], cwd=cwd, gpus=1)["ids"])
    while d.call("ls")["jobs"]:
        time.sleep(0.02)
    finished = time.monotonic() - t0
    # Docker's exact start/finish times are copied into the record just before removal.
    while d.containers():
        time.sleep(0.02)
    removed = time.monotonic() - t0
    jobs = [d.call("show", id=i) for i in ids]
    bad = [j for j in jobs if j["state"] != "succeeded"]
    if bad:
        raise SystemExit(f"{len(bad)} jobs did not succeed, e.g. {bad[0]['reason']}")
    return finished, removed, jobs


def bench_docker(n: int) -> float:
    t0 = time.monotonic()
    subprocess.run(f"seq {n} | xargs -P 4 -I{{}} docker run --rm {IMAGE} true", shell=True, check=True)
    return time.monotonic() - t0


def gaps(jobs: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Per GPU, consecutive jobs: (exit -> next start, exit -> labq's decision to start the next).

    Exit and start are Docker's FinishedAt/StartedAt; the decision is labqd's dispatch time.
    """
    by_gpu: dict[str, list[dict[str, Any]]] = {}
    for j in jobs:
        for g in j["assigned_gpus"]:
            by_gpu.setdefault(g, []).append(j)
    total, ours = [], []
    for runs in by_gpu.values():
        runs.sort(key=lambda j: j["start_time"])
        for a, b in itertools.pairwise(runs):
            total.append(b["start_time"] - a["end_time"])
            ours.append(b["dispatch_time"] - a["end_time"])
    return total, ours


def fill_history(db: str, n: int) -> None:
    store = SqliteStore(db)
    spec = JobSpec(user="root", uid=0, gid=0, groups=[0], home="/root", cwd="/root", image=IMAGE,
                   command=["python", "train.py", "--lr", "0.1"], gpus=1, name="train")
    now = time.time()
    ids = store.add_jobs([spec] * n, now - 3600)
    with store.tx():
        for i in ids:
            store.update(i, state=JobState.SUCCEEDED, exit_code=0, start_time=now - 3000, end_time=now - 2000,
                         assigned_gpus=["GPU-b0"])
    store.close()


def time_cli(d: Daemon, *args: str, runs: int = 10) -> float:
    env = {**os.environ, "LABQ_SOCKET": d.socket, "PYTHONPATH": str(REPO)}
    times = []
    for _ in range(runs):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "job_queue.cli", *args], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        times.append(time.monotonic() - t0)
    return statistics.median(times)


def cleanup(d: Daemon, root: Path) -> None:
    """SIGTERM leaves containers running by design: remove this run's containers explicitly."""
    d.stop()
    if (root / "state" / "labq.db").exists():
        ids = d.containers()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    if os.geteuid() != 0:
        print("bench_labq: needs root (starts labqd, talks to dockerd)", file=sys.stderr)
        return 2
    ensure_image()
    root = Path(tempfile.mkdtemp(prefix="labq-bench-"))
    root.chmod(0o755)
    cwd = str(root / "work")
    d = Daemon(root)
    d.start()
    try:
        # ABBA order (labq, docker, docker, labq; 100 jobs each) so a drifting machine load
        # does not favour either side.
        half = N_JOBS // 2
        f1, r1, jobs1 = bench_labq(d, cwd, half)
        docker_wall = bench_docker(half) + bench_docker(N_JOBS - half)
        f2, r2, jobs2 = bench_labq(d, cwd, N_JOBS - half)
        labq_wall, labq_removed = f1 + f2, r1 + r2
        g, dispatch = gaps(jobs1)
        g2, dispatch2 = gaps(jobs2)
        g, dispatch = g + g2, dispatch + dispatch2
        print(f"1. {N_JOBS} x true on 4 fake GPUs (ABBA): labq {labq_wall:.2f} s until all finished "
              f"({labq_removed:.2f} s until all containers removed), docker run --rm x4 {docker_wall:.2f} s, "
              f"ratio {labq_wall / docker_wall:.3f} ({labq_removed / docker_wall:.3f}) (goal <= 1.05)")
        print(f"2. exit -> next start on the freed GPU ({len(g)} gaps): p50 {pct(g, 0.5) * 1000:.0f} ms, "
              f"p99 {pct(g, 0.99) * 1000:.0f} ms (goal p99 <= 500 ms)")
        print(f"   of which exit -> labqd dispatches the next job: p50 {pct(dispatch, 0.5) * 1000:.0f} ms, "
              f"p99 {pct(dispatch, 0.99) * 1000:.0f} ms; the rest is Docker create + start")

        d.stop()
        fill_history(str(root / "state" / "labq.db"), N_HISTORY)
        d.start()
        ls_ms = time_cli(d, "ls") * 1000
        hist_ms = time_cli(d, "history", "-n", "50") * 1000
        help_ms = time_cli(d, "--help") * 1000
        d.call("submit", command=["sleep", "600"], cwd=cwd, gpus=4)["ids"][0]
        t0 = time.monotonic()
        d.call("submit", command=["true"], cwd=cwd, gpus=1, array=f"0-{N_QUEUED - 1}")
        submit_s = time.monotonic() - t0
        time.sleep(2)
        # A high-priority CPU job jumps the queue: its start latency includes a full pass over 10,000.
        t0 = time.monotonic()
        urgent = d.call("submit", command=["true"], cwd=cwd, gpus=0, priority=10)["ids"][0]
        while d.call("show", id=urgent)["state"] in ("pending", "starting"):
            time.sleep(0.005)
        urgent_ms = (time.monotonic() - t0) * 1000
        rss = d.rss_kib()
        ls_queued_ms = time_cli(d, "ls", runs=3) * 1000
        print(f"3. labq ls with {N_HISTORY} jobs in history: {ls_ms:.0f} ms median of 10 (goal <= 150 ms); "
              f"history -n 50: {hist_ms:.0f} ms; labq --help: {help_ms:.0f} ms")
        print(f"   daemon RSS with {N_QUEUED} queued: {rss / 1024:.1f} MiB; submitting the {N_QUEUED}-task "
              f"array: {submit_s:.2f} s; labq ls listing all {N_QUEUED}: {ls_queued_ms:.0f} ms; "
              f"submit-to-running of a priority job past them: {urgent_ms:.0f} ms")
    finally:
        cleanup(d, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
