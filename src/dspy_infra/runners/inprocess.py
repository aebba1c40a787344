"""Handlers that are functions of this program, registered with ``@infra.task("name")``.

Async handlers run on the event loop, inside the scheduler's cancel scope, so
cancellation and timeouts reach them at their next ``await``. Sync handlers
run in a bounded pool of worker threads so that they never block the loop;
a thread cannot be interrupted, so a cancelled sync handler is waited for
until it returns (use an async handler, or the process runner, for work
that must stop at once).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import anyio
import anyio.to_thread

from dspy_infra.abc import RunFailed, RunnerContext, TaskRun

__all__ = ["InProcessRunner", "Runner"]


def _wants_run(handler: Callable[..., Any]) -> bool:
    """Whether the handler takes the :class:`TaskRun` as a second argument."""
    try:
        parameters = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters)


def _is_async(handler: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - an async __call__ counts too
    )


class InProcessRunner:
    def __init__(self) -> None:
        self._handlers: Mapping[str, Callable[..., Any]] = {}
        self._threads = anyio.CapacityLimiter(1)
        # How each handler is called, found once per handler: inspect is slow,
        # and kept by this runner only, so handlers are not held for ever.
        # Keyed by name, not by the handler: a callable object need not be
        # hashable (a dataclass or attrs instance with a ``__call__`` is not),
        # and one that is not failed every attempt. The handler is kept to
        # tell a name registered again.
        self._shapes: dict[str, tuple[Callable[..., Any], bool, bool]] = {}

    @property
    def name(self) -> str:
        return "inprocess"

    async def open(self, context: RunnerContext) -> list[str]:
        self._handlers = context.handlers
        self._threads = anyio.CapacityLimiter(context.config.infra.worker_threads)
        return []

    def validate(self, handler: str) -> str | None:
        if handler in self._handlers:
            return None
        known = ", ".join(sorted(self._handlers)) or "none"
        return (
            f"no in-process handler {handler!r} is registered "
            f'(use @infra.task("{handler}"); registered: {known})'
        )

    def run(self, run: TaskRun) -> Coroutine[Any, Any, Any]:
        # Not async itself: an async handler's own coroutine is what the
        # scheduler awaits, one frame less for each of thousands of attempts.
        try:
            handler = self._handlers[run.handler]
        except KeyError:
            # A task recovered from the store whose handler this program no
            # longer registers.
            raise RunFailed(self.validate(run.handler) or run.handler) from None
        shape = self._shapes.get(run.handler)
        if shape is None or shape[0] is not handler:
            shape = (handler, _wants_run(handler), _is_async(handler))
            self._shapes[run.handler] = shape
        _, wants_run, is_async = shape
        args = (run.payload, run) if wants_run else (run.payload,)
        if is_async:
            coroutine: Coroutine[Any, Any, Any] = handler(*args)
            return coroutine
        return self._in_thread(handler, args)

    async def _in_thread(self, handler: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        value = await anyio.to_thread.run_sync(handler, *args, limiter=self._threads)
        if inspect.isawaitable(value):
            # A plain function in front of an async one (a lambda, a decorator
            # without functools.wraps): the work is in what it returned.
            return await value
        return value

    async def close(self) -> None:
        pass


Runner = InProcessRunner
