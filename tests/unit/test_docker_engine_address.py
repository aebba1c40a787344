"""Where a Docker engine's published ports are reached, from the address the client was given."""

from __future__ import annotations

import logging
from typing import Any, cast

import aiodocker
import pytest

from dspy_infra.docker.engine import _engine_address


class _Client:
    """What _engine_address reads of an aiodocker client: the address it was given."""

    def __init__(self, address: str):
        self._connection_info = address


async def address_of(given: str) -> str:
    return await _engine_address(cast("aiodocker.Docker", cast("Any", _Client(given))))


@pytest.mark.anyio
async def test_a_local_socket_is_reached_on_loopback() -> None:
    assert await address_of("unix:///var/run/docker.sock") == "127.0.0.1"


@pytest.mark.anyio
async def test_a_tcp_engine_is_reached_at_its_address() -> None:
    assert await address_of("tcp://127.0.0.2:2375") == "127.0.0.2"


@pytest.mark.anyio
async def test_a_name_only_ssh_knows_is_reached_on_loopback_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An alias of ~/.ssh/config: the engine is reached through ssh, yet the
    # name resolves nowhere else; the start went on before the lookup of its
    # address, and must not fail with a bare socket.gaierror now.
    with caplog.at_level(logging.WARNING):
        assert await address_of("ssh://my-gpu-box.invalid") == "127.0.0.1"
    assert "my-gpu-box.invalid" in caplog.text
