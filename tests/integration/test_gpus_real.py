"""GPU detection against the real driver: the unit tests only see fakes.

Runs where ``nvidia-smi`` exists (a GPU machine) and is skipped elsewhere.
"""

from __future__ import annotations

import shutil

import anyio
import pytest

from dspy_infra.errors import ConfigError
from dspy_infra.scheduling.gpus import GpuInventory, detect_gpus

NVIDIA_SMI = shutil.which("nvidia-smi")


@pytest.mark.anyio
@pytest.mark.skipif(NVIDIA_SMI is None, reason="no nvidia-smi on this machine: no NVIDIA GPU")
async def test_detects_the_real_gpus() -> None:
    assert NVIDIA_SMI is not None
    with anyio.fail_after(30):
        listing = (await anyio.run_process([NVIDIA_SMI, "-L"])).stdout.decode()
    # "GPU 0: NVIDIA H200 (UUID: GPU-...)"; MIG devices are indented lines below.
    uuids = [
        line.rsplit("UUID: ", 1)[1].rstrip(")")
        for line in listing.splitlines()
        if line.startswith("GPU ")
    ]
    assert uuids, listing

    found = await detect_gpus(environ={})
    assert found.source in {"nvml", "nvidia-smi"}
    assert found.ids == tuple(str(i) for i in range(len(uuids)))

    last = str(len(uuids) - 1)
    assert await detect_gpus(environ={"CUDA_VISIBLE_DEVICES": last}) == GpuInventory(
        ids=(last,), source=found.source
    )
    by_uuid = await detect_gpus(environ={"CUDA_VISIBLE_DEVICES": f" {uuids[0]} "})
    assert by_uuid == GpuInventory(ids=("0",), source=found.source)
    assert await detect_gpus(environ={"CUDA_VISIBLE_DEVICES": "-1"}) == GpuInventory(
        ids=(), source=found.source
    )
    # Configured ids restrict the real devices, and must be among them.
    assert await detect_gpus([0]) == GpuInventory(ids=("0",), source="config")
    with pytest.raises(ConfigError, match=r"infra.gpus: GPU \d+ is not on this machine"):
        await detect_gpus([len(found.ids) + 7])
