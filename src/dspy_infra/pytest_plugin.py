"""pytest plugin: ``agent_infra`` fixtures, registered through the ``pytest11`` entry point.

The fixtures are async, so tests that use them run under anyio's pytest
plugin (``@pytest.mark.anyio``). Choose the configuration per test with a
marker, or for the whole run with an ini option::

    [tool.pytest.ini_options]
    agent_infra_config = "tests/dspy-infra.toml"

    @pytest.mark.anyio
    @pytest.mark.agent_infra(services=["redis"], max_concurrent_starts=2)
    async def test_cache(agent_infra): ...

``services=[...]`` starts only those services (and their dependencies)
instead of every ``autostart`` one; ``services={...}`` (service tables) is
merged into the configuration's services, as ``AgentInfra.start(services=...)``
does; other keyword arguments are config overrides. Each fixture gets its
own state directory under pytest's ``tmp_path``. ``agent_infra_session`` is
one instance for the whole session (it needs a session-scoped
``anyio_backend`` fixture in your conftest). When a test fails, the last log
lines of every service that is not up, in the instances it uses, are added
to its report.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Generator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from dspy_infra.infra import AgentInfra

__all__ = ["agent_infra", "agent_infra_session"]

_INSTANCES = pytest.StashKey[list[AgentInfra]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "agent_infra_config",
        "dspy-infra configuration file used by the agent_infra fixtures",
        default=None,
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "agent_infra(config=None, services=None, **overrides): "
        "the configuration of this test's agent_infra fixture",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> None:
    """Refuse an anyio backend other than asyncio before anyio starts it.

    The instance runs on asyncio (aiohttp serves its probes and /metrics):
    under trio it would fail deep inside, or with trio not installed, with an
    error that does not say what to change. This hook runs before anyio's
    runner is made, so the message is the same whether trio is installed
    or not.
    """
    if fixturedef.argname not in __all__:
        return
    backend = request.getfixturevalue("anyio_backend")
    name = backend[0] if isinstance(backend, tuple) else backend
    if name != "asyncio":
        pytest.fail(
            f"{fixturedef.argname} runs on asyncio, not {name!r}: have the anyio_backend "
            "fixture of the tests that use it return 'asyncio' (see docs/pytest.md)",
            pytrace=False,
        )


def _settings(request: pytest.FixtureRequest) -> tuple[Any, list[str] | None, dict[str, Any]]:
    ini = request.config.getini("agent_infra_config")
    config: Any = request.config.rootpath / ini if ini else None
    services = None
    overrides: dict[str, Any] = {}
    marker = request.node.get_closest_marker("agent_infra")
    if marker is not None:
        if marker.args:
            raise pytest.UsageError("agent_infra marker: pass config=..., not positionally")
        overrides = dict(marker.kwargs)
        config = overrides.pop("config", config)
        if isinstance(config, str | os.PathLike):
            # Relative to the rootdir, as the ini option's path is: not to the
            # working directory, which `cd tests && pytest` or an IDE that
            # runs a test from its own directory changes.
            config = request.config.rootpath / config
        services = overrides.pop("services", None)
        if isinstance(services, Mapping):
            # Service definitions, not names: an override of the services
            # table, merged into it as AgentInfra.start(services={...}) does.
            overrides["services"], services = services, None
    if services is not None:
        overrides["autostart"] = False
    return config, services, overrides


@asynccontextmanager
async def _open(request: pytest.FixtureRequest, state_dir: Path) -> AsyncIterator[AgentInfra]:
    """The instance, open in a task of its own from setup to teardown.

    Not in the task that sets the fixture up: on Ctrl-C, anyio's runner
    cancels the task that ran the test and tears the fixtures down in a new
    one, where an instance entered in the old one could not be left (its
    task group raised "exit cancel scope in a different task" halfway
    through closing). Its own task enters and leaves it, whichever task
    asks it to stop.
    """
    config, services, overrides = _settings(request)
    overrides.setdefault("state_dir", state_dir)
    infra = AgentInfra.start(config, **overrides)
    loop = asyncio.get_running_loop()
    up: asyncio.Future[None] = loop.create_future()
    stop = asyncio.Event()
    host = loop.create_task(_host(infra, services, up, stop))
    try:
        await asyncio.wait((host, up), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the setup was cancelled: so is the start
        host.cancel()
        await asyncio.wait((host,))
        raise
    if not up.done():
        host.result()  # the start's error, raised here
    request.node.stash.setdefault(_INSTANCES, []).append(infra)
    try:
        yield infra
    finally:
        request.node.stash[_INSTANCES].remove(infra)
        stop.set()
        await host


async def _host(
    infra: AgentInfra, services: list[str] | None, up: asyncio.Future[None], stop: asyncio.Event
) -> None:
    async with infra:
        if services:
            await infra.services.start(services)
        up.set_result(None)
        await stop.wait()


@pytest.fixture
async def agent_infra(
    request: pytest.FixtureRequest, anyio_backend: object, tmp_path: Path
) -> AsyncIterator[AgentInfra]:
    """An AgentInfra started for this test, and stopped (everything in it) after."""
    async with _open(request, tmp_path / "dspy-infra") as infra:
        yield infra


@pytest.fixture(scope="session")
async def agent_infra_session(
    request: pytest.FixtureRequest,
    anyio_backend: object,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[AgentInfra]:
    """One AgentInfra for the whole session (configured by the ini option only)."""
    async with _open(request, tmp_path_factory.mktemp("dspy-infra")) as infra:
        yield infra


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for infra in _used_by(item):
            for service, lines in infra.services.troubles().items():
                report.sections.append((f"agent_infra: service {service!r}", "\n".join(lines)))
    return report


def _used_by(item: pytest.Item) -> list[AgentInfra]:
    """The instances ``item`` uses: the session's only if it asked for it (directly or
    through a fixture), or every failing test of the run would show its troubles."""
    instances: list[AgentInfra] = item.stash.get(_INSTANCES, [])
    if "agent_infra_session" not in getattr(item, "fixturenames", ()):
        return [*instances]
    session: list[AgentInfra] = item.session.stash.get(_INSTANCES, [])
    return [*instances, *session]
