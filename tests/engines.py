"""Real engines for tests: skipped where missing, unless the environment requires them.

CI sets ``DSPY_INFRA_REQUIRE=docker,slurm``, so that a missing engine fails
the run instead of silently skipping the tests that need it.
"""

from __future__ import annotations

import os
import subprocess

import aiodocker
import pytest

from dspy_infra.docker import busybox_image

__all__ = ["BUSYBOX", "missing_engine", "require_docker", "require_slurm"]

BUSYBOX = "local/busybox:latest"


def missing_engine(engine: str, why: str) -> None:
    """Skip the test, or fail it when the environment says the engine must be there."""
    required = {e.strip() for e in os.environ.get("DSPY_INFRA_REQUIRE", "").split(",")}
    if engine in required:
        pytest.fail(f"{engine} is required (DSPY_INFRA_REQUIRE) but unavailable: {why}")
    pytest.skip(f"{engine} is not available: {why}")


async def require_docker() -> str:
    """A reachable Docker engine with the busybox test image built; the image's name."""
    try:
        async with aiodocker.Docker() as docker:
            await docker.version()
    except (aiodocker.DockerError, ValueError, OSError) as exc:
        missing_engine("docker", str(exc))
    await busybox_image(BUSYBOX)
    return BUSYBOX


def require_slurm() -> str:
    """A Slurm cluster that answers, with a node that can take jobs; its default partition."""
    try:
        result = subprocess.run(
            ["sinfo", "--noheader", "--format=%P|%t"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        missing_engine("slurm", f"sinfo: {exc}")
    if result.returncode != 0:
        missing_engine("slurm", f"sinfo: {result.stderr.strip() or result.returncode}")
    partitions = [line.split("|") for line in result.stdout.splitlines() if "|" in line]
    usable = [name for name, state in partitions if state in ("idle", "mix", "alloc", "comp")]
    if not usable:
        missing_engine("slurm", f"no node can take jobs (sinfo: {result.stdout.strip()!r})")
    default = next((name for name in usable if name.endswith("*")), usable[0])
    return default.rstrip("*")
