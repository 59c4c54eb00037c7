"""labq benchmark (run by `make bench`; needs root, a running Docker engine and busybox-static).

Prints, measured in one run:
  1. 200 jobs of `true` on 4 fake GPUs through labq vs the same 200 `docker run --rm`, four at a
     time from four shell loops: wall-time ratio (goal <= 1.05).
  2. gap from a job's exit to the next job's start on the freed GPU: p50 and p99 (goal p99 <= 0.5 s);
     the same from Docker's own event timestamps (die -> start) next to the `docker run` loop's in
     the same slot (goal: labq's p50 and p99 below the loop's), any next start for both, and how
     many labq starts used a container made before the exit that freed the GPU (prepared ahead,
     job_queue/prepare.py). Then one job at a time (jobs taking all 4 GPUs, `sleep 0.3`, ABBA)
     against a `docker run --rm` loop one at a time: die -> next start, the latency of one start
     without three others beside it (goal: labq's p50 and p99 below the loop's).
  3. `labq ls` wall time with 10,000 jobs in history (goal <= 150 ms); daemon RSS with 10,000 queued.
  4. scale: with 100,000 finished and 100,000 pending jobs (ten 10,000-task arrays behind four running
     jobs): `labq ls`, `ls --json`, `show`, `history` wall time, one scheduling pass (labqd's own
     labq_schedule_pass_seconds), daemon RSS (goals: each <= 150 ms, RSS <= 100 MiB).
  5. submits through the API (held jobs, persistent connections): one client and eight client
     processes (goals >= 300/s and >= 1000/s); then kill -9 right after submits returned, restart,
     and check every returned id is still there.

`bench_labq.py dispatch` (items 1 and 2), `bench_labq.py scale` or `bench_labq.py submits` runs only
that part.
"""

from __future__ import annotations

import dataclasses
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
LOOP_LABEL = "labq.bench=docker-run-loop"
SLOT_LABEL = "labq.bench.slot"


def ensure_image() -> None:
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode == 0:
        return
    import_busybox_image(IMAGE, ("sh", "true", "sleep"))

