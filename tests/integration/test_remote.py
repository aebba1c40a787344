"""One behavioural suite for every AgentInfra: in-process, and remote over a real loopback socket.

The ``api`` fixture is parametrized: each test runs against ``AgentInfra``
itself and against ``AgentInfra.connect()`` to a server serving such an
instance, and must see the same results, types and exceptions. The remote
side's own concerns (tokens, the loopback rule, no server) follow the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import aclosing
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import anyio
import anyio.abc
import anyio.from_thread
import anyio.to_thread
import betterproto2
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from grpclib.client import Channel, Stream
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from grpclib.health.service import Health
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from grpclib.metadata import encode_grpc_message
from grpclib.server import Server
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import dspy_infra
import dspy_infra.cli
from dspy_infra import AgentInfra, ClassStatus, StoreFailed
from dspy_infra import errors as errors_module
from dspy_infra._procfs import group_alive
from dspy_infra.errors import (
    BackendUnavailable,
    ConfigError,
    DependencyFailed,
    InfraClosed,
    InfraError,
    InvalidTask,
    ServiceError,
    ServiceStartError,
    StateDirInUse,
    TaskCancelled,
    TaskError,
    TaskFailed,
    TaskLost,
    TaskTimedOut,
    UnknownEventType,
    UnknownService,
    UnknownTask,
)
from dspy_infra.events import Event, EventsDropped
from dspy_infra.infra import EVENT_TYPES
from dspy_infra.remote import RemoteAgentInfra, ServerUnavailable, UnsupportedCall, serve
from dspy_infra.remote import client as remote_client
from dspy_infra.remote import server as server_module
from dspy_infra.remote._generated.env_manager import v1 as env_pb
from dspy_infra.remote._generated.orchestrator import v1 as orch_pb
from dspy_infra.remote._wire import parse_address
from dspy_infra.scheduling.checks import MAX_JSON_DEPTH
from dspy_infra.scheduling.tasks import Resources, TaskEvent, TaskRequest, TaskState, TaskStatus
from dspy_infra.services.status import ServiceState, ServiceStatus
from dspy_infra.workflows import (
    InvalidWorkflow,
    RunHandle,
    RunState,
    RunStatus,
    StepState,
    UnknownRun,
    UnknownWorkflow,
    Workflow,
    WorkflowError,
    WorkflowEvent,
)
from tests.integration.helpers import Api, serve_without, service, used

pytestmark = pytest.mark.anyio


async def echo(payload: Any) -> Any:
    return payload


async def sleepy(payload: Any) -> Any:
    await anyio.sleep(60)
    return payload


async def boom(payload: Any) -> Any:
    raise RuntimeError(f"boom: {payload}")


async def clash(payload: dict[str, Any]) -> dict[Any, Any]:
    """Its payload, with an int key that JSON writes as one of the payload's."""
    return {1: "a", **payload}


def make_infra(tmp_path: Path) -> AgentInfra:
    return AgentInfra.start(
        {
            "infra": {},
            "services": {
                "web": service("--say", "hello", "--say", "ready", port=True, autostart=False)
            },
            "classes": {"one_at_a_time": {"runner": "inprocess", "max_concurrency": 1}},
        },
        state_dir=tmp_path / "state",
        handlers={"echo": echo, "sleepy": sleepy, "boom": boom, "clash": clash},
    )


@pytest.fixture(params=["inprocess", "remote"])
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Api]:
    async with make_infra(tmp_path) as infra, used(infra, request.param) as api:
        yield api


@pytest.fixture(params=["inprocess", "remote"])
async def failing(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Api]:
    """Services that fail to start: ``broken`` exits 3 at once, after two
    lines; ``api`` waits for a line that ``kv`` never prints."""
    config = {
        "infra": {},
        "services": {
            "broken": service(
                *("--say", "reading /etc/app.conf", "--say", "no such file"),
                *("--exit-after", "0", "--code", "3"),
                ports={"main": 0},  # and no --port: nothing ever listens there
                health={"tcp": "{port}"},
                autostart=False,
                start_retries=0,
            ),
            "kv": service("--say", "booting", autostart=False, restart="no"),
            "api": service(
                port=True,
                autostart=False,
                depends_on={"kv": {"condition": "log_ready", "pattern": "never printed"}},
            ),
        },
    }
    async with (
        AgentInfra.start(config, state_dir=tmp_path / "state") as infra,
        used(infra, request.param) as api,
    ):
        yield api


async def until_state(api: Api, task_id: str, state: TaskState) -> None:
    with anyio.fail_after(5):
        while (await api.get_task_status(task_id)).state is not state:
            await anyio.sleep(0.005)


# -- the suite: the same for both ----------------------------------------------


async def test_submit_and_result(api: Api) -> None:
    # 2**60 + 1 is not a double: JSON text carries it exactly.
    payload = {"n": 2**60 + 1, "text": "héllo", "items": [1.5, None, True], "nested": {"a": []}}
    handle = await api.submit_task("echo", payload)
    assert await handle.result() == payload
    assert await api.submit_task("echo") is not None  # no payload: null


async def test_status_after_finish(api: Api) -> None:
    handle = await api.submit_task("echo", [1, 2], priority=3)
    await handle.result()
    status = await api.get_task_status(handle.task_id)
    assert isinstance(status, TaskStatus)
    assert status.state is TaskState.SUCCEEDED
    assert (status.task_id, status.handler, status.task_class) == (
        handle.task_id,
        "echo",
        "cpu_short",
    )
    assert status.result == [1, 2]
    assert status.priority == 3
    assert status.finished_at is not None
    assert status == await handle.status()


async def test_a_class_default_of_attempts_beyond_the_wire_reads_as_the_most_it_holds(
    tmp_path: Path,
) -> None:
    # A class that retries "for ever" gives its tasks more attempts than an
    # int32 holds: the status says as many as the wire holds (as a client's
    # max_attempts beyond it travels), never 0 or a negative number.
    config = {"infra": {}, "classes": {"forever": {"max_attempts": 2**40}}}
    async with (
        AgentInfra.start(config, state_dir=tmp_path / "state", handlers={"echo": echo}) as infra,
        used(infra, "remote") as remote,
    ):
        handle = await remote.submit_task("echo", 1, task_class="forever")
        assert await handle.result() == 1
        assert (await infra.get_task_status(handle.task_id)).max_attempts == 2**40
        status = await remote.get_task_status(handle.task_id)
        assert status.max_attempts == 2**31 - 1
        assert (await remote.cancel_task(handle.task_id)).max_attempts == 2**31 - 1


async def test_submit_is_idempotent_by_task_id(api: Api) -> None:
    first = await api.submit_task("echo", 1, task_id="same-id")
    second = await api.submit_task("echo", 2, task_id="same-id")
    assert first.task_id == second.task_id == "same-id"
    assert await second.result() == 1


async def test_failed_task_raises_task_failed(api: Api) -> None:
    handle = await api.submit_task("boom", "x")
    with pytest.raises(TaskFailed, match="boom: x"):
        await handle.result()
    status = await handle.wait()
    assert status.state is TaskState.FAILED


async def test_cancel(api: Api) -> None:
    handle = await api.submit_task("sleepy", None)
    await until_state(api, handle.task_id, TaskState.RUNNING)
    status = await api.cancel_task(handle.task_id)
    assert status.state is TaskState.CANCELLED
    with pytest.raises(TaskCancelled):
        await handle.result()


async def test_unknown_task(api: Api) -> None:
    with pytest.raises(UnknownTask, match="unknown task 'nope'") as info:
        await api.get_task_status("nope")
    assert info.value.task_id == "nope"
    with pytest.raises(UnknownTask):
        await api.cancel_task("nope")
    with pytest.raises(UnknownTask):
        await api.task_handle("nope").result()


async def test_invalid_task(api: Api) -> None:
    with pytest.raises(InvalidTask, match="unknown task class 'nope'"):
        await api.submit_task("echo", 1, task_class="nope")
    with pytest.raises(InvalidTask, match="priority"):
        await api.submit_task("echo", 1, priority=-1)
    with pytest.raises(InvalidTask, match="not JSON-compatible"):
        await api.submit_task("echo", object())
    with pytest.raises(InvalidTask, match="not JSON-compatible"):
        await api.submit_task("echo", float("nan"))
    # Beyond what the wire holds in 32 bits: refused, never cut to 50 or 0.
    for huge in (2**32 + 50, 2**40):
        with pytest.raises(InvalidTask, match="priority"):
            await api.submit_task("echo", 1, priority=huge)
        with pytest.raises(InvalidTask, match="priority"):
            await api.submit_tasks("echo", [1], priority=huge)
        # As many attempts as ever: the same on the wire (where it becomes 2**31 - 1).
        assert await (await api.submit_task("echo", 1, max_attempts=huge)).result() == 1
    # Beyond what the wire holds in 64 (memory_mb) or 32 bits (gpus): refused with
    # the number as given, never cut (2**64 + 5 arriving as 5) or made negative.
    # In-process no machine has that much; remotely the client refuses it first.
    for resources, huge in [
        *((Resources(memory_mb=n), n) for n in (2**63, 2**64 + 5)),
        *((Resources(gpus=n), n) for n in (2**31, 2**32 + 5)),
    ]:
        with pytest.raises(InvalidTask, match=rf"\b{huge}\b") as caught:
            await api.submit_task("echo", 1, resources=resources)
        if isinstance(api, RemoteAgentInfra):
            field = "memory_mb" if resources.memory_mb else "gpus"
            assert f"resources.{field} is out of range, got {huge}" in str(caught.value)
        with pytest.raises(InvalidTask, match=rf"\b{huge}\b"):
            await api.submit_tasks("echo", [1], resources=resources)


async def test_the_highest_priority_reads_the_same_in_process_and_remotely(
    tmp_path: Path,
) -> None:
    # TaskStatus.priority is an int32 in proto/: with max_priority above it, a
    # task submitted in-process at 2**32 + 7 read back remotely as priority 7.
    # max_priority is bounded to what the wire holds, and refused above it.
    top = 2**31 - 1
    with pytest.raises(ConfigError) as caught:
        AgentInfra.start({"infra": {"max_priority": top + 1}}, state_dir=tmp_path / "state")
    assert str(caught.value) == (
        f"<mapping>: infra.max_priority: expected a number <= {top}, got {top + 1}"
    )
    config = {"infra": {"max_priority": top}}
    async with (
        AgentInfra.start(config, state_dir=tmp_path / "state", handlers={"echo": echo}) as infra,
        used(infra, "remote") as remote,
    ):
        for api in (infra, remote):
            handle = await api.submit_task("echo", 1, priority=top)
            assert await handle.result() == 1
            for reader in (infra, remote):
                assert (await reader.get_task_status(handle.task_id)).priority == top


# Arguments of the wrong type, as a caller without a type checker passes them,
# and what each side says of them: the same words. The wire could carry none
# of them (True would arrive as 1, None as 0 or the default class).
_WRONG_TYPES: dict[str, tuple[dict[str, Any], str]] = {
    "str priority": ({"priority": "x"}, "priority must be an integer, got 'x'"),
    "float priority": ({"priority": 1.5}, "priority must be an integer, got 1.5"),
    "bool priority": ({"priority": True}, "priority must be an integer, got True"),
    "no priority": ({"priority": None}, "priority must be an integer, got None"),
    "float max_attempts": (
        {"max_attempts": 2.5},
        f"max_attempts must be an integer from 1 to {2**63 - 1}, got 2.5",
    ),
    "str timeout": ({"timeout": "5"}, "timeout must be a number of seconds above 0, got '5'"),
    "str cpus": (
        {"resources": Resources(cpus="1")},  # type: ignore[arg-type]
        "resources.cpus must be a finite number of at least 0, got '1'",
    ),
    "dict resources": (
        {"resources": {"cpus": 1}},
        "resources must be a Resources or None, got {'cpus': 1}",
    ),
    "int handler": ({"handler": 5}, "handler must be a string, got 5"),
    "int service name": ({"needs": [1]}, "needs must be a list of service names, got (1,)"),
    "service name not UTF-8": (
        {"needs": ["\udcff"]},
        "needs must be service names that UTF-8 can encode, got ('\\udcff',)",
    ),
    "int workflow_id": ({"workflow_id": 5}, "workflow_id must be a string of at most 200"),
    "no task_class": ({"task_class": None}, "task_class must be a string, got None"),
}


@pytest.mark.parametrize("case", list(_WRONG_TYPES))
async def test_arguments_of_the_wrong_type_are_refused_alike(api: Api, case: str) -> None:
    changes, message = _WRONG_TYPES[case]
    arguments: dict[str, Any] = {"handler": "echo", "task_id": "bad-1", **changes}
    with pytest.raises(InvalidTask) as caught:
        await api.submit_task(arguments.pop("handler"), 1, **arguments)
    assert str(caught.value).startswith(f"task 'bad-1' refused: {message}")
    assert caught.value.task_id == "bad-1"
    with pytest.raises(UnknownTask):
        await api.get_task_status("bad-1")
    arguments.pop("task_id")
    with pytest.raises(InvalidTask, match=f"refused: {re.escape(message)}"):
        await api.submit_tasks(changes.get("handler", "echo"), [1], **arguments)
    with pytest.raises(InvalidTask, match="task_id must be a non-empty string, got 5"):
        await api.submit_task("echo", 1, task_id=5)  # type: ignore[arg-type]
    assert await (await api.submit_task("echo", 1)).result() == 1


def nested(depth: int) -> list[Any]:
    """A list in a list ... ``depth`` deep: JSON, but deeper than Python recurses."""
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


async def test_values_nested_too_deeply_are_refused(api: Api) -> None:
    too_deep = nested(5000)
    with pytest.raises(InvalidTask, match="not JSON-compatible"):
        await api.submit_task("echo", too_deep)
    with pytest.raises(InvalidTask, match="not JSON-compatible"):
        await api.submit_tasks("echo", [1, too_deep])
    workflow = await api.workflows.create(CHAIN)
    with pytest.raises(InvalidWorkflow, match="not JSON-compatible"):
        await api.workflows.start_run(workflow.workflow_id, {"n": too_deep})
    assert await (await api.submit_task("echo", nested(50))).result() == nested(50)


async def test_keys_that_become_one_as_json_are_refused_alike(api: Api) -> None:
    # JSON writes 1 as "1": {1: "a", "1": "b"} was stored (and sent) with one of its values.
    words = "its keys 1 and '1' at ['x'][1] are both \"1\" as JSON: one value would be lost"
    colliding = {"x": [0, {1: "a", "1": "b"}]}
    with pytest.raises(InvalidTask) as caught:
        await api.submit_task("echo", colliding, task_id="clash")
    assert str(caught.value) == (
        f"task 'clash' refused: the payload is not JSON-compatible ({words})"
    )
    with pytest.raises(UnknownTask):
        await api.get_task_status("clash")
    with pytest.raises(InvalidTask, match=re.escape(words)):
        await api.submit_tasks("echo", [1, colliding])
    with pytest.raises(InvalidTask, match=re.escape("keys None and 'null' are both \"null\"")):
        await api.submit_task("echo", {None: 1, "null": 2})
    workflow = await api.workflows.create(CHAIN)
    with pytest.raises(InvalidWorkflow, match=re.escape("keys True and 'true' at ['n']")):
        await api.workflows.start_run(workflow.workflow_id, {"n": {True: 1, "true": 2}})
    # A result whose keys collide fails its task, rather than lose a value.
    with pytest.raises(TaskFailed, match=re.escape("its result is not JSON-compatible (its keys")):
        await (await api.submit_task("clash", {"1": "b"})).result()
    # Keys that are no strings but collide with none are written as JSON writes them.
    assert await (await api.submit_task("echo", {1: "a", 2.5: "b"})).result() == {
        "1": "a",
        "2.5": "b",
    }


async def test_connecting_to_a_peer_that_never_answers_gives_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(remote_client, "CONNECT_TIMEOUT", 0.5)
    with socket.socket() as silent:  # takes connections (the kernel does), says nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        with anyio.fail_after(10), pytest.raises(ServerUnavailable, match="no answer from"):
            async with AgentInfra.connect(address):
                pass


@contextlib.asynccontextmanager
async def raw_submit_task(
    address: str,
) -> AsyncIterator[Stream[orch_pb.SubmitTaskRequest, orch_pb.SubmitTaskResponse]]:
    """A SubmitTask call whose messages the test sends itself, as no AgentInfra client would."""
    channel = Channel("127.0.0.1", int(address.rsplit(":", 1)[1]))
    try:
        async with channel.request(
            "/orchestrator.v1.Orchestrator/SubmitTask",
            Cardinality.STREAM_UNARY,  # as a client that sends no message may
            orch_pb.SubmitTaskRequest,
            orch_pb.SubmitTaskResponse,
        ) as stream:
            yield stream
    finally:
        channel.close()


async def test_a_call_without_its_request_message_is_invalid_argument(tmp_path: Path) -> None:
    async with make_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0") as srv:
        async with raw_submit_task(srv.address) as stream:
            await stream.send_request(end=True)  # and no message
            with pytest.raises(GRPCError) as info:
                await stream.recv_message()
        assert info.value.status is Status.INVALID_ARGUMENT
        assert "no request message" in (info.value.message or "")


