"""The behaviour every Runner must show, as a pytest test class.

The suite drives the runner through the public :class:`~dspy_infra.AgentInfra`
API, so what it checks is what users get on that runner: results, failures
with their message, timeouts and cancellation that really stop the work, and
retries. Subclass :class:`RunnerConformance` and provide two fixtures::

    class TestProcessRunner(RunnerConformance):
        @pytest.fixture
        def runner_name(self) -> str:
            return "process"

        @pytest.fixture
        def handlers(self, tmp_path: Path) -> RunnerHandlers:
            return python_scenario_handlers(tmp_path / "handlers")

The suite needs four handlers, named after the scenarios they play:

- ``echo``: returns its payload.
- ``fail``: fails with an error whose text contains ``payload["message"]``.
- ``sleep``: writes the current time (``time.time()``) to the file
  ``payload["started"]``, sleeps ``payload["seconds"]``, then writes the file
  ``payload["marker"]``, which must never appear when the task is stopped.
- ``flaky``: fails on attempt 1 and returns ``"ok"`` on any later one.

A runner provides them as ``[handlers.NAME]`` tables (process, docker,
Slurm), as in-process functions, or both: see :class:`RunnerHandlers`.
:func:`python_scenario_handlers` and :func:`inprocess_scenario_handlers` are
ready-made sets; :data:`PYTHON_SCENARIOS` holds the scripts, for a runner that
needs to put them somewhere else (an image, a cluster's shared disk).
:func:`shell_scenario_handlers` plays them as shell scripts, inline in the
command, for where there is no Python (a busybox image).
"""

from __future__ import annotations

import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from attrs import field, frozen

from dspy_infra import AgentInfra
from dspy_infra.abc import TaskRun
from dspy_infra.errors import InvalidTask, TaskCancelled, TaskFailed, TaskTimedOut, UnknownTask
from dspy_infra.scheduling.tasks import TaskHandle, TaskState

__all__ = [
    "PYTHON_SCENARIOS",
    "SCENARIOS",
    "SHELL_SCENARIOS",
    "RunnerConformance",
    "RunnerHandlers",
    "inprocess_scenario_handlers",
    "python_scenario_handlers",
    "shell_scenario_handlers",
]

SCENARIOS = ("echo", "fail", "sleep", "flaky")

# Each script takes the payload file and the result file as its arguments.
PYTHON_SCENARIOS: Mapping[str, str] = {
    "echo": """
        import json, sys
        with open(sys.argv[1]) as f:
            payload = json.load(f)
        with open(sys.argv[2], "w") as f:
            json.dump(payload, f)
    """,
    "fail": """
        import json, sys
        with open(sys.argv[1]) as f:
            payload = json.load(f)
        print("about to fail", flush=True)
        print(payload["message"], file=sys.stderr)
        sys.exit(1)
    """,
    "sleep": """
        import json, sys, time
        with open(sys.argv[1]) as f:
            payload = json.load(f)
        with open(payload["started"], "w") as f:
            f.write(repr(time.time()))
        time.sleep(payload["seconds"])
        with open(payload["marker"], "w") as f:
            f.write("the work was not stopped")
    """,
    "flaky": """
        import os, sys
        if os.environ["DSPY_INFRA_ATTEMPT"] == "1":
            sys.exit("flaky: attempt 1 fails on purpose")
        print('"ok"')
    """,
}


# The same scenarios in POSIX shell, with what busybox has (sed, date, sleep):
# each script gets the payload file as $1 and the result file as $2. The
# payloads are the suite's own, written by json.dumps, so sed can pick their
# fields. No braces: a command's braces are placeholders. busybox's date has
# whole seconds only, so ``started`` may be up to 1 s early there: a suite
# using these scripts adds 1 to ``margin``.
_STRING = r'''sed -n 's/.*"%s": *"\([^"]*\)".*/\1/p' "$1"'''
_NUMBER = r'''sed -n 's/.*"%s": *\([0-9.eE+-]*\).*/\1/p' "$1"'''
SHELL_SCENARIOS: Mapping[str, str] = {
    "echo": """
        cat "$1" > "$2"
    """,
    "fail": f"""
        echo "about to fail"
        {_STRING % "message"} >&2
        exit 1
    """,
    "sleep": f"""
        seconds=$({_NUMBER % "seconds"})
        started=$({_STRING % "started"})
        marker=$({_STRING % "marker"})
        now=$(date +%s.%N)
        case $now in *N) now=$(date +%s) ;; esac
        echo "$now" > "$started"
        sleep "$seconds"
        echo "the work was not stopped" > "$marker"
    """,
    "flaky": """
        if [ "$DSPY_INFRA_ATTEMPT" = 1 ]; then
            echo "flaky: attempt 1 fails on purpose" >&2
            exit 1
        fi
        echo '"ok"'
    """,
}