class Daemon:
    def __init__(self, root: Path, extra: str = "", metrics_port: int = 0) -> None:
        self.root = root
        self.socket = str(root / "labq.sock")
        self.config = root / "config.toml"
        self.metrics_port = metrics_port
        self.config.write_text(
            f'gpus = ["GPU-b0", "GPU-b1", "GPU-b2", "GPU-b3"]\ndefault_image = "{IMAGE}"\n'
            f'metrics_port = {metrics_port}\nmetrics_address = "127.0.0.1"\n'
            f'state_dir = "{root / "state"}"\nsocket = "{self.socket}"\n'
            f'log_dir = "{root / "logs"}"\n{extra}'
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

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(60)

    def pass_seconds(self) -> tuple[float, float]:
        """(sum, count) of labqd's labq_schedule_pass_seconds histogram (metrics on loopback)."""
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith(("labq_schedule_pass_seconds_sum", "labq_schedule_pass_seconds_count")):
                name, value = line.split()
                values[name] = float(value)
        return values["labq_schedule_pass_seconds_sum"], values["labq_schedule_pass_seconds_count"]

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


def bench_labq(d: Daemon, cwd: str, n: int, command: tuple[str, ...] = ("true",),
               gpus: int = 1) -> tuple[float, float, list[dict[str, Any]]]:
    """Submit n jobs of `true` (1 GPU each); wall time until all finished, and until all removed."""
    t0 = time.monotonic()
    ids = []
    for _ in range(n):
        ids.extend(d.call("submit", command=list(command), cwd=cwd, gpus=gpus)["ids"])
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


class DockerEvents:
    """Docker's create, start and die events, recorded live by `docker events` (dockerd replays only its last
    few hundred events for --since, fewer than one run makes); Docker's own timestamps (timeNano)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["docker", "events", "--format", "{{json .}}", "--filter", "type=container",
             "--filter", "event=create", "--filter", "event=start", "--filter", "event=die"],
            stdout=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        import threading

        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        time.sleep(0.5)  # subscribed before the run starts

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> None:
        time.sleep(1)  # the last events on their way
        self.proc.terminate()
        self.proc.wait(10)
        self.reader.join(10)

    def of(self, label: str, value: str) -> list[tuple[float, str, str]]:
        """(time, action, container id) of the containers whose ``label`` is ``value``, by time."""
        out = []
        for line in self.lines:
            ev = json.loads(line)
            if ((ev.get("Actor") or {}).get("Attributes") or {}).get(label) == value:
                out.append((ev["timeNano"] / 1e9, ev.get("Action") or ev.get("status"), ev["id"]))
        return sorted(out)

    def label_of(self, label: str) -> dict[str, str]:
        """Container id -> its ``label`` (the containers that have it)."""
        out = {}
        for line in self.lines:
            ev = json.loads(line)
            value = ((ev.get("Actor") or {}).get("Attributes") or {}).get(label)
            if value is not None:
                out[ev["id"]] = value
        return out


def die_to_next_start(events: list[tuple[float, str, str]],
                      slot_of: dict[str, str] | None = None) -> list[float]:
    """For each die event: the time until the next start event (in the same slot, e.g. the freed
    GPU, when ``slot_of`` maps container ids to slots; else any next start)."""
    out = []
    for i, (t, action, cid) in enumerate(events):
        if action != "die":
            continue
        slot = slot_of.get(cid) if slot_of is not None else None
        if slot_of is not None and slot is None:
            continue  # not a container of the run asked about
        for t2, action2, cid2 in events[i + 1:]:
            if action2 == "start" and (slot_of is None or slot_of.get(cid2) == slot):
                out.append(t2 - t)
                break
    return out


def made_before_the_exit(events: list[tuple[float, str, str]], slot_of: dict[str, str]) -> tuple[int, int]:
    """(starts whose container was created before the previous container on the same slot died,
    starts after such a death): the next containers that were prepared while the GPU was busy."""
    created = {cid: t for t, action, cid in events if action == "create"}
    last_die: dict[str, float] = {}
    ahead = after_exit = 0
    for t, action, cid in events:
        slot = slot_of.get(cid)
        if slot is None:
            continue
        if action == "die":
            last_die[slot] = t
        elif action == "start" and slot in last_die:
            after_exit += 1
            ahead += created.get(cid, t) < last_die[slot]
    return ahead, after_exit


LOOP1_LABEL = "labq.bench=docker-run-one-at-a-time"
ONE_AT_A_TIME = 20  # jobs per half


def bench_labq_one_at_a_time(d: Daemon, cwd: str, n: int) -> set[str]:
    """n jobs of `sleep 0.3` taking all four GPUs (so one runs at a time); their container ids."""
    return {j["container_id"] for j in bench_labq(d, cwd, n, ("sleep", "0.3"), 4)[2]}


def bench_docker_one_at_a_time(n: int) -> None:
    subprocess.run(f"for i in $(seq {n}); do docker run --rm --label {LOOP1_LABEL} {IMAGE} sleep 0.3; done",
                   shell=True, check=True)


def bench_docker(n: int) -> float:
    """n `docker run --rm` of `true`, four at a time: four shell loops, each labelled with its slot
    (labq.bench.slot), so the exit -> next start gap can be taken per slot like labq's per GPU."""
    t0 = time.monotonic()
    loops = [subprocess.Popen(f"for i in $(seq {n // 4 + (k < n % 4)}); do docker run --rm "
                              f"--label {LOOP_LABEL} --label {SLOT_LABEL}={k} {IMAGE} true || exit 1; done",
                              shell=True) for k in range(4)]
    if any(p.wait() != 0 for p in loops):
        raise SystemExit("docker run loop failed")
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


def fill_finished(db: str, n: int) -> None:
    """n finished jobs written straight into the database (before labqd starts)."""
    store = SqliteStore(db)
    base = JobSpec(user="root", uid=0, gid=0, groups=[0], home="/root", cwd="/root", image=IMAGE,
                   command=["python", "train.py", "--lr", "0.1"], gpus=1, name="train")
    now = time.time()
    for first in range(0, n, 10_000):
        ids = store.add_jobs([dataclasses.replace(base, array_index=i) for i in range(10_000)], now - 7200)
        with store.tx() as cur:
            cur.executemany("UPDATE jobs SET state = 'succeeded', exit_code = 0, start_time = ?, "
                            "end_time = ?, assigned_gpus = '[\"GPU-b0\"]' WHERE id = ?",
                            [(now - 7000 + k, now - 6000 + k, i) for k, i in enumerate(ids, first)])
    store.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_scale() -> None:
    n_finished, n_pending = 100_000, 100_000
    root = Path(tempfile.mkdtemp(prefix="labq-bench-scale-"))
    root.chmod(0o755)
    cwd = str(root / "work")
    d = Daemon(root, "max_pending_per_user = 0\n", metrics_port=free_port())
    try:
        (root / "state").mkdir()
        t0 = time.monotonic()
        fill_finished(str(root / "state" / "labq.db"), n_finished)
        fill_s = time.monotonic() - t0
        d.start()
        blockers = [d.call("submit", command=["sleep", "3600"], cwd=cwd, gpus=1)["ids"][0] for _ in range(4)]
        t0 = time.monotonic()
        for _ in range(n_pending // 10_000):
            d.call("submit", command=["python", "train.py", "--lr", "0.1"], cwd=cwd, gpus=1,
                   array="0-9999", time_limit=3600)
        submit_s = time.monotonic() - t0
        while any(d.call("show", id=b)["state"] != "running" for b in blockers):
            time.sleep(0.1)
        time.sleep(1)
        one = blockers[-1] + 5000  # a pending task
        s0, c0 = d.pass_seconds()
        for _ in range(10):  # each hold and release wakes labqd for one pass over the whole queue
            d.call("hold", ids=[one])
            d.call("release", ids=[one])
        time.sleep(1)
        s1, c1 = d.pass_seconds()
        pass_ms = (s1 - s0) / max(1.0, c1 - c0) * 1000
        ls_ms = time_cli(d, "ls") * 1000
        ls_json_ms = time_cli(d, "ls", "--json") * 1000
        show_ms = time_cli(d, "show", str(one)) * 1000
        hist_ms = time_cli(d, "history") * 1000
        lines = len(subprocess.run([sys.executable, "-m", "job_queue.cli", "--socket", d.socket, "ls"],
                                   capture_output=True, text=True, check=True).stdout.splitlines())
        rss = d.rss_kib() / 1024
        print(f"4. scale, {n_finished} finished + {n_pending} pending (ten 10,000-task arrays behind 4 "
              f"running): labq ls {ls_ms:.0f} ms ({lines} lines), ls --json {ls_json_ms:.0f} ms, "
              f"show {show_ms:.0f} ms, "
              f"history {hist_ms:.0f} ms (medians of 10; goal <= 150 ms each)")
        print(f"   scheduling pass {pass_ms:.1f} ms (mean of {c1 - c0:.0f}, labq_schedule_pass_seconds; "
              f"goal <= 150 ms); daemon RSS {rss:.1f} MiB (goal <= 100 MiB); submitting the ten arrays "
              f"{submit_s:.1f} s; writing the finished ones {fill_s:.1f} s")
    finally:
        cleanup(d, root)


def _submitter(path: str, cwd: str, n: int, out: Any) -> None:
    from job_queue.client import Client

    client = Client(path)
    t0 = time.monotonic()
    for _ in range(n):
        client.call("submit", command=["true"], cwd=cwd, gpus=0, hold=True)
    out.put(time.monotonic() - t0)
    client.close()


def bench_submits() -> None:
    import multiprocessing

    root = Path(tempfile.mkdtemp(prefix="labq-bench-submit-"))
    root.chmod(0o755)
    cwd = str(root / "work")
    d = Daemon(root, "max_pending_per_user = 0\n")
    try:
        d.start()
        ctx = multiprocessing.get_context("fork")
        results: Any = ctx.Queue()
        n_one = 2000
        _submitter(d.socket, cwd, 200, results)  # warm-up
        results.get()
        _submitter(d.socket, cwd, n_one, results)
        one_rate = n_one / results.get()
        n_each = 1000
        procs = [ctx.Process(target=_submitter, args=(d.socket, cwd, n_each, results)) for _ in range(8)]
        t0 = time.monotonic()
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        eight_rate = 8 * n_each / (time.monotonic() - t0)
        # Durability: kill -9 the moment after submits returned; every returned id must survive.
        from job_queue.client import Client

        returned: list[int] = []
        for _ in range(10):
            client = Client(d.socket)
            for _ in range(20):
                returned.extend(client.call("submit", command=["true"], cwd=cwd, gpus=0, hold=True)["ids"])
            d.kill9()
            client.close()
            d.start()
        known = {j["id"] for j in d.call("ls", array_tasks=True)["jobs"]}
        lost = [i for i in returned if i not in known]
        print(f"5. submits through the API (held jobs, one persistent connection each): one client "
              f"{one_rate:.0f}/s (goal >= 300/s), eight clients {eight_rate:.0f}/s (goal >= 1000/s)")
        print(f"   kill -9 right after 10 x 20 returned submits: {len(returned) - len(lost)} of "
              f"{len(returned)} "
              f"returned ids present after restart (goal: all)")
    finally:
        cleanup(d, root)


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
    only = sys.argv[1] if len(sys.argv) > 1 else "all"
    if only in ("-h", "--help"):
        print(__doc__)
        return 0
    if only not in ("all", "dispatch", "scale", "submits"):
        print(f"usage: bench_labq.py [dispatch|scale|submits] (not {only!r})", file=sys.stderr)
        return 2
    if only in ("scale", "submits"):
        (bench_scale if only == "scale" else bench_submits)()
        return 0
    root = Path(tempfile.mkdtemp(prefix="labq-bench-"))
    root.chmod(0o755)
    cwd = str(root / "work")
    d = Daemon(root)
    d.start()
    try:
        # ABBA order (labq, docker, docker, labq; 100 jobs each) so a drifting machine load
        # does not favour either side.
        half = N_JOBS // 2
        events = DockerEvents()
        f1, r1, jobs1 = bench_labq(d, cwd, half)
        docker_wall = bench_docker(half) + bench_docker(N_JOBS - half)
        f2, r2, jobs2 = bench_labq(d, cwd, N_JOBS - half)
        events.stop()
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
        labq_events = events.of("labq.instance", SqliteStore(str(root / "state" / "labq.db")).instance)
        loop_events = events.of(*LOOP_LABEL.split("=", 1))
        ev_gpu: list[float] = []
        ev_any: list[float] = []
        ahead = after_exit = 0
        for run in (jobs1, jobs2):  # each half on its own (the docker loop ran in between)
            ids = {j["container_id"] for j in run}
            slots = {j["container_id"]: j["assigned_gpus"][0] for j in run}
            ev_gpu += die_to_next_start(labq_events, slots)
            ev_any += die_to_next_start([e for e in labq_events if e[2] in ids])
            a, n = made_before_the_exit(labq_events, slots)
            ahead, after_exit = ahead + a, after_exit + n
        ev_loop = die_to_next_start(loop_events)
        ev_loop_slot = die_to_next_start(loop_events, events.label_of(SLOT_LABEL))
        def p(v: list[float]) -> str:
            return f"p50 {pct(v, 0.5) * 1000:.0f} ms, p99 {pct(v, 0.99) * 1000:.0f} ms ({len(v)})"

        print(f"   from Docker's event timestamps (die -> start): labq on the freed GPU {p(ev_gpu)} vs the "
              f"docker run loop in the same slot {p(ev_loop_slot)}: ratios p50 "
              f"{pct(ev_gpu, 0.5) / pct(ev_loop_slot, 0.5):.2f}, "
              f"p99 {pct(ev_gpu, 0.99) / pct(ev_loop_slot, 0.99):.2f} (goal < 1); "
              f"any next start: labq {p(ev_any)} vs the loop {p(ev_loop)}")
        print(f"   labq starts on a freed GPU whose container was made before that exit (prepared "
              f"ahead): {ahead} of {after_exit}")
        # One job at a time: the gap is the latency of one start, not the throughput of four.
        events = DockerEvents()
        seq_a = bench_labq_one_at_a_time(d, cwd, ONE_AT_A_TIME)
        bench_docker_one_at_a_time(ONE_AT_A_TIME)
        bench_docker_one_at_a_time(ONE_AT_A_TIME)
        seq_b = bench_labq_one_at_a_time(d, cwd, ONE_AT_A_TIME)
        events.stop()
        labq_events = events.of("labq.instance", SqliteStore(str(root / "state" / "labq.db")).instance)
        seq_gaps: list[float] = []
        for run_ids in (seq_a, seq_b):
            seq_gaps += die_to_next_start([e for e in labq_events if e[2] in run_ids])
        seq_ahead, seq_n = made_before_the_exit(labq_events, {c: "all" for c in seq_a | seq_b})
        loop1 = events.of(*LOOP1_LABEL.split("=", 1))
        loop1_gaps = die_to_next_start(loop1)
        print(f"   one job at a time (jobs on all 4 GPUs, sleep 0.3; ABBA), die -> next start: labq p50 "
              f"{pct(seq_gaps, 0.5) * 1000:.0f} ms, p99 {pct(seq_gaps, 0.99) * 1000:.0f} ms "
              f"({len(seq_gaps)}; {seq_ahead} of {seq_n} prepared ahead); docker run --rm loop p50 "
              f"{pct(loop1_gaps, 0.5) * 1000:.0f} ms, p99 {pct(loop1_gaps, 0.99) * 1000:.0f} ms "
              f"({len(loop1_gaps)}); ratios p50 {pct(seq_gaps, 0.5) / pct(loop1_gaps, 0.5):.2f}, "
              f"p99 {pct(seq_gaps, 0.99) / pct(loop1_gaps, 0.99):.2f} (goal < 1)")
        if only == "dispatch":
            return 0

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
    bench_scale()
    bench_submits()
    return 0


if __name__ == "__main__":
    sys.exit(main())
