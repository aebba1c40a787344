"""``infra.services``: start, stop, inspect and follow the configured services."""

from __future__ import annotations

import builtins
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncGenerator, Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType

import aiohttp
import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from dspy_infra._names import given_names
from dspy_infra.abc import ContainerBackend, ServiceProcess
from dspy_infra.config.loading import dependency_closure
from dspy_infra.config.model import Config, Probe
from dspy_infra.config.placeholders import Endpoint, RenderContext
from dspy_infra.errors import DependencyFailed, InfraClosed, ServiceStartError, UnknownService
from dspy_infra.events import EventBus, ServiceEvent
from dspy_infra.metrics import Metrics
from dspy_infra.services.ports import PortAllocator
from dspy_infra.services.probes import ProbeRunner
from dspy_infra.services.runtime import ServiceRuntime
from dspy_infra.services.status import ServiceState, ServiceStatus
from dspy_infra.services.supervisor import supervise

__all__ = ["ServiceManager"]

_SETTLED_OK = (ServiceState.RUNNING, ServiceState.HEALTHY, ServiceState.COMPLETED)
_ENDED = (ServiceState.FAILED, ServiceState.STOPPED, ServiceState.INACTIVE)
# Final states, counted in service_stops_total{status}.
_STOPS = (ServiceState.STOPPED, ServiceState.COMPLETED, ServiceState.FAILED)
# Ended on its own: its supervisor is done once what is left of it has stopped.
_OVER = (ServiceState.COMPLETED, ServiceState.FAILED)


class _Slot:
    """One of ``max_concurrent_starts``; released early once the service is ready."""

    def __init__(self, semaphore: anyio.Semaphore):
        self._semaphore = semaphore
        self._held = False

    async def __aenter__(self) -> _Slot:
        await self._semaphore.acquire()
        self._held = True
        return self

    def release(self) -> None:
        if self._held:
            self._held = False
            self._semaphore.release()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class _StartCall:
    """One ``start()`` in progress: the services it waits for, and those it launched.

    What a failed call launched is stopped again, unless another call in
    progress waits for it: then that call takes it over (and stops it if it
    fails too), so that one failed start does not fail another that shares a
    dependency with it.
    """

    def __init__(self, waits_for: Iterable[str]) -> None:
        self.waits_for = set(waits_for)
        self.launched: builtins.list[ServiceRuntime] = []


