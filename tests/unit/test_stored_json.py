"""The store's JSON: encoding (``checks.encode_json``) writes what the store's
encoder writes, and refuses what it refuses in its words; decoding
(``store.loads``) gives what ``json.loads`` gives, for the text the store
writes and for any other."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dspy_infra.scheduling.checks import encode_json
from dspy_infra.scheduling.store import JSON_ENCODER, dumps, loads

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


@given(JSON)
def test_a_value_encodes_as_the_stores_encoder_writes_it(value: Any) -> None:
    assert encode_json(value, "the payload") == dumps(value)


def cyclic_list() -> Any:
    value: list[Any] = [1]
    value.append({"x": value})
    return value


@pytest.mark.parametrize(
    "value",
    [cyclic_list(), {1, 2}, [float("nan")], {"x": object()}, [{"a": float("inf")}]],
    ids=["cycle", "set", "nan", "object", "inf"],
)
def test_what_is_refused_is_refused_in_the_encoders_words(value: Any) -> None:
    with pytest.raises((TypeError, ValueError)) as expected:
        JSON_ENCODER.encode(value)
    with pytest.raises(ValueError, match="the payload is not JSON-compatible") as refused:
        encode_json(value, "the payload")
    assert str(refused.value) == f"the payload is not JSON-compatible ({expected.value})"
    assert encode_json([1, {"x": [2]}], "the payload") == '[1,{"x":[2]}]'  # nothing left over
