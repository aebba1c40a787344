"""The store's ways of writing a new task agree: a submit by payload's rows
(``insert_all``: the shape once, then each task's id, payload and submit time)
are the rows that one ``insert`` per task writes, on a real SQLite file and in
memory alike."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspy_infra.scheduling.records import TaskRecord
from dspy_infra.scheduling.store import MemoryStore, SQLiteStore, Store, dumps

_SEQ = itertools.count(1)
_NAMES = st.text("abcxyz_-", min_size=1, max_size=8)
SHAPES = st.fixed_dictionaries(
    {
        "handler": _NAMES,
        "task_class": _NAMES,
        "priority": st.integers(0, 100),
        "needs": st.lists(_NAMES, max_size=3).map(tuple),
        "workflow_id": st.none() | _NAMES,
        "max_attempts": st.integers(1, 5),
        "timeout": st.none() | st.floats(0.001, 1e6),
        "need": st.tuples(st.floats(0, 64), st.integers(0, 10**6), st.integers(0, 8)),
    }
)
PAYLOADS = st.lists(st.none() | st.integers() | st.text(max_size=20), min_size=1, max_size=5)


def records(shape: dict[str, Any], payloads: list[Any], prefix: str) -> list[TaskRecord]:
    return [
        TaskRecord(
            task_id=f"{prefix}{i}",
            payload=dumps(payload),
            submitted_at=1000.0 + i,
            seq=next(_SEQ),
            **shape,
        )
        for i, payload in enumerate(payloads)
    ]


@pytest.fixture
def sqlite_stores(tmp_path: Path) -> Iterator[tuple[SQLiteStore, SQLiteStore]]:
    one, other = SQLiteStore(tmp_path / "a" / "tasks.db"), SQLiteStore(tmp_path / "b" / "tasks.db")
    one.open()
    other.open()
    yield one, other
    one.close()
    other.close()


def check_agree(
    by_rows: Store, all_at_once: Store, shape: dict[str, Any], payloads: list[Any]
) -> None:
    prefix = f"t{next(_SEQ)}-"
    new = records(shape, payloads, prefix)
    # One of them stored already, as something else: it is left as it was.
    earlier = records({**shape, "priority": 7, "handler": "earlier"}, ["kept"], prefix)[0]
    for store in (by_rows, all_at_once):
        store.apply([("insert", earlier.row())])
    by_rows.apply([("insert", r.row()) for r in new])
    all_at_once.apply([TaskRecord.insert_all(new)])
    for record in new:
        assert all_at_once.get(record.task_id) == by_rows.get(record.task_id)
    assert all_at_once.get(earlier.task_id) == earlier.row()


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(SHAPES, PAYLOADS)
def test_on_sqlite_a_submit_by_payload_stores_the_rows_of_its_tasks_one_by_one(
    sqlite_stores: tuple[SQLiteStore, SQLiteStore], shape: dict[str, Any], payloads: list[Any]
) -> None:
    check_agree(*sqlite_stores, shape, payloads)


@given(SHAPES, PAYLOADS)
def test_in_memory_a_submit_by_payload_stores_the_rows_of_its_tasks_one_by_one(
    shape: dict[str, Any], payloads: list[Any]
) -> None:
    check_agree(MemoryStore(), MemoryStore(), shape, payloads)


@settings(max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(SHAPES, PAYLOADS)
def test_sqlite_and_memory_store_the_same_rows(
    sqlite_stores: tuple[SQLiteStore, SQLiteStore], shape: dict[str, Any], payloads: list[Any]
) -> None:
    on_disk, memory = sqlite_stores[0], MemoryStore()
    new = records(shape, payloads, f"m{next(_SEQ)}-")
    for store in (on_disk, memory):
        store.apply([TaskRecord.insert_all(new)])
    for record in new:
        assert tuple(memory.get(record.task_id) or ()) == on_disk.get(record.task_id)
