"""The HTTP endpoint of an instance: ``/metrics``, ``/health`` and ``/ready``.

An aiohttp server in the instance's own event loop and task group (aiohttp
is there already: the service probes use it), so there is no thread and no
second HTTP stack. It is read-only and unauthenticated, which is why
``[metrics] address`` must be loopback unless ``allow_remote`` says
otherwise.

- ``/metrics``: the instance's registry in the Prometheus text format.
- ``/health``: JSON, the overall status, each service's and the
  scheduler's; 200 unless something is unhealthy (503).
- ``/ready``: 200 once every active service is up and the scheduler is
  open, else 503; for load balancers and ``kubectl``-style readiness checks.

Once the instance has begun to close, both say ``closing`` (503): the
endpoint stops first, but answers the requests it had taken, and the
instance answers no call by then.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
from aiohttp import web

from dspy_infra._sockets import bind_all
from dspy_infra.config.model import split_address
from dspy_infra.errors import InfraClosed
from dspy_infra.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from dspy_infra.infra import AgentInfra
    from dspy_infra.scheduling.scheduler import LocalScheduler

__all__ = ["MetricsServer", "health_document"]

# The status of /health and /ready once the instance has begun to close.
CLOSING = "closing"
_UNAVAILABLE = frozenset({"unhealthy", CLOSING})


async def health_document(infra: AgentInfra, scheduler: LocalScheduler) -> dict[str, Any]:
    """What ``/health`` answers: the health report and the scheduler's state, as JSON."""
    report = await infra.health_check()
    classes = await scheduler.classes()
    return {
        "status": report.status,
        "instance": infra.instance_id,
        "time": time.time(),
        "services": {
            name: {
                "state": s.state.value,
                "healthy": s.healthy,
                "host": s.host,
                "ports": dict(s.ports),
                "restarts": s.restarts,
                "exit_code": s.exit_code,
                "message": s.message,
            }
            for name, s in report.services.items()
        },
        "scheduler": {
            "status": "running",
            "gpus_total": len(scheduler.gpus),
            "gpus_in_use": scheduler.gpus_in_use,
            "classes": {name: c.to_json() for name, c in classes.items()},
        },
    }


class MetricsServer:
    """Serves one instance's endpoint until cancelled; ``address`` once it listens."""

    def __init__(
        self,
        address: str,
        *,
        instance: str,
        exposition: Callable[[], bytes],
        health: Callable[[], Awaitable[dict[str, Any]]],
    ):
        self._host, self._port = split_address(address)
        self._instance = instance
        self._exposition = exposition
        self._health = health
        self.address: str | None = None

    async def serve(self, *, task_status: anyio.abc.TaskStatus[str]) -> None:
        """Listen, report the bound ``host:port`` to ``task_status``, serve until cancelled."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health_route)
        app.router.add_get("/ready", self._ready)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            # Not TCPSite: for a name (localhost) and port 0, asyncio gives
            # each of its addresses (127.0.0.1, ::1) a port of its own.
            socks = await bind_all(self._host, self._port)
            try:
                for sock in socks:
                    await web.SockSite(runner, sock).start()
            except BaseException:
                for sock in socks:
                    sock.close()
                raise
            host, port = socks[0].getsockname()[:2]
            self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            task_status.started(self.address)
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await runner.cleanup()

    async def _metrics(self, _: web.Request) -> web.Response:
        body = self._exposition()
        # CONTENT_TYPE carries its own charset: aiohttp wants it in the header as it is.
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def _health_route(self, _: web.Request) -> web.Response:
        document = await self._document()
        status = 503 if document["status"] in _UNAVAILABLE else 200
        return web.json_response(document, status=status)

    async def _ready(self, _: web.Request) -> web.Response:
        document = await self._document()
        ready = document["status"] == "healthy"
        return web.json_response(
            {"ready": ready, "status": document["status"]}, status=200 if ready else 503
        )

    async def _document(self) -> dict[str, Any]:
        try:
            return await self._health()
        except InfraClosed:
            return {"status": CLOSING, "instance": self._instance}
