"""The event bus: ordering, filtering, replay, and slow subscribers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dspy_infra.events import Event, EventBus, EventsDropped, ServiceEvent

pytestmark = pytest.mark.anyio


def svc(type_: str, name: str = "kv") -> ServiceEvent:
    return ServiceEvent(type=type_, service=name, state="x")


async def test_events_are_numbered_and_filtered_by_type() -> None:
    bus = EventBus()
    async with bus.subscribe({"service_healthy"}) as events:
        bus.publish(svc("service_starting"))
        bus.publish(svc("service_healthy"))
        bus.close()
        received = [e async for e in events]
    assert [(e.type, e.seq) for e in received] == [("service_healthy", 2)]


async def test_a_slow_subscriber_never_blocks_the_publisher_and_is_told_what_it_lost() -> None:
    drops: list[int] = []
    bus = EventBus(buffer=3, on_drop=drops.append)
    async with bus.subscribe() as slow, bus.subscribe() as other:
        for i in range(10):  # publish() is synchronous: it cannot wait for anyone
            bus.publish(Event(type=f"e{i}"))
        bus.close()
        received = [e async for e in slow]
        assert len([e async for e in other]) == 4  # 3 + the drop notice
    # The notice where the gap is: after the three it had buffered.
    assert [e.type for e in received[:3]] == ["e0", "e1", "e2"]
    assert isinstance(received[3], EventsDropped)
    assert received[3].count == 7
    assert sum(drops) == 14  # 7 for each of the two subscribers


async def test_the_drop_notice_comes_between_the_events_around_the_gap() -> None:
    bus = EventBus(buffer=2)
    async with bus.subscribe() as events:
        for i in range(5):  # e0 e1 buffered, e2 e3 e4 dropped
            bus.publish(Event(type=f"e{i}"))
        first = await anext(events)
        bus.publish(Event(type="e5"))  # the buffer has room again: after the gap
        bus.close()
        rest = [e async for e in events]
    received = [first, *rest]
    assert [(e.type, e.seq) for e in received] == [
        ("e0", 1),
        ("e1", 2),
        ("events_dropped", 0),
        ("e5", 6),
    ]
    assert isinstance(received[2], EventsDropped)
    assert received[2].count == 3


async def test_a_reader_that_has_read_up_to_the_gap_is_told_at_once() -> None:
    bus = EventBus(buffer=1)
    async with bus.subscribe() as events:
        bus.publish(Event(type="e0"))
        bus.publish(Event(type="e1"))  # dropped
        assert (await anext(events)).type == "e0"
        # Nothing more is coming yet: the notice does not wait for it.
        notice = await anext(events)
        assert isinstance(notice, EventsDropped)
        assert notice.count == 1


@pytest.mark.parametrize(
    ("history", "since", "types", "complete"),
    [
        (5, 7, ["e8", "e9"], True),  # e6..e10 kept: all after 7 are there
        (5, 3, ["e6", "e7", "e8", "e9"], False),  # e4, e5 are gone
        (0, 10, [], True),  # nothing after 10 was published
        (0, 8, [], False),  # e9, e10 were, and none is kept
    ],
)
def test_replay_says_whether_the_history_reaches_back(
    history: int, since: int, types: list[str], complete: bool
) -> None:
    bus = EventBus(history=history)
    for i in range(1, 11):
        bus.publish(Event(type=f"e{i}"))
    wanted = {f"e{i}" for i in range(1, 10)}  # not e10
    replayed, whole = bus.replay(since, wanted)
    assert [e.type for e in replayed] == types
    assert whole is complete


async def test_since_replays_history_then_continues_live() -> None:
    bus = EventBus(history=5)
    for i in range(8):
        bus.publish(Event(type=f"old{i}"))
    async with bus.subscribe(since=5) as events:
        bus.publish(Event(type="new"))
        bus.close()
        received = [e async for e in events]
    assert [(e.type, e.seq) for e in received] == [
        ("old5", 6),
        ("old6", 7),
        ("old7", 8),
        ("new", 9),
    ]


@pytest.mark.parametrize(("since", "forgotten"), [(1, 2), (0, 3), (3, 0), (-5, 3)])
async def test_a_resume_from_beyond_the_history_is_told_what_was_forgotten(
    since: int, forgotten: int
) -> None:
    # e1..e3 are gone from a history of 5: a resume after e1 silently began at e4.
    bus = EventBus(history=5)
    for i in range(1, 9):
        bus.publish(Event(type=f"e{i}"))
    async with bus.subscribe(since=since) as events:
        bus.close()
        received = [e async for e in events]
    notices = [(e.count, e.seq) for e in received if isinstance(e, EventsDropped)]
    assert notices == ([(forgotten, 0)] if forgotten else [])
    assert [e.type for e in received if not isinstance(e, EventsDropped)] == [
        f"e{i}" for i in range(max(since + 1, 4), 9)
    ]


async def test_a_since_from_before_the_bus_began_is_no_gap_of_its_own() -> None:
    # An earlier instance's seq: what this bus published is all there.
    bus = EventBus(history=5, start=100)
    bus.publish(Event(type="e"))
    async with bus.subscribe(since=50) as events:
        bus.close()
        assert [e.type async for e in events] == ["e"]


TYPES = ["a", "b", "c"]
# A subscriber: the types it wants (None: all), and whether it takes only even seqs.
SUBSCRIBER = st.tuples(st.none() | st.frozensets(st.sampled_from(TYPES), min_size=1), st.booleans())


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["publish", "subscribe", "leave"]), st.sampled_from(TYPES)),
        max_size=30,
    ),
    st.lists(SUBSCRIBER, min_size=1, max_size=4),
)
def test_each_subscriber_gets_what_it_wants_and_wanted_says_who_listens(
    steps: list[tuple[str, str]], kinds: list[tuple[frozenset[str] | None, bool]]
) -> None:
    async def until_empty(events: AsyncIterator[Event]) -> list[Event]:
        received = []
        with anyio.move_on_after(0):  # what is buffered is read without waiting
            async for event in events:
                received.append(event)  # noqa: PERF401 - kept when the wait is cut
        return received

    async def run() -> None:
        bus = EventBus()
        # (types, even only, its subscription, its events, what it must receive)
        live: list[tuple[frozenset[str] | None, bool, Any, AsyncIterator[Event], list[Event]]]
        live = []
        for step, type_ in steps:
            if step == "subscribe":
                types, even = kinds[len(live) % len(kinds)]
                subscription = bus.subscribe(
                    types, accept=(lambda e: e.seq % 2 == 0) if even else None
                )
                live.append((types, even, subscription, await subscription.__aenter__(), []))
            elif step == "leave" and live:
                _, _, subscription, events, expected = live.pop(0)
                assert await until_empty(events) == expected
                await subscription.__aexit__(None, None, None)
            elif step == "publish":
                event = bus.publish(Event(type=type_))
                for types, even, _, _, expected in live:
                    if (types is None or type_ in types) and not (even and event.seq % 2):
                        expected.append(event)
            for t in TYPES:
                assert bus.wanted(t) == any(types is None or t in types for types, *_ in live)
        bus.close()
        for _, _, subscription, events, expected in live:
            assert [e async for e in events] == expected
            await subscription.__aexit__(None, None, None)

    anyio.run(run)
