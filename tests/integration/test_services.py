"""Services on the local backend: real processes, asserted behaviour."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dspy_infra import (
    AgentInfra,
    BackendUnavailable,
    Event,
    InfraClosed,
    LinesDropped,
    Probe,
    ServiceEvent,
    ServiceStartError,
    ServiceState,
    UnknownService,
)
from dspy_infra._process_group import Ledger
from dspy_infra._procfs import group_alive
from dspy_infra.abc import LaunchSpec
from dspy_infra.backends.local import LocalBackend, LocalProcess
from dspy_infra.services import ports
from tests.integration.helpers import running_with, service, unique_seconds, used

pytestmark = pytest.mark.anyio


def infra_for(tmp_path: Path, services: dict[str, Any], **infra: Any) -> AgentInfra:
    return AgentInfra.start({"infra": infra, "services": services}, state_dir=tmp_path / "state")


class Recorder:
    """Collects every event of an instance in the background."""

    def __init__(self) -> None:
        self.events: list[ServiceEvent] = []

    def of(self, type_: str, service: str | None = None) -> list[ServiceEvent]:
        return [e for e in self.events if e.type == type_ and service in (None, e.service)]

    def first(self, type_: str, service: str) -> ServiceEvent:
        found = self.of(type_, service)
        assert found, (
            f"no {type_} event for {service}: {[(e.type, e.service) for e in self.events]}"
        )
        return found[0]

    async def wait_for(self, type_: str, service: str, count: int = 1) -> None:
        with anyio.fail_after(10):
            while len(self.of(type_, service)) < count:
                await anyio.sleep(0.01)


@asynccontextmanager
async def recording(infra: AgentInfra) -> AsyncIterator[Recorder]:
    """Record the instance's service events, from its first (replayed with since=0)."""
    recorder = Recorder()

    async def record() -> None:
        async for event in infra.stream_events(since=0):
            if isinstance(event, ServiceEvent):
                recorder.events.append(event)

    async with anyio.create_task_group() as tg:
        tg.start_soon(record)
        yield recorder
        await anyio.sleep(0.01)  # let the last events in
        tg.cancel_scope.cancel()


def alive(pid: str | None) -> bool:
    return pid is not None and group_alive(int(pid))


async def test_dependents_start_after_and_see_their_dependencies_ports(tmp_path: Path) -> None:
    services = {
        "kv": service(port=True),
        "api": service(
            "--say", "kv at {services.kv.host}:{services.kv.port}", port=True, depends_on=["kv"]
        ),
    }
    async with infra_for(tmp_path, services) as infra:
        status = await infra.services.status()
        kv_port = status["kv"].ports["main"]
        assert kv_port != 0
        assert status["api"].state is ServiceState.HEALTHY
        lines = [line async for line in infra.services.logs("api")]
        assert lines == [f"kv at 127.0.0.1:{kv_port}"]
        report = await infra.health_check()
        assert report.healthy
        assert set(report.services) == {"kv", "api"}


async def test_each_service_starts_as_soon_as_its_own_dependencies_are_met(
    tmp_path: Path,
) -> None:
    services = {
        "slow": service("--delay", "1.0", port=True),
        "fast": service(port=True),
        "after_fast": service(port=True, depends_on=["fast"]),
        "after_both": service(port=True, depends_on=["slow", "after_fast"]),
    }
    async with infra_for(tmp_path, services) as infra, recording(infra) as recorder:
        await recorder.wait_for("service_healthy", "after_both")
    after_fast = recorder.first("service_healthy", "after_fast").time
    slow = recorder.first("service_healthy", "slow").time
    after_both_starting = recorder.first("service_starting", "after_both").time
    assert after_fast < slow - 0.5, "after_fast waited for an unrelated slow service"
    assert after_both_starting >= slow


async def test_max_concurrent_starts_bounds_services_starting_at_once(tmp_path: Path) -> None:
    services = {f"s{i}": service("--delay", "0.3", port=True) for i in range(4)}
    infra = infra_for(tmp_path, services, autostart=False, max_concurrent_starts=2)
    async with infra, recording(infra) as recorder:
        started = time.monotonic()
        await infra.services.start()
        elapsed = time.monotonic() - started
    spans = [
        (recorder.first("service_starting", n).time, recorder.first("service_healthy", n).time)
        for n in services
    ]
    overlap = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert overlap == 2
    assert elapsed >= 0.6


async def test_a_one_shot_dependency_completes_before_its_dependents_start(
    tmp_path: Path,
) -> None:
    services = {
        "migrate": service("--say", "migrated", "--exit-after", "0.2"),
        "api": service(port=True, depends_on={"migrate": {"condition": "completed_successfully"}}),
    }
    async with infra_for(tmp_path, services) as infra:
        status = await infra.services.status()
        assert status["migrate"].state is ServiceState.COMPLETED
        assert status["migrate"].exit_code == 0
        assert status["api"].state is ServiceState.HEALTHY
        assert (await infra.health_check()).healthy


async def test_a_failed_one_shot_fails_its_dependents_with_exit_code_and_log_tail(
    tmp_path: Path,
) -> None:
    services = {
        "migrate": service(
            "--say", "schema is broken", "--exit-after", "0.1", "--code", "3", start_retries=0
        ),
        "api": service(port=True, depends_on={"migrate": {"condition": "completed_successfully"}}),
    }
    infra = infra_for(tmp_path, services)
    with pytest.raises(ServiceStartError) as info:
        await infra.__aenter__()
    assert info.value.service == "migrate"
    assert info.value.exit_code == 3
    assert "schema is broken" in info.value.log_tail
    assert not list((tmp_path / "state" / "local").iterdir()), "a launch record was left"


async def test_a_failure_of_a_service_that_was_up_holds_the_lines_it_printed_as_it_died(
    tmp_path: Path,
) -> None:
    # No probe: up at launch, so its exit is judged at once, and the lines it
    # printed just before (why it died) raced that verdict: one start in five
    # raised without them. Twenty starts, to lose that race at least once.
    services = {
        "migrate": {"command": ["sh", "-c", "echo no schema for you; exit 3"], "start_retries": 0},
        "api": service(depends_on={"migrate": {"condition": "completed_successfully"}}),
    }
    for attempt in range(20):
        infra = infra_for(tmp_path / str(attempt), services)
        with pytest.raises(ServiceStartError) as info:
            await infra.__aenter__()
        assert info.value.log_tail == ("no schema for you",), f"start {attempt}"


async def test_log_ready_waits_for_the_matching_line(tmp_path: Path) -> None:
    services = {
        "worker": service("--delay", "0.3", "--say", "warming up", "--say", "worker ready"),
        "client": service(
            port=True, depends_on={"worker": {"condition": "log_ready", "pattern": "ready$"}}
        ),
    }
    async with infra_for(tmp_path, services) as infra, recording(infra) as recorder:
        await recorder.wait_for("service_starting", "client")
        worker_started = recorder.first("service_started", "worker").time
        client_starting = recorder.first("service_starting", "client").time
        assert client_starting - worker_started >= 0.25


