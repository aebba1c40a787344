"""Bad submit input gets InvalidTask naming what is wrong, and stores nothing; bad task
configuration gets a ConfigError naming the key path."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest

from dspy_infra import AgentInfra
from dspy_infra.errors import ConfigError, InvalidTask, UnknownTask
from dspy_infra.scheduling.tasks import Resources
from tests.integration.helpers import beside_the_loop, service

# The instance of these tests names GPUs 0 and 1, whatever this machine has.
pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("gpus_as_configured")]

MAX_PAYLOAD = 64
MAX_PRIORITY = 10


def start(tmp_path: Path, calls: list[Any]) -> AgentInfra:
    async def echo(payload: Any) -> Any:
        calls.append(payload)
        return payload

    return AgentInfra.start(
        {
            "infra": {
                "max_payload_bytes": MAX_PAYLOAD,
                "max_priority": MAX_PRIORITY,
                "autostart": False,
                "cpus": 2,
                "memory_mb": 1000,
                "gpus": [0, 1],
            },
            "services": {"svc": service(autostart=False)},
            "handlers": {"script": {"command": ["true"]}},
        },
        state_dir=tmp_path / "state",
        handlers={"echo": echo},
    )


def stored_ids(tmp_path: Path) -> list[str]:
    db = sqlite3.connect(f"file:{tmp_path / 'state' / 'tasks.db'}?mode=ro", uri=True)
    try:
        return [task_id for (task_id,) in db.execute("SELECT task_id FROM tasks ORDER BY seq")]
    finally:
        db.close()


CYCLIC: dict[str, Any] = {"x": [1]}
CYCLIC["x"].append(CYCLIC)

# (submit_task keyword arguments, a fragment the message must contain)
BAD: dict[str, tuple[dict[str, Any], str]] = {
    "unknown class": ({"task_class": "nope"}, "unknown task class 'nope'"),
    "unknown in-process handler": ({"handler": "missing"}, "no in-process handler 'missing'"),
    "unknown process handler": (
        {"handler": "missing", "task_class": "cpu_long"},
        "no [handlers.missing] with a command",
    ),
    "set payload": ({"payload": {1, 2}}, "not JSON-compatible"),
    "nan payload": ({"payload": {"x": math.nan}}, "not JSON-compatible"),
    "infinite payload": ({"payload": [math.inf]}, "not JSON-compatible"),
    "object payload": ({"payload": object()}, "not JSON-compatible"),
    "cyclic payload": ({"payload": CYCLIC}, "Circular reference detected"),
    "oversized payload": (
        {"payload": "x" * MAX_PAYLOAD},
        f"over the limit of {MAX_PAYLOAD} (infra.max_payload_bytes)",
    ),
    "oversized multibyte payload": (
        {"payload": "é" * (MAX_PAYLOAD // 2)},
        f"over the limit of {MAX_PAYLOAD}",
    ),
    "negative priority": (
        {"priority": -1},
        f"priority must be an integer from 0 to {MAX_PRIORITY}",
    ),
    "priority above max": ({"priority": MAX_PRIORITY + 1}, "got 11"),
    "bool priority": ({"priority": True}, "priority must be an integer"),
    "float priority": ({"priority": 1.5}, "priority must be an integer"),
    "max_attempts 0": ({"max_attempts": 0}, "max_attempts must be an integer from 1 to"),
    "max_attempts bool": ({"max_attempts": True}, "max_attempts must be an integer"),
    "timeout 0": ({"timeout": 0}, "timeout must be a number of seconds above 0, got 0"),
    "negative timeout": ({"timeout": -1.5}, "timeout must be a number of seconds above 0"),
    "nan timeout": ({"timeout": math.nan}, "timeout must be a number of seconds above 0"),
    "unknown service": ({"needs": ["svc", "nosuch"]}, "needs unknown services nosuch"),
    "too many gpus": ({"resources": Resources(gpus=3)}, "needs 3 GPUs; this machine has 2"),
    "too many cpus": ({"resources": Resources(cpus=3)}, "needs 3 CPUs; this machine has 2"),
    "too much memory": ({"resources": Resources(memory_mb=1001)}, "needs 1001 MB"),
    # Resources that no task can hold: leasing them corrupts the accounting
    # (gpus=-1 leases all but one device, cpus=-1 frees a CPU nobody held).
    "negative gpus": ({"resources": Resources(gpus=-1)}, "gpus"),
    "negative cpus": ({"resources": Resources(cpus=-1)}, "cpus"),
    "nan cpus": ({"resources": Resources(cpus=math.nan)}, "cpus"),
    "infinite cpus": (
        {"resources": Resources(cpus=math.inf)},
        "resources.cpus must be a finite number of at least 0, got inf",
    ),
    "negative memory": ({"resources": Resources(memory_mb=-5)}, "memory"),
    "bool timeout": ({"timeout": True}, "timeout must be a number of seconds above 0"),
    # Beyond what the store's columns hold: the insert failed, and with it the instance.
    "max_attempts beyond 64 bits": (
        {"max_attempts": 2**63},
        f"max_attempts must be an integer from 1 to {2**63 - 1}",
    ),
    "timeout beyond a float": ({"timeout": 10**400}, "timeout must be a number of seconds"),
    # Text that UTF-8 cannot encode (a lone surrogate), which SQLite refuses.
    "unencodable workflow_id": ({"workflow_id": "run-\udc80"}, "workflow_id must be a string"),
    # Types the signature does not allow, as a caller without a type checker passes them:
    # a clear InvalidTask, not a TypeError from deep inside (or a store that fails).
    "dict workflow_id": ({"workflow_id": {"run": 1}}, "workflow_id"),
    "int service name": ({"needs": [1]}, "needs"),
    # Not a list at all: TypeError "'NoneType' object is not iterable", naming nothing.
    "None needs": ({"needs": None}, "needs must be a list of service names, got None"),
    "int needs": ({"needs": 5}, "needs must be a list of service names, got 5"),
    "list handler": ({"handler": ["echo"]}, "handler"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_bad_input_is_refused_and_nothing_is_stored(tmp_path: Path, case: str) -> None:
    changes, fragment = BAD[case]
    arguments: dict[str, Any] = {"handler": "echo", "payload": None, "task_id": "bad-1"}
    arguments.update(changes)
    calls: list[Any] = []
    async with start(tmp_path, calls) as infra:
        good = await infra.submit_task("echo", "fine", task_id="good")
        with pytest.raises(InvalidTask) as caught:
            await infra.submit_task(arguments.pop("handler"), arguments.pop("payload"), **arguments)
        assert fragment in str(caught.value)
        assert "bad-1" in str(caught.value)
        assert caught.value.task_id == "bad-1"
        with pytest.raises(UnknownTask):
            await infra.get_task_status("bad-1")
        assert await good.result() == "fine"
        # The instance works on as before.
        after = await infra.submit_task("echo", "after", task_id="after")
        assert await after.result() == "after"
        await anyio.sleep(0.02)
        assert (await infra.task_classes())["cpu_short"].queued == 0
    assert calls == ["fine", "after"]
    assert stored_ids(tmp_path) == ["good", "after"]
    async with start(tmp_path, calls) as infra:
        with pytest.raises(UnknownTask):
            await infra.get_task_status("bad-1")
    assert calls == ["fine", "after"]


@pytest.mark.parametrize(
    ("task_id", "fragment"),
    [
        ("", "task_id must be a non-empty string, got ''"),
        ("x" * 201, "task_id is 201 characters long, over the limit of 200"),
        ("../escape", "may only hold letters, digits"),
        ("a/b", "may only hold letters, digits"),
    ],
)
async def test_bad_task_ids_are_refused(tmp_path: Path, task_id: str, fragment: str) -> None:
    calls: list[Any] = []
    async with start(tmp_path, calls) as infra:
        with pytest.raises(InvalidTask, match=fragment):
            await infra.submit_task("echo", 1, task_id=task_id)
        with pytest.raises(UnknownTask):
            await infra.get_task_status(task_id)
        # The longest allowed id is fine.
        longest = await infra.submit_task("echo", 2, task_id="y" * 200)
        assert await longest.result() == 2
    assert calls == [2]
    assert stored_ids(tmp_path) == ["y" * 200]


@beside_the_loop
async def test_a_submit_of_thousands_found_bad_late_stores_none_of_it(tmp_path: Path) -> None:
    # Their first rows were already at the store's writer (written ahead, in
    # the transaction of the whole submit), and are taken back.
    class Late(Exception):
        pass

    def failing(at: int) -> Any:
        yield from range(at)
        raise Late

    calls: list[Any] = []
    async with start(tmp_path, calls) as infra:
        with pytest.raises(InvalidTask, match="not JSON-compatible"):
            await infra.submit_tasks("echo", [*range(1500), {"bad": {3}}])
        with pytest.raises(Late):
            await infra.submit_tasks("echo", failing(2000))
        assert stored_ids(tmp_path) == []
        handles = await infra.submit_tasks("echo", range(1200))
        assert [await h.result() for h in handles] == list(range(1200))
    assert len(calls) == 1200
    assert stored_ids(tmp_path) == [h.task_id for h in handles]


async def test_submit_tasks_stores_all_or_none(tmp_path: Path) -> None:
    calls: list[Any] = []
    async with start(tmp_path, calls) as infra:
        payloads: list[Any] = [1, 2, {"bad": {3}}, 4]
        with pytest.raises(InvalidTask, match="not JSON-compatible"):
            await infra.submit_tasks("echo", payloads)
        with pytest.raises(InvalidTask, match="over the limit"):
            await infra.submit_tasks("echo", [1, "x" * 100])
        with pytest.raises(InvalidTask, match="unknown task class"):
            await infra.submit_tasks("echo", [1, 2], task_class="nope")
        with pytest.raises(InvalidTask, match="needs must be a list of service names, got None"):
            await infra.submit_tasks("echo", [1, 2], needs=None)  # type: ignore[arg-type]
        # One payload given where a list of them is taken: a string or a dict
        # would have been one task per letter or per key.
        for one in ("abc", b"abc", {"a": 1, "b": 2}, None, 5):
            with pytest.raises(InvalidTask, match=r"payloads must be a list .*, got "):
                await infra.submit_tasks("echo", one)  # type: ignore[arg-type]
        await anyio.sleep(0.05)
        assert (await infra.task_classes())["cpu_short"].queued == 0
        assert (await infra.task_classes())["cpu_short"].running == 0
    assert calls == []
    assert stored_ids(tmp_path) == []
    async with start(tmp_path, calls) as infra:
        assert (await infra.task_classes())["cpu_short"].queued == 0
        await anyio.sleep(0.05)
    assert calls == []


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "path", "fragment"),
    [
        pytest.param(
            {"infra": {"max_priority": -1}},
            "infra.max_priority",
            "expected a number >= 0",
            id="negative max_priority",
        ),
        pytest.param(
            {"classes": {"x": {"min_concurrency": 5, "max_concurrency": 2}}},
            "classes.x.min_concurrency",
            "must be at most max_concurrency",
            id="min above max concurrency",
        ),
        pytest.param(
            {"classes": {"x": {"runner": "nope"}}},
            "classes.x.runner",
            "unknown runner 'nope'",
            id="unknown runner",
        ),
        pytest.param(
            {"classes": {"x": {"max_concurrency": 0}}},
            "classes.x.max_concurrency",
            ">= 1",
            id="zero max_concurrency",
        ),
        pytest.param(
            {"classes": {"x": {"gpus": -1}}}, "classes.x.gpus", ">= 0", id="negative class gpus"
        ),
        pytest.param(
            {"classes": {"x": {"queue_timeout": 0}}},
            "classes.x.queue_timeout",
            "> 0",
            id="zero queue_timeout",
        ),
        pytest.param(
            {"infra": {"max_payload_bytes": 0}},
            "infra.max_payload_bytes",
            ">= 1",
            id="zero max_payload_bytes",
        ),
        # One device listed twice would be leased to two tasks at once.
        pytest.param({"infra": {"gpus": [0, 0]}}, "infra.gpus", "0", id="duplicate gpu id"),
        # Not a device: CUDA_VISIBLE_DEVICES=-1 hides every GPU.
        pytest.param({"infra": {"gpus": [-1]}}, "infra.gpus", "-1", id="negative gpu id"),
    ],
)
def test_bad_task_configuration_names_the_key_path(
    tmp_path: Path, config: dict[str, Any], path: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        AgentInfra.start(config, state_dir=tmp_path / "state")
    assert caught.value.path == path
    assert path in str(caught.value)
    assert fragment in str(caught.value)
