"""What the runners of ``[handlers.NAME]`` commands share: files, argv, environment, result.

The process and docker runners make the same promise to a command
(docs/runners.md): the payload in ``payload.json``, the result in
``result.json`` or else the last line of stdout, the same placeholders and
``DSPY_INFRA_*`` variables, the same errors. Keeping that here, once, is what
keeps a handler portable from one runner to the other.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
from collections import deque
from collections.abc import AsyncIterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from attrs import frozen

from dspy_infra._exit_codes import Unknown, reported
from dspy_infra.abc import RunFailed, RunnerContext, TaskRun
from dspy_infra.config.model import HandlerConfig
from dspy_infra.config.placeholders import HANDLER_PLACEHOLDERS, PlaceholderError, render_handler

__all__ = [
    "PLACEHOLDERS",
    "STDERR_LINES",
    "STDERR_LINE_BYTES",
    "AttemptFiles",
    "Tail",
    "attempt_env",
    "command_argv",
    "exit_message",
    "outcome",
    "prepare",
    "read_result",
    "validate_handler",
]

PLACEHOLDERS = HANDLER_PLACEHOLDERS
STDERR_LINES = 20
STDERR_LINE_BYTES = 1000
_PAYLOAD_FILE = "payload.json"
_RESULT_FILE = "result.json"
_CHUNK = 1 << 16
# Outside a string: a run of whitespace (dropped), or the quote that opens one.
_OUTSIDE_STRINGS = re.compile(rb'[ \t\n\r]+|"')
# Inside: the quote that closes it, or a backslash that escapes the next byte.
_IN_STRING = re.compile(rb'["\\]')


@frozen(kw_only=True)
class AttemptFiles:
    """Where one attempt's files are, and the placeholder values that name them."""

    work_dir: Path
    payload_file: Path
    result_file: Path
    values: Mapping[str, str]

    @classmethod
    def of(cls, run: TaskRun) -> AttemptFiles:
        # Absolute, so that the command finds its files from any cwd (and a
        # container, which mounts the work dir at this same path).
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
        return cls(
            work_dir=work_dir, payload_file=payload_file, result_file=result_file, values=values
        )


def validate_handler(
    runner: str, context: RunnerContext | None, handler: str, *, needs: str = "command"
) -> str | None:
    """Why ``handler`` cannot run on ``runner``: not open, not configured, bad placeholders.

    ``needs`` is the key the handler's table must set (``command``; the
    docker runner's ``image``, where the image's own command may do).
    """
    if context is None:
        return f"the {runner} runner is not open"
    config = context.config.handlers.get(handler)
    if config is None or getattr(config, needs) is None:
        names = ", ".join(sorted(context.config.handlers)) or "none"
        article = "an" if needs[0] in "aeiou" else "a"
        return (
            f"no [handlers.{handler}] with {article} {needs} in the configuration "
            f"(configured: {names})"
        )
    return None if config.command is None else _check_command(handler, config)


def _check_command(name: str, handler: HandlerConfig) -> str | None:
    """Why the command's placeholders cannot be filled in, or None: checked at submit."""
    try:
        _argv(handler, dict.fromkeys(PLACEHOLDERS, "x"))
    except PlaceholderError as exc:
        return f"[handlers.{name}] command: {exc}"
    return None


def command_argv(name: str, handler: HandlerConfig, values: Mapping[str, str]) -> list[str]:
    """The handler's command with the attempt's values; a shell command runs as ``/bin/sh -c``."""
    try:
        return _argv(handler, values)
    except PlaceholderError as exc:
        raise RunFailed(f"[handlers.{name}] command: {exc}") from None


def attempt_env(handler: HandlerConfig, run: TaskRun, values: Mapping[str, str]) -> dict[str, str]:
    """What the attempt adds to its command's environment, later entries winning."""
    # The devices leased to the attempt override the handler's env; the none
    # of an attempt that leases none gives way to the handler's own choice.
    first, last = (handler.env, run.env) if run.gpus else (run.env, handler.env)
    return {
        # Python handlers block-buffer a piped stdout; unbuffer unless told not to.
        "PYTHONUNBUFFERED": "1",
        **first,
        **last,
        "DSPY_INFRA_TASK_ID": run.task_id,
        "DSPY_INFRA_ATTEMPT": values["attempt"],
        "DSPY_INFRA_PAYLOAD_FILE": values["payload_file"],
        "DSPY_INFRA_RESULT_FILE": values["result_file"],
        "DSPY_INFRA_WORK_DIR": values["work_dir"],
    }


def prepare(files: AttemptFiles, payload: Any) -> None:
    """Create the work dir and write the payload (blocking: run it in a thread)."""
    files.work_dir.mkdir(parents=True, exist_ok=True)
    files.payload_file.write_text(json.dumps(payload))
    # A retry reuses the work dir: an earlier attempt's result must not pass for this one's.
    files.result_file.unlink(missing_ok=True)


