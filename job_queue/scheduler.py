"""Pure scheduling: given jobs, GPUs, policy and ``now`` (from an injected clock), decide what to do.

No I/O here: the daemon feeds in a snapshot and applies the returned decisions, so every rule
(priority order, per-user GPU cap, dependencies, array caps, EASY backfill, time limits) is
unit-testable without Docker.

With ``prepare_ahead`` the same pass also predicts which jobs start next and on which GPUs
(``Decisions.prepares``), so labqd can create their containers while those GPUs are still busy
(prepare.py). The prediction is this scheduler's own rules applied to a what-if: the running jobs
end one by one in the order they are expected to (being stopped first, then by time-limit end,
then the longest running), and after each end the first waiting job that would then start takes
the freed resources, with the GPUs ``schedule`` would give it (free GPUs in inventory order). It
is only a forecast: what starts is decided again by ``schedule`` when the GPUs are really free.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from .models import Job, JobState

Clock = Callable[[], float]

# Pending reasons, shown in `labq ls` (names follow squeue where one exists).
R_HELD = "Held"
R_DEPENDENCY = "Dependency"
R_DEP_NEVER = "DependencyNeverSatisfied"
R_USER_GPUS = "QOSMaxGpusPerUser"
R_ARRAY_LIMIT = "ArrayTaskLimit"
R_RESOURCES = "Resources"
R_PRIORITY = "Priority"
R_TOO_BIG = "TooBigForNode"


@dataclass(frozen=True)
class Policy:
    max_gpus_per_user: int = 0  # 0 = unlimited
    node_cpus: float = math.inf
    node_mem: float = math.inf


@dataclass
class Decisions:
    starts: list[tuple[int, list[str]]] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)
    cancels: list[tuple[int, str]] = field(default_factory=list)
    timeouts: list[int] = field(default_factory=list)
    next_deadline: float | None = None
    head: int | None = None
    shadow_time: float | None = None
    changed: dict[int, str] = field(default_factory=dict)
    """The entries of ``reasons`` that differ from the job's recorded reason (what must be written)."""
    prepares: list[tuple[int, list[str]]] = field(default_factory=list)
    """Predicted next starts (job id, GPUs), in expected order; only with ``prepare_ahead``."""


def queue_order(job: Job) -> tuple[int, float, int]:
    """Priority (higher first), then submit time, then id."""
    return (-job.spec.priority, job.submit_time, job.id)


def job_end(job: Job) -> float:
    if job.spec.time_limit is None or job.start_time is None:
        return math.inf
    return job.start_time + job.spec.time_limit


@dataclass
class _Free:
    gpus: list[str]
    cpus: float
    mem: float

    def fits(self, job: Job) -> bool:
        s = job.spec
        return (s.gpus <= len(self.gpus) and (s.cpus or 0.0) <= self.cpus + 1e-9
                and (s.mem or 0) <= self.mem)

    def take(self, job: Job) -> list[str]:
        s = job.spec
        got, self.gpus = self.gpus[:s.gpus], self.gpus[s.gpus:]
        self.cpus -= s.cpus or 0.0
        self.mem -= s.mem or 0
        return got


def _shadow_time(head: Job, free: _Free, running: Iterable[Job]) -> float:
    """Earliest time at which ``head`` fits, assuming running jobs end at their time limits."""
    gpus, cpus, mem = len(free.gpus), free.cpus, free.mem
    s = head.spec
    for job in sorted(running, key=job_end):
        end = job_end(job)
        if math.isinf(end):
            return math.inf
        gpus += len(job.assigned_gpus)
        cpus += job.spec.cpus or 0.0
        mem += job.spec.mem or 0
        if s.gpus <= gpus and (s.cpus or 0.0) <= cpus + 1e-9 and (s.mem or 0) <= mem:
            return end
    return math.inf


