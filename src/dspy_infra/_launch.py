"""Commands started in a session of their own, and watched without a thread.

asyncio's subprocesses (Python 3.11) start a thread per child to wait for it,
and wrap each pipe in a transport, a protocol and a stream reader. For a
command of a few milliseconds (a process runner's attempt) that cost the
process about as much CPU again as the rest of the attempt's bookkeeping
(docs/benchmarks.md). Here the event loop polls the child's pidfd beside its
pipes, and a pipe is read with one ``os.read`` once the loop finds it
readable. A kernel without ``pidfd_open`` (before Linux 5.3) gets what
asyncio does: a thread per child, waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import anyio
import anyio.to_thread
from anyio.abc import ByteReceiveStream

from dspy_infra._exit_codes import Unknown

__all__ = ["LaunchFailed", "Launched", "Output", "launch_group", "signal_group"]

_CHUNK = 1 << 16
_REAPED_ELSEWHERE = "another part of the program collected it"


class LaunchFailed(Exception):
    """The command could not be started; ``reason`` says why, for a person."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


async def launch_group(
    argv: list[str], *, env: Mapping[str, str], cwd: Path | None, stderr: int
) -> Launched:
    """Start ``argv`` in a session (a process group) of its own, stdout piped.

    Not a checkpoint: nothing can cancel it between the process's start and
    its hand-over, so the caller always gets what it must stop.
    """
    try:
        # On the loop, as asyncio's own subprocesses are: the fork (a vfork)
        # and exec take a fraction of what a hop to a thread would.
        popen = subprocess.Popen(  # noqa: ASYNC220
            argv,
            bufsize=0,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=cwd,
            env=dict(env),
            start_new_session=True,
        )
    except OSError as exc:
        if cwd is not None and not await anyio.to_thread.run_sync(cwd.is_dir):
            reason = f"working directory {str(cwd)!r} does not exist"
        else:
            why = await anyio.to_thread.run_sync(_missing_interpreter, exc, argv[0], cwd, env)
            reason = f"cannot run {argv[0]!r}: {why or exc.strerror or exc}"
        raise LaunchFailed(reason) from None
    return Launched(popen)


class Launched:
    """A command that :func:`launch_group` started: the leader of its own session.

    Its exit is collected as soon as the loop sees it, whoever waits (or
    none), so that it never stays a zombie; :meth:`wait` may be awaited by
    several tasks at once.
    """

    def __init__(self, popen: subprocess.Popen[bytes]):
        self.pid = popen.pid
        self.stdout = _output(popen.stdout)
        self.stderr = _output(popen.stderr)
        self._popen = popen
        self._exited = anyio.Event()
        self._loop = asyncio.get_running_loop()
        self._pidfd = pidfd = _pidfd(self.pid)
        if pidfd is None:
            # It ends when the child does, which every owner of a Launched
            # makes sure of (stop_group): not a thread to join.
            threading.Thread(
                target=self._wait_in_thread, name=f"dspy-infra-wait-{self.pid}", daemon=True
            ).start()
        else:
            self._loop.add_reader(pidfd, self._collect)

    @property
    def returncode(self) -> int | None:
        """The exit code (``-N`` for signal N), once collected."""
        return self._popen.returncode

    async def wait(self) -> int:
        await self._exited.wait()
        code = self._popen.returncode
        assert code is not None
        return code

    async def aclose(self) -> None:
        """Close the pipes and wait for the exit; a cancellation while waiting
        SIGKILLs the whole group (anyio's ``Process.aclose`` kills the leader
        alone) and still waits."""
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                await stream.aclose()
        try:
            await self.wait()
        except BaseException:
            with anyio.CancelScope(shield=True):
                if self._popen.returncode is None:
                    signal_group(self.pid, signal.SIGKILL)
                await self.wait()
            raise

    def _collect(self) -> None:
        pidfd, self._pidfd = self._pidfd, None
        assert pidfd is not None
        self._loop.remove_reader(pidfd)
        os.close(pidfd)
        self._exit(_wait(self.pid))

    def _wait_in_thread(self) -> None:
        code = _wait(self.pid)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._exit, code)

    def _exit(self, code: int) -> None:
        # Where it is kept; and Popen then does not collect it again (its
        # __del__ would try to).
        self._popen.returncode = code
        self._exited.set()


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _pidfd(pid: int) -> int | None:
    """A pidfd for ``pid``, or None where the kernel (or the OS) has none."""
    pidfd_open = getattr(os, "pidfd_open", None)  # Linux only
    if pidfd_open is None:
        return None
    try:
        fd: int = pidfd_open(pid)
    except OSError:
        return None
    return fd


def _wait(pid: int) -> int:
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return Unknown(_REAPED_ELSEWHERE)
    return os.waitstatus_to_exitcode(status)


def _output(file: IO[bytes] | None) -> Output | None:
    return None if file is None else Output(file)


class Output(ByteReceiveStream):
    """A child's stdout or stderr, read as the loop finds it readable.

    Closing it ends a read under way, which sees the end of the stream: the
    file is then closed by that read as it ends, never under it, so that its
    descriptor cannot be reused (by a pipe or pidfd the loop then watches)
    before the loop has stopped watching it for this read.
    """

    def __init__(self, file: IO[bytes]):
        self._file = file
        self._fd = file.fileno()
        self._receiving = False
        self._closing = False
        os.set_blocking(self._fd, False)

    async def receive(self, max_bytes: int = _CHUNK) -> bytes:
        if self._closing:
            raise anyio.EndOfStream
        self._receiving = True
        try:
            while True:
                try:
                    await anyio.wait_readable(self._fd)
                except anyio.ClosedResourceError:
                    raise anyio.EndOfStream from None
                if self._closing:  # woken for data, but closed before it ran
                    raise anyio.EndOfStream
                try:
                    data = os.read(self._fd, max_bytes)
                except BlockingIOError:
                    continue
                if not data:
                    raise anyio.EndOfStream
                return data
        finally:
            self._receiving = False
            if self._closing:
                self._file.close()

    async def aclose(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._receiving:
            anyio.notify_closing(self._fd)  # the read ends, and closes the file
        else:
            self._file.close()


def _missing_interpreter(
    exc: OSError, program: str, cwd: Path | None, env: Mapping[str, str]
) -> str | None:
    """Why ``program`` did not start, if it is a script whose ``#!`` interpreter
    is not there; else None (blocking).

    execve says ENOENT, "No such file or directory", of such a script, which
    is there: a person then looks for the wrong file. A Windows line ending
    makes ``#!/bin/sh`` such a line too (``/bin/sh\\r``).
    """
    if exc.errno != errno.ENOENT:
        return None
    if "/" in program:
        path: str | None = str((cwd or Path()) / program)
    else:  # looked up on the PATH it was started with, as subprocess does
        path = shutil.which(program, path=os.pathsep.join(os.get_exec_path(env)))
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            first = file.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    # The kernel ends the interpreter's path at a space, a tab or the newline.
    interpreter = os.fsdecode(re.split(rb"[ \t\n]", first[2:].lstrip(b" \t"), maxsplit=1)[0])
    if not interpreter or os.path.exists(interpreter):
        return None
    return f"its interpreter {interpreter!r} (its first line, #!) does not exist"
