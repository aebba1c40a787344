"""A SIGKILLed owner leaks nothing past the next start on the same state dir."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from dspy_infra import AgentInfra
from dspy_infra._procfs import group_alive
from tests.integration.helpers import running_with, service, unique_seconds

pytestmark = pytest.mark.anyio


async def test_services_of_a_killed_owner_are_removed_on_next_start(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    services = {
        "kv": service(port=True),
        # A shell wrapper whose child would outlive it: the whole group must go.
        "worker": {"command": ["sh", "-c", "sleep 1000 & wait"], "depends_on": ["kv"]},
    }
    owner = textwrap.dedent(
        f"""
        import anyio, json
        from dspy_infra import AgentInfra

        async def main() -> None:
            config = {{"services": json.loads({json.dumps(json.dumps(services))})}}
            async with AgentInfra.start(config, state_dir={str(state_dir)!r}) as infra:
                status = await infra.services.status()
                print(json.dumps({{n: s.pid for n, s in status.items()}}), flush=True)
                await anyio.sleep(1000)

        anyio.run(main)
        """
    )
    async with await anyio.open_process([sys.executable, "-c", owner]) as child:
        assert child.stdout is not None
        with anyio.fail_after(30):
            pids = json.loads((await child.stdout.receive()).decode())
        os.kill(child.pid, signal.SIGKILL)
        await child.wait()
    assert all(group_alive(int(pid)) for pid in pids.values()), "nothing was left to sweep"

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        async with AgentInfra.start({}, state_dir=state_dir):
            assert not any(group_alive(int(pid)) for pid in pids.values())


async def test_a_command_probe_of_a_killed_owner_is_removed_on_next_start(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    seconds = unique_seconds()
    # The probe is still running (it would for a long time) when the owner is killed.
    services = {
        "svc": {
            "command": ["sleep", "1000"],
            "health": {"command": ["sh", "-c", f"sleep {seconds}"], "timeout": 1000},
        }
    }
    owner = textwrap.dedent(
        f"""
        import anyio, json
        from dspy_infra import AgentInfra

        async def main() -> None:
            config = {{"services": json.loads({json.dumps(json.dumps(services))})}}
            async with AgentInfra.start(config, state_dir={str(state_dir)!r}):
                pass

        anyio.run(main)
        """
    )

    def probes(owner_pid: int) -> set[str]:
        # The probe's shell and its sleep; the owner's command line names them too.
        return set(running_with(seconds)) - {str(owner_pid)}

    async with await anyio.open_process([sys.executable, "-c", owner]) as child:
        with anyio.fail_after(30):
            while not probes(child.pid):
                await anyio.sleep(0.05)
        await anyio.sleep(0.2)  # the probe's launch is recorded beside it
        os.kill(child.pid, signal.SIGKILL)
        await child.wait()
    left = probes(child.pid)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(tmp_path)
            async with AgentInfra.start({}, state_dir=state_dir):
                assert left, "nothing was left to sweep"
                assert not probes(child.pid)
    finally:  # whatever the sweep missed
        for pid in probes(child.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


@pytest.mark.parametrize("what", ["tasks", "services"])
async def test_processes_launched_just_before_the_owner_was_killed_are_removed(
    tmp_path: Path, what: str
) -> None:
    state_dir = tmp_path / "state"
    seconds = unique_seconds()
    command = ["sh", "-c", f"sleep {seconds} & wait"]
    # Killed as the first commands start: most of the 32 launches are not
    # yet written down beside them then.
    if what == "tasks":
        config: dict[str, Any] = {
            "classes": {"proc": {"runner": "process", "max_concurrency": 32}},
            "handlers": {"hang": {"command": command}},
        }
        then = 'await infra.submit_tasks("hang", list(range(32)), task_class="proc")'
    else:
        services = {f"s{i}": {"command": command} for i in range(32)}
        config = {"infra": {"max_concurrent_starts": 32}, "services": services}
        then = "pass"
    owner = textwrap.dedent(
        f"""
        import anyio, json
        from dspy_infra import AgentInfra

        async def main() -> None:
            config = json.loads({json.dumps(json.dumps(config))})
            async with AgentInfra.start(config, state_dir={str(state_dir)!r}) as infra:
                {then}
                await anyio.sleep(1000)

        anyio.run(main)
        """
    )

    def sleeps(owner_pid: int) -> set[str]:
        return set(running_with(seconds)) - {str(owner_pid)}

    async with await anyio.open_process([sys.executable, "-c", owner]) as child:
        with anyio.fail_after(30):
            while not sleeps(child.pid):
                await anyio.sleep(0.001)
        os.kill(child.pid, signal.SIGKILL)
        await child.wait()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(tmp_path)
            async with AgentInfra.start(config, state_dir=state_dir, autostart=False):
                assert not sleeps(child.pid)
    finally:  # whatever the sweep missed
        for pid in sleeps(child.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
