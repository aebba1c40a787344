"""The exception tree.

Every error the library raises on purpose is an :class:`InfraError`, so callers
can catch the library's failures without catching their own bugs::

    InfraError
     ├── ConfigError            bad configuration: names the file, key path and expectation
     ├── BackendUnavailable     the chosen backend cannot be used (engine down, extra missing)
     ├── ServiceError           a problem with one named service
     │    ├── UnknownService    a name the configuration does not declare (``known``: those it does)
     │    └── ServiceStartError a service could not be brought up (exit code, log tail)
     │         └── DependencyFailed   ... because a service it depends on failed first
     ├── InfraClosed            an AgentInfra used outside its ``async with`` block
     ├── StateDirInUse          another live instance holds the state directory's task store
     ├── UnknownEventType       a subscription to event types that nothing publishes (a ValueError)
     └── TaskError              a problem with one task (``task_id``)
          ├── InvalidTask       bad submit input (class, handler, payload, priority); nothing stored
          ├── UnknownTask       a task id the store does not hold
          ├── TaskFailed        the task ended without a result (``state``, ``error``)
          │    ├── TaskTimedOut the queue or run timeout expired
          │    └── TaskLost     it was running when its instance died, with no attempt left
          └── TaskCancelled     it was cancelled

One warning category, a :class:`UserWarning`: :class:`ComposeWarning`, what a
compose file holds that has no counterpart here and was skipped.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

__all__ = [
    "BackendUnavailable",
    "ComposeWarning",
    "ConfigError",
    "DependencyFailed",
    "InfraClosed",
    "InfraError",
    "InvalidTask",
    "ServiceError",
    "ServiceStartError",
    "StateDirInUse",
    "TaskCancelled",
    "TaskError",
    "TaskFailed",
    "TaskLost",
    "TaskTimedOut",
    "UnknownEventType",
    "UnknownService",
    "UnknownTask",
]


class InfraError(Exception):
    """Base of every error raised on purpose by dspy-infra."""


class ConfigError(InfraError):
    """The configuration is invalid; the message names where and what was expected."""

    def __init__(self, message: str, *, source: str | None = None, path: str | None = None):
        self.source = source
        self.path = path
        where = ": ".join(part for part in (source, path) if part)
        super().__init__(f"{where}: {message}" if where else message)


class ComposeWarning(UserWarning):
    """A compose file holds keys with no counterpart here: they were skipped, and are named."""


class BackendUnavailable(InfraError):
    """The container backend cannot be used; the message says how to fix it."""


class InfraClosed(InfraError):
    """The AgentInfra instance is not open (never entered, or already closed)."""


class StateDirInUse(InfraError):
    """Another live instance holds this state directory's task store.

    Two would both run the tasks stored there: each instance needs a state
    directory of its own (``state_dir``), or ``durable = false``.
    """


class UnknownEventType(InfraError, ValueError):
    """A subscription named event types that no part of dspy-infra publishes.

    Refused rather than followed: a misspelt type would otherwise wait
    forever for events that never come. ``reason`` is the message without
    the parameter's name, for callers that name it their own way (the CLI's
    ``--type``).
    """

    def __init__(self, unknown: Collection[str] = (), known: Collection[str] = ()):
        self.unknown = tuple(sorted(unknown, key=str))  # what is no string too
        self.known = tuple(sorted(known))
        plural = "s" if len(self.unknown) > 1 else ""
        names = ", ".join(repr(name) for name in self.unknown)
        self.reason = f"unknown event type{plural} {names} (known: {', '.join(self.known)})"
        super().__init__(f"types: {self.reason}")


class ServiceError(InfraError):
    """A failure concerning one service."""

    def __init__(self, service: str, message: str):
        self.service = service
        super().__init__(message)


class UnknownService(ServiceError, KeyError):
    """A service name that the configuration does not declare; ``known`` holds those it does."""

    def __init__(self, service: str, known: Sequence[str]):
        self.known = tuple(sorted(known))
        names = ", ".join(self.known) or "none"
        super().__init__(service, f"unknown service {service!r} (configured: {names})")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class ServiceStartError(ServiceError):
    """A service could not be brought up, or died without a restart left.

    Carries what a person needs to see why: the exit code (if the process
    exited; the reason says it too) and the last lines it logged.
    """

    def __init__(
        self,
        service: str,
        reason: str,
        *,
        exit_code: int | None = None,
        log_tail: Sequence[str] = (),
    ):
        self.reason = reason
        self.exit_code = exit_code
        self.log_tail = tuple(log_tail)
        message = f"service {service!r} failed: {reason}"
        if self.log_tail:
            message += "\n  last log lines:\n" + "\n".join(f"    {line}" for line in self.log_tail)
        super().__init__(service, message)


class DependencyFailed(ServiceStartError):
    """A service could not start because one it depends on failed or went away."""

    def __init__(
        self,
        service: str,
        dependency: str,
        reason: str,
        *,
        exit_code: int | None = None,
        log_tail: Sequence[str] = (),
    ):
        self.dependency = dependency
        super().__init__(
            service, f"dependency {dependency!r} {reason}", exit_code=exit_code, log_tail=log_tail
        )


class TaskError(InfraError):
    """A failure concerning one task."""

    def __init__(self, task_id: str, message: str):
        self.task_id = task_id
        super().__init__(message)


class InvalidTask(TaskError, ValueError):
    """The submitted task is malformed; it was not stored."""


class UnknownTask(TaskError, KeyError):
    """A task id that this instance's store does not hold."""

    def __init__(self, task_id: str):
        super().__init__(task_id, f"unknown task {task_id!r}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class TaskFailed(TaskError):
    """The task ended without a result: ``state`` says how, ``error`` what it reported."""

    def __init__(self, task_id: str, state: str, error: str):
        self.state = state
        self.error = error
        super().__init__(task_id, f"task {task_id!r} {state}: {error}")


class TaskTimedOut(TaskFailed):
    """The task waited or ran longer than its timeout allows."""


class TaskLost(TaskFailed):
    """The task was running when its instance died, and had no attempt left."""


class TaskCancelled(TaskError):
    """The task was cancelled before it finished."""

    def __init__(self, task_id: str):
        super().__init__(task_id, f"task {task_id!r} was cancelled")
