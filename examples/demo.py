"""The dspy-infra demo: start a local stack, use it, break it, watch it heal, tear it down.

    make demo            # or: .venv/bin/python examples/demo.py

The stack is declared in examples/demo/dspy-infra.toml: a key-value store
(``redis-server`` when it is installed, else a small Python stand-in), a
one-shot migration that writes a schema version into it, a worker, and an
HTTP API that waits for all three. Everything runs as local processes on free
ports, with its state in a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from rich.console import Console
from rich.table import Table

from dspy_infra import AgentInfra, Event, InfraError, ServiceEvent, ServiceStatus

CONFIG = Path(__file__).parent / "demo" / "dspy-infra.toml"
REDIS = ["redis-server", "--port", "{port}", "--bind", "127.0.0.1", "--save", ""]
console = Console(highlight=False)


class DemoFailed(Exception):
    """Something the demo checks did not hold."""


class EventPrinter:
    """Prints every event as it happens, and lets the demo wait for one."""

    def __init__(self, start: float):
        self.start = start
        self.seen: list[Event] = []
        self._changed = anyio.Event()

    async def run(self, infra: AgentInfra) -> None:
        # since=0 first replays what happened while the services were starting;
        # the stream ends when the instance closes.
        async for event in infra.stream_events(since=0):
            service, message = "", ""
            if isinstance(event, ServiceEvent):
                service, message = event.service, event.message
            print(f"  {event.time - self.start:6.2f}s  {event.type:<19} {service:<8} {message}")
            self.seen.append(event)
            self._changed.set()
            self._changed = anyio.Event()

    async def wait_for(self, service: str, event_type: str, *, after: int = 0) -> None:
        """Wait until ``service``'s ``event_type`` event is printed (counting from ``after``)."""
        while not any(
            isinstance(e, ServiceEvent) and (e.service, e.type) == (service, event_type)
            for e in self.seen[after:]
        ):
            await self._changed.wait()


def show(statuses: dict[str, ServiceStatus]) -> None:
    table = Table("service", "state", "pid", "ports", "restarts", "last exit")
    for s in statuses.values():
        ports = ", ".join(f"{name}={port}" for name, port in s.ports.items())
        exit_code = "" if s.exit_code is None else str(s.exit_code)
        table.add_row(s.name, s.state.value, s.pid or "", ports, str(s.restarts), exit_code)
    console.print(table)


async def call_api(api: ServiceStatus) -> None:
    url = f"http://{api.host}:{api.ports['main']}/"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        response.raise_for_status()
        body = await response.json()
    print(f"GET {url} -> {response.status} {body}")
    if body.get("schema_version") != "3":
        raise DemoFailed(f"the api did not return the migration's schema version 3: {body}")


async def main() -> None:
    overrides: dict[str, Any] = {}
    if shutil.which("redis-server"):
        overrides["services"] = {"kv": {"command": REDIS}}  # replaces only kv's command
    print(f"kv: {'redis-server' if overrides else 'examples/demo/services/kv.py'}")
    printer = EventPrinter(time.time())
    pids: set[int] = set()
    with tempfile.TemporaryDirectory(prefix="dspy-infra-demo-") as state_dir:
        async with anyio.create_task_group() as tg:
            print("events:")
            async with AgentInfra.start(CONFIG, state_dir=state_dir, **overrides) as infra:
                # Here every service is up: healthy, or completed (the migration).
                tg.start_soon(printer.run, infra)
                await printer.wait_for("api", "service_healthy")
                statuses = await infra.services.status()
                show(statuses)
                pids.update(int(s.pid) for s in statuses.values() if s.pid)
                await call_api(statuses["api"])

                worker_pid = statuses["worker"].pid
                if worker_pid is None:
                    raise DemoFailed(f"the worker has no process: {statuses['worker']}")
                print(f"kill -9 the worker (pid {worker_pid}), restart='on-failure':")
                mark = len(printer.seen)
                os.kill(int(worker_pid), signal.SIGKILL)
                with anyio.fail_after(10):
                    await printer.wait_for("worker", "service_restarting", after=mark)
                    await printer.wait_for("worker", "service_healthy", after=mark)
                statuses = await infra.services.status()
                show(statuses)
                pids.update(int(s.pid) for s in statuses.values() if s.pid)
                if statuses["worker"].restarts != 1:
                    raise DemoFailed(f"expected 1 restart of the worker: {statuses['worker']}")
                print("leaving the `async with` block: teardown, dependents first")
    # The event stream ended with the instance; now nothing it started may be left.
    left = [pid for pid in sorted(pids) if group_alive(pid)]
    if left:
        raise DemoFailed(f"processes left after teardown: {left}")
    print(f"teardown clean: none of the {len(pids)} process groups started is left")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


if __name__ == "__main__":
    try:
        anyio.run(main)
    except* (InfraError, DemoFailed, TimeoutError, OSError, aiohttp.ClientError) as group:
        sys.exit("\n".join(f"demo failed: {exc}" for exc in leaves(group)))
