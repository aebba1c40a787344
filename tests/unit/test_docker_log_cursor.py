"""The Docker log reader's place in a log, over breaks: each record once.

A model of what Docker does (records in file order, each stream's stamps
rising, the two streams' not in order; a read from ``since`` gives the
records stamped at or after it, in file order), cut at every record.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dspy_infra.docker.engine import _LogCursor

Record = tuple[int, int, bytes]  # stream, stamp (ns), line


@st.composite
def logs(draw: st.DrawFn) -> list[Record]:
    """Two streams, each stamped in order, written to one file in an order
    whose stamps may go back by up to 5 ms across streams."""
    records: list[Record] = []
    clocks = {1: 10**18, 2: 10**18}
    for i in range(draw(st.integers(1, 40))):
        stream = draw(st.sampled_from([1, 2]))
        clocks[stream] += draw(st.sampled_from([0, 1, 1000, 5_000_000]))
        records.append((stream, clocks[stream], f"{stream}:{i}\n".encode()))
    return records


def since(log: list[Record], query: dict[str, str]) -> list[Record]:
    if "since" not in query:
        return log
    seconds, nanoseconds = query["since"].split(".")
    start = int(seconds) * 10**9 + int(nanoseconds)
    return [r for r in log if r[1] >= start]


@settings(max_examples=300)
@given(logs(), st.lists(st.integers(0, 40), max_size=4))
def test_every_record_is_delivered_once_across_breaks(log: list[Record], cuts: list[int]) -> None:
    cursor = _LogCursor()
    delivered: list[bytes] = []
    for cut in [*cuts, None]:  # each read ends after `cut` records, the last one at the end
        read = since(log, cursor.query())
        for stream, stamp, line in read[:cut]:
            if new := cursor.take(stream, stamp, line, ends=True):
                delivered.append(new)
    assert sorted(delivered) == sorted(line for _, _, line in log)
    # Each stream's lines in their order.
    for stream in (1, 2):
        mine = [line for s, _, line in log if s == stream]
        assert [d for d in delivered if d in mine] == mine
