"""Workflows: DAGs of tasks, started as runs, persisted, their status streamed.

See docs/workflows.md.
"""

from dspy_infra.workflows.engine import WorkflowEngine
from dspy_infra.workflows.model import (
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
    Step,
    UnknownRun,
    UnknownWorkflow,
    WorkflowError,
    WorkflowSpec,
)

__all__ = [
    "InvalidWorkflow",
    "RunHandle",
    "RunState",
    "RunStatus",
    "Step",
    "StepState",
    "StepStatus",
    "UnknownRun",
    "UnknownWorkflow",
    "Workflow",
    "WorkflowEngine",
    "WorkflowError",
    "WorkflowEvent",
    "WorkflowSpec",
]
