"""The dspy-infra demo: start a local stack, use it, break it, run tasks on it, tear it down.

    make demo            # or: .venv/bin/python examples/demo.py

The stack is declared in examples/demo/dspy-infra.toml: a key-value store
(``redis-server`` when it is installed, else a small Python stand-in), a
one-shot migration that writes a schema version into it, a worker, an HTTP
API that waits for all three, and an embedding server that only starts when
a task needs it. Everything runs as local processes on free ports, with its
state in a temporary directory.

Then the scheduler: in-process handlers and a command run by the process
runner, tasks of three classes with priorities, a task that waits for the
embedding server, one that fails and is retried, one cancelled while it
runs, and their results streamed as they finish. A workflow (a DAG of those
tasks). And GPU tasks, one more than there are GPUs, each leasing a device
(where ``nvidia-smi`` finds none, the configured ids 0 and 1 stand in).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
from rich.console import Console
from rich.table import Table

from dspy_infra import (
    AgentInfra,
    Event,
    InfraError,
    ServiceEvent,
    ServiceStatus,
    WorkflowEvent,
)
from dspy_infra.abc import TaskRun
from dspy_infra.scheduling.tasks import TaskEvent, TaskHandle, TaskState, TaskStatus

DEMO = Path(__file__).parent / "demo"
CONFIG = DEMO / "dspy-infra.toml"
REDIS = ["redis-server", "--port", "{port}", "--bind", "127.0.0.1", "--save", ""]
# What evaluating each candidate program on a dev set would score: the
# evaluate handler stands in for the real thing.
SCORES = {"baseline": 0.52, "few-shot": 0.61, "cot": 0.68, "react": 0.64, "cot+rag": 0.77}
CANDIDATES = ["baseline", "few-shot", "cot", "react"]
URGENT = "cot+rag"
GPU_WORK = 0.3  # seconds that each GPU task holds its device
# A terminal's own width; 100 columns when the output goes to a file or a pipe.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 100)


# Task events the printer leaves out: every task is queued, and the results
# stream prints the final ones.
_QUIET = TaskEvent.FINAL_TYPES | {"task_queued"}


class DemoFailed(Exception):
    """Something the demo checks did not hold."""


class EventPrinter:
    """Prints every event as it happens, and lets the demo wait for one."""

    def __init__(self, start: float):
        self.start = start
        self.seen: list[Event] = []
        self.labels: dict[str, str] = {}  # task id -> what the demo calls the task
        self._changed = anyio.Event()

    def label(self, task_id: str) -> str:
        if task_id in self.labels:
            return self.labels[task_id]
        # A workflow step's task is RUN:STEP, or RUN:STEP:INDEX when it fans out.
        match task_id.split(":"):
            case [_, step]:
                return step
            case [_, step, index]:
                return f"{step}[{index}]"
        return task_id[-8:]  # ids begin with the submit time: the end tells them apart

    async def run(self, infra: AgentInfra) -> None:
        # since=0 first replays what happened while the services were starting;
        # the stream ends when the instance closes.
        async for event in infra.stream_events(since=0):
            self.seen.append(event)
            self._changed.set()
            self._changed = anyio.Event()
            if isinstance(event, ServiceEvent):
                self.print(event, event.service, event.message)
            elif isinstance(event, TaskEvent) and event.type not in _QUIET:
                # Final events are printed by the results stream, in run_tasks().
                message = {
                    "task_waiting": "for the services it needs",
                    "task_retrying": f"attempt {event.attempt} failed: {event.error}",
                    "task_started": f"attempt {event.attempt}",
                }.get(event.type, "")
                self.print(event, self.label(event.task_id), message)
            elif isinstance(event, WorkflowEvent):
                self.print(event, f"{event.step or 'run'}", event.state)

    def print(self, event: Event, subject: str, message: str) -> None:
        print(f"  {event.time - self.start:6.2f}s  {event.type:<23} {subject:<20} {message}")

    async def wait_until(self, seen: Callable[[Event], bool], *, after: int = 0) -> None:
        """Wait until an event for which ``seen`` is true was printed (counting from ``after``)."""
        while not any(seen(e) for e in self.seen[after:]):
            await self._changed.wait()

    async def wait_for(self, service: str, event_type: str, *, after: int = 0) -> None:
        """Wait until ``service``'s ``event_type`` event is printed (counting from ``after``)."""
        await self.wait_until(
            lambda e: isinstance(e, ServiceEvent) and (e.service, e.type) == (service, event_type),
            after=after,
        )


