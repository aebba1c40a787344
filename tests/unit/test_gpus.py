"""GPU inventory: configured ids restrict what is detected, detection is filtered by
CUDA_VISIBLE_DEVICES as CUDA reads it, and a failing or hung tool only means
"not detected". Detection runs against fake ``nvidia-smi`` scripts (real
subprocesses) and a fake ``pynvml`` module, so these run on any machine."""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
import types

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspy_infra.errors import ConfigError
from dspy_infra.scheduling import gpus
from dspy_infra.scheduling.gpus import GpuInventory, detect_gpus
from tests.conftest import MakeSmi

SMI_OUTPUT = "0, GPU-aaaa1111\n1, GPU-bbbb2222\n2, GPU-abcd3333\n"


@pytest.fixture
def smi(make_smi: MakeSmi) -> None:
    make_smi(f"printf '{SMI_OUTPUT}'")


def inv(source: str, *ids: str) -> GpuInventory:
    return GpuInventory(ids=ids, source=source)


@pytest.mark.anyio
@pytest.mark.usefixtures("smi")
async def test_configured_ids_restrict_the_detected_devices() -> None:
    # Given, in their order, over CUDA_VISIBLE_DEVICES; but only devices there are.
    environ = {"CUDA_VISIBLE_DEVICES": "1"}
    assert await detect_gpus([2, 0], environ=environ) == inv("config", "2", "0")
    assert await detect_gpus((), environ=environ) == inv("config")
    with pytest.raises(ConfigError) as info:
        await detect_gpus([1, 5, 7], environ=environ)
    assert str(info.value) == (
        "infra.gpus: GPUs 5, 7 are not on this machine (nvidia-smi found: 0, 1, 2)"
    )


@pytest.mark.anyio
@pytest.mark.usefixtures("bin_dir")
async def test_configured_ids_are_taken_as_given_where_nothing_is_detected() -> None:
    # A machine without a GPU tool: a GPU set to test with.
    assert await detect_gpus([0, 1]) == inv("config", "0", "1")
    with pytest.MonkeyPatch.context() as patch:  # NVML counting no device: the same
        patch.setattr(gpus, "_detect", lambda: ("nvml", []))
        assert await detect_gpus([0, 1]) == inv("config", "0", "1")


@pytest.mark.anyio
@pytest.mark.usefixtures("smi")
async def test_a_configured_id_not_on_the_machine_names_the_file() -> None:
    with pytest.raises(ConfigError) as info:
        await detect_gpus([3], config_source="dspy-infra.toml")
    assert str(info.value) == (
        "dspy-infra.toml: infra.gpus: GPU 3 is not on this machine (nvidia-smi found: 0, 1, 2)"
    )


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        ("0,1", ("0", "1")),
        (" 0 , 2 ", ("0", "2")),
        ("GPU-aaaa1111, 1", ("GPU-aaaa1111", "1")),
        ("MIG-1234-5678", ("MIG-1234-5678",)),
        ("01,0,1", ("1", "0")),
        ("0,-1,1", ("0",)),
        ("0,,1", ("0",)),
        ("2,abc,3", ("2",)),
        ("", ()),
        ("  ", ()),
        ("-1", ()),
        ("NoDevFiles", ()),
    ],
)
@pytest.mark.usefixtures("bin_dir")
async def test_cuda_visible_devices_alone_gives_its_tokens(
    visible: str, expected: tuple[str, ...]
) -> None:
    result = await detect_gpus(environ={"CUDA_VISIBLE_DEVICES": visible})
    assert result == GpuInventory(ids=expected, source="CUDA_VISIBLE_DEVICES")


@pytest.mark.anyio
@pytest.mark.usefixtures("bin_dir")
async def test_nothing_detected_and_nothing_set_means_no_gpus() -> None:
    assert await detect_gpus() == inv("none")
    assert await detect_gpus(environ={}) == inv("none")


