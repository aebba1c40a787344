"""The life of one service: wait for dependencies, launch, probe, watch, restart.

One supervisor task per active service, in the AgentInfra's task group.
Stopping a service cancels its supervisor; whatever it was doing, the
shielded clean-up stops the process group and waits until it is gone.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import anyio
from attrs import evolve, frozen

from dspy_infra._exit_codes import reported
from dspy_infra.abc import LaunchSpec, ServiceProcess
from dspy_infra.config.model import Dependency, Probe, ServiceConfig
from dspy_infra.config.placeholders import RenderContext, render
from dspy_infra.errors import DependencyFailed, ServiceStartError
from dspy_infra.services.probes import ProbeResult, ProbeRunner
from dspy_infra.services.runtime import ServiceRuntime
from dspy_infra.services.status import ServiceState

if TYPE_CHECKING:
    from dspy_infra.services.manager import ServiceManager

__all__ = ["supervise"]

T = TypeVar("T")
_PUMP_DRAIN = 0.5  # seconds to read an ended or stopped service's last lines
# A container whose image has a HEALTHCHECK and no probe of ours: wait for
# Docker's verdict (reading it is free: events keep it up to date).
_OWN_HEALTH = Probe(container=True, interval=0.02, max_interval=0.1, liveness_interval=1.0)


@frozen
class _Run:
    """How one launch ended. ``exit_code`` is None when we stopped it."""

    ready: bool
    exit_code: int | None
    reason: str
    up_for: float = 0.0


async def supervise(manager: ServiceManager, rt: ServiceRuntime) -> None:
    """Run ``rt`` until it completes, fails for good or is stopped."""
    try:
        with anyio.CancelScope() as scope:
            rt.scope = scope
            try:
                await _lifecycle(manager, rt)
            except ServiceStartError as exc:
                if isinstance(exc, DependencyFailed):
                    manager.start_failed(rt, "dependency")
                _fail(manager, rt, exc)
            except Exception as exc:  # a bug here must not take the whole instance down
                manager.log.exception("supervisor of %r crashed", rt.name)
                # Once failed or completed, the verdict stands: what raised was
                # the stop of what was left of it (a backend gone away).
                if rt.state not in (ServiceState.FAILED, ServiceState.COMPLETED):
                    manager.start_failed(rt, "internal")
                    _fail(manager, rt, rt.failure(f"internal error: {exc!r}"))
        # One that failed or completed on its own before the stop was asked
        # for ended as such; the stop merely waited for what was left of it.
        if rt.stop_requested and rt.state not in (ServiceState.FAILED, ServiceState.COMPLETED):
            manager.start_ended(rt, "stopped")
            manager.set_state(rt, ServiceState.STOPPED, "service_stopped")
    finally:
        rt.scope = None
        rt.logs.close()
        rt.done.set()
        manager.notify()


def _fail(manager: ServiceManager, rt: ServiceRuntime, error: ServiceStartError) -> None:
    rt.error = error
    manager.set_state(
        rt, ServiceState.FAILED, "service_failed", error.reason, exit_code=error.exit_code
    )


async def _lifecycle(manager: ServiceManager, rt: ServiceRuntime) -> None:
    await _wait_dependencies(manager, rt)
    policy = _Policy(manager, rt)
    while True:
        run = await _run_once(manager, rt, policy.judge)
        if rt.stop_requested:  # stopped while this run's process was being stopped: no retry
            return
        if not run.ready:
            # A failed attempt is judged once its process is gone: until then
            # it is still "starting", and a stop meanwhile ends it there.
            policy.judge(run)
        if policy.next_launch is None:
            return
        await anyio.sleep_until(policy.next_launch)
        policy.relaunching()


class _Policy:
    """What follows each run of one lifetime: a retry, a restart, or its end.

    Judged as soon as the run ended, so that a service whose main process
    exited is not reported up while what is left of its group is stopped
    (up to ``stop_timeout``); the backoff counts from then too.
    """

    def __init__(self, manager: ServiceManager, rt: ServiceRuntime) -> None:
        self._manager = manager
        self._rt = rt
        self._start_failures = 0
        self._consecutive = 0  # restarts since the service last stayed up for restart_reset_after
        self._ever_ready = False
        self.next_launch: float | None = None  # anyio time of the next launch; None: none
        self._restart_due = False  # the next launch is a restart (not a start retry)

    def judge(self, run: _Run) -> None:
        """Report how ``run`` ended and what follows it."""
        manager, rt = self._manager, self._rt
        self.next_launch = None
        self._restart_due = False
        if run.ready:
            self._ever_ready = True
            manager.set_state(rt, rt.state, "service_exited", run.reason, exit_code=run.exit_code)
        # Exit 0 completes a one-shot job; a service that exits before its
        # probe passed never became what its dependents wait for.
        restarts_anyway = rt.config.restart in ("always", "unless-stopped")
        if run.ready and run.exit_code == 0 and not restarts_anyway:
            manager.set_state(rt, ServiceState.COMPLETED, "service_completed", exit_code=0)
            return
        try:
            delay = self._delay(run)
        except ServiceStartError as exc:
            _fail(manager, rt, exc)
            return
        manager.set_state(
            rt,
            ServiceState.RESTARTING,
            "service_restarting",
            f"{run.reason}; retrying in {delay:.2f}s",
            exit_code=run.exit_code,
        )
        self.next_launch = anyio.current_time() + delay

    def relaunching(self) -> None:
        """The next launch is made: a restart counts only now, as a stop may prevent it."""
        if self._restart_due:
            self._rt.restarts += 1

    def _delay(self, run: _Run) -> float:
        """The backoff before the next launch; raises the failure when there is none."""
        config, rt = self._rt.config, self._rt
        if not self._ever_ready:
            self._start_failures += 1
            if self._start_failures > config.start_retries:
                raise rt.failure(run.reason, run.exit_code)
            return config.start_backoff.delay(self._start_failures - 1)
        if config.restart == "no":
            raise rt.failure(run.reason, run.exit_code)
        if run.up_for >= config.restart_reset_after:
            self._consecutive = 0
        consecutive = self._consecutive
        if config.max_restarts is not None and consecutive >= config.max_restarts:
            restarts = "1 restart" if consecutive == 1 else f"{consecutive} restarts"
            raise rt.failure(f"{run.reason}; gave up after {restarts}", run.exit_code)
        self._consecutive += 1
        self._restart_due = True
        return config.restart_backoff.delay(consecutive)


async def _run_once(
    manager: ServiceManager, rt: ServiceRuntime, ended: Callable[[_Run], None]
) -> _Run:
    """Launch, wait until ready, watch until it ends; nothing is left running after.

    A run that was ready is handed to ``ended`` as soon as it ends, before
    what is left of its process group is stopped.
    """
    spec, inside = await _launch_spec(manager, rt)
    # A start slot is held from launch until ready (max_concurrent_starts).
    async with manager.start_slot() as slot:
        rt.start_pending = True
        manager.set_state(rt, ServiceState.STARTING, "service_starting")
        first_line = rt.logs.next_line
        try:
            with manager.backend_call("launch"):
                process = await manager.backend.launch(spec)
        except ServiceStartError as exc:
            manager.start_failed(rt, "launch")
            return _Run(ready=False, exit_code=exc.exit_code, reason=exc.reason)
        async with _running(manager, rt, process) as output_ended:
            probe = await _probe(manager, rt, inside)
            if probe is None and process.health is not None:
                probe = _OWN_HEALTH
            elif probe is not None and probe.container and process.health is None:
                # No verdict will ever come: failed at once, as compose refuses
                # service_healthy for a container without a healthcheck.
                manager.start_failed(rt, "unhealthy")
                return _Run(ready=False, exit_code=None, reason=_no_healthcheck(spec))
            with _probing(manager, rt, probe, process, first_line) as runner:
                if runner is not None:
                    exit_code, failure = await _race_exit(
                        process, lambda: _probe_until_ready(manager, rt, runner)
                    )
                    if exit_code is not None:
                        manager.start_failed(rt, "exited")
                        code = f"{exit_code}{reported(exit_code)}"
                        reason = f"exited with code {code} before becoming healthy"
                        return _Run(ready=False, exit_code=exit_code, reason=reason)
                    if failure is not None:
                        manager.start_failed(rt, "unhealthy")
                        return _Run(ready=False, exit_code=None, reason=failure)
                manager.start_ended(rt, "succeeded")
                slot.release()
                run = await _watch(manager, rt, process, runner)
                if not rt.stop_requested:
                    if run.exit_code is not None:
                        # Judged once the lines it printed as it died are read
                        # (they say why, in a failure's log tail); bounded, for
                        # children that keep its output open. Not up meanwhile.
                        rt.process_ending = True
                        with anyio.move_on_after(_PUMP_DRAIN):
                            await output_ended.wait()
                    ended(run)
                return run


def _no_healthcheck(spec: LaunchSpec) -> str:
    asked = "health = { container = true } waits for the image's own HEALTHCHECK"
    if spec.image is None:
        return f"{asked}, and this backend runs no image"
    return f"{asked}, and image {spec.image!r} declares no HEALTHCHECK"


@asynccontextmanager
async def _running(
    manager: ServiceManager, rt: ServiceRuntime, process: ServiceProcess
) -> AsyncIterator[anyio.Event]:
    """While the body runs, the service's output is pumped into its log buffer.

    Yields the event set once that output has ended (every line read).

    On the way out, however the body ended (returned, failed, cancelled by a
    stop), the process group is stopped and its last lines read.
    """
    rt.process, rt.process_ending = process, False
    manager.notify()  # dependents waiting for it to be "started"
    pump_done = anyio.Event()
    # Shielded: a stop cancels the body, and the pump must go on reading what
    # the service prints while it stops (a SIGTERM handler's last words).
    pump = anyio.CancelScope(shield=True)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_pump_in, pump, manager, rt, process, pump_done)
            try:
                yield pump_done
            finally:
                rt.process_ending = True
                with anyio.CancelScope(shield=True):
                    # Asked before it was launched, it has not said so yet.
                    if rt.stop_requested and rt.state is not ServiceState.STOPPING:
                        manager.set_state(rt, ServiceState.STOPPING, "service_stopping")
                    with manager.backend_call("stop"):
                        await process.stop(rt.config.stop_timeout)
                    with anyio.move_on_after(_PUMP_DRAIN):
                        await pump_done.wait()
                    pump.cancel()
    finally:
        rt.process = None


@contextmanager
def _probing(
    manager: ServiceManager,
    rt: ServiceRuntime,
    probe: Probe | None,
    process: ServiceProcess,
    first_line: int,
) -> Iterator[ProbeRunner | None]:
    """The launch's probe runner, if it has a probe, for as long as the launch lasts."""
    if probe is None:
        yield None
        return
    runner = manager.probe_runner(rt, probe, process, first_line)
    try:
        yield runner
    finally:
        runner.close()


