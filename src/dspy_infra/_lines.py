"""A service's output as lines, the same from a pipe (local backend) or a log (docker)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable

__all__ = ["MAX_LINE", "decode", "lines"]

# A line longer than this comes out in pieces of this size: a process that
# writes megabytes without a newline must not grow one buffer without end.
MAX_LINE = 64 * 1024


def decode(raw: bytes) -> str:
    """Text for a person: bad bytes replaced, a CRLF's carriage return dropped."""
    return raw.decode(errors="replace").rstrip("\r")


async def lines(chunks: AsyncIterable[bytes]) -> AsyncGenerator[str, None]:
    """The lines of a byte stream as it arrives, without their newlines; the last one
    even when no newline ends it. A line longer than MAX_LINE comes in pieces of it."""
    pending = b""
    async for chunk in chunks:
        *complete, pending = (pending + chunk).split(b"\n")
        for line in complete:
            for start in range(0, max(len(line), 1), MAX_LINE):
                yield decode(line[start : start + MAX_LINE])
        while len(pending) > MAX_LINE:
            yield decode(pending[:MAX_LINE])
            pending = pending[MAX_LINE:]
    if pending:
        yield decode(pending)
