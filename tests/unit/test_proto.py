"""The protocol: the committed generated code is current, messages round-trip, and the
server's codec reads what protobuf reads and refuses what it refuses."""

from __future__ import annotations

import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import betterproto2
import pytest
from attrs import evolve
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from hypothesis import given, settings
from hypothesis import strategies as st

from dspy_infra.events import Event, EventsDropped, ServiceEvent
from dspy_infra.remote import _convert as convert
from dspy_infra.remote._generated.env_manager import v1 as env_pb
from dspy_infra.remote._generated.orchestrator import v1 as orch_pb
from dspy_infra.remote.server import _Codec
from dspy_infra.scheduling.tasks import (
    ClassStatus,
    Resources,
    TaskEvent,
    TaskState,
    TaskStatus,
)
from dspy_infra.services.status import ServiceState, ServiceStatus
from dspy_infra.workflows.model import RunState, RunStatus, StepState, StepStatus, WorkflowEvent

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


class_statuses = st.builds(
    ClassStatus,
    name=st.text(max_size=20),
    runner=st.sampled_from(["inprocess", "process", "docker", "slurm"]),
    limit=st.integers(0, 2**40),  # max_concurrency has no upper bound
    adaptive=st.booleans(),
    running=st.integers(0, 100_000),
    queued=st.integers(0, 10_000_000),
)


@given(class_statuses)
def test_class_status_round_trips(status: ClassStatus) -> None:
    message = convert.class_status_to_proto(status)
    parsed = convert.class_status_from_proto(orch_pb.TaskClass.parse(bytes(message)))
    # A limit beyond int32 travels as its largest: as many as ever, never a wrapped one.
    assert parsed == evolve(status, limit=min(status.limit, 2**31 - 1))


resources = st.builds(
    Resources,
    cpus=st.none() | st.floats(0, 1024),
    memory_mb=st.none() | st.integers(0, 2**40),
    gpus=st.none() | st.integers(0, 64),
)


@given(st.none() | resources)
def test_resources_round_trip(value: Resources | None) -> None:
    message = convert.resources_to_proto(value)
    parsed = orch_pb.Resources.parse(bytes(message)) if message is not None else None
    assert convert.resources_from_proto(parsed) == value


seqs = st.integers(0, 2**63 - 1)
times = st.floats(0, 2e9)
events = st.one_of(
    st.builds(
        TaskEvent,
        type=st.text(max_size=20),
        seq=seqs,
        time=times,
        task_id=st.text(max_size=20),
        task_class=st.text(max_size=20),
        handler=st.text(max_size=20),
        state=st.sampled_from(TaskState),
        attempt=st.integers(0, 100),
        workflow_id=optional_text,
        result=json_values,
        error=optional_text,
    ),
    st.builds(
        ServiceEvent,
        type=st.text(max_size=20),
        seq=seqs,
        time=times,
        service=st.text(max_size=20),
        state=st.sampled_from([s.value for s in ServiceState]),
        exit_code=st.none() | st.integers(-64, 255),
        message=st.text(max_size=40),
        dependents=st.lists(st.text(max_size=10), max_size=3).map(tuple),
    ),
    st.builds(
        WorkflowEvent,
        type=st.text(max_size=20),
        seq=seqs,
        time=times,
        run_id=st.text(max_size=20),
        workflow_id=st.text(max_size=20),
        state=st.sampled_from([s.value for s in RunState]),
        step=optional_text,
        error=optional_text,
    ),
    st.builds(EventsDropped, seq=seqs, time=times, count=st.integers(0, 10**9)),
    st.builds(Event, type=st.text(max_size=20), seq=seqs, time=times),
)


@given(events)
def test_events_round_trip(event: Event) -> None:
    message = convert.event_to_proto(event)
    assert convert.event_from_proto(orch_pb.Event.parse(bytes(message))) == event


service_statuses = st.builds(
    ServiceStatus,
    name=st.text(max_size=20),
    state=st.sampled_from(ServiceState),
    host=st.text(max_size=20),
    ports=st.dictionaries(st.text(max_size=8), st.integers(0, 65535), max_size=3),
    pid=optional_text,
    restarts=st.integers(0, 10_000),
    exit_code=st.none() | st.integers(-64, 255),
    message=st.text(max_size=40),
)


