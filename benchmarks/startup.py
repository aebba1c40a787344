"""Start-up benchmark: how close does a DAG of services come to its critical path?

    .venv/bin/python benchmarks/startup.py [--runs N] [--seed S] [--check]
                                           [--probe-max-interval SECONDS] [--announce]

What it starts
    A fixed (seeded) DAG of 20 local services in 5 levels (3, 5, 5, 4, 3
    services), with fan-out (a root feeds several services) and fan-in (a
    service waits on one to three others, from the previous level and earlier
    ones). Every service is ``benchmarks/_sleepy_service.py``: it sleeps its
    own chosen time (0.10 to 0.60 s), then listens on its port; each has a TCP
    probe and ``depends_on`` its parents (condition ``healthy``).
    ``max_concurrent_starts`` is set to the number of services, so the cap
    never binds: this measures the scheduling overhead of the library, not
    the cap.

A service's own start time
    A service costs more than its sleep: the process must be spawned and the
    interpreter started. That cost is measured *per service, in the same
    run*: the service writes ``time.time()`` to a file in its service dir
    when it starts listening, and the library's ``service_starting`` event
    (published just before it calls the backend's ``launch``) stamps when it
    was launched. Its own start
    time is ``listening - launched``: spawn + interpreter start-up + sleep +
    bind, under the real load of its siblings starting at the same moment.
    The noticing delay (probe cadence) and the wait for dependencies are not
    in it: they are what the library adds.

    As a stricter cross-check, the spawn + interpreter start-up of the same
    script is also measured alone before the runs (median of 7); with it,
    each node costs ``isolated start-up + sleep``, which gives the "strict"
    critical path.

The figures
    critical path     longest path through the DAG of the services' own
                      start times: no scheduler can bring all of them up
                      sooner with these costs. "strict c.p." is the same
                      with the isolated start-up cost instead.
    level ideal       the same costs, started one level at a time (a level
                      starts when all of the previous one is up): the sum
                      over levels of the slowest service of each. The gap to
                      the critical path is what starting each service as soon
                      as its own dependencies are met is worth.
    all healthy       from just before ``AgentInfra.start()`` to the moment
                      ``async with`` hands over the instance with every
                      service healthy: config loading, state dir, backend
                      sweep, all launches, probes and events included.
    ratio             all healthy / critical path; target <= 1.05.
    noticed after     per service, its ``service_healthy`` event's time minus
                      the time it began listening; median and
                      p90 over all services of all runs; target median <= 50 ms.
    dispatch          per service, its launch time minus the time the last of
                      its dependencies was reported healthy (roots: minus the
                      start of the run): the library's own reaction time.
                      "first launch" is the roots' part alone.
    library CPU       CPU seconds of this process (the library's event loop
                      and threads) from the start of the run to all healthy.

The services print nothing by default, so a library that took a log line as
a hint to probe again would gain nothing here: the figures are those of pure
probing. ``--announce`` makes them print ``listening`` when ready, as many
real servers do. ``--probe-max-interval`` overrides the probes'
``max_interval`` (the library's default otherwise), to see what the probe
cadence costs and buys.

Several runs are made (3 by default), each with a fresh instance and state
dir. The JSON summary reports the run with the median ratio (so that its
``critical_path_s``, ``all_healthy_s`` and ``ratio`` belong together), each
run's figures under ``runs``, and the noticing delay pooled over all runs.
The last line of stdout is that JSON object alone. With ``--check`` the exit
status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
from attrs import frozen
from rich.console import Console
from rich.table import Table

from dspy_infra import AgentInfra
from dspy_infra.events import ServiceEvent

SERVICE_SCRIPT = Path(__file__).resolve().parent / "_sleepy_service.py"
LEVEL_SIZES = (3, 5, 5, 4, 3)
SLEEP_RANGE = (0.10, 0.60)
DEFAULT_SEED = 2026
RATIO_TARGET = 1.05
NOTICE_TARGET_MS = 50.0


@frozen
class Node:
    name: str
    level: int
    deps: tuple[str, ...]
    sleep: float


@frozen
class Timing:
    """One service in one run; times are ``time.time()`` values."""

    launched: float  # the library's service_starting event
    started: float  # the service's first statement
    listening: float  # the service's listen() returned
    healthy: float  # the library's service_healthy event

    @property
    def own(self) -> float:
        return self.listening - self.launched

    @property
    def startup(self) -> float:
        return self.started - self.launched

    @property
    def notice(self) -> float:
        return self.healthy - self.listening


@frozen
class Run:
    t0: float
    ready: float  # ``async with`` handed the instance over
    cpu: float  # CPU seconds of this process (the library) from t0 to ready
    timings: dict[str, Timing]
    critical_path: float
    critical_nodes: tuple[str, ...]
    level_ideal: float
    strict_critical_path: float
    dispatch: dict[str, float]

    @property
    def all_healthy(self) -> float:
        return self.ready - self.t0

    @property
    def last_healthy(self) -> float:
        return max(t.healthy for t in self.timings.values()) - self.t0

    @property
    def first_launch(self) -> float:
        return min(t.launched for t in self.timings.values()) - self.t0

    @property
    def ratio(self) -> float:
        return self.all_healthy / self.critical_path

    @property
    def strict_ratio(self) -> float:
        return self.all_healthy / self.strict_critical_path

    @property
    def notices(self) -> list[float]:
        return [t.notice for t in self.timings.values()]


# -- the DAG ---------------------------------------------------------------------


def build_dag(seed: int) -> list[Node]:
    """Levels of services; each past the first depends on the previous level and maybe more."""
    rng = random.Random(seed)  # a reproducible benchmark, not crypto
    names: list[list[str]] = []
    count = 0
    for size in LEVEL_SIZES:
        names.append([f"s{count + i:02d}" for i in range(size)])
        count += size
    deps: dict[str, set[str]] = {n: set() for level in names for n in level}
    for level in range(1, len(names)):
        earlier = [n for lv in names[: level - 1] for n in lv]
        for name in names[level]:
            deps[name].add(rng.choice(names[level - 1]))  # this is what makes it level `level`
            extra = rng.randint(0, 2)
            pool = [n for n in names[level - 1] + earlier if n not in deps[name]]
            deps[name].update(rng.sample(pool, min(extra, len(pool))))
    # Every service below the last level feeds at least one of the next (fan-out, no dead ends).
    for level in range(len(names) - 1):
        for name in names[level]:
            if not any(name in deps[other] for lv in names[level + 1 :] for other in lv):
                deps[rng.choice(names[level + 1])].add(name)
    low, high = SLEEP_RANGE
    return [
        Node(name, level, tuple(sorted(deps[name])), round(rng.uniform(low, high), 2))
        for level, level_names in enumerate(names)
        for name in level_names
    ]


@frozen
class Options:
    probe: dict[str, float]  # extra keys of each service's ``health`` table
    announce: bool  # services print "listening" to stdout when ready


def infra_config(nodes: Sequence[Node], options: Options) -> dict[str, Any]:
    script = [sys.executable, str(SERVICE_SCRIPT)]
    times = "{service_dir}/times.txt"
    announce = ["--announce"] if options.announce else []
    return {
        "infra": {"max_concurrent_starts": len(nodes)},
        "services": {
            n.name: {
                "command": [*script, f"{n.sleep:.2f}", "{port}", times, *announce],
                "ports": {"main": 0},
                "depends_on": list(n.deps),
                "health": {"tcp": "{port}", **options.probe},
            }
            for n in nodes
        },
    }


def longest_path(nodes: Sequence[Node], cost: dict[str, float]) -> tuple[float, tuple[str, ...]]:
    """Length and services of the longest cost path; ``nodes`` are in level order."""
    finish: dict[str, float] = {}
    via: dict[str, str | None] = {}
    for n in nodes:
        before = max(n.deps, key=lambda d: finish[d], default=None)
        finish[n.name] = cost[n.name] + (finish[before] if before is not None else 0.0)
        via[n.name] = before
    last = max(finish, key=lambda name: finish[name])
    total = finish[last]
    end: str | None = last
    path: list[str] = []
    while end is not None:
        path.append(end)
        end = via[end]
    return total, tuple(reversed(path))


def level_by_level(nodes: Sequence[Node], cost: dict[str, float]) -> float:
    levels: dict[int, float] = {}
    for n in nodes:
        levels[n.level] = max(levels.get(n.level, 0.0), cost[n.name])
    return sum(levels.values())


# -- measuring -------------------------------------------------------------------


def isolated_startup(samples: int = 7) -> float:
    """Median seconds from spawning the service script to its first statement, alone."""
    costs = []
    for _ in range(samples):
        before = time.time()
        out = subprocess.run(
            [sys.executable, str(SERVICE_SCRIPT), "--startup"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        costs.append(_stamp(out.splitlines(), "started") - before)
    return statistics.median(costs)


def _stamp(lines: Sequence[str], word: str) -> float:
    for line in lines:
        key, _, value = line.partition(" ")
        if key == word:
            return float(value)
    raise RuntimeError(f"no {word!r} line in the service's output: {list(lines)!r}")


async def _read_times(path: Path) -> list[str]:
    """The service's time stamps; it writes them just after listen(), so wait a little."""
    for _ in range(1000):
        if await anyio.Path(path).exists():
            return (await anyio.Path(path).read_text()).splitlines()
        await anyio.sleep(0.005)
    raise RuntimeError(f"the service never wrote {path}")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def one_run(nodes: Sequence[Node], startup_alone: float, options: Options) -> Run:
    config = infra_config(nodes, options)
    with tempfile.TemporaryDirectory(prefix="dspy-infra-bench-") as state_dir:
        t0 = time.time()
        cpu0 = _cpu_seconds()
        async with AgentInfra.start(config, state_dir=state_dir) as infra:
            ready = time.time()
            cpu = _cpu_seconds() - cpu0
            launched: dict[str, list[float]] = {n.name: [] for n in nodes}
            healthy: dict[str, float] = {}
            events = infra.stream_events({"service_starting", "service_healthy"}, since=0)
            async with aclosing(events) as stream:
                async for event in stream:
                    assert isinstance(event, ServiceEvent)
                    if event.type == "service_starting":
                        launched[event.service].append(event.time)
                    else:
                        healthy.setdefault(event.service, event.time)
                    if len(healthy) == len(nodes):
                        break
            relaunched = [name for name, times in launched.items() if len(times) != 1]
            if relaunched:
                raise RuntimeError(f"services launched more than once: {relaunched}")
            timings = {}
            for n in nodes:
                lines = await _read_times(Path(state_dir, "services", n.name, "times.txt"))
                timings[n.name] = Timing(
                    launched=launched[n.name][0],
                    started=_stamp(lines, "started"),
                    listening=_stamp(lines, "listening"),
                    healthy=healthy[n.name],
                )
    own = {name: t.own for name, t in timings.items()}
    critical, critical_nodes = longest_path(nodes, own)
    strict, _ = longest_path(nodes, {n.name: startup_alone + n.sleep for n in nodes})
    dispatch = {
        n.name: timings[n.name].launched - max((timings[d].healthy for d in n.deps), default=t0)
        for n in nodes
    }
    return Run(
        t0=t0,
        ready=ready,
        cpu=cpu,
        timings=timings,
        critical_path=critical,
        critical_nodes=critical_nodes,
        level_ideal=level_by_level(nodes, own),
        strict_critical_path=strict,
        dispatch=dispatch,
    )


