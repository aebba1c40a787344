"""The client commands of dspy-infra against a real server on a loopback port.

The server runs in the test's event loop; each command runs as ``main(argv)``
in a worker thread (its own event loop, as from a shell), or as a real
process where the process matters (no server, following until Ctrl-C).
"""

from __future__ import annotations

import inspect
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from dspy_infra import AgentInfra
from dspy_infra.cli import _common, client_cmd, main
from dspy_infra.remote import DEFAULT_ADDRESS, serve
from tests.integration.helpers import serve_without, service

pytestmark = pytest.mark.anyio


async def echo(payload: Any) -> Any:
    return payload


async def sleepy(payload: Any) -> Any:
    await anyio.sleep(60)
    return payload


async def boom(payload: Any) -> Any:
    raise RuntimeError(f"boom: {payload}")


def clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DSPY_INFRA_")}


@pytest.fixture(autouse=True)
def no_developer_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DSPY_INFRA_"):
            monkeypatch.delenv(name)


def start_infra(tmp_path: Path) -> AgentInfra:
    return AgentInfra.start(
        {
            "infra": {},
            # A command: the default class (in-process) cannot run it, cpu_long can.
            "handlers": {"hello": {"command": [sys.executable, "-c", "print(1)"]}},
            "services": {
                "web": service("--say", "hello [x]", "--say", "ready", port=True, autostart=False),
                # Never listens on its port, and exits 3: its probe never passes.
                # Its probe says what is wrong in words that Rich would read as markup.
                "misconfigured": service(
                    health={
                        "command": ["sh", "-c", "echo '[/etc/app.conf] missing'; exit 1"],
                        "deadline": 0.5,
                    },
                    autostart=False,
                    start_retries=0,
                ),
                "broken": service(
                    "--exit-after",
                    "0.2",
                    "--code",
                    "3",
                    ports={"main": 0},
                    health={"tcp": "{port}"},
                    autostart=False,
                    start_retries=0,
                ),
            },
        },
        state_dir=tmp_path / "state",
        handlers={"echo": echo, "sleepy": sleepy, "boom": boom},
    )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[AgentInfra, str]]:
    async with start_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0") as srv:
        yield infra, srv.address


class Cli:
    """``dspy-infra ARGV --address ADDRESS`` in a worker thread; stdout and stderr captured."""

    def __init__(self, address: str, capsys: pytest.CaptureFixture[str]):
        self.address = address
        self._capsys = capsys

    async def __call__(self, *argv: str) -> tuple[int, str, str]:
        self._capsys.readouterr()
        code = await anyio.to_thread.run_sync(main, [*argv, "--address", self.address])
        out, err = self._capsys.readouterr()
        return code, out, err


@pytest.fixture
def cli(server: tuple[AgentInfra, str], capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(server[1], capsys)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_server_is_exit_3_with_a_clear_message(tmp_path: Path) -> None:
    port = free_port()

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dspy_infra.cli", *argv, "--address", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env=clean_environ(),
            check=False,
        )

    for argv in (["status"], ["submit", "echo", "1"], ["events", "-f"], ["logs", "web"]):
        done = run(*argv)
        assert done.returncode == 3, (argv, done.stderr)
        assert done.stdout == ""
        assert done.stderr.startswith(f"error: no dspy-infra server answers at 127.0.0.1:{port}")
        assert "dspy-infra serve" in done.stderr
        # Refused: no server, so no word of TLS (see the TLS server's test for that).
        assert done.stderr.endswith("is `dspy-infra serve` running there?\n")
    # Connected with TLS: nothing of the kind.
    done = run("status", "--tls")
    assert done.returncode == 3, done.stderr
    assert done.stderr.startswith(f"error: no dspy-infra server answers at 127.0.0.1:{port}")
    assert "TLS" not in done.stderr


