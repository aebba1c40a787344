"""The task API in one file: submit, wait, stream, fail, retry, cancel, and survive a restart.

    .venv/bin/python examples/tasks.py

No services and no configuration file: a mapping configures a task class
and a handler for the process runner; the state (the task store) lives in a
temporary directory.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from dspy_infra import AgentInfra
from dspy_infra.abc import TaskRun
from dspy_infra.errors import TaskCancelled, TaskFailed

CONFIG: dict[str, Any] = {
    "classes": {
        # A class of our own: in-process, two at a time, a second attempt after a failure.
        "judge": {
            "runner": "inprocess",
            "max_concurrency": 2,
            "max_attempts": 2,
            "retry_backoff": {"initial": 0.05},
        },
    },
    "handlers": {
        # For the process runner (the default class cpu_long): the payload is a
        # JSON file, and the last line of stdout is the result. A brace in a
        # command would start a placeholder: this one has none.
        "wordcount": {
            "command": [
                sys.executable,
                "-c",
                "import json, sys; print(len(json.load(open(sys.argv[1]))['text'].split()))",
                "{payload_file}",
            ]
        },
    },
}


async def square(x: int) -> int:
    """Async handlers run on the event loop."""
    await anyio.sleep(0.01)
    return x * x


def judge(answer: str, run: TaskRun) -> dict[str, Any]:
    """Plain functions run in worker threads; a second parameter gets the attempt."""
    if answer == "flaky" and run.attempt == 1:
        raise TimeoutError("the judge model did not answer")
    if not answer:
        raise ValueError("nothing to judge")
    return {"answer": answer, "score": len(answer) % 5, "attempt": run.attempt}


async def nap(seconds: float) -> float:
    await anyio.sleep(seconds)
    return seconds


HANDLERS: dict[str, Callable[..., Any]] = {"square": square, "judge": judge, "nap": nap}


async def first_run(state_dir: Path) -> None:
    async with AgentInfra.start(CONFIG, state_dir=state_dir, handlers=HANDLERS) as infra:
        # One task: submit (it is in the store when this returns), then wait.
        handle = await infra.submit_task("square", 7)
        print("square(7) =", await handle.result())

        # Many at once, in one commit; results in the order they finish.
        handles = await infra.submit_tasks("square", range(5), priority=3)
        results = {}
        async for r in infra.stream_task_results([h.task_id for h in handles]):
            results[r.task_id] = r.result
        print("squares:", [results[h.task_id] for h in handles])

        # A retried attempt, then a failure for good.
        flaky = await infra.submit_task("judge", "flaky", task_class="judge")
        print("judge('flaky') =", await flaky.result())
        status = await flaky.status()
        print(f"  {status.state.value} after {status.attempts} attempts")
        empty = await infra.submit_task("judge", "", task_class="judge", max_attempts=1)
        try:
            await empty.result()
        except TaskFailed as exc:
            print(f"judge('') failed: {exc.error}")

        # The process runner: a command, in a process of its own.
        words = await infra.submit_task(
            "wordcount", {"text": "the quick brown fox"}, task_class="cpu_long"
        )
        print("wordcount =", await words.result())

        # Cancel a running task: it stops at its next await.
        long_nap = await infra.submit_task("nap", 60)
        print("nap(60):", (await long_nap.status()).state.value)
        print("cancel:", (await infra.cancel_task(long_nap.task_id)).state.value)
        try:
            await long_nap.result()
        except TaskCancelled as exc:
            print(f"  {exc}")

        # Tasks still queued or running when the block ends stay in the store.
        for i in range(3):
            await infra.submit_task("nap", 0.2, task_id=f"nightly-{i}", task_class="judge")
        print(
            "leaving with nightly-0..2 unfinished:",
            [(await infra.get_task_status(f"nightly-{i}")).state.value for i in range(3)],
        )


async def second_run(state_dir: Path) -> None:
    # The same state directory: the unfinished tasks are picked up again.
    async with AgentInfra.start(CONFIG, state_dir=state_dir, handlers=HANDLERS) as infra:
        again = await infra.submit_task("nap", 0.2, task_id="nightly-0", task_class="judge")
        print("submitting nightly-0 again returns the same task:", again.task_id)
        for i in range(3):
            status = await infra.task_handle(f"nightly-{i}").wait()
            # One attempt: the one interrupted by the end of the first run was given back.
            print(f"nightly-{i}: {status.state.value}, attempts {status.attempts}")


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="dspy-infra-tasks-") as state_dir:
        await first_run(Path(state_dir))
        await second_run(Path(state_dir))


if __name__ == "__main__":
    anyio.run(main)
