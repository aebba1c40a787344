"""The mutable state of one service inside one AgentInfra."""

from __future__ import annotations

import hashlib
import json
import re
from functools import cached_property

import anyio

from dspy_infra.abc import ServiceProcess
from dspy_infra.config.converter import converter
from dspy_infra.config.model import Dependency, ServiceConfig
from dspy_infra.errors import ServiceStartError
from dspy_infra.services.logs import LineWatch, LogBuffer
from dspy_infra.services.status import ServiceState, ServiceStatus

__all__ = ["ServiceRuntime"]

_HOST = "127.0.0.1"


class ServiceRuntime:
    """What the supervisor of one service knows, and what others may read."""

    def __init__(self, name: str, config: ServiceConfig):
        self.name = name
        self.config = config
        self.state = ServiceState.INACTIVE
        self.ports: dict[str, int] | None = None  # chosen at first launch, kept across restarts
        self.process: ServiceProcess | None = None
        # Its launch is over (failed, ended or stopped) and what is left of
        # its process group is being stopped (up to stop_timeout).
        self.process_ending = False
        self.logs = LogBuffer(config.log_lines)
        self.lifetime_first_line = 0  # first log line of the current start() lifetime
        # The patterns of the dependents that wait for its log_ready (set by
        # the manager), each looked for in every line of a lifetime as it comes.
        self.ready_patterns: set[str] = set()
        self.ready_lines: dict[str, LineWatch] = {}
        self.restarts = 0
        self.exit_code: int | None = None
        self.message = ""
        self.error: ServiceStartError | None = None
        self.stop_requested = False
        # A start of it (waiting for dependencies, or launched) has no outcome
        # counted in service_starts_total yet.
        self.start_pending = False
        self.scope: anyio.CancelScope | None = None
        self.done = anyio.Event()
        self.done.set()  # no supervisor yet

    @cached_property
    def config_hash(self) -> str:
        """Tells a container of this configuration from one of an edited one, as compose does."""
        data = json.dumps(converter.unstructure(self.config), sort_keys=True, default=repr)
        return hashlib.sha256(data.encode()).hexdigest()[:16]

    def ready_pattern(self, dep: Dependency) -> str:
        """What a dependent's ``log_ready`` ``dep`` on this service waits for."""
        health = self.config.health
        pattern = dep.pattern or (health.log if health is not None else None)
        assert pattern is not None, "checked when the configuration was loaded"
        return pattern

    def new_lifetime(self) -> None:
        """A start() begins a lifetime: its lines count for log_ready from here.

        Watched from the start, not from when a dependent begins to wait: by
        then the ready line may have left the log buffer (a dependent started
        long after, once the service had printed more than ``log_lines``).
        """
        self.lifetime_first_line = self.logs.next_line
        for watch in self.ready_lines.values():
            self.logs.unwatch(watch)
        self.ready_lines = {
            pattern: self.logs.watch(re.compile(pattern), self.lifetime_first_line)
            for pattern in self.ready_patterns
        }

    @property
    def active(self) -> bool:
        """A supervisor is running for it."""
        return not self.done.is_set()

    @property
    def up(self) -> bool:
        """Up, and not a launch that has ended (its verdict waits for its last lines)."""
        return self.state.is_up and not self.process_ending

    @property
    def host(self) -> str:
        return self.process.host if self.process is not None else _HOST

    def status(self) -> ServiceStatus:
        return ServiceStatus(
            name=self.name,
            state=self.state,
            host=self.host,
            ports=dict(self.ports if self.ports is not None else self.config.ports),
            pid=self.process.id if self.process is not None else None,
            restarts=self.restarts,
            exit_code=self.exit_code,
            message=self.message,
        )

    def failure(self, reason: str, exit_code: int | None = None) -> ServiceStartError:
        return ServiceStartError(
            self.name, reason, exit_code=exit_code, log_tail=self.logs.tail(20)
        )