async def test_a_compressed_request_message_is_unimplemented(tmp_path: Path) -> None:
    async with make_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0") as srv:
        async with raw_submit_task(srv.address) as stream:
            await stream.send_request()
            message = bytes(orch_pb.SubmitTaskRequest(handler="echo", payload_json="1"))
            # The message's 5-byte prefix with its compressed flag set, which
            # grpclib's own send_message never sets: written on the HTTP/2 stream.
            prefix = struct.pack(">?I", True, len(message))
            await stream._stream.send_data(prefix + message)
            await stream.end()
            with pytest.raises(GRPCError) as info:
                await stream.recv_message()
        assert info.value.status is Status.UNIMPLEMENTED
        assert info.value.message == "compressed messages are not supported"


@pytest.mark.parametrize(
    ("server", "answer"),
    [
        ("this", "this server has no method /orchestrator.v1.Orchestrator/ListTaskClasses"),
        # grpclib's own answer, as servers before this one gave it: without a
        # content-type, which grpclib's client reads as UNKNOWN.
        ("older", "Missing content-type header"),
    ],
)
async def test_a_call_the_server_lacks_is_unsupported_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: str, answer: str
) -> None:
    serve_without(monkeypatch, "/orchestrator.v1.Orchestrator/ListTaskClasses")
    if server == "older":
        monkeypatch.setattr(server_module._Methods, "get", dict.get)
    async with (
        make_infra(tmp_path) as infra,
        serve(infra, "127.0.0.1:0") as srv,
        AgentInfra.connect(srv.address) as remote,
    ):
        with pytest.raises(UnsupportedCall) as info:
            await remote.task_classes()
        assert isinstance(info.value, InfraError)
        assert str(info.value) == (
            f"the server at {srv.address} does not serve "
            f"/orchestrator.v1.Orchestrator/ListTaskClasses: {answer} "
            "(a dspy-infra older than this client?)"
        )
        assert await remote.get_metrics()  # the rest still works


async def test_submit_tasks(api: Api) -> None:
    handles = await api.submit_tasks("echo", [1, "two", {"three": 3}])
    assert [await h.result() for h in handles] == [1, "two", {"three": 3}]
    assert await api.submit_tasks("echo", []) == []


async def test_stream_task_results_and_since(api: Api) -> None:
    handles = await api.submit_tasks("echo", [1, 2, 3])
    ids = [h.task_id for h in handles]
    with anyio.fail_after(10):
        finals = [r async for r in api.stream_task_results(ids)]
    assert all(isinstance(r, TaskEvent) for r in finals)
    assert sorted(r.task_id for r in finals) == sorted(ids)
    assert sorted(r.result for r in finals) == [1, 2, 3]
    assert all(r.seq > 0 and r.type == "task_completed" for r in finals)

    # Following every task, since just before the first: the three are replayed.
    first = min(r.seq for r in finals)
    replayed: list[TaskEvent] = []
    with anyio.fail_after(10):
        async with aclosing(api.stream_task_results(since=first - 1)) as results:
            async for r in results:
                replayed.append(r)
                if len(replayed) == 3:
                    break
    assert [(r.seq, r.task_id, r.result) for r in replayed] == sorted(
        (r.seq, r.task_id, r.result) for r in finals
    )
    assert [r async for r in api.stream_task_results([])] == []


async def test_results_of_tasks_finished_before_the_stream_keep_their_seq(api: Api) -> None:
    # Read from the event history as published, not made anew from the store
    # with seq 0: a reader resumes from the seq of the last result it read.
    handles = await api.submit_tasks("echo", [1, 2])
    for handle in handles:
        await handle.result()
    with anyio.fail_after(10):
        finals = [r async for r in api.stream_task_results([h.task_id for h in handles])]
        published = [
            e
            async for e in api.stream_events("task_completed", follow=False)
            if isinstance(e, TaskEvent)
        ]
    assert sorted((r.seq, r.task_id) for r in finals) == [(e.seq, e.task_id) for e in published]
    assert all(r.seq > 0 for r in finals)


async def test_a_task_id_that_utf8_cannot_encode_is_unknown_alike(api: Api) -> None:
    # A name that is not UTF-8 as Python decodes it (a command-line argument,
    # a file name): a bare UnicodeEncodeError, from SQLite in-process and
    # from the encoder over gRPC. No task has such an id (none is stored).
    task_id = "t\udcff"
    for call in (api.get_task_status, api.cancel_task):
        with pytest.raises(UnknownTask, match=re.escape("unknown task 't\\udcff'")) as info:
            await call(task_id)
        assert info.value.task_id == task_id
    with pytest.raises(UnknownTask):
        await api.task_handle(task_id).result()
    with pytest.raises(UnknownTask):
        [r async for r in api.stream_task_results([task_id])]


async def test_a_task_handle_given_for_its_id_is_refused_clearly(api: Api) -> None:
    # In-process SQLite's "Error binding parameter 1: type 'TaskHandle' is not
    # supported", remotely "'TaskHandle' object has no attribute 'encode'".
    handle = await api.submit_task("echo", 1)
    await handle.result()
    told = re.escape(
        f"task_id must be a string, got a TaskHandle: pass its .task_id ('{handle.task_id}')"
    )
    for call in (api.get_task_status, api.cancel_task, api.task_handle):
        with pytest.raises(InvalidTask, match=told):
            await call(handle)  # type: ignore[arg-type,misc]
    with pytest.raises(InvalidTask, match=told):
        [r async for r in api.stream_task_results([handle])]  # type: ignore[list-item]
    with pytest.raises(InvalidTask, match=told):  # one id, as a list's only item may be
        [r async for r in api.stream_task_results(handle)]  # type: ignore[arg-type]
    with pytest.raises(InvalidTask, match=re.escape("task_id must be a string, got None")):
        await api.get_task_status(None)  # type: ignore[arg-type]
    assert (await api.get_task_status(handle.task_id)).state is TaskState.SUCCEEDED


async def test_a_since_that_is_no_seq_is_refused_and_any_int_is_taken(api: Api) -> None:
    # A seq read back from a file as text failed deep in the stream with "'>'
    # not supported between instances of 'str' and 'int'", or was taken.
    handle = await api.submit_task("echo", 1)
    await handle.result()
    workflow = await api.workflows.create(CHAIN)
    run = await api.workflows.start_run(workflow.workflow_id, {"n": []})
    with anyio.fail_after(10):
        await run.wait()
    told = re.escape("since must be an event's seq (an int) or None, got '3'")
    streams: list[Callable[[Any], AsyncIterator[object]]] = [
        lambda since: api.stream_events(since=since, follow=False),
        lambda since: api.stream_task_results([handle.task_id], since=since),
        lambda since: api.workflows.stream_status(run.run_id, since=since),
    ]
    for stream in streams:
        with pytest.raises(TypeError, match=told):
            [e async for e in stream("3")]
        with pytest.raises(TypeError, match="got True"):
            [e async for e in stream(True)]
    # Past any seq, or before the first, over the wire as in-process (int64 holds neither).
    assert [e async for e in api.stream_events(since=2**70, follow=False)] == []
    assert len([e async for e in api.stream_events(since=-(2**70), follow=False)]) > 0
    with anyio.fail_after(10):
        finals = [r async for r in api.stream_task_results([handle.task_id], since=2**70)]
    assert [r.result for r in finals] == [1]


async def test_stream_events(api: Api) -> None:
    handle = await api.submit_task("echo", "e")
    await handle.result()
    seen: list[Event] = []
    with anyio.fail_after(10):
        async with aclosing(api.stream_events({"task_completed"}, since=0)) as events:
            async for event in events:
                seen.append(event)
                if isinstance(event, TaskEvent) and event.task_id == handle.task_id:
                    break
    last = seen[-1]
    assert isinstance(last, TaskEvent)
    assert (last.type, last.state, last.result) == ("task_completed", TaskState.SUCCEEDED, "e")
    assert all(e.type == "task_completed" for e in seen)


async def test_stream_events_given_one_type_as_a_string_follows_that_type(api: Api) -> None:
    # A string is a collection of strings: its letters were taken for the
    # types, refused as "unknown event types 'a', 'c', 'd', ...".
    handle = await api.submit_task("echo", "e")
    await handle.result()
    with anyio.fail_after(10):
        seen = [e async for e in api.stream_events("task_completed", since=0, follow=False)]
    assert [(e.type, e.task_id) for e in seen if isinstance(e, TaskEvent)] == [
        ("task_completed", handle.task_id)
    ]
    assert all(e.type == "task_completed" for e in seen)


async def test_stream_events_without_follow_ends_with_what_was_held(api: Api) -> None:
    held = await api.submit_tasks("echo", ["a", "b"])
    for h in held:
        await h.result()

    async def history(**kwargs: Any) -> list[Event]:
        with anyio.fail_after(10):
            return [e async for e in api.stream_events(follow=False, **kwargs)]

    everything = await history()
    assert everything == await history(since=0)  # since=None: all that is held, as 0
    assert [e.seq for e in everything] == sorted({e.seq for e in everything})
    completed = await history(types={"task_completed"})
    assert [(e.type, e.task_id) for e in completed if isinstance(e, TaskEvent)] == [
        ("task_completed", h.task_id) for h in held
    ]
    assert await history(types={"task_completed"}, since=completed[-1].seq) == []

    # What is held as of the first read; what comes while it is read is not:
    # a busy instance does not keep the stream open.
    later: str | None = None
    with anyio.fail_after(10):
        async with aclosing(api.stream_events({"task_completed"}, follow=False)) as events:
            async for event in events:
                if later is None:
                    handle = await api.submit_task("echo", "later")
                    await handle.result()
                    later = handle.task_id
                assert isinstance(event, TaskEvent)
                assert event.task_id != later
    assert later is not None


@pytest.mark.parametrize("how", ["inprocess", "remote"])
@pytest.mark.parametrize("follow", [True, False])
async def test_stream_events_from_beyond_the_history_is_told_of_the_gap(
    tmp_path: Path, how: str, follow: bool
) -> None:
    # It began at the oldest event kept, as if nothing had been missed.
    infra = AgentInfra.start(
        {"infra": {"event_history": 3}}, state_dir=tmp_path / "state", handlers={"echo": echo}
    )
    async with infra, used(infra, how) as api:
        await (await api.submit_task("echo", 0)).result()
        with anyio.fail_after(10):
            since = [e async for e in api.stream_events(since=0, follow=False)][-1].seq
            for handle in await api.submit_tasks("echo", range(5)):
                await handle.result()
            kept = [e async for e in api.stream_events(since=since, follow=False)]
            async with aclosing(api.stream_events(since=since, follow=follow)) as events:
                received = [await anext(events) for _ in kept]
        assert isinstance(kept[0], EventsDropped)
        assert kept[0].count == kept[1].seq - since - 1 > 0
        assert [(e.type, e.seq) for e in received] == [(e.type, e.seq) for e in kept]
        assert [e.seq for e in kept[1:]] == list(range(kept[1].seq, kept[1].seq + 3))


async def test_stream_events_refuses_types_that_nothing_publishes(api: Api) -> None:
    # A misspelt type would wait forever for events that never come.
    async def first(types: Any, *, follow: bool = True) -> Event:
        async with aclosing(api.stream_events(types, follow=follow)) as events:
            with anyio.fail_after(10):
                return await anext(events)

    with pytest.raises(UnknownEventType) as info:
        await first({"task_completed", "task_done", "nope"})
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert message.startswith("types: unknown event types 'nope', 'task_done' (known: ")
    assert all(name in message for name in EVENT_TYPES)
    assert info.value.unknown == ("nope", "task_done")
    assert info.value.known == tuple(sorted(EVENT_TYPES))
    assert info.value.reason == message.removeprefix("types: ")
    with pytest.raises(UnknownEventType, match=r"^types: unknown event type 'nope' "):
        await first({"nope"}, follow=False)
    # What names no type at all (a number, a list, text that UTF-8 cannot
    # encode) is refused alike: remotely it was the encoder's AttributeError
    # or UnicodeEncodeError, in-process a TypeError for some.
    for types, unknown in [
        ({1}, (1,)),
        (5, (5,)),
        ("\udcff", ("\udcff",)),
        ([["task_completed"]], (["task_completed"],)),
        (["nope", 1, "task_completed", 1], (1, "nope")),
    ]:
        with pytest.raises(UnknownEventType) as info:
            await first(types, follow=False)
        assert info.value.unknown == unknown, types


async def test_services(api: Api) -> None:
    assert api.services.list() == ["web"]
    before = await api.services.status()
    assert list(before) == ["web"]
    assert isinstance(before["web"], ServiceStatus)
    assert before["web"].state is ServiceState.INACTIVE

    started = await api.services.start(["web"])
    assert started["web"].state is ServiceState.HEALTHY
    assert started["web"].ports["main"] > 0
    assert (await api.services.status(["web"]))["web"].healthy
    with anyio.fail_after(5):
        while "ready" not in [line async for line in api.services.logs("web")]:
            await anyio.sleep(0.01)
    assert [line async for line in api.services.logs("web", tail=1)] == ["ready"]
    with pytest.raises(ValueError, match="tail must be 0 or more"):
        [line async for line in api.services.logs("web", tail=-1)]
    report = await api.health_check()
    assert report.healthy
    assert report.services["web"].state is ServiceState.HEALTHY

    await api.services.stop(["web"])
    assert (await api.services.status())["web"].state is ServiceState.STOPPED
    assert await api.services.status([]) == {}

    # A string is one name, not the characters it holds.
    assert (await api.services.start("web"))["web"].state is ServiceState.HEALTHY
    assert list(await api.services.status("web")) == ["web"]
    await api.services.stop("web")
    assert (await api.services.status("web"))["web"].state is ServiceState.STOPPED


async def test_unknown_service(api: Api) -> None:
    with pytest.raises(UnknownService, match="unknown service 'nope'") as info:
        await api.services.start(["nope"])
    assert info.value.service == "nope"
    assert info.value.known == ("web",)
    with pytest.raises(UnknownService):
        await api.services.status(["nope"])
    with pytest.raises(UnknownService):
        [line async for line in api.services.logs("nope")]


async def test_a_service_name_that_cannot_travel_is_unknown_alike(api: Api) -> None:
    # No name of the wrong type (a number read from a file), nor one that
    # UTF-8 cannot encode (a lone surrogate), names a service: UnknownService,
    # in the same words, never the encoder's AttributeError or UnicodeEncodeError.
    for name in (1, None, "\udcff", ["web"]):
        expected = f"unknown service {name!r} (configured: web)"
        for call in (api.services.start, api.services.stop, api.services.status):
            with pytest.raises(UnknownService) as info:
                await call([name])  # type: ignore[list-item]
            assert (str(info.value), info.value.service) == (expected, name), call
    # One name alone that is no string is that name, as a string alone is: iterated,
    # it was a TypeError ("'int' object is not iterable") on both sides.
    for call in (api.services.start, api.services.stop, api.services.status):
        with pytest.raises(UnknownService, match=re.escape("unknown service 1 ")):
            await call(1)  # type: ignore[arg-type]
        with pytest.raises(UnknownService) as info:
            [line async for line in api.services.logs(name)]  # type: ignore[arg-type]
        assert str(info.value) == expected
    # The first name that is not configured is the one named, as in-process.
    with pytest.raises(UnknownService, match="unknown service 'nope'"):
        await api.services.status(["web", "nope", 1])  # type: ignore[list-item]


async def test_a_service_that_fails_to_start_says_why(failing: Api) -> None:
    # What a person reads to fix it: the exit code and the last lines logged.
    with pytest.raises(ServiceStartError) as info:
        await failing.services.start(["broken"])
    error = info.value
    assert type(error) is ServiceStartError
    assert error.service == "broken"
    assert error.reason == "exited with code 3 before becoming healthy"
    assert error.exit_code == 3
    assert error.log_tail == ("reading /etc/app.conf", "no such file")
    assert str(error) == (
        "service 'broken' failed: exited with code 3 before becoming healthy\n"
        "  last log lines:\n    reading /etc/app.conf\n    no such file"
    )


async def test_a_dependency_stopped_while_awaited_fails_its_dependent(failing: Api) -> None:
    async def stop_kv_once_running() -> None:
        with anyio.fail_after(10):
            while (await failing.services.status(["kv"]))["kv"].state is not ServiceState.RUNNING:
                await anyio.sleep(0.01)
        await failing.services.stop(["kv"])

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_kv_once_running)
        with pytest.raises(DependencyFailed) as info, anyio.fail_after(20):
            await failing.services.start(["api"])
    error = info.value
    assert type(error) is DependencyFailed
    assert (error.service, error.dependency) == ("api", "kv")
    assert error.reason == "dependency 'kv' is stopping"
    assert (error.exit_code, error.log_tail) == (None, ())
    assert str(error) == "service 'api' failed: dependency 'kv' is stopping"


async def test_metrics(api: Api) -> None:
    await (await api.submit_task("echo", 1)).result()
    metrics = await api.get_metrics()
    submitted = {k: v for k, v in metrics.items() if k.startswith("dspy_infra_tasks_submitted")}
    assert submitted
    assert sum(submitted.values()) >= 1


