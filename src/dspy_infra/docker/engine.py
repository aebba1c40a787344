"""One connection to the Docker daemon, shared by everything an instance runs in containers.

Three things make containers as dependable as local process groups:

- **Events, not polling.** One stream of the daemon's events, filtered to
  this instance's labels, tells each container when it died (with its exit
  code) and when its image's HEALTHCHECK changed its verdict.
- **Labels.** Every container and network carries the owner's pid and start
  time (pids are reused), host, instance and project. An owner that is
  SIGKILLed cannot clean up, so the next owner of the same project removes
  what dead owners left (:meth:`Engine.sweep`); nothing else is touched.
- **No half-started containers.** A container that fails to start is removed
  before the error is raised, and creation is shielded from cancellation
  until the container is in our hands.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import posixpath
import re
import signal
import socket
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from typing import Any

import aiodocker
import aiohttp
import anyio
import anyio.to_thread
from aiodocker.containers import DockerContainer
from aiodocker.execs import Exec
from aiohttp import ClientResponse
from anyio.abc import TaskStatus
from yarl import URL

from dspy_infra._exit_codes import Unknown, from_shell
from dspy_infra._lines import lines
from dspy_infra._process_group import wait_group_empty
from dspy_infra._procfs import container_group, start_time
from dspy_infra.errors import BackendUnavailable

__all__ = ["Container", "ContainerError", "Engine", "Labels", "open_engine"]

log = logging.getLogger("dspy_infra.docker")

_LABEL = "dspy-infra"
_LOOPBACK = "127.0.0.1"
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_RECONNECT_DELAY = 0.5
_LOG_RETRIES = 5  # short reads of a container's log in a row that may break with nothing new
_LOG_STEADY = 10.0  # a read of a log that breaks after this long does not count toward giving up
_LOG_BACKOFF = 8.0  # the longest wait before a broken log is read again
# How far before its last delivered record a broken log is read again: more
# than stdout's and stderr's copiers ever stamp apart (see _LogCursor).
_LOG_OVERLAP = 1_000_000_000  # ns
# What a broken connection to the daemon raises (aiohttp's, the socket's), beside DockerError.
_BROKEN = (aiohttp.ClientError, OSError)
_KILL_WAIT = 30.0  # how long a SIGKILLed container may take to be reported dead
_OOM_EVENT_GRACE = 0.5  # how long after a SIGKILL's "die" its "oom" event may still come
_OOM_DEADLINE_MARGIN = 0.05  # how far from the caller's deadline that wait stops
_OOM_QUERY_TIME = 0.1  # what asking the container's state after it may take
_PID_LOOKS = 100  # times an exec cut short is asked for its pid, 10 ms apart
_OUTPUT_DRAIN = 0.5  # how long stop() lets a reader take the last lines before removal
# The exit of a container removed (not by us) while the event stream was down: unknown.
_GONE = Unknown("the container disappeared, removed by something else before its exit was seen")
_GET_IMAGE = "build or load it first (docker build / docker load / dspy_infra.docker.build_image)"


class Labels:
    """The label keys; values are strings, as Docker wants them."""

    INSTANCE = f"{_LABEL}.instance"
    PROJECT = f"{_LABEL}.project"
    HOST = f"{_LABEL}.owner-host"
    OWNER_PID = f"{_LABEL}.owner-pid"
    OWNER_START = f"{_LABEL}.owner-start"
    KIND = f"{_LABEL}.kind"  # "service" | "task" | "network"
    NAME = f"{_LABEL}.name"  # the service name or the task id


class ContainerError(Exception):
    """A container could not be created or started; ``reason`` says why, for a person."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class _Watch:
    """What the event stream has told us about one container."""

    def __init__(self) -> None:
        self.exited = anyio.Event()
        self.exit_code: int | None = None
        self.health: str | None = None  # the image HEALTHCHECK's latest verdict
        self.oom_killed = anyio.Event()  # the kernel killed a process of it for want of memory

    @property
    def oom(self) -> bool:
        return self.oom_killed.is_set()

    def died(self, code: int) -> None:
        if not self.exited.is_set():
            self.exit_code = code
            self.exited.set()


