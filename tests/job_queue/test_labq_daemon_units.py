"""The daemon's start, exit and crash-recovery logic against an in-memory fake container backend."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from job_queue.config import parse_config
from job_queue.daemon import Daemon
from job_queue.gpus import FakeInventory, ForeignProcess, GpuInfo
from job_queue.models import Job, JobSpec, JobState, StopReason
from job_queue.runtime import ContainerEvent, ContainerInfo, RuntimeError_
from job_queue.store import SqliteStore


def info(cid: str, job_id: int | None, status: str, code: int | None, oom: bool,
         finished: float | None, config: str | None = None) -> ContainerInfo:
    return ContainerInfo(id=cid, job_id=job_id, status=status, instance="inst", exit_code=code,
                         oom_killed=oom, started_at=10.0, finished_at=finished, config=config)


class FakeRuntime:
    def __init__(self) -> None:
        self.containers: dict[str, ContainerInfo] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail_create: str | None = None
        self.raise_create: BaseException | None = None
        self._ids = itertools.count(1)

    def image_exists(self, image: str) -> bool:
        return True

    def inspect(self, container: str) -> ContainerInfo | None:
        return self.containers.get(container)

    def list_jobs(self) -> list[ContainerInfo]:
        return list(self.containers.values())

    def add(self, job_id: int | None, status: str, exit_code: int = 0, oom: bool = False,
            config: str | None = None) -> str:
        cid = f"c{next(self._ids):063d}"
        self.containers[cid] = info(cid, job_id, status, exit_code, oom, 20.0, config)
        return cid

    @staticmethod
    def config(job: Job) -> str:
        """What labq.config stands for here: the GPUs the container was made for."""
        return ",".join(job.assigned_gpus) or "-"

    def of_job(self, job_id: int) -> ContainerInfo | None:
        """The job's container (Docker allows one per name, and a job has one name)."""
        return next((c for c in list(self.containers.values()) if c.job_id == job_id), None)

    def create_and_start(self, job: Job) -> str:
        self.calls.append(("create", str(job.id)))
        if self.fail_create:
            raise RuntimeError_(self.fail_create)
        if self.raise_create is not None:
            raise self.raise_create
        existing = self.of_job(job.id)
        if existing is not None and existing.status == "created" and self.matches(job, existing):
            self.start_created(existing.id)
            return existing.id
        if existing is not None and existing.status == "created":
            self.discard(existing.id)
        elif existing is not None:
            return existing.id  # started once already: adopted
        return self.add(job.id, "running", config=self.config(job))

    def prepare(self, job: Job) -> str | None:
        self.calls.append(("prepare", f"{job.id}:{self.config(job)}"))
        if self.of_job(job.id) is not None:
            return None
        return self.add(job.id, "created", config=self.config(job))

    def start_prepared(self, job: Job, cid: str) -> str:
        if cid not in self.containers:
            return self.create_and_start(job)
        self.start_created(cid)
        return cid

    def matches(self, job: Job, info: ContainerInfo) -> bool:
        return info.config is None or info.config == self.config(job)

    def discard(self, cid: str) -> None:
        self.calls.append(("discard", cid))
        if cid in self.containers and self.containers[cid].status == "created":
            del self.containers[cid]

    def start_created(self, cid: str) -> None:
        self.calls.append(("start", cid))
        old = self.containers[cid]
        self.containers[cid] = info(cid, old.job_id, "running", None, False, None, old.config)

    def stop(self, cid: str, grace: float) -> None:
        self.calls.append(("stop", cid))

    def remove(self, cid: str) -> None:
        self.calls.append(("remove", cid))
        self.containers.pop(cid, None)

    def write_logs(self, cid: str, path: str, uid: int, gid: int, follow: bool) -> None:
        self.calls.append(("logs-follow" if follow else "logs", cid))
        Path(path).write_text(f"output of {cid[-3:]}\n")

    def events(self) -> Iterator[tuple[str, int]]:
        return iter(())


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[Daemon, SqliteStore, FakeRuntime]]:
    cfg = parse_config({"gpus": ["g0", "g1"], "state_dir": str(tmp_path), "log_dir": str(tmp_path),
                        "node_cpus": 4, "node_mem_bytes": 2**34})
    store = SqliteStore(str(tmp_path / "q.db"))
    rt = FakeRuntime()
    d = Daemon(cfg, store, rt, FakeInventory(["g0", "g1"]), clock=lambda: 100.0, parallel_starts=0)
    yield d, store, rt
    d.settle()


