"""The process runner: each attempt is a ``[handlers.NAME]`` command in its own process group.

The payload goes to ``payload.json`` in the attempt's work dir; the result
comes back from ``result.json`` there, or else from the last non-empty line
of stdout (JSON if it parses, the line as a string otherwise). A command sees
its file paths both as placeholders (``{payload_file}``, ``{result_file}``,
``{task_id}``, ``{attempt}``, ``{work_dir}``) and in the environment
(``DSPY_INFRA_PAYLOAD_FILE``...), so a script can take whichever is handier.
In a ``shell = true`` command string the values are quoted for the shell:
write ``cat {payload_file}``, not ``cat "{payload_file}"``.

Every attempt runs in its own session, so that stopping it (a cancel, a
timeout, or leftovers after the command exits) reaches its whole process
group; the attempt is over only when that group is empty. Running attempts
are recorded in a ledger under ``state_dir/process/``, and
:meth:`ProcessRunner.open` kills the groups of owners that died without
cleaning up, as the local backend does for services.

The hot path waits for one thread hop before the launch (work dir, payload,
stale result) and one after it (result file, ledger); the launch is recorded
while the command runs. There is no polling: the process's exit is awaited,
and a single ``killpg(pgid, 0)`` tells that nothing of its group is left.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from dspy_infra._launch import LaunchFailed, launch_group
from dspy_infra._process_group import (
    LEDGER_ENV,
    Ledger,
    group_running,
    open_ledger,
    owner_identity,
    stop_group,
)
from dspy_infra.abc import RunFailed, RunnerContext, TaskRun
from dspy_infra.runners._commands import (
    PLACEHOLDERS,
    STDERR_LINE_BYTES,
    STDERR_LINES,
    AttemptFiles,
    Tail,
    attempt_env,
    command_argv,
    outcome,
    prepare,
    read_result,
    validate_handler,
)

__all__ = ["PLACEHOLDERS", "ProcessRunner", "Runner"]

log = logging.getLogger("dspy_infra")
T = TypeVar("T")

# How long output is still read once the work has exited: what holds the
# stream open after that (a child that escaped) is not waited for.
_DRAIN_SECONDS = 2.0


class ProcessRunner:
    """Task attempts as local subprocesses, one process group each."""

    def __init__(self) -> None:
        self._context: RunnerContext | None = None
        self._ledger: Ledger | None = None
        self._files: _Files | None = None

    @property
    def name(self) -> str:
        return "process"

    async def open(self, context: RunnerContext) -> list[str]:
        records = context.state_dir / "process"
        owner = {**owner_identity(), "instance": context.instance_id, "project": context.project}

        ledger, swept = await anyio.to_thread.run_sync(
            open_ledger, records, context.instance_id, owner, _describe
        )
        self._context = context
        self._ledger = ledger
        self._files = _Files()
        return swept

    def validate(self, handler: str) -> str | None:
        return validate_handler("process", self._context, handler)

    async def run(self, run: TaskRun) -> Any:
        context, ledger, files_io = self._context, self._ledger, self._files
        if context is None or ledger is None or files_io is None:
            raise RuntimeError("ProcessRunner.run() before open()")
        handler = run.handler_config or context.config.handlers.get(run.handler)
        if handler is None or handler.command is None:
            raise RunFailed(self.validate(run.handler) or f"no command for {run.handler!r}")

        files = AttemptFiles.of(run)
        argv = command_argv(run.handler, handler, files.values)
        env = {**os.environ, **attempt_env(handler, run, files.values)}
        env[LEDGER_ENV] = ledger.path.name  # finds it if a crash keeps it from the ledger
        cwd = Path(handler.cwd) if handler.cwd is not None else files.work_dir
        await files_io.run(prepare, files, run.payload)

        limit = context.config.infra.max_result_bytes
        stdout = Tail(1, limit)
        stderr = Tail(STDERR_LINES, STDERR_LINE_BYTES)
        grace = run.class_config.cancel_grace
        # No checkpoint from here until the process is handed back (a launch
        # has none once the command started): a cancellation that came while
        # the payload was written must stop the attempt here, before it starts.
        await anyio.lowlevel.checkpoint_if_cancelled()
        try:
            process = await launch_group(argv, env=env, cwd=cwd, stderr=subprocess.PIPE)
        except LaunchFailed as exc:
            raise RunFailed(exc.reason) from None
        launch = ledger.number()
        finished = False
        try:
            async with anyio.create_task_group() as group:
                # Beside the process rather than before it: the record is for
                # a crash of this owner, and a short command should not wait
                # for a thread to write it.
                group.start_soon(_record, files_io, ledger, launch, process.pid, run)
                group.start_soon(stdout.pump, process.stdout)
                group.start_soon(stderr.pump, process.stderr)
                code = await process.wait()
                # What the command left behind in its group (a backgrounded
                # child) is part of the attempt, and stops with it; this also
                # lets the pumps see the end of pipes such a child held open.
                if await group_running(process.pid):
                    await stop_group(process, grace)
                # The pumps read what is left in the pipes, then see their
                # end; a child that left the group (setsid) may hold them open
                # for ever, so the reading ends after a while regardless.
                group.cancel_scope.deadline = anyio.current_time() + _DRAIN_SECONDS
            raw = await files_io.run(
                _conclude, ledger, launch, files.result_file if code == 0 else None, limit
            )
            finished = True
        finally:
            with anyio.CancelScope(shield=True):
                if not finished:
                    # Cancelled (task cancel or timeout) or broken: stop the
                    # work before the attempt counts as over.
                    await stop_group(process, grace)
                    await files_io.run(_conclude, ledger, launch, None, limit)
                await process.aclose()
        return outcome(code, raw, files.result_file, stdout, stderr, limit=limit)

    async def close(self) -> None:
        ledger, self._ledger, self._context = self._ledger, None, None
        files_io, self._files = self._files, None
        # Shielded: an instance is often closed by a cancellation (a timeout
        # around its block), and the files' thread must still end and the
        # ledger's file be closed and removed, not left until the process ends.
        with anyio.CancelScope(shield=True):
            if files_io is not None:
                await anyio.to_thread.run_sync(files_io.shut_down)
            if ledger is not None:
                await anyio.to_thread.run_sync(ledger.close)


Runner = ProcessRunner


async def _record(files: _Files, ledger: Ledger, launch: int, pid: int, run: TaskRun) -> None:
    try:
        await files.run(
            ledger.launched, launch, pid, {"task_id": run.task_id, "attempt": run.attempt}
        )
    except OSError as exc:
        # The attempt itself is fine; only a crash of this owner would now
        # leave it running, which is no reason to fail it.
        log.warning("cannot record task %r attempt %s: %s", run.task_id, run.attempt, exc)


class _Files:
    """The small file I/O around every attempt (payload, launch ledger,
    result), in one worker thread of its own, in the order asked.

    Through ``anyio.to_thread`` each of the three calls of an attempt cost
    the event loop about half again as much CPU (its capacity limiter and
    cancel scope), and its four worker threads contended for the GIL: the
    runner's process used 10 to 15% more CPU per short command. As with
    ``anyio.to_thread``, a call is not made once its caller is cancelled,
    and one made is waited for (the cancellation follows).
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dspy-infra-process-files")

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        await anyio.lowlevel.checkpoint_if_cancelled()
        done = asyncio.get_running_loop().run_in_executor(self._executor, function, *args)
        with anyio.CancelScope(shield=True):
            result = await done
        return result  # noqa: RET504 - mypy: a scope's exit may swallow what it raises

    def shut_down(self) -> None:
        """Once the calls asked so far are done (blocking)."""
        self._executor.shutdown(wait=True)


def _conclude(ledger: Ledger, launch: int, result_file: Path | None, limit: int) -> bytes | None:
    try:
        ledger.ended(launch)
    except OSError as exc:  # as in _record: the attempt itself is fine
        log.warning("cannot record the end of a task's process in %s: %s", ledger.path, exc)
    return None if result_file is None else read_result(result_file, limit)


def _describe(record: Mapping[str, Any]) -> str:
    return f"task {record['task_id']!r} attempt {record['attempt']}"
