"""Workflow benchmark: what a DAG run costs over the same tasks submitted directly.

    .venv/bin/python benchmarks/workflows.py [--quick] [--repeats N] [--check]

Both sides run on one instance (durable store, the default class
``cpu_short``, an async no-op handler), in the same process, alternating,
each figure the median of ``--repeats`` rounds after a warm-up round.

wide
    A workflow of ``WIDE`` independent steps (one task each), from
    ``start_run`` to ``wait()`` returning, against ``WIDE`` gathered
    ``submit_task`` calls and their results awaited (what the run does for
    its steps, done by hand). Shown beside it, not a target: one
    ``submit_tasks`` call for all of them, streamed with
    ``stream_task_results``.
chain
    A workflow of ``CHAIN`` steps, each depending on the one before and
    taking its result as payload, against ``CHAIN`` tasks submitted one after
    another, each awaited before the next is submitted.

``wide_ratio`` and ``chain_ratio`` = workflow time / direct time (target
<= 1.5); ``*_step_overhead_ms`` = (workflow time - direct time) / steps; and
``*_step_ms`` the whole time per step, for comparison with the ~90-100 ms per
task that Prefect, Temporal and Hatchet report for their own orchestration.

The last line of stdout is a JSON object alone. ``--quick`` uses small sizes
(a smoke test); with ``--check`` the exit status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from dspy_infra import AgentInfra, RunState

RATIO_TARGET = 1.5


async def noop(payload: Any) -> Any:
    return payload


def wide_spec(n: int) -> dict[str, Any]:
    return {
        "name": f"wide-{n}",
        "steps": {f"s{i}": {"handler": "noop", "payload": i} for i in range(n)},
    }


def chain_spec(n: int) -> dict[str, Any]:
    steps: dict[str, Any] = {"s0": {"handler": "noop", "payload": 0}}
    for i in range(1, n):
        steps[f"s{i}"] = {
            "handler": "noop",
            "depends_on": [f"s{i - 1}"],
            "payload": f"${{steps.s{i - 1}.result}}",
        }
    return {"name": f"chain-{n}", "steps": steps}


async def timed(work: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await work()
    return time.perf_counter() - started


async def measure(wide: int, chain: int, repeats: int, state_dir: Path) -> dict[str, Any]:
    async with AgentInfra.start(state_dir=state_dir, handlers={"noop": noop}) as infra:
        wide_wf = await infra.workflows.create(wide_spec(wide))
        chain_wf = await infra.workflows.create(chain_spec(chain))

        async def run(workflow_id: str) -> None:
            status = await (await infra.workflows.start_run(workflow_id)).wait()
            assert status.state is RunState.SUCCEEDED, status.error

        async def wide_direct() -> None:
            handles: list[Any] = [None] * wide

            async def submit(i: int) -> None:
                handles[i] = await infra.submit_task("noop", i)

            async with anyio.create_task_group() as tg:
                for i in range(wide):
                    tg.start_soon(submit, i)
            async with anyio.create_task_group() as tg:
                for h in handles:
                    tg.start_soon(h.result)

        async def wide_batch() -> None:
            handles = await infra.submit_tasks("noop", range(wide))
            async for r in infra.stream_task_results([h.task_id for h in handles]):
                assert r.result is not None

        async def chain_direct() -> None:
            value: Any = 0
            for _ in range(chain):
                value = await (await infra.submit_task("noop", value)).result()

        sides: dict[str, Callable[[], Awaitable[None]]] = {
            "wide_workflow": lambda: run(wide_wf.workflow_id),
            "wide_direct": wide_direct,
            "wide_batch": wide_batch,
            "chain_workflow": lambda: run(chain_wf.workflow_id),
            "chain_direct": chain_direct,
        }
        times: dict[str, list[float]] = {name: [] for name in sides}
        for round_ in range(repeats + 1):
            # Alternate the order, so that neither side always runs on a warmer store.
            names = list(sides) if round_ % 2 else list(reversed(sides))
            for name in names:
                elapsed = await timed(sides[name])
                if round_:  # round 0 warms up
                    times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    wide, chain = (100, 20) if args.quick else (1000, 200)
    repeats = args.repeats or (1 if args.quick else 5)
    with tempfile.TemporaryDirectory() as tmp:
        t = anyio.run(measure, wide, chain, repeats, Path(tmp) / "state")
    summary: dict[str, Any] = {
        "wide_steps": wide,
        "chain_steps": chain,
        "repeats": repeats,
        "wide_workflow_s": round(t["wide_workflow"], 4),
        "wide_direct_s": round(t["wide_direct"], 4),
        "wide_batch_s": round(t["wide_batch"], 4),
        "wide_ratio": round(t["wide_workflow"] / t["wide_direct"], 3),
        "wide_step_ms": round(t["wide_workflow"] / wide * 1000, 4),
        "wide_step_overhead_ms": round((t["wide_workflow"] - t["wide_direct"]) / wide * 1000, 4),
        "chain_workflow_s": round(t["chain_workflow"], 4),
        "chain_direct_s": round(t["chain_direct"], 4),
        "chain_ratio": round(t["chain_workflow"] / t["chain_direct"], 3),
        "chain_step_ms": round(t["chain_workflow"] / chain * 1000, 4),
        "chain_step_overhead_ms": round(
            (t["chain_workflow"] - t["chain_direct"]) / chain * 1000, 4
        ),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    print(
        f"wide DAG, {wide} steps:  workflow {t['wide_workflow']:.3f} s, "
        f"direct {t['wide_direct']:.3f} s (one submit_tasks: {t['wide_batch']:.3f} s), "
        f"ratio {summary['wide_ratio']} (target <= {RATIO_TARGET})"
    )
    print(
        f"chain, {chain} steps:  workflow {t['chain_workflow']:.3f} s, "
        f"direct {t['chain_direct']:.3f} s, ratio {summary['chain_ratio']} "
        f"(target <= {RATIO_TARGET}); {summary['chain_step_ms']} ms per step"
    )
    print(json.dumps(summary))
    missed = summary["wide_ratio"] > RATIO_TARGET or summary["chain_ratio"] > RATIO_TARGET
    if args.check and missed:
        sys.exit(1)


if __name__ == "__main__":
    main()