class ServiceManager:
    """The services of one AgentInfra. Reached as ``infra.services``."""

    def __init__(
        self,
        config: Config,
        *,
        backend: ContainerBackend,
        bus: EventBus,
        task_group: TaskGroup,
        instance_id: str,
        metrics: Metrics | None = None,
    ):
        self.config = config
        self.backend = backend
        # A manager of its own when none is given: supervisors always have one to update.
        self.metrics = metrics if metrics is not None else Metrics()
        self.log = logging.getLogger("dspy_infra.services")
        self._bus = bus
        self._tg = task_group
        self._instance_id = instance_id
        self._runtimes = {name: ServiceRuntime(name, svc) for name, svc in config.services.items()}
        # Devices set apart for services by the scheduler, which leases the
        # others to tasks; none set apart, a service asks Docker for a count.
        self.gpu_ids: dict[str, tuple[str, ...]] = {}
        for runtime in self._runtimes.values():
            for name, dep in runtime.config.depends_on.items():
                if dep.condition == "log_ready":
                    dependency = self._runtimes[name]
                    dependency.ready_patterns.add(dependency.ready_pattern(dep))
        self._slots = anyio.Semaphore(config.infra.max_concurrent_starts)
        self._changed = anyio.Event()
        self._log_watchers = 0
        self._start_calls: builtins.list[_StartCall] = []
        # Services that a stop() is stopping (or about to, once their
        # dependents have stopped), counted until that stop of the service is
        # over: a start() waits for that, not for the process to end.
        self._stopping: Counter[str] = Counter()
        self._closing = False
        self._http: aiohttp.ClientSession | None = None
        fixed = (port for svc in config.services.values() for port in svc.ports.values() if port)
        self._ports = PortAllocator(reserved=fixed)
        self.metrics.read(self.metrics.active_services, self._up_count)

    # -- public API -----------------------------------------------------------

    def list(self) -> builtins.list[str]:
        """The configured service names, dependencies before dependents."""
        order: dict[str, None] = {}

        def visit(name: str) -> None:
            # Each after all it depends on: a service's closure is no such
            # order (with app -> db, cache and db -> cache, it meets cache first).
            if name not in order and name in self._runtimes:
                for dep in self.config.services[name].depends_on:
                    visit(dep)
                order.setdefault(name, None)

        for name in sorted(self._runtimes):
            visit(name)
        return list(order)

    async def start(self, names: Iterable[str] | None = None) -> dict[str, ServiceStatus]:
        """Start ``names`` (default: every ``autostart`` service) and their dependencies.

        Returns once all of them are up (healthy, running, or completed for
        one-shot services). If any fails, the services this call started are
        stopped again, except those that another start() in progress waits
        for, or that a service left running depends on, and the first failure
        is raised. A service that is being stopped is started again once it has
        stopped.
        """
        wanted = (
            [n for n in self.list() if self.config.services[n].autostart]
            if names is None
            else self._known(names)
        )
        closure = {n: None for w in wanted for n in [*dependency_closure(self.config, w), w]}
        call = _StartCall(closure)
        self._start_calls.append(call)
        targets = [self._runtimes[n] for n in closure]
        try:
            await self._launch(call, wanted)
            await self._wait_settled(targets)
        except BaseException:
            self._start_calls.remove(call)
            with anyio.CancelScope(shield=True):
                await self._stop_runtimes(self._not_needed(call))
            raise
        self._start_calls.remove(call)
        return {rt.name: rt.status() for rt in targets}

    async def stop(self, names: Iterable[str] | None = None) -> None:
        """Stop ``names`` (default: all), dependents before their dependencies.

        Only those named: a dependent that is not named is left running, as
        ``docker compose stop`` leaves it. Of those named, each stops once the
        services that depend on it, directly or not, have stopped. Returns
        once every one of them has stopped.
        """
        selected = list(self._runtimes) if names is None else self._known(names)
        await self._stop_runtimes([self._runtimes[n] for n in selected])

    async def status(self, names: Iterable[str] | None = None) -> dict[str, ServiceStatus]:
        """A snapshot of each service (default: all)."""
        selected = self.list() if names is None else self._known(names)
        return {n: self._runtimes[n].status() for n in selected}

    async def logs(
        self, name: str, *, follow: bool = False, tail: int | None = None
    ) -> AsyncGenerator[str, None]:
        """The service's buffered log lines; with ``follow``, new ones until it stops."""
        rt = self.runtime(name)
        async for line in rt.logs.follow(tail, follow=follow):
            yield line

    def troubles(self, lines: int = 20) -> dict[str, builtins.list[str]]:
        """The last log lines of each service that is not up or done: for failure reports."""
        fine = (*_SETTLED_OK, ServiceState.INACTIVE, ServiceState.STOPPED)
        return {
            rt.name: [f"[{rt.state.value}] {rt.message}".rstrip(), *rt.logs.tail(lines)]
            for rt in self._runtimes.values()
            if rt.state not in fine
        }

    async def aclose(self) -> None:
        """Stop everything and release what the manager holds."""
        self._closing = True
        with anyio.CancelScope(shield=True):
            await self.stop()
            if self._http is not None:
                await self._http.close()
                self._http = None

    # -- for the supervisors --------------------------------------------------

    @property
    def changed(self) -> anyio.Event:
        """Set (and replaced) on any state change; wait on it, then re-check."""
        return self._changed

    def notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    def runtime(self, name: str) -> ServiceRuntime:
        try:
            return self._runtimes[name]
        except (KeyError, TypeError):  # a list given for a name is not even hashable
            raise UnknownService(name, list(self._runtimes)) from None

    def set_state(
        self,
        rt: ServiceRuntime,
        state: ServiceState,
        event: str | None = None,
        message: str = "",
        *,
        exit_code: int | None = None,
    ) -> None:
        if state in _STOPS and rt.state is not state:
            self.metrics.service_stops.labels(rt.name, state.value).inc()
        rt.state = state
        rt.message = message
        if exit_code is not None:
            rt.exit_code = exit_code
        if event is not None:
            dependents = tuple(
                n
                for n, other in self._runtimes.items()
                if rt.name in other.config.depends_on and other.active
            )
            self._bus.publish(
                ServiceEvent(
                    type=event,
                    service=rt.name,
                    state=state.value,
                    exit_code=exit_code,
                    message=message,
                    dependents=dependents,
                )
            )
        self.notify()

    def start_failed(self, rt: ServiceRuntime, reason: str) -> None:
        """A launch of ``rt`` did not become ready; ``reason`` is a short category."""
        if self.start_ended(rt, "failed"):
            self.metrics.service_start_failures.labels(rt.name, reason).inc()

    def start_ended(self, rt: ServiceRuntime, status: str) -> bool:
        """Count the pending start of ``rt`` in service_starts_total, once.

        ``succeeded``, ``failed`` or ``stopped`` (before either); False when
        no start is pending (a stop after a failed attempt was counted).
        """
        if not rt.start_pending:
            return False
        rt.start_pending = False
        self.metrics.service_starts.labels(rt.name, status).inc()
        return True

    def backend_call(self, operation: str) -> contextlib.AbstractContextManager[None]:
        """Time the ``with`` body as a call to the backend."""
        return self.metrics.backend_call(self.backend.name, operation)

    def _up_count(self) -> float:
        return float(sum(1 for rt in self._runtimes.values() if rt.state.is_up))

    def log_appended(self) -> None:
        # Only services waiting on log_ready care about single lines.
        if self._log_watchers:
            self.notify()

    @contextmanager
    def watching_logs(self, enabled: bool) -> Iterator[None]:
        self._log_watchers += enabled
        try:
            yield
        finally:
            self._log_watchers -= enabled

    def start_slot(self) -> _Slot:
        return _Slot(self._slots)

    def probe_runner(
        self, rt: ServiceRuntime, probe: Probe, process: ServiceProcess, first_line: int
    ) -> ProbeRunner:
        return ProbeRunner(
            probe,
            process=process,
            logs=rt.logs,
            first_line=first_line,
            status=rt.status,
            http=self._http_session,
        )

    def free_port(self) -> int:
        return self._ports.allocate()

    async def render_context(self, rt: ServiceRuntime, *, inside: bool) -> RenderContext:
        """What ``rt``'s templates refer to, as seen from inside the service or from here.

        A command and its environment run inside (a container reaches its
        peers by name at their container ports); probes run from here, at
        the host each service is reached at.
        """
        state_dir = self.config.infra.state_dir
        service_dir = state_dir / "services" / rt.name
        await anyio.to_thread.run_sync(lambda: service_dir.mkdir(parents=True, exist_ok=True))
        deps = [self._runtimes[dep] for dep in dependency_closure(self.config, rt.name)]

        def endpoint(other: ServiceRuntime) -> Endpoint:
            ports = other.ports if other.ports is not None else other.config.ports
            if not inside:
                return Endpoint(other.host, dict(ports))
            host, seen = self.backend.peer_endpoint(other.name, ports, other.config.container_ports)
            return Endpoint(host, dict(seen))

        return RenderContext(
            name=rt.name,
            own=endpoint(rt),
            state_dir=str(state_dir),
            service_dir=str(service_dir),
            services={other.name: endpoint(other) for other in deps},
        )

    def labels(self, rt: ServiceRuntime) -> dict[str, str]:
        return {
            "dspy-infra.project": self.config.infra.project,
            "dspy-infra.instance": self._instance_id,
            "dspy-infra.service": rt.name,
            "dspy-infra.config-hash": rt.config_hash,
        }

    # -- internals ------------------------------------------------------------

    def _known(self, names: Iterable[str]) -> builtins.list[str]:
        selected = given_names(names)
        for name in selected:
            self.runtime(name)
        return list(dict.fromkeys(selected))

    def _spawn(self, rt: ServiceRuntime) -> None:
        rt.stop_requested = False
        rt.error = None
        rt.exit_code = None
        rt.done = anyio.Event()
        rt.start_pending = True
        rt.logs.reopen()
        rt.new_lifetime()
        self.set_state(rt, ServiceState.WAITING)
        self._tg.start_soon(supervise, self, rt, name=f"dspy-infra service {rt.name}")

    async def _launch(self, call: _StartCall, wanted: builtins.list[str]) -> None:
        """Spawn a supervisor for each service of ``call`` that is not active.

        A service that is being stopped is started again once that stop is
        over, rather than reported "stopped" to a call that asks for it now;
        not as soon as its process is gone, since a stop still waiting for
        the service's dependents would then stop the new lifetime.
        Raises InfraClosed once the instance is closing.
        """
        while True:
            changed = self._changed
            if not any(self._being_stopped(self._runtimes[name]) for name in call.waits_for):
                break
            await changed.wait()
        if self._closing:  # what is launched now would outlive the teardown's stop
            raise InfraClosed("the instance is closing: no service is started now")
        for name in self.list():
            rt = self._runtimes[name]
            # Dependencies that ended are started again; so is anything named
            # explicitly, a completed one-shot job included.
            if name in call.waits_for and not rt.active and (rt.state in _ENDED or name in wanted):
                self._spawn(rt)
                call.launched.append(rt)

    async def _wait_settled(self, targets: builtins.list[ServiceRuntime]) -> None:
        while True:
            changed = self._changed
            failed = [rt for rt in targets if rt.state in _ENDED]
            if failed:
                raise _root_cause(failed)
            if all(rt.up or rt.state is ServiceState.COMPLETED for rt in targets):
                return
            await changed.wait()

    def _not_needed(self, call: _StartCall) -> builtins.list[ServiceRuntime]:
        """What the failed ``call`` launched that nothing else needs: to be stopped.

        A service that another start() in progress waits for is handed over
        to that call; one that a service staying active depends on (started
        meanwhile beside this call) is left running, as any dependency of a
        running service is. A service being stopped is not staying: what it
        depends on is stopped after it.
        """
        unneeded = {rt.name: rt for rt in call.launched}
        changed = True
        while changed:  # what is kept keeps its own dependencies in turn
            changed = False
            for name in list(unneeded):
                taker = next((c for c in self._start_calls if name in c.waits_for), None)
                if taker is not None:
                    taker.launched.append(unneeded.pop(name))
                    changed = True
                elif any(
                    other.active
                    and not self._being_stopped(other)
                    and other.name not in unneeded
                    and name in dependency_closure(self.config, other.name)
                    for other in self._runtimes.values()
                ):
                    del unneeded[name]
                    changed = True
        return list(unneeded.values())

    async def _stop_runtimes(self, runtimes: builtins.list[ServiceRuntime]) -> None:
        """Stop ``runtimes``, each after its dependents that are being stopped.

        By this call or by another: a failed start() stops what it launched
        while a stop() may still be stopping a service that depends on it.
        Indirect dependents count too: with c -> b -> a, stop(a, c) leaves b
        running, and c may use a itself (``{services.a.port}``), so a waits
        for c as it would through b.
        """

        async def stop_one(rt: ServiceRuntime) -> None:
            try:
                for other in self._runtimes.values():  # dependents first
                    if rt.name not in dependency_closure(self.config, other.name):
                        continue
                    # While it is being stopped, not until it ends: a stop of
                    # it that is cancelled before it asked leaves it running,
                    # and this one would wait for ever. (Each stop_one, and
                    # each supervisor as it ends, notifies.)
                    while other.active and self._being_stopped(other):
                        await self._changed.wait()
                self._ask_to_stop(rt)
                await rt.done.wait()
            finally:  # anyio runs each task it is given, even in a cancelled group
                self._stopping[rt.name] -= 1
                self.notify()

        stopping = [rt for rt in runtimes if rt.active]
        self._stopping.update(rt.name for rt in stopping)
        async with anyio.create_task_group() as tg:
            for rt in stopping:
                tg.start_soon(stop_one, rt)

    def _ask_to_stop(self, rt: ServiceRuntime) -> None:
        """Cancel ``rt``'s supervisor; say so now when it has a process to stop.

        Its process group may be being stopped already (a failed attempt, a
        crash's leftovers), shielded from this cancellation: the supervisor
        would not get to say it. One with no process yet says so itself.
        """
        rt.stop_requested = True
        if rt.process is not None and rt.state not in (*_OVER, ServiceState.STOPPING):
            self.set_state(rt, ServiceState.STOPPING, "service_stopping")
        if rt.scope is not None:
            rt.scope.cancel()

    def _being_stopped(self, rt: ServiceRuntime) -> bool:
        """A stop() is stopping ``rt`` (or will, once its dependents have stopped).

        Or a stop() that asked ``rt`` to stop was given up (cancelled) since:
        its supervisor goes on stopping it all the same, so until that has
        ended, ``rt`` is on its way down, not up. So is one that failed or
        completed on its own while its supervisor stops what is left of it.
        """
        return self._stopping[rt.name] > 0 or (
            rt.active and (rt.stop_requested or rt.state in _OVER)
        )

    async def _http_session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        return self._http


def _root_cause(failed: list[ServiceRuntime]) -> ServiceStartError:
    """The failure to report: one that is not merely a consequence of another."""
    errors = [rt.error or rt.failure(f"is {rt.state.value}", rt.exit_code) for rt in failed]
    return next((e for e in errors if not isinstance(e, DependencyFailed)), errors[0])
