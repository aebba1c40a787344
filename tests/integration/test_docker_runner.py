"""Tasks in containers (``runner = "docker"``), against a real dockerd, through the public API.

Each test has a project of its own, and ends by checking that no container
(task or otherwise) and no network of that project is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp
import anyio
import pytest

from dspy_infra import AgentInfra, Config, ConfigError
from dspy_infra.config.model import HandlerConfig, InfraSettings, TaskClass
from dspy_infra.docker.engine import Container, Engine, Labels
from dspy_infra.errors import InvalidTask, TaskCancelled, TaskFailed, TaskTimedOut, UnknownTask
from dspy_infra.scheduling.tasks import Resources, TaskHandle, TaskState
from tests.integration.helpers import CutEvents, built_image, dockerfile_context, refuse_once

pytestmark = pytest.mark.anyio

SLEEPER = ["sh", "-c", "echo up > {work_dir}/started; sleep 60"]


async def labelled(*labels: str) -> tuple[list[str], list[str]]:
    """Ids of the containers and networks carrying all ``labels`` (``key=value``)."""
    async with aiodocker.Docker() as docker:
        containers = await docker.containers.list(
            all=True, filters=json.dumps({"label": list(labels)})
        )
        networks = await docker.networks.list(filters={"label": list(labels)})
    return [c.id for c in containers], [n["Id"] for n in networks]


@pytest.fixture
async def project(tmp_path: Path, busybox: str) -> AsyncIterator[str]:
    """A project name of this test's own; no task container of it may be left at the end."""
    name = f"t{tmp_path.name[-20:].replace('_', '-').strip('-')}"
    yield name
    project = f"{Labels.PROJECT}={name}"
    assert await labelled(project, f"{Labels.KIND}=task") == ([], [])
    assert await labelled(project) == ([], [])


def start(
    tmp_path: Path,
    project: str,
    handlers: dict[str, dict[str, Any]],
    *,
    infra: dict[str, Any] | None = None,
    services: dict[str, Any] | None = None,
    **task_class: Any,
) -> AgentInfra:
    """An instance with the class ``box`` running ``handlers`` in containers."""
    return AgentInfra.start(
        {
            "infra": {"project": project, **(infra or {})},
            "classes": {"box": {"runner": "docker", "max_concurrency": 4, **task_class}},
            "handlers": handlers,
            "services": services or {},
        },
        state_dir=tmp_path / "state",
    )


def box(busybox: str, command: list[str] | str, **fields: Any) -> dict[str, Any]:
    """A ``[handlers.NAME]`` table running ``command`` in the busybox image."""
    return {"image": busybox, "pull": "never", "command": command, **fields}


async def submit(
    infra: AgentInfra, handler: str, payload: Any = None, **options: Any
) -> TaskHandle:
    return await infra.submit_task(handler, payload, task_class="box", **options)


async def wait_for(path: Path) -> None:
    with anyio.fail_after(30):
        while not await anyio.Path(path).exists():
            await anyio.sleep(0.02)


async def test_the_result_file_and_the_attempts_files_and_environment(
    tmp_path: Path, project: str, busybox: str
) -> None:
    # The work dir is mounted at the same path: the placeholders, the
    # environment and the working directory all name the host's files.
    script = (
        'test "$(cat {payload_file})" = "$(cat $DSPY_INFRA_PAYLOAD_FILE)" || exit 9; '
        'echo "[\\"$PWD\\", \\"$DSPY_INFRA_TASK_ID\\", \\"$DSPY_INFRA_ATTEMPT\\", '
        '\\"$GREETING\\", $(cat {payload_file})]" > {result_file}'
    )
    handlers = {"env": box(busybox, ["sh", "-c", script], env={"GREETING": "hi ✓"})}
    async with start(tmp_path, project, handlers) as infra:
        handle = await submit(infra, "env", {"n": [1, 2.5]}, task_id="env-1")
        result = await handle.result()
    work_dir = str((tmp_path / "state" / "tasks" / "env-1").absolute())
    assert result == [work_dir, "env-1", "1", "hi ✓", {"n": [1, 2.5]}]


