"""Pluggable parts are picked by name: ``dspy_infra.<package>.<name>`` exports the class."""

from __future__ import annotations

import importlib
from typing import Any

from dspy_infra.errors import BackendUnavailable

__all__ = ["load_plugin"]


def load_plugin(package: str, name: str, attribute: str, *, kind: str, instead: str) -> Any:
    """Import ``<package>.<name>`` and instantiate its ``attribute``.

    A missing module means this version has no such part; a missing import
    inside it means an optional extra is not installed, which the error says.
    """
    module_name = f"{package}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise BackendUnavailable(
                f"this version of dspy-infra has no {name!r} {kind}; {instead}"
            ) from None
        raise BackendUnavailable(
            f"the {name!r} {kind} needs the {exc.name!r} package: pip install 'dspy-infra[{name}]'"
        ) from None
    return getattr(module, attribute)()
