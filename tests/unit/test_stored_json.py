"""The store's JSON decoding (``store.loads``): what ``json.loads`` gives, for the
text the store writes and for any other."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dspy_infra.scheduling.store import dumps, loads

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=20,
)


@given(JSON)
def test_it_reads_back_what_the_store_writes(value: Any) -> None:
    text = dumps(value)
    assert loads(text) == json.loads(text)
    assert dumps(loads(text)) == text


def outcome(read: Any, text: str) -> tuple[str, str]:
    try:
        return "value", repr(read(text))
    except json.JSONDecodeError as exc:
        return "error", str(exc)


@given(JSON, st.sampled_from([" ", "\n", "x", "1", "]", "{}"]), st.booleans())
def test_text_not_as_the_store_writes_it_reads_as_json_loads_reads_it(
    value: Any, extra: str, before: bool
) -> None:
    text = extra + dumps(value) if before else dumps(value) + extra
    assert outcome(loads, text) == outcome(json.loads, text)


@pytest.mark.parametrize("text", ["", "NaN", "-Infinity", "[1,", '{"a"', "1 2"])
def test_what_is_no_json_fails_as_json_loads_fails(text: str) -> None:
    assert outcome(loads, text) == outcome(json.loads, text)