@given(service_statuses)
def test_service_status_round_trips(status: ServiceStatus) -> None:
    message = convert.service_status_to_proto(status)
    parsed = env_pb.ServiceStatus.parse(bytes(message))
    assert convert.service_status_from_proto(parsed) == status


step_statuses = st.builds(
    StepStatus,
    name=st.text(max_size=20),
    state=st.sampled_from(StepState),
    task_ids=st.lists(st.text(max_size=10), max_size=3).map(tuple),
    result=json_values,
    error=optional_text,
    started_at=st.none() | times,
    finished_at=st.none() | times,
)
run_statuses = st.builds(
    RunStatus,
    run_id=st.text(max_size=20),
    workflow_id=st.text(max_size=20),
    state=st.sampled_from(RunState),
    inputs=st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    steps=st.lists(step_statuses, max_size=3).map(lambda steps: {s.name: s for s in steps}),
    created_at=times,
    finished_at=st.none() | times,
    error=optional_text,
)


@given(run_statuses)
def test_run_status_round_trips(status: RunStatus) -> None:
    message = convert.run_status_to_proto(status)
    parsed = orch_pb.WorkflowRun.parse(bytes(message))
    assert convert.run_status_from_proto(parsed) == status


# -- the server's codec ----------------------------------------------------------

# What the requests do not have, and the codec reads all the same: packed
# numbers of each wire type, a map, a repeated message, bytes. (Messages as
# betterproto2 generates them: its field() is how a dataclass field is declared.)


@dataclass(eq=False, repr=False)
class _Everything(betterproto2.Message):
    ints: list[int] = betterproto2.field(1, betterproto2.TYPE_SINT64, repeated=True)
    doubles: list[float] = betterproto2.field(2, betterproto2.TYPE_DOUBLE, repeated=True)
    fixed: list[int] = betterproto2.field(3, betterproto2.TYPE_FIXED32, repeated=True)
    resources: list[orch_pb.Resources] = betterproto2.field(
        4, betterproto2.TYPE_MESSAGE, repeated=True
    )
    ports: dict[str, int] = betterproto2.field(
        5,
        betterproto2.TYPE_MAP,
        map_meta=betterproto2.map_meta(betterproto2.TYPE_STRING, betterproto2.TYPE_INT32),
    )
    blob: bytes = betterproto2.field(6, betterproto2.TYPE_BYTES)
    flag: bool | None = betterproto2.field(7, betterproto2.TYPE_BOOL, optional=True)
    name: str = betterproto2.field(8, betterproto2.TYPE_STRING)


@dataclass(eq=False, repr=False)
class _Fewer(betterproto2.Message):
    """_Everything as an older server knows it: fields 1, 3, 6 and 8 unknown, and
    field 3 of each Resources."""

    doubles: list[float] = betterproto2.field(2, betterproto2.TYPE_DOUBLE, repeated=True)
    resources: list[_OldResources] = betterproto2.field(4, betterproto2.TYPE_MESSAGE, repeated=True)
    ports: dict[str, int] = betterproto2.field(
        5,
        betterproto2.TYPE_MAP,
        map_meta=betterproto2.map_meta(betterproto2.TYPE_STRING, betterproto2.TYPE_INT32),
    )
    flag: bool | None = betterproto2.field(7, betterproto2.TYPE_BOOL, optional=True)


@dataclass(eq=False, repr=False)
class _OldResources(betterproto2.Message):
    cpus: float | None = betterproto2.field(1, betterproto2.TYPE_DOUBLE, optional=True)
    memory_mb: int | None = betterproto2.field(2, betterproto2.TYPE_INT64, optional=True)


