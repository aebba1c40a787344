"""Probes run from the library against a service, never inside it.

A probe answers one question, "is it up right now?", within its timeout. The
loops that decide *when* to ask (startup backoff, liveness interval,
thresholds) are in the supervisor.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable

import aiohttp
import anyio
from attrs import frozen

from dspy_infra._exit_codes import reported
from dspy_infra.abc import ServiceProcess
from dspy_infra.config.model import Probe
from dspy_infra.services.logs import LogBuffer
from dspy_infra.services.status import ServiceStatus

__all__ = ["ProbeResult", "ProbeRunner"]


@frozen
class ProbeResult:
    """``cut_short``: the check was stopped at the caller's deadline, before its own timeout."""

    ok: bool
    detail: str = ""
    cut_short: bool = False


class ProbeRunner:
    """Runs one service's probe; holds what it needs between attempts."""

    def __init__(
        self,
        probe: Probe,
        *,
        process: ServiceProcess,
        logs: LogBuffer,
        first_line: int,
        status: Callable[[], ServiceStatus],
        http: Callable[[], Awaitable[aiohttp.ClientSession]],
    ):
        self.probe = probe
        self._process = process
        self._logs = logs
        self._status = status
        self._http = http
        self._log = logs.watch(re.compile(probe.log), first_line) if probe.log else None
        self._body_re = re.compile(probe.body) if probe.body else None

    def close(self) -> None:
        """Stop looking at the service's lines (for a ``log`` probe)."""
        if self._log is not None:
            self._logs.unwatch(self._log)

    async def output_changed(self) -> None:
        """Return when the service prints a line: often the moment it became ready."""
        await self._logs.wait_changed()

    async def check(self, deadline: float = math.inf) -> ProbeResult:
        """One check, bounded by the probe's timeout and cut short at ``deadline``.

        ``deadline`` is on anyio's clock: the end of the startup probing,
        which a check started just before it must not overrun by a timeout.
        """
        own = anyio.current_time() + self.probe.timeout
        try:
            with anyio.CancelScope(deadline=min(own, deadline)):
                return await self._check()
            if own <= deadline:
                return ProbeResult(ok=False, detail=f"timed out after {self.probe.timeout:g}s")
            return ProbeResult(ok=False, detail="still running at the deadline", cut_short=True)
        except (OSError, aiohttp.ClientError) as exc:
            return ProbeResult(ok=False, detail=str(exc) or type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - a probe that fails in its own way fails
            # (a `call` probe's client raising its "connection refused"): retried
            # as any failed check, instead of ending the service's supervision.
            return ProbeResult(ok=False, detail=f"{type(exc).__name__}: {exc}")

    async def _check(self) -> ProbeResult:  # noqa: PLR0911 - one return per probe kind
        probe = self.probe
        if probe.tcp is not None:
            host, _, port = probe.tcp.rpartition(":")
            if host.startswith("[") and host.endswith("]"):  # "[::1]:PORT": an IPv6 address
                host = host[1:-1]
            target = self._process.reach(host or self._process.host, int(port))
            stream = await anyio.connect_tcp(*target)
            await stream.aclose()
            return ProbeResult(ok=True)
        if probe.http is not None:
            session = await self._http()
            async with session.get(probe.http, allow_redirects=False) as response:
                body = await response.text(errors="replace") if self._body_re else ""
            status_ok = (
                response.status == probe.status
                if probe.status is not None
                else 200 <= response.status < 400
            )
            if not status_ok:
                return ProbeResult(ok=False, detail=f"HTTP {response.status}")
            if self._body_re and not self._body_re.search(body):
                return ProbeResult(ok=False, detail=f"body does not match {probe.body!r}")
            return ProbeResult(ok=True)
        if probe.command is not None:
            code, output = await self._process.exec(probe.command)
            detail = f"exit {code}{reported(code)}: {output[-200:]}".strip()
            return ProbeResult(ok=code == 0, detail=detail)
        if probe.container:
            health = self._process.health
            ok = health == "healthy"
            return ProbeResult(ok=ok, detail="" if ok else f"container health: {health or 'none'}")
        if self._log is not None:
            found = self._log.found
            return ProbeResult(ok=found, detail="" if found else f"no line matches {probe.log!r}")
        assert callable(probe.call)
        ok = bool(await probe.call(self._status()))
        return ProbeResult(ok=ok, detail="" if ok else "check returned false")