async def test_a_work_dir_with_a_colon_is_mounted(
    tmp_path: Path, project: str, busybox: str
) -> None:
    # A workflow's steps are tasks named RUN_ID:STEP, and a state_dir may
    # hold a ':' too: Docker's "SOURCE:TARGET" volume syntax takes neither.
    state_dir = tmp_path / "state:1"
    config = {
        "infra": {"project": project},
        "classes": {"box": {"runner": "docker"}},
        "handlers": {"echo": box(busybox, ["sh", "-c", "cat {payload_file} > {result_file}"])},
    }
    async with AgentInfra.start(config, state_dir=state_dir) as infra:
        handle = await submit(infra, "echo", {"n": 1}, task_id="run-7:train", max_attempts=1)
        assert await handle.result() == {"n": 1}
    assert (state_dir / "tasks" / "run-7:train" / "result.json").exists()


async def test_an_image_whose_user_is_not_root_can_write_its_result(
    tmp_path: Path, project: str, busybox: str
) -> None:
    # Many images run as a user of their own (USER 1000): the work dir,
    # made by this program's user, must still take the command's files.
    context = dockerfile_context(tmp_path, f"FROM {busybox}\nUSER 1000:1000\n")
    async with built_image(context, f"local/{project}-user:latest") as tag:
        script = "cat {payload_file} > {result_file}; echo note > {work_dir}/note"
        handlers = {"echo": box(tag, ["sh", "-c", script])}
        async with start(tmp_path, project, handlers, max_attempts=2) as infra:
            handle = await submit(infra, "echo", {"n": 1}, task_id="user-1")
            assert await handle.result() == {"n": 1}
            assert (await handle.wait()).attempts == 1
        assert (tmp_path / "state" / "tasks" / "user-1" / "note").read_text() == "note\n"


async def test_the_last_stdout_line_is_the_result_without_a_result_file(
    tmp_path: Path, project: str, busybox: str
) -> None:
    handlers = {
        "json": box(busybox, "echo noise >&2; echo first; echo '{{\"n\": 42}}'; echo", shell=True),
        "words": box(busybox, ["echo", "plain words"]),
        # Longer than a chunk of Docker's log stream, and than a line it keeps whole.
        "long": box(busybox, "head -c 100000 /dev/zero | tr '\\0' a; echo", shell=True),
        "silent": box(busybox, ["true"]),
    }
    async with start(tmp_path, project, handlers) as infra:
        handles = {name: await submit(infra, name) for name in handlers}
        assert await handles["json"].result() == {"n": 42}
        assert await handles["words"].result() == "plain words"
        assert await handles["long"].result() == "a" * 100_000
        assert await handles["silent"].result() is None


async def test_a_failure_names_the_exit_code_and_shows_the_end_of_stderr(
    tmp_path: Path, project: str, busybox: str
) -> None:
    script = "echo out; for i in $(seq 1 30); do echo line $i >&2; done; exit 3"
    async with start(tmp_path, project, {"boom": box(busybox, ["sh", "-c", script])}) as infra:
        handle = await submit(infra, "boom")
        with pytest.raises(TaskFailed) as caught:
            await handle.result()
    error = caught.value.error
    assert "exited with code 3" in error
    assert "line 30" in error
    assert "line 11" in error
    assert "line 10\n" not in error  # the last 20 lines only
    assert "out" not in error.split("last output lines:")[1]  # stderr, not stdout


