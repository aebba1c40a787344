"""``infra.workflows``: DAG runs on top of the scheduler.

A run is driven by one task of the engine's task group. A step starts when
all its dependencies have succeeded; it is submitted to the scheduler as
ordinary tasks (one, or one per element for a fan-out), with ids derived
from the run and the step (``RUN:STEP``, ``RUN:STEP:INDEX``). The tasks are
therefore what makes a run durable: after a crash, the next instance
re-drives every unfinished run from its first step, and submitting a step's
tasks again is idempotent, so that a step whose tasks had finished is not
run again (its results are read back), one whose tasks were queued or
running goes on as the scheduler recovered them, and the others start. A
run whose cancel, or a step's failure, was stored only ends (see _drive).

The run and step rows (in the task store's file, through its journal) are
what :meth:`WorkflowEngine.get_run` reads for runs that are not in memory,
and say which runs to resume. A step's row is written without waiting for
its commit: a crash that loses it loses nothing that the tasks do not hold.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from contextlib import AsyncExitStack, aclosing
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, cast

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from dspy_infra.errors import InfraClosed, InvalidTask
from dspy_infra.events import EventBus, EventsDropped, check_since
from dspy_infra.metrics import Metrics
from dspy_infra.scheduling.checks import encode_json, json_too_deep, too_deep_error
from dspy_infra.scheduling.store import RunRow, StepRow, Written, dumps, loads
from dspy_infra.scheduling.tasks import TaskRequest, TaskState
from dspy_infra.workflows.model import (
    Encoded,
    RunHandle,
    RunState,
    RunStatus,
    StepState,
    StepStatus,
    Workflow,
    WorkflowEvent,
)
from dspy_infra.workflows.spec import (
    InvalidWorkflow,
    ReferenceError_,
    Step,
    UnknownRun,
    UnknownWorkflow,
    WorkflowSpec,
    check_id,
    check_new_run_id,
    inputs_dict,
    resolve,
    run_key,
    workflow_key,
)

if TYPE_CHECKING:
    from dspy_infra.scheduling.scheduler import LocalScheduler

__all__ = ["WorkflowEngine"]

log = logging.getLogger("dspy_infra.workflows")

_RECENT = 1000  # finished runs kept in memory; older ones are read from the store


_UNREAD: Any = object()  # a value not decoded (yet) from its JSON text
# The error of a run row still 'running' whose cancel_run() has begun (a
# running run has no error otherwise): the next instance finishes the cancel
# if a crash cut it short, rather than read the tasks it had cancelled as
# failures of the run, or run the rest.
_CANCELLING = "cancelling: cancel_run() was called"


def _loads(text: str | None) -> Any:
    return None if text is None else loads(text)


class _Step:
    __slots__ = (
        "error",
        "finished_at",
        "name",
        "result_json",
        "spec",
        "started_at",
        "state",
        "task_ids",
        "value",
    )

    def __init__(self, spec: Step):
        self.spec = spec
        self.name = spec.name
        self.state = StepState.PENDING
        self.task_ids: tuple[str, ...] = ()
        # The result is kept as JSON text: each status decodes its own copy,
        # which the caller may change without changing the run (or what the
        # steps that refer to it receive).
        self.result_json: str | None = None
        self.value: Any = _UNREAD  # the result decoded, once a reference needs it
        self.error: str | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None

    def result(self) -> Any:
        """The result for the references of the steps after it: decoded once, never handed out."""
        if self.value is _UNREAD:
            self.value = _loads(self.result_json)
        return self.value

    def status(self) -> StepStatus:
        return StepStatus(
            name=self.name,
            state=self.state,
            task_ids=self.task_ids,
            result=None if self.result_json is None else Encoded(self.result_json),
            error=self.error,
            started_at=self.started_at,
            finished_at=self.finished_at,
        )

    def row(self, run_id: str) -> StepRow:
        return (
            run_id,
            self.name,
            self.state.value,
            json.dumps(self.task_ids),
            self.result_json if self.state is StepState.SUCCEEDED else None,
            self.error,
            self.started_at,
            self.finished_at,
        )


class _Run:
    def __init__(self, run_id: str, workflow: Workflow, inputs_json: str, created_at: float):
        self.run_id = run_id
        self.workflow = workflow
        # As JSON text, as a step's result is (see _Step).
        self.inputs_json = inputs_json
        self.inputs: Any = _UNREAD  # decoded, once a reference needs them
        self.created_at = created_at
        self.state = RunState.RUNNING
        self.finished_at: float | None = None
        self.error: str | None = None
        self.steps = {s.name: _Step(s) for s in workflow.spec.steps}
        self.dependents: dict[str, builtins.list[_Step]] = {name: [] for name in self.steps}
        for step in self.steps.values():
            for dep in step.spec.depends_on:
                self.dependents[dep].append(step)
        self.events: list[WorkflowEvent] = []
        self.done = anyio.Event()
        self.scope: anyio.CancelScope | None = None
        self.cancel_requested = False
        self.storing: Written | None = None  # the commit of its start, while under way
        self.never_stored = False  # that commit failed
        # The commit of its final state, until it is over: a closing instance
        # (whose journal commits what it has) may cut _finish short as it waits.
        self.ending: Written | None = None
        # Its id was made by this instance: its tasks' ids (RUN:STEP...)
        # cannot be stored, and the scheduler need not look them up.
        self.fresh = False

    def input_values(self) -> Any:
        """The inputs for the references: decoded once, never handed out."""
        if self.inputs is _UNREAD:
            self.inputs = json.loads(self.inputs_json)
        return self.inputs

    def forget_values(self) -> None:
        """Drop what was decoded for the references: a finished run keeps its text only."""
        self.inputs = _UNREAD
        for step in self.steps.values():
            step.value = _UNREAD

    def status(self) -> RunStatus:
        return RunStatus(
            run_id=self.run_id,
            workflow_id=self.workflow.workflow_id,
            state=self.state,
            # Decoded by the status when read (see Encoded).
            inputs=cast(Mapping[str, Any], Encoded(self.inputs_json)),
            steps={name: step.status() for name, step in self.steps.items()},
            created_at=self.created_at,
            finished_at=self.finished_at,
            error=self.error,
        )


class WorkflowEngine:
    """Create workflows, start, follow and cancel their runs. Reached as ``infra.workflows``."""

    def __init__(
        self,
        *,
        scheduler: LocalScheduler,
        bus: EventBus,
        metrics: Metrics,
    ):
        self._scheduler = scheduler
        # The runs' rows live in the tasks' store, written by its one writer.
        self._journal = scheduler.journal
        self._store = scheduler.store
        self._bus = bus
        self._metrics = metrics
        self._workflows: dict[str, Workflow] = {}
        # Stored workflows that do not load, and why: their runs end failed.
        self._unloadable: dict[str, str] = {}
        self._storing: dict[str, Written] = {}  # created, their commit not yet over
        self._loaded = False
        self._runs: dict[str, _Run] = {}  # unfinished, and the recent finished ones
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._tg: TaskGroup | None = None
        self._stack: AsyncExitStack | None = None
        self._open = False
        # keep_finished forgets finished runs (and their steps) as it does tasks.
        scheduler.forget_also(self._store.runs_finished_before, "forget_run", self._forgetting)
        scheduler.cancel_on_recovery(self._not_to_run_again)

    # -- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> Self:
        async with AsyncExitStack() as stack:
            await self._journal.read(self._load_workflows)
            # Last on the way out, once the drivers are gone: who waits for a
            # run that did not finish in this instance stops waiting.
            stack.callback(self._release_waiters)
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            # On the way out the drivers are cancelled before anything else
            # closes: a run cut short by close() stays 'running' in the store,
            # for the next instance to resume.
            stack.callback(self._tg.cancel_scope.cancel)
            stack.callback(self._close_gate)
            self._metrics.read(self._metrics.workflow_runs_active, self._active)
            self._open = True
            await self._resume()
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.__aexit__(et, e, tb)

    def _load_workflows(self) -> None:
        """Read the stored workflows, once (a read of the store, in a worker thread).

        Called as the scheduler recovers its tasks, if it has any, or else as
        the engine opens.
        """
        if self._loaded:
            return
        self._loaded = True
        for workflow_id, _, spec, created_at in self._store.workflows():
            try:
                loaded = WorkflowSpec.from_mapping(json.loads(spec))
            except (ValueError, RecursionError, InvalidWorkflow) as exc:
                # Stored by a version that accepted it (or read deeper in
                # the stack than it was written): its runs cannot be resumed.
                log.warning("stored workflow %s is not valid any more: %s", workflow_id, exc)
                self._unloadable[workflow_id] = f"is not valid any more: {exc}"
                continue
            self._workflows[workflow_id] = Workflow(
                workflow_id=workflow_id, spec=loaded, created_at=created_at
            )

    def _unloadable_error(self, workflow_id: str) -> str:
        """Why a run of ``workflow_id``, which is not loaded, cannot go on."""
        return f"workflow {workflow_id!r} {self._unloadable.get(workflow_id, 'is not stored')}"

    def _not_to_run_again(self, task_ids: builtins.list[str]) -> dict[str, str]:
        """The recovered tasks of runs that will not go on: the scheduler cancels
        them as it opens, before it would dispatch them (and run again their work)
        ahead of the runs' resumption here. Those of runs whose cancel or failure
        a crash cut short, and of runs whose workflow does not load (which end failed)."""
        self._load_workflows()
        reasons: dict[str, str] = {}
        for run_id, workflow_id, *_, error in self._store.runs():
            if error == _CANCELLING:
                reasons[run_id] = "cancelled by cancel_run()"
            elif workflow_id not in self._workflows:
                reasons[run_id] = f"cancelled: {self._unloadable_error(workflow_id)}"
            elif (first := _failed_first(self._store.steps(run_id))) is not None:
                reasons[run_id] = f"cancelled: step {first!r} failed"
        if not reasons:
            return {}
        # A task of a run is RUN:STEP[:INDEX], and a run's id holds no ':'.
        found = ((t, reasons.get(t.partition(":")[0])) for t in task_ids if ":" in t)
        return {t: reason for t, reason in found if reason is not None}

    def _close_gate(self) -> None:
        self._open = False

    def _release_waiters(self) -> None:
        for run in self._runs.values():
            run.done.set()

    async def _forgetting(self, run_ids: list[str]) -> None:
        for run_id in run_ids:
            self._runs.pop(run_id, None)
            self._recent.pop(run_id, None)

    def _active(self) -> float:
        return float(sum(1 for run in self._runs.values() if not run.state.finished))

    def _check_open(self) -> None:
        if not self._open:
            raise InfraClosed("the workflow engine is not running: use it inside `async with`")

    async def _resume(self) -> None:
        rows = await self._journal.read(self._store.runs)
        for row in rows:
            run = self._run_from_row(row)
            if run is None:
                await self._end_unloadable(row)
                continue
            step_rows = await self._journal.read(self._store.steps, run.run_id)
            # A cancel, or a failure (a step's stored), goes on from where it
            # was: the running steps' rows name the tasks it has to cancel.
            ending = run.cancel_requested or _failed_first(step_rows) is not None
            for step_row in step_rows:
                step = run.steps.get(step_row[1])
                if step is not None and (ending or step_row[2] == StepState.SUCCEEDED.value):
                    self._restore_step(step, step_row)
                elif step is not None:
                    # Submitted again when it starts; until then, the tasks
                    # that a cancel or a failure of the run has to stop (the
                    # scheduler recovered them, and runs them meanwhile).
                    step.task_ids = tuple(json.loads(step_row[3]))
            self._runs[run.run_id] = run
            self._publish(run, "workflow_run_resumed", RunState.RUNNING.value)
            assert self._tg is not None
            self._tg.start_soon(self._drive, run)
        if rows:
            log.info("resumed %d unfinished workflow runs", len(rows))

    async def _end_unloadable(self, row: RunRow) -> None:
        """End a run whose workflow does not load: failed, saying why (even one whose
        cancel a crash cut short). Left 'running', it stayed so for ever, and
        get_run() called it unknown; its tasks were cancelled as the scheduler
        recovered them (see _not_to_run_again)."""
        run_id, workflow_id = row[0], row[1]
        error = self._unloadable_error(workflow_id)
        log.warning("run %s failed: %s", run_id, error)
        now = time.time()
        for _, name, step_state, task_ids, _, _, started_at, _ in await self._journal.read(
            self._store.steps, run_id
        ):
            if not StepState(step_state).finished:
                cancelled = StepState.CANCELLED.value, task_ids, None, f"cancelled: {error}"
                self._journal.write(("step", (run_id, name, *cancelled, started_at, now)))
        failed = RunState.FAILED.value
        await self._journal.commit(("run_state", (failed, now, error, run_id)))
        self._metrics.workflow_runs.labels(failed).inc()
        self._bus.publish(
            WorkflowEvent(
                type=f"workflow_run_{failed}",
                run_id=run_id,
                workflow_id=workflow_id,
                state=failed,
                error=error,
            )
        )

    def _run_from_row(self, row: RunRow) -> _Run | None:
        """The run a row stores; None if its workflow is not loaded."""
        run_id, workflow_id, inputs, state, created_at, finished_at, error = row
        workflow = self._workflows.get(workflow_id)
        if workflow is None:
            return None
        run = _Run(run_id, workflow, inputs, created_at)
        run.state = RunState(state)
        run.finished_at = finished_at
        run.error = error
        if run.state is RunState.RUNNING and error == _CANCELLING:
            run.cancel_requested = True
            run.error = None
        return run

    @staticmethod
    def _restore_step(step: _Step, row: StepRow) -> None:
        _, _, state, task_ids, result, error, started_at, finished_at = row
        step.state = StepState(state)
        step.task_ids = tuple(json.loads(task_ids))
        step.result_json = result
        step.error = error
        step.started_at = started_at
        step.finished_at = finished_at

    # -- the API --------------------------------------------------------------

    async def create(
        self, spec: WorkflowSpec | Mapping[str, Any] | str | os.PathLike[str]
    ) -> Workflow:
        """Validate and store a workflow; the same spec gives the same ``workflow_id``.

        ``spec`` is a :class:`WorkflowSpec`, a mapping (the TOML layout), or
        the path of a TOML file. Raises :class:`InvalidWorkflow`, storing
        nothing: cycles (with the whole path), unknown steps in
        ``depends_on`` or references, unknown classes and handlers, and
        anything a task submit would refuse but the payload.
        """
        self._check_open()
        if isinstance(spec, str | os.PathLike):
            spec = await anyio.to_thread.run_sync(WorkflowSpec.from_file, spec)
        elif not isinstance(spec, WorkflowSpec):
            spec = WorkflowSpec.from_mapping(spec)
        # A WorkflowSpec validated itself when it was made (it is frozen).
        for step in spec.steps:
            self._check_step(spec, step)
        workflow_id = spec.workflow_id()
        found = self._workflows.get(workflow_id)
        if found is not None:
            storing = self._storing.get(workflow_id)
            if storing is not None:  # created by a concurrent call: returned once stored
                await storing.wait()
            return found
        text = json.dumps(spec.to_mapping())
        # The engine's own copy, as a restart reads it back: the caller's
        # payload objects, changed later, changed later runs under the same id.
        spec = WorkflowSpec.from_mapping(json.loads(text))
        workflow = Workflow(workflow_id=workflow_id, spec=spec, created_at=time.time())
        # Known before its commit, as a run is (see start_run): a concurrent
        # create of the same spec returns it, not one of its own with another
        # created_at than the one the store keeps.
        self._workflows[workflow_id] = workflow
        row = (workflow_id, spec.name, text, workflow.created_at)
        self._storing[workflow_id] = storing = self._journal.write(("workflow", row))
        try:
            # Shielded: once written, it is stored, and must stay known.
            with anyio.CancelScope(shield=True):
                await storing.wait()
        except BaseException:  # the commit failed: nothing was stored
            del self._workflows[workflow_id]
            raise
        finally:
            del self._storing[workflow_id]
        return workflow

    def _check_step(self, spec: WorkflowSpec, step: Step) -> None:
        request = TaskRequest(
            handler=step.handler,
            task_class=step.task_class,
            priority=step.priority,
            needs=step.needs,
            max_attempts=step.max_attempts,
            timeout=step.timeout,
        )
        try:
            # The scheduler's own checks of a submit, but for the payload
            # (which references fill in only when the step starts).
            self._scheduler.check(step.name, request)
        except InvalidTask as exc:
            reason = str(exc).split(" refused: ", 1)[-1]
            raise InvalidWorkflow(f"workflow {spec.name!r}: step {step.name!r}: {reason}") from None

    async def get(self, workflow_id: str) -> Workflow:
        """A stored workflow; :class:`UnknownWorkflow` if there is none."""
        self._check_open()
        try:
            return self._workflows[workflow_key(workflow_id)]
        except KeyError:
            raise UnknownWorkflow(workflow_id) from None

    async def list(self) -> builtins.list[Workflow]:
        """Every stored workflow, oldest first."""
        self._check_open()
        return sorted(self._workflows.values(), key=lambda w: w.created_at)

    async def start_run(
        self,
        workflow_id: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
    ) -> RunHandle:
        """Start a run of the workflow with ``inputs``; returns once it is stored.

        Starting again with the same ``run_id`` returns the run already there.
        Raises :class:`InvalidWorkflow` when an input its references use is
        missing, the inputs are not JSON-compatible, or ``run_id`` is taken by
        a run of another workflow.
        """
        check_id(workflow_id, "workflow_id")
        if run_id is not None:
            check_new_run_id(run_id)
        workflow = await self.get(workflow_id)
        fresh = run_id is None
        if run_id is not None:
            taken_by = await self._workflow_of(run_id)
            if taken_by == workflow_id:
                starting = self._runs.get(run_id)
                if starting is not None and starting.storing is not None:
                    # Started by a concurrent call: handed out once stored too.
                    await starting.storing.wait()
                return RunHandle(run_id, engine=self)
            if taken_by is not None:
                # Not the run asked for (that of a spec since edited, say).
                raise InvalidWorkflow(
                    f"run of {workflow_id!r} refused: run_id {run_id!r} is taken by a run "
                    f"of {taken_by!r}"
                )
        else:
            run_id = f"{time.time_ns() // 1_000_000:012x}{os.urandom(6).hex()}"
        inputs = inputs_dict(workflow_id, inputs)
        missing = sorted(workflow.spec.inputs() - set(inputs))
        if missing:
            raise InvalidWorkflow(
                f"run of {workflow_id!r} refused: missing inputs {', '.join(missing)}"
            )
        try:
            inputs_json = encode_json(inputs, "the inputs", verb="are")
        except ValueError as exc:
            raise InvalidWorkflow(f"run of {workflow_id!r} refused: {exc}") from None
        if json_too_deep(inputs_json) and (problem := _too_deep_input(inputs)):
            # Encoded here, they could be too deep to decode in the task that
            # drives the run, whose failure stopped the instance; and the
            # step that refers to one could not submit it as its payload.
            raise InvalidWorkflow(f"run of {workflow_id!r} refused: {problem}")
        run = _Run(run_id, workflow, inputs_json, time.time())
        # Spares the scheduler a store look-up (a thread hop) per submit,
        # most of a chain's cost.
        run.fresh = fresh
        self._runs[run_id] = run
        row = (run_id, workflow_id, inputs_json, run.state.value, run.created_at, None, None)
        run.storing = self._journal.write(("run", row))
        try:
            # Shielded: once written, the run is stored, and must be driven
            # here (a cancelled caller would leave it for the next instance).
            with anyio.CancelScope(shield=True):
                await run.storing.wait()
        except BaseException:  # the commit failed: nothing was stored
            self._runs.pop(run_id, None)
            run.never_stored = True
            run.done.set()  # a wait_run() of its id meanwhile is told so
            raise
        finally:
            run.storing = None
        self._publish(run, "workflow_run_started", RunState.RUNNING.value)
        assert self._tg is not None
        self._tg.start_soon(self._drive, run)
        return RunHandle(run_id, engine=self)

    async def _workflow_of(self, run_id: str) -> str | None:
        """The workflow id of the run ``run_id``, in memory or stored; None if there is none."""
        run = self._runs.get(run_id)
        if run is None:
            rows = await self._journal.read(self._store.runs, run_id)
            # Again after the read: a concurrent call with this id may have
            # registered its run meanwhile.
            run = self._runs.get(run_id)
            if run is None:
                return cast(str, rows[0][1]) if rows else None
        return run.workflow.workflow_id

    async def get_run(self, run_id: str) -> RunStatus:
        """The run's status now; :class:`UnknownRun` if there is none."""
        run = self._runs.get(run_key(run_id))
        if run is not None:
            return run.status()
        rows = await self._journal.read(self._store.runs, run_id)
        if not rows:
            raise UnknownRun(run_id)
        step_rows = await self._journal.read(self._store.steps, run_id)
        stored = self._run_from_row(rows[0])
        if stored is None:
            return _unloadable_status(rows[0], step_rows)
        for step_row in step_rows:
            step = stored.steps.get(step_row[1])
            if step is not None:
                self._restore_step(step, step_row)
        return stored.status()

    async def wait_run(self, run_id: str) -> RunStatus:
        """Wait until the run has finished; its final status."""
        run = self._runs.get(run_key(run_id))
        if run is not None:
            if not run.done.is_set():
                self._check_open()
                await run.done.wait()
            await _check_finished(run)
        return await self.get_run(run_id)

    async def cancel_run(self, run_id: str) -> RunStatus:
        """Cancel a run: its running steps' tasks are cancelled, its pending steps never start.

        Returns once it has stopped, with its status. A finished run is left as it is.
        """
        self._check_open()
        run = self._runs.get(run_key(run_id))
        if run is None:
            return await self.get_run(run_id)
        if not run.state.finished:
            run.cancel_requested = True
            if run.scope is not None:
                run.scope.cancel()
        return await self.wait_run(run_id)

    async def stream_status(
        self, run_id: str, *, since: int | None = None
    ) -> AsyncGenerator[WorkflowEvent, None]:
        """The run's events, from its start (or after ``since``), until it finishes.

        Each is a :class:`WorkflowEvent` (``type``, ``seq``, ``step``,
        ``state``, ...). Pass the ``seq`` of the last one read as ``since`` to
        resume. A run that is not in this instance's memory (finished long
        ago) gives its final state, rebuilt from the store (``seq`` 0).
        Raises :class:`InfraClosed` when the instance closes before the run's
        final event, as :meth:`wait_run` does.
        """
        self._check_open()
        check_since(since)
        run = self._runs.get(run_key(run_id))
        if run is None:
            for event in _from_status(await self.get_run(run_id)):
                yield event
            return
        last = self._resume_after(since)
        async with self._bus.subscribe(WorkflowEvent.TYPES) as live:
            # Read in the same step as the subscription: nothing is missed
            # between the two, and `last` drops what both hold. Read as it
            # grows (a list's iterator sees what is appended), not copied: a
            # reader that pauses here while the run ends finds the rest here,
            # and the buffer is not read once the run is done.
            for event in (e for e in run.events if e.seq > last):
                last = event.seq
                yield event
                if event.type in WorkflowEvent.RUN_FINAL_TYPES:
                    return
            if run.done.is_set():
                # Resumed after its last event (published): nothing more will
                # come. Or its instance is closing, before that event.
                await _check_finished(run)
                return
            async for item in live:
                if isinstance(item, EventsDropped):
                    for missed in [e for e in run.events if e.seq > last]:
                        last = missed.seq
                        yield missed
                        if missed.type in WorkflowEvent.RUN_FINAL_TYPES:
                            return
                    continue
                if not isinstance(item, WorkflowEvent) or item.run_id != run_id:
                    continue
                if item.seq <= last:
                    continue
                last = item.seq
                yield item
                if item.type in WorkflowEvent.RUN_FINAL_TYPES:
                    return
        # The bus closed with the instance before the run's final event: not a
        # quiet end, which a reader would take for the end of the run.
        await _check_finished(run)
        raise _closed_before(run_id)

    def _resume_after(self, since: int | None) -> int:
        """The seq after which a status stream given ``since`` starts."""
        if since is not None and since > self._bus.last_seq:
            # A seq this instance has not reached is from an earlier one (whose
            # seqs began at 1, as this one's did): a reader back after a
            # restart. Every event of the run here is new to it, from
            # workflow_run_resumed on; skipping those below its old seq hid
            # them, and the final one too, so that the stream never ended.
            return 0
        return since or 0

    # -- driving a run --------------------------------------------------------

    async def _drive(self, run: _Run) -> None:
        # Those of a resumed run whose failure a crash cut short: it only ends.
        failed = sorted(
            (s for s in run.steps.values() if s.state is StepState.FAILED),
            key=lambda s: s.finished_at or 0.0,
        )
        with anyio.CancelScope() as scope:
            run.scope = scope
            if not (run.cancel_requested or failed):
                async with anyio.create_task_group() as tg:
                    self._start_ready(run, tg, failed)
        run.scope = None
        # Here only if the run ended, failed or was cancelled by cancel_run():
        # a close() of the instance cancels this task from outside, and the
        # run stays 'running' in the store.
        if run.cancel_requested:
            # Stored before any task is cancelled: see _CANCELLING.
            await self._journal.commit(
                ("run_state", (RunState.RUNNING.value, None, _CANCELLING, run.run_id))
            )
            await self._cascade(run, "cancelled by cancel_run()", "cancelled by cancel_run()")
            await self._finish(run, RunState.CANCELLED, "cancelled")
        elif failed:
            first = failed[0]
            await self._cascade(
                run,
                f"cancelled: step {first.name!r} failed",
                f"not run: step {first.name!r} failed",
            )
            await self._finish(run, RunState.FAILED, f"step {first.name!r} failed: {first.error}")
        else:
            await self._finish(run, RunState.SUCCEEDED, None)

    def _start_ready(self, run: _Run, tg: TaskGroup, failed: builtins.list[_Step]) -> None:
        ready = _ready(run, run.steps.values())
        if ready:
            tg.start_soon(self._launch, run, ready, tg, failed)

    async def _launch(
        self, run: _Run, steps: builtins.list[_Step], tg: TaskGroup, failed: builtins.list[_Step]
    ) -> None:
        """Submit the tasks of ``steps`` together, then wait for each step's.

        One submit for all the steps that became ready at once: the scheduler
        looks ids given by the caller up in the store (a thread hop per
        call), so a wide DAG pays one look-up and one commit, not one per step.
        """
        while steps:
            submitted = await self._submit(run, steps, tg, failed)
            if len(submitted) != 1:
                for step in submitted:
                    tg.start_soon(self._await_step, run, step, tg, failed)
                return
            # One step (a chain): this task waits for it and goes on with
            # what it makes ready, with no task spawned per step.
            step = submitted[0]
            steps = self._step_ended(run, step, await self._outcome(step), tg, failed)

    async def _submit(
        self, run: _Run, steps: builtins.list[_Step], tg: TaskGroup, failed: builtins.list[_Step]
    ) -> builtins.list[_Step]:
        """Plan and submit the tasks of ``steps``; those whose tasks were accepted."""
        submitted: builtins.list[tuple[_Step, builtins.list[TaskRequest]]] = []
        plans = []
        for step in steps:
            planned = _plan(run, step)
            if isinstance(planned, str):
                self._step_ended(run, step, planned, tg, failed)
            else:
                plans.append((step, planned))
        if failed or run.cancel_requested:
            # The run has failed (a reference of one of these named nothing,
            # say) or is being cancelled: none of them starts.
            return []
        for step, (payloads, task_ids) in plans:
            step.task_ids = tuple(task_ids)
            self._journal.write(("step", step.row(run.run_id)))
            requests = [
                _request(run, step.spec, payload, task_id)
                for payload, task_id in zip(payloads, task_ids, strict=True)
            ]
            submitted.append((step, requests))
        # Shielded: a cancel_run() that lands while the tasks are being stored
        # must find them stored, or it could not cancel them and they would
        # run after their run was cancelled.
        with anyio.CancelScope(shield=True):
            try:
                await self._scheduler.submit_many(
                    (r for _, requests in submitted for r in requests), lookup=not run.fresh
                )
            except InvalidTask:
                # One refused task refuses the whole call: find out whose it
                # was. The first refused fails the run: the steps after it
                # are not submitted, and never had tasks (nor did it).
                accepted = []
                for step, requests in submitted:
                    if failed:
                        step.task_ids = ()
                        continue
                    try:
                        await self._scheduler.submit_many(requests, lookup=not run.fresh)
                    except InvalidTask as exc:
                        step.task_ids = ()
                        self._step_ended(run, step, str(exc), tg, failed)
                    else:
                        self._started(run, step)
                        accepted.append((step, requests))
                return [step for step, _ in accepted]
        # Told once its tasks are stored: a step refused (or not run after
        # one that was) never started.
        for step, _ in submitted:
            self._started(run, step)
        return [step for step, _ in submitted]

    def _started(self, run: _Run, step: _Step) -> None:
        self._publish(run, "workflow_step_started", step.state.value, step=step.name)

    async def _await_step(
        self, run: _Run, step: _Step, tg: TaskGroup, failed: builtins.list[_Step]
    ) -> None:
        ready = self._step_ended(run, step, await self._outcome(step), tg, failed)
        if ready:
            await self._launch(run, ready, tg, failed)

    def _step_ended(
        self,
        run: _Run,
        step: _Step,
        error: str | None,
        tg: TaskGroup,
        failed: builtins.list[_Step],
    ) -> builtins.list[_Step]:
        """Record how the step ended; the steps that this made ready, already marked running."""
        step.finished_at = time.time()
        if error is None:
            step.state = StepState.SUCCEEDED
            self._journal.write(("step", step.row(run.run_id)))
            self._publish(run, "workflow_step_succeeded", step.state.value, step=step.name)
            if failed or run.cancel_requested:
                # The run has failed, or is being cancelled: its pending steps
                # never start (this success can come in after that, as its
                # wait had ended before the cancel reached this task).
                return []
            # Only its dependents can have become ready: a wide DAG must not
            # rescan every step for each one that finishes.
            return _ready(run, run.dependents[step.name])
        step.state = StepState.FAILED
        step.error = error
        self._journal.write(("step", step.row(run.run_id)))
        self._publish(run, "workflow_step_failed", step.state.value, step=step.name, error=error)
        failed.append(step)
        tg.cancel_scope.cancel()
        return []

    async def _outcome(self, step: _Step) -> str | None:
        """Wait for the step's tasks; None when all succeeded (``result_json`` set), else why."""
        task_ids = step.task_ids
        # A result that cannot be read back (stored by a version without the
        # limit on nesting) fails the step: raised, it stopped the instance.
        task_id = task_ids[0] if task_ids else ""
        try:
            if step.spec.fan_out is None:
                status = await self._scheduler.wait(task_id)
                if status.state is not TaskState.SUCCEEDED:
                    return _task_error(status.task_id, status.state, status.error)
                step.result_json = _result_json(status.result)
                return None
            results: dict[str, str] = {}
            if task_ids:
                async with aclosing(self._scheduler.results(task_ids)) as events:
                    async for event in events:
                        task_id = event.task_id
                        if event.state is not TaskState.SUCCEEDED:
                            return _task_error(task_id, event.state, event.error)
                        # Encoded as it comes: the event is shared with the bus's other readers.
                        results[task_id] = _result_json(event.result)
        except RecursionError:
            return f"task {task_id!r}: its result is nested too deeply to decode"
        except (json.JSONDecodeError, _Unusable) as exc:
            return f"task {task_id!r}: {exc}"[:2000]
        step.result_json = f"[{','.join(results[t] for t in task_ids)}]"
        return None

    async def _cascade(self, run: _Run, running: str, pending: str) -> None:
        """Cancel the tasks of the steps still running; the pending steps never start.

        Each is marked cancelled, with the error ``running`` for a step whose
        tasks were submitted (they may have done part of their work) and
        ``pending`` for one that never submitted any. A failed fan-out step's
        other tasks are cancelled too: its first failed task ended it, and
        they went on running after their run had failed.
        """
        async with anyio.create_task_group() as tg:
            for step in run.steps.values():
                if not step.state.finished or (
                    step.state is StepState.FAILED and step.spec.fan_out is not None
                ):
                    for task_id in step.task_ids:
                        tg.start_soon(self._cancel_task, task_id)
        for step in run.steps.values():
            if not step.state.finished:
                reason = running if step.task_ids else pending
                step.state = StepState.CANCELLED
                step.error = reason
                step.finished_at = time.time()
                self._journal.write(("step", step.row(run.run_id)))
                self._publish(
                    run, "workflow_step_cancelled", step.state.value, step=step.name, error=reason
                )

    async def _cancel_task(self, task_id: str) -> None:
        try:
            await self._scheduler.cancel(task_id)
        except Exception:  # not submitted yet, or already gone: nothing to stop
            log.debug("cancelling task %s of a run", task_id, exc_info=True)

    async def _finish(self, run: _Run, state: RunState, error: str | None) -> None:
        run.state = state
        run.error = error
        run.finished_at = time.time()
        run.ending = self._journal.write(
            ("run_state", (state.value, run.finished_at, error, run.run_id))
        )
        await run.ending.wait()
        run.ending = None
        self._metrics.workflow_runs.labels(state.value).inc()
        self._publish(run, f"workflow_run_{state.value}", state.value, error=error)
        run.forget_values()
        run.done.set()
        self._recent[run.run_id] = None
        if len(self._recent) > _RECENT:
            old, _ = self._recent.popitem(last=False)
            self._runs.pop(old, None)

    def _publish(
        self,
        run: _Run,
        event_type: str,
        state: str,
        *,
        step: str | None = None,
        error: str | None = None,
    ) -> None:
        event = self._bus.publish(
            WorkflowEvent(
                type=event_type,
                run_id=run.run_id,
                workflow_id=run.workflow.workflow_id,
                step=step,
                state=state,
                error=error,
            )
        )
        assert isinstance(event, WorkflowEvent)
        run.events.append(event)


