"""The behaviour every ContainerBackend must show, as a pytest test class.

Subclass :class:`ContainerBackendConformance` in a test module and provide
the fixtures it documents; every test then runs against your backend::

    class TestLocalBackend(ContainerBackendConformance):
        @pytest.fixture
        def backend_name(self) -> str:
            return "local"
        ...

Scenarios are POSIX ``sh`` scripts (``shell=True``), which run the same on the
host and in a busybox container.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from dspy_infra.abc import ContainerBackend, LaunchSpec, ServiceProcess
from dspy_infra.backends import load_backend
from dspy_infra.errors import ServiceStartError

__all__ = ["ContainerBackendConformance"]

IsGone = Callable[[str], Awaitable[bool]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _accepts(host: str, port: int) -> bool:
    try:
        stream = await anyio.connect_tcp(host, port)
    except OSError:
        return False
    await stream.aclose()
    return True


async def _collect(process: ServiceProcess) -> list[str]:
    async with aclosing(process.output()) as lines:
        return [line async for line in lines]


@pytest.mark.anyio
class ContainerBackendConformance:
    """Fixtures to provide:

    - ``backend_name``: the name the backend is loaded by.
    - ``base_spec``: extra LaunchSpec fields every scenario needs (e.g. ``image``).
    - ``listener``: ``(name, port) -> LaunchSpec`` of a service accepting TCP
      connections on the port named ``main``.
    - ``is_gone``: ``async (process id) -> bool``, whether nothing of it is left.
    """

    @pytest.fixture
    async def backend(self, backend_name: str, tmp_path: Path) -> AsyncIterator[ContainerBackend]:
        backend = load_backend(backend_name)
        await backend.open(state_dir=tmp_path, instance_id="conformance", project="conformance")
        try:
            yield backend
        finally:
            await backend.close()

    @pytest.fixture
    def sh(self, base_spec: Mapping[str, Any]) -> Callable[..., LaunchSpec]:
        def make(script: str, *, name: str = "svc", **fields: Any) -> LaunchSpec:
            return LaunchSpec(name=name, command=script, shell=True, **{**base_spec, **fields})

        return make

    @pytest.fixture
    def free_port(self) -> int:
        return _free_port()

    @asynccontextmanager
    async def launched(
        self, backend: ContainerBackend, spec: LaunchSpec
    ) -> AsyncIterator[ServiceProcess]:
        process = await backend.launch(spec)
        try:
            yield process
        finally:
            with anyio.CancelScope(shield=True):
                await process.stop(1.0)

    async def test_output_lines_and_exit_code(
        self, backend: ContainerBackend, sh: Callable[..., LaunchSpec]
    ) -> None:
        script = (
            'echo first; echo "second line" >&2; '
            "i=0; while [ $i -lt 500 ]; do echo n$i; i=$((i+1)); done; exit 3"
        )
        async with self.launched(backend, sh(script)) as process:
            lines = await _collect(process)
            assert await process.wait() == 3
        assert lines[:2] == ["first", "second line"]
        assert lines[2:] == [f"n{i}" for i in range(500)]

    async def test_environment_and_working_directory(
        self, backend: ContainerBackend, sh: Callable[..., LaunchSpec]
    ) -> None:
        spec = sh('echo "$GREETING"; pwd', env={"GREETING": "hello there"}, cwd=Path("/"))
        async with self.launched(backend, spec) as process:
            lines = await _collect(process)
            assert await process.wait() == 0
        assert lines == ["hello there", "/"]

    async def test_stop_lets_the_service_exit_gracefully(
        self, backend: ContainerBackend, sh: Callable[..., LaunchSpec], is_gone: IsGone
    ) -> None:
        script = "trap 'echo bye; exit 0' TERM; echo up; while true; do sleep 0.05; done"
        async with self.launched(backend, sh(script)) as process:
            async with aclosing(process.output()) as lines:
                assert await anext(lines) == "up"
                started = time.monotonic()
                code = await process.stop(10.0)
                rest = [line async for line in lines]
            assert time.monotonic() - started < 5.0, "stop waited for the grace period"
            assert code == 0
            assert rest[-1] == "bye"
            assert await is_gone(process.id)

    async def test_stop_kills_what_ignores_sigterm_after_the_grace_period(
        self, backend: ContainerBackend, sh: Callable[..., LaunchSpec], is_gone: IsGone
    ) -> None:
        script = "trap '' TERM; echo up; while true; do sleep 0.05; done"
        async with self.launched(backend, sh(script)) as process:
            async with aclosing(process.output()) as lines:
                assert await anext(lines) == "up"
            started = time.monotonic()
            code = await process.stop(0.5)
            elapsed = time.monotonic() - started
            assert 0.4 < elapsed < 5.0
            assert code == -signal.SIGKILL
            assert await is_gone(process.id)

    async def test_stop_takes_the_whole_process_group(
        self, backend: ContainerBackend, sh: Callable[..., LaunchSpec], is_gone: IsGone
    ) -> None:
        # A grandchild that ignores SIGTERM and outlives its parent's exit.
        script = "sh -c \"trap '' TERM; echo child; sleep 1000\" & sleep 0.1; echo parent; exit 0"
        async with self.launched(backend, sh(script)) as process:
            async with aclosing(process.output()) as lines:
                assert sorted([await anext(lines), await anext(lines)]) == ["child", "parent"]
            assert await process.wait() == 0
            await process.stop(0.3)
            assert await is_gone(process.id)

    async def test_death_by_a_signal_is_minus_the_signal(
        self, backend: ContainerBackend, sh: Callable[..., LaunchSpec]
    ) -> None:
        async with self.launched(backend, sh("kill -USR1 $$")) as process:
            assert await process.wait() == -signal.SIGUSR1
            assert await process.stop(1.0) == -signal.SIGUSR1

    async def test_stop_after_exit_is_prompt_and_idempotent(
        self, backend: ContainerBackend, sh: Callable[..., LaunchSpec]
    ) -> None:
        async with self.launched(backend, sh("exit 0")) as process:
            assert await process.wait() == 0
            started = time.monotonic()
            assert await process.stop(10.0) == 0
            assert await process.stop(10.0) == 0
            assert time.monotonic() - started < 2.0

    async def test_exec_runs_beside_the_service(
        self, backend: ContainerBackend, sh: Callable[..., LaunchSpec]
    ) -> None:
        spec = sh("sleep 1000", env={"GREETING": "hi"})
        async with self.launched(backend, spec) as process:
            code, output = await process.exec(("sh", "-c", 'echo "$GREETING"; exit 4'))
        assert (code, output.strip()) == (4, "hi")

    @pytest.mark.parametrize("then", ["wait", "exit 0"])
    async def test_a_cancelled_exec_leaves_nothing_of_its_command(
        self, backend: ContainerBackend, sh: Callable[..., LaunchSpec], then: str
    ) -> None:
        # A command probe cut short by its timeout: a shell whose child, which
        # ignores SIGTERM, counts in a file for as long as it runs (and keeps
        # the output open, after the shell exited too).
        counter = f"/tmp/dspy-infra-exec-{os.getpid()}-{time.monotonic_ns()}"
        loop = f"trap '' TERM; i=0; while :; do i=$((i+1)); echo $i > {counter}; sleep 0.02; done"
        async with self.launched(backend, sh("sleep 1000")) as process:

            async def count() -> str:
                return (await process.exec(("cat", counter)))[1].strip()

            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(process.exec, ("sh", "-c", f"({loop}) & {then}"))
                    # Cut short once it runs (not after a fixed time: on a
                    # loaded machine an exec may take a second to start).
                    for _ in range(200):
                        if await count():
                            break
                        await anyio.sleep(0.05)
                    else:
                        raise AssertionError("the command never ran")
                    tg.cancel_scope.cancel()
                before = await count()
                await anyio.sleep(0.5)
                assert await count() == before, "the exec's command is still running"
            finally:
                await process.exec(("rm", "-f", counter))

    async def test_an_exec_that_ended_leaves_nothing_of_what_it_started(
        self, backend: ContainerBackend, sh: Callable[..., LaunchSpec]
    ) -> None:
        # A check that starts a child and exits at once: the child goes with it.
        counter = f"/tmp/dspy-infra-exec-{os.getpid()}-{time.monotonic_ns()}"
        loop = f"i=0; while :; do i=$((i+1)); echo $i > {counter}; sleep 0.02; done"
        async with self.launched(backend, sh("sleep 1000")) as process:
            try:
                code, _ = await process.exec(("sh", "-c", f"({loop}) >/dev/null 2>&1 & exit 0"))
                assert code == 0
                before = (await process.exec(("cat", counter)))[1].strip()
                await anyio.sleep(0.3)
                after = (await process.exec(("cat", counter)))[1].strip()
                assert after == before, "what the exec started still runs"
            finally:
                await process.exec(("rm", "-f", counter))

    async def test_published_port_accepts_connections(
        self,
        backend: ContainerBackend,
        listener: Callable[[str, int], LaunchSpec],
        free_port: int,
    ) -> None:
        async with self.launched(backend, listener("listener", free_port)) as process:
            port = process.ports["main"]
            with anyio.fail_after(10):
                while True:
                    try:
                        stream = await anyio.connect_tcp(process.host, port)
                    except OSError:
                        await anyio.sleep(0.02)
                    else:
                        await stream.aclose()
                        break

    async def test_a_cancelled_launch_leaves_nothing_behind(
        self,
        backend: ContainerBackend,
        listener: Callable[[str, int], LaunchSpec],
        is_gone: IsGone,
    ) -> None:
        # Cut short at a point after another (a start timeout, a stop of the
        # instance): a launch that gave up left nothing that could go on to
        # listen; one that got as far as returning the service handed it over
        # whole, for the caller to stop. A fresh port each time: a stopped
        # listener's may still be in TIME_WAIT.
        for delay in (0.0, 0.001, 0.005, 0.02, 0.05, 0.1, 0.3, 1.0):
            port = _free_port()
            launched: list[ServiceProcess] = []
            with anyio.move_on_after(delay):
                launched.append(await backend.launch(listener("cut", port)))
            if launched:
                await launched[0].stop(1.0)
                assert await is_gone(launched[0].id), f"cut after {delay}s: stop left it"
            else:
                await anyio.sleep(1.0)  # time for a launch left running to listen
                assert not await _accepts("127.0.0.1", port), f"cut after {delay}s: it runs"

    async def test_a_command_that_cannot_run_is_a_start_error(
        self, backend: ContainerBackend, base_spec: Mapping[str, Any]
    ) -> None:
        spec = LaunchSpec(name="broken", command=("/nonexistent/program",), **base_spec)
        with pytest.raises(ServiceStartError, match="nonexistent"):
            await backend.launch(spec)

    async def test_open_removes_services_of_an_owner_that_was_killed(
        self,
        backend_name: str,
        base_spec: Mapping[str, Any],
        tmp_path: Path,
        is_gone: IsGone,
    ) -> None:
        state_dir = tmp_path / "crash"
        spec = {"name": "orphan", "command": "sleep 1000", "shell": True, **base_spec}
        owner = textwrap.dedent(
            f"""
            import anyio, json, sys
            from pathlib import Path
            from dspy_infra.abc import LaunchSpec
            from dspy_infra.backends import load_backend

            async def main() -> None:
                backend = load_backend({backend_name!r})
                await backend.open(state_dir=Path({str(state_dir)!r}), instance_id="doomed",
                                   project="conformance")
                process = await backend.launch(LaunchSpec(**json.loads({json.dumps(spec)!r})))
                print(process.id, flush=True)
                await anyio.sleep(1000)

            anyio.run(main)
            """
        )
        async with await anyio.open_process([sys.executable, "-c", owner]) as child:
            assert child.stdout is not None
            with anyio.fail_after(30):
                service_id = (await child.stdout.receive()).decode().strip()
            assert service_id, "the owner process did not launch its service"
            os.kill(child.pid, signal.SIGKILL)
            await child.wait()
        assert not await is_gone(service_id), "the service died with its owner: nothing to sweep"

        survivor = load_backend(backend_name)
        removed = await survivor.open(
            state_dir=state_dir, instance_id="survivor", project="conformance"
        )
        try:
            assert len(removed) == 1
            assert "orphan" in removed[0]
            assert await is_gone(service_id)
            again = load_backend(backend_name)
            assert await again.open(state_dir=state_dir, instance_id="x", project="c") == []
            await again.close()
        finally:
            await survivor.close()
