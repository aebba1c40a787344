"""The remote client: tasks, services and workflows of a :class:`~dspy_infra.AgentInfra` over gRPC.

::

    async with AgentInfra.connect("127.0.0.1:50052", token=...) as infra:
        handle = await infra.submit_task("embed", {"text": "hi"})
        print(await handle.result())

Same method names, arguments, return types and exceptions as in-process: the
server sends the library's exception class and attributes with each failure,
and the client raises that class again (:class:`~dspy_infra.errors.InvalidTask`,
:class:`~dspy_infra.errors.UnknownTask`, ...). A server that cannot be
reached, or that refuses the token, is
:class:`~dspy_infra.errors.BackendUnavailable` with a message that names the
address.

One connection (HTTP/2, multiplexed) serves every call; it is opened by
``async with`` and closed when the block ends.
"""

from __future__ import annotations

import asyncio
import builtins
import enum
import json
import os
import socket
import ssl
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
    Mapping,
)
from contextlib import aclosing, asynccontextmanager
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import unquote

import anyio.to_thread
import betterproto2
from attrs import evolve, frozen
from grpclib.client import Channel, Stream
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.protocol import Connection as H2Connection

from dspy_infra._names import given_names
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
from dspy_infra.events import Event, check_since
from dspy_infra.infra import HealthReport, check_event_types
from dspy_infra.remote import _convert as convert
from dspy_infra.remote._generated.env_manager import v1 as env_pb
from dspy_infra.remote._generated.orchestrator import v1 as orch_pb
from dspy_infra.remote._wire import (
    BASES_KEY,
    DETAIL_KEY,
    ERROR_KEY,
    INT32_MAX,
    RUN_KEY,
    SERVICE_KEY,
    TASK_KEY,
    TOKEN_KEY,
    WORKFLOW_KEY,
    is_loopback,
    parse_address,
    token_error,
)
from dspy_infra.scheduling.api import TaskMethods
from dspy_infra.scheduling.checks import (
    check_ids,
    check_template,
    encodable,
    encode_json,
    refused,
    request_error,
)
from dspy_infra.scheduling.store import StoreFailed
from dspy_infra.scheduling.tasks import ClassStatus, TaskEvent, TaskRequest, TaskState, TaskStatus
from dspy_infra.services.logs import LinesDropped, check_tail
from dspy_infra.services.status import ServiceStatus
from dspy_infra.workflows.model import RunHandle, RunStatus, Workflow, WorkflowEvent
from dspy_infra.workflows.spec import (
    InvalidWorkflow,
    UnknownRun,
    UnknownWorkflow,
    WorkflowError,
    WorkflowSpec,
    check_id,
    check_new_run_id,
    inputs_dict,
    run_key,
    workflow_key,
)

__all__ = [
    "RemoteAgentInfra",
    "RemoteServices",
    "RemoteWorkflows",
    "ServerUnavailable",
    "UnsupportedCall",
    "tls_context",
]

R = TypeVar("R", bound=betterproto2.Message)
_D = TypeVar("_D")

_ORCH = "/orchestrator.v1.Orchestrator/"
_ENV = "/env_manager.v1.EnvManager/"


# How long connecting waits for the server's first answer.
CONNECT_TIMEOUT = 10.0

# HTTP/2 counts what the server sends on all the streams of a connection
# against one window, given back only as the client reads. As large as HTTP/2
# allows, beside a stream's own window of 4 MiB: a followed stream left unread
# stops the server sending on it alone, not on every call of the connection.
_CHANNEL_CONFIG = Configuration(http2_connection_window_size=2**31 - 1)

# OpenSSL's verification codes (X509_V_ERR_*) for a certificate whose signer
# the client does not trust: unable to get the issuer (2, 20), self-signed (18,
# 19), unable to verify the leaf's signature (21).
_UNTRUSTED_ISSUER = frozenset({2, 18, 19, 20, 21})
# ... and for one that names another host (62), e-mail (63) or IP address (64).
_NAME_MISMATCH = frozenset({62, 63, 64})


class ServerUnavailable(BackendUnavailable):
    """No dspy-infra server answers at the address, it went away, or it refused the token.

    A :class:`~dspy_infra.errors.BackendUnavailable`, told apart from one
    that the server raised itself (its Docker engine is down, say): the
    command line exits 3 for this one. ``token_refused`` tells the last case,
    so that a caller can say how its user gives a token; ``plain_text``
    tells that no server ever answered a client that connected without TLS
    (a server that serves TLS drops such a client at once), so that a caller
    can say how its user connects with TLS; ``untrusted_certificate`` that
    the server's certificate is signed by no CA the client trusts (not one
    for another name, or expired), and ``no_tls`` that the server answered a
    TLS client in plain text, so that a caller can say which CA to trust, or
    to connect without TLS. The message is the same for all callers.
    """

    def __init__(
        self,
        message: str,
        *,
        token_refused: bool = False,
        plain_text: bool = False,
        untrusted_certificate: bool = False,
        no_tls: bool = False,
    ):
        super().__init__(message)
        self.token_refused = token_refused
        self.plain_text = plain_text
        self.untrusted_certificate = untrusted_certificate
        self.no_tls = no_tls


