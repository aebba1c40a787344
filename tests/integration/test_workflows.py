"""Workflow runs on a real instance: ordering, fan-out, failure, cancellation, streaming."""

from __future__ import annotations

import random
import sqlite3
import sys
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspy_infra import AgentInfra
from dspy_infra.errors import InfraClosed, InfraError, UnknownTask
from dspy_infra.scheduling.checks import MAX_JSON_DEPTH
from dspy_infra.scheduling.store import Journal, Op, StoreFailed, Written
from dspy_infra.scheduling.tasks import TaskState
from dspy_infra.workflows import (
    InvalidWorkflow,
    RunState,
    StepState,
    UnknownRun,
    UnknownWorkflow,
    WorkflowEvent,
)

# -- hypothesis: random DAGs --------------------------------------------------


@st.composite
def dags(draw: st.DrawFn) -> dict[str, Any]:
    """Steps s0..sN, each depending on some earlier ones; some fan out; maybe one fails."""
    n = draw(st.integers(1, 10))
    steps: dict[str, dict[str, Any]] = {}
    widths: dict[str, int] = {}
    for i in range(n):
        name = f"s{i}"
        earlier = [f"s{j}" for j in range(i)]
        deps = sorted(draw(st.sets(st.sampled_from(earlier), max_size=3))) if earlier else []
        payload: dict[str, Any] = {
            "step": name,
            "deps": {d: f"${{steps.{d}.result}}" for d in deps},
        }
        table: dict[str, Any] = {"handler": "work", "depends_on": deps, "payload": payload}
        if draw(st.booleans()):
            widths[name] = draw(st.integers(0, 3))
            table["fan_out"] = f"${{inputs.{name}}}"
            payload["item"] = "${item}"
        steps[name] = table
    failing = draw(st.none() | st.sampled_from(sorted(steps)))
    return {"steps": steps, "widths": widths, "failing": failing}


def expected_result(name: str, widths: dict[str, int]) -> Any:
    if name in widths:
        return [[name, i] for i in range(widths[name])]
    return [name, None]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dag=dags(), seed=st.integers(0, 2**16))
def test_every_step_runs_after_its_dependencies_and_once(
    tmp_path_factory: pytest.TempPathFactory, dag: dict[str, Any], seed: int
) -> None:
    steps, widths, failing = dag["steps"], dag["widths"], dag["failing"]
    rng = random.Random(seed)
    log: list[tuple[str, str, Any]] = []  # ("start" | "end", step, item)

    async def work(payload: dict[str, Any]) -> Any:
        name, item = payload["step"], payload.get("item")
        log.append(("start", name, item))
        for dep, value in payload["deps"].items():
            assert value == expected_result(dep, widths), (name, dep, value)
        await anyio.sleep(rng.choice([0, 0, 0.001, 0.003]))
        log.append(("end", name, item))
        if name == failing:
            raise RuntimeError(f"{name} fails")
        return [name, item]

    state_dir = tmp_path_factory.mktemp("wf")

    async def main() -> None:
        async with AgentInfra.start(
            state_dir=state_dir, durable=False, handlers={"work": work}
        ) as infra:
            wf = await infra.workflows.create({"name": "dag", "steps": steps})
            inputs = {name: list(range(w)) for name, w in widths.items()}
            run = await infra.workflows.start_run(wf.workflow_id, inputs)
            with anyio.fail_after(30):
                status = await run.wait()
            check(status)

    def check(status: Any) -> None:
        position = {(kind, s, i): n for n, (kind, s, i) in enumerate(log)}
        starts = [(s, i) for kind, s, i in log if kind == "start"]
        assert len(starts) == len(set(starts)), "a task ran twice"
        for name, item in starts:
            for dep in steps[name]["depends_on"]:
                items = range(widths[dep]) if dep in widths else [None]
                for dep_item in items:
                    assert position[("end", dep, dep_item)] < position[("start", name, item)]
        descendants = _descendants(steps, failing) if failing else set()
        if failing is None or (failing in widths and widths[failing] == 0):
            assert status.state is RunState.SUCCEEDED, status
            for name in steps:
                assert status.steps[name].state is StepState.SUCCEEDED
                assert status.steps[name].result == expected_result(name, widths)
                items = range(widths[name]) if name in widths else [None]
                assert all((name, i) in starts for i in items), "a step did not run"
        else:
            assert status.state is RunState.FAILED, status
            assert status.steps[failing].state is StepState.FAILED
            assert f"{failing} fails" in (status.error or "")
            for name in descendants:
                assert all(s != name for s, _ in starts), f"{name} ran after a failed dependency"
                assert status.steps[name].state is StepState.CANCELLED
            assert all(s.state.finished for s in status.steps.values())

    anyio.run(main, backend="asyncio")


def _descendants(steps: dict[str, Any], root: str) -> set[str]:
    found: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, table in steps.items():
            if name not in found and ({root} | found) & set(table["depends_on"]):
                found.add(name)
                changed = True
    return found


# -- behaviour on one instance ------------------------------------------------

pytestmark = pytest.mark.anyio


async def test_cancel_run_cascades_to_running_and_pending_steps(tmp_path: Path) -> None:
    started: list[Any] = []
    cancelled: list[Any] = []

    async def quick(payload: Any) -> Any:
        return [1, 2, 3]

    async def hang(payload: Any) -> Any:
        started.append(payload)
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            cancelled.append(payload)
            raise

    spec = {
        "name": "cancel-me",
        "steps": {
            "a": {"handler": "quick"},
            "b": {"handler": "hang", "depends_on": ["a"], "fan_out": "${steps.a.result}"},
            "c": {"handler": "hang", "depends_on": ["a"], "payload": "c"},
            "d": {"handler": "quick", "depends_on": ["b", "c"]},
        },
    }
    async with AgentInfra.start(
        state_dir=tmp_path / "state", handlers={"quick": quick, "hang": hang}
    ) as infra:
        wf = await infra.workflows.create(spec)
        run = await infra.workflows.start_run(wf.workflow_id)
        with anyio.fail_after(10):
            while len(started) < 4:
                await anyio.sleep(0.01)
        status = await run.cancel()
        assert status.state is RunState.CANCELLED
        assert status.steps["a"].state is StepState.SUCCEEDED
        for name in ("b", "c", "d"):
            assert status.steps[name].state is StepState.CANCELLED, name
        assert sorted(map(str, cancelled)) == sorted(map(str, started))
        for task_id in [*status.steps["b"].task_ids, *status.steps["c"].task_ids]:
            assert (await infra.get_task_status(task_id)).state is TaskState.CANCELLED
        assert status.steps["d"].task_ids == ()
        events = [e async for e in infra.workflows.stream_status(run.run_id)]
        assert events[-1].type == "workflow_run_cancelled"
        values = await infra.get_metrics()
        assert values['dspy_infra_workflow_runs_total{status="cancelled"}'] == 1
        # Cancelling again, or a finished run, changes nothing.
        assert (await infra.workflows.cancel_run(run.run_id)).state is RunState.CANCELLED