# -- reporting -------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _p90(values: Sequence[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def report(
    console: Console,
    *,
    nodes: Sequence[Node],
    runs: Sequence[Run],
    median: Run,
    alone: float,
    options: Options,
) -> None:
    probe = ", ".join(f"{k} = {v:g}" for k, v in options.probe.items()) or "library defaults"
    console.print(
        f"[bold]dspy-infra start-up benchmark[/bold]: {len(nodes)} local services in "
        f"{len(LEVEL_SIZES)} levels {LEVEL_SIZES}; max_concurrent_starts = {len(nodes)} "
        f"(widest level {max(LEVEL_SIZES)}: never the limit); tcp probes ({probe}); services "
        f"{'print when listening' if options.announce else 'silent'}\n"
        f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}; "
        f"spawn + interpreter start-up of a service alone: {_ms(alone)} ms (median of 7)"
    )
    critical = set(median.critical_nodes)
    dag = Table(title=f"Services (median run, #{runs.index(median) + 1}; times in ms)")
    for column in ("service", "level", "depends on", "sleep", "start-up", "own start"):
        dag.add_column(column, justify="left" if column == "depends on" else "right")
    dag.add_column("noticed after", justify="right")
    dag.add_column("dispatch", justify="right")
    dag.add_column("critical", justify="center")
    for n in nodes:
        t = median.timings[n.name]
        dag.add_row(
            n.name,
            str(n.level),
            ", ".join(n.deps) or "-",
            _ms(n.sleep),
            _ms(t.startup),
            _ms(t.own),
            _ms(t.notice),
            _ms(median.dispatch[n.name]),
            "*" if n.name in critical else "",
        )
    console.print(dag)

    table = Table(title="Runs (s, except ms columns; ratio = all healthy / critical path)")
    for column in (
        "run",
        "critical path",
        "level ideal",
        "strict c.p.",
        "all healthy",
        "ratio",
        "strict ratio",
        "first launch ms",
        "noticed median ms",
        "noticed p90 ms",
        "dispatch median ms",
        "library CPU",
    ):
        table.add_column(column, justify="right")
    for i, run in enumerate(runs, 1):
        table.add_row(
            f"{i}{' (median)' if run is median else ''}",
            f"{run.critical_path:.3f}",
            f"{run.level_ideal:.3f}",
            f"{run.strict_critical_path:.3f}",
            f"{run.all_healthy:.3f}",
            f"{run.ratio:.3f}",
            f"{run.strict_ratio:.3f}",
            _ms(run.first_launch),
            _ms(statistics.median(run.notices)),
            _ms(_p90(run.notices)),
            _ms(statistics.median(run.dispatch.values())),
            f"{run.cpu:.3f}",
        )
    console.print(table)
    console.print(
        f"critical path of the median run: {' -> '.join(median.critical_nodes)}; "
        f"targets: ratio <= {RATIO_TARGET}, noticed median <= {NOTICE_TARGET_MS:g} ms"
    )


