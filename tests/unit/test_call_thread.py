"""CallThread: blocking calls in one thread of their own, in order, awaited even when cancelled."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from dspy_infra._thread import CallThread

pytestmark = pytest.mark.anyio


async def test_calls_run_in_one_thread_in_order_and_give_their_results() -> None:
    calls = CallThread("test-calls")
    names: list[str] = []

    def note(i: int) -> int:
        names.append(threading.current_thread().name)
        return i * 2

    async with anyio.create_task_group() as tg:
        results: dict[int, int] = {}

        async def one(i: int) -> None:
            results[i] = await calls.run(note, i)

        for i in range(20):
            tg.start_soon(one, i)
    assert results == {i: i * 2 for i in range(20)}
    assert set(names) == {"test-calls"}
    await calls.close()
    assert "test-calls" not in {t.name for t in threading.enumerate()}


async def test_an_exception_reaches_the_caller() -> None:
    calls = CallThread("test-calls")

    def fail() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        await calls.run(fail)
    assert await calls.run(lambda: "still serving") == "still serving"
    await calls.close()


async def test_a_cancelled_caller_waits_for_its_call_then_is_cancelled() -> None:
    calls = CallThread("test-calls")
    done: list[bool] = []

    def slow() -> None:
        time.sleep(0.2)
        done.append(True)

    with anyio.move_on_after(0.05) as scope:
        await calls.run(slow)
        await anyio.sleep(1)  # the cancellation comes at the next checkpoint
    assert scope.cancelled_caught
    assert done == [True]
    await calls.close()
