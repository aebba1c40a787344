"""Choosing free ports for ``ports = { main = 0 }``.

Binding port 0 and closing is the usual trick, but the kernel picks from the
ephemeral range — the same range it takes the source ports of outgoing
connections from, our own probes' included — and it may hand the same port
out twice in a row. Both make a service fail to bind now and then. So ports
are drawn below the ephemeral range, checked by binding, and never handed out
twice by the same instance, nor when a configured service has it fixed
(free now only because that service is not running yet).
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable
from pathlib import Path

__all__ = ["PortAllocator"]

_LOWEST = 10_000
_DEFAULT_EPHEMERAL_START = 32_768


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return _DEFAULT_EPHEMERAL_START


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class PortAllocator:
    """Free loopback ports, each handed out at most once, none of ``reserved``."""

    def __init__(self, reserved: Iterable[int] = ()) -> None:
        self._given = set(reserved)
        self._high = _ephemeral_start() - 1
        self._random = random.Random()  # noqa: S311 - spreading ports, not secrets

    def allocate(self) -> int:
        if self._high > _LOWEST:
            for _ in range(200):
                port = self._random.randint(_LOWEST, self._high)
                if port not in self._given and _bindable(port):
                    self._given.add(port)
                    return port
        while True:  # a tiny non-ephemeral range: fall back to the kernel's choice
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = int(sock.getsockname()[1])
            if port not in self._given:
                self._given.add(port)
                return port
