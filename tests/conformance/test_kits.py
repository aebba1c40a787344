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
