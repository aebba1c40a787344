"""The runner's files: each batch's scripts and manifest, and what a job leaves behind.

All of it is blocking file I/O, called through ``anyio.to_thread``, one hop
per batch (writing) and one per finished job (reading). A batch lives under
``STATE_DIR/slurm/``: ``BATCH.sh`` (what sbatch runs), ``BATCH.json`` (its
tasks by array index: what a restarted owner re-attaches by) and Slurm's own
output, ``BATCH.log`` or ``BATCH.INDEX.log`` (where slurmstepd says "DUE TO
TIME LIMIT"). They are removed once every task of the batch is done with.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from attrs import frozen

from dspy_infra.runners._commands import (
    STDERR_LINE_BYTES,
    STDERR_LINES,
    AttemptFiles,
    Tail,
    prepare,
    read_result,
)
from dspy_infra.runners.slurm.script import TaskPaths

__all__ = [
    "BatchFiles",
    "Entry",
    "JobOutput",
    "Manifest",
    "exit_code",
    "read_manifests",
    "read_output",
    "remove_batch",
    "request_cancel",
    "write_batch",
]

_SLURM_LOG_LINES = 5


@frozen(kw_only=True)
class Entry:
    """One task of a batch, and the array index of the job that runs it (with others, packed).

    ``last``: the task's last attempt, which is not run again after a crash.
    ``cancelled`` (read from its ``.cancel`` file, not written in the
    manifest): its owner stopped it, or could not and left its job to cancel.
    """

    task_id: str
    attempt: int
    work_dir: Path
    index: int = 0
    last: bool = False
    cancelled: bool = False

    @property
    def paths(self) -> TaskPaths:
        return TaskPaths.of(self.work_dir, self.attempt)


@frozen(kw_only=True)
class BatchFiles:
    """Where one batch's own files are; ``size`` is the number of its jobs (array indices)."""

    directory: Path
    batch_id: str
    size: int

    @property
    def script(self) -> Path:
        return self.directory / f"{self.batch_id}.sh"

    @property
    def manifest(self) -> Path:
        return self.directory / f"{self.batch_id}.json"

    @property
    def output(self) -> Path:
        """sbatch's ``--output``: one file for a job, one per index (``%a``) for an array.

        A pattern: a ``%`` of the directory's own (``50%j done``) is
        doubled, else sbatch would expand it and the job fail to start.
        """
        suffix = ".log" if self.size == 1 else ".%a.log"
        return Path(str(self.directory).replace("%", "%%")) / f"{self.batch_id}{suffix}"

    def log(self, index: int) -> Path:
        suffix = ".log" if self.size == 1 else f".{index}.log"
        return self.directory / f"{self.batch_id}{suffix}"


@frozen(kw_only=True)
class Manifest:
    batch: BatchFiles
    name: str
    entries: tuple[Entry, ...]


def write_batch(
    batch: BatchFiles,
    name: str,
    entries: Sequence[tuple[Entry, AttemptFiles, object, str]],
    batch_text: str,
) -> None:
    """Every file the batch's job needs, written before sbatch is called.

    ``entries`` hold, per task: its entry, its files, its payload and its
    task script. What an earlier job of the same attempt left (submitted
    again after a node failure) goes first. The manifest goes last, by
    rename: one that exists is whole.
    """
    batch.directory.mkdir(parents=True, exist_ok=True)
    for entry, files, payload, text in entries:
        prepare(files, payload)
        paths = entry.paths
        for stale in (paths.exit, paths.stdout, paths.stderr, paths.cancel):
            stale.unlink(missing_ok=True)
        paths.script.write_text(text)
    batch.script.write_text(batch_text)
    data = {
        "name": name,
        "tasks": [
            [e.task_id, e.attempt, str(e.work_dir), e.index, e.last] for e, _, _, _ in entries
        ],
    }
    tmp = batch.manifest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, batch.manifest)


def read_manifests(directory: Path) -> list[Manifest]:
    """The batches a previous owner on this state dir left (unreadable ones are skipped)."""
    found = []
    try:
        paths = sorted(directory.glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            data = json.loads(path.read_text())
            entries = tuple(
                Entry(
                    task_id=str(t),
                    attempt=int(a),
                    work_dir=Path(w),
                    index=int(i),
                    last=bool(last and last[0]),  # absent: an older manifest, not known
                    cancelled=TaskPaths.of(Path(w), int(a)).cancel.exists(),
                )
                for t, a, w, i, *last in data["tasks"]
            )
            name = str(data["name"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        size = max((e.index for e in entries), default=0) + 1
        batch = BatchFiles(directory=directory, batch_id=path.stem, size=size)
        found.append(Manifest(batch=batch, name=name, entries=entries))
    return found


def remove_batch(batch: BatchFiles) -> None:
    for path in (batch.manifest, batch.script, *map(batch.log, range(batch.size))):
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


@frozen(kw_only=True)
class JobOutput:
    """What one task's job left: its exit code (None: it did not get to write one), the result
    file's content, the tails of its stdout and stderr, and Slurm's own last words."""

    code: int | None
    raw: bytes | None
    stdout: Tail
    stderr: Tail
    slurm: tuple[str, ...]


def read_output(
    paths: TaskPaths, result_file: Path, slurm_log: Path | None, max_result: int
) -> JobOutput:
    code = exit_code(paths)
    stdout = _tail(paths.stdout, 1, max_result)
    stderr = _tail(paths.stderr, STDERR_LINES, STDERR_LINE_BYTES)
    slurm = (
        [] if slurm_log is None else _tail(slurm_log, _SLURM_LOG_LINES, STDERR_LINE_BYTES).text()
    )
    # Without an exit code of its own, Slurm's may still say 0.
    raw = read_result(result_file, max_result) if code in (0, None) else None
    return JobOutput(code=code, raw=raw, stdout=stdout, stderr=stderr, slurm=tuple(slurm))


def request_cancel(paths: TaskPaths) -> bool:
    """Ask a task's script not to start its command, or a packed one's to stop it; whether
    the script has started."""
    paths.cancel.touch()
    return paths.stdout.exists()


def exit_code(paths: TaskPaths) -> int | None:
    """The recorded exit code of a task's job, None when it has none (blocking)."""
    try:
        return int(paths.exit.read_text().strip())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int, max_bytes: int) -> Tail:
    """The last lines of a file, reading only its end."""
    tail = Tail(lines, max_bytes)
    # Enough for every kept line at full length, plus the cut marker's byte:
    # a longer last line is then seen to be longer than max_bytes, and cut.
    budget = lines * (max_bytes + 2) + 1
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - budget))
            data = f.read()
    except OSError:
        return tail
    if size > budget:
        # The first line read is a piece of a line: keep it only when it is
        # the last one (then it is surely longer than max_bytes, and cut).
        _, _, rest = data.partition(b"\n")
        if rest.strip():
            data = rest
    tail.feed(data)
    tail.end()
    return tail
