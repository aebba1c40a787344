"""Prometheus metrics: the only module that imports prometheus_client.

Each instance owns its registry, so that two instances in one process (or a
test's instances) never share counters. Values that the scheduler already
knows at any moment (queue depths, limits, GPUs in use) are read when
scraped, not updated per task. The per-task counters and histograms are plain
numbers per class (an increment, or a bucket found by bisection: a fraction
of what a ``prometheus_client`` child costs with its lock), turned into
metric families by a collector of this registry when it is scraped.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import anyio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.metrics import MetricWrapperBase

__all__ = ["CONTENT_TYPE", "ClassMetrics", "Metrics"]

PREFIX = "dspy_infra_"
# What /metrics answers with: the Prometheus text format (prometheus_client's latest).
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds: from sub-millisecond in-process tasks to hour-long training runs.
_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 1800, 3600, 14400)
# Seconds: a probe or a backend call takes from a fraction of a millisecond
# (a TCP connect on loopback) to its timeout (a slow image pull).
_CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


_STATUSES = ("succeeded", "failed", "cancelled", "timed_out", "lost")


class Count:
    """A counter without labels of its own: ``value`` may also be added to directly."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class Observations:
    """A histogram's buckets (not cumulative; the last one is +Inf) and sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, amount: float) -> None:
        # As prometheus_client: the first bucket whose bound is >= amount.
        self.counts[bisect_left(_BUCKETS, amount)] += 1
        self.total += amount


class ClassMetrics:
    """The per-task metrics of one task class."""

    __slots__ = ("created", "duration", "finished", "submitted", "wait")

    def __init__(self) -> None:
        self.created = time.time()
        self.submitted = Count()
        self.wait = Observations()
        self.duration = Observations()
        self.finished = {status: Count() for status in _STATUSES}


class _TaskCollector:
    """Reports every class's per-task metrics when the registry is scraped."""

    def __init__(self, classes: dict[str, ClassMetrics]):
        self._classes = classes

    def describe(self) -> list[Metric]:
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        return self._families(dict(self._classes))

    @staticmethod
    def _families(classes: dict[str, ClassMetrics]) -> Iterator[Metric]:
        submitted = CounterMetricFamily(
            f"{PREFIX}tasks_submitted", "Tasks stored", labels=["task_class"]
        )
        finished = CounterMetricFamily(
            f"{PREFIX}tasks_finished",
            "Tasks that reached a final state",
            labels=["task_class", "status"],
        )
        wait = HistogramMetricFamily(
            f"{PREFIX}task_wait_seconds",
            "Time from submit to the first start",
            labels=["task_class"],
        )
        duration = HistogramMetricFamily(
            f"{PREFIX}task_duration_seconds", "Run time of one attempt", labels=["task_class"]
        )
        for name, m in classes.items():
            submitted.add_metric([name], float(m.submitted.value), created=m.created)
            for status, finished_count in m.finished.items():
                finished.add_metric([name, status], float(finished_count.value), created=m.created)
            for family, observed in ((wait, m.wait), (duration, m.duration)):
                cumulative, buckets = 0, []
                for bound, count in zip(_BOUNDS, observed.counts, strict=True):
                    cumulative += count
                    buckets.append((bound, float(cumulative)))
                family.add_metric([name], buckets, observed.total)
                family.add_sample(f"{family.name}_created", {"task_class": name}, m.created)
        yield from (submitted, finished, wait, duration)


class _LoopLag:
    """The event-loop lag gauge, with a sample only once measured: a 0 while
    the measurement is off (or before its first one) would read as no lag.
    Declared all the same (``# TYPE``), so that it can be found."""

    def __init__(self) -> None:
        self.seconds: float | None = None

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        yield self._family(self.seconds)

    @staticmethod
    def _family(seconds: float | None = None) -> Metric:
        return GaugeMetricFamily(
            f"{PREFIX}event_loop_lag_seconds",
            "How late the event loop woke a periodic timer, last measured",
            value=seconds,
        )


# As prometheus_client writes them (its floatToGoString, for these values).
_BOUNDS = (*(repr(float(b)) for b in _BUCKETS), "+Inf")


class Metrics:
    """The registry of one AgentInfra and the metrics in it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._classes: dict[str, ClassMetrics] = {}
        # tasks_submitted, tasks_finished, task_wait_seconds, task_duration_seconds
        r.register(_TaskCollector(self._classes))
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
        # Services: updated by the service manager and supervisors as they go.
        self.service_starts = Counter(
            f"{PREFIX}service_starts",
            "Launches of a service, by outcome (succeeded: it became ready; failed: it did not)",
            ["service", "status"],
            registry=r,
        )
        self.service_stops = Counter(
            f"{PREFIX}service_stops",
            "Services that ended, by how (stopped on request, completed, failed)",
            ["service", "status"],
            registry=r,
        )
        self.service_start_failures = Counter(
            f"{PREFIX}service_start_failures",
            "Launches that did not become ready, by reason "
            "(launch, exited, unhealthy, dependency, internal)",
            ["service", "reason"],
            registry=r,
        )
        self.active_services = Gauge(
            f"{PREFIX}active_services", "Services up (running or healthy)", registry=r
        )
        self.health_check_duration = Histogram(
            f"{PREFIX}health_check_duration_seconds",
            "Time one health probe took, by service and verdict (healthy, unhealthy)",
            ["service", "status"],
            buckets=_CALL_BUCKETS,
            registry=r,
        )
        self.backend_api_duration = Histogram(
            f"{PREFIX}backend_api_duration_seconds",
            "Time a call to the container backend took (open, launch, stop, close), by outcome",
            ["backend", "operation", "status"],
            buckets=_CALL_BUCKETS,
            registry=r,
        )
        self.workflow_runs = Counter(
            f"{PREFIX}workflow_runs",
            "Workflow runs that reached a final state (succeeded, failed, cancelled)",
            ["status"],
            registry=r,
        )
        self.workflow_runs_active = Gauge(
            f"{PREFIX}workflow_runs_active", "Workflow runs not finished yet", registry=r
        )
        self._loop_lag = _LoopLag()
        r.register(self._loop_lag)

    def task_class(self, name: str) -> ClassMetrics:
        found = self._classes.get(name)
        if found is None:
            found = self._classes[name] = ClassMetrics()
        return found

    @staticmethod
    def read(gauge: Gauge, function: Callable[[], float], *labels: str) -> None:
        """Have ``gauge`` (with ``labels``) report ``function()`` whenever it is scraped."""
        target: MetricWrapperBase = gauge.labels(*labels) if labels else gauge
        assert isinstance(target, Gauge)
        target.set_function(function)

    async def watch_loop_lag(self, interval: float) -> None:
        """Measure, every ``interval`` seconds, how late the loop wakes a timer; forever."""
        while True:
            expected = anyio.current_time() + interval
            await anyio.sleep(interval)
            self._loop_lag.seconds = max(0.0, anyio.current_time() - expected)

    @contextmanager
    def backend_call(self, backend: str, operation: str) -> Iterator[None]:
        """Time the ``with`` body as a call to the container backend."""
        started = time.perf_counter()
        status = "cancelled"  # left by a cancellation (a stop, the instance closing)
        try:
            yield
        except Exception:
            status = "error"
            raise
        else:
            status = "ok"
        finally:
            elapsed = time.perf_counter() - started
            self.backend_api_duration.labels(backend, operation, status).observe(elapsed)

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
