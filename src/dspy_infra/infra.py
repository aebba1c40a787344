"""AgentInfra: composes the parts and owns their lifetime.

One instance owns one anyio task group: every background task it starts
(service supervisors, log pumps, probes) runs inside it and is finished when
the ``async with`` block ends, however it ends.
"""

from __future__ import annotations

import enum
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Collection, Iterable, Mapping
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import anyio
import anyio.abc
import anyio.to_thread
from attrs import field, frozen

from dspy_infra._names import given_names
from dspy_infra.abc import ContainerBackend
from dspy_infra.backends import load_backend
from dspy_infra.config import Config, load_config
from dspy_infra.errors import BackendUnavailable, ConfigError, InfraClosed, UnknownEventType
from dspy_infra.events import Event, EventBus, EventsDropped, ServiceEvent, check_since
from dspy_infra.http import MetricsServer, health_document
from dspy_infra.metrics import Metrics
from dspy_infra.scheduling.api import TaskMethods
from dspy_infra.scheduling.scheduler import LocalScheduler
from dspy_infra.scheduling.tasks import TaskEvent
from dspy_infra.services.manager import ServiceManager
from dspy_infra.services.status import ServiceState, ServiceStatus
from dspy_infra.workflows.engine import WorkflowEngine
from dspy_infra.workflows.model import WorkflowEvent

if TYPE_CHECKING:
    import ssl
    from pathlib import Path

    from dspy_infra.remote.client import RemoteAgentInfra

__all__ = ["EVENT_TYPES", "AgentInfra", "HealthReport", "check_event_types"]

log = logging.getLogger("dspy_infra")

H = TypeVar("H", bound=Callable[..., Any])


