"""The local backend: each service is a process group on this machine.

Every service runs in its own session, so that stopping it can signal the
whole group (a shell wrapper's children included) and wait until the group is
empty. Each launch is recorded under the state dir with its owner's pid and
start time; a later ``open()`` kills the groups whose owner is gone, so a
SIGKILLed Python process leaks nothing past its next start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from anyio.abc import Process

from dspy_infra._procfs import group_alive, start_time
from dspy_infra.abc import LaunchSpec
from dspy_infra.errors import ServiceStartError

__all__ = ["Backend", "LocalBackend"]

_MAX_LINE = 64 * 1024
_SWEEP_KILL_WAIT = 5.0


class LocalProcess:
    def __init__(self, spec: LaunchSpec, process: Process, record: Path):
        self._spec = spec
        self._process = process
        self._record = record
        self._pgid = process.pid  # leader of its own session, so pgid == pid

    @property
    def id(self) -> str:
        return str(self._process.pid)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def ports(self) -> Mapping[str, int]:
        return self._spec.ports

    async def output(self) -> AsyncGenerator[str, None]:
        assert self._process.stdout is not None
        pending = b""
        async for chunk in self._process.stdout:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield _decode(line)
            while len(pending) > _MAX_LINE:
                yield _decode(pending[:_MAX_LINE])
                pending = pending[_MAX_LINE:]
        if pending:
            yield _decode(pending)

    async def wait(self) -> int:
        return await self._process.wait()

    async def stop(self, grace: float) -> int:
        self._signal(signal.SIGTERM)
        with anyio.move_on_after(grace):
            await self._wait_group_gone()
        if await self._group_alive():
            self._signal(signal.SIGKILL)
            await self._wait_group_gone()
        code = await self._process.wait()
        await anyio.to_thread.run_sync(lambda: self._record.unlink(missing_ok=True))
        return code

    async def exec(self, argv: tuple[str, ...]) -> tuple[int, str]:
        result = await anyio.run_process(
            list(argv),
            check=False,
            stderr=subprocess.STDOUT,
            cwd=self._spec.cwd,
            env=_environment(self._spec.env),
        )
        return result.returncode, _decode(result.stdout[-4096:])

    def _signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._pgid, sig)

    async def _group_alive(self) -> bool:
        # One syscall answers "gone" in the common case; only a group that
        # still answers needs the /proc scan (which tells zombies apart).
        try:
            os.killpg(self._pgid, 0)
        except ProcessLookupError:
            return False
        return await anyio.to_thread.run_sync(group_alive, self._pgid)

    async def _wait_group_gone(self) -> None:
        await self._process.wait()
        delay = 0.005
        while await self._group_alive():
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.1)


class LocalBackend:
    """Services as local process groups."""

    def __init__(self) -> None:
        self._records: Path | None = None
        self._instance_id = ""
        self._owner: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return "local"

    async def open(self, *, state_dir: Path, instance_id: str, project: str) -> list[str]:
        self._records = state_dir / "local"
        self._instance_id = instance_id
        self._owner = {
            "owner_pid": os.getpid(),
            "owner_start": start_time(os.getpid()),
            "instance": instance_id,
            "project": project,
        }
        records = self._records
        await anyio.to_thread.run_sync(lambda: records.mkdir(parents=True, exist_ok=True))
        return await anyio.to_thread.run_sync(_sweep, records)

    async def launch(self, spec: LaunchSpec) -> LocalProcess:
        if self._records is None:
            raise RuntimeError("LocalBackend.launch() before open()")
        argv = _argv(spec)
        # Shielded: once the process exists it must be recorded and handed
        # back, or a cancellation here would leak it.
        with anyio.CancelScope(shield=True):
            try:
                process = await anyio.open_process(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    cwd=spec.cwd,
                    env=_environment(spec.env),
                    start_new_session=True,
                )
            except OSError as exc:
                cwd = spec.cwd
                if cwd is not None and not await anyio.to_thread.run_sync(cwd.is_dir):
                    reason = f"working directory {str(cwd)!r} does not exist"
                else:
                    reason = f"cannot run {argv[0]!r}: {exc.strerror or exc}"
                raise ServiceStartError(spec.name, reason) from None
            record = self._records / f"{self._instance_id}-{spec.name}-{process.pid}.json"
            data = {
                **self._owner,
                "service": spec.name,
                "pid": process.pid,
                "labels": dict(spec.labels),
            }
            await anyio.to_thread.run_sync(_write_record, record, data)
        return LocalProcess(spec, process, record)

    async def close(self) -> None:
        self._records = None


Backend = LocalBackend


def _argv(spec: LaunchSpec) -> list[str]:
    if spec.shell:
        script = spec.command if isinstance(spec.command, str) else shlex.join(spec.command)
        return ["/bin/sh", "-c", script]
    assert not isinstance(spec.command, str)
    return list(spec.command)


def _environment(extra: Mapping[str, str]) -> dict[str, str]:
    # Python services block-buffer a piped stdout, which would hide the very
    # lines that log probes and log_ready wait for; unbuffer unless told not to.
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def _write_record(path: Path, data: dict[str, Any]) -> None:
    # The start time tells this process apart from a later one with its pid.
    path.write_text(json.dumps({**data, "start": start_time(data["pid"])}))


def _decode(raw: bytes) -> str:
    return raw.decode(errors="replace").rstrip("\r")


def _sweep(records: Path) -> list[str]:
    """Kill the process groups recorded by owners that are no longer running."""
    removed = []
    for path in sorted(records.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            owner_pid, owner_start = data["owner_pid"], data["owner_start"]
            pgid, service = data["pid"], data["service"]
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if start_time(owner_pid) == owner_start:
            continue  # its owner is alive: not ours to touch
        leader_start = start_time(pgid)
        # The group is ours if its leader is the process we started, or if the
        # leader is gone and only its group remains.
        if (leader_start is None or leader_start == data.get("start")) and group_alive(pgid):
            _kill_group(pgid)
            removed.append(f"{service} (pid {pgid}, owner pid {owner_pid} gone)")
        path.unlink(missing_ok=True)
    return removed


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + _SWEEP_KILL_WAIT
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)
