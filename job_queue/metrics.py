"""Prometheus metrics of labqd (contract in docs/monitoring.md), served on ``metrics_port``.

Gauges are computed from the store and the GPU view at scrape time; the wait-time histogram is
observed when a job starts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .models import Job, JobState

WAIT_BUCKETS = (60.0, 600.0, 3600.0, float("inf"))
PASS_BUCKETS = (0.001, 0.005, 0.02, 0.1, 0.5, 2.0, float("inf"))


def outcome(job: Job) -> str:
    """Exit class of a job that ended: succeeded, failed, oom, signal, timeout, cancelled."""
    if job.state == JobState.FAILED:
        if job.oom_killed:
            return "oom"
        if job.exit_code is not None and 128 < job.exit_code < 160:
            return "signal"
    return job.state.value


class QueueCollector(Collector):
    def __init__(self, jobs: Callable[[], list[Job]], gpus: Callable[[], list[dict[str, Any]]]) -> None:
        self._jobs = jobs
        self._gpus = gpus

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts: Counter[tuple[str, str]] = Counter()
        for job in self._jobs():
            if job.state == JobState.PENDING:
                counts[("pending", job.user)] += 1
            elif job.state.active:
                counts[("running", job.user)] += 1
        jobs = GaugeMetricFamily("labq_jobs", "Jobs in the queue by state and user.",
                                 labels=["state", "user"])
        for (state, user), n in sorted(counts.items()):
            jobs.add_metric([state, user], n)
        yield jobs
        report = self._gpus()
        by_state = Counter({"free": 0, "allocated": 0, "foreign": 0})
        allocated = GaugeMetricFamily("labq_gpu_allocated", "1 for each GPU a labq job holds.",
                                      labels=["gpu", "uuid", "user", "job"])
        for g in report:
            state = {"job": "allocated"}.get(g["state"], g["state"])
            by_state[state] += 1
            if g["state"] == "job":
                allocated.add_metric([str(g["index"]), g["id"], g["user"], str(g["job"])], 1)
        foreign = GaugeMetricFamily("labq_foreign_gpu_processes",
                                    "Processes outside labq using the node's GPUs (from NVML).")
        foreign.add_metric([], sum(len(g.get("foreign") or []) for g in report))
        yield foreign
        gpus = GaugeMetricFamily("labq_gpus", "GPUs by state (free, allocated, foreign).", labels=["state"])
        for state, n in by_state.items():
            gpus.add_metric([state], n)
        yield gpus
        yield allocated


class Metrics:
    def __init__(self, jobs: Callable[[], list[Job]], gpus: Callable[[], list[dict[str, Any]]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(QueueCollector(jobs, gpus))
        self.wait = Histogram("labq_job_wait_seconds", "Time from submission to start of a job.",
                              buckets=WAIT_BUCKETS, registry=self.registry)
        self.notifications = PromCounter(
            "labq_notifications", "Job notifications by channel and outcome (sent, error, dropped).",
            ["channel", "outcome"], registry=self.registry)

        self.finished = PromCounter("labq_jobs_finished", "Jobs whose container ended, by user and outcome "
                                    "(succeeded, failed, oom, signal, timeout, cancelled).",
                                    ["user", "outcome"], registry=self.registry)
        self.schedule_pass = Histogram("labq_schedule_pass_seconds", "Duration of one scheduler pass.",
                                       buckets=PASS_BUCKETS, registry=self.registry)

    def notification(self, channel: str, result: str) -> None:
        self.notifications.labels(channel, result).inc()

    def job_finished(self, job: Job) -> None:
        if job.state.final:
            self.finished.labels(job.user, outcome(job)).inc()

    def job_started(self, job: Job, now: float) -> None:
        self.wait.observe(max(0.0, now - job.submit_time))

    def serve(self, port: int, address: str) -> None:
        from prometheus_client import start_http_server

        start_http_server(port, address, registry=self.registry)
