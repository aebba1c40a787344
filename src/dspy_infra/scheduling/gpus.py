"""Which GPUs this process may hand to tasks.

The answer is decided in this order, first match wins:

1. ``configured`` ids (``InfraSettings.gpus``), source ``"config"``: a user
   restricts the scheduler to some devices. Where detection (below) finds
   devices, each id must be one of them (a ConfigError names those that
   are not); where it finds none, the ids are taken as given, so that tests
   can give the scheduler a GPU set on a machine without any. An empty list
   means "no GPUs", not "detect".
2. Detection, NVML first (``pynvml`` from the optional ``gpu`` extra, no
   subprocess) and ``nvidia-smi`` otherwise (always shipped with the driver).
   Both block, so they run in a worker thread, never on the event loop. A
   failure (no driver, no device, non-zero exit, hang) means "not detected",
   never an exception: a machine without GPUs is normal, and it only costs
   the ``gpu`` classes their slots. (nvidia-smi's exit 14, a corrupted
   infoROM, is a warning after a whole list: those devices are used.) Ids
   are indices as both tools number devices (PCI bus order); UUIDs in
   ``CUDA_VISIBLE_DEVICES`` are matched too.
   Both list whole GPUs, never MIG slices: ``MIG-`` ids are kept as given.
3. ``CUDA_VISIBLE_DEVICES``, as CUDA reads it: tokens separated by commas,
   spaces ignored, and the first invalid token ends the list (so ``""``,
   ``"-1"`` and ``"NoDevFiles"`` mean no GPUs). With detected devices it
   filters them, in its order: a process confined to some devices must not
   hand out others. Without detection its tokens are the ids, trusted as is.
4. Otherwise no GPUs.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType

import anyio.to_thread
from attrs import frozen

from dspy_infra.errors import ConfigError

__all__ = ["GpuInventory", "detect_gpus"]

log = logging.getLogger("dspy_infra")

NVIDIA_SMI_TIMEOUT = 10.0
# NVML's calls hang on a wedged driver, as nvidia-smi (which makes them) does.
NVML_TIMEOUT = 10.0
# nvidia-smi's exit status for a corrupted infoROM: a warning printed after a
# whole device list, which NVML (it does not read the infoROM) lists too.
NVIDIA_SMI_INFOROM_CORRUPTED = 14
_INDEX_RE = re.compile(r"[0-9]+")
_UUID_RE = re.compile(r"(GPU|MIG)-\S+")

Devices = list[tuple[str, str]]  # (index, uuid) pairs, as NVML and nvidia-smi number them


@frozen(kw_only=True)
class GpuInventory:
    """The GPU ids tasks may be given (as ``CUDA_VISIBLE_DEVICES`` accepts
    them) and where they came from, so a surprising answer can be explained."""

    ids: tuple[str, ...]
    source: str


async def detect_gpus(
    configured: Sequence[int] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    config_source: str | None = None,
) -> GpuInventory:
    if configured is not None:
        return await _configured(tuple(str(i) for i in configured), config_source)
    env = os.environ if environ is None else environ
    source, devices = await anyio.to_thread.run_sync(_detect)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if devices is not None:
        ids = [index for index, _ in devices]
        if visible is not None:
            ids = _filter(devices, _tokens(visible))
        return GpuInventory(ids=tuple(ids), source=source)
    if visible is not None:
        return GpuInventory(ids=tuple(_tokens(visible)), source="CUDA_VISIBLE_DEVICES")
    return GpuInventory(ids=(), source="none")


async def _configured(ids: tuple[str, ...], config_source: str | None) -> GpuInventory:
    """The configured ids, each checked against the devices detected, if any are;
    an error names ``config_source``, what set them (a file, variable or override)."""
    if ids:
        source, devices = await anyio.to_thread.run_sync(_detect)
        found = [index for index, _ in devices or ()]
        missing = [i for i in ids if i not in found]
        if found and missing:  # NVML's empty list is no detection either
            which = (
                f"GPU {missing[0]} is" if len(missing) == 1 else f"GPUs {', '.join(missing)} are"
            )
            raise ConfigError(
                f"{which} not on this machine ({source} found: {', '.join(found) or 'none'})",
                source=config_source,
                path="infra.gpus",
            )
    return GpuInventory(ids=ids, source="config")


def _tokens(value: str) -> list[str]:
    tokens: list[str] = []
    for raw in value.split(","):
        token = raw.strip()
        if _INDEX_RE.fullmatch(token):
            token = str(int(token))  # "01" is device 1, as CUDA parses it
        elif not _UUID_RE.fullmatch(token):
            break
        if token not in tokens:
            tokens.append(token)
    return tokens


def _filter(devices: Devices, tokens: Sequence[str]) -> list[str]:
    ids: list[str] = []
    for token in tokens:
        found = _match(devices, token)
        if len(found) != 1:
            break
        if found[0] not in ids:
            ids.append(found[0])
    return ids


def _match(devices: Devices, token: str) -> list[str]:
    """The detected devices ``token`` names: CUDA accepts a unique UUID prefix,
    and an unknown or ambiguous token ends the list. A MIG slice is not among
    the devices (both tools list whole GPUs), so its id is kept as given: the
    way Slurm and Kubernetes confine a job to slices."""
    if token.startswith("MIG-"):
        return [token]
    return [index for index, uuid in devices if token == index or uuid.startswith(token)]


def _detect() -> tuple[str, Devices | None]:
    for source, probe in (("nvml", _nvml), ("nvidia-smi", _nvidia_smi)):
        try:
            devices = probe()
        except Exception:  # any failure only means "not detected this way"
            log.debug("GPU detection with %s failed", source, exc_info=True)
            continue
        if devices is not None:
            return source, devices
    return "none", None


def _nvml() -> Devices | None:
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError:
        return None  # the optional ``gpu`` extra is not installed: normal
    return _within(NVML_TIMEOUT, functools.partial(_nvml_devices, nvml))


def _within(seconds: float, call: Callable[[], Devices]) -> Devices:
    """``call()``, in a daemon thread; TimeoutError when it has not returned in ``seconds``.

    A call into the driver cannot be interrupted: the thread is left in it,
    and being a daemon, does not keep the program from exiting. (A worker
    thread of anyio's would: the program would hang at its exit instead.)
    """
    outcome: list[Devices | BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
            outcome.append(exc)

    thread = threading.Thread(target=run, name="dspy-infra GPU detection", daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise TimeoutError(f"no answer in {seconds:g} s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _nvml_devices(nvml: ModuleType) -> Devices:
    nvml.nvmlInit()
    try:
        devices: Devices = []
        for index in range(nvml.nvmlDeviceGetCount()):
            uuid = nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(index))
            devices.append((str(index), uuid.decode() if isinstance(uuid, bytes) else str(uuid)))
        return devices
    finally:
        nvml.nvmlShutdown()


def _nvidia_smi() -> Devices | None:
    path = shutil.which("nvidia-smi")
    if path is None:
        return None
    argv = [path, "--query-gpu=index,uuid", "--format=csv,noheader"]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT, check=False
    )
    warned = result.returncode == NVIDIA_SMI_INFOROM_CORRUPTED
    devices = _parse_nvidia_smi(result.stdout) if warned or not result.returncode else []
    if result.returncode and not devices:  # an error, or the warning without a list
        result.check_returncode()
    if warned:
        log.warning(
            "nvidia-smi exited %d, infoROM is corrupted: its devices are used, and may be "
            "faulty (see the NVIDIA GPU Operator's troubleshooting guide)",
            result.returncode,
        )
    return devices


def _parse_nvidia_smi(out: str) -> Devices:
    devices: Devices = []
    for line in filter(None, map(str.strip, out.splitlines())):
        index, uuid = (part.strip() for part in line.split(","))
        if not _INDEX_RE.fullmatch(index):
            raise ValueError(f"unexpected nvidia-smi line {line!r}")
        devices.append((str(int(index)), uuid))
    return devices
