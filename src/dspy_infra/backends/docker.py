"""The docker backend: each service is a container on the instance's own network.

Containers behave like the local backend's process groups, so the same
supervisor drives both: output is followed from the Docker log stream, exits
come from the event stream, stop is SIGTERM then SIGKILL (``Init`` is on, so
the service gets the signal rather than a PID 1 that ignores it), and
``stop()`` returns once the container is removed. Ports are published on
127.0.0.1 (a remote engine's: on its own address), so probes run from this
machine exactly as for local services.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from pathlib import Path

from dspy_infra.abc import LaunchSpec
from dspy_infra.docker.engine import Container, ContainerError, Engine, open_engine
from dspy_infra.docker.spec import container_config
from dspy_infra.errors import ServiceStartError

__all__ = ["Backend", "DockerBackend"]

_LOOPBACK = ("127.0.0.1", "localhost")


class DockerService:
    """A service's container, as the supervisor sees a launched service."""

    def __init__(
        self, container: Container, host: str, ports: Mapping[str, int], inside: Mapping[int, int]
    ):
        self._container = container
        self._host = host  # the engine's machine, where the ports are published
        self._ports = dict(ports)
        self._inside = inside  # published host port -> container port

    @property
    def id(self) -> str:
        return self._container.id[:12]

    @property
    def host(self) -> str:
        return self._host

    @property
    def ports(self) -> Mapping[str, int]:
        return self._ports

    @property
    def health(self) -> str | None:
        return self._container.watch.health

    def reach(self, host: str, port: int) -> tuple[str, int]:
        address = self._container.address
        if host in (*_LOOPBACK, self._host) and port in self._inside and address is not None:
            return address, self._inside[port]
        return host, port

    def output(self) -> AsyncGenerator[str, None]:
        return self._container.output()

    async def wait(self) -> int:
        return await self._container.wait()

    async def stop(self, grace: float) -> int:
        return await self._container.stop(grace)

    async def exec(self, argv: tuple[str, ...]) -> tuple[int, str]:
        return await self._container.exec(argv)


class DockerBackend:
    """Services as Docker containers (``backend = "docker"``)."""

    def __init__(self) -> None:
        self._engine: Engine | None = None

    @property
    def name(self) -> str:
        return "docker"

    async def open(self, *, state_dir: Path, instance_id: str, project: str) -> list[str]:
        self._engine, swept = await open_engine(instance_id=instance_id, project=project)
        return swept

    @property
    def on_this_machine(self) -> bool:
        """Whether the engine runs here, with this machine's GPUs (a remote one
        has its own: the ids found here mean nothing there)."""
        return self._engine is not None and self._engine.on_this_machine

    def peer_endpoint(
        self, service: str, ports: Mapping[str, int], container_ports: Mapping[str, int]
    ) -> tuple[str, Mapping[str, int]]:
        return service, {name: container_ports.get(name, port) for name, port in ports.items()}

    async def launch(self, spec: LaunchSpec) -> DockerService:
        engine = self._engine
        if engine is None:
            raise RuntimeError("DockerBackend.launch() before open()")
        if spec.image is None:
            raise ServiceStartError(spec.name, "the docker backend needs an image")
        try:
            image = await engine.image(spec.image, pull=spec.pull, progress=spec.progress)
            inside = {port: spec.container_ports.get(n, port) for n, port in spec.ports.items()}
            published: dict[int, list[int]] = {}  # one container port may have several
            for host, port in inside.items():
                published.setdefault(port, []).append(host)
            config = container_config(
                image=spec.image,
                command=spec.argv(),
                entrypoint=spec.entrypoint,
                env=spec.env,
                cwd=str(spec.cwd) if spec.cwd is not None else None,
                labels=engine.labels("service", spec.name, spec.labels),
                ports=published,
                host_ip=engine.host,
                volumes=spec.volumes,
                cpus=spec.cpus,
                memory_mb=spec.memory_mb,
                gpus=spec.gpus,
                gpu_ids=spec.gpu_ids,
                network=await engine.network(),
                aliases=(spec.name,),
                tty=True,
            )
            container = await engine.run(config, image=image)
        except ContainerError as exc:
            raise ServiceStartError(spec.name, exc.reason) from None
        return DockerService(container, engine.host, spec.ports, inside)

    async def close(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.__aexit__(None, None, None)


Backend = DockerBackend
