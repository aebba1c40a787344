"""A SIGKILLed owner loses no run: the next instance on its state dir resumes it, without
running again the steps (and fan-out tasks) that had finished."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import anyio
import pytest

from dspy_infra import AgentInfra, UnknownRun, UnknownTask
from dspy_infra.scheduling.tasks import TaskState
from dspy_infra.workflows import RunState, StepState, Workflow

pytestmark = pytest.mark.anyio

SPEC = {
    "name": "resumable",
    "steps": {
        "prepare": {"handler": "prepare", "payload": "${inputs.n}"},
        # Two attempts: the task running at the crash is run again, not lost.
        "evaluate": {
            "handler": "evaluate",
            "depends_on": ["prepare"],
            "fan_out": "${steps.prepare.result}",
            "payload": "${item}",
            "max_attempts": 2,
        },
        "aggregate": {
            "handler": "aggregate",
            "depends_on": ["evaluate"],
            "payload": "${steps.evaluate.result}",
        },
    },
}

OWNER = """
import json, sys
import anyio
from dspy_infra import AgentInfra

state_dir, spec = sys.argv[1], json.loads(sys.argv[2])

async def prepare(n):
    print("ran prepare", flush=True)
    return list(range(n))

async def evaluate(item):
    if item == 2:
        print("started evaluate 2", flush=True)
        await anyio.sleep_forever()
    print(f"ran evaluate {item}", flush=True)
    return item * 10

async def aggregate(results):
    raise AssertionError("not reached before the kill")

async def main():
    handlers: dict[str, Callable[..., Any]] = {
        "prepare": prepare,
        "evaluate": evaluate,
        "aggregate": aggregate,
    }
    async with AgentInfra.start(state_dir=state_dir, handlers=handlers) as infra:
        wf = await infra.workflows.create(spec)
        await infra.workflows.start_run(wf.workflow_id, {"n": 3}, run_id="r1")
        # Printed once a task's success is committed (a handler's own print comes
        # before: a kill in between re-runs the task, which has an attempt left).
        async for event in infra.stream_events({"task_completed"}, since=0):
            print("completed", event.task_id, flush=True)