def _ready(run: _Run, candidates: Iterable[_Step]) -> list[_Step]:
    """Those of ``candidates`` whose dependencies have all succeeded, marked running."""
    ready = []
    for step in candidates:
        if step.state is StepState.PENDING and all(
            run.steps[d].state is StepState.SUCCEEDED for d in step.spec.depends_on
        ):
            step.state = StepState.RUNNING
            step.started_at = time.time()
            ready.append(step)
    return ready


def _request(run: _Run, spec: Step, payload: Any, task_id: str) -> TaskRequest:
    return TaskRequest(
        handler=spec.handler,
        payload=payload,
        task_class=spec.task_class,
        priority=spec.priority,
        needs=spec.needs,
        task_id=task_id,
        workflow_id=run.workflow.workflow_id,
        max_attempts=spec.max_attempts,
        timeout=spec.timeout,
    )


class _Results(Mapping[str, Mapping[str, Any]]):
    """``steps.NAME.result`` for the references: the succeeded steps, looked up on demand
    (a copy per step would cost a wide DAG time quadratic in its width)."""

    def __init__(self, steps: Mapping[str, _Step]):
        self._steps = steps

    def __getitem__(self, name: str) -> Mapping[str, Any]:
        step = self._steps[name]
        if step.state is not StepState.SUCCEEDED:
            raise KeyError(name)
        return {"result": step.result()}

    def __contains__(self, name: object) -> bool:
        step = self._steps.get(name) if isinstance(name, str) else None
        return step is not None and step.state is StepState.SUCCEEDED

    def __iter__(self) -> Iterator[str]:
        return (n for n, s in self._steps.items() if s.state is StepState.SUCCEEDED)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _plan(run: _Run, step: _Step) -> tuple[list[Any], list[str]] | str:
    """The step's payloads and task ids, references filled in; or why they cannot be."""
    spec = step.spec
    try:
        context: dict[str, Any] = {"inputs": run.input_values(), "steps": _Results(run.steps)}
        if spec.fan_out is None:
            return [resolve(spec.payload, context)], [f"{run.run_id}:{step.name}"]
        items = resolve(spec.fan_out, context)
        if not isinstance(items, list):
            return f"fan_out {spec.fan_out} is not a list: {items!r}"[:2000]
        payloads = [
            resolve(spec.payload, {**context, "item": item, "index": i})
            for i, item in enumerate(items)
        ]
    except ReferenceError_ as exc:
        return str(exc)
    except RecursionError:
        # Inputs or a result stored by a version without the limit on nesting.
        return "cannot fill in the step's references: a value they name is nested too deeply"
    except Exception as exc:  # noqa: BLE001 - a reference the checks let through: the step's failure
        return f"cannot fill in the step's references: {type(exc).__name__}: {exc}"[:2000]
    return payloads, [f"{run.run_id}:{step.name}:{i}" for i in range(len(items))]


