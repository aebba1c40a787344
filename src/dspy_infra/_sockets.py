"""Listening sockets for a host name: one per address it names, all on one port.

For the gRPC server and the HTTP endpoint alike.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import anyio

__all__ = ["bind_all"]


async def bind_all(host: str, port: int) -> list[socket.socket]:
    """A socket bound to each address that ``host`` names, all on one port.

    A name such as ``localhost`` may stand for 127.0.0.1 and ::1, and a
    client tries them in its own order: bound to the first only, the server
    was out of reach of one that tries ::1 first. As asyncio's
    ``create_server`` and gRPC's own servers bind them all; the port of 0 is
    the one the first socket was given (chosen again when another address
    has it taken), where asyncio would give each address a port of its own.
    """
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses = list(dict.fromkeys((info[0], info[4]) for info in infos))
    tries = 1 if port else _BIND_TRIES
    while True:
        try:
            return _bind_each(addresses)
        except OSError as exc:
            tries -= 1
            if exc.errno != errno.EADDRINUSE or tries == 0:
                raise


_BIND_TRIES = 20  # ports chosen for a name's first address, each taken on another


def _bind_each(addresses: list[tuple[socket.AddressFamily, Any]]) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for family, sockaddr in addresses:
            # proto=IPPROTO_TCP: asyncio switches Nagle off (TCP_NODELAY) only on
            # sockets that say they are TCP; with it on, every call waits ~40 ms.
            sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and len(addresses) > 1:
                # Its own address only: "::" would take the IPv4 port as well.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            port = socks[0].getsockname()[1] if len(socks) > 1 else sockaddr[1]
            sock.bind((sockaddr[0], port, *sockaddr[2:]))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks
