"""Docker start-up benchmark: a 5-service stack to healthy, by AgentInfra and by docker-compose.

    .venv/bin/python benchmarks/docker_startup.py [--quick] [--runs N] [--samples N] [--check]

The stack
    Five services, ``a`` to ``e``, with a 4-level dependency chain and a
    branch: ``a -> b -> c -> d`` and ``a -> e`` (each depends on its parent
    being healthy). Each is the local busybox image (``local/busybox:latest``,
    built from the host's static busybox when missing) running
    ``mkdir -p /www && echo NAME > /www/index.html && exec httpd -f -p PORT -h /www``
    under ``/bin/sh -c``, with ``init`` on and its port published on
    127.0.0.1. Every service is an HTTP server, none a bare TCP listener
    (``nc``): Docker's userland proxy (``docker-proxy``, on by default)
    accepts TCP connections on a published port as soon as the container
    starts, before anything listens inside, so a TCP check from the host
    would pass at once and flatter our side. An HTTP GET answered with a
    status is a real "up" on both sides.

(a) AgentInfra (``ours_s``)
    The stack as a dict config: ``infra.backend = "docker"``, a project of
    its own per run, ``ports = {main = 0}``, ``depends_on`` the parent, and
    the library's own probe from the host, ``health = {http =
    "http://127.0.0.1:{port}/"}`` (default cadence). Timed from just before
    ``AgentInfra.start(...)`` is entered until ``async with`` hands the
    instance over (every service healthy: the backend's sweep, the instance
    network, the launches and probes all included). ``ours_teardown_s`` is
    leaving the block: every container stopped and removed, the network
    removed.

(b) docker-compose (``compose_s``)
    The equivalent compose file (same image, same command with a fixed
    container port 8080, ``init: true``, port published as
    ``127.0.0.1::8080``, ``depends_on: {PARENT: {condition:
    service_healthy}}``), with the in-container healthcheck ``wget -q -O
    /dev/null http://127.0.0.1:8080/`` at ``interval: 1s``, ``timeout: 1s``,
    ``retries: 30``. The 1 s interval is deliberate: compose's default is
    30 s, and a dependent waits for its parent's first passing check, so
    with the default every level would cost about 30 s and the comparison
    would measure that setting, not the tools (1 s is the shortest interval
    people commonly write; Docker 20.10 has no ``start_interval``). Timed
    from just before ``docker-compose -p NAME -f FILE up -d`` (Debian's
    docker-compose 1.29, run with ``anyio.run_process``) until ``docker
    inspect`` (through aiodocker, every 50 ms) reports all five containers
    ``healthy``. ``compose_teardown_s`` is ``docker-compose down -v
    --timeout 1``.

    ``speedup`` = median ``compose_s`` / median ``ours_s``; target >= 3.
    Runs alternate ours, compose, ours, ... (3 pairs by default, ``--runs``)
    on the same images and machine; the figures are medians over the runs.
    Whatever happens, each run removes what it created (``down -v`` and a
    forced removal of anything still carrying the run's project label).

One container (``single_*``)
    The median, over ``--samples`` (10 by default; after one warm-up each,
    not counted), of create -> healthy for one busybox httpd container with a
    published port, samples alternating:

    - ``single_ours_ms``: through our docker backend directly
      (``load_backend("docker")``, ``open``, then ``launch(LaunchSpec(...))``:
      image lookup, create on the instance network, a check that the program
      exists in the image (once per image and program), start), timed from
      just before ``launch`` until the published port answers an HTTP
      request; then ``stop`` (not timed).
    - ``single_bare_ms``: a bare aiodocker loop: ``containers.create`` (same
      image, command and port binding on the default bridge), ``start``, the
      same poll; then ``delete(force=True)`` (not timed).
    - ``single_bare_like_ours_ms``: the same bare loop with the container
      configured as our backend configures it: ``Init`` on and attached to a
      user-defined network (with an alias), which is what lets services reach
      each other by name. Docker takes longer to start such a container;
      ours minus this is the backend's own work (image lookup, labels, the
      program check, the event bookkeeping).

    The poll, the same on both sides, connects to 127.0.0.1:PORT every 5 ms
    and sends ``GET /``; it counts as up when the answer starts with
    ``HTTP/`` (see above: the bare TCP connect is accepted by docker-proxy).
    ``single_ratio`` = ours / bare: what our backend adds to a container's
    start, its choices of container configuration included (1.0 would be
    nothing); ``single_like_ratio`` = ours / bare like ours.

The last line of stdout is a JSON object alone: the medians named above,
``compose_up_s`` (``up -d`` alone, which returns once the last containers
are started, about a healthcheck interval before they are healthy),
``runs`` (the number of pairs), each pair's figures under ``per_run``, and
``machine`` (CPU count, Docker and docker-compose versions, platform).
``--quick`` makes one run
of each and 3 single-container samples (a smoke test); with ``--check`` the
exit status is 1 when the speedup is below 3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiodocker
import anyio
from attrs import frozen
from rich.console import Console
from rich.table import Table

from dspy_infra import AgentInfra, ServiceState
from dspy_infra.abc import ContainerBackend, LaunchSpec
from dspy_infra.backends import load_backend
from dspy_infra.docker import busybox_image

BUSYBOX = "local/busybox:latest"
PARENTS: dict[str, str | None] = {"a": None, "b": "a", "c": "b", "d": "c", "e": "a"}
SCRIPT = "mkdir -p /www && echo {name} > /www/index.html && exec httpd -f -p {port} -h /www"
COMPOSE_PORT = 8080
COMPOSE_POLL = 0.05  # seconds between two `docker inspect` rounds
HTTP_POLL = 0.005  # seconds between two attempts of the single-container poll
DEADLINE = 60.0  # seconds any one stack or container may take to come up
SPEEDUP_TARGET = 3.0
OUR_LABEL = "dspy-infra.project"
COMPOSE_LABEL = "com.docker.compose.project"
BARE_LABEL = "dspy-infra-bench.docker-startup"


@frozen
class StackRun:
    ours: float
    ours_teardown: float
    compose: float
    compose_up: float  # `up -d` alone: it returns once the last containers are started
    compose_teardown: float


@frozen
class Results:
    runs: list[StackRun]
    single_ours: list[float]
    single_bare: list[float]
    single_bare_like_ours: list[float]
    machine: dict[str, Any]


def _name(kind: str) -> str:
    return f"bench-{kind}-{uuid.uuid4().hex[:8]}"


# -- (a) AgentInfra ----------------------------------------------------------------


def infra_config(project: str) -> dict[str, Any]:
    return {
        "infra": {"backend": "docker", "project": project},
        "services": {
            name: {
                "image": BUSYBOX,
                "command": SCRIPT.format(name="{name}", port="{port}"),
                "shell": True,
                "ports": {"main": 0},
                "depends_on": [parent] if parent else [],
                "health": {"http": "http://127.0.0.1:{port}/"},
            }
            for name, parent in PARENTS.items()
        },
    }


async def run_ours() -> tuple[float, float]:
    """Seconds to all healthy, and to leave the block; nothing of the run is left."""
    project = _name("ours")
    try:
        with tempfile.TemporaryDirectory(prefix="dspy-infra-bench-") as state_dir:
            t0 = time.perf_counter()
            with anyio.fail_after(DEADLINE):
                async with AgentInfra.start(infra_config(project), state_dir=state_dir) as infra:
                    ready = time.perf_counter()
                    status = await infra.services.status()
                    if any(s.state is not ServiceState.HEALTHY for s in status.values()):
                        raise RuntimeError(f"not all healthy on hand-over: {status}")
                    leaving = time.perf_counter()
            left = time.perf_counter()
    finally:
        await remove_labelled(f"{OUR_LABEL}={project}")
    return ready - t0, left - leaving


# -- (b) docker-compose ------------------------------------------------------------


def compose_file(project: str) -> dict[str, Any]:
    url = f"http://127.0.0.1:{COMPOSE_PORT}/"
    services: dict[str, Any] = {}
    for name, parent in PARENTS.items():
        service: dict[str, Any] = {
            "image": BUSYBOX,
            "command": ["/bin/sh", "-c", SCRIPT.format(name=name, port=COMPOSE_PORT)],
            "init": True,
            "ports": [f"127.0.0.1::{COMPOSE_PORT}"],
            "healthcheck": {
                "test": ["CMD", "wget", "-q", "-O", "/dev/null", url],
                "interval": "1s",
                "timeout": "1s",
                "retries": 30,
            },
        }
        if parent:
            service["depends_on"] = {parent: {"condition": "service_healthy"}}
        services[name] = service
    return {"version": "2.4", "services": services}


async def compose(project: str, path: Path, *args: str) -> None:
    command = ["docker-compose", "-p", project, "-f", str(path), *args]
    result = await anyio.run_process(command, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr.decode()}"
        )


async def all_healthy(docker: aiodocker.Docker, label: str, count: int) -> bool:
    """``docker inspect`` of every container with ``label``: all ``count`` of them healthy?"""
    containers = await docker.containers.list(all=True, filters=json.dumps({"label": [label]}))
    if len(containers) < count:
        return False
    states = [(await c.show())["State"] for c in containers]
    return all((s.get("Health") or {}).get("Status") == "healthy" for s in states)


async def run_compose() -> tuple[float, float, float]:
    """Seconds to all healthy, for ``up -d`` alone, and for ``down``; nothing is left."""
    project = _name("compose").replace("-", "")  # compose drops dashes from project names
    with tempfile.TemporaryDirectory(prefix="dspy-infra-bench-") as tmp:
        path = Path(tmp, "docker-compose.yml")
        await anyio.Path(path).write_text(
            json.dumps(compose_file(project), indent=2)
        )  # JSON is YAML
        label = f"{COMPOSE_LABEL}={project}"
        down = False
        try:
            async with aiodocker.Docker() as docker:
                t0 = time.perf_counter()
                with anyio.fail_after(DEADLINE):
                    await compose(project, path, "up", "-d")
                    up = time.perf_counter()
                    # The poll is the measurement: compose has no event to wait for.
                    while not await all_healthy(docker, label, len(PARENTS)):  # noqa: ASYNC110
                        await anyio.sleep(COMPOSE_POLL)
                ready = time.perf_counter()
            leaving = time.perf_counter()
            down = True
            await compose(project, path, "down", "-v", "--timeout", "1")
            left = time.perf_counter()
        finally:
            with anyio.CancelScope(shield=True):
                if not down:
                    with contextlib.suppress(RuntimeError):
                        await compose(project, path, "down", "-v", "--timeout", "1")
                await remove_labelled(label)
    return ready - t0, up - t0, left - leaving


# -- one container -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def answers_http(port: int) -> bool:
    try:
        with anyio.fail_after(1):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"GET / HTTP/1.0\r\n\r\n")
                return (await stream.receive(16)).startswith(b"HTTP/")
    except (OSError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError):
        return False


async def wait_http(port: int) -> None:
    with anyio.fail_after(DEADLINE):
        while not await answers_http(port):  # noqa: ASYNC110 - the poll is what is timed
            await anyio.sleep(HTTP_POLL)


async def single_ours(backend: ContainerBackend, port: int) -> float:
    spec = LaunchSpec(
        name="single",
        command=SCRIPT.format(name="single", port=port),
        shell=True,
        ports={"main": port},
        image=BUSYBOX,
    )
    t0 = time.perf_counter()
    service = await backend.launch(spec)
    try:
        await wait_http(port)
        return time.perf_counter() - t0
    finally:
        await service.stop(5.0)


async def single_bare(
    docker: aiodocker.Docker, port: int, label: str, network: str | None = None
) -> float:
    """The bare loop; with ``network``, on that network with ``Init``, as our backend does."""
    config: dict[str, Any] = {
        "Image": BUSYBOX,
        "Cmd": ["/bin/sh", "-c", SCRIPT.format(name="single", port=port)],
        "Labels": {BARE_LABEL: label},
        "ExposedPorts": {f"{port}/tcp": {}},
        "HostConfig": {
            "PortBindings": {f"{port}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
        },
    }
    if network is not None:
        config["HostConfig"].update(Init=True, NetworkMode=network)
        config["NetworkingConfig"] = {"EndpointsConfig": {network: {"Aliases": ["single"]}}}
    t0 = time.perf_counter()
    container = await docker.containers.create(config)
    try:
        await container.start()
        await wait_http(port)
        return time.perf_counter() - t0
    finally:
        with anyio.CancelScope(shield=True):
            await container.delete(force=True)


async def single_container(samples: int) -> tuple[list[float], list[float], list[float]]:
    """Create -> healthy of one container: ours, bare, bare like ours; after a warm-up each."""
    project = _name("single")
    backend = load_backend("docker")
    ours: list[float] = []
    bare: list[float] = []
    like: list[float] = []
    try:
        with tempfile.TemporaryDirectory(prefix="dspy-infra-bench-") as state_dir:
            await backend.open(
                state_dir=Path(state_dir), instance_id=uuid.uuid4().hex[:12], project=project
            )
            try:
                async with aiodocker.Docker() as docker:
                    network = project
                    labels = {BARE_LABEL: project}
                    await docker.networks.create({"Name": network, "Labels": labels})
                    for i in range(-1, samples):
                        mine = await single_ours(backend, free_port())
                        theirs = await single_bare(docker, free_port(), project)
                        alike = await single_bare(docker, free_port(), project, network)
                        if i >= 0:
                            ours.append(mine)
                            bare.append(theirs)
                            like.append(alike)
            finally:
                await backend.close()
    finally:
        await remove_labelled(f"{OUR_LABEL}={project}")
        await remove_labelled(f"{BARE_LABEL}={project}")
    return ours, bare, like


# -- housekeeping ------------------------------------------------------------------


async def remove_labelled(label: str) -> None:
    """Force-remove the containers and networks carrying ``label``: nothing may be left."""
    with anyio.CancelScope(shield=True):
        async with aiodocker.Docker() as docker:
            filters = json.dumps({"label": [label]})
            for container in await docker.containers.list(all=True, filters=filters):
                with contextlib.suppress(aiodocker.DockerError):
                    await container.delete(force=True, v=True)
            for network in await docker.networks.list(filters={"label": [label]}):
                with contextlib.suppress(aiodocker.DockerError):
                    await (await docker.networks.get(network["Id"])).delete()


async def machine() -> dict[str, Any]:
    async with aiodocker.Docker() as docker:
        version = await docker.version()
    compose_version = await anyio.run_process(["docker-compose", "version", "--short"])
    return {
        "cpus": os.cpu_count(),
        "docker": version.get("Version"),
        "docker_api": version.get("ApiVersion"),
        "docker_compose": compose_version.stdout.decode().strip(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


# -- the run -----------------------------------------------------------------------


async def measure(runs: int, samples: int, progress: Callable[[str], None]) -> Results:
    await busybox_image(BUSYBOX)
    found = await machine()
    stack: list[StackRun] = []
    for i in range(runs):
        ours, ours_down = await run_ours()
        progress(f"run {i + 1}: ours {ours:.3f} s (teardown {ours_down:.3f} s)")
        theirs, up, theirs_down = await run_compose()
        progress(f"run {i + 1}: compose {theirs:.3f} s (teardown {theirs_down:.3f} s)")
        stack.append(StackRun(ours, ours_down, theirs, up, theirs_down))
    single_ours_s, single_bare_s, single_like_s = await single_container(samples)
    return Results(stack, single_ours_s, single_bare_s, single_like_s, found)


def _median(runs: Sequence[StackRun], figure: Callable[[StackRun], float]) -> float:
    return statistics.median(figure(r) for r in runs)


def summary(r: Results) -> dict[str, Any]:
    ours = _median(r.runs, lambda x: x.ours)
    theirs = _median(r.runs, lambda x: x.compose)
    single_ours = statistics.median(r.single_ours) * 1000
    single_bare = statistics.median(r.single_bare) * 1000
    single_like = statistics.median(r.single_bare_like_ours) * 1000
    return {
        "benchmark": "docker_startup",
        "services": len(PARENTS),
        "runs": len(r.runs),
        "ours_s": round(ours, 3),
        "compose_s": round(theirs, 3),
        "speedup": round(theirs / ours, 3),
        "ours_teardown_s": round(_median(r.runs, lambda x: x.ours_teardown), 3),
        "compose_teardown_s": round(_median(r.runs, lambda x: x.compose_teardown), 3),
        "compose_up_s": round(_median(r.runs, lambda x: x.compose_up), 3),
        "single_samples": len(r.single_ours),
        "single_ours_ms": round(single_ours, 1),
        "single_bare_ms": round(single_bare, 1),
        "single_ratio": round(single_ours / single_bare, 3),
        "single_bare_like_ours_ms": round(single_like, 1),
        "single_like_ratio": round(single_ours / single_like, 3),
        "speedup_target": SPEEDUP_TARGET,
        "speedup_ok": theirs / ours >= SPEEDUP_TARGET,
        "per_run": [
            {
                "ours_s": round(x.ours, 3),
                "compose_s": round(x.compose, 3),
                "ours_teardown_s": round(x.ours_teardown, 3),
                "compose_teardown_s": round(x.compose_teardown, 3),
            }
            for x in r.runs
        ],
        "machine": r.machine,
    }


def report(console: Console, r: Results, s: dict[str, Any]) -> None:
    m = r.machine
    console.print(
        f"[bold]dspy-infra docker start-up benchmark[/bold]: {len(PARENTS)} busybox httpd "
        f"services, a -> b -> c -> d and a -> e, each waiting for its parent to be healthy\n"
        f"{m['cpus']} CPUs, {m['platform']}, Python {m['python']}, Docker {m['docker']} "
        f"(API {m['docker_api']}), docker-compose {m['docker_compose']}"
    )
    table = Table(title="All healthy and teardown, per run (s)")
    for column in (
        "run",
        "ours",
        "compose",
        "(compose up -d)",
        "speedup",
        "ours down",
        "compose down",
    ):
        table.add_column(column, justify="right")
    for i, x in enumerate(r.runs, 1):
        table.add_row(
            str(i),
            f"{x.ours:.3f}",
            f"{x.compose:.3f}",
            f"{x.compose_up:.3f}",
            f"{x.compose / x.ours:.2f}",
            f"{x.ours_teardown:.3f}",
            f"{x.compose_teardown:.3f}",
        )
    verdict = "[green]PASS[/green]" if s["speedup_ok"] else "[red]FAIL[/red]"
    table.add_row(
        "median",
        f"{s['ours_s']:.3f}",
        f"{s['compose_s']:.3f}",
        f"{s['compose_up_s']:.3f}",
        f"{s['speedup']:.2f} (>= {SPEEDUP_TARGET:g}: {verdict})",
        f"{s['ours_teardown_s']:.3f}",
        f"{s['compose_teardown_s']:.3f}",
    )
    console.print(table)
    title = f"One container, create -> answers HTTP (ms, {s['single_samples']} samples)"
    single = Table(title=title)
    for column in ("side", "median", "min", "max"):
        single.add_column(column, justify="left" if column == "side" else "right")
    for side, values in (
        ("our docker backend: launch()", r.single_ours),
        ("bare aiodocker: create + start", r.single_bare),
        ("bare aiodocker, Init + a user network (as ours)", r.single_bare_like_ours),
    ):
        single.add_row(
            side,
            f"{statistics.median(values) * 1000:.1f}",
            f"{min(values) * 1000:.1f}",
            f"{max(values) * 1000:.1f}",
        )
    console.print(single)
    console.print(
        f"single_ratio (ours / bare) = {s['single_ratio']:.3f}; "
        f"ours / bare with our container config = {s['single_like_ratio']:.3f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="one run, 3 samples: a smoke test")
    parser.add_argument("--runs", type=int, help="stack runs of each side (default 3)")
    parser.add_argument("--samples", type=int, help="single-container samples (default 10)")
    parser.add_argument("--check", action="store_true", help="exit 1 when speedup < 3")
    args = parser.parse_args(argv)
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    samples = args.samples if args.samples is not None else (3 if args.quick else 10)
    if runs < 1 or samples < 1:
        parser.error("--runs and --samples must be at least 1")

    console = Console(width=170)

    def progress(line: str) -> None:
        console.print(f"[dim]{line}[/dim]")

    results = anyio.run(measure, runs, samples, progress)
    result = summary(results)
    report(console, results, result)
    print(json.dumps(result), flush=True)
    return 1 if args.check and not result["speedup_ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