CHAIN = {
    "name": "chain",
    "steps": {
        "first": {"handler": "echo", "payload": {"n": "${inputs.n}"}},
        "second": {
            "handler": "echo",
            "depends_on": ["first"],
            "fan_out": "${steps.first.result.n}",
            "payload": {"item": "${item}", "index": "${index}"},
        },
    },
}


async def test_workflow_create_run_and_stream(api: Api) -> None:
    workflow = await api.workflows.create(CHAIN)
    assert isinstance(workflow, Workflow)
    assert workflow.workflow_id.startswith("chain-")
    assert [s.name for s in workflow.spec.steps] == ["first", "second"]
    again = await api.workflows.create(CHAIN)  # the same spec: the same workflow
    assert (again.workflow_id, again.created_at) == (workflow.workflow_id, workflow.created_at)

    # 2**60 + 1 is not a double: JSON text carries it exactly.
    run = await api.workflows.start_run(workflow.workflow_id, inputs={"n": [2**60 + 1, "b"]})
    assert isinstance(run, RunHandle)
    with anyio.fail_after(10):
        events = [e async for e in api.workflows.stream_status(run.run_id)]
    assert all(isinstance(e, WorkflowEvent) for e in events)
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert all(e.seq > 0 and e.run_id == run.run_id for e in events)
    assert [(e.type, e.step, e.state) for e in events] == [
        ("workflow_run_started", None, "running"),
        ("workflow_step_started", "first", "running"),
        ("workflow_step_succeeded", "first", "succeeded"),
        ("workflow_step_started", "second", "running"),
        ("workflow_step_succeeded", "second", "succeeded"),
        ("workflow_run_succeeded", None, "succeeded"),
    ]
    # Resumed after the first event: the rest, and nothing before.
    with anyio.fail_after(10):
        rest = [e async for e in api.workflows.stream_status(run.run_id, since=events[0].seq)]
    assert rest == events[1:]

    status = await run.wait()
    assert isinstance(status, RunStatus)
    assert status.state is RunState.SUCCEEDED
    assert status.workflow_id == workflow.workflow_id
    assert status.inputs == {"n": [2**60 + 1, "b"]}
    assert status.results() == {
        "first": {"n": [2**60 + 1, "b"]},
        "second": [{"item": 2**60 + 1, "index": 0}, {"item": "b", "index": 1}],
    }
    assert status.steps["second"].task_ids == (
        f"{run.run_id}:second:0",
        f"{run.run_id}:second:1",
    )
    assert status == await api.workflows.get_run(run.run_id) == await run.status()
    # Its tasks are ordinary tasks.
    task = await api.get_task_status(f"{run.run_id}:first")
    assert (task.state, task.workflow_id) == (TaskState.SUCCEEDED, workflow.workflow_id)
    # Starting again with the same run_id returns the same run.
    named = await api.workflows.start_run(workflow.workflow_id, {"n": []}, run_id="mine")
    again_named = await api.workflows.start_run(workflow.workflow_id, {"n": [1]}, run_id="mine")
    assert named.run_id == again_named.run_id == "mine"
    assert (await again_named.wait()).inputs == {"n": []}


async def test_workflows_get_and_list(api: Api) -> None:
    assert await api.workflows.list() == []
    chain = await api.workflows.create(CHAIN)
    other = await api.workflows.create({"name": "one", "steps": {"a": {"handler": "echo"}}})
    got = await api.workflows.get(chain.workflow_id)
    assert isinstance(got, Workflow)
    assert got == chain  # the stored spec, id and creation time
    assert await api.workflows.list() == [chain, other]  # oldest first
    with pytest.raises(UnknownWorkflow, match="unknown workflow 'nope'") as info:
        await api.workflows.get("nope")
    assert info.value.workflow_id == "nope"


async def test_task_classes(api: Api) -> None:
    classes = await api.task_classes()
    assert list(classes) == ["cpu_short", "cpu_long", "gpu", "gpu_slurm", "one_at_a_time"]
    idle = classes["cpu_short"]
    assert isinstance(idle, ClassStatus)
    assert (idle.name, idle.runner, idle.adaptive, idle.running, idle.queued) == (
        "cpu_short",
        "inprocess",
        False,
        0,
        0,
    )
    assert idle.limit == 64
    # One holds the class's only slot, two wait behind it.
    await api.submit_tasks("sleepy", [1, 2, 3], task_class="one_at_a_time")
    with anyio.fail_after(5):
        while (busy := (await api.task_classes())["one_at_a_time"]).running == 0:
            await anyio.sleep(0.005)
    assert (busy.limit, busy.running, busy.queued) == (1, 1, 2)


async def test_workflow_failure(api: Api) -> None:
    spec = {"name": "fails", "steps": {"bad": {"handler": "boom", "payload": "x"}}}
    workflow = await api.workflows.create(spec)
    run = await api.workflows.start_run(workflow.workflow_id)
    with anyio.fail_after(10):
        events = [e async for e in api.workflows.stream_status(run.run_id)]
    assert events[-1].type == "workflow_run_failed"
    status = await run.wait()
    assert status.state is RunState.FAILED
    assert status.steps["bad"].state is StepState.FAILED
    assert "boom: x" in (status.error or "")


async def test_workflow_cancel(api: Api) -> None:
    spec = {
        "name": "slow",
        "steps": {
            "wait": {"handler": "sleepy"},
            "after": {"handler": "echo", "depends_on": ["wait"]},
        },
    }
    workflow = await api.workflows.create(spec)
    run = await api.workflows.start_run(workflow.workflow_id)
    # Its task running, not only its step (marked running before its task is stored).
    task_id = f"{run.run_id}:wait"
    with anyio.fail_after(5):
        while True:
            with contextlib.suppress(UnknownTask):
                if (await api.get_task_status(task_id)).state is TaskState.RUNNING:
                    break
            await anyio.sleep(0.005)
    assert (await run.status()).steps["wait"].state is StepState.RUNNING
    status = await api.workflows.cancel_run(run.run_id)
    assert status.state is RunState.CANCELLED
    assert status.steps["after"].state is StepState.CANCELLED
    assert (await run.cancel()).state is RunState.CANCELLED  # a finished run is left as it is
    with anyio.fail_after(10):
        events = [e async for e in api.workflows.stream_status(run.run_id)]
    assert events[-1].type == "workflow_run_cancelled"
    assert (await api.get_task_status(task_id)).state is TaskState.CANCELLED


async def test_workflow_errors(api: Api) -> None:
    cycle = {
        "name": "loop",
        "steps": {
            "a": {"handler": "echo", "depends_on": ["b"]},
            "b": {"handler": "echo", "depends_on": ["a"]},
        },
    }
    with pytest.raises(InvalidWorkflow, match="cycle: a -> b -> a"):
        await api.workflows.create(cycle)
    with pytest.raises(InvalidWorkflow, match="no in-process handler 'nope'"):
        await api.workflows.create({"name": "x", "steps": {"a": {"handler": "nope"}}})
    with pytest.raises(InvalidWorkflow, match="unknown task class 'gpus'"):
        await api.workflows.create(
            {"name": "x", "steps": {"a": {"handler": "echo", "task_class": "gpus"}}}
        )
    with pytest.raises(UnknownWorkflow, match="unknown workflow 'nope'") as unknown:
        await api.workflows.start_run("nope")
    assert unknown.value.workflow_id == "nope"
    workflow = await api.workflows.create(CHAIN)
    with pytest.raises(InvalidWorkflow, match="missing inputs n"):
        await api.workflows.start_run(workflow.workflow_id)
    with pytest.raises(InvalidWorkflow, match="not JSON-compatible"):
        await api.workflows.start_run(workflow.workflow_id, {"n": object()})
    with pytest.raises(InvalidWorkflow, match="run_id"):
        await api.workflows.start_run(workflow.workflow_id, {"n": []}, run_id="no spaces")
    with pytest.raises(UnknownRun, match="unknown workflow run 'nope'") as info:
        await api.workflows.get_run("nope")
    assert info.value.run_id == "nope"
    with pytest.raises(UnknownRun):
        await api.workflows.cancel_run("nope")
    with pytest.raises(UnknownRun):
        [e async for e in api.workflows.stream_status("nope")]


async def test_a_workflow_or_run_handle_given_for_its_id_is_refused_clearly(api: Api) -> None:
    # The objects create() and start_run() return, passed where their ids go:
    # in-process "unhashable type: 'dict'" or SQLite's "Error binding
    # parameter 1", remotely "'RunHandle' object has no attribute 'encode'".
    workflow = await api.workflows.create(CHAIN)
    run = await api.workflows.start_run(workflow.workflow_id, {"n": []})
    with anyio.fail_after(10):
        await run.wait()
    told = (
        "workflow_id must be a string, got a Workflow: "
        f"pass its .workflow_id ('{workflow.workflow_id}')"
    )
    with pytest.raises(InvalidWorkflow, match=re.escape(told)):
        await api.workflows.start_run(workflow, {"n": []})  # type: ignore[arg-type]
    with pytest.raises(InvalidWorkflow, match=re.escape(told)):
        await api.workflows.get(workflow)  # type: ignore[arg-type]
    told = f"run_id must be a string, got a RunHandle: pass its .run_id ('{run.run_id}')"
    for call in (api.workflows.get_run, api.workflows.wait_run, api.workflows.cancel_run):
        with pytest.raises(InvalidWorkflow, match=re.escape(told)):
            await call(run)  # type: ignore[arg-type]
    with pytest.raises(InvalidWorkflow, match=re.escape(told)):
        [e async for e in api.workflows.stream_status(run)]  # type: ignore[arg-type]
    with pytest.raises(InvalidWorkflow, match=re.escape("run_id must be a string, got 5")):
        await api.workflows.start_run(workflow.workflow_id, {"n": []}, run_id=5)  # type: ignore[arg-type]
    with pytest.raises(InvalidWorkflow, match=re.escape("run_id must be a string, got None")):
        await api.workflows.get_run(None)  # type: ignore[arg-type]
    assert (await api.workflows.get_run(run.run_id)).state is RunState.SUCCEEDED


async def test_a_workflow_or_run_id_that_utf8_cannot_encode_is_unknown_alike(api: Api) -> None:
    # A bare UnicodeEncodeError, from SQLite in-process (a run id) and from the
    # encoder over gRPC: no workflow or run has such an id (none is stored).
    for call in (api.workflows.get, api.workflows.start_run):
        with pytest.raises(UnknownWorkflow, match=re.escape("'one\\udcff'")) as unknown:
            await call("one\udcff")
        assert unknown.value.workflow_id == "one\udcff"
    runs = (api.workflows.get_run, api.workflows.wait_run, api.workflows.cancel_run)
    for read in runs:
        with pytest.raises(UnknownRun, match=re.escape("unknown workflow run 'r\\udcff'")) as info:
            await read("r\udcff")
        assert info.value.run_id == "r\udcff"
    with pytest.raises(UnknownRun):
        [e async for e in api.workflows.stream_status("r\udcff")]
    # A run_id that could not name a run is refused before the workflow is looked
    # up, on both sides: the client cannot send it to have it looked up.
    for run_id in ("r\udcff", "no spaces", 5):
        with pytest.raises(InvalidWorkflow, match="run_id"):
            await api.workflows.start_run("nope", run_id=run_id)  # type: ignore[arg-type]


async def test_inputs_that_are_not_a_mapping_are_refused_alike(api: Api) -> None:
    # Remotely a list of pairs was taken (dict() of it) where in-process code
    # refuses it, and a string failed with "dictionary update sequence element".
    workflow = await api.workflows.create(CHAIN)
    for inputs, kind in (([("n", [])], "list"), ("n", "str")):
        with pytest.raises(InvalidWorkflow) as caught:
            await api.workflows.start_run(workflow.workflow_id, inputs)  # type: ignore[arg-type]
        assert str(caught.value) == (
            f"run of {workflow.workflow_id!r} refused: "
            f"inputs must be a mapping of names to values, got {kind}"
        )
    with pytest.raises(InvalidWorkflow, match="missing inputs n"):
        await api.workflows.start_run(workflow.workflow_id, None)


async def test_workflow_from_a_toml_file(api: Api, tmp_path: Path) -> None:
    # A path is read where the caller is (the client, remotely): the server gets the spec.
    path = tmp_path / "one.toml"
    path.write_text('name = "one"\n\n[steps.only]\nhandler = "echo"\npayload = "${inputs.x}"\n')
    workflow = await api.workflows.create(path)
    run = await api.workflows.start_run(workflow.workflow_id, {"x": 5})
    assert (await run.wait()).results() == {"only": 5}
    with pytest.raises(InvalidWorkflow, match=r"missing\.toml"):
        await api.workflows.create(tmp_path / "missing.toml")
    # Not a path any file has, nor text: a bare ValueError or UnicodeDecodeError.
    with pytest.raises(InvalidWorkflow, match="embedded null byte"):
        await api.workflows.create("one\x00.toml")
    path.write_bytes(b'name = "\xff"\n')
    with pytest.raises(InvalidWorkflow, match=re.escape(f"{path}: ")):
        await api.workflows.create(path)


async def test_workflow_events_on_the_event_stream(api: Api) -> None:
    workflow = await api.workflows.create(CHAIN)
    run = await api.workflows.start_run(workflow.workflow_id, {"n": []})
    await run.wait()
    seen: list[Event] = []
    with anyio.fail_after(10):
        async with aclosing(api.stream_events({"workflow_run_succeeded"}, since=0)) as events:
            async for event in events:
                seen.append(event)
                if isinstance(event, WorkflowEvent) and event.run_id == run.run_id:
                    break
    last = seen[-1]
    assert isinstance(last, WorkflowEvent)
    assert (last.type, last.state, last.workflow_id) == (
        "workflow_run_succeeded",
        "succeeded",
        workflow.workflow_id,
    )


# Every public call that takes a string, with the argument given to it: in-process
# and remotely each must take it, or refuse it with the same InfraError. Text that
# UTF-8 cannot encode (a lone surrogate: a command-line argument that is not
# UTF-8, as Python decodes it) and arguments of the wrong type failed with the
# encoder's or SQLite's own errors, on one side or both.
_STRING_CALLS: dict[str, Callable[[Api, Any], Awaitable[object]]] = {
    "submit_task handler": lambda api, x: api.submit_task(x, 1),
    "submit_task task_class": lambda api, x: api.submit_task("echo", 1, task_class=x),
    "submit_task needs": lambda api, x: api.submit_task("echo", 1, needs=x),
    "submit_task needs list": lambda api, x: api.submit_task("echo", 1, needs=[x]),
    "submit_task task_id": lambda api, x: api.submit_task("echo", 1, task_id=x),
    "submit_task workflow_id": lambda api, x: api.submit_task("echo", 1, workflow_id=x),
    "submit_tasks handler": lambda api, x: api.submit_tasks(x, [1]),
    "submit_tasks task_class": lambda api, x: api.submit_tasks("echo", [1], task_class=x),
    "submit_tasks needs": lambda api, x: api.submit_tasks("echo", [1], needs=[x]),
    "submit_tasks workflow_id": lambda api, x: api.submit_tasks("echo", [1], workflow_id=x),
    "get_task_status": lambda api, x: api.get_task_status(x),
    "cancel_task": lambda api, x: api.cancel_task(x),
    "task_handle": lambda api, x: api.task_handle(x).status(),
    "stream_task_results": lambda api, x: _drained(api.stream_task_results(x)),
    "stream_task_results list": lambda api, x: _drained(api.stream_task_results([x])),
    "stream_events": lambda api, x: _drained(api.stream_events(x, since=2**70, follow=False)),
    "stream_events list": lambda api, x: _drained(
        api.stream_events([x], since=2**70, follow=False)
    ),
    "services.start": lambda api, x: api.services.start([x]),
    "services.stop": lambda api, x: api.services.stop(x),
    "services.status": lambda api, x: api.services.status(x),
    "services.logs": lambda api, x: _drained(api.services.logs(x)),
    "workflows.create path": lambda api, x: api.workflows.create(x),
    "workflows.create name": lambda api, x: api.workflows.create(_one_step(name=x)),
    "workflows.create step": lambda api, x: api.workflows.create(_one_step(step=x)),
    "workflows.create handler": lambda api, x: api.workflows.create(_one_step(handler=x)),
    "workflows.get": lambda api, x: api.workflows.get(x),
    "workflows.start_run": lambda api, x: api.workflows.start_run(x),
    "workflows.start_run run_id": lambda api, x: _run_of_one(api, run_id=x),
    "workflows.get_run": lambda api, x: api.workflows.get_run(x),
    "workflows.wait_run": lambda api, x: api.workflows.wait_run(x),
    "workflows.cancel_run": lambda api, x: api.workflows.cancel_run(x),
    "workflows.stream_status": lambda api, x: _drained(api.workflows.stream_status(x)),
}


def _one_step(*, name: Any = "one", step: Any = "a", handler: Any = "echo") -> dict[str, Any]:
    return {"name": name, "steps": {step: {"handler": handler}}}


async def _run_of_one(api: Api, *, run_id: Any) -> RunHandle:
    workflow = await api.workflows.create(_one_step())
    return await api.workflows.start_run(workflow.workflow_id, run_id=run_id)


