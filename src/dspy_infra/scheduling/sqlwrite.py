"""How the task store's batches are applied to SQLite: by :class:`SQLiteStore`
in this process, and by the store's writer process, which runs this file as
a script (``python -I -S sqlwrite.py``: the standard library only, so it
starts in a few milliseconds and imports nothing of the caller's).

The writer process exists for throughput: a batch committed there runs on
another CPU beside the event loop, where a thread could not, since it needs
the GIL back after every SQLite step while the loop runs Python (see
``store._ChildWriter``). Its first frame says what to write to: the file,
its ``synchronous`` setting, each kind of operation's statement, and a
script to run on the connection first. It then reads frames from stdin,
each a pickled list of operations, applies each list in one transaction,
and answers each with a frame of its own: None, or the exception that
SQLite raised. It ends at the end of its input, once the last batch is
committed: when the store closes, or when the process that writes to it
dies, however it dies; a transaction left open then is rolled back. Every
batch whole in its input is committed, even once nobody reads the answers:
the scheduler runs an attempt as soon as its start is in the pipe
(``store.Journal.write_all``).

A batch may come in parts, so that its first rows are written while the
caller still makes the rest (a submit of thousands): each ``(PART, ops)``
frame is applied in the batch's transaction, left open and not answered;
the batch's last frame, a plain list, commits it all. ``(RETRACT, None)``
rolls the parts back: the caller found the batch invalid before its end.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import sqlite3
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Any

# Each frame: its length, then a pickle of that many bytes.
HEADER = struct.Struct("<I")
# The frames other than a batch (see above): (PART, ops) and (RETRACT, None).
PART = "part"
RETRACT = "retract"

# After each answer the writer polls its input this long before it sleeps in
# read(): a write to a pipe whose reader sleeps costs the writer (here, the
# event loop, once a batch) the reader's wake-up, 15 to 25 us on a VM against
# 2 for one that polls, and a busy scheduler's next batch comes within a
# millisecond. Between polls it yields its CPU to any thread that wants it.
POLL_SECONDS = 0.001

Ops = Sequence[tuple[Any, Any]]
# A kind's statement, run once per operation with its parameters; or a pair:
# the first run with the operation's first parameter, the second with each
# row of its second (many rows that share most of their values).
Statement = str | tuple[str, str]


def apply(db: sqlite3.Connection, sql: Mapping[Any, Statement], ops: Ops) -> None:
    """Apply ``ops`` (kind, parameters) in one transaction, with the parts of it
    already applied (:func:`apply_part`), if any; ``sql`` has each kind's statement."""
    if len(ops) == 1 and not db.in_transaction:
        ((kind, params),) = ops
        statement = sql[kind]
        if isinstance(statement, str):
            # Its own transaction: BEGIN and COMMIT would be two more statements.
            db.execute(statement, params)
            return
    apply_part(db, sql, ops)
    db.execute("COMMIT")


def apply_part(db: sqlite3.Connection, sql: Mapping[Any, Statement], ops: Ops) -> None:
    """Apply ``ops`` in the open transaction, or in a new one, left open; on an
    error, the transaction is rolled back, with the parts before."""
    if not db.in_transaction:
        db.execute("BEGIN")
    try:
        i = 0
        while i < len(ops):
            kind, params = ops[i]
            statement = sql[kind]
            if not isinstance(statement, str):
                first, each = statement
                db.execute(first, params[0])
                db.executemany(each, params[1])
                i += 1
                continue
            # Consecutive operations of one kind go in one executemany.
            j = i + 1
            while j < len(ops) and ops[j][0] == kind:
                j += 1
            db.executemany(statement, [params for _, params in ops[i:j]])
            i = j
    except BaseException:
        db.execute("ROLLBACK")
        raise


def frame(value: Any) -> bytes:
    data = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


def _read_exactly(fd: int, size: int) -> bytes | None:
    """``size`` bytes from ``fd``; None at the end of the input."""
    data = bytearray()
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _receive(fd: int) -> Any:
    """The next frame's value; None at the end of the input."""
    header = _read_exactly(fd, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    data = _read_exactly(fd, size)
    return None if data is None else pickle.loads(data)  # noqa: S301 - from its own parent


def _poll(poller: select.poll, seconds: float) -> None:
    """Return once there is input, or after ``seconds`` (the read then sleeps)."""
    deadline = time.monotonic() + seconds
    while not poller.poll(0) and time.monotonic() < deadline:
        os.sched_yield()


def _answer(fd: int, error: Exception | None) -> bool:
    """Send the answer; False if the parent is gone (nobody reads them any more)."""
    try:
        data = frame(error)
    except Exception:  # noqa: BLE001 - an error that does not pickle: its words still go
        data = frame(RuntimeError(repr(error)))
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except BrokenPipeError:
        return False
    return True


def _serve(requests: int, answers: int) -> None:
    # Ctrl-C is for the parent, which closes the store in order; killed by
    # it here, the writer would fail the commits that the close still makes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    opening = _receive(requests)
    if opening is None:
        return
    path, synchronous, sql, setup = opening
    broken: Exception | None = None
    try:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute(f"PRAGMA synchronous = {synchronous}")
        db.executescript(setup)
    except sqlite3.Error as exc:
        broken = exc  # every batch is answered with it
    failed: Exception | None = None  # a part of the batch in hand failed: so does the batch
    poller = select.poll()
    poller.register(requests, select.POLLIN)
    replying = True  # until the parent is gone: what it sent is committed still
    while (ops := _receive(requests)) is not None:
        if isinstance(ops, tuple):  # a part of a batch (not answered), or their retraction
            kind, part = ops
            if kind == RETRACT:
                failed = None
                if broken is None and db.in_transaction:
                    db.execute("ROLLBACK")
            elif broken is None and failed is None:
                try:
                    apply_part(db, sql, part)
                except Exception as exc:  # noqa: BLE001 - the batch's answer
                    failed = exc
            continue
        error, failed = broken or failed, None
        if error is None:
            try:
                apply(db, sql, ops)
            except Exception as exc:  # noqa: BLE001 - the batch's waiters get it
                error = exc
        replying = replying and _answer(answers, error)
        if replying:
            _poll(poller, POLL_SECONDS)
    if broken is None:
        db.close()


if __name__ == "__main__":
    _serve(0, 1)
