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
import itertools
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from dspy_infra._launch import Launched, signal_group
from dspy_infra._procfs import group_alive, groups_with_env, start_time

__all__ = [
    "LEDGER_ENV",
    "Ledger",
    "group_running",
    "kill_group",
    "open_ledger",
    "owner_identity",
    "stop_group",
    "sweep",
    "wait_group_empty",
    "wait_group_gone",
]

_SWEEP_KILL_WAIT = 5.0
# How long a sweep gives a launch caught between fork and exec to exec (see sweep).
_EXEC_SETTLE = 0.25
# A ledger is rewritten with only its open launches once it holds this many
# lines and four times as many as it has open.
_COMPACT_AT = 1024
_STALE_REWRITE = 60.0  # seconds after which an unreadable rewrite is left behind
_SUFFIX = ".jsonl"
# Set in the environment of what an owner launches, to its ledger's file name
# (Ledger.marker): a launch that a crash kept from being recorded is found by it.
LEDGER_ENV = "DSPY_INFRA_LEDGER"


async def group_running(pgid: int) -> bool:
    """Whether anything of the group is still running (zombies do not count)."""
    # One syscall answers "gone" in the common case; only a group that still
    # answers needs the /proc scan (which tells zombies apart).
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's group (a container's): /proc still tells
    return await anyio.to_thread.run_sync(group_alive, pgid)


async def wait_group_empty(pgid: int) -> None:
    delay = 0.005
    while await group_running(pgid):
        await anyio.sleep(delay)
        delay = min(delay * 2, 0.1)


async def wait_group_gone(process: Launched) -> None:
    await process.wait()
    await wait_group_empty(process.pid)


