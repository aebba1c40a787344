"""The remote client: the task and service API of :class:`~dspy_infra.AgentInfra`, over gRPC.

::

    async with AgentInfra.connect("127.0.0.1:50052", token=...) as infra:
        handle = await infra.submit_task("embed", {"text": "hi"})
        print(await handle.result())

Same method names, arguments, return types and exceptions as in-process: the
server sends the library's exception class with each failure, and the client
raises that class again (:class:`~dspy_infra.errors.InvalidTask`,
:class:`~dspy_infra.errors.UnknownTask`, ...). A server that cannot be
reached, or that refuses the token, is
:class:`~dspy_infra.errors.BackendUnavailable` with a message that names the
address.

One connection (HTTP/2, multiplexed) serves every call; it is opened by
``async with`` and closed when the block ends.
"""

from __future__ import annotations

import builtins
import enum
import ssl as ssl_module
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Iterable
from contextlib import aclosing, asynccontextmanager
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import unquote

import betterproto2
from grpclib.client import Channel, Stream
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from dspy_infra.errors import (
    BackendUnavailable,
    ConfigError,
    DependencyFailed,
    InfraClosed,
    InfraError,
    InvalidTask,
    ServiceError,
    ServiceStartError,
    TaskCancelled,
    TaskError,
    UnknownService,
    UnknownTask,
)
from dspy_infra.events import Event
from dspy_infra.infra import HealthReport
from dspy_infra.remote import _convert as convert
from dspy_infra.remote._generated.env_manager import v1 as env_pb
from dspy_infra.remote._generated.orchestrator import v1 as orch_pb
from dspy_infra.remote._wire import (
    ERROR_KEY,
    SERVICE_KEY,
    TASK_KEY,
    TOKEN_KEY,
    is_loopback,
    parse_address,
)
from dspy_infra.scheduling.tasks import Resources, TaskEvent, TaskHandle, TaskRequest, TaskStatus
from dspy_infra.services.status import ServiceStatus

__all__ = ["RemoteAgentInfra", "RemoteServices", "ServerUnavailable"]

R = TypeVar("R", bound=betterproto2.Message)

_ORCH = "/orchestrator.v1.Orchestrator/"
_ENV = "/env_manager.v1.EnvManager/"


class ServerUnavailable(BackendUnavailable):
    """No dspy-infra server answers at the address, it went away, or it refused the token.

    A :class:`~dspy_infra.errors.BackendUnavailable`, told apart from one
    that the server raised itself (its Docker engine is down, say): the
    command line exits 3 for this one.
    """


