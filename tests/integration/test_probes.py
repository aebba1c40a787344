"""Each probe kind, against real processes."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from dspy_infra import AgentInfra, ServiceStartError, ServiceState, ServiceStatus
from tests.integration.helpers import running_with, unique_seconds

pytestmark = pytest.mark.anyio

HTTP = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "{port}"]


def start(tmp_path: Path, **services: dict[str, Any]) -> AgentInfra:
    return AgentInfra.start({"services": services}, state_dir=tmp_path / "state")


async def test_http_probe_checks_status_and_body(tmp_path: Path) -> None:
    (tmp_path / "health").write_text("all systems go\n")
    web = {
        "command": HTTP,
        "cwd": str(tmp_path),
        "ports": {"main": 0},
        "health": {"http": "http://127.0.0.1:{port}/health", "status": 200, "body": "systems go"},
    }
    async with start(tmp_path, web=web) as infra:
        assert (await infra.services.status())["web"].state is ServiceState.HEALTHY


async def test_http_probe_fails_on_the_wrong_status(tmp_path: Path) -> None:
    web = {
        "command": HTTP,
        "cwd": str(tmp_path),
        "ports": {"main": 0},
        "start_retries": 0,
        "health": {"http": "http://127.0.0.1:{port}/missing", "deadline": 1.0},
    }
    with pytest.raises(ServiceStartError, match="HTTP 404"):
        async with start(tmp_path, web=web):
            pass


async def test_command_probe_runs_with_the_service_environment(tmp_path: Path) -> None:
    marker = tmp_path / "ready"
    job = {
        "command": ["sh", "-c", f"sleep 0.2; touch {marker}; sleep 1000"],
        "env": {"MARKER": str(marker)},
        "health": {"command": ["sh", "-c", 'test -f "$MARKER"']},
    }
    async with start(tmp_path, job=job) as infra:
        assert marker.exists()
        assert (await infra.services.status())["job"].state is ServiceState.HEALTHY


async def test_log_probe_waits_for_a_matching_line(tmp_path: Path) -> None:
    job = {
        "command": "echo booting; sleep 0.2; echo 'server started on {name}'; sleep 1000",
        "shell": True,
        "health": {"log": r"started on job$"},
    }
    async with start(tmp_path, job=job) as infra:
        assert (await infra.services.status())["job"].state is ServiceState.HEALTHY
        assert [line async for line in infra.services.logs("job")] == [
            "booting",
            "server started on job",
        ]


async def test_a_log_probe_sees_its_line_even_if_more_lines_follow_at_once(
    tmp_path: Path,
) -> None:
    # The ready line and, in the same write, more lines than the log buffer
    # holds: it has left the buffer by the time a check could look there.
    burst = "import sys; sys.stdout.write('ready' + ''.join('\\nline %d' % i for i in range(50)))"
    job = {
        "command": [
            sys.executable,
            "-c",
            f"{burst}; sys.stdout.flush(); import time; time.sleep(1000)",
        ],
        "log_lines": 10,
        "health": {"log": "^ready$", "deadline": 5},
        "start_retries": 0,
    }
    async with start(tmp_path, job=job) as infra:
        assert (await infra.services.status())["job"].state is ServiceState.HEALTHY


async def test_a_log_probe_stays_passed_once_its_line_left_the_log_buffer(
    tmp_path: Path,
) -> None:
    flood = tmp_path / "flood"
    job = {
        "command": f"echo ready; until [ -e {flood} ]; do sleep 0.01; done; seq 50; sleep 1000",
        "shell": True,
        "log_lines": 10,
        "health": {"log": "^ready$", "liveness_interval": 0.01, "failure_threshold": 1},
        "start_retries": 0,
    }
    checks = 'dspy_infra_health_check_duration_seconds_count{service="job",status="%s"}'
    async with start(tmp_path, job=job) as infra:
        flood.touch()
        async for line in infra.services.logs("job", follow=True):
            if line == "50":
                break
        # A few liveness checks after the ready line has left the buffer.
        made = (await infra.get_metrics())[checks % "healthy"]
        with anyio.fail_after(10):
            while (await infra.get_metrics())[checks % "healthy"] < made + 3:
                if (await infra.services.status())["job"].state is not ServiceState.HEALTHY:
                    break
                await anyio.sleep(0.01)
        status = (await infra.services.status())["job"]
        assert status.state is ServiceState.HEALTHY, status.message


checked: list[ServiceStatus] = []


async def ready_when_port_known(status: ServiceStatus) -> bool:
    checked.append(status)
    return status.ports["main"] != 0


async def test_call_probe_gets_the_service_status_and_may_be_named_by_import_path(
    tmp_path: Path,
) -> None:
    checked.clear()
    job = {
        "command": ["sleep", "1000"],
        "ports": {"main": 0},
        "health": {"call": f"{__name__}:ready_when_port_known"},
    }
    async with start(tmp_path, job=job) as infra:
        status = (await infra.services.status())["job"]
        assert status.state is ServiceState.HEALTHY
    assert checked[0].name == "job"
    assert checked[0].ports == status.ports


async def test_service_dir_and_state_dir_placeholders(tmp_path: Path) -> None:
    job = {
        "command": ["sh", "-c", "pwd; echo {state_dir}; exec sleep 1000"],
        "cwd": "{service_dir}",
    }
    async with start(tmp_path, job=job) as infra:
        state_dir = infra.config.infra.state_dir
        seen = []
        async for line in infra.services.logs("job", follow=True):
            seen.append(line)
            if len(seen) == 2:
                break
        assert seen == [str(state_dir / "services" / "job"), str(state_dir)]


refusals: list[str] = []


async def refused_twice(status: ServiceStatus) -> bool:
    if len(refusals) < 2:
        refusals.append(status.name)
        raise RuntimeError("connection refused")  # as a client library says it, not an OSError
    return True


async def test_a_probe_that_raises_is_a_failed_check_and_retried(tmp_path: Path) -> None:
    refusals.clear()
    job = {"command": ["sleep", "1000"], "health": {"call": f"{__name__}:refused_twice"}}
    async with start(tmp_path, job=job) as infra:
        assert (await infra.services.status())["job"].state is ServiceState.HEALTHY
    assert refusals == ["job", "job"]


async def test_a_command_probe_cut_short_leaves_no_process(tmp_path: Path) -> None:
    marker = unique_seconds()
    job = {
        "command": ["sleep", "1000"],
        "health": {"command": ["sh", "-c", f"sleep {marker}; true"], "timeout": 0.2, "deadline": 1},
        "start_retries": 0,
    }
    with pytest.raises(ServiceStartError):
        async with start(tmp_path, job=job):
            pass
    assert running_with(marker) == []


async def test_a_check_still_running_at_the_deadline_is_cut_short_there(tmp_path: Path) -> None:
    job = {
        "command": ["sleep", "1000"],
        "health": {"command": ["sleep", "1000"], "timeout": 30, "deadline": 1},
        "start_retries": 0,
    }
    started = time.monotonic()
    with pytest.raises(ServiceStartError, match="not healthy within 1s") as caught:
        async with start(tmp_path, job=job):
            pass
    assert time.monotonic() - started < 15, "the check ran out its own timeout, past the deadline"
    assert "still running at the deadline" in caught.value.reason


checks: list[float] = []


async def never_ready(status: ServiceStatus) -> bool:
    checks.append(anyio.current_time())
    return False


async def test_no_check_begins_at_the_deadline(tmp_path: Path) -> None:
    # Checks 0.4 s apart (spread by 0.9, 1.0, 1.1): at about 0, 0.36 and
    # 0.76 s; the next one would come after the 1 s deadline, when a check
    # could only be cut short as it begins, and must not be made at all.
    checks.clear()
    health = {"call": f"{__name__}:never_ready", "interval": 0.4, "max_interval": 0.4}
    job = {"command": ["sleep", "1000"], "health": {**health, "deadline": 1}, "start_retries": 0}
    with pytest.raises(ServiceStartError, match="not healthy within 1s"):
        async with start(tmp_path, job=job):
            pass
    assert checks[-1] - checks[0] < 0.9, f"a check began at the deadline: {checks}"


async def test_retries_counts_failed_checks_not_passed_ones(tmp_path: Path) -> None:
    # Checks answer pass, fail, pass, pass: one failed check of the two that
    # `retries` allows, and two passes in a row at last. The passed checks
    # were counted as failed ones: "probe failed 2 times" after one failure.
    answers = [True, False, True, True]
    seen: list[bool] = []

    async def flaky(status: ServiceStatus) -> bool:
        answer = answers[len(seen)] if len(seen) < len(answers) else True
        seen.append(answer)
        return answer

    health = {"call": flaky, "retries": 2, "success_threshold": 2}
    job = {"command": ["sleep", unique_seconds()], "health": health, "start_retries": 0}
    async with start(tmp_path, job=job) as infra:
        status = (await infra.services.status())["job"]
        assert status.state is ServiceState.HEALTHY, status.message
    assert seen == answers


async def test_retries_fails_the_start_at_that_many_failed_checks(tmp_path: Path) -> None:
    seen: list[float] = []

    async def never(status: ServiceStatus) -> bool:
        seen.append(anyio.current_time())
        return False

    health = {"call": never, "retries": 3, "interval": 0.01, "max_interval": 0.01}
    job = {"command": ["sleep", unique_seconds()], "health": health, "start_retries": 0}
    with pytest.raises(ServiceStartError, match="probe failed 3 times"):
        async with start(tmp_path, job=job):
            pass
    assert len(seen) == 3


LISTEN_V6 = """
import socket, sys
s = socket.socket(socket.AF_INET6); s.bind(("::1", int(sys.argv[1]))); s.listen()
while True: s.accept()[0].close()
"""


async def test_a_tcp_probe_reaches_a_bracketed_ipv6_host(tmp_path: Path) -> None:
    # "[::1]:{port}" loads (as addresses are written elsewhere in the
    # configuration), but every check looked up the name "[::1]", brackets
    # included, and failed until the deadline.
    job = {
        "command": [sys.executable, "-c", LISTEN_V6, "{port}"],
        "ports": {"main": 0},
        "health": {"tcp": "[::1]:{port}", "deadline": 5},
        "start_retries": 0,
    }
    async with start(tmp_path, job=job) as infra:
        assert (await infra.services.status())["job"].state is ServiceState.HEALTHY
