"""The Engine API body the docker backend and runner send: what Docker is asked for."""

from __future__ import annotations

from typing import Any

from dspy_infra.docker.spec import container_config


def make(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"env": {"A": "1"}, "cwd": None, "labels": {"k": "v"}}
    return container_config(image="img", command=["run"], **{**base, **fields})


def test_ports_are_published_on_loopback_only() -> None:
    config = make(ports={80: 18080, 9000: 9000})
    assert config["ExposedPorts"] == {"80/tcp": {}, "9000/tcp": {}}
    assert config["HostConfig"]["PortBindings"] == {
        "80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "18080"}],
        "9000/tcp": [{"HostIp": "127.0.0.1", "HostPort": "9000"}],
    }


def test_init_is_on_so_that_stop_reaches_the_program() -> None:
    config = make()
    assert config["HostConfig"]["Init"] is True
    assert config["Env"] == ["A=1"]
    assert "Entrypoint" not in config
    assert "WorkingDir" not in config


def test_limits_and_gpu_requests() -> None:
    config = make(cpus=1.5, memory_mb=512, gpus=2)
    host = config["HostConfig"]
    assert host["NanoCpus"] == 1_500_000_000
    assert host["Memory"] == 512 * 1024 * 1024
    assert host["DeviceRequests"] == [{"Driver": "", "Count": 2, "Capabilities": [["gpu"]]}]


def test_a_lease_requests_exactly_its_devices() -> None:
    config = make(gpu_ids=("1", "3"), gpus=1)
    assert config["HostConfig"]["DeviceRequests"] == [
        {"Driver": "", "DeviceIDs": ["1", "3"], "Capabilities": [["gpu"]]}
    ]


def test_network_alias_and_mounts() -> None:
    config = make(
        network="net",
        aliases=("kv",),
        volumes=["/data:/data:ro"],
        entrypoint=["/bin/sh"],
        cwd="/srv",
    )
    assert config["HostConfig"]["NetworkMode"] == "net"
    assert config["NetworkingConfig"] == {"EndpointsConfig": {"net": {"Aliases": ["kv"]}}}
    assert config["HostConfig"]["Binds"] == ["/data:/data:ro"]
    assert config["Entrypoint"] == ["/bin/sh"]
    assert config["WorkingDir"] == "/srv"
