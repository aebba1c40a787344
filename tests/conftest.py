"""Shared fixtures. Tests run on asyncio: aiohttp (probes) needs it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"
