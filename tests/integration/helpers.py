"""Helpers for the integration tests: real processes on the local backend."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import anyio
import pytest

from dspy_infra import AgentInfra
from dspy_infra.docker import build_image
from dspy_infra.remote import RemoteAgentInfra, serve

SERVICE = str(Path(__file__).with_name("_service.py"))


# The store's writer process is only used where it can run beside the event loop.
beside_the_loop = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="a writer process needs a second CPU"
)


def service(*args: str, port: bool = False, **fields: Any) -> dict[str, Any]:
    """A service table running tests/integration/_service.py with ``args``."""
    table: dict[str, Any] = {"command": [sys.executable, SERVICE, *args], **fields}
    if port:
        table["command"] += ["--port", "{port}"]
        table.setdefault("ports", {"main": 0})
        table.setdefault("health", {"tcp": "{port}"})
    return table


def unique_seconds() -> str:
    """A number of seconds for ``sleep`` that tells its processes apart from any
    other's, and outlasts any test: at least 1,000 (a pid ending in 003 gave 3,
    and the services of four tests ended on their own in one CI run)."""
    return f"{1000 + os.getpid() % 1000}.{time.time_ns() % 10**6:06d}"


def running_with(argument: str) -> list[str]:
    """The pids of the processes whose command line holds ``argument``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if argument.encode() in (entry / "cmdline").read_bytes():
                    found.append(entry.name)
            except OSError:
                pass  # gone meanwhile
    return found


def serve_without(monkeypatch: Any, route: str) -> None:
    """Make ``serve()`` lack the Orchestrator method ``route``, as a server older than it."""
    from dspy_infra.remote._generated.orchestrator import v1 as orch_pb  # noqa: PLC0415

    methods = orch_pb.OrchestratorBase.__mapping__

    def older(self: orch_pb.OrchestratorBase) -> dict[str, Any]:
        routes = dict(methods(self))
        del routes[route]
        return routes

    monkeypatch.setattr(orch_pb.OrchestratorBase, "__mapping__", older)


def dockerfile_context(tmp_path: Path, dockerfile: str) -> Path:
    """A build context, ``tmp_path / "image"``, holding ``dockerfile`` (add files beside it)."""
    context = tmp_path / "image"
    context.mkdir()
    (context / "Dockerfile").write_text(dockerfile)
    return context


@asynccontextmanager
async def built_image(context: Path, tag: str) -> AsyncIterator[str]:
    """``tag``, built from the Dockerfile in ``context``, for the block; deleted after."""
    await build_image(context, tag)
    try:
        yield tag
    finally:
        async with aiodocker.Docker() as docker:
            await docker.images.delete(tag, force=True)


def refuse_once(
    monkeypatch: pytest.MonkeyPatch,
    asked: Callable[[str, str], bool],
    error: Callable[[], BaseException],
) -> list[str]:
    """Have the first request to Docker that ``asked(path, method)`` picks raise
    ``error()``, as a busy daemon (a 500) or a broken connection would; the
    list of what was refused, to check that it came to pass."""
    real_query = aiodocker.Docker._do_query
    refused: list[str] = []

    async def query(
        self: aiodocker.Docker, path: Any, method: str, *args: Any, **kwargs: Any
    ) -> Any:
        if not refused and asked(str(path), method):
            refused.append(str(path))
            raise error()
        return await real_query(self, path, method, *args, **kwargs)

    monkeypatch.setattr(aiodocker.Docker, "_do_query", query)
    return refused


class CutEvents:
    """An event stream body that breaks, as a reset connection would: at once,
    or once ``cut`` is set (delivering nothing before)."""

    def __init__(self, content: aiohttp.StreamReader, cut: anyio.Event | None = None):
        self._content = content
        self._cut = cut

    def __aiter__(self) -> CutEvents:
        return self

    async def __anext__(self) -> bytes:
        if self._cut is not None:
            await self._cut.wait()
        raise aiohttp.ClientPayloadError("Response payload is not completed")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._content, name)


Api = AgentInfra | RemoteAgentInfra


@asynccontextmanager
async def used(infra: AgentInfra, how: str) -> AsyncIterator[Api]:
    """``infra`` itself ("inprocess"), or a client of a server serving it ("remote")."""
    if how == "inprocess":
        yield infra
        return
    async with (
        serve(infra, "127.0.0.1:0") as server,
        AgentInfra.connect(server.address) as remote,
    ):
        yield remote