async def _watch(
    manager: ServiceManager, rt: ServiceRuntime, process: ServiceProcess, runner: ProbeRunner | None
) -> _Run:
    """The service is up: report it, then wait for it to exit or fail its liveness probe."""
    healthy = runner is not None
    manager.set_state(
        rt,
        ServiceState.HEALTHY if healthy else ServiceState.RUNNING,
        "service_healthy" if healthy else "service_started",
    )
    up_since = time.monotonic()
    if runner is None or runner.probe.liveness_interval == 0:
        code = await process.wait()
        return _Run(
            ready=True,
            exit_code=code,
            reason=f"exited with code {code}{reported(code)}",
            up_for=time.monotonic() - up_since,
        )
    exit_code, unhealthy = await _race_exit(process, lambda: _liveness(manager, rt, runner))
    up_for = time.monotonic() - up_since
    if exit_code is not None:
        return _Run(
            ready=True,
            exit_code=exit_code,
            reason=f"exited with code {exit_code}{reported(exit_code)}",
            up_for=up_for,
        )
    return _Run(ready=True, exit_code=None, reason=unhealthy or "unhealthy", up_for=up_for)


async def _race_exit(
    process: ServiceProcess, work: Callable[[], Awaitable[T]]
) -> tuple[int | None, T | None]:
    """Run ``work`` until it returns or the process exits: ``(exit code, result)``."""
    exit_code: int | None = None
    result: T | None = None

    async def watch_exit() -> None:
        nonlocal exit_code
        exit_code = await process.wait()
        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch_exit)
        result = await work()
        tg.cancel_scope.cancel()
    return exit_code, result


