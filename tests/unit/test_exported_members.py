"""The public surface: everything in __all__ exists, is sorted, and nothing is missing."""

from __future__ import annotations

import dspy_infra


def test_all_is_sorted_and_complete() -> None:
    assert dspy_infra.__all__ == sorted(dspy_infra.__all__)
    for name in dspy_infra.__all__:
        assert getattr(dspy_infra, name).__module__.startswith("dspy_infra"), name
    public = {n for n in vars(dspy_infra) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(dspy_infra, n)).__name__ == "module"}
    assert public - modules == set(dspy_infra.__all__)