def _failed_first(step_rows: Iterable[StepRow]) -> str | None:
    """The step that failed first among a run's stored ones, or None: a run with
    one has failed, and its next instance ends it so (see _drive)."""
    failed = [(r[7] or 0.0, r[1]) for r in step_rows if r[2] == StepState.FAILED.value]
    return min(failed)[1] if failed else None


def _unloadable_status(row: RunRow, step_rows: Iterable[StepRow]) -> RunStatus:
    """The status of a run whose workflow does not load: what its rows hold, with
    the steps that have a row (the others' specs are not known)."""
    run_id, workflow_id, inputs, state, created_at, finished_at, error = row
    steps = {}
    for step_row in step_rows:
        # Its spec stands in for the one not loaded: a status reads none of it.
        step = steps[step_row[1]] = _Step(Step(name=step_row[1], handler=""))
        WorkflowEngine._restore_step(step, step_row)
    return RunStatus(
        run_id=run_id,
        workflow_id=workflow_id,
        state=RunState(state),
        inputs=cast(Mapping[str, Any], Encoded(inputs)),
        steps={name: step.status() for name, step in steps.items()},
        created_at=created_at,
        finished_at=finished_at,
        error=error,
    )


async def _check_finished(run: _Run) -> None:
    """Raise what a reader is told when the closing instance cut the run short,
    when it never began (the commit of its start failed), or when its end could
    not be stored (that commit failed: the store still has it running)."""
    if run.never_stored:
        raise InfraClosed(
            f"run {run.run_id!r} was never stored: the commit of its start failed, which "
            "stops the instance"
        )
    if not run.state.finished:
        raise _closed_before(run.run_id)
    if run.ending is not None:
        try:
            await run.ending.wait()
        except Exception as exc:
            raise InfraClosed(
                f"the end of run {run.run_id!r} ({run.state.value}) could not be stored: "
                f"{exc}; it resumes when an instance opens on the same state_dir"
            ) from exc


