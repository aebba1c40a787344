"""The task store's journal, on a real SQLite file: what its waiters learn when
a commit fails, when a callback fails, when it is cancelled, and after its end;
when a write that nobody waits for is committed."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from dspy_infra.errors import InfraClosed
from dspy_infra.scheduling import sqlwrite
from dspy_infra.scheduling import store as store_module
from dspy_infra.scheduling.store import COLUMNS, Journal, Op, SQLiteStore, StoreFailed
from tests.integration.helpers import beside_the_loop

pytestmark = pytest.mark.anyio


def row(task_id: str) -> tuple[Any, ...]:
    values: dict[str, Any] = dict.fromkeys(COLUMNS)
    values.update(
        task_id=task_id,
        handler="h",
        task_class="c",
        priority=0,
        payload="null",
        needs="[]",
        state="queued",
        attempts=0,
        max_attempts=1,
        resources="[0,0,0]",
        submitted_at=0.0,
    )
    return tuple(values[c] for c in COLUMNS)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "tasks.db")
    await anyio.to_thread.run_sync(store.open)
    yield store
    store.close()


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dspy-infra-journal"]


def writer_processes() -> list[int]:
    """The pids of this process's children that run the store's writer (sqlwrite.py)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and b"sqlwrite.py" in cmdline:
            found.append(int(entry))
    return found


def large(prefix: str, rows: int = store_module.CHILD_BATCH) -> list[Op]:
    """A batch that goes to the writer process (unless ``rows`` is too few)."""
    return [("insert", row(f"{prefix}{i}")) for i in range(rows)]


async def test_a_failed_commit_fails_its_waiters_later_writes_and_run(store: SQLiteStore) -> None:
    journal = Journal(store, threaded=True)
    seen: dict[str, str] = {}

    async def wait(name: str, written: Any) -> None:
        try:
            await written.wait()
        except Exception as exc:  # noqa: BLE001 - what each waiter learns is the point
            seen[name] = type(exc).__name__

    with pytest.raises(ExceptionGroup) as caught:  # noqa: PT012
        async with anyio.create_task_group() as tg:
            tg.start_soon(journal.run)
            # Too few values for the statement: SQLite refuses the whole batch.
            bad = journal.write(("insert", ("only-an-id",)))
            await anyio.lowlevel.checkpoint()  # handed over: the next write waits its turn
            queued = journal.write(("insert", row("queued")))
            tg.start_soon(wait, "bad", bad)
            tg.start_soon(wait, "queued", queued)
    assert caught.group_contains(StoreFailed, match="the task store failed")
    # And a write after that fails at once; its callback never runs.
    called: list[object] = []
    await wait("late", journal.write(("insert", row("late")), called.append, "late"))
    assert seen == {"bad": "ProgrammingError", "queued": "StoreFailed", "late": "StoreFailed"}
    assert called == []
    assert await anyio.to_thread.run_sync(store.stored, ["queued", "late"]) == set()
    assert writer_threads() == []


async def test_a_failing_callback_stops_the_journal_loudly(store: SQLiteStore) -> None:
    journal = Journal(store, threaded=True)

    def bug(_: object) -> None:
        raise RuntimeError("a bug in a callback")

    with pytest.raises(ExceptionGroup) as caught:  # noqa: PT012
        async with anyio.create_task_group() as tg:
            tg.start_soon(journal.run)
            first = journal.write(("insert", row("a")), bug, None)
            await anyio.lowlevel.checkpoint()
            second = journal.write(("insert", row("b")))
            await first.wait()  # committed: its callbacks are what failed
            with anyio.fail_after(5), pytest.raises(RuntimeError, match="a bug"):
                await second.wait()  # not left waiting for ever
    assert caught.group_contains(RuntimeError, match="a bug in a callback")
    assert writer_threads() == []


