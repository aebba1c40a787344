"""gRPC benchmark: the served AgentInfra against a bare grpclib service, on the same machine.

    .venv/bin/python benchmarks/grpc.py [--quick] [--check]

A server process (this script with ``--serve-worker``) serves three things
on three loopback ports: an ``AgentInfra`` through
:func:`dspy_infra.remote.serve` (durable store, an async no-op handler), the
same with ``durable = false``, and a bare grpclib service with no library
code behind it. This process is the client of both, so client and
server each have their own interpreter and event loop, as with
``dspy-infra serve``.

SubmitTask round trip
    ``N`` sequential ``await infra.submit_task("noop", {"i": i})`` calls
    through ``AgentInfra.connect()``: each returns once the task is in the
    server's durable store. The baseline is a bare grpclib unary call of
    the same request and reply messages (``SubmitTaskRequest`` /
    ``SubmitTaskResponse``) to a handler that answers at once: the cost of
    gRPC itself on this machine. ``ratio_p50`` = our p50 / the bare p50,
    target <= 1.5. p99 is shown beside it. The same is measured against a
    second served instance with ``durable = false`` (``memory_ratio_p50``):
    the difference between the two is the store's commit, which the durable
    submit waits for. After a warm-up of 100 calls each, the three sides
    take turns of 50 back-to-back calls (the first three of each turn not
    counted) until each has ``N``: on a shared machine whose speed drifts,
    sides measured one after the other would compare different minutes.
concurrent submit throughput
    64 callers on one connection, each submitting sequentially, ``M`` tasks
    in all: tasks accepted per second (first call to last reply). Beside it
    the bare unary call under the same 64 callers.
StreamEvents
    The server first runs ``K`` no-op tasks so that its event history holds
    their events; then ``stream_events(since=0)`` replays the history, and
    the rate is the messages received per second (opening the stream to the
    last message; the median of ``--repeats`` rounds). Beside it a bare
    grpclib server stream that sends the same number of prebuilt ``Event``
    messages.

The last line of stdout is a JSON object alone. ``--quick`` uses small sizes
(a smoke test); with ``--check`` the exit status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from typing import Any

import anyio
from attrs import frozen
from grpclib.client import Channel, UnaryStreamMethod, UnaryUnaryMethod
from grpclib.const import Cardinality, Handler
from grpclib.server import Server, Stream
from rich.console import Console
from rich.table import Table

from dspy_infra import AgentInfra
from dspy_infra.remote import RemoteAgentInfra, serve
from dspy_infra.remote._generated.orchestrator import v1 as orch_pb

RATIO_TARGET = 1.5
CALLERS = 64
SUBMIT = "/bench.Echo/Submit"
STREAM = "/bench.Echo/Stream"


@frozen
class Sizes:
    latency_samples: int
    throughput_tasks: int
    stream_tasks: int
    repeats: int


NORMAL = Sizes(latency_samples=2000, throughput_tasks=10_000, stream_tasks=3000, repeats=3)
QUICK = Sizes(latency_samples=100, throughput_tasks=640, stream_tasks=200, repeats=1)


# -- the server process --------------------------------------------------------------


async def noop(payload: Any) -> None:
    """The task handler: nothing, so that only the submit path is measured."""


def _request(i: int) -> orch_pb.SubmitTaskRequest:
    """What the library's client sends for ``submit_task("noop", {"i": i})``."""
    return orch_pb.SubmitTaskRequest(
        handler="noop", payload_json=f'{{"i":{i}}}', task_class="cpu_short"
    )


class BareEcho:
    """A grpclib service with nothing behind it: the floor for a call on this machine."""

    def __init__(self) -> None:
        self._reply = orch_pb.SubmitTaskResponse(task_id="01a2b3c4d5e6f708192a3b4c5d6e7f80")
        self._event = orch_pb.Event(
            task=orch_pb.TaskEvent(
                seq=1,
                time=time.time(),
                type="task_completed",
                task_id="01a2b3c4d5e6f708192a3b4c5d6e7f80",
                task_class="cpu_short",
                handler="noop",
                state="succeeded",
                attempt=1,
            )
        )

    async def submit(
        self, stream: Stream[orch_pb.SubmitTaskRequest, orch_pb.SubmitTaskResponse]
    ) -> None:
        await stream.recv_message()
        await stream.send_message(self._reply)

    async def events(self, stream: Stream[orch_pb.StreamEventsRequest, orch_pb.Event]) -> None:
        request = await stream.recv_message()
        count = request.since if request is not None and request.since else 0
        for _ in range(count):
            await stream.send_message(self._event)

    def __mapping__(self) -> Mapping[str, Handler]:
        return {
            SUBMIT: Handler(
                self.submit,
                Cardinality.UNARY_UNARY,
                orch_pb.SubmitTaskRequest,
                orch_pb.SubmitTaskResponse,
            ),
            STREAM: Handler(
                self.events, Cardinality.UNARY_STREAM, orch_pb.StreamEventsRequest, orch_pb.Event
            ),
        }


