"""The pytest plugin, tested with pytester in a separate process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.integration.helpers import SERVICE, service

pytest_plugins = ["pytester"]

CONFTEST = """
import pytest

@pytest.fixture(scope="session")
def anyio_backend():
    return "asyncio"
"""

EXTRA = service("--say", "ready", port=True)


def config(tmp: Path, pid_file: Path) -> str:
    return f"""
[services.kv]
command = [{sys.executable!r}, {SERVICE!r}, "--port", "{{port}}"]
ports = {{ main = 0 }}
health = {{ tcp = "{{port}}" }}

[services.flaky]
command = ["sh", "-c", "echo flaky booting; echo $$ > {pid_file}; echo about to crash; exit 4"]
autostart = false
restart = "on-failure"
restart_backoff = {{ initial = 30 }}
"""


def test_fixture_starts_services_and_cleans_up(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pid_file = tmp_path / "flaky.pid"
    pytester.makefile(".toml", **{"dspy-infra": config(tmp_path, pid_file)})
    pytester.makeini("[pytest]\nagent_infra_config = dspy-infra.toml\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        import os
        import pytest

        PIDS = []

        @pytest.mark.anyio
        async def test_kv_is_up(agent_infra):
            status = (await agent_infra.services.status())["kv"]
            assert status.healthy
            PIDS.append(int(status.pid))

        @pytest.mark.anyio
        @pytest.mark.agent_infra(services=["kv"], max_concurrent_starts=1)
        async def test_marker_chooses_services(agent_infra):
            assert agent_infra.config.infra.max_concurrent_starts == 1
            assert (await agent_infra.services.status())["kv"].healthy

        def test_previous_instances_are_gone():
            for pid in PIDS:
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)

        @pytest.mark.anyio
        async def test_session_fixture(agent_infra_session):
            assert (await agent_infra_session.services.status())["kv"].healthy
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


def test_marker_services_table_is_merged_into_the_configuration(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    pytester.makefile(".toml", **{"dspy-infra": config(tmp_path, tmp_path / "flaky.pid")})
    pytester.makeini("[pytest]\nagent_infra_config = dspy-infra.toml\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.anyio
        @pytest.mark.agent_infra(services={{"kv": {{"autostart": False}}, "extra": {EXTRA!r}}})
        async def test_added_and_overridden(agent_infra):
            status = await agent_infra.services.status()
            assert status["extra"].healthy  # added, and started as every autostart one
            assert status["kv"].state == "inactive"  # one key overridden...
            await agent_infra.services.start(["kv"])  # ... the rest of its table kept
            assert (await agent_infra.services.status())["kv"].healthy

        @pytest.mark.anyio
        @pytest.mark.agent_infra(services={{"kv": {{"restart": "sometimes"}}}})
        async def test_refused_as_the_configuration_refuses_it(agent_infra):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*::test_added_and_overridden PASSED*",
            "*::test_refused_as_the_configuration_refuses_it ERROR*",
            "*ConfigError: override services=: services.kv.restart: expected one of *'sometimes'",
        ]
    )


def test_failing_test_report_shows_the_logs_of_unhealthy_services(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    pid_file = tmp_path / "flaky.pid"
    pytester.makefile(".toml", **{"dspy-infra": config(tmp_path, pid_file)})
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        import anyio
        import pytest

        @pytest.mark.anyio
        @pytest.mark.agent_infra(config="dspy-infra.toml", services=["kv"])
        async def test_uses_a_crashing_service(agent_infra):
            await agent_infra.services.start(["flaky"])
            with anyio.fail_after(5):
                while (await agent_infra.services.status())["flaky"].state != "restarting":
                    await anyio.sleep(0.01)
            raise AssertionError("the test failed")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*agent_infra: service 'flaky'*", "[[]restarting[]] exited with code 4*", "about to crash"]
    )


def test_marker_config_path_is_relative_to_the_rootdir_as_the_ini_option_is(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run from the tests' own directory (`cd tests && pytest`, or an IDE):
    # the ini option's path was found, the marker's was looked for in tests/.
    pytester.makefile(".toml", **{"dspy-infra": config(tmp_path, tmp_path / "flaky.pid")})
    pytester.makeini("[pytest]\nagent_infra_config = dspy-infra.toml\n")
    tests = pytester.mkdir("tests")
    (tests / "conftest.py").write_text(CONFTEST)
    (tests / "test_paths.py").write_text(
        textwrap.dedent(
            """
            import pytest

            @pytest.mark.anyio
            async def test_ini_path(agent_infra):
                assert "kv" in agent_infra.config.services

            @pytest.mark.anyio
            @pytest.mark.agent_infra(config="dspy-infra.toml", services=["kv"])
            async def test_marker_path(agent_infra):
                assert (await agent_infra.services.status())["kv"].healthy
            """
        )
    )
    monkeypatch.chdir(tests)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "test_paths.py")
    result.assert_outcomes(passed=2)


def test_marker_rejects_positional_arguments(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.anyio
        @pytest.mark.agent_infra("dspy-infra.toml")
        async def test_x(agent_infra):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*pass config=..., not positionally*"])
    assert result.ret != 0


def test_a_backend_other_than_asyncio_is_refused_saying_so(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture(scope="session", params=["asyncio", ("trio", {})])
        def anyio_backend(request):
            return request.param
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.anyio
        @pytest.mark.agent_infra(config={})
        async def test_x(agent_infra):
            pass

        @pytest.mark.anyio
        async def test_s(agent_infra_session):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*agent_infra runs on asyncio, not 'trio': have the anyio_backend fixture*",
            "*agent_infra_session runs on asyncio, not 'trio'*",
        ]
    )
    result.stdout.no_fnmatch_line("*ModuleNotFoundError*")


def test_marker_registers_task_handlers(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        import pytest

        async def double(payload):
            return payload * 2

        @pytest.mark.anyio
        @pytest.mark.agent_infra(handlers={"double": double})
        async def test_task_runs(agent_infra):
            handle = await agent_infra.submit_task("double", 21)
            assert await handle.result() == 42
            status = await agent_infra.get_task_status(handle.task_id)
            assert status.state == "succeeded"
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("fixture", ["agent_infra", "agent_infra_session"])
def test_an_interrupted_run_stops_the_services_and_exits_as_interrupted(
    pytester: pytest.Pytester, tmp_path: Path, fixture: str
) -> None:
    # Ctrl-C while a test runs: anyio's runner cancels the task that ran the
    # test and tears the fixtures down in a new one. The instance must still
    # close as a whole (no "exit cancel scope in a different task"), its
    # service gone, and pytest must report the run as interrupted.
    ready = tmp_path / "kv.pid"
    pytester.makefile(
        ".toml",
        **{
            "dspy-infra": f"""
[services.kv]
command = [{sys.executable!r}, {SERVICE!r}, "--port", "{{port}}"]
ports = {{ main = 0 }}
health = {{ tcp = "{{port}}" }}
"""
        },
    )
    pytester.makeini("[pytest]\nagent_infra_config = dspy-infra.toml\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        f"""
        import os

        import anyio
        import pytest

        @pytest.mark.anyio
        async def test_interrupted({fixture}):
            kv = (await {fixture}.services.status())["kv"]
            assert kv.healthy
            with open({str(ready)!r} + ".tmp", "w") as f:
                f.write(str(kv.pid))
            os.rename({str(ready)!r} + ".tmp", {str(ready)!r})
            await anyio.sleep_forever()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():  # another process's progress: nothing to await but the file
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the test never got its instance"
            time.sleep(0.05)
        pid = int(ready.read_text())
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "different task" not in output, output
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, output
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_failing_test_that_does_not_use_the_session_instance_gets_none_of_its_logs(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    pytester.makefile(".toml", **{"dspy-infra": config(tmp_path, tmp_path / "flaky.pid")})
    pytester.makeini("[pytest]\nagent_infra_config = dspy-infra.toml\n")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        """
        import anyio
        import pytest

        @pytest.fixture
        def through_a_fixture(agent_infra_session):
            return agent_infra_session

        @pytest.mark.anyio
        async def test_breaks_a_service(agent_infra_session):
            await agent_infra_session.services.start(["flaky"])
            with anyio.fail_after(5):
                while (await agent_infra_session.services.status())["flaky"].state != "restarting":
                    await anyio.sleep(0.01)

        def test_unrelated():
            raise AssertionError("unrelated failure")

        def test_uses_it_through_a_fixture(through_a_fixture):
            raise AssertionError("related failure")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rN")
    result.assert_outcomes(passed=1, failed=2)
    output = result.stdout.str()
    unrelated = output.split("_ test_unrelated _")[1].split("_ test_uses_it_through_a_fixture _")[0]
    related = output.split("_ test_uses_it_through_a_fixture _")[1]
    assert "agent_infra: service 'flaky'" not in unrelated, unrelated
    assert "agent_infra: service 'flaky'" in related, related