async def stop_group(process: Launched, grace: float) -> int:
    """SIGTERM the process's group, SIGKILL it after ``grace``; return once it is empty.

    Returns the leader's exit code. Safe to call after the leader exited: what
    is left of its group is stopped the same way. A SIGCONT follows the
    SIGTERM, as systemd sends it: a stopped member (SIGSTOP) would otherwise
    hold its SIGTERM pending, never clean up, and wait out the grace period.
    """
    pgid = process.pid  # leader of its own session, so pgid == pid
    signal_group(pgid, signal.SIGTERM)
    signal_group(pgid, signal.SIGCONT)
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
    """One owner's launches: a file of JSON lines, appended to, replaced whole when rewritten.

    The first line is the owner (its identity and whatever the caller adds);
    then a line per launch (its number ``n``, ``pid``, the process's
    ``start`` time, and the caller's data) and a line per end
    (``{"ended": n}``). One file per owner instead of one per launch:
    creating and deleting a file for every attempt of a short command cost
    more than the rest of its bookkeeping (on an ext4 without a journal,
    whose inode allocation skips every recently deleted inode, several times
    more). The file is created at the first launch; it is rewritten with only
    the launches still open once mostly ended ones fill it, or after a write
    failed (which may have left part of a line); :meth:`close` removes it
    when nothing is open.

    Blocking and thread-safe: call the methods from worker threads (but
    :meth:`number`, which is cheap, from anywhere).
    """

    def __init__(self, records: Path, name: str, owner: Mapping[str, Any]):
        # A file of its own even if another owner was given the same name.
        self.path = records / f"{name}-{os.urandom(4).hex()}{_SUFFIX}"
        self._owner = dict(owner)
        self._numbers = itertools.count(1)
        self._open: dict[int, str] = {}  # launch number -> its line
        self._lines = 0
        self._fd: int | None = None
        self._stale = True  # the file is to be (re)written before the next line
        self._closed = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Create the file now, not at the first launch: a launch whose record a
        crash cut short is then still found, by ``LEDGER_ENV`` (see :func:`sweep`)."""
        with self._lock:
            self._rewrite()

    def number(self) -> int:
        """A number for the next launch: what :meth:`launched` and :meth:`ended` are given.

        Not the pid: a pid may be another child's by the time its end is
        recorded.
        """
        return next(self._numbers)

    def launched(self, number: int, pid: int, data: Mapping[str, Any]) -> None:
        """Record a launch; on OSError, it is not recorded."""
        # The start time tells this process apart from a later one with its pid.
        line = json.dumps({**data, "n": number, "pid": pid, "start": start_time(pid)}) + "\n"
        with self._lock:
            if self._closed:
                raise RuntimeError("a launch recorded in a closed ledger")
            self._append(line)
            self._open[number] = line

    def ended(self, number: int) -> None:
        """Record a launch's end (its whole group is gone)."""
        with self._lock:
            if self._open.pop(number, None) is None or self._closed:
                return
            if self._lines >= _COMPACT_AT and self._lines >= 4 * (len(self._open) + 1):
                self._rewrite()
            else:
                self._append(json.dumps({"ended": number}) + "\n")

    def close(self) -> None:
        """Close the file; remove it if nothing it records is still open."""
        with self._lock:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if not self._open:
                self.path.unlink(missing_ok=True)

    def _append(self, line: str) -> None:
        if self._stale:
            self._rewrite()
        assert self._fd is not None
        try:
            _write_all(self._fd, line.encode())
        except OSError:
            self._stale = True
            raise
        self._lines += 1

    def _rewrite(self) -> None:
        """Replace the file by the owner and the launches still open; append to the new one."""
        partial = self.path.with_name(self.path.name + ".tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(partial, flags, 0o644)
        try:
            header = json.dumps({"owner": self._owner}) + "\n"
            _write_all(fd, (header + "".join(self._open.values())).encode())
            os.replace(partial, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            self._stale = True  # tried again before the next line
            raise
        old, self._fd = self._fd, fd
        self._lines = 1 + len(self._open)
        self._stale = False
        if old is not None:
            with contextlib.suppress(OSError):
                os.close(old)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_ledger(path: Path) -> tuple[Mapping[str, Any], list[dict[str, Any]]]:
    """A ledger's owner and its launches still open; ValueError, KeyError if malformed."""
    lines = path.read_text().splitlines()
    owner = json.loads(lines[0])["owner"]
    launches: dict[Any, dict[str, Any]] = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
            if "ended" in entry:
                launches.pop(entry["ended"], None)
            else:
                launches[entry["n"]] = entry
        except (ValueError, TypeError, KeyError):
            continue  # a line cut short (a crash of the machine mid-write), or not ours
    return owner, list(launches.values())


def open_ledger(
    records: Path,
    name: str,
    owner: Mapping[str, Any],
    describe: Callable[[Mapping[str, Any]], str],
) -> tuple[Ledger, list[str]]:
    """This owner's ledger under ``records``, after a :func:`sweep` of the dead
    owners' (what it says it removed). The file is made now, not at the first
    launch: a launch whose record a crash cut short is then still found, by
    ``LEDGER_ENV`` in its environment. Blocking: run it in a worker thread."""
    records.mkdir(parents=True, exist_ok=True)
    swept = sweep(records, describe)
    ledger = Ledger(records, name, owner)
    with contextlib.suppress(OSError):  # tried again at the first launch, which warns
        ledger.start()
    return ledger, swept


def sweep(records: Path, describe: Callable[[Mapping[str, Any]], str]) -> list[str]:
    """Kill the process groups left open in the ledgers of owners that are no longer running.

    ``describe`` turns a launch's line into what the returned list says about
    it; a ledger that cannot be read, or a launch that ``describe`` cannot
    describe (``KeyError``, ``TypeError``), is malformed and only removed.
    Blocking: run it in a worker thread.
    """
    removed: list[str] = []
    # Per dead owner: its launches' marker, the owner's pid, and the groups
    # already dealt with.
    dead: list[tuple[str, int, set[Any]]] = []
    # A ".tmp" is a rewrite that its owner did not get to finish: as good a
    # ledger as the one it was to replace.
    for path in sorted([*records.glob(f"*{_SUFFIX}"), *records.glob(f"*{_SUFFIX}.tmp")]):
        try:
            owner, launches = _read_ledger(path)
            owner_pid, owner_start = owner["owner_pid"], owner["owner_start"]
        except OSError:
            continue  # gone meanwhile, or not readable now: not ours to judge
        except (ValueError, KeyError, TypeError, IndexError):
            # Unreadable: nothing to go by. But a rewrite may be under way
            # (an owner alive, sharing the directory): a ".tmp" goes only
            # once it is clearly left behind.
            with contextlib.suppress(OSError):
                if path.suffix != ".tmp" or time.time() - path.stat().st_mtime > _STALE_REWRITE:
                    path.unlink(missing_ok=True)
            continue
        if start_time(owner_pid) == owner_start:
            continue  # its owner is alive: not ours to touch
        # Launched, but killed with its owner before the launch was recorded
        # (written beside the running command, not before it).
        marker = f"{LEDGER_ENV}={path.name.removesuffix('.tmp')}"
        known = {launch.get("pid") for launch in launches}
        removed += _kill_unrecorded(marker, owner_pid, known)
        dead.append((marker, owner_pid, known))
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
        path.unlink(missing_ok=True)
    if dead:
        # A launch its owner had begun as it was killed may have been between
        # fork and exec at that scan, its environment not yet the one that
        # holds the marker: looked for again once it has had time to exec.
        time.sleep(_EXEC_SETTLE)
        for marker, owner_pid, known in dead:
            removed += _kill_unrecorded(marker, owner_pid, known)
    return removed


def _kill_unrecorded(marker: str, owner_pid: int, known: set[Any]) -> list[str]:
    """Kill the groups launched with ``marker`` and not in ``known``, adding them to it."""
    removed = []
    for pgid in groups_with_env(marker) - known:
        kill_group(pgid)
        known.add(pgid)
        removed.append(f"an unrecorded launch (pid {pgid}, owner pid {owner_pid} gone)")
    return removed


def kill_group(pgid: int) -> None:
    """SIGKILL a group and wait (a bounded time) until it is empty. Blocking."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + _SWEEP_KILL_WAIT
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)