def spec(gpus: int = 1) -> JobSpec:
    return JobSpec(user="alice", uid=1000, gid=1000, groups=[1000], home="/home/alice", cwd="/home/alice",
                   image="img", command=["true"], gpus=gpus)


def test_schedule_pass_starts_each_job_once(env: tuple[Daemon, SqliteStore, FakeRuntime]) -> None:
    d, store, rt = env
    ids = store.add_jobs([spec(), spec(), spec()], now=1.0)
    d.schedule_pass()
    d.schedule_pass()
    assert [c for c in rt.calls if c[0] == "create"] == [("create", "1"), ("create", "2")]
    j1, j3 = store.get(ids[0]), store.get(ids[2])
    assert j1 is not None and j1.state == JobState.RUNNING and j1.start_count == 1 and j1.container_id
    assert j3 is not None and j3.state == JobState.PENDING and j3.reason == "Resources"


def test_failed_create_fails_the_job(env: tuple[Daemon, SqliteStore, FakeRuntime]) -> None:
    d, store, rt = env
    (job_id,) = store.add_jobs([spec()], now=1.0)
    rt.fail_create = "image 'img' not found on this node"
    d.schedule_pass()
    job = store.get(job_id)
    assert job is not None and job.state == JobState.FAILED and "not found" in job.reason


def test_docker_error_other_than_unreachable_fails_the_job_after_bounded_tries(
        env: tuple[Daemon, SqliteStore, FakeRuntime]) -> None:
    import errno

    from job_queue.exits import MAX_START_ATTEMPTS

    d, store, rt = env
    (job_id,) = store.add_jobs([spec()], now=1.0)
    (other,) = store.add_jobs([spec()], now=2.0)
    rt.raise_create = OSError(errno.EMFILE, "Too many open files")
    d.schedule_pass()  # try 1 for both (each holds a GPU while it is retried)
    assert {store.get(i).state for i in (job_id, other)} == {JobState.STARTING}  # type: ignore[union-attr]
    for _ in range(MAX_START_ATTEMPTS - 1):
        d.reconcile()  # what the retry timer sends
    job = store.get(job_id)
    assert job is not None and job.state == JobState.FAILED and job.end_time == 100.0
    assert job.reason == f"docker: [Errno 24] Too many open files (after {MAX_START_ATTEMPTS} tries)"
    assert rt.calls.count(("create", str(job_id))) == MAX_START_ATTEMPTS
    rt.raise_create = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")  # dockerd away
    (third,) = store.add_jobs([spec()], now=3.0)
    d.schedule_pass()
    for _ in range(MAX_START_ATTEMPTS + 2):
        d.reconcile()
    assert store.get(third).state == JobState.STARTING  # type: ignore[union-attr]  # resumed, never failed
    rt.raise_create = None
    d.reconcile()
    assert store.get(third).state == JobState.RUNNING  # type: ignore[union-attr]


