"""A state machine over the scheduler: random submits, cancels, completions, failures,
restarts and crashes over one store, with the invariants a user relies on checked after
every step.

Handlers block on per-task events that the machine controls, so the machine decides
when each running task completes or fails. After each step the machine waits until the
scheduler has settled: every dispatched attempt has entered its handler, no retry is
waiting out its backoff, and a class with a free slot has nothing queued. Settled points
make the priority check sound: a task that was queued at one settled point and is still
queued at the next must not rank better than any task of its class that started between
them.

A crash is the store as a SIGKILL leaves it: a copy of what is committed (SQLite's
backup of ``tasks.db``, read beside the live instance), opened by the next instance
while the old one, on its own copy, is closed and dropped. Running tasks come back
with their attempt counted (lost if it was their last); after a close they come back
with it given back.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from contextlib import AbstractContextManager, closing
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.from_thread
from anyio.from_thread import BlockingPortal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from dspy_infra import AgentInfra
from dspy_infra.abc import TaskRun
from dspy_infra.errors import UnknownTask
from dspy_infra.scheduling.tasks import TaskState, TaskStatus

LIMITS = {"a": 2, "b": 1}
# Class a's retries wait 0.02 s, then 0.8 s: a first retry that waits the second's delay
# is told apart (see RETRY_LATE), with room for a loaded machine's hiccups. Class b's
# wait 0.25 s, long enough for a restart or a crash to come while a retry waits.
BACKOFFS = {
    "a": {"initial": 0.02, "factor": 40, "max": 0.8, "jitter": 0},
    "b": {"initial": 0.25, "factor": 1, "max": 0.25, "jitter": 0},
}
CLASSES = {
    name: {"max_concurrency": limit, "aging": 0, "retry_backoff": BACKOFFS[name]}
    for name, limit in LIMITS.items()
}
# A retry with a free slot starts this long after its attempt failed, at the latest.
RETRY_LATE = {"a": 0.6}
MAX_TASKS = 12


class Task:
    def __init__(self, task_id: str, task_class: str, priority: int, max_attempts: int, n: int):
        self.task_id = task_id
        self.task_class = task_class
        self.priority = priority
        self.max_attempts = max_attempts
        self.n = n  # submit order
        self.fails = 0  # attempts the machine told to fail
        self.used = 0  # attempts counted: the failed ones, and those a crash cut short
        # When its pending retry may start (monotonic): not before, and not after.
        self.retry_after: float | None = None
        self.retry_before: float | None = None
        self.final: TaskState | None = None

    def key(self) -> tuple[int, int]:
        """Lower starts first: higher priority, then FIFO (aging is off)."""
        return (-self.priority, self.n)


class Controller:
    """The handlers' side, in the event loop: who is blocked, what was decided."""

    def __init__(self) -> None:
        self.gates: dict[str, anyio.Event] = {}
        self.decisions: dict[str, str] = {}
        self.blocked: dict[str, str] = {}  # task id -> class, handler waiting on its gate
        self.per_class: Counter[str] = Counter()
        self.completions: Counter[str] = Counter()  # returned or raised on its own
        self.starts: list[tuple[str, int, float]] = []  # (task id, attempt, monotonic time)
        self.violations: list[str] = []

    async def handler(self, payload: Any, run: TaskRun) -> Any:
        task_id, task_class = run.task_id, run.task_class
        if task_id in self.blocked:
            self.violations.append(f"{task_id} started while already running")
        self.per_class[task_class] += 1
        if self.per_class[task_class] > LIMITS[task_class]:
            self.violations.append(
                f"class {task_class} ran {self.per_class[task_class]} tasks at once "
                f"(limit {LIMITS[task_class]})"
            )
        gate = self.gates[task_id] = anyio.Event()
        self.blocked[task_id] = task_class
        self.starts.append((task_id, run.attempt, time.monotonic()))
        try:
            await gate.wait()
        finally:
            self.blocked.pop(task_id, None)
            self.per_class[task_class] -= 1
        self.completions[task_id] += 1
        if self.decisions.pop(task_id) == "fail":
            raise RuntimeError(f"{task_id} told to fail")
        return {"done": payload}

    def release(self, task_id: str, decision: str) -> None:
        self.decisions[task_id] = decision
        self.gates[task_id].set()

    def release_all(self, task_ids: list[str]) -> None:
        for task_id in task_ids:
            self.release(task_id, "ok")