async def test_log_ready_sees_its_line_even_if_more_lines_follow_at_once(tmp_path: Path) -> None:
    # The ready line and, in the same write, more lines than the log buffer
    # holds: it has left the buffer by the time the dependent could look there.
    burst = "import sys; sys.stdout.write('ready' + ''.join('\\nline %d' % i for i in range(50)))"
    services = {
        "worker": {
            "command": [
                sys.executable,
                "-c",
                f"{burst}; sys.stdout.flush(); import time; time.sleep(1000)",
            ],
            "log_lines": 10,
        },
        "client": {
            "command": ["sleep", "1000"],
            "depends_on": {"worker": {"condition": "log_ready", "pattern": "^ready$"}},
        },
    }
    async with infra_for(tmp_path, services, autostart=False) as infra:
        with anyio.fail_after(10):
            started = await infra.services.start(["client"])
        assert started["client"].state is ServiceState.RUNNING


async def test_log_ready_sees_a_line_printed_before_the_dependent_began_to_wait(
    tmp_path: Path,
) -> None:
    # The dependency printed its ready line, then more lines than its log
    # buffer holds, long before the dependent was started: the line had left
    # the buffer, and the dependent waited for ever.
    chatty = "print('ready'); [print('line', i) for i in range(50)]"
    services = {
        "worker": {
            "command": [
                sys.executable,
                "-c",
                f"{chatty}; import sys, time; sys.stdout.flush(); time.sleep(1000)",
            ],
            "log_lines": 10,
        },
        "client": {
            "command": ["sleep", "1000"],
            "autostart": False,
            "depends_on": {"worker": {"condition": "log_ready", "pattern": "^ready$"}},
        },
    }
    async with infra_for(tmp_path, services) as infra:
        with anyio.fail_after(10):
            async for line in infra.services.logs("worker", follow=True):
                if line == "line 49":
                    break
        assert "ready" not in [line async for line in infra.services.logs("worker", follow=False)]
        with anyio.fail_after(10):
            started = await infra.services.start(["client"])
        assert started["client"].state is ServiceState.RUNNING


async def test_a_dependency_that_dies_fails_waiting_dependents_at_once(tmp_path: Path) -> None:
    services = {
        # Never listens, exits 1 after 0.3 s: its dependents must not wait for its deadline.
        "db": service(
            "--exit-after",
            "0.3",
            "--code",
            "1",
            "--say",
            "disk full",
            ports={"main": 0},
            health={"tcp": "{port}", "deadline": 60},
            start_retries=0,
        ),
        "api": service(port=True, depends_on=["db"]),
    }
    infra = infra_for(tmp_path, services)
    started = time.monotonic()
    with pytest.raises(ServiceStartError) as info:
        await infra.__aenter__()
    assert time.monotonic() - started < 5
    assert info.value.service == "db"
    assert info.value.exit_code == 1
    assert "disk full" in str(info.value)


async def test_dependency_failed_carries_the_root_cause(tmp_path: Path) -> None:
    services = {
        "db": service(
            "--exit-after",
            "0.2",
            "--code",
            "7",
            "--say",
            "bad config",
            ports={"main": 0},
            health={"tcp": "{port}"},
            start_retries=0,
        ),
        "api": service(port=True, depends_on=["db"]),
    }
    infra = infra_for(tmp_path, services, autostart=False)
    async with infra, recording(infra) as recorder:
        with pytest.raises(ServiceStartError) as info:
            await infra.services.start(["api"])
        assert info.value.service == "db", "the root cause is reported, not its consequence"
        assert (await infra.services.status())["db"].state is ServiceState.FAILED
    failed = recorder.first("service_failed", "api")
    assert "dependency 'db' failed" in failed.message
    assert failed.exit_code == 7


async def test_a_probe_that_never_passes_hits_its_deadline_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    services = {
        "stuck": service(
            ports={"main": 0},
            health={"tcp": "{port}", "deadline": 0.4},
            start_retries=1,
            start_backoff={"initial": 0.05},
        ),
    }
    infra = infra_for(tmp_path, services)
    started = time.monotonic()
    with pytest.raises(ServiceStartError, match=r"not healthy within 0\.4s"):
        await infra.__aenter__()
    assert time.monotonic() - started < 5
    assert not list((tmp_path / "state" / "local").iterdir())


@pytest.mark.parametrize("policy", ["no", "on-failure", "always", "unless-stopped"])
async def test_kill_9_under_each_restart_policy(tmp_path: Path, policy: str) -> None:
    services = {
        "svc": service(port=True, restart=policy, restart_backoff={"initial": 0.05}),
    }
    async with infra_for(tmp_path, services) as infra, recording(infra) as recorder:
        before = (await infra.services.status())["svc"]
        assert before.pid is not None
        os.kill(int(before.pid), signal.SIGKILL)
        if policy == "no":
            await recorder.wait_for("service_failed", "svc")
            after = (await infra.services.status())["svc"]
            assert after.state is ServiceState.FAILED
            assert after.exit_code == -signal.SIGKILL
            assert not (await infra.health_check()).healthy
        else:
            await recorder.wait_for("service_restarting", "svc")
            await recorder.wait_for("service_healthy", "svc", count=1)
            with anyio.fail_after(10):
                while (await infra.services.status())["svc"].state is not ServiceState.HEALTHY:
                    await anyio.sleep(0.01)
            after = (await infra.services.status())["svc"]
            assert after.restarts == 1
            assert after.pid != before.pid
            assert after.ports == before.ports, "a restarted service keeps its port"
            assert not alive(before.pid)


@pytest.mark.parametrize(
    ("policy", "state"),
    [
        ("on-failure", ServiceState.COMPLETED),
        ("always", ServiceState.RESTARTING),
    ],
)
async def test_a_clean_exit_completes_unless_the_policy_is_always(
    tmp_path: Path, policy: str, state: ServiceState
) -> None:
    services = {
        "job": service("--exit-after", "0.2", restart=policy, restart_backoff={"initial": 5.0})
    }
    async with infra_for(tmp_path, services) as infra:
        with anyio.fail_after(5):
            while (await infra.services.status())["job"].state is ServiceState.RUNNING:
                await anyio.sleep(0.01)
        assert (await infra.services.status())["job"].state is state


async def test_max_restarts_gives_up(tmp_path: Path) -> None:
    services = {
        "crashy": service(
            "--exit-after",
            "0.05",
            "--code",
            "2",
            restart="on-failure",
            max_restarts=2,
            restart_backoff={"initial": 0.01, "max": 0.02},
        ),
    }
    async with infra_for(tmp_path, services) as infra:
        with anyio.fail_after(10):
            while (await infra.services.status())["crashy"].state is not ServiceState.FAILED:
                await anyio.sleep(0.02)
        status = (await infra.services.status())["crashy"]
        assert status.restarts == 2
        assert "gave up after 2 restarts" in status.message
        assert status.exit_code == 2


async def test_start_retries_bound_the_launches_and_their_backoff_grows(tmp_path: Path) -> None:
    services = {
        "bad": {
            "command": ["sh", "-c", "exit 3"],
            "health": {"log": "^ready$"},
            "autostart": False,
            "start_retries": 2,
            "start_backoff": {"initial": 0.1, "factor": 3, "jitter": 0},
        },
    }
    async with infra_for(tmp_path, services) as infra, recording(infra) as recorder:
        with pytest.raises(ServiceStartError, match="exited with code 3 before becoming healthy"):
            await infra.services.start(["bad"])
    starts = recorder.of("service_starting", "bad")
    assert len(starts) == 3, "a first launch and start_retries more"
    delays = [e.message.rsplit("; ", 1)[-1] for e in recorder.of("service_restarting", "bad")]
    assert delays == ["retrying in 0.10s", "retrying in 0.30s"]
    assert starts[2].time - starts[1].time >= 0.3


