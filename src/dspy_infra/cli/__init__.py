"""The ``dspy-infra`` command.

Usage::

    dspy-infra config init [PATH] [--force]    write a commented starter dspy-infra.toml
    dspy-infra config show [-c PATH]           print the resolved configuration as TOML
    dspy-infra config validate [-c PATH]       check a configuration
    dspy-infra serve [-c PATH] [--address HOST:PORT]   serve over gRPC until SIGTERM/SIGINT
    dspy-infra start [NAME...]                 start services, live state until healthy or failed
    dspy-infra stop [NAME...]                  stop services
    dspy-infra status [--json]                 health and each service's state
    dspy-infra logs NAME [-f] [--tail N]       a service's log lines
    dspy-infra submit HANDLER [PAYLOAD] [--wait]   submit a task, print its id
    dspy-infra task ID [--wait] [--json]       a task's status
    dspy-infra cancel ID                       cancel a task
    dspy-infra events [-f] [--type TYPE]       the server's events
    dspy-infra --version

The commands from ``start`` on talk to a server (``--address``, default
``$DSPY_INFRA_ADDRESS`` else 127.0.0.1:50052; token from ``$DSPY_INFRA_TOKEN``
or ``--token-file``).

Exit codes (the contract scripts rely on):

    0    success
    1    runtime failure (a file could not be written, a service failed,
         a task failed, ``status`` not healthy, ...)
    2    usage or configuration error (bad arguments, invalid configuration,
         a file that would be overwritten without --force, a task refused)
    3    no server answers at the address (or it refused the token, or went away)
    4    the server holds no such task or service
    130  interrupted (Ctrl-C)

Errors go to stderr as ``error: <message>``, and the library's warnings (what a
compose file holds that is skipped) as ``warning: <message>``; results go to stdout.

Each command family is one module with a ``register(subparsers)`` function
that adds its parsers and sets ``handler`` (``Namespace -> int``) on each
leaf; adding a family is adding a module to ``_FAMILIES``.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TextIO

from dspy_infra.cli import client_cmd, config_cmd, serve_cmd
from dspy_infra.cli._common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_NO_SERVER,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    Handler,
    ungrouped,
)
from dspy_infra.errors import ComposeWarning, ConfigError, InfraError

__all__ = [
    "EXIT_FAILURE",
    "EXIT_NOT_FOUND",
    "EXIT_NO_SERVER",
    "EXIT_OK",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

_FAMILIES = (config_cmd, serve_cmd, client_cmd)


def _version() -> str:
    try:
        return version("dspy-infra")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one subcommand per family, one module per family."""
    parser = argparse.ArgumentParser(
        prog="dspy-infra",
        description="Services, tasks and workflows for DSPy agent stacks.",
        epilog=(
            "exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error, "
            "3 no server answers, 4 no such task or service"
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # Not required: a bare `dspy-infra` (or `dspy-infra config`) prints the
    # full help of that level, which says more than argparse's one-line error.
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    parser.set_defaults(handler=None, help_parser=parser)
    for family in _FAMILIES:
        family.register(subparsers)
    return parser


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _exit_code(code: str | int | None) -> int:
    if code is None or isinstance(code, int):
        return code or EXIT_OK
    # SystemExit("message"): argparse never does this, but a message means failure.
    print(code, file=sys.stderr)
    return EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: argparse exits itself
        return _exit_code(exc.code)
    handler: Handler | None = args.handler
    if handler is None:
        help_parser: argparse.ArgumentParser = args.help_parser
        help_parser.print_help(sys.stderr)
        return EXIT_USAGE
    return _with_warnings_as_messages(handler, args)


def _with_warnings_as_messages(handler: Handler, args: argparse.Namespace) -> int:
    """Run the command, printing the library's own warnings as ``warning: <message>``.

    Python's format names the line of our source that loaded the file and
    quotes it (``.../config_cmd.py:150: ComposeWarning: ...``), which tells a
    user of the command nothing; the message names the file and keys already.
    Other warnings keep Python's format: where they come from is the point.
    """
    fallback = warnings.showwarning

    def show(  # noqa: PLR0917 - the signature of warnings.showwarning
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if issubclass(category, ComposeWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            fallback(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():  # restores showwarning for a caller in this process
        warnings.showwarning = show
        return _run(handler, args)


def _run(handler: Handler, args: argparse.Namespace) -> int:
    """Call the command; turn the failures a user can act on into a message and a code."""
    try:
        return ungrouped(handler, args)
    except CommandError as exc:
        _error(str(exc))
        return exc.code
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except InfraError as exc:
        _error(str(exc))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `dspy-infra config show | head`: the reader left. Point stdout at
        # devnull so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