class SchedulerMachine(RuleBasedStateMachine):
    portal: ClassVar[BlockingPortal]

    def __init__(self) -> None:
        super().__init__()
        self.state_dir = Path(tempfile.mkdtemp(prefix="dspy-infra-stateful-"))
        self.controller = Controller()
        self.tasks: dict[str, Task] = {}
        self.queued: set[str] = set()  # queued at the last settled point
        self.blocked: list[str] = []  # blocked in their handler at the last settled point
        self.seen_starts = 0
        self.infra: AgentInfra | None = None
        self.context: AbstractContextManager[AgentInfra] | None = None

    # -- plumbing ------------------------------------------------------------------

    def open(self) -> None:
        self.infra = AgentInfra.start(
            {"classes": CLASSES, "infra": {"event_history": 100}},
            state_dir=self.state_dir,
            handlers={"block": self.controller.handler},
        )
        self.context = self.portal.wrap_async_context_manager(self.infra)
        self.context.__enter__()

    def close(self) -> None:
        context, self.context, self.infra = self.context, None, None
        if context is not None:
            context.__exit__(None, None, None)

    def live(self) -> AgentInfra:
        assert self.infra is not None
        return self.infra

    def unfinished(self) -> list[str]:
        return sorted(t for t, task in self.tasks.items() if task.final is None)

    async def _snapshot(self) -> tuple[bool, dict[str, TaskStatus]]:
        """Statuses of the unfinished tasks and whether the scheduler has settled, read in
        one step of the event loop: a live task's status is read from memory, without a
        suspension point."""
        infra = self.live()
        statuses = {t: await infra.get_task_status(t) for t in self.unfinished()}
        classes = await infra.task_classes()
        blocked = Counter(self.controller.blocked.values())
        settled = True
        for name, limit in LIMITS.items():
            status = classes[name]
            queued = sum(
                1
                for t, s in statuses.items()
                if s.state is TaskState.QUEUED and self.tasks[t].task_class == name
            )
            if status.running > limit:
                self.controller.violations.append(
                    f"class {name} has {status.running} running, over its limit of {limit}"
                )
            if not 0 <= status.queued <= queued:
                self.controller.violations.append(
                    f"class {name} counts {status.queued} queued, of {queued} queued tasks"
                )
            settled &= (
                status.running == blocked[name]  # every start reached its handler
                and status.queued == queued  # none waiting out a retry's backoff
                and (status.running >= limit or status.queued == 0)
            )
        return settled, statuses

    async def _settle(self) -> dict[str, TaskStatus]:
        with anyio.fail_after(10):
            while True:
                settled, statuses = await self._snapshot()
                if settled or self.controller.violations:  # reported by no_violation
                    return statuses
                await anyio.sleep(0.001)

    def settle(self, cancelled: str | None = None) -> None:
        """Wait for a settled point, then check what happened since the last one."""
        statuses = self.portal.call(self._settle)
        self.check_starts(len(self.controller.starts), cancelled)
        for task_id, status in statuses.items():
            task = self.tasks[task_id]
            if status.finished:
                task.final = status.state
            # Attempts count starts; an attempt interrupted by a restart is given back.
            expected = {
                TaskState.QUEUED: {task.used},
                TaskState.RUNNING: {task.used + 1},
                TaskState.SUCCEEDED: {task.used + 1},
                TaskState.FAILED: {task.used},
                TaskState.CANCELLED: {task.used, task.used + 1},
                TaskState.LOST: {task.used},
            }
            assert status.attempts in expected[status.state], (task_id, status, task.used)
        self.queued = {t for t, s in statuses.items() if s.state is TaskState.QUEUED}
        self.blocked = sorted(self.controller.blocked)
        assert set(self.blocked) == {t for t, s in statuses.items() if s.state is TaskState.RUNNING}

    def check_starts(self, upto: int, cancelled: str | None = None) -> None:
        """Check the attempts started since the last check, up to the ``upto``th."""
        starts = self.controller.starts[self.seen_starts : upto]
        self.seen_starts = len(self.controller.starts)
        started = {t for t, _, _ in starts}
        for task_id, attempt, when in starts:
            task = self.tasks[task_id]
            assert task.final is None, f"{task_id} started after it ended {task.final}"
            # An attempt interrupted by a restart is given back: failures and crashes count.
            assert attempt == task.used + 1, (task_id, attempt, task.used)
            assert attempt <= task.max_attempts
            if task.retry_after is not None:
                assert when >= task.retry_after, f"{task_id} retried before its backoff"
            if task.retry_before is not None:
                assert when <= task.retry_before, f"{task_id} retried after a longer backoff"
            task.retry_after = task.retry_before = None
            # Priority within the class: nothing that stayed queued ranks better.
            for other_id in self.queued - started - {cancelled}:
                other = self.tasks[other_id]
                if other.task_class == task.task_class and other.key() < task.key():
                    self.controller.violations.append(
                        f"{task_id} (priority {task.priority}, #{task.n}) started while "
                        f"{other_id} (priority {other.priority}, #{other.n}) stayed queued"
                    )
        self.queued -= started  # for a check before the next settled point (see crash)

    # -- rules ----------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        self.open()
        self.settle()

    @precondition(lambda self: len(self.tasks) < MAX_TASKS)
    @rule(
        task_class=st.sampled_from(sorted(LIMITS)),
        # Few priorities: ties, and so FIFO order, are common.
        priority=st.integers(0, 2),
        max_attempts=st.integers(1, 3),
    )
    def submit(self, task_class: str, priority: int, max_attempts: int) -> None:
        n = len(self.tasks)
        task_id = f"t{n}"
        self.tasks[task_id] = Task(task_id, task_class, priority, max_attempts, n)
        handle = self.portal.call(
            lambda: self.live().submit_task(
                "block",
                n,
                task_class=task_class,
                priority=priority,
                max_attempts=max_attempts,
                task_id=task_id,
            )
        )
        assert handle.task_id == task_id
        self.settle()

    @precondition(lambda self: bool(self.tasks))
    @rule(data=st.data(), task_class=st.sampled_from(sorted(LIMITS)), priority=st.integers(0, 2))
    def resubmit(self, data: st.DataObject, task_class: str, priority: int) -> None:
        """The same task_id again, even with other fields: the task already stored."""
        task_id = data.draw(st.sampled_from(sorted(self.tasks)), label="resubmit")
        handle = self.portal.call(
            lambda: self.live().submit_task(
                "block", "again", task_class=task_class, priority=priority, task_id=task_id
            )
        )
        assert handle.task_id == task_id
        self.settle()
        status = self.portal.call(self.live().get_task_status, task_id)
        task = self.tasks[task_id]
        assert (status.task_class, status.priority) == (task.task_class, task.priority)

    @precondition(lambda self: bool(self.tasks))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(sorted(self.tasks)), label="cancel")
        final = self.tasks[task_id].final
        status = self.portal.call(self.live().cancel_task, task_id)
        if final is not None:  # a finished task is not changed by a cancel
            assert status.state is final, status
            self.settle()
            return
        assert status.state is TaskState.CANCELLED, status
        self.settle(cancelled=task_id)
        assert self.tasks[task_id].final is TaskState.CANCELLED

    @precondition(lambda self: bool(self.queued))
    @rule(data=st.data())
    def cancel_queued(self, data: st.DataObject) -> None:
        """A queued task cancelled leaves its class's queue, and never starts (settle checks)."""
        task_id = data.draw(st.sampled_from(sorted(self.queued)), label="cancel queued")
        status = self.portal.call(self.live().cancel_task, task_id)
        assert (status.state, status.attempts) == (TaskState.CANCELLED, self.tasks[task_id].used)
        self.settle(cancelled=task_id)

    @precondition(lambda self: bool(self.blocked))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        task_id = data.draw(st.sampled_from(self.blocked), label="complete")
        self.portal.call(self.controller.release, task_id, "ok")
        self.settle()
        task = self.tasks[task_id]
        assert task.final is TaskState.SUCCEEDED
        status = self.portal.call(self.live().get_task_status, task_id)
        assert status.result == {"done": task.n}

    @precondition(lambda self: bool(self.blocked))
    @rule(data=st.data(), then=st.sampled_from(["settle", "restart", "crash", "cancel"]))
    def fail(self, data: st.DataObject, then: str) -> None:
        """Fail an attempt; then, while its retry waits out its backoff, maybe restart,
        crash or cancel it."""
        task_id = data.draw(st.sampled_from(self.blocked), label="fail")
        task = self.tasks[task_id]
        task.fails += 1
        task.used += 1
        retrying = task.used < task.max_attempts
        queued_behind = any(self.tasks[t].task_class == task.task_class for t in self.queued)
        failed_at = time.monotonic()
        self.portal.call(self.controller.release, task_id, "fail")
        if retrying:
            delay = BACKOFFS[task.task_class]
            task.retry_after = failed_at + min(
                delay["max"], delay["initial"] * delay["factor"] ** (task.used - 1)
            )
            late = RETRY_LATE.get(task.task_class)
            if late is not None and then == "settle" and not queued_behind and task.used == 1:
                task.retry_before = failed_at + late  # its slot stays free for it
        self.portal.call(self._ended, task_id)
        if then == "restart":
            self.restart()
        elif then == "crash":
            self.crash()
        elif then == "cancel":
            status = self.portal.call(self.live().cancel_task, task_id)
            if retrying:
                assert status.state is TaskState.CANCELLED, status
                self.settle(cancelled=task_id)
                return
        self.settle()
        if not retrying:
            assert task.final is TaskState.FAILED
            status = self.portal.call(self.live().get_task_status, task_id)
            assert status.error == f"RuntimeError: {task_id} told to fail"
        elif then != "crash":  # a crash may have lost its requeue: then it is re-run at once
            assert task.final is None  # retried, or waiting to be

    async def _ended(self, task_id: str) -> None:
        """Wait until the scheduler has taken the end of the task's attempt."""
        with anyio.fail_after(10):
            while (await self.live().get_task_status(task_id)).state is TaskState.RUNNING:
                await anyio.sleep(0.001)

    @precondition(lambda self: bool(self.blocked or self.queued))
    @rule()
    def restart(self) -> None:
        """A close gives the running attempts back: they run again, as the same attempt."""
        self.close()
        self.open()
        self.settle()

    @precondition(lambda self: bool(self.blocked or self.queued))
    @rule()
    def crash(self) -> None:
        """What ran at a crash comes back with its attempt counted, or lost if it was its last."""
        in_backoff = [t for t, task in self.tasks.items() if task.retry_after is not None]
        crashed = Path(tempfile.mkdtemp(prefix="dspy-infra-stateful-"))
        running, upto = self.portal.call(self._crash_image, crashed / "tasks.db")
        # What the old instance starts after the copy is no part of the crashed store.
        self.check_starts(upto)
        self.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.state_dir = crashed
        for task_id in running:
            self.tasks[task_id].used += 1
        for task_id in in_backoff:
            # A retry's requeue is written without waiting: if the crash lost it, the
            # task is found running with the failed attempt counted, and run at once.
            self.tasks[task_id].retry_after = None
        self.open()
        self.settle()
        for task_id in running:
            task = self.tasks[task_id]
            status = self.portal.call(self.live().get_task_status, task_id)
            if task.used >= task.max_attempts:
                assert status.state is TaskState.LOST, status
                assert "running when its instance stopped" in (status.error or ""), status
            else:
                assert status.state is not TaskState.LOST, status

    async def _crash_image(self, copy: Path) -> tuple[list[str], int]:
        """Copy the store as a crash would leave it now, once each final state is committed
        (one nobody waits for may wait 2 ms for company) and each started attempt is in
        its handler; the tasks running, and how many starts the copy has seen."""
        infra = self.live()
        with anyio.fail_after(10):
            while True:
                for task_id in self.tasks:
                    if (await infra.get_task_status(task_id)).finished:
                        await infra.task_handle(task_id).wait()
                classes = await infra.task_classes()
                blocked = Counter(self.controller.blocked.values())
                if all(classes[name].running == blocked[name] for name in LIMITS):
                    break
                await anyio.sleep(0.001)
        # No await from here on: the event loop, held by the copy, changes nothing meanwhile.
        with (
            closing(sqlite3.connect(self.state_dir / "tasks.db")) as source,
            closing(sqlite3.connect(copy)) as target,
        ):
            source.backup(target)
        return sorted(self.controller.blocked), len(self.controller.starts)

    @rule()
    def idle(self) -> None:
        """A settled scheduler starts nothing by itself (and some rule is always possible)."""
        started = len(self.controller.starts)
        self.portal.call(anyio.sleep, 0.002)
        self.settle()
        assert len(self.controller.starts) == started

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def no_violation(self) -> None:
        assert self.controller.violations == []

    @invariant()
    def attempts_within_limits(self) -> None:
        for task_id, count in self.controller.completions.items():
            task = self.tasks[task_id]
            assert count <= task.max_attempts, (task_id, count)
            assert count == task.fails + (task.final is TaskState.SUCCEEDED), (task_id, count)

    @invariant()
    def no_task_lost(self) -> None:
        if self.infra is None:
            return

        async def statuses() -> dict[str, TaskStatus | None]:
            found: dict[str, TaskStatus | None] = {}
            for task_id in self.tasks:
                try:
                    found[task_id] = await self.live().get_task_status(task_id)
                except UnknownTask:
                    found[task_id] = None
            return found

        for task_id, status in self.portal.call(statuses).items():
            assert status is not None, f"{task_id} was lost"
            final = self.tasks[task_id].final
            if final is not None:
                assert status.state is final, (task_id, status)

    def teardown(self) -> None:
        try:
            if self.infra is not None:
                # Drain: let every task run to its end.
                for _ in range(4 * MAX_TASKS):
                    if not self.unfinished():
                        break
                    self.portal.call(self.controller.release_all, self.blocked)
                    self.settle()
                assert self.unfinished() == [], "tasks that never finished"
                self.no_task_lost()
                self.attempts_within_limits()
                self.no_violation()
        finally:
            try:
                self.close()
            finally:
                shutil.rmtree(self.state_dir, ignore_errors=True)


def test_scheduler_state_machine() -> None:
    with anyio.from_thread.start_blocking_portal("asyncio") as portal:
        SchedulerMachine.portal = portal
        run_state_machine_as_test(
            SchedulerMachine,
            settings=settings(
                max_examples=60,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