anyio.run(main)
"""


async def _run_owner_until(
    tmp_path: Path, script_text: str, state_dir: Path, spec: Any, wanted: set[str]
) -> list[str]:
    """Run an owner script until it has printed every line of ``wanted``, then SIGKILL it."""
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(script_text))
    argv = [sys.executable, str(script), str(state_dir), json.dumps(spec)]
    lines: list[str] = []
    async with await anyio.open_process(argv) as owner:
        try:
            assert owner.stdout is not None
            buffer = b""
            with anyio.fail_after(30):
                while not wanted <= set(lines):
                    buffer += await owner.stdout.receive()
                    *complete, buffer = buffer.split(b"\n")
                    lines.extend(line.decode() for line in complete)
        finally:
            os.kill(owner.pid, signal.SIGKILL)
        assert await owner.wait() == -signal.SIGKILL
    return lines


async def test_a_killed_owner_resumes_its_run_without_rerunning_finished_steps(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    wanted = {
        "completed r1:prepare",
        "completed r1:evaluate:0",
        "completed r1:evaluate:1",
        "started evaluate 2",
    }
    await _run_owner_until(tmp_path, OWNER, state_dir, SPEC, wanted)

    calls: list[tuple[str, Any]] = []

    async def prepare(n: int) -> list[int]:
        calls.append(("prepare", n))
        return list(range(n))

    async def evaluate(item: int) -> int:
        calls.append(("evaluate", item))
        return item * 10

    async def aggregate(results: list[int]) -> int:
        calls.append(("aggregate", results))
        return sum(results)

    handlers: dict[str, Callable[..., Any]] = {
        "prepare": prepare,
        "evaluate": evaluate,
        "aggregate": aggregate,
    }
    async with AgentInfra.start(state_dir=state_dir, handlers=handlers) as infra:
        with anyio.fail_after(10):
            status = await infra.workflows.wait_run("r1")
        assert status.state is RunState.SUCCEEDED, status
        assert status.results() == {"prepare": [0, 1, 2], "evaluate": [0, 10, 20], "aggregate": 30}
        assert all(s.state is StepState.SUCCEEDED for s in status.steps.values())
        task = await infra.get_task_status("r1:evaluate:2")
        assert task.attempts == 2  # the one running at the kill, run again
    assert calls == [("evaluate", 2), ("aggregate", [0, 10, 20])]

    # And it stays so: a third instance has nothing to resume.
    calls.clear()
    async with AgentInfra.start(state_dir=state_dir, handlers=handlers) as infra:
        status = await infra.workflows.get_run("r1")
        assert status.state is RunState.SUCCEEDED
        assert status.results()["aggregate"] == 30
        events = [e async for e in infra.workflows.stream_status("r1")]
        assert events[-1].type == "workflow_run_succeeded"
        await anyio.sleep(0.05)
    assert calls == []


async def test_a_run_cut_short_by_close_resumes_in_the_next_instance(tmp_path: Path) -> None:
    gate = anyio.Event()
    calls: list[str] = []

    step = recording_step(calls, gate.wait)

    spec = {
        "name": "closing",
        "steps": {
            "fast": {"handler": "step", "payload": "fast"},
            "slow": {"handler": "step", "payload": "slow", "depends_on": ["fast"]},
            "after": {"handler": "step", "payload": "after", "depends_on": ["slow"]},
        },
    }
    state_dir = tmp_path / "state"
    async with cut_while_slow(state_dir, spec, step, calls) as (infra, _):
        assert (await infra.workflows.get_run("cut")).state is RunState.RUNNING
    assert calls == ["fast", "slow"]
    gate.set()
    async with AgentInfra.start(state_dir=state_dir, handlers={"step": step}) as infra:
        with anyio.fail_after(10):
            status = await infra.workflows.wait_run("cut")
        assert status.state is RunState.SUCCEEDED
    # The interrupted attempt does not count: 'slow' runs again, 'fast' does not.
    assert calls == ["fast", "slow", "slow", "after"]


@pytest.mark.parametrize("clock", ["steady", "stepped back"])
async def test_a_status_stream_resumed_with_a_seq_of_the_previous_instance_follows_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: str
) -> None:
    # A reader (a remote client, say) back after a restart passes the seq it
    # had read in the previous instance: it must get this instance's events
    # of the run, to its end. Seqs begin at an instance's start time; with the
    # clock stepped back an hour since (NTP, say), the previous instance's
    # seqs ran further than this one's have yet.
    if clock == "stepped back":
        ahead = time.time_ns() + 3600 * 10**9 - time.monotonic_ns()
        monkeypatch.setattr(time, "time_ns", lambda: ahead + time.monotonic_ns())
    gate = anyio.Event()

    async def step(name: str) -> str:
        if name == "slow":
            await gate.wait()
        return name

    spec = fast_then_slow("reader")
    state_dir = tmp_path / "state"
    async with AgentInfra.start(state_dir=state_dir, handlers={"step": step}) as infra:
        other = await infra.workflows.create(
            {"name": "other", "steps": {"fast": spec["steps"]["fast"]}}
        )
        for _ in range(3):  # other runs: this instance's seqs run ahead of the next one's
            await (await infra.workflows.start_run(other.workflow_id)).wait()
        wf = await infra.workflows.create(spec)
        await infra.workflows.start_run(wf.workflow_id, run_id="followed")
        last = 0
        async for event in infra.workflows.stream_status("followed"):
            last = event.seq
            if event.type == "workflow_step_started" and event.step == "slow":
                break
    monkeypatch.undo()
    gate.set()
    async with AgentInfra.start(state_dir=state_dir, handlers={"step": step}) as infra:
        with anyio.fail_after(10):  # it waited for ever
            events = [e async for e in infra.workflows.stream_status("followed", since=last)]
    assert [(e.type, e.step) for e in events] == [
        ("workflow_run_resumed", None),
        ("workflow_step_started", "slow"),
        ("workflow_step_succeeded", "slow"),
        ("workflow_run_succeeded", None),
    ]


async def test_keep_finished_spares_the_tasks_of_a_run_not_yet_finished(tmp_path: Path) -> None:
    # Item 0 finishes, item 1 is cut short by close(); the instance is down for
    # longer than keep_finished. The resumed run must find item 0 done, not
    # submit (and run) it again because its task was forgotten.
    calls: dict[int, int] = {0: 0, 1: 0}
    gate = anyio.Event()

    async def evaluate(item: int) -> int:
        calls[item] += 1
        if item == 1:
            await gate.wait()
        return item * 10

    spec = {
        "name": "fan",
        "steps": {
            "evaluate": {"handler": "evaluate", "fan_out": "${inputs.items}", "payload": "${item}"}
        },
    }
    config = {"infra": {"keep_finished": 0.2}}
    state_dir = tmp_path / "state"
    async with AgentInfra.start(
        config, state_dir=state_dir, handlers={"evaluate": evaluate}
    ) as infra:
        workflow = await infra.workflows.create(spec)
        await infra.workflows.start_run(workflow.workflow_id, {"items": [0, 1]}, run_id="r1")
        with anyio.fail_after(5):
            while calls[0] == 0 or calls[1] == 0:
                await anyio.sleep(0.01)
            await infra.task_handle("r1:evaluate:0").wait()
    await anyio.sleep(0.4)
    gate.set()
    async with AgentInfra.start(
        config, state_dir=state_dir, handlers={"evaluate": evaluate}
    ) as infra:
        with anyio.fail_after(10):
            status = await infra.workflows.wait_run("r1")
    assert status.state is RunState.SUCCEEDED
    assert calls == {0: 1, 1: 2}


@pytest.mark.parametrize("durable", [True, False])
async def test_keep_finished_forgets_finished_runs_with_their_steps_and_tasks(
    tmp_path: Path, durable: bool
) -> None:
    async def double(x: int) -> int:
        return 2 * x

    spec = {"name": "one", "steps": {"double": {"handler": "double", "payload": "${inputs.x}"}}}
    config = {"infra": {"keep_finished": 0.2, "durable": durable}}
    async with AgentInfra.start(
        config, state_dir=tmp_path / "state", handlers={"double": double}
    ) as infra:
        workflow = await infra.workflows.create(spec)
        old = await infra.workflows.start_run(workflow.workflow_id, {"x": 1}, run_id="old")
        assert (await old.wait()).state is RunState.SUCCEEDED
        # The pass after the next (every second at least) finds it 0.2 s old.
        with anyio.fail_after(10):
            while True:
                try:
                    await infra.workflows.get_run("old")
                except UnknownRun:
                    break
                await anyio.sleep(0.05)
        with pytest.raises(UnknownTask):
            await infra.get_task_status("old:double")
        # Forgotten, its id is free, and a run under it starts afresh.
        again = await infra.workflows.start_run(workflow.workflow_id, {"x": 5}, run_id="old")
        status = await again.wait()
    assert status.state is RunState.SUCCEEDED
    assert status.steps["double"].result == 10


CANCELLING_OWNER = """
import json, sys
import anyio
from dspy_infra import AgentInfra