async def test_cancelled_it_commits_until_closed(store: SQLiteStore) -> None:
    journal = Journal(store, threaded=True)
    with anyio.CancelScope() as outer:
        async with anyio.create_task_group() as tg:
            tg.start_soon(journal.run)
            await journal.write(("insert", row("before"))).wait()
            outer.cancel()
            # What a closing scheduler still writes (its requeues) is committed.
            after = journal.write(("insert", row("after")))
            journal.close()
    assert outer.cancelled_caught
    await after.wait()
    assert await anyio.to_thread.run_sync(store.stored, ["before", "after"]) == {
        "before",
        "after",
    }
    assert writer_threads() == []


async def test_a_write_after_the_end_fails_and_starts_no_thread(store: SQLiteStore) -> None:
    journal = Journal(store, threaded=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(journal.run)
        await anyio.lowlevel.checkpoint()
        journal.close()
    with anyio.fail_after(5), pytest.raises(InfraClosed, match="after its end"):
        await journal.write(("insert", row("late"))).wait()
    assert writer_threads() == []


@asynccontextmanager
async def running(journal: Journal) -> AsyncIterator[Journal]:
    """``journal`` with its writer, closed (all committed) on the way out."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(journal.run)
        try:
            yield journal
        finally:
            journal.close()


async def stored(store: SQLiteStore, *task_ids: str) -> set[str]:
    return await anyio.to_thread.run_sync(store.stored, list(task_ids))


async def waits_for_company(journal: Journal, store: SQLiteStore, name: str) -> None:
    """A deferrable write ``name`` is not committed alone, and goes with the next urgent one."""
    deferred = journal.write(("insert", row(name)), deferrable=True)
    await anyio.sleep(0.1)
    assert await stored(store, name) == set()
    with anyio.fail_after(10):
        await journal.write(("insert", row(f"{name}-company"))).wait()
        await deferred.wait()
    assert await stored(store, name) == {name}


async def test_a_deferrable_write_alone_is_committed_by_its_deadline(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "DEFER_SECONDS", 0.2)
    async with running(Journal(store, threaded=True)) as journal:
        with anyio.fail_after(10):
            await journal.write(("insert", row("lone")), deferrable=True).wait()
        assert await stored(store, "lone") == {"lone"}


async def test_a_deferrable_write_goes_with_the_next_write_or_once_hurried(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A deadline far beyond the test: only company or hurry() commits these
    # (fail_after is a guard against hanging, not a measurement). The writer
    # is left where the kernel puts it, as where it cannot be kept on the
    # loop's CPU: an idle writer does not take deferrable writes at once.
    monkeypatch.setattr(store_module, "DEFER_SECONDS", 60.0)
    monkeypatch.setattr(store_module, "_sched_getcpu", lambda: None)
    async with running(Journal(store, threaded=True)) as journal:
        await waits_for_company(journal, store, "joined")
        # hurry() with the writer idle...
        idle = journal.write(("insert", row("idle")), deferrable=True)
        await anyio.lowlevel.checkpoint()
        journal.hurry()
        with anyio.fail_after(10):
            await idle.wait()
        # ...and while a batch is with the writer (it stays "with the
        # writer" until the loop runs its answer, after this step).
        busy = journal.write(("insert", row("ahead")))
        await anyio.lowlevel.checkpoint()
        behind = journal.write(("insert", row("behind")), deferrable=True)
        journal.hurry()
        with anyio.fail_after(10):
            await busy.wait()
            await behind.wait()


async def test_a_deferrable_write_after_close_is_not_left_hanging(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "DEFER_SECONDS", 60.0)
    journal = Journal(store, threaded=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(journal.run)
        await anyio.lowlevel.checkpoint()
        journal.close()
        late = journal.write(("insert", row("late")), deferrable=True)
    # Committed, or failed because the journal had ended: either way, told.
    with anyio.fail_after(10), contextlib.suppress(InfraClosed):
        await late.wait()
    assert writer_threads() == []


async def test_closing_commits_a_deferred_write_at_once(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "DEFER_SECONDS", 60.0)
    journal = Journal(store, threaded=True)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(journal.run)
            journal.write(("insert", row("deferred")), deferrable=True)
            await anyio.sleep(0.05)
            journal.close()
    assert await stored(store, "deferred") == {"deferred"}
    assert writer_threads() == []


def pipes() -> set[str]:
    """The pipes this process holds open."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile (the listing's own)
            if (target := os.readlink(f"/proc/self/fd/{fd}")).startswith("pipe:"):
                found.add(f"{fd}:{target}")
    return found


async def test_its_writer_leaves_no_pipe_open(store: SQLiteStore) -> None:
    before = pipes()
    async with running(Journal(store, threaded=True)) as journal:
        await journal.write(("insert", row("one"))).wait()
        assert len(pipes() - before) == 4  # a pipe each way
    assert pipes() - before == set()
    assert writer_threads() == []


def can_pin() -> bool:
    """Whether a thread can be kept on one CPU here (Linux, two CPUs, allowed)."""
    if store_module._sched_getcpu() is None or len(os.sched_getaffinity(0)) < 2:
        return False
    try:
        os.sched_setaffinity(threading.get_native_id(), os.sched_getaffinity(0))
    except OSError:
        return False
    return True


on_the_loops_cpu = pytest.mark.skipif(
    not can_pin(), reason="keeping the writer on the loop's CPU needs Linux, two CPUs, and leave"
)


@on_the_loops_cpu
async def test_its_writer_runs_on_the_event_loops_cpu(store: SQLiteStore) -> None:
    # Woken on another, idle CPU, it would start tens of microseconds later
    # (benchmarks.md, gRPC); the loop may move, and the writer with it.
    allowed = os.sched_getaffinity(0)
    async with running(Journal(store, threaded=True)) as journal:
        for i in range(20):
            await journal.write(("insert", row(f"t{i}"))).wait()
        (writer,) = writer_threads()
        assert writer.native_id is not None
        cpus = os.sched_getaffinity(writer.native_id)
        assert len(cpus) == 1
        assert cpus <= allowed


@on_the_loops_cpu
async def test_a_deferrable_write_goes_at_once_to_an_idle_writer_on_the_loops_cpu(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Committed as soon as the loop idles, it is out of the way of the next
    # submit; while a commit is in progress, it still waits for company.
    monkeypatch.setattr(store_module, "DEFER_SECONDS", 60.0)
    async with running(Journal(store, threaded=True)) as journal:
        await journal.write(("insert", row("first"))).wait()  # the writer is made
        with anyio.fail_after(10):
            await journal.write(("insert", row("alone")), deferrable=True).wait()
        busy = journal.write(("insert", row("busy")))
        await anyio.lowlevel.checkpoint()  # handed over, and with the writer...
        behind = journal.write(("insert", row("behind")), deferrable=True)
        with anyio.fail_after(10):
            await busy.wait()
        await anyio.sleep(0.1)
        assert await stored(store, "busy", "behind") == {"busy"}  # ...so this waits
        with anyio.fail_after(10):
            await journal.write(("insert", row("company"))).wait()
            await behind.wait()


async def test_writes_of_one_step_share_the_commit_that_the_first_waiter_starts(
    store: SQLiteStore,
) -> None:
    # Waiting hands the batch over at once: what the same step wrote before
    # goes with it, what comes after waits for the next commit.
    async with running(Journal(store, threaded=True)) as journal:
        first = journal.write(("insert", row("first")))
        second = journal.write(("insert", row("second")))
        assert first is second
        with anyio.fail_after(10):
            await first.wait()
        assert await stored(store, "first", "second") == {"first", "second"}


@on_the_loops_cpu
async def test_a_writer_that_can_no_longer_follow_the_loop_is_left_on_any_cpu(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Left pinned to the CPU it last followed, it would stay there for good.
    answers = iter([0, -1])  # then sched_getcpu fails
    monkeypatch.setattr(store_module, "_sched_getcpu", lambda: lambda: next(answers))
    async with running(Journal(store, threaded=True)) as journal:
        await journal.write(("insert", row("first"))).wait()
        (writer,) = writer_threads()
        assert writer.native_id is not None
        assert os.sched_getaffinity(writer.native_id) == {0}
        await journal.write(("insert", row("second"))).wait()
        assert os.sched_getaffinity(writer.native_id) == os.sched_getaffinity(0)


@on_the_loops_cpu
async def test_where_every_commit_waits_for_the_disk_a_deferrable_write_waits_for_company(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A commit of its own would cost a disk flush, in the next submit's way.
    monkeypatch.setattr(store_module, "DEFER_SECONDS", 60.0)
    store = SQLiteStore(tmp_path / "tasks.db", synchronous="full")
    await anyio.to_thread.run_sync(store.open)
    try:
        async with running(Journal(store, threaded=True)) as journal:
            await journal.write(("insert", row("first"))).wait()  # the writer is made
            await waits_for_company(journal, store, "alone")
    finally:
        store.close()


async def test_a_writer_that_cannot_start_fails_the_write_and_stops_the_journal(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Out of file descriptors, say: the waiter is told, and nothing is
    # committed behind its back by a later hand-over.
    real_pipe = os.pipe
    seen: dict[str, str] = {}

    def no_pipe() -> tuple[int, int]:
        raise OSError(24, "Too many open files")

    async def wait(name: str, written: Any) -> None:
        try:
            await written.wait()
        except Exception as exc:  # noqa: BLE001 - what each waiter learns is the point
            seen[name] = str(exc)

    journal = Journal(store, threaded=True)
    with anyio.fail_after(10), pytest.raises(ExceptionGroup) as caught:  # noqa: PT012
        async with anyio.create_task_group() as tg:
            tg.start_soon(journal.run)
            monkeypatch.setattr(os, "pipe", no_pipe)
            await wait("lost", journal.write(("insert", row("lost"))))
            monkeypatch.setattr(os, "pipe", real_pipe)
            await wait("later", journal.write(("insert", row("later"))))
            await anyio.sleep(0.1)
    assert caught.group_contains(StoreFailed, match="writer could not start")
    assert seen == dict.fromkeys(
        ["lost", "later"], "the task store's writer could not start: [Errno 24] Too many open files"
    )
    assert await stored(store, "lost", "later") == set()
    assert writer_threads() == []


@beside_the_loop
async def test_a_large_batch_is_committed_by_a_writer_process_that_ends_with_the_journal(
    store: SQLiteStore,
) -> None:
    async with running(Journal(store, threaded=True)) as journal:
        await journal.write(("insert", row("alone"))).wait()
        assert writer_processes() == []  # a lone write: the thread commits it
        await journal.write_all(large("t")).wait()
        assert len(writer_processes()) == 1
        await journal.write(("insert", row("after"))).wait()
    assert writer_processes() == []
    assert writer_threads() == []
    assert await stored(store, "alone", "t0", "t15", "after") == {"alone", "t0", "t15", "after"}


@beside_the_loop
async def test_a_failed_commit_in_the_writer_process_fails_its_waiters_with_sqlites_error(
    store: SQLiteStore,
) -> None:
    journal = Journal(store, threaded=True)
    seen: list[Exception] = []
    with anyio.fail_after(10), pytest.raises(ExceptionGroup) as caught:  # noqa: PT012
        async with anyio.create_task_group() as tg:
            tg.start_soon(journal.run)
            try:
                # Too few values for the statement: SQLite refuses the whole batch.
                await journal.write_all([*large("t"), ("insert", ("only-an-id",))]).wait()
            except Exception as exc:  # noqa: BLE001 - what the waiter learns is the point
                seen.append(exc)
    assert caught.group_contains(StoreFailed, match="the task store failed: Incorrect number")
    assert [type(exc) for exc in seen] == [sqlite3.ProgrammingError]
    assert await stored(store, "t0") == set()
    assert writer_processes() == []


@beside_the_loop
async def test_a_writer_process_that_dies_stops_the_journal_loudly(store: SQLiteStore) -> None:
    # Killed, say: what it was given is not known committed, and nothing
    # after it can be promised.
    journal = Journal(store, threaded=True)
    seen: list[str] = []
    with anyio.fail_after(10), pytest.raises(ExceptionGroup) as caught:  # noqa: PT012
        async with anyio.create_task_group() as tg:
            tg.start_soon(journal.run)
            await journal.write_all(large("a")).wait()
            (pid,) = writer_processes()
            os.kill(pid, signal.SIGKILL)
            try:
                await journal.write_all(large("b")).wait()
            except Exception as exc:  # noqa: BLE001 - what the waiter learns is the point
                seen.append(str(exc))
    ended = r"the store's writer process ended (\(exit code -9\) )?before it answered"
    assert caught.group_contains(StoreFailed, match=f"the task store failed: {ended}")
    assert len(seen) == 1
    assert re.fullmatch(ended, seen[0])
    assert writer_processes() == []


@beside_the_loop
async def test_ctrl_c_does_not_reach_the_writer_process(store: SQLiteStore) -> None:
    # Ctrl-C is the parent's, which then closes the store in order: the
    # writer must still be there to commit what the close writes.
    async with running(Journal(store, threaded=True)) as journal:
        await journal.write_all(large("a")).wait()
        (pid,) = writer_processes()
        assert os.getpgid(pid) != os.getpgid(0)  # not in the terminal's process group
        os.kill(pid, signal.SIGINT)
        await anyio.sleep(0.1)
        await journal.write_all(large("b")).wait()
    assert await stored(store, "a0", "b0") == {"a0", "b0"}


@beside_the_loop
async def test_a_batch_larger_than_a_pipe_holds_reaches_the_writer_process_whole(
    store: SQLiteStore,
) -> None:
    # A submit of thousands of tasks: its frame goes as the pipe drains.
    ids = [f"t{i}" for i in range(10_000)]
    batch: list[Op] = [("insert", row(task_id)) for task_id in ids]
    assert len(sqlwrite.frame(batch)) > 4 * 65536  # a pipe holds 64 KiB unless enlarged
    async with running(Journal(store, threaded=True)) as journal:
        with anyio.fail_after(30):
            await journal.write_all(batch).wait()
    assert await stored(store, *ids) == set(ids)


@beside_the_loop
@pytest.mark.parametrize(
    ("batch", "synchronous", "before_the_commit"),
    [
        ("large", "normal", True),  # whole in the writer process's pipe at once
        ("small", "normal", False),  # the thread's: in this process until committed
        ("larger than a pipe", "normal", False),  # not whole in the pipe when handed over
        ("large", "full", False),  # every commit is awaited
    ],
)
async def test_a_callback_at_the_writer_runs_once_a_crash_here_cannot_lose_the_batch(
    tmp_path: Path, batch: str, synchronous: str, before_the_commit: bool
) -> None:
    store = SQLiteStore(tmp_path / "tasks.db", synchronous=synchronous)
    await anyio.to_thread.run_sync(store.open)
    rows = {"large": store_module.CHILD_BATCH, "small": 1, "larger than a pipe": 10_000}
    ops = large("t", rows[batch])
    called: list[str] = []
    lock = sqlite3.connect(store.path, isolation_level=None)
    try:
        async with running(Journal(store, threaded=True)) as journal:
            await journal.write_all(large("warm")).wait()  # the writer process is up
            lock.execute("BEGIN IMMEDIATE")  # no commit ends until we let go
            written = journal.write_all(ops, called.append, "early", at_writer=True)
            journal.write_all([("insert", row("other"))], called.append, "committed")
            with anyio.move_on_after(0.3 if before_the_commit else 0.1):
                while not called:
                    await anyio.sleep(0.005)
            assert called == (["early"] if before_the_commit else [])
            assert await stored(store, "t0") == set()
            lock.execute("COMMIT")
            with anyio.fail_after(30):
                await written.wait()
        assert called == ["early", "committed"]
        assert await stored(store, "t0") == {"t0"}
    finally:
        lock.close()
        store.close()


async def test_the_writer_process_commits_all_it_was_given_once_nobody_reads_its_answers(
    store: SQLiteStore,
) -> None:
    # Its parent gone (nobody reads the answers), a writer must still commit
    # what is in its pipe: the scheduler runs an attempt as soon as its start
    # is there (Journal.write_all's at_writer).
    frames = [store.writer_opening(), [("insert", row("a"))], [("insert", row("b"))]]
    assert await anyio.to_thread.run_sync(orphaned_writer, frames) == 0
    assert await stored(store, "a", "b") == {"a", "b"}


def orphaned_writer(frames: list[Any]) -> int:
    """Run a writer process given ``frames``, whose answers nobody reads; its exit status."""
    requests, answers = os.pipe(), os.pipe()  # (read end, write end)
    writer = subprocess.Popen(
        [sys.executable, "-I", "-S", sqlwrite.__file__], stdin=requests[0], stdout=answers[1]
    )
    for fd in (requests[0], answers[1], answers[0]):
        os.close(fd)
    with os.fdopen(requests[1], "wb") as pipe:
        pipe.write(b"".join(sqlwrite.frame(value) for value in frames))
    return writer.wait(30)


async def test_on_one_cpu_large_batches_stay_with_the_thread(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A writer process there could not run beside the loop: it would only
    # add the pickling and the process switches.
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0})
    async with running(Journal(store, threaded=True)) as journal:
        await journal.write_all(large("t")).wait()
        assert writer_processes() == []
        assert len(writer_threads()) == 1
    assert await stored(store, "t0") == {"t0"}


@beside_the_loop
async def test_a_writer_process_that_cannot_start_fails_the_write_and_stops_the_journal(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As for the thread: the waiter is told, nothing is committed, nothing is left.
    def no_process(*args: object, **kwargs: object) -> None:
        raise OSError(11, "Resource temporarily unavailable")

    seen: list[str] = []
    monkeypatch.setattr(subprocess, "Popen", no_process)
    journal = Journal(store, threaded=True)
    with anyio.fail_after(10), pytest.raises(ExceptionGroup) as caught:  # noqa: PT012
        async with anyio.create_task_group() as tg:
            tg.start_soon(journal.run)
            try:
                await journal.write_all(large("t")).wait()
            except Exception as exc:  # noqa: BLE001 - what the waiter learns is the point
                seen.append(str(exc))
    assert caught.group_contains(StoreFailed, match="writer could not start")
    assert seen == [
        "the task store's writer could not start: [Errno 11] Resource temporarily unavailable"
    ]
    assert await stored(store, "t0") == set()
    assert writer_processes() == []


@beside_the_loop
async def test_parts_written_ahead_commit_with_the_rest_of_their_batch_not_before(
    store: SQLiteStore,
) -> None:
    # A submit of thousands: its first rows go to the writer process while
    # the rest are made, in the one transaction of the whole submit.
    async with running(Journal(store, threaded=True)) as journal:
        assert journal.can_write_ahead()
        journal.write_ahead(large("a"), 16)
        journal.write_ahead(large("b"), 16)
        await anyio.sleep(0.2)  # the writer process has applied them, uncommitted
        assert await stored(store, "a0", "b15") == set()
        probe = sqlite3.connect(store.path, timeout=0, isolation_level=None)
        with contextlib.closing(probe), pytest.raises(sqlite3.OperationalError, match="locked"):
            probe.execute("BEGIN IMMEDIATE")  # its transaction holds the write lock
        await journal.write_all(large("c")).wait()
        assert await stored(store, "a0", "b15", "c0") == {"a0", "b15", "c0"}


@beside_the_loop
async def test_parts_retracted_are_never_stored_and_later_batches_are(
    store: SQLiteStore,
) -> None:
    async with running(Journal(store, threaded=True)) as journal:
        assert journal.can_write_ahead()
        journal.write_ahead(large("a"), 16)
        await anyio.sleep(0.1)
        journal.retract()
        await journal.write(("insert", row("alone"))).wait()  # the thread's, after the rollback
        await journal.write_all(large("b")).wait()
    assert await stored(store, "a0", "a15", "alone", "b0") == {"alone", "b0"}


@beside_the_loop
async def test_a_part_that_fails_fails_its_batch_and_none_of_the_batch_is_stored(
    store: SQLiteStore,
) -> None:
    journal = Journal(store, threaded=True)
    seen: list[Exception] = []
    with anyio.fail_after(10), pytest.raises(ExceptionGroup) as caught:  # noqa: PT012
        async with anyio.create_task_group() as tg:
            tg.start_soon(journal.run)
            assert journal.can_write_ahead()
            journal.write_ahead(large("a"), 16)
            journal.write_ahead([("insert", ("only-an-id",))], 1)  # too few values
            journal.write_ahead(large("b"), 16)
            try:
                await journal.write_all(large("c")).wait()
            except Exception as exc:  # noqa: BLE001 - what the waiter learns is the point
                seen.append(exc)
    assert caught.group_contains(StoreFailed, match="the task store failed: Incorrect number")
    assert [type(exc) for exc in seen] == [sqlite3.ProgrammingError]
    assert await stored(store, "a0", "b0", "c0") == set()
    assert writer_processes() == []


@beside_the_loop
async def test_nothing_goes_ahead_into_a_batch_begun_by_others_or_while_one_commits(
    store: SQLiteStore,
) -> None:
    # What went ahead must be the caller's alone, to be taken back alone, and
    # commit after every batch before it.
    async with running(Journal(store, threaded=True)) as journal:
        journal.write(("insert", row("other")), deferrable=True)
        assert not journal.can_write_ahead()
        await journal.write_all(large("a")).wait()
        committing = journal.write_all(large("b"))
        await anyio.lowlevel.checkpoint()  # handed over: at the writer now
        assert not journal.can_write_ahead()
        await committing.wait()
        assert journal.can_write_ahead()
    assert not journal.can_write_ahead()  # closed


async def test_nothing_goes_ahead_without_a_writer_process(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not Journal(store, threaded=False).can_write_ahead()  # committed inline
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0})
    assert not Journal(store, threaded=True).can_write_ahead()  # one CPU: the thread's


def state_of(pid: int) -> str:
    """The process's state as /proc has it: R running, S asleep..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def cpu_ns(pid: int) -> int:
    """The time the process has run on a CPU, in nanoseconds (its first thread's)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


@beside_the_loop
async def test_the_writer_process_polls_for_the_next_batch_a_moment_then_sleeps(
    store: SQLiteStore,
) -> None:
    # A busy scheduler's next batch then finds it awake (the wake-up of a
    # sleeping reader costs the event loop's write 15 to 25 us on a VM);
    # an idle one costs it no CPU.
    async with running(Journal(store, threaded=True)) as journal:
        await journal.write_all(large("a")).wait()
        (pid,) = writer_processes()
        await anyio.sleep(0.1)
        await journal.write_all(large("b")).wait()
        answered = cpu_ns(pid)
        await anyio.sleep(0.2)
        polled = cpu_ns(pid) - answered
        assert 0.1e6 <= polled <= 20 * sqlwrite.POLL_SECONDS * 1e9
        await anyio.sleep(0.5)
        assert cpu_ns(pid) - answered - polled < 0.5e6  # asleep in read()
        assert state_of(pid) == "S"
