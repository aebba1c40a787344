"""Prometheus metrics: the only module that imports prometheus_client.

Each instance owns its registry, so that two instances in one process (or a
test's instances) never share counters. Values that the scheduler already
knows at any moment (queue depths, limits, GPUs in use) are read when
scraped, not updated per task; per-task counters and histograms use label
children bound once per class, which keeps them off the hot path's profile.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

__all__ = ["ClassMetrics", "Metrics"]

PREFIX = "dspy_infra_"
# Seconds: from sub-millisecond in-process tasks to hour-long training runs.
_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800, 3600, 14400)


class ClassMetrics:
    """The per-task metrics of one task class, with their labels bound."""

    __slots__ = ("duration", "finished", "submitted", "wait")

    def __init__(self, metrics: Metrics, task_class: str):
        self.submitted = metrics.tasks_submitted.labels(task_class)
        self.wait = metrics.task_wait.labels(task_class)
        self.duration = metrics.task_duration.labels(task_class)
        self.finished = {
            status: metrics.tasks_finished.labels(task_class, status)
            for status in ("succeeded", "failed", "cancelled", "timed_out", "lost")
        }


class Metrics:
    """The registry of one AgentInfra and the metrics in it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tasks_submitted = Counter(
            f"{PREFIX}tasks_submitted", "Tasks stored", ["task_class"], registry=r
        )
        self.tasks_finished = Counter(
            f"{PREFIX}tasks_finished",
            "Tasks that reached a final state",
            ["task_class", "status"],
            registry=r,
        )
        self.task_wait = Histogram(
            f"{PREFIX}task_wait_seconds",
            "Time from submit to the first start",
            ["task_class"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.task_duration = Histogram(
            f"{PREFIX}task_duration_seconds",
            "Run time of one attempt",
            ["task_class"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.task_queue_depth = Gauge(
            f"{PREFIX}task_queue_depth", "Tasks queued, by class", ["task_class"], registry=r
        )
        self.class_concurrency_limit = Gauge(
            f"{PREFIX}class_concurrency_limit",
            "Current concurrency limit of a task class",
            ["task_class"],
            registry=r,
        )
        self.gpus_total = Gauge(f"{PREFIX}gpus_total", "GPUs the scheduler may lease", registry=r)
        self.gpus_in_use = Gauge(f"{PREFIX}gpus_in_use", "GPUs leased to running tasks", registry=r)
        self.events_dropped = Counter(
            f"{PREFIX}events_dropped", "Events a slow subscriber did not receive", registry=r
        )
        self._classes: dict[str, ClassMetrics] = {}

    def task_class(self, name: str) -> ClassMetrics:
        found = self._classes.get(name)
        if found is None:
            found = self._classes[name] = ClassMetrics(self, name)
        return found

    @staticmethod
    def read(gauge: Gauge, function: Callable[[], float], *labels: str) -> None:
        """Have ``gauge`` (with ``labels``) report ``function()`` whenever it is scraped."""
        target: MetricWrapperBase = gauge.labels(*labels) if labels else gauge
        assert isinstance(target, Gauge)
        target.set_function(function)

    def values(self) -> dict[str, float]:
        """Every sample, by name with its labels: ``name{label="value"}``."""
        found: dict[str, float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return found

    def exposition(self) -> bytes:
        """The Prometheus text format, as served at /metrics."""
        return generate_latest(self.registry)
