"""Which queued task runs next: per-class priority queues and the machine's resources.

Pure data structures, no I/O and no clock of their own, so that their rules
are tested directly (tests/unit/test_queues.py) and by the stateful test of
the whole scheduler.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence

from dspy_infra.scheduling.records import Need, TaskRecord
from dspy_infra.scheduling.tasks import TaskState

__all__ = ["BACKFILL_DEPTH", "ClassQueue", "ResourcePool", "rank"]

# How far past a head that does not fit the queue is searched for one that
# does: deep enough to fill a machine, shallow enough to keep a pop O(1)-ish.
BACKFILL_DEPTH = 64


def rank(priority: int, submitted_at: float, aging: float) -> float:
    """Lower runs first. With aging, each ``aging`` seconds of waiting is worth one
    priority level: ``priority + waited/aging`` compared at any one moment
    orders tasks as ``submitted_at/aging - priority`` does, which does not
    change with time, so a plain heap keeps the order right."""
    if aging <= 0:
        return -float(priority)
    return submitted_at / aging - priority


class ClassQueue:
    """The queued tasks of one class: best rank first, FIFO among equals."""

    __slots__ = ("_aging", "_heap", "_size")

    def __init__(self, aging: float):
        self._aging = aging
        self._heap: list[tuple[float, int, int, TaskRecord]] = []
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, record: TaskRecord) -> None:
        record.version += 1
        rank_ = rank(record.priority, record.submitted_at, self._aging)
        heapq.heappush(self._heap, (rank_, record.seq, record.version, record))
        self._size += 1

    def discard(self, record: TaskRecord) -> None:
        """Forget a queued record (cancelled, timed out); its heap entry goes stale."""
        record.version += 1
        self._size -= 1

    def pop(
        self,
        fits: Callable[[TaskRecord], bool],
        blocked: Callable[[TaskRecord], None] | None = None,
    ) -> TaskRecord | None:
        """The best task that ``fits``, searching at most BACKFILL_DEPTH past one that does not.

        ``blocked(head)`` is told when the first task does not fit, before
        any behind it is looked at.
        """
        skipped: list[tuple[float, int, int, TaskRecord]] = []
        found: TaskRecord | None = None
        heap = self._heap
        while heap and len(skipped) < BACKFILL_DEPTH:
            entry = heapq.heappop(heap)
            record = entry[3]
            if entry[2] != record.version or record.state is not TaskState.QUEUED:
                continue  # stale
            if fits(record):
                found = record
                break
            if blocked is not None and not skipped:
                blocked(record)
            skipped.append(entry)
        for entry in skipped:
            heapq.heappush(heap, entry)
        if found is not None:
            found.version += 1
            self._size -= 1
        return found


_NOTHING: Need = (0.0, 0, 0)


class ResourcePool:
    """The machine's CPUs, memory and GPU devices, as tasks hold them.

    One task at a time may hold a reservation (:meth:`reserve`): what it
    needs is kept out of reach of every other task, so that what they free
    accumulates until it fits. Without it, backfill could pass a large task
    over for ever.
    """

    __slots__ = (
        "cpus",
        "free_gpus",
        "gpus",
        "has_gpus",
        "held_by_services",
        "memory_mb",
        "reserved",
        "used_cpus",
        "used_memory_mb",
    )

    def __init__(
        self, *, cpus: float, memory_mb: int, gpus: Sequence[str], held_by_services: int = 0
    ):
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.gpus = tuple(gpus)
        self.free_gpus = list(gpus)
        self.held_by_services = held_by_services  # GPUs set apart for services, not in gpus
        # Whether the machine has GPUs, the tasks' or the services': read at
        # every attempt, and neither changes.
        self.has_gpus = bool(self.gpus) or held_by_services > 0
        self.used_cpus = 0.0
        self.used_memory_mb = 0
        self.reserved = _NOTHING

    def capacity_error(self, need: Need) -> str | None:
        """Why a task needing ``need`` could never run here, or None."""
        cpus, memory_mb, gpus = need
        if cpus > self.cpus:
            return f"needs {cpus:g} CPUs; this machine has {self.cpus:g}"
        if memory_mb > self.memory_mb:
            return f"needs {memory_mb} MB of memory; this machine has {self.memory_mb}"
        if gpus > len(self.gpus):
            if self.held_by_services:
                left = len(self.gpus)
                return (
                    f"needs {gpus} GPUs; {left} {'is' if left == 1 else 'are'} left to "
                    f"tasks (services hold {self.held_by_services})"
                )
            return f"needs {gpus} GPUs; this machine has {len(self.gpus)}"
        return None

    def fits(self, need: Need, *, reserved: bool = False) -> bool:
        """Whether ``need`` is free, besides the reservation (unless it is ``reserved``'s own)."""
        cpus, memory_mb, gpus = need
        if not reserved and self.reserved is not _NOTHING:
            # What it takes must leave the reservation whole; what it does
            # not take at all, it cannot take from the reservation.
            if cpus:
                cpus += self.reserved[0]
            if memory_mb:
                memory_mb += self.reserved[1]
            if gpus:
                gpus += self.reserved[2]
        # A small tolerance: 0.1 + 0.2 CPUs must fit in 0.3.
        return (
            self.used_cpus + cpus <= self.cpus + 1e-9
            and self.used_memory_mb + memory_mb <= self.memory_mb
            and gpus <= len(self.free_gpus)
        )

    def reserve(self, need: Need) -> None:
        self.reserved = need

    def unreserve(self) -> None:
        self.reserved = _NOTHING

    def acquire(self, need: Need) -> tuple[str, ...]:
        """Take ``need`` (it must fit); the GPU devices leased."""
        cpus, memory_mb, gpus = need
        self.used_cpus += cpus
        self.used_memory_mb += memory_mb
        if not gpus:
            return ()
        leased = tuple(self.free_gpus[:gpus])
        del self.free_gpus[:gpus]
        return leased

    def release(self, need: Need, gpus: tuple[str, ...]) -> None:
        cpus, memory_mb, _ = need
        if cpus:
            self.used_cpus = max(0.0, self.used_cpus - cpus)
            if math.isclose(self.used_cpus, 0.0, abs_tol=1e-9):
                self.used_cpus = 0.0
        self.used_memory_mb -= memory_mb
        if gpus:
            # Returned in device order, so that leases stay predictable.
            self.free_gpus = sorted([*self.free_gpus, *gpus], key=self.gpus.index)