class _Lifecycle(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


# How to raise again, from its message, an error that the server names.
# The message replaces what the constructor builds, so it is the server's
# word for word; attributes the wire does not carry are left at their defaults.
_Rebuild = Callable[[str, str, str], InfraError]
_ERRORS: dict[str, _Rebuild] = {
    "InvalidTask": lambda message, task_id, _: InvalidTask(task_id, message),
    "UnknownTask": lambda _, task_id, __: UnknownTask(task_id),
    "TaskCancelled": lambda _, task_id, __: TaskCancelled(task_id),
    "TaskError": lambda message, task_id, _: TaskError(task_id, message),
    "UnknownService": lambda _, __, service: UnknownService(service, ()),
    "DependencyFailed": lambda message, _, service: DependencyFailed(service, "", message),
    "ServiceStartError": lambda message, _, service: ServiceStartError(service, message),
    "ServiceError": lambda message, _, service: ServiceError(service, message),
    "ConfigError": lambda message, _, __: ConfigError(message),
    "BackendUnavailable": lambda message, _, __: BackendUnavailable(message),
    "InfraClosed": lambda message, _, __: InfraClosed(message),
}


class _Connection:
    """One channel to one server, and the translation of its failures."""

    def __init__(self, address: str, channel: Channel, token: str | None):
        self.address = address
        self._channel = channel
        self._metadata = {TOKEN_KEY: f"Bearer {token}"} if token is not None else None

    def close(self) -> None:
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
        try:
            async with self._channel.request(
                route, cardinality, type(request), reply_type, metadata=self._metadata
            ) as stream:
                opened = stream
                await stream.send_message(request, end=True)
                yield stream
        # A status can arrive with the first message or in the trailers that
        # the stream reads on its way out: both are translated here.
        except GRPCError as exc:
            raise self._error(exc, opened) from None
        except (OSError, StreamTerminatedError) as exc:
            raise ServerUnavailable(
                f"no dspy-infra server answers at {self.address} ({exc or type(exc).__name__}): "
                "is `dspy-infra serve` running there?"
            ) from exc

    def _error(self, exc: GRPCError, stream: Stream[Any, Any] | None) -> Exception:
        message = exc.message or exc.status.name
        trailers = stream.trailing_metadata if stream is not None else None
        name = trailers.get(ERROR_KEY) if trailers is not None else None
        if trailers is not None and isinstance(name, str) and name in _ERRORS:
            task_id = unquote(str(trailers.get(TASK_KEY, "")))
            service = unquote(str(trailers.get(SERVICE_KEY, "")))
            error = _ERRORS[name](message, task_id, service)
            error.args = (message,)
            return error
        if exc.status is Status.UNAUTHENTICATED:
            return ServerUnavailable(
                f"the dspy-infra server at {self.address} refused this client: {message} "
                "(pass the server's token: AgentInfra.connect(address, token=...))"
            )
        if exc.status is Status.UNAVAILABLE:
            return ServerUnavailable(
                f"the dspy-infra server at {self.address} is unavailable: {message}"
            )
        if exc.status is Status.UNIMPLEMENTED:
            return NotImplementedError(f"the server at {self.address}: {message}")
        if exc.status is Status.INVALID_ARGUMENT:
            return InvalidTask("", message)
        return InfraError(f"the server at {self.address} answered {exc.status.name}: {message}")


class _RemoteScheduler:
    """The :class:`~dspy_infra.abc.Scheduler` protocol over gRPC: what task handles call."""

    def __init__(self, connection: _Connection):
        self._rpc = connection

    async def submit(self, request: TaskRequest) -> str:
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
                max_attempts=request.max_attempts,
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
        first = requests[0]
        reply = await self._rpc.unary(
            _ORCH + "SubmitTasks",
            orch_pb.SubmitTasksRequest(
                handler=first.handler,
                payloads_json=[_payload_json(r.payload, None) for r in requests],
                task_class=first.task_class,
                priority=first.priority,
                needs=list(first.needs),
                workflow_id=first.workflow_id,
                max_attempts=first.max_attempts,
                timeout=first.timeout,
                resources=convert.resources_to_proto(first.resources),
            ),
            orch_pb.SubmitTasksResponse,
        )
        return list(reply.task_ids)

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
            task_ids=list(task_ids or ()), all_tasks=task_ids is None, since=since
        )
        replies = self._rpc.stream(_ORCH + "StreamTaskResults", request, orch_pb.TaskEvent)
        async with aclosing(replies):
            async for reply in replies:
                yield convert.task_event_from_proto(reply)


def _payload_json(payload: Any, task_id: str | None) -> str:
    try:
        return convert.dump_json(payload)
    except (TypeError, ValueError) as exc:
        # Refused before it is sent, as the in-process scheduler refuses it.
        raise InvalidTask(
            task_id or "", f"task refused: the payload is not JSON-compatible ({exc})"
        ) from None


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
        wanted = None if names is None else builtins.list(names)
        if wanted == []:
            return {}
        reply = await self._rpc.unary(
            _ENV + "StartServices",
            env_pb.StartServicesRequest(names=wanted or []),
            env_pb.StartServicesResponse,
        )
        return convert.statuses_by_name(reply.services)

    async def stop(self, names: Iterable[str] | None = None) -> None:
        """Stop ``names`` (default: all), dependents before their dependencies."""
        wanted = None if names is None else builtins.list(names)
        if wanted == []:
            return
        await self._rpc.unary(
            _ENV + "StopServices",
            env_pb.StopServicesRequest(names=wanted or []),
            env_pb.StopServicesResponse,
        )

    async def status(self, names: Iterable[str] | None = None) -> dict[str, ServiceStatus]:
        """A snapshot of each service (default: all)."""
        wanted = None if names is None else builtins.list(names)
        if wanted == []:
            return {}
        reply = await self._rpc.unary(
            _ENV + "GetServiceStatus",
            env_pb.GetServiceStatusRequest(names=wanted or []),
            env_pb.GetServiceStatusResponse,
        )
        return convert.statuses_by_name(reply.services)

    async def logs(
        self, name: str, *, follow: bool = False, tail: int | None = None
    ) -> AsyncGenerator[str, None]:
        """The service's buffered log lines; with ``follow``, new ones until it stops."""
        replies = self._rpc.stream(
            _ENV + "StreamLogs",
            env_pb.StreamLogsRequest(name=name, follow=follow, tail=tail),
            env_pb.LogLine,
        )
        async with aclosing(replies):
            async for reply in replies:
                yield reply.line


