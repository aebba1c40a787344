"""Services on the docker backend, against a real dockerd, through the public API."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import anyio
import pytest
from aiodocker.containers import DockerContainer

from dspy_infra import (
    AgentInfra,
    BackendUnavailable,
    ConfigError,
    InvalidTask,
    Resources,
    ServiceStartError,
    ServiceState,
    TaskRun,
)
from dspy_infra._procfs import start_time
from dspy_infra.docker.engine import Container, Engine, Labels
from tests.integration.helpers import CutEvents, built_image, dockerfile_context, refuse_once

pytestmark = pytest.mark.anyio

HTTPD = ["httpd", "-f", "-p", "{port}", "-h", "/www"]
_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address (netdevice(7))


def web(busybox: str, **fields: Any) -> dict[str, Any]:
    """A busybox web server that serves its own name."""
    script = "mkdir -p /www && echo {name} > /www/index.html && exec httpd -f -p {port} -h /www"
    return {
        "image": busybox,
        "command": script,
        "shell": True,
        "ports": {"main": 0},
        "health": {"http": "http://127.0.0.1:{port}/"},
        **fields,
    }


async def labelled(label: str) -> tuple[list[str], list[str]]:
    """Ids of the containers and networks carrying ``label`` (``key=value``)."""
    async with aiodocker.Docker() as docker:
        containers = await docker.containers.list(all=True, filters=json.dumps({"label": [label]}))
        networks = await docker.networks.list(filters={"label": [label]})
    return [c.id for c in containers], [n["Id"] for n in networks]


@pytest.fixture
async def project(tmp_path: Path) -> AsyncIterator[str]:
    """A project name of this test's own; nothing of it may be left at the end."""
    name = f"t{tmp_path.name[-20:].replace('_', '-').strip('-')}"
    yield name
    assert await labelled(f"dspy-infra.project={name}") == ([], [])


def start(tmp_path: Path, project: str, services: dict[str, Any]) -> AgentInfra:
    return AgentInfra.start(
        {"infra": {"backend": "docker", "project": project}, "services": services},
        state_dir=tmp_path / "state",
    )


async def commands(container: DockerContainer) -> list[str]:
    """The command lines of the processes in ``container``."""
    top = await container.top(ps_args="-o pid,args")
    return [command for *_, command in top["Processes"]]