class Engine:
    """The Docker daemon, as one AgentInfra instance uses it.

    Use as an async context manager: entering connects (or raises
    :class:`BackendUnavailable` saying how to fix it) and starts following
    events; leaving stops that and closes the connection.
    """

    def __init__(self, *, instance_id: str, project: str):
        self.instance_id = instance_id
        self.project = project
        self._owner = {
            Labels.HOST: socket.gethostname(),
            Labels.OWNER_PID: str(os.getpid()),
            Labels.OWNER_START: str(start_time(os.getpid())),
            Labels.INSTANCE: instance_id,
            Labels.PROJECT: project,
        }
        self._docker: aiodocker.Docker | None = None
        # Where this machine reaches the ports the engine publishes, known once connected.
        self.host = _LOOPBACK
        self._watches: dict[str, _Watch] = {}
        self._network_name = f"{_LABEL}-{project}-{instance_id}"
        self._network: str | None = None
        self._network_lost = False  # the reply to its create was lost: it may be there
        self._network_lock = anyio.Lock()
        # (image id, path) of programs found in a container of that image: checking
        # again costs a rootfs mount (~50 ms) on every launch of the same image.
        self._programs: set[tuple[str, str]] = set()
        # Containers (ids, names) that may still be there: removed again as the engine closes.
        self._leftovers: set[str] = set()
        self._stack = AsyncExitStack()

    @property
    def on_this_machine(self) -> bool:
        """Whether the engine runs here: its bridge networks are reachable, and
        its GPUs are this machine's (a remote engine's are neither)."""
        return ipaddress.ip_address(self.host).is_loopback

    @property
    def docker(self) -> aiodocker.Docker:
        if self._docker is None:
            raise RuntimeError("the Docker engine is used outside its `async with`")
        return self._docker

    async def __aenter__(self) -> Engine:
        async with AsyncExitStack() as stack:
            self._docker = await _connect()
            stack.push_async_callback(self._close_client)
            self.host = await _engine_address(self._docker)
            stack.push_async_callback(self._remove_network)
            stack.push_async_callback(self._remove_leftovers)
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)
            # Once following, shielded and ended only here: an instance closed
            # by a cancellation still stops its containers, and learns from
            # these events that they exited (without them, each stop waited
            # out its grace and _KILL_WAIT).
            following = anyio.CancelScope()
            stack.callback(following.cancel)
            await tg.start(self._follow_events, following)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    async def _close_client(self) -> None:
        if self._docker is not None:
            with anyio.CancelScope(shield=True):
                await self._docker.close()
            self._docker = None

    # -- labels and leftovers ---------------------------------------------------

    def labels(
        self, kind: str, name: str, extra: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        return {**(extra or {}), **self._owner, Labels.KIND: kind, Labels.NAME: name}

    async def sweep(self) -> list[str]:
        """Remove the containers and networks of this project whose owner died on this host.

        Best effort: what cannot be listed or removed now (a busy daemon, a
        broken connection) is said in a warning and does not fail the start;
        the next start looks again, and a container left is removed again as
        this engine closes.
        """
        here = [f"{Labels.PROJECT}={self.project}", f"{Labels.HOST}={socket.gethostname()}"]
        removed: list[str] = []
        try:
            containers = await self.docker.containers.list(
                all=True, filters=json.dumps({"label": here})
            )
            networks = await self.docker.networks.list(filters={"label": here})
        except (aiodocker.DockerError, *_BROKEN) as exc:
            log.warning(
                "could not look for leftovers of crashed instances of project %r (%s); "
                "they are looked for again at the next start",
                self.project,
                exc,
            )
            return removed
        for item in containers:
            labels: dict[str, str] = item["Labels"] or {}
            if _owner_alive(labels):
                continue
            what = (
                f"{labels.get(Labels.KIND, 'container')} {labels.get(Labels.NAME, '?')} "
                f"(container {item.id[:12]}, owner pid {labels.get(Labels.OWNER_PID)} gone)"
            )
            if await self.remove_container(
                item.id, what=f"a leftover of a crashed instance, {what}"
            ):
                removed.append(what)
        for network in networks:
            labels = network.get("Labels") or {}
            if not _owner_alive(labels):
                try:
                    await (await self.docker.networks.get(network["Id"])).delete()
                except (aiodocker.DockerError, *_BROKEN) as exc:
                    if not isinstance(exc, aiodocker.DockerError) or exc.status != 404:
                        log.warning(
                            "could not remove the network %r of a crashed instance (%s); "
                            "the next start tries again",
                            network.get("Name"),
                            exc,
                        )
        return removed

    # -- images -----------------------------------------------------------------

    async def image(
        self, image: str, *, pull: str, progress: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        """The image's metadata; pulled first when missing and ``pull`` allows it."""
        if pull != "always":
            if (found := await self._inspect(image)) is not None:
                return found
            if pull == "never":
                raise ContainerError(
                    f"image {image!r} is not present locally (pull = 'never'): {_GET_IMAGE}"
                )
        error = None
        said: dict[str, str] = {}  # per layer: byte counts change often, the status seldom
        try:
            # Read to the end whatever happens: the stream's response is released there.
            async for line in self.docker.images.pull(image, stream=True):
                error = line.get("error", error)
                layer, status = str(line.get("id", "")), str(line.get("status", ""))
                if progress is not None and status and said.get(layer) != status:
                    said[layer] = status
                    progress(f"{image}: {layer} {status}" if layer else f"{image}: {status}")
            if error is not None:
                raise ContainerError(_unpullable(image, str(error), pull))
            return await self.docker.images.inspect(image)
        except aiodocker.DockerError as exc:
            raise ContainerError(_unpullable(image, _reason(exc), pull)) from None
        except _BROKEN as exc:
            # As any other failed start: retried, saying what broke (not an
            # internal error that fails the service or the task for good).
            raise ContainerError(_broke(f"pulling image {image!r}", exc)) from None

    async def _inspect(self, image: str) -> dict[str, Any] | None:
        """The image's metadata, None if Docker has no such image.

        Only a 404 says it is absent: a busy daemon's 500 or a broken
        connection says nothing of it, and fails this start (retried as any)
        saying so, rather than sending the user off to build or pull it.
        """
        try:
            return await self.docker.images.inspect(image)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise ContainerError(
                f"Docker could not inspect image {image!r}: {_reason(exc)}"
            ) from None
        except _BROKEN as exc:
            raise ContainerError(_broke(f"inspecting image {image!r}", exc)) from None

    # -- the instance network -----------------------------------------------------

    async def network(self) -> str:
        """This instance's network, created on first use: services reach each other by name.

        Raises :class:`ContainerError` when Docker refuses to make it.
        """
        async with self._network_lock:
            if self._network is None:
                name = self._network_name
                with anyio.CancelScope(shield=True):
                    try:
                        await self.docker.networks.create(
                            {
                                "Name": name,
                                "Labels": self.labels("network", name),
                                "Driver": "bridge",
                                "CheckDuplicate": True,
                            }
                        )
                    except aiodocker.DockerError as exc:
                        # The instance's other engine (the docker backend's, the
                        # docker runner's) made it first: share it, so that
                        # tasks reach services by name. Unchecked, Docker would
                        # make a second network of the same name.
                        if exc.status != 409:
                            raise ContainerError(
                                f"Docker refused the instance network {name!r}: {_reason(exc)}"
                            ) from None
                    except _BROKEN as exc:
                        # Docker may have made it: the next ask shares it (409
                        # above), and the engine's close removes it either way.
                        self._network_lost = True
                        raise ContainerError(
                            _broke(f"creating the instance network {name!r}", exc)
                        ) from None
                self._network = name
            return self._network

    async def _remove_network(self) -> None:
        if (self._network is not None or self._network_lost) and self._docker is not None:
            with anyio.CancelScope(shield=True):
                try:
                    await (await self.docker.networks.get(self._network_name)).delete()
                except (aiodocker.DockerError, *_BROKEN) as exc:
                    await self._network_left(exc)
            self._network = None

    async def _network_left(self, exc: Exception) -> None:
        """Say why the instance network is left (nothing, when it is not there)."""
        status = exc.status if isinstance(exc, aiodocker.DockerError) else None
        if status == 404:
            return
        if status in (403, 409):  # in use
            with contextlib.suppress(aiodocker.DockerError, *_BROKEN):
                await self._warn_network_in_use()
            return
        log.warning(
            "could not remove the instance network %r (%s); a start of project %r "
            "after this process has ended removes it",
            self._network_name,
            exc,
            self.project,
        )

    async def _warn_network_in_use(self) -> None:
        """Say which containers keep the instance network, as compose's down does.

        Those of this instance (the other engine's, which removes it as it
        closes) are no news; others (one a user attached) keep it for good.
        """
        users = await self.docker.containers.list(
            all=True, filters=json.dumps({"network": [self._network_name]})
        )
        others = [
            c.id[:12] for c in users if (c["Labels"] or {}).get(Labels.INSTANCE) != self.instance_id
        ]
        if others:
            log.warning(
                "the instance network %r is left: containers not of this instance use it (%s); "
                "remove it with `docker network rm` once they are gone",
                self._network_name,
                ", ".join(others),
            )

    # -- containers ---------------------------------------------------------------

    async def run(self, config: dict[str, Any], *, image: Mapping[str, Any]) -> Container:
        """Create and start a container; on any failure nothing of it is left.

        ``image`` is the image's metadata (from :meth:`image`), used to check
        that the program to run exists in it: with ``Init``, a missing program
        would otherwise be a container that starts and exits 127.
        """
        with anyio.CancelScope(shield=True):
            created = await self._create(config)
            container = Container(self, created)
            if _has_healthcheck(config, image):
                container.watch.health = "starting"  # events report only changes
            self._watches[created.id] = container.watch
            try:
                await self._check_program(created, config, image)
                await created.start()
                container.address = await self._address(created, config)
            except BaseException as exc:
                await container.remove()
                if isinstance(exc, aiodocker.DockerError):
                    raise ContainerError(_refused(exc, config)) from None
                if isinstance(exc, _BROKEN):
                    raise ContainerError(_broke("starting the container", exc)) from None
                raise
        return container

    async def _create(self, config: dict[str, Any]) -> DockerContainer:
        """The container, created under a name of its own: should the reply be
        lost (a broken connection, a daemon's 5xx), what the daemon made
        anyway is removed by that name, at once and again as the engine
        closes (the daemon may get to it after the break)."""
        name = f"{_LABEL}-{uuid.uuid4().hex}"
        try:
            return await self.docker.containers.create(config, name=name)
        except aiodocker.DockerError as exc:
            if _transient(exc):
                await self._remove_lost(name)
            raise ContainerError(_refused(exc, config)) from None
        except _BROKEN as exc:
            await self._remove_lost(name)
            raise ContainerError(_broke("creating the container", exc)) from None

    async def _remove_lost(self, name: str) -> None:
        await self.remove_container(name)
        self._leftovers.add(name)

    async def remove_container(self, ref: str, *, what: str | None = None) -> bool:
        """Remove container ``ref`` (an id or a name); whether it is gone.

        One whose removal failed for a cause that may pass (a daemon's 5xx,
        "device or resource busy" say, or a broken connection) is not
        forgotten: it is removed again as the engine closes. ``what`` names
        it in the warning that says so.
        """
        with anyio.CancelScope(shield=True):
            try:
                await self.docker.containers.container(ref).delete(force=True, v=True)
            except (aiodocker.DockerError, *_BROKEN) as exc:
                if not isinstance(exc, aiodocker.DockerError) or _transient(exc):
                    self._leftovers.add(ref)
                    log.warning(
                        "could not remove %s: %s; tried again as the instance closes",
                        what or f"container {ref}",
                        exc,
                    )
                    return False
        self._leftovers.discard(ref)
        return True

    async def _remove_leftovers(self) -> None:
        if self._docker is not None:
            for ref in list(self._leftovers):
                await self.remove_container(ref)

    async def _address(self, created: DockerContainer, config: Mapping[str, Any]) -> str | None:
        """The container's address on its network, when this machine can reach it.

        A local engine's bridge networks are reachable from this machine; a
        remote engine's (``DOCKER_HOST=tcp://...`` or ``ssh://...``) are not.
        Only asked for (one more API call) when ports are published: the
        address is for reaching those without Docker's port proxy (a task
        publishes none).
        """
        host_config = config.get("HostConfig") or {}
        network = host_config.get("NetworkMode")
        if network is None or not host_config.get("PortBindings") or not self.on_this_machine:
            return None
        settings = (await created.show())["NetworkSettings"]["Networks"].get(network) or {}
        return settings.get("IPAddress") or None

    async def _check_program(
        self, created: DockerContainer, config: Mapping[str, Any], image: Mapping[str, Any]
    ) -> None:
        image_config = image.get("Config") or {}
        # An empty entrypoint (entrypoint = []) clears the image's: the command runs.
        entrypoint = config.get("Entrypoint")
        if entrypoint is None:
            entrypoint = image_config.get("Entrypoint")
        argv = entrypoint or config.get("Cmd") or image_config.get("Cmd")
        if not argv:
            raise ContainerError(f"image {config['Image']!r} has no command and none was given")
        program = str(argv[0])
        if program.startswith("/"):
            candidates = [program]
        elif "/" in program:
            # Run from the working directory (./run.sh), as Docker runs it;
            # the archive API would read it from the root.
            workdir = config.get("WorkingDir") or image_config.get("WorkingDir") or "/"
            candidates = [posixpath.normpath(posixpath.join(workdir, program))]
        else:
            variables = [*(image_config.get("Env") or []), *(config.get("Env") or [])]
            env = dict(item.partition("=")[::2] for item in variables)
            path = env.get("PATH") or _DEFAULT_PATH
            candidates = [f"{d.rstrip('/')}/{program}" for d in path.split(":") if d]
        # Found once in an image, a program is there for every container of it,
        # unless a mount may hide it (a task's own work dir never does).
        host_config = config.get("HostConfig") or {}
        targets = [b.split(":")[1] for b in host_config.get("Binds") or ()]
        targets += [m["Target"] for m in host_config.get("Mounts") or ()]
        image_id = str(image.get("Id"))
        for candidate in candidates:
            hidden = any(candidate.startswith(target.rstrip("/") + "/") for target in targets)
            if (image_id, candidate) in self._programs and not hidden:
                return
        for candidate in candidates:
            if await self._exists(created, candidate):
                self._programs.add((image_id, candidate))
                return
        raise ContainerError(f"cannot run {program!r}: not found in image {config['Image']!r}")

    async def _exists(self, container: DockerContainer, path: str) -> bool:
        # GET, not HEAD: an error's explanation is in the body, which HEAD lacks.
        # Only the headers are read; the archive itself is never downloaded.
        try:
            async with self.stream(f"containers/{container.id}/archive", {"path": path}):
                return True
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return False
            raise

    @asynccontextmanager
    async def stream(self, path: str, params: Mapping[str, str]) -> AsyncIterator[ClientResponse]:
        """A long-lived GET (logs, events), released however the reader stops."""
        async with self.docker._query(path, params=dict(params), timeout=None) as response:
            try:
                yield response
            finally:
                response.close()

    def forget(self, container_id: str) -> None:
        self._watches.pop(container_id, None)

    # -- events -------------------------------------------------------------------

    async def _follow_events(
        self, scope: anyio.CancelScope, *, task_status: TaskStatus[None]
    ) -> None:
        filters = {"type": ["container"], "label": [f"{Labels.INSTANCE}={self.instance_id}"]}
        started = False
        with scope:
            while True:
                try:
                    async with self.stream("events", {"filters": json.dumps(filters)}) as response:
                        if not started:
                            started = True
                            task_status.started()
                            # Not before: a start cancelled while connecting
                            # would wait for ever for a task that ignores it.
                            scope.shield = True
                        else:
                            await self._reconcile()
                        async for line in response.content:
                            if line.strip():
                                self._dispatch(json.loads(line))
                except (aiodocker.DockerError, *_BROKEN) as exc:
                    if not started:
                        raise BackendUnavailable(f"cannot follow Docker events: {exc}") from None
                    log.warning("the Docker event stream broke (%s); reconnecting", exc)
                await anyio.sleep(_RECONNECT_DELAY)

    def _dispatch(self, event: Mapping[str, Any]) -> None:
        watch = self._watches.get(event.get("id", ""))
        if watch is None:
            return
        action = str(event.get("Action") or event.get("status") or "")
        if action == "die":
            attributes = (event.get("Actor") or {}).get("Attributes") or {}
            watch.died(_exit_code(attributes.get("exitCode")))
        elif action.startswith("health_status:"):
            watch.health = action.partition(":")[2].strip()
        elif action == "oom":  # usually before the "die" of the process it killed
            watch.oom_killed.set()

    async def _reconcile(self) -> None:
        """After a reconnect, learn what happened while the stream was down.

        Only a 404 means a container is gone. Any other error (a busy
        daemon's 500) says nothing of it, and is raised: the stream is then
        followed again, and this asked again, as after a break.
        """
        for container_id, watch in list(self._watches.items()):
            try:
                state = (await self.docker.containers.container(container_id).show())["State"]
            except aiodocker.DockerError as exc:
                if exc.status != 404:
                    raise
                watch.died(_GONE)
                continue
            # Docker reports a health verdict once, when it changes.
            if health := (state.get("Health") or {}).get("Status"):
                watch.health = str(health)
            if state.get("Status") in ("exited", "dead"):
                if state.get("OOMKilled"):
                    watch.oom_killed.set()
                watch.died(_exit_code(state.get("ExitCode")))


class Container:
    """A started container: its exit, its output, its removal."""

    def __init__(self, engine: Engine, container: DockerContainer):
        self._engine = engine
        self._container = container
        self.watch = _Watch()
        self.address: str | None = None  # on the instance network, when reachable from here
        self._removed = False
        self._reading = False
        self._output_done = anyio.Event()

    @property
    def id(self) -> str:
        return self._container.id

    async def wait(self) -> int:
        await self.watch.exited.wait()
        assert self.watch.exit_code is not None
        return self.watch.exit_code

    async def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer ended it, once it has ended.

        Docker's ``oom`` event usually comes before the ``die``, but a busy
        daemon may send it after (and none comes while the event stream
        reconnects): a SIGKILL without it waits up to
        :data:`_OOM_EVENT_GRACE` for it, then asks the container's state.
        Never into the caller's deadline (a task's timeout): an attempt that
        failed must not read as timed out for this wait.
        """
        if self.watch.exit_code != -signal.SIGKILL or self.watch.oom:
            return self.watch.oom
        # The wait keeps time for the question after it, a local one.
        with anyio.move_on_after(min(_OOM_EVENT_GRACE, _time_left() - _OOM_QUERY_TIME)):
            await self.watch.oom_killed.wait()
            return True
        with anyio.move_on_after(_time_left()):
            return await self._oom_in_state()
        return False

    async def _oom_in_state(self) -> bool:
        try:
            state = (await self._container.show())["State"]
        except (aiodocker.DockerError, *_BROKEN):  # removed, or the daemon went: unknown
            return False
        return bool(state.get("OOMKilled"))

    async def output(self) -> AsyncGenerator[str, None]:
        """A terminal container's output, line by line, from the start until it ends.

        With a terminal, stdout and stderr are one stream, in the order written.
        """
        async with (
            contextlib.aclosing(self.chunks(tty=True)) as chunks,
            contextlib.aclosing(lines(chunk async for _, chunk in chunks)) as output,
        ):
            async for line in output:
                yield line

    async def chunks(
        self, *, tty: bool = True, follow: bool = True
    ) -> AsyncGenerator[tuple[int, bytes], None]:
        """``(stream, bytes)`` as the log delivers them, until the container ends.

        Lines may span chunks: for a reader that bounds lines itself (a
        task's result line may be longer than :meth:`output` keeps whole).
        Without ``follow``, what the log holds now.

        Docker (20.10 at least) may end a followed log without the last lines
        written just before the exit. So once a followed log ends, the rest
        of the log is read, unfollowed, and what the followed one missed is
        delivered too.

        A connection that breaks (reset, a body cut short, a followed log
        that ends while the container runs, a busy daemon's 500) is read again from where it was
        (see :class:`_LogCursor`) rather than ending the reader: a service's
        log pump runs beside its supervision, and would take it down.
        """
        self._reading = True
        try:
            async with contextlib.aclosing(self._read(tty=tty, follow=follow)) as log:
                async for item in log:
                    yield item
        except aiodocker.DockerError:
            return  # removed before we could read it, or a log that cannot be read
        finally:
            self._output_done.set()

    async def _read(self, *, tty: bool, follow: bool) -> AsyncGenerator[tuple[int, bytes], None]:
        """The log, read again from where it was, after a backoff, when it breaks.

        Only a break of a read that lasted less than ``_LOG_STEADY`` and
        brought nothing new counts toward giving up (with a warning, after
        ``_LOG_RETRIES`` in a row; the rest goes unread): a connection cut
        because it was idle (a proxy's timeout) is read again for as long
        as the container runs.
        """
        cursor = _LogCursor()
        breaks = 0
        delay = _RECONNECT_DELAY
        while True:
            opened = anyio.current_time()
            new = False
            try:
                async with contextlib.aclosing(self._log(cursor, tty=tty, follow=follow)) as read:
                    async for item in read:
                        new = True
                        yield item
                if not follow:
                    return
                if not await self._still_running():
                    follow = False  # the rest: what a followed log may end without
                    continue
                problem = "it ended while the container runs"
            except _BROKEN as exc:
                problem = repr(exc)
            except aiodocker.DockerError as exc:
                if not _transient(exc):
                    raise  # the container is gone, or its log cannot be read: the end
                problem = _reason(exc)
            if new or anyio.current_time() - opened >= _LOG_STEADY:
                breaks, delay = 0, _RECONNECT_DELAY
                log.info("the log stream of container %s broke (%s)", self.id[:12], problem)
            else:
                breaks += 1
                if breaks >= _LOG_RETRIES:
                    log.warning(
                        "gave up reading the log of container %s, broken %d times in a row (%s)",
                        self.id[:12],
                        breaks,
                        problem,
                    )
                    return
                log.warning("the log stream of container %s broke (%s)", self.id[:12], problem)
            await anyio.sleep(delay)
            delay = min(2 * delay, _LOG_BACKOFF)

    async def _still_running(self) -> bool:
        """Whether a followed log that ended was cut: it ends when the container does.

        Its exit may be reported a little after the log ends, and is then
        waited for: Docker may still be writing the last lines.
        """
        with anyio.move_on_after(_OUTPUT_DRAIN):
            await self.watch.exited.wait()
        if self.watch.exited.is_set():
            return False
        return bool((await self._container.show())["State"].get("Running"))

    async def _log(
        self, cursor: _LogCursor, *, tty: bool, follow: bool
    ) -> AsyncGenerator[tuple[int, bytes], None]:
        """One read of the log, of what is past ``cursor``, which it keeps up to date."""
        params = {"follow": "1" if follow else "0", "stdout": "1", "stderr": "1", "timestamps": "1"}
        params |= cursor.query()
        async with (
            self._engine.stream(f"containers/{self.id}/logs", params) as response,
            contextlib.aclosing(_records(response, tty=tty)) as records,
        ):
            async for number, stamp, piece, ends in records:
                if new := cursor.take(number, stamp, piece, ends=ends):
                    yield number, new

    async def stop(self, grace: float) -> int:
        """SIGTERM, SIGKILL after ``grace``; then remove it. Idempotent."""
        with anyio.CancelScope(shield=True):
            if not self._removed:
                if not self.watch.exited.is_set():
                    await self._signal("SIGTERM")
                    with anyio.move_on_after(grace):
                        await self.watch.exited.wait()
                if not self.watch.exited.is_set():
                    await self._signal("SIGKILL")
                    with anyio.move_on_after(_KILL_WAIT):
                        await self.watch.exited.wait()
                if self._reading:
                    with anyio.move_on_after(_OUTPUT_DRAIN):
                        await self._output_done.wait()
                await self.remove()
        return self.watch.exit_code if self.watch.exit_code is not None else -9

    async def remove(self) -> None:
        if self._removed:
            return
        self._removed = True
        await self._engine.remove_container(self.id)
        self.watch.died(self.watch.exit_code if self.watch.exit_code is not None else -9)
        self._engine.forget(self.id)

    async def exec(self, argv: tuple[str, ...]) -> tuple[int, str]:
        """Run ``argv`` inside the container, with its environment: ``(exit code, output)``.

        Docker neither stops an exec whose caller hangs up nor has a call to
        stop one: an exec cut short (a probe's timeout, a stop) has its
        process group killed by :meth:`_kill_exec` before this returns. So has
        one that ended leaving a child in its group (``cmd &``), which Docker
        lets run on once its command exits, as the local backend does not.
        """
        try:
            execution = await self._container.exec(list(argv))
        except aiodocker.DockerError as exc:
            return 126, _reason(exc)
        ended = False
        try:
            output = bytearray()
            async with execution.start(detach=False) as stream:
                while (message := await stream.read_out()) is not None:
                    output += message.data
                    del output[:-4096]
            info = await execution.inspect()
            ended = True
        except aiodocker.DockerError as exc:
            return 126, _reason(exc)
        finally:
            if not ended:
                with anyio.CancelScope(shield=True):
                    await self._kill_exec(execution, argv)
        if pgid := int(info.get("Pid") or 0):
            with anyio.CancelScope(shield=True):
                await self._kill_exec(execution, argv, ended=pgid)
        return _exit_code(info["ExitCode"]), output.decode(errors="replace")

    async def _kill_exec(self, execution: Exec, argv: tuple[str, ...], *, ended: int = 0) -> None:
        """SIGKILL the process group of an exec cut short; return once it is empty.

        ``ended``: the pid of an exec whose command exited, whose group is
        killed only if members of it are seen from here (not asked of Docker,
        nor warned about: most checks leave nothing, and pay one signal 0 for it).

        Each exec runs in a session of its own, so its group is its command
        and what that started (a shell's children), as with the local
        backend's commands. The group is signalled from this machine when
        it may, else from inside with the kill of the container's shell; an
        engine on another machine leaves no way to reach it. A group still
        there after ``_KILL_WAIT`` is left, with a warning.
        """
        # Whatever the daemon's connection raises: this runs as the exec's
        # caller is cancelled, which an error from here would replace.
        with (
            anyio.move_on_after(_KILL_WAIT) as waited,
            contextlib.suppress(aiodocker.DockerError, *_BROKEN),
        ):
            # The command's pid on the engine's machine.
            pgid = ended or await self._exec_pid(execution)
            if not pgid:
                return  # it never started
            if ended:
                try:  # the cheap look first: most checks leave nothing
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    return
                except PermissionError:
                    pass  # there is such a group: whose, the cgroup tells
            inside = await anyio.to_thread.run_sync(container_group, pgid, self.id)
            if inside is None and ended:
                return
            if inside is None:
                # Out of reach from here. Docker tells whether anything of it is
                # left: its command may have exited and left a child running.
                if await self._group_left(pgid):
                    log.warning(
                        "cannot stop %r in container %s: its processes are not visible from here",
                        argv,
                        self.id[:12],
                    )
                return
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                return
            except PermissionError:  # a member of the docker group, and a root container
                # The shell's kill, as every shell has it: the kill programs
                # disagree (procps's kills nothing of a group without a "--"
                # before it, busybox's kills it but fails on the "--"). Its
                # exit status says little (1 when the group is already gone):
                # whether the group empties says whether it worked.
                code, output = await self.exec(("sh", "-c", f"kill -KILL -{inside}"))
                if code in (126, 127):  # no shell to run it
                    log.warning("cannot stop %r in container %s: %s", argv, self.id[:12], output)
                    return
            await wait_group_empty(pgid)
        if waited.cancelled_caught:
            log.warning(
                "cannot stop %r in container %s: it still runs %gs after it was killed",
                argv,
                self.id[:12],
                _KILL_WAIT,
            )

    @staticmethod
    async def _exec_pid(execution: Exec) -> int:
        """The pid of a started exec's command, 0 if it did not start.

        Docker may report a running exec without its pid for a moment after
        the start: an exec cut short then looked as if it never started, and
        ran on. An engine that never tells is given a second.
        """
        for _ in range(_PID_LOOKS):
            info = await execution.inspect()
            if pid := int(info.get("Pid") or 0):
                return pid
            if not info.get("Running"):
                return 0
            await anyio.sleep(0.01)
        return 0

    async def _group_left(self, pgid: int) -> bool:
        """Whether Docker lists a process of group ``pgid`` (the engine machine's) in the container.

        True when it cannot say (its ``ps`` lacks the column, or it cannot
        list the container's processes): what could not be stopped is
        likelier left than not. A container that is not running (409), or
        no longer there (404), has no processes left.
        """
        try:
            top = await self._container.top(ps_args="-o pid,pgid")
            column = (top.get("Titles") or []).index("PGID")
        except aiodocker.DockerError as exc:
            return exc.status not in (404, 409)
        except ValueError:
            return True
        return any(row[column] == str(pgid) for row in top.get("Processes") or ())

    async def _signal(self, name: str) -> None:
        # It may have exited meanwhile; a signal lost with the connection is
        # no reason to skip what follows: the SIGKILL, the (forced) removal.
        with contextlib.suppress(aiodocker.DockerError, *_BROKEN):
            await self._container.kill(signal=name)


async def open_engine(*, instance_id: str, project: str) -> tuple[Engine, list[str]]:
    """An entered engine and what its :meth:`~Engine.sweep` removed; left again if that fails.

    Leave it (``__aexit__``) from the task that called this: the engine's task
    group follows the daemon's events, and an anyio task group must be left
    by the task that entered it.
    """
    engine = Engine(instance_id=instance_id, project=project)
    await engine.__aenter__()
    try:
        return engine, await engine.sweep()
    except BaseException:
        await engine.__aexit__(None, None, None)
        raise


async def _connect() -> aiodocker.Docker:
    """A client that answers, or BackendUnavailable saying how to get one."""
    try:
        docker = aiodocker.Docker()
    except ValueError as exc:
        raise BackendUnavailable(
            _HOW_TO_FIX.format(problem=f"no Docker engine found ({exc})")
        ) from None
    try:
        await docker.version()
    except BaseException as exc:
        # Cancelled too (a daemon that does not answer, a timeout around the
        # start): else the client's session is left open.
        with anyio.CancelScope(shield=True):
            await docker.close()
        if not isinstance(exc, aiodocker.DockerError):
            raise
        problem = exc.message
        if "ermission denied" in problem:
            raise BackendUnavailable(
                f"permission denied on the Docker socket ({problem}); add your user to the "
                "'docker' group (sudo usermod -aG docker $USER, then log in again) or run as root"
            ) from None
        raise BackendUnavailable(_HOW_TO_FIX.format(problem=problem)) from None
    return docker


async def _engine_address(docker: aiodocker.Docker) -> str:
    """The address of the engine's machine, as this machine reaches it: where
    its published ports are (loopback for a local engine's socket).

    An IP address, as Docker publishes ports on one. Read from the address
    the client was given (``DOCKER_HOST``, or the Docker context's), which
    aiodocker rewrites for ``ssh://`` into a local socket's. IPv4 when the
    name has it, and 127.0.0.1 for the IPv6 loopback (``localhost`` is often
    ::1 first): ``{host}`` puts the address in URLs as it is, where a bare
    IPv6 address breaks them.
    """
    url = URL(docker._connection_info)
    if url.scheme not in ("tcp", "http", "https", "ssh") or not url.host:
        return _LOOPBACK
    try:
        found = await anyio.getaddrinfo(url.host, url.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        # A name only ssh knows (an alias of ~/.ssh/config): its ports cannot
        # be placed here; loopback, as before remote engines were told apart.
        log.warning(
            "cannot resolve the Docker engine's host %r (%s): its services' ports are "
            "reported at 127.0.0.1",
            url.host,
            exc,
        )
        return _LOOPBACK
    ipv4 = [str(sockaddr[0]) for family, *_, sockaddr in found if family == socket.AF_INET]
    if ipv4:
        return ipv4[0]
    address = str(found[0][4][0])
    return _LOOPBACK if ipaddress.ip_address(address).is_loopback else address


# Shared by the docker backend and the docker runner: the way to do without
# Docker differs for services and for a task class, so both are named.
_HOW_TO_FIX = (
    "Docker is not running: {problem}. Start it (sudo systemctl start docker, or "
    "`sudo dockerd &`), or point DOCKER_HOST at a running engine; or do without Docker: "
    'backend = "local" for services, runner = "process" for a task class'
)


def _owner_alive(labels: Mapping[str, str]) -> bool:
    try:
        pid = int(labels[Labels.OWNER_PID])
        owner_start = labels[Labels.OWNER_START]
    except (KeyError, ValueError):
        return True  # not a record we understand: not ours to touch
    return str(start_time(pid)) == owner_start


def _transient(exc: aiodocker.DockerError) -> bool:
    """Whether asking again may answer: a daemon's server error, but 501 (a log
    driver that cannot be read, say), which is for good."""
    return exc.status >= 500 and exc.status != 501


def _reason(exc: aiodocker.DockerError) -> str:
    return str(exc.message).strip() or f"Docker API error {exc.status}"


class _LogCursor:
    """How far a container's log was delivered, so that a read after a break goes on from there.

    Docker stamps each record of a log (a line; a line longer than its 16
    KiB buffer is cut in pieces that share the first one's stamp) with the
    time it was written, to the nanosecond, and reads a log from a time on
    (``since``, that time included) wherever rotation has moved its start.
    Stamps rise within a stream, but not across stdout and stderr, whose
    records are stamped by a copier each: so each stream keeps its own place
    (:class:`_StreamCursor`), and a read after a break begins a little
    before the earliest of them (``_LOG_OVERLAP``), so that a record of one
    stream stamped before the other's last one is read again, and what was
    delivered already is skipped.
    """

    def __init__(self) -> None:
        self._streams: dict[int, _StreamCursor] = {}

    def query(self) -> dict[str, str]:
        """The log's query parameter for a read that goes on from here."""
        for stream in self._streams.values():
            stream.restart()
        stamps = [s.stamp for s in self._streams.values() if s.stamp >= 0]
        if not stamps:
            return {}
        seconds, nanoseconds = divmod(max(0, min(stamps) - _LOG_OVERLAP), 10**9)
        return {"since": f"{seconds}.{nanoseconds:09d}"}

    def take(self, number: int, stamp: int, piece: bytes, *, ends: bool) -> bytes:
        """What is new of ``piece`` of a record of stream ``number`` stamped ``stamp``."""
        stream = self._streams.get(number)
        if stream is None:
            stream = self._streams[number] = _StreamCursor()
        return stream.take(stamp, piece, ends=ends)


class _StreamCursor:
    """How far one stream of a log was delivered: all records stamped before
    ``stamp``, the first ``done`` at ``stamp``, and ``offset`` bytes of the
    next one there."""

    def __init__(self) -> None:
        self.stamp = -1  # nanoseconds since the epoch; -1: nothing delivered
        self.done = 0
        self.offset = 0
        self._seen = 0  # records at ``stamp`` begun on this read
        self._place: int | None = None  # the current record's among those (None: an older one)
        self._read: int | None = None  # bytes of the current record read (None: between records)

    def restart(self) -> None:
        """A new read begins (at or before ``stamp``)."""
        self._seen, self._read = 0, None

    def take(self, stamp: int, piece: bytes, *, ends: bool) -> bytes:
        """What is new of ``piece`` of a record stamped ``stamp``; ``ends``: its last piece."""
        if self._read is None:  # a record begins
            self._read = 0
            if stamp > self.stamp:
                self.stamp, self.done, self.offset, self._seen = stamp, 0, 0, 0
            if stamp == self.stamp:
                self._place, self._seen = self._seen, self._seen + 1
            else:
                self._place = None  # older than one delivered: read again, so delivered
        start = self._read
        self._read += len(piece)
        place = self._place
        if ends:
            self._read = None
        if place is None or place < self.done:
            return b""
        new = piece[max(0, self.offset - start) :]
        self.offset = max(self.offset, start + len(piece))
        if ends:
            self.done, self.offset = self.done + 1, 0
        return new


_STAMP = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)")


def _nanoseconds(stamp: bytes) -> int:
    """A log record's stamp (RFC 3339) in nanoseconds since the epoch, as ``since`` takes it.

    -1 for what is no stamp: such records all count as of one moment, so
    that after a break the log is read again from its start, skipping as
    many of them as were delivered.
    """
    match = _STAMP.fullmatch(stamp)
    if match is None:
        return -1
    whole, fraction, zone = match.group(1, 2, 3)
    seconds = int(datetime.fromisoformat((whole + zone).decode()).timestamp())
    return seconds * 10**9 + int((fraction or b"").ljust(9, b"0"))


async def _records(
    response: ClientResponse, *, tty: bool
) -> AsyncGenerator[tuple[int, int, bytes, bool], None]:
    """A log read with timestamps: ``(stream, stamp, piece of a record, whether it ends it)``.

    The stamps (and the space after each) are taken out. Without a terminal,
    each frame is one record. With one, the records come back to back: a
    record ends with its newline, or, a piece of a long line, where the next
    piece begins with the same stamp. Pieces are passed on as they come,
    less a tail that may be the start of that stamp.
    """
    if not tty:
        async for number, frame in _frames(response, tty=False):
            prefix, _, content = frame.partition(b" ")
            yield number, _nanoseconds(prefix), content, True
        return
    pending = bytearray()
    mark = b""  # the current record's stamp and space; empty between records
    stamp = -1
    async for _, chunk in _frames(response, tty=True):
        pending += chunk
        while pending:
            if not mark:
                space = pending.find(b" ")
                if space < 0:
                    break
                mark = bytes(pending[: space + 1])
                stamp = _nanoseconds(mark[:-1])
                del pending[: space + 1]
                continue
            newline = pending.find(b"\n")
            follows = pending.find(mark)
            if follows >= 0 and (newline < 0 or follows < newline):
                end = follows
            elif newline >= 0:
                end = newline + 1
            else:
                keep = next(
                    (k for k in range(len(mark) - 1, 0, -1) if pending.endswith(mark[:k])), 0
                )
                if len(pending) > keep:
                    yield 1, stamp, bytes(pending[: len(pending) - keep]), False
                    del pending[: len(pending) - keep]
                break
            yield 1, stamp, bytes(pending[:end]), True
            del pending[:end]
            mark = b""
    if mark:
        yield 1, stamp, bytes(pending), True


async def _frames(response: ClientResponse, *, tty: bool) -> AsyncIterator[tuple[int, bytes]]:
    """Docker's log stream: raw with a terminal, else 8-byte-header frames per stream."""
    if tty:
        async for chunk in response.content.iter_any():
            yield 1, chunk
        return
    while True:
        try:
            header = await response.content.readexactly(8)
            size = int.from_bytes(header[4:], "big")
            data = await response.content.readexactly(size) if size else b""
        except asyncio.IncompleteReadError:
            return
        yield (2 if header[0] == 2 else 1), data


def _time_left() -> float:
    """Seconds before the caller's deadline, less a margin (inf without one)."""
    return anyio.current_effective_deadline() - anyio.current_time() - _OOM_DEADLINE_MARGIN


def _exit_code(reported: int | str | None) -> int:
    """An exit code as Docker reports it (128 + N for signal N: PID 1 is an init); -1 if none."""
    return -1 if reported is None else from_shell(int(reported), by="Docker")


def _refused(exc: aiodocker.DockerError, config: Mapping[str, Any]) -> str:
    """Why Docker refused to create or start a container, for a person."""
    reason = _reason(exc)
    requests = (config.get("HostConfig") or {}).get("DeviceRequests") or ()
    if requests and "device driver" in reason:
        # Docker's words for "no GPU support here", which few would recognise.
        ids = [str(i) for r in requests for i in r.get("DeviceIDs") or ()]
        count = len(ids) or sum(int(r.get("Count") or 0) for r in requests)
        which = f" ({', '.join(ids)})" if ids else ""
        return (
            f"{reason}: {count} GPU(s) were requested{which}, and Docker needs the "
            "NVIDIA Container Toolkit to give them to a container"
        )
    return reason


def _broke(doing: str, exc: BaseException) -> str:
    return f"the connection to Docker broke while {doing} ({exc!r})"


def _unpullable(image: str, why: str, pull: str) -> str:
    """Why there is no image; with ``pull = "always"`` it may well be here, unused."""
    if pull == "always":
        return (
            f"image {image!r} could not be pulled ({why}); pull = 'always' pulls it even "
            "when it is present locally: pull = 'missing' uses a local one"
        )
    return f"image {image!r} is not present locally and could not be pulled ({why}): {_GET_IMAGE}"


def _has_healthcheck(config: Mapping[str, Any], image: Mapping[str, Any]) -> bool:
    check = config.get("Healthcheck") or (image.get("Config") or {}).get("Healthcheck") or {}
    test = check.get("Test") or []
    return bool(test) and test[0] != "NONE"