class RemoteAgentInfra:
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
        ssl: ssl_module.SSLContext | None = None,
    ):
        self.address = address
        self._token = token
        self._ssl = ssl
        self._lifecycle = _Lifecycle.UNOPENED
        self._connection: _Connection | None = None
        self._scheduler: _RemoteScheduler | None = None
        self._services: RemoteServices | None = None

    async def __aenter__(self) -> Self:
        if self._lifecycle is not _Lifecycle.UNOPENED:
            raise InfraClosed(
                f"this connection is {self._lifecycle.value}: it is entered once; "
                "make a new one with AgentInfra.connect()"
            )
        self._lifecycle = _Lifecycle.CLOSED  # until it is open
        host, port = parse_address(self.address)
        if self._token is not None and self._ssl is None and not await is_loopback(host):
            raise ConfigError(
                f"refusing to send the token to {self.address} without TLS: pass ssl=..."
            )
        connection = _Connection(self.address, Channel(host, port, ssl=self._ssl), self._token)
        try:
            names = await connection.unary(
                _ENV + "ListServices", env_pb.ListServicesRequest(), env_pb.ListServicesResponse
            )
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        self._scheduler = _RemoteScheduler(connection)
        self._services = RemoteServices(connection, list(names.names))
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

    async def health_check(self) -> HealthReport:
        """Overall health, and each service's status."""
        reply = await self._rpc.unary(
            _ORCH + "Health", orch_pb.HealthRequest(), orch_pb.HealthResponse
        )
        return HealthReport(status=reply.status, services=convert.statuses_by_name(reply.services))

    async def submit_task(
        self,
        handler: str,
        payload: Any = None,
        *,
        task_class: str = "cpu_short",
        priority: int = 0,
        needs: Iterable[str] = (),
        task_id: str | None = None,
        workflow_id: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the task's timeout, not this call's
        resources: Resources | None = None,
    ) -> TaskHandle:
        """Store a task on the server and queue it; see :meth:`AgentInfra.submit_task`."""
        scheduler = self._tasks
        task_id = await scheduler.submit(
            TaskRequest(
                handler=handler,
                payload=payload,
                task_class=task_class,
                priority=priority,
                needs=(needs,) if isinstance(needs, str) else tuple(needs),
                task_id=task_id,
                workflow_id=workflow_id,
                max_attempts=max_attempts,
                timeout=timeout,
                resources=resources,
            )
        )
        return TaskHandle(task_id, scheduler=scheduler)

    async def submit_tasks(
        self,
        handler: str,
        payloads: Iterable[Any],
        *,
        task_class: str = "cpu_short",
        priority: int = 0,
        needs: Iterable[str] = (),
        workflow_id: str | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the tasks' timeout, not this call's
        resources: Resources | None = None,
    ) -> list[TaskHandle]:
        """One task per payload, all or none, in one call; see :meth:`AgentInfra.submit_tasks`."""
        needs = (needs,) if isinstance(needs, str) else tuple(needs)
        scheduler = self._tasks
        task_ids = await scheduler.submit_many(
            TaskRequest(
                handler=handler,
                payload=payload,
                task_class=task_class,
                priority=priority,
                needs=needs,
                workflow_id=workflow_id,
                max_attempts=max_attempts,
                timeout=timeout,
                resources=resources,
            )
            for payload in payloads
        )
        return [TaskHandle(task_id, scheduler=scheduler) for task_id in task_ids]

    async def get_task_status(self, task_id: str) -> TaskStatus:
        """The task's current status; :class:`~dspy_infra.errors.UnknownTask` if there is none."""
        return await self._tasks.status(task_id)

    async def cancel_task(self, task_id: str) -> TaskStatus:
        """Cancel a task that has not finished; return once it has stopped, with its status."""
        return await self._tasks.cancel(task_id)

    def task_handle(self, task_id: str) -> TaskHandle:
        """A handle on a task submitted earlier."""
        return TaskHandle(task_id, scheduler=self._tasks)

    async def stream_task_results(
        self, task_ids: Collection[str] | None = None, *, since: int | None = None
    ) -> AsyncGenerator[TaskEvent, None]:
        """Final events of tasks as they finish; see :meth:`AgentInfra.stream_task_results`."""
        async with aclosing(self._tasks.results(task_ids, since=since)) as results:
            async for event in results:
                yield event

    async def stream_events(
        self, types: Collection[str] | None = None, *, since: int | None = None
    ) -> AsyncGenerator[Event, None]:
        """Events of ``types`` (all when None) as they happen, until the server closes."""
        request = orch_pb.StreamEventsRequest(types=list(types or ()), since=since)
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
