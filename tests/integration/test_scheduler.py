"""The task scheduler through the public API, with a real SQLite store under tmp_path."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import re
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import aclosing, closing
from pathlib import Path
from typing import Any

import anyio
import pytest

from dspy_infra import AgentInfra
from dspy_infra.abc import TaskRun
from dspy_infra.errors import (
    ConfigError,
    InfraClosed,
    InfraError,
    InvalidTask,
    ServiceStartError,
    TaskCancelled,
    TaskFailed,
    TaskTimedOut,
    UnknownTask,
)
from dspy_infra.scheduling import scheduler as scheduler_module
from dspy_infra.scheduling import store as store_module
from dspy_infra.scheduling.adaptive import ConcurrencyLimit
from dspy_infra.scheduling.checks import MAX_JSON_DEPTH
from dspy_infra.scheduling.records import TaskRecord
from dspy_infra.scheduling.store import StoreFailed
from dspy_infra.scheduling.tasks import Resources, TaskEvent, TaskHandle, TaskState
from dspy_infra.services.status import ServiceState
from tests.conftest import MakeSmi
from tests.integration.helpers import service

pytestmark = pytest.mark.anyio

Handler = Callable[..., Any]


def start(
    tmp_path: Path,
    handlers: dict[str, Handler],
    *,
    classes: dict[str, Any] | None = None,
    services: dict[str, Any] | None = None,
    **infra: Any,
) -> AgentInfra:
    return AgentInfra.start(
        {"infra": infra, "classes": classes or {}, "services": services or {}},
        state_dir=tmp_path / "state",
        handlers=handlers,
    )


async def until(predicate: Callable[[], bool], limit: float = 5.0) -> None:
    with anyio.fail_after(limit):
        while not predicate():
            await anyio.sleep(0.005)


async def until_state(infra: AgentInfra, task_id: str, state: TaskState) -> None:
    with anyio.fail_after(5):
        while (await infra.get_task_status(task_id)).state is not state:
            await anyio.sleep(0.005)


def rows(tmp_path: Path) -> dict[str, tuple[str, int]]:
    """task_id -> (state, attempts), read from the SQLite file, read-only."""
    db = sqlite3.connect(f"file:{tmp_path / 'state' / 'tasks.db'}?mode=ro", uri=True)
    try:
        return {
            task_id: (state, attempts)
            for task_id, state, attempts in db.execute("SELECT task_id, state, attempts FROM tasks")
        }
    finally:
        db.close()


class Gates:
    """Handlers that block until the test opens their gate; what they saw, in order."""

    def __init__(self) -> None:
        self.gates: dict[str, anyio.Event] = {}
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []
        self.running: set[str] = set()
        self.runs: dict[str, TaskRun] = {}

    def gate(self, key: str) -> anyio.Event:
        return self.gates.setdefault(key, anyio.Event())

    def open(self, *keys: str) -> None:
        for key in keys:
            self.gate(key).set()

    async def handler(self, payload: Any, run: TaskRun) -> Any:
        key = payload["key"] if isinstance(payload, dict) else run.task_id
        self.started.append(key)
        self.running.add(key)
        self.runs[key] = run
        try:
            await self.gate(key).wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(key)
            raise
        finally:
            self.running.discard(key)
        self.finished.append(key)
        return {"key": key}

    async def wait_started(self, *keys: str) -> None:
        await until(lambda: all(k in self.running for k in keys))


async def echo(payload: Any) -> Any:
    return payload


# -- results and status ------------------------------------------------------------


async def test_result_and_status_fields(tmp_path: Path) -> None:
    async def boom(payload: Any) -> Any:
        raise RuntimeError(f"broken on {payload}")

    async with start(tmp_path, {"echo": echo, "boom": boom}) as infra:
        before = time.time()
        h = await infra.submit_task(
            "echo", {"x": [1, 2.5, "z"]}, priority=3, workflow_id="wf-1", task_id="t-1"
        )
        assert h.task_id == "t-1"
        assert await h.result() == {"x": [1, 2.5, "z"]}
        status = await infra.get_task_status("t-1")
        assert status.state is TaskState.SUCCEEDED
        assert status.finished
        assert (status.task_id, status.handler, status.task_class) == ("t-1", "echo", "cpu_short")
        assert (status.priority, status.attempts, status.max_attempts) == (3, 1, 1)
        assert status.workflow_id == "wf-1"
        assert status.result == {"x": [1, 2.5, "z"]}
        assert status.error is None
        assert status.gpus == ()
        assert status.started_at is not None
        assert status.finished_at is not None
        assert before <= status.submitted_at <= status.started_at <= status.finished_at
        assert status.finished_at <= time.time()
        assert await h.status() == status
        # Stored: the SQLite row says the same.
        assert rows(tmp_path)["t-1"] == ("succeeded", 1)

        bad = await infra.submit_task("boom", 7)
        with pytest.raises(TaskFailed, match="RuntimeError: broken on 7") as caught:
            await bad.result()
        assert caught.value.state == "failed"
        failed = await bad.status()
        assert failed.state is TaskState.FAILED
        assert failed.error == "RuntimeError: broken on 7"
        assert failed.result is None

        with pytest.raises(UnknownTask, match="nope"):
            await infra.get_task_status("nope")


# -- priorities -----------------------------------------------------------------------


async def test_priority_order_within_a_class_higher_first_fifo_among_equals(
    tmp_path: Path,
) -> None:
    gates = Gates()
    classes = {"one": {"max_concurrency": 1, "aging": 0}}
    async with start(tmp_path, {"gate": gates.handler}, classes=classes) as infra:
        blocker = await infra.submit_task("gate", {"key": "blocker"}, task_class="one")
        await gates.wait_started("blocker")
        priorities = [1, 5, 1, 5, 3, 0, 3, 5]
        handles = [
            await infra.submit_task("gate", {"key": f"k{i}"}, task_class="one", priority=p)
            for i, p in enumerate(priorities)
        ]
        for i in range(len(priorities)):
            gates.open(f"k{i}")
        assert [s.state for s in [await h.status() for h in handles]] == [TaskState.QUEUED] * 8
        gates.open("blocker")
        await blocker.result()
        for h in handles:
            await h.result()
    expected = [f"k{i}" for i, _ in sorted(enumerate(priorities), key=lambda ip: -ip[1])]
    assert gates.started == ["blocker", *expected]


async def test_equal_priorities_stay_fifo_when_the_clock_is_stepped_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With aging, tasks rank by their submit time: a wall clock stepped back
    # between two submits (NTP, a virtual machine resumed) ran the later of
    # two equal tasks first, in this instance and in the next.
    gates = Gates()
    step = [0.0]
    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() - step[0])
    classes = {"one": {"max_concurrency": 1}}
    async with start(tmp_path, {"gate": gates.handler}, classes=classes) as infra:
        blocker = await infra.submit_task("gate", {"key": "blocker"}, task_class="one")
        await gates.wait_started("blocker")
        first = await infra.submit_task("gate", {"key": "first"}, task_class="one")
        step[0] = 5.0
        second = await infra.submit_task("gate", {"key": "second"}, task_class="one")
    step[0] = 10.0
    async with start(tmp_path, {"gate": gates.handler}, classes=classes) as infra:
        third = await infra.submit_task("gate", {"key": "third"}, task_class="one")
        gates.open("blocker", "first", "second", "third")
        for h in (blocker, first, second, third):
            await infra.task_handle(h.task_id).result()
    assert gates.started[-4:] == ["blocker", "first", "second", "third"]


async def test_a_lone_submit_does_not_overtake_tasks_still_being_stored(tmp_path: Path) -> None:
    # A lone task its class can start at once is stored started; not while
    # the tasks of an earlier submit, of higher priority, are being committed.
    order: list[str] = []

    async def work(payload: str) -> None:
        order.append(payload)

    classes = {"one": {"max_concurrency": 1, "aging": 0}}
    async with start(tmp_path, {"work": work}, classes=classes) as infra:
        urgent = [f"urgent{i}" for i in range(2000)]
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                lambda: infra.submit_tasks("work", urgent, task_class="one", priority=100)
            )
            await anyio.lowlevel.checkpoint()  # that call's inserts are being committed
            await infra.submit_task("work", "lowly", task_class="one", priority=0)
        await until(lambda: len(order) == 2001, limit=30)
    assert order == [*urgent, "lowly"]


async def test_aging_lets_an_old_low_priority_task_overtake(tmp_path: Path) -> None:
    for aging, old_first in ((0.05, True), (0.0, False)):
        gates = Gates()
        classes = {"one": {"max_concurrency": 1, "aging": aging}}
        async with start(tmp_path / str(aging), {"gate": gates.handler}, classes=classes) as infra:
            blocker = await infra.submit_task("gate", {"key": "blocker"}, task_class="one")
            await gates.wait_started("blocker")
            low = await infra.submit_task("gate", {"key": "low"}, task_class="one", priority=0)
            await anyio.sleep(0.3)  # six levels' worth of waiting at 0.05 s per level
            high = await infra.submit_task("gate", {"key": "high"}, task_class="one", priority=5)
            gates.open("blocker", "low", "high")
            for h in (blocker, low, high):
                await h.result()
        assert gates.started[1:] == (["low", "high"] if old_first else ["high", "low"])


# -- resources and backfill --------------------------------------------------------------


async def test_backfill_across_resources(tmp_path: Path) -> None:
    gates = Gates()
    held: list[float] = []
    peak = [0.0]

    async def sized(payload: Any, run: TaskRun) -> Any:
        held.append(payload["cpus"])
        peak[0] = max(peak[0], sum(held))
        try:
            return await gates.handler(payload, run)
        finally:
            held.remove(payload["cpus"])

    classes = {
        "big": {"cpus": 2, "max_concurrency": 8, "aging": 0},
        "small": {"cpus": 1, "max_concurrency": 8, "aging": 0},
    }
    async with start(tmp_path, {"sized": sized}, classes=classes, cpus=2) as infra:
        s1 = await infra.submit_task("sized", {"key": "s1", "cpus": 1}, task_class="small")
        await gates.wait_started("s1")
        big = await infra.submit_task(
            "sized", {"key": "big", "cpus": 2}, task_class="big", priority=9
        )
        s2 = await infra.submit_task("sized", {"key": "s2", "cpus": 1}, task_class="small")
        await gates.wait_started("s2")  # backfilled while the big one waits
        assert (await big.status()).state is TaskState.QUEUED
        assert (await infra.task_classes())["big"].queued == 1
        s3 = await infra.submit_task("sized", {"key": "s3", "cpus": 1}, task_class="small")
        await anyio.sleep(0.05)
        assert (await s3.status()).state is TaskState.QUEUED  # no CPU left for it
        gates.open("s1")
        await s1.result()
        await gates.wait_started("s3")  # the freed CPU: still not enough for the big one
        assert (await big.status()).state is TaskState.QUEUED
        gates.open("s2", "s3", "big")
        for h in (s2, s3, big):
            await h.result()
    assert gates.started == ["s1", "s2", "s3", "big"]
    assert peak[0] == 2


async def test_backfill_within_a_class_past_a_head_that_does_not_fit(tmp_path: Path) -> None:
    gates = Gates()
    classes = {"mixed": {"cpus": 1, "max_concurrency": 8, "aging": 0}}
    async with start(tmp_path, {"gate": gates.handler}, classes=classes, cpus=2) as infra:
        first = await infra.submit_task("gate", {"key": "first"}, task_class="mixed")
        await gates.wait_started("first")
        head = await infra.submit_task(
            "gate", {"key": "head"}, task_class="mixed", priority=9, resources=Resources(cpus=2)
        )
        small = await infra.submit_task("gate", {"key": "small"}, task_class="mixed", priority=0)
        await gates.wait_started("small")
        assert (await head.status()).state is TaskState.QUEUED
        gates.open("first", "small", "head")
        for h in (first, small, head):
            await h.result()
    assert gates.started == ["first", "small", "head"]


@pytest.mark.parametrize(
    ("reserve_after", "order"),
    [
        (0.5, ["s1", "s2", "big", "s3"]),  # passed over 0.5 s: what s1 and s2 free is kept
        (None, ["s1", "s2", "s3", "big"]),  # never reserved: s3 takes s1's CPU
    ],
)
async def test_a_task_passed_over_for_reserve_after_gets_what_is_freed(
    tmp_path: Path, reserve_after: float | None, order: list[str]
) -> None:
    gates = Gates()
    big = {} if reserve_after is None else {"reserve_after": reserve_after}
    async with start(tmp_path, {"gate": gates.handler}, **_two_cpus(big)) as infra:
        s1, big_task, s2 = await _big_behind_one_small(infra, gates)
        await gates.wait_started("s2")  # backfilled: the big one has not waited long yet
        await anyio.sleep(0.6)
        s3 = await infra.submit_task("gate", {"key": "s3"}, task_class="small")
        gates.open("s1")
        await s1.result()
        await anyio.sleep(0.05)
        gates.open("s2")
        await s2.result()
        gates.open("big", "s3")
        for h in (big_task, s3):
            await h.result()
    assert gates.started == order


def _two_cpus(big: dict[str, Any]) -> dict[str, Any]:
    """2 CPUs; class "big" takes both (and ``big``'s keys), "small" one."""
    classes = {"big": {"cpus": 2, "aging": 0, **big}, "small": {"cpus": 1, "aging": 0}}
    return {"classes": classes, "cpus": 2}


async def _big_behind_one_small(
    infra: AgentInfra, gates: Gates
) -> tuple[TaskHandle, TaskHandle, TaskHandle]:
    """s1 runs; then "big" is submitted, which does not fit beside it, then s2."""
    s1 = await infra.submit_task("gate", {"key": "s1"}, task_class="small")
    await gates.wait_started("s1")
    big = await infra.submit_task("gate", {"key": "big"}, task_class="big")
    s2 = await infra.submit_task("gate", {"key": "s2"}, task_class="small")
    return s1, big, s2


async def test_the_reserved_task_starts_however_many_are_ranked_above_it(tmp_path: Path) -> None:
    # Once "big" holds the reservation, more tasks than backfill looks past
    # (64) rank above it and cannot fit beside it: it must still be found
    # when what it needs is free, or what is kept for it stays idle for ever.
    gates = Gates()
    classes = {"mixed": {"cpus": 1, "aging": 0, "reserve_after": 0, "max_concurrency": 100}}
    async with start(tmp_path, {"gate": gates.handler}, classes=classes, cpus=4) as infra:
        first = await infra.submit_task("gate", {"key": "first"}, task_class="mixed")
        await gates.wait_started("first")
        big = await infra.submit_task(
            "gate", {"key": "big"}, task_class="mixed", resources=Resources(cpus=4)
        )
        keys = [f"p{i}" for i in range(80)]
        urgent = await infra.submit_tasks(
            "gate", [{"key": k} for k in keys], task_class="mixed", priority=5
        )
        await anyio.sleep(0.05)
        assert gates.started == ["first"], "the free CPUs are kept for big"
        gates.open("first", "big", *keys)
        for h in (first, big, *urgent):
            await h.result()
    assert gates.started[:2] == ["first", "big"]


@pytest.mark.parametrize("ending", ["cancel", "queue_timeout"])
async def test_a_reservation_ends_when_its_task_leaves_the_queue(
    tmp_path: Path, ending: str
) -> None:
    gates = Gates()
    big_class: dict[str, Any] = {"reserve_after": 0}
    if ending == "queue_timeout":
        big_class["queue_timeout"] = 2.0
    async with start(tmp_path, {"gate": gates.handler}, **_two_cpus(big_class)) as infra:
        s1, big, s2 = await _big_behind_one_small(infra, gates)
        await anyio.sleep(0.05)
        assert (await s2.status()).state is TaskState.QUEUED, "the free CPU is kept for big"
        if ending == "cancel":
            assert (await big.cancel()).state is TaskState.CANCELLED
        else:
            assert (await big.wait()).state is TaskState.TIMED_OUT
        await gates.wait_started("s2")  # nothing is reserved any more
        gates.open("s1", "s2")
        for h in (s1, s2):
            await h.result()


@pytest.mark.usefixtures("gpus_as_configured")
async def test_gpu_leases_are_disjoint_and_reach_the_handler(tmp_path: Path) -> None:
    held: set[str] = set()
    overlaps: list[str] = []
    seen: dict[str, tuple[tuple[str, ...], str | None]] = {}
    peak = [0]

    async def train(payload: Any, run: TaskRun) -> Any:
        overlaps.extend(device for device in run.gpus if device in held)
        held.update(run.gpus)
        peak[0] = max(peak[0], len(held))
        seen[run.task_id] = (run.gpus, run.env.get("CUDA_VISIBLE_DEVICES"))
        try:
            await anyio.sleep(1000 if payload == "hang" else 0.02)
        finally:
            held.difference_update(run.gpus)
        return list(run.gpus)

    classes = {"g": {"gpus": 1, "max_concurrency": 8}}
    async with start(tmp_path, {"train": train}, classes=classes, gpus=[0, 1]) as infra:
        handles = await infra.submit_tasks("train", range(8), task_class="g")
        pair = await infra.submit_task("train", None, task_class="g", resources=Resources(gpus=2))
        cpu = await infra.submit_task("train", None)
        results = [await h.result() for h in [*handles, pair]]
        await cpu.result()
        statuses = [await h.status() for h in [*handles, pair]]
        with pytest.raises(InvalidTask, match="needs 3 GPUs; this machine has 2"):
            await infra.submit_task("train", None, task_class="g", resources=Resources(gpus=3))
        # Attempts that time out or are cancelled give their devices back.
        stuck = await infra.submit_task(
            "train", "hang", task_class="g", resources=Resources(gpus=2), timeout=0.05
        )
        with pytest.raises(TaskTimedOut):
            await stuck.result()
        cancelled = await infra.submit_task("train", "hang", task_class="g")
        await until_state(infra, cancelled.task_id, TaskState.RUNNING)
        await cancelled.cancel()
        after = await infra.submit_task("train", None, task_class="g", resources=Resources(gpus=2))
        with anyio.fail_after(5):
            assert await after.result() == ["0", "1"]
        assert (await infra.task_classes())["g"].running == 0
    assert overlaps == []
    assert peak[0] == 2
    for h, result, status in zip([*handles, pair], results, statuses, strict=True):
        gpus, visible = seen[h.task_id]
        assert list(gpus) == result
        assert status.gpus == gpus
        assert visible == ",".join(gpus)
        assert set(gpus) <= {"0", "1"}
    assert all(len(seen[h.task_id][0]) == 1 for h in handles)
    assert seen[pair.task_id] == (("0", "1"), "0,1")
    assert seen[cpu.task_id] == ((), "")  # leases none: its env hides them all


def gpu_env_infra(tmp_path: Path, **infra: Any) -> AgentInfra:
    """A process-runner class of one GPU, whose ``env`` handler prints the
    ``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER`` its process got."""
    script = (
        "import json, os; print(json.dumps([os.environ.get('CUDA_VISIBLE_DEVICES'), "
        "os.environ.get('CUDA_DEVICE_ORDER')]))"
    )
    return AgentInfra.start(
        {
            "infra": infra,
            "classes": {
                "gp": {"runner": "process", "gpus": 1, "cpus": 0},
                "cp": {"runner": "process", "cpus": 0},
            },
            "handlers": {
                "env": {"command": [sys.executable, "-c", script]},
                "pinned": {
                    "command": [sys.executable, "-c", script],
                    "env": {"CUDA_VISIBLE_DEVICES": "1"},
                },
            },
        },
        state_dir=tmp_path / "state",
    )


@pytest.mark.usefixtures("gpus_as_configured")
async def test_a_process_task_sees_its_leased_gpus_in_its_environment(tmp_path: Path) -> None:
    async with gpu_env_infra(tmp_path, gpus=[0, 1]) as infra:
        one = await infra.submit_task("env", None, task_class="gp")
        two = await infra.submit_task("env", None, task_class="gp", resources=Resources(gpus=2))
        with anyio.fail_after(30):
            assert (await one.result())[1] == "PCI_BUS_ID"
            assert (await one.result())[0] in {"0", "1"}
            assert await two.result() == ["0,1", "PCI_BUS_ID"]


@pytest.mark.usefixtures("gpus_as_configured")
async def test_a_process_task_that_leases_no_gpus_sees_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As Ray does for tasks of num_gpus=0, and Slurm's cgroups for jobs
    # without GPUs: a CPU task that opened CUDA would otherwise land on
    # device 0, leased to a GPU task that counts on having it alone.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    async with gpu_env_infra(tmp_path, gpus=[0, 1]) as infra:
        handle = await infra.submit_task("env", None, task_class="cp")
        # A handler whose own env names devices keeps them: the user's choice.
        pinned = await infra.submit_task("pinned", None, task_class="cp")
        with anyio.fail_after(30):
            assert await handle.result() == ["", None]
            assert await pinned.result() == ["1", None]
    # An instance with no GPUs to lease leaves the program's environment as it is.
    async with gpu_env_infra(tmp_path, gpus=[]) as infra:
        handle = await infra.submit_task("env", None, task_class="cp")
        with anyio.fail_after(30):
            assert await handle.result() == ["0,1", None]


@pytest.mark.usefixtures("gpus_as_configured")
async def test_a_local_service_with_gpus_sees_devices_of_its_own_that_tasks_do_not_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An inference server run as a local process sees every device of the
    # program: without devices of its own, it and a GPU task would share one.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    shows = ["/bin/sh", "-c", 'echo "devices=$CUDA_VISIBLE_DEVICES"; exec sleep 1000']

    def shown(**fields: Any) -> dict[str, Any]:
        return {"command": shows, "health": {"log": "devices="}, **fields}

    config = {
        "infra": {"gpus": [0, 1, 2]},
        "services": {
            # Its probe's processes see the same devices: it passes only then.
            "llm": shown(
                gpus=1,
                health={"command": ["/bin/sh", "-c", 'test "$CUDA_VISIBLE_DEVICES" = 1']},
            ),
            "pinned": shown(gpus=1, env={"CUDA_VISIBLE_DEVICES": "0"}),  # its own choice
            "web": shown(),
        },
        "classes": {"gp": {"runner": "inprocess", "gpus": 1}},
    }
    async with AgentInfra.start(config, state_dir=tmp_path / "state") as infra:

        @infra.task("lease")
        async def lease(payload: Any, run: TaskRun) -> list[str]:
            await anyio.sleep(0.05)
            return list(run.gpus)

        assert infra.services.gpu_ids == {"llm": ("1",), "pinned": ("2",)}
        assert (await infra.get_metrics())["dspy_infra_gpus_total"] == 1
        handles = await infra.submit_tasks("lease", range(3), task_class="gp")
        with anyio.fail_after(30):
            assert [await h.result() for h in handles] == [["0"]] * 3
            seen = {name: await first_line(infra, name) for name in ("llm", "pinned", "web")}
        assert seen == {"llm": "devices=1", "pinned": "devices=0", "web": "devices=0,1,2"}


async def test_local_services_asking_for_more_gpus_than_there_are_start_nothing(
    tmp_path: Path,
) -> None:
    # As with Docker: the start stops before any service runs, naming them all.
    def marks(name: str) -> dict[str, Any]:
        return {"command": ["/bin/sh", "-c", f"touch {tmp_path / name}; exec sleep 1000"]}

    config = {
        "infra": {"gpus": [0, 1]},
        "services": {
            "a": {**marks("a"), "gpus": 1},
            "b": {**marks("b"), "gpus": 2},
            "c": marks("c"),
        },
    }
    with pytest.raises(
        ConfigError, match=r"services\.b\.gpus: .*a: 1, b: 2.* the instance has 2 \(0, 1\)"
    ):
        async with AgentInfra.start(config, state_dir=tmp_path / "state"):
            pass
    assert not [name for name in "abc" if (tmp_path / name).exists()]


async def first_line(infra: AgentInfra, service: str) -> str:
    """The first line the service logged, once it has logged one."""
    while True:
        async with aclosing(infra.services.logs(service)) as lines:
            async for line in lines:
                return line
        await anyio.sleep(0.01)


async def test_mig_devices_confining_the_program_are_leased_by_their_ids(
    tmp_path: Path, make_smi: MakeSmi, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Slurm and Kubernetes confine a job to MIG slices by their ids; nvidia-smi
    # lists whole GPUs only, so the slices are handed out as named.
    make_smi("printf '0, GPU-aaaa1111\\n1, GPU-bbbb2222\\n'")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-aaaa-1,MIG-bbbb-2")
    async with gpu_env_infra(tmp_path) as infra:
        assert (await infra.get_metrics())["dspy_infra_gpus_total"] == 2
        two = await infra.submit_task("env", None, task_class="gp", resources=Resources(gpus=2))
        with anyio.fail_after(30):
            assert await two.result() == ["MIG-aaaa-1,MIG-bbbb-2", "PCI_BUS_ID"]


@pytest.mark.parametrize(
    ("layer", "blamed"),
    [
        ("file", None),
        ("variable", "environment variable DSPY_INFRA_GPUS"),
        ("override", "override gpus="),
    ],
    ids=["file", "variable", "override"],
)
async def test_a_gpu_id_not_on_the_machine_names_where_it_was_set(
    tmp_path: Path,
    make_smi: MakeSmi,
    monkeypatch: pytest.MonkeyPatch,
    layer: str,
    blamed: str | None,
) -> None:
    # Found as the instance starts, once loaded: it named the file, whatever set the ids.
    make_smi("printf '0, GPU-aaaa1111\\n1, GPU-bbbb2222\\n'")
    file = tmp_path / "dspy-infra.toml"
    file.write_text(f'[infra]\nstate_dir = "state"\ngpus = [{5 if layer == "file" else 0}]\n')
    if layer == "variable":
        monkeypatch.setenv("DSPY_INFRA_GPUS", "[5]")
    overrides: dict[str, Any] = {"gpus": [5]} if layer == "override" else {}
    with pytest.raises(ConfigError) as info:
        async with AgentInfra.start(file, **overrides):
            pass
    assert str(info.value) == (
        f"{blamed or file}: infra.gpus: GPU 5 is not on this machine (nvidia-smi found: 0, 1)"
    )


async def test_sync_handlers_run_at_most_worker_threads_at_once(tmp_path: Path) -> None:
    lock = threading.Lock()
    running = [0, 0]  # now, peak

    def slow(payload: Any) -> None:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1

    async with start(tmp_path, {"slow": slow}, worker_threads=2) as infra:
        handles = await infra.submit_tasks("slow", range(8))
        with anyio.fail_after(10):
            for handle in handles:
                await handle.result()
    assert running == [0, 2]


async def test_an_in_process_result_over_the_limit_fails_its_task(tmp_path: Path) -> None:
    async def big(payload: int) -> str:
        return "x" * payload

    async with start(tmp_path, {"big": big}, max_result_bytes=100) as infra:
        status = await (await infra.submit_task("big", 200)).wait()
        assert status.state is TaskState.FAILED
        assert status.error == (
            "its result is 202 bytes as JSON, over the limit of 100 (infra.max_result_bytes)"
        )
        # "x" * 98 is 100 bytes as JSON: at the limit, not over it.
        assert await (await infra.submit_task("big", 98)).result() == "x" * 98


async def test_the_store_is_a_sqlite_file_in_wal_mode(tmp_path: Path) -> None:
    async with start(tmp_path, {"echo": echo}) as infra:
        await (await infra.submit_task("echo", 1)).result()
        db = sqlite3.connect(tmp_path / "state" / "tasks.db")
        try:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        finally:
            db.close()


async def test_a_store_indexed_as_earlier_versions_had_it_resumes_its_unfinished_tasks(
    tmp_path: Path,
) -> None:
    # Earlier versions found unfinished tasks by an index on their state; it
    # is replaced at open by one that a start does not rewrite.
    gates = Gates()
    classes = {"one": {"max_concurrency": 1}}
    handlers: dict[str, Handler] = {"gate": gates.handler}
    async with start(tmp_path, handlers, classes=classes) as infra:
        gates.open("done")
        await (await infra.submit_task("gate", {"key": "done"}, task_class="one")).result()
        await infra.submit_task("gate", {"key": "first"}, task_class="one")
        await gates.wait_started("first")
        for key in ("second", "third"):
            await infra.submit_task("gate", {"key": key}, task_class="one")
    with closing(sqlite3.connect(tmp_path / "state" / "tasks.db")) as db, db:
        db.execute("DROP INDEX tasks_open")
        db.execute(
            "CREATE INDEX tasks_unfinished ON tasks (state) WHERE state IN ('queued', 'running')"
        )
    gates = Gates()
    gates.open("first", "second", "third")
    async with start(tmp_path, {"gate": gates.handler}, classes=classes):
        with anyio.fail_after(10):
            while len(gates.finished) < 3:
                await anyio.sleep(0.005)
    assert gates.started == ["first", "second", "third"]  # in submit order; "done" is not rerun
    with closing(sqlite3.connect(tmp_path / "state" / "tasks.db")) as db:
        indexes = db.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
    assert ("tasks_open",) in indexes
    assert ("tasks_unfinished",) not in indexes


# -- services -----------------------------------------------------------------------------


async def test_a_task_waits_for_a_service_it_needs_which_is_started_on_demand(
    tmp_path: Path,
) -> None:
    seen: list[ServiceState] = []
    infra_box: list[AgentInfra] = []

    async def use(payload: Any) -> Any:
        status = (await infra_box[0].services.status(["svc"]))["svc"]
        seen.append(status.state)
        async with await anyio.connect_tcp("127.0.0.1", status.ports["main"]):
            pass
        return "used"

    services = {"svc": service("--delay", "0.3", port=True, autostart=False)}
    async with start(tmp_path, {"use": use}, services=services, autostart=False) as infra:
        infra_box.append(infra)
        assert (await infra.services.status(["svc"]))["svc"].state is ServiceState.INACTIVE
        h = await infra.submit_task("use", None, needs=["svc"])
        assert (await h.status()).state is TaskState.WAITING_FOR_SERVICES
        with anyio.fail_after(10):
            assert await h.result() == "used"
        assert seen == [ServiceState.HEALTHY]
        status = await h.status()
        assert status.needs == ("svc",)
        assert status.attempts == 1
        # The service is up now: the next task runs at once.
        again = await infra.submit_task("use", None, needs=["svc"])
        assert await again.result() == "used"


async def test_a_service_that_cannot_start_fails_only_the_tasks_that_need_it(
    tmp_path: Path,
) -> None:
    # The services a waiting task needed were started in one call: when one
    # could not start, the tasks waiting for any service of that call failed
    # with its error, those that needed one already up, or one started beside
    # it (which the failed call stopped again), included.
    services = {
        "up": service(port=True, autostart=False),
        "slow": service("--delay", "0.3", port=True, autostart=False),
        "beside": service("--delay", "0.3", port=True, autostart=False),
        "broken": service(
            "--code",
            "3",
            "--exit-after",
            "0",
            ports={"main": 0},
            health={"tcp": "{port}"},
            autostart=False,
            start_retries=0,
        ),
    }
    async with start(tmp_path, {"use": echo}, services=services, autostart=False) as infra:
        await infra.services.start(["up"])
        doomed = [
            await infra.submit_task("use", "ub", needs=["up", "broken"]),
            await infra.submit_task("use", "bb", needs=["broken", "beside"]),
        ]
        fine = [
            await infra.submit_task("use", "us", needs=["up", "slow"]),
            await infra.submit_task("use", "b", needs=["beside"]),
        ]
        with anyio.fail_after(10):
            for h in doomed:
                with pytest.raises(TaskFailed, match="'broken' failed"):
                    await h.result()
            assert [await h.result() for h in fine] == ["us", "b"]


async def test_a_task_waiting_for_services_fails_when_one_that_was_up_fails(
    tmp_path: Path,
) -> None:
    # It waits for "slow", which is started for it; "dies", up when it came to
    # wait, fails meanwhile, and nothing starts it again for the task.
    services = {
        "dies": service(
            "--exit-after", "0.5", "--code", "1", port=True, autostart=False, restart="no"
        ),
        "slow": service("--delay", "1", port=True, autostart=False),
    }
    async with start(tmp_path, {"use": echo}, services=services, autostart=False) as infra:
        await infra.services.start(["dies"])
        h = await infra.submit_task("use", None, needs=["dies", "slow"])
        assert (await h.status()).state is TaskState.WAITING_FOR_SERVICES
        with anyio.fail_after(10), pytest.raises(TaskFailed, match="'dies' it needs failed"):
            await h.result()


async def test_a_task_waiting_for_services_times_out_is_cancelled_or_fails(
    tmp_path: Path,
) -> None:
    ran: list[Any] = []

    async def use(payload: Any) -> Any:
        ran.append(payload)
        return payload

    services = {
        "slow": service("--delay", "5", port=True, autostart=False),
        # Exits at once, before its probe ever passes.
        "broken": service(
            "--code",
            "3",
            "--exit-after",
            "0",
            ports={"main": 0},
            health={"tcp": "{port}"},
            autostart=False,
            start_retries=0,
        ),
    }
    classes = {"qt": {"queue_timeout": 0.3}}
    async with start(
        tmp_path, {"use": use}, services=services, classes=classes, autostart=False
    ) as infra:
        timed = await infra.submit_task("use", "timed", task_class="qt", needs=["slow"])
        cancelled = await infra.submit_task("use", "cancelled", needs=["slow"])
        failed = await infra.submit_task("use", "failed", needs=["broken"])
        assert (await timed.status()).state is TaskState.WAITING_FOR_SERVICES
        assert (await cancelled.status()).state is TaskState.WAITING_FOR_SERVICES
        status = await cancelled.cancel()
        assert status.state is TaskState.CANCELLED
        with anyio.fail_after(10):
            with pytest.raises(TaskTimedOut, match="waited more than"):
                await timed.result()
            with pytest.raises(TaskFailed, match="could not start") as caught:
                await failed.result()
        assert "broken" in str(caught.value)
        for h in (timed, cancelled, failed):
            assert (await h.status()).attempts == 0
    assert ran == []


async def test_a_task_needing_a_service_that_has_failed_fails_when_none_are_started(
    tmp_path: Path,
) -> None:
    # With start_needed_services = false, a task waiting when its service
    # failed failed; one whose turn came after the failure waited for ever.
    services = {
        "broken": service(
            "--code",
            "3",
            "--exit-after",
            "0",
            ports={"main": 0},
            health={"tcp": "{port}"},
            autostart=False,
            start_retries=0,
        ),
    }
    async with start(
        tmp_path, {"use": echo}, services=services, autostart=False, start_needed_services=False
    ) as infra:
        with pytest.raises(ServiceStartError):
            await infra.services.start(["broken"])
        assert (await infra.services.status(["broken"]))["broken"].state is ServiceState.FAILED
        h = await infra.submit_task("use", "late", needs=["broken"])
        with anyio.fail_after(5), pytest.raises(TaskFailed, match="'broken' it needs failed"):
            await h.result()
        assert (await h.status()).attempts == 0


# -- idempotency ---------------------------------------------------------------------------


async def test_submitting_the_same_task_id_twice_runs_it_once(tmp_path: Path) -> None:
    calls: Counter[str] = Counter()

    async def count(payload: Any, run: TaskRun) -> Any:
        calls[run.task_id] += 1
        await anyio.sleep(0.01)
        return payload

    async with start(tmp_path, {"count": count}) as infra:
        a = await infra.submit_task("count", 1, task_id="same")
        b = await infra.submit_task("count", 2, task_id="same")
        assert a.task_id == b.task_id == "same"
        assert await a.result() == 1
        c = await infra.submit_task("count", 3, task_id="same")  # after it finished
        assert await c.result() == 1
        # Concurrent submits of one new id: one task.
        ids: list[str] = []

        async def submit(value: int) -> None:
            ids.append((await infra.submit_task("count", value, task_id="racy")).task_id)

        async with anyio.create_task_group() as tg:
            for value in range(5):
                tg.start_soon(submit, value)
        assert ids == ["racy"] * 5
        assert await infra.task_handle("racy").result() in range(5)
    assert calls == {"same": 1, "racy": 1}
    assert set(rows(tmp_path)) == {"same", "racy"}

    async with start(tmp_path, {"count": count}) as infra:
        again = await infra.submit_task("count", 4, task_id="same")
        status = await again.wait()
        assert status.state is TaskState.SUCCEEDED
        assert status.result == 1
        assert status.attempts == 1
    assert calls == {"same": 1, "racy": 1}


# -- streaming results ------------------------------------------------------------------------


async def finished_and_held(
    infra: AgentInfra, gates: Gates, *keys: str
) -> tuple[TaskHandle, list[TaskHandle]]:
    """An "echo" task that has finished ("early"), and "gate" tasks started and held at ``keys``."""
    done = await infra.submit_task("echo", "early")
    await done.result()
    held = [await infra.submit_task("gate", {"key": key}) for key in keys]
    await gates.wait_started(*keys)
    return done, held


async def test_stream_task_results_for_ids_ends_when_all_have_finished(tmp_path: Path) -> None:
    gates = Gates()
    async with start(tmp_path, {"gate": gates.handler, "echo": echo}) as infra:
        done, (b, c) = await finished_and_held(infra, gates, "b", "c")
        received: list[TaskEvent] = []

        async def read() -> None:
            ids = [done.task_id, b.task_id, c.task_id]
            async for event in infra.stream_task_results(ids):
                received.append(event)  # noqa: PERF401 - seen by the test as each arrives

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await until(lambda: len(received) == 1)
                gates.open("c")
                await until(lambda: len(received) == 2)
                gates.open("b")
        # The reader ended by itself once all three had finished.
        assert [e.task_id for e in received] == [done.task_id, c.task_id, b.task_id]
        assert [e.result for e in received] == ["early", {"key": "c"}, {"key": "b"}]
        assert all(e.state is TaskState.SUCCEEDED for e in received)
        assert received[1].seq < received[2].seq

        # Resuming with since= (and no ids: following every task) replays the final
        # events after that point, with their sequence numbers.
        replayed: list[TaskEvent] = []
        with anyio.fail_after(5):
            async with aclosing(infra.stream_task_results(since=received[1].seq - 1)) as stream:
                async for event in stream:
                    replayed.append(event)
                    if len(replayed) == 2:
                        break
        assert [(e.task_id, e.seq) for e in replayed] == [
            (c.task_id, received[1].seq),
            (b.task_id, received[2].seq),
        ]
        assert [e.result for e in replayed] == [{"key": "c"}, {"key": "b"}]
        # Already finished, all of them: the stream ends at once, read from the store.
        with anyio.fail_after(5):
            finished = [e async for e in infra.stream_task_results([done.task_id, b.task_id])]
        assert {(e.task_id, e.state) for e in finished} == {
            (done.task_id, TaskState.SUCCEEDED),
            (b.task_id, TaskState.SUCCEEDED),
        }


async def test_a_resumed_stream_of_ids_ends_when_all_have_finished(tmp_path: Path) -> None:
    """A reader resumes with the ids it asked for and the last seq it saw: it gets the
    rest and the stream ends, even though one of those tasks finished before that seq."""
    gates = Gates()
    async with start(tmp_path, {"gate": gates.handler}) as infra:
        a = await infra.submit_task("gate", {"key": "a"})
        b = await infra.submit_task("gate", {"key": "b"})
        c = await infra.submit_task("gate", {"key": "c"})
        await gates.wait_started("a", "b", "c")
        ids = [a.task_id, b.task_id, c.task_id]
        gates.open("a")
        await a.result()
        # The reader saw a's final event, with its sequence number...
        with anyio.fail_after(5):
            async with aclosing(infra.stream_events(TaskEvent.FINAL_TYPES, since=0)) as events:
                async for event in events:
                    if isinstance(event, TaskEvent) and event.task_id == a.task_id:
                        seen = event.seq
                        break
        assert seen > 0
        # ... and resumes after it, while b finishes and c is still running.
        gates.open("b")
        await b.result()
        resumed: list[TaskEvent] = []

        async def read() -> None:
            async for event in infra.stream_task_results(ids, since=seen):
                resumed.append(event)  # noqa: PERF401 - seen by the test as each arrives

        with anyio.move_on_after(2) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await until(lambda: b.task_id in {e.task_id for e in resumed})
                gates.open("c")
        assert not scope.cancelled_caught, (
            "the resumed stream did not end although every task it follows has finished"
        )
        assert resumed[-1].task_id == c.task_id
        assert resumed[-1].seq > seen
        assert {e.task_id for e in resumed} <= set(ids)
        assert {b.task_id, c.task_id} <= {e.task_id for e in resumed}
        assert len(resumed) == len({e.task_id for e in resumed})  # once each at most


async def test_a_stream_of_results_given_one_id_follows_that_task(tmp_path: Path) -> None:
    # A string is a collection of strings: its characters were taken for the
    # ids, and the stream raised "unknown task '0'".
    gates = Gates()
    async with start(tmp_path, {"gate": gates.handler, "echo": echo}) as infra:
        done, (later,) = await finished_and_held(infra, gates, "later")
        with anyio.fail_after(5):
            finished = [e async for e in infra.stream_task_results(done.task_id)]
            assert [(e.task_id, e.result) for e in finished] == [(done.task_id, "early")]
            received: list[TaskEvent] = []
            async with anyio.create_task_group() as tg:

                async def read() -> None:
                    received.extend([e async for e in infra.stream_task_results(later.task_id)])

                tg.start_soon(read)
                gates.open("later")
        assert [(e.task_id, e.result) for e in received] == [(later.task_id, {"key": "later"})]


# -- timeouts, retries, cancellation ---------------------------------------------------------


async def test_queue_timeout_and_run_timeout(tmp_path: Path) -> None:
    gates = Gates()
    classes = {"qt": {"max_concurrency": 1, "queue_timeout": 0.2}}
    async with start(tmp_path, {"gate": gates.handler}, classes=classes) as infra:
        blocker = await infra.submit_task("gate", {"key": "blocker"}, task_class="qt")
        await gates.wait_started("blocker")
        waiting = await infra.submit_task("gate", {"key": "waiting"}, task_class="qt")
        started = time.monotonic()
        with anyio.fail_after(5), pytest.raises(TaskTimedOut, match=r"waited more than 0\.2 s"):
            await waiting.result()
        assert time.monotonic() - started >= 0.15
        status = await waiting.status()
        assert status.state is TaskState.TIMED_OUT
        assert status.attempts == 0
        assert (await infra.task_classes())["qt"].queued == 0
        gates.open("blocker")
        await blocker.result()
        # A slow attempt: its own timeout cancels it.
        slow = await infra.submit_task("gate", {"key": "slow"}, task_class="qt", timeout=0.1)
        with anyio.fail_after(5), pytest.raises(TaskTimedOut, match="ran longer than its timeout"):
            await slow.result()
        assert (await slow.status()).state is TaskState.TIMED_OUT
    assert "waiting" not in gates.started
    assert gates.cancelled == ["slow"]
    assert rows(tmp_path)[waiting.task_id] == ("timed_out", 0)


async def test_a_timeout_bounds_its_own_attempt_only(tmp_path: Path) -> None:
    # One slot, so the same worker runs both: the quick task's timeout of
    # 0.2 s must not cut short the untimed task that follows it.
    async def nap(seconds: float) -> float:
        await anyio.sleep(seconds)
        return seconds

    classes = {"one": {"max_concurrency": 1}}
    async with start(tmp_path, {"nap": nap}, classes=classes) as infra:
        with anyio.fail_after(5):
            assert (
                await (await infra.submit_task("nap", 0, task_class="one", timeout=0.2)).result()
                == 0
            )
            untimed = await infra.submit_task("nap", 0.5, task_class="one")
            assert await untimed.result() == 0.5


async def test_tasks_that_started_within_their_queue_timeout_are_not_kept_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each used to stay in memory, with its payload and result, until its
    # queue_timeout was over: with an hour's, an hour of a busy server's tasks.
    # What is kept is now bounded by the tasks in flight, not by those that
    # passed through.
    monkeypatch.setattr(scheduler_module, "_RECENT", 50)  # finished tasks kept in memory
    monkeypatch.setattr(scheduler_module, "_STALE_TIMERS", 100)
    gates = Gates()
    classes = {
        "qt": {"queue_timeout": 3600.0},
        "one": {"max_concurrency": 1, "queue_timeout": 1.0},
    }
    async with start(tmp_path, {"echo": echo, "gate": gates.handler}, classes=classes) as infra:
        await infra.submit_task("gate", {"key": "blocker"}, task_class="one")
        await gates.wait_started("blocker")
        waiting = await infra.submit_task("gate", {"key": "waiting"}, task_class="one")
        for _ in range(20):
            handles = await infra.submit_tasks("echo", ["x" * 1000] * 100, task_class="qt")
            async with aclosing(infra.stream_task_results([h.task_id for h in handles])) as results:
                assert {event.state async for event in results} == {TaskState.SUCCEEDED}
        gc.collect()
        kept = sum(isinstance(o, TaskRecord) for o in gc.get_objects())
        assert kept < 1000, f"{kept} of 2000 task records kept in memory"
        # A queue timeout still due is kept.
        with anyio.fail_after(5), pytest.raises(TaskTimedOut, match="waited more than 1 s"):
            await waiting.result()
        gates.open("blocker")


async def test_the_queue_timeout_counts_from_the_submit_across_a_restart(
    tmp_path: Path,
) -> None:
    gates = Gates()
    classes = {"qt": {"max_concurrency": 1, "queue_timeout": 1.0}}
    async with start(tmp_path, {"gate": gates.handler}, classes=classes) as infra:
        await infra.submit_task("gate", {"key": "blocker"}, task_class="qt")
        await gates.wait_started("blocker")
        waiting = await infra.submit_task("gate", {"key": "waiting"}, task_class="qt")
        submitted = time.monotonic()
        await anyio.sleep(0.6)
    # 0.6 s waited, 0.6 s more with no instance open: past its 1 s.
    await anyio.sleep(0.6)
    gates.open("blocker")
    gates.open("waiting")
    async with start(tmp_path, {"gate": gates.handler}, classes=classes) as infra:
        with anyio.fail_after(5):
            async with aclosing(infra.stream_task_results([waiting.task_id])) as results:
                (final,) = [event async for event in results]
    assert time.monotonic() - submitted < 2.5
    assert final.state is TaskState.TIMED_OUT
    assert final.error == "waited more than 1 s to start"
    # Not started by the restart either, though the blocker's slot was free.
    assert "waiting" not in gates.started


async def test_a_started_task_given_back_at_close_is_not_timed_out_by_its_queue_timeout(
    tmp_path: Path,
) -> None:
    # It started within its queue_timeout, ran past it, and the close gave
    # its attempt back: the next instance runs it again.
    gates = Gates()
    classes = {"qt": {"queue_timeout": 0.5}}
    async with start(tmp_path, {"gate": gates.handler}, classes=classes) as infra:
        handle = await infra.submit_task("gate", {"key": "long"}, task_class="qt")
        await gates.wait_started("long")
        await anyio.sleep(0.7)
    gates.open("long")
    async with start(tmp_path, {"gate": gates.handler}, classes=classes) as infra:
        with anyio.fail_after(5):
            async with aclosing(infra.stream_task_results([handle.task_id])) as results:
                (final,) = [event async for event in results]
    assert final.state is TaskState.SUCCEEDED
    assert gates.started == ["long", "long"]


async def test_retry_with_backoff(tmp_path: Path) -> None:
    attempts: dict[str, list[tuple[int, float]]] = {}

    async def flaky(payload: Any, run: TaskRun) -> Any:
        attempts.setdefault(run.task_id, []).append((run.attempt, time.monotonic()))
        if run.attempt <= payload["fail"]:
            raise ValueError(f"attempt {run.attempt} fails")
        return run.attempt

    backoff = {"initial": 0.1, "max": 0.1, "factor": 1, "jitter": 0}
    classes = {"r": {"max_attempts": 3, "retry_backoff": backoff}}
    async with start(tmp_path, {"flaky": flaky}, classes=classes) as infra:
        ok = await infra.submit_task("flaky", {"fail": 2}, task_class="r")
        never = await infra.submit_task("flaky", {"fail": 99}, task_class="r")
        once = await infra.submit_task("flaky", {"fail": 99}, task_class="r", max_attempts=1)
        assert await ok.result() == 3
        with pytest.raises(TaskFailed, match="ValueError: attempt 3 fails"):
            await never.result()
        with pytest.raises(TaskFailed, match="ValueError: attempt 1 fails"):
            await once.result()
        ok_status, never_status = await ok.status(), await never.status()
        assert (ok_status.state, ok_status.attempts, ok_status.error) == (
            TaskState.SUCCEEDED,
            3,
            None,
        )
        assert (never_status.state, never_status.attempts) == (TaskState.FAILED, 3)
        assert (await once.status()).attempts == 1
    assert [a for a, _ in attempts[ok.task_id]] == [1, 2, 3]
    assert [a for a, _ in attempts[never.task_id]] == [1, 2, 3]
    assert len(attempts[once.task_id]) == 1
    for runs in attempts[ok.task_id], attempts[never.task_id]:
        gaps = [b - a for (_, a), (_, b) in itertools.pairwise(runs)]
        assert all(gap >= 0.09 for gap in gaps), gaps
    assert rows(tmp_path)[ok.task_id] == ("succeeded", 3)


async def test_the_first_retry_waits_the_initial_backoff(tmp_path: Path) -> None:
    # Retry n waits initial * factor**n from n = 0: with a factor of 100, the
    # first retry comes after 0.05 s, not 5 s.
    starts: list[float] = []

    async def fails_once(payload: Any, run: TaskRun) -> Any:
        starts.append(time.monotonic())
        if run.attempt == 1:
            raise ValueError("the first attempt fails")
        return run.attempt

    backoff = {"initial": 0.05, "max": 60, "factor": 100, "jitter": 0}
    classes = {"r": {"max_attempts": 2, "retry_backoff": backoff}}
    async with start(tmp_path, {"fails_once": fails_once}, classes=classes) as infra:
        with anyio.fail_after(3):
            assert await (await infra.submit_task("fails_once", 0, task_class="r")).result() == 2
    assert 0.04 <= starts[1] - starts[0] < 2, starts


async def test_cancel_during_a_retry_backoff(tmp_path: Path) -> None:
    runs: list[int] = []

    async def failing(payload: Any, run: TaskRun) -> Any:
        runs.append(run.attempt)
        raise ValueError("fails")

    backoff = {"initial": 0.3, "max": 0.3, "jitter": 0}
    classes = {"r": {"max_attempts": 3, "retry_backoff": backoff}}
    async with start(tmp_path, {"failing": failing}, classes=classes) as infra:
        h = await infra.submit_task("failing", None, task_class="r")
        await until(lambda: runs == [1])
        await anyio.sleep(0.02)
        assert (await h.status()).state is TaskState.QUEUED  # waiting out its backoff
        status = await h.cancel()
        assert (status.state, status.attempts) == (TaskState.CANCELLED, 1)
        await anyio.sleep(0.45)  # past the backoff: the timer must not run it again
        assert runs == [1]
        assert (await h.status()).state is TaskState.CANCELLED
        assert (await infra.task_classes())["r"].queued == 0


async def test_cancel_queued_and_running_tasks(tmp_path: Path) -> None:
    gates = Gates()
    classes = {"one": {"max_concurrency": 1}}
    async with start(tmp_path, {"gate": gates.handler, "echo": echo}, classes=classes) as infra:
        running = await infra.submit_task("gate", {"key": "running"}, task_class="one")
        await gates.wait_started("running")
        queued = await infra.submit_task("gate", {"key": "queued"}, task_class="one")
        status = await infra.cancel_task(queued.task_id)
        assert status.state is TaskState.CANCELLED
        assert status.attempts == 0
        assert (await infra.task_classes())["one"].queued == 0
        with pytest.raises(TaskCancelled):
            await queued.result()
        status = await running.cancel()
        assert status.state is TaskState.CANCELLED
        assert status.attempts == 1
        with pytest.raises(TaskCancelled):
            await running.result()
        assert (await infra.task_classes())["one"].running == 0
        # The slot is free again; a finished task is not changed by a cancel.
        done = await infra.submit_task("echo", 5, task_class="one")
        assert await done.result() == 5
        assert (await infra.cancel_task(done.task_id)).state is TaskState.SUCCEEDED
        assert (await infra.cancel_task(queued.task_id)).state is TaskState.CANCELLED
        with pytest.raises(UnknownTask):
            await infra.cancel_task("nope")
    assert gates.started == ["running"]
    assert gates.cancelled == ["running"]
    stored = rows(tmp_path)
    assert stored[queued.task_id] == ("cancelled", 0)
    assert stored[running.task_id] == ("cancelled", 1)


# -- restarts ------------------------------------------------------------------------------


async def test_a_restart_resumes_queued_tasks_and_reruns_an_interrupted_one(
    tmp_path: Path,
) -> None:
    gates = Gates()
    classes = {"one": {"max_concurrency": 1, "aging": 0}}
    async with start(tmp_path, {"gate": gates.handler}, classes=classes) as infra:
        blocker = await infra.submit_task(
            "gate", {"key": "blocker"}, task_class="one", task_id="blocker"
        )
        await gates.wait_started("blocker")
        queued = [
            (
                await infra.submit_task(
                    "gate", {"key": f"q{i}"}, task_class="one", priority=i % 2, task_id=f"q{i}"
                )
            ).task_id
            for i in range(4)
        ]
        assert (await blocker.status()).attempts == 1
    # Closed while the async handler waited: interrupted, its attempt given back.
    assert gates.cancelled == ["blocker"]
    assert gates.finished == []
    stored = rows(tmp_path)
    assert stored["blocker"] == ("queued", 0)
    assert all(stored[q] == ("queued", 0) for q in queued)

    again = Gates()
    for key in ["blocker", *queued]:
        again.open(key)
    async with start(tmp_path, {"gate": again.handler}, classes=classes) as infra:
        for task_id in ["blocker", *queued]:
            status = await infra.task_handle(task_id).wait()
            assert status.state is TaskState.SUCCEEDED
            assert status.attempts == 1
            assert status.result == {"key": task_id}
    # By priority, FIFO among equals: the interrupted one keeps its place.
    assert again.started == ["q1", "q3", "blocker", "q0", "q2"]
    assert all(state == ("succeeded", 1) for state in rows(tmp_path).values())


async def test_a_retry_waiting_out_its_backoff_survives_a_restart(tmp_path: Path) -> None:
    runs: list[tuple[int, float]] = []

    async def flaky(payload: Any, run: TaskRun) -> Any:
        runs.append((run.attempt, time.time()))
        if run.attempt == 1:
            raise ValueError("first attempt fails")
        return run.attempt

    backoff = {"initial": 0.4, "max": 0.4, "jitter": 0}
    classes = {"r": {"max_attempts": 2, "retry_backoff": backoff}}
    async with start(tmp_path, {"flaky": flaky}, classes=classes) as infra:
        h = await infra.submit_task("flaky", None, task_class="r", task_id="retry")
        await until(lambda: len(runs) == 1)
        await anyio.sleep(0.02)
        status = await h.status()
        assert (status.state, status.attempts) == (TaskState.QUEUED, 1)
        assert status.error == "ValueError: first attempt fails"
    assert rows(tmp_path)["retry"] == ("queued", 1)
    async with start(tmp_path, {"flaky": flaky}, classes=classes) as infra:
        with anyio.fail_after(5):
            assert await infra.task_handle("retry").result() == 2
        status = await infra.get_task_status("retry")
        assert (status.state, status.attempts) == (TaskState.SUCCEEDED, 2)
    assert [a for a, _ in runs] == [1, 2]
    assert runs[1][1] - runs[0][1] >= 0.39  # the backoff was kept across the restart


async def test_a_cancel_scope_around_the_instance_gives_the_attempt_back(tmp_path: Path) -> None:
    # As close() does: the interrupted attempt is not counted, so a task with
    # one attempt runs in the next instance instead of being found lost.
    started = anyio.Event()
    runs: list[str] = []

    async def slow(payload: str) -> str:
        runs.append(payload)
        started.set()
        await anyio.sleep_forever()
        return payload

    with anyio.CancelScope() as outer:
        async with start(tmp_path, {"slow": slow}) as infra:
            await infra.submit_task("slow", "once", max_attempts=1, task_id="t")
            await started.wait()
            outer.cancel()
            await anyio.sleep_forever()
    assert outer.cancelled_caught
    await runs_once_more(tmp_path, "slow", runs)


async def test_an_attempt_whose_handler_turns_the_close_into_an_error_is_given_back(
    tmp_path: Path,
) -> None:
    # Some libraries raise an error of their own in place of the cancellation
    # (grpclib does): the close still interrupted the attempt, which is given
    # back, not counted as the task's failure.
    started = anyio.Event()
    runs: list[str] = []

    async def wraps_its_cancellation(payload: str) -> str:
        runs.append(payload)
        started.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            raise ConnectionError("the call was interrupted") from None
        return payload

    async with start(tmp_path, {"h": wraps_its_cancellation}) as infra:
        await infra.submit_task("h", "once", max_attempts=1, task_id="t")
        await started.wait()
    assert rows(tmp_path)["t"] == ("queued", 0)
    await runs_once_more(tmp_path, "h", runs)


async def runs_once_more(tmp_path: Path, handler: str, runs: list[str]) -> None:
    """Task "t", whose attempt a close gave back, runs in the next instance as its
    first attempt still, and succeeds: two runs in all, one counted."""

    async def quick(payload: str) -> str:
        runs.append(payload)
        return payload

    async with start(tmp_path, {handler: quick}) as infra:
        with anyio.fail_after(5):
            status = await infra.task_handle("t").wait()
    assert (status.state, status.attempts) == (TaskState.SUCCEEDED, 1)
    assert runs == ["once", "once"]


async def test_a_result_waiter_does_not_outlive_the_instance(tmp_path: Path) -> None:
    """A task waiting on result() when the instance closes is told, not left hanging."""
    gates = Gates()
    outcome: list[BaseException] = []

    async def wait_for(handle: TaskHandle) -> None:
        try:
            await handle.result()
        except InfraError as exc:
            outcome.append(exc)

    with anyio.move_on_after(2) as scope:
        # The waiter's task group is entered first: it outlives the instance.
        async with (
            anyio.create_task_group() as tg,
            start(tmp_path, {"gate": gates.handler}) as infra,
        ):
            h = await infra.submit_task("gate", {"key": "hang"})
            await gates.wait_started("hang")
            tg.start_soon(wait_for, h)
            await anyio.sleep(0.01)
    assert not scope.cancelled_caught, "result() still waited 2 s after the instance closed"
    assert len(outcome) == 1
    assert isinstance(outcome[0], InfraClosed)


async def test_a_results_stream_does_not_end_quietly_when_the_instance_closes(
    tmp_path: Path,
) -> None:
    # As result() above: a stream of tasks that have not all finished is
    # told the instance closed, not ended as if they had.
    gates = Gates()
    seen: list[str] = []
    outcome: list[BaseException] = []

    async def read(infra: AgentInfra, task_ids: list[str]) -> None:
        try:
            async with aclosing(infra.stream_task_results(task_ids)) as results:
                async for event in results:
                    seen.append(event.task_id)  # noqa: PERF401 - watched as they come
        except InfraError as exc:
            outcome.append(exc)

    with anyio.fail_after(5):
        async with (
            anyio.create_task_group() as tg,
            start(tmp_path, {"gate": gates.handler, "echo": echo}) as infra,
        ):
            done = await infra.submit_task("echo", 1)
            hung = await infra.submit_task("gate", {"key": "hang"})
            await done.result()
            tg.start_soon(read, infra, [done.task_id, hung.task_id])
            await until(lambda: seen == [done.task_id])
    assert len(outcome) == 1
    assert isinstance(outcome[0], InfraClosed)
    assert hung.task_id in str(outcome[0])


async def test_a_cancel_of_a_task_whose_submit_fails_to_commit_is_told(tmp_path: Path) -> None:
    outcomes: dict[str, object] = {}

    async def outcome(name: str, call: Callable[[], Awaitable[object]]) -> None:
        try:
            outcomes[name] = await call()
        except Exception as exc:  # noqa: BLE001 - what each call ends with is the test
            outcomes[name] = exc

    async def cancel(infra: AgentInfra, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()  # before cancel_task, which waits on the task with no await before
        await outcome("cancel", lambda: infra.cancel_task("doomed"))

    # The calls' task group outlives the instance, which the failed commit stops.
    async with anyio.create_task_group() as calls:
        with pytest.raises(ExceptionGroup) as stopped:  # noqa: PT012
            async with start(tmp_path, {"echo": echo}) as infra:
                # Another connection holds the write lock, so that the submit's
                # insert waits for it; it lets go once the cancel waits, adding
                # a trigger that makes the insert fail.
                db = sqlite3.connect(tmp_path / "state" / "tasks.db", isolation_level=None)
                with closing(db):
                    db.execute("BEGIN IMMEDIATE")
                    db.execute(
                        "CREATE TRIGGER refuse BEFORE INSERT ON tasks WHEN NEW.task_id = 'doomed' "
                        "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
                    )
                    calls.start_soon(
                        outcome, "submit", lambda: infra.submit_task("echo", 1, task_id="doomed")
                    )
                    with anyio.fail_after(5):
                        while True:  # until the submit has written it, and waits for the commit
                            try:
                                await infra.get_task_status("doomed")
                                break
                            except UnknownTask:
                                await anyio.sleep(0.005)
                    await calls.start(cancel, infra)
                    db.execute("COMMIT")
                await anyio.sleep_forever()
        await until(lambda: "cancel" in outcomes)  # not woken by the failed submit: for ever
    assert stopped.group_contains(StoreFailed, match="refused by the test")
    assert isinstance(outcomes["submit"], sqlite3.IntegrityError)
    assert isinstance(outcomes["cancel"], InfraClosed)
    assert "'doomed' was never stored" in str(outcomes["cancel"])
    assert "doomed" not in rows(tmp_path)


async def test_a_waiter_is_not_told_a_final_state_whose_commit_failed(tmp_path: Path) -> None:
    gates = Gates()
    outcome: list[object] = []

    async def wait_for(handle: TaskHandle) -> None:
        try:
            outcome.append(await handle.result())
        except InfraError as exc:
            outcome.append(exc)

    # The waiter's task group is entered first: it outlives the instance.
    async with anyio.create_task_group() as tg:
        with pytest.raises(ExceptionGroup) as stopped:  # noqa: PT012
            async with start(tmp_path, {"gate": gates.handler}) as infra:
                handle = await infra.submit_task("gate", {"key": "k"}, task_id="t")
                await gates.wait_started("k")
                tg.start_soon(wait_for, handle)
                with closing(sqlite3.connect(tmp_path / "state" / "tasks.db")) as db:
                    db.execute(
                        "CREATE TRIGGER refuse BEFORE UPDATE OF state ON tasks "
                        "WHEN NEW.state = 'succeeded' BEGIN SELECT RAISE(ABORT, 'disk full'); END"
                    )
                    db.commit()
                gates.open("k")
                await anyio.sleep_forever()
    assert stopped.group_contains(StoreFailed, match="disk full")
    # Its end is not in the store: the next instance finds it running (and,
    # with no attempt left, lost); its waiter must not have been told it succeeded.
    assert rows(tmp_path)["t"] == ("running", 1)
    assert len(outcome) == 1
    assert isinstance(outcome[0], InfraClosed), outcome
    assert "the end of task 't' (succeeded) could not be stored" in str(outcome[0])
    assert "disk full" in str(outcome[0])
    with anyio.fail_after(5), pytest.raises(InfraClosed, match="could not be stored"):
        await handle.result()  # asked after the instance stopped: told so too


async def test_tasks_of_a_class_no_longer_configured_end_lost(tmp_path: Path) -> None:
    gates = Gates()
    classes = {"gone": {"max_concurrency": 1}}
    async with start(tmp_path, {"gate": gates.handler}, classes=classes) as infra:
        await infra.submit_task("gate", {"key": "r"}, task_class="gone", task_id="r")
        await gates.wait_started("r")
        await infra.submit_task("gate", {"key": "q"}, task_class="gone", task_id="q")
    async with start(tmp_path, {"gate": gates.handler}) as infra:
        for task_id in ("r", "q"):
            status = await infra.task_handle(task_id).wait()
            assert status.state is TaskState.LOST
            assert status.error == "its class 'gone' is no longer configured"
    assert gates.started == ["r"]
    assert rows(tmp_path) == {"r": ("lost", 0), "q": ("lost", 0)}


async def test_tasks_needing_a_service_no_longer_configured_end_lost(tmp_path: Path) -> None:
    # Recovered, such a task was dispatched like any other, and the look-up of
    # its service raised UnknownService out of the instance's start: no
    # instance could open the state_dir any more.
    services = {"svc": service("--delay", "30", port=True, autostart=False)}
    async with start(
        tmp_path, {"echo": echo}, services=services, start_needed_services=False
    ) as infra:
        waiting = await infra.submit_task("echo", "w", needs=["svc"], task_id="w")
        assert (await waiting.status()).state is TaskState.WAITING_FOR_SERVICES
    async with start(tmp_path, {"echo": echo}) as infra:
        status = await infra.task_handle("w").wait()
        assert status.state is TaskState.LOST
        assert status.error == "it needs services no longer configured: 'svc'"
        assert await (await infra.submit_task("echo", "fine")).result() == "fine"
    assert rows(tmp_path)["w"] == ("lost", 0)


async def test_a_final_state_nobody_waits_for_is_committed_soon_after(tmp_path: Path) -> None:
    async def echo(payload: Any) -> Any:
        return payload

    async with start(tmp_path, {"echo": echo}) as infra:
        await infra.submit_task("echo", 1, task_id="unwatched")
        await until_state(infra, "unwatched", TaskState.SUCCEEDED)
        await until(lambda: rows(tmp_path)["unwatched"] == ("succeeded", 1))


async def test_a_deferred_final_state_is_committed_once_someone_waits_or_it_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A final state nobody waits for waits for company (a group commit): here
    # for longer than the test, so that only a waiter or the close commits it.
    # (With the writer kept on the loop's CPU, an idle writer would take it at
    # once: it is left where the kernel puts it, as where it cannot be kept.)
    monkeypatch.setattr(store_module, "DEFER_SECONDS", 60.0)
    monkeypatch.setattr(store_module, "_sched_getcpu", lambda: None)

    async def echo(payload: Any) -> Any:
        return payload

    async def finished_unwatched(infra: AgentInfra, payload: str) -> TaskHandle:
        handle = await infra.submit_task("echo", payload)
        await until_state(infra, handle.task_id, TaskState.SUCCEEDED)
        assert rows(tmp_path)[handle.task_id] == ("running", 1)
        return handle

    async with start(tmp_path, {"echo": echo}) as infra:
        waited = await finished_unwatched(infra, "w")
        with anyio.fail_after(5):
            assert await waited.result() == "w"
        assert rows(tmp_path)[waited.task_id] == ("succeeded", 1)
        streamed = await finished_unwatched(infra, "s")
        with anyio.fail_after(5):
            async with aclosing(infra.stream_task_results([streamed.task_id])) as results:
                assert [e.result async for e in results] == ["s"]
        assert rows(tmp_path)[streamed.task_id] == ("succeeded", 1)
        closed = await finished_unwatched(infra, "c")
    assert rows(tmp_path)[closed.task_id] == ("succeeded", 1)


async def test_durable_false_runs_tasks_in_memory_only(tmp_path: Path) -> None:
    calls: Counter[str] = Counter()

    async def flaky(payload: Any, run: TaskRun) -> Any:
        calls[run.task_id] += 1
        if run.attempt == 1:
            raise ValueError("first attempt fails")
        return payload

    backoff = {"initial": 0.01, "max": 0.01, "jitter": 0}
    classes = {"r": {"max_attempts": 2, "retry_backoff": backoff}}
    async with start(tmp_path, {"flaky": flaky}, classes=classes, durable=False) as infra:
        h = await infra.submit_task("flaky", [1, 2], task_class="r", task_id="mem")
        assert (await infra.submit_task("flaky", 0, task_class="r", task_id="mem")).task_id == "mem"
        assert await h.result() == [1, 2]
        status = await h.status()
        assert (status.state, status.attempts) == (TaskState.SUCCEEDED, 2)
    assert calls == {"mem": 2}
    assert not (tmp_path / "state" / "tasks.db").exists()
    async with start(tmp_path, {"flaky": flaky}, classes=classes, durable=False) as infra:
        with pytest.raises(UnknownTask):
            await infra.get_task_status("mem")


async def forgotten(infra: AgentInfra, task_id: str) -> None:
    """Wait until ``task_id`` is unknown (keep_finished looks every second at most)."""
    with anyio.fail_after(5):
        while True:
            try:
                await infra.get_task_status(task_id)
            except UnknownTask:
                return
            await anyio.sleep(0.01)


async def test_keep_finished_forgets_old_tasks_and_their_work_dirs(tmp_path: Path) -> None:
    gate = anyio.Event()

    async def wait_for_gate(payload: Any) -> Any:
        await gate.wait()
        return payload

    handlers: dict[str, Handler] = {"gated": wait_for_gate}
    classes = {"proc": {"runner": "process"}}
    tasks_dir = tmp_path / "state" / "tasks"
    infra_config = {"handlers": {"hello": {"command": [sys.executable, "-c", "print(1)"]}}}
    # Finished by an instance that keeps everything...
    async with AgentInfra.start(
        {"classes": classes, **infra_config}, state_dir=tmp_path / "state", handlers=handlers
    ) as infra:
        early = await infra.submit_task("hello", None, task_class="proc", task_id="early")
        assert await early.result() == 1
        assert (tasks_dir / "early").is_dir()
    await anyio.sleep(0.3)
    # ... forgotten by the next one, which keeps 0.2 s, as it starts.
    config = {"infra": {"keep_finished": 0.2}, "classes": classes, **infra_config}
    async with AgentInfra.start(config, state_dir=tmp_path / "state", handlers=handlers) as infra:
        await forgotten(infra, "early")
        assert not (tasks_dir / "early").exists()
        # And its own tasks once they are 0.2 s past their end; an unfinished one stays.
        late = await infra.submit_task("hello", None, task_class="proc", task_id="late")
        waiting = await infra.submit_task("gated", "still here", task_id="waiting")
        assert await late.result() == 1
        await forgotten(infra, "late")
        assert not (tasks_dir / "late").exists()
        await anyio.sleep(0.3)
        assert (await waiting.status()).state is TaskState.RUNNING
        gate.set()
        assert await waiting.result() == "still here"
    # What was forgotten stays so: an instance that keeps everything finds
    # the last task only.
    async with AgentInfra.start(
        {"classes": classes, **infra_config}, state_dir=tmp_path / "state", handlers=handlers
    ) as infra:
        assert (await infra.get_task_status("waiting")).state is TaskState.SUCCEEDED
        for task_id in ("early", "late"):
            with pytest.raises(UnknownTask):
                await infra.get_task_status(task_id)


async def test_keep_finished_without_a_store(tmp_path: Path) -> None:
    async def echo(payload: Any) -> Any:
        return payload

    async with start(tmp_path, {"echo": echo}, durable=False, keep_finished=0.1) as infra:
        handle = await infra.submit_task("echo", 1)
        assert await handle.result() == 1
        await forgotten(infra, handle.task_id)


# -- adaptive concurrency ---------------------------------------------------------------------


async def test_adaptive_limit_moves_within_its_bounds_under_load(tmp_path: Path) -> None:
    running = [0]
    peak = [0]
    limits: list[int] = []
    infra_box: list[AgentInfra] = []

    async def work(payload: Any) -> Any:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        limits.append((await infra_box[0].task_classes())["ad"].limit)
        try:
            await anyio.sleep(0.002)
            if payload["fail"]:
                raise RuntimeError("overloaded")
        finally:
            running[0] -= 1
        return None

    classes = {"ad": {"adaptive": True, "min_concurrency": 2, "max_concurrency": 7}}
    async with start(tmp_path, {"work": work}, classes=classes) as infra:
        infra_box.append(infra)
        initial = (await infra.task_classes())["ad"]
        assert initial.adaptive
        assert initial.limit == 4
        handles = await infra.submit_tasks(
            "work", [{"fail": False}] * 150, task_class="ad", max_attempts=1
        )
        for h in handles:
            await h.result()
        # Busy with steady latency, it grew (latency noise on a loaded machine may
        # have cost it a step back, so the peak is what is checked).
        grown = max(limits)
        failing = await infra.submit_tasks(
            "work", [{"fail": True}] * 100, task_class="ad", max_attempts=1
        )
        for h in failing:
            assert (await h.wait()).state is TaskState.FAILED
        shrunk = (await infra.task_classes())["ad"].limit
        limits.append(shrunk)
    assert grown > 4
    assert shrunk == 2  # a run of failures took it down to its minimum
    assert all(2 <= limit <= 7 for limit in limits)
    assert peak[0] <= 7
    assert peak[0] > 4  # the grown limit was used


async def test_an_adaptive_limit_is_filled_as_it_grows_and_grows_only_with_use(
    tmp_path: Path,
) -> None:
    # The sample of a finished attempt used to go in after the dispatch of its
    # class: a limit it raised stayed one below what ran until the next end,
    # and the tasks the dispatch had just started counted as load.
    gates = Gates()
    classes = {
        "ad": {"adaptive": True, "max_concurrency": 20},
        "bound": {"adaptive": True, "max_concurrency": 20, "cpus": 1},
    }
    async with start(
        tmp_path, {"gate": gates.handler, "echo": echo}, classes=classes, cpus=2
    ) as infra:
        keys = [f"k{i}" for i in range(10)]
        handles = await infra.submit_tasks("gate", [{"key": k} for k in keys], task_class="ad")
        await gates.wait_started(*keys[:4])
        assert (await infra.task_classes())["ad"].limit == 4
        gates.open("k0")
        await handles[0].result()
        # Busy, it grew by one, and the new slot is taken at once.
        assert (await infra.task_classes())["ad"].limit == 5
        await until(lambda: len(gates.running) == 5, limit=2)
        assert (await infra.task_classes())["ad"].running == 5
        gates.open(*keys)
        for h in handles:
            await h.result()

        # Two CPUs: at most two of these run at once, so the limit grows only
        # while two is at least half of it.
        bound = await infra.submit_tasks("echo", list(range(200)), task_class="bound")
        for h in bound:
            await h.result()
        assert 1 <= (await infra.task_classes())["bound"].limit <= 5


def _nested(depth: int) -> list[Any]:
    """A list nested ``depth`` deep: more than JSON's encoder recurses through."""
    outer: list[Any] = []
    inner = outer
    for _ in range(depth):
        inner.append([])
        inner = inner[0]
    return outer


async def test_results_and_payloads_too_deep_to_read_back_are_refused(tmp_path: Path) -> None:
    # A result (or payload) that JSON encoded in one stack could be too deep
    # to decode in another, deeper one: a caller's result(), wait() or
    # get_task_status() raised RecursionError, no InfraError, for a task that
    # succeeded (and a workflow step reading it stopped the instance). Every
    # depth up to past Python's limit, each from a task of its own, with as
    # shallow a stack as a script's.
    limit = sys.getrecursionlimit()
    depths = [MAX_JSON_DEPTH - 1, *range(limit - 300, limit + 10)]  # _nested(d): d + 1 deep
    results: dict[int, str] = {}
    payloads: dict[int, str] = {}

    async def deep(depth: int) -> Any:
        return _nested(depth)

    async def one(infra: AgentInfra, depth: int) -> None:
        handle = await infra.submit_task("deep", depth)
        status = await handle.wait()
        if status.state is TaskState.SUCCEEDED:
            assert status.result == _nested(depth)
            assert await handle.result() == _nested(depth)
        results[depth] = status.error or "succeeded"
        try:
            handle = await infra.submit_task("echo", _nested(depth))
        except InvalidTask as exc:
            payloads[depth] = str(exc).split(" refused: ", 1)[1]
        else:
            assert await handle.result() == _nested(depth)
            payloads[depth] = "succeeded"

    async with start(tmp_path, {"deep": deep, "echo": echo}) as infra:
        with anyio.fail_after(60):
            for depth in depths:
                async with anyio.create_task_group() as group:
                    group.start_soon(one, infra, depth)
        assert await (await infra.submit_task("echo", 1)).result() == 1  # still serving
    assert results.pop(depths[0]) == payloads.pop(depths[0]) == "succeeded"
    for depth, error in results.items():
        over = f"nested {depth + 1} levels deep, over the limit of {MAX_JSON_DEPTH}"
        assert error == f"its result is {over}" or error.startswith(
            "its result is not JSON-compatible (maximum recursion depth exceeded"
        ), error
        assert payloads[depth] == f"the payload is {over}" or payloads[depth].startswith(
            "the payload is not JSON-compatible (maximum recursion depth exceeded"
        ), payloads[depth]


async def test_a_stored_payload_too_deep_to_decode_fails_its_task_not_the_instance(
    tmp_path: Path,
) -> None:
    # Stored by a version that took payloads nested too deeply for Python to
    # decode: the worker decoding it raised RecursionError, which stopped the
    # instance (and every later one, the task recovered again each time).
    gates = Gates()
    classes = {"one": {"max_concurrency": 1}}
    handlers: dict[str, Handler] = {"gate": gates.handler, "echo": echo}
    async with start(tmp_path, handlers, classes=classes) as infra:
        await infra.submit_task("gate", {"key": "first"}, task_class="one")
        await gates.wait_started("first")
        await infra.submit_task("echo", 1, task_class="one", task_id="old")
    db = sqlite3.connect(tmp_path / "state" / "tasks.db")
    with db:
        deep = "[" * 5000 + "]" * 5000
        db.execute("UPDATE tasks SET payload = ? WHERE task_id = 'old'", (deep,))
    db.close()
    gates.open("first")
    async with start(tmp_path, handlers, classes=classes) as infra:
        await until_state(infra, "old", TaskState.FAILED)
        status = await infra.get_task_status("old")
        assert status.error == "its payload is nested too deeply to decode"
        assert await (await infra.submit_task("echo", 1, task_class="one")).result() == 1


async def test_a_handler_that_escapes_its_attempt_fails_alone(tmp_path: Path) -> None:
    # Each of these used to stop the whole instance (and, the attempt given
    # back, every instance after it): they fail their own task instead.
    async def stray_cancel(payload: Any) -> None:
        other = asyncio.ensure_future(asyncio.sleep(10))
        other.cancel()
        await other  # its CancelledError is not a cancel of this task

    def quits(payload: Any) -> None:
        sys.exit(3)

    async def too_deep(payload: Any) -> Any:
        return _nested(100_000)

    async def undecodable(payload: Any) -> None:
        # A file name read with surrogateescape: its text is no UTF-8.
        raise FileNotFoundError(b"/data/\xff.bin".decode(errors="surrogateescape"))

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text")

    async def unprintable(payload: Any) -> None:
        raise Unprintable

    handlers = {
        "stray": stray_cancel,
        "quits": quits,
        "deep": too_deep,
        "undecodable": undecodable,
        "unprintable": unprintable,
        "echo": echo,
    }
    async with start(tmp_path, handlers) as infra:
        for handler, error in [
            ("stray", "CancelledError"),
            ("quits", "it called sys.exit(3)"),
            ("deep", "its result is not JSON-compatible"),
            ("undecodable", "FileNotFoundError: /data/\\udcff.bin"),
            ("unprintable", "Unprintable: <str() of it raised RuntimeError>"),
        ]:
            status = await (await infra.submit_task(handler, None)).wait()
            assert status.state is TaskState.FAILED, handler
            assert status.error is not None
            assert error in status.error
        assert await (await infra.submit_task("echo", 1)).result() == 1  # still serving
    # Stored as they were told: a new instance reads them back.
    async with start(tmp_path, handlers) as infra:
        assert await (await infra.submit_task("echo", 2)).result() == 2


class _Abort(BaseException):
    """Not an Exception, as pytest's own outcomes (pytest.fail, pytest.skip) are not."""


async def test_a_handler_raising_a_base_exception_fails_its_task_alone(tmp_path: Path) -> None:
    # It used to stop the instance with the attempt given back, so that every
    # later instance on the state_dir ran it again and stopped too.
    async def aborts(payload: Any) -> None:
        raise _Abort("given up")

    def aborts_in_a_thread(payload: Any) -> None:
        raise _Abort("given up in a thread")

    handlers = {"aborts": aborts, "thread": aborts_in_a_thread, "echo": echo}
    async with start(tmp_path, handlers, classes={"cpu_short": {"max_attempts": 2}}) as infra:
        for handler, error in [
            ("aborts", "_Abort: given up"),
            ("thread", "_Abort: given up in a thread"),
        ]:
            status = await (await infra.submit_task(handler, None)).wait()
            assert status.state is TaskState.FAILED, handler
            assert status.attempts == 2  # each attempt failed, and was retried
            assert status.error == error
        assert await (await infra.submit_task("echo", 1)).result() == 1  # still serving
    async with start(tmp_path, handlers) as infra:  # nothing left to run again
        assert await (await infra.submit_task("echo", 2)).result() == 2


async def test_a_long_error_is_cut_at_16_kib_and_says_so(tmp_path: Path) -> None:
    async def verbose(payload: int) -> None:
        raise ValueError("x" * payload)

    async with start(tmp_path, {"verbose": verbose}) as infra:
        error = (await (await infra.submit_task("verbose", 20_000)).wait()).error
    # "ValueError: " and 20,000 x's: the first 16,384 characters are kept.
    kept = "ValueError: " + "x" * (16_384 - len("ValueError: "))
    assert error == f"{kept}... ({20_012 - 16_384} more characters cut)"


async def test_a_handler_name_that_utf8_cannot_encode_is_refused(tmp_path: Path) -> None:
    name = "echo-\udc80"
    async with start(tmp_path, {name: echo, "echo": echo}) as infra:
        with pytest.raises(InvalidTask, match="handler must be text that UTF-8 can encode"):
            await infra.submit_task(name, 1)
        assert await (await infra.submit_task("echo", 1)).result() == 1  # still serving


@dataclasses.dataclass
class _Scale:
    """A handler that is an object with a ``__call__``: a dataclass, so not hashable."""

    factor: int

    async def __call__(self, payload: int) -> int:
        return payload * self.factor


@dataclasses.dataclass
class _SyncScale:
    factor: int

    def __call__(self, payload: int, run: TaskRun) -> list[int]:
        return [payload * self.factor, run.attempt]


async def test_a_handler_may_be_a_callable_object_that_is_not_hashable(tmp_path: Path) -> None:
    # The runner cached how to call each handler in a dict keyed by the
    # handler: every attempt of an unhashable one failed with
    # "TypeError: unhashable type".
    handlers: dict[str, Handler] = {"scale": _Scale(2), "sync": _SyncScale(3)}
    infra = start(tmp_path, handlers)
    async with infra:
        assert await (await infra.submit_task("scale", 5)).result() == 10
        assert await (await infra.submit_task("sync", 5)).result() == [15, 1]
        # The same name registered again: the new handler, called its own way.
        infra.task("scale")(_SyncScale(4))
        assert await (await infra.submit_task("scale", 5)).result() == [20, 1]


async def test_a_plain_function_returning_a_coroutine_has_it_awaited(tmp_path: Path) -> None:
    # A decorator without functools.wraps (or a lambda) in front of an async
    # function is a plain function: it ran in a thread, and its coroutine,
    # never awaited, failed the task as "not JSON-compatible".
    finished: list[str] = []

    def traced(function: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def call(payload: Any) -> Any:
            return function(payload)

        return call

    @traced
    async def embed(text: str) -> int:
        await anyio.sleep(0.001)
        return len(text)

    @traced
    async def hang(_: Any) -> None:
        await anyio.sleep(30)
        finished.append("hang")

    handlers: dict[str, Handler] = {"embed": embed, "hang": hang}
    async with start(tmp_path, handlers) as infra:
        assert await (await infra.submit_task("embed", "four")).result() == 4
        # Awaited in the attempt's scope: a timeout reaches it.
        status = await (await infra.submit_task("hang", None, timeout=0.1)).wait()
        assert status.state is TaskState.TIMED_OUT
    assert finished == []


@pytest.mark.parametrize("gpus", [[], [0]])
async def test_a_command_sent_to_an_in_process_class_is_told_the_classes_that_fit(
    tmp_path: Path, gpus: list[int]
) -> None:
    # The refusal names the classes whose runner takes the command and whose
    # tasks fit this machine: the gpu class only where it has a GPU.
    config = {
        "infra": {"gpus": gpus},
        "handlers": {"hello": {"command": [sys.executable, "-c", "print(1)"]}},
    }
    async with AgentInfra.start(config, state_dir=tmp_path / "state") as infra:
        with pytest.raises(InvalidTask, match="no in-process handler 'hello'") as caught:
            await infra.submit_task("hello", None)
    offered = re.search(r"; class(?:es)? ('.+') can run it$", str(caught.value))
    assert offered is not None, caught.value
    named = re.findall(r"'(\w+)'", offered[1])
    assert named[0] == "cpu_long"
    assert ("gpu" in named) is bool(gpus), named
    assert set(named) <= {"cpu_long", "gpu", "gpu_slurm"}, named


async def test_unusable_ids_and_payloads_are_refused_with_invalid_task(tmp_path: Path) -> None:
    async with start(tmp_path, {"echo": echo}) as infra:
        with pytest.raises(InvalidTask, match="task_id must be a non-empty string"):
            await infra.submit_task("echo", 1, task_id=["not", "hashable"])  # type: ignore[arg-type]
        with pytest.raises(InvalidTask, match="not JSON-compatible"):
            await infra.submit_task("echo", _nested(100_000))
        assert (await infra.task_classes())["cpu_short"].queued == 0


async def test_following_some_tasks_drops_no_event_of_the_others(tmp_path: Path) -> None:
    gates = Gates()
    async with start(tmp_path, {"gate": gates.handler, "echo": echo}) as infra:
        followed = await infra.submit_task("gate", {"key": "followed"})
        async with aclosing(infra.stream_task_results([followed.task_id])) as results:
            # Others finish meanwhile: not this stream's, they must not fill its buffer.
            for h in await infra.submit_tasks("echo", range(300)):
                await h.result()
            gates.open("followed")
            assert [e.task_id async for e in results] == [followed.task_id]
        assert (await infra.get_metrics())["dspy_infra_events_dropped_total"] == 0
    assert gates.finished == ["followed"]


async def test_a_stream_of_every_result_that_falls_behind_misses_none(tmp_path: Path) -> None:
    # A buffer of 4 final events: a slow reader of 60 results falls behind,
    # and gets the rest from the instance's history, each once, in order.
    async with start(tmp_path, {"echo": echo}, event_buffer=4) as infra:
        seen: list[TaskEvent] = []

        async def read() -> None:
            async with aclosing(infra.stream_task_results()) as results:
                async for event in results:
                    seen.append(event)
                    await anyio.sleep(0.005)
                    if len(seen) == 60:
                        return

        async with anyio.create_task_group() as group:
            group.start_soon(read)
            await anyio.sleep(0.01)
            handles = await infra.submit_tasks("echo", range(60))
        assert (await infra.get_metrics())["dspy_infra_events_dropped_total"] > 0
    assert [e.task_id for e in seen] == [h.task_id for h in handles]
    assert [e.seq for e in seen] == sorted({e.seq for e in seen})


async def test_a_result_both_buffered_and_replayed_after_a_drop_comes_once(
    tmp_path: Path,
) -> None:
    # A buffer of 2: t3 is dropped, and t4 is buffered after it. The drop
    # notice is met at t4: the history gives t3 and t4, and the buffered t4
    # that follows is the same event, skipped.
    async with start(tmp_path, {"echo": echo}, event_buffer=2) as infra:
        seen: list[TaskEvent] = []

        async def finish(*task_ids: str) -> None:
            for task_id in task_ids:
                await (await infra.submit_task("echo", 0, task_id=task_id)).result()

        with anyio.fail_after(5):
            async with aclosing(infra.stream_task_results()) as results:
                async with anyio.create_task_group() as group:
                    group.start_soon(lambda: finish("t0"))
                    seen.append(await anext(results))  # subscribed, then t0
                await finish("t1", "t2", "t3")  # t1, t2 buffered; t3 dropped
                seen.append(await anext(results))  # t1
                await finish("t4")  # buffered after the gap
                # t2; then the notice: t3, t4 from the history.
                seen.extend([await anext(results) for _ in range(3)])
                await finish("t5")
                seen.append(await anext(results))
    assert [e.task_id for e in seen] == [f"t{i}" for i in range(6)]
    assert [e.seq for e in seen] == sorted({e.seq for e in seen})


async def test_each_drop_notice_of_a_slow_event_stream_comes_where_its_events_were(
    tmp_path: Path,
) -> None:
    # A buffer of 2. The reader falls behind: t3 is dropped; it reads one, so
    # t4 finds room, and t5 is dropped after it. Each notice comes where its
    # events were: t3's between t2 and t4, t5's after t4. One notice for both,
    # before t4, put t5's drop among what came before it, and said nothing
    # where t5 was missing.
    async with start(tmp_path, {"echo": echo}, event_buffer=2) as infra:
        received: list[str] = []

        def seen(event: Any) -> None:
            count = getattr(event, "count", None)
            received.append(f"dropped {count}" if count is not None else str(event.task_id))

        async def finish(*task_ids: str) -> None:
            for task_id in task_ids:
                await (await infra.submit_task("echo", 0, task_id=task_id)).result()

        with anyio.fail_after(5):
            async with aclosing(infra.stream_events("task_completed")) as events:
                async with anyio.create_task_group() as group:
                    group.start_soon(lambda: finish("t0"))
                    seen(await anext(events))  # subscribed, then t0
                await finish("t1", "t2", "t3")  # t1, t2 buffered; t3 dropped
                seen(await anext(events))  # t1
                await finish("t4", "t5")  # t4 buffered; t5 dropped
                for _ in range(3):
                    seen(await anext(events))
                await finish("t6")
                seen(await anext(events))
                if received[-1] != "t6":
                    seen(await anext(events))
    assert received == ["t0", "t1", "t2", "dropped 1", "t4", "dropped 1", "t6"]


@pytest.mark.parametrize(("history", "expected"), [(8, [0, 1, 2, *range(32, 40)]), (0, [0, 1, 2])])
async def test_a_stream_of_every_result_further_behind_than_the_history_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, history: int, expected: list[int]
) -> None:
    # The reader stops at its first result until all 40 have finished. It
    # gets that one, the two its buffer held, then what the history kept;
    # the rest are missed, and a warning says so.
    async with start(tmp_path, {"echo": echo}, event_buffer=2, event_history=history) as infra:
        seen: list[str] = []
        finished = anyio.Event()

        async def read() -> None:
            async with aclosing(infra.stream_task_results()) as results:
                async for event in results:
                    seen.append(event.task_id)
                    await finished.wait()

        with anyio.fail_after(5):
            async with anyio.create_task_group() as group:
                group.start_soon(read)
                await anyio.sleep(0.01)
                handles = await infra.submit_tasks("echo", range(40))
                for handle in handles:
                    await handle.result()
                finished.set()
                await anyio.sleep(0.05)  # what the reader still gets
                group.cancel_scope.cancel()
    order = [h.task_id for h in handles]
    assert [order.index(task_id) for task_id in seen] == expected
    assert "fell more than event_history events behind" in caplog.text


async def test_seqs_go_on_increasing_across_instances_so_a_stream_resumes_in_the_next(
    tmp_path: Path,
) -> None:
    # A reader kept the seq of the last result it read from the first
    # instance; the second has published more events than that by the time
    # the reader comes back: it still gets every result of the second.
    async with (
        start(tmp_path, {"echo": echo}) as infra,
        aclosing(infra.stream_task_results()) as results,
    ):
        await infra.submit_task("echo", 0)
        kept = (await anext(results)).seq
    async with start(tmp_path, {"echo": echo}) as infra:
        handles = await infra.submit_tasks("echo", range(1, 30))
        for handle in handles:
            await handle.result()
        seen: list[TaskEvent] = []
        with anyio.move_on_after(0.5):
            async with aclosing(infra.stream_task_results(since=kept)) as results:
                async for event in results:
                    seen.append(event)  # noqa: PERF401 - read until the time is up
    assert [e.task_id for e in seen] == [h.task_id for h in handles]
    assert all(e.seq > kept for e in seen)


async def test_a_stream_of_every_result_since_a_seq_of_an_earlier_instance_gets_all(
    tmp_path: Path,
) -> None:
    # Seqs begin at 1 in each instance: a reader resuming with a seq of the
    # last one (above this one's) is given the results that come.
    async with start(tmp_path, {"echo": echo}) as infra:
        seen: list[str] = []

        async def read() -> None:
            async with aclosing(infra.stream_task_results(since=1000)) as results:
                async for event in results:
                    seen.append(event.task_id)
                    if len(seen) == 3:
                        return

        with anyio.fail_after(5):
            async with anyio.create_task_group() as group:
                group.start_soon(read)
                await anyio.sleep(0.01)
                handles = await infra.submit_tasks("echo", range(3))
    assert seen == [h.task_id for h in handles]


async def test_a_task_id_with_a_line_break_is_refused(tmp_path: Path) -> None:
    async with start(tmp_path, {"echo": echo}) as infra:
        with pytest.raises(InvalidTask, match="may only hold"):
            await infra.submit_task("echo", 1, task_id="job-1\n")


async def test_a_handle_used_after_its_instance_closed_is_told_so(tmp_path: Path) -> None:
    # A task of an earlier instance, held by no memory of this one: its
    # status is read from the store, which is closed with the instance.
    async with start(tmp_path, {"echo": echo}) as infra:
        await (await infra.submit_task("echo", 1, task_id="earlier")).result()
    async with start(tmp_path, {"echo": echo}) as infra:
        handle = await infra.submit_task("echo", 1, task_id="earlier")
    with pytest.raises(InfraClosed, match="the task store is closed"):
        await handle.status()


async def test_a_task_queued_event_counts_no_attempt_yet(tmp_path: Path) -> None:
    # A lone task into an idle class is stored started (one commit, not two):
    # its task_queued event still says that no attempt had started, as a
    # task queued behind others does.
    gate = anyio.Event()

    async def held(payload: Any) -> None:
        await gate.wait()

    seen: list[TaskEvent] = []
    async with (
        start(tmp_path, {"held": held}, classes={"one": {"max_concurrency": 1}}) as infra,
        aclosing(infra.stream_events({"task_queued", "task_started"})) as events,
    ):

        async def follow() -> None:
            async for event in events:
                assert isinstance(event, TaskEvent)
                seen.append(event)

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            # Until the stream follows: a task of another class, seen started
            # (its task_queued event comes first: cleared then, its
            # task_started would be taken for one of the tasks below).
            probe = await infra.submit_task("held")
            await until(
                lambda: any(e.task_id == probe.task_id and e.type == "task_started" for e in seen)
            )
            seen.clear()
            alone = await infra.submit_task("held", task_class="one")
            behind = await infra.submit_task("held", task_class="one")
            await until(lambda: len(seen) == 3)
            gate.set()
            tg.cancel_scope.cancel()
    assert [(e.type, e.task_id, e.attempt) for e in seen] == [
        ("task_queued", alone.task_id, 0),
        ("task_started", alone.task_id, 1),
        ("task_queued", behind.task_id, 0),
    ]


async def test_an_attempt_that_waits_does_not_hold_up_the_end_of_one_before_it(
    tmp_path: Path,
) -> None:
    # Handed over together, both go to one worker, the quick one first; the
    # ends of attempts are taken together after the step that ended them,
    # which the slow one's first await must end.
    release = anyio.Event()

    async def work(payload: str) -> str:
        if payload == "slow":
            await release.wait()
        return payload

    async with start(tmp_path, {"work": work}) as infra:
        quick, slow = await infra.submit_tasks("work", ["quick", "slow"])
        with anyio.fail_after(5):
            assert await quick.result() == "quick"
        assert (await infra.get_task_status(slow.task_id)).state is TaskState.RUNNING
        release.set()
        assert await slow.result() == "slow"


async def test_a_bug_where_attempts_ends_are_taken_stops_the_instance_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Taken in a callback of the event loop's, not in a task: a bug there
    # must stop the instance as one in a worker did, not be logged and lost.
    def bug(self: ConcurrencyLimit, **_: object) -> None:
        raise RuntimeError("a bug in the limit's sample")

    monkeypatch.setattr(ConcurrencyLimit, "on_sample", bug)
    adaptive = {"adaptive": {"runner": "inprocess", "adaptive": True, "max_concurrency": 4}}
    with pytest.raises(ExceptionGroup) as stopped:  # noqa: PT012
        async with start(tmp_path, {"echo": echo}, classes=adaptive) as infra:
            await infra.submit_task("echo", 1, task_class="adaptive")
            with anyio.fail_after(5):
                await anyio.sleep_forever()
    assert stopped.group_contains(RuntimeError, match="a bug in the limit's sample")
