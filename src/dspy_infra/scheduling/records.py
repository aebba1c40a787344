"""The scheduler's own mutable view of a task, and its store row."""

from __future__ import annotations

import functools
import json
from typing import Any

import anyio

from dspy_infra.scheduling.store import Op, Row, Written, loads
from dspy_infra.scheduling.tasks import TaskState, TaskStatus

__all__ = ["Need", "TaskRecord"]

# What one attempt holds while it runs: (cpus, memory_mb, gpus).
Need = tuple[float, int, int]


@functools.lru_cache(maxsize=256)
def _json(value: tuple[Any, ...]) -> str:
    # A few distinct values (no needs, the class's resources) repeat for
    # every task: encode each once.
    return json.dumps(value)


class TaskRecord:
    """Mutable on purpose: the scheduler changes a task's state many times a
    second per task, and builds a frozen :class:`TaskStatus` only when asked."""

    __slots__ = (
        "attempts",
        "blocked_since",
        "cancel_requested",
        "committed",
        "deadline",
        "error",
        "finished_at",
        "gpus",
        "handler",
        "max_attempts",
        "need",
        "needs",
        "not_before",
        "payload",
        "priority",
        "result",
        "scope",
        "seq",
        "started_at",
        "state",
        "submitted_at",
        "submitted_mono",
        "task_class",
        "task_id",
        "timeout",
        "version",
        "waiters",
        "workflow_id",
    )

    def __init__(
        self,
        *,
        task_id: str,
        handler: str,
        task_class: str,
        priority: int,
        payload: str,
        needs: tuple[str, ...],
        workflow_id: str | None,
        max_attempts: int,
        timeout: float | None,
        need: Need,
        submitted_at: float,
        seq: int,
        submitted_mono: float | None = None,
    ):
        self.task_id = task_id
        self.handler = handler
        self.task_class = task_class
        self.priority = priority
        self.payload = payload  # JSON text: the submitted value, copied
        self.needs = needs
        self.workflow_id = workflow_id
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.need = need
        self.submitted_at = submitted_at
        # Monotonic, when submitted to this instance: the wait to the first
        # start is timed by it, which a wall clock stepped meanwhile (NTP, a
        # resumed VM) made an hour longer, or negative.
        self.submitted_mono = submitted_mono
        self.seq = seq
        self.state = TaskState.QUEUED
        self.attempts = 0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.not_before: float | None = None
        self.deadline: float | None = None  # monotonic: queue timeout
        self.blocked_since: float | None = None  # monotonic: first found not fitting, first in line
        self.result: str | None = None  # JSON text
        self.error: str | None = None
        self.gpus: tuple[str, ...] = ()
        self.version = 0  # bumped on each (re)queue: older heap entries are stale
        self.cancel_requested = False
        self.scope: anyio.CancelScope | None = None
        self.committed: Written | None = None  # the insert, until it is on disk
        self.waiters: anyio.Event | None = None

    def row(self) -> Row:
        return (
            self.task_id,
            self.handler,
            self.task_class,
            self.priority,
            self.payload,
            _json(self.needs),
            self.workflow_id,
            self.state.value,
            self.attempts,
            self.max_attempts,
            self.timeout,
            _json(self.need),
            self.submitted_at,
            self.started_at,
            self.finished_at,
            self.not_before,
            self.result,
            self.error,
        )

    @staticmethod
    def insert_all(records: list[TaskRecord]) -> Op:
        """The insert of new queued records of one shape (a submit by payload):
        what they share once, then each one's id, payload and submit time."""
        first = records[0]
        shape = (
            first.handler,
            first.task_class,
            first.priority,
            _json(first.needs),
            first.workflow_id,
            first.max_attempts,
            first.timeout,
            _json(first.need),
        )
        return ("insert_all", (shape, [(r.task_id, r.payload, r.submitted_at) for r in records]))

    @classmethod
    def from_row(cls, row: Row, seq: int) -> TaskRecord:
        (
            task_id,
            handler,
            task_class,
            priority,
            payload,
            needs,
            workflow_id,
            state,
            attempts,
            max_attempts,
            timeout,
            need,
            submitted_at,
            started_at,
            finished_at,
            not_before,
            result,
            error,
        ) = row
        cpus, memory_mb, gpus = json.loads(need)
        record = cls(
            task_id=task_id,
            handler=handler,
            task_class=task_class,
            priority=priority,
            payload=payload,
            needs=tuple(json.loads(needs)),
            workflow_id=workflow_id,
            max_attempts=max_attempts,
            timeout=timeout,
            need=(cpus, memory_mb, gpus),
            submitted_at=submitted_at,
            seq=seq,
        )
        record.state = TaskState(state)
        record.attempts = attempts
        record.started_at = started_at
        record.finished_at = finished_at
        record.not_before = not_before
        record.result = result
        record.error = error
        return record

    def status(self) -> TaskStatus:
        return TaskStatus(
            task_id=self.task_id,
            handler=self.handler,
            task_class=self.task_class,
            state=self.state,
            priority=self.priority,
            attempts=self.attempts,
            max_attempts=self.max_attempts,
            needs=self.needs,
            workflow_id=self.workflow_id,
            submitted_at=self.submitted_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            result=self.result_value(),
            error=self.error,
            gpus=self.gpus,
        )

    def result_value(self) -> Any:
        return loads(self.result) if self.result is not None else None