class _Lifecycle(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


@frozen(kw_only=True)
class HealthReport:
    """Overall health and each service's status.

    ``status`` is ``"healthy"`` when every active service is up (or completed
    its one-shot job), ``"starting"`` while some are still coming up, and
    ``"unhealthy"`` when one failed or fails its probe.
    """

    status: str
    services: Mapping[str, ServiceStatus] = field(factory=dict)

    @property
    def healthy(self) -> bool:
        return self.status == "healthy"


# Every event type an instance publishes. Gathered here, where the parts are
# composed: each part's module imports the bus's, so the bus cannot import them.
EVENT_TYPES: frozenset[str] = (
    ServiceEvent.TYPES
    | frozenset(TaskEvent.TYPES.values())
    | {TaskEvent.RETRYING}
    | WorkflowEvent.TYPES
    | {EventsDropped.TYPE}
)


def check_event_types(types: Iterable[object]) -> None:
    """Refuse, with :class:`UnknownEventType`, types that no part publishes:
    following one (a misspelt name) would wait forever for nothing. What is
    no string (a number read from a file, a list) names no type either."""
    unknown: list[Any] = []
    for name in types:
        if not (isinstance(name, str) and name in EVENT_TYPES) and name not in unknown:
            unknown.append(name)
    if unknown:
        raise UnknownEventType(unknown, EVENT_TYPES)


_UNHEALTHY = {ServiceState.FAILED, ServiceState.UNHEALTHY}
_STARTING = {ServiceState.WAITING, ServiceState.STARTING, ServiceState.RESTARTING}


class AgentInfra(TaskMethods):
    """The infrastructure of one training, optimisation or streaming program.

    Use :meth:`start` in an ``async with`` block::

        async with AgentInfra.start("dspy-infra.toml") as infra:
            print(await infra.health_check())
    """

    def __init__(
        self,
        config: Config,
        *,
        backend: ContainerBackend | None = None,
        handlers: Mapping[str, Callable[..., Any]] | None = None,
    ):
        self.config = config
        self.instance_id = uuid.uuid4().hex[:12]
        self._backend = backend if backend is not None else load_backend(config.infra.backend)
        self._handlers: dict[str, Callable[..., Any]] = dict(handlers or {})
        self._lifecycle = _Lifecycle.UNOPENED
        self._stack: AsyncExitStack | None = None
        self._bus: EventBus | None = None
        self._services: ServiceManager | None = None
        self._scheduler: LocalScheduler | None = None
        self._workflows: WorkflowEngine | None = None
        self.metrics = Metrics()
        # Where /metrics, /health and /ready are served ([metrics] address, with
        # the port picked for 0), while the instance is open; None when not served.
        self.metrics_address: str | None = None

    @classmethod
    def start(
        cls,
        config: Config | str | os.PathLike[str] | Mapping[str, Any] | None = None,
        /,
        *,
        backend: str | ContainerBackend | None = None,
        handlers: Mapping[str, Callable[..., Any]] | None = None,
        **overrides: Any,
    ) -> Self:
        """Configure an instance; ``async with`` it to start the infrastructure.

        ``config`` is a path to a TOML file (or ``pyproject.toml``), a mapping,
        a :class:`Config`, or None to look in the usual places. Keyword
        ``overrides`` replace ``[infra]`` keys or whole sections
        (``state_dir=...``, ``services={...}``). ``backend`` is a backend name
        or a :class:`~dspy_infra.abc.ContainerBackend` object, used instead of
        the configured one. ``handlers`` maps handler names to in-process
        functions, like :meth:`task`.
        """
        if isinstance(backend, str):
            overrides["backend"] = backend
        return cls(
            load_config(config, overrides=overrides),
            backend=None if isinstance(backend, str) else backend,
            handlers=handlers,
        )

    @classmethod
    def connect(
        cls,
        address: str = "127.0.0.1:50052",
        *,
        token: str | None = None,
        tls: ssl.SSLContext | bool | None = None,
    ) -> RemoteAgentInfra:
        """The same task and service API, over gRPC to ``dspy-infra serve``; ``async with`` it.

        ``token`` is the server's token, if it has one. ``tls``, for a server
        that serves TLS: a client :class:`ssl.SSLContext`, or True for one
        that trusts the system's CAs; None or False connect in plain text.
        Needs the ``grpc`` extra, which is imported only here, so that
        in-process use never pays for it.
        """
        try:
            from dspy_infra.remote.client import RemoteAgentInfra  # noqa: PLC0415 - optional extra
        except ImportError as exc:
            raise BackendUnavailable(
                f"the remote client needs the grpc extra: pip install 'dspy-infra[grpc]' ({exc})"
            ) from exc
        return RemoteAgentInfra(address, token=token, tls=tls)

    def task(self, name: str | None = None) -> Callable[[H], H]:
        """Register an in-process handler: ``@infra.task("embed")``.

        The handler takes the payload (and, if it has a second parameter, the
        :class:`~dspy_infra.abc.TaskRun`) and returns a JSON-compatible result.
        Async handlers run on the event loop; plain functions in worker
        threads. Register handlers before ``async with``, so that tasks
        recovered from the store find theirs.
        """

        def register(handler: H) -> H:
            self._handlers[name or handler.__name__] = handler
            return handler

        return register

    async def __aenter__(self) -> Self:
        if self._lifecycle is not _Lifecycle.UNOPENED:
            raise InfraClosed(
                f"this AgentInfra is {self._lifecycle.value}: an instance is entered once; "
                "create a new one with AgentInfra.start()"
            )
        self._lifecycle = _Lifecycle.OPEN
        try:
            return await self._open()
        except BaseException:
            # However the start failed (an error, a cancellation), this
            # instance is closed: it answers no call, and is not entered again.
            self._lifecycle = _Lifecycle.CLOSED
            self.metrics_address = None
            raise

    async def _open(self) -> Self:
        failure: Exception | None = None
        async with AsyncExitStack() as stack:
            state_dir = self.config.infra.state_dir
            try:
                await anyio.to_thread.run_sync(lambda: state_dir.mkdir(parents=True, exist_ok=True))
            except OSError as exc:
                # A state_dir under a file, or where the user may not write:
                # the configuration's to change, so named as its errors are
                # (not an OSError that dspy-infra serve showed as a traceback).
                why = "a file is there" if isinstance(exc, FileExistsError) else exc.strerror
                raise ConfigError(
                    f"cannot create the directory {state_dir}: {why or exc}",
                    source=self.config.source_of("infra.state_dir"),
                    path="infra.state_dir",
                ) from None
            if why := await anyio.to_thread.run_sync(_unwritable, state_dir):
                # Found now, before anything is made there: found later, it was
                # a bare OSError or SQLite's error, with the records of the
                # backend and a store file left half made.
                raise ConfigError(
                    f"cannot write to the directory {state_dir}: {why}",
                    source=self.config.source_of("infra.state_dir"),
                    path="infra.state_dir",
                )
            with self.metrics.backend_call(self._backend.name, "open"):
                swept = await self._backend.open(
                    state_dir=state_dir,
                    instance_id=self.instance_id,
                    project=self.config.infra.project,
                )
            for leftover in swept:
                log.warning("removed a leftover of a crashed instance: %s", leftover)
            stack.push_async_callback(self._close_backend)
            self._bus = EventBus(
                buffer=self.config.infra.event_buffer,
                history=self.config.infra.event_history,
                on_drop=self.metrics.events_dropped.inc,
                # Seqs go on increasing across instances: a reader resuming
                # with the seq of an earlier one gets all of this one's (from
                # 1, they would collide: its since would skip as many).
                start=time.time_ns() // 1000,
            )
            stack.callback(self._bus.close)
            task_group = await stack.enter_async_context(anyio.create_task_group())
            self._services = ServiceManager(
                self.config,
                backend=self._backend,
                bus=self._bus,
                task_group=task_group,
                instance_id=self.instance_id,
                metrics=self.metrics,
            )
            stack.push_async_callback(self._services.aclose)
            if self.config.metrics.loop_lag_interval > 0:
                lag = anyio.CancelScope()
                task_group.start_soon(self._watch_loop_lag, lag)
                stack.callback(lag.cancel)
            try:
                scheduler = LocalScheduler(
                    self.config,
                    bus=self._bus,
                    services=self._services,
                    handlers=self._handlers,
                    instance_id=self.instance_id,
                    metrics=self.metrics,
                )
                # Made before the scheduler opens, which is when it first
                # forgets what keep_finished says, runs included.
                workflows = WorkflowEngine(scheduler=scheduler, bus=self._bus, metrics=self.metrics)
                self._scheduler = await stack.enter_async_context(scheduler)
                # Closed before the scheduler (the stack unwinds in reverse):
                # runs cut short stay 'running' in the store, to be resumed.
                self._workflows = await stack.enter_async_context(workflows)
                if self.config.metrics.address is not None:
                    # Stopped first on the way out (the stack unwinds in
                    # reverse), while what it reports is still open.
                    server = MetricsServer(
                        self.config.metrics.address,
                        instance=self.instance_id,
                        exposition=self.metrics.exposition,
                        health=self._health_document,
                    )
                    serving = anyio.CancelScope()
                    self.metrics_address = await self._start_serving(task_group, server, serving)
                    stack.callback(serving.cancel)
                if self.config.infra.autostart:
                    await self._services.start()
            except Exception as exc:  # noqa: BLE001 - re-raised below, unwrapped
                # Raised after the task group has closed, so that the caller
                # sees this error and not an ExceptionGroup around it.
                failure = exc
            else:
                self._stack = stack.pop_all()
        if failure is not None:
            raise failure
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self._lifecycle = _Lifecycle.CLOSED
        self.metrics_address = None  # the endpoint stops first: no longer served
        stack, self._stack = self._stack, None
        if stack is None:
            return False
        try:
            await stack.__aexit__(et, e, tb)
        except BaseExceptionGroup as group:
            # The task group wraps whatever left the block; hand the caller its
            # own exception back unless something else went wrong too.
            _, others = group.split(lambda exc: exc is e)
            if e is None or others is not None:
                raise
        return False

    async def _close_backend(self) -> None:
        with self.metrics.backend_call(self._backend.name, "close"):
            await self._backend.close()

    async def _watch_loop_lag(self, scope: anyio.CancelScope) -> None:
        with scope:
            await self.metrics.watch_loop_lag(self.config.metrics.loop_lag_interval)

    async def _start_serving(
        self, task_group: anyio.abc.TaskGroup, server: MetricsServer, scope: anyio.CancelScope
    ) -> str:
        """The address ``server`` listens on; one it cannot listen on (taken, or
        a host that does not resolve) is the configuration's to change, so
        named as its errors are, not as asyncio's OSError."""
        try:
            address: str = await task_group.start(self._serve, server, scope)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.config.metrics.address}: {_bind_reason(exc)}",
                source=self.config.source_of("metrics.address"),
                path="metrics.address",
            ) from None
        return address

    @staticmethod
    async def _serve(
        server: MetricsServer,
        scope: anyio.CancelScope,
        *,
        task_status: anyio.abc.TaskStatus[str],
    ) -> None:
        with scope:
            await server.serve(task_status=task_status)

    async def _health_document(self) -> dict[str, Any]:
        return await health_document(self, self._tasks)

    # -- the API --------------------------------------------------------------

    @property
    def services(self) -> ServiceManager:
        """Start, stop, inspect and follow services (see :class:`ServiceManager`)."""
        self._check_open()
        assert self._services is not None
        return self._services

    @property
    def workflows(self) -> WorkflowEngine:
        """Create workflows, start, follow and cancel their runs (see docs/workflows.md)."""
        self._check_open()
        assert self._workflows is not None
        return self._workflows

    async def health_check(self) -> HealthReport:
        """Overall health, and each service's status."""
        statuses = await self.services.status()
        active = [s for s in statuses.values() if s.state is not ServiceState.INACTIVE]
        if any(s.state in _UNHEALTHY for s in active):
            overall = "unhealthy"
        elif any(s.state in _STARTING for s in active):
            overall = "starting"
        else:
            overall = "healthy"
        return HealthReport(status=overall, services=statuses)

    async def get_metrics(self) -> dict[str, float]:
        """Every metric sample by name and labels: ``{'dspy_infra_gpus_total': 2.0, ...}``."""
        self._check_open()
        return self.metrics.values()

    @property
    def _tasks(self) -> LocalScheduler:
        self._check_open()
        assert self._scheduler is not None
        return self._scheduler

    async def stream_events(
        self,
        types: str | Collection[str] | None = None,
        *,
        since: int | None = None,
        follow: bool = True,
    ) -> AsyncGenerator[Event, None]:
        """Events of ``types`` (one, or several; all when None) as they happen, until the
        instance closes.

        With ``since``, recent events after that sequence number come first.
        With ``follow=False``, the events still in the history after ``since``
        (all of them when None, as with 0) as of the first read, and then the
        end, however busy the instance is: a reader of what happened could
        not tell a pause of a follower's stream from its end. A type that
        :data:`EVENT_TYPES` lacks is refused with :class:`UnknownEventType`
        (a ValueError) on the first read.
        """
        self._check_open()
        assert self._bus is not None
        wanted = None if types is None else given_names(types)
        if wanted is not None:
            check_event_types(wanted)
        check_since(since)
        if not follow:
            for event in self._bus.backlog(
                since or 0, lambda e: wanted is None or e.type in wanted
            ):
                yield event
            return
        async with self._bus.subscribe(wanted, since=since) as events:
            async for event in events:
                yield event

    def _check_open(self) -> None:
        if self._lifecycle is not _Lifecycle.OPEN:
            state = self._lifecycle.value
            raise InfraClosed(
                f"this AgentInfra is {state}: use it inside `async with AgentInfra.start(...)`"
            )


def _bind_reason(exc: OSError) -> str:
    """Why a listen failed, in the system's words: asyncio's own message repeats
    the address it was given; a name that does not resolve has only its text."""
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)


def _unwritable(directory: Path) -> str | None:
    """Why nothing can be written in ``directory`` (which exists), or None.

    A full disk counts the blocks kept for root as free to root, as the
    kernel does when it writes.
    """
    try:
        fs = os.statvfs(directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    if fs.f_flag & os.ST_RDONLY:
        return "read-only file system"
    if not os.access(directory, os.W_OK):
        return "permission denied"
    if (fs.f_bfree if os.geteuid() == 0 else fs.f_bavail) == 0:
        return "no space left on its file system"
    return None
