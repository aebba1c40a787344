"""The launch ledger: what a crashed owner's successor finds, however long the owner ran."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from dspy_infra._process_group import Ledger, owner_identity, sweep
from dspy_infra._procfs import group_alive, start_time

# Pids above Linux's largest possible pid (2**22): never a running process.
_NO_PROCESS = 5_000_000


def _describe(launch: Mapping[str, Any]) -> str:
    return f"launch {launch['n']}"


@pytest.fixture
def dead_owner() -> dict[str, Any]:
    """The identity of a process that has exited: a ledger's owner that crashed."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    identity = {"owner_pid": child.pid, "owner_start": start_time(child.pid)}
    child.wait()
    return identity


@pytest.fixture
def group() -> Iterator[int]:
    """A real process group, as the runners launch them: its leader's pid."""
    process = subprocess.Popen(["sh", "-c", "sleep 1000 & wait"], start_new_session=True)
    yield process.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_the_sweep_kills_exactly_the_launches_left_open(
    tmp_path: Path, dead_owner: dict[str, Any], group: int
) -> None:
    ledger = Ledger(tmp_path, "crashed", dead_owner)
    ledger.launched(group, {"n": "left open"})
    # Thousands of launches that ended: the file is rewritten as it goes, and
    # what is still open stays in it.
    for n in range(3000):
        ledger.launched(_NO_PROCESS + n, {"n": n})
        ledger.ended(_NO_PROCESS + n)
    lines = ledger.path.read_text().splitlines()
    assert len(lines) < 1100, "never compacted"
    assert json.loads(lines[0]) == {"owner": dead_owner}
    assert json.loads(lines[1])["pid"] == group
    # The owner "crashes" with a line cut short by the crash of its machine.
    with ledger.path.open("a") as file:
        file.write('{"pid": 12')

    removed = sweep(tmp_path, _describe)

    assert removed == [f"launch left open (pid {group}, owner pid {dead_owner['owner_pid']} gone)"]
    assert not group_alive(group)
    assert list(tmp_path.iterdir()) == [], "the ledger is removed once swept"


def test_the_ledger_of_a_live_owner_is_left_alone(tmp_path: Path, group: int) -> None:
    ledger = Ledger(tmp_path, "alive", owner_identity())
    ledger.launched(group, {"n": 1})
    assert sweep(tmp_path, _describe) == []
    assert group_alive(group)
    ledger.close()
    assert ledger.path.exists(), "a launch is still open: its line must stay"


def test_a_closed_ledger_with_nothing_open_leaves_no_file(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "tidy", owner_identity())
    ledger.close()
    assert list(tmp_path.iterdir()) == [], "nothing launched: no file"
    ledger = Ledger(tmp_path, "tidy", owner_identity())
    ledger.launched(_NO_PROCESS, {"n": 1})
    ledger.ended(_NO_PROCESS)
    ledger.close()
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_ledger_is_removed(tmp_path: Path) -> None:
    (tmp_path / "garbage.jsonl").write_text("not json\n")
    (tmp_path / "empty.jsonl").write_text("")
    assert sweep(tmp_path, _describe) == []
    assert list(tmp_path.iterdir()) == []
