"""The benchmarks run: a quick round of each ends with its JSON summary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from tests.engines import missing_engine

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"

SCHEDULER_KEYS = {
    "durable_tps",
    "baseline_tps",
    "ratio",
    "memory_tps",
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


def test_scheduler_benchmark_quick_prints_its_summary_last() -> None:
    # DSPY_INFRA_* variables of the surrounding run would override the benchmark's config.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "scheduler.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, f"benchmark failed:\n{result.stdout}\n{result.stderr}"
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert isinstance(summary, dict)
    missing = SCHEDULER_KEYS - summary.keys()
    assert not missing, missing
    numbers = SCHEDULER_KEYS - {"ray"}
    assert all(isinstance(summary[k], int | float) and summary[k] > 0 for k in numbers), summary
    assert summary["ray"] is None or isinstance(summary["ray"], dict)


@pytest.mark.anyio
async def test_docker_startup_benchmark_quick_prints_its_summary_last(busybox: str) -> None:
    if shutil.which("docker-compose") is None:
        missing_engine(
            "docker", "docker-compose is not installed (Debian: apt-get install docker-compose)"
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}
    # About 15 s: one run of each side (compose needs ~7 s) and 3 single-container samples.
    with anyio.fail_after(60):
        result = await anyio.run_process(
            [sys.executable, str(BENCHMARKS / "docker_startup.py"), "--quick"], env=env, check=False
        )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, f"benchmark failed:\n{out}\n{err}"
    summary = json.loads(out.strip().splitlines()[-1])
    assert isinstance(summary, dict)
    missing = DOCKER_STARTUP_KEYS - summary.keys()
    assert not missing, missing
    numbers = DOCKER_STARTUP_KEYS
    assert all(isinstance(summary[k], int | float) and summary[k] > 0 for k in numbers), summary
    assert summary["runs"] == 1
    assert {"cpus", "docker"} <= summary["machine"].keys()


@pytest.mark.anyio
async def test_slurm_benchmark_quick_counts_calls_by_poll_cycle(slurm: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}
    with anyio.fail_after(90):
        result = await anyio.run_process(
            [sys.executable, str(BENCHMARKS / "slurm.py"), "--quick"], env=env, check=False
        )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, f"benchmark failed:\n{out}\n{err}"
    summary = json.loads(out.strip().splitlines()[-1])
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


def test_grpc_benchmark_quick_prints_its_summary_last() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "grpc.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        check=False,
    )
    assert result.returncode == 0, f"benchmark failed:\n{result.stdout}\n{result.stderr}"
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert isinstance(summary, dict)
    missing = GRPC_KEYS - summary.keys()
    assert not missing, missing
    assert all(isinstance(summary[k], int | float) and summary[k] > 0 for k in GRPC_KEYS), summary
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


def test_workflows_benchmark_quick_prints_its_summary_last() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "workflows.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, f"benchmark failed:\n{result.stdout}\n{result.stderr}"
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    missing = WORKFLOW_KEYS - summary.keys()
    assert not missing, missing
    # Overheads may be negative (a DAG batches its submits); the rest are positive numbers.
    positive = WORKFLOW_KEYS - {"wide_step_overhead_ms", "chain_step_overhead_ms"}
    assert all(isinstance(summary[k], int | float) and summary[k] > 0 for k in positive), summary
    assert (summary["wide_steps"], summary["chain_steps"]) == (100, 20)