state_dir, spec = sys.argv[1], json.loads(sys.argv[2])

async def hold(name):
    print("started", name, flush=True)
    await anyio.sleep_forever()

async def stubborn(name):
    print("started", name, flush=True)
    try:
        await anyio.sleep_forever()
    finally:
        # Slow to stop: the owner is killed while cancel_run() waits for it.
        print("stopping", name, flush=True)
        with anyio.CancelScope(shield=True):
            await anyio.sleep_forever()

async def main():
    handlers = {"hold": hold, "stubborn": stubborn}
    async with AgentInfra.start(state_dir=state_dir, handlers=handlers) as infra:
        wf = await infra.workflows.create(spec)
        await infra.workflows.start_run(wf.workflow_id, run_id="r1")
        async with anyio.create_task_group() as tg:
            async for event in infra.stream_events({"task_started"}, since=0):
                if event.task_id == "r1:b":
                    break
            tg.start_soon(infra.workflows.cancel_run, "r1")
            # Printed once a task's cancellation is committed.
            async for event in infra.stream_events({"task_cancelled"}, since=0):
                print("cancelled", event.task_id, flush=True)

anyio.run(main)
"""


@pytest.mark.parametrize("attempts", [1, 2])
async def test_a_cancel_cut_short_by_a_crash_ends_the_resumed_run_cancelled(
    tmp_path: Path, attempts: int
) -> None:
    # The owner is killed in cancel_run(): step a's task is cancelled (and
    # committed), b's still stopping. The next instance must finish what the
    # cancel began (the run 'cancelled', nothing run again), not read a's
    # cancelled task as a failure of the run, nor run its pending step; nor,
    # with an attempt left, start b's task again (as a task running at a
    # crash is) before the run is resumed.
    spec = {
        "name": "cancelling",
        "steps": {
            "a": {"handler": "hold", "payload": "a"},
            "b": {"handler": "stubborn", "payload": "b", "max_attempts": attempts},
            "c": {"handler": "hold", "payload": "c", "depends_on": ["a", "b"]},
        },
    }
    state_dir = tmp_path / "state"
    await _run_owner_until(
        tmp_path, CANCELLING_OWNER, state_dir, spec, {"cancelled r1:a", "stopping b"}
    )

    calls: list[str] = []

    async def hold(name: str) -> str:
        calls.append(name)
        return name

    handlers: dict[str, Callable[..., Any]] = {"hold": hold, "stubborn": hold}
    async with AgentInfra.start(state_dir=state_dir, handlers=handlers) as infra:
        with anyio.fail_after(10):
            status = await infra.workflows.wait_run("r1")
        assert status.state is RunState.CANCELLED, status
        assert {name: s.state for name, s in status.steps.items()} == {
            "a": StepState.CANCELLED,
            "b": StepState.CANCELLED,
            "c": StepState.CANCELLED,
        }
        assert status.steps["c"].task_ids == ()
        # Cancelled as the instance opened, neither lost nor run again.
        b = await infra.get_task_status("r1:b")
        assert (b.state, b.attempts, b.error) == (
            TaskState.CANCELLED,
            1,
            "cancelled by cancel_run()",
        )
        events = [e async for e in infra.workflows.stream_status("r1")]
        assert events[-1].type == "workflow_run_cancelled"
        values = await infra.get_metrics()
        assert values['dspy_infra_workflow_runs_total{status="cancelled"}'] == 1
    assert calls == []


async def test_a_run_cancelled_as_it_resumes_cancels_the_tasks_its_steps_had_submitted(
    tmp_path: Path,
) -> None:
    # 'slow' was running when its instance closed; the next instance recovers
    # its task (queued again) and resumes the run. A cancel_run() at once,
    # before the resumed run has submitted the step again, must stop that
    # task too: it ran to its end after its run was 'cancelled'.
    calls: list[str] = []

    step = recording_step(calls, lambda: anyio.sleep(0.5))

    state_dir = tmp_path / "state"
    async with cut_while_slow(state_dir, fast_then_slow("closing"), step, calls):
        pass
    async with AgentInfra.start(state_dir=state_dir, handlers={"step": step}) as infra:
        status = await infra.workflows.cancel_run("cut")
        assert status.state is RunState.CANCELLED
        assert status.steps["slow"].state is StepState.CANCELLED
        assert status.steps["slow"].task_ids == ("cut:slow",)
        await anyio.sleep(0.7)
        task = await infra.get_task_status("cut:slow")
        assert task.state is TaskState.CANCELLED, task


async def test_a_run_whose_stored_workflow_is_not_valid_any_more_ends_failed(
    tmp_path: Path,
) -> None:
    # A workflow stored by a version that took it (here: 'slow' made to
    # depend on itself, refused since) is not loaded: its run, 'running' when
    # its instance closed, stayed 'running' in the store for ever, unknown to
    # get_run(), while the task its step had running was run again.
    calls: list[str] = []

    step = recording_step(calls, anyio.sleep_forever)

    state_dir = tmp_path / "state"
    async with cut_while_slow(state_dir, fast_then_slow("stale"), step, calls) as (_, wf):
        pass
    stale = fast_then_slow("stale")
    stale["steps"]["slow"]["depends_on"] = ["slow"]
    db = sqlite3.connect(state_dir / "tasks.db")
    with db:
        db.execute("UPDATE workflows SET spec = ?", (json.dumps(stale),))
    db.close()
    error = f"workflow {wf.workflow_id!r} is not valid any more: workflow 'stale': step 'slow'"
    for _ in range(2):  # ended once, and so found by the next instance
        async with AgentInfra.start(state_dir=state_dir, handlers={"step": step}) as infra:
            with anyio.fail_after(10):
                status = await infra.workflows.wait_run("cut")
            assert status.state is RunState.FAILED
            assert (status.error or "").startswith(error), status.error
            assert status.steps["fast"].state is StepState.SUCCEEDED
            slow = status.steps["slow"]
            assert (slow.state, slow.task_ids) == (StepState.CANCELLED, ("cut:slow",))
            assert (slow.error or "").startswith(f"cancelled: {error}")
            task = await infra.get_task_status("cut:slow")
            assert task.state is TaskState.CANCELLED
            assert (task.error or "").startswith(f"cancelled: {error}")
            events = [e async for e in infra.workflows.stream_status("cut")]
            assert events[-1].type == "workflow_run_failed"
    assert calls == ["fast", "slow"]


def recording_step(
    calls: list[str], slow: Callable[[], Awaitable[object]]
) -> Callable[[str], Awaitable[str]]:
    """The handler "step" of fast_then_slow(): it appends its payload to
    ``calls``, awaits ``slow()`` for the step "slow", and returns its payload."""

    async def step(name: str) -> str:
        calls.append(name)
        if name == "slow":
            await slow()
        return name

    return step


@asynccontextmanager
async def cut_while_slow(
    state_dir: Path, spec: dict[str, Any], step: Callable[[str], Awaitable[str]], calls: list[str]
) -> AsyncIterator[tuple[AgentInfra, Workflow]]:
    """An instance running ``spec`` as run "cut", once its step "slow" has begun
    (``step`` appends each call to ``calls``); the run is cut short as it closes."""
    async with AgentInfra.start(state_dir=state_dir, handlers={"step": step}) as infra:
        wf = await infra.workflows.create(spec)
        await infra.workflows.start_run(wf.workflow_id, run_id="cut")
        with anyio.fail_after(10):
            while "slow" not in calls:
                await anyio.sleep(0.01)
        yield infra, wf


def fast_then_slow(name: str) -> dict[str, Any]:
    """A workflow of two steps of the handler "step", its payload each step's name."""
    return {
        "name": name,
        "steps": {
            "fast": {"handler": "step", "payload": "fast"},
            "slow": {"handler": "step", "payload": "slow", "depends_on": ["fast"]},
        },
    }