def schedule(
    jobs: Sequence[Job],
    all_gpus: Sequence[str],
    policy: Policy,
    now: float,
    dep_states: Mapping[int, JobState] | None = None,
    unavailable: Mapping[str, str] | None = None,
    prepare_ahead: int = 0,
) -> Decisions:
    """Decide which pending jobs start now, which wait (and why), which are cancelled or timed out.

    ``unavailable`` maps GPU ids busy with processes the queue did not start to a description.
    ``prepare_ahead``: predict up to that many next starts (``Decisions.prepares``).
    """
    deps = dict(dep_states or {})
    blocked = dict(unavailable or {})
    out = Decisions()
    active: list[Job] = []
    waiting: list[Job] = []
    for j in jobs:
        st = j.state
        if st is JobState.STARTING or st is JobState.RUNNING:
            active.append(j)
        elif st is JobState.PENDING or st is JobState.HELD:
            waiting.append(j)
    used = {g for j in active for g in j.assigned_gpus}
    free = _Free(
        gpus=[g for g in all_gpus if g not in used and g not in blocked],
        cpus=policy.node_cpus - sum(j.spec.cpus or 0.0 for j in active),
        mem=policy.node_mem - sum(j.spec.mem or 0 for j in active),
    )
    user_gpus: Counter[str] = Counter()
    array_running: Counter[int] = Counter()
    for j in active:
        user_gpus[j.user] += j.spec.gpus
        if j.spec.array_id is not None:
            array_running[j.spec.array_id] += 1
        end = job_end(j)
        if j.state == JobState.RUNNING and j.stop_reason is None and not math.isinf(end):
            if end <= now:
                out.timeouts.append(j.id)
            elif out.next_deadline is None or end < out.next_deadline:
                out.next_deadline = end
    running = list(active)
    shadow: float | None = None
    # queue_order with C-level keys (stable sorts, last key first): fast on 100,000 waiting jobs.
    waiting.sort(key=_ID)
    waiting.sort(key=_SUBMIT)
    waiting.sort(key=_PRIORITY, reverse=True)
    reasons, changed = out.reasons, out.changed
    # A run of tasks of one array (they differ in their index only, and are next to each other in
    # queue order): once one task waited without changing anything (no start, no new head job),
    # the rest of the run waits for the same reason and is not looked at again.
    run_array: int | None = None
    run_state: JobState | None = None
    run_reason = ""
    for job in waiting:
        s = job.spec
        if run_array is not None and s.array_id == run_array and job.state is run_state:
            reasons[job.id] = run_reason
            if job.reason != run_reason:
                changed[job.id] = run_reason
            continue
        run_array = None
        had_head = shadow is not None
        n_cancels, n_starts = len(out.cancels), len(out.starts)
        reason = _decide(job, out, free, running, user_gpus, array_running, deps, blocked, all_gpus,
                         policy, now, shadow)
        if out.head == job.id:
            shadow = out.shadow_time
        if reason is None:
            continue
        reasons[job.id] = reason
        if job.reason != reason:
            changed[job.id] = reason
        if (s.array_id is not None and had_head == (shadow is not None) and len(out.cancels) == n_cancels
                and len(out.starts) == n_starts):
            run_array, run_state, run_reason = s.array_id, job.state, reason
    if prepare_ahead > 0:
        done = {j for j, _ in out.starts} | {j for j, _ in out.cancels}
        out.prepares = _predict([j for j in waiting if j.id not in done], free, running, user_gpus,
                                array_running, deps, blocked, all_gpus, policy, now, prepare_ahead)
    return out


def _expected_end(job: Job, now: float) -> tuple[int, float, float, int]:
    """Order in which running jobs are expected to end: being stopped, then by time-limit end,
    then the longest running (similar jobs end in the order they started; by the time labqd
    decided the start, which stays put when Docker's start time is recorded)."""
    started = job.dispatch_time if job.dispatch_time is not None else job.start_time
    return (0 if job.stop_reason is not None else 1, job_end(job),
            started if started is not None else now, job.id)


