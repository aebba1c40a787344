"""The protocols that every pluggable part implements.

A part is chosen by name in configuration (``backend = "local"``) or passed
in as an object; callers only ever see these protocols. Each protocol has a
behavioural conformance suite in :mod:`dspy_infra.testing`, which is what an
implementation has to pass, rather than merely having the right methods.
"""

from __future__ import annotations

import shlex
from collections.abc import AsyncGenerator, Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from attrs import field, frozen

from dspy_infra.config.model import Config, HandlerConfig, TaskClass

if TYPE_CHECKING:
    from dspy_infra.scheduling.tasks import ClassStatus, TaskEvent, TaskRequest, TaskStatus

__all__ = [
    "ContainerBackend",
    "LaunchSpec",
    "RunFailed",
    "Runner",
    "RunnerContext",
    "Scheduler",
    "ServiceProcess",
    "TaskRun",
]


@frozen(kw_only=True)
class LaunchSpec:
    """One run of a service, with every placeholder already filled in.

    ``ports`` maps port names to the port to use on this machine (never 0:
    the manager picks free ports first): for the local backend the port the
    process listens on. A container listens on ``container_ports`` (by
    default the same numbers) and is published on ``ports``. ``labels``
    identify the owner, so that leftovers can be found after a crash. The
    fields after ``labels`` only concern container backends, but for
    ``gpu_ids``, which a local process gets as ``CUDA_VISIBLE_DEVICES``;
    ``progress`` is told what an image pull is doing, a line at a time.
    """

    name: str
    command: tuple[str, ...] | str | None
    shell: bool = False
    env: Mapping[str, str] = field(factory=dict)
    cwd: Path | None = None
    ports: Mapping[str, int] = field(factory=dict)
    labels: Mapping[str, str] = field(factory=dict)
    image: str | None = None
    pull: str = "missing"
    entrypoint: tuple[str, ...] | None = None
    container_ports: Mapping[str, int] = field(factory=dict)
    volumes: tuple[str, ...] = ()
    cpus: float | None = None
    memory_mb: int | None = None
    gpus: int = 0
    # The devices set apart for the service where the instance has GPUs
    # (docs/scheduling.md, GPUs): a container requests them by id, not
    # ``gpus`` by count; a local process sees them alone.
    gpu_ids: tuple[str, ...] = ()
    progress: Callable[[str], None] | None = field(default=None, eq=False)

    def argv(self) -> list[str] | None:
        """The command as an argument vector: a shell command runs as ``/bin/sh -c``."""
        if self.command is None:
            return None
        if self.shell:
            script = self.command if isinstance(self.command, str) else shlex.join(self.command)
            return ["/bin/sh", "-c", script]
        assert not isinstance(self.command, str), "checked when the configuration was loaded"
        return list(self.command)


@runtime_checkable
class ServiceProcess(Protocol):
    """A launched service: a process group, a container..."""

    @property
    def id(self) -> str:
        """Process id, container id: what a person would look for."""

    @property
    def host(self) -> str:
        """The host at which the service's ports are reached."""

    @property
    def ports(self) -> Mapping[str, int]:
        """The ports as reachable from this process, by name."""

    @property
    def health(self) -> str | None:
        """The verdict of the service's own health check, None when it has none.

        A container image's HEALTHCHECK: ``starting``, ``healthy`` or
        ``unhealthy``, as Docker's events report it.
        """

    def output(self) -> AsyncGenerator[str, None]:
        """The service's stdout and stderr, merged, line by line, until it closes.

        Called once per process; lines have no trailing newline.
        """

    def reach(self, host: str, port: int) -> tuple[str, int]:
        """Where a connection from this machine to ``host:port`` should really go.

        Docker's port proxy accepts a connection on a published port as soon
        as the container starts, before anything listens inside: a TCP probe
        must go to the container's own address instead. Local services are
        reached where they are.
        """

    async def wait(self) -> int:
        """Wait for the service to exit; return its exit code (``-N`` for signal N)."""

    async def stop(self, grace: float) -> int:
        """Ask the whole service to stop, kill it after ``grace`` seconds.

        Returns once nothing of it is left running (the whole process group,
        the container), with the exit code. Idempotent; safe to call after it
        exited on its own, in which case it cleans up what is left.
        """

    async def exec(self, argv: tuple[str, ...]) -> tuple[int, str]:
        """Run a command beside (or inside) the service: ``(exit code, output)``.

        Used by command probes, which bound it with their timeout (a cancelled
        exec kills its command); the local backend runs it with the service's
        environment and working directory.
        """


