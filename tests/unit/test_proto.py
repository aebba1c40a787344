"""The protocol: the committed generated code is current, and messages round-trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from dspy_infra.remote import _convert as convert
from dspy_infra.remote._generated.orchestrator import v1 as orch_pb
from dspy_infra.scheduling.tasks import TaskState, TaskStatus

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "src" / "dspy_infra" / "remote" / "_generated"


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_is_current(tmp_path: Path) -> None:
    out = tmp_path / "generated"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_proto.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    fresh, committed = files(out), files(GENERATED)
    assert sorted(fresh) == sorted(committed), "run scripts/generate_proto.py"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code {stale}: run scripts/generate_proto.py"


# JSON values as the library accepts them: exact integers of any size included.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
optional_text = st.none() | st.text(max_size=20)
int32 = st.integers(-(2**31), 2**31 - 1)

submit_requests = st.builds(
    orch_pb.SubmitTaskRequest,
    handler=st.text(max_size=20),
    payload_json=json_values.map(convert.dump_json),
    task_class=optional_text,
    priority=int32,
    needs=st.lists(st.text(max_size=10), max_size=4),
    task_id=optional_text,
    workflow_id=optional_text,
    max_attempts=st.none() | int32,
    timeout=st.none() | st.floats(allow_nan=False),
    resources=st.none()
    | st.builds(
        orch_pb.Resources,
        cpus=st.none() | st.floats(allow_nan=False),
        memory_mb=st.none() | st.integers(-(2**63), 2**63 - 1),
        gpus=st.none() | int32,
    ),
)


@given(submit_requests)
def test_submit_task_request_round_trips(message: orch_pb.SubmitTaskRequest) -> None:
    parsed = orch_pb.SubmitTaskRequest.parse(bytes(message))
    assert parsed == message
    assert convert.load_json(parsed.payload_json) == convert.load_json(message.payload_json)


@given(json_values)
def test_json_values_survive_exactly(value: Any) -> None:
    # The reason for JSON text: 2**53 + 1 and 10**30 come back as they went.
    message = orch_pb.SubmitTaskRequest(payload_json=convert.dump_json(value))
    assert convert.load_json(orch_pb.SubmitTaskRequest.parse(bytes(message)).payload_json) == value


task_statuses = st.builds(
    TaskStatus,
    task_id=st.text(min_size=1, max_size=20),
    handler=st.text(max_size=20),
    task_class=st.text(max_size=20),
    state=st.sampled_from(TaskState),
    priority=st.integers(0, 1000),
    attempts=st.integers(0, 100),
    max_attempts=st.integers(1, 100),
    needs=st.lists(st.text(max_size=10), max_size=3).map(tuple),
    workflow_id=optional_text,
    submitted_at=st.floats(0, 2e9),
    started_at=st.none() | st.floats(0, 2e9),
    finished_at=st.none() | st.floats(0, 2e9),
    result=json_values,
    error=optional_text,
    gpus=st.lists(st.text(max_size=4), max_size=3).map(tuple),
)


@given(task_statuses)
def test_task_status_round_trips(status: TaskStatus) -> None:
    message = convert.task_status_to_proto(status)
    parsed = orch_pb.TaskStatus.parse(bytes(message))
    assert convert.task_status_from_proto(parsed) == status
