"""Configuration: frozen attrs classes, structured by one cattrs converter."""

from dspy_infra.config.loading import dump_config, load_config
from dspy_infra.config.model import (
    Backoff,
    Config,
    Dependency,
    HandlerConfig,
    InfraSettings,
    Probe,
    ServiceConfig,
    TaskClass,
)

__all__ = [
    "Backoff",
    "Config",
    "Dependency",
    "HandlerConfig",
    "InfraSettings",
    "Probe",
    "ServiceConfig",
    "TaskClass",
    "dump_config",
    "load_config",
]
