"""The in-process runner passes the Runner conformance suite."""

from __future__ import annotations

import pytest

from dspy_infra.testing.runner_conformance import (
    RunnerConformance,
    RunnerHandlers,
    inprocess_scenario_handlers,
)


class TestInProcessRunner(RunnerConformance):
    @pytest.fixture
    def runner_name(self) -> str:
        return "inprocess"

    @pytest.fixture
    def handlers(self) -> RunnerHandlers:
        return inprocess_scenario_handlers()