async def test_restart_backoff_grows_with_each_consecutive_restart(tmp_path: Path) -> None:
    services = {
        "crashy": service(
            "--exit-after",
            "0.05",
            "--code",
            "2",
            restart="on-failure",
            max_restarts=3,
            restart_backoff={"initial": 0.05, "factor": 2, "jitter": 0},
        ),
    }
    async with infra_for(tmp_path, services) as infra, recording(infra) as recorder:
        await recorder.wait_for("service_failed", "crashy")
    delays = [e.message.rsplit("; ", 1)[-1] for e in recorder.of("service_restarting", "crashy")]
    assert delays == ["retrying in 0.05s", "retrying in 0.10s", "retrying in 0.20s"]


async def test_a_service_up_for_restart_reset_after_restarts_as_if_for_the_first_time(
    tmp_path: Path,
) -> None:
    # Up for 0.3 s each time, past restart_reset_after: no restart follows
    # another, so max_restarts = 1 never gives up, and the backoff never grows.
    services = {
        "steady": service(
            "--exit-after",
            "0.3",
            "--code",
            "2",
            restart="on-failure",
            max_restarts=1,
            restart_reset_after=0.1,
            restart_backoff={"initial": 0.05, "factor": 2, "jitter": 0},
        ),
    }
    async with infra_for(tmp_path, services) as infra, recording(infra) as recorder:
        await recorder.wait_for("service_restarting", "steady", count=3)
        assert recorder.of("service_failed", "steady") == []
    delays = [e.message.rsplit("; ", 1)[-1] for e in recorder.of("service_restarting", "steady")]
    assert set(delays) == {"retrying in 0.05s"}


async def test_liveness_failures_below_failure_threshold_leave_a_service_healthy(
    tmp_path: Path,
) -> None:
    failing = 0  # checks still to fail, then pass again
    checked = 0

    async def check(status: Any) -> bool:
        nonlocal failing, checked
        checked += 1
        if failing:
            failing -= 1
            return False
        return True

    services = {
        "svc": service(
            restart="on-failure",
            health={"call": check, "liveness_interval": 0.02, "failure_threshold": 3},
        ),
    }
    async with infra_for(tmp_path, services) as infra, recording(infra) as recorder:
        for _ in range(3):
            failing = 2
            with anyio.fail_after(5):
                while failing:
                    await anyio.sleep(0.01)
            seen = checked
            with anyio.fail_after(5):
                while checked < seen + 2:  # passed again, and counted from 0
                    await anyio.sleep(0.01)
        assert recorder.of("service_unhealthy", "svc") == []
        status = (await infra.services.status())["svc"]
        assert (status.state, status.restarts) == (ServiceState.HEALTHY, 0)


async def test_liveness_failures_make_a_service_unhealthy_and_restart_it(tmp_path: Path) -> None:
    healthy = True

    async def check(status: Any) -> bool:
        return healthy

    services = {
        "svc": service(
            restart="on-failure",
            restart_backoff={"initial": 0.01},
            health={"call": check, "liveness_interval": 0.02, "failure_threshold": 2},
        ),
    }
    async with infra_for(tmp_path, services) as infra, recording(infra) as recorder:
        first_pid = (await infra.services.status())["svc"].pid
        healthy = False
        await recorder.wait_for("service_unhealthy", "svc")
        await recorder.wait_for("service_restarting", "svc")
        healthy = True
        await recorder.wait_for("service_healthy", "svc")
        with anyio.fail_after(5):
            while (await infra.services.status())["svc"].state is not ServiceState.HEALTHY:
                await anyio.sleep(0.01)
        status = (await infra.services.status())["svc"]
        assert status.restarts == 1
        assert status.pid != first_pid


async def test_an_unhealthy_service_with_restart_no_stays_up_and_recovers(tmp_path: Path) -> None:
    healthy = True

    async def check(status: Any) -> bool:
        return healthy

    services = {
        "svc": service(
            restart="no",
            health={"call": check, "liveness_interval": 0.02, "failure_threshold": 2},
        ),
    }
    async with infra_for(tmp_path, services) as infra, recording(infra) as recorder:
        pid = (await infra.services.status())["svc"].pid
        healthy = False
        await recorder.wait_for("service_unhealthy", "svc")
        await anyio.sleep(0.2)  # probed on, ten times over
        status = (await infra.services.status())["svc"]
        assert (status.state, status.pid) == (ServiceState.UNHEALTHY, pid), status.message
        healthy = True
        await recorder.wait_for("service_healthy", "svc", count=2)
        status = (await infra.services.status())["svc"]
        assert (status.state, status.pid, status.restarts) == (ServiceState.HEALTHY, pid, 0)


async def test_teardown_stops_dependents_before_their_dependencies(tmp_path: Path) -> None:
    services = {
        "a": service(port=True),
        "b": service(port=True, depends_on=["a"]),
        "c": service(port=True, depends_on=["b"]),
        "solo": service(port=True),
    }
    recorder = Recorder()

    async def record(infra: AgentInfra) -> None:
        async for event in infra.stream_events(since=0):  # ends when the instance closes
            if isinstance(event, ServiceEvent):
                recorder.events.append(event)

    async with anyio.create_task_group() as tg, infra_for(tmp_path, services) as infra:
        tg.start_soon(record, infra)
        pids = [s.pid for s in (await infra.services.status()).values()]
        with anyio.fail_after(5):
            while not recorder.events:  # subscribed, and the start replayed
                await anyio.sleep(0.01)
    stopped = [e.service for e in recorder.of("service_stopped")]
    assert sorted(stopped) == ["a", "b", "c", "solo"]
    assert stopped.index("c") < stopped.index("b") < stopped.index("a")
    assert not any(alive(pid) for pid in pids)


async def test_logs_follow_streams_new_lines(tmp_path: Path) -> None:
    script = "i=0; while [ $i -lt 5 ]; do echo tick $i; i=$((i+1)); sleep 0.05; done; sleep 1000"
    services = {"ticker": {"command": ["sh", "-c", script]}}
    async with infra_for(tmp_path, services) as infra:
        seen = []
        with anyio.fail_after(5):
            async for line in infra.services.logs("ticker", follow=True):
                seen.append(line)
                if len(seen) == 5:
                    break
        assert seen == [f"tick {i}" for i in range(5)]
        assert [line async for line in infra.services.logs("ticker", tail=2)] == [
            "tick 3",
            "tick 4",
        ]


async def test_a_follower_gets_the_last_lines_of_a_service_that_ended_while_it_read(
    tmp_path: Path,
) -> None:
    # The follower is still handling "first" when the service prints its
    # last line and ends: that line (often the error that says why) was
    # dropped, the follower ending as soon as it saw the log closed.
    gate = tmp_path / "gate"
    script = f"echo first; while [ ! -e {gate} ]; do sleep 0.01; done; echo last"
    services = {"job": {"command": ["sh", "-c", script], "restart": "no"}}
    async with infra_for(tmp_path, services) as infra:
        seen = []
        with anyio.fail_after(10):
            async for line in infra.services.logs("job", follow=True):
                seen.append(line)
                if line == "first":
                    gate.touch()
                    completed = ServiceState.COMPLETED  # it printed "last", and ended
                    while (await infra.services.status(["job"]))["job"].state != completed:
                        await anyio.sleep(0.01)
        assert seen == ["first", "last"]


