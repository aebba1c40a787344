"""What a service looks like from outside: its state, health and ports."""

from __future__ import annotations

import enum
from collections.abc import Mapping

from attrs import field, frozen

__all__ = ["ServiceState", "ServiceStatus"]


class ServiceState(enum.StrEnum):
    """Where a service is in its life.

    ``running`` is up with no probe to say more; ``healthy`` is up with its
    probe passing. ``completed`` is a one-shot service that exited 0.
    """

    INACTIVE = "inactive"
    WAITING = "waiting"
    STARTING = "starting"
    RUNNING = "running"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    RESTARTING = "restarting"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"

    @property
    def is_up(self) -> bool:
        """Started and not (yet) known to be broken: dependents may rely on it."""
        return self in (ServiceState.RUNNING, ServiceState.HEALTHY)


@frozen(kw_only=True)
class ServiceStatus:
    """A snapshot of one service.

    ``pid`` is the process id (a container id for Docker) while it runs;
    ``exit_code`` is that of its last run that ended, kept across restarts.
    """

    name: str
    state: ServiceState
    host: str = "127.0.0.1"
    ports: Mapping[str, int] = field(factory=dict)
    pid: str | None = None
    restarts: int = 0
    exit_code: int | None = None
    message: str = ""

    @property
    def healthy(self) -> bool:
        """Up, or finished its one-shot job successfully."""
        return self.state.is_up or self.state is ServiceState.COMPLETED
