"""Metrics, /metrics, /health and /ready over real loopback, with real services and tasks."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from dspy_infra import AgentInfra, ConfigError, load_config
from dspy_infra.config.model import MetricsSettings
from tests.engines import missing_engine
from tests.integration.helpers import service
from tests.unit.test_config_reference import documented, public_fields, real_default

pytestmark = pytest.mark.anyio

PREFIX = "dspy_infra_"
LOOP_LAG = f"{PREFIX}event_loop_lag_seconds"
GPUS_TOTAL_LINT = 'non-counter metrics should not have "_total" suffix'
# Every metric DESIGN.md names, as it appears in the text format.
DESIGN_METRICS = [
    "service_starts_total",
    "service_stops_total",
    "service_start_failures_total",
    "active_services",
    "health_check_duration_seconds",
    "backend_api_duration_seconds",
    "tasks_submitted_total",
    "tasks_finished_total",
    "task_queue_depth",
    "task_wait_seconds",
    "task_duration_seconds",
    "class_concurrency_limit",
    "gpus_total",
    "gpus_in_use",
    "workflow_runs_total",
    "events_dropped_total",
]


async def get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, response.headers["Content-Type"], await response.text()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the text format, or None."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    head = f"{name}{{{wanted}}}" if labels else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == head or (labels and key.startswith(name + "{") and _same(key, head)):
            return float(value)
    return None


def _same(key: str, head: str) -> bool:
    def labels(text: str) -> set[str]:
        return set(text[text.index("{") + 1 : -1].split(","))

    return labels(key) == labels(head)


async def noop(payload: Any) -> Any:
    return payload


def config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "infra": {"state_dir": str(tmp_path / "state"), "gpus": []},
        "metrics": {"address": "127.0.0.1:0", "loop_lag_interval": 0.02},
        "services": {"kv": service(port=True)},
        **extra,
    }


async def test_metrics_health_and_ready_are_served_on_loopback(tmp_path: Path) -> None:
    async with AgentInfra.start(config(tmp_path), handlers={"noop": noop}) as infra:
        address = infra.metrics_address
        assert address is not None
        assert address.startswith("127.0.0.1:")
        assert not address.endswith(":0")
        handles = await infra.submit_tasks("noop", range(5))
        for h in handles:
            await h.result()
        await anyio.sleep(0.1)  # a few loop-lag measurements

        status, content_type, text = await get(f"http://{address}/metrics")
        assert status == 200
        assert content_type.startswith("text/plain; version=")
        for name in DESIGN_METRICS:
            assert f"# TYPE {PREFIX}{name.removesuffix('_total')}" in text, name
        assert sample(text, f"{PREFIX}tasks_submitted_total", task_class="cpu_short") == 5
        assert (
            sample(
                text, f"{PREFIX}tasks_finished_total", task_class="cpu_short", status="succeeded"
            )
            == 5
        )
        assert sample(text, f"{PREFIX}active_services") == 1
        assert sample(text, f"{PREFIX}service_starts_total", service="kv", status="succeeded") == 1
        healthy_checks = sample(
            text, f"{PREFIX}health_check_duration_seconds_count", service="kv", status="healthy"
        )
        assert healthy_checks is not None
        assert healthy_checks >= 1
        launches = sample(
            text,
            f"{PREFIX}backend_api_duration_seconds_count",
            backend="local",
            operation="launch",
            status="ok",
        )
        assert launches == 1
        lag = sample(text, LOOP_LAG)
        assert lag is not None
        assert 0 <= lag < 1

        # get_metrics() returns the same values.
        values = await infra.get_metrics()
        assert values['dspy_infra_service_starts_total{service="kv",status="succeeded"}'] == 1
        assert values["dspy_infra_active_services"] == 1

        status, content_type, text = await get(f"http://{address}/health")
        assert status == 200
        assert content_type.startswith("application/json")
        import json  # noqa: PLC0415

        health = json.loads(text)
        assert health["status"] == "healthy"
        assert health["services"]["kv"]["state"] == "healthy"
        assert health["scheduler"]["classes"]["cpu_short"]["limit"] == 64
        assert health["scheduler"]["gpus_total"] == 0

        status, _, text = await get(f"http://{address}/ready")
        assert (status, json.loads(text)["ready"]) == (200, True)

        await infra.services.stop(["kv"])
        status, _, text = await get(f"http://{address}/ready")
        assert (status, json.loads(text)["ready"]) == (200, True)  # a stopped service is fine
        values = await infra.get_metrics()
        assert values['dspy_infra_service_stops_total{service="kv",status="stopped"}'] == 1
        assert values["dspy_infra_active_services"] == 0
    # Closed: nothing listens any more.
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(f"http://{address}/metrics")


async def test_a_failing_service_is_counted_and_makes_health_503(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        services={
            "flaky": service(
                "--exit-after", "0.3", "--code", "3", port=True, restart="no", start_retries=0
            )
        },
    )
    async with AgentInfra.start(cfg) as infra:
        address = infra.metrics_address
        with anyio.fail_after(10):
            while (await infra.services.status())["flaky"].state.value != "failed":
                await anyio.sleep(0.02)
        status, _, _ = await get(f"http://{address}/health")
        assert status == 503
        status, _, _ = await get(f"http://{address}/ready")
        assert status == 503
        values = await infra.get_metrics()
        assert values['dspy_infra_service_stops_total{service="flaky",status="failed"}'] == 1


async def test_health_and_ready_say_503_while_the_instance_closes(tmp_path: Path) -> None:
    # Requests sent on open connections as the block ends: the endpoint reads
    # them once the instance has begun to close (it set itself closed before
    # its first await), and answers them as unavailable, not as its own bug.
    async with AgentInfra.start(config(tmp_path)) as infra:
        address = infra.metrics_address
        assert address is not None
        host, port = address.rsplit(":", 1)
        streams = {path: await anyio.connect_tcp(host, int(port)) for path in ("/health", "/ready")}
        for path, stream in streams.items():
            request = f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
            await stream.send(request.encode())
    answers = {}
    for path, stream in streams.items():
        async with stream:
            with anyio.fail_after(10):
                response = b"".join([chunk async for chunk in stream])
        head, _, body = response.partition(b"\r\n\r\n")
        answers[path] = int(head.split()[1]), body
    assert {path: code for path, (code, _) in answers.items()} == {"/health": 503, "/ready": 503}
    closing = {"status": "closing", "instance": infra.instance_id}
    assert json.loads(answers["/health"][1]) == closing
    assert json.loads(answers["/ready"][1]) == {"ready": False, "status": "closing"}


async def test_a_start_failure_is_counted_with_its_reason(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        services={
            "dies": service(
                *("--code", "4", "--exit-after", "0"),
                # No --port: nothing ever listens there. Listening, the service
                # passed its probe now and then in the moment before it exited.
                ports={"main": 0},
                health={"tcp": "{port}"},
                start_retries=1,
            ),
        },
    )
    cfg["infra"]["autostart"] = False
    async with AgentInfra.start(cfg) as infra:
        with pytest.raises(Exception, match="exited with code 4"):
            await infra.services.start(["dies"])
        values = await infra.get_metrics()
        failures = 'dspy_infra_service_start_failures_total{reason="exited",service="dies"}'
        assert values[failures] == 2
        assert values['dspy_infra_service_starts_total{service="dies",status="failed"}'] == 2


async def test_a_metrics_address_in_use_is_a_config_error_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = "{}:{}".format(*taken.getsockname())
        cfg = config(tmp_path, metrics={"address": address})
        with pytest.raises(ConfigError) as info:
            async with AgentInfra.start(cfg):
                pass
        assert str(info.value) == (
            f"<mapping>: metrics.address: cannot listen on {address}: Address already in use"
        )
        # Set by an override over the file's address: the override is named.
        with pytest.raises(ConfigError) as info:
            async with AgentInfra.start(config(tmp_path), metrics__address=address):
                pass
        assert str(info.value) == (
            f"override metrics__address=: metrics.address: cannot listen on {address}: "
            "Address already in use"
        )
    # Nothing was left running: the next instance gets the state directory and the port.
    async with AgentInfra.start(cfg) as infra:
        assert infra.metrics_address == address


async def test_an_endpoint_on_a_name_listens_on_each_of_its_addresses_on_one_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Where /etc/hosts gives localhost both 127.0.0.1 and ::1, port 0 gave
    # each address a port of its own: the one reported reached only one.
    resolve = socket.getaddrinfo

    def both(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in ("localhost", b"localhost"):
            return resolve(host, *args, **kwargs)
        return [*resolve("127.0.0.1", *args, **kwargs), *resolve("::1", *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", both)
    async with AgentInfra.start(config(tmp_path, metrics={"address": "localhost:0"})) as infra:
        assert infra.metrics_address is not None
        port = infra.metrics_address.rsplit(":", 1)[1]
        for host in ("127.0.0.1", "[::1]"):
            status, _, _ = await get(f"http://{host}:{port}/health")
            assert status == 200


async def test_no_endpoint_by_default(tmp_path: Path) -> None:
    async with AgentInfra.start(state_dir=tmp_path / "state") as infra:
        assert infra.metrics_address is None
        with anyio.fail_after(5):  # once measured (every 0.5 s by default)
            while LOOP_LAG not in await infra.get_metrics():
                await anyio.sleep(0.05)


async def test_the_loop_lag_has_no_sample_unless_measured(tmp_path: Path) -> None:
    # A 0 would read as "no lag"; Prometheus' way for "not measured" is no sample.
    cfg = config(tmp_path, metrics={"address": "127.0.0.1:0", "loop_lag_interval": 0})
    async with AgentInfra.start(cfg) as infra:
        await anyio.sleep(0.1)
        assert LOOP_LAG not in await infra.get_metrics()
        _, _, text = await get(f"http://{infra.metrics_address}/metrics")
        assert sample(text, LOOP_LAG) is None
        assert f"# TYPE {LOOP_LAG} gauge" in text  # declared all the same


def test_a_remote_address_needs_allow_remote() -> None:
    with pytest.raises(ConfigError, match=r"metrics\.address: '0\.0\.0\.0' is not a loopback"):
        load_config({"metrics": {"address": "0.0.0.0:9464"}}, environ={})
    allowed = load_config(
        {"metrics": {"address": "0.0.0.0:9464", "allow_remote": True}}, environ={}
    )
    assert allowed.metrics.address == "0.0.0.0:9464"
    from_env = load_config(None, environ={"DSPY_INFRA_METRICS__ADDRESS": "[::1]:9464"})
    assert from_env.metrics.address == "[::1]:9464"
    for address in ("9464", "127.0.0.1:²"):  # a digit to str.isdigit(), not to int()
        with pytest.raises(ConfigError, match="expected 'HOST:PORT'"):
            load_config({"metrics": {"address": address}}, environ={})


def test_metrics_settings_are_documented_like_the_other_classes() -> None:
    # The checks of tests/unit/test_config_reference.py, for [metrics].
    rows = documented(MetricsSettings)
    assert list(rows) == [a.name for a in public_fields(MetricsSettings)]
    for attribute in public_fields(MetricsSettings):
        cell = rows[attribute.name][1]
        expected = real_default(attribute)
        if cell == "none":
            assert expected is None
        else:
            assert cell == f"`{str(expected).lower()}`" or cell == f"`{expected!r}`", cell


async def test_promtool_accepts_a_real_scrape(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        missing_engine("promtool", "not on PATH (Debian: apt-get install prometheus)")
    cfg = config(tmp_path)
    async with AgentInfra.start(cfg, handlers={"noop": noop}) as infra:
        for h in await infra.submit_tasks("noop", range(3)):
            await h.result()
        _, _, text = await get(f"http://{infra.metrics_address}/metrics")
    assert promtool is not None
    result = await anyio.run_process(
        [promtool, "check", "metrics"], input=text.encode(), check=False
    )
    stderr = result.stderr.decode()
    # Exit 1: the text does not parse. Exit 3: it parses, with lint remarks. The one
    # remark expected is about a name DESIGN.md fixes as a contract: `gpus_total` is a
    # gauge (the number of GPUs), and the lint wants "_total" on counters only.
    problems = [line for line in stderr.splitlines() if line.strip()]
    assert result.returncode in (0, 3), stderr
    assert problems == (
        [] if result.returncode == 0 else [f"{PREFIX}gpus_total {GPUS_TOTAL_LINT}"]
    ), problems


async def test_the_grafana_dashboard_uses_only_metrics_that_exist(tmp_path: Path) -> None:
    import json  # noqa: PLC0415
    import re  # noqa: PLC0415

    dashboard = Path(__file__).parents[2] / "docs" / "grafana" / "dspy-infra.json"
    text = dashboard.read_text()
    json.loads(text)
    used = set(re.findall(r"dspy_infra_[a-z_]+", text))
    async with AgentInfra.start(config(tmp_path)) as infra:
        exposed = infra.metrics.exposition().decode()
    declared = set(re.findall(r"^# TYPE (dspy_infra_[a-z_]+)", exposed, flags=re.MULTILINE))
    samples = {
        line.split("{")[0].split(" ")[0]
        for line in exposed.splitlines()
        if not line.startswith("#")
    }
    missing = {name for name in used if name not in declared | samples}
    assert not missing, missing


async def test_metrics_address_is_none_once_the_instance_has_closed(tmp_path: Path) -> None:
    # Where the endpoint is served "while the instance is open": a closed
    # instance's address pointed service discovery at a port nothing serves.
    infra = AgentInfra.start(config(tmp_path, services={}))
    async with infra:
        address = infra.metrics_address
        assert address is not None
    assert infra.metrics_address is None
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(f"http://{address}/metrics")


async def test_a_task_given_back_at_close_has_its_wait_observed_once(tmp_path: Path) -> None:
    # task_wait_seconds is the time to the *first* start: a task whose attempt a
    # close gave back had it observed by that instance; the next one, which runs
    # it again, observed it a second time (and as submit-to-now, downtime included).
    cfg = config(tmp_path, services={})
    started = anyio.Event()

    async def hangs(payload: Any) -> Any:
        started.set()
        await anyio.sleep_forever()

    async with AgentInfra.start(cfg, handlers={"work": hangs}) as first:
        handle = await first.submit_task("work", None)
        with anyio.fail_after(10):
            await started.wait()
        values = await first.get_metrics()
        assert values['dspy_infra_task_wait_seconds_count{task_class="cpu_short"}'] == 1
    async with AgentInfra.start(cfg, handlers={"work": noop}) as second:
        async for result in second.stream_task_results([handle.task_id]):
            assert result.type == "task_completed"
        _, _, text = await get(f"http://{second.metrics_address}/metrics")
    assert sample(text, f"{PREFIX}task_wait_seconds_count", task_class="cpu_short") == 0
    assert sample(text, f"{PREFIX}task_duration_seconds_count", task_class="cpu_short") == 1
    finished = sample(
        text, f"{PREFIX}tasks_finished_total", task_class="cpu_short", status="succeeded"
    )
    assert finished == 1


async def test_a_wall_clock_step_does_not_distort_task_wait_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A wall clock stepped (NTP, a resumed VM) while a task waited made its
    # wait an hour longer, or negative, which took the histogram's sum down.
    step = [0.0]
    wall = time.time
    monkeypatch.setattr(time, "time", lambda: wall() + step[0])
    release = anyio.Event()

    async def blocks(payload: Any) -> Any:
        await release.wait()

    cfg = config(tmp_path, services={}, classes={"one": {"max_concurrency": 1}})
    wait = 'dspy_infra_task_wait_seconds_sum{task_class="one"}'
    async with AgentInfra.start(cfg, handlers={"block": blocks, "work": noop}) as infra:
        for moved in (3600.0, -7200.0):  # an hour ahead, then an hour behind the real time
            blocker = await infra.submit_task("block", task_class="one")
            waiter = await infra.submit_task("work", task_class="one")
            step[0] += moved
            release.set()
            await blocker.result()
            await waiter.result()
            release = anyio.Event()
            assert 0 <= (await infra.get_metrics())[wait] < 60


async def test_a_closed_instance_reports_no_task_queued(tmp_path: Path) -> None:
    # Its queued tasks are handed back to the store at close: the registry
    # (read after close, say to push it) still showed them queued, while it
    # showed no GPU in use and no service up.
    async def hangs(payload: Any) -> Any:
        await anyio.sleep_forever()

    cfg = config(tmp_path, services={}, classes={"one": {"max_concurrency": 1}})
    depth = 'dspy_infra_task_queue_depth{task_class="one"}'
    infra = AgentInfra.start(cfg, handlers={"hang": hangs})
    async with infra:
        for _ in range(3):
            await infra.submit_task("hang", task_class="one")
        assert (await infra.get_metrics())[depth] == 2
    assert infra.metrics.values()[depth] == 0


async def test_a_task_lost_at_recovery_with_its_class_gone_is_counted(tmp_path: Path) -> None:
    # A class taken out of the config loses its stored tasks at the next start:
    # the one case where tasks end 'lost' on purpose, and they were counted nowhere.
    cfg = config(tmp_path, services={}, classes={"extra": {"runner": "inprocess"}})
    started = anyio.Event()

    async def hangs(payload: Any) -> Any:
        started.set()
        await anyio.sleep_forever()

    async with AgentInfra.start(cfg, handlers={"work": hangs}) as first:
        handle = await first.submit_task("work", None, task_class="extra")
        with anyio.fail_after(10):
            await started.wait()
    del cfg["classes"]
    async with AgentInfra.start(cfg, handlers={"work": noop}) as second:
        assert (await second.get_task_status(handle.task_id)).state.value == "lost"
        lost = 'dspy_infra_tasks_finished_total{status="lost",task_class="extra"}'
        with anyio.fail_after(10):  # counted once its end is committed
            while lost not in (values := await second.get_metrics()):
                await anyio.sleep(0.02)
        _, _, text = await get(f"http://{second.metrics_address}/metrics")
    assert values[lost] == 1
    assert sample(text, f"{PREFIX}tasks_finished_total", task_class="extra", status="lost") == 1


async def test_a_start_stopped_before_the_service_was_ready_is_counted_as_stopped(
    tmp_path: Path,
) -> None:
    cfg = config(tmp_path, services={"slow": service(health={"log": "never"})})
    cfg["infra"]["autostart"] = False
    async with AgentInfra.start(cfg) as infra, anyio.create_task_group() as tg:

        async def start() -> None:
            with pytest.raises(Exception, match="is stopped"):
                await infra.services.start(["slow"])

        tg.start_soon(start)
        with anyio.fail_after(5):
            while (await infra.services.status())["slow"].state != "starting":
                await anyio.sleep(0.01)
        await infra.services.stop(["slow"])
        values = await infra.get_metrics()
    starts = {k: v for k, v in values.items() if k.startswith("dspy_infra_service_starts_total")}
    assert starts == {'dspy_infra_service_starts_total{service="slow",status="stopped"}': 1}
