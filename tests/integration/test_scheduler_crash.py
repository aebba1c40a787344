"""A SIGKILLed owner loses no task: the next instance on its state dir re-runs what was
running if it has an attempt left, marks it lost if not, and runs what was queued."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest

from dspy_infra import AgentInfra, ConfigError
from dspy_infra.abc import TaskRun
from dspy_infra.errors import StateDirInUse, TaskLost
from dspy_infra.scheduling.tasks import TaskState
from tests.integration.helpers import beside_the_loop

pytestmark = pytest.mark.anyio

CLASSES = {"work": {"max_concurrency": 4, "aging": 0}}
# Started in the owner (the first four fill the class), then killed there.
RUNNING = {"once-a": 1, "once-b": 1, "twice-a": 2, "twice-b": 2}
# Queued behind them, never started before the kill.
QUEUED = {"later-a": 1, "later-b": 2, "later-c": 1}

OWNER = """
import json, sys
import anyio
from dspy_infra import AgentInfra

state_dir, classes, running, queued = sys.argv[1], *map(json.loads, sys.argv[2:])

async def hang(payload):
    print("started", payload, flush=True)
    await anyio.sleep_forever()

async def main():
    config = {"classes": classes}
    async with AgentInfra.start(config, state_dir=state_dir, handlers={"hang": hang}) as infra:
        for task_id, attempts in [*running.items(), *queued.items()]:
            await infra.submit_task(
                "hang", task_id, task_class="work", task_id=task_id, max_attempts=attempts
            )
        print("submitted", flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


def started(lines: list[str]) -> list[str]:
    return [line.split()[1] for line in lines if line.startswith("started ")]


def owner_script(tmp_path: Path, source: str) -> tuple[Path, list[str]]:
    """The state dir, and the argv of a script (``source``) that owns it."""
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(source))
    return tmp_path / "state", [sys.executable, str(script), str(tmp_path / "state")]


async def test_a_killed_owner_loses_no_task(tmp_path: Path) -> None:
    state_dir, argv = owner_script(tmp_path, OWNER)
    argv += [json.dumps(x) for x in (CLASSES, RUNNING, QUEUED)]
    lines: list[str] = []
    async with await anyio.open_process(argv) as owner:
        try:
            assert owner.stdout is not None
            buffer = b""
            with anyio.fail_after(30):
                while "submitted" not in lines or len(started(lines)) < len(RUNNING):
                    buffer += await owner.stdout.receive()
                    *complete, buffer = buffer.split(b"\n")
                    lines.extend(line.decode() for line in complete)
        finally:
            os.kill(owner.pid, signal.SIGKILL)
        assert await owner.wait() == -signal.SIGKILL
    assert sorted(started(lines)) == sorted(RUNNING)

    runs: list[tuple[str, int]] = []

    async def hang(payload: Any, run: TaskRun) -> Any:
        runs.append((run.task_id, run.attempt))
        return f"done {payload}"

    async with AgentInfra.start(
        {"classes": CLASSES}, state_dir=state_dir, handlers={"hang": hang}
    ) as infra:
        statuses = {}
        with anyio.fail_after(10):
            for task_id in [*RUNNING, *QUEUED]:
                statuses[task_id] = await infra.task_handle(task_id).wait()
        for task_id in ("once-a", "once-b"):
            status = statuses[task_id]
            assert status.state is TaskState.LOST, status
            assert status.attempts == 1
            assert "running when its instance stopped" in (status.error or "")
            with pytest.raises(TaskLost):
                await infra.task_handle(task_id).result()
        for task_id in ("twice-a", "twice-b"):
            status = statuses[task_id]
            assert (status.state, status.attempts) == (TaskState.SUCCEEDED, 2), status
            assert status.result == f"done {task_id}"
        for task_id in QUEUED:
            status = statuses[task_id]
            assert (status.state, status.attempts) == (TaskState.SUCCEEDED, 1), status
            assert await infra.task_handle(task_id).result() == f"done {task_id}"
    assert sorted(runs) == sorted(
        [("twice-a", 2), ("twice-b", 2), ("later-a", 1), ("later-b", 1), ("later-c", 1)]
    )

    # And it stays so: a third instance finds every task finished, none to run.
    runs.clear()
    async with AgentInfra.start(
        {"classes": CLASSES}, state_dir=state_dir, handlers={"hang": hang}
    ) as infra:
        for task_id in [*RUNNING, *QUEUED]:
            assert (await infra.get_task_status(task_id)).state == statuses[task_id].state
        assert (await infra.task_classes())["work"].queued == 0
        await anyio.sleep(0.05)
    assert runs == []


