"""The launch ledger: what a crashed owner's successor finds, however long the owner ran."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from dspy_infra import _process_group, _procfs
from dspy_infra._process_group import LEDGER_ENV, Ledger, owner_identity, sweep
from dspy_infra._procfs import container_group, group_alive, start_time

# Pids above Linux's largest possible pid (2**22): never a running process.
_NO_PROCESS = 5_000_000


def _describe(launch: Mapping[str, Any]) -> str:
    return f"launch {launch['what']}"


@pytest.fixture
def dead_owner() -> dict[str, Any]:
    """The identity of a process that has exited: a ledger's owner that crashed."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    identity = {"owner_pid": child.pid, "owner_start": start_time(child.pid)}
    child.wait()
    return identity


def _group() -> subprocess.Popen[bytes]:
    """A real process group, as the runners launch them."""
    return subprocess.Popen(["sh", "-c", "sleep 1000 & wait"], start_new_session=True)


@pytest.fixture
def groups() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _launch(ledger: Ledger, pid: int, what: object) -> int:
    number = ledger.number()
    ledger.launched(number, pid, {"what": what})
    return number


def test_the_sweep_kills_exactly_the_launches_left_open(
    tmp_path: Path, dead_owner: dict[str, Any], groups: list[subprocess.Popen[bytes]]
) -> None:
    left, ended = _group(), _group()
    groups += [left, ended]
    ledger = Ledger(tmp_path, "crashed", dead_owner)
    _launch(ledger, left.pid, "left open")
    # A launch whose end is recorded is not the sweep's, even if its group
    # still runs (here: it is not; its owner stopped it, say).
    ledger.ended(_launch(ledger, ended.pid, "ended"))
    # Thousands of launches that ended, as a long-running owner records: the
    # file is rewritten as it goes, and what is still open stays in it.
    for n in range(3000):
        ledger.ended(_launch(ledger, _NO_PROCESS + n, n))
    lines = ledger.path.read_text().splitlines()
    assert len(lines) < 1100, "never compacted"
    assert json.loads(lines[0]) == {"owner": dead_owner}
    assert json.loads(lines[1])["pid"] == left.pid
    # The owner "crashes" with a line cut short by the crash of its machine,
    # and one that is not a launch at all.
    with ledger.path.open("a") as file:
        file.write('[1, 2]\n{"pid": 12')

    removed = sweep(tmp_path, _describe)

    assert removed == [
        f"launch left open (pid {left.pid}, owner pid {dead_owner['owner_pid']} gone)"
    ]
    assert not group_alive(left.pid)
    assert group_alive(ended.pid)
    assert list(tmp_path.iterdir()) == [], "the ledger is removed once swept"


def test_a_rewrite_the_owner_did_not_finish_is_swept_too(
    tmp_path: Path, dead_owner: dict[str, Any], groups: list[subprocess.Popen[bytes]]
) -> None:
    left = _group()
    groups.append(left)
    header = json.dumps({"owner": dead_owner})
    line = json.dumps(
        {"what": "mid-rewrite", "n": 1, "pid": left.pid, "start": start_time(left.pid)}
    )
    (tmp_path / "crashed-0.jsonl.tmp").write_text(f"{header}\n{line}\n")
    assert sweep(tmp_path, _describe) == [
        f"launch mid-rewrite (pid {left.pid}, owner pid {dead_owner['owner_pid']} gone)"
    ]
    assert not group_alive(left.pid)
    assert list(tmp_path.iterdir()) == []


