"""The ids the scheduler gives tasks: valid, unique, in submit order, and a forked
child's are not its parent's (their random parts are drawn in advance)."""

from __future__ import annotations

import os
import re

from dspy_infra.scheduling.scheduler import _new_task_id


def test_ids_are_32_hex_digits_unique_and_sort_by_time() -> None:
    ids = [_new_task_id() for _ in range(5_000)]  # several draws of random parts
    assert all(re.fullmatch("[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    stamps = [i[:12] for i in ids]
    assert stamps == sorted(stamps)


def test_a_forked_childs_ids_are_not_its_parents() -> None:
    _new_task_id()  # random parts drawn and kept
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(write, "".join(_new_task_id()[12:] for _ in range(10)).encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        child = os.read(read, 1000).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    parent = "".join(_new_task_id()[12:] for _ in range(10))
    assert len(child) == len(parent) == 200
    assert {child[i : i + 20] for i in range(0, 200, 20)}.isdisjoint(
        parent[i : i + 20] for i in range(0, 200, 20)
    )