def test_reconcile_resumes_or_adopts_and_records_exits(env: tuple[Daemon, SqliteStore, FakeRuntime]) -> None:
    d, store, rt = env
    ids = store.add_jobs([spec(0) for _ in range(6)], now=1.0)
    for i in ids:
        assert store.mark_starting(i, [], 50.0)
    # 1: recorded as starting, container never created (crash right after the record)
    # 2: container created but not started
    c2 = rt.add(ids[1], "created")
    # 3: container running
    c3 = rt.add(ids[2], "running")
    # 4: running in the store, exited with code 3 while labqd was down
    c4 = rt.add(ids[3], "exited", exit_code=3)
    store.update(ids[3], state=JobState.RUNNING, container_id=c4)
    # 5: running in the store, container gone
    store.update(ids[4], state=JobState.RUNNING, container_id="gone")
    # 6: OOM-killed while labqd was down
    c6 = rt.add(ids[5], "exited", exit_code=137, oom=True)
    store.update(ids[5], state=JobState.RUNNING, container_id=c6)
    stranger = rt.add(999, "running")
    d.reconcile()
    d.settle()
    creates = [c for c in rt.calls if c[0] == "create"]
    assert creates == [("create", str(ids[0]))]
    assert ("start", c2) in rt.calls and ("start", c3) not in rt.calls
    states = {i: store.get(i) for i in ids}
    assert all(j is not None for j in states.values())
    assert states[ids[0]].state == JobState.RUNNING  # type: ignore[union-attr]
    assert states[ids[1]].container_id == c2 and states[ids[1]].state == JobState.RUNNING  # type: ignore[union-attr]
    assert states[ids[2]].container_id == c3 and states[ids[2]].state == JobState.RUNNING  # type: ignore[union-attr]
    j4 = states[ids[3]]
    assert j4 is not None and j4.state == JobState.FAILED and j4.exit_code == 3 and j4.end_time == 20.0
    assert ("logs", c4) in rt.calls and ("remove", c4) in rt.calls
    j5 = states[ids[4]]
    assert j5 is not None and j5.state == JobState.FAILED and "disappeared" in j5.reason
    j6 = states[ids[5]]
    assert j6 is not None and j6.oom_killed and j6.reason == "OOM killed"
    assert stranger in rt.containers and ("remove", stranger) not in rt.calls  # not ours: left alone


@pytest.mark.parametrize(("stop", "code", "state", "reason"), [
    (StopReason.CANCEL, 143, JobState.CANCELLED, "cancelled by bob"),
    (StopReason.TIME_LIMIT, 137, JobState.TIMEOUT, "TimeLimit"),
    (None, 0, JobState.SUCCEEDED, ""),
    (None, 139, JobState.FAILED, "killed by signal 11 (exit code 139)"),
])
def test_exit_is_mapped_to_a_final_state(env: tuple[Daemon, SqliteStore, FakeRuntime],
                                         stop: StopReason | None, code: int, state: JobState,
                                         reason: str) -> None:
    d, store, rt = env
    (job_id,) = store.add_jobs([spec()], now=1.0)
    d.schedule_pass()
    job = store.get(job_id)
    assert job is not None and job.container_id is not None
    if stop is not None:
        store.update(job_id, stop_reason=stop, reason="cancelled by bob")
    old = rt.containers[job.container_id]
    rt.containers[job.container_id] = info(old.id, job_id, "exited", code, False, 30.0)
    d.on_exit(job.container_id, job_id)
    d.on_exit(job.container_id, job_id)  # a second notice (event + log stream end) changes nothing
    d.settle()
    done = store.get(job_id)
    assert done is not None and done.state == state and done.reason == reason and done.exit_code == code
    assert [c for c in rt.calls if c[0] == "remove"] == [("remove", job.container_id)]


def test_exit_from_a_die_event_needs_no_inspect_and_is_enriched_later(
        env: tuple[Daemon, SqliteStore, FakeRuntime]) -> None:
    d, store, rt = env
    (job_id,) = store.add_jobs([spec()], now=1.0)
    d.schedule_pass()
    job = store.get(job_id)
    assert job is not None and job.container_id is not None
    cid = job.container_id
    # Docker: exited with 137 after an "oom" event; inspect would say OOMKilled.
    rt.containers[cid] = info(cid, job_id, "exited", 137, True, 42.0)
    calls: list[str] = []
    real_inspect = rt.inspect

    def counting_inspect(container: str) -> ContainerInfo | None:
        calls.append(container)
        return real_inspect(container)

    rt.inspect = counting_inspect  # type: ignore[method-assign]
    gate = threading.Event()
    for _ in range(4):  # hold every worker, so only on_exit itself can call Docker below
        d.reaper._workers.submit(gate.wait, 10)
    d.on_exit(cid, job_id, event=ContainerEvent("die", cid, job_id, 137, 41.5))
    recorded = store.get(job_id)
    assert recorded is not None and recorded.state == JobState.FAILED and recorded.exit_code == 137
    assert recorded.end_time == 41.5 and recorded.reason == "killed by signal 9 (exit code 137)"
    assert calls == []  # the GPU was freed without asking Docker
    gate.set()
    d.settle()
    assert calls == [cid]  # then inspected once, in a worker, before removal
    enriched = store.get(job_id)
    assert enriched is not None and enriched.oom_killed and enriched.reason == "OOM killed"
    assert enriched.start_time == 10.0 and enriched.end_time == 42.0
    assert ("remove", cid) in rt.calls


