"""Typed events and the bus that fans them out.

The bus is the one place where the parts of an instance say what happened.
Publishing never waits: each subscriber owns a bounded buffer, and a
subscriber that falls behind loses events instead of stalling the publisher.
What it lost is counted, and the subscriber is told with an
:class:`EventsDropped` event before the next one it receives, so it can
resynchronise (every event carries a sequence number).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from typing import ClassVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from attrs import evolve, field, frozen

__all__ = ["Event", "EventBus", "EventsDropped", "ServiceEvent", "check_since"]


def check_since(since: object) -> None:
    """Refuse a ``since`` that is no event's seq, naming it: a string read from
    a file or a command line failed deep in a stream ("'>' not supported
    between instances of 'str' and 'int'"), or not at all in some streams."""
    if since is not None and (isinstance(since, bool) or not isinstance(since, int)):
        raise TypeError(f"since must be an event's seq (an int) or None, got {since!r:.200}")


@frozen(kw_only=True)
class Event:
    """Something that happened. ``seq`` is assigned by the bus, increasing by one."""

    type: str
    seq: int = 0
    time: float = field(factory=time.time)


@frozen(kw_only=True)
class ServiceEvent(Event):
    """A service changed state (starting, healthy, unhealthy, exited, restarting, ...)."""

    TYPES: ClassVar[frozenset[str]] = frozenset(
        {
            "service_pulling",
            "service_starting",
            "service_started",
            "service_healthy",
            "service_unhealthy",
            "service_exited",
            "service_completed",
            "service_restarting",
            "service_failed",
            "service_stopping",
            "service_stopped",
        }
    )

    service: str
    state: str
    exit_code: int | None = None
    message: str = ""
    dependents: tuple[str, ...] = ()


@frozen(kw_only=True)
class EventsDropped(Event):
    """This subscriber's buffer overflowed: ``count`` events were not delivered to it.

    It is local to the subscriber, so its ``seq`` is 0; the gap in the
    sequence numbers of the events around it shows what was missed.
    """

    TYPE: ClassVar[str] = "events_dropped"

    type: str = TYPE
    count: int


class _Subscriber:
    def __init__(
        self, types: frozenset[str] | None, buffer: int, accept: Callable[[Event], bool] | None
    ):
        self.types = types
        self.accept = accept
        self.send: MemoryObjectSendStream[Event]
        self.receive: MemoryObjectReceiveStream[Event]
        self.send, self.receive = anyio.create_memory_object_stream[Event](buffer)
        # The runs of events dropped and not yet announced, oldest first:
        # [seq of the first, how many]. Each notice goes where its run is,
        # after the events buffered before it and before those buffered after.
        self.gaps: deque[list[int]] = deque()
        # Whether the last event it wanted was dropped: a drop then joins its run.
        self.dropping = False

    def wants(self, event: Event) -> bool:
        return (self.types is None or event.type in self.types) and (
            self.accept is None or self.accept(event)
        )


class EventBus:
    """Fan-out of events to any number of subscribers, never blocking the publisher."""

    def __init__(
        self,
        *,
        buffer: int = 1024,
        history: int = 10_000,
        on_drop: Callable[[int], None] | None = None,
        start: int = 0,
    ):
        """``start``: the seq before the first event's (an instance's begins at its start time)."""
        self._buffer = buffer
        self._history: deque[Event] = deque(maxlen=history)
        # Each subscriber under each type it wants (None: every type), so that
        # an event is offered only to those that want its type (a task's
        # events are thousands a second; a watcher of services wants none),
        # and wanted() is O(1). A type that nobody wants has no entry.
        self._subscribers: dict[str | None, set[_Subscriber]] = {}
        self._start = start
        self._seq = start
        self._on_drop = on_drop
        self._closed = False

    @property
    def last_seq(self) -> int:
        return self._seq

    def publish(self, event: Event) -> Event:
        """Stamp ``event`` with the next sequence number and deliver it; never waits.

        The event must be fresh (its ``seq`` still 0): it is stamped in place,
        which is several times cheaper than a copy, and the scheduler
        publishes a few events per task.
        """
        self._seq += 1
        if event.seq:
            event = evolve(event, seq=self._seq)
        else:
            object.__setattr__(event, "seq", self._seq)
        self._history.append(event)
        subscribers = self._subscribers
        for sub in (*subscribers.get(event.type, ()), *subscribers.get(None, ())):
            if sub.accept is None or sub.accept(event):
                try:
                    sub.send.send_nowait(event)
                except anyio.WouldBlock:
                    if sub.dropping:
                        sub.gaps[-1][1] += 1
                    else:
                        sub.dropping = True
                        sub.gaps.append([self._seq, 1])
                    if self._on_drop is not None:
                        self._on_drop(1)
                else:
                    sub.dropping = False
        return event

    def replay(self, since: int, types: Collection[str] | None = None) -> tuple[list[Event], bool]:
        """The events of ``types`` (all when None) after ``since`` still in the history,
        and whether that is all.

        False when the history no longer reaches back to ``since``: events
        older than its last ``history`` are gone.
        """
        history = self._history
        oldest = history[0].seq if history else self._seq + 1
        events = [e for e in history if e.seq > since and (types is None or e.type in types)]
        return events, oldest <= since + 1

    def backlog(self, since: int, wants: Callable[[Event], bool]) -> list[Event]:
        """The kept events after ``since`` that ``wants``, for a consumer that resumes.

        Led by an :class:`EventsDropped` notice when the history no longer
        reaches back to ``since``, as a subscriber that fell behind is told:
        a resume would otherwise begin at the oldest kept event as if it had
        missed nothing. Its ``count`` is every event forgotten, of any type.
        Only those this bus published: a ``since`` from an earlier instance
        is older than its first event, and what came between is not its to tell.
        """
        history = self._history
        oldest = history[0].seq if history else self._seq + 1
        forgotten = oldest - max(since, self._start) - 1
        notice: list[Event] = [EventsDropped(count=forgotten)] if forgotten > 0 else []
        return notice + [e for e in history if e.seq > since and wants(e)]

    def wanted(self, event_type: str) -> bool:
        """Whether a live subscriber wants events of this type.

        Lets a publisher of very frequent events (a task started) skip
        building ones that nobody reads; those it skips are not in the
        history either.
        """
        return event_type in self._subscribers or None in self._subscribers

    def close(self) -> None:
        """End every subscription once its buffered events are read."""
        self._closed = True
        for subscribers in self._subscribers.values():
            for sub in subscribers:
                sub.send.close()

    @asynccontextmanager
    async def subscribe(
        self,
        types: Collection[str] | None = None,
        *,
        since: int | None = None,
        buffer: int | None = None,
        accept: Callable[[Event], bool] | None = None,
    ) -> AsyncIterator[AsyncIterator[Event]]:
        """Subscribe to events of ``types`` (all when None).

        With ``since``, events after that sequence number that are still in the
        bus's history are replayed first, so a consumer can resume where it
        stopped (told of those no longer kept: see :meth:`backlog`).
        ``buffer`` replaces the bus's buffer size for this subscriber (one
        that waits for a known number of events can hold them all);
        ``accept`` narrows what it is sent (the events of some tasks), so that
        others never fill that buffer.
        """
        wanted = frozenset(types) if types is not None else None
        sub = _Subscriber(wanted, self._buffer if buffer is None else buffer, accept)
        keys: Collection[str | None] = wanted if wanted is not None else (None,)
        backlog = self.backlog(since, sub.wants) if since is not None else []
        if self._closed:
            sub.send.close()
        else:
            for key in keys:
                self._subscribers.setdefault(key, set()).add(sub)
        try:
            yield self._iterate(sub, backlog)
        finally:
            for key in keys:
                subscribers = self._subscribers.get(key)
                if subscribers is not None and sub in subscribers:
                    subscribers.discard(sub)
                    if not subscribers:
                        del self._subscribers[key]
            sub.send.close()
            sub.receive.close()

    @staticmethod
    async def _iterate(sub: _Subscriber, backlog: list[Event]) -> AsyncIterator[Event]:
        # The backlog is taken in the same step as the registration, so it
        # neither overlaps nor misses the live events that follow.
        for event in backlog:
            yield event
        receive = sub.receive
        while True:
            # What is already buffered is taken without a trip through the
            # event loop (receive() always makes one): a reader of thousands
            # of task results a second pays per batch, not per event.
            try:
                event = receive.receive_nowait()
            except anyio.WouldBlock:
                if sub.gaps:  # all that came before the gap is read: say so now
                    yield _dropped(sub, None)
                try:
                    event = await receive.receive()
                except anyio.EndOfStream:
                    break
            except anyio.EndOfStream:
                break
            if sub.gaps and event.seq > sub.gaps[0][0]:
                yield _dropped(sub, event.seq)
            yield event
        if sub.gaps:
            yield _dropped(sub, None)


def _dropped(sub: _Subscriber, before: int | None) -> EventsDropped:
    """The notice of the runs dropped before seq ``before`` (all when None)."""
    gaps = sub.gaps
    count = 0
    while gaps and (before is None or gaps[0][0] < before):
        count += gaps.popleft()[1]
    if not gaps:  # a drop from now on is after this notice: a run of its own
        sub.dropping = False
    return EventsDropped(count=count)
