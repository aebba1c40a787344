"""The docker runner passes the Runner conformance suite, in a busybox container."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiodocker
import pytest

from dspy_infra import AgentInfra
from dspy_infra.docker.engine import Labels
from dspy_infra.testing.runner_conformance import (
    RunnerConformance,
    RunnerHandlers,
    shell_scenario_handlers,
)


class TestDockerRunner(RunnerConformance):
    # Starting a container takes a few tenths of a second, more on a busy
    # daemon: the timeout must cover it, and the work outlast the timeout.
    timeout = 3.0
    work_seconds = 4.5
    # busybox's date has whole seconds (see SHELL_SCENARIOS): one more.
    margin = 1.5

    @pytest.fixture
    def runner_name(self) -> str:
        return "docker"

    @pytest.fixture
    def handlers(self, busybox: str, tmp_path: Path) -> RunnerHandlers:
        # The sleep scenario writes under tmp_path: mounted at the same path,
        # its files are where the suite looks for them.
        options = {"image": busybox, "pull": "never", "volumes": [f"{tmp_path}:{tmp_path}"]}
        return shell_scenario_handlers(options=options)

    @pytest.fixture(autouse=True)
    async def no_container_left(self, infra: AgentInfra) -> AsyncIterator[None]:
        """Each attempt's container is gone once its task has ended, whatever the ending."""
        yield
        label = [f"{Labels.KIND}=task", f"{Labels.INSTANCE}={infra.instance_id}"]
        async with aiodocker.Docker() as docker:
            left = await docker.containers.list(all=True, filters=json.dumps({"label": label}))
        assert not left, f"task containers left behind: {[c.id[:12] for c in left]}"
