"""What a workflow run looks like from outside: states, statuses, events, handles."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol

from attrs import field, frozen

from dspy_infra.events import Event
from dspy_infra.workflows.spec import WorkflowSpec

__all__ = [
    "RunHandle",
    "RunState",
    "RunStatus",
    "StepState",
    "StepStatus",
    "Workflow",
    "WorkflowEvent",
]


class RunState(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self is not RunState.RUNNING


class StepState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self not in (StepState.PENDING, StepState.RUNNING)


@frozen(kw_only=True)
class Workflow:
    """A stored workflow: its id (``NAME-HASH`` of the spec) and spec."""

    workflow_id: str
    spec: WorkflowSpec
    created_at: float = 0.0

    @property
    def name(self) -> str:
        return self.spec.name


@frozen(kw_only=True)
class StepStatus:
    """One step of a run. ``result`` is set once it succeeded (a list for a fan-out).

    A status from the engine holds its own copy of the result, decoded when
    it is first read: changing it changes nothing but this status.
    """

    name: str
    state: StepState
    task_ids: tuple[str, ...] = ()
    result: Any = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None


@frozen(kw_only=True)
class RunStatus:
    """A snapshot of one run. Its ``inputs`` (and each step's ``result``) are its own
    copy, decoded when first read: changing them changes nothing but this status."""

    run_id: str
    workflow_id: str
    state: RunState
    inputs: Mapping[str, Any] = field(factory=dict)
    steps: Mapping[str, StepStatus] = field(factory=dict)
    created_at: float = 0.0
    finished_at: float | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.state.finished

    def results(self) -> dict[str, Any]:
        """Each succeeded step's result, by step name."""
        return {n: s.result for n, s in self.steps.items() if s.state is StepState.SUCCEEDED}


class Encoded:
    """A value handed to a status as its JSON text, which the status decodes when it is read.

    The engine keeps a run's inputs and its steps' results as JSON text;
    decoding them for every status (a poll of ``get_run``) cost 30 ms per MB
    of results whether they were read or not; a status that shared the
    engine's objects let its caller change the run's.
    """

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


class _DecodedWhenRead:
    """The descriptor of an attribute that may hold :class:`Encoded`: the value
    decoded the first time it is read, then kept. Around the attribute's own
    slot, so that everything that reads it (``==``, ``repr``, ``attrs.asdict``,
    ``evolve``, pickling) sees the value."""

    def __init__(self, slot: Any):
        self._slot = slot

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        value = self._slot.__get__(instance, owner)
        if isinstance(value, Encoded):
            value = json.loads(value.text)
            self._slot.__set__(instance, value)
        return value

    def __set__(self, instance: object, value: Any) -> None:
        self._slot.__set__(instance, value)


for _cls, _name in ((StepStatus, "result"), (RunStatus, "inputs")):
    setattr(_cls, _name, _DecodedWhenRead(_cls.__dict__[_name]))


@frozen(kw_only=True)
class WorkflowEvent(Event):
    """A run or one of its steps changed state (``step`` is None for the run's own events)."""

    RUN_FINAL_TYPES: ClassVar[frozenset[str]] = frozenset(
        {"workflow_run_succeeded", "workflow_run_failed", "workflow_run_cancelled"}
    )
    TYPES: ClassVar[frozenset[str]] = frozenset(
        {
            "workflow_run_started",
            "workflow_run_resumed",
            "workflow_step_started",
            "workflow_step_succeeded",
            "workflow_step_failed",
            "workflow_step_cancelled",
        }
        | RUN_FINAL_TYPES
    )

    run_id: str
    workflow_id: str
    state: str
    step: str | None = None
    error: str | None = None


class _Runs(Protocol):
    """What a handle calls: the engine in-process, its remote counterpart over gRPC."""

    async def wait_run(self, run_id: str) -> RunStatus: ...

    async def get_run(self, run_id: str) -> RunStatus: ...

    async def cancel_run(self, run_id: str) -> RunStatus: ...


@frozen
class RunHandle:
    """A started run: wait for it, look at it, follow it, cancel it."""

    run_id: str
    _engine: _Runs = field(repr=False, alias="engine")

    async def wait(self) -> RunStatus:
        """Wait until the run has finished; its final status."""
        return await self._engine.wait_run(self.run_id)

    async def status(self) -> RunStatus:
        return await self._engine.get_run(self.run_id)

    async def cancel(self) -> RunStatus:
        return await self._engine.cancel_run(self.run_id)