@pytest.mark.anyio
@pytest.mark.usefixtures("bin_dir")
async def test_environment_defaults_to_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert await detect_gpus() == inv("CUDA_VISIBLE_DEVICES", "3", "1")
    assert await detect_gpus(environ={}) == inv("none")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        (None, ("0", "1", "2")),
        ("2,GPU-aaaa1111", ("2", "0")),
        (" 1 , 0 ", ("1", "0")),
        ("GPU-bbbb", ("1",)),  # a unique UUID prefix, as CUDA accepts
        ("GPU-a,1", ()),  # an ambiguous prefix ends the list
        ("1,7,0", ("1",)),  # an unknown device ends the list
        ("0,-1,1", ("0",)),
        ("1,GPU-bbbb2222,1", ("1",)),
        # MIG slices are not in the device list: their ids are passed on as given.
        ("MIG-1234-5678", ("MIG-1234-5678",)),
        ("MIG-aa, 1 ,MIG-bb,MIG-aa", ("MIG-aa", "1", "MIG-bb")),
        ("", ()),
        ("-1", ()),
        ("NoDevFiles", ()),
    ],
)
@pytest.mark.usefixtures("smi")
async def test_nvidia_smi_devices_filtered_by_cuda_visible_devices(
    visible: str | None, expected: tuple[str, ...]
) -> None:
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert await detect_gpus(environ=environ) == GpuInventory(ids=expected, source="nvidia-smi")


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [
        "echo 'NVIDIA-SMI has failed' >&2; exit 1",
        "echo 'not, csv, at all'",
        "echo 'x, GPU-1'",
    ],
)
async def test_a_failing_nvidia_smi_means_not_detected(
    make_smi: MakeSmi, body: str, caplog: pytest.LogCaptureFixture
) -> None:
    make_smi(body)
    with caplog.at_level(logging.DEBUG, logger="dspy_infra"):
        assert await detect_gpus(environ={}) == inv("none")
        visible = {"CUDA_VISIBLE_DEVICES": "3"}
        assert await detect_gpus(environ=visible) == inv("CUDA_VISIBLE_DEVICES", "3")
    assert any("nvidia-smi" in record.getMessage() for record in caplog.records)
    assert all(record.levelno == logging.DEBUG for record in caplog.records)


@pytest.mark.anyio
async def test_a_corrupted_inforom_warning_keeps_the_devices_listed(
    make_smi: MakeSmi, caplog: pytest.LogCaptureFixture
) -> None:
    # nvidia-smi exits 14 ("infoROM is corrupted", a warning) after printing
    # its list; NVML lists the same devices on such a machine.
    warning = "echo 'WARNING: infoROM is corrupted at gpu 0000:00:1E.0' >&2; exit 14"
    make_smi(f"printf '{SMI_OUTPUT}'; {warning}")
    with caplog.at_level(logging.WARNING, logger="dspy_infra"):
        assert await detect_gpus(environ={}) == inv("nvidia-smi", "0", "1", "2")
    assert [record.getMessage() for record in caplog.records] == [
        "nvidia-smi exited 14, infoROM is corrupted: its devices are used, "
        "and may be faulty (see the NVIDIA GPU Operator's troubleshooting guide)"
    ]
    make_smi(warning)  # no list: nothing detected
    assert await detect_gpus(environ={"CUDA_VISIBLE_DEVICES": "3"}) == inv(
        "CUDA_VISIBLE_DEVICES", "3"
    )


@pytest.mark.anyio
async def test_a_hung_nvidia_smi_times_out(
    make_smi: MakeSmi, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_smi(f"exec {shutil.which('sleep', path='/usr/bin:/bin')} 30")
    monkeypatch.setattr(gpus, "NVIDIA_SMI_TIMEOUT", 0.3)
    with anyio.fail_after(10):
        assert await detect_gpus(environ={}) == inv("none")


@pytest.mark.anyio
async def test_detection_does_not_block_the_event_loop(make_smi: MakeSmi) -> None:
    make_smi(f"{shutil.which('sleep', path='/usr/bin:/bin')} 0.5; printf '{SMI_OUTPUT}'")
    ticks = 0
    result: list[GpuInventory] = []

    async def detect() -> None:
        result.append(await detect_gpus(environ={}))

    async def tick() -> None:
        nonlocal ticks
        while not result:
            ticks += 1
            await anyio.sleep(0.01)

    start = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(detect)
        tg.start_soon(tick)
    assert time.monotonic() - start >= 0.5
    assert result == [inv("nvidia-smi", "0", "1", "2")]
    assert ticks >= 10


def fake_nvml(
    uuids: list[str | bytes], *, init_error: bool = False, hang: threading.Event | None = None
) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if init_error:
            raise RuntimeError("NVML Shared Library Not Found")
        if hang is not None:
            hang.wait()

    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: len(uuids)  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda index: index  # type: ignore[attr-defined]
    module.nvmlDeviceGetUUID = lambda handle: uuids[handle]  # type: ignore[attr-defined]
    module.calls = calls  # type: ignore[attr-defined]
    return module


@pytest.mark.anyio
@pytest.mark.usefixtures("smi")
async def test_nvml_is_preferred_and_filtered(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = fake_nvml([b"GPU-nvml0", "GPU-nvml1"])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert await detect_gpus(environ={}) == inv("nvml", "0", "1")
    visible = {"CUDA_VISIBLE_DEVICES": "GPU-nvml1,0"}
    assert await detect_gpus(environ=visible) == inv("nvml", "1", "0")
    assert nvml.calls == ["init", "shutdown"] * 2


@pytest.mark.anyio
@pytest.mark.usefixtures("smi")
async def test_a_failing_nvml_falls_back_to_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([], init_error=True))
    assert await detect_gpus(environ={}) == inv("nvidia-smi", "0", "1", "2")


@pytest.mark.anyio
@pytest.mark.usefixtures("smi")
async def test_a_hung_nvml_falls_back_to_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    # A wedged driver: NVML's calls do not return, and no Python code can
    # interrupt them. Detection gave no answer, and the instance never started.
    hang = threading.Event()
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(["GPU-nvml0"], hang=hang))
    monkeypatch.setattr(gpus, "NVML_TIMEOUT", 0.3)
    try:
        with anyio.fail_after(10):
            assert await detect_gpus(environ={}) == inv("nvidia-smi", "0", "1", "2")
    finally:
        hang.set()  # the thread left in it ends: no other test finds it


