"""Free ports: never twice, never from the range outgoing connections use."""

from __future__ import annotations

import socket
from pathlib import Path

from dspy_infra.services.ports import PortAllocator


def test_ports_are_unique_bindable_and_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    allocator = PortAllocator()
    ports = [allocator.allocate() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(port < low for port in ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))
