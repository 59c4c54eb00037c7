"""The pure scheduler, driven with a fake clock: order, policy, dependencies, arrays, backfill, limits."""

from __future__ import annotations

import itertools
import math

from job_queue.models import Job, JobSpec, JobState, StopReason
from job_queue.scheduler import (
    R_ARRAY_LIMIT,
    R_DEP_NEVER,
    R_DEPENDENCY,
    R_HELD,
    R_PRIORITY,
    R_RESOURCES,
    R_USER_GPUS,
    Policy,
    schedule,
)

GPUS = ["g0", "g1", "g2", "g3"]
_ids = itertools.count(1)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def job(gpus: int = 1, user: str = "alice", *, state: JobState = JobState.PENDING, submit: float = 0.0,
        priority: int = 0, limit: int | None = None, start: float | None = None,
        assigned: list[str] | None = None, after: int | None = None, cpus: float | None = None,
        mem: int | None = None, array: tuple[int, int, int | None] | None = None) -> Job:
    spec = JobSpec(user=user, uid=1000, gid=1000, groups=[], home="/home/x", cwd="/home/x", image="img",
                   command=["true"], gpus=gpus, time_limit=limit, priority=priority, after=after, cpus=cpus,
                   mem=mem)
    if array is not None:
        spec.array_id, spec.array_index, spec.array_cap = array
    return Job(id=next(_ids), spec=spec, state=state, submit_time=submit, start_time=start,
               assigned_gpus=assigned or [])


def running(gpus: list[str], user: str = "alice", start: float = 900.0, limit: int | None = None) -> Job:
    return job(len(gpus), user, state=JobState.RUNNING, start=start, limit=limit, assigned=gpus)


def test_starts_in_priority_then_submit_order_and_assigns_distinct_gpus() -> None:
    clock = FakeClock()
    a = job(2, submit=1)
    b = job(2, submit=2, priority=5)
    c = job(2, submit=0.5)
    d = schedule([a, b, c], GPUS, Policy(), clock())
    assert [s[0] for s in d.starts] == [b.id, c.id]
    assert sorted(g for _, gs in d.starts for g in gs) == GPUS
    assert d.reasons[a.id] == R_RESOURCES
    assert d.head == a.id


def test_busy_gpus_are_not_given_again() -> None:
    r = running(["g0", "g2"])
    p = job(2)
    d = schedule([r, p], GPUS, Policy(), 1000)
    assert d.starts == [(p.id, ["g1", "g3"])]


def test_per_user_gpu_cap_waits_with_reason_and_does_not_block_others() -> None:
    r = running(["g0", "g1"], user="alice")
    a = job(1, "alice", submit=1)
    b = job(1, "bob", submit=2)
    d = schedule([r, a, b], GPUS, Policy(max_gpus_per_user=2), 1000)
    assert d.reasons[a.id] == R_USER_GPUS
    assert [s[0] for s in d.starts] == [b.id]


def test_cap_counts_jobs_started_in_the_same_pass() -> None:
    a1, a2 = job(2, "alice", submit=1), job(1, "alice", submit=2)
    d = schedule([a1, a2], GPUS, Policy(max_gpus_per_user=2), 1000)
    assert [s[0] for s in d.starts] == [a1.id]
    assert d.reasons[a2.id] == R_USER_GPUS


def test_held_and_dependencies() -> None:
    held = job(1, state=JobState.HELD)
    dep_ok = job(1, after=100)
    dep_wait = job(1, after=101)
    dep_bad = job(1, after=102)
    dep_gone = job(1, after=103)
    deps = {100: JobState.SUCCEEDED, 101: JobState.RUNNING, 102: JobState.FAILED}
    d = schedule([held, dep_ok, dep_wait, dep_bad, dep_gone], GPUS, Policy(), 1000, deps)
    assert d.reasons[held.id] == R_HELD
    assert [s[0] for s in d.starts] == [dep_ok.id]
    assert d.reasons[dep_wait.id] == R_DEPENDENCY
    assert sorted(d.cancels) == sorted([(dep_bad.id, R_DEP_NEVER), (dep_gone.id, R_DEP_NEVER)])