def _predict(waiting: list[Job], free: _Free, running: list[Job], user_gpus: Counter[str],
             array_running: Counter[int], deps: Mapping[int, JobState], blocked: Mapping[str, str],
             all_gpus: Sequence[str], policy: Policy, now: float, limit: int) -> list[tuple[int, list[str]]]:
    """The what-if behind ``Decisions.prepares`` (see the module docstring); works on copies."""
    free = _Free(list(free.gpus), free.cpus, free.mem)
    user_gpus, array_running, running = Counter(user_gpus), Counter(array_running), list(running)
    order = {g: i for i, g in enumerate(all_gpus)}
    out: list[tuple[int, list[str]]] = []
    picked: set[int] = set()
    for ending in sorted(running, key=lambda j: _expected_end(j, now))[:limit]:
        running.remove(ending)
        free.gpus = sorted([*free.gpus, *(g for g in ending.assigned_gpus if g not in blocked)],
                           key=lambda g: order.get(g, len(order)))
        free.cpus += ending.spec.cpus or 0.0
        free.mem += ending.spec.mem or 0
        user_gpus[ending.user] -= ending.spec.gpus
        if ending.spec.array_id is not None:
            array_running[ending.spec.array_id] -= 1
        scratch = Decisions()
        skip: tuple[int, JobState] | None = None
        for job in waiting:
            if job.id in picked or (skip is not None and (job.spec.array_id, job.state) == skip):
                continue
            skip = None
            reason = _decide(job, scratch, free, running, user_gpus, array_running, deps, blocked,
                             all_gpus, policy, now, None)
            if scratch.starts:
                out.extend(scratch.starts)
                picked.add(job.id)
                break
            if scratch.head is not None:
                break  # the first job that would not fit even then: nothing passes it in a forecast
            if reason is not None and job.spec.array_id is not None:
                skip = (job.spec.array_id, job.state)  # its array's next tasks wait for the same reason
    return out


_ID = attrgetter("id")
_SUBMIT = attrgetter("submit_time")
_PRIORITY = attrgetter("spec.priority")


def _decide(job: Job, out: Decisions, free: _Free, running: list[Job], user_gpus: Counter[str],
            array_running: Counter[int], deps: Mapping[int, JobState], blocked: Mapping[str, str],
            all_gpus: Sequence[str], policy: Policy, now: float, shadow: float | None) -> str | None:
    """One waiting job: start it (None), cancel it (None, in ``out.cancels``) or say why it waits."""
    s = job.spec
    if job.state == JobState.HELD:
        return R_HELD
    if s.after is not None:
        dep = deps.get(s.after)
        if dep is None or (dep.final and dep != JobState.SUCCEEDED):
            out.cancels.append((job.id, R_DEP_NEVER))
            return None
        if dep != JobState.SUCCEEDED:
            return R_DEPENDENCY
    if s.gpus > len(all_gpus):
        return R_TOO_BIG
    if policy.max_gpus_per_user and s.gpus and user_gpus[s.user] + s.gpus > policy.max_gpus_per_user:
        return R_USER_GPUS
    if s.array_id is not None and s.array_cap is not None and array_running[s.array_id] >= s.array_cap:
        return R_ARRAY_LIMIT
    fits = free.fits(job)
    if shadow is None:
        if fits:
            _start(job, free, out, running, user_gpus, array_running, now)
            return None
        shadow = _shadow_time(job, free, running)
        out.head, out.shadow_time = job.id, shadow
        reason = R_RESOURCES
        if blocked and len(free.gpus) < s.gpus <= len(free.gpus) + len(blocked):
            busy = "; ".join(f"{g}: {d}" for g, d in sorted(blocked.items()))
            reason = f"{R_RESOURCES} (GPU busy outside labq: {busy})"
        return reason
    # Backfill: only a job whose time limit ends before the head job could start. When that
    # start is unknown (a running job has no time limit), nothing may pass the head job.
    if fits and s.time_limit is not None and not math.isinf(shadow) and now + s.time_limit <= shadow:
        _start(job, free, out, running, user_gpus, array_running, now)
        return None
    return R_PRIORITY if fits else R_RESOURCES


def _start(job: Job, free: _Free, out: Decisions, running: list[Job], user_gpus: Counter[str],
           array_running: Counter[int], now: float) -> None:
    gpus = free.take(job)
    out.starts.append((job.id, gpus))
    user_gpus[job.user] += job.spec.gpus
    if job.spec.array_id is not None:
        array_running[job.spec.array_id] += 1
    # Treat it as running from now on, for the head job's shadow time.
    clone = Job(id=job.id, spec=job.spec, state=JobState.STARTING, submit_time=job.submit_time,
                start_time=now, assigned_gpus=gpus)
    running.append(clone)
