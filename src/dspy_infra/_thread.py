"""One thread of its own for small blocking calls of one component."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

__all__ = ["CallThread"]

T = TypeVar("T")

_Request = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


class CallThread:
    """Runs blocking calls (a few small file writes) in one thread, in order.

    The process runner makes three such calls per attempt; through
    ``anyio.to_thread`` each cost the event loop about twice the CPU
    (capacity limiter, cancel scope, worker pool), which on a short command
    is a few percent of the runner's throughput. As with
    ``anyio.to_thread``, a call once made is waited for even by a caller
    that is cancelled meanwhile (the cancellation follows). The thread
    starts with the first call; :meth:`close` ends it.
    """

    def __init__(self, name: str):
        self._name = name
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._serve, args=(loop,), name=self._name, daemon=True
            )
            self._thread.start()
        future: asyncio.Future[T] = loop.create_future()
        self._requests.put((function, args, future))
        with anyio.CancelScope(shield=True):
            result = await future
        return result  # noqa: RET504 - mypy: a scope's exit may swallow what it raises

    def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        while (request := self._requests.get()) is not None:
            function, args, future = request
            try:
                result = function(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                loop.call_soon_threadsafe(_settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

    async def close(self) -> None:
        """Let the calls made so far finish, then end the thread."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._requests.put(None)
            await anyio.to_thread.run_sync(thread.join)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