async def test_a_run_cancelled_as_its_step_starts_leaves_no_task_behind(tmp_path: Path) -> None:
    async def work(payload: Any) -> Any:
        await anyio.sleep(0.5)
        return payload

    spec = {"name": "racy", "steps": {"only": {"handler": "work", "fan_out": "${inputs.items}"}}}
    async with AgentInfra.start(state_dir=tmp_path / "state", handlers={"work": work}) as infra:
        wf = await infra.workflows.create(spec)
        for _ in range(5):
            run = await infra.workflows.start_run(wf.workflow_id, inputs={"items": [1, 2, 3]})
            # Cancel the moment the step is reported started: its tasks may
            # still be on their way into the store.
            async for event in infra.workflows.stream_status(run.run_id):
                if event.type == "workflow_step_started":
                    break
            status = await run.cancel()
            assert status.state is RunState.CANCELLED
            for task_id in status.steps["only"].task_ids:
                task = await infra.get_task_status(task_id)
                assert task.state is TaskState.CANCELLED, task


async def test_status_streams_resume_from_a_sequence_number(tmp_path: Path) -> None:
    gate = anyio.Event()

    async def step(payload: Any) -> Any:
        if payload == "wait":
            await gate.wait()
        return payload

    spec = {
        "name": "stream",
        "steps": {
            "one": {"handler": "step", "payload": "one"},
            "two": {"handler": "step", "payload": "wait", "depends_on": ["one"]},
            "three": {"handler": "step", "payload": "three", "depends_on": ["two"]},
        },
    }
    async with AgentInfra.start(state_dir=tmp_path / "state", handlers={"step": step}) as infra:
        wf = await infra.workflows.create(spec)
        run = await infra.workflows.start_run(wf.workflow_id)
        seen: list[WorkflowEvent] = []
        async for event in infra.workflows.stream_status(run.run_id):
            seen.append(event)
            if event.type == "workflow_step_started" and event.step == "two":
                break
        gate.set()
        rest = [e async for e in infra.workflows.stream_status(run.run_id, since=seen[-1].seq)]
        everything = [e async for e in infra.workflows.stream_status(run.run_id)]
        assert [e.seq for e in everything] == [e.seq for e in seen + rest]
        assert [(e.type, e.step) for e in rest] == [
            ("workflow_step_succeeded", "two"),
            ("workflow_step_started", "three"),
            ("workflow_step_succeeded", "three"),
            ("workflow_run_succeeded", None),
        ]
        assert (await run.wait()).results() == {"one": "one", "two": "wait", "three": "three"}
        # Resumed after the last event of a finished run: nothing more, and no wait.
        with anyio.fail_after(5):
            assert [
                e async for e in infra.workflows.stream_status(run.run_id, since=everything[-1].seq)
            ] == []


async def test_a_status_stream_whose_reader_pauses_until_the_run_ends_gets_all_its_events(
    tmp_path: Path,
) -> None:
    # Paused after the first event, which the stream had when it began: the
    # run ends meanwhile, and the stream ended there, without the rest.
    async def step(payload: Any) -> Any:
        return payload

    spec = {"name": "paused", "steps": {"one": {"handler": "step"}, "two": {"handler": "step"}}}
    async with AgentInfra.start(state_dir=tmp_path / "state", handlers={"step": step}) as infra:
        wf = await infra.workflows.create(spec)
        run = await infra.workflows.start_run(wf.workflow_id)
        stream = infra.workflows.stream_status(run.run_id)
        read = [await anext(stream)]
        await run.wait()
        with anyio.fail_after(10):
            read += [e async for e in stream]
        everything = [e async for e in infra.workflows.stream_status(run.run_id)]
    assert [e.seq for e in read] == [e.seq for e in everything]
    assert read[-1].type == "workflow_run_succeeded"


async def test_a_status_stream_that_overflows_its_buffer_misses_and_repeats_nothing(
    tmp_path: Path,
) -> None:
    # The reader pauses after the first event until 'first' runs (its start
    # is then in both the run's record and the buffer), waits for 'first' to
    # end, then reads no more while forty steps make ten times as many events
    # as its buffer of 8 holds: those dropped are made up for from the run's
    # record, and those that both hold are yielded once.
    entered = anyio.Event()
    gate = anyio.Event()

    async def step(payload: Any) -> Any:
        if payload == "first":
            entered.set()
            await gate.wait()
        return payload

    steps = {f"s{i}": {"handler": "step", "depends_on": ["first"]} for i in range(40)}
    spec = {"name": "wide", "steps": {"first": {"handler": "step", "payload": "first"}, **steps}}
    handlers = {"step": step}
    async with (
        AgentInfra.start(state_dir=tmp_path / "state", handlers=handlers, event_buffer=8) as infra,
        anyio.create_task_group() as tg,
    ):
        wf = await infra.workflows.create(spec)
        run = await infra.workflows.start_run(wf.workflow_id)
        stream = infra.workflows.stream_status(run.run_id)
        read = [await anext(stream)]
        with anyio.fail_after(10):
            await entered.wait()
            async for event in stream:
                read.append(event)
                if (event.type, event.step) == ("workflow_step_started", "first"):
                    break

        async def release() -> None:
            gate.set()

        # Set once the stream waits for the next event, which it takes from its buffer.
        tg.start_soon(release)
        read.append(await anext(stream))
        await run.wait()
        with anyio.fail_after(10):
            read += [e async for e in stream]
        everything = [e async for e in infra.workflows.stream_status(run.run_id)]
    assert len(everything) > 80
    assert [e.seq for e in read] == [e.seq for e in everything]


