"""Container backends, picked by name: ``dspy_infra.backends.<name>.Backend``."""

from __future__ import annotations

from dspy_infra._plugins import load_plugin
from dspy_infra.abc import ContainerBackend

__all__ = ["load_backend"]


def load_backend(name: str) -> ContainerBackend:
    """Import ``dspy_infra.backends.<name>`` and instantiate the ``Backend`` it exports."""
    backend: ContainerBackend = load_plugin(
        __name__, name, "Backend", kind="backend (infra.backend)", instead="use the local backend"
    )
    return backend