def read_result(result_file: Path, limit: int) -> bytes | None:
    """The result file's content, or None when the command wrote none (blocking).

    A result is measured as it is stored, as compact JSON: a file over
    ``limit`` is read on without the whitespace between its tokens (what
    ``json.dump(indent=2)`` adds may double it). At most ``limit + 1`` bytes
    are kept, so that a huge file costs no more memory than one just over
    the limit (which :func:`outcome` refuses). A file within the limit is
    kept as written, so that a JSON error in it names its own line and column.
    """
    try:
        with result_file.open("rb") as file:
            head = file.read(limit + 1)
            # UTF-16 or UTF-32 (which json.loads reads too) has other whitespace bytes.
            if len(head) <= limit or json.detect_encoding(head) not in ("utf-8", "utf-8-sig"):
                return head
            return _compact(head, file, limit)
    except FileNotFoundError:
        return None


def _compact(head: bytes, file: BinaryIO, limit: int) -> bytes:
    """``head`` then the rest of ``file``, less JSON's whitespace outside strings;
    read until more than ``limit`` bytes are kept, and cut there."""
    kept = bytearray()
    in_string = escaped = False
    chunk = head
    while chunk and len(kept) <= limit:
        at = 0
        while at < len(chunk):
            if escaped:  # the byte after a backslash, a quote included
                kept += chunk[at : at + 1]
                at, escaped = at + 1, False
                continue
            found = (_IN_STRING if in_string else _OUTSIDE_STRINGS).search(chunk, at)
            if found is None:
                kept += chunk[at:]
                break
            if in_string:
                kept += chunk[at : found.end()]
                # A quote closes the string; a backslash escapes what follows, in it.
                escaped = found.group() == b"\\"
                in_string = escaped
            else:
                kept += chunk[at : found.start()]
                if found.group() == b'"':
                    kept += b'"'
                    in_string = True
            at = found.end()
        chunk = file.read(_CHUNK)
    return bytes(kept[: limit + 1])


def outcome(
    code: int, raw: bytes | None, result_file: Path, stdout: Tail, stderr: Tail, *, limit: int
) -> Any:
    """The attempt's result, or :class:`RunFailed` saying why there is none.

    ``code`` is the exit code (``-N`` for signal N), ``raw`` the result file's
    content (None when there is none; see :func:`read_result`), ``stdout``
    the tail holding the last line of stdout, ``limit`` the largest result
    (``[infra] max_result_bytes``).
    """
    if code != 0:
        raise RunFailed(exit_message(code), exit_code=code, output=stderr.text())
    if raw is not None and len(raw) > limit:
        raise RunFailed(
            f"the result file {str(result_file)!r} is over the limit of {limit} bytes "
            "([infra] max_result_bytes)",
            exit_code=0,
            output=stderr.text(),
        )
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


class Tail:
    """The last non-empty lines of a stream, bounded in number and length.

    A chatty or binary-spewing process then costs a fixed amount of memory;
    a line longer than the bound keeps its head and is marked as cut. The
    line under way grows in place: joined anew with each piece of a pipe
    (64 KiB), a result line of tens of MB cost the event loop time
    quadratic in its length.
    """

    def __init__(self, lines: int, max_bytes: int):
        self._lines: deque[tuple[bytes, bool]] = deque(maxlen=lines)
        self._max = max_bytes
        self._pending = bytearray()
        self._cut = False  # the pending line already lost its end

    async def pump(self, stream: AsyncIterable[bytes] | None) -> None:
        if stream is None:
            return
        try:
            async for chunk in stream:
                self.feed(chunk)
        finally:
            # Also when the reading is cut short (a child that left the group
            # holds the stream open): what came last is a line all the same.
            self.end()

    def end(self) -> None:
        self._add(bytes(self._pending), self._cut)
        self._pending.clear()
        self._cut = False

    def feed(self, chunk: bytes) -> None:
        if b"\n" not in chunk:
            if not self._cut:
                self._pending += chunk
                if len(self._pending) > self._max:
                    del self._pending[self._max :]
                    self._cut = True
            return
        *complete, rest = (bytes(self._pending) + chunk).split(b"\n")
        cut, self._cut = self._cut, False
        for line in complete:
            self._add(line, cut)
            cut = False
        self._pending.clear()
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


def exit_message(code: int) -> str:
    if isinstance(code, Unknown):
        return f"no exit code: {code.why}"
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = str(-code)
    return f"killed by signal {name}{reported(code)}"


def _argv(handler: HandlerConfig, values: Mapping[str, str]) -> list[str]:
    command = handler.command
    assert command is not None
    if not handler.shell:
        assert not isinstance(command, str)
        return [render_handler(part, values) for part in command]
    if isinstance(command, str):
        quoted = {name: shlex.quote(value) for name, value in values.items()}
        script = render_handler(command, quoted)
    else:
        script = shlex.join(render_handler(part, values) for part in command)
    return ["/bin/sh", "-c", script]
