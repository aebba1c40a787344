"""One name or several, as every call that takes names accepts them."""

from __future__ import annotations

from typing import Any

__all__ = ["one_or_many"]


def one_or_many(names: Any) -> Any:
    """``names``, with a string given alone as the one name it is.

    A string is a collection of strings: iterated, a service called "kv", a
    task id or an event type became one name per letter ("unknown task '0'").
    Anything else is returned as it is, for the caller's checks to judge.
    """
    return (names,) if isinstance(names, str) else names