async def fetch(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.text()


async def test_services_reach_each_other_by_name_and_are_probed_from_here(
    busybox: str, tmp_path: Path, project: str
) -> None:
    # `api` fetches from `kv` by its name and container port before serving:
    # it only becomes healthy if the instance network and placeholders work.
    api_script = (
        "until wget -q -O /tmp/kv http://{services.kv.host}:{services.kv.port}/; "
        "do sleep 0.05; done; mkdir -p /www && cp /tmp/kv /www/index.html && "
        "exec httpd -f -p {port} -h /www"
    )
    services = {
        "kv": web(busybox),
        "api": web(busybox, command=api_script, depends_on=["kv"]),
    }
    async with start(tmp_path, project, services) as infra:
        status = await infra.services.status()
        assert status["api"].state is ServiceState.HEALTHY
        assert status["kv"].host == "127.0.0.1"
        body = await fetch(f"http://127.0.0.1:{status['api'].ports['main']}/")
        assert body.strip() == "kv"
        containers, networks = await labelled(f"dspy-infra.project={project}")
        assert len(containers) == 2
        assert len(networks) == 1


async def test_fixed_container_port_is_published_on_a_free_host_port(
    busybox: str, tmp_path: Path, project: str
) -> None:
    services = {
        "site": web(
            busybox,
            command="mkdir -p /www && echo fixed > /www/index.html && exec httpd -f -p 80 -h /www",
            container_ports={"main": 80},
        )
    }
    async with start(tmp_path, project, services) as infra:
        port = (await infra.services.status())["site"].ports["main"]
        assert port != 80
        assert (await fetch(f"http://127.0.0.1:{port}/")).strip() == "fixed"


async def test_a_peer_with_a_fixed_container_port_is_reached_there_by_name(
    busybox: str, tmp_path: Path, project: str
) -> None:
    # Inside the network, {services.kv.port} is kv's container port (80),
    # not the free host port it is published on.
    api_script = (
        "until wget -q -O /tmp/kv http://{services.kv.host}:{services.kv.port}/; "
        "do sleep 0.05; done; mkdir -p /www && cp /tmp/kv /www/index.html && "
        "exec httpd -f -p {port} -h /www"
    )
    kv_script = "mkdir -p /www && echo kv > /www/index.html && exec httpd -f -p 80 -h /www"
    services = {
        "kv": web(busybox, command=kv_script, container_ports={"main": 80}),
        "api": web(
            busybox,
            command=api_script,
            depends_on=["kv"],
            health={"http": "http://127.0.0.1:{port}/", "deadline": 20},
            start_retries=0,
        ),
    }
    async with start(tmp_path, project, services) as infra:
        status = await infra.services.status()
        assert status["kv"].ports["main"] != 80
        body = await fetch(f"http://127.0.0.1:{status['api'].ports['main']}/")
        assert body.strip() == "kv"


async def test_a_service_container_gets_its_cpus_and_memory_limits(
    busybox: str, tmp_path: Path, project: str
) -> None:
    services = {"kv": web(busybox, cpus=0.5, memory_mb=64)}
    async with start(tmp_path, project, services) as infra:
        container_id = (await infra.services.status())["kv"].pid
        assert container_id is not None
        async with aiodocker.Docker() as docker:
            shown = await (await docker.containers.get(container_id)).show()
        host_config = shown["HostConfig"]
        assert (host_config["NanoCpus"], host_config["Memory"]) == (5 * 10**8, 64 * 2**20)


async def test_a_killed_container_is_restarted(busybox: str, tmp_path: Path, project: str) -> None:
    services = {"kv": web(busybox, restart="on-failure", restart_backoff={"initial": 0.05})}
    async with start(tmp_path, project, services) as infra:
        first = (await infra.services.status())["kv"].pid
        assert first is not None
        async with aiodocker.Docker() as docker:
            await docker.containers.container(first).kill(signal="SIGKILL")
        with anyio.fail_after(20):
            while True:
                status = (await infra.services.status())["kv"]
                if status.state is ServiceState.HEALTHY and status.pid not in (None, first):
                    break
                await anyio.sleep(0.05)
        assert status.restarts == 1
        assert status.exit_code == -9


async def test_image_healthcheck_decides_when_the_service_is_up(
    busybox: str, tmp_path: Path, project: str
) -> None:
    context = ready_file_image(tmp_path, busybox, "sleep 0.3; ")

    async with built_image(context, f"local/{project}-healthy:latest") as tag:
        services = {"slow": {"image": tag, "stop_timeout": 0.5}}
        async with start(tmp_path, project, services) as infra:
            status = (await infra.services.status())["slow"]
            assert status.state is ServiceState.HEALTHY


async def test_a_program_named_relative_to_the_working_directory_runs(
    busybox: str, tmp_path: Path, project: str
) -> None:
    # As Docker runs it: from the image's WORKDIR, or from the service's cwd.
    context = dockerfile_context(
        tmp_path, f'FROM {busybox}\nWORKDIR /app\nCOPY run.sh /app/run.sh\nCMD ["./run.sh"]\n'
    )
    (context / "run.sh").write_text("#!/bin/sh\necho up from $(pwd)\nexec sleep 1000\n")
    (context / "run.sh").chmod(0o755)
    async with built_image(context, f"local/{project}-workdir:latest") as tag:
        services = {
            "app": {"image": tag, "health": {"log": "^up from /app$"}, "start_retries": 0},
            "tool": {
                "image": busybox,
                "cwd": "/bin",
                "command": ["./sleep", "1000"],
                "start_retries": 0,
            },
        }
        async with start(tmp_path, project, services) as infra:
            status = await infra.services.status()
            assert status["app"].state is ServiceState.HEALTHY
            assert status["tool"].state is ServiceState.RUNNING


async def test_an_instance_closed_by_a_cancel_stops_its_containers_on_sigterm(
    busybox: str, tmp_path: Path, project: str
) -> None:
    # A long stop_timeout: the container must go on SIGTERM, as when the
    # instance closes otherwise, not wait for the SIGKILL.
    services = {"kv": {**web(busybox), "stop_timeout": 30.0}}
    with anyio.CancelScope() as scope:
        async with start(tmp_path, project, services):
            began = time.monotonic()
            scope.cancel()
            await anyio.sleep(60)
    assert time.monotonic() - began < 10


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"image": "local/no-such-image:1"}, "local/no-such-image:1"),
        ({"volumes": ["/etc/hostname:/tmp"]}, "not a directory"),
        ({"command": ["no-such-program"]}, "no-such-program"),
    ],
)
async def test_a_container_that_cannot_start_is_a_clear_error_and_leaves_nothing(
    busybox: str, tmp_path: Path, project: str, fields: dict[str, Any], message: str
) -> None:
    services = {"bad": {**web(busybox), "start_retries": 0, **fields}}
    with pytest.raises(ServiceStartError, match=message):
        async with start(tmp_path, project, services):
            pass