HOLDER = """
import sys
import anyio
from dspy_infra import AgentInfra

async def hang(payload):
    await anyio.sleep_forever()

async def main():
    async with AgentInfra.start(state_dir=sys.argv[1], handlers={"work": hang}) as infra:
        await infra.submit_task("work", None, task_id="held", max_attempts=2)
        print("ready", flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


async def test_one_live_instance_per_state_dir(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    script = tmp_path / "holder.py"
    script.write_text(textwrap.dedent(HOLDER))
    async with await anyio.open_process([sys.executable, str(script), str(state_dir)]) as holder:
        try:
            assert holder.stdout is not None
            with anyio.fail_after(30):
                assert (await holder.stdout.receive()).startswith(b"ready")
            # Both would run the tasks stored there: refused, naming the holder.
            with pytest.raises(StateDirInUse, match=rf"in use by .* \(pid {holder.pid}\)"):
                async with AgentInfra.start(state_dir=state_dir):
                    pass
        finally:
            os.kill(holder.pid, signal.SIGKILL)
        await holder.wait()
    # The kernel let go of the lock with its holder: the next instance opens,
    # and finds the holder's task as the holder left it.
    async with AgentInfra.start(state_dir=state_dir, handlers={"work": lambda _: "ran"}) as infra:
        assert await infra.task_handle("held").result() == "ran"
        assert (await infra.get_task_status("held")).attempts == 2


ORPHANING = """
import asyncio, sys
from dspy_infra import AgentInfra

async def noop(payload):
    return payload

async def main():
    async with AgentInfra.start(state_dir=sys.argv[1], handlers={"noop": noop}) as infra:
        for handle in await infra.submit_tasks("noop", range(20)):
            await handle.result()
        print("ready", flush=True)
        sys.stdin.readline()  # the test holds SQLite's write lock now
        await infra.submit_tasks("noop", range(20, 40))

asyncio.run(main())
"""


@beside_the_loop
async def test_a_new_instance_waits_for_the_last_commit_of_a_killed_owners_writer(
    tmp_path: Path,
) -> None:
    # An owner's large batches are committed by a writer process of its own
    # (sqlwrite). Killed while that writer waits to commit a submit, the
    # owner leaves it to commit alone: a new instance that opened the store
    # meanwhile would not know those tasks, and never run them.
    state_dir, argv = owner_script(tmp_path, ORPHANING)
    async with await anyio.open_process(argv, stdin=subprocess.PIPE) as owner:
        try:
            assert owner.stdout is not None
            assert owner.stdin is not None
            with anyio.fail_after(30):
                assert (await owner.stdout.receive()).startswith(b"ready")
            db = sqlite3.connect(state_dir / "tasks.db", isolation_level=None)
            db.execute("BEGIN IMMEDIATE")
            await owner.stdin.send(b"go\n")
            await anyio.sleep(0.5)  # its writer has the batch, and waits for the lock
        finally:
            os.kill(owner.pid, signal.SIGKILL)
        await owner.wait()
    lock = os.open(state_dir / "tasks.db.lock", os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):  # the owner's writer holds it still
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(lock)

    async def let_go() -> None:
        await anyio.sleep(0.3)
        db.execute("COMMIT")

    with closing(db):
        async with anyio.create_task_group() as tg:
            tg.start_soon(let_go)
            async with AgentInfra.start(state_dir=state_dir, handlers={"noop": _echo}):
                with anyio.fail_after(10):
                    while db.execute(
                        "SELECT count(*) FROM tasks WHERE state = 'succeeded'"
                    ).fetchone() != (40,):
                        await anyio.sleep(0.01)


HELD_STARTS = """
import json, sys
import anyio
from dspy_infra import AgentInfra

gate = anyio.Event()

async def hold(payload):
    await gate.wait()

async def hang(payload):
    print("started", payload, flush=True)
    await anyio.sleep_forever()

async def main():
    config = {"infra": {"synchronous": sys.argv[2]}, "classes": {"work": {"max_concurrency": 24}}}
    handlers = {"hold": hold, "hang": hang}
    async with AgentInfra.start(config, state_dir=sys.argv[1], handlers=handlers) as infra:
        await infra.submit_tasks("hold", range(24), task_class="work")
        hanging = await infra.submit_tasks("hang", range(24), task_class="work", max_attempts=1)
        print("ready", json.dumps([handle.task_id for handle in hanging]), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)  # the test holds SQLite's lock now
        gate.set()  # 24 ends, and 24 starts: one batch, for the writer process
        await anyio.sleep_forever()

