"""The local durable scheduler: the default :class:`~dspy_infra.abc.Scheduler`.

A task lives in memory while it is unfinished (a :class:`TaskRecord`) and in
the store always. Every transition that must survive a crash is committed
before the scheduler acts on it: a submit returns after its insert commits,
an attempt starts after its ``running`` row (with the attempt counted)
commits, and waiters see a final state after it commits. Commits are
batched by the :class:`~dspy_infra.scheduling.store.Journal`.

One dispatcher decides what runs: per class, the best queued task (priority,
aging, FIFO) that fits the free resources, while the class is under its
concurrency limit. It runs whenever something changed (a submit, a finished
attempt, a service that became healthy), never on a timer. Delayed retries and
queue timeouts sit on one timer heap.

Attempts run in a task group of their own, so that closing the scheduler can
interrupt them first (an interrupted attempt is not counted: the task is
queued again for the next start), then commit what is left, then stop.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import math
import os
import shutil
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Iterable, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, cast

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from dspy_infra.abc import Runner, RunnerContext, TaskRun
from dspy_infra.config.model import Config, TaskClass, docker_memory_error
from dspy_infra.errors import (
    BackendUnavailable,
    ConfigError,
    InfraClosed,
    InvalidTask,
    ServiceStartError,
    UnknownTask,
)
from dspy_infra.events import EventBus, EventsDropped, ServiceEvent
from dspy_infra.metrics import ClassMetrics, Metrics
from dspy_infra.runners import load_runner
from dspy_infra.scheduling.adaptive import ConcurrencyLimit
from dspy_infra.scheduling.checks import (
    check_ids,
    check_template,
    encode_json,
    json_too_deep,
    max_attempts_error,
    priority_error,
    refused,
    resources_error,
    shape_error,
    timeout_error,
    too_deep_error,
    workflow_id_error,
)
from dspy_infra.scheduling.gpus import GpuInventory, detect_gpus
from dspy_infra.scheduling.queues import ClassQueue, ResourcePool
from dspy_infra.scheduling.records import Need, TaskRecord
from dspy_infra.scheduling.store import (
    Journal,
    MemoryStore,
    Op,
    OpKind,
    SQLiteStore,
    Store,
    loads,
)
from dspy_infra.scheduling.tasks import (
    ClassStatus,
    TaskEvent,
    TaskRequest,
    TaskState,
    TaskStatus,
)
from dspy_infra.services.manager import ServiceManager
from dspy_infra.services.status import ServiceState

__all__ = ["LocalScheduler"]

log = logging.getLogger("dspy_infra.scheduling")

# Runners whose tasks use another machine's resources, not this one's.
_REMOTE_RUNNERS = frozenset({"slurm"})
# Finished tasks kept in memory for status queries and late waiters; older
# ones are read back from the store.
_RECENT = 10_000
# keep_finished: forgotten this many at a time (one commit each), checked
# every keep / 10 seconds, within these bounds.
_FORGET_BATCH = 1000
_FORGET_EVERY = (1.0, 600.0)  # at least, at most
_RUNS_PER_CHECKPOINT = 8
# Distinct request shapes whose checks are remembered (see _record).
_CHECKED = 256
# A submit by payload sends its inserts ahead to the writer this many at a time
# (see submit_payloads): a frame of about 26 KB for small payloads, which a
# pipe (64 KiB) takes at once.
_AHEAD = 512
_SERVICE_READY_EVENTS = frozenset({"service_started", "service_healthy", "service_completed"})
_SERVICE_DOWN_EVENTS = frozenset({"service_failed"})


class _Class:
    __slots__ = (
        "committing",
        "config",
        "ending",
        "idle",
        "limit",
        "local",
        "metrics",
        "name",
        "queue",
        "ready",
        "reserves",
        "runner",
        "running",
        "unavailable",
        "waking",
        "workers",
    )

    def __init__(self, name: str, config: TaskClass, metrics: ClassMetrics):
        self.name = name
        self.metrics = metrics
        self.config = config
        self.queue = ClassQueue(config.aging)
        self.limit = ConcurrencyLimit(
            minimum=config.min_concurrency, maximum=config.max_concurrency, adaptive=config.adaptive
        )
        self.local = config.runner not in _REMOTE_RUNNERS
        # Whether its first task in line may be reserved for (see LocalScheduler._fits).
        reserve_after = config.reserve_after
        self.reserves = self.local and reserve_after is not None and reserve_after < math.inf
        self.running = 0
        self.committing = 0  # submitted, not yet queued: their insert is being committed
        self.ending = 0  # attempts over, their ends not yet taken (LocalScheduler._end)
        self.runner: Runner | None = None
        self.unavailable: str | None = None
        # Attempts whose start is stored wait here for a worker. Workers
        # are long-lived and take the next one as soon as they are free, with
        # no trip through the event loop while there is work; an idle one
        # waits on its own event (in ``idle``). One idle worker at a time is
        # woken (``waking``); it wakes the next only if work is left once it
        # has taken its own. Attempts that never wait (no-op handlers) are
        # then run back to back by one worker instead of one wake-up each,
        # and attempts that do wait still get a worker each, one step apart.
        # Spawning a task per attempt costs several times more.
        self.ready: deque[TaskRecord] = deque()
        self.idle: list[asyncio.Event] = []
        self.waking = False
        self.workers = 0


# What keep_finished forgets: (find, op kind, forgetting); see forget_also.
_Forgettable = tuple[
    Callable[[float, int], list[str]], OpKind, Callable[[list[str]], Awaitable[None]]
]

# A request's checked values: its class, priority, needs, max_attempts, timeout, need.
_Checked = tuple[_Class, int, tuple[str, ...], int, float | None, Need]

# How an attempt ended: (state, result as JSON text, error).
_Outcome = tuple[TaskState, str | None, str | None]

# (when, monotonic; a tie-break; a retry's backoff is over or a queue_timeout is; the task)
_Timer = tuple[float, int, Literal["retry", "expire"], TaskRecord]
# Stale timers tolerated beyond the bound of _add_timer before a sweep.
_STALE_TIMERS = 1024


def _pending(timer: _Timer) -> bool:
    """Whether the timer still concerns its task: not stale (see _add_timer)."""
    when, _, kind, record = timer
    if kind == "retry":  # its backoff, unless it was cancelled meanwhile
        return record.state is TaskState.QUEUED and record.not_before is not None
    # Its first start, unless it started (which clears the deadline) or ended meanwhile.
    return record.deadline == when and record.attempts == 0 and not record.state.finished


# Error messages are stored with the task: long enough for a traceback's
# last lines, short enough that a handler raising a huge message cannot bloat
# the store.
_MAX_ERROR = 16_384


def _class_need(config: TaskClass) -> Need:
    """What a task of the class needs unless it asks for its own resources."""
    return (config.cpus, config.memory_mb, config.gpus)


def _describe(exc: BaseException) -> str:
    """The error text stored for a failed attempt: it must never fail to be made or stored.

    A handler's exception is the handler's to write: its ``__str__`` may
    raise, and its text may hold what UTF-8 cannot encode (a lone surrogate,
    from bytes decoded with ``surrogateescape``), which SQLite refuses; either
    used to fail the store, and with it the instance, on every restart.
    """
    if isinstance(exc, SystemExit):  # a sync handler's sys.exit()
        text = f"it called sys.exit({exc.code!r})"
    else:
        try:
            text = str(exc)
        except Exception as error:  # noqa: BLE001 - the task's own failure to describe itself
            text = f"<str() of it raised {type(error).__name__}>"
        if not (isinstance(exc, Exception) and type(exc).__module__.startswith("dspy_infra")):
            text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > _MAX_ERROR:
        text = f"{text[:_MAX_ERROR]}... ({len(text) - _MAX_ERROR} more characters cut)"
    return text


class LocalScheduler:
    """Stores tasks in SQLite under the state dir and runs them with the configured runners."""

    def __init__(
        self,
        config: Config,
        *,
        bus: EventBus,
        services: ServiceManager,
        handlers: Mapping[str, Callable[..., Any]],
        instance_id: str,
        metrics: Metrics,
    ):
        self.config = config
        self._metrics = metrics
        self._settings = config.infra
        self._bus = bus
        self._services = services
        self._handlers = handlers
        self._instance_id = instance_id
        self._state_dir = config.infra.state_dir
        self._tasks_dir = self._state_dir / "tasks"
        store: Store = (
            SQLiteStore(self._state_dir / "tasks.db", synchronous=config.infra.synchronous)
            if config.infra.durable
            else MemoryStore()
        )
        self._store = store
        self._journal = Journal(store, threaded=config.infra.durable)
        self._classes = {
            name: _Class(name, cls, metrics.task_class(name))
            for name, cls in config.classes.items()
        }
        self._live: dict[str, TaskRecord] = {}
        self._checked: dict[tuple[Any, ...], _Checked] = {}
        self._recent: OrderedDict[str, TaskRecord] = OrderedDict()
        self._waiting: set[TaskRecord] = set()
        self._timers: list[_Timer] = []
        self._timer_seq = itertools.count()
        self._seq = itertools.count(1)
        # With aging a task ranks by its submit time: one read from a wall clock
        # stepped back (NTP, a resumed VM) put a later task ahead of earlier
        # equals. Submit times never go back, in this instance or from the last.
        self._latest_submit = 0.0
        self._starting_services: set[str] = set()
        self._pool = ResourcePool(cpus=1, memory_mb=1, gpus=())
        # Backfill reservations (reserve_after): the task holding the one
        # reservation, and each class's first in line found not fitting.
        self._reserved_for: TaskRecord | None = None
        self._blocked_heads: dict[str, TaskRecord] = {}
        self._next_due = math.inf  # monotonic: when the first of them is due
        self.gpu_source = "none"
        self._timer_wake: anyio.Event | None = None
        # What keep_finished forgets: see forget_also.
        self._forgettable: list[_Forgettable] = [
            (store.finished_before, "forget", self._forgetting_tasks)
        ]
        # Recovered tasks not to run again: see cancel_on_recovery.
        self._not_to_recover: list[Callable[[list[str]], dict[str, str]]] = []
        # Attempts over whose ends are taken together after the current step
        # (see _end): (class, record, latency, inflight, outcome).
        self._ending: list[tuple[_Class, TaskRecord, float, int, _Outcome]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stack: AsyncExitStack | None = None
        self._tg: TaskGroup | None = None
        self._runs: TaskGroup | None = None
        self._open = False

    # -- lifecycle ------------------------------------------------------------

    async def __aenter__(self) -> Self:
        async with AsyncExitStack() as stack:
            inventory = await detect_gpus(
                self._settings.gpus, config_source=self.config.source_of("infra.gpus")
            )
            self._services.gpu_ids = self._set_apart_for_services(inventory)
            self._pool = await self._resource_pool(inventory, self._services.gpu_ids)
            self.gpu_source = inventory.source
            self._watch_metrics()
            rows = await anyio.to_thread.run_sync(self._store.open)
            stack.push_async_callback(self._close_store)
            await self._open_runners(stack)
            self._timer_wake = anyio.Event()
            self._loop = asyncio.get_running_loop()
            # Unwound in reverse: stop dispatching, interrupt the attempts,
            # queue again those never picked up, stop the timers, and only
            # then let the journal's writer commit what is left and end.
            writer = await stack.enter_async_context(anyio.create_task_group())
            writer.start_soon(self._journal.run)
            stack.callback(self._journal.close)
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(self._tg.cancel_scope.cancel)
            await self._recover(rows)
            self._tg.start_soon(self._timer_loop)
            if self._settings.keep_finished is not None:
                self._tg.start_soon(self._forget_loop, self._settings.keep_finished)
            await self._tg.start(self._watch_services)
            stack.callback(self._release_waiters)
            stack.callback(self._requeue_unclaimed)
            stack.callback(self._end_attempts)  # those the last steps of the attempts ended
            self._runs = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(self._runs.cancel_scope.cancel)
            stack.callback(self._close_gate)
            self._open = True
            self._kick()
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.__aexit__(et, e, tb)

    async def _close_store(self) -> None:
        # Closing SQLite's last connection checkpoints the WAL into the
        # database file: file I/O, so off the loop, and done even when the
        # instance is closing because it was cancelled.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._store.close)

    def _watch_metrics(self) -> None:
        m = self._metrics
        for name, cls in self._classes.items():
            m.read(m.task_queue_depth, functools.partial(self._queue_depth, cls), name)
            m.read(m.class_concurrency_limit, functools.partial(_current_limit, cls), name)
        m.read(m.gpus_total, lambda: len(self._pool.gpus))
        m.read(m.gpus_in_use, lambda: self.gpus_in_use)

    def _queue_depth(self, cls: _Class) -> int:
        # Closed, its queue is the store's again (the next instance's to run),
        # though the records stay behind for late status calls.
        return len(cls.queue) if self._open else 0

    def _close_gate(self) -> None:
        self._open = False

    def _release_waiters(self) -> None:
        """Those waiting for a task that will not finish in this instance stop waiting."""
        for record in self._live.values():
            if record.waiters is not None:
                record.waiters.set()

    def _requeue_unclaimed(self) -> None:
        for cls in self._classes.values():
            while cls.ready:
                self._interrupted(cls, cls.ready.popleft())

    def _set_apart_for_services(self, inventory: GpuInventory) -> dict[str, tuple[str, ...]]:
        """The devices of the services with ``gpus``, by service: the last
        ones; tasks lease the rest.

        Docker, asked for a count, picks the first devices, which the pool
        leases first; a local process sees every device: a service and a
        task would share GPU 0 unknowingly. Set apart for the instance's
        life, a service's devices are the same at each of its starts. Where
        there are no GPUs to lease, nothing can clash, and a remote engine's
        are not these: a service asks Docker for a count, as Compose does.
        """
        # Optional in the protocol (abc.ContainerBackend): a backend that does
        # not say runs its services elsewhere, as a remote engine does.
        if getattr(self._services.backend, "on_this_machine", False) is not True:
            return {}
        wanted = {name: svc.gpus for name, svc in self.config.services.items() if svc.gpus}
        total = sum(wanted.values())
        if not total or not inventory.ids:
            return {}
        if total > len(inventory.ids):
            asked = ", ".join(f"{name}: {n}" for name, n in wanted.items())
            path = f"services.{next(reversed(wanted))}.gpus"
            raise ConfigError(
                f"the services ask for {total} GPUs ({asked}); the instance has "
                f"{len(inventory.ids)} ({', '.join(inventory.ids)}), which tasks and "
                "services share: lower their gpus, or set infra.gpus",
                source=self.config.source_of(path),
                path=path,
            )
        at = len(inventory.ids) - total
        set_apart = {}
        for name, n in wanted.items():
            set_apart[name] = inventory.ids[at : at + n]
            at += n
        return set_apart

    async def _resource_pool(
        self, inventory: GpuInventory, set_apart: Mapping[str, tuple[str, ...]]
    ) -> ResourcePool:
        cpus = self._settings.cpus or float(os.cpu_count() or 1)
        memory_mb = self._settings.memory_mb
        if memory_mb is None:
            memory_mb = await anyio.to_thread.run_sync(_total_memory_mb)
        held = sum(len(ids) for ids in set_apart.values())
        return ResourcePool(
            cpus=cpus,
            memory_mb=memory_mb,
            gpus=inventory.ids[: len(inventory.ids) - held],
            held_by_services=held,
        )

    async def _open_runners(self, stack: AsyncExitStack) -> None:
        """Open each class's runner; a class whose runner cannot work refuses tasks."""
        context = RunnerContext(
            config=self.config,
            state_dir=self._state_dir,
            instance_id=self._instance_id,
            project=self._settings.project,
            handlers=self._handlers,
        )
        opened: dict[str, Runner | str] = {}
        for cls in self._classes.values():
            name = cls.config.runner
            if name not in opened:
                try:
                    runner = load_runner(name)
                    swept = await runner.open(context)
                except BackendUnavailable as exc:
                    opened[name] = str(exc)
                else:
                    stack.push_async_callback(runner.close)
                    for leftover in swept:
                        log.warning("removed a leftover of a crashed instance: %s", leftover)
                    opened[name] = runner
            found = opened[name]
            if isinstance(found, str):
                cls.unavailable = found
            else:
                cls.runner = found

    async def _recover(self, rows: list[tuple[Any, ...]]) -> None:
        """Queue what was queued; re-run what was running if it has an attempt left."""
        lost: list[TaskRecord] = []
        waiting: Counter[str] = Counter()  # of classes whose runner is unavailable
        recovered = await self._cancel_unwanted(rows)
        for row in recovered:
            record = TaskRecord.from_row(row, next(self._seq))
            self._latest_submit = max(self._latest_submit, record.submitted_at)
            cls = self._classes.get(record.task_class)
            if cls is None:
                record.error = f"its class {record.task_class!r} is no longer configured"
                lost.append(record)
                continue
            if unknown := [n for n in record.needs if n not in self.config.services]:
                # Its dispatch would look the service up and fail the instance's
                # start, and every later one on this state_dir: it can never run.
                names = ", ".join(repr(n) for n in unknown)
                record.error = f"it needs services no longer configured: {names}"
                lost.append(record)
                continue
            if cls.local and (problem := self._pool.capacity_error(record.need)):
                # Submitted to an instance with more: it would wait for ever.
                record.error = f"it can never run here: it {problem}"
                lost.append(record)
                continue
            if record.state is TaskState.RUNNING:
                if record.attempts >= record.max_attempts:
                    record.error = (
                        f"it was running when its instance stopped, after {record.attempts} "
                        f"of {record.max_attempts} attempts"
                    )
                    lost.append(record)
                    continue
                record.state = TaskState.QUEUED
            self._live[record.task_id] = record
            if record.not_before is not None and record.not_before > time.time():
                self._delay(record, record.not_before - time.time())
            else:
                record.not_before = None
                self._queued(record) if record.attempts == 0 else self._enqueue(record)
            if cls.runner is None and not record.state.finished:  # not timed out at once
                waiting[cls.name] += 1
        for record in lost:
            self._live[record.task_id] = record
            self._finish(record, TaskState.LOST, None, record.error)
        if rows:
            log.info("recovered %d unfinished tasks (%d lost)", len(rows), len(lost))
        for name, count in waiting.items():
            log.warning(
                "%d recovered tasks of class %r wait for an instance that can run them: %s",
                count,
                name,
                self._classes[name].unavailable,
            )

    async def _cancel_unwanted(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Cancel the recovered tasks that cancel_on_recovery names; the rows of the others."""
        unwanted: dict[str, str] = {}
        if rows and self._not_to_recover:
            ids = [row[0] for row in rows]  # task_id is the first column
            for find in self._not_to_recover:
                unwanted.update(await self._journal.read(find, ids))
        if not unwanted:
            return rows
        for row in rows:
            if (reason := unwanted.get(row[0])) is not None:
                record = TaskRecord.from_row(row, next(self._seq))
                self._live[record.task_id] = record
                self._finish(record, TaskState.CANCELLED, None, reason)
        return [row for row in rows if row[0] not in unwanted]

    def _check_open(self) -> None:
        if not self._open:
            raise InfraClosed("the scheduler is not running: use it inside `async with AgentInfra`")

    # -- the Scheduler protocol -----------------------------------------------

    async def submit(self, request: TaskRequest) -> str:
        (task_id,) = await self.submit_many([request])
        return task_id

    async def submit_many(
        self, requests: Iterable[TaskRequest], *, lookup: bool = True
    ) -> list[str]:
        """Submit all or none: each is checked before any is stored; one commit for all.

        ``lookup=False``: the caller knows that none of the ids it gives can be
        stored by an earlier instance (the workflow engine, for the tasks of a
        run whose id it has just made), which spares the store look-up.
        """
        self._check_open()
        requests = list(requests)
        check_ids(requests)  # first: an id must be valid before it is looked up
        # Ids given by the caller may be stored already, by an earlier
        # instance: one look in the store for all of them.
        unknown = (
            {
                r.task_id
                for r in requests
                if isinstance(r.task_id, str)
                and r.task_id not in self._live
                and r.task_id not in self._recent
            }
            if lookup
            else None
        )
        stored = await self._journal.read(self._store.stored, unknown) if unknown else set()
        task_ids: list[str] = []
        fresh: dict[str, TaskRecord] = {}
        for request in requests:
            task_id = request.task_id
            if task_id is None or not (
                task_id in self._live
                or task_id in self._recent
                or task_id in fresh  # the same id twice in one call: stored once
                or task_id in stored
            ):
                task_id = task_id or _new_task_id()
                checked = self._checks(task_id, request)
                record = self._record(task_id, request, checked, request.payload)
                fresh[task_id] = record
            task_ids.append(task_id)
        # Claimed only now, so that an invalid request leaves nothing behind;
        # one that a concurrent call claimed meanwhile is that call's.
        await self._store_new([r for r in fresh.values() if r.task_id not in self._live])
        for task_id in task_ids:  # those submitted by a concurrent call: wait for their commit
            other = self._live.get(task_id)
            if other is not None and other.committed is not None:
                await other.committed.wait()
        return task_ids

    async def submit_payloads(self, template: TaskRequest, payloads: Iterable[Any]) -> list[str]:
        """One task per payload, each as ``template`` says but for its payload, with
        an id of its own; all or none, in one commit. ``template`` is checked
        once, not once per payload (``submit_tasks``: a loop's thousands)."""
        self._check_open()
        check_template(template)
        records = []
        checked: _Checked | None = None
        sent = 0  # how many of the records' inserts went ahead to the writer
        try:
            for payload in payloads:
                task_id = _new_task_id()
                checked = checked or self._checks(task_id, template)
                records.append(self._record(task_id, template, checked, payload))
                # Thousands of them: the writer stores the first while the
                # rest are made (Journal.write_ahead), in the one commit; if
                # they cannot go now, asked again _AHEAD payloads later.
                if (len(records) - sent) % _AHEAD == 0 and self._journal.can_write_ahead():
                    self._journal.write_ahead(
                        [TaskRecord.insert_all(records[sent:])], len(records) - sent
                    )
                    sent = len(records)
        except BaseException:
            self._journal.retract()
            raise
        await self._store_new(records, sent, shaped=True)
        return [record.task_id for record in records]

    async def _store_new(
        self, records: list[TaskRecord], sent: int = 0, *, shaped: bool = False
    ) -> None:
        """Commit the new records' inserts (but those of the first ``sent``, written
        ahead already); ``shaped``: they share a shape (TaskRecord.insert_all).
        Once committed, they are queued."""
        # A lone task that its class can start at once is stored started (its
        # first attempt counted): one commit between submit and start, not two.
        early = records[0] if len(records) == 1 and self._startable(records[0]) else None
        if early is not None:
            self._claim(self._classes[early.task_class], early)
        if records:
            rest = records[sent:]
            inserts: list[Op]
            if early is not None or not shaped:
                inserts = [("insert", record.row()) for record in rest]
            else:
                inserts = [TaskRecord.insert_all(rest)] if rest else []
            written = self._journal.write_all(inserts, rows=len(rest))
            for record in records:
                self._live[record.task_id] = record
                self._classes[record.task_class].committing += 1
                record.committed = written
            # Queued by the commit itself, not by this call: once committed,
            # they run even if this call is cancelled meanwhile.
            written.then(self._accepted, records)
            try:
                await written.wait()
            except Exception:  # the commit failed: nothing was stored
                for record in records:
                    self._live.pop(record.task_id, None)
                    self._classes[record.task_class].committing -= 1
                    if record.waiters is not None:  # a cancel() of it, say
                        record.waiters.set()
                if early is not None:
                    self._release(self._classes[early.task_class], early)
                raise

    def _accepted(self, records: list[TaskRecord]) -> None:
        """Their inserts are committed: queue them."""
        publish = self._bus.wanted(TaskEvent.TYPES[TaskState.QUEUED])
        queued: dict[str, _Class] = {}
        for record in records:
            record.committed = None
            cls = self._classes[record.task_class]
            cls.committing -= 1
            cls.metrics.submitted.value += 1
            if publish:
                # A new task: no attempt of it has started yet, though one
                # stored started (see _store_new) counts its first already.
                self._publish(record, TaskState.QUEUED, attempt=0)
            if record.state is TaskState.RUNNING:  # stored started: see _store_new
                self._hand_over([record])
            elif record.cancel_requested:
                self._finish(record, TaskState.CANCELLED, None, "cancelled before it started")
            else:
                # Dispatched once all are queued: the best of them first.
                self._queued(record, dispatch=False)
                queued[cls.name] = cls
        if self._open:
            for cls in queued.values():
                self._dispatch_class(cls)

    def _queued(self, record: TaskRecord, *, dispatch: bool = True) -> None:
        queue_timeout = self._classes[record.task_class].config.queue_timeout
        if queue_timeout is not None:
            # Counted from the submit, not from now: a task recovered after a
            # restart has waited already, while no instance was open too. One
            # whose attempt a close gave back (started, none counted) did
            # start: it waits again from now, as a retry would.
            waited = 0.0 if record.started_at is not None else time.time() - record.submitted_at
            left = queue_timeout - max(0.0, waited)
            if left <= 0:
                self._waited_too_long(record)
                return
            self._expire(record, left)
        self._enqueue(record, dispatch=dispatch)

    async def status(self, task_id: str) -> TaskStatus:
        record = self._live.get(task_id) or self._recent.get(task_id)
        if record is not None:
            return record.status()
        row = await self._journal.read(self._store.get, task_id)
        if row is None:
            raise UnknownTask(task_id)
        return TaskRecord.from_row(row, 0).status()

    async def wait(self, task_id: str) -> TaskStatus:
        record = self._live.get(task_id)
        if record is not None:  # unfinished, or its final state not yet committed
            if record.state.finished:
                self._journal.hurry()
            else:
                self._check_open()
            if self._open:  # closing, its waiters may have been released already: see below
                if record.waiters is None:
                    record.waiters = anyio.Event()
                await record.waiters.wait()
            if not record.state.finished:
                if self._live.get(task_id) is not record:  # let go by its failed submit
                    raise InfraClosed(
                        f"task {task_id!r} was never stored: the commit of its submit failed, "
                        "which stops the instance"
                    )
                raise InfraClosed(
                    f"the instance closed before task {task_id!r} finished; it is still in "
                    "the store and runs when an instance opens on the same state_dir"
                )
            if self._live.get(task_id) is record:
                await self._uncommitted_end(record)
        return await self.status(task_id)

    async def _uncommitted_end(self, record: TaskRecord) -> None:
        """The record's final state is not committed and the instance is closing: it
        is told only once it is, since it may never be (the failed commit that
        stopped the instance), and then the next instance finds the task running."""
        failure = await self._journal.ended()
        if self._live.get(record.task_id) is record:
            raise InfraClosed(
                f"the end of task {record.task_id!r} ({record.state.value}) could not be "
                f"stored: {failure}; the next instance on the same state_dir finds it "
                "running, and runs it again if it has an attempt left (else it is lost)"
            ) from failure

    async def cancel(self, task_id: str) -> TaskStatus:
        self._check_open()
        record = self._live.get(task_id)
        if record is None or record.cancel_requested:
            return await self.wait(task_id) if record is not None else await self.status(task_id)
        record.cancel_requested = True
        if record.committed is not None:
            pass  # submit() finishes it once the insert is committed
        elif record.state is TaskState.RUNNING:
            if record.scope is not None:
                record.scope.cancel()
        elif record.state is TaskState.WAITING_FOR_SERVICES:
            self._waiting.discard(record)
            self._finish(record, TaskState.CANCELLED, None, "cancelled while waiting")
        elif record.state is TaskState.QUEUED:
            if record.not_before is None:
                self._classes[record.task_class].queue.discard(record)
            self._finish(record, TaskState.CANCELLED, None, "cancelled while queued")
        return await self.wait(task_id)

    def results(
        self, task_ids: Collection[str] | None = None, *, since: int | None = None
    ) -> AsyncGenerator[TaskEvent, None]:
        if task_ids is None:
            return self._every_result(since)
        return self._results_of(set(task_ids), since)

    async def _results_of(
        self, pending: set[str], since: int | None
    ) -> AsyncGenerator[TaskEvent, None]:
        # The buffer holds one final event per task, and is sent no other:
        # nothing is dropped, however many finish at once.
        async with self._bus.subscribe(
            TaskEvent.FINAL_TYPES,
            since=since,
            buffer=max(len(pending), 1),
            accept=lambda event: getattr(event, "task_id", None) in pending,
        ) as events:
            # Those that finished before the subscription (or before ``since``).
            for finished in await self._finished_events(pending):
                yield finished
            if not pending:
                return
            async for event in events:
                if isinstance(event, EventsDropped):
                    # This reader fell behind and the bus dropped some events:
                    # what they said is in the store.
                    for missed in await self._finished_events(pending):
                        yield missed
                elif isinstance(event, TaskEvent) and event.task_id in pending:
                    pending.discard(event.task_id)
                    yield event
                if not pending:
                    return
        # The bus closed with the instance: as wait() says, not a quiet end
        # that a reader would take for all of them.
        raise InfraClosed(
            f"the instance closed before {len(pending)} of the tasks finished (such as "
            f"{min(pending)!r}); they are still in the store and run when an instance opens "
            "on the same state_dir"
        )

    async def _every_result(self, since: int | None) -> AsyncGenerator[TaskEvent, None]:
        # The seq of the last event yielded, taken in the same step as the
        # subscription. A ``since`` from an earlier instance (whose seqs began
        # at 1 as this one's did) may be above it: then all live ones are new.
        last = self._bus.last_seq if since is None else min(since, self._bus.last_seq)
        warned = False
        async with self._bus.subscribe(TaskEvent.FINAL_TYPES, since=since) as events:
            async for event in events:
                if isinstance(event, EventsDropped):
                    # This reader fell behind and the bus dropped some events
                    # (the notice comes where they were): what they said is in
                    # its history, if still there.
                    missed, complete = self._bus.replay(last, TaskEvent.FINAL_TYPES)
                    if not (complete or warned):
                        warned = True  # once a stream: a reader that slow would flood the log
                        log.warning(
                            "a stream of every task's result fell more than event_history "
                            "events behind: results finished before seq %d were missed",
                            missed[0].seq if missed else self._bus.last_seq + 1,
                        )
                    # Those still in this reader's buffer come again, and are skipped.
                    for replayed in missed:
                        last = replayed.seq
                        yield cast(TaskEvent, replayed)
                elif isinstance(event, TaskEvent) and event.seq > last:
                    last = event.seq
                    yield event

    async def _finished_events(self, pending: set[str]) -> list[TaskEvent]:
        """Final events of the ``pending`` tasks that have finished; they leave ``pending``.

        As published while the event history still holds them, so that their
        ``seq`` can be resumed from; older ones are made from the store (seq 0).
        """
        found: list[TaskEvent] = []
        published: dict[str, TaskEvent] | None = None
        # Those in memory are unfinished, or their final state is not yet
        # committed: the bus brings their final event once it is (hurried:
        # someone waits for it now). One set operation finds the others:
        # right after a submit that is none of thousands, and a look-up of
        # each record cost half a microsecond an id (its memory, not the
        # work: 55 ms for a stream of 100,000).
        gone = pending.difference(self._live)
        if len(gone) < len(pending):
            self._journal.hurry()
        # Sorted are only those found: the rest (all, right after a submit)
        # cost a sort of thousands of ids per stream.
        for task_id in gone:
            if published is None:  # one pass over the history, once one is needed
                history, _ = self._bus.replay(0, TaskEvent.FINAL_TYPES)
                published = {e.task_id: e for e in cast(list[TaskEvent], history)}
            event = published.get(task_id)
            if event is None:
                status = await self.status(task_id)
                event = _final_event(status) if status.finished else None
            if event is not None:
                pending.discard(task_id)
                found.append(event)
        found.sort(key=lambda event: event.task_id)
        return found

    async def classes(self) -> dict[str, ClassStatus]:
        """Each class's current concurrency limit, running and queued counts."""
        return {
            name: ClassStatus(
                name=name,
                runner=cls.config.runner,
                limit=cls.limit.limit,
                adaptive=cls.config.adaptive,
                running=cls.running,
                queued=len(cls.queue),
            )
            for name, cls in self._classes.items()
        }

    @property
    def gpus(self) -> tuple[str, ...]:
        return self._pool.gpus

    @property
    def gpus_in_use(self) -> int:
        return len(self._pool.gpus) - len(self._pool.free_gpus)

    # -- submitting -----------------------------------------------------------

    def _checks(self, task_id: str, request: TaskRequest) -> _Checked:
        """Check everything about the request but its payload; or InvalidTask."""
        # Everything but the id, the payload and the workflow was checked
        # already for an earlier request with the same values (of the same
        # types: True == 1, but True is no priority); those are checked here.
        key = _shape_key(request)
        if key is None or (checked := self._checked.get(key)) is None:
            checked = self._check(task_id, request)
            if key is not None:
                if len(self._checked) >= _CHECKED:
                    self._checked.clear()
                self._checked[key] = checked
        elif problem := workflow_id_error(request.workflow_id):
            raise refused(task_id, problem)
        return checked

    def _record(
        self, task_id: str, request: TaskRequest, checked: _Checked, payload: Any
    ) -> TaskRecord:
        """The record to store, of the checked request with ``payload`` (its own,
        or one of a submit by payload); or InvalidTask for the payload."""
        cls, priority, needs, max_attempts, timeout, need = checked
        try:
            payload = encode_json(payload, "the payload")
        except ValueError as exc:
            raise refused(task_id, str(exc)) from None
        # ASCII (dumps escapes the rest), so its length is its size in bytes.
        size = len(payload)
        if size > self._settings.max_payload_bytes:
            raise refused(
                task_id,
                f"the payload is {size} bytes as JSON, over the limit "
                f"of {self._settings.max_payload_bytes} (infra.max_payload_bytes)",
            )
        if depth := json_too_deep(payload):
            # Encoded here, it may still be too deep to decode where it is read.
            raise refused(task_id, too_deep_error("the payload", depth))
        submitted_at = time.time()
        if submitted_at < self._latest_submit:  # the clock was stepped back
            submitted_at = self._latest_submit
        else:
            self._latest_submit = submitted_at
        return TaskRecord(
            task_id=task_id,
            handler=request.handler,
            task_class=cls.name,
            priority=priority,
            payload=payload,
            needs=needs,
            workflow_id=request.workflow_id,
            max_attempts=max_attempts,
            timeout=timeout,
            need=need,
            submitted_at=submitted_at,
            seq=next(self._seq),
            submitted_mono=time.monotonic(),
        )

    @property
    def store(self) -> Store:
        """The task store, which workflows keep their own tables in."""
        return self._store

    @property
    def journal(self) -> Journal:
        """The store's one writer: what shares the store writes (and reads) through it."""
        return self._journal

    def check(self, task_id: str, request: TaskRequest) -> None:
        """Raise :class:`InvalidTask` if ``request`` could never run, storing nothing.

        All the checks of a submit but the payload's: for a workflow step,
        whose payload is only known when it starts.
        """
        self._check(task_id, request)

    def _check(self, task_id: str, request: TaskRequest) -> _Checked:
        """Check all but the payload: what the record is made of, or InvalidTask."""

        def invalid(message: str) -> InvalidTask:
            return refused(task_id, message)

        if problem := shape_error(request):
            raise invalid(problem)
        cls = self._classes.get(request.task_class)
        if cls is None:
            known = ", ".join(sorted(self._classes))
            raise invalid(f"unknown task class {request.task_class!r} (configured: {known})")
        if cls.unavailable is not None or cls.runner is None:
            raise invalid(f"class {request.task_class!r} cannot run tasks: {cls.unavailable}")
        if problem := cls.runner.validate(request.handler):
            raise invalid(problem + self._classes_for(request.handler))
        priority = request.priority
        if problem := priority_error(priority):
            raise invalid(problem)
        top = self._settings.max_priority
        if not 0 <= priority <= top:
            raise invalid(
                f"priority must be an integer from 0 to {top} (max_priority), got {priority!r}"
            )
        unknown = [s for s in request.needs if s not in self.config.services]
        if unknown:
            known = ", ".join(sorted(self.config.services)) or "none"
            raise invalid(f"needs unknown services {', '.join(unknown)} (configured: {known})")
        max_attempts = (
            request.max_attempts if request.max_attempts is not None else cls.config.max_attempts
        )
        timeout = request.timeout if request.timeout is not None else cls.config.timeout
        if problem := max_attempts_error(max_attempts) or timeout_error(timeout):
            raise invalid(problem)
        need = self._need(cls, request)
        if problem := resources_error(*need):
            raise invalid(problem)
        if cls.config.runner == "docker" and (problem := docker_memory_error(need[1])):
            raise invalid(f"resources.memory_mb: {problem}")
        if cls.local and (problem := self._pool.capacity_error(need)):
            raise invalid(problem)
        return (
            cls,
            priority,
            tuple(request.needs),
            max_attempts,
            float(timeout) if timeout is not None else None,
            need,
        )

    def _classes_for(self, handler: str) -> str:
        """Where the handler a class's runner refused can run, as the end of that refusal.

        A ``[handlers.X]`` command submitted to the default class (in-process)
        was told to register an in-process function, which the user of a
        standalone server, or of the command line, cannot do.
        """
        fits = [
            name
            for name, cls in self._classes.items()
            if cls.runner is not None
            and cls.runner.validate(handler) is None
            and not (cls.local and self._pool.capacity_error(_class_need(cls.config)))
        ]
        if not fits:
            return ""
        if len(fits) == 1:
            return f"; class {fits[0]!r} can run it"
        return f"; classes {', '.join(map(repr, fits[:-1]))} and {fits[-1]!r} can run it"

    @staticmethod
    def _need(task_class: _Class, request: TaskRequest) -> Need:
        wanted = request.resources
        config = task_class.config
        if wanted is None:
            return _class_need(config)
        return (
            config.cpus if wanted.cpus is None else wanted.cpus,
            config.memory_mb if wanted.memory_mb is None else wanted.memory_mb,
            config.gpus if wanted.gpus is None else wanted.gpus,
        )

    # -- queueing and dispatch ------------------------------------------------

    def _kick(self) -> None:
        """Something changed: start what can start now.

        Called synchronously wherever a task is queued or a slot frees, so
        that a free slot is filled in the same step, with no wake-up of a
        dispatcher task in between. Closed, it does nothing: attempts
        interrupted by close() must not start others.
        """
        if self._open:
            self._dispatch()

    def _enqueue(self, record: TaskRecord, *, dispatch: bool = True) -> None:
        record.state = TaskState.QUEUED
        cls = self._classes[record.task_class]
        cls.queue.push(record)
        if dispatch and self._open:
            self._dispatch_class(cls)

    def _delay(self, record: TaskRecord, seconds: float) -> None:
        self._add_timer((time.monotonic() + seconds, next(self._timer_seq), "retry", record))

    def _expire(self, record: TaskRecord, seconds: float) -> None:
        record.deadline = time.monotonic() + seconds
        self._add_timer((record.deadline, next(self._timer_seq), "expire", record))

    def _add_timer(self, timer: _Timer) -> None:
        timers = self._timers
        if len(timers) > 4 * len(self._live) + _STALE_TIMERS:
            # Most are stale: the queue timeouts of tasks that started, each
            # holding its task (payload, result) until it was due, an hour of
            # a busy server's tasks for an hour's queue_timeout. Dropped when
            # they outnumber the valid ones (at most two per unfinished task)
            # this much, so that the sweeps cost O(1) per timer.
            timers[:] = [t for t in timers if _pending(t)]
            heapq.heapify(timers)
        heapq.heappush(timers, timer)
        if self._timer_wake is not None:
            self._timer_wake.set()

    def _dispatch(self) -> None:
        for cls in self._classes.values():
            if len(cls.queue):
                self._dispatch_class(cls)

    def _dispatch_class(self, cls: _Class) -> None:
        if cls.runner is None:  # unavailable: its recovered tasks wait for an instance with it
            return
        queue = cls.queue
        fits = self._fits if cls.local else _always
        blocked = self._head_blocked if cls.reserves else None
        released = False
        started: list[TaskRecord] = []
        limit = cls.limit.limit  # which nothing below changes
        while cls.running < limit:
            record = self._reserved_ready(cls) or queue.pop(fits, blocked)
            if record is None:
                break
            if record.needs and not self._services_ready(record.needs):
                released |= self._unreserve(record)
                self._wait_for_services(record)
                continue
            self._claim(cls, record)
            started.append(record)
        if started:
            # The attempts reach a worker once their starts (attempts counted)
            # are safe from a crash of this process: committed, or with the
            # writer process, which commits them whatever becomes of this one.
            self._journal.write_all(
                [("start", (r.attempts, r.started_at, r.task_id)) for r in started],
                self._hand_over,
                started,
                at_writer=True,
            )
        if released:  # what it held back from the other classes is theirs again
            self._dispatch()

    def _fits(self, record: TaskRecord) -> bool:
        """Whether the record's resources are free, besides those reserved.

        Backfill alone could pass a large task over for ever, as long as
        smaller ones keep taking what is freed. So in a class with
        ``reserve_after``, a task first in line that has found its resources
        taken that long has them reserved: from then on, what others free is
        kept for it. One reservation at a time.
        """
        # No clock read on the hot path unless a blocked head is waiting to be due.
        if (
            self._next_due < math.inf
            and self._reserved_for is None
            and time.monotonic() >= self._next_due
        ):
            self._reserve_if_due()
        need = record.need
        # One that needs nothing (an in-process task, by default) always fits.
        return not any(need) or self._pool.fits(need, reserved=record is self._reserved_for)

    def _head_blocked(self, record: TaskRecord) -> None:
        """The first in its class's queue does not fit (only with ``reserve_after``)."""
        if record.blocked_since is None:
            record.blocked_since = time.monotonic()
        self._blocked_heads[record.task_class] = record
        if self._reserved_for is None:
            self._reserve_if_due()

    def _reserve_if_due(self) -> None:
        """Reserve for the first blocked head that has waited its class's
        ``reserve_after``; note when the next one is due."""
        now = time.monotonic()
        self._next_due = math.inf
        for name, record in list(self._blocked_heads.items()):
            # Gone from the queue since (started, cancelled, waiting for services).
            if record.state is not TaskState.QUEUED or record.blocked_since is None:
                del self._blocked_heads[name]
                continue
            due = record.blocked_since + (self._classes[name].config.reserve_after or 0.0)
            if due <= now and self._reserved_for is None:
                del self._blocked_heads[name]
                self._reserved_for = record
                self._pool.reserve(record.need)
            else:
                self._next_due = min(self._next_due, due)

    def _reserved_ready(self, cls: _Class) -> TaskRecord | None:
        """The task holding the reservation, taken out of the queue, if it is
        ``cls``'s and fits now. Looked at before the queue: the tasks ranked
        above it that do not fit (more than BACKFILL_DEPTH) must not hide it,
        which would keep what is held for it idle for ever."""
        record = self._reserved_for
        if (
            record is None
            or record.task_class != cls.name
            or not self._pool.fits(record.need, reserved=True)
        ):
            return None
        assert record.state is TaskState.QUEUED
        assert record.not_before is None
        cls.queue.discard(record)
        return record

    def _unreserve(self, record: TaskRecord) -> bool:
        """The record no longer waits in the queue: release its reservation, if it has one."""
        if record is not self._reserved_for:
            return False
        self._reserved_for = None
        self._pool.unreserve()
        self._next_due = 0.0  # another blocked head may be due already
        return True

    def _startable(self, record: TaskRecord) -> bool:
        """Would a dispatch start this new task now, ahead of nothing queued, or
        about to be (the tasks of submits still being committed)?"""
        cls = self._classes[record.task_class]
        return (
            self._open
            and not len(cls.queue)
            and not cls.committing
            and cls.running < cls.limit.limit
            and (not cls.local or self._fits(record))
            and not (record.needs and not self._services_ready(record.needs))
        )

    def _claim(self, cls: _Class, record: TaskRecord) -> None:
        """Take a slot (and resources) for the record's next attempt, and count it."""
        assert self._runs is not None
        need = record.need
        # One that needs nothing (see _fits) takes nothing: not a call for it.
        record.gpus = self._pool.acquire(need) if cls.local and any(need) else ()
        record.blocked_since = None
        if record is self._reserved_for:
            self._unreserve(record)
        cls.running += 1
        record.state = TaskState.RUNNING
        record.attempts += 1
        started_at = time.time()
        # Its first start, in this instance or an earlier one: an attempt that
        # a close gave back takes its count back, not its start (its wait was
        # observed by the instance it started in).
        if record.started_at is None:
            since = record.submitted_mono
            # Submitted to an earlier instance: its stored wall time is all there is.
            waited = started_at - record.submitted_at if since is None else time.monotonic() - since
            cls.metrics.wait.observe(max(0.0, waited))
        record.started_at = started_at
        record.deadline = None
        if cls.workers < cls.running:
            cls.workers += 1
            self._runs.start_soon(self._worker, cls)

    def _hand_over(self, records: list[TaskRecord]) -> None:
        """Their starts are committed: to the class's workers (all of one class)."""
        cls = self._classes[records[0].task_class]
        if not self._open:  # committed while closing: they never ran
            for record in records:
                self._interrupted(cls, record)
            return
        cls.ready.extend(records)
        if cls.idle and not cls.waking:
            cls.waking = True
            cls.idle.pop().set()

    async def _worker(self, cls: _Class) -> None:
        # The attempt in hand, and when it started: (record, monotonic time).
        current: list[tuple[TaskRecord, float]] = []
        while True:
            # One cancel scope serves the attempts of this worker until one
            # of them is cut short (cancel_task() cancels it, a timeout is its
            # deadline while that attempt runs): a scope per attempt costs
            # more than the rest of a no-op attempt's run.
            try:
                with anyio.CancelScope() as scope:
                    await self._attempts(cls, scope, current)
            except BaseException:
                # Not this scope's own cancellation: the scheduler is closing.
                if current:
                    record, _ = current.pop()
                    # Its slot is not refilled: nothing starts while closing.
                    self._interrupted(cls, record, running=True)
                raise
            if current:  # cut short while it waited: the scope took its cancellation
                record, started = current.pop()
                self._end(cls, record, started, self._cut_short(record))

    async def _attempts(
        self, cls: _Class, scope: anyio.CancelScope, current: list[tuple[TaskRecord, float]]
    ) -> None:
        """Run attempts as they become ready; return once ``scope`` was cancelled."""
        ready = cls.ready
        idle = cls.idle
        while True:
            for _ in range(_RUNS_PER_CHECKPOINT):
                if not ready:
                    break
                record = ready.popleft()
                if ready and idle and not cls.waking:
                    # More is ready: another worker takes it if this attempt waits.
                    cls.waking = True
                    idle.pop().set()
                started = time.monotonic()
                current.append((record, started))
                outcome = await self._attempt(cls, record, scope)
                current.pop()
                if scope.cancel_called:
                    # Cut short, yet it returned: a sync handler's thread cannot
                    # be interrupted, so its late result is not taken either.
                    self._end(cls, record, started, self._cut_short(record))
                    return
                self._end(cls, record, started, outcome)
            else:
                # Attempts that never await (no-op handlers) would otherwise
                # keep this worker from ever letting others run.
                await anyio.lowlevel.checkpoint()
                continue
            # asyncio's own: an anyio.Event costs 1.2 us to make (it looks up
            # the async backend), asyncio's 0.2, and workers idle many times a
            # second. Cancelled as any await is (close(), the task group).
            wake = asyncio.Event()
            idle.append(wake)
            await wake.wait()
            cls.waking = False

    # -- running an attempt ---------------------------------------------------

    def _end(self, cls: _Class, record: TaskRecord, started: float, outcome: _Outcome) -> None:
        """The attempt is over: its end is taken after this step, with the others
        that end in it (:meth:`_end_attempts`), so that their slots are filled
        and their final states written by one dispatch and one write, not one
        each. The slot stays held until then; a worker runs several attempts
        in one step (see _attempts), and a step ends at the first await that
        waits, so an end is never held up by another attempt's work.
        """
        inflight = 0
        if cls.config.adaptive:  # only a limit that moves is told of the end
            # What ran beside it: as counted when each end freed its slot at
            # once, and a dispatch filled it from the queue (so the adaptive
            # limit sees the class as busy as it was).
            before = cls.ending
            cls.ending = before + 1
            inflight = cls.running - before + min(before, len(cls.queue))
        self._ending.append((cls, record, time.monotonic() - started, inflight, outcome))
        if len(self._ending) == 1:
            assert self._loop is not None
            self._loop.call_soon(self._end_attempts)

    def _end_attempts(self) -> None:
        """Take the ends of the attempts that the last step ended (see :meth:`_end`)."""
        ending, self._ending = self._ending, []
        if not ending:
            return
        try:
            self._take_ends(ending)
        except Exception as exc:  # noqa: BLE001 - a bug: the journal's run() raises it
            # Off any task (a callback of the loop's): stopped through the
            # journal, as a failed callback of a commit stops the instance.
            self._journal.fail(exc)

    def _take_ends(self, ending: list[tuple[_Class, TaskRecord, float, int, _Outcome]]) -> None:
        finals: list[Op] = []
        finished: list[TaskRecord] = []
        deferrable = True
        classes: dict[str, _Class] = {}
        everyone = False  # whether one held resources that other classes may wait for
        for cls, record, latency, inflight, (state, result, error) in ending:
            cls.ending = 0
            self._release(cls, record)
            cls.metrics.duration.observe(latency)
            # The sample goes in before the dispatch: a limit it raises is
            # filled now, not at the next attempt's end.
            # A cut-short run says nothing about load.
            if cls.config.adaptive and state is not TaskState.CANCELLED:
                cls.limit.on_sample(
                    latency=latency,
                    inflight=inflight,
                    dropped=state is TaskState.FAILED or state is TaskState.TIMED_OUT,
                )
            classes[cls.name] = cls
            everyone = everyone or (cls.local and any(record.need))
            if (
                (state is TaskState.FAILED or state is TaskState.TIMED_OUT)
                and record.attempts < record.max_attempts
                and not record.cancel_requested
            ):
                self._retry(cls, record, error)
            else:
                finals.append(self._final(record, state, result, error))
                finished.append(record)
                deferrable = deferrable and self._deferrable(record)
        if self._open:
            # Their own classes first; the others only if one held resources.
            for cls in classes.values():
                self._dispatch_class(cls)
            if everyone:
                self._dispatch()
        if finals:
            self._journal.write_all(finals, self._finished, finished, deferrable=deferrable)

    def _release(self, cls: _Class, record: TaskRecord) -> None:
        cls.running -= 1
        if cls.local and any(record.need):  # one that needs nothing took nothing (_claim)
            self._pool.release(record.need, record.gpus)
        record.scope = None

    def _interrupted(self, cls: _Class, record: TaskRecord, *, running: bool = False) -> None:
        """Stopped by close(): not the task's fault, so the attempt is given back
        and the task is queued for the next start; unless it was being cancelled."""
        self._release(cls, record)
        if record.cancel_requested:
            why = "cancelled while running" if running else "cancelled before it started"
            self._finish(record, TaskState.CANCELLED, None, why)
            return
        record.attempts -= 1
        record.state = TaskState.QUEUED
        self._journal.write(("requeue", (record.attempts, None, record.error, record.task_id)))

    async def _attempt(self, cls: _Class, record: TaskRecord, scope: anyio.CancelScope) -> _Outcome:
        """Run one attempt in the worker's ``scope``; its outcome, unless it is cut short."""
        assert cls.runner is not None
        if record.cancel_requested:
            return TaskState.CANCELLED, None, "cancelled before it started"
        try:
            payload = loads(record.payload)
        except RecursionError:
            # Stored by a version without the limit on nesting (or decoded
            # deeper in the stack than it was encoded): the task's failure.
            return TaskState.FAILED, None, "its payload is nested too deeply to decode"
        timeout = record.timeout
        if timeout is not None:
            scope.deadline = anyio.current_time() + timeout
        # cancel_task() cancels the scope while it is the record's.
        record.scope = scope
        if self._bus.wanted("task_started"):
            self._publish(record, TaskState.RUNNING)
        run = TaskRun(
            task_id=record.task_id,
            handler=record.handler,
            payload=payload,
            attempt=record.attempts,
            task_class=record.task_class,
            class_config=cls.config,
            handler_config=self.config.handlers.get(record.handler),
            gpus=record.gpus,
            env=_gpu_env(record.gpus) if record.gpus or (cls.local and self._pool.has_gpus) else {},
            tasks_dir=self._tasks_dir,
            cpus=record.need[0],
            memory_mb=record.need[1],
            gpu_count=record.need[2],
            max_attempts=record.max_attempts,
        )
        outcome: _Outcome
        try:
            value = await cls.runner.run(run)
        except anyio.get_cancelled_exc_class() as exc:
            if scope.cancel_called or _cancelling():
                raise
            # Not a cancel of this attempt (nor of the scheduler): the handler
            # let out the cancellation of something it awaited. Its failure;
            # raised on, it would stop the instance, and every later one.
            outcome = (TaskState.FAILED, None, _describe(exc))
        except KeyboardInterrupt:
            # Ctrl-C landing in the handler's code stops the program, as asyncio
            # has it; the attempt is given back, as at any close.
            raise
        except BaseException as exc:  # any other failure of the work fails the attempt
            # A BaseException of the handler's (sys.exit(), pytest.fail(), its
            # own) too: raised on, it would stop the instance with the attempt
            # given back, and so every later instance on the state_dir.
            if _cancelling() and not scope.cancel_called:
                # The scheduler is closing, and the handler let its interruption
                # out as an error of its own (grpclib does): interrupted all the
                # same, so its attempt is given back, not counted as a failure.
                raise anyio.get_cancelled_exc_class()() from exc
            outcome = (TaskState.FAILED, None, _describe(exc))
        else:
            outcome = self._result(value)
        record.scope = None
        if timeout is not None and not scope.cancel_called:
            scope.deadline = math.inf
        return outcome

    @staticmethod
    def _cut_short(record: TaskRecord) -> _Outcome:
        if record.cancel_requested:
            return TaskState.CANCELLED, None, "cancelled while running"
        return (
            TaskState.TIMED_OUT,
            None,
            f"ran longer than its timeout of {record.timeout or 0:g} s",
        )

    def _result(self, value: Any) -> _Outcome:
        if value is None:
            return _SUCCEEDED_NONE
        try:
            result = encode_json(value, "its result")
        except ValueError as exc:
            return TaskState.FAILED, None, str(exc)
        limit = self._settings.max_result_bytes
        if len(result) > limit:  # ASCII (dumps escapes the rest): its length is its size
            return (
                TaskState.FAILED,
                None,
                f"its result is {len(result)} bytes as JSON, over the limit of "
                f"{limit} (infra.max_result_bytes)",
            )
        if depth := json_too_deep(result):
            # Encoded here, it may still be too deep to decode where it is read
            # (a caller's result(), a workflow's next step).
            return TaskState.FAILED, None, too_deep_error("its result", depth)
        return TaskState.SUCCEEDED, result, None

    def _retry(self, cls: _Class, record: TaskRecord, error: str | None) -> None:
        delay = cls.config.retry_backoff.delay(record.attempts - 1)
        record.state = TaskState.QUEUED
        record.error = error
        record.not_before = time.time() + delay
        # Not awaited: if it is lost in a crash, the task is found 'running'
        # with this attempt counted, and re-run if one is left, as here.
        self._journal.write(
            ("requeue", (record.attempts, record.not_before, error, record.task_id))
        )
        self._publish(record, TaskState.QUEUED, event_type=TaskEvent.RETRYING, error=error)
        self._delay(record, delay)

    def _finish(
        self, record: TaskRecord, state: TaskState, result: str | None, error: str | None
    ) -> None:
        """Set the final state; waiters and subscribers learn of it once it is committed."""
        self._journal.write(
            self._final(record, state, result, error),
            self._finished,
            [record],
            deferrable=self._deferrable(record),
        )
        if self._unreserve(record):  # cancelled, or timed out, while it waited
            self._kick()

    @staticmethod
    def _final(record: TaskRecord, state: TaskState, result: str | None, error: str | None) -> Op:
        """Set the final state on the record; the write that stores it."""
        record.state = state
        record.result = result
        record.error = error
        record.finished_at = time.time()
        # _value_: a plain str, which the writer process reads with the standard
        # library alone; ``value`` is a property, a tenth of a microsecond a task.
        return ("finish", (state._value_, record.finished_at, result, error, record.task_id))

    def _deferrable(self, record: TaskRecord) -> bool:
        """Whether nobody waits for the record's final state (see Journal.write)."""
        return record.waiters is None and not self._bus.wanted(TaskEvent.TYPES[record.state])

    def _finished(self, records: list[TaskRecord]) -> None:
        """Their final states are committed: waiters and subscribers are told."""
        live, recent = self._live, self._recent
        for record in records:
            live.pop(record.task_id, None)
            recent[record.task_id] = record
            if len(recent) > _RECENT:
                recent.popitem(last=False)
            if record.waiters is not None:
                record.waiters.set()
            task_class = self._classes.get(record.task_class)
            # A class no longer configured still counts the tasks of it that the
            # recovery ended (lost, or cancelled on recovery), under its name.
            metrics = (
                task_class.metrics
                if task_class is not None
                else self._metrics.task_class(record.task_class)
            )
            metrics.finished[record.state].value += 1  # a StrEnum: its value as a key
            self._publish(record, record.state, result=record.result)

    def _publish(
        self,
        record: TaskRecord,
        state: TaskState,
        *,
        event_type: str | None = None,
        result: str | None = None,
        error: str | None = None,
        attempt: int | None = None,
    ) -> None:
        event_type = event_type or TaskEvent.TYPES[state]
        final = state.finished
        if not final and not self._bus.wanted(event_type):
            return  # a progress event nobody listens to: only final ones go to the history
        self._bus.publish(
            TaskEvent(
                type=event_type,
                task_id=record.task_id,
                task_class=record.task_class,
                handler=record.handler,
                state=state,
                attempt=record.attempts if attempt is None else attempt,
                workflow_id=record.workflow_id,
                result=_decode(result) if result is not None else None,
                error=error if error is not None else (record.error if final else None),
            )
        )

    # -- timers ---------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                timer = heapq.heappop(self._timers)
                if not _pending(timer):
                    continue
                _, _, kind, record = timer
                if kind == "retry":
                    record.not_before = None
                    self._enqueue(record)
                else:
                    self._expire_now(record)
            wait = self._timers[0][0] - time.monotonic() if self._timers else math.inf
            assert self._timer_wake is not None
            with anyio.move_on_after(max(wait, 0)):
                await self._timer_wake.wait()
            self._timer_wake = anyio.Event()

    def forget_also(
        self,
        find: Callable[[float, int], list[str]],
        kind: OpKind,
        forgetting: Callable[[list[str]], Awaitable[None]],
    ) -> None:
        """Have ``keep_finished`` forget more than tasks (the workflow engine's runs).

        Each pass, ``find(cutoff, limit)`` (a read of the store) names what
        finished before the cutoff; ``forgetting(ids)`` drops what is kept
        of them in memory; a ``(kind, (id,))`` operation each removes them
        from the store. Registered before the scheduler opens, it takes part
        in the pass at the start too.
        """
        self._forgettable.append((find, kind, forgetting))

    def cancel_on_recovery(self, find: Callable[[list[str]], dict[str, str]]) -> None:
        """Have the tasks that ``find`` names cancelled as they are recovered, not run again.

        ``find(task_ids)`` (a read of the store, in a worker thread) is given
        the ids of the unfinished tasks found in the store as the scheduler
        opens, and answers ``{task_id: why}`` for those whose work is no
        longer wanted (the workflow engine's, of runs whose cancel a crash
        cut short): they end ``cancelled`` with that error, never dispatched.
        Registered before the scheduler opens.
        """
        self._not_to_recover.append(find)

    async def _forget_loop(self, keep: float) -> None:
        """Forget what finished more than ``keep`` seconds ago, now and every keep / 10."""
        every = min(max(keep / 10, _FORGET_EVERY[0]), _FORGET_EVERY[1])
        while True:
            cutoff = time.time() - keep
            for find, kind, forgetting in self._forgettable:
                while ids := await self._journal.read(find, cutoff, _FORGET_BATCH):
                    await forgetting(ids)
                    written = None
                    for forgotten in ids:
                        written = self._journal.write((kind, (forgotten,)))
                    assert written is not None
                    await written.wait()
                    # A store in memory answers at once: let others run between batches.
                    await anyio.lowlevel.checkpoint()
                    log.debug(
                        "forgot %d (%s) finished before %s", len(ids), kind, time.ctime(cutoff)
                    )
            await anyio.sleep(every)

    async def _forgetting_tasks(self, task_ids: list[str]) -> None:
        # The work dirs first: once the rows are gone, an id may be
        # submitted again, and its new attempt's files must stay.
        await anyio.to_thread.run_sync(_remove_work_dirs, self._tasks_dir, task_ids)
        for task_id in task_ids:
            self._recent.pop(task_id, None)

    def _expire_now(self, record: TaskRecord) -> None:
        if record.state is TaskState.QUEUED and record.committed is None:
            self._classes[record.task_class].queue.discard(record)
        elif record.state is TaskState.WAITING_FOR_SERVICES:
            self._waiting.discard(record)
        else:
            return
        self._waited_too_long(record)

    def _waited_too_long(self, record: TaskRecord) -> None:
        """End a task that did not start within its class's ``queue_timeout`` (which is set)."""
        timeout = self._classes[record.task_class].config.queue_timeout or 0
        self._finish(record, TaskState.TIMED_OUT, None, f"waited more than {timeout:g} s to start")

    # -- tasks that need services ---------------------------------------------

    def _services_ready(self, names: tuple[str, ...]) -> bool:
        for name in names:
            state = self._services.runtime(name).state
            if not (state.is_up or state.value == "completed"):
                return False
        return True

    def _failed_service(self, names: tuple[str, ...]) -> str | None:
        """The first of ``names`` that has failed (its supervisor gave up on it), or None."""
        for name in names:
            if self._services.runtime(name).state.value == "failed":
                return name
        return None

    def _wait_for_services(self, record: TaskRecord) -> None:
        if not self._settings.start_needed_services and (
            failed := self._failed_service(record.needs)
        ):
            # As if it had been waiting when the service failed: without this,
            # a task whose turn came just after the failure waited for ever.
            self._finish(record, TaskState.FAILED, None, f"service {failed!r} it needs failed")
            return
        record.state = TaskState.WAITING_FOR_SERVICES
        record.blocked_since = None  # back in the queue, it is found blocked afresh
        self._waiting.add(record)
        self._publish(record, TaskState.WAITING_FOR_SERVICES)
        if not self._settings.start_needed_services or self._tg is None:
            return
        # One start per service that is not up: a start that fails stops what
        # it launched and fails the tasks waiting for what it was asked to
        # start, so one call for all of them failed a task that needed a
        # service up already, or one started beside the failed one, with the
        # error of a service it did not need.
        for name in record.needs:
            if name not in self._starting_services and not self._services_ready((name,)):
                self._starting_services.add(name)
                self._tg.start_soon(self._start_service, name)

    async def _start_service(self, name: str) -> None:
        try:
            await self._services.start([name])
        except ServiceStartError as exc:
            self._fail_waiting({name}, f"a service it needs could not start: {exc}")
        finally:
            self._starting_services.discard(name)

    def _fail_waiting(self, services: set[str], error: str) -> None:
        for record in [r for r in self._waiting if services.intersection(r.needs)]:
            self._waiting.discard(record)
            self._finish(record, TaskState.FAILED, None, error)

    async def _watch_services(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        types = _SERVICE_READY_EVENTS | _SERVICE_DOWN_EVENTS
        async with self._bus.subscribe(types) as events:
            task_status.started()
            async for event in events:
                if not isinstance(event, ServiceEvent):
                    continue
                if event.type in _SERVICE_READY_EVENTS:
                    for record in [r for r in self._waiting if self._services_ready(r.needs)]:
                        self._waiting.discard(record)
                        self._enqueue(record)
                elif (
                    event.service not in self._starting_services
                    # Not an old word: restarted since, it no longer fails them.
                    and self._services.runtime(event.service).state is ServiceState.FAILED
                ):
                    # Not being started for them (start_needed_services is
                    # false, or it was up when they came to wait): nothing
                    # will bring it back for them. One being started fails
                    # them through its start.
                    self._fail_waiting(
                        {event.service}, f"service {event.service!r} it needs failed"
                    )


def _new_task_id() -> str:
    # 32 hex digits, valid by construction: the time in ms, then 80 random
    # bits. Ids of tasks submitted together sort together, so the store's
    # index on them is written and read in order, not at random pages (which
    # cost SQLite a fifth to a third more time per task with 100k tasks stored).
    return f"{time.time_ns() // 1_000_000:012x}{_random_hex()}"


# Random parts of ids to come, 20 hex digits each: drawn from the OS a
# thousand at a time, since a getrandom() call per id cost as much as the
# rest of making it. Emptied in a forked child, whose ids must not be its
# parent's.
_RANDOM_HEX: list[str] = []
os.register_at_fork(after_in_child=_RANDOM_HEX.clear)


def _random_hex() -> str:
    try:
        return _RANDOM_HEX.pop()
    except IndexError:
        drawn = os.urandom(10 * 1024).hex()
        parts = [drawn[i : i + 20] for i in range(0, len(drawn), 20)]
        part = parts.pop()
        _RANDOM_HEX.extend(parts)  # another thread's may be there too: all are random
        return part


def _shape_key(request: TaskRequest) -> tuple[Any, ...] | None:
    """What the checks of ``request`` depend on, by value and type; None: check it all."""
    if request.resources is not None:
        return None
    needs = request.needs
    if type(needs) is not tuple:
        return None
    handler, task_class = request.handler, request.task_class
    priority, max_attempts, timeout = request.priority, request.max_attempts, request.timeout
    key = (
        type(handler),
        handler,
        type(task_class),
        task_class,
        type(priority),
        priority,
        needs,
        type(max_attempts),
        max_attempts,
        type(timeout),
        timeout,
    )
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _gpu_env(gpus: tuple[str, ...]) -> dict[str, str]:
    if not gpus:
        # Where the machine has GPUs, an attempt that leases none sees
        # none (as Ray and Slurm's cgroups have it): CUDA opened there would
        # land on device 0, leased to a task that counts on having it alone.
        return {"CUDA_VISIBLE_DEVICES": ""}
    # Leased ids are NVML / nvidia-smi indices, which follow the PCI bus
    # order; CUDA's own default order is fastest first.
    return {"CUDA_VISIBLE_DEVICES": ",".join(gpus), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


_SUCCEEDED_NONE: _Outcome = (TaskState.SUCCEEDED, "null", None)


def _remove_work_dirs(tasks_dir: Path, task_ids: list[str]) -> None:
    for task_id in task_ids:
        # Files a container wrote as another user may resist: what can go, goes.
        shutil.rmtree(tasks_dir / task_id, ignore_errors=True)


def _decode(text: str) -> Any:
    return None if text == "null" else loads(text)


def _always(_: TaskRecord) -> bool:
    return True


def _current_limit(task_class: _Class) -> int:
    return task_class.limit.limit


def _final_event(status: TaskStatus) -> TaskEvent:
    return TaskEvent(
        type=TaskEvent.TYPES[status.state],
        task_id=status.task_id,
        task_class=status.task_class,
        handler=status.handler,
        state=status.state,
        attempt=status.attempts,
        workflow_id=status.workflow_id,
        result=status.result,
        error=status.error,
    )


def _cancelling() -> bool:
    """Whether the current task is being cancelled (by a cancel scope around it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _total_memory_mb() -> int:
    try:
        with Path("/proc/meminfo").open() as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return max(1, pages * os.sysconf("SC_PAGE_SIZE") // (1 << 20)) if pages else 1 << 20