def _closed_before(run_id: str) -> InfraClosed:
    """What a reader of a run that the closing instance cut short is told."""
    return InfraClosed(
        f"the instance closed before run {run_id!r} finished; it resumes when an "
        "instance opens on the same state_dir"
    )


class _Unusable(Exception):
    """A task's result that its step cannot use."""


def _result_json(value: Any) -> str:
    """A task's result as its step keeps it."""
    text = dumps(value)
    if depth := json_too_deep(text):
        raise _Unusable(too_deep_error("its result", depth))
    return text


def _too_deep_input(inputs: Mapping[str, Any]) -> str | None:
    """Why the inputs, whose JSON nests too deeply, cannot be used; None if they can.

    Each input may nest as deeply as a payload: the mapping around them adds a level.
    """
    for name, value in inputs.items():
        try:
            depth = json_too_deep(dumps(value))
        except RecursionError:  # it was encoded in the mapping, but one frame up
            return f"input {name!r} is nested too deeply"
        if depth:
            return too_deep_error(f"input {name!r}", depth)
    return None


def _task_error(task_id: str, state: TaskState, error: str | None) -> str:
    return f"task {task_id!r} {state.value}: {error or 'no error message'}"


def _from_status(status: RunStatus) -> list[WorkflowEvent]:
    events = [
        WorkflowEvent(
            type=f"workflow_step_{step.state.value}",
            run_id=status.run_id,
            workflow_id=status.workflow_id,
            step=step.name,
            state=step.state.value,
            error=step.error,
        )
        for step in status.steps.values()
        if step.state.finished
    ]
    if status.state.finished:
        events.append(
            WorkflowEvent(
                type=f"workflow_run_{status.state.value}",
                run_id=status.run_id,
                workflow_id=status.workflow_id,
                state=status.state.value,
                error=status.error,
            )
        )
    return events
