"""What every command family shares: exit codes, errors, the ``-c`` option, the token."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias, TypeVar

from dspy_infra import _groups

__all__ = [
    "DEFAULT_ADDRESS",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_FOUND",
    "EXIT_NO_SERVER",
    "EXIT_OK",
    "EXIT_USAGE",
    "TOKEN_ENV",
    "CommandError",
    "Handler",
    "Subparsers",
    "add_config_option",
    "read_token",
    "ungrouped",
]

A = TypeVar("A")
R = TypeVar("R")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NO_SERVER = 3  # no server answers at the address, it went away, or it refused the token
EXIT_NOT_FOUND = 4  # the server answers, but holds no such task or service
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


# As dspy_infra.remote.DEFAULT_ADDRESS, without importing grpc (a test keeps them equal).
DEFAULT_ADDRESS = "127.0.0.1:50052"
TOKEN_ENV = "DSPY_INFRA_TOKEN"  # noqa: S105 - the variable's name, not a secret


def read_token(token_file: Path | None) -> str | None:
    """The token from ``token_file``, else ``$DSPY_INFRA_TOKEN``, else None.

    Never from an argument: any user can read those with ``ps``.
    """
    if token_file is not None:
        try:
            # utf-8-sig: a byte order mark (Notepad writes one) is no part of the token.
            token = token_file.read_text(encoding="utf-8-sig").strip()
        except OSError as exc:
            raise CommandError(f"cannot read the token file: {exc}", code=EXIT_USAGE) from None
        except UnicodeDecodeError:
            # A binary file given by mistake (a key, not the token): the
            # token is visible ASCII, so this is never a token file.
            raise CommandError(
                f"cannot read the token file {token_file}: not UTF-8 text", code=EXIT_USAGE
            ) from None
        if not token:
            raise CommandError(f"the token file {token_file} is empty", code=EXIT_USAGE)
        return token
    return os.environ.get(TOKEN_ENV) or None


def ungrouped(function: Callable[[A], R], arg: A) -> R:
    """``function(arg)``, with a lone failure that an anyio task group wrapped unwrapped.

    The commands tell a user what failed, not how.
    """
    with _groups.ungrouped():
        return function(arg)