async def test_following_a_service_that_is_not_running_ends_with_what_is_buffered(
    tmp_path: Path,
) -> None:
    services = {
        "idle": {"command": ["sleep", "1000"], "autostart": False},
        "broken": {
            "command": "echo oops; exit 3",
            "shell": True,
            "health": {"log": "ready"},
            "start_retries": 0,
            "autostart": False,
        },
    }
    async with infra_for(tmp_path, services) as infra:
        with anyio.fail_after(10):
            assert [line async for line in infra.services.logs("idle", follow=True)] == []
            with pytest.raises(ServiceStartError):
                await infra.services.start(["broken"])
            lines = [line async for line in infra.services.logs("broken", follow=True)]
        assert lines == ["oops"]


async def test_a_free_port_is_never_one_that_another_service_has_fixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two free ports make the whole range the allocator draws from; one of
    # them is fixed for a service that is not running (so it is free too).
    while True:
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            low = first.getsockname()[1]
            with contextlib.suppress(OSError):
                second.bind(("127.0.0.1", low + 1))
                break
    monkeypatch.setattr(ports, "_LOWEST", low)
    monkeypatch.setattr(ports, "_ephemeral_start", lambda: low + 2)
    services = {
        "fixed": {"command": ["sleep", "1000"], "ports": {"main": low}, "autostart": False},
        "auto": {"command": ["sleep", "1000"], "ports": {"a": 0, "b": 0}},
    }
    async with infra_for(tmp_path, services) as infra:
        given = (await infra.services.status())["auto"].ports
    assert low not in given.values()
    assert low + 1 in given.values()


async def test_stopping_and_restarting_a_service_by_name(tmp_path: Path) -> None:
    services = {"kv": service(port=True), "api": service(port=True, depends_on=["kv"])}
    async with infra_for(tmp_path, services) as infra:
        old = (await infra.services.status())["api"]
        await infra.services.stop(["api"])
        assert (await infra.services.status())["api"].state is ServiceState.STOPPED
        assert not alive(old.pid)
        assert (await infra.services.status())["kv"].state is ServiceState.HEALTHY
        result = await infra.services.start(["api"])
        assert result["api"].state is ServiceState.HEALTHY
        assert result["api"].pid != old.pid


async def _listed(state_dir: Path, depends_on: dict[str, list[str]]) -> list[str]:
    services = {
        name: {"command": ["true"], "depends_on": deps} for name, deps in depends_on.items()
    }
    async with AgentInfra.start(
        {"infra": {"autostart": False}, "services": services}, state_dir=state_dir
    ) as infra:
        listed = infra.services.list()
        assert list(await infra.services.status()) == listed
    return listed


def test_services_are_listed_after_what_they_depend_on(tmp_path: Path) -> None:
    # app needs db and cache, db needs cache: a walk of app's dependencies
    # meets cache first, then db, and listed them backwards.
    depends_on = {"app": ["db", "cache"], "db": ["cache"], "cache": []}
    assert anyio.run(_listed, tmp_path / "state", depends_on) == ["cache", "db", "app"]


@st.composite
def dependency_graphs(draw: st.DrawFn) -> dict[str, list[str]]:
    """Acyclic ``depends_on`` lists, in any order, among names sorted in any order."""
    names = draw(st.permutations(["a", "b", "c", "d", "e", "f"]))
    size = draw(st.integers(1, len(names)))
    return {
        name: [names[j] for j in draw(st.lists(st.integers(0, i - 1), unique=True))] if i else []
        for i, name in enumerate(names[:size])
    }


@settings(max_examples=40, deadline=None)
@given(depends_on=dependency_graphs())
def test_every_service_is_listed_after_all_it_depends_on(
    tmp_path_factory: pytest.TempPathFactory, depends_on: dict[str, list[str]]
) -> None:
    listed = anyio.run(_listed, tmp_path_factory.mktemp("state"), depends_on)
    assert sorted(listed) == sorted(depends_on)
    for name, deps in depends_on.items():
        assert all(listed.index(dep) < listed.index(name) for dep in deps), listed


async def test_unknown_service_names_are_refused_and_change_nothing(tmp_path: Path) -> None:
    async with infra_for(tmp_path, {"kv": service(port=True)}) as infra:
        before = await infra.services.status()
        with pytest.raises(UnknownService, match=r"'nope'.*configured: kv"):
            await infra.services.start(["nope"])
        with pytest.raises(UnknownService):
            await infra.services.stop(["kv", "nope"])
        after = await infra.services.status()
        assert after == before


async def test_an_instance_is_used_once_and_refuses_use_after_close(tmp_path: Path) -> None:
    infra = infra_for(tmp_path, {})
    with pytest.raises(InfraClosed, match="unopened"):
        await infra.health_check()
    async with infra:
        assert (await infra.health_check()).healthy
    with pytest.raises(InfraClosed, match="closed"):
        await infra.services.status()
    with pytest.raises(InfraClosed, match="entered once"):
        await infra.__aenter__()


async def test_event_sequence_numbers_increase_and_replay_with_since(tmp_path: Path) -> None:
    async with infra_for(tmp_path, {"kv": service(port=True)}) as infra:
        replayed: list[Event] = []
        with anyio.move_on_after(0.5):
            async for event in infra.stream_events(since=0):
                replayed.append(event)  # noqa: PERF401 - the list must survive the cancellation
        seqs = [e.seq for e in replayed]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert [e.type for e in replayed] == [
            "service_starting",
            "service_healthy",
        ]


async def test_a_server_that_exits_0_before_its_probe_passed_is_a_start_failure(
    tmp_path: Path,
) -> None:
    services = {
        "daemonizes": {
            "command": ["true"],
            "ports": {"main": 0},
            "health": {"tcp": "{port}"},
            "start_retries": 0,
        },
        "app": service(depends_on=["daemonizes"]),
    }
    with pytest.raises(ServiceStartError, match="exited with code 0 before becoming healthy"):
        async with infra_for(tmp_path, services):
            pass


async def test_a_missing_working_directory_is_named(tmp_path: Path) -> None:
    services = {"job": {"command": ["true"], "cwd": str(tmp_path / "nowhere"), "start_retries": 0}}
    with pytest.raises(ServiceStartError, match=r"working directory .*nowhere.* does not exist"):
        async with infra_for(tmp_path, services):
            pass


async def test_a_backend_object_replaces_the_configured_one(tmp_path: Path) -> None:
    class Mine(LocalBackend):
        def __init__(self) -> None:
            super().__init__()
            self.launched: list[str] = []

        @property
        def name(self) -> str:
            return "mine"

        async def launch(self, spec: LaunchSpec) -> Any:
            self.launched.append(spec.name)
            return await super().launch(spec)

    backend = Mine()
    services = {"kv": service(port=True)}
    async with AgentInfra.start({"services": services}, state_dir=tmp_path, backend=backend):
        assert backend.launched == ["kv"]


async def test_a_launch_that_cannot_be_recorded_is_stopped_not_leaked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Unrecorded, a crash of this program would leave it running for good.
    marker = unique_seconds()
    services = {"worker": {"command": ["sleep", marker], "start_retries": 0}}

    def disk_full(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Ledger, "launched", disk_full)
    started = time.monotonic()
    with pytest.raises(ServiceStartError, match=r"cannot record its launch.*No space left"):
        await infra_for(tmp_path, services).__aenter__()
    assert time.monotonic() - started < 5, "it was waited for, not stopped"
    assert running_with(marker) == []