@frozen(kw_only=True)
class RunnerHandlers:
    """How one runner plays the suite's scenarios.

    ``functions`` are in-process handlers, by scenario name; ``config`` holds
    ``[handlers.NAME]`` tables for the others. Each scenario is declared
    once. ``class_options`` are extra keys of the suite's task class (a
    Slurm partition, say). ``handler_path`` turns a path of the test's
    directory into the name a handler sees it by (a container's mount point),
    for the files the ``sleep`` scenario writes.
    """

    functions: Mapping[str, Callable[..., Any]] = field(factory=dict)
    config: Mapping[str, Mapping[str, Any]] = field(factory=dict)
    class_options: Mapping[str, Any] = field(factory=dict)
    handler_path: Callable[[Path], str] = str

    def __attrs_post_init__(self) -> None:
        declared = [*self.config, *self.functions]
        missing = [s for s in SCENARIOS if s not in declared]
        twice = sorted({s for s in declared if declared.count(s) > 1})
        if missing or twice:
            raise ValueError(
                f"RunnerHandlers must declare each of {', '.join(SCENARIOS)} once "
                f"(missing: {', '.join(missing) or 'none'}; twice: {', '.join(twice) or 'none'})"
            )


def python_scenario_handlers(
    directory: Path, interpreter: Sequence[str] = (sys.executable,)
) -> RunnerHandlers:
    """The scenarios as Python scripts written to ``directory``, run by ``interpreter``."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {}
    for name, source in PYTHON_SCENARIOS.items():
        script = directory / f"{name}.py"
        script.write_text(textwrap.dedent(source))
        config[name] = {"command": [*interpreter, str(script), "{payload_file}", "{result_file}"]}
    return RunnerHandlers(config=config)


def shell_scenario_handlers(
    shell: Sequence[str] = ("sh",), *, options: Mapping[str, Any] | None = None
) -> RunnerHandlers:
    """The scenarios as inline :data:`SHELL_SCENARIOS` scripts, run by ``shell -c``.

    Nothing is written anywhere: the script is in the command, so it runs
    wherever ``shell`` does (an image without Python). ``options`` are added
    to each ``[handlers.NAME]`` table (an ``image``, ``volumes``...).
    """
    config = {}
    for name, script in SHELL_SCENARIOS.items():
        # $0 is the scenario's name, for the shell's own messages.
        argv = [*shell, "-c", textwrap.dedent(script), name, "{payload_file}", "{result_file}"]
        config[name] = {**(options or {}), "command": argv}
    return RunnerHandlers(config=config)


def inprocess_scenario_handlers() -> RunnerHandlers:
    """The scenarios as functions: sync ones (run in threads) where nothing needs stopping."""

    def echo(payload: Any) -> Any:
        return payload

    def fail(payload: Any) -> Any:
        raise RuntimeError(payload["message"])

    async def sleep(payload: Any) -> None:
        await anyio.Path(payload["started"]).write_text(repr(time.time()))
        await anyio.sleep(payload["seconds"])
        await anyio.Path(payload["marker"]).write_text("the work was not stopped")

    async def flaky(payload: Any, run: TaskRun) -> str:
        if run.attempt == 1:
            raise RuntimeError("flaky: attempt 1 fails on purpose")
        return "ok"

    return RunnerHandlers(functions={"echo": echo, "fail": fail, "sleep": sleep, "flaky": flaky})


@pytest.mark.anyio
class RunnerConformance:
    """Fixtures to provide:

    - ``runner_name``: the name a task class picks the runner by.
    - ``handlers``: a :class:`RunnerHandlers` with the four scenarios.

    Class attributes scale the timings for runners slow to start work:
    ``timeout`` must cover starting a handler, and ``work_seconds`` (how long
    the ``sleep`` scenario sleeps) must be longer than ``timeout``.
    """

    timeout: float = 0.75
    work_seconds: float = 1.5
    # After this much longer than the work would take, an unstopped handler
    # has surely written its marker.
    margin: float = 0.5

    @pytest.fixture
    async def infra(
        self, runner_name: str, handlers: RunnerHandlers, tmp_path: Path
    ) -> AsyncIterator[AgentInfra]:
        task_class = {
            "runner": runner_name,
            "max_concurrency": 4,
            "retry_backoff": {"initial": 0.01, "max": 0.01},
            "cancel_grace": 1.0,
            **handlers.class_options,
        }
        config = {
            "classes": {"t": task_class},
            "handlers": {name: dict(table) for name, table in handlers.config.items()},
        }
        instance = AgentInfra.start(config, state_dir=tmp_path / "state")
        for name, function in handlers.functions.items():
            instance.task(name)(function)
        async with instance:
            yield instance

    @pytest.fixture
    def files(self, tmp_path: Path) -> Path:
        """Where the ``sleep`` scenario writes its files."""
        directory = tmp_path / "files"
        directory.mkdir()
        return directory

    async def submit(
        self, infra: AgentInfra, scenario: str, payload: Any, **options: Any
    ) -> TaskHandle:
        return await infra.submit_task(scenario, payload, task_class="t", **options)

    def sleep_payload(self, handlers: RunnerHandlers, files: Path) -> dict[str, Any]:
        return {
            "seconds": self.work_seconds,
            "started": handlers.handler_path(files / "started"),
            "marker": handlers.handler_path(files / "marker"),
        }

    async def started_at(self, files: Path) -> float:
        """When the ``sleep`` handler started, once it has."""
        started = anyio.Path(files / "started")
        with anyio.fail_after(30):
            while True:
                try:
                    return float(await started.read_text())
                except (FileNotFoundError, ValueError):  # not yet, or half written
                    await anyio.sleep(0.01)

    async def assert_stopped(self, files: Path) -> None:
        """The ``sleep`` handler ran, and will never write its marker."""
        started = await self.started_at(files)
        await anyio.sleep(max(0.0, started + self.work_seconds + self.margin - time.time()))
        assert not await anyio.Path(files / "marker").exists(), "the work went on after it ended"

    async def test_a_result_comes_back(self, infra: AgentInfra) -> None:
        payload = {"text": "hi ✓", "numbers": [1, 2.5, -3], "nested": {"none": None, "t": True}}
        handle = await self.submit(infra, "echo", payload)
        assert await handle.result() == payload
        status = await infra.get_task_status(handle.task_id)
        assert status.state is TaskState.SUCCEEDED
        assert status.attempts == 1
        assert status.result == payload

    async def test_each_task_gets_its_own_result(self, infra: AgentInfra) -> None:
        handles = [await self.submit(infra, "echo", {"i": i}) for i in range(12)]
        results: dict[int, Any] = {}

        async def collect(i: int, handle: TaskHandle) -> None:
            results[i] = await handle.result()

        async with anyio.create_task_group() as group:
            for i, handle in enumerate(handles):
                group.start_soon(collect, i, handle)
        assert results == {i: {"i": i} for i in range(12)}

    async def test_tasks_run_at_once(
        self, infra: AgentInfra, handlers: RunnerHandlers, files: Path
    ) -> None:
        # Results cannot tell tasks run at once from tasks run in turn; two
        # ``sleep`` tasks can, by whether the second started before the first
        # could have ended. Two, not more: a small cluster's node may have
        # room for no third job.
        sleepers = [files / f"sleeper-{i}" for i in range(2)]
        handles = []
        for directory in sleepers:
            directory.mkdir()
            payload = self.sleep_payload(handlers, directory)
            handles.append(await self.submit(infra, "sleep", payload))
        starts = [await self.started_at(directory) for directory in sleepers]
        for handle in handles:
            assert (await handle.wait()).state is TaskState.SUCCEEDED
        assert max(starts) - min(starts) < self.work_seconds, (
            "the tasks ran one after the other: the second started "
            f"{max(starts) - min(starts):.2f}s after the first, which worked {self.work_seconds}s"
        )

    async def test_a_failure_carries_the_handlers_message(self, infra: AgentInfra) -> None:
        handle = await self.submit(infra, "fail", {"message": "the flux capacitor broke: 1.21"})
        with pytest.raises(TaskFailed) as caught:
            await handle.result()
        assert type(caught.value) is TaskFailed
        assert "the flux capacitor broke: 1.21" in caught.value.error
        status = await handle.wait()
        assert status.state is TaskState.FAILED
        assert status.error is not None
        assert "the flux capacitor broke: 1.21" in status.error

    async def test_a_timeout_fails_the_task_and_stops_the_work(
        self, infra: AgentInfra, handlers: RunnerHandlers, files: Path
    ) -> None:
        assert self.work_seconds > self.timeout
        payload = self.sleep_payload(handlers, files)
        handle = await self.submit(infra, "sleep", payload, timeout=self.timeout)
        with pytest.raises(TaskTimedOut):
            await handle.result()
        assert (await handle.wait()).state is TaskState.TIMED_OUT
        await self.assert_stopped(files)

    async def test_cancel_ends_the_task_and_stops_the_work(
        self, infra: AgentInfra, handlers: RunnerHandlers, files: Path
    ) -> None:
        handle = await self.submit(infra, "sleep", self.sleep_payload(handlers, files))
        await self.started_at(files)
        await infra.cancel_task(handle.task_id)
        with pytest.raises(TaskCancelled):
            await handle.result()
        assert (await infra.get_task_status(handle.task_id)).state is TaskState.CANCELLED
        await self.assert_stopped(files)

    async def test_a_task_cancelled_as_it_is_launched_leaves_nothing_running(
        self, infra: AgentInfra, handlers: RunnerHandlers, files: Path
    ) -> None:
        # Cancelled at points of its launch (a payload written, a container
        # created, a job submitted), not only once it runs: a launch that
        # went on regardless would do the work with nobody left to stop it.
        delays = (0.0, 0.01, 0.05, 0.1, 0.3, 0.6)

        async def cut(delay: float, directory: Path) -> None:
            handle = await self.submit(infra, "sleep", self.sleep_payload(handlers, directory))
            await anyio.sleep(delay)
            await infra.cancel_task(handle.task_id)
            with pytest.raises(TaskCancelled):
                await handle.result()

        directories = [files / f"cut-{i}" for i in range(len(delays))]
        async with anyio.create_task_group() as group:
            for delay, directory in zip(delays, directories, strict=True):
                directory.mkdir()
                group.start_soon(cut, delay, directory)
        await anyio.sleep(self.work_seconds + self.margin)
        for delay, directory in zip(delays, directories, strict=True):
            started = directory / "started"
            # Empty: cut short as it wrote its start, which it never will now;
            # the wait above already outlasted its work, checked just below.
            if started.exists() and started.stat().st_size:
                await self.assert_stopped(directory)
            assert not (directory / "marker").exists(), (
                f"cancelled {delay}s after its submit, the work went on"
            )

    async def test_a_failed_attempt_is_retried(self, infra: AgentInfra) -> None:
        handle = await self.submit(infra, "flaky", None, max_attempts=2)
        assert await handle.result() == "ok"
        status = await handle.wait()
        assert status.state is TaskState.SUCCEEDED
        assert status.attempts == 2

    async def test_without_retries_the_first_failure_is_final(self, infra: AgentInfra) -> None:
        handle = await self.submit(infra, "flaky", None, max_attempts=1)
        with pytest.raises(TaskFailed, match="attempt 1 fails on purpose"):
            await handle.result()
        assert (await handle.wait()).attempts == 1

    async def test_a_handler_the_runner_cannot_run_is_refused_at_submit(
        self, infra: AgentInfra
    ) -> None:
        with pytest.raises(InvalidTask, match="no-such-handler"):
            await self.submit(infra, "no-such-handler", None, task_id="refused")
        with pytest.raises(UnknownTask):
            await infra.get_task_status("refused")