async def _drained(stream: AsyncIterator[object]) -> list[object]:
    async with aclosing(stream):  # type: ignore[type-var]
        return [item async for item in stream]


_lone_surrogates = st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF, categories=["Cs"])
_any_text = st.text(st.characters() | _lone_surrogates, max_size=8)
# Names that something holds (a finished task and run, a class, a handler, an
# event type), and what is near them.
_held = ["done", "one", "echo", "cpu_short", "task_completed", "", "\udcff", "done\udcff"]
# None in these is no wrong type, but "every one": a stream that would not end.
_NONE_FOLLOWS = {"stream_task_results"}
_wrong_types = st.sampled_from([1, None, 2.5, True, b"web", ["done"], {"a": 1}, object()])


async def test_any_text_or_wrong_type_for_a_string_is_refused_alike(tmp_path: Path) -> None:
    async with make_infra(tmp_path) as infra, used(infra, "remote") as remote:
        await (await infra.submit_task("echo", 1, task_id="done")).result()
        workflow = await infra.workflows.create(_one_step())
        await (await infra.workflows.start_run(workflow.workflow_id, run_id="done")).wait()

        async def outcome(api: Api, call: str, value: Any) -> str:
            try:
                with anyio.fail_after(10):
                    await _STRING_CALLS[call](api, value)
            except InfraError as exc:
                return type(exc).__name__
            return "ok"

        async def alike(call: str, value: Any) -> None:
            in_process = await outcome(infra, call, value)
            assert await outcome(remote, call, value) == in_process, (call, value)

        # Hypothesis runs in a thread, each example in this loop, where both sides are.
        @settings(max_examples=300, deadline=None, database=None)
        @given(
            call=st.sampled_from(list(_STRING_CALLS)),
            value=st.sampled_from([*_held, workflow.workflow_id]) | _any_text | _wrong_types,
        )
        def every_call(call: str, value: Any) -> None:
            assume(value is not None or call not in _NONE_FOLLOWS)
            assume(isinstance(value, Hashable) or call != "workflows.create step")  # a dict key
            anyio.from_thread.run(alike, call, value)

        await anyio.to_thread.run_sync(every_call)


# -- the remote side's own concerns ----------------------------------------------


async def test_token_is_checked_on_every_call(tmp_path: Path) -> None:
    async with make_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0", token="s3cret") as srv:
        assert srv.authenticated
        for token in (None, "wrong"):
            with pytest.raises(ServerUnavailable) as refused:
                async with AgentInfra.connect(srv.address, token=token):
                    pass
            assert refused.value.token_refused
            assert str(refused.value) == (
                f"the dspy-infra server at {srv.address} refused this client: "
                "missing or wrong token"
            )
        async with AgentInfra.connect(srv.address, token="s3cret") as remote:
            assert await (await remote.submit_task("echo", 7)).result() == 7
        # A raw call without the token, to a method the client never opens with.
        channel = Channel("127.0.0.1", int(srv.address.rsplit(":", 1)[1]))
        try:
            stub = orch_pb.OrchestratorStub(channel)
            with pytest.raises(GRPCError) as info:
                await stub.get_metrics(orch_pb.GetMetricsRequest())
            assert info.value.status is Status.UNAUTHENTICATED
        finally:
            channel.close()


async def test_non_loopback_needs_tls_and_token(tmp_path: Path) -> None:
    async with make_infra(tmp_path) as infra:
        for address, token in [("0.0.0.0:0", None), ("0.0.0.0:0", "t"), (":0", None)]:
            with pytest.raises(ConfigError, match="not a loopback address"):
                async with serve(infra, address, token=token):
                    pass
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with pytest.raises(ConfigError, match="not a loopback address"):
            async with serve(infra, "0.0.0.0:0", tls=context):
                pass
        # False is plain text, as for connect(): refused here as None is, never
        # let through to fail in asyncio ("ssl argument must be an SSLContext").
        with pytest.raises(ConfigError, match="not a loopback address"):
            await server_module.check_serving("0.0.0.0:0", token="t", tls=False)
        with pytest.raises(ConfigError, match="not a loopback address"):
            async with serve(infra, "0.0.0.0:0", token="t", tls=False):
                pass
        # Anything else is no TLS setting: never served as if it were TLS.
        for wrong in ("yes", True, 1):
            for address in ("0.0.0.0:0", "127.0.0.1:0"):
                with pytest.raises(ConfigError, match=r"tls must be an ssl\.SSLContext .* got"):
                    await server_module.check_serving(address, token="t", tls=wrong)  # type: ignore[arg-type]
                with pytest.raises(ConfigError, match=r"tls must be an ssl\.SSLContext .* got"):
                    async with serve(infra, address, token="t", tls=wrong):  # type: ignore[arg-type]
                        pass
        async with serve(infra, "127.0.0.1:0", tls=False) as srv:
            assert not srv.tls
        with pytest.raises(ConfigError, match="HOST:PORT"):
            async with serve(infra, "localhost"):
                pass
        async with serve(infra, "localhost:0") as srv:  # a name that is loopback is fine
            assert not srv.tls


@pytest.mark.parametrize("port", [0, "free"])
async def test_a_server_on_a_name_listens_on_each_of_its_addresses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, port: int | str
) -> None:
    # Where /etc/hosts gives localhost both 127.0.0.1 and ::1, it listened on
    # the first only: a client whose localhost is ::1 first found nothing.
    resolve = socket.getaddrinfo

    def both(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in ("localhost", b"localhost"):  # anyio asks for bytes
            return resolve(host, *args, **kwargs)
        return [*resolve("127.0.0.1", *args, **kwargs), *resolve("::1", *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", both)
    if port == "free":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    async with make_infra(tmp_path) as infra, serve(infra, f"localhost:{port}") as srv:
        chosen = parse_address(srv.address)[1]
        for address in (srv.address, f"localhost:{chosen}", f"[::1]:{chosen}"):
            async with AgentInfra.connect(address) as remote:
                assert (await remote.health_check()).healthy


async def test_client_refuses_to_send_a_token_in_clear_off_loopback() -> None:
    with pytest.raises(ConfigError, match="without TLS"):
        async with AgentInfra.connect("192.0.2.1:50052", token="t"):
            pass


async def test_no_server_is_a_clear_error() -> None:
    # A port that was just free: nothing listens there.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        ServerUnavailable, match=f"no dspy-infra server answers at 127.0.0.1:{port}"
    ) as caught:
        async with AgentInfra.connect(f"127.0.0.1:{port}"):
            pass
    # A refused connection is no server at all: no word of TLS (a TLS server
    # drops a plain-text client after accepting it: see its test).
    assert str(caught.value).endswith("is `dspy-infra serve` running there?")
    assert not caught.value.plain_text
    assert not caught.value.token_refused
    with pytest.raises(ServerUnavailable) as caught:
        async with AgentInfra.connect(f"127.0.0.1:{port}", tls=True):
            pass
    assert not caught.value.plain_text
    assert "TLS" not in str(caught.value)
    # Nor is a name that no address answers to (.invalid never resolves).
    with anyio.fail_after(30), pytest.raises(ServerUnavailable) as caught:
        async with AgentInfra.connect("no-such-host.invalid:50052"):
            pass
    assert str(caught.value).endswith("is `dspy-infra serve` running there?")
    assert not caught.value.plain_text


async def test_a_grpc_server_that_is_not_dspy_infra_is_no_server(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Another gRPC server at the address (a wrong port): every dspy-infra
    # serves ListServices, which connecting asks for, so this is no
    # dspy-infra server at all, not one older than the client.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{sock.getsockname()[1]}"
    other = Server([Health()])
    await other.start(sock=sock)
    try:
        with anyio.fail_after(10), pytest.raises(ServerUnavailable) as caught:
            async with AgentInfra.connect(address):
                pass
        assert not isinstance(caught.value, UnsupportedCall)
        assert str(caught.value).startswith(f"no dspy-infra server answers at {address}")
        assert "older" not in str(caught.value)
        # The command line: exit 3, as for no server.
        code = await anyio.to_thread.run_sync(dspy_infra.cli.main, ["status", "--address", address])
        assert code == 3
        assert capsys.readouterr().err.startswith(
            f"error: no dspy-infra server answers at {address}"
        )
    finally:
        other.close()
        await other.wait_closed()


async def test_connection_is_entered_once_and_closed_after(tmp_path: Path) -> None:
    async with make_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0") as srv:
        remote = AgentInfra.connect(srv.address)
        async with remote:
            pass
        with pytest.raises(Exception, match="closed"):
            await remote.get_metrics()
        with pytest.raises(Exception, match="entered once"):
            async with remote:
                pass


async def test_workflow_json_from_another_client_is_invalid_argument(tmp_path: Path) -> None:
    secret = tmp_path / "secret.toml"
    secret.write_text('name = "secret"\n[steps.a]\nhandler = "echo"\n')
    async with make_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0") as srv:
        channel = Channel("127.0.0.1", int(srv.address.rsplit(":", 1)[1]))
        try:
            stub = orch_pb.OrchestratorStub(channel)
            refusals = {
                "{not json": "spec_json is not JSON",
                # A path is never opened on the server: the spec is the JSON itself.
                json.dumps(str(secret)): "a workflow is a table",
            }
            for spec_json, message in refusals.items():
                with pytest.raises(GRPCError) as info:
                    await stub.create_workflow(orch_pb.CreateWorkflowRequest(spec_json=spec_json))
                assert info.value.status is Status.INVALID_ARGUMENT
                assert message in (info.value.message or "")
            created = await stub.create_workflow(
                orch_pb.CreateWorkflowRequest(spec_json=json.dumps(CHAIN))
            )
            for inputs_json in ["[1]", "{"]:
                with pytest.raises(GRPCError) as info:
                    await stub.start_workflow_run(
                        orch_pb.StartWorkflowRunRequest(
                            workflow_id=created.workflow_id, inputs_json=inputs_json
                        )
                    )
                assert info.value.status is Status.INVALID_ARGUMENT
        finally:
            channel.close()


async def test_bad_payload_json_from_another_client_is_invalid_argument(tmp_path: Path) -> None:
    async with make_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0") as srv:
        channel = Channel("127.0.0.1", int(srv.address.rsplit(":", 1)[1]))
        try:
            stub = orch_pb.OrchestratorStub(channel)
            with pytest.raises(GRPCError) as info:
                await stub.submit_task(
                    orch_pb.SubmitTaskRequest(handler="echo", payload_json="{not json")
                )
            assert info.value.status is Status.INVALID_ARGUMENT
            assert "payload_json is not JSON" in (info.value.message or "")
            with pytest.raises(GRPCError) as info:
                await stub.submit_tasks(
                    orch_pb.SubmitTasksRequest(handler="echo", payloads_json=["1", "{not json"])
                )
            assert info.value.status is Status.INVALID_ARGUMENT
            assert (info.value.message or "").startswith(
                "task refused: payloads_json[1] is not JSON ("
            )
        finally:
            channel.close()


async def test_json_nested_too_deeply_from_another_client_is_invalid_argument(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Every depth up to well past what Python decodes, in each JSON field: a
    # value just shallow enough to decode may be too deep for what walks it
    # next (a workflow spec's checks), and that too is the client's mistake.
    limit = sys.getrecursionlimit()
    depths = [*range(limit - 250, limit + 10), 100_000]
    async with make_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0") as srv:
        channel = Channel("127.0.0.1", int(srv.address.rsplit(":", 1)[1]))
        try:
            stub = orch_pb.OrchestratorStub(channel)
            spec = {"name": "deep", "steps": {"s": {"handler": "echo", "payload": "${inputs.x}"}}}
            created = await stub.create_workflow(
                orch_pb.CreateWorkflowRequest(spec_json=json.dumps(spec))
            )
            refused: set[str] = set()
            for depth in depths:
                deep = "[" * depth + "]" * depth
                calls = [
                    stub.submit_task(orch_pb.SubmitTaskRequest(handler="echo", payload_json=deep)),
                    stub.submit_tasks(
                        orch_pb.SubmitTasksRequest(handler="echo", payloads_json=["1", deep])
                    ),
                    stub.create_workflow(
                        orch_pb.CreateWorkflowRequest(
                            spec_json=json.dumps(spec).replace('"${inputs.x}"', deep)
                        )
                    ),
                    stub.start_workflow_run(
                        orch_pb.StartWorkflowRunRequest(
                            workflow_id=created.workflow_id, inputs_json=f'{{"x": {deep}}}'
                        )
                    ),
                ]
                for call in calls:
                    try:
                        await call
                    except GRPCError as exc:
                        # One message per problem, whatever the task id and the depth.
                        message = re.sub(r"task '\w+'", "task 'ID'", exc.message or "")
                        message = re.sub(r"nested \d+ levels", "nested N levels", message)
                        refused.add(f"{exc.status.name}: {message}")
        finally:
            channel.close()
    over = f"nested N levels deep, over the limit of {MAX_JSON_DEPTH}"
    assert refused == {
        "INVALID_ARGUMENT: task refused: payload_json is nested too deeply",
        "INVALID_ARGUMENT: task refused: payloads_json[1] is nested too deeply",
        "INVALID_ARGUMENT: workflow refused: spec_json is nested too deeply",
        # Shallow enough to decode, too deep for the spec's own check of its payloads.
        "INVALID_ARGUMENT: workflow 'deep': step 's': the payload is not JSON-compatible "
        "(maximum recursion depth exceeded while encoding a JSON object)",
        f"INVALID_ARGUMENT: run of {created.workflow_id!r} refused: "
        "inputs_json is nested too deeply",
        # Decoded, but deeper than the instance takes (what decodes here may
        # not where it is read next).
        f"INVALID_ARGUMENT: task 'ID' refused: the payload is {over}",
        f"INVALID_ARGUMENT: workflow 'deep': step 's': the payload is {over}",
        f"INVALID_ARGUMENT: run of {created.workflow_id!r} refused: input 'x' is {over}",
    }
    assert not [r for r in caplog.records if r.name == "dspy_infra.remote"], "a call failed inside"


async def test_a_recursion_error_inside_the_library_is_not_the_clients_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Only decoding a JSON field is the client's mistake when it recurses too
    # deeply: the same error from inside create() or start_run() is a bug of
    # the library's, INTERNAL and logged, never "spec_json is nested too deeply".
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    async with (
        make_infra(tmp_path) as infra,
        serve(infra, "127.0.0.1:0") as srv,
        AgentInfra.connect(srv.address) as remote,
    ):
        workflow = await remote.workflows.create(CHAIN)
        monkeypatch.setattr(infra.workflows, "create", broken)
        monkeypatch.setattr(infra.workflows, "start_run", broken)
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: remote.workflows.create(CHAIN),
            lambda: remote.workflows.start_run(workflow.workflow_id, {"n": 1}),
        ]
        for call in calls:
            with pytest.raises(
                InfraError, match="answered INTERNAL: internal server error"
            ) as info:
                await call()
            assert not isinstance(info.value, InvalidWorkflow)
    failed = [r.getMessage() for r in caplog.records if r.name == "dspy_infra.remote"]
    assert failed == [
        "a call to /orchestrator.v1.Orchestrator/CreateWorkflow failed",
        "a call to /orchestrator.v1.Orchestrator/StartWorkflowRun failed",
    ]


async def test_a_negative_logs_tail_from_another_client_is_invalid_argument(
    tmp_path: Path,
) -> None:
    async with make_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0") as srv:
        channel = Channel("127.0.0.1", int(srv.address.rsplit(":", 1)[1]))
        try:
            stub = env_pb.EnvManagerStub(channel)
            with pytest.raises(GRPCError) as info:
                async for _ in stub.stream_logs(env_pb.StreamLogsRequest(name="web", tail=-1)):
                    pass
            assert info.value.status is Status.INVALID_ARGUMENT
            assert "tail must be 0 or more, got -1" in (info.value.message or "")
        finally:
            channel.close()


# One of each exception class the library exports, with ids that need quoting.
_RAISED: dict[type[InfraError], InfraError] = {
    error.__class__: error
    for error in [
        InfraError("the instance is confused"),
        ConfigError("expected a table", source="a.toml", path="services.kv"),
        BackendUnavailable("the Docker engine does not answer"),
        InfraClosed("this AgentInfra is closed"),
        StateDirInUse("the task store is held by pid 1"),
        StoreFailed("the task store failed: database or disk is full"),
        ServiceError("kv é/1", "kv broke"),
        UnknownService("kv é/1", ["web"]),
        ServiceStartError(
            "kv é/1", "exited with code 3", exit_code=3, log_tail=["oops é", "tab\tand \x7f"]
        ),
        DependencyFailed(
            "web", "kv é/1", "failed: exited with code 3", exit_code=3, log_tail=["kv says é"]
        ),
        TaskError("t é/1", "something about the task"),
        InvalidTask("t é/1", "task refused: bad priority"),
        UnknownTask("t é/1"),
        TaskFailed("t é/1", "failed", "RuntimeError: boom: with: colons"),
        TaskTimedOut("t é/1", "timed_out", "ran longer than 1 s"),
        TaskLost("t é/1", "lost", "it was running when its instance died"),
        TaskCancelled("t é/1"),
        WorkflowError("the run broke"),
        InvalidWorkflow("step 'a' has no handler"),
        UnknownWorkflow("wf é/1"),
        UnknownRun("run é/1"),
        UnknownEventType({"nope é/1"}, EVENT_TYPES),
    ]
}
# What the wire carries besides the class and the message.
_CARRIED = (
    *("task_id", "service", "workflow_id", "run_id", "state", "error"),
    *("reason", "exit_code", "log_tail", "dependency", "known", "unknown", "source", "path"),
)


_EXPORTED_ERRORS = sorted(
    {
        exported
        for module in (dspy_infra, errors_module)
        for exported in (getattr(module, name) for name in module.__all__)
        if isinstance(exported, type) and issubclass(exported, InfraError)
    },
    key=lambda cls: cls.__name__,
)


async def _raised_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raised: InfraError
) -> InfraError:
    """What the remote client raises for ``raised``, raised by the served instance."""

    async def fail() -> dict[str, float]:
        raise raised

    async with (
        AgentInfra.start({"infra": {}}, state_dir=tmp_path / "state") as infra,
        serve(infra, "127.0.0.1:0") as srv,
        AgentInfra.connect(srv.address) as remote,
    ):
        monkeypatch.setattr(infra, "get_metrics", fail)
        with pytest.raises(InfraError) as info:
            await remote.get_metrics()
    return info.value


@pytest.mark.parametrize(
    "error_type", _EXPORTED_ERRORS, ids=[cls.__name__ for cls in _EXPORTED_ERRORS]
)
async def test_every_library_error_raised_by_the_server_is_raised_again_by_the_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error_type: type[InfraError]
) -> None:
    raised = _RAISED[error_type]  # a new exception class needs an example here
    again = await _raised_again(tmp_path, monkeypatch, raised)
    assert type(again) is error_type
    assert (str(again), again.args) == (str(raised), raised.args)
    carried = [name for name in _CARRIED if hasattr(raised, name)]
    assert [getattr(again, name) for name in carried] == [getattr(raised, n) for n in carried]


class _Unheard(BackendUnavailable):
    """A library error the client has no class for (a plugin's, a newer server's)."""


class _UnheardTaskError(InvalidTask):
    pass


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (_Unheard("the cluster's controller does not answer"), BackendUnavailable),
        (_UnheardTaskError("t é/1", "refused by a plugin"), InvalidTask),
    ],
)
async def test_a_library_error_the_client_has_no_class_for_is_raised_as_its_nearest_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raised: InfraError, expected: type
) -> None:
    # Such as the Slurm runner's SlurmUnavailable: a BackendUnavailable, not a bare InfraError.
    again = await _raised_again(tmp_path, monkeypatch, raised)
    assert type(again) is expected
    assert str(again) == str(raised)
    if isinstance(raised, TaskError):
        assert getattr(again, "task_id", None) == raised.task_id


