"""The demo is the first thing a user runs: it must work, fast, and leave nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).parents[2] / "examples" / "demo.py"


def test_demo_restarts_the_killed_worker_and_tears_down_cleanly() -> None:
    # DSPY_INFRA_* variables of the surrounding run would override the demo's config.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}
    result = subprocess.run(
        [sys.executable, str(DEMO)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, f"demo failed:\n{out}\n{result.stderr}"
    # Started in dependency order, the one-shot migration completed.
    assert re.search(r"service_completed\s+migrate", out)
    assert re.search(r"service_healthy\s+api", out)
    # The api read the migration's schema version from the kv.
    assert "'schema_version': '3'" in out
    # SIGKILLed, the worker was restarted and is healthy again, with one restart.
    assert re.search(r"service_restarting\s+worker\s+exited with code -9", out)
    assert re.search(r"worker\W+healthy\W+\d+\W+1\W", out), out
    # Teardown stopped dependents first and left no process behind.
    stopped = re.findall(r"service_stopped\s+(\w+)", out)
    assert stopped.index("api") < stopped.index("kv")
    assert "teardown clean" in out
