"""The durable task store: SQLite in WAL mode, written in batches by a worker
thread, or by a process of its own for the large batches of a busy scheduler.

Every state change that matters after a crash goes through :class:`Journal`:
callers append an operation and, when they must not go on before it is on
disk (a submit, the start of an attempt, a final state), await the batch it
joined. One writer takes everything appended while the previous batch was
being written and commits it in one transaction, in one thread hop, so that
a thousand concurrent submits share one commit instead of paying one each.
The event loop never touches SQLite.

With ``durable = false`` the same operations are applied to a dict, at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import fcntl
import itertools
import json
import os
import pickle
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, cast

import anyio
import anyio.to_thread

from dspy_infra.errors import InfraClosed, InfraError, StateDirInUse
from dspy_infra.scheduling import sqlwrite

T = TypeVar("T")

__all__ = [
    "COLUMNS",
    "JSON_ENCODER",
    "Journal",
    "MemoryStore",
    "Op",
    "Row",
    "RunRow",
    "SQLiteStore",
    "StepRow",
    "Store",
    "StoreFailed",
    "WorkflowRow",
    "Written",
    "dumps",
]

# One row per task. ``attempts`` counts starts, stored before the attempt
# runs (Journal.write_all's at_writer): a crash mid-attempt finds it counted.
# ``seq`` is the rowid, which SQLite gives as the largest so far plus one,
# so it is submit order without AUTOINCREMENT (whose bookkeeping table costs
# every insert a page write: 3 of the 20 us of a lone submit's commit).
COLUMNS = (
    "task_id",
    "handler",
    "task_class",
    "priority",
    "payload",
    "needs",
    "workflow_id",
    "state",
    "attempts",
    "max_attempts",
    "timeout",
    "resources",
    "submitted_at",
    "started_at",
    "finished_at",
    "not_before",
    "result",
    "error",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY,
    task_id TEXT NOT NULL UNIQUE,
    handler TEXT NOT NULL,
    task_class TEXT NOT NULL,
    priority INTEGER NOT NULL,
    payload TEXT NOT NULL,
    needs TEXT NOT NULL,
    workflow_id TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    timeout REAL,
    resources TEXT NOT NULL,
    submitted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    not_before REAL,
    result TEXT,
    error TEXT
);
-- The unfinished tasks, found at open in submit order. Keyed on what no
-- start or requeue changes: an index on the state would be rewritten by
-- every start too: 2 to 4 us a task of the writer's (docs/benchmarks.md).
-- (tasks_unfinished, on the state, is the index of earlier versions.)
DROP INDEX IF EXISTS tasks_unfinished;
CREATE INDEX IF NOT EXISTS tasks_open ON tasks (seq) WHERE finished_at IS NULL;
PRAGMA user_version = 1;
"""
# Workflows (dspy_infra.workflows) keep their specs, runs and steps beside the
# tasks, in the same file and through the same journal: a run's rows and its
# steps' tasks are written by the same writer, in order.
_WORKFLOW_SCHEMA = """
CREATE TABLE IF NOT EXISTS workflows (
    workflow_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS workflow_runs (
    seq INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL UNIQUE,
    workflow_id TEXT NOT NULL,
    inputs TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS workflow_runs_unfinished ON workflow_runs (state)
    WHERE state = 'running';
-- A run forgotten (keep_finished) takes its steps with it.
CREATE TRIGGER IF NOT EXISTS workflow_runs_forgotten AFTER DELETE ON workflow_runs
BEGIN
    DELETE FROM workflow_steps WHERE run_id = old.run_id;
END;
CREATE TABLE IF NOT EXISTS workflow_steps (
    run_id TEXT NOT NULL,
    step TEXT NOT NULL,
    state TEXT NOT NULL,
    task_ids TEXT NOT NULL,
    result TEXT,
    error TEXT,
    started_at REAL,
    finished_at REAL,
    PRIMARY KEY (run_id, step)
);
"""
# (workflow_id, name, spec, created_at)
WorkflowRow = tuple[str, str, str, float]
# (run_id, workflow_id, inputs, state, created_at, finished_at, error)
RunRow = tuple[Any, ...]
# (run_id, step, state, task_ids, result, error, started_at, finished_at)
StepRow = tuple[Any, ...]
_RUN_COLUMNS = "run_id, workflow_id, inputs, state, created_at, finished_at, error"

# Built from the constant column names above; values always go through "?".
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM tasks"  # noqa: S608

OpKind = Literal[
    "insert",
    "insert_all",
    "start",
    "requeue",
    "finish",
    "forget",
    "workflow",
    "run",
    "run_state",
    "step",
    "forget_run",
]
# (kind, parameters). insert: a full row in COLUMNS order; insert_all: (shape,
# rows), new tasks of one shape (a submit by payload), queued, no attempt yet:
# shape is (handler, task_class, priority, needs, workflow_id, max_attempts,
# timeout, resources), and each row (task_id, payload, submitted_at); start: (attempts,
# started_at, task_id); requeue: (attempts, not_before, error, task_id);
# finish: (state, finished_at, result, error, task_id); forget: (task_id,),
# which removes a finished task's row (an unfinished one stays).
Op = tuple[OpKind, tuple[Any, ...]]