async def test_a_refused_network_is_a_clear_error(
    busybox: str, tmp_path: Path, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise aiodocker.DockerError(500, "no address pool left")

    monkeypatch.setattr(aiodocker.networks.DockerNetworks, "create", refuse)
    services = {"kv": web(busybox, start_retries=0)}
    with pytest.raises(ServiceStartError, match="Docker refused the instance network"):
        async with start(tmp_path, project, services):
            pass


async def test_a_port_in_use_is_a_clear_error(busybox: str, tmp_path: Path, project: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        services = {"bad": web(busybox, ports={"main": port}, start_retries=0)}
        with pytest.raises(ServiceStartError, match="already"):
            async with start(tmp_path, project, services):
                pass


async def test_no_docker_engine_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    services = {"kv": {"image": "local/busybox:latest", "command": ["true"]}}
    with pytest.raises(BackendUnavailable, match="Docker is not running"):
        async with start(tmp_path, "nodocker", services):
            pass


async def test_a_start_cancelled_while_docker_does_not_answer_leaves_no_client_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clients: list[aiodocker.Docker] = []
    version = aiodocker.Docker.version

    async def spied(self: aiodocker.Docker) -> Any:
        clients.append(self)
        return await version(self)

    monkeypatch.setattr(aiodocker.Docker, "version", spied)
    with socket.socket(socket.AF_UNIX) as hung:  # a daemon that accepts and never answers
        hung.bind(str(tmp_path / "docker.sock"))
        hung.listen()
        monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/docker.sock")
        services = {"kv": {"image": "local/busybox:latest", "command": ["true"]}}
        with anyio.move_on_after(30) as outer, anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_enter, start(tmp_path, "hungdocker", services))
                with anyio.fail_after(10):
                    while not clients:
                        await anyio.sleep(0.01)
                scope.cancel()
    assert not outer.cancel_called
    assert [client.session.closed for client in clients] == [True]


async def _enter(infra: AgentInfra) -> None:
    async with infra:
        pass


async def test_a_compose_file_starts_as_it_is(busybox: str, tmp_path: Path, project: str) -> None:
    compose = tmp_path / "docker-compose.yml"
    compose.write_text(
        f"""
name: {project}
services:
  kv:
    image: {busybox}
    command: sh -c "mkdir -p /www && echo kv > /www/index.html && httpd -f -p 80 -h /www"
    ports: ["80"]
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:80/"]
      interval: 30s
  api:
    image: {busybox}
    command: ["sh", "-c", "wget -q -O - http://kv:80/ && exec sleep 1000"]
    depends_on:
      kv: {{condition: service_healthy}}
    restart: "no"
"""
    )
    async with AgentInfra.start(compose, state_dir=tmp_path / "state") as infra:
        status = await infra.services.status()
        assert status["kv"].state is ServiceState.HEALTHY
        assert status["api"].state is ServiceState.RUNNING
        assert (await fetch(f"http://127.0.0.1:{status['kv'].ports['80']}/")).strip() == "kv"
        with anyio.fail_after(10):
            while "kv" not in [line async for line in infra.services.logs("api")]:
                await anyio.sleep(0.05)


async def test_containers_it_did_not_create_are_never_touched(
    busybox: str, tmp_path: Path, project: str
) -> None:
    # One without our labels, one of this project whose owner (this test) is alive.
    alive = {
        "dspy-infra.project": project,
        "dspy-infra.owner-host": socket.gethostname(),
        "dspy-infra.owner-pid": str(os.getpid()),
        "dspy-infra.owner-start": str(start_time(os.getpid())),
    }
    async with aiodocker.Docker() as docker:
        foreign = [
            await docker.containers.create({"Image": busybox, "Cmd": ["true"], "Labels": labels})
            for labels in ({}, alive)
        ]
        try:
            async with start(tmp_path, project, {"kv": web(busybox)}):
                pass
            for container in foreign:
                assert (await container.show())["Id"] == container.id
        finally:
            for container in foreign:
                await container.delete(force=True)


async def test_a_tcp_probe_waits_for_the_service_not_for_dockers_port_proxy(
    busybox: str, tmp_path: Path, project: str
) -> None:
    # Docker's proxy accepts on the published port at once; the service listens a second later.
    services = {
        "late": web(busybox, command="sleep 1; exec httpd -f -p {port}", health={"tcp": "{port}"})
    }
    started = anyio.current_time()
    async with start(tmp_path, project, services) as infra:
        assert anyio.current_time() - started > 1.0
        port = (await infra.services.status())["late"].ports["main"]
        stream = await anyio.connect_tcp("127.0.0.1", port)
        await stream.aclose()


@pytest.mark.parametrize("signalled_from", ["here", "inside"])
async def test_timed_out_command_probes_leave_no_process_in_the_container(
    busybox: str,
    tmp_path: Path,
    project: str,
    monkeypatch: pytest.MonkeyPatch,
    signalled_from: str,
) -> None:
    if signalled_from == "inside":  # a docker group member cannot signal a root container

        def refuse(pgid: int, sig: int) -> None:
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "killpg", refuse)
    # Healthy at the first check; every later one hangs until its timeout.
    hang = "if [ -e /tmp/probed ]; then sleep 999; fi; touch /tmp/probed"
    health = {
        "command": ["sh", "-c", hang],
        "timeout": 0.3,
        "liveness_interval": 0.1,
        "failure_threshold": 2,
    }
    services = {"kv": {"image": busybox, "command": ["sleep", "1000"], "health": health}}
    async with start(tmp_path, project, services) as infra:
        with anyio.fail_after(30):
            while (await infra.services.status())["kv"].state is not ServiceState.UNHEALTHY:
                await anyio.sleep(0.05)
        container_id = (await infra.services.status())["kv"].pid
        assert container_id is not None
        # Looked at while a probe runs, its shell beside its sleep: only the
        # processes that are exactly a sleep tell how many probes run.
        async with aiodocker.Docker() as docker:
            container = docker.containers.container(container_id)
            with anyio.fail_after(10):
                while True:
                    running = await commands(container)
                    if any("sleep 999" in c and c != "sleep 999" for c in running):
                        break
                    await anyio.sleep(0.02)
        probes = [c for c in running if c == "sleep 999"]
        assert len(probes) <= 1, f"timed-out probes still run: {probes}"


class BreaksAfter:
    """A response body that breaks once it has given ``mark``, as a reset connection would."""

    def __init__(self, content: aiohttp.StreamReader, mark: bytes):
        self._content = content
        self._mark = mark

    async def iter_any(self) -> AsyncIterator[bytes]:
        seen = b""
        async for chunk in self._content.iter_any():
            yield chunk
            seen += chunk
            if self._mark in seen:
                break
        raise aiohttp.ClientPayloadError("Response payload is not completed")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._content, name)


