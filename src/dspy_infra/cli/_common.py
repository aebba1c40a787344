"""What every command family shares: exit codes, errors, the ``-c`` option."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeAlias

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "Handler",
    "Subparsers",
    "add_config_option",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it

Handler = Callable[[argparse.Namespace], int]
# A string: argparse's action class is generic only to type checkers.
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class CommandError(Exception):
    """A failure the user can act on: :func:`main` prints ``error: <message>`` and exits ``code``.

    Never escapes the CLI: library failures stay :class:`~dspy_infra.errors.InfraError`.
    """

    def __init__(self, message: str, *, code: int = EXIT_FAILURE):
        self.code = code
        super().__init__(message)


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``-c/--config PATH``, shared by every command that reads the configuration."""
    parser.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        help=(
            "configuration file (default: $DSPY_INFRA_CONFIG, else ./dspy-infra.toml, "
            "else [tool.dspy-infra] in ./pyproject.toml)"
        ),
    )
