"""The Slurm runner passes the Runner conformance suite, against a real cluster.

The scenario scripts are run by this Python on the cluster's node: the node
is this machine on the single-node cluster of scripts/engines.sh, as it is
in CI; on a real cluster, the test's directories would have to be on a disk
the nodes share.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from attrs import evolve

from dspy_infra import AgentInfra
from dspy_infra.testing.runner_conformance import (
    RunnerConformance,
    RunnerHandlers,
    python_scenario_handlers,
)


class TestSlurmRunner(RunnerConformance):
    # A job starts within a few tenths of a second on an idle node, and the
    # poller notices within its shortest interval; the margins allow for a
    # loaded CI machine.
    timeout = 2.5
    work_seconds = 3.5
    margin = 1.0

    @pytest.fixture
    def runner_name(self, slurm: str) -> str:
        return "slurm"

    @pytest.fixture
    def handlers(self, tmp_path: Path) -> RunnerHandlers:
        return python_scenario_handlers(tmp_path / "handlers")


class TestPackedSlurmRunner(TestSlurmRunner):
    """The same, with tasks that start together packed into shared jobs."""

    @pytest.fixture
    def handlers(self, tmp_path: Path) -> RunnerHandlers:
        scenarios = python_scenario_handlers(tmp_path / "handlers")
        return evolve(scenarios, class_options={"pack": 4})

    @pytest.mark.skip(reason="a pack runs its tasks one after another: what pack is for")
    async def test_tasks_run_at_once(
        self, infra: AgentInfra, handlers: RunnerHandlers, files: Path
    ) -> None:
        """Not run: see docs/runners.md, packing short tasks."""