def break_first_followed_log(
    monkeypatch: pytest.MonkeyPatch, mark: bytes, *, then_wait: float = 0.0
) -> list[str]:
    """Break the first followed log connection once it has given ``mark``; the paths broken.

    The next followed connection is made ``then_wait`` seconds late.
    """
    real_query = aiodocker.Docker._do_query
    broken: list[str] = []

    async def flaky(self: aiodocker.Docker, path: Any, *args: Any, **kwargs: Any) -> Any:
        followed = str(path).endswith("/logs") and kwargs["params"]["follow"] == "1"
        if followed and len(broken) == 1:
            broken.append(str(path))
            await anyio.sleep(then_wait)
        response = await real_query(self, path, *args, **kwargs)
        if followed and not broken:
            broken.append(str(path))
            response.content = BreaksAfter(response.content, mark)  # type: ignore[assignment]
        return response

    monkeypatch.setattr(aiodocker.Docker, "_do_query", flaky)
    return broken


async def logged(infra: AgentInfra, name: str, expected: list[str]) -> None:
    """Wait until the service's log is ``expected``, every line once and in order."""
    with anyio.move_on_after(20):
        while (lines := [line async for line in infra.services.logs(name)]) != expected:
            assert lines == expected[: len(lines)], f"lines lost, repeated or out of order: {lines}"
            await anyio.sleep(0.05)
    assert lines == expected, "lines missing"