anyio.run(main)
"""


@beside_the_loop
@pytest.mark.parametrize("synchronous", ["normal", "full"])
async def test_attempts_start_once_their_starts_are_with_the_writer_process(
    tmp_path: Path, synchronous: str
) -> None:
    # With "normal", an attempt runs as soon as its start is in the writer
    # process's pipe, not once it is committed: the owner's death cannot
    # take it from there, since the writer commits all it was given. Killed
    # now, the owner leaves its attempts counted all the same: the next
    # instance finds them running, and (max_attempts = 1) lost, not re-run.
    # With "full", every commit is awaited first, the starts' too.
    state_dir, argv = owner_script(tmp_path, HELD_STARTS)
    lines: list[str] = []
    async with await anyio.open_process([*argv, synchronous], stdin=subprocess.PIPE) as owner:
        try:
            assert owner.stdout is not None
            assert owner.stdin is not None
            stdout = owner.stdout
            buffer = b""

            async def read_until(done: Callable[[], bool]) -> None:
                nonlocal buffer
                while not done():
                    buffer += await stdout.receive()
                    *complete, buffer = buffer.split(b"\n")
                    lines.extend(line.decode() for line in complete)

            with anyio.fail_after(30):
                await read_until(lambda: any(line.startswith("ready ") for line in lines))
            hanging = json.loads(lines[-1].removeprefix("ready "))
            db = sqlite3.connect(state_dir / "tasks.db", isolation_level=None)
            db.execute("BEGIN IMMEDIATE")
            await owner.stdin.send(b"go\n")
            if synchronous == "full":
                with anyio.move_on_after(0.5):
                    await read_until(lambda: bool(started(lines)))
                assert started(lines) == []  # their starts wait for our lock
                db.execute("COMMIT")
            with anyio.fail_after(10):
                await read_until(lambda: len(started(lines)) == len(hanging))
        finally:
            os.kill(owner.pid, signal.SIGKILL)
        await owner.wait()
    with closing(db):
        if db.in_transaction:  # "normal": the orphaned writer commits once we let go
            db.execute("COMMIT")

    runs: list[str] = []

    async def hang(payload: Any, run: TaskRun) -> None:
        runs.append(run.task_id)

    handlers: dict[str, Callable[..., Any]] = {"hold": _echo, "hang": hang}
    async with AgentInfra.start(
        {"classes": CLASSES}, state_dir=state_dir, handlers=handlers
    ) as infra:
        for task_id in hanging:
            status = await infra.get_task_status(task_id)
            assert (status.state, status.attempts) == (TaskState.LOST, 1), status
        classes = await infra.task_classes()
        assert (classes["work"].queued, classes["work"].running) == (0, 0)
    assert runs == []


HALFWAY = """
import asyncio, os, signal, sqlite3, sys, time
from dspy_infra import AgentInfra

async def noop(payload):
    return payload

def payloads(db):
    yield from range(2000)
    time.sleep(0.5)  # the writer process applies the rows written ahead
    probe = sqlite3.connect(db, timeout=0, isolation_level=None)
    try:
        probe.execute("BEGIN IMMEDIATE")
        print("not locked", flush=True)
    except sqlite3.OperationalError as exc:
        print(exc, flush=True)  # the writer's transaction holds the lock
    os.kill(os.getpid(), signal.SIGKILL)

async def main():
    async with AgentInfra.start(state_dir=sys.argv[1], handlers={"noop": noop}) as infra:
        for handle in await infra.submit_tasks("noop", range(20)):
            await handle.result()
        await infra.submit_tasks("noop", payloads(os.path.join(sys.argv[1], "tasks.db")))

