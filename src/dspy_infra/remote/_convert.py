"""Between the library's types and the generated protocol messages, both ways.

The server and the client both use these, so that one value makes the same
round trip whichever side encodes it. JSON values travel as JSON text (see
the proto files for why); an empty string stands for null.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from dspy_infra.events import Event, EventsDropped, ServiceEvent
from dspy_infra.remote._generated.env_manager import v1 as env_pb
from dspy_infra.remote._generated.orchestrator import v1 as orch_pb
from dspy_infra.remote._wire import INT32_MAX
from dspy_infra.scheduling.store import JSON_ENCODER
from dspy_infra.scheduling.tasks import ClassStatus, Resources, TaskEvent, TaskState, TaskStatus
from dspy_infra.services.status import ServiceState, ServiceStatus
from dspy_infra.workflows.model import (
    RunState,
    RunStatus,
    StepState,
    StepStatus,
    Workflow,
    WorkflowEvent,
)
from dspy_infra.workflows.spec import WorkflowSpec

__all__ = [
    "class_status_from_proto",
    "class_status_to_proto",
    "dump_json",
    "event_from_proto",
    "event_to_proto",
    "load_json",
    "resources_from_proto",
    "resources_to_proto",
    "run_status_from_proto",
    "run_status_to_proto",
    "service_status_from_proto",
    "service_status_to_proto",
    "statuses_by_name",
    "statuses_to_proto",
    "task_event_from_proto",
    "task_event_to_proto",
    "task_status_from_proto",
    "task_status_to_proto",
    "workflow_event_from_proto",
    "workflow_event_to_proto",
    "workflow_from_proto",
    "workflow_to_proto",
]

# The store's encoder: compact, and NaN is refused as it is in-process.
_encode = JSON_ENCODER.encode


def dump_json(value: Any) -> str:
    """JSON text of ``value``; "" for None. Raises TypeError/ValueError as json does."""
    return "" if value is None else _encode(value)


def load_json(text: str) -> Any:
    return None if not text else json.loads(text)


def resources_to_proto(resources: Resources | None) -> orch_pb.Resources | None:
    if resources is None:
        return None
    return orch_pb.Resources(
        cpus=resources.cpus, memory_mb=resources.memory_mb, gpus=resources.gpus
    )


def resources_from_proto(message: orch_pb.Resources | None) -> Resources | None:
    if message is None:
        return None
    return Resources(cpus=message.cpus, memory_mb=message.memory_mb, gpus=message.gpus)


def class_status_to_proto(status: ClassStatus) -> orch_pb.TaskClass:
    return orch_pb.TaskClass(
        name=status.name,
        runner=status.runner,
        limit=min(status.limit, INT32_MAX),
        adaptive=status.adaptive,
        running=status.running,
        queued=status.queued,
    )


def class_status_from_proto(message: orch_pb.TaskClass) -> ClassStatus:
    return ClassStatus(
        name=message.name,
        runner=message.runner,
        limit=message.limit,
        adaptive=message.adaptive,
        running=message.running,
        queued=message.queued,
    )


def workflow_to_proto(workflow: Workflow) -> orch_pb.Workflow:
    return orch_pb.Workflow(
        workflow_id=workflow.workflow_id,
        spec_json=dump_json(workflow.spec.to_mapping()),
        created_at=workflow.created_at,
    )


def workflow_from_proto(message: orch_pb.Workflow) -> Workflow:
    return Workflow(
        workflow_id=message.workflow_id,
        spec=WorkflowSpec.from_mapping(load_json(message.spec_json)),
        created_at=message.created_at,
    )


def task_status_to_proto(status: TaskStatus) -> orch_pb.TaskStatus:
    return orch_pb.TaskStatus(
        task_id=status.task_id,
        handler=status.handler,
        task_class=status.task_class,
        state=status.state.value,
        priority=status.priority,
        attempts=status.attempts,
        # A class may allow more attempts than int32 holds: as many as ever, as sent.
        max_attempts=min(status.max_attempts, INT32_MAX),
        needs=list(status.needs),
        workflow_id=status.workflow_id,
        submitted_at=status.submitted_at,
        started_at=status.started_at,
        finished_at=status.finished_at,
        result_json=dump_json(status.result),
        error=status.error,
        gpus=list(status.gpus),
    )


def task_status_from_proto(message: orch_pb.TaskStatus) -> TaskStatus:
    return TaskStatus(
        task_id=message.task_id,
        handler=message.handler,
        task_class=message.task_class,
        state=TaskState(message.state),
        priority=message.priority,
        attempts=message.attempts,
        max_attempts=message.max_attempts,
        needs=tuple(message.needs),
        workflow_id=message.workflow_id,
        submitted_at=message.submitted_at,
        started_at=message.started_at,
        finished_at=message.finished_at,
        result=load_json(message.result_json),
        error=message.error,
        gpus=tuple(message.gpus),
    )


def task_event_to_proto(event: TaskEvent) -> orch_pb.TaskEvent:
    return orch_pb.TaskEvent(
        seq=event.seq,
        time=event.time,
        type=event.type,
        task_id=event.task_id,
        task_class=event.task_class,
        handler=event.handler,
        state=event.state.value,
        attempt=event.attempt,
        workflow_id=event.workflow_id,
        result_json=dump_json(event.result),
        error=event.error,
    )


def task_event_from_proto(message: orch_pb.TaskEvent) -> TaskEvent:
    return TaskEvent(
        seq=message.seq,
        time=message.time,
        type=message.type,
        task_id=message.task_id,
        task_class=message.task_class,
        handler=message.handler,
        state=TaskState(message.state),
        attempt=message.attempt,
        workflow_id=message.workflow_id,
        result=load_json(message.result_json),
        error=message.error,
    )


def event_to_proto(event: Event) -> orch_pb.Event:
    if isinstance(event, TaskEvent):
        return orch_pb.Event(task=task_event_to_proto(event))
    if isinstance(event, WorkflowEvent):
        return orch_pb.Event(workflow=workflow_event_to_proto(event))
    if isinstance(event, ServiceEvent):
        return orch_pb.Event(
            service=orch_pb.ServiceEvent(
                seq=event.seq,
                time=event.time,
                type=event.type,
                service=event.service,
                state=event.state,
                exit_code=event.exit_code,
                message=event.message,
                dependents=list(event.dependents),
            )
        )
    if isinstance(event, EventsDropped):
        return orch_pb.Event(
            dropped=orch_pb.EventsDropped(
                seq=event.seq, time=event.time, type=event.type, count=event.count
            )
        )
    return orch_pb.Event(other=orch_pb.OtherEvent(seq=event.seq, time=event.time, type=event.type))


def event_from_proto(message: orch_pb.Event) -> Event:
    if message.task is not None:
        return task_event_from_proto(message.task)
    if message.workflow is not None:
        return workflow_event_from_proto(message.workflow)
    if (service := message.service) is not None:
        return ServiceEvent(
            seq=service.seq,
            time=service.time,
            type=service.type,
            service=service.service,
            state=service.state,
            exit_code=service.exit_code,
            message=service.message,
            dependents=tuple(service.dependents),
        )
    if (dropped := message.dropped) is not None:
        return EventsDropped(
            seq=dropped.seq, time=dropped.time, type=dropped.type, count=dropped.count
        )
    other = message.other if message.other is not None else orch_pb.OtherEvent()
    return Event(seq=other.seq, time=other.time, type=other.type)


def service_status_to_proto(status: ServiceStatus) -> env_pb.ServiceStatus:
    return env_pb.ServiceStatus(
        name=status.name,
        state=status.state.value,
        host=status.host,
        ports=dict(status.ports),
        pid=status.pid,
        restarts=status.restarts,
        exit_code=status.exit_code,
        message=status.message,
    )


def service_status_from_proto(message: env_pb.ServiceStatus) -> ServiceStatus:
    return ServiceStatus(
        name=message.name,
        state=ServiceState(message.state),
        host=message.host,
        ports=dict(message.ports),
        pid=message.pid,
        restarts=message.restarts,
        exit_code=message.exit_code,
        message=message.message,
    )


def statuses_by_name(
    messages: list[env_pb.ServiceStatus],
) -> dict[str, ServiceStatus]:
    """In the order received: the server sends them in the in-process order."""
    return {m.name: service_status_from_proto(m) for m in messages}


def statuses_to_proto(statuses: Mapping[str, ServiceStatus]) -> list[env_pb.ServiceStatus]:
    return [service_status_to_proto(s) for s in statuses.values()]


def run_status_to_proto(status: RunStatus) -> orch_pb.WorkflowRun:
    return orch_pb.WorkflowRun(
        run_id=status.run_id,
        workflow_id=status.workflow_id,
        state=status.state.value,
        inputs_json=dump_json(dict(status.inputs)),
        steps=[
            orch_pb.WorkflowStep(
                name=step.name,
                state=step.state.value,
                task_ids=list(step.task_ids),
                result_json=dump_json(step.result),
                error=step.error,
                started_at=step.started_at,
                finished_at=step.finished_at,
            )
            for step in status.steps.values()
        ],
        created_at=status.created_at,
        finished_at=status.finished_at,
        error=status.error,
    )


def run_status_from_proto(message: orch_pb.WorkflowRun) -> RunStatus:
    inputs = load_json(message.inputs_json)
    return RunStatus(
        run_id=message.run_id,
        workflow_id=message.workflow_id,
        state=RunState(message.state),
        inputs=inputs if inputs is not None else {},
        steps={
            step.name: StepStatus(
                name=step.name,
                state=StepState(step.state),
                task_ids=tuple(step.task_ids),
                result=load_json(step.result_json),
                error=step.error,
                started_at=step.started_at,
                finished_at=step.finished_at,
            )
            for step in message.steps
        },
        created_at=message.created_at,
        finished_at=message.finished_at,
        error=message.error,
    )


def workflow_event_to_proto(
    event: WorkflowEvent, run: RunStatus | None = None
) -> orch_pb.WorkflowRunStatus:
    return orch_pb.WorkflowRunStatus(
        seq=event.seq,
        run_id=event.run_id,
        workflow_id=event.workflow_id,
        state=event.state,
        type=event.type,
        time=event.time,
        step=event.step,
        error=event.error,
        run=run_status_to_proto(run) if run is not None else None,
    )


def workflow_event_from_proto(message: orch_pb.WorkflowRunStatus) -> WorkflowEvent:
    return WorkflowEvent(
        seq=message.seq,
        time=message.time,
        type=message.type,
        run_id=message.run_id,
        workflow_id=message.workflow_id,
        state=message.state,
        step=message.step,
        error=message.error,
    )
