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
are recorded under ``state_dir/process/``, and :meth:`ProcessRunner.open`
kills the groups of owners that died without cleaning up, as the local
backend does for services.

The hot path waits for one thread hop before the launch (work dir, payload,
stale result) and one after it (result file, record); the record is written
while the command runs. There is no polling: the process's exit is awaited,
and a single ``killpg(pgid, 0)`` tells that nothing of its group is left.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
from collections import deque
from collections.abc import AsyncIterable, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from dspy_infra._process_group import (
    LaunchFailed,
    group_running,
    launch_group,
    owner_identity,
    stop_group,
    sweep,
    write_record,
)
from dspy_infra.abc import RunFailed, RunnerContext, TaskRun
from dspy_infra.config.model import HandlerConfig
from dspy_infra.config.placeholders import PlaceholderError, substitute

__all__ = ["PLACEHOLDERS", "ProcessRunner", "Runner"]

log = logging.getLogger("dspy_infra")

PLACEHOLDERS = ("payload_file", "result_file", "task_id", "attempt", "work_dir")
_KNOWN = ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)
# The grammar of dspy_infra.config.placeholders: ``{{`` and ``}}`` are literal braces.
_STDERR_LINES = 20
_STDERR_LINE_BYTES = 1000
_PAYLOAD_FILE = "payload.json"
_RESULT_FILE = "result.json"
_DRAIN_SECONDS = 2.0


class ProcessRunner:
    """Task attempts as local subprocesses, one process group each."""

    def __init__(self) -> None:
        self._context: RunnerContext | None = None
        self._records: Path | None = None
        self._owner: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return "process"

    async def open(self, context: RunnerContext) -> list[str]:
        records = context.state_dir / "process"
        self._context = context
        self._records = records
        self._owner = {
            **owner_identity(),
            "instance": context.instance_id,
            "project": context.project,
        }

        def prepare() -> list[str]:
            records.mkdir(parents=True, exist_ok=True)
            return sweep(records, _describe)

        return await anyio.to_thread.run_sync(prepare)

    def validate(self, handler: str) -> str | None:
        if self._context is None:
            return "the process runner is not open"
        config = self._context.config.handlers.get(handler)
        if config is None or config.command is None:
            names = ", ".join(sorted(self._context.config.handlers)) or "none"
            return (
                f"no [handlers.{handler}] with a command in the configuration (configured: {names})"
            )
        dummy = dict.fromkeys(PLACEHOLDERS, "x")
        try:
            _argv(config, dummy)
        except PlaceholderError as exc:
            return f"[handlers.{handler}] command: {exc}"
        return None

    async def run(self, run: TaskRun) -> Any:
        context, records = self._context, self._records
        if context is None or records is None:
            raise RuntimeError("ProcessRunner.run() before open()")
        handler = run.handler_config or context.config.handlers.get(run.handler)
        if handler is None or handler.command is None:
            raise RunFailed(self.validate(run.handler) or f"no command for {run.handler!r}")

        # Absolute, so that the command finds its files from any cwd.
        work_dir = run.work_dir.absolute()
        payload_file = work_dir / _PAYLOAD_FILE
        result_file = work_dir / _RESULT_FILE
        values = {
            "payload_file": str(payload_file),
            "result_file": str(result_file),
            "task_id": run.task_id,
            "attempt": str(run.attempt),
            "work_dir": str(work_dir),
        }
        try:
            argv = _argv(handler, values)
        except PlaceholderError as exc:
            raise RunFailed(f"[handlers.{run.handler}] command: {exc}") from None
        env = {
            **os.environ,
            # Python handlers block-buffer a piped stdout; unbuffer unless told not to.
            "PYTHONUNBUFFERED": "1",
            **handler.env,
            **run.env,
            "DSPY_INFRA_TASK_ID": run.task_id,
            "DSPY_INFRA_ATTEMPT": values["attempt"],
            "DSPY_INFRA_PAYLOAD_FILE": values["payload_file"],
            "DSPY_INFRA_RESULT_FILE": values["result_file"],
            "DSPY_INFRA_WORK_DIR": values["work_dir"],
        }
        cwd = Path(handler.cwd) if handler.cwd is not None else work_dir
        await anyio.to_thread.run_sync(_prepare, work_dir, payload_file, result_file, run.payload)

        stdout = _Tail(1, context.config.infra.max_result_bytes)
        stderr = _Tail(_STDERR_LINES, _STDERR_LINE_BYTES)
        grace = run.class_config.cancel_grace
        try:
            process = await launch_group(argv, env=env, cwd=cwd, stderr=subprocess.PIPE)
        except LaunchFailed as exc:
            raise RunFailed(exc.reason) from None
        record = records / f"{self._owner['instance']}-{process.pid}.json"
        data = {**self._owner, "task_id": run.task_id, "attempt": run.attempt, "pid": process.pid}
        finished = False
        try:
            async with anyio.create_task_group() as group:
                # Beside the process rather than before it: the record is for
                # a crash of this owner, and a short command should not wait
                # for a thread to write it.
                group.start_soon(_record, record, data)
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
            raw = await anyio.to_thread.run_sync(
                _conclude, record, result_file if code == 0 else None
            )
            finished = True
        finally:
            with anyio.CancelScope(shield=True):
                if not finished:
                    # Cancelled (task cancel or timeout) or broken: stop the
                    # work before the attempt counts as over.
                    await stop_group(process, grace)
                    await anyio.to_thread.run_sync(_conclude, record, None)
                await process.aclose()
        return _outcome(code, raw, result_file, stdout, stderr)

    async def close(self) -> None:
        self._context = None
        self._records = None


