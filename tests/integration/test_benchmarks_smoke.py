"""The benchmarks run: a quick round of each ends with its JSON summary."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.engines import missing_engine

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"


async def quick_summary(script: str, seconds: float) -> dict[str, Any]:
    """Run ``benchmarks/SCRIPT --quick``; its summary, the last line of its output."""
    # DSPY_INFRA_* variables of the surrounding run would override the benchmark's config.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}
    with anyio.fail_after(seconds):
        result = await anyio.run_process(
            [sys.executable, str(BENCHMARKS / script), "--quick"], env=env, check=False
        )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, f"benchmark failed:\n{out}\n{err}"
    summary = json.loads(out.strip().splitlines()[-1])
    assert isinstance(summary, dict)
    return summary


def positive(summary: dict[str, Any], keys: set[str]) -> None:
    missing = keys - summary.keys()
    assert not missing, missing
    assert all(isinstance(summary[k], int | float) and summary[k] > 0 for k in keys), summary


SCHEDULER_KEYS = {
    "durable_tps",
    "baseline_tps",
    "ratio",
    "store_floor_tps",
    "store_floor_ratio",
    "memory_tps",
    "durable_cpu_us",
    "memory_cpu_us",
    "baseline_cpu_us",
    "latency_p50_ms",
    "latency_p99_ms",
    "tps_1k",
    "tps_100k",
    "scale_ratio",
    "peak_rss_mb_100k",
    "process_tps",
    "process_baseline_tps",
    "process_ratio",
    "ray",
}

DOCKER_STARTUP_KEYS = {
    "ours_s",
    "compose_s",
    "speedup",
    "ours_teardown_s",
    "compose_teardown_s",
    "single_ours_ms",
    "single_bare_ms",
    "single_ratio",
    "runs",
}


@pytest.mark.anyio
async def test_scheduler_benchmark_quick_prints_its_summary_last() -> None:
    summary = await quick_summary("scheduler.py", 60)
    positive(summary, SCHEDULER_KEYS - {"ray"})
    assert summary["ray"] is None or isinstance(summary["ray"], dict)


@pytest.mark.anyio
async def test_docker_startup_benchmark_quick_prints_its_summary_last(busybox: str) -> None:
    if shutil.which("docker-compose") is None:
        missing_engine(
            "docker", "docker-compose is not installed (Debian: apt-get install docker-compose)"
        )
    # About 15 s: one run of each side (compose needs ~7 s) and 3 single-container samples.
    summary = await quick_summary("docker_startup.py", 60)
    positive(summary, DOCKER_STARTUP_KEYS)
    assert summary["runs"] == 1
    assert {"cpus", "docker"} <= summary["machine"].keys()


@pytest.mark.anyio
async def test_slurm_benchmark_quick_counts_calls_by_poll_cycle(slurm: str) -> None:
    summary = await quick_summary("slurm.py", 90)
    assert summary["tasks"] == 50
    assert summary["ours_s"] > 0
    # One sbatch for the burst; squeue once per poll cycle, whatever the number of tasks.
    assert summary["calls"]["sbatch"] == 1
    assert summary["calls"]["squeue"] <= summary["poll_cycles"]
    assert summary["calls_ok"] is True


GRPC_KEYS = {
    "submit_p50_ms",
    "submit_p99_ms",
    "echo_p50_ms",
    "echo_p99_ms",
    "ratio_p50",
    "memory_submit_p50_ms",
    "memory_ratio_p50",
    "submit_tps_64",
    "echo_tps_64",
    "stream_messages",
    "stream_msgs_per_s",
    "echo_stream_msgs_per_s",
}


@pytest.mark.anyio
async def test_grpc_benchmark_quick_prints_its_summary_last() -> None:
    summary = await quick_summary("grpc.py", 90)
    positive(summary, GRPC_KEYS)
    assert isinstance(summary["ratio_ok"], bool)


WORKFLOW_KEYS = {
    "wide_ratio",
    "chain_ratio",
    "wide_step_overhead_ms",
    "chain_step_overhead_ms",
    "wide_step_ms",
    "chain_step_ms",
    "wide_workflow_s",
    "wide_direct_s",
    "chain_workflow_s",
    "chain_direct_s",
}


@pytest.mark.anyio
async def test_workflows_benchmark_quick_prints_its_summary_last() -> None:
    summary = await quick_summary("workflows.py", 60)
    # Overheads may be negative (a DAG batches its submits); the rest are positive numbers.
    positive(summary, WORKFLOW_KEYS - {"wide_step_overhead_ms", "chain_step_overhead_ms"})
    assert (summary["wide_steps"], summary["chain_steps"]) == (100, 20)
