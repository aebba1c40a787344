"""dspy-infra: the infrastructure of DSPy agent training, inside your event loop."""

from dspy_infra.abc import ContainerBackend, LaunchSpec, ServiceProcess
from dspy_infra.config import (
    Backoff,
    Config,
    Dependency,
    InfraSettings,
    Probe,
    ServiceConfig,
    load_config,
)
from dspy_infra.errors import (
    BackendUnavailable,
    ConfigError,
    DependencyFailed,
    InfraClosed,
    InfraError,
    ServiceError,
    ServiceStartError,
    UnknownService,
)
from dspy_infra.events import Event, EventsDropped, ServiceEvent
from dspy_infra.infra import AgentInfra, HealthReport
from dspy_infra.services.manager import ServiceManager
from dspy_infra.services.status import ServiceState, ServiceStatus

__all__ = [
    "AgentInfra",
    "BackendUnavailable",
    "Backoff",
    "Config",
    "ConfigError",
    "ContainerBackend",
    "Dependency",
    "DependencyFailed",
    "Event",
    "EventsDropped",
    "HealthReport",
    "InfraClosed",
    "InfraError",
    "InfraSettings",
    "LaunchSpec",
    "Probe",
    "ServiceConfig",
    "ServiceError",
    "ServiceEvent",
    "ServiceManager",
    "ServiceProcess",
    "ServiceStartError",
    "ServiceState",
    "ServiceStatus",
    "UnknownService",
    "load_config",
]