async def test_running_out_of_memory_is_named_as_such(
    tmp_path: Path, project: str, busybox: str
) -> None:
    # dd's 64 MB buffer in a container held to 8 MB: the kernel's OOM killer.
    hog = box(busybox, ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"])
    async with start(tmp_path, project, {"hog": hog}, memory_mb=8) as infra:
        handle = await submit(infra, "hog")
        with pytest.raises(TaskFailed) as caught:
            await handle.result()
    error = caught.value.error
    assert "ran out of memory: killed by signal SIGKILL (exit code 137 from Docker)" in error
    assert "limit is 8 MB" in error


async def test_running_out_of_memory_is_named_when_dockers_oom_event_is_late(
    tmp_path: Path, project: str, busybox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A busy daemon may send its "oom" event after the "die": here it comes
    # 0.1 s late, and the message still names the memory. Both are held until
    # both came, whichever Docker sent first and however late: the engine
    # sees exactly that gap, whatever the load on this machine's Docker.
    dispatch = Engine._dispatch
    held: dict[str, Any] = {}

    def oom_late(self: Engine, event: Any) -> None:
        action = event.get("Action") or event.get("status")
        if action not in ("oom", "die"):
            dispatch(self, event)
            return
        held[action] = event
        if len(held) == 2:
            dispatch(self, held.pop("die"))
            asyncio.get_running_loop().call_later(0.1, dispatch, self, held.pop("oom"))

    monkeypatch.setattr(Engine, "_dispatch", oom_late)

    async def not_in_state(self: Container) -> bool:  # only the event tells
        return False

    monkeypatch.setattr(Container, "_oom_in_state", not_in_state)
    hog = box(busybox, ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"])
    async with start(tmp_path, project, {"hog": hog}, memory_mb=8) as infra:
        handle = await submit(infra, "hog")
        # Held until Docker's "oom" came: without one, this test cannot tell.
        with pytest.raises(TaskFailed) as caught, anyio.fail_after(30):
            await handle.result()
    assert caught.value.error.startswith("ran out of memory: killed by signal SIGKILL")


async def test_a_container_docker_fails_to_inspect_after_an_event_stream_break_is_not_gone(
    tmp_path: Path, project: str, busybox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The event stream breaks while the task runs; asked after the reconnect,
    # a busy daemon answers 500 about the container, which still runs: the
    # task goes on to its result, the question is asked again.
    cut = anyio.Event()
    refused: list[str] = []
    real_query = aiodocker.Docker._do_query

    async def busy(self: aiodocker.Docker, path: Any, *args: Any, **kwargs: Any) -> Any:
        path = str(path)
        if cut.is_set() and path.endswith("/json") and not refused:
            refused.append(path)
            raise aiodocker.DockerError(500, "the daemon is busy")
        response = await real_query(self, path, *args, **kwargs)
        if path == "events" and not cut.is_set():
            response.content = CutEvents(response.content, cut)  # type: ignore[assignment]
        return response

    monkeypatch.setattr(aiodocker.Docker, "_do_query", busy)
    script = "echo up > {work_dir}/started; sleep 3; echo 42"
    async with start(tmp_path, project, {"slow": box(busybox, ["sh", "-c", script])}) as infra:
        handle = await submit(infra, "slow", task_id="slow")
        await wait_for(tmp_path / "state" / "tasks" / "slow" / "started")
        cut.set()
        with anyio.fail_after(30):
            assert await handle.result() == 42
    assert refused, "Docker was never asked about the container"


async def test_a_container_removed_while_the_event_stream_is_down_is_said_to_have_disappeared(
    tmp_path: Path, project: str, busybox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Removed behind our back while no event can tell its exit: Docker then
    # knows nothing of it, and no exit code is made up (-1 read as SIGHUP).
    cut = anyio.Event()
    real_query = aiodocker.Docker._do_query

    async def cut_events(self: aiodocker.Docker, path: Any, *args: Any, **kwargs: Any) -> Any:
        response = await real_query(self, path, *args, **kwargs)
        if str(path) == "events" and not cut.is_set():
            response.content = CutEvents(response.content, cut)  # type: ignore[assignment]
        return response

    monkeypatch.setattr(aiodocker.Docker, "_do_query", cut_events)
    async with start(tmp_path, project, {"sleep": box(busybox, SLEEPER)}) as infra:
        handle = await submit(infra, "sleep", task_id="doomed")
        await wait_for(tmp_path / "state" / "tasks" / "doomed" / "started")
        async with aiodocker.Docker() as docker:
            (container,) = await docker.containers.list(
                filters=json.dumps({"label": [f"{Labels.NAME}=doomed"]})
            )
            await container.delete(force=True)
        cut.set()
        with anyio.fail_after(30), pytest.raises(TaskFailed) as caught:
            await handle.result()
    assert "SIGHUP" not in caught.value.error
    assert "container disappeared" in caught.value.error


async def test_a_sigkill_just_before_the_timeout_is_no_timeout(
    tmp_path: Path, project: str, busybox: str
) -> None:
    # Waiting for a late "oom" event must not outlast the attempt's deadline:
    # the task failed (killed), it did not time out.
    handlers = {"killed": box(busybox, ["sh", "-c", "sleep 0.5; kill -9 $$"])}
    async with start(tmp_path, project, handlers) as infra:
        handle = await submit(infra, "killed", timeout=1.2)
        with pytest.raises(TaskFailed) as caught:
            await handle.result()
    assert not isinstance(caught.value, TaskTimedOut)
    assert caught.value.error.startswith("killed by signal SIGKILL")


@pytest.mark.parametrize("script", ["kill -USR1 $$", "exit 138"])
async def test_a_command_killed_by_a_signal_says_so_and_what_docker_said(
    tmp_path: Path, project: str, busybox: str, script: str
) -> None:
    # Docker reports both as 138: a program that exits 138 of its own accord
    # reads as killed too, and the message keeps the code Docker gave.
    handlers = {"killed": box(busybox, ["sh", "-c", script])}
    async with start(tmp_path, project, handlers) as infra:
        handle = await submit(infra, "killed")
        with pytest.raises(TaskFailed) as caught:
            await handle.result()
    assert "killed by signal SIGUSR1 (exit code 138 from Docker)" in caught.value.error


async def test_cancel_stops_the_container_promptly(
    tmp_path: Path, project: str, busybox: str
) -> None:
    # A long grace: the container must go on SIGTERM, not wait for SIGKILL.
    async with start(
        tmp_path, project, {"sleep": box(busybox, SLEEPER)}, cancel_grace=30.0
    ) as infra:
        handle = await submit(infra, "sleep", task_id="sleeper")
        await wait_for(tmp_path / "state" / "tasks" / "sleeper" / "started")
        began = time.monotonic()
        await infra.cancel_task(handle.task_id)
        with pytest.raises(TaskCancelled):
            await handle.result()
        assert time.monotonic() - began < 5
        assert (await handle.wait()).state is TaskState.CANCELLED
        # Gone already, not only once the instance closes.
        assert await labelled(f"{Labels.PROJECT}={project}", f"{Labels.KIND}=task") == ([], [])


async def test_a_cancel_whose_signal_is_lost_still_removes_the_container(
    tmp_path: Path, project: str, busybox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The connection to Docker breaks on the SIGTERM: the container goes all the same.
    lost = refuse_once(
        monkeypatch, lambda path, _: path.endswith("/kill"), aiohttp.ServerDisconnectedError
    )
    handlers = {"sleep": box(busybox, SLEEPER)}
    async with start(tmp_path, project, handlers, cancel_grace=1.0) as infra:
        handle = await submit(infra, "sleep", task_id="sleeper")
        await wait_for(tmp_path / "state" / "tasks" / "sleeper" / "started")
        await infra.cancel_task(handle.task_id)
        with pytest.raises(TaskCancelled):
            await handle.result()
        assert lost, "no signal was lost"
        assert await labelled(f"{Labels.PROJECT}={project}", f"{Labels.KIND}=task") == ([], [])


async def test_an_instance_closed_by_a_cancel_stops_its_task_containers_on_sigterm(
    tmp_path: Path, project: str, busybox: str
) -> None:
    with anyio.CancelScope() as scope:
        async with start(
            tmp_path, project, {"sleep": box(busybox, SLEEPER)}, cancel_grace=30.0
        ) as infra:
            await submit(infra, "sleep", task_id="sleeper")
            await wait_for(tmp_path / "state" / "tasks" / "sleeper" / "started")
            began = time.monotonic()
            scope.cancel()
            await anyio.sleep(60)
    assert time.monotonic() - began < 10


async def test_a_container_that_ignores_sigterm_is_killed_after_the_grace(
    tmp_path: Path, project: str, busybox: str
) -> None:
    stubborn = ["sh", "-c", "trap '' TERM; echo up > {work_dir}/started; sleep 60 & wait"]
    async with start(
        tmp_path, project, {"stubborn": box(busybox, stubborn)}, cancel_grace=0.5
    ) as infra:
        handle = await submit(infra, "stubborn", task_id="stubborn")
        await wait_for(tmp_path / "state" / "tasks" / "stubborn" / "started")
        began = time.monotonic()
        await infra.cancel_task(handle.task_id)
        with pytest.raises(TaskCancelled):
            await handle.result()
        assert 0.5 <= time.monotonic() - began < 10


async def test_a_timeout_stops_the_container(tmp_path: Path, project: str, busybox: str) -> None:
    async with start(
        tmp_path, project, {"sleep": box(busybox, SLEEPER)}, cancel_grace=1.0
    ) as infra:
        began = time.monotonic()
        handle = await submit(infra, "sleep", timeout=1.5)
        with pytest.raises(TaskTimedOut):
            await handle.result()
        assert time.monotonic() - began < 10
        assert await labelled(f"{Labels.PROJECT}={project}", f"{Labels.KIND}=task") == ([], [])


@pytest.mark.parametrize("pull", ["never", "missing"])
async def test_an_unknown_image_fails_the_task_naming_it(
    tmp_path: Path, project: str, busybox: str, pull: str
) -> None:
    image = "local/no-such-image:404"
    handlers = {"ghost": {"image": image, "pull": pull, "command": ["true"]}}
    async with start(tmp_path, project, handlers) as infra:
        handle = await submit(infra, "ghost")
        with pytest.raises(TaskFailed, match="local/no-such-image:404"):
            await handle.result()


async def test_a_program_missing_from_the_image_fails_the_task(
    tmp_path: Path, project: str, busybox: str
) -> None:
    async with start(tmp_path, project, {"py": box(busybox, ["python3", "-V"])}) as infra:
        handle = await submit(infra, "py")
        with pytest.raises(TaskFailed, match="cannot run 'python3'"):
            await handle.result()


async def test_a_program_missing_behind_a_cleared_entrypoint_fails_the_task(
    tmp_path: Path, project: str, busybox: str
) -> None:
    # entrypoint = [] clears the image's ENTRYPOINT: the command is what runs,
    # so the command's program is the one that must be in the image.
    context = dockerfile_context(tmp_path, f'FROM {busybox}\nENTRYPOINT ["/bin/echo"]\n')
    async with built_image(context, f"local/{project}-entry:latest") as tag:
        handlers = {
            "py": box(tag, ["python3", "-V"], entrypoint=[]),
            "sh": box(tag, ["sh", "-c", "echo 7"], entrypoint=[]),
        }
        async with start(tmp_path, project, handlers) as infra:
            assert await (await submit(infra, "sh")).result() == 7
            handle = await submit(infra, "py")
            with pytest.raises(TaskFailed, match="cannot run 'python3'"):
                await handle.result()


async def test_a_refused_network_fails_the_task_saying_so(
    tmp_path: Path, project: str, busybox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(*args: Any, **kwargs: Any) -> None:
        raise aiodocker.DockerError(500, "no address pool left")

    monkeypatch.setattr(aiodocker.networks.DockerNetworks, "create", refuse)
    async with start(tmp_path, project, {"noop": box(busybox, ["true"])}) as infra:
        handle = await submit(infra, "noop")
        with pytest.raises(TaskFailed, match=r"Docker refused the instance network .*address pool"):
            await handle.result()
    # The project fixture checks that no container or network was left.


@pytest.mark.parametrize("late", [False, True], ids=["made-before-the-break", "made-after-it"])
async def test_a_container_whose_create_reply_was_lost_is_removed(
    tmp_path: Path, project: str, busybox: str, monkeypatch: pytest.MonkeyPatch, late: bool
) -> None:
    # The connection breaks before Docker's reply to the create: the daemon
    # made the container already, or (late) gets to it only a second after.
    real_query = aiodocker.Docker._do_query
    creates: list[asyncio.Task[None]] = []

    async def create(self: aiodocker.Docker, *args: Any, **kwargs: Any) -> None:
        if late:
            await asyncio.sleep(1)
        (await real_query(self, *args, **kwargs)).release()

    async def lost(self: aiodocker.Docker, path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path) != "containers/create" or creates:
            return await real_query(self, path, *args, **kwargs)
        creates.append(asyncio.create_task(create(self, path, *args, **kwargs)))
        if not late:
            await creates[0]
        raise aiohttp.ServerDisconnectedError()

    monkeypatch.setattr(aiodocker.Docker, "_do_query", lost)
    tasks = (f"{Labels.PROJECT}={project}", f"{Labels.KIND}=task")
    async with start(tmp_path, project, {"noop": box(busybox, ["true"])}) as infra:
        handle = await submit(infra, "noop")
        with pytest.raises(TaskFailed, match="connection to Docker broke"):
            await handle.result()
        await creates[0]
        # Removed at once; one made after that is removed as the instance closes.
        assert len((await labelled(*tasks))[0]) == late
    # The project fixture checks that nothing was left.


async def test_a_container_docker_fails_to_remove_is_removed_as_the_instance_closes(
    tmp_path: Path, project: str, busybox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Docker's removal may fail for a while (its root filesystem busy): the
    # container is not forgotten, but removed again as the instance closes.
    refused = refuse_once(
        monkeypatch,
        lambda path, method: method == "DELETE" and path.startswith("containers/"),
        lambda: aiodocker.DockerError(500, "driver failed to remove root filesystem: busy"),
    )
    async with start(tmp_path, project, {"seven": box(busybox, ["echo", "7"])}) as infra:
        assert await (await submit(infra, "seven")).result() == 7
        assert refused, "no removal was refused"
    # The project fixture checks that nothing was left.


async def test_a_network_whose_create_reply_was_lost_is_removed_as_the_instance_closes(
    tmp_path: Path, project: str, busybox: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Docker makes the instance network, but the connection breaks before its reply.
    real_query = aiodocker.Docker._do_query
    lost: list[str] = []

    async def broken(self: aiodocker.Docker, path: Any, *args: Any, **kwargs: Any) -> Any:
        response = await real_query(self, path, *args, **kwargs)
        if str(path) == "networks/create" and not lost:
            lost.append(str(path))
            response.release()
            raise aiohttp.ServerDisconnectedError()
        return response

    monkeypatch.setattr(aiodocker.Docker, "_do_query", broken)
    async with start(tmp_path, project, {"seven": box(busybox, ["echo", "7"])}) as infra:
        with pytest.raises(TaskFailed, match="connection to Docker broke"):
            await (await submit(infra, "seven")).result()
        assert lost, "no reply was lost"
    # The project fixture checks that nothing was left.


async def test_a_handler_without_an_image_is_refused_at_submit(
    tmp_path: Path, project: str, busybox: str
) -> None:
    async with start(tmp_path, project, {"bare": {"command": ["true"]}}) as infra:
        with pytest.raises(InvalidTask, match=r"no \[handlers.bare\] with an image"):
            await submit(infra, "bare")
    # A configuration file's typo is refused as it loads; a Config built in
    # Python (and started as it is) is not loaded: the submit refuses it.
    typo = {"typo": box(busybox, ["cat", "{payload}"])}
    with pytest.raises(ConfigError, match=r"handlers.typo.command\[1\]: unknown placeholder"):
        start(tmp_path, project, typo)
    config = Config(
        infra=InfraSettings(project=project, state_dir=tmp_path / "state"),
        classes={"box": TaskClass(runner="docker")},
        handlers={"typo": HandlerConfig(image=busybox, pull="never", command=("cat", "{payload}"))},
    )
    async with AgentInfra.start(config) as infra:
        with pytest.raises(InvalidTask, match=r"unknown placeholder \{payload\}"):
            await submit(infra, "typo")


async def test_a_task_asking_for_less_memory_than_docker_allows_is_refused_at_submit(
    tmp_path: Path, project: str, busybox: str
) -> None:
    # The class's own memory_mb is refused as the configuration loads; a
    # task's own, as it is submitted, before anything is stored.
    async with start(tmp_path, project, {"noop": box(busybox, ["true"])}) as infra:
        smallest = r"resources.memory_mb: expected at least 6 \(Docker's smallest .*\), got 3"
        with pytest.raises(InvalidTask, match=smallest):
            await submit(infra, "noop", task_id="small", resources=Resources(memory_mb=3))
        with pytest.raises(UnknownTask):
            await infra.get_task_status("small")
        # 0 is no limit, as for a class.
        assert (
            await (await submit(infra, "noop", resources=Resources(memory_mb=0))).result() is None
        )


async def test_without_a_docker_engine_the_class_refuses_tasks_saying_how_to_do_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fix for a task class is another runner: the local backend is for services.
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    handlers = {"noop": {"image": "local/busybox:latest", "command": ["true"]}}
    async with start(tmp_path, "nodocker", handlers) as infra:
        with pytest.raises(InvalidTask) as refused:
            await submit(infra, "noop")
    message = str(refused.value)
    assert "class 'box' cannot run tasks: Docker is not running" in message
    assert 'runner = "process"' in message


async def test_a_task_reaches_a_docker_service_by_name(
    tmp_path: Path, project: str, busybox: str
) -> None:
    web = {
        "image": busybox,
        "command": "mkdir /www && echo served > /www/index.html && httpd -f -p {port} -h /www",
        "shell": True,
        "ports": {"main": 0},
        "health": {"http": "http://127.0.0.1:{port}/"},
    }
    fetch = box(busybox, 'wget -qO- "http://web:$(cat {payload_file})/"', shell=True)
    async with start(
        tmp_path, project, {"fetch": fetch}, infra={"backend": "docker"}, services={"web": web}
    ) as infra:
        port = (await infra.services.status())["web"].ports["main"]
        handle = await submit(infra, "fetch", port, needs=["web"])
        assert await handle.result() == "served"


@pytest.mark.usefixtures("gpus_as_configured")
async def test_gpus_are_requested_and_renumbered_from_zero(
    tmp_path: Path, project: str, busybox: str
) -> None:
    # Leased device 1 is the container's device 0. Without GPU support in
    # Docker, the container cannot be made, and the task fails with why.
    handlers = {"gpu": box(busybox, ["sh", "-c", 'echo "\\"$CUDA_VISIBLE_DEVICES\\""'])}
    async with start(tmp_path, project, handlers, infra={"gpus": [0, 1]}, gpus=1) as infra:
        status = await (await submit(infra, "gpu")).wait()
    if status.state is TaskState.SUCCEEDED:
        assert status.result == "0"
    else:
        assert status.error is not None
        assert "gpu" in status.error.lower()


@pytest.mark.usefixtures("gpus_as_configured")
async def test_a_container_that_leases_no_gpus_is_told_of_none(
    tmp_path: Path, project: str, busybox: str
) -> None:
    # Where Docker's default runtime is nvidia's, a CUDA image sees every
    # device unless told otherwise; the instance's GPUs are leased to others.
    script = 'env | grep -q ^CUDA_VISIBLE_DEVICES= && echo "\\"$CUDA_VISIBLE_DEVICES\\"" || echo 1'
    handlers = {"env": box(busybox, ["sh", "-c", script])}
    async with start(tmp_path, project, handlers, infra={"gpus": [0, 1]}) as infra:
        assert await (await submit(infra, "env")).result() == ""


async def test_leftovers_of_a_dead_owner_are_removed_at_start(
    tmp_path: Path, project: str, busybox: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A task container of this project whose owner (a pid that is not
    # running) cannot clean up any more: the next instance removes it.
    labels = Engine(instance_id="dead", project=project).labels("task", "orphan-7")
    labels[Labels.OWNER_PID] = "999999999"
    async with aiodocker.Docker() as docker:
        orphan = await docker.containers.run(
            {"Image": busybox, "Cmd": ["sleep", "600"], "Labels": labels}
        )
        try:
            caplog.set_level(logging.WARNING, logger="dspy_infra")
            async with start(tmp_path, project, {"noop": box(busybox, ["true"])}):
                assert await labelled(f"{Labels.PROJECT}={project}") == ([], [])
            assert f"task orphan-7 (container {orphan.id[:12]}" in caplog.text
        finally:
            with contextlib.suppress(aiodocker.DockerError):  # removed already, unless it failed
                await orphan.delete(force=True)