async def _check(
    manager: ServiceManager, rt: ServiceRuntime, runner: ProbeRunner, deadline: float = math.inf
) -> ProbeResult:
    """One probe, timed into health_check_duration_seconds."""
    started = time.perf_counter()
    result = await runner.check(deadline)
    manager.metrics.health_check_duration.labels(
        rt.name, "healthy" if result.ok else "unhealthy"
    ).observe(time.perf_counter() - started)
    return result


async def _probe_until_ready(
    manager: ServiceManager, rt: ServiceRuntime, runner: ProbeRunner
) -> str | None:
    """Startup probing with exponential backoff; None when ready, else why not."""
    probe = runner.probe
    deadline = anyio.current_time() + probe.deadline
    delay = probe.interval
    attempts = successes = failures = 0
    told: ProbeResult | None = None  # the last check that had its say
    while True:
        result = await _check(manager, rt, runner, deadline)
        attempts += 1
        # A check cut short by the deadline says less than the one before it
        # ("HTTP 404"), which is what the failure reports.
        if told is None or not result.cut_short:
            told = result
        if result.ok:
            successes += 1
            if successes >= probe.success_threshold:
                return None
        else:
            successes = 0
            failures += 1  # `retries` counts failed checks, not passed ones
            if probe.retries is not None and failures >= probe.retries:
                return f"{probe.kind} probe failed {failures} times: {told.detail}"
        remaining = deadline - anyio.current_time()
        if remaining > 0:
            jittered = delay * (0.8 + 0.4 * (attempts % 5) / 4)  # spread, not synchronised probes
            # Probe again after the backoff delay, or sooner when the service
            # prints something (servers announce that they listen), but never
            # more often than every `interval`, however chatty it is.
            with anyio.move_on_after(min(jittered, remaining)):
                await anyio.sleep(probe.interval)
                await runner.output_changed()
        # A wait that ran to the deadline leaves no time for a check: one begun
        # there would be cut short at once (a docker exec created, never run).
        if anyio.current_time() >= deadline:
            return f"not healthy within {probe.deadline:g}s ({probe.kind} probe: {told.detail})"
        delay = min(delay * 2, probe.max_interval)