async def test_submit_task_and_wait(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = await cli("submit", "echo", '{"n": 18446744073709551617}')
    assert (code, err) == (0, "")
    task_id = out.strip()
    assert len(out.splitlines()) == 1

    code, out, _ = await cli("task", task_id, "--wait", "--json")
    assert code == 0
    status = json.loads(out)
    assert status["task_id"] == task_id
    assert (status["state"], status["handler"], status["task_class"]) == (
        "succeeded",
        "echo",
        "cpu_short",
    )
    assert status["result"] == {"n": 2**64 + 1}

    code, out, _ = await cli("task", task_id)
    assert code == 0
    assert task_id in out
    assert "succeeded" in out

    # --wait prints the id, then the result as JSON; - reads the payload from stdin.
    monkeypatch.setattr("sys.stdin", io.StringIO('[1, "two"]'))
    code, out, _ = await cli("submit", "echo", "-", "--wait", "--priority", "3", "--task-id", "t1")
    assert code == 0
    assert out.splitlines() == ["t1", '[1, "two"]']


async def test_a_failed_task_exits_1(cli: Cli) -> None:
    code, out, err = await cli("submit", "boom", '"x"', "--wait")
    assert code == 1
    task_id = out.splitlines()[0]
    assert f"error: task {task_id} failed: " in err
    assert "boom: x" in err
    code, _, _ = await cli("task", task_id, "--wait")
    assert code == 1
    code, _, _ = await cli("task", task_id)
    assert code == 0  # it exists; without --wait the state is not the exit code


async def test_bad_input_exits_2_and_unknown_ids_exit_4(cli: Cli) -> None:
    code, out, err = await cli("submit", "echo", "{not json")
    assert (code, out) == (2, "")
    assert "argument PAYLOAD: the payload is not JSON" in err
    code, _, err = await cli("submit", "echo", "1", "--class", "nope")
    assert code == 2
    assert "unknown task class 'nope'" in err
    # A [handlers] command given to the default class: told to register an
    # in-process function, which a command line user cannot; and where it runs.
    code, _, err = await cli("submit", "hello")
    assert code == 2
    assert "no in-process handler 'hello' is registered" in err
    # cpu_long; gpu where this machine has a GPU, gpu_slurm where Slurm answers.
    offered = re.search(r"; class(?:es)? ('.+') can run it\n", err)
    assert offered is not None, err
    named = re.findall(r"'(\w+)'", offered[1])
    assert "cpu_long" in named, err
    assert set(named) <= {"cpu_long", "gpu", "gpu_slurm"}, err
    code, out, _ = await cli("submit", "hello", "--class", "cpu_long", "--wait")
    assert code == 0, out
    # "t\udcff": the argument t\xff, which is not UTF-8, as Python decodes it.
    for task_id in ("nope", "t\udcff"):
        for argv in (["task", task_id], ["cancel", task_id]):
            code, out, err = await cli(*argv)
            assert (code, out) == (4, "")
            assert f"error: unknown task {task_id!r}" in err
    for argv in (["logs", "nope"], ["start", "nope"], ["start", "web", "nope"], ["stop", "nope"]):
        code, out, err = await cli(*argv)
        assert (code, out) == (4, ""), argv  # the error alone, no table of the services
        assert "unknown service 'nope'" in err


async def test_cancel(cli: Cli, server: tuple[AgentInfra, str]) -> None:
    infra, _ = server
    code, out, _ = await cli("submit", "sleepy")
    task_id = out.strip()
    with anyio.fail_after(5):
        while (await infra.get_task_status(task_id)).state.value != "running":
            await anyio.sleep(0.01)
    code, out, _ = await cli("cancel", task_id)
    assert (code, out) == (0, f"{task_id}: cancelled\n")


async def test_start_status_logs_stop(cli: Cli) -> None:
    code, out, _ = await cli("status")
    assert code == 0
    assert "healthy" in out.splitlines()[0]
    lines = [line.split() for line in out.splitlines()]
    assert ["CLASS", "RUNNER", "LIMIT", "RUNNING", "QUEUED"] in lines
    assert ["cpu_short", "inprocess", "64", "0", "0"] in lines

    code, out, _ = await cli("start", "web")
    assert code == 0, out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert rows == {"web": "healthy", "misconfigured": "inactive", "broken": "inactive"}

    code, out, _ = await cli("status", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["status"] == "healthy"
    assert report["classes"]["cpu_short"] == {
        "runner": "inprocess",
        "limit": 64,
        "adaptive": False,
        "running": 0,
        "queued": 0,
    }
    assert report["services"]["web"]["state"] == "healthy"
    assert report["services"]["web"]["ports"]["main"] > 0

    with anyio.fail_after(5):
        while "ready" not in (await cli("logs", "web"))[1]:
            await anyio.sleep(0.02)
    code, out, _ = await cli("logs", "web")
    # Printed as they are: brackets are the service's text, not markup.
    assert (code, out) == (0, "hello [x]\nready\n")
    assert await cli("logs", "web", "--tail", "1") == (0, "ready\n", "")
    code, out, err = await cli("logs", "web", "--tail", "-1")
    assert (code, out) == (2, "")
    assert "--tail: expected 0 or more, got -1" in err

    code, out, _ = await cli("stop")
    assert code == 0
    assert "stopped" in out
    code, out, _ = await cli("status", "--json")
    assert json.loads(out)["services"]["web"]["state"] == "stopped"


async def test_a_service_that_fails_to_start_exits_1(cli: Cli) -> None:
    code, out, err = await cli("start", "broken")
    assert code == 1
    assert "error: " in err
    assert "broken" in err
    assert "failed" in out
    code, out, _ = await cli("status")
    assert code == 1  # unhealthy
    assert "unhealthy" in out.splitlines()[0]


async def test_service_messages_are_shown_as_they_are(cli: Cli) -> None:
    code, out, err = await cli("start", "misconfigured")
    assert code == 1
    assert "Traceback" not in err
    assert "[/etc/app.conf] missing" in err
    code, out, err = await cli("status")
    assert "Traceback" not in err
    assert "[/etc/app.conf]" in out


async def test_events(cli: Cli) -> None:
    code, out, _ = await cli("submit", "echo", '"e"', "--wait")
    task_id = out.splitlines()[0]
    code, out, _ = await cli("events", "--type", "task_completed", "--json")
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert events
    assert {e["type"] for e in events} == {"task_completed"}
    assert any(e["task_id"] == task_id and e["result"] == "e" for e in events)

    code, out, _ = await cli("events", "--type", "task_queued,task_completed")
    assert code == 0
    assert any(task_id in line and "task_completed" in line for line in out.splitlines())
    last = events[-1]["seq"]
    code, out, _ = await cli("events", "--since", str(last), "--type", "task_completed")
    assert (code, out) == (0, "")


async def test_workflow_events_name_their_run_and_step(
    cli: Cli, server: tuple[AgentInfra, str]
) -> None:
    # They lacked both, as text and as JSON: a step's event could not be told
    # from another run's, nor which step it was.
    infra, _ = server
    workflow = await infra.workflows.create(
        {"name": "one", "steps": {"only": {"handler": "echo", "payload": 1}}}
    )
    run = await infra.workflows.start_run(workflow.workflow_id)
    await run.wait()
    code, out, _ = await cli("events", "--type", "workflow_step_succeeded", "--json")
    assert code == 0
    (event,) = [json.loads(line) for line in out.splitlines()]
    assert (event["run_id"], event["step"], event["workflow_id"]) == (
        run.run_id,
        "only",
        workflow.workflow_id,
    )
    code, out, _ = await cli("events", "--type", "workflow_step_succeeded")
    assert code == 0
    (line,) = out.splitlines()
    assert f"run_id={run.run_id}" in line
    assert "step=only" in line


async def test_events_without_follow_exit_on_a_busy_server(
    cli: Cli, server: tuple[AgentInfra, str]
) -> None:
    infra, _ = server
    await (await infra.submit_task("echo", "held")).result()
    busy_for = 20.0

    async def busy() -> None:  # a task completes every few hundredths of a second
        with anyio.move_on_after(busy_for):
            while True:
                await (await infra.submit_task("echo", "busy")).result()
                await anyio.sleep(0.02)

    async with anyio.create_task_group() as tg:
        tg.start_soon(busy)
        started = time.monotonic()
        code, out, _ = await cli("events", "--type", "task_completed", "--json")
        took = time.monotonic() - started
        tg.cancel_scope.cancel()
    assert code == 0
    assert json.loads(out.splitlines()[0])["result"] == "held"
    # It printed what the server held and ended, while events kept coming:
    # it used to end only after half a second without one.
    assert took < busy_for


async def test_an_event_type_the_server_does_not_publish_is_exit_2(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The command line checks the types it knows; a server that publishes
    # fewer (an older one) refuses the rest, and that is a usage error too.
    monkeypatch.setattr(client_cmd, "check_event_types", lambda types: None)
    code, out, err = await cli("events", "--type", "task_paused")
    assert (code, out) == (2, "")
    assert err.startswith("error: types: unknown event type 'task_paused' (known: ")


async def test_events_are_one_line_each_whatever_they_hold(cli: Cli) -> None:
    # A failed task's error holds what it printed: line breaks, and text
    # that could pass for an event line.
    fake = "two\\n      1 00:00:00.000 task_completed"
    code, _, _ = await cli("submit", "boom", f'"{fake}"', "--wait")
    assert code == 1
    code, out, _ = await cli("events", "--type", "task_failed")
    assert code == 0
    (line,) = out.splitlines()
    assert 'error="RuntimeError: boom: two\\n      1 00:00:00.000 task_completed"' in line


async def test_json_output_writes_a_lone_surrogate_as_its_escape(
    server: tuple[AgentInfra, str],
) -> None:
    # A result may hold a lone surrogate: a file name that is not UTF-8,
    # decoded with surrogateescape as Python decodes file names. UTF-8 cannot
    # write it to stdout (a real one: a test's capture takes anything); its
    # JSON escape can, and reads back as the same value.
    _, address = server
    env = {**clean_environ(), "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}

    async def run(*argv: str) -> tuple[int, list[str]]:
        command = [sys.executable, "-m", "dspy_infra.cli", *argv, "--address", address]
        done = await anyio.run_process(command, env=env, check=False)
        assert done.stderr == b"", done.stderr.decode(errors="replace")
        return done.returncode, done.stdout.decode().splitlines()

    result = {"name": "caf\udcff.txt", "é": "ü"}
    code, lines = await run("submit", "echo", json.dumps(result), "--wait")
    assert code == 0
    task_id, printed = lines
    assert json.loads(printed) == result
    assert "é" in printed  # what UTF-8 writes is written as it is
    code, (status,) = await run("task", task_id, "--json")
    assert code == 0
    assert json.loads(status)["result"] == result
    code, events = await run("events", "--json", "--type", "task_completed")
    assert code == 0
    assert [json.loads(line)["result"] for line in events] == [result]


async def test_events_follow_until_interrupted(server: tuple[AgentInfra, str]) -> None:
    infra, address = server
    argv = ["events", "-f", "--json", "--type", "task_completed", "--address", address]
    command = [sys.executable, "-m", "dspy_infra.cli", *argv]
    async with await anyio.open_process(command, env=clean_environ()) as process:
        assert process.stdout is not None
        try:
            seen = b""
            with anyio.fail_after(30):
                while b"\n" not in seen:
                    await infra.submit_task("echo", "live")
                    with anyio.move_on_after(0.2):
                        seen += await process.stdout.receive()
            event = json.loads(seen.split(b"\n")[0])
            assert (event["type"], event["result"]) == ("task_completed", "live")
            process.send_signal(signal.SIGINT)
            with anyio.fail_after(10):
                assert await process.wait() == 130
        finally:
            if process.returncode is None:
                process.kill()


async def test_token_from_the_environment_or_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with start_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0", token="s3") as srv:
        cli = Cli(srv.address, capsys)
        code, out, err = await cli("status")
        assert (code, out) == (3, "")
        # What a command line user does about it; not what a Python caller would.
        assert err == (
            f"error: the dspy-infra server at {srv.address} refused this client: missing or "
            "wrong token (give its token with --token-file PATH or $DSPY_INFRA_TOKEN)\n"
        )
        token_file = tmp_path / "token"
        token_file.write_text("s3\n")
        assert (await cli("status", "--token-file", str(token_file)))[0] == 0
        monkeypatch.setenv("DSPY_INFRA_TOKEN", "s3")
        assert (await cli("status"))[0] == 0
        monkeypatch.setenv("DSPY_INFRA_TOKEN", "wrong")
        assert (await cli("status"))[0] == 3


async def test_address_from_the_environment(
    server: tuple[AgentInfra, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DSPY_INFRA_ADDRESS", server[1])
    assert await anyio.to_thread.run_sync(main, ["status"]) == 0


def test_bad_local_input_is_exit_2_before_any_connection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens at the address: each is refused before a connection is tried.
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dspy-infra.toml").write_text(f'[infra]\nstate_dir = "{tmp_path / "state"}"\n')
    empty, cert = tmp_path / "empty-token", tmp_path / "cert.pem"
    empty.write_text("\n")
    cert.write_text("not a certificate\n")
    binary = tmp_path / "binary-token"
    binary.write_bytes(b"\xff\xfes3\n")
    refusals = {
        ("submit", "echo", "{"): "argument PAYLOAD: the payload is not JSON",
        # Deeper than Python's JSON decoder recurses: not a traceback.
        ("submit", "echo", "[" * 100_000): (
            "argument PAYLOAD: the payload is not JSON: it is nested too deeply"
        ),
        # Python's JSON decoder takes these, no JSON value is one: they were
        # refused by the server, or with exit 3 where none answered.
        ("submit", "echo", "NaN"): "argument PAYLOAD: the payload is not JSON-compatible (",
        ("submit", "echo", "[1e400]"): "argument PAYLOAD: the payload is not JSON-compatible (",
        # No type at all (an empty shell variable): it printed every event.
        ("events", "--type", ""): "argument --type: expected an event type, got ''",
        ("events", "-f", "--type", " , "): "argument --type: expected an event type, got ' , '",
        # With -f it would wait forever for a type that nothing publishes.
        ("events", "-f", "--type", "task_completed,nope"): (
            "argument --type: unknown event type 'nope' (known: events_dropped, "
        ),
        ("status", "--token-file", str(empty)): f"error: the token file {empty} is empty",
        ("status", "--token-file", str(tmp_path / "none")): "error: cannot read the token file",
        ("status", "--token-file", str(binary)): (
            f"error: cannot read the token file {binary}: not UTF-8 text"
        ),
        ("serve", "--token-file", str(binary)): (
            f"error: cannot read the token file {binary}: not UTF-8 text"
        ),
        ("status", "--tls-ca", str(cert)): "error: cannot load the TLS CA file",
        ("serve", "--tls-cert", str(cert)): "error: give both --tls-cert and --tls-key",
        ("serve", "--tls-cert", str(cert), "--tls-key", str(cert)): (
            "error: cannot load the TLS certificate"
        ),
    }
    for argv, message in refusals.items():
        capsys.readouterr()
        assert main([*argv, "--address", address]) == 2, argv
        out, err = capsys.readouterr()
        assert out == ""
        assert message in err, (argv, err)


def test_a_token_off_loopback_without_tls_says_how_to_connect_with_tls(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # It said "pass tls=...", which no command takes.
    monkeypatch.setenv("DSPY_INFRA_TOKEN", "t")
    assert main(["status", "--address", "192.0.2.1:50052"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: refusing to send the token to 192.0.2.1:50052 without TLS")
    assert "--tls or --tls-ca FILE" in err


def test_an_address_that_is_not_host_port_is_exit_2(tmp_path: Path) -> None:
    # A port of digits that int() does not read ("²" is a digit to
    # str.isdigit) was a ValueError traceback, exit 1.
    (tmp_path / "dspy-infra.toml").write_text(f'[infra]\nstate_dir = "{tmp_path / "state"}"\n')
    for command in ("status", "serve"):
        for address in ("127.0.0.1:\u00b2", "127.0.0.1:99999", "127.0.0.1", "[::1]:"):
            done = subprocess.run(
                [sys.executable, "-m", "dspy_infra.cli", command, "--address", address],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=tmp_path,
                env=clean_environ(),
                check=False,
            )
            assert done.returncode == 2, (command, address, done.stderr)
            assert done.stderr == (
                f"error: expected HOST:PORT (as in {DEFAULT_ADDRESS}), got {address!r}\n"
            )


@pytest.mark.parametrize("variable", [False, True], ids=["file", "variable"])
def test_serve_with_a_state_dir_it_cannot_create_names_the_key(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    variable: bool,
) -> None:
    # It was an OSError from mkdir, shown as a traceback; then named the
    # file, when a variable had set the directory.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file where the directory should go\n")
    toml = "durable = false\n" if variable else 'state_dir = "taken"\ndurable = false\n'
    (tmp_path / "dspy-infra.toml").write_text(f"[infra]\n{toml}")
    if variable:
        monkeypatch.setenv("DSPY_INFRA_STATE_DIR", "taken")
    assert main(["serve", "--address", "127.0.0.1:0"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    blamed = "environment variable DSPY_INFRA_STATE_DIR" if variable else "dspy-infra.toml"
    assert err == (
        f"error: {blamed}: infra.state_dir: cannot create the directory "
        f"{tmp_path / 'taken'}: a file is there\n"
    )


def test_the_default_addresses_agree() -> None:
    # The command line and AgentInfra.connect name it without importing grpc.
    assert _common.DEFAULT_ADDRESS == DEFAULT_ADDRESS
    assert inspect.signature(AgentInfra.connect).parameters["address"].default == DEFAULT_ADDRESS


def test_submit_help_names_the_default_class(capsys: pytest.CaptureFixture[str]) -> None:
    # Only docs/remote.md said so: `submit --help` showed --class without its default.
    default = inspect.signature(AgentInfra.submit_task).parameters["task_class"].default
    assert main(["submit", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {default})" in help_text


async def test_status_against_a_server_older_than_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server from before ListTaskClasses: it answers UNIMPLEMENTED.
    serve_without(monkeypatch, "/orchestrator.v1.Orchestrator/ListTaskClasses")
    async with start_infra(tmp_path) as infra, serve(infra, "127.0.0.1:0") as srv:
        cli = Cli(srv.address, capsys)
        code, out, err = await cli("status")
        assert (code, err) == (0, "")
        assert "healthy" in out.splitlines()[0]
        assert "task classes: not served by this server (older than this command)" in out
        code, out, _ = await cli("status", "--json")
        assert code == 0
        report = json.loads(out)
        assert report["classes"] is None
        assert report["status"] == "healthy"