async def test_a_huge_or_unencodable_error_is_sent_cut_and_spares_the_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Over 64 KiB of trailers, the client would drop the connection, and
    # with it every other call on it (here: a stream being followed).
    errors = iter([UnknownTask("é" * 40_000), InfraError("bad \udcff byte")])

    async def fail() -> dict[str, float]:
        raise next(errors)

    async with make_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0") as srv:
        monkeypatch.setattr(infra, "get_metrics", fail)
        async with AgentInfra.connect(srv.address) as remote:
            events = remote.stream_events(since=0)
            await remote.submit_task("echo", 1)
            with anyio.fail_after(5):
                await events.__anext__()
                with pytest.raises(UnknownTask) as unknown:
                    await remote.get_metrics()
                with pytest.raises(InfraError, match=r"bad \\udcff byte") as odd:
                    await remote.get_metrics()
                assert type(odd.value) is InfraError
                await remote.submit_task("echo", 2)
                assert (await events.__anext__()).type  # the stream still follows
            await events.aclose()
    assert str(unknown.value).endswith("…")
    assert 4_000 < len(str(unknown.value).encode()) <= 8_192
    assert unknown.value.task_id.startswith("éé")
    assert len(unknown.value.task_id) < 1_100


async def test_a_long_log_tail_is_sent_cut_to_its_last_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The message holds these lines already (4.4 KB): the detail gets what it leaves.
    lines = [f"line {i} " + "x" * 100 for i in range(40)]
    long_tail = ServiceStartError("kv", "exited", exit_code=1, log_tail=[*lines, "\udcff \x7f"])
    long_reason = ServiceStartError("kv", "exited: " + "y" * 10_000, exit_code=1)
    errors = iter([long_tail, long_reason])
    detail_of = server_module._error_detail
    sent: list[str | None] = []

    def spied(exc: InfraError, limit: int) -> str | None:
        sent.append(detail_of(exc, limit))
        return sent[-1]

    async def fail() -> dict[str, float]:
        raise next(errors)

    monkeypatch.setattr(server_module, "_error_detail", spied)
    async with make_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0") as srv:
        monkeypatch.setattr(infra, "get_metrics", fail)
        async with AgentInfra.connect(srv.address) as remote:
            with pytest.raises(ServiceStartError) as cut:
                await remote.get_metrics()
            with pytest.raises(ServiceStartError) as unsent:
                await remote.get_metrics()
    # The newest lines, as they were, in what the message leaves of 7 KiB
    # (grpcio refuses more than 8 KiB of metadata); the rest as in-process.
    tail = cut.value.log_tail
    assert 10 < len(tail) < len(long_tail.log_tail)
    assert tail == long_tail.log_tail[-len(tail) :]
    assert (cut.value.reason, cut.value.exit_code) == ("exited", 1)
    assert sent[0] is not None
    assert len(encode_grpc_message(str(cut.value))) + len(sent[0]) <= 7168
    assert sent[0].isascii()
    assert "\x7f" not in sent[0]
    # A reason too long for the detail: none is sent, and the message stands in for it.
    assert sent[1] is None
    assert type(unsent.value) is ServiceStartError
    assert unsent.value.reason == str(unsent.value)
    assert (unsent.value.exit_code, unsent.value.log_tail) == (None, ())


@pytest.mark.parametrize(
    "detail",
    [
        None,  # an older server's
        "{not json",
        "[1, 2]",
        "[" * 5_000,
        '{"reason": 3, "exit_code": "3", "log_tail": ["a", 1], "dependency": null,'
        ' "known": "web", "unknown": [[]], "source": 1, "path": false}',
        '{"exit_code": true, "log_tail": "oops"}',
    ],
    ids=["missing", "not-json", "not-an-object", "too-deep", "wrong-types", "bool-and-string"],
)
async def test_a_missing_or_bad_error_detail_leaves_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, detail: str | None
) -> None:
    # Never a crash, nor another exception: the class, message and ids are
    # as always, and what the detail would have told is left at its default.
    kinds = (ConfigError, UnknownService, ServiceStartError, DependencyFailed, UnknownEventType)
    errors = [_RAISED[cls] for cls in kinds]
    raising = iter(errors)

    async def fail() -> dict[str, float]:
        raise next(raising)

    monkeypatch.setattr(server_module, "_error_detail", lambda exc, limit: detail)
    again: list[InfraError] = []
    async with (
        AgentInfra.start({"infra": {}}, state_dir=tmp_path / "state") as infra,
        serve(infra, "127.0.0.1:0") as srv,
        AgentInfra.connect(srv.address) as remote,
    ):
        monkeypatch.setattr(infra, "get_metrics", fail)
        for _ in errors:
            with pytest.raises(InfraError) as info:
                await remote.get_metrics()
            again.append(info.value)
    for raised, error in zip(errors, again, strict=True):
        assert type(error) is type(raised)
        assert (str(error), error.args) == (str(raised), raised.args)
    config, unknown_service, start, dependency, event_type = again
    assert isinstance(config, ConfigError)
    assert (config.source, config.path) == (None, None)
    assert isinstance(unknown_service, UnknownService)
    assert (unknown_service.service, unknown_service.known) == ("kv é/1", ())
    for failed in (start, dependency):
        assert isinstance(failed, ServiceStartError)
        assert (failed.reason, failed.exit_code, failed.log_tail) == (str(failed), None, ())
    assert isinstance(dependency, DependencyFailed)
    assert dependency.dependency == ""
    assert isinstance(event_type, UnknownEventType)
    assert (event_type.unknown, event_type.known) == ((), ())


async def test_a_client_closing_an_open_stream_does_not_hang(tmp_path: Path) -> None:
    async with make_infra(tmp_path) as infra:
        async with serve(infra, "127.0.0.1:0") as srv, AgentInfra.connect(srv.address) as remote:
            handle = await remote.submit_task("echo", 1)
            await handle.result()
            events = remote.stream_events(since=0)
            with anyio.fail_after(5):
                first = await events.__anext__()
            assert first.seq > 0
        # The stream was left open: closing the client and the server ended it.
        with anyio.fail_after(5):
            await events.aclose()


async def test_a_stream_the_client_does_not_read_leaves_its_other_calls_alone(
    tmp_path: Path,
) -> None:
    # HTTP/2 counts what the server sends on every stream of a connection
    # against one window, given back as the client reads: a followed stream
    # left unread (a slow progress display) took all of it, after about 4 MiB
    # of events, and every other call on the connection hung for good.
    big = "x" * 200_000

    async def large(payload: Any) -> str:
        return big

    async with (
        AgentInfra.start(
            {"infra": {}}, state_dir=tmp_path / "state", handlers={"large": large, "echo": echo}
        ) as infra,
        serve(infra, "127.0.0.1:0") as srv,
        AgentInfra.connect(srv.address) as remote,
        aclosing(remote.stream_events({"task_completed"})) as events,
    ):
        with anyio.fail_after(10):
            await first_live_event(remote, events)
        for _ in range(60):  # 12 MB of results, each also on the unread stream
            with anyio.fail_after(10):
                assert await (await remote.submit_task("large")).result() == big
        # What it holds is still there to read.
        with anyio.fail_after(10):
            assert isinstance(await anext(events), TaskEvent)


async def test_many_streams_followed_on_one_connection_leave_its_other_calls_alone(
    tmp_path: Path,
) -> None:
    # HTTP/2 lets a server cap the calls open at once on a connection, and
    # the server left h2's cap of 100: with 100 streams followed (a result
    # stream per task), the next call on the connection, a status or the
    # submit that would end them, waited for one of them to close, for ever.
    followers = 150
    gate = anyio.Event()

    async def gated(payload: Any) -> Any:
        await gate.wait()
        return payload

    async with (
        AgentInfra.start(
            {"infra": {}}, state_dir=tmp_path / "state", handlers={"gated": gated}
        ) as infra,
        serve(infra, "127.0.0.1:0") as srv,
        AgentInfra.connect(srv.address) as remote,
    ):
        handle = await remote.submit_task("gated", "done")
        results: list[TaskEvent] = []

        async def follow() -> None:
            async with aclosing(remote.stream_task_results([handle.task_id])) as stream:
                results.extend([r async for r in stream])

        async with anyio.create_task_group() as tg:
            for _ in range(followers):
                tg.start_soon(follow)
            await anyio.wait_all_tasks_blocked()  # every follower has asked, and waits
            with anyio.fail_after(5):
                assert (await remote.get_task_status(handle.task_id)).state is TaskState.RUNNING
            gate.set()
            with anyio.fail_after(10):
                assert await handle.result() == "done"
        assert [r.result for r in results] == ["done"] * followers
        assert len({r.seq for r in results}) == 1


async def test_a_call_in_flight_when_its_connection_closes_says_so(tmp_path: Path) -> None:
    # A stream followed in another task when the `async with connect()`
    # block ends: it was told that no server answered, and to check that
    # `dspy-infra serve` ran, though the server was fine and this client had
    # closed the connection.
    async with make_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0") as srv:
        caught: list[BaseException] = []

        async def follow(events: AsyncIterator[Event]) -> None:
            try:
                async for _ in events:
                    pass
            except InfraError as exc:
                caught.append(exc)

        async with anyio.create_task_group() as tg, AgentInfra.connect(srv.address) as remote:
            await (await remote.submit_task("echo", 1)).result()
            events = remote.stream_events(since=0)
            with anyio.fail_after(5):
                await anext(events)  # following, now
            tg.start_soon(follow, events)
            # The block of the connection ends here, then the task group's.
        assert len(caught) == 1
        assert isinstance(caught[0], InfraClosed), repr(caught[0])
        assert "connection was closed" in str(caught[0])


async def first_live_event(api: Api, events: AsyncIterator[Event]) -> Event:
    """The first event of a stream that follows task completions as they happen.

    The subscription starts when the stream is first read, at a moment the
    caller cannot see: tasks are submitted until one of them is seen.
    """
    seen: list[Event] = []

    async def read() -> None:
        seen.append(await events.__anext__())

    async with anyio.create_task_group() as tg:
        tg.start_soon(read)
        while not seen:
            await api.submit_task("echo", 1)
            await anyio.sleep(0.02)
    return seen[0]


async def test_a_server_closing_ends_open_streams_with_a_reason(tmp_path: Path) -> None:
    async with make_infra(tmp_path) as infra:
        remote: RemoteAgentInfra | None = None
        try:
            async with serve(infra, "127.0.0.1:0") as srv:
                remote = await AgentInfra.connect(srv.address).__aenter__()
                events = remote.stream_events({"task_completed"})
                with anyio.fail_after(5):
                    await first_live_event(remote, events)
            # The server is closed; the client is still connected, following events.
            with anyio.fail_after(5), pytest.raises(BackendUnavailable, match="shutting down"):
                async for _ in events:
                    pass
            # Its connection is closed too: no call is taken on it any more,
            # though the instance behind it is still open.
            with anyio.fail_after(5), pytest.raises(ServerUnavailable):
                await remote.submit_task("echo", 1)
        finally:
            if remote is not None:
                await remote.__aexit__(None, None, None)


async def test_a_server_killed_mid_stream_is_no_word_of_tls(tmp_path: Path) -> None:
    # A server that answered in plain text and then died (SIGKILL, the OOM
    # killer) went away: telling the user to connect with TLS sent them the
    # wrong way. The TLS hint is for a client dropped before any answer.
    config = tmp_path / "dspy-infra.toml"
    config.write_text(
        f'[infra]\nstate_dir = "{tmp_path / "state"}"\n\n[server]\naddress = "127.0.0.1:0"\n'
        '\n[handlers.noop]\ncommand = ["true"]\n'
    )
    command = [sys.executable, "-m", "dspy_infra.cli", "serve", "-c", str(config)]
    async with await anyio.open_process(command) as process:
        assert process.stdout is not None
        try:
            with anyio.fail_after(30):
                address = (await process.stdout.receive()).decode().split()[-1]
            async with AgentInfra.connect(address) as remote:
                # Following (it has read a live event), when the server dies.
                await (await remote.submit_task("noop", task_class="cpu_long")).result()
                events = remote.stream_events({"task_completed"}, since=0)
                with anyio.fail_after(10):
                    await events.__anext__()
                process.kill()
                with anyio.fail_after(10), pytest.raises(ServerUnavailable) as caught:
                    async for _ in events:
                        pass
                assert not caught.value.plain_text
                assert "TLS" not in str(caught.value)
                assert str(caught.value).startswith(f"no dspy-infra server answers at {address}")
                # The next call, with nothing listening any more.
                with anyio.fail_after(10), pytest.raises(ServerUnavailable) as caught:
                    await remote.get_task_status("t")
                assert not caught.value.plain_text
                assert "TLS" not in str(caught.value)
        finally:
            if process.returncode is None:
                process.kill()


def reset_each_connection(listener: socket.socket, delays: list[float]) -> None:
    """Accept, wait a moment, and reset: a server dying with connections in its queue."""
    for delay in delays:
        try:
            connection, _ = listener.accept()
        except OSError:  # shut down: the test is over
            return
        time.sleep(delay)
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()


async def test_a_connection_reset_as_it_is_made_is_server_unavailable() -> None:
    # A server that resets a connection just as the client has made it (a
    # dying server's queue) made a call raise grpclib's AttributeError about
    # a missing `_transport` when the reset fell between the connection's
    # making and its first call; how often depends on the timing, so the
    # moment of the reset is spread over a millisecond, hundreds of times.
    delays = [i % 50 * 20e-6 for i in range(300)]
    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        async with anyio.create_task_group() as group:
            group.start_soon(anyio.to_thread.run_sync, reset_each_connection, listener, delays)
            try:
                for _ in delays:
                    # Connecting makes a call too (it asks the server's version).
                    with anyio.fail_after(10), pytest.raises(ServerUnavailable):
                        async with AgentInfra.connect(address) as remote:
                            await remote.get_task_status("t")
            finally:
                listener.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_client_gone_mid_stream_is_not_logged_once_per_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tls: bool
) -> None:
    # Writes to a lost connection (the events that kept coming for a
    # killed client's streams) each made asyncio log "socket.send() raised
    # exception.": as many lines as the calls were sent anything. With TLS
    # too, though its transport is told of the loss a turn of the loop late.
    client = textwrap.dedent(
        """
        import sys, anyio
        from dspy_infra import AgentInfra
        from dspy_infra.remote.client import tls_context

        async def main():
            ca = sys.argv[2] if len(sys.argv) > 2 else None
            tls = tls_context(ca) if ca else None
            async with AgentInfra.connect(sys.argv[1], tls=tls) as remote:
                async def follow():
                    async for _ in remote.stream_events(set()):
                        pass

                async with anyio.create_task_group() as group:
                    for _ in range(20):
                        group.start_soon(follow)
                    await anyio.sleep(1)
                    print("following", flush=True)
                    await anyio.sleep_forever()

        anyio.run(main)
        """
    )
    cert, key = self_signed(tmp_path, "localhost", "IP:127.0.0.1") if tls else (None, None)
    server_context = server_tls(cert, key) if cert and key else None
    async with (
        make_infra(tmp_path) as infra,
        serve(infra, "127.0.0.1:0", tls=server_context) as srv,
    ):
        command = [sys.executable, "-c", client, srv.address, *([str(cert)] if cert else [])]
        async with await anyio.open_process(command) as process:
            assert process.stdout is not None
            with anyio.fail_after(30):
                await process.stdout.receive()

            async def busy() -> None:
                for n in range(300):
                    await infra.submit_task("echo", n)

            async with anyio.create_task_group() as group:
                group.start_soon(busy)
                await anyio.sleep(0.05)
                process.kill()
    said = ("socket.send() raised exception.", "SSL connection is closed")
    noise = [r for r in caplog.records if r.getMessage() in said]
    assert not noise, f"{len(noise)} times"