async def _liveness(manager: ServiceManager, rt: ServiceRuntime, runner: ProbeRunner) -> str:
    """Probe every liveness_interval; return a reason once the service should be restarted."""
    probe = runner.probe
    failures = 0
    while True:
        await anyio.sleep(probe.liveness_interval)
        result = await _check(manager, rt, runner)
        if result.ok:
            failures = 0
            if rt.state is ServiceState.UNHEALTHY:
                manager.set_state(rt, ServiceState.HEALTHY, "service_healthy")
            continue
        failures += 1
        if failures >= probe.failure_threshold and rt.state is ServiceState.HEALTHY:
            reason = f"unhealthy: {probe.kind} probe failed {failures} times: {result.detail}"
            manager.set_state(rt, ServiceState.UNHEALTHY, "service_unhealthy", reason)
            if rt.config.restart != "no":
                return reason


async def _pump_in(
    scope: anyio.CancelScope,
    manager: ServiceManager,
    rt: ServiceRuntime,
    process: ServiceProcess,
    done: anyio.Event,
) -> None:
    with scope:
        await _pump_logs(manager, rt, process, done)


async def _pump_logs(
    manager: ServiceManager, rt: ServiceRuntime, process: ServiceProcess, done: anyio.Event
) -> None:
    try:
        async with aclosing(process.output()) as lines:
            async for line in lines:
                rt.logs.append(line)
                manager.log_appended()
    finally:
        done.set()


