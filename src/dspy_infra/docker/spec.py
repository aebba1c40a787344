"""The Engine API body of a container, built from what services and tasks ask for.

One builder for services and task containers, so that both get the same
defaults: ``Init`` (a PID 1 that forwards signals, so that stop is prompt),
ports published on loopback only (a remote engine's: on its own address),
and resource limits and GPU requests in Docker's own terms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["container_config"]

_LOOPBACK = "127.0.0.1"


def container_config(
    *,
    image: str,
    command: Sequence[str] | None,
    entrypoint: Sequence[str] | None = None,
    env: Mapping[str, str],
    cwd: str | None,
    labels: Mapping[str, str],
    ports: Mapping[int, int | Sequence[int]] | None = None,
    host_ip: str = _LOOPBACK,
    volumes: Iterable[str] = (),
    binds: Iterable[tuple[str, str]] = (),
    cpus: float | None = None,
    memory_mb: int | None = None,
    gpus: int = 0,
    gpu_ids: Sequence[str] = (),
    network: str | None = None,
    aliases: Sequence[str] = (),
    tty: bool = False,
) -> dict[str, Any]:
    """``ports`` maps container ports to host ports, published on ``host_ip``
    only (a remote engine's own address; else loopback): a port, or several
    (one container port published on each).

    ``tty`` gives the container a terminal: stdout and stderr then reach the
    log in the order they were written (two pipes would not keep it), and
    programs flush lines as they print them.

    ``gpu_ids`` requests those devices (a task's lease); otherwise ``gpus``
    requests that many, chosen by Docker.

    ``binds`` are ``(host path, container path)`` pairs, read-write: unlike
    a ``volumes`` entry (``SOURCE:TARGET[:MODE]``), a path may hold a ``:``
    (a workflow step's task id, ``RUN_ID:STEP``, names its work dir).
    """
    ports = ports or {}
    host_config: dict[str, Any] = {
        "Init": True,
        "PortBindings": {
            f"{inside}/tcp": [
                {"HostIp": host_ip, "HostPort": str(port)}
                for port in ([outside] if isinstance(outside, int) else outside)
            ]
            for inside, outside in ports.items()
        },
        "Binds": list(volumes),
    }
    if binds:
        host_config["Mounts"] = [
            {"Type": "bind", "Source": source, "Target": target} for source, target in binds
        ]
    if cpus is not None:
        host_config["NanoCpus"] = int(cpus * 1e9)
    if memory_mb is not None:
        host_config["Memory"] = memory_mb * 1024 * 1024
    if gpu_ids:
        host_config["DeviceRequests"] = [
            {"Driver": "", "DeviceIDs": list(gpu_ids), "Capabilities": [["gpu"]]}
        ]
    elif gpus:
        host_config["DeviceRequests"] = [{"Driver": "", "Count": gpus, "Capabilities": [["gpu"]]}]
    if network is not None:
        host_config["NetworkMode"] = network
    config: dict[str, Any] = {
        "Image": image,
        "Env": [f"{key}={value}" for key, value in env.items()],
        "Labels": dict(labels),
        "ExposedPorts": {f"{inside}/tcp": {} for inside in ports},
        "HostConfig": host_config,
        "Tty": tty,
    }
    if command is not None:
        config["Cmd"] = list(command)
    if entrypoint is not None:
        config["Entrypoint"] = list(entrypoint)
    if cwd is not None:
        config["WorkingDir"] = cwd
    if network is not None and aliases:
        config["NetworkingConfig"] = {"EndpointsConfig": {network: {"Aliases": list(aliases)}}}
    return config