async def test_unary_round_trip_is_fast(tmp_path: Path) -> None:
    """Nagle is off (the socket says it is TCP): a status call takes well under 40 ms."""
    async with (
        make_infra(tmp_path) as infra,
        serve(infra, "127.0.0.1:0") as srv,
        AgentInfra.connect(srv.address) as remote,
    ):
        handle = await remote.submit_task("echo", 1)
        await handle.result()
        times = []
        for _ in range(200):
            start = time.perf_counter()
            await remote.get_task_status(handle.task_id)
            times.append(time.perf_counter() - start)
        p50 = statistics.median(times)
        print(f"unary GetTaskStatus round trip p50: {p50 * 1000:.2f} ms")
        assert p50 < 0.02


# -- dspy-infra serve ---------------------------------------------------------------


async def test_cli_serve_runs_until_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "dspy-infra.toml"
    # TOML strings and arrays of strings are written as JSON writes them.
    web = json.dumps(service("--say", "hello")["command"])
    state_dir = json.dumps(str(tmp_path / "state"))
    # Where to listen from the configuration's [server] table.
    config.write_text(
        f"[infra]\nstate_dir = {state_dir}\n\n[services.web]\ncommand = {web}\nautostart = false\n"
        '\n[server]\naddress = "127.0.0.1:0"\n'
    )
    env = {**os.environ, "DSPY_INFRA_TOKEN": "from-env"}
    command = [sys.executable, "-m", "dspy_infra.cli", "serve", "-c", str(config)]
    async with await anyio.open_process(command, env=env) as process:
        assert process.stdout is not None
        try:
            with anyio.fail_after(30):
                line = (await process.stdout.receive()).decode()
            assert line.startswith("serving on 127.0.0.1:"), line
            address = line.split()[-1]
            with pytest.raises(BackendUnavailable, match="refused"):
                async with AgentInfra.connect(address):
                    pass
            async with AgentInfra.connect(address, token="from-env") as remote:
                assert remote.services.list() == ["web"]
                assert (await remote.health_check()).healthy
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(15):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()


async def test_cli_serve_stops_at_once_on_a_second_sigint(tmp_path: Path) -> None:
    # A service that ignores SIGTERM keeps the graceful stop waiting out its
    # stop_timeout: a second Ctrl-C was ignored, where servers stop at once.
    pid_file = tmp_path / "stubborn.pid"
    stubborn = json.dumps(["sh", "-c", f"echo $$ > {pid_file}; trap '' TERM; exec sleep 1000"])
    state_dir = json.dumps(str(tmp_path / "state"))
    config = tmp_path / "dspy-infra.toml"
    config.write_text(
        f"[infra]\nstate_dir = {state_dir}\n\n[services.stubborn]\ncommand = {stubborn}\n"
        'stop_timeout = 60\n\n[server]\naddress = "127.0.0.1:0"\n'
    )
    async with await anyio.open_process(_serve_cli(tmp_path)) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        try:
            with anyio.fail_after(30):
                await process.stdout.receive()
            process.send_signal(signal.SIGINT)
            with anyio.fail_after(10):
                assert b"shutting down" in await process.stderr.receive()
            await anyio.sleep(0.5)  # well into the stop of the service
            process.send_signal(signal.SIGINT)
            with anyio.fail_after(10):
                assert await process.wait() == 130
            stderr = b"".join([chunk async for chunk in process.stderr]).decode()
            assert "stopping at once" in stderr, stderr
            assert "Traceback" not in stderr, stderr
        finally:
            if process.returncode is None:
                process.kill()
    # What the cut-short stop left is removed by the next start, as after a crash.
    config.write_text(f"[infra]\nstate_dir = {state_dir}\n")
    async with AgentInfra.start(config):
        assert not group_alive(int(pid_file.read_text())), "the service outlived its server"


def _serve_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    config = tmp_path / "dspy-infra.toml"
    if not config.exists():
        config.write_text(f'[infra]\nstate_dir = "{tmp_path / "state"}"\n')
    return [sys.executable, "-m", "dspy_infra.cli", "serve", "-c", str(config), *args]


def test_cli_serve_on_a_taken_port_says_so(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        done = subprocess.run(
            _serve_cli(tmp_path, "--address", address),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"error: cannot listen on {address}: "), done.stderr
    assert "Traceback" not in done.stderr


def test_cli_refuses_a_token_that_cannot_be_sent(tmp_path: Path) -> None:
    env = {**os.environ, "DSPY_INFRA_TOKEN": "pässwörd"}
    for argv in (_serve_cli(tmp_path), [sys.executable, "-m", "dspy_infra.cli", "status"]):
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, check=False, env=env
        )
        assert done.returncode == 2, done.stderr
        assert "the token may only hold visible ASCII characters" in done.stderr
        assert "Traceback" not in done.stderr


async def test_cli_serve_stopped_while_starting_stops_what_it_started(tmp_path: Path) -> None:
    # A service that takes long to be ready: SIGTERM comes while it starts.
    pid_file = tmp_path / "slow.pid"
    slow = json.dumps(["sh", "-c", f"echo $$ > {pid_file}; exec sleep 1000"])
    config = tmp_path / "dspy-infra.toml"
    config.write_text(
        f'[infra]\nstate_dir = "{tmp_path / "state"}"\n\n[services.slow]\ncommand = {slow}\n'
        '[services.slow.health]\ncommand = ["false"]\ndeadline = 60\n'
    )
    async with await anyio.open_process(_serve_cli(tmp_path)) as process:
        try:
            with anyio.fail_after(30):
                while not pid_file.exists():
                    await anyio.sleep(0.05)
            pid = int(pid_file.read_text())
            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(20):
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
    assert not group_alive(pid), "the service outlived the server that started it"


async def test_cli_serve_stops_with_a_client_that_stopped_reading(tmp_path: Path) -> None:
    # A client that asked for a long stream, with HTTP/2 windows as large as
    # they go, and then stopped reading (its process stopped, its machine
    # gone): the server's writes to it filled the socket and then waited.
    # SIGTERM cancelled the call, whose end (its trailers) then waited for
    # room to be written in for ever, and so did the server.
    pid_file = tmp_path / "chatty.pid"
    chatty = json.dumps(
        [
            sys.executable,
            "-c",
            f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
            "for _ in range(500): print('x' * 60000, flush=True)\n"
            "time.sleep(1000)",
        ]
    )
    config = tmp_path / "dspy-infra.toml"
    config.write_text(
        f'[infra]\nstate_dir = "{tmp_path / "state"}"\n\n[services.chatty]\ncommand = {chatty}\n'
        '\n[server]\naddress = "127.0.0.1:0"\n'
    )
    async with await anyio.open_process(_serve_cli(tmp_path)) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        try:
            with anyio.fail_after(30):
                address = (await process.stdout.receive()).decode().split()[-1]
            request = env_pb.StreamLogsRequest(name="chatty", follow=True)
            async with await unread_call(address, _ENV + "StreamLogs", request):
                await anyio.sleep(3)  # its 30 MB of lines are on their way
                process.send_signal(signal.SIGTERM)
                with anyio.fail_after(30):
                    assert await process.wait() == 0
            stderr = b"".join([chunk async for chunk in process.stderr]).decode()
            assert "Traceback" not in stderr, stderr
        finally:
            if process.returncode is None:
                process.kill()
    assert not group_alive(int(pid_file.read_text())), "the service outlived the server"


async def unread_call(
    address: str, route: str, request: betterproto2.Message
) -> anyio.abc.SocketStream:
    """A connection on which ``route`` was called with the largest windows HTTP/2
    allows, and from which nothing is read: the server may send all it has."""
    host, port = parse_address(address)
    sock = await anyio.connect_tcp(host, port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    window = 2**31 - 1
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    conn.increment_flow_control_window(window - conn.inbound_flow_control_window)
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(
        stream_id,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", route),
            (":authority", address),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    body = bytes(request)
    conn.send_data(stream_id, b"\0" + len(body).to_bytes(4, "big") + body, end_stream=True)
    await sock.send(conn.data_to_send())
    return sock


def test_cli_serve_refuses_a_public_address_without_tls(tmp_path: Path) -> None:
    config = tmp_path / "dspy-infra.toml"
    config.write_text(f'[infra]\nstate_dir = "{tmp_path / "state"}"\n')
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dspy_infra.cli",
            "serve",
            "-c",
            str(config),
            "--address",
            "0.0.0.0:0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "not a loopback address" in done.stderr


# -- any gRPC client: stock grpcio-tools code, and bad input ---------------------------

PROTO_DIR = Path(__file__).resolve().parents[2] / "proto"

# Calls every RPC with code that stock grpcio-tools generates from proto/: no
# line of this library runs on the client side. It prints what it saw as JSON.
GRPCIO_CLIENT = """
import json, sys, time
import grpc
from env_manager.v1 import env_manager_pb2 as e, env_manager_pb2_grpc as eg
from orchestrator.v1 import orchestrator_pb2 as o, orchestrator_pb2_grpc as og

out = {}
with grpc.insecure_channel(sys.argv[1]) as channel:
    orch, env = og.OrchestratorStub(channel), eg.EnvManagerStub(channel)
    out["list"] = list(env.ListServices(e.ListServicesRequest()).names)
    started = env.StartServices(e.StartServicesRequest(names=["web"])).services
    out["started"] = {s.name: [s.state, s.ports["main"] > 0] for s in started}
    lines = []
    while "ready" not in lines:
        lines = [m.line for m in env.StreamLogs(e.StreamLogsRequest(name="web"))]
        time.sleep(0.01)
    out["logs"] = lines
    out["health"] = orch.Health(o.HealthRequest()).status
    env.StopServices(e.StopServicesRequest(names=["web"]))
    status = env.GetServiceStatus(e.GetServiceStatusRequest(names=["web"])).services
    out["stopped"] = status[0].state

    request = o.SubmitTaskRequest(
        handler="echo", payload_json='{"n": 18446744073709551617}', task_class="cpu_short",
        priority=2, resources=o.Resources(cpus=0.5),
    )
    task_id = orch.SubmitTask(request).task_id
    status = orch.GetTaskStatus(o.GetTaskStatusRequest(task_id=task_id, wait=True)).status
    out["task"] = [status.task_id == task_id, status.state, status.result_json, status.priority]
    batch = o.SubmitTasksRequest(handler="echo", payloads_json=["1", "2"])
    ids = list(orch.SubmitTasks(batch).task_ids)
    finals = orch.StreamTaskResults(o.StreamTaskResultsRequest(task_ids=ids))
    out["results"] = sorted(event.result_json for event in finals)
    slow = orch.SubmitTask(o.SubmitTaskRequest(handler="sleepy")).task_id
    out["cancelled"] = orch.CancelTask(o.CancelTaskRequest(task_id=slow)).status.state
    events = orch.StreamEvents(o.StreamEventsRequest(types=["task_completed"], since=0))
    first = next(events)
    events.cancel()
    out["event"] = [first.WhichOneof("event"), first.task.type, first.task.seq > 0]
    request = o.StreamEventsRequest(types=["task_completed"], since=0, follow=False)
    held = [m.task for m in orch.StreamEvents(request)]  # ends by itself
    out["held"] = sorted(e.result_json for e in held)
    # Without `follow`, as clients older than the field ask: new events keep coming.
    events = orch.StreamEvents(o.StreamEventsRequest(types=["task_completed"], since=held[-1].seq))
    new = orch.SubmitTask(o.SubmitTaskRequest(handler="echo", payload_json='"new"')).task_id
    out["followed"] = next(events).task.task_id == new
    events.cancel()
    values = orch.GetMetrics(o.GetMetricsRequest()).values
    out["metrics"] = any(k.startswith("dspy_infra_tasks_submitted") for k in values)
    classes = orch.ListTaskClasses(o.ListTaskClassesRequest()).classes
    out["classes"] = [[c.name, c.runner, c.limit, c.adaptive, c.running, c.queued]
                      for c in classes]

    spec = {"name": "pair", "steps": {"a": {"handler": "echo", "payload": "${inputs.x}"},
                                      "b": {"handler": "echo", "depends_on": ["a"],
                                            "payload": "${steps.a.result}"}}}
    created = orch.CreateWorkflow(o.CreateWorkflowRequest(spec_json=json.dumps(spec)))
    run_id = orch.StartWorkflowRun(
        o.StartWorkflowRunRequest(workflow_id=created.workflow_id, inputs_json='{"x": 7}')
    ).run_id
    stream = list(orch.StreamWorkflowStatus(o.StreamWorkflowStatusRequest(run_id=run_id)))
    final = stream[-1]
    out["workflow_stream"] = [[m.type, m.step if m.HasField("step") else None] for m in stream]
    out["workflow_final"] = [final.run.state, [[s.name, s.state, s.result_json]
                                               for s in final.run.steps]]
    run = orch.GetWorkflowRun(o.GetWorkflowRunRequest(run_id=run_id, wait=True)).run
    out["workflow_run"] = [run.workflow_id == created.workflow_id, run.state, run.inputs_json]
    got = orch.GetWorkflow(o.GetWorkflowRequest(workflow_id=created.workflow_id)).workflow
    out["workflow_get"] = [got.workflow_id == created.workflow_id,
                           json.loads(got.spec_json)["name"], got.created_at == created.created_at]
    slow = json.dumps({"name": "slow", "steps": {"s": {"handler": "sleepy"}}})
    slow_id = orch.CreateWorkflow(o.CreateWorkflowRequest(spec_json=slow)).workflow_id
    slow_run = orch.StartWorkflowRun(o.StartWorkflowRunRequest(workflow_id=slow_id)).run_id
    cancelled = orch.CancelWorkflowRun(o.CancelWorkflowRunRequest(run_id=slow_run)).run
    out["workflow_cancelled"] = [cancelled.state, cancelled.steps[0].state]
    listed = orch.ListWorkflows(o.ListWorkflowsRequest()).workflows
    out["workflow_list"] = [w.workflow_id for w in listed] == [created.workflow_id, slow_id]

    codes = {}
    calls = {
        "CreateWorkflow": lambda: orch.CreateWorkflow(o.CreateWorkflowRequest(spec_json="{}")),
        "StartWorkflowRun": lambda: orch.StartWorkflowRun(
            o.StartWorkflowRunRequest(workflow_id="nope")
        ),
        "GetWorkflowRun": lambda: orch.GetWorkflowRun(o.GetWorkflowRunRequest(run_id="nope")),
        "GetWorkflow": lambda: orch.GetWorkflow(o.GetWorkflowRequest(workflow_id="nope")),
        "CancelWorkflowRun": lambda: orch.CancelWorkflowRun(
            o.CancelWorkflowRunRequest(run_id="nope")
        ),
        "StreamWorkflowStatus": lambda: list(
            orch.StreamWorkflowStatus(o.StreamWorkflowStatusRequest(run_id="nope"))
        ),
        "GetTaskStatus": lambda: orch.GetTaskStatus(o.GetTaskStatusRequest(task_id="nope")),
        "SubmitTask": lambda: orch.SubmitTask(o.SubmitTaskRequest(handler="echo", priority=-1)),
        "StreamEvents": lambda: list(
            orch.StreamEvents(o.StreamEventsRequest(types=["task_completed", "nope"]))
        ),
    }
    details = {}
    for name, call in calls.items():
        try:
            call()
        except grpc.RpcError as exc:
            trailers = dict(exc.trailing_metadata() or ())
            codes[name] = [exc.code().name, trailers.get("dspy-infra-error")]
            details[name] = exc.details()
    out["errors"] = codes
    out["details"] = details
print(json.dumps(out))
"""


async def test_a_stock_grpcio_client_calls_every_rpc(tmp_path: Path) -> None:
    out = tmp_path / "grpcio"
    out.mkdir()
    protos = [str(p.relative_to(PROTO_DIR)) for p in sorted(PROTO_DIR.rglob("*.proto"))]
    await anyio.run_process(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            *protos,
        ]
    )
    (out / "client.py").write_text(GRPCIO_CLIENT)
    async with make_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0") as srv:
        with anyio.fail_after(60):
            done = await anyio.run_process(
                [sys.executable, str(out / "client.py"), srv.address], cwd=out, check=False
            )
    assert done.returncode == 0, done.stderr.decode()
    seen = json.loads(done.stdout)
    assert seen["list"] == ["web"]
    assert seen["started"] == {"web": ["healthy", True]}
    assert seen["logs"] == ["hello", "ready"]
    assert seen["health"] == "healthy"
    assert seen["stopped"] == "stopped"
    assert seen["task"] == [True, "succeeded", '{"n":18446744073709551617}', 2]
    assert seen["results"] == ["1", "2"]
    assert seen["cancelled"] == "cancelled"
    assert seen["event"] == ["task", "task_completed", True]
    assert seen["held"] == ["1", "2", '{"n":18446744073709551617}']
    assert seen["followed"] is True
    assert seen["metrics"] is True
    assert seen["classes"] == [
        ["cpu_short", "inprocess", 64, False, 0, 0],
        ["cpu_long", "process", 64, False, 0, 0],
        ["gpu", "process", 64, False, 0, 0],
        ["gpu_slurm", "slurm", 64, False, 0, 0],
        ["one_at_a_time", "inprocess", 1, False, 0, 0],
    ]
    assert seen["workflow_stream"] == [
        ["workflow_run_started", None],
        ["workflow_step_started", "a"],
        ["workflow_step_succeeded", "a"],
        ["workflow_step_started", "b"],
        ["workflow_step_succeeded", "b"],
        ["workflow_run_succeeded", None],
    ]
    assert seen["workflow_final"] == [
        "succeeded",
        [["a", "succeeded", "7"], ["b", "succeeded", "7"]],
    ]
    assert seen["workflow_run"] == [True, "succeeded", '{"x":7}']
    assert seen["workflow_cancelled"] == ["cancelled", "cancelled"]
    assert seen["workflow_get"] == [True, "pair", True]
    assert seen["workflow_list"] is True
    assert seen["errors"] == {
        "CreateWorkflow": ["INVALID_ARGUMENT", "InvalidWorkflow"],
        "StartWorkflowRun": ["NOT_FOUND", "UnknownWorkflow"],
        "GetWorkflowRun": ["NOT_FOUND", "UnknownRun"],
        "GetWorkflow": ["NOT_FOUND", "UnknownWorkflow"],
        "CancelWorkflowRun": ["NOT_FOUND", "UnknownRun"],
        "StreamWorkflowStatus": ["NOT_FOUND", "UnknownRun"],
        "GetTaskStatus": ["NOT_FOUND", "UnknownTask"],
        "SubmitTask": ["INVALID_ARGUMENT", "InvalidTask"],
        "StreamEvents": ["INVALID_ARGUMENT", "UnknownEventType"],
    }
    assert seen["details"]["StreamEvents"].startswith("types: unknown event type 'nope' (known: ")


# -- grpc.health.v1 and server reflection, from stock grpcio --------------------------

# The standard protos, as grpc publishes them (comments and options left out):
# grpcio ships stubs for neither (they are grpcio-health-checking and
# grpcio-reflection), so the test generates them with grpcio-tools. Their
# packages make the wire names; the files are put under standard/, as grpc/
# would shadow grpcio itself.
HEALTH_PROTO = """
syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health {
  rpc Check(HealthCheckRequest) returns (HealthCheckResponse);
  rpc Watch(HealthCheckRequest) returns (stream HealthCheckResponse);
}
"""
REFLECTION_PROTO = """
syntax = "proto3";
package grpc.reflection.v1;
service ServerReflection {
  rpc ServerReflectionInfo(stream ServerReflectionRequest)
      returns (stream ServerReflectionResponse);
}
message ServerReflectionRequest {
  string host = 1;
  oneof message_request {
    string file_by_filename = 3;
    string file_containing_symbol = 4;
    ExtensionRequest file_containing_extension = 5;
    string all_extension_numbers_of_type = 6;
    string list_services = 7;
  }
}
message ExtensionRequest { string containing_type = 1; int32 extension_number = 2; }
message ServerReflectionResponse {
  string valid_host = 1;
  ServerReflectionRequest original_request = 2;
  oneof message_response {
    FileDescriptorResponse file_descriptor_response = 4;
    ExtensionNumberResponse all_extension_numbers_response = 5;
    ListServiceResponse list_services_response = 6;
    ErrorResponse error_response = 7;
  }
}
message FileDescriptorResponse { repeated bytes file_descriptor_proto = 1; }
message ExtensionNumberResponse { string base_type_name = 1; repeated int32 extension_number = 2; }
message ListServiceResponse { repeated ServiceResponse service = 1; }
message ServiceResponse { string name = 1; }
message ErrorResponse { int32 error_code = 1; string error_message = 2; }
"""

# check NAME...: each name's status (or the error code); watch NAME: the first
# status, then the next one; reflect: what reflection says of our services.
STANDARD_CLIENT = """
import json, sys
import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from standard import health_pb2 as h, health_pb2_grpc as hg
from standard import reflection_pb2 as r, reflection_pb2_grpc as rg

def status(response):
    return h.HealthCheckResponse.ServingStatus.Name(response.status)

def files(response):
    return [descriptor_pb2.FileDescriptorProto.FromString(b)
            for b in response.file_descriptor_response.file_descriptor_proto]

address, mode, names = sys.argv[1], sys.argv[2], sys.argv[3:]
with grpc.insecure_channel(address) as channel:
    health = hg.HealthStub(channel)
    if mode == "check":
        out = {}
        for name in names:
            try:
                out[name] = status(health.Check(h.HealthCheckRequest(service=name)))
            except grpc.RpcError as exc:
                out[name] = exc.code().name
        print(json.dumps(out))
    elif mode == "watch":
        updates = health.Watch(h.HealthCheckRequest(service=names[0]))
        print(status(next(updates)), flush=True)
        print(status(next(updates)), flush=True)
        updates.cancel()
    elif mode == "reflect":
        requests = [
            r.ServerReflectionRequest(list_services=""),
            r.ServerReflectionRequest(file_containing_symbol="orchestrator.v1.Orchestrator"),
            r.ServerReflectionRequest(file_by_filename="env_manager/v1/env_manager.proto"),
            r.ServerReflectionRequest(file_containing_symbol="orchestrator.v1.SubmitTaskRequest"),
            r.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"),
            r.ServerReflectionRequest(file_containing_symbol="no.such.Symbol"),
            # A method, as grpcurl describe asks for one; and one the service lacks.
            r.ServerReflectionRequest(
                file_containing_symbol="orchestrator.v1.Orchestrator.SubmitTask"
            ),
            r.ServerReflectionRequest(file_containing_symbol="orchestrator.v1.Orchestrator.Nope"),
            r.ServerReflectionRequest(
                file_containing_symbol="grpc.reflection.v1.ServerReflection"
            ),
        ]
        listed, orch, env, message, health_file, missing, method, no_method, itself = list(
            rg.ServerReflectionStub(channel).ServerReflectionInfo(iter(requests))
        )
        pool = descriptor_pool.DescriptorPool()
        for proto in files(env) + files(orch):
            pool.Add(proto)
        service = pool.FindServiceByName("orchestrator.v1.Orchestrator")
        submit = pool.FindMethodByName("orchestrator.v1.Orchestrator.SubmitTask")
        print(json.dumps({
            "services": sorted(s.name for s in listed.list_services_response.service),
            "orchestrator_file": [f.name for f in files(orch)],
            "methods": [m.name for m in service.methods],
            "submit_fields": [f.name for f in submit.input_type.fields][:3],
            "message_file": [f.name for f in files(message)],
            "health_file": [f.name for f in files(health_file)],
            "missing": missing.error_response.error_code,
            "method_file": [f.name for f in files(method)],
            "no_method": no_method.error_response.error_code,
            "reflection_file": [f.name for f in files(itself)],
        }))
"""


async def standard_client(tmp_path: Path) -> Path:
    """grpcio-tools stubs of grpc.health.v1 and grpc.reflection.v1, and the client using them."""
    out = tmp_path / "grpcio-standard"
    (out / "standard").mkdir(parents=True)
    for name, text in [("health", HEALTH_PROTO), ("reflection", REFLECTION_PROTO)]:
        (out / "standard" / f"{name}.proto").write_text(text)
    await anyio.run_process(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{out}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "standard/health.proto",
            "standard/reflection.proto",
        ]
    )
    (out / "client.py").write_text(STANDARD_CLIENT)
    return out


