"""The protocols that every pluggable part implements.

A part is chosen by name in configuration (``backend = "local"``) or passed
in as an object; callers only ever see these protocols. Each protocol has a
behavioural conformance suite in :mod:`dspy_infra.testing`, which is what an
implementation has to pass, rather than merely having the right methods.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from attrs import field, frozen

__all__ = ["ContainerBackend", "LaunchSpec", "ServiceProcess"]


@frozen(kw_only=True)
class LaunchSpec:
    """One run of a service, with every placeholder already filled in.

    ``ports`` maps port names to the port to use: for the local backend the
    port the process listens on (never 0: the manager picks free ports first).
    ``labels`` identify the owner, so that leftovers can be found after a
    crash.
    """

    name: str
    command: tuple[str, ...] | str
    shell: bool = False
    env: Mapping[str, str] = field(factory=dict)
    cwd: Path | None = None
    ports: Mapping[str, int] = field(factory=dict)
    image: str | None = None
    labels: Mapping[str, str] = field(factory=dict)


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

    def output(self) -> AsyncGenerator[str, None]:
        """The service's stdout and stderr, merged, line by line, until it closes.

        Called once per process; lines have no trailing newline.
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
    """Starts and stops services: local processes, Docker containers..."""

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

        If cancelled, leaves nothing running.
        """

    async def close(self) -> None:
        """Release the backend's own resources (not the services: they are stopped first)."""
