"""Task runners, picked by name: ``dspy_infra.runners.<name>.Runner``."""

from __future__ import annotations

from dspy_infra._plugins import load_plugin
from dspy_infra.abc import Runner

__all__ = ["load_runner"]


def load_runner(name: str) -> Runner:
    """Import ``dspy_infra.runners.<name>`` and instantiate the ``Runner`` it exports."""
    runner: Runner = load_plugin(
        __name__,
        name,
        "Runner",
        kind="runner",
        instead="use a task class with the inprocess or process runner",
    )
    return runner