def test_array_concurrency_cap() -> None:
    tasks = [job(0, submit=i, array=(50, i, 2)) for i in range(5)]
    tasks[0].state = JobState.RUNNING
    d = schedule(tasks, GPUS, Policy(), 1000)
    assert [s[0] for s in d.starts] == [tasks[1].id]
    assert all(d.reasons[t.id] == R_ARRAY_LIMIT for t in tasks[2:])


def test_backfill_only_when_it_ends_before_the_head_could_start() -> None:
    clock = FakeClock(1000)
    r = running(["g0", "g1", "g2"], start=900, limit=300)  # ends at 1200
    head = job(4, submit=1)
    short = job(1, submit=2, limit=200)  # would end at 1200: allowed
    long = job(1, submit=3, limit=201)  # would end at 1201: would delay the head
    nolimit = job(1, submit=4)
    d = schedule([r, head, short, long, nolimit], GPUS, Policy(), clock())
    assert d.head == head.id and d.shadow_time == 1200
    assert [s[0] for s in d.starts] == [short.id]
    assert d.reasons[head.id] == R_RESOURCES
    assert d.reasons[long.id] == R_RESOURCES  # the backfilled job took the last free GPU
    clock.t = 1100
    d2 = schedule([r, head, long, nolimit], GPUS, Policy(), clock())
    assert d2.starts == []
    assert d2.reasons[long.id] == R_PRIORITY and d2.reasons[nolimit.id] == R_PRIORITY


def test_no_backfill_when_head_start_is_unknown() -> None:
    r = running(["g0", "g1", "g2"])  # no time limit: the head's start time is unknown
    head = job(4, submit=1)
    short = job(1, submit=2, limit=1)
    d = schedule([r, head, short], GPUS, Policy(), 1000)
    assert d.shadow_time == math.inf
    assert d.starts == []


def test_time_limits_and_next_deadline() -> None:
    clock = FakeClock(1000)
    late = running(["g0"], start=0, limit=999)
    soon = running(["g1"], start=900, limit=150)
    stopping = running(["g2"], start=0, limit=10)
    stopping.stop_reason = StopReason.TIME_LIMIT
    d = schedule([late, soon, stopping], GPUS, Policy(), clock())
    assert d.timeouts == [late.id]
    assert d.next_deadline == 1050
    clock.t = 1050
    assert schedule([soon], GPUS, Policy(), clock()).timeouts == [soon.id]


def test_cpu_and_memory_reservations() -> None:
    r = job(0, state=JobState.RUNNING, cpus=6, mem=10, start=0)
    big = job(0, cpus=4, submit=1)
    small = job(0, cpus=2, mem=6, submit=2, limit=10)
    d = schedule([r, big, small], GPUS, Policy(node_cpus=8, node_mem=16), 1000)
    assert d.starts == [] and d.reasons[big.id] == R_RESOURCES


def test_foreign_process_blocks_gpu_and_is_named_in_reason() -> None:
    p = job(4)
    q = job(3, submit=5)
    d = schedule([p], GPUS, Policy(), 1000, unavailable={"g1": "pid 42 of mallory, 300 MiB"})
    assert d.starts == []
    assert "pid 42 of mallory" in d.reasons[p.id] and "g1" in d.reasons[p.id]
    d2 = schedule([q], GPUS, Policy(), 1000, unavailable={"g1": "pid 42 of mallory"})
    assert d2.starts == [(q.id, ["g0", "g2", "g3"])]


