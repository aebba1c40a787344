"""A tiny key-value server, the demo's stand-in for ``redis-server``.

One command per line (PING, SET key value, GET key, INCR key), answered the
way Redis answers (RESP), so the same client talks to both.
"""

from __future__ import annotations

import asyncio
import sys

store: dict[str, str] = {}


def handle(words: list[str]) -> bytes:
    match [words[0].upper(), *words[1:]] if words else []:
        case ["PING"]:
            return b"+PONG\r\n"
        case ["SET", key, value]:
            store[key] = value
            return b"+OK\r\n"
        case ["GET", key] if key in store:
            data = store[key].encode()
            return b"$%d\r\n%s\r\n" % (len(data), data)
        case ["GET", _]:
            return b"$-1\r\n"
        case ["INCR", key]:
            store[key] = str(int(store.get(key, "0")) + 1)
            return b":%s\r\n" % store[key].encode()
    return b"-ERR unknown command\r\n"


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while line := await reader.readline():
        writer.write(handle(line.decode().split()))
        await writer.drain()
    writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    print(f"kv listening on 127.0.0.1:{port}")
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
