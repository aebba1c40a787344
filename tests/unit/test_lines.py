"""Output lines: however a stream is cut into chunks, the same lines come out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from hypothesis import given
from hypothesis import strategies as st

from dspy_infra._lines import MAX_LINE, lines


async def _collect(chunks: list[bytes]) -> list[str]:
    async def stream() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return [line async for line in lines(stream())]


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(
    st.lists(st.text(alphabet="ab\r é", max_size=20), max_size=8),
    st.lists(st.integers(min_value=0, max_value=200), max_size=10),
    st.booleans(),
)
def test_chunking_does_not_change_the_lines(
    texts: list[str], cuts: list[int], final_newline: bool
) -> None:
    data = "\n".join(texts).encode() + (b"\n" if final_newline and texts else b"")
    parts = data.decode().split("\n")
    if parts[-1] == "":
        parts.pop()  # nothing after the last newline
    expected = [part.rstrip("\r") for part in parts]
    assert anyio.run(_collect, _split(data, cuts)) == expected


def test_a_line_without_end_comes_in_pieces() -> None:
    data = b"x" * (2 * MAX_LINE + 5) + b"\nend"
    got = anyio.run(_collect, [data[i : i + 1000] for i in range(0, len(data), 1000)])
    assert [len(line) for line in got] == [MAX_LINE, MAX_LINE, 5, 3]
    assert got[-1] == "end"
