"""The docker runner: each attempt is a ``[handlers.NAME]`` command in a container of its own.

A handler keeps the process runner's contract (docs/runners.md), so that it
moves between the two by changing its class: the attempt's work dir is
mounted into the container *at the same path*, so ``{payload_file}``,
``{result_file}`` and ``{work_dir}`` (and the ``DSPY_INFRA_*`` variables)
name the same files inside as outside; the result is the result file, else
the last line of stdout; a failure carries the exit code and the tail of
stderr. The container joins the instance's network, where the docker
backend's services answer by name.

Containers are found and followed through the shared
:class:`~dspy_infra.docker.engine.Engine`: its labels mark them as this
owner's tasks (so that the next owner removes what a crash left,
:meth:`DockerRunner.open`), its event stream tells when they exit, and
their log, read once they have exited, holds stdout and stderr apart (no
terminal). However an attempt ends, its container is removed before
:meth:`DockerRunner.run` returns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import aclosing
from typing import Any

import anyio
import anyio.to_thread

from dspy_infra.abc import RunFailed, RunnerContext, TaskRun
from dspy_infra.config.model import HandlerConfig
from dspy_infra.docker.engine import Container, ContainerError, Engine, open_engine
from dspy_infra.docker.spec import container_config
from dspy_infra.runners._commands import (
    STDERR_LINE_BYTES,
    STDERR_LINES,
    AttemptFiles,
    Tail,
    attempt_env,
    command_argv,
    exit_message,
    outcome,
    prepare,
    read_result,
    validate_handler,
)

__all__ = ["DockerRunner", "Runner"]

log = logging.getLogger("dspy_infra")

_STDOUT, _STDERR = 1, 2


class DockerRunner:
    """Task attempts as Docker containers, one each, removed when the attempt ends."""

    def __init__(self) -> None:
        self._context: RunnerContext | None = None
        self._engine: Engine | None = None

    @property
    def name(self) -> str:
        return "docker"

    async def open(self, context: RunnerContext) -> list[str]:
        # Left in close(), by the same task (the scheduler's own): see open_engine.
        engine, swept = await open_engine(instance_id=context.instance_id, project=context.project)
        self._context, self._engine = context, engine
        return swept

    def validate(self, handler: str) -> str | None:
        # Without a command, the image's own ENTRYPOINT/CMD runs; whether it
        # has one is known once the image is at hand, when the attempt starts.
        return validate_handler("docker", self._context, handler, needs="image")

    async def run(self, run: TaskRun) -> Any:
        context, engine = self._context, self._engine
        if context is None or engine is None:
            raise RuntimeError("DockerRunner.run() before open()")
        handler = run.handler_config or context.config.handlers.get(run.handler)
        if handler is None or handler.image is None:
            raise RunFailed(self.validate(run.handler) or f"no image for {run.handler!r}")
        files = AttemptFiles.of(run)
        command = None
        if handler.command is not None:
            command = command_argv(run.handler, handler, files.values)
        await anyio.to_thread.run_sync(prepare, files, run.payload)

        container = await _start(engine, run, handler, files, command)
        limit = context.config.infra.max_result_bytes
        stdout = Tail(1, limit)
        stderr = Tail(STDERR_LINES, STDERR_LINE_BYTES)
        try:
            code = await _wait_and_read(container, stdout, stderr)
            if code != 0 and await container.oom_killed():
                raise RunFailed(_out_of_memory(code, run), exit_code=code, output=stderr.text())
            raw = None
            if code == 0:
                raw = await anyio.to_thread.run_sync(read_result, files.result_file, limit)
        finally:
            # However the attempt ends (its exit, a cancel, a timeout, an
            # error here), the container goes before the attempt counts as
            # over: SIGTERM, SIGKILL after the class's grace, then removal;
            # only the removal when it has exited already.
            with anyio.CancelScope(shield=True):
                await container.stop(run.class_config.cancel_grace)
        return outcome(code, raw, files.result_file, stdout, stderr, limit=limit)

    async def close(self) -> None:
        self._context = None
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.__aexit__(None, None, None)


Runner = DockerRunner


async def _start(
    engine: Engine,
    run: TaskRun,
    handler: HandlerConfig,
    files: AttemptFiles,
    command: Sequence[str] | None,
) -> Container:
    """The attempt's container, started; or RunFailed saying why there is none."""
    assert handler.image is not None

    def progress(line: str) -> None:
        log.info("task %r: pulling %s", run.task_id, line)

    try:
        image = await engine.image(handler.image, pull=handler.pull, progress=progress)
        if not _runs_as_root(image):
            await anyio.to_thread.run_sync(_open_to_all, files)
        config = container_config(
            image=handler.image,
            command=command,
            entrypoint=handler.entrypoint,
            env=_container_env(handler, run, files),
            cwd=handler.cwd if handler.cwd is not None else str(files.work_dir),
            labels=engine.labels("task", run.task_id),
            # The same path inside: the placeholders' paths hold there too.
            binds=[(str(files.work_dir), str(files.work_dir))],
            volumes=handler.volumes,
            # 0 means "no reservation", which as a limit is none.
            cpus=run.cpus or None,
            memory_mb=run.memory_mb or None,
            gpu_ids=run.gpus,
            network=await engine.network(),
            # Without a terminal, stdout (the result line) and stderr (the
            # error's tail) reach the log apart.
            tty=False,
        )
        return await engine.run(config, image=image)
    except ContainerError as exc:
        raise RunFailed(exc.reason) from None


def _runs_as_root(image: dict[str, Any]) -> bool:
    user = str((image.get("Config") or {}).get("User") or "").partition(":")[0]
    return user in ("", "root", "0")


def _open_to_all(files: AttemptFiles) -> None:
    """Let the image's own user (``USER 1000``) read the payload and write the work dir.

    Both were made by this program's user, with its umask: the container's
    user, another uid, could not write its result file there.
    """
    files.work_dir.chmod(0o777)
    files.payload_file.chmod(0o644)


def _out_of_memory(code: int, run: TaskRun) -> str:
    """A SIGKILL alone reads as a kill from anywhere; Docker knows it was the memory."""
    limit = (
        f"its container's limit is {run.memory_mb:g} MB (memory_mb of its class or task)"
        if run.memory_mb
        else "its container had no limit (memory_mb): the machine ran out"
    )
    return f"ran out of memory: {exit_message(code)}; {limit}"


def _container_env(handler: HandlerConfig, run: TaskRun, files: AttemptFiles) -> dict[str, str]:
    env = attempt_env(handler, run, files.values)
    if run.gpus:
        # The leased ids (say "2,5") are this machine's device numbers; the
        # container is given exactly those devices (gpu_ids), and sees them
        # renumbered from 0, in the same (PCI bus) order. CUDA inside must
        # therefore be told 0..n-1, not the host's numbers.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(run.gpus)))
    return env


async def _wait_and_read(container: Container, stdout: Tail, stderr: Tail) -> int:
    """Wait for the container to exit, then read its output into the tails; its exit code.

    Read once it has exited rather than followed while it runs: Docker may
    end a followed log without the last lines written before the exit (the
    error's message, the result line), and the tails only keep the end.
    """
    code = await container.wait()
    tails = {_STDOUT: stdout, _STDERR: stderr}
    async with aclosing(container.chunks(tty=False, follow=False)) as chunks:
        async for stream, chunk in chunks:
            tails[stream].feed(chunk)
    for tail in tails.values():
        tail.end()
    return code
