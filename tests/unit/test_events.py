"""The event bus: ordering, filtering, replay, and slow subscribers."""

from __future__ import annotations

import pytest

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
    assert isinstance(received[0], EventsDropped)
    assert received[0].count == 7
    assert [e.type for e in received[1:]] == ["e0", "e1", "e2"]
    assert sum(drops) == 14  # 7 for each of the two subscribers


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