def test_job_cancelled_while_starting_is_not_created_after_a_crash(
        env: tuple[Daemon, SqliteStore, FakeRuntime]) -> None:
    d, store, rt = env
    (job_id,) = store.add_jobs([spec()], now=1.0)
    assert store.mark_starting(job_id, ["g0"], 2.0)
    store.update(job_id, stop_reason=StopReason.CANCEL, reason="cancelled by alice")
    d.reconcile()
    job = store.get(job_id)
    assert job is not None and job.state == JobState.CANCELLED and job.reason == "cancelled by alice"
    assert not [c for c in rt.calls if c[0] == "create"]


class ForeignInventory:
    """An NVML-like inventory (not fake): GPU g1 is used by a process outside labq."""

    fake = False

    def __init__(self) -> None:
        self.seen_own: list[list[str]] = []

    def snapshot(self, own_containers: object) -> list[GpuInfo]:
        self.seen_own.append(list(own_containers))  # type: ignore[call-overload]
        return [GpuInfo(id="g0", index=0), GpuInfo(id="g1", index=1, foreign=(
            ForeignProcess(pid=4242, user="mallory", memory_bytes=3 << 30),))]


def test_gpu_with_a_foreign_process_is_reported_and_not_given_out(tmp_path: Path) -> None:
    cfg = parse_config({"gpus": "nvml", "state_dir": str(tmp_path), "log_dir": str(tmp_path)})
    store = SqliteStore(str(tmp_path / "q.db"))
    rt = FakeRuntime()
    inv = ForeignInventory()
    d = Daemon(cfg, store, rt, inv, clock=lambda: 100.0, parallel_starts=0)
    one, two = store.add_jobs([spec(1), spec(1)], now=1.0)
    d.schedule_pass()
    first, second = store.get(one), store.get(two)
    assert first is not None and first.assigned_gpus == ["g0"] and first.state == JobState.RUNNING
    assert second is not None and second.state == JobState.PENDING
    assert second.reason == "Resources (GPU busy outside labq: g1: pid 4242 of mallory, 3072 MiB)"
    report = {g["id"]: g for g in d.gpu_report()}
    assert report["g0"]["state"] == "job" and report["g0"]["job"] == one
    assert report["g1"]["state"] == "foreign"
    assert report["g1"]["foreign"] == [{"pid": 4242, "user": "mallory", "memory_bytes": 3 << 30}]
    d.schedule_pass()
    assert inv.seen_own[-1] == [first.container_id]  # processes in our containers are not foreign
    d.settle()


Env = tuple[Daemon, SqliteStore, FakeRuntime]


def exit_job(d: Daemon, store: SqliteStore, rt: FakeRuntime, job_id: int) -> None:
    """The job's container exits (Docker die event), then the pass that follows it."""
    job = store.get(job_id)
    assert job is not None and job.container_id is not None
    cid = job.container_id
    rt.containers[cid] = info(cid, job_id, "exited", 0, False, 30.0, rt.containers[cid].config)
    d.on_exit(cid, job_id, event=ContainerEvent("die", cid, job_id, 0, 30.0))
    d.schedule_pass()


def prepared_for(rt: FakeRuntime, job_id: int) -> ContainerInfo:
    c = rt.of_job(job_id)
    assert c is not None and c.status == "created"
    return c


def assert_started_with_their_gpus(store: SqliteStore, rt: FakeRuntime) -> None:
    for job in store.unfinished_jobs():
        c = rt.of_job(job.id)
        if job.state == JobState.RUNNING:
            assert c is not None and c.id == job.container_id and c.status == "running"
            assert c.config == ",".join(job.assigned_gpus)
        else:
            assert c is None or c.status == "created"