def show(statuses: dict[str, ServiceStatus]) -> None:
    table = Table("service", "state", "pid", "ports", "restarts", "last exit")
    for s in statuses.values():
        ports = ", ".join(f"{name}={port}" for name, port in s.ports.items() if port)
        exit_code = "" if s.exit_code is None else str(s.exit_code)
        table.add_row(s.name, s.state.value, s.pid or "", ports, str(s.restarts), exit_code)
    console.print(table)


async def call_api(api: ServiceStatus) -> None:
    url = f"http://{api.host}:{api.ports['main']}/"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        response.raise_for_status()
        body = await response.json()
    print(f"GET {url} -> {response.status} {body}")
    if body.get("schema_version") != "3":
        raise DemoFailed(f"the api did not return the migration's schema version 3: {body}")


def register_handlers(infra: AgentInfra) -> None:
    """The in-process handlers. Registered before the instance starts, so that
    tasks recovered from its store after a crash would find theirs."""

    @infra.task("embed")
    async def embed(text: str) -> list[float]:
        # Submitted with needs=["embedder"]: the service is up when this runs.
        embedder = (await infra.services.status())["embedder"]
        url = f"http://{embedder.host}:{embedder.ports['main']}/embed"
        async with (
            aiohttp.ClientSession() as http,
            http.get(url, params={"text": text}) as response,
        ):
            response.raise_for_status()
            body = await response.json()
        vector: list[float] = body["vector"]
        return vector

    @infra.task("evaluate")
    async def evaluate(candidate: str) -> float:
        await anyio.sleep(0.05)  # async handlers run on the event loop
        return SCORES[candidate]

    @infra.task("fetch")
    def fetch(url: str, run: TaskRun) -> str:
        # A plain function runs in a worker thread; a second parameter gets the
        # attempt's TaskRun. The first attempt fails, as a flaky API would.
        if run.attempt == 1:
            raise ConnectionError(f"{url} hung up")
        return f"200 OK on attempt {run.attempt}"

    @infra.task("candidates")
    async def candidates(dataset: str) -> list[str]:
        return sorted(SCORES)

    @infra.task("pick_best")
    async def pick_best(scored: list[list[Any]]) -> str:
        return str(max(scored, key=lambda pair: pair[1])[0])

    @infra.task("score")
    async def score(candidate: str) -> list[Any]:
        await anyio.sleep(0.01)
        return [candidate, SCORES[candidate]]

    @infra.task("train")
    async def train(steps: int) -> int:
        for _ in range(steps):
            await anyio.sleep(0.1)  # a cancel reaches the handler at an await
        return steps


async def show_classes(infra: AgentInfra) -> None:
    table = Table("class", "runner", "limit", "adaptive", "running", "queued")
    for c in (await infra.task_classes()).values():
        table.add_row(
            c.name, c.runner, str(c.limit), str(c.adaptive), str(c.running), str(c.queued)
        )
    console.print(table)


def shorten(value: object, width: int = 40) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def show_tasks(statuses: dict[str, TaskStatus]) -> None:
    table = Table("task", "class", "prio", "state", "tries", "result or error")
    for label, s in statuses.items():
        outcome = s.result if s.state is TaskState.SUCCEEDED else s.error
        table.add_row(
            label,
            s.task_class,
            str(s.priority),
            s.state.value,
            f"{s.attempts}/{s.max_attempts}",
            shorten(outcome),
        )
    console.print(table)


