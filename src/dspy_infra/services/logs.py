"""A bounded ring buffer of a service's log lines, with followers."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import AsyncGenerator

import anyio

__all__ = ["LineWatch", "LinesDropped", "LogBuffer", "check_tail"]


def check_tail(tail: int | None) -> None:
    """A negative count of last lines is a mistake: refused, rather than
    read as "skip the next lines to come"."""
    if tail is not None and tail < 0:
        raise ValueError(f"tail must be 0 or more (the last lines to give), got {tail}")


class LinesDropped(str):
    """Stands in a followed log for the ``dropped`` lines lost there.

    A follower that reads slower than the service prints falls behind the
    bounded buffer: the lines that left it before they were read are gone.
    As the event stream's :class:`~dspy_infra.EventsDropped`, the notice
    tells it so, in the stream itself. A line of text too, so that code that
    only prints or stores lines shows the gap.
    """

    dropped: int

    def __new__(cls, dropped: int) -> LinesDropped:
        notice = super().__new__(
            cls, f"[dspy-infra: {dropped} log lines dropped: read too slowly to keep up]"
        )
        notice.dropped = dropped
        return notice

    def __getnewargs__(self) -> tuple[int]:  # type: ignore[override]
        # What a copy or a pickle makes it again from: the count, not the text.
        return (self.dropped,)


class LineWatch:
    """Whether a line matching ``pattern`` has been appended: see :meth:`LogBuffer.watch`."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self.found = False


class LogBuffer:
    """The last ``size`` lines of a service, numbered from 0 across restarts.

    Followers wait on an event that is replaced on every append, so a
    follower never misses a line that is still in the buffer, and a slow
    follower only loses lines that have left it, and is told how many (a
    :class:`LinesDropped` in their place). The buffer is open only
    while a supervisor may append to it (:meth:`reopen`, :meth:`close`):
    following a service that is not running, or never ran, ends with what
    is buffered instead of waiting for lines that no one will write.
    """

    def __init__(self, size: int):
        self._lines: deque[str] = deque(maxlen=size)
        self._next = 0  # number of the next line appended
        self._changed = anyio.Event()
        self._closed = True
        self._watches: set[LineWatch] = set()

    @property
    def next_line(self) -> int:
        return self._next

    def append(self, line: str) -> None:
        self._lines.append(line)
        self._next += 1
        if self._watches:
            for watch in [w for w in self._watches if w.pattern.search(line)]:
                watch.found = True
                self._watches.discard(watch)
        self._wake()

    def watch(self, pattern: re.Pattern[str], since: int) -> LineWatch:
        """Look for a line matching ``pattern``, from line ``since`` on.

        Each line is matched as it is appended, so a match counts even once
        its line has left the buffer: a service that prints more than
        ``size`` lines after its ready line, at once or over time, stays
        ready. :meth:`unwatch` once the answer no longer matters.
        """
        watch = LineWatch(pattern)
        if self.search(pattern, since):
            watch.found = True
        else:
            self._watches.add(watch)
        return watch

    def unwatch(self, watch: LineWatch) -> None:
        self._watches.discard(watch)

    def close(self) -> None:
        """Followers end once they have read what is buffered."""
        self._closed = True
        self._wake()

    def reopen(self) -> None:
        self._closed = False

    def tail(self, n: int | None = None) -> list[str]:
        lines = list(self._lines)
        return lines if n is None else lines[-n:] if n else []

    def since(self, number: int) -> list[str]:
        """Lines numbered ``number`` and later that are still buffered."""
        first = self._next - len(self._lines)
        return list(self._lines)[max(0, number - first) :]

    def search(self, pattern: re.Pattern[str], since: int) -> bool:
        return any(pattern.search(line) for line in self.since(since))

    async def wait_changed(self) -> None:
        await self._changed.wait()

    async def follow(
        self, tail: int | None = None, *, follow: bool = True
    ) -> AsyncGenerator[str, None]:
        check_tail(tail)
        buffered = len(self._lines) if tail is None else min(tail, len(self._lines))
        cursor = self._next - buffered
        while True:
            # Taken with the lines, not after they are yielded: the service may
            # print its last lines and end while the reader handles these.
            changed, closed = self._changed, self._closed
            dropped = self._next - len(self._lines) - cursor
            lines = self.since(cursor)
            cursor = self._next
            if dropped > 0:
                yield LinesDropped(dropped)
            for line in lines:
                yield line
            if not follow or closed:
                return
            await changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
