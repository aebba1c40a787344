"""What the server and the client agree on beyond the proto files: addresses, metadata keys."""

from __future__ import annotations

import ipaddress
import socket

import anyio

from dspy_infra.errors import ConfigError

__all__ = [
    "BASES_KEY",
    "DEFAULT_ADDRESS",
    "DETAIL_KEY",
    "ERROR_KEY",
    "INT32_MAX",
    "RUN_KEY",
    "SERVICE_KEY",
    "TASK_KEY",
    "TOKEN_KEY",
    "WORKFLOW_KEY",
    "format_address",
    "is_loopback",
    "parse_address",
]

DEFAULT_ADDRESS = "127.0.0.1:50052"

# Invocation metadata: ``authorization: Bearer <token>``, as gRPC services usually take it.
TOKEN_KEY = "authorization"  # noqa: S105 - a metadata key, not a secret
# Trailing metadata of a failed call: the library's exception class and what
# it was about, so that the client raises the same type as in-process code
# would. The status code and message alone serve any other gRPC client.
ERROR_KEY = "dspy-infra-error"
# Its library base classes, nearest first, space-separated: a client without
# the class itself (a plugin's, a newer server's) raises the nearest it has,
# a BackendUnavailable rather than a bare InfraError.
BASES_KEY = "dspy-infra-error-bases"
TASK_KEY = "dspy-infra-task-id"
SERVICE_KEY = "dspy-infra-service"
WORKFLOW_KEY = "dspy-infra-workflow-id"
RUN_KEY = "dspy-infra-run-id"
# The exception's attributes that neither the message nor the ids carry
# (``ServiceStartError.log_tail``, ``UnknownService.known``, ...), as a JSON
# object: JSON written with ``ensure_ascii`` (and DEL escaped too) is
# printable ASCII, as a metadata value must be, so unlike the ids it travels
# unquoted. A client that finds it missing (an older server) or unreadable
# leaves those attributes at their defaults.
DETAIL_KEY = "dspy-infra-error-detail"
# The largest count an int32 field holds: a larger one (a limit, attempts)
# travels as this, which means "as many as ever" all the same.
INT32_MAX = 2**31 - 1


def token_error(token: str | None) -> str | None:
    """Why ``token`` cannot be sent (a gRPC metadata value: visible ASCII), or None."""
    if token is None:
        return None
    if not token:
        return "the token is empty: give a secret, or no token"
    if not all("!" <= c <= "~" for c in token):
        return (
            "the token may only hold visible ASCII characters (no spaces, no accents): "
            "it travels in a gRPC metadata value"
        )
    return None


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into its parts; ConfigError for anything else."""
    host, sep, port = address.rpartition(":")
    # ASCII: str.isdigit() holds for digits that int() does not read ("²").
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ConfigError(f"expected HOST:PORT (as in {DEFAULT_ADDRESS}), got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address.

    A name is resolved, so that ``localhost`` counts and a name that also
    resolves to a routable address does not. The empty host means every
    interface.
    """
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = await anyio.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]).is_loopback for info in infos
    )