@runtime_checkable
class ContainerBackend(Protocol):
    """Starts and stops services: local processes, Docker containers...

    Optional: a property ``on_this_machine`` (bool), True when what it
    launches runs on this machine and sees its GPUs; the scheduler then
    sets devices apart for services with ``gpus`` (``LaunchSpec.gpu_ids``).
    Without it, services are taken to run elsewhere.
    """

    @property
    def name(self) -> str:
        """The name it is chosen by in configuration."""

    async def open(self, *, state_dir: Path, instance_id: str, project: str) -> list[str]:
        """Get ready to launch, and remove what crashed owners left behind.

        ``state_dir`` is where the backend may keep its records. Returns a
        description of each leftover removed (a service of a dead instance).
        Raises :class:`~dspy_infra.errors.BackendUnavailable` when it cannot
        work, saying how to fix that.
        """

    async def launch(self, spec: LaunchSpec) -> ServiceProcess:
        """Start one service. Raises :class:`~dspy_infra.errors.ServiceStartError`.

        If cancelled, leaves nothing running; or, cancelled once the service
        exists, may finish and return it whole, for the caller to stop.
        """

    def peer_endpoint(
        self, service: str, ports: Mapping[str, int], container_ports: Mapping[str, int]
    ) -> tuple[str, Mapping[str, int]]:
        """Where services reach ``service`` (``(host, ports by name)``), as their commands see it.

        Local processes share this machine's loopback; containers reach each
        other by name on the instance's network, at their container ports.
        """

    async def close(self) -> None:
        """Release the backend's own resources (not the services: they are stopped first)."""


# Without __slots__: a frozen class with slots sets each field through
# object.__setattr__, which made a TaskRun cost half as much again, and one
# is made for every attempt. It lives as long as its attempt: events, which
# stay by the thousand in the bus's history, keep their slots (a __dict__
# each made the garbage collector's passes cost more than it saved).
@frozen(kw_only=True, slots=False)
class TaskRun:
    """One attempt of one task, as a runner (and an in-process handler) sees it.

    ``gpus`` are the devices leased to this attempt; ``env`` holds what the
    work must see in its environment (``CUDA_VISIBLE_DEVICES``...).
    ``cpus``, ``memory_mb`` and ``gpu_count`` are what the attempt holds: the
    task's own resources, else its class's; a runner that runs elsewhere (a
    container, a Slurm job) asks for them there.
    ``work_dir`` is this task's own directory under ``tasks_dir``; runners
    create it when they need it. ``attempt`` is at least ``max_attempts`` for
    the task's last attempt: one running when its instance dies is not run
    again (the task is marked lost), so what it left running is not wanted.
    """

    task_id: str
    handler: str
    payload: Any
    attempt: int
    task_class: str
    class_config: TaskClass
    handler_config: HandlerConfig | None = None
    gpus: tuple[str, ...] = ()
    env: Mapping[str, str] = field(factory=dict)
    tasks_dir: Path
    cpus: float = 0.0
    memory_mb: int = 0
    gpu_count: int = 0
    max_attempts: int = 1

    @property
    def work_dir(self) -> Path:
        # Computed on demand: most attempts (in-process ones) never need it,
        # and a Path costs more than the rest of a TaskRun.
        return self.tasks_dir / self.task_id