async def run_tasks(infra: AgentInfra, printer: EventPrinter) -> None:
    """Submit tasks of three classes, cancel one, stream the results, sum up."""
    handles: dict[str, TaskHandle] = {}  # label -> handle

    def track(label: str, handle: TaskHandle) -> TaskHandle:
        printer.labels[handle.task_id] = label
        handles[label] = handle
        return handle

    # Evaluations in the demo's own class "eval", which runs one at a time:
    # the first starts at once, and the urgent one, submitted last, runs next.
    batch = await infra.submit_tasks("evaluate", CANDIDATES, task_class="eval", priority=1)
    for candidate, handle in zip(CANDIDATES, batch, strict=True):
        track(f"eval {candidate}", handle)
    track(
        f"eval {URGENT}",
        await infra.submit_task("evaluate", URGENT, task_class="eval", priority=9),
    )
    # In the default class cpu_short: they wait until the embedder, started
    # for them, is healthy.
    for text in ["hello", "dspy"]:
        handle = await infra.submit_task("embed", text, priority=5, needs=["embedder"])
        track(f"embed {text!r}", handle)
    fetch = track("fetch", await infra.submit_task("fetch", "https://api.example", max_attempts=3))
    train = track("train", await infra.submit_task("train", 600))
    print("task_classes(), with the evaluations queued:")
    await show_classes(infra)

    # Cancel the training once it runs: it stops at its next await.
    await printer.wait_until(
        lambda e: (
            isinstance(e, TaskEvent) and (e.task_id, e.type) == (train.task_id, "task_started")
        )
    )
    cancelled = await infra.cancel_task(train.task_id)
    print(f"cancel_task(train) -> {cancelled.state.value}: {cancelled.error}")

    print("results as they finish (stream_task_results()), with the other events:")
    scores: dict[str, float] = {}
    async for r in infra.stream_task_results([h.task_id for h in handles.values()]):
        label = printer.label(r.task_id)
        ok = r.state is TaskState.SUCCEEDED
        printer.print(r, label, f"result {shorten(r.result)}" if ok else f"error: {r.error}")
        if r.handler == "evaluate" and ok:
            scores[label.removeprefix("eval ")] = r.result

    # A command in a process of its own: class cpu_long, [handlers.report].
    report = track(
        "report", await infra.submit_task("report", {"scores": scores}, task_class="cpu_long")
    )
    print(f"report (process runner) -> {await report.result()}")

    statuses = {label: await h.status() for label, h in handles.items()}
    show_tasks(statuses)
    embedder = (await infra.services.status())["embedder"]
    retried = [
        e.error
        for e in printer.seen
        if isinstance(e, TaskEvent) and e.type == "task_retrying" and e.task_id == fetch.task_id
    ]
    sum_up(statuses, embedder, retried)


OPTIMISE = {
    "name": "optimise",
    "steps": {
        "prepare": {"handler": "candidates", "payload": "${inputs.dataset}"},
        "evaluate": {
            "handler": "score",
            "depends_on": ["prepare"],
            "fan_out": "${steps.prepare.result}",  # one task per candidate, all at once
            "payload": "${item}",
        },
        "select": {
            "handler": "pick_best",
            "depends_on": ["evaluate"],
            "payload": "${steps.evaluate.result}",  # the list of the evaluations
        },
    },
}


async def run_workflow(infra: AgentInfra, printer: EventPrinter) -> None:
    """A DAG of tasks: prepare -> evaluate every candidate (fan-out) -> select."""
    workflow = await infra.workflows.create(OPTIMISE)
    run = await infra.workflows.start_run(workflow.workflow_id, inputs={"dataset": "hotpot"})
    # The run's own events, resumable with since=; they end with the run.
    seen = [event.type async for event in infra.workflows.stream_status(run.run_id)]
    status = await run.wait()
    await printer.wait_until(
        lambda e: isinstance(e, WorkflowEvent) and e.run_id == run.run_id and e.type == seen[-1]
    )
    print(f"stream_status(run): {len(seen)} events, the last {seen[-1]}")
    best = status.results()["select"]
    print(f"workflow optimise: {status.state.value}, {len(SCORES)} candidates, best: {best}")
    if best != max(SCORES, key=SCORES.__getitem__):
        raise DemoFailed(f"the workflow did not select the best candidate: {status}")


