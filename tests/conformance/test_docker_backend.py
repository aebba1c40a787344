"""The docker backend passes the ContainerBackend conformance suite, against a real dockerd."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable
from typing import Any

import aiodocker
import anyio
import pytest
from aiodocker.execs import Exec

from dspy_infra.abc import ContainerBackend, LaunchSpec
from dspy_infra.docker import engine
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

    async def test_a_cancelled_exec_killed_from_inside_is_gone_when_it_returns(
        self,
        backend: ContainerBackend,
        sh: Callable[..., LaunchSpec],
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        # A member of the docker group may not signal a root container's
        # processes: the exec's group is killed from inside, with busybox's
        # kill here, and is gone, without a word, when the exec returns.
        def refuse(pgid: int, sig: int) -> None:
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "killpg", refuse)
        caplog.set_level(logging.WARNING, logger="dspy_infra.docker")
        async with self.launched(backend, sh("sleep 1000")) as process:
            with anyio.move_on_after(1.0) as cut:
                await process.exec(("sh", "-c", "sleep 999 & sleep 999"))
            assert cut.cancelled_caught
            async with aiodocker.Docker() as docker:
                top = await docker.containers.container(process.id).top(ps_args="-o pid,args")
            assert [row for row in top["Processes"] if row[-1] == "sleep 999"] == []
        assert caplog.records == []

    async def test_a_connection_lost_while_killing_a_cancelled_exec_keeps_the_cancellation(
        self,
        backend: ContainerBackend,
        sh: Callable[..., LaunchSpec],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        # The daemon's connection breaks as the exec cut short is looked up to
        # be killed: the exec is left, and the caller is still cancelled.
        async with self.launched(backend, sh("sleep 1000")) as process:

            async def broken(self: Exec) -> Any:
                raise ConnectionResetError(104, "Connection reset by peer")

            monkeypatch.setattr(Exec, "inspect", broken)
            with anyio.move_on_after(0.5) as cut:
                await process.exec(("sleep", "999"))
            assert cut.cancelled_caught

    async def test_a_cancelled_exec_out_of_reach_is_warned_about_while_its_group_lives(
        self,
        backend: ContainerBackend,
        sh: Callable[..., LaunchSpec],
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        # Its processes out of sight from here (another PID namespace, an
        # engine elsewhere), an exec cut short is left running. Its shell
        # has exited, its child has not: that is still warned about.
        monkeypatch.setattr(engine, "container_group", lambda pgid, container_id: None)
        caplog.set_level(logging.WARNING, logger="dspy_infra.docker")
        async with self.launched(backend, sh("sleep 1000")) as process:
            with anyio.move_on_after(1.0) as cut:
                await process.exec(("sh", "-c", "sleep 999 & exit 0"))
            assert cut.cancelled_caught
        assert [record.getMessage() for record in caplog.records] == [
            f"cannot stop ('sh', '-c', 'sleep 999 & exit 0') in container {process.id[:12]}: "
            "its processes are not visible from here"
        ]

    async def test_a_cancelled_exec_out_of_reach_is_not_warned_about_once_its_container_exited(
        self,
        backend: ContainerBackend,
        sh: Callable[..., LaunchSpec],
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        # Out of sight from here as above, but the container stops as the
        # exec is cut short: nothing of it is left, and Docker's refusal to
        # list the processes of a stopped container (409) is no reason to
        # warn that it could not be stopped.
        def stopped(pgid: int, container_id: str) -> None:
            subprocess.run(["docker", "kill", container_id], check=True, capture_output=True)

        monkeypatch.setattr(engine, "container_group", stopped)
        caplog.set_level(logging.WARNING, logger="dspy_infra.docker")
        async with self.launched(backend, sh("sleep 1000")) as process:
            with anyio.move_on_after(1.0) as cut:
                await process.exec(("sleep", "999"))
            assert cut.cancelled_caught
        assert caplog.records == []
