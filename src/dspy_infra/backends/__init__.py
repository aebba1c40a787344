"""Container backends, picked by name: ``dspy_infra.backends.<name>.Backend``."""

from __future__ import annotations

import importlib

from dspy_infra.abc import ContainerBackend
from dspy_infra.errors import BackendUnavailable

__all__ = ["load_backend"]


def load_backend(name: str) -> ContainerBackend:
    """Import ``dspy_infra.backends.<name>`` and instantiate the ``Backend`` it exports."""
    module_name = f"{__name__}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise BackendUnavailable(
                f"this version of dspy-infra has no {name!r} backend (infra.backend); "
                "use the local backend"
            ) from None
        raise BackendUnavailable(
            f"the {name!r} backend needs the {exc.name!r} package: pip install 'dspy-infra[{name}]'"
        ) from None
    backend: ContainerBackend = module.Backend()
    return backend