@pytest.mark.anyio
@pytest.mark.usefixtures("smi")
async def test_nvml_with_no_devices_is_an_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([]))
    assert await detect_gpus(environ={"CUDA_VISIBLE_DEVICES": "0"}) == inv("nvml")


# Property: CUDA_VISIBLE_DEVICES is read token by token up to the first invalid one.

VALID = st.one_of(
    st.integers(0, 20).map(str),
    st.integers(0, 20).map(lambda i: f"0{i}"),
    st.sampled_from(["GPU-aaaa1111", "GPU-bbbb2222", "GPU-abcd3333", "GPU-bbbb", "MIG-ff-01"]),
)
INVALID = st.sampled_from(["", "-1", "NoDevFiles", "gpu0", "GPU-", "1.5", "+1", "٣"])
TOKENS = st.lists(st.one_of(VALID, INVALID), max_size=8)
SPACES = st.sampled_from(["", " ", "  ", "\t"])
PROPERTY = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
DEVICES = [("0", "GPU-aaaa1111"), ("1", "GPU-bbbb2222"), ("2", "GPU-abcd3333")]


def normal(token: str) -> str | None:
    if token.isascii() and token.isdigit():
        return str(int(token))
    return token if token.startswith(("GPU-", "MIG-")) and len(token) > 4 else None


@st.composite
def visible_devices(draw: st.DrawFn) -> tuple[str, list[str]]:
    tokens = draw(TOKENS)
    value = ",".join(f"{draw(SPACES)}{token}{draw(SPACES)}" for token in tokens)
    return value, tokens


@pytest.mark.anyio
@given(visible=visible_devices())
@PROPERTY
@pytest.mark.usefixtures("bin_dir")
async def test_property_cuda_visible_devices_without_detection(
    visible: tuple[str, list[str]],
) -> None:
    value, tokens = visible
    expected: list[str] = []
    for token in tokens:
        if (id_ := normal(token)) is None:
            break
        if id_ not in expected:
            expected.append(id_)
    result = await detect_gpus(environ={"CUDA_VISIBLE_DEVICES": value})
    assert result == GpuInventory(ids=tuple(expected), source="CUDA_VISIBLE_DEVICES")


@pytest.mark.anyio
@given(visible=visible_devices())
@PROPERTY
async def test_property_detected_devices_filtered(
    visible: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpus, "_detect", lambda: ("nvml", DEVICES))
    value, tokens = visible
    expected: list[str] = []
    for token in tokens:
        id_ = normal(token)
        found = [i for i, uuid in DEVICES if id_ is not None and id_ in (i, uuid[: len(id_)])]
        if id_ is not None and id_.startswith("MIG-"):
            found = [id_]
        if len(found) != 1:
            break
        if found[0] not in expected:
            expected.append(found[0])
    result = await detect_gpus(environ={"CUDA_VISIBLE_DEVICES": value})
    assert result == GpuInventory(ids=tuple(expected), source="nvml")