def test_a_launch_between_fork_and_exec_as_its_owner_died_is_found_once_it_execs(
    tmp_path: Path,
    dead_owner: dict[str, Any],
    groups: list[subprocess.Popen[bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Not yet exec'd, a launch's environment is still its owner's, without
    # the marker: played by a shell that execs into it only once the sweep
    # has had its first look.
    records, go = tmp_path / "records", tmp_path / "go"
    ledger = Ledger(records, "crashed", dead_owner)
    records.mkdir()
    ledger.start()
    marker = f"{LEDGER_ENV}={ledger.path.name}"
    script = f"while [ ! -e {go} ]; do sleep 0.01; done; exec env {marker} sleep 1000"
    late = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    groups.append(late)
    looks: list[set[int]] = []

    def look(item: str) -> set[int]:
        if looks:  # the second look: the launch has exec'd by then (here, waited for)
            environ = Path(f"/proc/{late.pid}/environ")
            deadline = time.monotonic() + 30
            while marker.encode() not in environ.read_bytes().split(b"\0"):
                assert time.monotonic() < deadline, "the launch never exec'd"
                time.sleep(0.01)
        looks.append(_procfs.groups_with_env(item))
        go.touch()
        return looks[-1]

    monkeypatch.setattr(_process_group, "groups_with_env", look)
    removed = sweep(records, _describe)
    assert late.pid not in looks[0], "it was to be found only after the first look"
    assert removed == [
        f"an unrecorded launch (pid {late.pid}, owner pid {dead_owner['owner_pid']} gone)"
    ]
    assert not group_alive(late.pid)


def test_ledgers_of_live_owners_are_left_alone_and_two_owners_of_one_name_do_not_collide(
    tmp_path: Path, groups: list[subprocess.Popen[bytes]]
) -> None:
    first, second = _group(), _group()
    groups += [first, second]
    one = Ledger(tmp_path, "same", owner_identity())
    other = Ledger(tmp_path, "same", owner_identity())
    _launch(one, first.pid, 1)
    _launch(other, second.pid, 2)
    assert one.path != other.path
    assert sweep(tmp_path, _describe) == []
    assert group_alive(first.pid)
    assert group_alive(second.pid)
    one.close()
    other.close()
    assert one.path.exists(), "a launch is open: its line stays"
    assert other.path.exists()


def test_a_closed_ledger_with_nothing_open_leaves_no_file(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, "tidy", owner_identity())
    ledger.close()
    assert list(tmp_path.iterdir()) == [], "nothing launched: no file"
    ledger = Ledger(tmp_path, "tidy", owner_identity())
    ledger.ended(_launch(ledger, _NO_PROCESS, 1))
    ledger.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        _launch(ledger, _NO_PROCESS, 2)


def test_after_a_failed_write_the_file_is_rewritten_whole(
    tmp_path: Path, dead_owner: dict[str, Any], groups: list[subprocess.Popen[bytes]]
) -> None:
    left = _group()
    groups.append(left)
    ledger = Ledger(tmp_path, "flaky", dead_owner)
    _launch(ledger, left.pid, "open")
    # The disk fills up mid-line: simulated by a write that fails after part of a line.
    real_write = os.write
    calls = 0

    def failing(fd: int, data: bytes | memoryview) -> int:
        nonlocal calls
        calls += 1
        real_write(fd, bytes(data)[:5])
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "write", failing)
        with pytest.raises(OSError, match="No space"):
            _launch(ledger, _NO_PROCESS, "lost")
    assert calls == 1
    _launch(ledger, _NO_PROCESS + 1, "after")
    lines = ledger.path.read_text().splitlines()
    assert [json.loads(line).get("what") for line in lines[1:]] == ["open", "after"]
    assert sweep(tmp_path, _describe)[0].startswith("launch open")


def test_an_unreadable_ledger_is_removed(tmp_path: Path) -> None:
    (tmp_path / "garbage.jsonl").write_text("not json\n")
    (tmp_path / "empty.jsonl").write_text("")
    fresh = tmp_path / "busy.jsonl.tmp"  # perhaps a live owner's rewrite under way
    fresh.write_text('{"own')
    assert sweep(tmp_path, _describe) == []
    assert list(tmp_path.iterdir()) == [fresh]
    old = os.stat(fresh).st_mtime - 3600
    os.utime(fresh, (old, old))
    sweep(tmp_path, _describe)
    assert list(tmp_path.iterdir()) == []


def test_without_proc_no_group_is_found_in_a_container(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # On a machine without /proc (macOS, with Docker Desktop's engine) a
    # docker exec cut short cannot be found from here: that is no error.
    monkeypatch.setattr(_procfs, "_PROC", tmp_path / "proc")
    monkeypatch.setattr(_procfs, "_HAS_PROC", False)
    assert container_group(os.getpid(), "0" * 64) is None