async def test_what_a_service_prints_while_it_stops_is_in_its_log(tmp_path: Path) -> None:
    job = {
        "command": "trap 'echo got-term; exit 0' TERM; echo up; while true; do sleep 0.05; done",
        "shell": True,
        "health": {"log": "^up$"},
    }
    async with infra_for(tmp_path, {"job": job}) as infra:
        await infra.services.stop(["job"])
        lines = [line async for line in infra.services.logs("job")]
        assert lines[0] == "up"
        assert lines[-1] == "got-term", lines  # the shell may say its sleep was "Terminated"


async def test_a_started_dependency_does_not_wait_for_its_health(tmp_path: Path) -> None:
    services = {
        # Healthy only after 2 s; "started" as soon as it runs.
        "dep": {
            "command": "sleep 2; echo ready; sleep 1000",
            "shell": True,
            "health": {"log": "ready"},
        },
        "app": {"command": ["sleep", "1000"], "depends_on": {"dep": {"condition": "started"}}},
    }
    async with infra_for(tmp_path, services) as infra, recording(infra) as recorder:
        pass
    starting = recorder.first("service_starting", "app")
    healthy = recorder.first("service_healthy", "dep")
    assert starting.seq < healthy.seq, "app waited for dep's health"


@pytest.mark.parametrize(
    ("api_delay", "broken_after", "order"),
    [(0.0, 2.0, ["api", "broken"]), (1.5, 0.3, ["broken", "api"])],
    ids=["other-up-first", "other-still-starting"],
)
async def test_a_failed_start_leaves_a_shared_dependency_to_the_start_beside_it(
    tmp_path: Path, api_delay: float, broken_after: float, order: list[str]
) -> None:
    # Two starts at once (as tasks that need different services make them)
    # share a dependency; the one that fails must not stop it under the other,
    # whether the other is up already or still starting.
    services = {
        "kv": service(port=True),
        "broken": service(
            "--exit-after",
            str(broken_after),
            "--code",
            "3",
            depends_on=["kv"],
            start_retries=0,
            ports={"main": 0},
            health={"tcp": "{port}"},
        ),
        "api": service("--delay", str(api_delay), port=True, depends_on=["kv"]),
    }
    async with infra_for(tmp_path, services, autostart=False) as infra:
        outcome: dict[str, object] = {}

        async def start(name: str) -> None:
            try:
                outcome[name] = (await infra.services.start([name]))[name].state
            except ServiceStartError as exc:
                outcome[name] = exc.service

        async with anyio.create_task_group() as tg:
            tg.start_soon(start, "broken")
            tg.start_soon(start, "api")
        assert list(outcome) == order
        assert outcome == {"broken": "broken", "api": ServiceState.HEALTHY}
        status = await infra.services.status()
        assert status["kv"].state is ServiceState.HEALTHY
        assert status["api"].state is ServiceState.HEALTHY
        assert status["broken"].state is ServiceState.FAILED


def sleeper(**fields: Any) -> dict[str, Any]:
    """A service that runs until stopped, as one process its test can tell apart."""
    return {"command": f"exec sleep {unique_seconds()}", "shell": True, **fields}


SAYS_BYE = """
import signal, sys, time
def bye(*_):
    print("bye", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
print("up", flush=True)
while True:
    time.sleep(1)
"""


async def test_a_stopped_service_that_was_paused_still_gets_to_clean_up(tmp_path: Path) -> None:
    # SIGSTOPped (a debugger, ^Z), it held the SIGTERM pending, never ran its
    # handler, and was SIGKILLed after stop_timeout.
    services = {
        "svc": {
            "command": [sys.executable, "-c", SAYS_BYE],
            "health": {"log": "^up$"},
            "stop_timeout": 10,
        }
    }
    async with infra_for(tmp_path, services) as infra:
        pid = (await infra.services.status())["svc"].pid
        assert pid is not None
        os.kill(int(pid), signal.SIGSTOP)
        started = time.monotonic()
        await infra.services.stop(["svc"])
        assert time.monotonic() - started < 5
        assert "bye" in [line async for line in infra.services.logs("svc")]


async def test_a_python_service_that_does_not_flush_is_read_as_it_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Python block-buffers a piped stdout: unless told not to, "up" would
    # wait in its buffer, and the log probe for it until its deadline.
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # as most users run
    script = "import time; print('up'); time.sleep(1000)"
    services = {
        "svc": {
            "command": [sys.executable, "-c", script],
            "health": {"log": "^up$", "deadline": 5},
            "start_retries": 0,
        }
    }
    async with infra_for(tmp_path, services) as infra:
        assert (await infra.services.status())["svc"].state is ServiceState.HEALTHY


def stubborn(stop_timeout: float, **fields: Any) -> dict[str, Any]:
    """A service that ignores SIGTERM: its stop takes ``stop_timeout``, a window to act in.

    Healthy once its trap is set: a SIGTERM before that, as on a loaded
    machine, would end it at once and close the window.
    """
    return {
        "command": "trap '' TERM; echo ready; while true; do sleep 0.05; done",
        "shell": True,
        "stop_timeout": stop_timeout,
        "health": {"log": "^ready$"},
        **fields,
    }


async def until_state(infra: AgentInfra, name: str, state: ServiceState) -> None:
    with anyio.fail_after(5):
        while (await infra.services.status())[name].state is not state:
            await anyio.sleep(0.01)


async def test_a_start_during_a_stop_starts_the_service_again(tmp_path: Path) -> None:
    async with infra_for(tmp_path, {"svc": stubborn(0.5)}) as infra:
        old = (await infra.services.status())["svc"].pid
        async with anyio.create_task_group() as tg:
            tg.start_soon(infra.services.stop, ["svc"])
            await until_state(infra, "svc", ServiceState.STOPPING)
            result = await infra.services.start(["svc"])
        assert result["svc"].state is ServiceState.HEALTHY
        assert result["svc"].pid != old
        assert not alive(old)


async def test_a_service_started_again_during_a_longer_stop_counts_as_up(
    tmp_path: Path,
) -> None:
    # x is started again while the stop that stopped it still waits for y:
    # a later start finds x up, without waiting for anything.
    services = {"x": sleeper(), "y": stubborn(2)}
    async with infra_for(tmp_path, services) as infra:
        async with anyio.create_task_group() as tg:
            tg.start_soon(infra.services.stop, ["x", "y"])
            await until_state(infra, "y", ServiceState.STOPPING)
            first = await infra.services.start(["x"])
            assert first["x"].state is ServiceState.RUNNING
            with anyio.fail_after(1):
                second = await infra.services.start(["x"])
            assert (await infra.services.status())["y"].state is ServiceState.STOPPING
        assert second["x"].pid == first["x"].pid
        assert (await infra.services.status())["x"].state is ServiceState.RUNNING


async def test_a_dependency_that_ends_while_its_stop_waits_is_started_again(
    tmp_path: Path,
) -> None:
    # kv's stop waits for api's; kv ends by itself meanwhile, and is started
    # again: the stop, when its turn comes, must not stop the new kv.
    services = {
        "kv": sleeper(restart="no"),
        "api": stubborn(1.5, depends_on=["kv"]),
    }
    async with infra_for(tmp_path, services) as infra:
        old = (await infra.services.status())["kv"].pid
        assert old is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(infra.services.stop, ["api", "kv"])
            await until_state(infra, "api", ServiceState.STOPPING)
            os.killpg(int(old), signal.SIGKILL)
            await until_state(infra, "kv", ServiceState.FAILED)
            result = await infra.services.start(["kv"])
        assert result["kv"].state is ServiceState.RUNNING
        status = await infra.services.status()
        assert status["kv"].state is ServiceState.RUNNING
        assert status["kv"].pid == result["kv"].pid != old
        assert alive(status["kv"].pid)