_SQL: dict[OpKind, sqlwrite.Statement] = {
    "insert": (
        f"INSERT OR IGNORE INTO tasks ({', '.join(COLUMNS)}) "  # noqa: S608 - constant names
        f"VALUES ({', '.join('?' * len(COLUMNS))})"
    ),
    # The shape once, then three values a row: binding all 18 of a row cost
    # the writer twice the time of the insert itself (docs/benchmarks.md).
    "insert_all": (
        "INSERT OR REPLACE INTO temp.shape VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?)",
        "INSERT OR IGNORE INTO tasks (task_id, payload, submitted_at, handler, task_class, "
        "priority, needs, workflow_id, state, attempts, max_attempts, timeout, resources) "
        "SELECT ?, ?, ?, handler, task_class, priority, needs, workflow_id, 'queued', 0, "
        "max_attempts, timeout, resources FROM temp.shape",
    ),
    "start": "UPDATE tasks SET state = 'running', attempts = ?, started_at = ? WHERE task_id = ?",
    "requeue": (
        "UPDATE tasks SET state = 'queued', attempts = ?, not_before = ?, error = ? "
        "WHERE task_id = ?"
    ),
    "finish": (
        "UPDATE tasks SET state = ?, finished_at = ?, result = ?, error = ? WHERE task_id = ?"
    ),
    "forget": "DELETE FROM tasks WHERE task_id = ? AND finished_at IS NOT NULL",
    # workflow: a WorkflowRow; run: a RunRow; run_state: (state, finished_at,
    # error, run_id); step: a StepRow, replacing the step's row; forget_run:
    # (run_id,), which removes a finished run and its steps.
    "workflow": (
        "INSERT OR IGNORE INTO workflows (workflow_id, name, spec, created_at) VALUES (?, ?, ?, ?)"
    ),
    "run": (
        f"INSERT OR IGNORE INTO workflow_runs ({_RUN_COLUMNS}) "  # noqa: S608 - constant names
        "VALUES (?, ?, ?, ?, ?, ?, ?)"
    ),
    "run_state": (
        "UPDATE workflow_runs SET state = ?, finished_at = ?, error = ? WHERE run_id = ?"
    ),
    "step": "INSERT OR REPLACE INTO workflow_steps VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    "forget_run": "DELETE FROM workflow_runs WHERE run_id = ? AND state != 'running'",
}
_WORKFLOW_KINDS = frozenset({"workflow", "run", "run_state", "step", "forget_run"})
# What each writing connection needs besides the file's tables (insert_all's shape).
_WRITER_SETUP = """
PRAGMA temp_store = MEMORY;
CREATE TEMP TABLE IF NOT EXISTS shape (
    id INTEGER PRIMARY KEY, handler, task_class, priority, needs, workflow_id,
    max_attempts, timeout, resources
);
"""

# Finished tasks, except those of workflow runs still running: a resumed run
# looks its steps' tasks up by id (RUN:STEP[:i]), and must find them. The
# range on task_id is the ids that begin with "RUN:" (";" follows ":").
_FINISHED_BEFORE = """
SELECT task_id FROM tasks WHERE finished_at < ? AND NOT EXISTS (
    SELECT 1 FROM workflow_runs AS r WHERE r.state = 'running'
    AND tasks.task_id >= r.run_id || ':' AND tasks.task_id < r.run_id || ';'
) LIMIT ?
"""

Row = tuple[Any, ...]
# How long a write that nobody waits for may wait for company (Journal):
# about the gap between two calls of a client that submits one task at a
# time over gRPC, and short beside anything a person or a poll would notice.
DEFER_SECONDS = 0.002
# Batches that write this many rows or more go to the writer process (_ChildWriter).
CHILD_BATCH = 16
# How long a new instance waits for the writer process of a crashed one to
# finish its last commit (see _lock): SQLite's busy timeout, and some.
_ORPHAN_WAIT = 6.0
_IN_CHUNK = 500  # ids per "IN (...)": well under SQLite's limit on parameters
_INDEX = {name: i for i, name in enumerate(COLUMNS)}
_SET: dict[OpKind, tuple[str, ...]] = {
    "start": ("attempts", "started_at"),
    "requeue": ("attempts", "not_before", "error"),
    "finish": ("state", "finished_at", "result", "error"),
}
# The same as column positions, and the state each kind sets (None: in its parameters).
_SET_AT: dict[OpKind, tuple[tuple[int, ...], str | None]] = {
    kind: (tuple(_INDEX[c] for c in columns), {"start": "running", "requeue": "queued"}.get(kind))
    for kind, columns in _SET.items()
}
_STATE_AT = _INDEX["state"]
_FINISHED_AT = _INDEX["finished_at"]


class Store(Protocol):
    # Whether every commit waits for the disk (synchronous = "full"): then
    # a write that nobody waits for always waits for company (Journal).
    syncs_each_commit: bool

    def open(self) -> list[Row]:
        """Create or open the store; the rows of unfinished tasks, in submit order."""

    def apply(self, ops: Sequence[Op]) -> None:
        """Apply the operations in one transaction."""

    def get(self, task_id: str) -> Row | None: ...

    def stored(self, task_ids: Collection[str]) -> set[str]:
        """Those of ``task_ids`` that the store holds."""

    def finished_before(self, cutoff: float, limit: int) -> list[str]:
        """Up to ``limit`` tasks that reached their final state before ``cutoff`` (epoch s)."""

    def runs_finished_before(self, cutoff: float, limit: int) -> list[str]:
        """Up to ``limit`` workflow runs that finished before ``cutoff`` (epoch s)."""

    def workflows(self) -> list[WorkflowRow]:
        """Every workflow stored."""

    def runs(self, run_id: str | None = None) -> list[RunRow]:
        """The unfinished runs (state 'running'), in start order; or the run ``run_id``."""

    def steps(self, run_id: str) -> list[StepRow]:
        """The stored steps of one run."""

    def close(self) -> None: ...


