"""Backfill with reservations, under random load: resources are never over-committed, every
task runs once, and nothing waits for ever, whatever the sizes, priorities and timing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspy_infra import AgentInfra, Resources
from dspy_infra.abc import TaskRun
from dspy_infra.scheduling.tasks import TaskHandle, TaskState

CPUS = 4
# ("submit", cpus, priority) or ("finish", which of the running ones)
Op = tuple[str, int, int]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.sampled_from([1, 1, 2, 4]), st.integers(0, 3)),
        st.tuples(st.just("finish"), st.integers(0, 20), st.just(0)),
    ),
    min_size=1,
    max_size=25,
)


class Load:
    def __init__(self) -> None:
        self.gates: dict[str, anyio.Event] = {}
        self.held: dict[str, int] = {}
        self.runs: dict[str, int] = {}
        self.violations: list[str] = []

    async def handler(self, payload: Any, run: TaskRun) -> None:
        self.runs[run.task_id] = self.runs.get(run.task_id, 0) + 1
        self.held[run.task_id] = payload
        if sum(self.held.values()) > CPUS:
            self.violations.append(f"{self.held} hold more than {CPUS} CPUs")
        gate = self.gates[run.task_id] = anyio.Event()
        try:
            await gate.wait()
        finally:
            del self.held[run.task_id]

    def finish(self, index: int) -> None:
        running = sorted(self.held)
        if running:
            self.gates[running[index % len(running)]].set()


async def _scenario(state_dir: Path, steps: list[Op], reserve_after: float) -> None:
    load = Load()
    classes = {"c": {"cpus": 1, "aging": 0, "reserve_after": reserve_after}}
    config = {"classes": classes, "infra": {"cpus": CPUS, "durable": False}}
    handles: list[TaskHandle] = []
    async with AgentInfra.start(config, state_dir=state_dir, handlers={"h": load.handler}) as infra:
        for op, value, priority in steps:
            if op == "submit":
                handles.append(
                    await infra.submit_task(
                        "h",
                        value,
                        task_class="c",
                        priority=priority,
                        resources=Resources(cpus=value),
                    )
                )
            else:
                load.finish(value)
            await anyio.sleep(0.002)
        # Let everything through: finish what runs until all is done.
        with anyio.fail_after(20):
            while not all(state.finished for state in await _states(handles)):
                for gate in [load.gates[t] for t in load.held]:
                    gate.set()
                await anyio.sleep(0.005)
        states = await _states(handles)
    assert load.violations == []
    assert states == [TaskState.SUCCEEDED] * len(handles)
    assert all(n == 1 for n in load.runs.values())
    assert len(load.runs) == len(handles)


async def _states(handles: list[TaskHandle]) -> list[TaskState]:
    return [(await h.status()).state for h in handles]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=ops, reserve_after=st.sampled_from([0.0, 0.005, 0.05]))
def test_reservations_never_overcommit_lose_or_stall_tasks(
    tmp_path: Path, steps: list[Op], reserve_after: float
) -> None:
    anyio.run(_scenario, tmp_path / "state", steps, reserve_after, backend="asyncio")
