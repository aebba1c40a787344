"""The local backend passes the ContainerBackend conformance suite."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest

from dspy_infra._procfs import group_alive
from dspy_infra.abc import ContainerBackend, LaunchSpec
from dspy_infra.testing.backend_conformance import ContainerBackendConformance, IsGone

LISTEN = """
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
while True: s.accept()[0].close()
"""


class TestLocalBackend(ContainerBackendConformance):
    @pytest.fixture
    def backend_name(self) -> str:
        return "local"

    @pytest.fixture
    def base_spec(self) -> dict[str, Any]:
        return {}

    @pytest.fixture
    def listener(self) -> Callable[[str, int], LaunchSpec]:
        def make(name: str, port: int) -> LaunchSpec:
            command = (sys.executable, "-c", LISTEN, str(port))
            return LaunchSpec(name=name, command=command, ports={"main": port})

        return make

    @pytest.fixture
    def is_gone(self) -> IsGone:
        async def gone(process_id: str) -> bool:
            return not group_alive(int(process_id))

        return gone

    async def test_what_fails_in_an_exec_is_raised_as_itself(
        self, backend: ContainerBackend, sh: Callable[..., LaunchSpec]
    ) -> None:
        # Its record fails, the backend being closed: a probe's failure names
        # that, not an exception group around it.
        async with self.launched(backend, sh("sleep 1000")) as process:
            await backend.close()
            with pytest.raises(RuntimeError, match="a launch recorded in a closed ledger"):
                await process.exec(("true",))