class SQLiteStore:
    """Two connections: the journal's writer thread writes through one, reads
    (from worker threads) go through the other, so that a long read (the
    scan of ``keep_finished``) never holds a commit up: WAL lets a reader
    and the writer work at once."""

    def __init__(self, path: Path, *, synchronous: str = "normal"):
        self.path = path
        self._synchronous = synchronous.upper()
        self.syncs_each_commit = self._synchronous in {"FULL", "EXTRA"}
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._lock: int | None = None

    def open(self) -> list[Row]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _hold(self.path.with_name(self.path.name + ".lock"))
        try:
            return self._open()
        except BaseException:
            self._release()
            raise

    def _open(self) -> list[Row]:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute(f"PRAGMA synchronous = {self._synchronous}")
            db.executescript(_SCHEMA)
            db.executescript(_WORKFLOW_SCHEMA)
            db.executescript(_WRITER_SETUP)
            rows = db.execute(
                # Unfinished: only the finish sets finished_at (see _SQL).
                f"{_SELECT} WHERE finished_at IS NULL ORDER BY seq"
            ).fetchall()
            reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.DatabaseError:
            db.close()
            raise
        self._db, self._reader = db, reader
        return rows

    def apply(self, ops: Sequence[Op]) -> None:
        sqlwrite.apply(self._connection(), _SQL, ops)

    def writer_opening(self) -> tuple[str, str, dict[OpKind, sqlwrite.Statement], str]:
        """What the writer process needs to write as :meth:`apply` does (see sqlwrite)."""
        return str(self.path), self._synchronous, _SQL, _WRITER_SETUP

    @property
    def lock_fd(self) -> int | None:
        """The descriptor that holds the state directory's lock, while open."""
        return self._lock

    def get(self, task_id: str) -> Row | None:
        row: Row | None = (
            self._reading().execute(f"{_SELECT} WHERE task_id = ?", (task_id,)).fetchone()
        )
        return row

    def stored(self, task_ids: Collection[str]) -> set[str]:
        found: set[str] = set()
        ids = list(task_ids)
        db = self._reading()
        for start in range(0, len(ids), _IN_CHUNK):
            chunk = ids[start : start + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            query = f"SELECT task_id FROM tasks WHERE task_id IN ({marks})"  # noqa: S608 - only marks
            found.update(task_id for (task_id,) in db.execute(query, chunk))
        return found

    def finished_before(self, cutoff: float, limit: int) -> list[str]:
        # No index on finished_at: one scan now and then, on the reader's
        # connection, costs less than an index written by every task's end.
        rows = self._reading().execute(_FINISHED_BEFORE, (cutoff, limit))
        return [task_id for (task_id,) in rows]

    def runs_finished_before(self, cutoff: float, limit: int) -> list[str]:
        query = (
            "SELECT run_id FROM workflow_runs WHERE state != 'running' AND finished_at < ? LIMIT ?"
        )
        return [run_id for (run_id,) in self._reading().execute(query, (cutoff, limit))]

    def workflows(self) -> list[WorkflowRow]:
        query = "SELECT workflow_id, name, spec, created_at FROM workflows"
        return list(self._reading().execute(query))

    def runs(self, run_id: str | None = None) -> list[RunRow]:
        db = self._reading()
        select = f"SELECT {_RUN_COLUMNS} FROM workflow_runs"  # noqa: S608 - constant names
        if run_id is not None:
            return list(db.execute(f"{select} WHERE run_id = ?", (run_id,)))
        return list(db.execute(f"{select} WHERE state = 'running' ORDER BY seq"))

    def steps(self, run_id: str) -> list[StepRow]:
        query = "SELECT * FROM workflow_steps WHERE run_id = ?"
        return list(self._reading().execute(query, (run_id,)))

    def close(self) -> None:
        for db in (self._reader, self._db):
            if db is not None:
                db.close()
        self._db = self._reader = None
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # and with it the lock
            self._lock = None

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise _closed()
        return self._db

    def _reading(self) -> sqlite3.Connection:
        if self._reader is None:
            # A handle kept past its instance's end, asking for what is not in
            # memory: the caller's mistake, told as InfraClosed, not a bug.
            raise _closed()
        return self._reader


def _hold(path: Path) -> int:
    """An exclusive lock on ``path``, held by the returned descriptor.

    Two instances on one store would both run the tasks they find there. The
    kernel drops the lock when its holder dies, however it dies, so a crash
    never leaves the state directory locked; the file keeps the holder's pid
    for the message of the next one refused.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        _lock(fd, path)
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):  # the pid is for a message only
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _lock(fd: int, path: Path) -> None:
    # The store's writer process holds the lock too: orphaned by a crash, it
    # commits the batch it has, then exits, and the lock with it. A new
    # instance waits for that (a few milliseconds, or SQLite's busy timeout
    # at most), not refused while the holder it names is already gone.
    deadline = time.monotonic() + _ORPHAN_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            if _alive(holder) or time.monotonic() > deadline:
                raise StateDirInUse(
                    f"the state directory {str(path.parent)!r} is in use by another AgentInfra "
                    f"({_describe_holder(holder)}), which would run the same stored tasks: "
                    "give each instance its own state_dir (or durable = false)"
                ) from None
            time.sleep(0.01)
        else:
            return


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return True  # unknown: as if it were
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _describe_holder(pid: str) -> str:
    if not pid.isdigit():
        return "pid unknown"
    if not _alive(pid):
        # The lock outlives its taker in a child forked without exec (a
        # multiprocessing worker, say) that is still running.
        return f"pid {pid}, now gone: a process it forked still holds the lock"
    return f"pid {pid}"


class MemoryStore:
    """``durable = false``: the rows live in a dict, gone with the process."""

    syncs_each_commit = False

    def __init__(self) -> None:
        self._rows: dict[str, list[Any]] = {}
        self._workflows: dict[str, WorkflowRow] = {}
        self._runs: dict[str, list[Any]] = {}
        self._steps: dict[str, dict[str, StepRow]] = {}  # run -> step -> row

    def open(self) -> list[Row]:
        return []

    def _apply_workflow(self, kind: OpKind, params: tuple[Any, ...]) -> None:
        if kind == "workflow":
            self._workflows.setdefault(params[0], params)
        elif kind == "run":
            self._runs.setdefault(params[0], list(params))
        elif kind == "run_state":
            run = self._runs[params[-1]]
            run[3], run[5], run[6] = params[:3]
        elif kind == "forget_run":
            (run_id,) = params
            if run_id in self._runs and self._runs[run_id][3] != "running":
                del self._runs[run_id]
                self._steps.pop(run_id, None)
        else:
            self._steps.setdefault(params[0], {})[params[1]] = params

    def workflows(self) -> list[WorkflowRow]:
        return list(self._workflows.values())

    def runs(self, run_id: str | None = None) -> list[RunRow]:
        if run_id is not None:
            return [tuple(self._runs[run_id])] if run_id in self._runs else []
        return [tuple(r) for r in self._runs.values() if r[3] == "running"]

    def steps(self, run_id: str) -> list[StepRow]:
        return list(self._steps.get(run_id, {}).values())

    def apply(self, ops: Sequence[Op]) -> None:
        rows = self._rows
        for kind, params in ops:
            if kind in _WORKFLOW_KINDS:
                self._apply_workflow(kind, params)
                continue
            if kind == "insert":
                if params[0] not in rows:
                    rows[params[0]] = list(params)
                continue
            if kind == "insert_all":
                self._insert_all(*params)
                continue
            if kind == "forget":
                row = rows.get(params[0])
                if row is not None and row[_FINISHED_AT] is not None:
                    del rows[params[0]]
                continue
            row = rows[params[-1]]
            at, state = _SET_AT[kind]
            for i, value in zip(at, params, strict=False):  # params end with the task id
                row[i] = value
            if state is not None:
                row[_STATE_AT] = state

    def _insert_all(self, shape: tuple[Any, ...], new: Sequence[tuple[str, str, float]]) -> None:
        handler, task_class, priority, needs, workflow_id, max_attempts, timeout, resources = shape
        rows = self._rows
        for task_id, payload, submitted_at in new:
            if task_id not in rows:
                rows[task_id] = [
                    *(task_id, handler, task_class, priority, payload, needs, workflow_id),
                    *("queued", 0, max_attempts, timeout, resources, submitted_at),
                    *(None, None, None, None, None),
                ]

    def stored(self, task_ids: Collection[str]) -> set[str]:
        return {t for t in task_ids if t in self._rows}

    def finished_before(self, cutoff: float, limit: int) -> list[str]:
        running = tuple(f"{r[0]}:" for r in self._runs.values() if r[3] == "running")
        found = (
            task_id
            for task_id, row in self._rows.items()
            if (finished := row[_FINISHED_AT]) is not None
            and finished < cutoff
            and not task_id.startswith(running)
        )
        return list(itertools.islice(found, limit))

    def runs_finished_before(self, cutoff: float, limit: int) -> list[str]:
        found = (
            run_id
            for run_id, run in self._runs.items()
            if run[3] != "running" and run[5] is not None and run[5] < cutoff
        )
        return list(itertools.islice(found, limit))

    def get(self, task_id: str) -> Row | None:
        row = self._rows.get(task_id)
        return tuple(row) if row is not None else None

    def close(self) -> None:
        self._rows.clear()


def _closed() -> InfraClosed:
    return InfraClosed(
        "the task store is closed: use the instance (and its task and run handles) inside "
        "`async with`"
    )


class StoreFailed(InfraError):
    """Writing to the task store failed (disk full, file removed...)."""


class _Batch:
    __slots__ = (
        "callbacks",
        "done",
        "error",
        "hand_over",
        "ops",
        "rows",
        "sent",
        "urgent",
        "with_writer",
    )

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.rows = 0  # how many rows the ops write: the size that picks the writer
        self.sent = 0  # how many of ops went ahead to the writer process (Journal.write_ahead)
        self.callbacks: list[tuple[Callable[[Any], object], Any]] = []
        # Callbacks that may run before the commit: see Journal.write_all's at_writer.
        self.with_writer: list[tuple[Callable[[Any], object], Any]] = []
        self.done = anyio.Event()
        self.error: BaseException | None = None
        self.urgent = False  # something in it is waited for: hand it over at once
        # Set while a hand-over is scheduled: the first to wait for the batch
        # hands it over at once, not a turn of the loop later.
        self.hand_over: Callable[[], None] | None = None

    def then(self, function: Callable[[Any], object], arg: Any) -> None:
        """Call ``function(arg)`` on the event loop right after the commit."""
        self.callbacks.append((function, arg))

    async def wait(self) -> None:
        if self.hand_over is not None:
            self.hand_over()
        await self.done.wait()
        if self.error is not None:
            raise self.error


class Journal:
    """Batches store writes: one transaction, one thread hop, per round.

    The commits run in a thread of the journal's own. The first write of a
    round schedules the hand-over of the batch (``call_soon``: after the
    current step, so that what that step writes joins it), or the first
    caller to wait for it hands it over at once (what it waits for is
    written by then); the thread's answer runs the batch's callbacks on the
    loop and hands over the next batch at once. A lone submit thus waits
    for two wake-ups (the thread's and the loop's) and nothing else: no
    task switches in between, no ``anyio.to_thread`` machinery (capacity
    limiter, worker pool, cancellation plumbing), which cost a third more.

    The thread does not run beside the event loop, though: the two share the
    GIL, and the writer, needing it back after each SQLite step while the
    loop runs Python, waits for the loop to let go of it; so the two take
    turns, and batching is what makes the turns cheap. A batch that writes
    :data:`CHILD_BATCH` rows or more goes to a writer process instead
    (:class:`_ChildWriter`), which commits it on another CPU while the loop
    runs the attempts already started.

    A write that nobody is waiting for (the final state of a task that no
    caller or stream waits on) may wait up to :data:`DEFER_SECONDS` for
    company while a commit is in progress, where the writer is not kept on
    the loop's CPU, or where every commit waits for the disk: a group
    commit. Handed over alone, it could still be in the writer when the
    next submit comes, and that submit would wait for it; joined to the
    next batch, it costs that batch a row. With the writer idle on the
    loop's CPU, it goes at once: the writer starts as soon as the loop
    idles (the reply sent, say), and is done long before the next request
    of a client that submits one task at a time.
    """

    def __init__(self, store: Store, *, threaded: bool):
        self._store = store
        self._threaded = threaded
        self._batch = _Batch()
        self._writer: _Writer | None = None
        self._child: _ChildWriter | None = None
        # Large batches go to a writer process only where it can run beside
        # the loop: on one CPU, it would cost the pickling and gain nothing.
        self._child_store = store if isinstance(store, SQLiteStore) and _cpus() > 1 else None
        self._writing = False  # a batch is with a writer
        self._handing_over = False  # a hand-over is scheduled
        self._deferred: asyncio.TimerHandle | None = None  # a late hand-over is
        self._closed = False
        self._ended = False  # run() has returned: nothing is written any more
        # What stopped the journal: a failed commit (StoreFailed), a failed
        # callback, or a write after the end. Every waiter gets it from then on.
        self._failure: BaseException | None = None
        self._done = anyio.Event()  # closed and all committed, or failed

    def write(
        self,
        op: Op,
        then: Callable[[Any], object] | None = None,
        arg: Any = None,
        *,
        deferrable: bool = False,
    ) -> Written:
        """Queue ``op``; the returned batch's ``wait()`` returns once it is committed.

        ``then`` is called (on the event loop) right after the commit: cheaper
        than a task waiting for it, which is what the scheduler does for the
        start and the end of every attempt. Once the journal has stopped, the
        batch returned has failed with the reason, and ``then`` is not called.
        A ``deferrable`` write (nobody waits for it) may be committed up to
        :data:`DEFER_SECONDS` later, with whatever is written meanwhile;
        unless the writer is idle on the event loop's CPU (see :class:`_Writer`).
        """
        return self.write_all((op,), then, arg, deferrable=deferrable)

    def write_all(
        self,
        ops: Sequence[Op],
        then: Callable[[Any], object] | None = None,
        arg: Any = None,
        *,
        deferrable: bool = False,
        rows: int | None = None,
        at_writer: bool = False,
    ) -> Written:
        """:meth:`write` of several operations, in order, with one ``then`` for all:
        the scheduler's starts and ends of the attempts that one step dispatched
        or ended cost one call, not one each. ``rows``: how many rows they
        write, where that is not one each (an ``insert_all`` writes many).

        ``at_writer``: ``then`` may be called as soon as the batch is whole in
        the writer process's pipe, before its commit (unless every commit waits
        for the disk): from then on a death of this process, however it dies,
        does not lose it, since that writer commits all it was given before it
        ends (see :class:`_ChildWriter`). The scheduler's starts are written so:
        an attempt need not wait half a millisecond for its commit. A batch that
        goes to the thread calls it after the commit, as for any ``then``.
        """
        if not self._threaded:
            self._store.apply(ops)
            written: Written = _APPLIED
        else:
            written = self._batch
            if deferrable and not (self._writing or written.ops) and self._writer_on_loop_cpu():
                # The writer is idle on the loop's CPU: the commit runs as
                # soon as the loop idles, over before the next submit comes.
                deferrable = False
            written.ops.extend(ops)
            written.rows += len(ops) if rows is None else rows
            if not deferrable or self._closed:  # once closing, nothing waits for company
                written.urgent = True
            if not (self._writing or self._handing_over or self._failure is not None):
                if written.urgent:
                    self._handing_over = True
                    asyncio.get_running_loop().call_soon(self._hand_over)
                    written.hand_over = self._hand_over
                elif self._deferred is None:
                    self._deferred = asyncio.get_running_loop().call_later(
                        DEFER_SECONDS, self._hand_over_deferred
                    )
        if then is not None:
            if at_writer and isinstance(written, _Batch):
                written.with_writer.append((then, arg))
            else:
                written.then(then, arg)
        return written

    def can_write_ahead(self) -> bool:
        """Whether :meth:`write_ahead` would take operations now; it starts the
        writer process for them if need be."""
        batch = self._batch
        if not (
            len(batch.ops) == batch.sent  # a batch of the caller's own
            and self._threaded
            and self._child_store is not None
            and not (self._writing or self._closed or self._failure is not None)
        ):
            return False
        try:
            self._child_writer()
        except Exception:  # noqa: BLE001 - the batch goes whole, and its hand-over meets
            return False  # the error again, which stops the journal
        return True

    def write_ahead(self, ops: Sequence[Op], rows: int) -> None:
        """Write ``ops`` and send them to the writer process now, as the first
        part of the batch being gathered, which commits with the rest of it;
        only when :meth:`can_write_ahead`.

        A submit of thousands of tasks thus has its first rows stored while
        its last are still being made, not all of them after: the loop makes
        a row in about 5 microseconds, the writer stores one in 3 to 7. They
        go ahead only into a batch of their own, with no batch at a writer,
        so that :meth:`retract` can take them back.
        """
        assert self._child is not None
        batch = self._batch
        batch.ops.extend(ops)
        batch.rows += rows
        batch.sent = len(batch.ops)
        self._child.send_part(ops)

    def retract(self) -> None:
        """Take back what :meth:`write_ahead` wrote (in the same step of the loop:
        nothing else was written since): the caller found it invalid."""
        batch = self._batch
        if batch.sent:
            assert len(batch.ops) == batch.sent
            assert self._child is not None
            batch.ops.clear()
            batch.rows = batch.sent = 0
            self._child.retract()

    def _writer_on_loop_cpu(self) -> bool:
        """Whether a lone commit now is cheap and starts at once (see the class)."""
        return (
            self._writer is not None
            and self._writer.on_loop_cpu
            and not self._store.syncs_each_commit
        )

    def _hand_over_deferred(self) -> None:
        self._cancel_deferred()
        self._batch.urgent = True
        self._hand_over()

    def _hand_over(self) -> None:
        self._handing_over = False
        if self._writing or self._failure is not None:
            return
        if not self._batch.ops:
            if self._closed:
                self._done.set()
            return
        if not (self._batch.urgent or self._closed):
            if self._deferred is None:
                self._deferred = asyncio.get_running_loop().call_later(
                    DEFER_SECONDS, self._hand_over_deferred
                )
            return
        self._cancel_deferred()
        if self._ended:
            self._stop(InfraClosed("the task store is closed: this write came after its end"))
            return
        try:
            writer = self._writer_for(self._batch)
        except Exception as exc:  # noqa: BLE001 - out of fds or threads: nothing can be stored
            failure = StoreFailed(f"the task store's writer could not start: {exc}")
            failure.__cause__ = exc
            self._stop(failure)
            return
        batch, self._batch = self._batch, _Batch()
        batch.hand_over = None
        self._writing = True
        if writer.apply(batch, self._committed) and not self._store.syncs_each_commit:
            with_writer, batch.with_writer = batch.with_writer, []
            self._call_back(with_writer)

    def _writer_for(self, batch: _Batch) -> _Writer | _ChildWriter:
        """The thread for small batches, the process for large ones (see _ChildWriter)
        and for those it has parts of; each made when first needed. One batch at a
        time is with either, so they commit in the order written."""
        if batch.sent or batch.rows >= CHILD_BATCH:
            child = self._child_writer()
            if child is not None:
                return child
        if self._writer is None:
            self._writer = _Writer(self._store.apply, asyncio.get_running_loop())
        return self._writer

    def _child_writer(self) -> _ChildWriter | None:
        """The writer process, started when first needed; None where there is none."""
        if self._child is None and self._child_store is not None:
            self._child = _ChildWriter(self._child_store, asyncio.get_running_loop())
        return self._child

    def _committed(self, batch: _Batch, error: BaseException | None) -> None:
        """On the event loop, once a writer is done with ``batch``."""
        self._writing = False
        if error is not None:
            # Nothing can be promised any more: wake the waiters with the
            # error, and stop the instance with it (see run).
            batch.error = error
            batch.done.set()
            failure = StoreFailed(f"the task store failed: {error}")
            failure.__cause__ = error
            self._stop(failure)
            return
        batch.done.set()
        if self._call_back(batch.with_writer) and self._call_back(batch.callbacks):
            self._hand_over()

    def _call_back(self, callbacks: list[tuple[Callable[[Any], object], Any]]) -> bool:
        """Call each ``then(arg)``; False if one raised, which stops the journal."""
        try:
            for then, arg in callbacks:
                then(arg)
        except BaseException as exc:  # noqa: BLE001 - run() raises it
            # A bug of the scheduler's: it stops the instance (through run),
            # as it would have in a task; the loop must not merely log it.
            self._stop(exc)
            return False
        return True

    def fail(self, failure: BaseException) -> None:
        """Stop the instance with ``failure``, a bug of the caller's found off any
        task (in a callback of the loop's), as a failed ``then`` does: :meth:`run`
        raises it, and what is written and not committed fails with it."""
        self._stop(failure)

    def _stop(self, failure: BaseException) -> None:
        """Fail what is written and not committed, and all later writes; end :meth:`run`."""
        if self._failure is None:
            self._failure = failure
        self._cancel_deferred()
        self._batch.error = self._failure
        self._batch.done.set()
        self._done.set()

    def hurry(self) -> None:
        """Hand over a deferred write now: someone has come to wait for it.

        With a batch at the writer, the one being gathered is marked urgent,
        so that it follows as soon as the writer is done, not a deadline later.
        """
        if self._batch.ops:
            self._batch.urgent = True
        if self._deferred is not None:
            self._hand_over_deferred()

    def _cancel_deferred(self) -> None:
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None

    async def commit(self, op: Op) -> None:
        await self.write(op).wait()

    async def read(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)``, a read of the store, off the event loop when it is SQLite."""
        if not self._threaded:
            return function(*args)
        return await anyio.to_thread.run_sync(function, *args)

    async def run(self) -> None:
        """Owns the writer thread: returns once :meth:`close` was called and all is
        committed; raises what stopped the journal (:class:`StoreFailed` when a
        commit failed).

        Cancelled from outside (a cancel scope around the instance, Ctrl-C),
        it still commits what the scheduler writes on its way out (the
        requeues of interrupted attempts) until :meth:`close`, then re-raises.
        """
        try:
            try:
                await self._done.wait()
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    await self._done.wait()
                raise
        finally:
            self._ended = True
            with anyio.CancelScope(shield=True):
                for writer in (self._writer, self._child):
                    if writer is not None:
                        await writer.close()
        if self._failure is not None:
            raise self._failure

    async def ended(self) -> BaseException | None:
        """Wait until all written is committed and the journal closed, or until it
        stopped; what stopped it (a failed commit), or None."""
        await self._done.wait()
        return self._failure

    def close(self) -> None:
        """Let :meth:`run` return once what was written so far is committed."""
        self._closed = True
        if not (self._writing or self._handing_over):
            self._hand_over()


class _Writer:
    """A thread that applies batches to the store, one at a time, in order.

    It runs on the event loop's CPU, and is woken through pipes (not a lock
    and ``call_soon_threadsafe``): a thread woken on another, idle, CPU
    starts tens of microseconds later on a VM, and its waker pays for the
    interrupt too; on the same CPU it starts as soon as the loop lets go.
    Little is lost in parallel: the two mostly take turns anyway (the
    writer needs the GIL back after every SQLite step), and the scheduler's
    throughput did not change; when SQLite waits for the disk, the writer
    sleeps and the loop runs. A lone submit over gRPC returns about a fifth sooner
    (docs/benchmarks.md, gRPC).
    """

    def __init__(self, apply: Callable[[Sequence[Op]], None], loop: asyncio.AbstractEventLoop):
        self._apply = apply
        self._requests: collections.deque[tuple[_Batch, _Answer] | None] = collections.deque()
        self._answers: collections.deque[tuple[_Batch, _Answer, BaseException | None]] = (
            collections.deque()
        )
        self._loop = loop
        self._thread = threading.Thread(target=self._serve, name="dspy-infra-journal", daemon=True)
        opened: list[int] = []
        try:
            self._to_thread = os.pipe()  # (read end, write end)
            opened += self._to_thread
            self._to_loop = os.pipe()
            opened += self._to_loop
            os.set_blocking(self._to_loop[0], False)
            loop.add_reader(self._to_loop[0], self._answered)
            try:
                self._thread.start()
            except BaseException:
                loop.remove_reader(self._to_loop[0])
                raise
        except BaseException:
            _close_all(opened)
            raise
        self._cpu = _SameCpu(self._thread.native_id)

    def _serve(self) -> None:
        while True:
            os.read(self._to_thread[0], 64)
            while self._requests:
                request = self._requests.popleft()
                if request is None:
                    return
                batch, answer = request
                error: BaseException | None = None
                try:
                    self._apply(batch.ops)
                except BaseException as exc:  # noqa: BLE001 - handed to the batch's waiters
                    error = exc
                self._answers.append((batch, answer, error))
                os.write(self._to_loop[1], b"\0")

    def _answered(self) -> None:
        """On the event loop: the thread is done with one or more batches."""
        with contextlib.suppress(BlockingIOError):
            for _ in os.read(self._to_loop[0], 64):
                batch, answer, error = self._answers.popleft()
                answer(batch, error)

    @property
    def on_loop_cpu(self) -> bool:
        """Whether the thread is kept on the event loop's CPU."""
        return self._cpu.following

    def apply(self, batch: _Batch, answer: _Answer) -> bool:
        """Queue the batch; False: it is in this process until it is committed."""
        self._cpu.follow()
        self._requests.append((batch, answer))
        os.write(self._to_thread[1], b"\0")
        return False

    async def close(self) -> None:
        self._requests.append(None)
        os.write(self._to_thread[1], b"\0")
        await anyio.to_thread.run_sync(self._thread.join)
        self._answered()  # the thread's last answer, if the loop has not read it
        self._loop.remove_reader(self._to_loop[0])
        _close_all((*self._to_thread, *self._to_loop))


class _ChildWriter:
    """The writer of large batches: a process of its own (see :mod:`sqlwrite`).

    Its commits run on another CPU while the event loop runs attempts, where
    the thread's take turns with the loop (see :class:`Journal`): the batches
    of a busy scheduler, each with the starts and ends of dozens of attempts,
    go here. A lone submit's commit stays with the thread: a process costs
    it about 50 microseconds more (pickling, two process switches).

    It holds the state directory's lock too, so that after a crash no new
    instance opens the store before this writer's last commit is done.
    """

    def __init__(self, store: SQLiteStore, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._pending: collections.deque[tuple[_Batch, _Answer]] = collections.deque()
        self._out = bytearray()  # frames not yet taken by the pipe
        self._in = bytearray()  # answers not yet read whole
        self._flushing = False  # waiting for the pipe to take the rest of _out
        self._gone: BaseException | None = None  # why no answer comes any more
        lock = store.lock_fd
        requests, answers = os.pipe(), os.pipe()  # (read end, write end)
        try:
            # On the event loop, as asyncio starts its subprocesses: a fork
            # and an exec, 0.2 to 0.4 ms, once an instance; the interpreter's
            # start-up (milliseconds) is the child's, and the first batch
            # waits for it in the pipe.
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", sqlwrite.__file__],
                stdin=requests[0],
                stdout=answers[1],
                pass_fds=() if lock is None else (lock,),
                # Not in the terminal's process group: Ctrl-C is the parent's.
                process_group=0,
            )
        except BaseException:
            _close_all((*requests, *answers))
            raise
        os.close(requests[0])
        os.close(answers[1])
        self._requests, self._answers = requests[1], answers[0]
        os.set_blocking(self._requests, False)
        os.set_blocking(self._answers, False)
        loop.add_reader(self._answers, self._answered)
        self._send(store.writer_opening())

    def apply(self, batch: _Batch, answer: _Answer) -> bool:
        """Send the batch; whether it is whole in the pipe now, which this process's
        death can no longer take from the writer (see Journal.write_all)."""
        if self._gone is not None:
            self._loop.call_soon(answer, batch, self._gone)
            return False
        self._pending.append((batch, answer))
        # The rest of it, after the parts sent ahead: those commit with it.
        return self._send(batch.ops[batch.sent :] if batch.sent else batch.ops)

    def send_part(self, ops: Sequence[Op]) -> None:
        """Ops to apply in the transaction of the next batch, ahead of it."""
        self._send((sqlwrite.PART, ops))

    def retract(self) -> None:
        """Roll back the parts sent ahead."""
        self._send((sqlwrite.RETRACT, None))

    def _send(self, value: Any) -> bool:
        self._out += sqlwrite.frame(value)
        return self._flush()

    def _flush(self) -> bool:
        """Write what the pipe takes; whether it took all there was."""
        took = False
        try:
            while self._out:
                del self._out[: os.write(self._requests, self._out)]
            took = True
        except BlockingIOError:  # the pipe is full: on once it drains
            if not self._flushing:
                self._flushing = True
                self._loop.add_writer(self._requests, self._flush)
            return False
        except OSError:  # the process is gone: the end of its answers says so
            self._out.clear()
        if self._flushing:
            self._flushing = False
            self._loop.remove_writer(self._requests)
        return took

    def _answered(self) -> None:
        """On the event loop: answers to read, or the end of the process."""
        try:
            data = os.read(self._answers, 65536)
        except BlockingIOError:
            return
        if not data:
            self._lost()
            return
        self._in += data
        header = sqlwrite.HEADER
        while len(self._in) >= header.size:
            (size,) = header.unpack_from(self._in)
            if len(self._in) < header.size + size:
                break
            error = pickle.loads(self._in[header.size : header.size + size])  # noqa: S301
            del self._in[: header.size + size]
            batch, answer = self._pending.popleft()
            answer(batch, error)

    def _lost(self) -> None:
        """The process ended while open (killed, say): what it had is not known committed."""
        self._loop.remove_reader(self._answers)
        code = self._process.poll()
        self._gone = RuntimeError(
            "the store's writer process ended"
            + (f" (exit code {code})" if code is not None else "")
            + " before it answered"
        )
        while self._pending:
            batch, answer = self._pending.popleft()
            answer(batch, self._gone)

    async def close(self) -> None:
        # The end of its input: it commits what it was given, then exits.
        if self._flushing:
            self._loop.remove_writer(self._requests)
        os.close(self._requests)
        await anyio.to_thread.run_sync(self._process.wait)
        if self._gone is None:
            os.set_blocking(self._answers, True)
            while self._pending and self._gone is None:
                self._answered()  # its last answers, if the loop has not read them
            self._loop.remove_reader(self._answers)
        os.close(self._answers)


def _cpus() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


_Answer = Callable[[_Batch, BaseException | None], None]


class _SameCpu:
    """Keeps a thread on the CPU that its caller (the event loop) runs on.

    Linux only, and best effort: where the CPU cannot be read or the thread
    not moved, the thread is left where the kernel puts it.
    """

    def __init__(self, thread_id: int | None):
        self._thread_id = thread_id
        self._cpu = -1
        self._getcpu: Callable[[], int] | None = _sched_getcpu()

    @property
    def following(self) -> bool:
        return self._getcpu is not None and self._cpu >= 0

    def follow(self) -> None:
        if self._getcpu is None or self._thread_id is None:
            return
        cpu = self._getcpu()
        if cpu == self._cpu:
            return
        try:
            os.sched_setaffinity(self._thread_id, {cpu})
        except (OSError, ValueError, OverflowError):  # -1: sched_getcpu failed
            self._getcpu = None  # not allowed here: leave it to the kernel...
            if self._cpu >= 0:  # ...on any CPU, not the last one it was kept on
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(self._thread_id, os.sched_getaffinity(0))
            return
        self._cpu = cpu


def _sched_getcpu() -> Callable[[], int] | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        getcpu = ctypes.CDLL(None).sched_getcpu
    except (AttributeError, OSError):
        return None
    getcpu.argtypes = []
    getcpu.restype = ctypes.c_int
    return cast("Callable[[], int]", getcpu)


class _Applied:
    """What a write to the memory store returns: already applied."""

    __slots__ = ()

    def then(self, function: Callable[[Any], object], arg: Any) -> None:
        function(arg)

    async def wait(self) -> None:
        return None


_APPLIED = _Applied()
Written = _Batch | _Applied


# Compact JSON, refusing NaN and infinities (not JSON, and not portable). One
# encoder, made once: json.dumps with options builds a new one per call.
JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
dumps = JSON_ENCODER.encode
# The decoder's C scanner (set by JSONDecoder.__init__; not in its stubs).
_SCAN: Callable[[str, int], tuple[Any, int]] = cast("Any", json.JSONDecoder()).scan_once


def loads(text: str) -> Any:
    """Stored JSON, as :data:`dumps` writes it (one value, nothing around it).

    ``json.loads`` less the three Python calls around its C scanner: a
    quarter of the time for a small payload (0.4 against 1.5 us), paid once
    per attempt and per result. Text not written so gets ``json.loads``.
    """
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:
        end = -1
    if end != len(text):
        return json.loads(text)  # its value, or json's own error
    return value