async def test_a_port_that_another_program_listens_on_is_a_start_failure(
    tmp_path: Path,
) -> None:
    # The probe would reach the other program and pass while the service,
    # unable to bind, exits: it must not be reported up.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        services = {"web": service(port=True, ports={"main": port}, start_retries=0)}
        with pytest.raises(ServiceStartError, match=rf"port {port} \(main\) is already in use"):
            async with infra_for(tmp_path, services):
                pass


async def test_a_failed_start_stops_a_dependency_after_a_dependent_being_stopped(
    tmp_path: Path,
) -> None:
    # api, which depends on kv, is being stopped when a failed start that
    # launched kv again stops what it launched: api does not keep kv running,
    # and kv stops only once api has.
    services = {
        "kv": sleeper(restart="no"),
        "api": stubborn(1, depends_on=["kv"]),
        "broken": service(
            "--exit-after",
            "0.2",
            "--code",
            "3",
            depends_on=["kv"],
            start_retries=0,
            ports={"main": 0},
            health={"tcp": "{port}"},
        ),
    }
    async with (
        infra_for(tmp_path, services, autostart=False) as infra,
        recording(infra) as recorder,
    ):
        await infra.services.start(["api"])
        kv = (await infra.services.status())["kv"].pid
        assert kv is not None
        os.killpg(int(kv), signal.SIGKILL)
        await until_state(infra, "kv", ServiceState.FAILED)
        async with anyio.create_task_group() as tg:
            tg.start_soon(infra.services.stop, ["api"])
            await until_state(infra, "api", ServiceState.STOPPING)
            with pytest.raises(ServiceStartError) as failed:
                await infra.services.start(["broken"])
        assert failed.value.service == "broken"
        status = await infra.services.status()
        assert status["kv"].state is ServiceState.STOPPED
        assert recorder.first("service_stopped", "api").seq < (
            recorder.first("service_stopped", "kv").seq
        )


async def test_a_start_during_the_teardown_raises_infra_closed(tmp_path: Path) -> None:
    # What it started would outlive the teardown's stop, which it waits for.
    outcome: list[BaseException] = []
    async with (
        anyio.create_task_group() as tg,
        infra_for(tmp_path, {"svc": stubborn(0.5)}) as infra,
    ):
        services = infra.services

        async def start_during_teardown() -> None:
            while (await services.status())["svc"].state is not ServiceState.STOPPING:
                await anyio.sleep(0.01)
            with anyio.fail_after(5), pytest.raises(InfraClosed) as closed:
                await services.start(["svc"])
            outcome.append(closed.value)

        tg.start_soon(start_during_teardown)
    assert "closing" in str(outcome[0])
    assert (await services.status())["svc"].state is ServiceState.STOPPED