async def test_a_broken_log_stream_is_read_again_and_the_service_goes_on(
    busybox: str, tmp_path: Path, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first followed log connection breaks after its first chunk, as a
    # connection reset or a cut chunked body would (aiohttp's payload error).
    broken = break_first_followed_log(monkeypatch, b"")
    script = "echo one; sleep 1; echo two; exec sleep 1000"
    services = {"talker": {"image": busybox, "command": script, "shell": True}}
    async with start(tmp_path, project, services) as infra:
        await logged(infra, "talker", ["one", "two"])
        assert broken, "the log stream was never broken"
        assert (await infra.services.status())["talker"].state is ServiceState.RUNNING


async def test_a_log_read_docker_refuses_once_is_read_again(
    busybox: str, tmp_path: Path, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A busy daemon answers the first followed log read with a 500: the
    # container runs on, and so must the reading of its output.
    refused = refuse_once(
        monkeypatch,
        lambda path, _: path.endswith("/logs"),
        lambda: aiodocker.DockerError(500, "the daemon is busy"),
    )
    script = "echo one; sleep 1; echo two; exec sleep 1000"
    services = {"talker": {"image": busybox, "command": script, "shell": True}}
    async with start(tmp_path, project, services) as infra:
        await logged(infra, "talker", ["one", "two"])
        assert refused, "no log read was refused"


async def test_a_log_stream_broken_after_the_log_rotated_goes_on_where_it_was(
    busybox: str, tmp_path: Path, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Docker rotates the log at 1 kB and keeps 2 files. The stream breaks after
    # a first line of over 1 kB; 19 short lines then rotate the log once, which
    # drops the first line's file: the log's start has moved on when the
    # stream is read again, and what follows the first line must all arrive.
    # (The lines come while nothing follows the log: Docker 20.10 repeats a
    # line when it rotates a json-file log that it follows.)
    real_run = Engine.run

    async def rotating(self: Engine, config: dict[str, Any], *, image: Any) -> Container:
        rotation = {"max-size": "1k", "max-file": "2"}
        config["HostConfig"]["LogConfig"] = {"Type": "json-file", "Config": rotation}
        return await real_run(self, config, image=image)

    monkeypatch.setattr(Engine, "run", rotating)
    broken = break_first_followed_log(monkeypatch, b"\r\n", then_wait=2.0)
    first = "first " + "0" * 1100
    script = (
        f"sleep 1; echo {first}; sleep 0.5; "
        'i=1; while [ $i -lt 20 ]; do i=$((i+1)); echo "line $i"; done; '
        "sleep 3; echo after; exec sleep 1000"
    )
    services = {"talker": {"image": busybox, "command": script, "shell": True}}
    async with start(tmp_path, project, services) as infra:
        await logged(infra, "talker", [first, *(f"line {i}" for i in range(2, 21)), "after"])
        assert len(broken) == 2, "the log stream was never broken"


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        (
            {"command": "sleep 0.5; exit 143", "health": {"command": ["false"]}},
            "exited with code -15 (exit code 143 from Docker) before becoming healthy",
        ),
        (
            {
                "command": "exec sleep 1000",
                "health": {"command": ["sh", "-c", "exit 143"], "deadline": 1},
            },
            "exit -15 (exit code 143 from Docker)",
        ),
    ],
    ids=["service", "command probe"],
)
async def test_an_exit_code_docker_reports_as_a_signal_is_kept_in_messages(
    busybox: str, tmp_path: Path, project: str, fields: dict[str, Any], said: str
) -> None:
    # A program that exits 143 of its own accord reads as killed by SIGTERM
    # (-15), as Docker reports both the same; the messages keep Docker's 143.
    service = {"image": busybox, "shell": True, "start_retries": 0, **fields}
    with pytest.raises(ServiceStartError) as caught:
        async with start(tmp_path, project, {"quitter": service}):
            pass
    assert said in caught.value.reason


async def test_a_health_change_missed_while_the_event_stream_reconnects_is_seen(
    busybox: str, tmp_path: Path, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The event stream breaks as soon as it follows, and is followed again
    # 3 s later; meanwhile the image's HEALTHCHECK says healthy, which
    # Docker reports once, as an event that nobody was there to read.
    real_query = aiodocker.Docker._do_query
    connections: list[float] = []

    async def flaky(self: aiodocker.Docker, path: Any, *args: Any, **kwargs: Any) -> Any:
        events = str(path) == "events"
        if events and len(connections) == 1:
            connections.append(time.monotonic())
            await anyio.sleep(3)
        response = await real_query(self, path, *args, **kwargs)
        if events and not connections:
            connections.append(time.monotonic())
            response.content = CutEvents(response.content)  # type: ignore[assignment]
        return response

    monkeypatch.setattr(aiodocker.Docker, "_do_query", flaky)
    context = ready_file_image(tmp_path, busybox)
    async with built_image(context, f"local/{project}-healthy:latest") as tag:
        services = {"slow": {"image": tag, "stop_timeout": 0.5}}
        with anyio.fail_after(20):
            async with start(tmp_path, project, services) as infra:
                status = (await infra.services.status())["slow"]
                assert status.state is ServiceState.HEALTHY
    assert len(connections) == 2, "the event stream was never broken"


async def test_one_container_port_published_on_two_host_ports_answers_on_both(
    busybox: str, tmp_path: Path, project: str
) -> None:
    # Two names for the same container port (as compose's "8080:80" and
    # "8081:80"): Docker publishes it on both host ports.
    script = "mkdir -p /www && echo both > /www/index.html && exec httpd -f -p 8000 -h /www"
    service = {
        "image": busybox,
        "command": script,
        "shell": True,
        "ports": {"main": 0, "extra": 0},
        "container_ports": {"main": 8000, "extra": 8000},
        "health": {"http": "http://127.0.0.1:{port}/"},
    }
    async with start(tmp_path, project, {"www": service}) as infra:
        ports = (await infra.services.status())["www"].ports
        with anyio.fail_after(10):
            assert await fetch(f"http://127.0.0.1:{ports['main']}/") == "both\n"
            assert await fetch(f"http://127.0.0.1:{ports['extra']}/") == "both\n"


def ready_file_image(tmp_path: Path, busybox: str, first: str = "") -> Path:
    """The build context of an image whose HEALTHCHECK passes once its command
    (after ``first``, shell) has made /tmp/ready."""
    return dockerfile_context(
        tmp_path,
        f"FROM {busybox}\n"
        "HEALTHCHECK --interval=1s --timeout=1s CMD test -f /tmp/ready\n"
        f'CMD ["sh", "-c", "{first}touch /tmp/ready; exec sleep 1000"]\n',
    )


async def test_asking_for_the_images_healthcheck_of_an_image_without_one_fails_at_once(
    busybox: str, tmp_path: Path, project: str
) -> None:
    # As compose refuses service_healthy for a container without a
    # healthcheck: no verdict will ever come, so none is waited for.
    services = {
        "plain": {
            "image": busybox,
            "command": ["sleep", "1000"],
            "health": {"container": True},
            "start_retries": 0,
        }
    }
    with (
        anyio.fail_after(20),
        pytest.raises(ServiceStartError, match=f"image {busybox!r} declares no HEALTHCHECK"),
    ):
        async with start(tmp_path, project, services):
            pass


async def test_an_image_present_locally_that_pull_always_cannot_pull_is_not_called_missing(
    busybox: str, tmp_path: Path, project: str
) -> None:
    # As compose's pull_policy: always, the start fails; but the image is
    # here, and the message must not send the user off to build it.
    services = {"kv": web(busybox, pull="always", start_retries=0)}
    with pytest.raises(ServiceStartError) as failed:
        async with start(tmp_path, project, services):
            pass
    reason = failed.value.reason
    assert f"image {busybox!r} could not be pulled" in reason
    assert "pull = 'always'" in reason
    assert "not present locally" not in reason


async def test_an_instance_network_another_container_still_uses_is_left_with_a_warning(
    busybox: str, tmp_path: Path, project: str, caplog: pytest.LogCaptureFixture
) -> None:
    # As compose's down ("Resource is still in use"): Docker refuses to
    # remove a network in use, and the user is told what holds it.
    caplog.set_level(logging.WARNING, logger="dspy_infra.docker")
    services = {"kv": {"image": busybox, "command": ["sleep", "1000"], "stop_timeout": 0.5}}
    async with aiodocker.Docker() as docker:
        async with start(tmp_path, project, services):
            (network,) = await docker.networks.list(
                filters={"label": [f"dspy-infra.project={project}"]}
            )
            guest = await docker.containers.run(
                {
                    "Image": busybox,
                    "Cmd": ["sleep", "1000"],
                    "HostConfig": {"NetworkMode": network["Name"]},
                }
            )
        try:
            assert f"{network['Name']!r} is left" in caplog.text
            assert guest.id[:12] in caplog.text
        finally:
            await guest.delete(force=True)
            await (await docker.networks.get(network["Id"])).delete()


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(lambda: aiodocker.DockerError(500, "the daemon is busy"), id="busy"),
        pytest.param(aiohttp.ServerDisconnectedError, id="disconnected"),
    ],
)
async def test_an_image_docker_fails_to_inspect_is_not_called_missing(
    busybox: str,
    tmp_path: Path,
    project: str,
    monkeypatch: pytest.MonkeyPatch,
    error: Callable[[], BaseException],
) -> None:
    # Only Docker's "no such image" (404) says the image is absent: a busy
    # daemon or a broken connection says nothing of it, and is told as such.
    refused = refuse_once(
        monkeypatch,
        lambda path, method: path.startswith("images/") and path.endswith("/json"),
        error,
    )
    services = {"kv": web(busybox, start_retries=0)}
    with pytest.raises(ServiceStartError) as failed:
        async with start(tmp_path, project, services):
            pass
    assert refused, "no inspect of the image was refused"
    reason = failed.value.reason
    assert f"image {busybox!r}" in reason
    assert "not present locally" not in reason
    assert "internal error" not in reason