def test_array_runs_get_the_same_decisions_as_the_same_jobs_one_by_one() -> None:
    """The scheduler looks at a run of waiting array tasks only until one waits without changing
    anything; the decisions must equal those for the same jobs submitted one by one."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    part = st.tuples(st.sampled_from(["single", "array", "running"]), st.integers(0, 3),
                     st.sampled_from([None, 50, 500]), st.integers(1, 4), st.booleans(),
                     st.sampled_from(["alice", "bob"]), st.integers(-1, 1))

    @settings(max_examples=150, deadline=None)
    @given(parts=st.lists(part, max_size=8), max_user=st.sampled_from([0, 2, 3]))
    def check(parts: list[tuple[str, int, int | None, int, bool, str, int]], max_user: int) -> None:
        as_arrays: list[Job] = []
        one_by_one: list[Job] = []
        free = list(GPUS)
        for n, (kind, gpus, limit, tasks, hold_one, user, prio) in enumerate(parts):
            if kind == "running":
                if free:
                    gs, free = free[:1], free[1:]
                    r = running(gs, user, limit=limit)
                    as_arrays.append(r)
                    one_by_one.append(r)
                continue
            first = next(_ids)
            for k in range(tasks if kind == "array" else 1):
                state = JobState.HELD if hold_one and k == 1 else JobState.PENDING
                a = job(gpus, user, state=state, submit=float(n), priority=prio, limit=limit,
                        array=(first, k, None) if kind == "array" else None)
                b = Job(id=a.id, spec=JobSpec(**{**_fields(a.spec), "array_id": None, "array_index": None}),
                        state=state, submit_time=a.submit_time)
                as_arrays.append(a)
                one_by_one.append(b)
        policy = Policy(max_gpus_per_user=max_user)
        x = schedule(as_arrays, GPUS, policy, 1000.0)
        y = schedule(one_by_one, GPUS, policy, 1000.0)
        assert (x.starts, x.reasons, x.cancels, x.head, x.changed) == (y.starts, y.reasons, y.cancels,
                                                                      y.head, y.changed)

    check()


def _fields(spec: JobSpec) -> dict[str, object]:
    import dataclasses

    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


def test_forecast_gives_each_expected_end_the_job_that_would_then_start_on_its_gpus() -> None:
    clock = FakeClock()
    later = running(["g0"], start=950.0)
    stopping = running(["g1"], start=990.0)
    stopping.stop_reason = StopReason.CANCEL  # being stopped: ends first
    limited = running(["g2"], start=980.0, limit=100)  # ends at 1080
    oldest = running(["g3"], start=800.0)
    a, b, c, e = job(submit=1), job(submit=2), job(submit=3), job(submit=4)
    held = job(submit=0.5, state=JobState.HELD)
    d = schedule([later, stopping, limited, oldest, held, a, b, c, e], GPUS, Policy(), clock(),
                 prepare_ahead=4)
    assert d.starts == []
    assert d.prepares == [(a.id, ["g1"]), (b.id, ["g2"]), (c.id, ["g3"]), (e.id, ["g0"])]
    d2 = schedule([later, stopping, limited, oldest, held, a, b, c, e], GPUS, Policy(), clock(),
                  prepare_ahead=2)
    assert d2.prepares == d.prepares[:2]
    assert schedule([later, a], GPUS, Policy(), clock()).prepares == []  # only when asked


def test_forecast_follows_the_schedulers_rules() -> None:
    clock = FakeClock()
    # Two GPUs free now but the head needs three: it is forecast on the first end, with the free
    # GPUs and the freed one in inventory order; a job now started is not forecast again.
    r = running(["g2"], start=900.0)
    r2 = running(["g3"], start=950.0)
    small = job(0, submit=0.5)
    big = job(3, submit=1)
    d = schedule([r, r2, small, big], GPUS, Policy(), clock(), prepare_ahead=4)
    assert d.starts == [(small.id, [])]
    assert d.prepares == [(big.id, ["g0", "g1", "g2"])]
    # The per-user GPU limit: bob's job cannot take alice's second GPU (he is at his limit), only
    # after his own first end, and then the lowest free GPU, the one alice's end left free.
    a1, a2 = running(["g0"], user="alice", start=900.0), running(["g1"], user="alice", start=950.0)
    b1, b2 = running(["g2"], user="bob", start=960.0), running(["g3"], user="bob", start=970.0)
    alice_next, bob_next = job(user="alice", submit=1), job(user="bob", submit=2)
    d = schedule([a1, a2, b1, b2, alice_next, bob_next], GPUS, Policy(max_gpus_per_user=2), clock(),
                 prepare_ahead=4)
    assert d.prepares == [(alice_next.id, ["g0"]), (bob_next.id, ["g1"])]
    # Array cap: the second task waits for its array's running task, not for the first end.
    arr_run = job(1, state=JobState.RUNNING, start=900.0, assigned=["g0"], array=(50, 0, 1))
    other = running(["g1"], start=800.0)
    t1 = job(1, submit=1, array=(50, 1, 1))
    t2 = job(1, submit=1, array=(50, 2, 1))
    d = schedule([arr_run, other, t1, t2], ["g0", "g1"], Policy(), clock(), prepare_ahead=2)
    assert d.prepares == [(t1.id, ["g0"])]  # `other` ends first but frees nothing t1 may use
