"""Configuration: frozen attrs classes, structured by one cattrs converter."""

from dspy_infra.config.loading import dump_config, load_config
from dspy_infra.config.model import (
    Backoff,
    Config,
    Dependency,
    InfraSettings,
    Probe,
    ServiceConfig,
)

__all__ = [
    "Backoff",
    "Config",
    "Dependency",
    "InfraSettings",
    "Probe",
    "ServiceConfig",
    "dump_config",
    "load_config",
]