asyncio.run(main())
"""


@beside_the_loop
async def test_an_owner_killed_in_the_middle_of_a_submit_stores_none_of_it(
    tmp_path: Path,
) -> None:
    # A large submit's first rows are at the writer process before its last
    # are made (in one transaction): killed in between, the owner leaves that
    # transaction open, and the writer, at the end of its input, rolls it back.
    state_dir, argv = owner_script(tmp_path, HALFWAY)
    killed = await anyio.run_process(argv, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert killed.stdout.decode().strip() == "database is locked"
    async with AgentInfra.start(state_dir=state_dir, handlers={"noop": _echo}) as infra:
        assert (await infra.task_classes())["cpu_short"].queued == 0
    db = sqlite3.connect(state_dir / "tasks.db")
    with closing(db):
        assert db.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall() == [
            ("succeeded", 20)
        ]


async def _left_running(state_dir: Path, config: dict[str, Any], **submit: Any) -> str:
    """An instance is closed while a task of class "c" runs: the task is stored to run again."""
    started = anyio.Event()

    async def block(payload: Any) -> None:
        started.set()
        await anyio.sleep_forever()

    async with AgentInfra.start(config, state_dir=state_dir, handlers={"h": block}) as infra:
        handle = await infra.submit_task("h", None, task_class="c", **submit)
        await started.wait()
    return handle.task_id


async def _echo(payload: Any) -> Any:
    return payload


async def test_tasks_of_a_class_whose_runner_is_gone_wait_for_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    state_dir = tmp_path / "state"
    task_id = await _left_running(state_dir, {"classes": {"c": {}}})
    # The class's runner cannot be opened now (Slurm, without its commands on
    # PATH): its task waits, and the instance works, instead of failing.
    with monkeypatch.context() as patched:
        patched.setenv("PATH", str(tmp_path / "empty"))
        gone = {"classes": {"c": {"runner": "slurm"}}}
        async with AgentInfra.start(gone, state_dir=state_dir, handlers={"echo": _echo}) as infra:
            assert await (await infra.submit_task("echo", 7)).result() == 7
            assert (await infra.get_task_status(task_id)).state is TaskState.QUEUED
    assert "1 recovered tasks of class 'c' wait for an instance that can run them" in caplog.text
    async with AgentInfra.start(
        {"classes": {"c": {}}}, state_dir=state_dir, handlers={"h": _echo}
    ) as infra:
        assert (await infra.task_handle(task_id).wait()).state is TaskState.SUCCEEDED


async def test_a_recovered_task_that_can_never_fit_is_lost_with_the_reason(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    with_gpu = {"classes": {"c": {"gpus": 1}}, "infra": {"gpus": [0]}}
    task_id = await _left_running(state_dir, with_gpu)
    without = {"classes": {"c": {"gpus": 1}}, "infra": {"gpus": []}}
    async with AgentInfra.start(without, state_dir=state_dir, handlers={"h": _echo}) as infra:
        status = await infra.task_handle(task_id).wait()
    assert status.state is TaskState.LOST
    assert status.error == "it can never run here: it needs 1 GPUs; this machine has 0"


async def test_a_task_being_cancelled_when_its_instance_closes_stays_cancelled(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    started = anyio.Event()
    runs = 0

    async def slow_to_stop(payload: Any) -> None:
        nonlocal runs
        runs += 1
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.5)  # cleaning up, as a process given its cancel_grace

    handlers = {"s": slow_to_stop}
    cancelled: list[TaskState] = []
    async with (
        anyio.create_task_group() as outside,
        AgentInfra.start({}, state_dir=state_dir, handlers=handlers) as infra,
    ):
        handle = await infra.submit_task("s", None)
        await started.wait()

        async def cancel() -> None:
            cancelled.append((await handle.cancel()).state)

        outside.start_soon(cancel)
        await anyio.sleep(0.1)  # the cancel is under way: leave the block meanwhile
    assert cancelled == [TaskState.CANCELLED]
    async with AgentInfra.start({}, state_dir=state_dir, handlers=handlers) as infra:
        status = await infra.task_handle(handle.task_id).wait()
    assert status.state is TaskState.CANCELLED
    assert runs == 1, "a cancelled task ran again"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs of its own (root only), unmounted after the test."""
    mount = tmp_path / "fs"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        check=False,
        capture_output=True,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _spoil(fs: Path, problem: str) -> str:
    """Make ``fs`` read-only or full; what a refusal then says about it."""
    if problem == "full":
        with contextlib.suppress(OSError), (fs / "filler").open("wb", buffering=0) as filler:
            while True:
                filler.write(b"\0" * 4096)
        return "no space left on its file system"
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
    return "read-only file system"


@pytest.mark.parametrize("problem", ["read-only", "full"])
async def test_a_state_dir_that_cannot_be_written_is_refused_before_anything_is_made(
    small_fs: Path, problem: str
) -> None:
    state_dir = small_fs / "state"
    state_dir.mkdir()
    why = _spoil(small_fs, problem)
    with pytest.raises(ConfigError, match=rf"infra.state_dir: cannot write to .*: {why}"):
        async with AgentInfra.start({}, state_dir=state_dir):
            pass
    assert list(state_dir.iterdir()) == []