def test_next_job_is_prepared_and_only_started_when_the_gpu_frees(env: Env) -> None:
    d, store, rt = env
    one, _two, three = store.add_jobs([spec(), spec(), spec()], now=1.0)
    d.schedule_pass()
    made = prepared_for(rt, three)  # while g0 and g1 are busy: forecast on g0 (job one ends first)
    assert made.config == "g0" and ("prepare", f"{three}:g0") in rt.calls
    d.schedule_pass()
    assert rt.calls.count(("prepare", f"{three}:g0")) == 1  # kept, not made again
    exit_job(d, store, rt, one)
    job = store.get(three)
    assert job is not None and job.state == JobState.RUNNING and job.assigned_gpus == ["g0"]
    assert job.container_id == made.id and job.start_count == 1
    assert ("start", made.id) in rt.calls and ("create", str(three)) not in rt.calls
    assert_started_with_their_gpus(store, rt)


def test_prepared_container_for_other_gpus_is_removed_not_started(env: Env) -> None:
    d, store, rt = env
    _one, two, three = store.add_jobs([spec(), spec(), spec()], now=1.0)
    d.schedule_pass()
    made = prepared_for(rt, three)
    assert made.config == "g0"
    exit_job(d, store, rt, two)  # g1 frees first: the scheduler gives job three g1
    job = store.get(three)
    assert job is not None and job.state == JobState.RUNNING and job.assigned_gpus == ["g1"]
    assert made.id not in rt.containers and ("start", made.id) not in rt.calls
    assert ("discard", made.id) in rt.calls and rt.calls.count(("create", str(three))) == 1
    assert_started_with_their_gpus(store, rt)


def test_prepared_container_removed_when_its_job_is_cancelled_or_held(env: Env) -> None:
    d, store, rt = env
    ids = store.add_jobs([spec() for _ in range(5)], now=1.0)
    d.schedule_pass()
    third, fourth, fifth = ids[2:]
    first_made = prepared_for(rt, third)
    assert (first_made.config, prepared_for(rt, fourth).config) == ("g0", "g1")
    assert rt.of_job(fifth) is None  # one per expected end (two GPUs)
    assert store.transition(third, [JobState.PENDING], state=JobState.CANCELLED, end_time=100.0)
    d.schedule_pass()
    assert rt.of_job(third) is None and ("discard", first_made.id) in rt.calls
    assert (prepared_for(rt, fourth).config, prepared_for(rt, fifth).config) == ("g0", "g1")
    assert store.transition(fourth, [JobState.PENDING], state=JobState.HELD)
    d.schedule_pass()
    assert rt.of_job(fourth) is None and prepared_for(rt, fifth).config == "g0"
    exit_job(d, store, rt, ids[1])  # g1 frees first: the fifth job gets it, made again for g1
    job = store.get(fifth)
    assert job is not None and job.state == JobState.RUNNING and job.assigned_gpus == ["g1"]
    assert store.get(third).state == JobState.CANCELLED  # type: ignore[union-attr]
    assert store.get(fourth).state == JobState.HELD  # type: ignore[union-attr]
    assert rt.of_job(third) is None and rt.of_job(fourth) is None
    assert not [c for c in rt.calls if c[0] == "start" and c[1] == first_made.id]
    assert_started_with_their_gpus(store, rt)


def restarted(d: Daemon, store: SqliteStore, rt: FakeRuntime) -> Daemon:
    """A new labqd on the same store and Docker (the old one was killed: nothing of it is used)."""
    d.settle()
    return Daemon(d.cfg, store, rt, FakeInventory(["g0", "g1"]), clock=lambda: 100.0, parallel_starts=0)


def test_restart_removes_prepared_containers_and_runs_nothing_twice(env: Env) -> None:
    d, store, rt = env
    one, two, three = store.add_jobs([spec(), spec(), spec()], now=1.0)
    d.schedule_pass()
    made = prepared_for(rt, three)
    d2 = restarted(d, store, rt)
    d2.reconcile()
    assert made.id not in rt.containers  # prepared, never started: removed
    assert store.get(three).state == JobState.PENDING  # type: ignore[union-attr]
    assert {store.get(i).state for i in (one, two)} == {JobState.RUNNING}  # type: ignore[union-attr]
    d2.schedule_pass()
    again = prepared_for(rt, three)
    assert again.id != made.id and again.config == "g0"
    exit_job(d2, store, rt, one)
    job = store.get(three)
    assert job is not None and job.state == JobState.RUNNING and job.container_id == again.id
    assert job.start_count == 1 and ("create", str(three)) not in rt.calls
    assert_started_with_their_gpus(store, rt)
    d2.settle()