async def test_a_workflow_does_not_follow_changes_to_the_mapping_it_was_made_from(
    tmp_path: Path,
) -> None:
    async def echo(payload: Any) -> Any:
        return payload

    layers = [1, 2]
    config: dict[str, Any] = {"model": "small", "layers": layers}
    spec = {"name": "copy", "steps": {"train": {"handler": "echo", "payload": config}}}
    async with AgentInfra.start(state_dir=tmp_path / "state", handlers={"echo": echo}) as infra:
        wf = await infra.workflows.create(spec)
        config["model"] = "large"  # the caller's object, changed after create()
        layers.append(3)
        run = await infra.workflows.start_run(wf.workflow_id)
        assert (await run.wait()).results() == {"train": {"model": "small", "layers": [1, 2]}}
        assert wf.spec.steps[0].payload == {"model": "small", "layers": [1, 2]}


async def test_bad_workflows_and_runs_are_refused_with_clear_errors(tmp_path: Path) -> None:
    async def h(payload: Any) -> Any:
        return payload

    async with AgentInfra.start(state_dir=tmp_path / "state", handlers={"h": h}) as infra:
        wfs = infra.workflows
        with pytest.raises(
            InvalidWorkflow, match=r"step 'b': no in-process handler 'nope' is registered"
        ):
            await wfs.create(
                {"name": "x", "steps": {"a": {"handler": "h"}, "b": {"handler": "nope"}}}
            )
        with pytest.raises(InvalidWorkflow, match=r"step 'a': unknown task class 'huge'"):
            await wfs.create({"name": "x", "steps": {"a": {"handler": "h", "task_class": "huge"}}})
        with pytest.raises(InvalidWorkflow, match=r"priority must be an integer"):
            await wfs.create({"name": "x", "steps": {"a": {"handler": "h", "priority": 1000}}})
        bad_file = tmp_path / "bad.toml"
        bad_file.write_text('name = "x"\n[steps.a]\nhandler = "h"\ndepends_on = ["b"]\n')
        with pytest.raises(InvalidWorkflow, match=r"bad\.toml: .*unknown step 'b'"):
            await wfs.create(bad_file)
        assert await wfs.list() == []  # nothing refused was stored
        with pytest.raises(UnknownWorkflow, match=r"^unknown workflow 'no-such-workflow'$"):
            await wfs.start_run("no-such-workflow")
        with pytest.raises(UnknownRun, match=r"^unknown workflow run 'no-such-run'$"):
            await wfs.get_run("no-such-run")
        wf = await wfs.create(
            {"name": "x", "steps": {"a": {"handler": "h", "payload": "${inputs.n}"}}}
        )
        assert (await wfs.create(wf.spec)).workflow_id == wf.workflow_id  # idempotent
        with pytest.raises(InvalidWorkflow, match=r"missing inputs n"):
            await wfs.start_run(wf.workflow_id, run_id="refused")
        with pytest.raises(InvalidWorkflow, match=r"the inputs are not JSON-compatible"):
            await wfs.start_run(wf.workflow_id, {"n": float("nan")}, run_id="refused")
        with pytest.raises(InvalidWorkflow, match=r"run_id 'no/slash': letters, digits"):
            await wfs.start_run(wf.workflow_id, {"n": 1}, run_id="no/slash")
        with pytest.raises(UnknownRun):  # none of the refused runs was stored
            await wfs.get_run("refused")
        with pytest.raises(UnknownTask):
            await infra.get_task_status("refused:a")
        # Inputs are any JSON; the same run_id is the same run, whatever the inputs.
        run = await wfs.start_run(wf.workflow_id, {"n": {"deeper": 1}}, run_id="mine")
        assert (await run.wait()).results() == {"a": {"deeper": 1}}
        again = await wfs.start_run(wf.workflow_id, {"n": 2}, run_id="mine")  # same run
        assert (await again.wait()).results() == {"a": {"deeper": 1}}


async def _double(x: int) -> int:
    return 2 * x


_ONE_STEP = {"name": "one", "steps": {"double": {"handler": "double", "payload": "${inputs.x}"}}}


async def test_two_starts_of_one_run_id_at_once_are_one_run(tmp_path: Path) -> None:
    async with AgentInfra.start(
        state_dir=tmp_path / "state", handlers={"double": _double}
    ) as infra:
        workflow = await infra.workflows.create(_ONE_STEP)
        handles = []

        async def start() -> None:
            handles.append(
                await infra.workflows.start_run(workflow.workflow_id, {"x": 2}, run_id="r")
            )

        async with anyio.create_task_group() as group:
            group.start_soon(start)
            group.start_soon(start)
        assert (await handles[0].wait()).state is RunState.SUCCEEDED
        events = [e async for e in infra.workflows.stream_status("r", since=0)]
        assert [e.type for e in events].count("workflow_run_started") == 1
        metrics = await infra.get_metrics()
        assert metrics['dspy_infra_workflow_runs_total{status="succeeded"}'] == 1.0


async def test_waiting_for_a_run_ends_when_the_instance_closes(tmp_path: Path) -> None:
    started = anyio.Event()

    async def stuck(payload: Any) -> None:
        started.set()
        await anyio.sleep_forever()

    spec = {"name": "stuck", "steps": {"s": {"handler": "stuck"}}}
    outcome: list[BaseException] = []
    async with anyio.create_task_group() as outside:
        async with AgentInfra.start(
            state_dir=tmp_path / "state", handlers={"stuck": stuck}
        ) as infra:
            workflow = await infra.workflows.create(spec)
            run = await infra.workflows.start_run(workflow.workflow_id)

            async def wait() -> None:
                try:
                    await run.wait()
                except Exception as exc:  # noqa: BLE001 - what it raised is the test
                    outcome.append(exc)

            outside.start_soon(wait)
            await started.wait()
        with anyio.fail_after(5):  # it used to wait for ever
            while not outcome:
                await anyio.sleep(0.01)
    assert "the instance closed before run" in str(outcome[0])


