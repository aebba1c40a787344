"""A lone failure that an anyio task group wrapped, raised as itself.

anyio's task groups raise what fails in them as an exception group, even one
failure alone; a caller is told what failed, not how the code waited for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ungrouped"]


@contextmanager
def ungrouped() -> Iterator[None]:
    """Raise the one exception of a group that leaves the block; a group of more as it is."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) != 1:
            raise
        raise leaves[0] from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
