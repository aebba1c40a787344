"""Whatever way an instance ends, nothing it opened outlives it: processes,
threads, file descriptors, files under its state dir."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import anyio
import pytest

from dspy_infra import AgentInfra
from tests.integration.helpers import running_with, service, unique_seconds

pytestmark = pytest.mark.anyio


class Boom(Exception):
    pass


def open_under(directory: Path) -> list[str]:
    """What this process holds open under ``directory``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (the listing's own)
        if target.startswith(f"{directory}/"):
            found.append(target)
    return found


@pytest.mark.parametrize("ending", ["returned", "raised", "cancelled"])
async def test_an_instance_leaves_no_ledger_open_however_its_block_ends(
    tmp_path: Path, ending: str
) -> None:
    state_dir = tmp_path / "state"
    seconds = unique_seconds()
    config = {
        "services": {"kv": service(port=True)},
        "classes": {"proc": {"runner": "process"}},
        "handlers": {"quick": {"command": ["echo", "1"]}, "slow": {"command": ["sleep", seconds]}},
    }
    expected = pytest.raises(Boom) if ending == "raised" else contextlib.nullcontext()
    with anyio.move_on_after(60) as outer, expected:
        with anyio.CancelScope() as scope:
            async with AgentInfra.start(config, state_dir=state_dir) as infra:
                # Both ledgers (the service's, the process runner's) are open now.
                assert await (await infra.submit_task("quick", {}, task_class="proc")).result() == 1
                await infra.submit_task("slow", {}, task_class="proc")
                with anyio.fail_after(30):
                    while not running_with(seconds):
                        await anyio.sleep(0.01)
                if ending == "raised":
                    raise Boom
                if ending == "cancelled":
                    scope.cancel()
                    await anyio.sleep(30)
    assert not outer.cancel_called, "the instance did not close in time"
    assert running_with(seconds) == []
    assert open_under(state_dir) == []
    assert [p.name for p in (state_dir / "local").iterdir()] == []
    assert [p.name for p in (state_dir / "process").iterdir()] == []
    assert not [t.name for t in threading.enumerate() if t.name.startswith("dspy-infra")]
