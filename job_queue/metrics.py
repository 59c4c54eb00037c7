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

    def notification(self, channel: str, outcome: str) -> None:
        self.notifications.labels(channel, outcome).inc()

    def job_started(self, job: Job, now: float) -> None:
        self.wait.observe(max(0.0, now - job.submit_time))

    def serve(self, port: int, address: str) -> None:
        from prometheus_client import start_http_server

        start_http_server(port, address, registry=self.registry)