async def _wait_dependencies(manager: ServiceManager, rt: ServiceRuntime) -> None:
    """Wait for every dependency's condition; fail at once when one cannot be met.

    All of them at once: a condition met earlier is checked again, since the
    dependency may have gone down (a crash, a restart's backoff) while the
    service waited for another one.
    """
    depends_on = rt.config.depends_on
    log_ready = any(dep.condition == "log_ready" for dep in depends_on.values())
    with manager.watching_logs(log_ready):
        while True:
            changed = manager.changed
            met = [_condition_met(rt, manager.runtime(n), dep) for n, dep in depends_on.items()]
            if all(met):
                return
            await changed.wait()


def _condition_met(rt: ServiceRuntime, dep_rt: ServiceRuntime, dep: Dependency) -> bool:
    state = dep_rt.state
    if state is ServiceState.FAILED:
        error = dep_rt.error
        raise DependencyFailed(
            rt.name,
            dep_rt.name,
            f"failed: {error.reason if error else dep_rt.message}",
            exit_code=error.exit_code if error else dep_rt.exit_code,
            log_tail=error.log_tail if error else dep_rt.logs.tail(20),
        )
    if state in (ServiceState.STOPPING, ServiceState.STOPPED, ServiceState.INACTIVE):
        raise DependencyFailed(rt.name, dep_rt.name, f"is {state.value}")
    completed = state is ServiceState.COMPLETED
    match dep.condition:
        case "started":
            # Not one whose launch has ended (a crash, a failed attempt still
            # "starting") while what is left of its process group is stopped.
            return completed or (dep_rt.process is not None and not dep_rt.process_ending)
        case "healthy":
            return completed or dep_rt.up
        case "completed_successfully":
            return completed
        case _:
            # Matched as the lines came, since this lifetime began: a burst of
            # more than log_lines lines after the ready one leaves it found.
            return dep_rt.ready_lines[dep_rt.ready_pattern(dep)].found


async def _launch_spec(
    manager: ServiceManager, rt: ServiceRuntime
) -> tuple[LaunchSpec, RenderContext]:
    """Fill in the placeholders of the service's command, env and cwd.

    Returns the context they were filled from too, for the probe's command.
    """
    config: ServiceConfig = rt.config
    if rt.ports is None:
        rt.ports = {name: port or manager.free_port() for name, port in config.ports.items()}
    ctx = await manager.render_context(rt, inside=True)
    with _placeholders(rt):
        command: tuple[str, ...] | str | None = config.command
        if isinstance(command, str):
            command = render(command, ctx)
        elif command is not None:
            command = tuple(render(arg, ctx) for arg in command)
        env = {key: render(value, ctx) for key, value in config.env.items()}
        cwd = render(config.cwd, ctx) if config.cwd is not None else None
    spec = LaunchSpec(
        name=rt.name,
        command=command,
        shell=config.shell,
        env=env,
        cwd=Path(cwd) if cwd is not None else None,
        ports=rt.ports,
        labels=manager.labels(rt),
        image=config.image,
        pull=config.pull,
        entrypoint=config.entrypoint,
        container_ports=config.container_ports,
        volumes=config.volumes,
        cpus=config.cpus,
        memory_mb=config.memory_mb,
        gpus=config.gpus,
        gpu_ids=manager.gpu_ids.get(rt.name, ()),
        progress=lambda line: manager.set_state(rt, rt.state, "service_pulling", line),
    )
    return spec, ctx


async def _probe(
    manager: ServiceManager, rt: ServiceRuntime, inside: RenderContext
) -> Probe | None:
    """The service's probe, its placeholders filled in once it is launched.

    Not before: a tcp or http probe's ``{host}`` is where this machine
    reaches the service, which only its launch tells (a remote engine's
    address). A command probe runs inside, as the service's command.
    """
    probe = rt.config.health
    if probe is None:
        return None
    outside = await manager.render_context(rt, inside=False)
    with _placeholders(rt):
        return evolve(
            probe,
            tcp=render(probe.tcp, outside) if probe.tcp else None,
            http=render(probe.http, outside) if probe.http else None,
            command=tuple(render(a, inside) for a in probe.command) if probe.command else None,
        )


@contextmanager
def _placeholders(rt: ServiceRuntime) -> Iterator[None]:
    try:
        yield
    except ValueError as exc:  # validated at load time; only reachable with a hand-made Config
        raise rt.failure(f"bad placeholder: {exc}") from None