async def run_standard(out: Path, address: str, *args: str) -> Any:
    with anyio.fail_after(60):
        done = await anyio.run_process(
            [sys.executable, str(out / "client.py"), address, *args], cwd=out, check=False
        )
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


_SERVICES = ["", "orchestrator.v1.Orchestrator", "env_manager.v1.EnvManager"]


async def test_grpc_health_reflects_the_instance(tmp_path: Path) -> None:
    out = await standard_client(tmp_path)
    infra_config = {
        "infra": {},
        "services": {
            "web": service("--say", "ready", port=True, autostart=False),
            "bad": service("--exit-after", "0.1", "--code", "1", autostart=False),
        },
    }
    infra = AgentInfra.start(infra_config, state_dir=tmp_path / "state", handlers={})
    async with infra, serve(infra, "127.0.0.1:0") as srv:
        # Nothing active: the instance and both services serve; a configured
        # service that is not up does not; an unknown name is NOT_FOUND.
        seen = await run_standard(out, srv.address, "check", *_SERVICES, "web", "nope")
        assert seen == {
            **dict.fromkeys(_SERVICES, "SERVING"),
            "web": "NOT_SERVING",
            "nope": "NOT_FOUND",
        }

        # A Watch sees the service come up.
        command = [sys.executable, str(out / "client.py"), srv.address, "watch", "web"]
        async with await anyio.open_process(command, cwd=out) as watch:
            assert watch.stdout is not None
            try:
                with anyio.fail_after(30):
                    # A pipe may hand the line over in pieces: read up to its end.
                    first = b""
                    while not first.endswith(b"\n"):
                        first += await watch.stdout.receive()
                    assert first.decode() == "NOT_SERVING\n"
                    await infra.services.start(["web"])
                    rest = b""
                    async for chunk in watch.stdout:
                        rest += chunk
                    assert rest.decode() == "SERVING\n"
                    assert await watch.wait() == 0
            finally:
                if watch.returncode is None:
                    watch.kill()

        # A service that failed: the instance is not serving any more, per name too.
        await infra.services.start(["bad"])
        with anyio.fail_after(10):
            while (await infra.services.status(["bad"]))["bad"].state is not ServiceState.FAILED:
                await anyio.sleep(0.01)
        seen = await run_standard(out, srv.address, "check", *_SERVICES, "web", "bad")
        assert seen == {
            **dict.fromkeys(_SERVICES, "NOT_SERVING"),
            "web": "SERVING",
            "bad": "NOT_SERVING",
        }


async def test_health_and_reflection_need_the_token(tmp_path: Path) -> None:
    async with make_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0", token="s3cret") as srv:
        channel = Channel("127.0.0.1", int(srv.address.rsplit(":", 1)[1]))
        try:
            with pytest.raises(GRPCError) as info:
                await HealthStub(channel).Check(HealthCheckRequest(service=""))
            assert info.value.status is Status.UNAUTHENTICATED
            reply = await HealthStub(channel).Check(
                HealthCheckRequest(service=""), metadata={"authorization": "Bearer s3cret"}
            )
            assert reply.status == HealthCheckResponse.SERVING
        finally:
            channel.close()


async def test_server_reflection_describes_every_service(tmp_path: Path) -> None:
    out = await standard_client(tmp_path)
    async with make_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0") as srv:
        seen = await run_standard(out, srv.address, "reflect")
    assert seen["services"] == [
        "env_manager.v1.EnvManager",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "orchestrator.v1.Orchestrator",
    ]
    assert seen["orchestrator_file"] == ["orchestrator/v1/orchestrator.proto"]
    assert {"SubmitTask", "CreateWorkflow", "GetWorkflowRun", "StreamWorkflowStatus"} <= set(
        seen["methods"]
    )
    assert seen["submit_fields"] == ["handler", "payload_json", "task_class"]
    assert seen["message_file"] == ["orchestrator/v1/orchestrator.proto"]
    assert seen["health_file"] == ["grpclib/health/v1/health.proto"]
    assert seen["missing"] == Status.NOT_FOUND.value
    assert seen["method_file"] == ["orchestrator/v1/orchestrator.proto"]
    assert seen["no_method"] == Status.NOT_FOUND.value
    assert seen["reflection_file"] == ["grpclib/reflection/v1/reflection.proto"]


_ORCH = "/orchestrator.v1.Orchestrator/"
_ENV = "/env_manager.v1.EnvManager/"
_text = st.text(max_size=12)
_maybe_text = st.none() | _text
_int32 = st.integers(-(2**31), 2**31 - 1)
_double = st.none() | st.floats()
_resources = st.none() | st.builds(
    orch_pb.Resources,
    cpus=_double,
    memory_mb=st.none() | st.integers(-(2**63), 2**63 - 1),
    gpus=st.none() | _int32,
)
_handlers = st.sampled_from(["echo", "boom", ""]) | _text
# JSON nested deeper than Python recurses, and about as deep (which decodes,
# and may still be too deep for what uses it).
_depths = st.integers(1, 100_000) | st.integers(-300, 10).map(sys.getrecursionlimit().__add__)
_deep = _depths.map(lambda depth: "[" * depth + "]" * depth)
_payloads = st.sampled_from(["", "{", "null", "[1]", '"x"', "NaN", "1e999"]) | _text | _deep
_DEEP_SPEC = '{"name": "a", "steps": {"s": {"handler": "echo", "payload": DEEP}}}'
_specs = _text | _deep.map(lambda deep: _DEEP_SPEC.replace("DEEP", deep))
# Every unary RPC, with messages of its own type whose fields are anything the
# wire allows (streams are left out: a random follow=true would wait forever).
_calls = st.one_of(
    st.tuples(
        st.just(_ORCH + "SubmitTask"),
        st.builds(
            orch_pb.SubmitTaskRequest,
            handler=_handlers,
            payload_json=_payloads,
            task_class=st.none() | st.sampled_from(["cpu_short", "gpu", ""]) | _text,
            priority=_int32,
            needs=st.lists(_text, max_size=2),
            task_id=_maybe_text,
            workflow_id=_maybe_text,
            max_attempts=st.none() | _int32,
            timeout=_double,
            resources=_resources,
        ),
    ),
    st.tuples(
        st.just(_ORCH + "SubmitTasks"),
        st.builds(
            orch_pb.SubmitTasksRequest,
            handler=_handlers,
            payloads_json=st.lists(_payloads, max_size=3),
            task_class=_maybe_text,
            priority=_int32,
            max_attempts=st.none() | _int32,
            timeout=_double,
            resources=_resources,
        ),
    ),
    st.tuples(
        st.just(_ORCH + "GetTaskStatus"),
        st.builds(orch_pb.GetTaskStatusRequest, task_id=_text, wait=st.just(False)),
    ),
    st.tuples(st.just(_ORCH + "CancelTask"), st.builds(orch_pb.CancelTaskRequest, task_id=_text)),
    st.tuples(
        st.just(_ORCH + "CreateWorkflow"),
        st.builds(orch_pb.CreateWorkflowRequest, spec_json=_specs),
    ),
    st.tuples(
        st.just(_ORCH + "StartWorkflowRun"),
        st.builds(
            orch_pb.StartWorkflowRunRequest,
            workflow_id=_text,
            inputs_json=_payloads,
            run_id=_maybe_text,
        ),
    ),
    st.tuples(
        st.sampled_from([_ORCH + "GetWorkflowRun", _ORCH + "CancelWorkflowRun"]),
        st.builds(orch_pb.CancelWorkflowRunRequest, run_id=_text),
    ),
    st.tuples(
        st.sampled_from([_ENV + "StartServices", _ENV + "StopServices", _ENV + "GetServiceStatus"]),
        st.builds(orch_pb.StreamEventsRequest, types=st.lists(_text, min_size=1, max_size=2)),
    ),
    st.tuples(st.sampled_from([_ORCH + "Health", _ORCH + "GetMetrics"]), st.just(None)),
).map(lambda call: (call[0], b"" if call[1] is None else bytes(call[1])))
# And bytes that are not a message at all.
_garbage = st.tuples(
    st.sampled_from([_ORCH + "SubmitTask", _ORCH + "GetTaskStatus", _ENV + "StartServices"]),
    st.binary(max_size=40),
)
_REFUSALS = {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "UNIMPLEMENTED"}


def _fuzz(address: str) -> None:
    grpc = importlib.import_module("grpc")
    with grpc.insecure_channel(address) as channel:

        @settings(max_examples=300, deadline=None, database=None)
        @given(call=_calls | _garbage)
        def one(call: tuple[str, bytes]) -> None:
            route, body = call
            try:
                channel.unary_unary(route)(body, timeout=20)
            except grpc.RpcError as exc:
                refused = exc.code().name, exc.details()
            else:
                return
            assert refused[0] in _REFUSALS, (route, body, refused)

        one()


