"""Process groups that are stopped for good, and found again after a crash.

What we launch runs in its own session, so its pid is also its process group
id: signalling the group reaches a shell wrapper's children too, and "stopped"
means the whole group is empty, not merely that the leader exited.

Each owner records its launches in a :class:`Ledger`, one file of JSON lines
headed by the owner's pid and start time. An owner that is SIGKILLed cannot
clean up; the next owner to open the same record directory finds the ledgers
whose owner is gone and kills the groups still open in them (:func:`sweep`),
so nothing leaks past the next start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from anyio.abc import Process

from dspy_infra._procfs import group_alive, start_time

__all__ = [
    "LaunchFailed",
    "Ledger",
    "group_running",
    "kill_group",
    "launch_group",
    "owner_identity",
    "signal_group",
    "stop_group",
    "sweep",
    "wait_group_gone",
]

_SWEEP_KILL_WAIT = 5.0
# A ledger is rewritten with only its open launches once it holds this many
# lines and four times as many as it has open.
_COMPACT_AT = 1024
_SUFFIX = ".jsonl"


class LaunchFailed(Exception):
    """The command could not be started; ``reason`` says why, for a person."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


async def launch_group(
    argv: list[str], *, env: Mapping[str, str], cwd: Path | None, stderr: int
) -> Process:
    """Start ``argv`` in a session (a process group) of its own, stdout piped.

    Shielded: once the process exists it must be handed back, or a
    cancellation here would leak it; a pending cancellation reaches the caller
    at its next await, which then stops it.
    """
    with anyio.CancelScope(shield=True):
        try:
            process = await anyio.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=cwd,
                env=dict(env),
                start_new_session=True,
            )
        except OSError as exc:
            if cwd is not None and not await anyio.to_thread.run_sync(cwd.is_dir):
                reason = f"working directory {str(cwd)!r} does not exist"
            else:
                reason = f"cannot run {argv[0]!r}: {exc.strerror or exc}"
            raise LaunchFailed(reason) from None
    return process


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


async def group_running(pgid: int) -> bool:
    """Whether anything of the group is still running (zombies do not count)."""
    # One syscall answers "gone" in the common case; only a group that still
    # answers needs the /proc scan (which tells zombies apart).
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return await anyio.to_thread.run_sync(group_alive, pgid)


async def wait_group_gone(process: Process) -> None:
    await process.wait()
    delay = 0.005
    while await group_running(process.pid):
        await anyio.sleep(delay)
        delay = min(delay * 2, 0.1)


async def stop_group(process: Process, grace: float) -> int:
    """SIGTERM the process's group, SIGKILL it after ``grace``; return once it is empty.

    Returns the leader's exit code. Safe to call after the leader exited: what
    is left of its group is stopped the same way.
    """
    pgid = process.pid  # leader of its own session, so pgid == pid
    signal_group(pgid, signal.SIGTERM)
    with anyio.move_on_after(grace):
        await wait_group_gone(process)
    if await group_running(pgid):
        signal_group(pgid, signal.SIGKILL)
        await wait_group_gone(process)
    return await process.wait()


def owner_identity() -> dict[str, Any]:
    """This process as a record's owner: pid plus start time, since pids are reused."""
    return {"owner_pid": os.getpid(), "owner_start": start_time(os.getpid())}


class Ledger:
    """One owner's launches: ``RECORDS/NAME.jsonl``, appended to, never rewritten in place.

    The first line is the owner (its identity and whatever the caller adds);
    then a line per launch (``pid``, the process's ``start`` time, and the
    caller's data) and a line per end (``{"ended": pid}``). One file per owner
    instead of one per launch: creating and deleting a file for every attempt
    of a short command cost more than the rest of its bookkeeping (on an ext4
    without a journal, whose inode allocation skips every recently deleted
    inode, several times more). The file is created at the first launch, is
    rewritten with only the open launches once mostly closed ones fill it, and
    is removed by :meth:`close` when nothing is open.

    Blocking and thread-safe: call the methods from worker threads.
    """

    def __init__(self, records: Path, name: str, owner: Mapping[str, Any]):
        self.path = records / f"{name}{_SUFFIX}"
        self._owner = dict(owner)
        self._open: dict[int, str] = {}  # pid -> its launch line
        self._lines = 0
        self._fd: int | None = None
        self._lock = threading.Lock()

    def launched(self, pid: int, data: Mapping[str, Any]) -> None:
        # The start time tells this process apart from a later one with its pid.
        line = json.dumps({**data, "pid": pid, "start": start_time(pid)}) + "\n"
        with self._lock:
            if self._fd is None:
                self._reopen("")
            self._open[pid] = line
            self._append(line)

    def ended(self, pid: int) -> None:
        with self._lock:
            if self._open.pop(pid, None) is None or self._fd is None:
                return
            self._append(json.dumps({"ended": pid}) + "\n")
            if self._lines >= _COMPACT_AT and self._lines >= 4 * (len(self._open) + 1):
                self._reopen("".join(self._open.values()))

    def close(self) -> None:
        """Close the file; remove it if nothing it records is still open."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if not self._open:
                self.path.unlink(missing_ok=True)

    def _append(self, line: str) -> None:
        assert self._fd is not None
        os.write(self._fd, line.encode())
        self._lines += 1

    def _reopen(self, body: str) -> None:
        """(Re)write the file as the header and ``body``, atomically, and append to it."""
        header = json.dumps({"owner": self._owner}) + "\n"
        partial = self.path.with_name(self.path.name + ".tmp")
        partial.write_text(header + body)
        os.replace(partial, self.path)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._lines = 1 + body.count("\n")


def _read_ledger(path: Path) -> tuple[Mapping[str, Any], list[dict[str, Any]]]:
    """A ledger's owner and its launches still open; ValueError, KeyError if malformed."""
    lines = path.read_text().splitlines()
    owner = json.loads(lines[0])["owner"]
    launches: dict[int, dict[str, Any]] = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short (a crash of the machine mid-write)
        if "ended" in entry:
            launches.pop(entry["ended"], None)
        else:
            launches[entry["pid"]] = entry
    return owner, list(launches.values())


def sweep(records: Path, describe: Callable[[Mapping[str, Any]], str]) -> list[str]:
    """Kill the process groups left open in the ledgers of owners that are no longer running.

    ``describe`` turns a launch's line into what the returned list says about
    it; a ledger that cannot be read, or a launch that ``describe`` cannot
    describe (``KeyError``, ``TypeError``), is malformed and only removed.
    Blocking: run it in a worker thread.
    """
    removed = []
    for path in sorted(records.glob(f"*{_SUFFIX}")):
        try:
            owner, launches = _read_ledger(path)
            owner_pid, owner_start = owner["owner_pid"], owner["owner_start"]
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            _remove_ledger(path)
            continue
        if start_time(owner_pid) == owner_start:
            continue  # its owner is alive: not ours to touch
        for launch in launches:
            try:
                pgid = launch["pid"]
                description = describe(launch)
            except (KeyError, TypeError):
                continue
            leader_start = start_time(pgid)
            # The group is ours if its leader is the process we started, or if
            # the leader is gone and only its group remains.
            if (leader_start is None or leader_start == launch.get("start")) and group_alive(pgid):
                kill_group(pgid)
                removed.append(f"{description} (pid {pgid}, owner pid {owner_pid} gone)")
        _remove_ledger(path)
    return removed


def _remove_ledger(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)


def kill_group(pgid: int) -> None:
    """SIGKILL a group and wait (a bounded time) until it is empty. Blocking."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + _SWEEP_KILL_WAIT
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)
