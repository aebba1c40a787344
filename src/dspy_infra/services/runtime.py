"""The mutable state of one service inside one AgentInfra."""

from __future__ import annotations

import hashlib
import json
from functools import cached_property

import anyio

from dspy_infra.abc import ServiceProcess
from dspy_infra.config.converter import converter
from dspy_infra.config.model import ServiceConfig
from dspy_infra.errors import ServiceStartError
from dspy_infra.services.logs import LogBuffer
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
        self.logs = LogBuffer(config.log_lines)
        self.lifetime_first_line = 0  # first log line of the current start() lifetime
        self.restarts = 0
        self.exit_code: int | None = None
        self.message = ""
        self.error: ServiceStartError | None = None
        self.stop_requested = False
        self.scope: anyio.CancelScope | None = None
        self.done = anyio.Event()
        self.done.set()  # no supervisor yet

    @cached_property
    def config_hash(self) -> str:
        """Tells a container of this configuration from one of an edited one, as compose does."""
        data = json.dumps(converter.unstructure(self.config), sort_keys=True, default=repr)
        return hashlib.sha256(data.encode()).hexdigest()[:16]

    @property
    def active(self) -> bool:
        """A supervisor is running for it."""
        return not self.done.is_set()

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
