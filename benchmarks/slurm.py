"""Slurm runner benchmark: N small tasks through our runner and through submitit, same cluster.

    .venv/bin/pip install -e '.[bench]'            # submitit, for the comparison
    .venv/bin/python benchmarks/slurm.py [--quick] [--tasks N] [--pack P] [--repeats R] [--check]

Both sides run on the cluster that ``sinfo`` answers for (CI's is the
single-node cluster of ``scripts/engines.sh slurm``), in the same run,
alternating round by round, each round with a fresh instance / folder so
that nothing of one round helps the next. Each figure is the median round,
after a small warm-up round of each side.

ours
    N tasks of a ``[handlers]`` command, ``python double.py PAYLOAD RESULT``
    (it writes ``{"y": 2 * x}``), in a class with ``runner = "slurm"``,
    ``max_concurrency = N`` and ``pack = P`` (8 by default: the tasks go as
    one job array of ceil(N / P) jobs, each running its tasks one after
    another), submitted with one ``submit_tasks()`` and waited for with
    ``await handle.result()`` in order: from just before the submit to the
    last result. ``ours_unpacked_s`` is the same without ``pack`` (one array
    element per task), for comparison.
submitit
    The same N calls of the same function (``{"y": 2 * x}``) as one job
    array, ``SlurmExecutor.map_array`` (with ``array_parallelism = N``, so
    that it is not throttled more than ours), waited for with
    ``job.result()`` in order: from just before ``map_array`` to the last
    result. submitit reads job states through ``sacct``; on a cluster with
    accounting off (the default of scripts/engines.sh), every one of those
    calls fails, and it still finishes successful jobs through their result
    files, which it looks for once a second. (A *failed* job would never be
    seen to finish there; none fails here.) ``accounting`` in the summary
    says which case was measured.
speedup
    ``submitit_s / ours_s``; target >= 3. ``speedup_unpacked``:
    ``submitit_s / ours_unpacked_s``, no target.
slurm_calls
    ``sbatch`` + ``squeue`` + ``scontrol`` + ``sacct`` (+ ``scancel``) runs by
    our runner in the median (packed) round, beside its ``poll_cycles``. A smaller
    round (N / 5 tasks) is measured too: the calls follow the poll cycles
    (one ``squeue`` per cycle for all jobs, one ``sbatch`` per array, one
    ``scontrol`` per instance), not N. ``calls_ok``: in both sizes,
    ``sbatch`` <= 2 and the other calls <= ``poll_cycles + 2``.

The last line of stdout is a JSON object alone. ``--quick``: N = 50, one
round; with ``--check`` the exit status is 1 when a target is missed (the
speedup only when submitit is installed).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
from attrs import frozen
from rich.console import Console
from rich.table import Table

from dspy_infra import AgentInfra
from dspy_infra.runners.slurm import SlurmRunner
from dspy_infra.runners.slurm.cli import ClusterConfig

SPEEDUP_TARGET = 3.0
DOUBLE = """
import json, sys
with open(sys.argv[1]) as f:
    x = json.load(f)["x"]
with open(sys.argv[2], "w") as f:
    json.dump({"y": 2 * x}, f)
"""


def double(x: int) -> dict[str, int]:
    """submitit's side of the work: the same as double.py."""
    return {"y": 2 * x}


@frozen
class Round:
    side: str
    tasks: int
    seconds: float
    calls: dict[str, int]
    poll_cycles: int = 0

    @property
    def slurm_calls(self) -> int:
        return sum(self.calls.values())


async def ours(tasks: int, directory: Path, pack: int | None) -> Round:
    script = directory / "double.py"
    script.write_text(textwrap.dedent(DOUBLE))
    config = {
        "classes": {"bench": {"runner": "slurm", "max_concurrency": max(tasks, 1), "pack": pack}},
        "handlers": {
            "double": {"command": [sys.executable, str(script), "{payload_file}", "{result_file}"]}
        },
    }
    async with AgentInfra.start(config, state_dir=directory / "state") as infra:
        runner = SlurmRunner.of_instance(infra.instance_id)
        assert runner is not None, "the slurm runner did not open: is Slurm installed?"
        started = time.perf_counter()
        handles = await infra.submit_tasks(
            "double", [{"x": i} for i in range(tasks)], task_class="bench"
        )
        results = [await handle.result() for handle in handles]
        seconds = time.perf_counter() - started
        calls, cycles = dict(runner.calls), runner.poll_cycles
    assert results == [{"y": 2 * i} for i in range(tasks)], results
    return Round("ours" if pack else "ours, unpacked", tasks, seconds, calls, cycles)


