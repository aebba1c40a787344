"""One name or several, as every call that takes names accepts them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["given_names", "one_or_many"]


def one_or_many(names: Any) -> Any:
    """``names``, with a string given alone as the one name it is.

    A string is a collection of strings: iterated, a service called "kv", a
    task id or an event type became one name per letter ("unknown task '0'").
    Anything else is returned as it is, for the caller's checks to judge.
    """
    return (names,) if isinstance(names, str) else names


def given_names(names: Any) -> tuple[Any, ...]:
    """``names`` as a tuple, for calls that look each one up: one given alone
    (a string, or what is no collection of them: a number, a handle) is the
    one name it is, for the look-up to refuse as unknown, where iterating it
    raised a TypeError that named nothing."""
    names = one_or_many(names)
    return tuple(names) if isinstance(names, Iterable) else (names,)