async def test_a_status_stream_raises_when_the_instance_closes_before_the_run_ends(
    tmp_path: Path,
) -> None:
    started = anyio.Event()

    async def stuck(payload: Any) -> None:
        started.set()
        await anyio.sleep_forever()

    spec = {"name": "stuck", "steps": {"s": {"handler": "stuck"}}}
    seen: list[str] = []
    outcome: list[BaseException] = []
    async with anyio.create_task_group() as outside:
        async with AgentInfra.start(
            state_dir=tmp_path / "state", handlers={"stuck": stuck}
        ) as infra:
            workflow = await infra.workflows.create(spec)
            run = await infra.workflows.start_run(workflow.workflow_id)

            async def follow() -> None:
                try:
                    async for event in infra.workflows.stream_status(run.run_id):
                        seen.append(event.type)  # noqa: PERF401 - those before the raise count
                except InfraClosed as exc:
                    outcome.append(exc)

            outside.start_soon(follow)
            await started.wait()
        with anyio.fail_after(5):
            while not outcome:
                await anyio.sleep(0.01)
    # It ended quietly, as if the run had ended, with no final event.
    assert seen == ["workflow_run_started", "workflow_step_started"]
    assert "the instance closed before run" in str(outcome[0])


async def test_a_status_stream_opened_as_a_run_finishes_ends_with_its_final_event(
    tmp_path: Path,
) -> None:
    async with AgentInfra.start(
        state_dir=tmp_path / "state", handlers={"double": _double}
    ) as infra:
        workflow = await infra.workflows.create(_ONE_STEP)
        for i in range(10):
            run = await infra.workflows.start_run(workflow.workflow_id, {"x": i})
            while (await run.status()).state is RunState.RUNNING:
                await anyio.lowlevel.checkpoint()
            # Finished, its final state perhaps not yet committed nor published.
            events = [e async for e in infra.workflows.stream_status(run.run_id)]
            assert events[-1].type == "workflow_run_succeeded", [e.type for e in events]


async def test_a_reference_that_cannot_be_filled_in_fails_its_run_not_the_instance(
    tmp_path: Path,
) -> None:
    # "²" is a digit to str.isdigit(), not to int(): it passes the checks.
    spec = {"name": "odd", "steps": {"double": {"handler": "double", "payload": "${inputs.xs.²}"}}}
    async with AgentInfra.start(
        state_dir=tmp_path / "state", handlers={"double": _double}
    ) as infra:
        workflow = await infra.workflows.create(spec)
        status = await (await infra.workflows.start_run(workflow.workflow_id, {"xs": [1]})).wait()
        assert status.state is RunState.FAILED
        assert "nothing at 'inputs.xs.²'" in (status.error or "")
        again = await infra.workflows.start_run(workflow.workflow_id, {"xs": [1]})
        assert (await again.wait()).state is RunState.FAILED  # still serving


async def test_inputs_that_are_not_a_mapping_are_invalid_workflow(tmp_path: Path) -> None:
    async with AgentInfra.start(
        state_dir=tmp_path / "state", handlers={"double": _double}
    ) as infra:
        workflow = await infra.workflows.create(_ONE_STEP)
        for inputs in (5, "abc", [1, 2]):
            with pytest.raises(InvalidWorkflow, match="inputs must be a mapping"):
                await infra.workflows.start_run(workflow.workflow_id, inputs)  # type: ignore[arg-type]
        with pytest.raises(InvalidWorkflow, match="run_id"):
            await infra.workflows.start_run(workflow.workflow_id, {"x": 1}, run_id="r1\n")