def submitit_round(submitit: Any, tasks: int, directory: Path) -> Round:
    executor = submitit.SlurmExecutor(folder=directory / "submitit" / "%j")
    executor.update_parameters(time=10, cpus_per_task=1, array_parallelism=max(tasks, 1))
    watcher = submitit.SlurmJob.watcher
    before = watcher.num_calls
    with quiet_stderr():  # sacct's own complaint, at each call, where accounting is off
        started = time.perf_counter()
        jobs = executor.map_array(double, range(tasks))
        results = [job.result() for job in jobs]
        seconds = time.perf_counter() - started
    assert results == [{"y": 2 * i} for i in range(tasks)], results
    return Round("submitit", tasks, seconds, {"sbatch": 1, "sacct": watcher.num_calls - before})


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Standard error (of this process and its children) to /dev/null."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def accounting() -> bool:
    """Whether the cluster keeps accounting: the runner's own reading of its configuration."""
    out = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, check=True
    ).stdout
    return ClusterConfig.parse(out).accounting


@frozen
class Rounds:
    ours: list[Round]
    unpacked: list[Round]
    submitit: list[Round]
    small: Round


def measure(tasks: int, pack: int, repeats: int, submitit: Any | None) -> Rounds:
    base = Path(tempfile.mkdtemp(prefix="dspy-infra-slurm-bench-"))
    counter = itertools.count()

    def fresh() -> Path:
        path = base / f"round-{next(counter)}"
        path.mkdir()
        return path

    packed: list[Round] = []
    unpacked: list[Round] = []
    others: list[Round] = []
    try:
        # Warm-up: imports, page cache, the node's first jobs of the run.
        anyio.run(ours, 5, fresh(), None)
        if submitit is not None:
            submitit_round(submitit, 5, fresh())
        for _ in range(repeats):
            packed.append(anyio.run(ours, tasks, fresh(), pack))
            unpacked.append(anyio.run(ours, tasks, fresh(), None))
            if submitit is not None:
                others.append(submitit_round(submitit, tasks, fresh()))
        small = anyio.run(ours, max(1, tasks // 5), fresh(), pack)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return Rounds(packed, unpacked, others, small)


def median_round(rounds: Sequence[Round]) -> Round:
    ordered = sorted(rounds, key=lambda r: r.seconds)
    return ordered[(len(ordered) - 1) // 2]


def calls_ok(r: Round) -> bool:
    others = r.slurm_calls - r.calls.get("sbatch", 0)
    return r.calls.get("sbatch", 0) <= 2 and others <= r.poll_cycles + 2


def summary(tasks: int, pack: int, rounds: Rounds, acct: bool) -> dict[str, Any]:
    mine, unpacked, small = median_round(rounds.ours), median_round(rounds.unpacked), rounds.small
    result: dict[str, Any] = {
        "tasks": tasks,
        "pack": pack,
        "ours_s": round(mine.seconds, 3),
        "ours_unpacked_s": round(unpacked.seconds, 3),
        "submitit_s": None,
        "speedup": None,
        "speedup_unpacked": None,
        "speedup_ok": None,
        "slurm_calls": mine.slurm_calls,
        "calls": mine.calls,
        "poll_cycles": mine.poll_cycles,
        "unpacked_slurm_calls": unpacked.slurm_calls,
        "unpacked_poll_cycles": unpacked.poll_cycles,
        "small": {
            "tasks": small.tasks,
            "ours_s": round(small.seconds, 3),
            "slurm_calls": small.slurm_calls,
            "poll_cycles": small.poll_cycles,
        },
        "calls_ok": calls_ok(mine) and calls_ok(unpacked) and calls_ok(small),
        "accounting": acct,
        "submitit_sacct_calls": None,
        "rounds": [
            {"side": r.side, "seconds": round(r.seconds, 3)}
            for r in [*rounds.ours, *rounds.unpacked, *rounds.submitit]
        ],
    }
    if rounds.submitit:
        other = median_round(rounds.submitit)
        speedup = other.seconds / mine.seconds
        result.update(
            submitit_s=round(other.seconds, 3),
            speedup=round(speedup, 2),
            speedup_unpacked=round(other.seconds / unpacked.seconds, 2),
            speedup_ok=speedup >= SPEEDUP_TARGET,
            submitit_sacct_calls=other.calls.get("sacct", 0),
        )
    return result


def report(console: Console, s: dict[str, Any], note: str | None) -> None:
    console.print(
        f"Slurm: {s['tasks']} small tasks, accounting {'on' if s['accounting'] else 'off'}; "
        "median rounds"
    )
    table = Table(title="Ours vs submitit, same cluster, same run")
    for column in ("figure", "ours", "submitit", "note"):
        table.add_column(column)

    def speedup(key: str) -> str:
        return "-" if s[key] is None else f"{s[key]:.2f}x"

    submitit_s = "-" if s["submitit_s"] is None else f"{s['submitit_s']:.2f} s"
    table.add_row(
        f"{s['tasks']} tasks, pack = {s['pack']}",
        f"{s['ours_s']:.2f} s",
        submitit_s,
        f"speedup {speedup('speedup')} (target >= {SPEEDUP_TARGET:g})",
    )
    table.add_row(
        f"{s['tasks']} tasks, one job each",
        f"{s['ours_unpacked_s']:.2f} s",
        submitit_s,
        f"speedup {speedup('speedup_unpacked')}",
    )
    sacct = "-" if s["submitit_sacct_calls"] is None else str(s["submitit_sacct_calls"])
    table.add_row(
        "Slurm calls (packed; one job each)",
        f"{s['slurm_calls']} {s['calls']}; {s['unpacked_slurm_calls']}",
        f"1 sbatch + {sacct} sacct",
        f"ours: {s['poll_cycles']}; {s['unpacked_poll_cycles']} poll cycles",
    )
    small = s["small"]
    table.add_row(
        f"{small['tasks']} tasks, pack = {s['pack']} (ours only)",
        f"{small['ours_s']:.2f} s, {small['slurm_calls']} calls",
        "",
        f"{small['poll_cycles']} poll cycles: calls follow cycles, not N "
        f"({'ok' if s['calls_ok'] else 'MISSED'})",
    )
    console.print(table)
    if note:
        console.print(note, markup=False)  # it says '.[bench]', which is not markup


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="N = 50, one round: a smoke test")
    parser.add_argument("--tasks", type=int, help="N, the tasks per round (at least 50)")
    parser.add_argument("--pack", type=int, default=8, help="the class's pack (default 8)")
    parser.add_argument("--repeats", type=int, help="rounds per side")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    tasks = args.tasks or (50 if args.quick else 200)
    repeats = args.repeats or (1 if args.quick else 3)
    if tasks < 50 or repeats < 1 or args.pack < 1:
        parser.error("--tasks must be at least 50, --pack and --repeats at least 1")
    if shutil.which("sbatch") is None:
        parser.error("no Slurm here: run scripts/engines.sh slurm first")
    note = None
    try:
        submitit = importlib.import_module("submitit")
        # Its sacct calls fail where accounting is off; it says so at every call.
        logging.getLogger("submitit").setLevel(logging.ERROR)
    except ImportError:
        submitit = None
        note = "submitit is not installed (pip install -e '.[bench]'): no comparison"
    acct = accounting()
    if submitit is not None and not acct:
        note = (
            "accounting is off: submitit's sacct calls all failed, and it finished the jobs "
            "through their result files, looked for once a second"
        )
    rounds = measure(tasks, args.pack, repeats, submitit)
    result = summary(tasks, args.pack, rounds, acct)
    report(Console(width=150), result, note)
    print(json.dumps(result), flush=True)
    missed = not result["calls_ok"] or result["speedup_ok"] is False
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
