"""The task methods of ``AgentInfra``, written once for both of its sides.

The in-process instance (``AgentInfra.start``) and the remote client
(``AgentInfra.connect``) differ only in the :class:`~dspy_infra.abc.Scheduler`
behind these methods: a local one, or one that speaks gRPC. Keeping the
methods here, once, is what keeps "the same API from another process" true
as the API grows.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Collection, Iterable, Mapping
from contextlib import aclosing
from itertools import repeat
from typing import Any, cast

from dspy_infra._names import given_names, one_or_many
from dspy_infra.abc import Scheduler
from dspy_infra.errors import InvalidTask, UnknownTask
from dspy_infra.events import check_since
from dspy_infra.scheduling.checks import encodable, id_type_error, refused
from dspy_infra.scheduling.tasks import (
    ClassStatus,
    Resources,
    TaskEvent,
    TaskHandle,
    TaskRequest,
    TaskStatus,
)

__all__ = ["TaskMethods"]


class TaskMethods:
    """Submit, follow and cancel tasks through ``self._tasks``."""

    @property
    def _tasks(self) -> Scheduler:
        """The scheduler, once open; raises InfraClosed otherwise."""
        raise NotImplementedError

    def _check_open(self) -> None:
        raise NotImplementedError

    async def submit_task(
        self,
        handler: str,
        payload: Any = None,
        *,
        task_class: str = "cpu_short",
        priority: int = 0,
        needs: Iterable[str] = (),
        task_id: str | None = None,
        workflow_id: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the task's timeout, not this call's
        resources: Resources | None = None,
    ) -> TaskHandle:
        """Store a task and queue it; return once it is durably stored.

        ``handler`` names an in-process function (:meth:`task`) or a
        ``[handlers.NAME]`` entry; ``task_class`` decides the runner, limit
        and resources; higher ``priority`` runs first (0 to
        ``max_priority``). ``needs`` names services (one, or a list) that must be healthy
        before it starts. Submitting again with the same ``task_id`` returns
        the task already stored. Raises :class:`~dspy_infra.errors.InvalidTask`,
        storing nothing, for bad input.
        """
        scheduler = self._tasks
        task_id = await scheduler.submit(
            TaskRequest(
                handler=handler,
                payload=payload,
                task_class=task_class,
                priority=priority,
                needs=_needs(needs),
                task_id=task_id,
                workflow_id=workflow_id,
                max_attempts=max_attempts,
                timeout=timeout,
                resources=resources,
            )
        )
        return TaskHandle(task_id, scheduler=scheduler)

    async def submit_tasks(
        self,
        handler: str,
        payloads: Iterable[Any],
        *,
        task_class: str = "cpu_short",
        priority: int = 0,
        needs: Iterable[str] = (),
        workflow_id: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the tasks' timeout, not this call's
        resources: Resources | None = None,
    ) -> list[TaskHandle]:
        """Submit one task per payload, all or none, in one commit; their handles in order.

        Much cheaper per task than calls to :meth:`submit_task` when a loop
        produces many tasks at once; follow them with
        :meth:`stream_task_results`.
        """
        if isinstance(payloads, str | bytes | bytearray | Mapping) or not isinstance(
            payloads, Iterable
        ):
            # One payload where a list of them is taken: iterated, a string or
            # a dict would have been a task per letter or per key.
            raise refused(
                None,
                "payloads must be a list (an iterable) of payloads, one per task, got "
                f"{type(payloads).__name__} {payloads!r:.100}: for one task, pass [payload]",
            )
        needs = _needs(needs)
        scheduler = self._tasks
        task_ids = await scheduler.submit_payloads(
            TaskRequest(
                handler=handler,
                task_class=task_class,
                priority=priority,
                needs=needs,
                workflow_id=workflow_id,
                max_attempts=max_attempts,
                timeout=timeout,
                resources=resources,
            ),
            payloads,
        )
        self._check_open()  # as each handle's look-up of the scheduler would
        # Positional, by map(): a third cheaper than a keyword each, for thousands.
        return list(map(TaskHandle, task_ids, repeat(scheduler)))

    async def get_task_status(self, task_id: str) -> TaskStatus:
        """The task's current status; :class:`~dspy_infra.errors.UnknownTask` if there is none."""
        return await self._tasks.status(_checked(task_id))

    async def cancel_task(self, task_id: str) -> TaskStatus:
        """Cancel a task that has not finished; return once it has stopped, with its status.

        A running attempt is cancelled where it is: at its next ``await`` for
        an in-process handler, by SIGTERM then SIGKILL for a process.
        """
        return await self._tasks.cancel(_checked(task_id))

    async def task_classes(self) -> dict[str, ClassStatus]:
        """Each task class's concurrency limit now (moving, for an adaptive
        class) and its load: running and queued tasks."""
        return await self._tasks.classes()

    def task_handle(self, task_id: str) -> TaskHandle:
        """A handle on a task submitted earlier (by this or a previous instance)."""
        return TaskHandle(_checked(task_id), scheduler=self._tasks)

    async def stream_task_results(
        self, task_ids: str | Collection[str] | None = None, *, since: int | None = None
    ) -> AsyncGenerator[TaskEvent, None]:
        """The final event of each task as it finishes (``r.result``, ``r.error``, ``r.seq``).

        With ``task_ids`` (one, or a list), those that already finished come
        first and the stream ends when all have
        (:class:`~dspy_infra.errors.InfraClosed` if the instance closes
        first); without, it follows every task. With ``since``, final events
        after that sequence number are replayed first.
        """
        if task_ids is not None:
            task_ids = [_checked(task_id) for task_id in given_names(task_ids)]
        check_since(since)
        async with aclosing(self._tasks.results(task_ids, since=since)) as results:
            async for event in results:
                yield event


def _needs(needs: Any) -> tuple[str, ...]:
    """One service name, or several. What is neither (None, a number) is kept
    as it is, for the checks to refuse with the task's id: ``tuple()`` of it
    raised a TypeError that named nothing."""
    needs = one_or_many(needs)
    try:
        return tuple(needs)
    except TypeError:
        return cast(tuple[str, ...], needs)


def _checked(task_id: Any) -> str:
    """``task_id``, if it is one; a handle given for it is refused, naming what to pass.

    One that UTF-8 cannot encode (an argument that is not UTF-8, as Python
    decodes it) names no task, since none is stored so: it is unknown, where
    the store and the wire raised a bare UnicodeEncodeError.
    """
    if type(task_id) is str and task_id.isascii():  # nearly every one: without the calls below
        return task_id
    if problem := id_type_error(task_id, "task_id"):
        raise InvalidTask(f"{task_id!r:.200}", problem)
    if not encodable(task_id):
        raise UnknownTask(task_id)
    return cast(str, task_id)