FAILING_OWNER = """
import json, sys
import anyio
from dspy_infra import AgentInfra

state_dir, spec = sys.argv[1], json.loads(sys.argv[2])
b_started = anyio.Event()

async def fail(name):
    await b_started.wait()
    raise RuntimeError("a broke")

async def stubborn(name):
    b_started.set()
    try:
        await anyio.sleep_forever()
    finally:
        # Slow to stop: the owner is killed while its failed run cancels it,
        # long after the failure of a was committed.
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.5)
            print("stopping", name, flush=True)
            await anyio.sleep_forever()

async def main():
    handlers = {"fail": fail, "stubborn": stubborn}
    async with AgentInfra.start(state_dir=state_dir, handlers=handlers) as infra:
        wf = await infra.workflows.create(spec)
        await infra.workflows.start_run(wf.workflow_id, run_id="r1")
        await anyio.sleep_forever()

anyio.run(main)
"""


async def test_a_failure_cut_short_by_a_crash_ends_the_resumed_run_failed(
    tmp_path: Path,
) -> None:
    # Step a failed (its row stored); the owner is killed while the run
    # cancels b, slow to stop. The next instance must finish the failure: b's
    # task, with an attempt left, is not started again as the instance opens,
    # and the run fails for a's failure, not for b's cancelled task.
    spec = {
        "name": "failing",
        "steps": {
            "a": {"handler": "fail", "payload": "a"},
            "b": {"handler": "stubborn", "payload": "b", "max_attempts": 2},
            "c": {"handler": "fail", "payload": "c", "depends_on": ["a", "b"]},
        },
    }
    state_dir = tmp_path / "state"
    await _run_owner_until(tmp_path, FAILING_OWNER, state_dir, spec, {"stopping b"})
    with closing(sqlite3.connect(state_dir / "tasks.db")) as db:
        steps = "SELECT step, state FROM workflow_steps"
        assert dict(db.execute(steps).fetchall()) == {"a": "failed", "b": "running"}
        tasks = "SELECT task_id, state FROM tasks"
        assert dict(db.execute(tasks).fetchall()) == {"r1:a": "failed", "r1:b": "running"}

    calls: list[str] = []

    async def record(name: str) -> str:
        calls.append(name)
        return name

    async def fail(name: str) -> str:
        calls.append(name)
        raise RuntimeError(f"{name} broke again")

    handlers: dict[str, Callable[..., Any]] = {"fail": fail, "stubborn": record}
    async with AgentInfra.start(state_dir=state_dir, handlers=handlers) as infra:
        with anyio.fail_after(10):
            status = await infra.workflows.wait_run("r1")
        assert status.state is RunState.FAILED, status
        assert status.error == ("step 'a' failed: task 'r1:a' failed: RuntimeError: a broke"), (
            status.error
        )
        assert {name: (s.state, s.error) for name, s in status.steps.items()} == {
            "a": (StepState.FAILED, "task 'r1:a' failed: RuntimeError: a broke"),
            "b": (StepState.CANCELLED, "cancelled: step 'a' failed"),
            "c": (StepState.CANCELLED, "not run: step 'a' failed"),
        }
        b = await infra.get_task_status("r1:b")
        assert (b.state, b.attempts, b.error) == (
            TaskState.CANCELLED,
            1,
            "cancelled: step 'a' failed",
        )
        events = [(e.type, e.step) async for e in infra.workflows.stream_status("r1")]
        assert events == [
            ("workflow_run_resumed", None),
            ("workflow_step_cancelled", "b"),
            ("workflow_step_cancelled", "c"),
            ("workflow_run_failed", None),
        ]
        values = await infra.get_metrics()
        assert values['dspy_infra_workflow_runs_total{status="failed"}'] == 1
        assert values["dspy_infra_workflow_runs_active"] == 0
    assert calls == []
