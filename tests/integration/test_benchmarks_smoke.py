"""The benchmarks run: a quick round of each ends with its JSON summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