async def test_random_and_bad_fields_never_crash_the_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with make_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0") as srv:
        # The server runs in this loop; the client (grpcio, raw bytes) in a thread.
        await anyio.to_thread.run_sync(_fuzz, srv.address)
        async with AgentInfra.connect(srv.address) as remote:
            assert await (await remote.submit_task("echo", "still here")).result() == "still here"
            assert (await remote.health_check()).healthy
    assert not [r for r in caplog.records if r.name == "dspy_infra.remote"], "a call failed inside"


def _call_raw(address: str, route: str, body: bytes) -> tuple[str, str]:
    grpc = importlib.import_module("grpc")
    with grpc.insecure_channel(address) as channel:
        try:
            channel.unary_unary(route)(body, timeout=20)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details()
    return "OK", ""


async def test_a_field_of_another_wire_type_is_invalid_argument(tmp_path: Path) -> None:
    # Each refusal names the field (by number and name) and what it must be,
    # in words, never with the parser's exception.
    refusals = {
        # SubmitTaskRequest.handler (field 1, a string) sent as a varint.
        (_ORCH + "SubmitTask", b"\x08\x05"): (
            "SubmitTaskRequest: field 1 (handler) must be a string, got a varint"
        ),
        # ... and as bytes that are not UTF-8.
        (_ORCH + "SubmitTask", b"\x0a\x01\xff"): (
            "SubmitTaskRequest: field 1 (handler) must be a string, got bytes that are not UTF-8"
        ),
        # GetTaskStatusRequest.wait (field 2, a bool) sent length-delimited.
        (_ORCH + "GetTaskStatus", b"\x12\x01\x01"): (
            "GetTaskStatusRequest: field 2 (wait) must be a bool, got length-delimited bytes"
        ),
        # SubmitTaskRequest.timeout (field 9, a double) sent length-delimited.
        (_ORCH + "SubmitTask", b"\x4a\x01x"): (
            "SubmitTaskRequest: field 9 (timeout) must be a double, got length-delimited bytes"
        ),
        # Resources.gpus (field 3 of SubmitTaskRequest.resources, field 10), after a good field.
        (_ORCH + "SubmitTask", b"\x0a\x04echo\x52\x03\x1a\x01x"): (
            "SubmitTaskRequest: field 10.3 (resources.gpus) must be an int32, "
            "got length-delimited bytes"
        ),
        # The second of the repeated SubmitTasksRequest.payloads_json (field 2).
        (_ORCH + "SubmitTasks", b"\x12\x011\x12\x01\xff"): (
            "SubmitTasksRequest: field 2 (payloads_json[1]) must be a string, "
            "got bytes that are not UTF-8"
        ),
        # A varint for a double: protobuf would keep it aside, as an unknown field.
        (_ORCH + "SubmitTask", b"\x48\x05"): (
            "SubmitTaskRequest: field 9 (timeout) must be a double, got a varint"
        ),
        # SubmitTaskRequest.resources (field 10, a message) sent as a varint.
        (_ORCH + "SubmitTask", b"\x50\x05"): (
            "SubmitTaskRequest: field 10 (resources) must be a Resources message, got a varint"
        ),
        # A string that announces more bytes than follow (ASCII ones: UTF-8 is not to blame).
        (_ORCH + "SubmitTask", b"\x0a\x10echo"): (
            "SubmitTaskRequest: field 1 (handler) is cut short: its length is 16 bytes, "
            "and 4 follow"
        ),
        # ... and a message field that does, within the message's own length.
        (_ORCH + "SubmitTask", b"\x52\x02\x18\x80\x01"): (
            "SubmitTaskRequest: field 10.3 (resources.gpus) is cut short: the bytes end "
            "inside its varint"
        ),
        # A double (fixed 8 bytes) of which 2 came.
        (_ORCH + "SubmitTask", b"\x49\x00\x00"): (
            "SubmitTaskRequest: field 9 (timeout) is cut short: it is 8 bytes, and 2 follow"
        ),
        # A varint over the 10 bytes that hold 64 bits.
        (_ORCH + "SubmitTask", b"\x20" + b"\xff" * 20 + b"\x01"): (
            "SubmitTaskRequest: field 4 (priority) has a varint of over 10 bytes"
        ),
        # Keys that name no field.
        (_ORCH + "SubmitTask", b"\x0a\x01x\x80"): (
            "SubmitTaskRequest: the message ends inside a field's key (at byte 3)"
        ),
        (_ORCH + "SubmitTask", b"\x00\x00"): (
            "SubmitTaskRequest: the message has a field numbered 0, which no field can be "
            "(1 to 536870911) (at byte 0)"
        ),
        # A group (wire type 3, a proto2 client's) of a field not known, never ended.
        (_ORCH + "SubmitTask", b"\xfb\x07"): (
            "SubmitTaskRequest: field 127 is cut short: the bytes end inside its group"
        ),
    }
    async with make_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0") as srv:
        for (route, body), message in refusals.items():
            code, details = await anyio.to_thread.run_sync(_call_raw, srv.address, route, body)
            assert (code, details) == ("INVALID_ARGUMENT", f"the request is not a valid {message}")


async def test_a_few_bytes_never_make_the_server_allocate_what_they_announce(
    tmp_path: Path,
) -> None:
    # betterproto2 took a message field sent as the varint n, and encoding it
    # again made n bytes: 6 bytes of request, 1 GB of memory for n = 10**9. And
    # it read a length longer than what follows as what follows. Both are
    # refused on their first bytes now, before the parser sees them. (n is 64
    # MiB here, so that the test stays cheap if that ever comes back.)
    huge = 64 << 20
    refusals = {
        b"\x50" + betterproto2.encode_varint(huge): (
            "field 10 (resources) must be a Resources message, got a varint"
        ),
        b"\x52" + betterproto2.encode_varint(huge) + b"\x08": (
            f"field 10 (resources) is cut short: its length is {huge} bytes, and 1 follow"
        ),
        b"\x0a\x04echo\x12" + betterproto2.encode_varint(huge) + b"[1]": (
            f"field 2 (payload_json) is cut short: its length is {huge} bytes, and 3 follow"
        ),
    }
    async with make_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0") as srv:
        tracemalloc.start()
        try:
            for body, message in refusals.items():
                started = time.monotonic()
                code, details = await anyio.to_thread.run_sync(
                    _call_raw, srv.address, _ORCH + "SubmitTask", body
                )
                assert (code, details) == (
                    "INVALID_ARGUMENT",
                    f"the request is not a valid SubmitTaskRequest: {message}",
                )
                assert time.monotonic() - started < 5
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < huge // 4, f"{peak} bytes allocated for a {len(body)}-byte request"


async def test_fields_the_server_does_not_know_cost_it_no_more_than_the_others(
    tmp_path: Path,
) -> None:
    # A field of a number the message does not have is left aside, as protobuf
    # does (a newer client's): betterproto2 kept each by copying all those
    # before it, so that 640,000 of them (2 MB) held the server's loop for 77 s.
    unknown = b"\xf8\x07\x00" * 500_000  # field 127, the varint 0
    body = unknown + bytes(orch_pb.SubmitTaskRequest(handler="echo", payload_json="1"))
    async with make_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0") as srv:
        started = time.monotonic()
        code, details = await anyio.to_thread.run_sync(
            _call_raw, srv.address, _ORCH + "SubmitTask", body
        )
        assert (code, details) == ("OK", "")
        assert time.monotonic() - started < 10  # 40 s before, about 1 s now


async def test_a_request_over_the_size_limit_is_refused_before_its_body(tmp_path: Path) -> None:
    # A client that announces a 1 GiB message and sends none of it: the
    # server answers on the announced size, without waiting for the body, and
    # resets the stream so that a client which is sending it stops.
    async with (
        make_infra(tmp_path) as infra,
        serve(infra, "127.0.0.1:0") as srv,
        await anyio.connect_tcp("127.0.0.1", int(srv.address.rsplit(":", 1)[1])) as sock,
    ):
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(
            stream_id,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", _ORCH + "SubmitTask"),
                (":authority", srv.address),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        conn.send_data(stream_id, b"\0" + (1 << 30).to_bytes(4, "big"))
        await sock.send(conn.data_to_send())
        answer: dict[str, str] = {}
        reset = False
        with anyio.fail_after(10):
            while not reset:
                for event in conn.receive_data(await sock.receive()):
                    if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                        answer.update(event.headers)  # type: ignore[arg-type] # str: header_encoding
                    reset = reset or isinstance(event, h2.events.StreamReset)
                await sock.send(conn.data_to_send())
    assert answer["grpc-status"] == str(Status.RESOURCE_EXHAUSTED.value)
    limit = server_module.MIN_MAX_REQUEST_BYTES
    assert unquote(answer["grpc-message"]) == (
        f"the request message is {1 << 30} bytes, over the server's limit of {limit} bytes"
    )


async def test_the_request_size_limit_refuses_no_task_the_instance_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever the fixed minimum, a task of the largest payload goes through;
    # a batch of them over the limit is refused, and says why.
    monkeypatch.setattr(server_module, "MIN_MAX_REQUEST_BYTES", 1024)
    largest = "x" * ((1 << 20) - 2)  # its JSON text is max_payload_bytes (1 MiB) long
    async with (
        make_infra(tmp_path) as infra,
        serve(infra, "127.0.0.1:0") as srv,
        AgentInfra.connect(srv.address) as remote,
    ):
        assert await (await remote.submit_task("echo", largest)).result() == largest
        limit = server_module.max_request_bytes(infra.config.infra.max_payload_bytes)
        refusal = (
            r"RESOURCE_EXHAUSTED: the request message is \d+ bytes, "
            f"over the server's limit of {limit} bytes"
        )
        with pytest.raises(InfraError, match=refusal):
            await remote.submit_tasks("echo", [largest] * 3)
        assert await (await remote.submit_task("echo", 1)).result() == 1


# -- TLS, with a self-signed certificate made here ---------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (openssl CLI)."""
    return self_signed(tmp_path, "localhost", "IP:127.0.0.1,DNS:localhost")


def self_signed(tmp_path: Path, name: str, alt_names: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``alt_names`` (subjectAltName), and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-nodes", "-days", "1", "-subj", f"/CN={name}",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", str(key), "-out", str(cert),
            "-addext", f"subjectAltName={alt_names}",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(cert, key)
    return context


def client_tls(cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cert)
    context.set_alpn_protocols(["h2"])
    return context


async def test_tls_and_token_end_to_end(
    tmp_path: Path, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    tls = server_tls(cert, key)
    async with (
        make_infra(tmp_path) as infra,
        # Not loopback: allowed, since both TLS and a token are given.
        serve(infra, "0.0.0.0:0", token="s3cret", tls=tls) as srv,
    ):
        assert (srv.tls, srv.authenticated) == (True, True)
        address = f"127.0.0.1:{srv.address.rsplit(':', 1)[1]}"
        async with AgentInfra.connect(address, token="s3cret", tls=client_tls(cert)) as remote:
            assert await (await remote.submit_task("echo", {"over": "tls"})).result() == {
                "over": "tls"
            }
            assert remote.services.list() == ["web"]
        # TLS, but a certificate the client does not trust: not one of the system's CAs.
        with anyio.fail_after(10), pytest.raises(BackendUnavailable):
            async with AgentInfra.connect(address, token="s3cret", tls=True):
                pass
        # tls=True is the system's CAs, which OpenSSL reads where $SSL_CERT_FILE says.
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        async with AgentInfra.connect(address, token="s3cret", tls=True) as remote:
            assert (await remote.health_check()).healthy
        monkeypatch.delenv("SSL_CERT_FILE")
        with pytest.raises(ConfigError, match=r"tls must be an ssl\.SSLContext, True"):
            AgentInfra.connect(address, tls="yes")  # type: ignore[arg-type]
        # A plain-text client (tls None or False): a clear error, and its task is
        # not left cancelled (grpclib cancels it to wake it when the connection drops).
        for plain in (None, False):
            with (
                anyio.fail_after(10),
                pytest.raises(ServerUnavailable, match=r"If it serves TLS, connect with TLS$"),
            ):
                async with AgentInfra.connect(address, token="s3cret", tls=plain):
                    pass
            assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        # TLS, trusted, without the token.
        with pytest.raises(BackendUnavailable, match="refused this client"):
            async with AgentInfra.connect(address, tls=client_tls(cert)):
                pass
        # The command line: --tls-ca, and the token from the environment.
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")},
            "DSPY_INFRA_TOKEN": "s3cret",
        }
        command = [sys.executable, "-m", "dspy_infra.cli", "status", "--json"]
        with anyio.fail_after(60):
            done = await anyio.run_process(
                [*command, "--address", address, "--tls-ca", str(cert)], env=env, check=False
            )
        assert done.returncode == 0, done.stderr.decode()
        assert json.loads(done.stdout)["status"] == "healthy"
        # --tls: the system's CAs.
        with anyio.fail_after(60):
            done = await anyio.run_process(
                [*command, "--address", address, "--tls"],
                env={**env, "SSL_CERT_FILE": str(cert)},
                check=False,
            )
        assert done.returncode == 0, done.stderr.decode()
        # Neither: the command line's own advice, --tls-ca for this self-signed certificate.
        with anyio.fail_after(60):
            done = await anyio.run_process([*command, "--address", address], env=env, check=False)
        assert done.returncode == 3, done.stderr.decode()
        assert done.stderr.decode().endswith(
            "If it serves TLS, connect with TLS "
            "(--tls, or --tls-ca FILE for a self-signed certificate)\n"
        )


async def test_a_tls_mismatch_says_which_side_lacks_what(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    # Both asked whether `dspy-infra serve` ran there, though a server
    # answered: one whose certificate the client does not trust, or one
    # without TLS at all.
    cert, key = certificate
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}

    async def status_with_tls(address: str) -> str:
        command = [sys.executable, "-m", "dspy_infra.cli", "status", "--tls", "--address", address]
        with anyio.fail_after(60):
            done = await anyio.run_process(command, env=env, check=False)
        assert done.returncode == 3, done.stderr.decode()
        return done.stderr.decode()

    async with make_infra(tmp_path) as infra:
        async with serve(infra, "127.0.0.1:0", tls=server_tls(cert, key)) as srv:
            with anyio.fail_after(10), pytest.raises(ServerUnavailable) as untrusted:
                async with AgentInfra.connect(srv.address, tls=True):
                    pass
            err = await status_with_tls(srv.address)
        message = str(untrusted.value)
        assert message.startswith(
            f"the server at {srv.address} presented a certificate that this "
            "client cannot verify (self-signed certificate)"
        )
        assert "running there" not in message
        assert err == f"error: {message} (--tls-ca FILE, the CA file that signed it)\n"

        async with serve(infra, "127.0.0.1:0") as srv:
            with anyio.fail_after(10), pytest.raises(ServerUnavailable) as plain:
                async with AgentInfra.connect(srv.address, tls=True):
                    pass
            err = await status_with_tls(srv.address)
        message = str(plain.value)
        assert message == (
            f"the server at {srv.address} does not serve TLS (it answered in "
            "plain text): connect without TLS"
        )
        assert err == f"error: {message} (leave out --tls and --tls-ca)\n"


async def test_a_certificate_for_another_name_is_not_called_untrusted(tmp_path: Path) -> None:
    # Verified against the CA the client was given, it named another host:
    # telling its user to trust the CA that signed it (--tls-ca FILE), which
    # they had done, sent them after the wrong fix.
    cert, key = self_signed(tmp_path, "elsewhere.invalid", "DNS:elsewhere.invalid")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}
    async with (
        make_infra(tmp_path) as infra,
        serve(infra, "127.0.0.1:0", tls=server_tls(cert, key)) as srv,
    ):
        with anyio.fail_after(10), pytest.raises(ServerUnavailable) as refused:
            async with AgentInfra.connect(srv.address, tls=client_tls(cert)):
                pass
        command = [sys.executable, "-m", "dspy_infra.cli", "status"]
        command += ["--tls-ca", str(cert), "--address", srv.address]
        with anyio.fail_after(60):
            done = await anyio.run_process(command, env=env, check=False)
    message = str(refused.value)
    assert not refused.value.untrusted_certificate
    assert message == (
        f"the server at {srv.address} presented a certificate for another name "
        "(IP address mismatch, certificate is not valid for '127.0.0.1'.): "
        "connect to an address that it names"
    )
    assert done.returncode == 3
    assert done.stderr.decode() == f"error: {message}\n"


async def test_a_submit_by_payload_whose_template_names_an_id_is_refused(api: Api) -> None:
    # The Scheduler protocol's submit by payload (what submit_tasks calls), here
    # and over gRPC: its tasks get an id each, so a template naming one is a
    # caller's mistake, refused with nothing stored.
    scheduler = api._tasks  # the protocol behind the API, local or remote
    named = TaskRequest(handler="echo", task_id="named")
    with pytest.raises(InvalidTask, match="each task submitted by payload gets an id of its own"):
        await scheduler.submit_payloads(named, [1, 2])
    with pytest.raises(UnknownTask):
        await api.get_task_status("named")
    ids = await scheduler.submit_payloads(TaskRequest(handler="echo", payload="unused"), [1, 2])
    assert [(await scheduler.wait(task_id)).result for task_id in ids] == [1, 2]