async def run_gpu_tasks(infra: AgentInfra, printer: EventPrinter) -> None:
    """One GPU task more than there are GPUs: each leases a device, the last waits for one."""
    count = int((await infra.get_metrics())["dspy_infra_gpus_total"])
    if not count:
        print("no GPUs: nvidia-smi found none (skipped)")
        return
    # Ids of the demo's own, so that the printer names the tasks from their
    # first event on.
    labels = {f"gpu-{i}": f"gpu task {i}" for i in range(1, count + 2)} | {"cpu-1": "cpu task"}
    printer.labels.update(labels)
    gpu = [
        await infra.submit_task("gpu_probe", GPU_WORK, task_class="gpu", task_id=task_id)
        for task_id in list(labels)[:-1]
    ]
    cpu = await infra.submit_task("gpu_probe", 0.0, task_class="cpu_long", task_id="cpu-1")
    seen = [await h.result() for h in [*gpu, cpu]]
    statuses = [await h.status() for h in [*gpu, cpu]]
    table = Table("task", "class", "leased", "CUDA_VISIBLE_DEVICES", "waited")
    for label, s, devices in zip(labels.values(), statuses, seen, strict=True):
        waited = (s.started_at or s.submitted_at) - s.submitted_at
        table.add_row(label, s.task_class, ",".join(s.gpus), repr(devices), f"{waited:.2f}s")
    console.print(table)
    *first, last, cpu_status = statuses
    print(
        f"- {count} GPUs: the first {count} tasks held one each at once; the last waited "
        "for one to be freed (dspy_infra_task_wait_seconds); the cpu task saw none"
    )

    if any(seen[i] != ",".join(s.gpus) or len(s.gpus) != 1 for i, s in enumerate(statuses[:-1])):
        raise DemoFailed(f"a GPU task did not see the one device it leased: {seen}")
    if len({s.gpus for s in first}) != count:
        raise DemoFailed(f"GPU tasks running at once shared a device: {statuses}")
    # It could start only once a device was freed: GPU_WORK after a first one started.
    if (last.started_at or 0.0) < min(s.started_at or 0.0 for s in first) + GPU_WORK * 0.9:
        raise DemoFailed(f"the task beyond the GPUs did not wait for one: {last}")
    if seen[-1] != "" or cpu_status.gpus:
        raise DemoFailed(f"a task without GPUs saw some: {seen[-1]!r}")


def sum_up(
    statuses: dict[str, TaskStatus], embedder: ServiceStatus, retried: list[str | None]
) -> None:
    """Say what happened, and check that it is what should have happened."""
    evaluations = sorted(
        ((label.removeprefix("eval "), s) for label, s in statuses.items() if "eval " in label),
        key=lambda item: item[1].started_at or 0.0,
    )
    order = [f"{name} ({s.priority})" for name, s in evaluations]
    fetch, train, report = statuses["fetch"], statuses["train"], statuses["report"]
    print("what happened:")
    print(f"- priorities: class eval ran one task at a time: {' -> '.join(order)}")
    print(
        f"- needs: the embed tasks waited for the embedder, which was started for them "
        f"({embedder.state.value}, port {embedder.ports['main']})"
    )
    print(
        f"- retries: fetch failed on attempt 1 ({'; '.join(map(str, retried))}), "
        f"and succeeded on attempt {fetch.attempts} of {fetch.max_attempts}"
    )
    print(f"- cancellation: train was {train.state.value} at its next await ({train.error})")
    print(
        f"- process runner: report ran examples/demo/tasks/report.py in process "
        f"{report.result['pid']} and found the best candidate: {report.result['best']}"
    )

    failed = {label: s for label, s in statuses.items() if s.state is not TaskState.SUCCEEDED}
    if list(failed) != ["train"] or train.state is not TaskState.CANCELLED:
        raise DemoFailed(f"only train should have ended without a result: {failed}")
    if evaluations[1][1].priority != 9:
        raise DemoFailed(f"the priority 9 evaluation did not run second: {order}")
    if fetch.attempts != 2 or len(retried) != 1:
        raise DemoFailed(f"fetch should have succeeded on its second attempt: {fetch}")
    if not embedder.state.is_up:
        raise DemoFailed(f"the embedder is not up: {embedder}")
    if report.result["best"] != max(SCORES, key=SCORES.__getitem__):
        raise DemoFailed(f"the report did not find the best candidate: {report.result}")


