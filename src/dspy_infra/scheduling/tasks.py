"""What a task is, as users see it: request, state, status, events, handle."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from attrs import field, frozen

from dspy_infra.errors import TaskCancelled, TaskFailed, TaskLost, TaskTimedOut
from dspy_infra.events import Event

if TYPE_CHECKING:
    from dspy_infra.abc import Scheduler

__all__ = [
    "ClassStatus",
    "Resources",
    "TaskEvent",
    "TaskHandle",
    "TaskRequest",
    "TaskState",
    "TaskStatus",
]


class TaskState(enum.StrEnum):
    QUEUED = "queued"
    WAITING_FOR_SERVICES = "waiting_for_services"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    LOST = "lost"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(
    {
        TaskState.SUCCEEDED,
        TaskState.FAILED,
        TaskState.CANCELLED,
        TaskState.TIMED_OUT,
        TaskState.LOST,
    }
)


@frozen(kw_only=True)
class Resources:
    """What one task holds while it runs; None takes its class's value."""

    cpus: float | None = None
    memory_mb: int | None = None
    gpus: int | None = None


@frozen(kw_only=True)
class TaskRequest:
    """A task as submitted. ``max_attempts`` and ``timeout`` override the class's."""

    handler: str
    payload: Any = None
    task_class: str = "cpu_short"
    priority: int = 0
    needs: tuple[str, ...] = ()
    task_id: str | None = None
    workflow_id: str | None = None
    max_attempts: int | None = None
    timeout: float | None = None
    resources: Resources | None = None


@frozen(kw_only=True)
class TaskStatus:
    """A snapshot of one task. Times are UNIX timestamps; ``attempts`` counts starts."""

    task_id: str
    handler: str
    task_class: str
    state: TaskState
    priority: int = 0
    attempts: int = 0
    max_attempts: int = 1
    needs: tuple[str, ...] = ()
    workflow_id: str | None = None
    submitted_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    result: Any = None
    error: str | None = None
    gpus: tuple[str, ...] = ()

    @property
    def finished(self) -> bool:
        return self.state.finished

    def outcome(self) -> Any:
        """The result, or the error of a task that finished without one."""
        if self.state is TaskState.SUCCEEDED:
            return self.result
        if self.state is TaskState.CANCELLED:
            raise TaskCancelled(self.task_id)
        if not self.finished:
            raise ValueError(f"task {self.task_id!r} is {self.state}, not finished")
        error_type = {TaskState.TIMED_OUT: TaskTimedOut, TaskState.LOST: TaskLost}.get(
            self.state, TaskFailed
        )
        raise error_type(self.task_id, self.state.value, self.error or "no error message")


_EVENT_TYPES = {
    TaskState.QUEUED: "task_queued",
    TaskState.WAITING_FOR_SERVICES: "task_waiting",
    TaskState.RUNNING: "task_started",
    TaskState.SUCCEEDED: "task_completed",
    TaskState.FAILED: "task_failed",
    TaskState.CANCELLED: "task_cancelled",
    TaskState.TIMED_OUT: "task_timed_out",
    TaskState.LOST: "task_lost",
}


@frozen(kw_only=True)
class TaskEvent(Event):
    """A task changed state. Final events carry the ``result`` or the ``error``."""

    TYPES: ClassVar[Mapping[TaskState, str]] = _EVENT_TYPES
    FINAL_TYPES: ClassVar[frozenset[str]] = frozenset(_EVENT_TYPES[s] for s in _FINISHED)
    RETRYING: ClassVar[str] = "task_retrying"

    task_id: str
    task_class: str
    handler: str
    state: TaskState
    attempt: int = 0
    workflow_id: str | None = None
    result: Any = None
    error: str | None = None

    def outcome(self) -> Any:
        """The result, or the error of a task that finished without one."""
        return TaskStatus(
            task_id=self.task_id,
            handler=self.handler,
            task_class=self.task_class,
            state=self.state,
            result=self.result,
            error=self.error,
        ).outcome()


@frozen(kw_only=True)
class ClassStatus:
    """One task class at a glance: its current limit and load."""

    name: str
    runner: str
    limit: int
    adaptive: bool
    running: int
    queued: int

    def to_json(self) -> dict[str, Any]:
        """As ``/health`` and ``dspy-infra status --json`` show it, under its name."""
        return {
            "runner": self.runner,
            "limit": self.limit,
            "adaptive": self.adaptive,
            "running": self.running,
            "queued": self.queued,
        }


@frozen
class TaskHandle:
    """A submitted task: wait for its result, look at it, cancel it."""

    task_id: str
    _scheduler: Scheduler = field(repr=False, alias="scheduler")

    async def result(self) -> Any:
        """Wait for the task to finish; its result, or raise why it has none.

        Raises :class:`~dspy_infra.errors.TaskFailed` (with ``TaskTimedOut``
        and ``TaskLost`` under it) or :class:`~dspy_infra.errors.TaskCancelled`.
        """
        return (await self._scheduler.wait(self.task_id)).outcome()

    async def wait(self) -> TaskStatus:
        """Wait for the task to finish, however it ends; its final status."""
        return await self._scheduler.wait(self.task_id)

    async def status(self) -> TaskStatus:
        return await self._scheduler.status(self.task_id)

    async def cancel(self) -> TaskStatus:
        return await self._scheduler.cancel(self.task_id)