class UnsupportedCall(InfraError, NotImplementedError):
    """The server does not serve this call: it is older than this client (a
    method added since), or it refused a feature of the request (a
    compressed message). The rest of its API still works."""


class _Lifecycle(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


@frozen
class _Failure:
    """What the server sent of an error: its message, the trailers' ids
    (task, service, workflow, run) and its detail (``DETAIL_KEY``).

    The detail comes from a server that may be older, or buggy: a value
    missing or of the wrong type is read as the attribute's default, so
    that it can never change which exception is raised.
    """

    message: str
    ids: dict[str, str]
    detail: Mapping[str, object]

    def text(self, key: str, default: _D) -> str | _D:
        value = self.detail.get(key)
        return value if isinstance(value, str) else default

    def texts(self, key: str) -> tuple[str, ...]:
        value = self.detail.get(key)
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        return ()

    def number(self, key: str) -> int | None:
        value = self.detail.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None


def _detail(value: object) -> Mapping[str, object]:
    if not isinstance(value, str):
        return {}
    try:
        detail = json.loads(value)
    except (ValueError, RecursionError):
        return {}
    return detail if isinstance(detail, dict) else {}


# How to raise again, from its message, an error that the server names.
# The message replaces what the constructor builds, so it is the server's
# word for word; attributes that the detail does not carry are left at their
# defaults.
_Rebuild = Callable[[_Failure], InfraError]


def _task_failed(error_type: type[TaskFailed], state: TaskState) -> _Rebuild:
    # Each of these is raised for one state only (TaskStatus.outcome), and its
    # message is "task '<id>' <state>: <error>".
    def rebuild(failure: _Failure) -> InfraError:
        task_id = failure.ids[TASK_KEY]
        error = failure.message.removeprefix(f"task {task_id!r} {state.value}: ")
        return error_type(task_id, state.value, error)

    return rebuild


def _start_failure(failure: _Failure, *, dependency: bool = False) -> ServiceStartError:
    service = failure.ids[SERVICE_KEY]
    exit_code = failure.number("exit_code")
    log_tail = failure.texts("log_tail")
    error = (
        DependencyFailed(
            service, failure.text("dependency", ""), "", exit_code=exit_code, log_tail=log_tail
        )
        if dependency
        else ServiceStartError(service, "", exit_code=exit_code, log_tail=log_tail)
    )
    # As sent: DependencyFailed's constructor would name the dependency in it again.
    error.reason = failure.text("reason", failure.message)
    return error


_ERRORS: dict[str, _Rebuild] = {
    "InvalidTask": lambda f: InvalidTask(f.ids[TASK_KEY], f.message),
    "UnknownTask": lambda f: UnknownTask(f.ids[TASK_KEY]),
    "TaskCancelled": lambda f: TaskCancelled(f.ids[TASK_KEY]),
    "TaskFailed": _task_failed(TaskFailed, TaskState.FAILED),
    "TaskTimedOut": _task_failed(TaskTimedOut, TaskState.TIMED_OUT),
    "TaskLost": _task_failed(TaskLost, TaskState.LOST),
    "TaskError": lambda f: TaskError(f.ids[TASK_KEY], f.message),
    "UnknownService": lambda f: UnknownService(f.ids[SERVICE_KEY], f.texts("known")),
    "DependencyFailed": lambda f: _start_failure(f, dependency=True),
    "ServiceStartError": _start_failure,
    "ServiceError": lambda f: ServiceError(f.ids[SERVICE_KEY], f.message),
    "ConfigError": lambda f: ConfigError(
        f.message, source=f.text("source", None), path=f.text("path", None)
    ),
    "BackendUnavailable": lambda f: BackendUnavailable(f.message),
    "InfraClosed": lambda f: InfraClosed(f.message),
    "StateDirInUse": lambda f: StateDirInUse(f.message),
    "StoreFailed": lambda f: StoreFailed(f.message),
    "InvalidWorkflow": lambda f: InvalidWorkflow(f.message),
    "UnknownWorkflow": lambda f: UnknownWorkflow(f.ids[WORKFLOW_KEY]),
    "UnknownRun": lambda f: UnknownRun(f.ids[RUN_KEY]),
    "UnknownEventType": lambda f: UnknownEventType(f.texts("unknown"), f.texts("known")),
    "WorkflowError": lambda f: WorkflowError(f.message),
    "InfraError": lambda f: InfraError(f.message),
}
_ID_KEYS = (TASK_KEY, SERVICE_KEY, WORKFLOW_KEY, RUN_KEY)


def _known_class(trailers: Mapping[str, Any]) -> str | None:
    """The error's class, or else its nearest base, that this client can raise again."""
    names = [trailers.get(ERROR_KEY), *str(trailers.get(BASES_KEY, "")).split()]
    return next((n for n in names if isinstance(n, str) and n in _ERRORS), None)


class _Connection:
    """One channel to one server, and the translation of its failures."""

    def __init__(self, address: str, channel: Channel, token: str | None, *, tls: bool):
        self.address = address
        self._channel = channel
        self._tls = tls
        self._metadata = {TOKEN_KEY: f"Bearer {token}"} if token is not None else None
        # Whether the server has answered a call in plain text: one that then
        # drops a call went away (killed, say), and is no TLS server.
        self._answered = False
        self._closed = False

    def close(self) -> None:
        self._closed = True
        self._channel.close()

    async def unary(self, route: str, request: betterproto2.Message, reply_type: type[R]) -> R:
        async with self._call(route, Cardinality.UNARY_UNARY, request, reply_type) as stream:
            reply = await stream.recv_message()
        if reply is None:  # a server that ended the call without its answer
            raise InfraError(f"the server at {self.address} sent no answer to {route}")
        return reply

    async def stream(
        self, route: str, request: betterproto2.Message, reply_type: type[R]
    ) -> AsyncGenerator[R, None]:
        async with self._call(route, Cardinality.UNARY_STREAM, request, reply_type) as stream:
            async for reply in stream:
                yield reply

    @asynccontextmanager
    async def _call(
        self,
        route: str,
        cardinality: Cardinality,
        request: betterproto2.Message,
        reply_type: type[R],
    ) -> AsyncIterator[Stream[Any, R]]:
        opened: Stream[Any, R] | None = None
        task = asyncio.current_task()
        cancelling = task.cancelling() if task is not None else 0
        try:
            async with self._channel.request(
                route, cardinality, type(request), reply_type, metadata=self._metadata
            ) as stream:
                opened = stream
                try:
                    await stream.send_message(request, end=True)
                except AttributeError as exc:
                    # grpclib hands out a connection that was lost between
                    # its making and its first call (a server reset it as it
                    # died, say) and trips on the transport it let go: that
                    # is a connection lost, as it would be a moment later.
                    if not isinstance(exc.obj, H2Connection):
                        raise
                    raise ConnectionResetError("the connection was lost as it was made") from exc
                yield stream
            self._answered = True
        except (GRPCError, OSError, StreamTerminatedError) as exc:
            # grpclib wakes a call whose connection is lost, or whose stream
            # the server reset (as it does when it refuses a request before
            # reading all of it), by cancelling its task, then raises its own
            # error in place of the CancelledError (and, for a reset stream,
            # the status of the trailers in place of that), and leaves the
            # task's cancel request standing: the next cancel scope to exit
            # would raise it for nothing. That one request is withdrawn; any
            # other stands.
            if task is not None and task.cancelling() > cancelling and _woken(exc):
                task.uncancel()
            # A status can arrive with the first message or in the trailers
            # that the stream reads on its way out: both are translated here.
            if isinstance(exc, GRPCError):
                self._answered = True
                raise self._error(exc, opened, route) from None
            if self._closed:
                # Closed here, under a call still in flight (a stream followed
                # in another task): not the server's doing.
                raise InfraClosed(
                    f"this connection was closed while {route.rpartition('/')[2]} was in "
                    "flight: its `async with AgentInfra.connect(...)` block ended"
                ) from None
            if tls_failure := self._tls_failure(exc):
                raise tls_failure from exc
            # A TLS server drops a plain-text client's connection at once;
            # a refused connection, or a name that no address answers to, is
            # no server at all.
            plain_text = not (
                self._tls
                or self._answered
                or isinstance(exc, ConnectionRefusedError | socket.gaierror)
            )
            hint = " If it serves TLS, connect with TLS" if plain_text else ""
            raise ServerUnavailable(
                f"no dspy-infra server answers at {self.address} ({exc or type(exc).__name__}): "
                f"is `dspy-infra serve` running there?{hint}",
                plain_text=plain_text,
            ) from exc

    def _tls_failure(self, exc: BaseException) -> ServerUnavailable | None:
        """A TLS handshake that failed for a reason a user can fix, in its words; else None.

        A server answered in both cases: asking whether one runs there (as
        for a connection refused) would send its user looking in vain.
        """
        if isinstance(exc, ssl.SSLCertVerificationError):
            if exc.verify_code in _NAME_MISMATCH:
                # Verified against the CA it was given: trusting it is done.
                return ServerUnavailable(
                    f"the server at {self.address} presented a certificate for another "
                    f"name ({exc.verify_message}): connect to an address that it names"
                )
            # Only a signer not trusted is fixed by trusting the CA: not an
            # expired certificate, say.
            untrusted = exc.verify_code in _UNTRUSTED_ISSUER
            fix = ": connect trusting the CA that signed it" if untrusted else ""
            return ServerUnavailable(
                f"the server at {self.address} presented a certificate that this client "
                f"cannot verify ({exc.verify_message}){fix}",
                untrusted_certificate=untrusted,
            )
        # OpenSSL's word for a first answer that is no TLS record.
        if isinstance(exc, ssl.SSLError) and exc.reason == "WRONG_VERSION_NUMBER":
            return ServerUnavailable(
                f"the server at {self.address} does not serve TLS (it answered in "
                "plain text): connect without TLS",
                no_tls=True,
            )
        return None

    def _error(self, exc: GRPCError, stream: Stream[Any, Any] | None, route: str) -> Exception:
        message = exc.message or exc.status.name
        trailers = stream.trailing_metadata if stream is not None else None
        name = _known_class(trailers) if trailers is not None else None
        if trailers is not None and name is not None:
            ids = {key: unquote(str(trailers.get(key, ""))) for key in _ID_KEYS}
            error = _ERRORS[name](_Failure(message, ids, _detail(trailers.get(DETAIL_KEY))))
            error.args = (message,)
            return error
        if exc.status is Status.UNAUTHENTICATED:
            return ServerUnavailable(
                f"the dspy-infra server at {self.address} refused this client: {message}",
                token_refused=True,
            )
        if exc.status is Status.UNAVAILABLE:
            return ServerUnavailable(
                f"the dspy-infra server at {self.address} is unavailable: {message}"
            )
        # A server before it answered every method it lacks without a
        # content-type, which grpclib's client reads as this UNKNOWN.
        if exc.status is Status.UNIMPLEMENTED or (
            exc.status is Status.UNKNOWN and message == "Missing content-type header"
        ):
            return UnsupportedCall(
                f"the server at {self.address} does not serve {route}: {message} "
                "(a dspy-infra older than this client?)"
            )
        if exc.status is Status.INVALID_ARGUMENT:
            return InvalidTask("", message)
        return InfraError(f"the server at {self.address} answered {exc.status.name}: {message}")


def _woken(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while a CancelledError was handled: grpclib's wake-up call."""
    context = exc.__context__
    while context is not None:
        if isinstance(context, asyncio.CancelledError):
            return True
        context = context.__context__
    return False


class _RemoteScheduler:
    """The :class:`~dspy_infra.abc.Scheduler` protocol over gRPC: what task handles call."""

    def __init__(self, connection: _Connection):
        self._rpc = connection

    async def submit(self, request: TaskRequest) -> str:
        check_ids([request])
        _check(request)
        reply = await self._rpc.unary(
            _ORCH + "SubmitTask",
            orch_pb.SubmitTaskRequest(
                handler=request.handler,
                payload_json=_payload_json(request.payload, request.task_id),
                task_class=request.task_class,
                priority=request.priority,
                needs=list(request.needs),
                task_id=request.task_id,
                workflow_id=request.workflow_id,
                max_attempts=_attempts(request.max_attempts),
                timeout=request.timeout,
                resources=convert.resources_to_proto(request.resources),
            ),
            orch_pb.SubmitTaskResponse,
        )
        return reply.task_id

    async def submit_many(self, requests: Iterable[TaskRequest]) -> list[str]:
        # The API submits many tasks of one shape: what varies is the payload.
        requests = list(requests)
        if not requests:
            return []
        check_ids(requests)
        first = requests[0]
        _check(first)
        reply = await self._rpc.unary(
            _ORCH + "SubmitTasks",
            orch_pb.SubmitTasksRequest(
                handler=first.handler,
                payloads_json=[_payload_json(r.payload, None) for r in requests],
                task_class=first.task_class,
                priority=first.priority,
                needs=list(first.needs),
                workflow_id=first.workflow_id,
                max_attempts=_attempts(first.max_attempts),
                timeout=first.timeout,
                resources=convert.resources_to_proto(first.resources),
            ),
            orch_pb.SubmitTasksResponse,
        )
        return list(reply.task_ids)

    async def submit_payloads(self, template: TaskRequest, payloads: Iterable[Any]) -> list[str]:
        check_template(template)
        return await self.submit_many(evolve(template, payload=payload) for payload in payloads)

    async def status(self, task_id: str) -> TaskStatus:
        return await self._status(task_id, wait=False)

    async def wait(self, task_id: str) -> TaskStatus:
        return await self._status(task_id, wait=True)

    async def _status(self, task_id: str, *, wait: bool) -> TaskStatus:
        reply = await self._rpc.unary(
            _ORCH + "GetTaskStatus",
            orch_pb.GetTaskStatusRequest(task_id=task_id, wait=wait),
            orch_pb.GetTaskStatusResponse,
        )
        return convert.task_status_from_proto(_present(reply.status, "status"))

    async def classes(self) -> dict[str, ClassStatus]:
        reply = await self._rpc.unary(
            _ORCH + "ListTaskClasses",
            orch_pb.ListTaskClassesRequest(),
            orch_pb.ListTaskClassesResponse,
        )
        return {c.name: convert.class_status_from_proto(c) for c in reply.classes}

    async def cancel(self, task_id: str) -> TaskStatus:
        reply = await self._rpc.unary(
            _ORCH + "CancelTask",
            orch_pb.CancelTaskRequest(task_id=task_id),
            orch_pb.CancelTaskResponse,
        )
        return convert.task_status_from_proto(_present(reply.status, "status"))

    async def results(
        self, task_ids: Collection[str] | None = None, *, since: int | None = None
    ) -> AsyncGenerator[TaskEvent, None]:
        if task_ids is not None and not task_ids:
            return  # in-process, no task to follow ends the stream at once
        request = orch_pb.StreamTaskResultsRequest(
            task_ids=list(task_ids or ()), all_tasks=task_ids is None, since=_int64(since)
        )
        replies = self._rpc.stream(_ORCH + "StreamTaskResults", request, orch_pb.TaskEvent)
        async with aclosing(replies):
            async for reply in replies:
                yield convert.task_event_from_proto(reply)


# What the wire holds in 32 and 64 bits: beyond, betterproto2 would cut a
# number silently (2**32 + 50 arrives as 50, 2**64 + 5 as 5). In-process, an
# amount of any size is checked against the machine.
_INT32 = (-(2**31), INT32_MAX)
_INT64 = (-(2**63), 2**63 - 1)


def _check(request: TaskRequest) -> None:
    """Refuse, before it is encoded, what in-process code would refuse whatever its
    configuration, in the same words: the wire cannot carry a wrong type (True
    arrives as 1, None as 0), and encoding one fails with a bare TypeError. Then
    what the wire cannot hold."""
    if problem := request_error(request):
        raise refused(request.task_id, problem)
    resources = request.resources
    for name, value, (low, high) in (
        ("priority", request.priority, _INT32),
        ("resources.memory_mb", resources.memory_mb if resources else None, _INT64),
        ("resources.gpus", resources.gpus if resources else None, _INT32),
    ):
        if value is not None and not low <= value <= high:
            raise refused(request.task_id, f"{name} is out of range, got {value!r}")


def _attempts(max_attempts: int | None) -> int | None:
    # More than the wire holds is as many as ever: the most it holds.
    if isinstance(max_attempts, int) and max_attempts > _INT32[1]:
        return _INT32[1]
    return max_attempts


def _int64(since: int | None) -> int | None:
    # A seq past any the server gave (all that come are new) or before the
    # first (all it holds) means the same as the most or least int64 holds.
    low, high = _INT64
    return None if since is None else min(max(since, low), high)


def _payload_json(payload: Any, task_id: str | None) -> str:
    if payload is None:
        return ""  # None on the wire, as convert.dump_json writes it
    try:
        return encode_json(payload, "the payload")
    except ValueError as exc:
        # Refused before it is sent, as the in-process scheduler refuses it.
        raise refused(task_id, str(exc)) from None


def _present(value: R | None, name: str) -> R:
    if value is None:
        raise InfraError(f"the server's answer has no {name}")
    return value


class RemoteServices:
    """``infra.services`` of a remote instance: the methods of :class:`~dspy_infra.ServiceManager`.

    :meth:`list` is synchronous, as in-process: the configured names are
    fixed for the server's lifetime, so they are fetched once, on connect.
    """

    def __init__(self, connection: _Connection, names: builtins.list[str]):
        self._rpc = connection
        self._names = names

    def list(self) -> builtins.list[str]:
        """The configured service names, dependencies before dependents."""
        return builtins.list(self._names)

    async def start(self, names: Iterable[str] | None = None) -> dict[str, ServiceStatus]:
        """Start ``names`` (default: every ``autostart`` service) and their dependencies."""
        wanted = self._wanted(names)
        if wanted is None:
            return {}
        reply = await self._rpc.unary(
            _ENV + "StartServices",
            env_pb.StartServicesRequest(names=wanted),
            env_pb.StartServicesResponse,
        )
        return convert.statuses_by_name(reply.services)

    async def stop(self, names: Iterable[str] | None = None) -> None:
        """Stop ``names`` (default: all), dependents before their dependencies."""
        wanted = self._wanted(names)
        if wanted is None:
            return
        await self._rpc.unary(
            _ENV + "StopServices",
            env_pb.StopServicesRequest(names=wanted),
            env_pb.StopServicesResponse,
        )

    async def status(self, names: Iterable[str] | None = None) -> dict[str, ServiceStatus]:
        """A snapshot of each service (default: all)."""
        wanted = self._wanted(names)
        if wanted is None:
            return {}
        reply = await self._rpc.unary(
            _ENV + "GetServiceStatus",
            env_pb.GetServiceStatusRequest(names=wanted),
            env_pb.GetServiceStatusResponse,
        )
        return convert.statuses_by_name(reply.services)

    async def logs(
        self, name: str, *, follow: bool = False, tail: int | None = None
    ) -> AsyncGenerator[str, None]:
        """The service's buffered log lines; with ``follow``, new ones until it stops."""
        self._check_known(name)  # first, as in-process
        check_tail(tail)
        replies = self._rpc.stream(
            _ENV + "StreamLogs",
            # More than the wire's 32 bits hold is "all of them", as in-process.
            env_pb.StreamLogsRequest(
                name=name, follow=follow, tail=None if tail is None else min(tail, _INT32[1])
            ),
            env_pb.LogLine,
        )
        async with aclosing(replies):
            async for reply in replies:
                yield LinesDropped(reply.dropped) if reply.dropped > 0 else reply.line

    def _wanted(self, names: Iterable[str] | None) -> builtins.list[str] | None:
        wanted = _request_names(names)
        for name in wanted or ():
            self._check_known(name)
        return wanted

    def _check_known(self, name: str) -> None:
        """Refuse a name that is not configured, as the server would: the names are
        fixed for its life. One of the wrong type (a number), or that UTF-8 cannot
        encode, could not even travel (the encoder's AttributeError or UnicodeEncodeError)."""
        if name not in self._names:
            raise UnknownService(name, self._names)


def _request_names(names: Iterable[str] | None) -> list[str] | None:
    """``names`` as a request carries them, or None when there is nothing to ask for.

    On the wire an empty list means every service: ``names=None`` is sent as
    ``[]``, and an empty ``names`` is answered here, as in-process, without a call.
    A string is one name, as in-process, not the characters it holds.
    """
    if names is None:
        return []
    wanted = list(given_names(names))
    return wanted or None


class RemoteWorkflows:
    """``infra.workflows`` of a remote instance: the run API of :class:`~dspy_infra.WorkflowEngine`.

    A spec given as a path is read here, by the client, as a mapping is
    checked here: the server is sent the spec, never a path to open.
    """

    def __init__(self, connection: _Connection):
        self._rpc = connection

    async def create(
        self, spec: WorkflowSpec | Mapping[str, Any] | str | os.PathLike[str]
    ) -> Workflow:
        """Validate and store a workflow on the server; see :meth:`WorkflowEngine.create`."""
        if isinstance(spec, str | os.PathLike):
            spec = await anyio.to_thread.run_sync(WorkflowSpec.from_file, spec)
        elif not isinstance(spec, WorkflowSpec):
            spec = WorkflowSpec.from_mapping(spec)
        reply = await self._rpc.unary(
            _ORCH + "CreateWorkflow",
            orch_pb.CreateWorkflowRequest(spec_json=convert.dump_json(spec.to_mapping())),
            orch_pb.CreateWorkflowResponse,
        )
        stored = orch_pb.Workflow(
            workflow_id=reply.workflow_id, spec_json=reply.spec_json, created_at=reply.created_at
        )
        return convert.workflow_from_proto(stored)

    async def get(self, workflow_id: str) -> Workflow:
        """A stored workflow; :class:`~dspy_infra.workflows.UnknownWorkflow` if there is none."""
        reply = await self._rpc.unary(
            _ORCH + "GetWorkflow",
            orch_pb.GetWorkflowRequest(workflow_id=workflow_key(workflow_id)),
            orch_pb.GetWorkflowResponse,
        )
        return convert.workflow_from_proto(_present(reply.workflow, "workflow"))

    async def list(self) -> builtins.list[Workflow]:
        """Every stored workflow, oldest first."""
        reply = await self._rpc.unary(
            _ORCH + "ListWorkflows", orch_pb.ListWorkflowsRequest(), orch_pb.ListWorkflowsResponse
        )
        return [convert.workflow_from_proto(w) for w in reply.workflows]

    async def start_run(
        self,
        workflow_id: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
    ) -> RunHandle:
        """Start a run; returns once it is stored. See :meth:`WorkflowEngine.start_run`."""
        check_id(workflow_id, "workflow_id")
        if run_id is not None:
            check_new_run_id(run_id)
        workflow_key(workflow_id)
        inputs = inputs_dict(workflow_id, inputs)  # outside: InvalidWorkflow is a ValueError
        try:
            inputs_json = encode_json(inputs, "the inputs", verb="are")
        except ValueError as exc:
            raise InvalidWorkflow(f"run of {workflow_id!r} refused: {exc}") from None
        reply = await self._rpc.unary(
            _ORCH + "StartWorkflowRun",
            orch_pb.StartWorkflowRunRequest(
                workflow_id=workflow_id, inputs_json=inputs_json, run_id=run_id
            ),
            orch_pb.StartWorkflowRunResponse,
        )
        return RunHandle(reply.run_id, engine=self)

    async def get_run(self, run_id: str) -> RunStatus:
        """The run's status now; :class:`~dspy_infra.UnknownRun` if there is none."""
        return await self._run(run_id, wait=False)

    async def wait_run(self, run_id: str) -> RunStatus:
        """Wait until the run has finished; its final status."""
        return await self._run(run_id, wait=True)

    async def _run(self, run_id: str, *, wait: bool) -> RunStatus:
        reply = await self._rpc.unary(
            _ORCH + "GetWorkflowRun",
            orch_pb.GetWorkflowRunRequest(run_id=run_key(run_id), wait=wait),
            orch_pb.GetWorkflowRunResponse,
        )
        return convert.run_status_from_proto(_present(reply.run, "run"))

    async def cancel_run(self, run_id: str) -> RunStatus:
        """Cancel a run; returns once it has stopped, with its status."""
        reply = await self._rpc.unary(
            _ORCH + "CancelWorkflowRun",
            orch_pb.CancelWorkflowRunRequest(run_id=run_key(run_id)),
            orch_pb.CancelWorkflowRunResponse,
        )
        return convert.run_status_from_proto(_present(reply.run, "run"))

    async def stream_status(
        self, run_id: str, *, since: int | None = None
    ) -> AsyncGenerator[WorkflowEvent, None]:
        """The run's events, from its start (or after ``since``), until it finishes."""
        check_since(since)
        request = orch_pb.StreamWorkflowStatusRequest(run_id=run_key(run_id), since=_int64(since))
        replies = self._rpc.stream(
            _ORCH + "StreamWorkflowStatus", request, orch_pb.WorkflowRunStatus
        )
        async with aclosing(replies):
            async for reply in replies:
                yield convert.workflow_event_from_proto(reply)


def tls_context(cafile: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A client TLS context for a dspy-infra server: the system's CAs, or ``cafile``'s.

    It offers HTTP/2 (ALPN ``h2``), which gRPC runs on.
    """
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["h2"])
    return context


def _client_tls(tls: object) -> ssl.SSLContext | None:
    if isinstance(tls, ssl.SSLContext):
        return tls
    if tls is None or tls is False:
        return None
    if tls is True:
        return tls_context()
    raise ConfigError(
        "tls must be an ssl.SSLContext, True (TLS trusting the system's CAs), "
        f"or None or False (plain text), got {tls!r}"
    )


class RemoteAgentInfra(TaskMethods):
    """An :class:`~dspy_infra.AgentInfra` served elsewhere, used through ``async with``.

    Made by :meth:`AgentInfra.connect`. Entered once: the connection is
    opened (and the server asked for its service names, which also checks
    that it answers and accepts the token) on entry, closed on exit.
    """

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls: ssl.SSLContext | bool | None = None,
    ):
        self.address = address
        self._token = token
        self._tls = _client_tls(tls)
        self._lifecycle = _Lifecycle.UNOPENED
        self._connection: _Connection | None = None
        self._scheduler: _RemoteScheduler | None = None
        self._services: RemoteServices | None = None
        self._workflows: RemoteWorkflows | None = None

    async def __aenter__(self) -> Self:
        if self._lifecycle is not _Lifecycle.UNOPENED:
            raise InfraClosed(
                f"this connection is {self._lifecycle.value}: it is entered once; "
                "make a new one with AgentInfra.connect()"
            )
        self._lifecycle = _Lifecycle.CLOSED  # until it is open
        host, port = parse_address(self.address)
        if problem := token_error(self._token):
            raise ConfigError(problem)
        if self._token is not None and self._tls is None and not await is_loopback(host):
            raise ConfigError(
                f"refusing to send the token to {self.address} without TLS: connect with "
                "TLS (tls=... in Python; --tls or --tls-ca FILE on the command line)"
            )
        connection = _Connection(
            self.address,
            Channel(host, port, ssl=self._tls, config=_CHANNEL_CONFIG),
            self._token,
            tls=self._tls is not None,
        )
        try:
            # A peer that takes the connection but never answers (not a
            # dspy-infra server, or one hung) must not hang the caller.
            with anyio.fail_after(CONNECT_TIMEOUT):
                names = await connection.unary(
                    _ENV + "ListServices", env_pb.ListServicesRequest(), env_pb.ListServicesResponse
                )
        except TimeoutError:
            connection.close()
            raise ServerUnavailable(
                f"no answer from {self.address} within {CONNECT_TIMEOUT:g} s: is it a "
                "dspy-infra server (dspy-infra serve)?"
            ) from None
        except UnsupportedCall as exc:
            # Every dspy-infra server serves ListServices: one that lacks it
            # is another gRPC server (a wrong port), not an older dspy-infra.
            connection.close()
            raise ServerUnavailable(
                f"no dspy-infra server answers at {self.address} (the server there does not "
                "serve env_manager.v1.EnvManager/ListServices, which every dspy-infra "
                "server does): is `dspy-infra serve` running there?"
            ) from exc
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        self._scheduler = _RemoteScheduler(connection)
        self._services = RemoteServices(connection, list(names.names))
        self._workflows = RemoteWorkflows(connection)
        self._lifecycle = _Lifecycle.OPEN
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lifecycle = _Lifecycle.CLOSED
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    # -- the API, as AgentInfra's ---------------------------------------------

    @property
    def services(self) -> RemoteServices:
        """Start, stop, inspect and follow the server's services."""
        self._check_open()
        assert self._services is not None
        return self._services

    @property
    def workflows(self) -> RemoteWorkflows:
        """Create workflows, start, follow and cancel their runs, on the server."""
        self._check_open()
        assert self._workflows is not None
        return self._workflows

    async def health_check(self) -> HealthReport:
        """Overall health, and each service's status."""
        reply = await self._rpc.unary(
            _ORCH + "Health", orch_pb.HealthRequest(), orch_pb.HealthResponse
        )
        return HealthReport(status=reply.status, services=convert.statuses_by_name(reply.services))

    async def stream_events(
        self,
        types: str | Collection[str] | None = None,
        *,
        since: int | None = None,
        follow: bool = True,
    ) -> AsyncGenerator[Event, None]:
        """Events of ``types`` (one, or several; all when None) as they happen, until the
        server closes; with ``follow=False``, those it still holds after ``since``, then
        the end.

        The server judges the types, so that a client talks to a newer server
        that publishes more of them; one it does not know is refused with
        :class:`UnknownEventType` on the first read. What could not travel
        (no string, or one that UTF-8 cannot encode) is no type any server
        publishes: it is refused here, as in-process.
        """
        wanted = () if types is None else given_names(types)
        if not all(isinstance(name, str) and encodable(name) for name in wanted):
            check_event_types(wanted)
        check_since(since)
        request = orch_pb.StreamEventsRequest(
            types=list(wanted), since=_int64(since), follow=follow
        )
        replies = self._rpc.stream(_ORCH + "StreamEvents", request, orch_pb.Event)
        async with aclosing(replies):
            async for reply in replies:
                yield convert.event_from_proto(reply)

    async def get_metrics(self) -> dict[str, float]:
        """Every metric sample of the server's instance by name and labels."""
        reply = await self._rpc.unary(
            _ORCH + "GetMetrics", orch_pb.GetMetricsRequest(), orch_pb.GetMetricsResponse
        )
        return dict(reply.values)

    @property
    def _rpc(self) -> _Connection:
        self._check_open()
        assert self._connection is not None
        return self._connection

    @property
    def _tasks(self) -> _RemoteScheduler:
        self._check_open()
        assert self._scheduler is not None
        return self._scheduler

    def _check_open(self) -> None:
        if self._lifecycle is not _Lifecycle.OPEN:
            raise InfraClosed(
                f"this connection is {self._lifecycle.value}: "
                "use it inside `async with AgentInfra.connect(...)`"
            )
