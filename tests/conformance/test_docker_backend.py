"""The docker backend passes the ContainerBackend conformance suite, against a real dockerd."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiodocker
import pytest

from dspy_infra.abc import LaunchSpec
from dspy_infra.testing.backend_conformance import ContainerBackendConformance, IsGone


class TestDockerBackend(ContainerBackendConformance):
    @pytest.fixture
    def backend_name(self) -> str:
        return "docker"

    @pytest.fixture
    def base_spec(self, busybox: str) -> dict[str, Any]:
        return {"image": busybox}

    @pytest.fixture
    def listener(self, busybox: str) -> Callable[[str, int], LaunchSpec]:
        def make(name: str, port: int) -> LaunchSpec:
            command = ("httpd", "-f", "-p", str(port))
            return LaunchSpec(name=name, command=command, ports={"main": port}, image=busybox)

        return make

    @pytest.fixture
    def is_gone(self) -> IsGone:
        async def gone(container_id: str) -> bool:
            async with aiodocker.Docker() as docker:
                try:
                    await docker.containers.container(container_id).show()
                except aiodocker.DockerError as exc:
                    if exc.status == 404:
                        return True
                    raise
            return False

        return gone
