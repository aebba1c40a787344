"""Helpers for the integration tests: real processes on the local backend."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

SERVICE = str(Path(__file__).with_name("_service.py"))


def service(*args: str, port: bool = False, **fields: Any) -> dict[str, Any]:
    """A service table running tests/integration/_service.py with ``args``."""
    table: dict[str, Any] = {"command": [sys.executable, SERVICE, *args], **fields}
    if port:
        table["command"] += ["--port", "{port}"]
        table.setdefault("ports", {"main": 0})
        table.setdefault("health", {"tcp": "{port}"})
    return table
