"""The smallest client for the demo's kv: Redis inline commands, RESP replies.

Both the demo's kv.py and a real ``redis-server`` understand it.
"""

from __future__ import annotations

import socket


class KV:
    def __init__(self, port: int, host: str = "127.0.0.1"):
        self._sock = socket.create_connection((host, port), timeout=5)
        self._replies = self._sock.makefile("rb")

    def command(self, *words: str) -> str | int | None:
        self._sock.sendall(" ".join(words).encode() + b"\r\n")
        line = self._replies.readline().rstrip(b"\r\n").decode()
        kind, rest = line[:1], line[1:]
        if kind == "+":
            return rest
        if kind == ":":
            return int(rest)
        if kind == "$":
            return None if rest == "-1" else self._replies.read(int(rest) + 2)[:-2].decode()
        raise RuntimeError(f"kv error: {line or 'connection closed'}")

    def close(self) -> None:
        self._replies.close()
        self._sock.close()