Runner = ProcessRunner


async def _record(path: Path, data: Mapping[str, Any]) -> None:
    try:
        await anyio.to_thread.run_sync(write_record, path, data)
    except OSError as exc:
        # The attempt itself is fine; only a crash of this owner would now
        # leave it running, which is no reason to fail it.
        log.warning("cannot record task %r attempt %s: %s", data["task_id"], data["attempt"], exc)


class _Tail:
    """The last non-empty lines of a stream, bounded in number and length.

    A chatty or binary-spewing process then costs a fixed amount of memory;
    a line longer than the bound keeps its head and is marked as cut.
    """

    def __init__(self, lines: int, max_bytes: int):
        self._lines: deque[tuple[bytes, bool]] = deque(maxlen=lines)
        self._max = max_bytes
        self._pending = b""
        self._cut = False  # the pending line already lost its end

    async def pump(self, stream: AsyncIterable[bytes] | None) -> None:
        if stream is None:
            return
        async for chunk in stream:
            self.feed(chunk)
        self.end()

    def end(self) -> None:
        self._add(self._pending, self._cut)
        self._pending, self._cut = b"", False

    def feed(self, chunk: bytes) -> None:
        if b"\n" not in chunk:
            if not self._cut:
                self._pending += chunk
                if len(self._pending) > self._max:
                    self._pending = self._pending[: self._max]
                    self._cut = True
            return
        *complete, rest = (self._pending + chunk).split(b"\n")
        cut, self._cut = self._cut, False
        for line in complete:
            self._add(line, cut)
            cut = False
        self._pending = b""
        self.feed(rest)

    def _add(self, line: bytes, cut: bool) -> None:
        line = line.rstrip(b"\r")
        if not line.strip():
            return
        if len(line) > self._max:
            line, cut = line[: self._max], True
        self._lines.append((line, cut))

    def last(self) -> tuple[str, bool] | None:
        """The last line and whether it was cut."""
        if not self._lines:
            return None
        line, cut = self._lines[-1]
        return line.decode(errors="replace"), cut

    def text(self) -> list[str]:
        return [
            line.decode(errors="replace") + (" [...]" if cut else "") for line, cut in self._lines
        ]


def _render(template: str, values: Mapping[str, str]) -> str:
    def lookup(ref: str) -> str:
        try:
            return values[ref]
        except KeyError:
            raise PlaceholderError(f"unknown placeholder {{{ref}}} (known: {_KNOWN})") from None

    return substitute(template, lookup)


def _argv(handler: HandlerConfig, values: Mapping[str, str]) -> list[str]:
    command = handler.command
    assert command is not None
    if not handler.shell:
        assert not isinstance(command, str)
        return [_render(part, values) for part in command]
    if isinstance(command, str):
        quoted = {name: shlex.quote(value) for name, value in values.items()}
        script = _render(command, quoted)
    else:
        script = shlex.join(_render(part, values) for part in command)
    return ["/bin/sh", "-c", script]


def _prepare(work_dir: Path, payload_file: Path, result_file: Path, payload: Any) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    payload_file.write_text(json.dumps(payload))
    # A retry reuses the work dir: an earlier attempt's result must not pass for this one's.
    result_file.unlink(missing_ok=True)


def _conclude(record: Path, result_file: Path | None) -> bytes | None:
    record.unlink(missing_ok=True)
    if result_file is None:
        return None
    try:
        return result_file.read_bytes()
    except FileNotFoundError:
        return None


def _outcome(code: int, raw: bytes | None, result_file: Path, stdout: _Tail, stderr: _Tail) -> Any:
    if code != 0:
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            message = f"killed by signal {name}"
        else:
            message = f"exited with code {code}"
        raise RunFailed(message, exit_code=code, output=stderr.text())
    if raw and raw.strip():
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise RunFailed(
                f"the result file {str(result_file)!r} is not valid JSON ({exc})",
                exit_code=0,
                output=stderr.text(),
            ) from None
    last = stdout.last()
    if last is None:
        return None
    line, cut = last
    if cut:
        raise RunFailed(
            "the last line of stdout, taken as the result, is longer than "
            "[infra] max_result_bytes; write large results to the result file",
            exit_code=0,
            output=stderr.text(),
        )
    try:
        return json.loads(line)
    except ValueError:
        return line


def _describe(record: Mapping[str, Any]) -> str:
    return f"task {record['task_id']!r} attempt {record['attempt']}"
