"""The process runner passes the Runner conformance suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from dspy_infra.testing.runner_conformance import (
    RunnerConformance,
    RunnerHandlers,
    python_scenario_handlers,
)


class TestProcessRunner(RunnerConformance):
    @pytest.fixture
    def runner_name(self) -> str:
        return "process"

    @pytest.fixture
    def handlers(self, tmp_path: Path) -> RunnerHandlers:
        return python_scenario_handlers(tmp_path / "handlers")