async def test_a_run_whose_caller_is_cancelled_once_it_is_written_is_driven(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doubled: list[int] = []

    async def double(x: int) -> int:
        doubled.append(x)
        return await _double(x)

    caller = anyio.CancelScope()
    write = Journal.write

    def write_then_cancel_the_caller(self: Journal, op: Op, *args: Any, **kwargs: Any) -> Written:
        written = write(self, op, *args, **kwargs)
        if op[0] == "run":
            caller.cancel()  # lands while start_run waits for the run's commit
        return written

    async with AgentInfra.start(state_dir=tmp_path / "state", handlers={"double": double}) as infra:
        workflow = await infra.workflows.create(_ONE_STEP)
        with monkeypatch.context() as patched, caller:
            patched.setattr(Journal, "write", write_then_cancel_the_caller)
            await infra.workflows.start_run(workflow.workflow_id, {"x": 2}, run_id="r")
            # start_run was cancelled from within, while its commit was under way.
            assert caller.cancel_called
            await anyio.lowlevel.checkpoint()
        assert caller.cancelled_caught
        with anyio.fail_after(10):
            status = await infra.workflows.wait_run("r")
        assert status.state is RunState.SUCCEEDED, status
        assert status.results() == {"double": 4}
        # Started again by the caller that did not hear back: the same run, not run again.
        again = await infra.workflows.start_run(workflow.workflow_id, {"x": 2}, run_id="r")
        assert (await again.wait()).results() == {"double": 4}
    assert doubled == [2]


async def test_a_failed_step_cancels_running_steps_and_never_runs_pending_ones(
    tmp_path: Path,
) -> None:
    started = anyio.Event()

    async def hang(payload: Any) -> None:
        started.set()
        await anyio.sleep_forever()

    async def fail(payload: Any) -> None:
        await started.wait()
        raise RuntimeError("broken")

    spec = {
        "name": "fails",
        "steps": {
            "bad": {"handler": "fail"},
            "slow": {"handler": "hang"},
            "later": {"handler": "hang", "depends_on": ["slow"]},
        },
    }
    async with AgentInfra.start(
        state_dir=tmp_path / "state", handlers={"hang": hang, "fail": fail}
    ) as infra:
        workflow = await infra.workflows.create(spec)
        with anyio.fail_after(10):
            status = await (await infra.workflows.start_run(workflow.workflow_id)).wait()
        assert status.state is RunState.FAILED
        assert status.steps["bad"].state is StepState.FAILED
        # 'slow' ran (it was cut short); 'later' never did: each is told so.
        slow, later = status.steps["slow"], status.steps["later"]
        assert (slow.state, slow.error) == (StepState.CANCELLED, "cancelled: step 'bad' failed")
        assert (later.state, later.error) == (StepState.CANCELLED, "not run: step 'bad' failed")
        assert (await infra.get_task_status(slow.task_ids[0])).state is TaskState.CANCELLED
        assert later.task_ids == ()


async def test_a_step_made_ready_after_its_run_failed_never_starts(tmp_path: Path) -> None:
    # 'bad' and 'ok' end at once, 'bad' first: the run has failed when 'ok''s
    # success comes in, and 'after' (pending until then) must not start. It
    # did: its task was submitted, and its handler ran, after the run failed.
    ran: list[Any] = []

    async def ok(payload: Any) -> Any:
        return payload

    async def bad(payload: Any) -> None:
        raise RuntimeError("broken")

    async def record(payload: Any) -> Any:
        ran.append(payload)
        await anyio.sleep(0.05)
        return payload

    spec = {
        "name": "late",
        "steps": {
            "bad": {"handler": "bad"},
            "ok": {"handler": "ok"},
            "after": {"handler": "record", "payload": "${inputs.i}", "depends_on": ["ok"]},
        },
    }
    handlers = {"ok": ok, "bad": bad, "record": record}
    async with AgentInfra.start(state_dir=tmp_path / "state", handlers=handlers) as infra:
        workflow = await infra.workflows.create(spec)
        late = 0
        for i in range(20):
            run = await infra.workflows.start_run(workflow.workflow_id, {"i": i})
            with anyio.fail_after(10):
                events = [(e.type, e.step) async for e in infra.workflows.stream_status(run.run_id)]
            status = await run.status()
            assert status.state is RunState.FAILED
            failed = events.index(("workflow_step_failed", "bad"))
            if failed < events.index(("workflow_step_succeeded", "ok")):
                late += 1
                after = status.steps["after"]
                assert ("workflow_step_started", "after") not in events, events
                assert (after.state, after.error) == (
                    StepState.CANCELLED,
                    "not run: step 'bad' failed",
                )
                assert after.task_ids == ()
                assert i not in ran
        # The order this test is about is the usual one.
        assert late > 0


async def test_a_reference_that_fails_its_step_starts_none_of_the_steps_ready_with_it(
    tmp_path: Path,
) -> None:
    # 'check' and 'evaluate' become ready together; the reference of 'check'
    # names nothing, which fails it, and the run. 'evaluate' was submitted
    # with it all the same, and its handler ran for a run already failed.
    ran: list[Any] = []

    async def prepare(payload: Any) -> Any:
        return {"data": 1}

    async def evaluate(payload: Any) -> Any:
        ran.append(payload)
        await anyio.sleep(0.05)
        return payload

    spec = {
        "name": "unready",
        "steps": {
            "prepare": {"handler": "prepare"},
            "evaluate": {"handler": "evaluate", "depends_on": ["prepare"]},
            "check": {
                "handler": "evaluate",
                "depends_on": ["prepare"],
                "payload": "${steps.prepare.result.missing}",
            },
        },
    }
    handlers = {"prepare": prepare, "evaluate": evaluate}
    async with AgentInfra.start(state_dir=tmp_path / "state", handlers=handlers) as infra:
        workflow = await infra.workflows.create(spec)
        run = await infra.workflows.start_run(workflow.workflow_id)
        with anyio.fail_after(10):
            status = await run.wait()
        assert status.state is RunState.FAILED
        assert status.steps["check"].state is StepState.FAILED
        assert "nothing at 'steps.prepare.result.missing'" in (status.error or "")
        evaluate_ = status.steps["evaluate"]
        assert (evaluate_.state, evaluate_.error, evaluate_.task_ids) == (
            StepState.CANCELLED,
            "not run: step 'check' failed",
            (),
        )
        events = [(e.type, e.step) async for e in infra.workflows.stream_status(run.run_id)]
        assert ("workflow_step_started", "evaluate") not in events
    assert ran == []


async def test_a_step_refused_at_submit_starts_none_of_the_steps_ready_with_it(
    tmp_path: Path,
) -> None:
    # 'big' and 'ok' are submitted together; the scheduler refuses 'big''s
    # payload (over max_payload_bytes), so each is submitted again alone to
    # find whose it was. 'big' failed the run, and 'ok' was submitted all the
    # same: its handler ran for a run already failed.
    ran: list[Any] = []

    async def record(payload: Any) -> Any:
        ran.append(payload)
        return payload

    spec = {
        "name": "refused",
        "steps": {
            "big": {"handler": "record", "payload": "${inputs.text}"},
            "ok": {"handler": "record", "payload": "fine"},
        },
    }
    async with AgentInfra.start(
        {"infra": {"max_payload_bytes": 100}},
        state_dir=tmp_path / "state",
        handlers={"record": record},
    ) as infra:
        workflow = await infra.workflows.create(spec)
        run = await infra.workflows.start_run(workflow.workflow_id, {"text": "x" * 200})
        with anyio.fail_after(10):
            status = await run.wait()
        assert status.state is RunState.FAILED
        assert "over the limit of 100" in (status.steps["big"].error or "")
        ok = status.steps["ok"]
        assert (ok.state, ok.error, ok.task_ids) == (
            StepState.CANCELLED,
            "not run: step 'big' failed",
            (),
        )
        with pytest.raises(UnknownTask):
            await infra.get_task_status(f"{run.run_id}:ok")
        # Neither was told started: 'ok' showed workflow_step_started before its
        # cancel, and 'big' the id of a task that was never stored.
        assert status.steps["big"].task_ids == ()
        events = [(e.type, e.step) async for e in infra.workflows.stream_status(run.run_id)]
        assert events == [
            ("workflow_run_started", None),
            ("workflow_step_failed", "big"),
            ("workflow_step_cancelled", "ok"),
            ("workflow_run_failed", None),
        ]
    assert ran == []


async def test_a_failed_fan_out_task_cancels_its_sibling_tasks(tmp_path: Path) -> None:
    # The failed step's own other tasks were not cancelled: the run was
    # 'failed' while they went on running (holding GPUs, say) to the end.
    started = anyio.Event()

    async def work(item: int) -> None:
        if item == 0:
            await started.wait()
            raise RuntimeError("broken")
        started.set()
        await anyio.sleep_forever()

    spec = {
        "name": "fan-fails",
        "steps": {
            "evaluate": {"handler": "work", "fan_out": "${inputs.items}", "payload": "${item}"}
        },
    }
    async with AgentInfra.start(state_dir=tmp_path / "state", handlers={"work": work}) as infra:
        workflow = await infra.workflows.create(spec)
        with anyio.fail_after(10):
            run = await infra.workflows.start_run(workflow.workflow_id, {"items": [0, 1]})
            status = await run.wait()
        assert status.state is RunState.FAILED
        assert status.steps["evaluate"].state is StepState.FAILED
        failed, sibling = status.steps["evaluate"].task_ids
        assert (await infra.get_task_status(failed)).state is TaskState.FAILED
        assert (await infra.get_task_status(sibling)).state is TaskState.CANCELLED


async def test_a_status_is_a_copy_that_its_caller_may_change(tmp_path: Path) -> None:
    # A status held the engine's own inputs and results: changing them
    # changed what later statuses said and what later steps received.
    gate = anyio.Event()
    received: list[Any] = []

    async def first(payload: Any) -> Any:
        return {"xs": [1, 2]}

    async def hold(payload: Any) -> None:
        await gate.wait()

    async def second(payload: Any) -> Any:
        received.append(payload)
        return payload

    spec = {
        "name": "copies",
        "steps": {
            "a": {"handler": "first"},
            "hold": {"handler": "hold", "depends_on": ["a"]},
            "b": {
                "handler": "second",
                "depends_on": ["hold"],
                "payload": {"a": "${steps.a.result}", "cfg": "${inputs.cfg}"},
            },
        },
    }
    handlers = {"first": first, "hold": hold, "second": second}
    async with AgentInfra.start(state_dir=tmp_path / "state", handlers=handlers) as infra:
        workflow = await infra.workflows.create(spec)
        run = await infra.workflows.start_run(workflow.workflow_id, {"cfg": {"k": "v"}})
        with anyio.fail_after(10):
            while (status := await run.status()).steps["a"].state is not StepState.SUCCEEDED:
                await anyio.sleep(0.01)
        status.inputs["cfg"]["k"] = "changed"
        status.steps["a"].result["xs"].append(3)
        assert status.steps["a"].result == {"xs": [1, 2, 3]}  # its own copy, kept
        assert status.results()["a"] is status.steps["a"].result
        gate.set()
        with anyio.fail_after(10):
            final = await run.wait()
        assert received == [{"a": {"xs": [1, 2]}, "cfg": {"k": "v"}}]
        assert final.inputs == {"cfg": {"k": "v"}}
        assert final.results() == {"a": {"xs": [1, 2]}, "hold": None, "b": received[0]}
        final.results()["b"]["cfg"].clear()
        final.inputs.clear()  # type: ignore[attr-defined]
        again = await infra.workflows.get_run(run.run_id)
        assert again.inputs == {"cfg": {"k": "v"}}
        assert again.results()["b"] == {"a": {"xs": [1, 2]}, "cfg": {"k": "v"}}


def _nested(depth: int, inner: Any = None) -> Any:
    """``inner`` in ``depth`` lists, one in the other."""
    value = inner
    for _ in range(depth):
        value = [value]
    return value


async def _echo(payload: Any) -> Any:
    return payload


async def test_inputs_too_deep_to_use_are_refused_and_never_stop_the_instance(
    tmp_path: Path,
) -> None:
    # Inputs that JSON encoded in start_run could be too deep to decode in
    # the task driving the run (deeper in its stack): a RecursionError there
    # stopped the whole instance. Every depth up to past Python's limit, each
    # started from a task of its own, with as shallow a stack as a script's.
    limit = sys.getrecursionlimit()
    spec = {"name": "deep", "steps": {"s": {"handler": "echo", "payload": "${inputs.x}"}}}
    outcomes: dict[int, str] = {}

    async def start(workflow_id: str, depth: int) -> None:
        try:
            run = await infra.workflows.start_run(workflow_id, {"x": _nested(depth, 1)})
        except InvalidWorkflow as exc:
            outcomes[depth] = str(exc)
            return
        status = await run.wait()
        assert status.state is RunState.SUCCEEDED, (depth, status.error)
        assert status.results() == {"s": _nested(depth, 1)}
        outcomes[depth] = "succeeded"

    async with AgentInfra.start(state_dir=tmp_path / "state", handlers={"echo": _echo}) as infra:
        workflow = await infra.workflows.create(spec)
        depths = [MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, *range(limit - 300, limit + 10)]
        with anyio.fail_after(60):
            for depth in depths:
                async with anyio.create_task_group() as group:
                    group.start_soon(start, workflow.workflow_id, depth)
        # Still serving.
        run = await infra.workflows.start_run(workflow.workflow_id, {"x": 1})
        assert (await run.wait()).results() == {"s": 1}
    assert outcomes[MAX_JSON_DEPTH - 1] == outcomes[MAX_JSON_DEPTH] == "succeeded"
    prefix = f"run of {workflow.workflow_id!r} refused: "
    for depth in depths[2:]:
        assert outcomes[depth].startswith(prefix), outcomes[depth]
        problem = outcomes[depth][len(prefix) :]
        assert problem.startswith(
            "the inputs are not JSON-compatible (maximum recursion depth exceeded"
        ) or problem == (
            f"input 'x' is nested {depth} levels deep, over the limit of {MAX_JSON_DEPTH}"
        ), problem


async def test_a_result_that_cannot_be_read_back_fails_its_step_not_the_instance(
    tmp_path: Path,
) -> None:
    # A result stored by a version that took results nested too deeply for
    # Python to decode: read back by the step that ran it, it raised
    # RecursionError out of the task driving the run, and stopped the instance.
    spec = {"name": "old", "steps": {"s": {"handler": "echo", "payload": 1}}}
    async with AgentInfra.start(state_dir=tmp_path / "state", handlers={"echo": _echo}) as infra:
        await (await infra.submit_task("echo", 1, task_id="r:s")).result()
    db = sqlite3.connect(tmp_path / "state" / "tasks.db")
    with db:
        deep = "[" * 5000 + "]" * 5000
        db.execute("UPDATE tasks SET result = ? WHERE task_id = 'r:s'", (deep,))
    db.close()
    async with AgentInfra.start(state_dir=tmp_path / "state", handlers={"echo": _echo}) as infra:
        workflow = await infra.workflows.create(spec)
        run = await infra.workflows.start_run(workflow.workflow_id, run_id="r")
        with anyio.fail_after(10):
            status = await run.wait()
        assert status.state is RunState.FAILED
        assert status.steps["s"].error == "task 'r:s': its result is nested too deeply to decode"
        again = await infra.workflows.start_run(workflow.workflow_id)
        assert (await again.wait()).results() == {"s": 1}  # still serving


async def test_payloads_as_deep_as_the_limit_are_filled_in_and_deeper_ones_fail_their_step(
    tmp_path: Path,
) -> None:
    # Filling in the references recursed two frames a level: a payload half
    # as deep as the limit failed every run of a workflow that create() took.
    deep: Any = "${inputs.x}"
    for _ in range(MAX_JSON_DEPTH - 1):
        deep = {"k": deep}
    spec = {"name": "deep-payload", "steps": {"s": {"handler": "echo", "payload": deep}}}
    async with AgentInfra.start(state_dir=tmp_path / "state", handlers={"echo": _echo}) as infra:
        workflow = await infra.workflows.create(spec)
        run = await infra.workflows.start_run(workflow.workflow_id, {"x": [1]})
        status = await run.wait()
        assert status.state is RunState.SUCCEEDED, status.error
        result = status.results()["s"]
        for _ in range(MAX_JSON_DEPTH - 1):
            result = result["k"]
        assert result == [1]
        # Together, payload and input are over the limit: the step fails, saying so.
        run = await infra.workflows.start_run(workflow.workflow_id, {"x": [[[1]]]})
        status = await run.wait()
        assert status.state is RunState.FAILED
        assert status.steps["s"].error == (
            f"task '{run.run_id}:s' refused: the payload is nested {MAX_JSON_DEPTH + 2} "
            f"levels deep, over the limit of {MAX_JSON_DEPTH}"
        )
        too_deep = {"name": "too-deep", "steps": {"s": {"handler": "echo", "payload": [[deep]]}}}
        with pytest.raises(
            InvalidWorkflow,
            match=rf"step 's': the payload is nested {MAX_JSON_DEPTH + 1} levels deep, over",
        ):
            await infra.workflows.create(too_deep)


async def test_creates_of_one_spec_at_once_are_one_workflow(tmp_path: Path) -> None:
    # Each create stored its own created_at (the store kept the first one's)
    # and returned it: equal specs, unequal workflows, and get() told one of
    # them until a restart told another.
    state_dir = tmp_path / "state"
    async with AgentInfra.start(state_dir=state_dir, handlers={"double": _double}) as infra:
        created = []

        async def create() -> None:
            created.append(await infra.workflows.create(_ONE_STEP))

        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(create)
        assert created[0] == created[1] == created[2]
        assert await infra.workflows.get(created[0].workflow_id) == created[0]
        assert await infra.workflows.list() == [created[0]]
        # A create cancelled as it waits for its commit: stored, so known.
        other = {**_ONE_STEP, "name": "other"}
        with anyio.move_on_after(0):
            await infra.workflows.create(other)
        known = await infra.workflows.list()
        assert [w.name for w in known] == ["one", "other"]
    async with AgentInfra.start(state_dir=state_dir, handlers={"double": _double}) as infra:
        assert await infra.workflows.list() == known


async def test_a_run_id_taken_by_another_workflow_is_refused(tmp_path: Path) -> None:
    # The run under the id was returned, whatever the workflow asked for: a
    # spec edited (another workflow) and started again under its run's id
    # silently gave the old spec's run back.
    state_dir = tmp_path / "state"
    async with AgentInfra.start(state_dir=state_dir, handlers={"double": _double}) as infra:
        first = await infra.workflows.create(_ONE_STEP)
        edited = await infra.workflows.create({**_ONE_STEP, "name": "edited"})
        run = await infra.workflows.start_run(first.workflow_id, {"x": 1}, run_id="nightly")
        taken = (
            f"run of {edited.workflow_id!r} refused: run_id 'nightly' is taken by a run of "
            f"{first.workflow_id!r}"
        )
        with pytest.raises(InvalidWorkflow) as refused:
            await infra.workflows.start_run(edited.workflow_id, {"x": 2}, run_id="nightly")
        assert str(refused.value) == taken
        assert (await run.wait()).results() == {"double": 2}
        again = await infra.workflows.start_run(first.workflow_id, {"x": 1}, run_id="nightly")
        assert again.run_id == "nightly"
    async with AgentInfra.start(state_dir=state_dir, handlers={"double": _double}) as infra:
        # Found in the store, not in memory: the same.
        with pytest.raises(InvalidWorkflow) as refused:
            await infra.workflows.start_run(edited.workflow_id, {"x": 2}, run_id="nightly")
        assert str(refused.value) == taken
        again = await infra.workflows.start_run(first.workflow_id, {"x": 1}, run_id="nightly")
        assert (await again.wait()).results() == {"double": 2}


async def test_a_run_whose_start_fails_to_commit_is_never_handed_out(tmp_path: Path) -> None:
    # A second start_run of the id returned a handle while the first's commit
    # was under way: the commit failed, and its wait() (as a wait_run of the
    # id meanwhile) waited for ever, after the instance had stopped.
    state_dir = tmp_path / "state"
    outcomes: dict[str, object] = {}

    async def start(name: str, workflow_id: str, wfs: Any) -> None:
        try:
            outcomes[name] = await wfs.start_run(workflow_id, {"x": 1}, run_id="r")
        except (InfraError, sqlite3.Error) as exc:
            outcomes[name] = exc

    async def wait(wfs: Any) -> None:
        try:
            outcomes["wait"] = await wfs.wait_run("r")
        except InfraError as exc:
            outcomes["wait"] = exc

    with anyio.fail_after(10):
        # The callers' task group is entered first: it outlives the instance.
        async with anyio.create_task_group() as callers:
            with pytest.raises(ExceptionGroup) as stopped:  # noqa: PT012
                async with AgentInfra.start(
                    state_dir=state_dir, handlers={"double": _double}
                ) as infra:
                    workflow = await infra.workflows.create(_ONE_STEP)
                    wfs = infra.workflows
                    with closing(sqlite3.connect(state_dir / "tasks.db")) as db:
                        # Held until the others wait: the first's commit waits for it.
                        db.execute("BEGIN IMMEDIATE")
                        db.execute(
                            "CREATE TRIGGER refuse BEFORE INSERT ON workflow_runs "
                            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
                        )
                        callers.start_soon(start, "first", workflow.workflow_id, wfs)
                        while True:  # until the first is committing
                            with suppress(UnknownRun):
                                await wfs.get_run("r")
                                break
                        callers.start_soon(start, "second", workflow.workflow_id, wfs)
                        callers.start_soon(wait, wfs)
                        await anyio.sleep(0.1)
                        db.commit()
                    await anyio.sleep_forever()
    assert stopped.group_contains(StoreFailed, match="disk full")
    assert set(outcomes) == {"first", "second", "wait"}
    assert "disk full" in str(outcomes["first"]), outcomes
    assert "disk full" in str(outcomes["second"]), outcomes
    assert isinstance(outcomes["wait"], InfraClosed), outcomes
    assert str(outcomes["wait"]) == (
        "run 'r' was never stored: the commit of its start failed, which stops the instance"
    )


async def test_a_run_whose_end_fails_to_commit_is_not_told_finished(tmp_path: Path) -> None:
    # The run's final state was set before its commit: when that commit
    # failed (which stops the instance), wait() and a status stream told the
    # run succeeded, which the store never held; the next instance resumes it.
    state_dir = tmp_path / "state"
    outcomes: dict[str, object] = {}

    async def wait(run: Any) -> None:
        try:
            outcomes["wait"] = await run.wait()
        except InfraError as exc:
            outcomes["wait"] = exc

    async def follow(wfs: Any, run_id: str) -> None:
        try:
            outcomes["stream"] = [e.type async for e in wfs.stream_status(run_id)]
        except InfraError as exc:
            outcomes["stream"] = exc

    with anyio.fail_after(10):
        async with anyio.create_task_group() as callers:
            with pytest.raises(ExceptionGroup) as stopped:  # noqa: PT012
                async with AgentInfra.start(
                    state_dir=state_dir, handlers={"double": _double}
                ) as infra:
                    workflow = await infra.workflows.create(_ONE_STEP)
                    with closing(sqlite3.connect(state_dir / "tasks.db")) as db, db:
                        db.execute(
                            "CREATE TRIGGER refuse BEFORE UPDATE ON workflow_runs "
                            "WHEN NEW.state = 'succeeded' "
                            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
                        )
                    run = await infra.workflows.start_run(workflow.workflow_id, {"x": 1})
                    callers.start_soon(wait, run)
                    callers.start_soon(follow, infra.workflows, run.run_id)
                    await anyio.sleep_forever()
    assert stopped.group_contains(StoreFailed, match="disk full")
    for name in ("wait", "stream"):
        assert isinstance(outcomes[name], InfraClosed), outcomes
        assert str(outcomes[name]).startswith(
            f"the end of run {run.run_id!r} (succeeded) could not be stored: "
        ), outcomes
        assert "disk full" in str(outcomes[name])
    with closing(sqlite3.connect(state_dir / "tasks.db")) as db, db:
        db.execute("DROP TRIGGER refuse")
    async with AgentInfra.start(state_dir=state_dir, handlers={"double": _double}) as infra:
        with anyio.fail_after(10):
            assert (await infra.workflows.wait_run(run.run_id)).results() == {"double": 2}


async def test_a_status_stream_of_a_run_whose_start_fails_to_commit_says_it_was_never_stored(
    tmp_path: Path,
) -> None:
    # Followed while its start was committing, the run whose commit failed
    # was said to resume when an instance opens on the same state_dir: no
    # instance ever would, since nothing of it was stored.
    state_dir = tmp_path / "state"
    outcomes: dict[str, object] = {}

    async def start(workflow_id: str, wfs: Any) -> None:
        with suppress(InfraError, sqlite3.Error):
            await wfs.start_run(workflow_id, {"x": 1}, run_id="r")

    async def follow(wfs: Any) -> None:
        try:
            outcomes["stream"] = [e.type async for e in wfs.stream_status("r")]
        except InfraError as exc:
            outcomes["stream"] = exc

    with anyio.fail_after(10):
        async with anyio.create_task_group() as callers:
            with pytest.raises(ExceptionGroup):  # noqa: PT012
                async with AgentInfra.start(
                    state_dir=state_dir, handlers={"double": _double}
                ) as infra:
                    workflow = await infra.workflows.create(_ONE_STEP)
                    wfs = infra.workflows
                    with closing(sqlite3.connect(state_dir / "tasks.db")) as db:
                        # Held until the stream follows: the start's commit waits for it.
                        db.execute("BEGIN IMMEDIATE")
                        db.execute(
                            "CREATE TRIGGER refuse BEFORE INSERT ON workflow_runs "
                            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
                        )
                        callers.start_soon(start, workflow.workflow_id, wfs)
                        while True:  # until the start is committing
                            with suppress(UnknownRun):
                                await wfs.get_run("r")
                                break
                        callers.start_soon(follow, wfs)
                        await anyio.sleep(0.1)
                        db.commit()
                    await anyio.sleep_forever()
    assert isinstance(outcomes["stream"], InfraClosed), outcomes
    assert str(outcomes["stream"]) == (
        "run 'r' was never stored: the commit of its start failed, which stops the instance"
    )


async def test_a_reference_with_a_malformed_index_fails_its_step_naming_it(
    tmp_path: Path,
) -> None:
    # "--1" passed for an index (a '-' stripped, digits left) and int() failed:
    # the step's error was a bare "invalid literal for int()", naming neither
    # the reference nor what was wrong with it.
    spec = {"name": "index", "steps": {"s": {"handler": "echo", "payload": "${inputs.xs.--1}"}}}
    async with AgentInfra.start(state_dir=tmp_path / "state", handlers={"echo": _echo}) as infra:
        workflow = await infra.workflows.create(spec)
        status = await (await infra.workflows.start_run(workflow.workflow_id, {"xs": [1]})).wait()
        assert status.state is RunState.FAILED
        assert status.steps["s"].error == (
            "${inputs.xs.--1}: nothing at 'inputs.xs.--1' "
            "(a list of 1: an index is an integer from -1 to 0)"
        )
        # The same name is a key of a mapping.
        run = await infra.workflows.start_run(workflow.workflow_id, {"xs": {"--1": 2}})
        assert (await run.wait()).results() == {"s": 2}


async def test_a_reference_with_an_index_of_thousands_of_digits_names_it(
    tmp_path: Path,
) -> None:
    # Digits all, it was given to int(), which refuses more than 4300 of
    # them: the step failed with "ValueError: Exceeds the limit (4300 digits)
    # for integer string conversion", naming not the reference.
    index = "1" * 5000
    spec = {
        "name": "long",
        "steps": {"s": {"handler": "echo", "payload": f"${{inputs.xs.{index}}}"}},
    }
    async with AgentInfra.start(state_dir=tmp_path / "state", handlers={"echo": _echo}) as infra:
        workflow = await infra.workflows.create(spec)
        status = await (await infra.workflows.start_run(workflow.workflow_id, {"xs": [1]})).wait()
        assert status.state is RunState.FAILED
        assert status.steps["s"].error == (
            f"${{inputs.xs.{index}}}: nothing at 'inputs.xs.{index}' "
            "(a list of 1: an index is an integer from -1 to 0)"
        )