@frozen(kw_only=True)
class RunnerContext:
    """What a runner is given when it opens: the instance it works for.

    ``handlers`` is the live registry of in-process handlers
    (``@infra.task("name")``).
    """

    config: Config
    state_dir: Path
    instance_id: str
    project: str
    handlers: Mapping[str, Callable[..., Any]]


class RunFailed(Exception):
    """A runner's way to say an attempt failed, with what a person needs to see why.

    Any other exception raised by :meth:`Runner.run` fails the attempt too;
    this one lets a runner add the exit code and the last lines of output.
    """

    def __init__(self, message: str, *, exit_code: int | None = None, output: Sequence[str] = ()):
        self.message = message
        self.exit_code = exit_code
        self.output = tuple(output)
        text = message
        if self.output:
            text += "\n  last output lines:\n" + "\n".join(f"    {line}" for line in self.output)
        super().__init__(text)


@runtime_checkable
class Runner(Protocol):
    """Executes task attempts: in this process, as subprocesses, containers, Slurm jobs.

    The scheduler decides when and where (limits, resources, GPUs, retries,
    timeouts); a runner only runs one attempt per :meth:`run` call, as many
    at once as it is asked to.
    """

    @property
    def name(self) -> str:
        """The name it is chosen by in a task class (``runner = "process"``)."""

    async def open(self, context: RunnerContext) -> list[str]:
        """Get ready, and remove what crashed owners left behind (described in the list)."""

    def validate(self, handler: str) -> str | None:
        """Why ``handler`` cannot run here (unknown, not configured), or None when it can.

        Called at submit time, so that a task that cannot run is refused
        before it is stored.
        """

    async def run(self, run: TaskRun) -> Any:
        """Run one attempt; return its result (a JSON-compatible value).

        Raises :class:`RunFailed` (or any exception) when the attempt fails.
        When cancelled (the task was cancelled, or its timeout expired), stops
        the work before it returns: nothing of the attempt is left running.
        """

    async def close(self) -> None:
        """Release the runner's own resources (attempts are cancelled first)."""


@runtime_checkable
class Scheduler(Protocol):
    """Stores tasks durably and runs them by class, priority and resources."""

    async def submit(self, request: TaskRequest) -> str:
        """Store the task (once per ``task_id``) and queue it; its id, once it is committed.

        Raises :class:`~dspy_infra.errors.InvalidTask` for bad input, storing nothing.
        """

    async def submit_many(self, requests: Iterable[TaskRequest]) -> list[str]:
        """Like :meth:`submit` for many tasks at once: all or none, one commit."""

    async def submit_payloads(self, template: TaskRequest, payloads: Iterable[Any]) -> list[str]:
        """:meth:`submit_many` of one task per payload, each as ``template`` (whose
        ``task_id`` must be None) but for its payload: what ``submit_tasks`` asks."""

    async def status(self, task_id: str) -> TaskStatus:
        """The task's current status; raises :class:`~dspy_infra.errors.UnknownTask`."""

    async def wait(self, task_id: str) -> TaskStatus:
        """Wait until the task has finished (however it ended); return its final status."""

    async def cancel(self, task_id: str) -> TaskStatus:
        """Cancel the task if it has not finished; return its status after that."""

    async def classes(self) -> dict[str, ClassStatus]:
        """Each task class's current concurrency limit and load, by name, in
        the order of the configuration."""

    def results(
        self, task_ids: Collection[str] | None = None, *, since: int | None = None
    ) -> AsyncGenerator[TaskEvent, None]:
        """Final events of ``task_ids`` (all tasks when None) as they finish.

        With task ids, ends once each has finished, or raises
        :class:`~dspy_infra.errors.InfraClosed` when the scheduler closes
        first. With ``since``, results after that event sequence number are
        replayed first.
        """