def summary(
    seed: int, runs: Sequence[Run], median: Run, alone: float, options: Options
) -> dict[str, Any]:
    notices = [x for run in runs for x in run.notices]
    dispatch = [x for run in runs for x in run.dispatch.values()]
    notice_median = statistics.median(notices) * 1000
    return {
        "benchmark": "startup",
        "services": len(median.timings),
        "levels": len(LEVEL_SIZES),
        "seed": seed,
        "max_concurrent_starts": len(median.timings),
        "probe": {"tcp": "{port}", **options.probe},
        "announce": options.announce,
        "runs_count": len(runs),
        "critical_path_s": round(median.critical_path, 4),
        "all_healthy_s": round(median.all_healthy, 4),
        "ratio": round(median.ratio, 4),
        "level_by_level_s": round(median.level_ideal, 4),
        "strict_critical_path_s": round(median.strict_critical_path, 4),
        "strict_ratio": round(median.strict_ratio, 4),
        "isolated_startup_ms": round(alone * 1000, 2),
        "notice_median_ms": round(notice_median, 2),
        "notice_p90_ms": round(_p90(notices) * 1000, 2),
        "dispatch_median_ms": round(statistics.median(dispatch) * 1000, 2),
        "first_launch_ms": round(median.first_launch * 1000, 2),
        "library_cpu_s": round(median.cpu, 3),
        "ratio_target": RATIO_TARGET,
        "notice_target_ms": NOTICE_TARGET_MS,
        "ratio_ok": median.ratio <= RATIO_TARGET,
        "notice_ok": notice_median <= NOTICE_TARGET_MS,
        "runs": [
            {
                "critical_path_s": round(run.critical_path, 4),
                "all_healthy_s": round(run.all_healthy, 4),
                "ratio": round(run.ratio, 4),
                "notice_median_ms": round(statistics.median(run.notices) * 1000, 2),
            }
            for run in runs
        ],
    }


async def measure(nodes: Sequence[Node], alone: float, count: int, options: Options) -> list[Run]:
    return [await one_run(nodes, alone, options) for _ in range(count)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3, help="number of runs (default 3)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the DAG")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--probe-max-interval",
        type=float,
        metavar="SECONDS",
        help="the probes' max_interval (default: the library's default)",
    )
    parser.add_argument(
        "--announce",
        action="store_true",
        help="services also print 'listening' to stdout when ready (default: silent)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    nodes = build_dag(args.seed)
    alone = isolated_startup()
    probe = {} if args.probe_max_interval is None else {"max_interval": args.probe_max_interval}
    options = Options(probe=probe, announce=args.announce)
    runs = anyio.run(measure, nodes, alone, args.runs, options)
    median = sorted(runs, key=lambda r: r.ratio)[(len(runs) - 1) // 2]

    report(
        Console(width=170),
        nodes=nodes,
        runs=runs,
        median=median,
        alone=alone,
        options=options,
    )
    result = summary(args.seed, runs, median, alone, options)
    print(json.dumps(result), flush=True)
    missed = not (result["ratio_ok"] and result["notice_ok"])
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
