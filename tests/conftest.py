"""Shared fixtures. Tests run on asyncio: aiohttp (probes) needs it."""

from __future__ import annotations

import pytest

from dspy_infra.scheduling import gpus
from tests.engines import require_docker, require_slurm


@pytest.fixture
def gpus_as_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    """``[infra] gpus`` taken as given whatever devices this machine has: a
    GPU set to test with, also on a machine with fewer GPUs than it names."""
    monkeypatch.setattr(gpus, "_detect", lambda: ("none", None))


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
async def busybox() -> str:
    """The name of a local busybox image; skips (or fails, when required) without Docker."""
    return await require_docker()


@pytest.fixture(scope="session")
def slurm() -> str:
    """The default partition of a Slurm cluster that answers; skips (or fails) without one."""
    return require_slurm()