def _loopback_socket() -> socket.socket:
    # proto=IPPROTO_TCP, as the library's server: else asyncio leaves Nagle on.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    return sock


async def serve_worker(state_dir: str) -> None:
    """Serve all three until stdin closes; print their addresses as one JSON line first."""
    bare = Server([BareEcho()])
    sock = _loopback_socket()
    await bare.start(sock=sock)
    durable = {"infra": {"state_dir": f"{state_dir}/durable"}}
    memory = {"infra": {"state_dir": f"{state_dir}/memory", "durable": False}}
    async with (
        AgentInfra.start(durable, handlers={"noop": noop}) as infra,
        serve(infra, "127.0.0.1:0") as server,
        AgentInfra.start(memory, handlers={"noop": noop}) as memory_infra,
        serve(memory_infra, "127.0.0.1:0") as memory_server,
    ):
        addresses = {
            "ours": server.address,
            "memory": memory_server.address,
            "bare": f"127.0.0.1:{sock.getsockname()[1]}",
        }
        print(json.dumps(addresses), flush=True)
        # Until the parent closes our stdin (or dies).
        await anyio.to_thread.run_sync(sys.stdin.read)
    bare.close()
    await bare.wait_closed()


# -- the client -----------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


Call = Callable[[int], Awaitable[object]]
BLOCK = 50  # sequential calls to one side before the next side's turn


async def latencies(sides: Mapping[str, Call], samples: int) -> dict[str, list[float]]:
    """Round trips of sequential calls, ``samples`` per side, taken in turns of ``BLOCK``.

    Each side makes its calls back to back, as one caller would; the sides
    take turns so that a machine whose speed drifts (a shared VM) slows them
    alike, instead of whichever was measured in the slow minute. The first
    three calls of each turn are not counted (the switch between servers).
    """
    times: dict[str, list[float]] = {name: [] for name in sides}
    for call in sides.values():  # warm-up
        for i in range(100):
            await call(i)
    i = 0
    while min(len(t) for t in times.values()) < samples:
        for name, call in sides.items():
            for k in range(BLOCK):
                t0 = time.perf_counter()
                await call(i)
                elapsed = time.perf_counter() - t0
                i += 1
                if k >= 3 and len(times[name]) < samples:
                    times[name].append(elapsed)
    return times


def ours_call(infra: RemoteAgentInfra) -> Call:
    async def call(i: int) -> object:
        return await infra.submit_task("noop", {"i": i})

    return call


def bare_call(channel: Channel) -> Call:
    method = UnaryUnaryMethod(
        channel, SUBMIT, orch_pb.SubmitTaskRequest, orch_pb.SubmitTaskResponse
    )

    async def call(i: int) -> object:
        return await method(_request(i))

    return call


async def throughput(one: Call, total: int) -> float:
    """Calls accepted per second with ``CALLERS`` callers, each calling sequentially."""
    per_caller = total // CALLERS

    async def caller(c: int) -> None:
        for i in range(per_caller):
            await one(c * per_caller + i)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for c in range(CALLERS):
            tg.start_soon(caller, c)
    return per_caller * CALLERS / (time.perf_counter() - t0)


async def _replay(
    infra: RemoteAgentInfra, count: int | None, idle: float = 1.0
) -> tuple[int, float]:
    """Read the history from the start: ``count`` messages (or until ``idle`` s of quiet)."""
    seen = 0
    t0 = time.perf_counter()
    last = t0
    async with aclosing(infra.stream_events(since=0)) as events:
        while count is None or seen < count:
            event = None
            with anyio.move_on_after(idle):
                event = await anext(events, None)
            if event is None:
                break
            seen += 1
            last = time.perf_counter()
    return seen, last - t0


async def ours_stream(infra: RemoteAgentInfra, sizes: Sizes) -> tuple[int, float]:
    handles = await infra.submit_tasks("noop", range(sizes.stream_tasks))
    async with aclosing(infra.stream_task_results([h.task_id for h in handles])) as results:
        async for _ in results:
            pass
    # How many the history holds now (nothing else happens on the server meanwhile).
    total, _ = await _replay(infra, None)
    rates = []
    for _ in range(sizes.repeats):
        seen, elapsed = await _replay(infra, total)
        rates.append(seen / elapsed)
    return total, statistics.median(rates)


async def bare_stream(channel: Channel, count: int, repeats: int) -> float:
    method = UnaryStreamMethod(channel, STREAM, orch_pb.StreamEventsRequest, orch_pb.Event)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        seen = 0
        async with method.open() as stream:
            await stream.send_message(orch_pb.StreamEventsRequest(since=count), end=True)
            async for _ in stream:
                seen += 1
        rates.append(seen / (time.perf_counter() - t0))
    return statistics.median(rates)


@frozen
class Results:
    ours_latency: list[float]
    memory_latency: list[float]
    bare_latency: list[float]
    ours_tps: float
    bare_tps: float
    stream_messages: int
    ours_stream: float
    bare_stream: float


