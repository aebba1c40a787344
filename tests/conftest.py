"""Shared fixtures. Tests run on asyncio: aiohttp (probes) needs it."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dspy_infra.scheduling import gpus
from tests.engines import require_docker, require_slurm

MakeSmi = Callable[[str], None]


@pytest.fixture(autouse=True, scope="session")
def sigint_as_from_a_terminal() -> Iterator[None]:
    """The processes the tests start get SIGINT as Ctrl-C delivers it.

    A test run started in the background of a script (``cmd &`` in a
    non-interactive shell, as a CI job may be) ignores SIGINT, and so would
    every program it starts, Python keeping what it inherits: the tests of
    what Ctrl-C does to them would wait in vain.
    """
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture
def gpus_as_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    """``[infra] gpus`` taken as given whatever devices this machine has: a
    GPU set to test with, also on a machine with fewer GPUs than it names."""
    monkeypatch.setattr(gpus, "_detect", lambda: ("none", None))


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PATH holding only what a test puts there, and no NVML: no real GPU tool is used."""
    path = tmp_path / "bin"
    path.mkdir()
    monkeypatch.setenv("PATH", str(path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    return path


@pytest.fixture
def make_smi(bin_dir: Path) -> MakeSmi:
    """Writes a fake ``nvidia-smi`` (a shell script of this body) where detection finds it."""

    def make(body: str) -> None:
        script = bin_dir / "nvidia-smi"
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)

    return make


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
async def busybox() -> str:
    """The name of a local busybox image; skips (or fails, when required) without Docker."""
    return await require_docker()


@pytest.fixture(scope="session")
def slurm() -> str:
    """The default partition of a Slurm cluster that answers; skips (or fails) without one."""
    return require_slurm()