def machine_overrides() -> dict[str, Any]:
    """What the demo changes in its configuration for this machine."""
    overrides: dict[str, Any] = {}
    if shutil.which("redis-server"):
        overrides["services"] = {"kv": {"command": REDIS}}  # replaces only kv's command
    if not shutil.which("nvidia-smi"):
        # No GPU here: two ids to lease stand in, as in a test.
        overrides["gpus"] = [0, 1]
    print(f"kv: {'redis-server' if 'services' in overrides else 'examples/demo/services/kv.py'}")
    print(f"gpus: {'[0, 1], configured' if 'gpus' in overrides else 'as nvidia-smi finds them'}")
    return overrides


async def main() -> None:
    overrides = machine_overrides()
    printer = EventPrinter(time.time())
    pids: set[int] = set()
    with tempfile.TemporaryDirectory(prefix="dspy-infra-demo-") as state_dir:
        async with anyio.create_task_group() as tg:
            print("events:")
            infra = AgentInfra.start(CONFIG, state_dir=state_dir, **overrides)
            register_handlers(infra)
            async with infra:
                # Here every autostart service is up: healthy, or completed (the migration).
                tg.start_soon(printer.run, infra)
                await printer.wait_for("api", "service_healthy")
                statuses = await infra.services.status()
                show(statuses)
                pids.update(int(s.pid) for s in statuses.values() if s.pid)
                await call_api(statuses["api"])

                worker_pid = statuses["worker"].pid
                if worker_pid is None:
                    raise DemoFailed(f"the worker has no process: {statuses['worker']}")
                print(f"kill -9 the worker (pid {worker_pid}), restart='on-failure':")
                mark = len(printer.seen)
                os.kill(int(worker_pid), signal.SIGKILL)
                with anyio.fail_after(10):
                    await printer.wait_for("worker", "service_restarting", after=mark)
                    await printer.wait_for("worker", "service_healthy", after=mark)
                statuses = await infra.services.status()
                show(statuses)
                pids.update(int(s.pid) for s in statuses.values() if s.pid)
                if statuses["worker"].restarts != 1:
                    raise DemoFailed(f"expected 1 restart of the worker: {statuses['worker']}")

                print("tasks:")
                with anyio.fail_after(20):
                    await run_tasks(infra, printer)
                print("a workflow (infra.workflows):")
                with anyio.fail_after(20):
                    await run_workflow(infra, printer)
                print("GPU tasks (class gpu, process runner):")
                with anyio.fail_after(30):
                    await run_gpu_tasks(infra, printer)
                statuses = await infra.services.status()
                pids.update(int(s.pid) for s in statuses.values() if s.pid)
                print("leaving the `async with` block: teardown, dependents first")
    # The event stream ended with the instance; now nothing it started may be left.
    left = [pid for pid in sorted(pids) if group_alive(pid)]
    if left:
        raise DemoFailed(f"processes left after teardown: {left}")
    print(f"teardown clean: none of the {len(pids)} process groups started is left")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc


if __name__ == "__main__":
    try:
        anyio.run(main)
    except* (InfraError, DemoFailed, TimeoutError, OSError, aiohttp.ClientError) as group:
        sys.exit("\n".join(f"demo failed: {exc}" for exc in leaves(group)))