async def measure(sizes: Sizes) -> Results:
    with tempfile.TemporaryDirectory() as state_dir:
        command = [sys.executable, __file__, "--serve-worker", state_dir]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}
        async with await anyio.open_process(command, env=env) as process:
            assert process.stdout is not None
            assert process.stdin is not None
            try:
                buffer = b""
                with anyio.fail_after(60):
                    while b"\n" not in buffer:
                        buffer += await process.stdout.receive()
                addresses = json.loads(buffer.split(b"\n")[0])
                host, port = addresses["bare"].rsplit(":", 1)
                channel = Channel(host, int(port))
                try:
                    async with (
                        AgentInfra.connect(addresses["memory"]) as memory,
                        AgentInfra.connect(addresses["ours"]) as infra,
                    ):
                        lat = await latencies(
                            {
                                "ours": ours_call(infra),
                                "memory": ours_call(memory),
                                "bare": bare_call(channel),
                            },
                            sizes.latency_samples,
                        )
                        ours_lat, memory_lat, bare_lat = lat["ours"], lat["memory"], lat["bare"]
                        ours_tps = await throughput(ours_call(infra), sizes.throughput_tasks)
                        bare_tps = await throughput(bare_call(channel), sizes.throughput_tasks)
                        total, ours_rate = await ours_stream(infra, sizes)
                        bare_rate = await bare_stream(channel, total, sizes.repeats)
                finally:
                    channel.close()
            finally:
                await process.stdin.aclose()
                with anyio.move_on_after(30):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
    return Results(ours_lat, memory_lat, bare_lat, ours_tps, bare_tps, total, ours_rate, bare_rate)


def summary(r: Results) -> dict[str, Any]:
    ours_p50 = statistics.median(r.ours_latency) * 1000
    bare_p50 = statistics.median(r.bare_latency) * 1000
    memory_p50 = statistics.median(r.memory_latency) * 1000
    ratio = ours_p50 / bare_p50
    return {
        "benchmark": "grpc",
        "submit_p50_ms": round(ours_p50, 4),
        "submit_p99_ms": round(_percentile(r.ours_latency, 0.99) * 1000, 4),
        "echo_p50_ms": round(bare_p50, 4),
        "echo_p99_ms": round(_percentile(r.bare_latency, 0.99) * 1000, 4),
        "ratio_p50": round(ratio, 3),
        "ratio_ok": ratio <= RATIO_TARGET,
        "memory_submit_p50_ms": round(memory_p50, 4),
        "memory_ratio_p50": round(memory_p50 / bare_p50, 3),
        "submit_tps_64": round(r.ours_tps, 1),
        "echo_tps_64": round(r.bare_tps, 1),
        "stream_messages": r.stream_messages,
        "stream_msgs_per_s": round(r.ours_stream, 1),
        "echo_stream_msgs_per_s": round(r.bare_stream, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }


def report(console: Console, s: dict[str, Any]) -> None:
    table = Table(title="gRPC: the served AgentInfra vs a bare grpclib service")
    for column in ("figure", "ours", "bare grpclib", "ratio", "target", "verdict"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    verdict = "[green]PASS[/green]" if s["ratio_ok"] else "[red]FAIL[/red]"
    table.add_row(
        "SubmitTask round trip p50",
        f"{s['submit_p50_ms']:.3f} ms",
        f"{s['echo_p50_ms']:.3f} ms",
        f"{s['ratio_p50']:.2f}",
        f"<= {RATIO_TARGET:g}",
        verdict,
    )
    table.add_row(
        "  the same, durable = false",
        f"{s['memory_submit_p50_ms']:.3f} ms",
        f"{s['echo_p50_ms']:.3f} ms",
        f"{s['memory_ratio_p50']:.2f}",
        "-",
        "-",
    )
    table.add_row(
        "SubmitTask round trip p99",
        f"{s['submit_p99_ms']:.3f} ms",
        f"{s['echo_p99_ms']:.3f} ms",
        f"{s['submit_p99_ms'] / s['echo_p99_ms']:.2f}",
        "-",
        "-",
    )
    table.add_row(
        f"submits/s, {CALLERS} callers",
        f"{s['submit_tps_64']:,.0f}",
        f"{s['echo_tps_64']:,.0f}",
        f"{s['submit_tps_64'] / s['echo_tps_64']:.2f}",
        "-",
        "-",
    )
    table.add_row(
        f"StreamEvents messages/s ({s['stream_messages']})",
        f"{s['stream_msgs_per_s']:,.0f}",
        f"{s['echo_stream_msgs_per_s']:,.0f}",
        f"{s['stream_msgs_per_s'] / s['echo_stream_msgs_per_s']:.2f}",
        "-",
        "-",
    )
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--serve-worker", metavar="STATE_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_worker is not None:
        anyio.run(serve_worker, args.serve_worker)
        return 0
    result = summary(anyio.run(measure, QUICK if args.quick else NORMAL))
    report(Console(width=120), result)
    print(json.dumps(result), flush=True)
    return 1 if args.check and not result["ratio_ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