_int64 = st.integers(-(2**63), 2**63 - 1)
everything = st.builds(
    _Everything,
    ints=st.lists(_int64, max_size=4),
    doubles=st.lists(st.floats(allow_nan=False), max_size=3),
    fixed=st.lists(st.integers(0, 2**32 - 1), max_size=3),
    resources=st.lists(
        st.builds(
            orch_pb.Resources,
            cpus=st.none() | st.floats(allow_nan=False),
            memory_mb=st.none() | _int64,
            gpus=st.none() | int32,
        ),
        max_size=3,
    ),
    ports=st.dictionaries(st.text(max_size=5), int32, max_size=3),
    blob=st.binary(max_size=10),
    flag=st.none() | st.booleans(),
    name=st.text(max_size=10),
)


@given(everything)
def test_the_codec_reads_what_betterproto2_writes(message: _Everything) -> None:
    data = bytes(message)
    assert _Codec().decode(data, _Everything) == message
    # A field that the type does not know is left out, at any depth.
    fewer = _Codec().decode(data, _Fewer)
    assert fewer == _Fewer.FromString(data)
    assert fewer.doubles == message.doubles
    assert [r.memory_mb for r in fewer.resources] == [r.memory_mb for r in message.resources]
    assert fewer._unknown_fields == b""
    assert all(r._unknown_fields == b"" for r in fewer.resources)


@st.composite
def mangled(draw: st.DrawFn, encodings: st.SearchStrategy[bytes]) -> bytes:
    """An encoding with a few bytes changed, put in or taken out."""
    data = bytearray(draw(encodings))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["change", "insert", "delete"]))
        byte = draw(st.integers(0, 255))
        if edit == "insert":
            data.insert(at, byte)
        elif at < len(data):
            if edit == "change":
                data[at] = byte
            else:
                del data[at]
    return bytes(data)


_REQUEST_TYPES: list[type[betterproto2.Message]] = [
    orch_pb.SubmitTaskRequest,
    orch_pb.SubmitTasksRequest,
    orch_pb.StreamEventsRequest,
    env_pb.StreamLogsRequest,
    # Not requests, but they have maps and repeated messages.
    orch_pb.HealthResponse,
    orch_pb.GetMetricsResponse,
]
_encodings = st.one_of(
    submit_requests.map(bytes),
    task_statuses.map(lambda status: bytes(convert.task_status_to_proto(status))),
    st.just(bytes(orch_pb.GetMetricsResponse(values={"a": 1.0, "b": -2.5}))),
    st.just(
        bytes(
            orch_pb.HealthResponse(
                status="ok",
                services=[env_pb.ServiceStatus(name="web", ports={"http": 8080})],
            )
        )
    ),
    st.binary(max_size=40),
)


@settings(max_examples=500)
@given(data=mangled(_encodings), message_type=st.sampled_from(_REQUEST_TYPES))
def test_the_codec_refuses_what_protobuf_refuses(
    data: bytes, message_type: type[betterproto2.Message]
) -> None:
    # protobuf's own parser (upb) is the reference: what it refuses (a field
    # cut short, bad UTF-8, a field number out of range, ...), the codec
    # refuses, naming what is wrong; what the codec takes, protobuf reads
    # alike. The codec is stricter in one way: protobuf keeps a field of a
    # known number sent with another wire type aside, as an unknown field.
    reference = _protobuf_parsed(data, message_type)
    protobuf_reads = reference is not None
    name = message_type.__name__
    outcome = _decoded(data, message_type)
    if isinstance(outcome, GRPCError):
        assert outcome.status is Status.INVALID_ARGUMENT
        assert (outcome.message or "").startswith(f"the request is not a valid {name}: ")
        assert not protobuf_reads or "must be" in (outcome.message or ""), outcome.message
    else:
        assert protobuf_reads
        assert outcome == message_type.FromString(reference.SerializeToString())


def _protobuf_parsed(data: bytes, message_type: type[betterproto2.Message]) -> Any:
    """``data`` as protobuf's own parser reads it (protobuf ships no types), or None."""
    factory = importlib.import_module("google.protobuf.message_factory")
    errors = importlib.import_module("google.protobuf.message")
    # The generated classes hold their descriptors, from which protobuf makes its own.
    reference = factory.GetMessageClass(getattr(message_type, "DESCRIPTOR"))()  # noqa: B009
    try:
        reference.ParseFromString(data)
    except errors.DecodeError:
        return None
    return reference


