"""Process groups that are stopped for good, and found again after a crash.

What we launch runs in its own session, so its pid is also its process group
id: signalling the group reaches a shell wrapper's children too, and "stopped"
means the whole group is empty, not merely that the leader exited.

Each launch is recorded in a JSON file with its owner's pid and start time.
An owner that is SIGKILLed cannot clean up; the next owner to open the same
record directory finds the records whose owner is gone and kills their groups
(:func:`sweep`), so nothing leaks past the next start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
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
    "group_running",
    "kill_group",
    "launch_group",
    "owner_identity",
    "signal_group",
    "stop_group",
    "sweep",
    "wait_group_gone",
    "write_record",
]

_SWEEP_KILL_WAIT = 5.0


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


def write_record(path: Path, data: Mapping[str, Any]) -> None:
    """Record a launched group; ``data`` holds its ``pid`` and the owner's identity."""
    # The start time tells this process apart from a later one with its pid.
    path.write_text(json.dumps({**data, "start": start_time(data["pid"])}))


def sweep(records: Path, describe: Callable[[Mapping[str, Any]], str]) -> list[str]:
    """Kill the process groups recorded by owners that are no longer running.

    ``describe`` turns a record into what the returned list says about it; a
    record it cannot describe (``KeyError``, ``TypeError``) is malformed and
    only removed. Blocking: run it in a worker thread.
    """
    removed = []
    for path in sorted(records.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            owner_pid, owner_start = data["owner_pid"], data["owner_start"]
            pgid = data["pid"]
            description = describe(data)
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if start_time(owner_pid) == owner_start:
            continue  # its owner is alive: not ours to touch
        leader_start = start_time(pgid)
        # The group is ours if its leader is the process we started, or if the
        # leader is gone and only its group remains.
        if (leader_start is None or leader_start == data.get("start")) and group_alive(pgid):
            kill_group(pgid)
            removed.append(f"{description} (pid {pgid}, owner pid {owner_pid} gone)")
        path.unlink(missing_ok=True)
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
