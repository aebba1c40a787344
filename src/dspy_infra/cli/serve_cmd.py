"""``dspy-infra serve``: run one AgentInfra and serve it over gRPC until SIGTERM or SIGINT.

The token is never a command-line argument (any user can read those with
``ps``): it comes from ``$DSPY_INFRA_TOKEN`` or from a file.
"""

from __future__ import annotations

import argparse
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import anyio

from dspy_infra.cli._common import (
    DEFAULT_ADDRESS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    TOKEN_ENV,
    CommandError,
    Subparsers,
    add_config_option,
    read_token,
)
from dspy_infra.config import load_config

__all__ = ["DEFAULT_ADDRESS", "TOKEN_ENV", "register"]


def register(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the configured infrastructure and serve it over gRPC",
        description=(
            "Start the configured services and scheduler, and serve them over gRPC until "
            "SIGTERM or SIGINT; then stop every call, task and service, and exit 0 "
            "(a second signal exits at once, with 130). "
            "Prints 'serving on HOST:PORT' once it listens (the port chosen, for port 0)."
        ),
    )
    add_config_option(parser)
    parser.add_argument(
        "--address",
        metavar="HOST:PORT",
        help=(
            "where to listen (default: [server] address of the configuration, else "
            f"{DEFAULT_ADDRESS}); an address that is not loopback needs --tls-cert, "
            "--tls-key and a token"
        ),
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help=f"a file holding the token every call must carry (default: ${TOKEN_ENV}, if set)",
    )
    parser.add_argument("--tls-cert", type=Path, metavar="PATH", help="PEM certificate chain")
    parser.add_argument("--tls-key", type=Path, metavar="PATH", help="PEM private key")
    parser.set_defaults(handler=_serve)


def _tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CommandError("give both --tls-cert and --tls-key, or neither", code=EXIT_USAGE)
    if args.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["h2"])
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise CommandError(f"cannot load the TLS certificate: {exc}", code=EXIT_USAGE) from None
    return context


def _serve(args: argparse.Namespace) -> int:
    try:
        from dspy_infra.infra import AgentInfra  # noqa: PLC0415 - keeps `config` commands light
        from dspy_infra.remote.server import (  # noqa: PLC0415 - the grpc extra, only here
            check_serving,
            serve,
        )
    except ImportError as exc:
        raise CommandError(
            f"serving needs the grpc extra: pip install 'dspy-infra[grpc]' ({exc})"
        ) from None
    config = load_config(args.config)
    token, tls = read_token(args.token_file), _tls(args)
    address = args.address or config.server.address

    async def run() -> None:
        # Before anything starts: a wrong address or token is told at once.
        await check_serving(address, token=token, tls=tls)
        # From the start: a signal while the services come up stops them too.
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as group:
                # A scope of its own, not the group's: the signals are still
                # heard while what it served is being stopped.
                serving = anyio.CancelScope()
                group.start_soon(_stop_on_signal, signals, serving)
                with serving:
                    async with AgentInfra(config) as infra, AsyncExitStack() as stack:
                        try:
                            server = await stack.enter_async_context(
                                serve(infra, address, token=token, tls=tls)
                            )
                        except OSError as exc:  # the port is taken, say
                            raise CommandError(
                                f"cannot listen on {address}: {exc.strerror or exc}"
                            ) from None
                        print(f"serving on {server.address}", flush=True)
                        await anyio.sleep_forever()
                group.cancel_scope.cancel()

    anyio.run(run)
    return EXIT_OK


async def _stop_on_signal(signals: AsyncIterator[int], scope: anyio.CancelScope) -> None:
    """The first signal stops gracefully; a second one (Ctrl-C again) exits at once.

    What the cut-short stop had not stopped yet (service processes,
    containers, Slurm jobs) is what a crash leaves: the next start with the
    same state_dir removes it.
    """
    async for signum in signals:
        name = signal.Signals(signum).name
        if not scope.cancel_called:
            print(f"{name}: shutting down (again to stop at once)", file=sys.stderr, flush=True)
            scope.cancel()
            continue
        print(
            f"{name} again: stopping at once; what is still running is removed "
            "at the next start with this state_dir",
            file=sys.stderr,
            flush=True,
        )
        # Not an exception: the stop under way runs shielded, and would be waited for.
        os._exit(EXIT_INTERRUPTED)