def _decoded(data: bytes, message_type: type[betterproto2.Message]) -> Any:
    """The message the codec makes of ``data``, or the error it raises."""
    try:
        return _Codec().decode(data, message_type)
    except GRPCError as exc:
        return exc


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x0a\x05\x01\x02", "field 1 (ints) is cut short: its length is 5 bytes, and 2 follow"),
        (b"\x0a\x01\x80", "field 1 (ints) must be packed sint64s, got a varint cut short"),
        (b"\x0a\x0b" + b"\xff" * 11, "field 1 (ints) must be packed sint64s, got a varint of over"),
        (b"\x12\x04\x00\x00\x00\x00", "field 2 (doubles) must be packed doubles, got 4 bytes"),
        (b"\x19" + b"\x00" * 8, "field 3 (fixed) must be a fixed32, got 8 fixed bytes"),
        (b"\x22\x00\x22\x02\x0a\x00", "field 4.1 (resources[1].cpus) must be a double, got"),
        (b"\x2a\x03\x0a\x01\xff", "field 5.1 (ports[0].key) must be a string, got bytes that"),
        (b"\x32\x02\x00", "field 6 (blob) is cut short: its length is 2 bytes, and 1 follow"),
        (b"\x22\x01\x80", "field 4 (resources[0]) ends inside a field's key (at byte 2)"),
    ],
)
def test_the_codec_names_what_is_wrong(data: bytes, problem: str) -> None:
    with pytest.raises(GRPCError) as caught:
        _Codec().decode(data, _Everything)
    assert caught.value.status is Status.INVALID_ARGUMENT
    assert (caught.value.message or "").startswith(
        f"the request is not a valid _Everything: {problem}"
    )


def _key(number: int, wire_type: int) -> bytes:
    return betterproto2.encode_varint(number << 3 | wire_type)


_HANDLER_H = b"\x0a\x01h"  # SubmitTaskRequest.handler = "h"
_GPUS_5 = b"\x10\x05"  # Resources.gpus = 5, once inside field 10 (resources)


@pytest.mark.parametrize(
    "data",
    [
        _key(99, 3) + _key(1, 0) + b"\x01" + _key(99, 4) + _HANDLER_H,
        _key(99, 3) + _key(99, 4) + _HANDLER_H,
        _key(99, 3) + _key(98, 3) + _key(1, 2) + b"\x00" + _key(98, 4) + _key(99, 4) + _HANDLER_H,
        _HANDLER_H + b"\x52" + bytes([2 + len(_GPUS_5)]) + _key(7, 3) + _key(7, 4) + _GPUS_5,
    ],
    ids=["group", "empty group", "nested groups", "group in a nested message"],
)
def test_unknown_groups_are_left_out_as_protobuf_leaves_them(data: bytes) -> None:
    # A proto2 client's group, of a field this server does not know: protobuf
    # skips it whole; the codec used to refuse the request.
    assert _protobuf_parsed(data, orch_pb.SubmitTaskRequest) is not None
    message = _Codec().decode(data, orch_pb.SubmitTaskRequest)
    assert message.handler == "h"


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (
            _key(99, 3) + _key(1, 0) + b"\x01",
            "field 99 is cut short: the bytes end inside its group",
        ),
        (_key(99, 3) + _key(98, 4), "field 99 has a group ended by field 98's end"),
        (_key(99, 4), "field 99 has wire type 4, which this server does not read"),
        (_key(99, 3) * 200, "field 99 has groups nested over 100 deep"),
    ],
)
def test_a_broken_unknown_group_is_named(data: bytes, problem: str) -> None:
    assert _protobuf_parsed(data, orch_pb.SubmitTaskRequest) is None
    with pytest.raises(GRPCError) as caught:
        _Codec().decode(data, orch_pb.SubmitTaskRequest)
    assert caught.value.status is Status.INVALID_ARGUMENT
    assert (caught.value.message or "").endswith(problem)