async def test_a_connection_broken_during_a_pull_is_a_clear_error_naming_the_image(
    busybox: str, tmp_path: Path, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not an internal error that fails the service for good: a failed start
    # saying what broke, retried as any (none here, to read its reason).
    refused = refuse_once(
        monkeypatch, lambda path, _: path == "images/create", aiohttp.ServerDisconnectedError
    )
    services = {"kv": web(busybox, pull="always", start_retries=0)}
    with pytest.raises(ServiceStartError) as failed:
        async with start(tmp_path, project, services):
            pass
    assert refused, "no pull was refused"
    reason = failed.value.reason
    assert f"the connection to Docker broke while pulling image {busybox!r}" in reason


async def test_a_failed_look_for_leftovers_is_said_and_does_not_fail_the_start(
    busybox: str,
    tmp_path: Path,
    project: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A busy daemon answers the sweep's listing with a 500: what a crashed
    # owner left is looked for again at the next start, and this one goes on.
    caplog.set_level(logging.WARNING, logger="dspy_infra")
    refused = refuse_once(
        monkeypatch,
        lambda path, _: path == "containers/json",
        lambda: aiodocker.DockerError(500, "the daemon is busy"),
    )
    async with start(tmp_path, project, {"kv": web(busybox)}) as infra:
        assert (await infra.services.status())["kv"].healthy
    assert refused, "the sweep's listing was never refused"
    assert "leftovers of crashed instances" in caplog.text
    assert "the daemon is busy" in caplog.text


async def test_a_leftover_docker_fails_to_remove_is_named_and_removed_as_the_instance_closes(
    busybox: str,
    tmp_path: Path,
    project: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Never reported as removed when it is not: the warning names it, and
    # the removal is tried again as the instance closes.
    caplog.set_level(logging.WARNING, logger="dspy_infra")
    labels = Engine(instance_id="dead", project=project).labels("service", "orphan-3")
    labels[Labels.OWNER_PID] = "999999999"
    async with aiodocker.Docker() as docker:
        orphan = await docker.containers.run(
            {"Image": busybox, "Cmd": ["sleep", "600"], "Labels": labels}
        )
        try:
            refused = refuse_once(
                monkeypatch,
                lambda path, method: path == f"containers/{orphan.id}" and method == "DELETE",
                lambda: aiodocker.DockerError(500, "device or resource busy"),
            )
            async with start(tmp_path, project, {"kv": web(busybox)}):
                assert refused, "the leftover's removal was never refused"
                assert f"service orphan-3 (container {orphan.id[:12]}" in caplog.text
                assert "device or resource busy" in caplog.text
                assert "removed a leftover" not in caplog.text
        finally:
            with contextlib.suppress(aiodocker.DockerError):  # removed already, unless it failed
                await orphan.delete(force=True)


@contextlib.asynccontextmanager
async def engine_over_tcp(host: str) -> AsyncIterator[str]:
    """A ``DOCKER_HOST`` that reaches this machine's engine at ``host`` over TCP,
    as a remote engine is reached: a byte proxy to its socket."""
    connections: set[asyncio.Task[Any]] = set()

    async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):  # the other end hung up first
            while chunk := await source.read(65536):
                sink.write(chunk)
                await sink.drain()
            if sink.can_write_eof():
                sink.write_eof()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        daemon_reader, daemon_writer = await asyncio.open_unix_connection("/var/run/docker.sock")
        try:
            await asyncio.gather(pump(reader, daemon_writer), pump(daemon_reader, writer))
        finally:
            writer.close()
            daemon_writer.close()

    server = await asyncio.start_server(serve, host, 0)
    address = f"[{host}]" if ":" in host else host  # an IPv6 address, in brackets
    try:
        yield f"tcp://{address}:{server.sockets[0].getsockname()[1]}"
    finally:
        # Every connection is over before the test's loop is: none is cut by its end.
        server.close()
        for connection in connections:
            connection.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await server.wait_closed()


@pytest.mark.parametrize(
    "case",
    [
        # DOCKER_HOST=tcp://HOST:PORT: the ports are on HOST (the engine's
        # machine), not on this machine's 127.0.0.1; published, probed and
        # reported there.
        ("127.0.0.2", {"tcp": "{port}"}, "127.0.0.2"),
        # tcp://localhost:2375 where localhost is ::1 first: the engine is on
        # this machine, and its ports are where a socket's are, not at a bare
        # "::1" that {host} would make into a broken URL.
        ("::1", {"http": "http://{host}:{port}/"}, "127.0.0.1"),
    ],
    ids=["other-address", "ipv6-loopback"],
)
async def test_an_engine_reached_over_tcp_publishes_and_reports_ports_at_its_address(
    busybox: str,
    tmp_path: Path,
    project: str,
    monkeypatch: pytest.MonkeyPatch,
    case: tuple[str, dict[str, str], str],
) -> None:
    engine_at, probe, host = case  # where the engine listens, a probe, where ports are
    services = {"kv": web(busybox, health=probe)}
    async with engine_over_tcp(engine_at) as docker_host:
        monkeypatch.setenv("DOCKER_HOST", docker_host)
        async with start(tmp_path, project, services) as infra:
            status = (await infra.services.status())["kv"]
            assert status.host == host
            assert await fetch(f"http://{host}:{status.ports['main']}/") == "kv\n"


@pytest.mark.parametrize("step", ["/start", "/archive"])
async def test_a_connection_broken_while_a_container_starts_is_a_clear_error_and_leaves_nothing(
    busybox: str, tmp_path: Path, project: str, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    # As a broken connection during its creation: a failed start saying what
    # broke (retried as any), not an internal error that fails it for good.
    refused = refuse_once(
        monkeypatch,
        lambda path, _: path.startswith("containers/") and path.endswith(step),
        aiohttp.ServerDisconnectedError,
    )
    services = {"kv": web(busybox, start_retries=0)}
    with pytest.raises(ServiceStartError) as failed:
        async with start(tmp_path, project, services):
            pass
    assert refused, f"no {step} was refused"
    assert "the connection to Docker broke while starting the container" in failed.value.reason


async def test_gpus_docker_cannot_give_fail_the_start_saying_what_is_missing(
    busybox: str, tmp_path: Path, project: str
) -> None:
    # Docker's own words ('could not select device driver ""') name neither
    # the GPUs nor the toolkit that gives them; where it can, the service runs.
    services = {
        "gpu": {"image": busybox, "command": ["sleep", "1000"], "gpus": 1, "start_retries": 0}
    }
    reasons = []
    try:
        async with start(tmp_path, project, services):
            pass
    except ServiceStartError as exc:
        reasons.append(exc.reason)
    for reason in reasons:
        assert "1 GPU(s) were requested" in reason
        assert "NVIDIA Container Toolkit" in reason


def gpu_instance(
    tmp_path: Path, project: str, busybox: str, gpus: list[int], services: dict[str, int]
) -> AgentInfra:
    """An instance with ``gpus`` on the docker backend; its ``services`` (name
    -> gpus) not started; a class ``g`` of one GPU; the handlers ``lease`` (the
    devices leased) and ``visible`` (the ``CUDA_VISIBLE_DEVICES`` given)."""
    sleeper = {"image": busybox, "command": ["sleep", "1000"], "start_retries": 0}
    infra = AgentInfra.start(
        {
            "infra": {"backend": "docker", "project": project, "gpus": gpus, "autostart": False},
            "services": {name: {**sleeper, "gpus": n} for name, n in services.items()},
            "classes": {"g": {"gpus": 1, "max_concurrency": 8}},
        },
        state_dir=tmp_path / "state",
    )

    @infra.task("lease")
    async def lease(payload: Any, run: TaskRun) -> list[str]:
        await anyio.sleep(0.05)
        return list(run.gpus)

    @infra.task("visible")
    async def visible(payload: Any, run: TaskRun) -> str | None:
        return run.env.get("CUDA_VISIBLE_DEVICES")

    return infra


@pytest.mark.usefixtures("gpus_as_configured")
async def test_a_service_with_gpus_gets_devices_of_its_own_that_tasks_do_not_lease(
    busybox: str, tmp_path: Path, project: str
) -> None:
    # Docker picks the first devices for a count; the scheduler leases the
    # first free ones: both would have GPU 0. The service asks for the last
    # devices by id instead, and tasks lease the others.
    async with gpu_instance(tmp_path, project, busybox, [0, 1, 2], {"llm": 1}) as infra:
        assert (await infra.get_metrics())["dspy_infra_gpus_total"] == 2
        handles = await infra.submit_tasks("lease", range(4), task_class="g")
        assert {d for h in handles for d in await h.result()} == {"0", "1"}
        # A CPU task is told of no device, the services' included.
        assert await (await infra.submit_task("visible", None)).result() == ""
        with pytest.raises(
            InvalidTask, match=r"needs 3 GPUs; 2 are left to tasks \(services hold 1\)"
        ):
            await infra.submit_task("lease", None, task_class="g", resources=Resources(gpus=3))
        reasons = []
        try:
            await infra.services.start("llm")
        except ServiceStartError as exc:  # no GPU support in this Docker: it says which device
            reasons.append(exc.reason)
        else:
            assert (await infra.services.status())["llm"].state is ServiceState.RUNNING
    assert all("1 GPU(s) were requested (2)" in reason for reason in reasons)


@pytest.mark.usefixtures("gpus_as_configured")
async def test_services_take_the_last_gpus_in_order_and_never_more_than_there_are(
    busybox: str, tmp_path: Path, project: str
) -> None:
    # Too many for the instance: its start stops, naming them.
    with pytest.raises(
        ConfigError, match=r"services\.b\.gpus: .*a: 1, b: 2.* the instance has 2 \(0, 1\)"
    ):
        async with gpu_instance(tmp_path, project, busybox, [0, 1], {"a": 1, "b": 2}):
            pass
    # Two services: the last devices, in the order of the configuration.
    async with gpu_instance(tmp_path, project, busybox, [0, 1, 2], {"a": 1, "b": 1}) as infra:
        assert infra.services.gpu_ids == {"a": ("1",), "b": ("2",)}
        assert (await infra.get_metrics())["dspy_infra_gpus_total"] == 1
        with pytest.raises(InvalidTask, match=r"1 is left to tasks \(services hold 2\)"):
            await infra.submit_task("lease", None, task_class="g", resources=Resources(gpus=2))
    # All of them set apart: no task may lease one, and a CPU task is still told of none.
    async with gpu_instance(tmp_path, project, busybox, [0, 1], {"a": 2}) as infra:
        assert infra.services.gpu_ids == {"a": ("0", "1")}
        left = r"needs 1 GPUs; 0 are left to tasks \(services hold 2\)"
        with pytest.raises(InvalidTask, match=left):
            await infra.submit_task("lease", None, task_class="g")
        assert await (await infra.submit_task("visible", None)).result() == ""


def bridge_address(bridge: dict[str, Any]) -> str:
    """This machine's address on Docker's default bridge network (``bridge``: its inspection)."""
    config = bridge["IPAM"]["Config"][0]
    if "Gateway" in config:
        return str(config["Gateway"])
    # A bridge interface that was there before the daemon started (a daemon
    # started again) is taken as it is, and its gateway not reported: the
    # interface's own address is that gateway.
    name = bridge["Options"]["com.docker.network.bridge.name"].encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        request = struct.pack("256s", name[:15])
        answer = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
    return socket.inet_ntoa(answer[20:24])


@pytest.mark.usefixtures("gpus_as_configured")
async def test_a_remote_engine_is_asked_for_a_count_of_its_own_gpus(
    busybox: str, tmp_path: Path, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This machine's device ids mean nothing on another: nothing is set apart.
    async with aiodocker.Docker() as docker:
        bridge = await (await docker.networks.get("bridge")).show()
    address = bridge_address(bridge)  # this machine, not at a loopback address
    async with engine_over_tcp(address) as docker_host:
        with monkeypatch.context() as patch:  # undone before the project is checked
            patch.setenv("DOCKER_HOST", docker_host)
            async with gpu_instance(tmp_path, project, busybox, [0, 1], {"llm": 1}) as infra:
                assert infra.services.gpu_ids == {}
                assert (await infra.get_metrics())["dspy_infra_gpus_total"] == 2


async def test_an_instance_network_docker_fails_to_remove_is_left_with_a_warning(
    busybox: str,
    tmp_path: Path,
    project: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A busy daemon refuses the network's removal at close: nothing is left
    # without a word (a later start of the project removes it).
    caplog.set_level(logging.WARNING, logger="dspy_infra.docker")
    refused = refuse_once(
        monkeypatch,
        lambda path, method: path.startswith("networks/") and method == "DELETE",
        lambda: aiodocker.DockerError(500, "the daemon is busy"),
    )
    services = {"kv": {"image": busybox, "command": ["sleep", "1000"], "stop_timeout": 0.5}}
    async with aiodocker.Docker() as docker:
        async with start(tmp_path, project, services):
            (network,) = await docker.networks.list(
                filters={"label": [f"dspy-infra.project={project}"]}
            )
        try:
            assert refused, "the network's removal was never refused"
            assert f"could not remove the instance network {network['Name']!r}" in caplog.text
            assert "the daemon is busy" in caplog.text
        finally:
            await (await docker.networks.get(network["Id"])).delete()


async def test_a_tcp_probe_of_a_local_engine_reached_over_tcp_waits_for_the_service(
    busybox: str, tmp_path: Path, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine is on this machine (a loopback DOCKER_HOST): its containers'
    # own addresses are reachable, and the probe must go there, not to the
    # port proxy, which accepts at once.
    services = {
        "late": web(busybox, command="sleep 1; exec httpd -f -p {port}", health={"tcp": "{port}"})
    }
    async with engine_over_tcp("127.0.0.2") as docker_host:
        monkeypatch.setenv("DOCKER_HOST", docker_host)
        started = anyio.current_time()
        async with start(tmp_path, project, services):
            assert anyio.current_time() - started > 1.0


async def test_an_http_probe_of_host_goes_to_a_remote_engines_address(
    busybox: str, tmp_path: Path, project: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # {host} in a probe is where this machine reaches the service: on a
    # remote engine, its address, not this machine's 127.0.0.1.
    probe = {"http": "http://{host}:{port}/", "deadline": 10}
    services = {"kv": web(busybox, health=probe)}
    async with engine_over_tcp("127.0.0.2") as docker_host:
        monkeypatch.setenv("DOCKER_HOST", docker_host)
        async with start(tmp_path, project, services) as infra:
            assert (await infra.services.status())["kv"].state == "healthy"