async def test_a_stop_does_not_wait_for_a_dependent_whose_own_stop_was_given_up(
    tmp_path: Path,
) -> None:
    # stop(api, web) is given up while web (ignoring SIGTERM) stops, before api
    # was asked to stop; a stop(kv) meanwhile waited for api for ever.
    services = {
        "kv": {"command": "exec sleep 1000", "shell": True},
        "api": {"command": "exec sleep 1000", "shell": True, "depends_on": ["kv"]},
        "web": stubborn(3, depends_on=["api"]),
    }
    async with infra_for(tmp_path, services) as infra:

        async def given_up() -> None:
            with anyio.move_on_after(0.5):
                await infra.services.stop(["api", "web"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(given_up)
            await until_state(infra, "web", ServiceState.STOPPING)
            with anyio.fail_after(5):
                await infra.services.stop(["kv"])
        assert (await infra.services.status())["kv"].state is ServiceState.STOPPED


async def test_a_start_right_after_a_given_up_stop_starts_the_service_again(
    tmp_path: Path,
) -> None:
    # The stop() is given up while svc, ignoring SIGTERM, still stops: the
    # start() that follows at once waits for that stop to end, then starts
    # svc again, rather than report it "stopped" (or see it stop under it).
    async with infra_for(tmp_path, {"svc": stubborn(1)}) as infra:
        old = (await infra.services.status())["svc"].pid
        async with anyio.create_task_group() as tg:
            tg.start_soon(infra.services.stop, ["svc"])
            await until_state(infra, "svc", ServiceState.STOPPING)
            tg.cancel_scope.cancel()
        assert (await infra.services.status())["svc"].state is ServiceState.STOPPING
        with anyio.fail_after(5):
            result = await infra.services.start(["svc"])
        assert result["svc"].state is ServiceState.HEALTHY
        assert result["svc"].pid != old
        assert not alive(old)
        status = (await infra.services.status())["svc"]
        assert (status.state, status.pid) == (ServiceState.HEALTHY, result["svc"].pid)


async def test_a_dependency_stops_after_a_dependent_whose_given_up_stop_goes_on(
    tmp_path: Path,
) -> None:
    # stop(api) is given up once it asked api (ignoring SIGTERM) to stop: api
    # goes on stopping, and a stop(kv) then waits for it, as for a dependent
    # that this stop stops itself.
    services = {
        "kv": sleeper(),
        "api": stubborn(1, depends_on=["kv"]),
    }
    async with infra_for(tmp_path, services) as infra, recording(infra) as recorder:
        async with anyio.create_task_group() as tg:
            tg.start_soon(infra.services.stop, ["api"])
            await until_state(infra, "api", ServiceState.STOPPING)
            tg.cancel_scope.cancel()
        with anyio.fail_after(5):
            await infra.services.stop(["kv"])
        status = await infra.services.status()
        assert (status["api"].state, status["kv"].state) == (ServiceState.STOPPED,) * 2
        await recorder.wait_for("service_stopped", "kv")
        assert recorder.first("service_stopped", "api").seq < (
            recorder.first("service_stopping", "kv").seq
        )


async def test_a_stop_stops_a_service_after_its_indirect_dependents_and_leaves_others(
    tmp_path: Path,
) -> None:
    # c depends on a through b (and may reach a: {services.a.port}). stop(a, c)
    # stops a once c has stopped, leaves b, which is not named, running (as
    # `docker compose stop a c` does), and returns once a and c have stopped.
    services = {
        "a": sleeper(),
        "b": sleeper(depends_on=["a"]),
        "c": stubborn(1, depends_on=["b"]),
    }
    async with infra_for(tmp_path, services) as infra, recording(infra) as recorder:
        before = await infra.services.status()
        await infra.services.stop(["a", "c"])
        status = await infra.services.status()
        assert {n: s.state for n, s in status.items()} == {
            "a": ServiceState.STOPPED,
            "b": ServiceState.RUNNING,
            "c": ServiceState.STOPPED,
        }
        assert not alive(before["a"].pid)
        assert not alive(before["c"].pid)
        assert status["b"].pid == before["b"].pid
        assert alive(status["b"].pid)
        await recorder.wait_for("service_stopped", "a")
        assert recorder.first("service_stopped", "c").seq < (
            recorder.first("service_stopping", "a").seq
        )


async def test_an_override_switches_the_kind_of_a_services_probe(tmp_path: Path) -> None:
    # The base's tcp probe would never pass (nothing listens on port 1); the
    # override's http probe replaces it (not "found: tcp, http"), and the
    # base's deadline stays.
    url = "http://127.0.0.1:{port}/"
    web = {
        "command": [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"],
        "cwd": str(tmp_path),
        "ports": {"main": 0},
        "health": {"tcp": "127.0.0.1:1", "deadline": 5},
    }
    infra = AgentInfra.start(
        {"services": {"web": web}},
        state_dir=tmp_path / "state",
        services={"web": {"health": {"http": url}}},
    )
    assert infra.config.services["web"].health == Probe(http=url, deadline=5)
    async with infra:
        status = (await infra.services.status())["web"]
        assert status.state is ServiceState.HEALTHY
        await infra.services.stop(["web"])
        assert not alive(status.pid)


async def test_a_service_waits_for_a_dependency_that_went_down_while_it_waited_for_another(
    tmp_path: Path,
) -> None:
    # api needs kv and db healthy. kv was healthy, then crashed and is backing
    # off before its restart; db became healthy meanwhile: api was launched
    # then, with kv down, since a condition met once was never looked at again.
    db_ready = anyio.Event()

    async def db_probe(status: Any) -> bool:
        return db_ready.is_set()

    services = {
        "kv": service(
            port=True,
            restart="on-failure",
            restart_backoff={"initial": 1.0, "max": 1.0, "jitter": 0},
        ),
        "db": {"command": ["sleep", unique_seconds()], "health": {"call": db_probe}},
        "api": {"command": ["sleep", unique_seconds()], "depends_on": ["kv", "db"]},
    }
    infra = infra_for(tmp_path, services, autostart=False)
    async with infra, recording(infra) as recorder, anyio.create_task_group() as tg:
        tg.start_soon(infra.services.start, ["api"])
        await recorder.wait_for("service_healthy", "kv")
        pid = (await infra.services.status())["kv"].pid
        assert pid is not None
        os.kill(int(pid), signal.SIGKILL)
        await recorder.wait_for("service_restarting", "kv")
        db_ready.set()
        await recorder.wait_for("service_started", "api")
        kv_back = recorder.of("service_healthy", "kv")
        assert len(kv_back) == 2, "api was launched while kv was restarting"
        assert kv_back[1].seq < recorder.first("service_starting", "api").seq


async def test_a_stop_while_a_failed_attempt_is_stopped_neither_restarts_nor_fails_it(
    tmp_path: Path,
) -> None:
    # The attempt missed its probe's deadline and is being stopped (its
    # process takes its time over SIGTERM) when the user stops the service:
    # it was then reported "restarting" (or "failed"), though it was stopped
    # on request and would not be launched again.
    stubborn = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: print('term', flush=True))\n"
        "time.sleep(1000)\n"
    )
    services = {
        "job": {
            "command": [sys.executable, "-c", stubborn],
            "health": {"log": "never", "deadline": 0.2},
            "start_retries": 1,
            "stop_timeout": 1.0,
        }
    }
    infra = infra_for(tmp_path, services, autostart=False)
    async with infra, recording(infra) as recorder, anyio.create_task_group() as tg:

        async def start() -> None:
            with pytest.raises(ServiceStartError, match="is stopped"):
                await infra.services.start(["job"])

        tg.start_soon(start)
        with anyio.fail_after(10):
            await recorder.wait_for("service_starting", "job")
            async for line in infra.services.logs("job", follow=True):
                if line == "term":  # the failed attempt is being stopped
                    break
        await infra.services.stop(["job"])
        assert (await infra.services.status())["job"].state is ServiceState.STOPPED
        await recorder.wait_for("service_stopped", "job")
        types = [e.type for e in recorder.events if e.service == "job"]
        assert types == ["service_starting", "service_stopping", "service_stopped"]


def leaves_a_child(gate: Path, **fields: Any) -> dict[str, Any]:
    """A service whose main process exits 3 once ``gate`` exists, leaving a child
    that ignores SIGTERM: what is left of it takes ``stop_timeout`` to stop."""
    script = (
        "trap '' TERM; (while true; do sleep 0.05; done) & echo ready; "
        f"while [ ! -e {gate} ]; do sleep 0.02; done; exit 3"
    )
    return {"command": script, "shell": True, "health": {"log": "^ready$"}, **fields}


@pytest.mark.parametrize(
    ("restart", "then"), [("on-failure", ServiceState.RESTARTING), ("no", ServiceState.FAILED)]
)
async def test_a_service_whose_main_process_exited_is_not_healthy_while_its_group_is_stopped(
    tmp_path: Path, restart: str, then: ServiceState
) -> None:
    # Its group's stop lasts stop_timeout (the child ignores SIGTERM): the
    # service was reported healthy all that time, though its process was gone.
    gate = tmp_path / "gate"
    services = {"svc": leaves_a_child(gate, restart=restart, stop_timeout=8)}
    async with infra_for(tmp_path, services) as infra:
        pid = (await infra.services.status())["svc"].pid
        gate.touch()
        await until_state(infra, "svc", then)
        status = (await infra.services.status())["svc"]
        assert alive(pid), "its group was gone already: nothing shown"
        assert status.exit_code == 3


async def test_a_start_of_a_service_that_failed_while_its_group_is_stopped_launches_it_anew(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    services = {"svc": leaves_a_child(gate, restart="no", stop_timeout=1)}
    async with infra_for(tmp_path, services) as infra:
        old = (await infra.services.status())["svc"].pid
        gate.touch()
        await until_state(infra, "svc", ServiceState.FAILED)
        gate.unlink()
        with anyio.fail_after(10):
            result = await infra.services.start(["svc"])
        assert result["svc"].state is ServiceState.HEALTHY
        assert result["svc"].pid != old
        assert not alive(old)


async def test_a_stop_while_what_is_left_of_an_exited_service_is_stopped_says_so(
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    services = {"svc": leaves_a_child(gate, restart="on-failure", stop_timeout=1)}
    async with infra_for(tmp_path, services) as infra, recording(infra) as recorder:
        gate.touch()
        await until_state(infra, "svc", ServiceState.RESTARTING)
        await infra.services.stop(["svc"])
    types = [e.type for e in recorder.events if e.service == "svc"]
    assert types == [
        "service_starting",
        "service_healthy",
        "service_exited",
        "service_restarting",
        "service_stopping",
        "service_stopped",
    ]


async def test_a_dependency_with_condition_started_is_not_met_while_its_leftovers_are_stopped(
    tmp_path: Path,
) -> None:
    # proxy crashed and is restarting while what is left of it (a child that
    # ignores SIGTERM) is stopped; db became healthy meanwhile: api, which
    # needs proxy "started", was launched then, against a proxy that had ended.
    gate = tmp_path / "gate"
    db_ready = anyio.Event()

    async def db_probe(status: Any) -> bool:
        return db_ready.is_set()

    services = {
        "proxy": leaves_a_child(gate, restart="on-failure", stop_timeout=1.5),
        "db": {"command": ["sleep", unique_seconds()], "health": {"call": db_probe}},
        "api": {
            "command": ["sleep", unique_seconds()],
            "depends_on": {"proxy": {"condition": "started"}, "db": {"condition": "healthy"}},
        },
    }
    infra = infra_for(tmp_path, services, autostart=False)
    async with infra, recording(infra) as recorder, anyio.create_task_group() as tg:
        tg.start_soon(infra.services.start, ["api"])
        await recorder.wait_for("service_healthy", "proxy")
        gate.touch()
        await until_state(infra, "proxy", ServiceState.RESTARTING)
        gate.unlink()  # its next launch stays up
        db_ready.set()
        await recorder.wait_for("service_started", "api")
        proxy_launches = recorder.of("service_starting", "proxy")
        assert len(proxy_launches) == 2, "api was launched while proxy's leftovers were stopped"
        assert proxy_launches[1].seq < recorder.first("service_starting", "api").seq


async def test_a_dependency_with_condition_started_is_not_met_while_a_failed_attempt_is_stopped(
    tmp_path: Path,
) -> None:
    # job's first attempt missed its probe's deadline and is being stopped
    # (it takes its time over SIGTERM), still "starting"; db became healthy
    # meanwhile: api, which needs job "started", was launched against it.
    gate = tmp_path / "gate"
    script = (
        "import os, signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: print('term', flush=True))\n"
        f"if os.path.exists({str(gate)!r}): print('ready', flush=True)\n"
        "while True: time.sleep(1000)\n"
    )
    db_ready = anyio.Event()

    async def db_probe(status: Any) -> bool:
        return db_ready.is_set()

    services = {
        "job": {
            "command": [sys.executable, "-c", script],
            "health": {"log": "^ready$", "deadline": 0.3},
            "start_retries": 1,
            "stop_timeout": 1.5,
        },
        "db": {"command": ["sleep", unique_seconds()], "health": {"call": db_probe}},
        "api": {
            "command": ["sleep", unique_seconds()],
            "depends_on": {"job": {"condition": "started"}, "db": {"condition": "healthy"}},
        },
    }
    infra = infra_for(tmp_path, services, autostart=False)
    async with infra, recording(infra) as recorder, anyio.create_task_group() as tg:
        tg.start_soon(infra.services.start, ["api"])
        await recorder.wait_for("service_starting", "job")
        with anyio.fail_after(10):
            async for line in infra.services.logs("job", follow=True):
                if line == "term":  # the failed attempt is being stopped
                    break
        gate.touch()  # its next attempt becomes ready
        db_ready.set()
        await recorder.wait_for("service_started", "api")
        job_launches = recorder.of("service_starting", "job")
        assert len(job_launches) == 2, "api was launched while job's failed attempt was stopped"
        assert job_launches[1].seq < recorder.first("service_starting", "api").seq


async def test_a_stop_that_fails_after_the_verdict_leaves_the_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The service exited 3 with restart = "no": it failed, then stopping what
    # was left of it raised (a daemon gone away). It was failed a second time,
    # as "internal error", and counted as a failed start, though it had started.
    real_stop = LocalProcess.stop

    async def stop_then_raise(self: LocalProcess, grace: float) -> int:
        await real_stop(self, grace)
        raise BackendUnavailable("the daemon went away")

    monkeypatch.setattr(LocalProcess, "stop", stop_then_raise)
    services = {"svc": service("--exit-after", "0.3", "--code", "3", port=True, restart="no")}
    infra = infra_for(tmp_path, services, autostart=False)
    async with infra, recording(infra) as recorder:
        await infra.services.start(["svc"])
        await until_state(infra, "svc", ServiceState.FAILED)
        await anyio.sleep(0.2)  # the stop's error, once the verdict is out
        status = (await infra.services.status())["svc"]
        metrics = await infra.get_metrics()
    failed = recorder.of("service_failed", "svc")
    assert [e.message for e in failed] == ["exited with code 3"]
    assert status.message == "exited with code 3"
    assert 'dspy_infra_service_starts_total{service="svc",status="failed"}' not in metrics


async def test_a_restart_that_a_stop_prevents_is_not_counted(tmp_path: Path) -> None:
    svc = service(
        "--exit-after",
        "0.3",
        "--code",
        "3",
        port=True,
        restart="on-failure",
        restart_backoff={"initial": 30},
    )
    async with infra_for(tmp_path, {"svc": svc}) as infra:
        await until_state(infra, "svc", ServiceState.RESTARTING)
        await infra.services.stop(["svc"])
        status = (await infra.services.status())["svc"]
        assert status.state is ServiceState.STOPPED
        assert status.restarts == 0, "counted a restart that never came"


@pytest.mark.parametrize("how", ["inprocess", "remote"])
async def test_a_follower_that_falls_behind_is_told_how_many_lines_it_lost(
    tmp_path: Path, how: str
) -> None:
    # It read "0", then the service printed 99 more lines into a buffer of
    # 10 before it read on: it got "91" next, unaware of the lines between.
    # Long lines: more than a server's stream window, so that one serving it
    # falls behind too, instead of reading them all as they come.
    gate = tmp_path / "gate"
    script = (
        "import os, time\n"
        "print(0, flush=True)\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.02)\n"
        "for i in range(1, 100): print(str(i).zfill(2) + 'x' * 60_000)\n"
        "print('end', flush=True)\n"
        "time.sleep(1000)\n"
    )
    services = {
        "svc": {
            "command": [sys.executable, "-c", script],
            "health": {"log": "^0$"},
            "log_lines": 10,
        }
    }
    async with infra_for(tmp_path, services) as infra, used(infra, how) as api:
        lines = api.services.logs("svc", follow=True)
        got: list[str] = []
        async with contextlib.aclosing(lines):
            assert await anext(lines) == "0"
            gate.touch()
            with anyio.fail_after(10):
                while [line async for line in api.services.logs("svc", tail=1)] != ["end"]:
                    await anyio.sleep(0.01)
                while not got or got[-1] != "end":
                    got.append(await anext(lines))
    notices = [line for line in got if isinstance(line, LinesDropped)]
    kept = [int(line[:2]) for line in got[:-1] if not isinstance(line, LinesDropped)]
    assert notices, "lines were lost without a word"
    assert (
        notices[0]
        == f"[dspy-infra: {notices[0].dropped} log lines dropped: read too slowly to keep up]"
    )
    assert sum(n.dropped for n in notices) + len(kept) == 99
    assert kept == sorted(kept)
    assert kept[-9:] == list(range(91, 100))
    if how == "inprocess":
        assert [n.dropped for n in notices] == [90]


@pytest.mark.parametrize("condition", ["started", "healthy"])
async def test_a_dependency_that_exited_is_not_met_while_its_last_output_is_read(
    tmp_path: Path, condition: str
) -> None:
    # db exited 1 (restart = "no"), and a child of it keeps its output open:
    # its verdict waits up to 0.5 s for its last lines, and meanwhile api,
    # started then, was launched against it as if it were still up.
    services = {
        "db": {
            "command": f"sleep {unique_seconds()} & sleep 0.2; echo bye; exit 1",
            "shell": True,
            "restart": "no",
        },
        "api": {
            "command": ["sleep", unique_seconds()],
            "depends_on": {"db": {"condition": condition}},
        },
    }
    infra = infra_for(tmp_path, services, autostart=False)
    async with infra, recording(infra) as recorder:
        await infra.services.start(["db"])
        with anyio.fail_after(10):
            async for line in infra.services.logs("db", follow=True):
                if line == "bye":
                    break
        await anyio.sleep(0.1)  # it has exited; its verdict waits for its output
        with pytest.raises(ServiceStartError):
            await infra.services.start(["api"])
        assert not recorder.of("service_starting", "api"), "api was launched against db"
