"""The conformance kits fail a part that breaks a promise they check.

A kit that passes everything proves nothing: each broken part here is made
through the kit's own public options, and run by pytester in a process of
its own, as a third party's test module would be.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
import pytest

@pytest.fixture(scope="session")
def anyio_backend():
    return "asyncio"
"""


def test_a_runner_that_runs_one_task_at_a_time_fails_the_suite(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_one_at_a_time="""
        import pytest
        from attrs import evolve

        from dspy_infra.testing.runner_conformance import (
            RunnerConformance,
            inprocess_scenario_handlers,
        )

        class TestOneAtATime(RunnerConformance):
            @pytest.fixture
            def runner_name(self):
                return "inprocess"

            @pytest.fixture
            def handlers(self):
                # Tasks of the suite's class run one after the other.
                return evolve(inprocess_scenario_handlers(), class_options={"max_concurrency": 1})
        """
    )
    test = "test_one_at_a_time.py::TestOneAtATime::test_tasks_run_at_once"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", test)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: the tasks ran one after the other*"])


def test_a_backend_whose_cancelled_launch_leaves_its_service_running_fails_the_suite(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_leaky="""
        import sys

        import anyio
        import pytest

        from dspy_infra._procfs import group_alive
        from dspy_infra.abc import LaunchSpec
        from dspy_infra.backends.local import LocalBackend
        from dspy_infra.testing.backend_conformance import ContainerBackendConformance

        class LeakyBackend(LocalBackend):
            # A cancellation after the launch drops the service, still running.
            async def launch(self, spec):
                process = await super().launch(spec)
                self.dropped.append(process)
                await anyio.sleep(0.5)
                return process

        LISTEN = (
            "import socket, sys; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])));"
            " s.listen()\\nwhile True: s.accept()[0].close()"
        )

        class TestLeaky(ContainerBackendConformance):
            @pytest.fixture
            def listener(self):
                def make(name, port):
                    command = (sys.executable, "-c", LISTEN, str(port))
                    return LaunchSpec(name=name, command=command, ports={"main": port})

                return make

            @pytest.fixture
            def is_gone(self):
                async def gone(process_id):
                    return not group_alive(int(process_id))

                return gone

            @pytest.fixture
            async def backend(self, tmp_path):
                backend = LeakyBackend()
                backend.dropped = []
                await backend.open(state_dir=tmp_path, instance_id="leaky", project="leaky")
                try:
                    yield backend
                finally:
                    for process in backend.dropped:
                        await process.stop(1.0)
                    await backend.close()
        """
    )
    test = "test_leaky.py::TestLeaky::test_a_cancelled_launch_leaves_nothing_behind"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", test)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: cut after 0.0s: it runs*"])


def test_a_runner_whose_launch_goes_on_after_a_cancel_fails_the_suite(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_launch_leaks="""
        import threading
        import time

        import anyio
        import pytest
        from attrs import evolve

        from dspy_infra.testing.runner_conformance import (
            RunnerConformance,
            inprocess_scenario_handlers,
        )

        def work(payload):
            with open(payload["started"], "w") as f:
                f.write(repr(time.time()))
            time.sleep(payload["seconds"])
            with open(payload["marker"], "w") as f:
                f.write("the work was not stopped")

        async def sleep(payload):
            try:
                await anyio.sleep(0.2)  # its launch
            except BaseException:
                # Cancelled while launching: launched anyway, with nobody to stop it.
                threading.Thread(target=work, args=(payload,), daemon=True).start()
                raise
            await anyio.to_thread.run_sync(work, payload, abandon_on_cancel=True)

        class TestLaunchLeaks(RunnerConformance):
            @pytest.fixture
            def runner_name(self):
                return "inprocess"

            @pytest.fixture
            def handlers(self):
                scenarios = inprocess_scenario_handlers()
                return evolve(scenarios, functions={**scenarios.functions, "sleep": sleep})
        """
    )
    test = (
        "test_launch_leaks.py::TestLaunchLeaks::"
        "test_a_task_cancelled_as_it_is_launched_leaves_nothing_running"
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", test)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the work went on*"])