@pytest.mark.parametrize(("freed", "adopted"), [(0, True), (1, False)])
def test_restart_between_recorded_start_and_docker_start_of_a_prepared_container(
        env: Env, freed: int, adopted: bool) -> None:
    d, store, rt = env
    ids = store.add_jobs([spec(), spec(), spec()], now=1.0)
    d.schedule_pass()
    made = prepared_for(rt, ids[2])  # for g0
    # Job `freed` ended and labqd recorded job three as starting on its GPU, then died.
    ended = store.get(ids[freed])
    assert ended is not None and ended.container_id is not None
    del rt.containers[ended.container_id]
    store.update(ids[freed], state=JobState.SUCCEEDED, end_time=50.0)
    assert store.mark_starting(ids[2], ended.assigned_gpus, 60.0)
    d2 = restarted(d, store, rt)
    d2.reconcile()
    job = store.get(ids[2])
    assert job is not None and job.state == JobState.RUNNING and job.start_count == 1
    assert job.assigned_gpus == ended.assigned_gpus
    if adopted:  # made for the recorded GPUs: started, not made again
        assert job.container_id == made.id and ("create", str(ids[2])) not in rt.calls
    else:  # made for g0 but recorded on g1: removed, never started, made again for g1
        assert made.id not in rt.containers and ("start", made.id) not in rt.calls
        assert rt.calls.count(("create", str(ids[2]))) == 1
    assert_started_with_their_gpus(store, rt)
    d2.settle()


def test_a_start_waits_for_the_removal_of_its_jobs_prepared_container() -> None:
    from job_queue.prepare import Preparer

    rt = FakeRuntime()
    gate, removing = threading.Event(), threading.Event()
    real_discard = rt.discard

    def slow_discard(cid: str) -> None:
        removing.set()
        gate.wait(10)
        real_discard(cid)

    rt.discard = slow_discard  # type: ignore[method-assign]
    p = Preparer(rt)
    job = Job(id=7, spec=spec(), state=JobState.PENDING, submit_time=1.0)
    p.plan([(7, ["g0"])], {7: job})
    made = rt.of_job(7) if p._entries[7].container.result(10) else None
    assert made is not None and made.config == "g0"
    p.plan([], {})  # no longer forecast: removal under way
    assert removing.wait(10)
    entry = p.take(7)  # and then the scheduler starts it after all
    assert entry is not None
    claimed: list[str | None] = []
    worker = threading.Thread(target=lambda: claimed.append(p.claim(entry, ["g0"])))
    worker.start()
    worker.join(0.2)
    assert worker.is_alive() and made.id in rt.containers  # waits: the container is half removed
    gate.set()
    worker.join(10)
    assert claimed == [None] and made.id not in rt.containers  # gone: the start creates it anew
    p.settle()


def test_a_start_never_waits_for_a_create_held_back_by_starts() -> None:
    from job_queue.prepare import Preparer

    rt = FakeRuntime()
    starts_done = threading.Event()  # the start in flight: the prepare waits for it
    waiting = threading.Event()

    def wait_for_starts() -> None:
        waiting.set()
        starts_done.wait(10)

    p = Preparer(rt, wait_for_starts=wait_for_starts)
    job = Job(id=7, spec=spec(), state=JobState.PENDING, submit_time=1.0)
    p.plan([(7, ["g0"])], {7: job})
    assert waiting.wait(10)
    entry = p.take(7)  # the job starts now, on the GPUs it was forecast on
    assert entry is not None
    assert p.claim(entry, ["g0"]) is None  # at once: the start creates the container itself
    starts_done.set()
    assert entry.container.result(10) is None
    p.settle()
    assert rt.of_job(7) is None and not [c for c in rt.calls if c[0] == "prepare"]  # skipped, none left
