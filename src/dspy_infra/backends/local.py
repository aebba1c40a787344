"""The local backend: each service is a process group on this machine.

Every service runs in its own session, so that stopping it can signal the
whole group (a shell wrapper's children included) and wait until the group is
empty. Each launch is recorded in a ledger under the state dir with its
owner's pid and start time; a later ``open()`` kills the groups whose owner is
gone, so a SIGKILLed Python process leaks nothing past its next start.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from dspy_infra._groups import ungrouped
from dspy_infra._launch import Launched, LaunchFailed, launch_group
from dspy_infra._lines import decode, lines
from dspy_infra._process_group import (
    LEDGER_ENV,
    Ledger,
    open_ledger,
    owner_identity,
    stop_group,
)
from dspy_infra.abc import LaunchSpec
from dspy_infra.errors import ServiceStartError

__all__ = ["Backend", "LocalBackend"]

log = logging.getLogger("dspy_infra")


_EXEC_TAIL = 4096  # bytes of a command's output kept (a probe's failure message)


class LocalProcess:
    def __init__(self, spec: LaunchSpec, process: Launched, ledger: Ledger, launch: int):
        self._spec = spec
        self._process = process
        self._ledger = ledger
        self._launch = launch
        self._reading = False

    @property
    def id(self) -> str:
        return str(self._process.pid)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def ports(self) -> Mapping[str, int]:
        return self._spec.ports

    @property
    def health(self) -> str | None:
        return None

    def reach(self, host: str, port: int) -> tuple[str, int]:
        return host, port

    async def output(self) -> AsyncGenerator[str, None]:
        stdout = self._process.stdout
        assert stdout is not None
        self._reading = True
        # The pipe is closed however the reading ends: cut short (a child
        # that left the group holds it open), it would stay open for good.
        async with stdout, aclosing(lines(stdout)) as chunks:
            async for line in chunks:
                yield line

    async def wait(self) -> int:
        return await self._process.wait()

    async def stop(self, grace: float) -> int:
        code = await stop_group(self._process, grace)
        if not self._reading:  # else the reading closes it, once it has read all
            await self._process.aclose()
        try:
            await anyio.to_thread.run_sync(self._ledger.ended, self._launch)
        except OSError as exc:  # it is stopped all the same
            log.warning("cannot record that service %s stopped: %s", self._spec.name, exc)
        return code

    async def exec(self, argv: tuple[str, ...]) -> tuple[int, str]:
        # In a group of its own, stopped whole however the call ends: a probe
        # cut short by its timeout (a shell and its children) leaves nothing.
        # Recorded in the ledger as the service is, so that a probe running
        # when this program is SIGKILLed is swept at the next start too.
        try:
            process = await launch_group(
                list(argv),
                env=_environment(self._spec, self._ledger),
                cwd=self._spec.cwd,
                stderr=subprocess.STDOUT,
            )
        except LaunchFailed as exc:
            return 127, exc.reason
        launch = self._ledger.number()
        tail = b""
        try:
            # What fails in the task group is raised as itself: a probe's
            # failure says what went wrong, not "unhandled errors in a TaskGroup".
            with ungrouped():
                async with anyio.create_task_group() as tg:
                    # Written beside the check, not before it: the thread hop
                    # overlaps the command's run instead of adding to it.
                    tg.start_soon(self._record_probe, launch, process.pid)
                    assert process.stdout is not None
                    async for chunk in process.stdout:
                        tail = (tail + chunk)[-_EXEC_TAIL:]
                    code = await process.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await stop_group(process, 0)
                await process.aclose()
                await self._record_end(launch)
        return code, decode(tail)

    async def _record_probe(self, launch: int, pid: int) -> None:
        data = {"service": f"{self._spec.name} (probe)", "labels": dict(self._spec.labels)}
        try:
            await anyio.to_thread.run_sync(self._ledger.launched, launch, pid, data)
        except OSError as exc:  # the check itself is fine; only a crash would leak it now
            log.warning("cannot record a probe of service %s: %s", self._spec.name, exc)

    async def _record_end(self, launch: int) -> None:
        try:
            await anyio.to_thread.run_sync(self._ledger.ended, launch)
        except OSError as exc:  # it is stopped all the same
            log.warning("cannot record that a probe of %s ended: %s", self._spec.name, exc)


class LocalBackend:
    """Services as local process groups."""

    def __init__(self) -> None:
        self._ledger: Ledger | None = None

    @property
    def name(self) -> str:
        return "local"

    async def open(self, *, state_dir: Path, instance_id: str, project: str) -> list[str]:
        records = state_dir / "local"
        owner = {**owner_identity(), "instance": instance_id, "project": project}

        self._ledger, swept = await anyio.to_thread.run_sync(
            open_ledger, records, instance_id, owner, _describe
        )
        return swept

    async def launch(self, spec: LaunchSpec) -> LocalProcess:
        ledger = self._ledger
        if ledger is None:
            raise RuntimeError("LocalBackend.launch() before open()")
        argv = spec.argv()
        assert argv is not None, "checked when the configuration was loaded"
        if taken := _taken(spec.ports):
            raise ServiceStartError(spec.name, taken)
        # Shielded: once the process exists it must be recorded and handed
        # back, or a cancellation here would leak it.
        with anyio.CancelScope(shield=True):
            try:
                process = await launch_group(
                    argv, env=_environment(spec, ledger), cwd=spec.cwd, stderr=subprocess.STDOUT
                )
            except LaunchFailed as exc:
                raise ServiceStartError(spec.name, exc.reason) from None
            data = {"service": spec.name, "labels": dict(spec.labels)}
            launch = ledger.number()
            try:
                await anyio.to_thread.run_sync(ledger.launched, launch, process.pid, data)
            except Exception as exc:
                # Unrecorded, a crash would leak it: it does not run at all.
                await stop_group(process, 0)
                await process.aclose()
                if not isinstance(exc, OSError):
                    raise
                raise ServiceStartError(
                    spec.name, f"cannot record its launch in {str(ledger.path)!r}: {exc}"
                ) from None
        return LocalProcess(spec, process, ledger, launch)

    @property
    def on_this_machine(self) -> bool:
        """Its processes run here, with this machine's GPUs."""
        return True

    def peer_endpoint(
        self, service: str, ports: Mapping[str, int], container_ports: Mapping[str, int]
    ) -> tuple[str, Mapping[str, int]]:
        return "127.0.0.1", ports

    async def close(self) -> None:
        ledger, self._ledger = self._ledger, None
        if ledger is not None:
            # Shielded: an instance is often closed by a cancellation (a
            # timeout around its block), and the ledger's file must still be
            # closed and removed, not left open until the process ends.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(ledger.close)


Backend = LocalBackend


def _environment(spec: LaunchSpec, ledger: Ledger) -> dict[str, str]:
    # Python services block-buffer a piped stdout, which would hide the very
    # lines that log probes and log_ready wait for; unbuffer unless told not to.
    # The devices set apart for the service (gpu_ids), unless its own env
    # names some. LEDGER_ENV: a launch that a crash kept from its ledger is
    # found by it.
    devices = {"CUDA_VISIBLE_DEVICES": ",".join(spec.gpu_ids)} if spec.gpu_ids else {}
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        **devices,
        **spec.env,
        LEDGER_ENV: ledger.path.name,
    }


def _taken(ports: Mapping[str, int]) -> str | None:
    """Why a port of the service cannot be its own (one that a program listens on), or None.

    Checked before the launch: a service that cannot bind its port exits, but
    a probe of that port reaches the other program first and passes, so the
    service was reported up until it ended. With SO_REUSEADDR, as servers
    bind, so that connections of an earlier run left in TIME_WAIT do not count.
    """
    for name, port in ports.items():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError as exc:
                return f"port {port} ({name}) is already in use on 127.0.0.1: {exc.strerror}"
    return None


def _describe(record: Mapping[str, Any]) -> str:
    return str(record["service"])
