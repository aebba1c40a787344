"""A SIGKILLed owner leaks nothing past the next start on the same state dir."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from dspy_infra import AgentInfra
from dspy_infra._procfs import group_alive
from tests.integration.helpers import service

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
