"""Commands launched in a session of their own and watched by the event loop, through a
pidfd or (on a kernel without one) a thread per child."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator

import anyio
import pytest

from dspy_infra._exit_codes import Unknown
from dspy_infra._launch import Launched, launch_group
from dspy_infra._process_group import group_running, stop_group

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["pidfd", "thread", "thread, not on Linux"])
def watched_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of watching a child: the kernel's pidfd, or a thread where there is
    none (a kernel before 5.3, or another OS, whose os module has no pidfd_open)."""
    if request.param == "thread, not on Linux":
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    elif request.param == "thread":

        def no_pidfd(pid: int, flags: int = 0) -> int:
            raise OSError(errno.ENOSYS, "pidfd_open is not implemented")

        monkeypatch.setattr(os, "pidfd_open", no_pidfd, raising=False)
    return str(request.param)


async def launch(script: str) -> Launched:
    return await launch_group(
        [sys.executable, "-c", script], env=os.environ, cwd=None, stderr=subprocess.PIPE
    )


@pytest.fixture
async def launched() -> AsyncIterator[list[Launched]]:
    """What a test launches; stopped and closed whatever the test did."""
    started: list[Launched] = []
    yield started
    for process in started:
        await stop_group(process, 0)
        await process.aclose()


async def read_all(stream: anyio.abc.ByteReceiveStream | None) -> bytes:
    assert stream is not None
    return b"".join([chunk async for chunk in stream])


async def test_exit_codes_and_both_streams_are_read(watched_by: str) -> None:
    process = await launch(
        "import os, sys; sys.stdout.write('out' * 50000); sys.stderr.write('err'); os._exit(3)"
    )
    outputs: dict[str, bytes] = {}

    async def keep(name: str, stream: anyio.abc.ByteReceiveStream | None) -> None:
        outputs[name] = await read_all(stream)

    # Both at once: a full pipe would hold the child.
    async with anyio.create_task_group() as group:
        group.start_soon(keep, "stdout", process.stdout)
        group.start_soon(keep, "stderr", process.stderr)
        with anyio.fail_after(10):
            assert await process.wait() == 3
    await process.aclose()
    assert outputs == {"stdout": b"out" * 50000, "stderr": b"err"}
    assert process.returncode == 3
    # A thread watching a child ends with it.
    for thread in threading.enumerate():
        if thread.name == f"dspy-infra-wait-{process.pid}":
            thread.join(5)
            assert not thread.is_alive()


async def test_a_signal_reads_as_minus_its_number(
    watched_by: str, launched: list[Launched]
) -> None:
    process = await launch("import time; time.sleep(60)")
    launched.append(process)
    os.kill(process.pid, signal.SIGTERM)
    with anyio.fail_after(10):
        assert await process.wait() == -signal.SIGTERM


async def test_several_tasks_wait_at_once_and_one_cancelled_takes_none_with_it(
    watched_by: str, launched: list[Launched]
) -> None:
    process = await launch("import time; time.sleep(0.3)")
    launched.append(process)
    codes: list[int] = []

    async def wait() -> None:
        codes.append(await process.wait())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(wait)
            with anyio.move_on_after(0.05):
                await process.wait()
            group.start_soon(wait)
    assert codes == [0, 0]


async def test_an_exit_is_collected_with_nobody_waiting(launched: list[Launched]) -> None:
    process = await launch("pass")
    launched.append(process)
    with anyio.fail_after(10):
        while await anyio.Path(f"/proc/{process.pid}").exists():  # a zombie is still listed
            await anyio.sleep(0.01)
    assert process.returncode == 0


async def test_an_exit_collected_elsewhere_reads_as_unknown(launched: list[Launched]) -> None:
    process = await launch("pass")
    launched.append(process)
    # Before the loop runs again: what another part of the program could do.
    os.waitpid(process.pid, 0)  # noqa: ASYNC222 - blocking, as such a caller would be
    with anyio.fail_after(10):
        code = await process.wait()
    assert isinstance(code, Unknown)
    assert code == -1
    assert "collected" in code.why


async def test_closing_a_stream_ends_its_read_under_way(launched: list[Launched]) -> None:
    process = await launch("import time; time.sleep(60)")
    launched.append(process)
    assert process.stdout is not None
    stdout = process.stdout
    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(read_all, stdout)
            await anyio.sleep(0.05)
            await stdout.aclose()
    assert await read_all(stdout) == b""


async def test_a_close_cut_short_kills_the_group_and_still_waits() -> None:
    process = await launch("import time; time.sleep(60)")
    with anyio.move_on_after(0.1):
        await process.aclose()
    assert process.returncode == -signal.SIGKILL
    assert not await group_running(process.pid)
