"""Facts about processes from ``/proc``, for finding process groups reliably.

A pid alone does not identify a process for long: pids are reused. A pid plus
its start time (in clock ticks since boot) does, so ownership records store
both. A process group counts as gone when none of its members is alive: a
zombie member (exited, waiting to be reaped by an init that may never do it)
does not count, or stopping would wait forever in containers whose PID 1
does not reap.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["container_group", "group_alive", "group_members", "groups_with_env", "start_time"]

_PROC = Path("/proc")
_HAS_PROC = sys.platform.startswith("linux") and _PROC.is_dir()


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = (_PROC / str(pid) / "stat").read_bytes().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces.
    return raw[raw.rfind(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None if it is not running."""
    if not _HAS_PROC:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return 0
        return 0
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":
        return None
    return int(fields[19])


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) members of process group ``pgid``."""
    members = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def groups_with_env(item: str) -> set[int]:
    """The process groups of the live processes whose environment holds ``item``
    (``NAME=value``); empty on a machine without /proc."""
    if not _HAS_PROC:
        return set()
    wanted = item.encode()
    groups = set()
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            try:
                found = wanted in (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue  # gone meanwhile, or another user's
            fields = _stat_fields(int(entry.name))
            if found and fields is not None and fields[0] != "Z":
                groups.add(int(fields[2]))
    return groups


def group_alive(pgid: int) -> bool:
    """Whether anything of process group ``pgid`` is still running."""
    if not _HAS_PROC:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    return bool(group_members(pgid))


def container_group(pgid: int, container_id: str) -> int | None:
    """What process group ``pgid`` is called inside container ``container_id``, if it runs there.

    A Docker engine reports its containers' processes by their pids on its
    own machine. A live member whose cgroup path holds the container's id
    tells that ``pgid`` is that group here too, and not another one: the
    engine may be on another machine, or this program in another PID
    namespace. None when no member is seen (as on a machine without /proc).
    """
    if not _HAS_PROC:
        return None
    for member in group_members(pgid):
        try:
            cgroups = (_PROC / str(member) / "cgroup").read_text()
            status = (_PROC / str(member) / "status").read_text()
        except OSError:
            continue  # gone meanwhile
        if container_id not in cgroups:
            return None
        for line in status.splitlines():
            if line.startswith("NSpgid:"):
                return int(line.split()[-1])
    return None
