"""The process runner, driven directly with TaskRuns (no scheduler)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest
from attrs import evolve
from hypothesis import given
from hypothesis import strategies as st

from dspy_infra._launch import launch_group
from dspy_infra._procfs import group_alive
from dspy_infra.abc import RunFailed, RunnerContext, TaskRun
from dspy_infra.config.model import Config, HandlerConfig, InfraSettings, TaskClass
from dspy_infra.runners._commands import Tail, prepare
from dspy_infra.runners.process import ProcessRunner

pytestmark = pytest.mark.anyio

Handlers = Mapping[str, HandlerConfig]
MakeRun = Callable[..., TaskRun]
RunnerWith = Callable[..., Awaitable[ProcessRunner]]


Python = Callable[..., HandlerConfig]


@pytest.fixture
def python(tmp_path: Path) -> Python:
    """``(code, *args, **fields)``: a handler running ``code``; ``sys.argv[1:]`` are ``args``.

    The code goes to a file: inline in the command, its braces would be
    taken for placeholders.
    """
    scripts = tmp_path / "scripts"
    scripts.mkdir()

    def make(code: str, *args: str, **fields: Any) -> HandlerConfig:
        script = scripts / f"handler{len(list(scripts.iterdir()))}.py"
        script.write_text(textwrap.dedent(code))
        return HandlerConfig(command=(sys.executable, str(script), *args), **fields)

    return make


async def open_runner(
    state_dir: Path, handlers: Handlers, **infra: Any
) -> tuple[ProcessRunner, list[str]]:
    runner = ProcessRunner()
    context = RunnerContext(
        config=Config(infra=InfraSettings(**infra), handlers=dict(handlers)),
        state_dir=state_dir,
        instance_id="unit",
        project="unit",
        handlers={},
    )
    return runner, await runner.open(context)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def make_run(state_dir: Path) -> MakeRun:
    def make(
        handler: str,
        payload: Any = None,
        *,
        task_id: str = "t1",
        attempt: int = 1,
        cancel_grace: float = 5.0,
        env: Mapping[str, str] | None = None,
    ) -> TaskRun:
        return TaskRun(
            task_id=task_id,
            handler=handler,
            payload=payload,
            attempt=attempt,
            task_class="t",
            class_config=TaskClass(runner="process", cancel_grace=cancel_grace),
            env=env or {},
            tasks_dir=state_dir / "tasks",
        )

    return make


@pytest.fixture
async def runner_with(state_dir: Path) -> AsyncIterator[RunnerWith]:
    runners: list[ProcessRunner] = []

    async def make(handlers: Handlers, **infra: Any) -> ProcessRunner:
        runner, _ = await open_runner(state_dir, handlers, **infra)
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        await runner.close()


ECHO_TO_FILE = """
    import json, sys
    payload = json.load(open(sys.argv[1]))
    print("noise on stdout")
    json.dump({"echo": payload}, open(sys.argv[2], "w"))
"""


async def test_the_result_file_wins_over_stdout(
    runner_with: RunnerWith, make_run: MakeRun, python: Python
) -> None:
    runner = await runner_with({"echo": python(ECHO_TO_FILE, "{payload_file}", "{result_file}")})
    payload = {"x": [1, "two", None], "y": {"z": 1.5}}
    assert await runner.run(make_run("echo", payload)) == {"echo": payload}


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ('print("starting"); print(\'{"a": 1}\'); print(); print("   ")', {"a": 1}),
        ('print("[1, 2]"); print("hello world")', "hello world"),
        ('print("42")', 42),
        ("pass", None),
        ('open(sys.argv[1], "w").close(); print("\\"from stdout\\"")', "from stdout"),
    ],
    ids=["last-json-line", "last-line-as-string", "number", "no-output", "empty-result-file"],
)
async def test_without_a_result_file_the_last_stdout_line_is_the_result(
    runner_with: RunnerWith, make_run: MakeRun, code: str, expected: Any, python: Python
) -> None:
    runner = await runner_with({"h": python("import sys\n" + code, "{result_file}")})
    assert await runner.run(make_run("h")) == expected


async def test_a_stale_result_file_of_an_earlier_attempt_is_ignored(
    runner_with: RunnerWith, make_run: MakeRun, python: Python
) -> None:
    runner = await runner_with({"h": python('print("fresh")')})
    run = make_run("h", attempt=2)
    run.work_dir.mkdir(parents=True)
    (run.work_dir / "result.json").write_text('"stale"')
    assert await runner.run(run) == "fresh"


async def test_a_result_file_that_is_not_json_fails_the_attempt(
    runner_with: RunnerWith, make_run: MakeRun, python: Python
) -> None:
    code = 'import sys; open(sys.argv[1], "w").write("{not json")'
    runner = await runner_with({"h": python(code, "{result_file}")})
    with pytest.raises(RunFailed, match=r"result file .*result\.json.* is not valid JSON"):
        await runner.run(make_run("h"))


async def test_a_stdout_result_over_the_size_limit_fails_the_attempt(
    runner_with: RunnerWith, make_run: MakeRun, python: Python
) -> None:
    runner = await runner_with({"h": python('print("x" * 5000)')}, max_result_bytes=100)
    with pytest.raises(RunFailed, match="max_result_bytes"):
        await runner.run(make_run("h"))


async def test_a_long_stdout_result_line_is_read_in_linear_time(
    runner_with: RunnerWith, make_run: MakeRun, python: Python
) -> None:
    # Under a raised limit, a 64 MB result line arrives in some thousand
    # pieces: joined by copying what came before each time, it took 18 s of
    # the event loop's time (quadratic), for well under 1 s of reading.
    code = "import sys; sys.stdout.write('\"' + \"x\" * (64 << 20) + '\"')"
    runner = await runner_with({"h": python(code)}, max_result_bytes=128 << 20)
    started = time.monotonic()
    result = await runner.run(make_run("h"))
    assert len(result) == 64 << 20
    assert time.monotonic() - started < 6


async def test_a_result_file_over_the_size_limit_fails_the_attempt_unread(
    runner_with: RunnerWith, make_run: MakeRun, python: Python
) -> None:
    # 64 MB of valid JSON: read in full, it would be parsed before the limit is checked.
    code = 'import sys; f = open(sys.argv[1], "w"); f.write("[" + "1," * 2**25 + "1]")'
    runner = await runner_with({"h": python(code, "{result_file}")}, max_result_bytes=100)
    with pytest.raises(RunFailed, match=r"result\.json' is over the limit of 100 bytes"):
        await runner.run(make_run("h"))


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        # 57 bytes as stored (compact), some 160 as json.dump(indent=2) writes it.
        ('json.dump({"a b": list(range(20))}, f, indent=2)', {"a b": list(range(20))}),
        # 64 MB of whitespace around a value: it costs no memory to read.
        ('f.write(" " * (32 << 20) + "[1,\\n\\t2]" + "\\n" * (32 << 20))', [1, 2]),
        # The first read ends (at 100 + 1 bytes) between a backslash and the quote it escapes.
        ('f.write(" " * 99 + chr(34) + chr(92) + chr(34) + " x" + chr(34))', '" x'),
    ],
    ids=["indented", "padded", "escape-across-reads"],
)
async def test_a_result_file_is_measured_as_it_is_stored_not_as_it_is_spaced(
    runner_with: RunnerWith, make_run: MakeRun, python: Python, code: str, expected: Any
) -> None:
    # max_result_bytes counts a result as compact JSON, whichever runner made it.
    script = f'import json, sys\nwith open(sys.argv[1], "w") as f:\n    {code}'
    runner = await runner_with({"h": python(script, "{result_file}")}, max_result_bytes=100)
    assert await runner.run(make_run("h")) == expected


async def test_a_failure_carries_the_exit_code_and_the_stderr_tail(
    runner_with: RunnerWith, make_run: MakeRun, python: Python
) -> None:
    code = """
        import sys
        for i in range(50):
            print(f"err {i}", file=sys.stderr)
        print("x" * 5000, file=sys.stderr)
        print("the handler broke", file=sys.stderr)
        sys.exit(3)
    """
    runner = await runner_with({"h": python(code)})
    with pytest.raises(RunFailed) as caught:
        await runner.run(make_run("h"))
    error = caught.value
    assert error.message == "exited with code 3"
    assert error.exit_code == 3
    assert len(error.output) == 20
    assert error.output[0] == "err 32"
    assert error.output[-2].startswith("x" * 100)
    assert len(error.output[-2]) < 1100, "a long line is capped"
    assert error.output[-1] == "the handler broke"
    assert "the handler broke" in str(error)


async def test_a_process_killed_by_a_signal_says_which(
    runner_with: RunnerWith, make_run: MakeRun, python: Python
) -> None:
    runner = await runner_with({"h": python("import os, signal; os.kill(os.getpid(), 9)")})
    with pytest.raises(RunFailed, match="killed by signal SIGKILL") as caught:
        await runner.run(make_run("h"))
    assert caught.value.exit_code == -signal.SIGKILL


async def test_a_command_that_cannot_run_fails_clearly(
    runner_with: RunnerWith, make_run: MakeRun
) -> None:
    runner = await runner_with({"h": HandlerConfig(command=("/nonexistent/program", "x"))})
    with pytest.raises(RunFailed, match=r"cannot run '/nonexistent/program'"):
        await runner.run(make_run("h"))


@pytest.mark.parametrize(
    ("first_line", "interpreter"),
    [("#!/nonexistent/python3 -u", "/nonexistent/python3"), ("#!/bin/sh\r", "/bin/sh\r")],
    ids=["missing-interpreter", "windows-line-ending"],
)
async def test_a_script_whose_interpreter_is_missing_names_the_interpreter(
    runner_with: RunnerWith, make_run: MakeRun, tmp_path: Path, first_line: str, interpreter: str
) -> None:
    # execve says ENOENT, "No such file or directory", of a script that is there.
    script = tmp_path / "train.py"
    script.write_text(f"{first_line}\nprint(1)\n")
    script.chmod(0o755)
    runner = await runner_with({"h": HandlerConfig(command=("./train.py",), cwd=str(tmp_path))})
    with pytest.raises(RunFailed) as caught:
        await runner.run(make_run("h"))
    assert str(caught.value) == (
        f"cannot run './train.py': its interpreter {interpreter!r} "
        "(its first line, #!) does not exist"
    )


async def test_a_missing_working_directory_is_named(
    runner_with: RunnerWith, make_run: MakeRun, tmp_path: Path, python: Python
) -> None:
    missing = tmp_path / "missing"
    runner = await runner_with({"h": python("pass", cwd=str(missing))})
    with pytest.raises(RunFailed, match=r"working directory .*missing.* does not exist"):
        await runner.run(make_run("h"))


async def test_placeholders_environment_and_working_directory(
    runner_with: RunnerWith, make_run: MakeRun, python: Python
) -> None:
    code = """
        import json, os, sys
        names = ["DSPY_INFRA_TASK_ID", "DSPY_INFRA_ATTEMPT", "DSPY_INFRA_PAYLOAD_FILE",
                 "DSPY_INFRA_RESULT_FILE", "PYTHONUNBUFFERED", "FROM_HANDLER", "FROM_RUN"]
        print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                          "env": {n: os.environ.get(n) for n in names}}))
    """
    handler = python(
        code, "{task_id}", "{attempt}", "{work_dir}", "{payload_file}", "{{literal}}",
        env={"FROM_HANDLER": "h"},
    )  # fmt: skip
    runner = await runner_with({"h": handler})
    run = make_run("h", task_id="task-7", attempt=3, env={"FROM_RUN": "r"})
    result = await runner.run(run)
    work_dir = str(run.work_dir.absolute())
    payload_file = f"{work_dir}/payload.json"
    assert result["argv"] == ["task-7", "3", work_dir, payload_file, "{literal}"]
    assert result["cwd"] == work_dir
    assert result["env"] == {
        "DSPY_INFRA_TASK_ID": "task-7",
        "DSPY_INFRA_ATTEMPT": "3",
        "DSPY_INFRA_PAYLOAD_FILE": payload_file,
        "DSPY_INFRA_RESULT_FILE": f"{work_dir}/result.json",
        "PYTHONUNBUFFERED": "1",
        "FROM_HANDLER": "h",
        "FROM_RUN": "r",
    }


async def test_a_shell_command_gets_its_placeholders_quoted(
    tmp_path: Path, make_run: MakeRun
) -> None:
    # A space in the state dir would split an unquoted path in two.
    state_dir = tmp_path / "with space"
    handler = HandlerConfig(command="cat {payload_file} > {result_file}", shell=True)
    runner, _ = await open_runner(state_dir, {"h": handler})
    run = evolve(make_run("h", {"a": "b"}), tasks_dir=state_dir / "tasks")
    try:
        assert await runner.run(run) == {"a": "b"}
    finally:
        await runner.close()


async def test_validate_names_what_is_missing(runner_with: RunnerWith, python: Python) -> None:
    runner = await runner_with(
        {"good": python("pass"), "bad": python("pass", "{payload}"), "other": python("pass")}
    )
    assert runner.validate("good") is None
    missing = runner.validate("nope")
    assert missing is not None
    assert "[handlers.nope]" in missing
    assert "configured: bad, good, other" in missing
    wrong = runner.validate("bad")
    assert wrong is not None
    assert "{payload}" in wrong
    assert "{payload_file}" in wrong


async def test_many_attempts_run_at_once(
    runner_with: RunnerWith, make_run: MakeRun, python: Python
) -> None:
    runner = await runner_with({"echo": python(ECHO_TO_FILE, "{payload_file}", "{result_file}")})
    results: dict[int, Any] = {}

    async def one(i: int) -> None:
        results[i] = await runner.run(make_run("echo", i, task_id=f"t{i}"))

    async with anyio.create_task_group() as group:
        for i in range(20):
            group.start_soon(one, i)
    assert results == {i: {"echo": i} for i in range(20)}


async def wait_for_file(path: Path) -> str:
    """The file's content once a process has written it."""
    file = anyio.Path(path)
    with anyio.fail_after(30):
        while not await file.exists() or not (text := await file.read_text()):
            await anyio.sleep(0.01)
    return text


# The handler and a grandchild both ignore SIGTERM: only SIGKILL ends them.
STUBBORN = """
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 1000"])
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(os.getpgid(0)))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(1000)
"""


async def test_cancelling_kills_the_whole_group_after_the_grace_period(
    runner_with: RunnerWith, make_run: MakeRun, state_dir: Path, tmp_path: Path, python: Python
) -> None:
    pgid_file = tmp_path / "pgid"
    runner = await runner_with({"h": python(STUBBORN, str(pgid_file))})
    pgid = 0
    cancelled_at = 0.0
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:

            async def cancel_when_started() -> None:
                nonlocal pgid, cancelled_at
                pgid = int(await wait_for_file(pgid_file))
                assert group_alive(pgid)
                cancelled_at = time.monotonic()
                scope.cancel()

            group.start_soon(cancel_when_started)
            await runner.run(make_run("h", cancel_grace=0.5))
            pytest.fail("run() returned instead of being cancelled")
    elapsed = time.monotonic() - cancelled_at
    assert 0.45 < elapsed < 30, "SIGKILL came before the grace period, or much after"
    assert not group_alive(pgid)
    # Its end is recorded: closing the runner leaves no ledger behind.
    await runner.close()
    assert list((state_dir / "process").iterdir()) == [], "the attempt's record was left"


async def test_a_timeout_stops_the_work(
    runner_with: RunnerWith, make_run: MakeRun, tmp_path: Path, python: Python
) -> None:
    pgid_file = tmp_path / "pgid"
    code = """
        import os, sys, time
        open(sys.argv[1], "w").write(str(os.getpgid(0)))
        time.sleep(1000)
    """
    runner = await runner_with({"h": python(code, str(pgid_file))})
    with anyio.move_on_after(30) as scope:
        async with anyio.create_task_group() as group:

            async def expire_once_started() -> None:
                await wait_for_file(pgid_file)
                scope.deadline = anyio.current_time()

            group.start_soon(expire_once_started)
            await runner.run(make_run("h"))
    assert scope.cancelled_caught
    assert not group_alive(int(pgid_file.read_text()))


async def test_a_stopped_command_gets_its_sigterm_when_cancelled(
    runner_with: RunnerWith, make_run: MakeRun, tmp_path: Path, python: Python
) -> None:
    # A stopped process (SIGSTOP: a debugger, a paused job) keeps a SIGTERM
    # pending: without a SIGCONT it never cleaned up, and was SIGKILLed
    # after the whole grace period.
    pid_file, cleaned = tmp_path / "pid", tmp_path / "cleaned"
    code = """
        import os, signal, sys
        def clean_up(*_):
            open(sys.argv[2], "w").write("cleaned up")
            sys.exit(0)
        signal.signal(signal.SIGTERM, clean_up)
        open(sys.argv[1], "w").write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)
    """
    runner = await runner_with({"h": python(code, str(pid_file), str(cleaned))})
    cancelled_at = 0.0
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:

            async def cancel_when_stopped() -> None:
                nonlocal cancelled_at
                stat = anyio.Path(f"/proc/{await wait_for_file(pid_file)}/stat")
                while (await stat.read_text()).rsplit(")", 1)[1].split()[0] != "T":
                    await anyio.sleep(0.01)
                cancelled_at = time.monotonic()
                scope.cancel()

            group.start_soon(cancel_when_stopped)
            await runner.run(make_run("h", cancel_grace=10))
    assert time.monotonic() - cancelled_at < 5, "it waited out the grace period"
    assert cleaned.read_text() == "cleaned up"


async def test_an_attempt_cancelled_before_its_launch_never_starts_its_command(
    runner_with: RunnerWith, make_run: MakeRun, python: Python, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cancellation (a cancel, a timeout) comes while the payload is being
    # written: the files' one thread may be busy with other attempts' files.
    launched: list[list[str]] = []

    def slow_prepare(*args: Any) -> None:
        time.sleep(0.3)
        prepare(*args)

    async def counted_launch(argv: list[str], **kwargs: Any) -> Any:
        launched.append(argv)
        return await launch_group(argv, **kwargs)

    monkeypatch.setattr("dspy_infra.runners.process.prepare", slow_prepare)
    monkeypatch.setattr("dspy_infra.runners.process.launch_group", counted_launch)
    runner = await runner_with({"h": python("pass")})
    with anyio.move_on_after(0.1) as scope:
        await runner.run(make_run("h"))
    assert scope.cancelled_caught
    assert launched == [], "the command of an attempt cancelled before its launch was started"


async def test_what_the_command_leaves_running_stops_with_it(
    runner_with: RunnerWith, make_run: MakeRun, tmp_path: Path, python: Python
) -> None:
    # The background child inherits stdout: reading to EOF would wait for it.
    code = """
        import os, subprocess
        subprocess.Popen(["sleep", "1000"])
        print(os.getpgid(0))
    """
    runner = await runner_with({"h": python(code)})
    started = time.monotonic()
    pgid = await runner.run(make_run("h"))
    assert time.monotonic() - started < 10
    assert not group_alive(pgid)


async def test_a_child_that_left_the_group_holding_stdout_does_not_hold_up_the_result(
    runner_with: RunnerWith, make_run: MakeRun, python: Python
) -> None:
    code = """
        import subprocess
        child = subprocess.Popen(["sleep", "60"], start_new_session=True)
        print(child.pid)
    """
    runner = await runner_with({"h": python(code)})
    started = time.monotonic()
    pid = await runner.run(make_run("h"))
    try:
        assert time.monotonic() - started < 10
    finally:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
async def test_a_last_line_without_a_newline_counts_when_a_child_that_left_holds_the_output(
    runner_with: RunnerWith, make_run: MakeRun, tmp_path: Path, python: Python, stream: str
) -> None:
    # The reading ends after the drain period, not at the end of the stream:
    # what the command wrote last, without a newline, is its last line still.
    pid_file = tmp_path / "child"
    code = """
        import subprocess, sys
        child = subprocess.Popen(["sleep", "60"], start_new_session=True)
        open(sys.argv[1], "w").write(str(child.pid))
        out = sys.stdout if sys.argv[2] == "stdout" else sys.stderr
        print("an earlier line", file=out)
        print('"the last line"', end="", file=out, flush=True)
        sys.exit(0 if sys.argv[2] == "stdout" else 3)
    """
    runner = await runner_with({"h": python(code, str(pid_file), stream)})
    try:
        if stream == "stdout":
            assert await runner.run(make_run("h")) == "the last line"
        else:
            with pytest.raises(RunFailed) as caught:
                await runner.run(make_run("h"))
            assert list(caught.value.output) == ["an earlier line", '"the last line"']
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


async def test_open_removes_attempts_of_an_owner_that_was_killed(
    state_dir: Path, tmp_path: Path
) -> None:
    owner = textwrap.dedent(
        f"""
        import anyio, sys
        from pathlib import Path
        from dspy_infra.abc import RunnerContext, TaskRun
        from dspy_infra.config.model import Config, HandlerConfig, TaskClass
        from dspy_infra.runners.process import ProcessRunner

        async def main() -> None:
            state_dir = Path({str(state_dir)!r})
            handler = HandlerConfig(command=("sh", "-c", "sleep 1000 & sleep 1000"))
            runner = ProcessRunner()
            await runner.open(RunnerContext(config=Config(handlers={{"h": handler}}),
                state_dir=state_dir, instance_id="doomed", project="unit", handlers={{}}))
            await runner.run(TaskRun(task_id="orphan", handler="h", payload=None, attempt=1,
                task_class="t", class_config=TaskClass(runner="process"),
                tasks_dir=state_dir / "tasks"))

        anyio.run(main)
        """
    )
    records = state_dir / "process"
    async with await anyio.open_process([sys.executable, "-c", owner]) as child:
        with anyio.fail_after(30):
            # The launch's line follows the ledger's header (a line is one write).
            while len(lines := _read_ledger(records).splitlines()) < 2:
                await anyio.sleep(0.01)
            pgid = int(json.loads(lines[1])["pid"])
        os.kill(child.pid, signal.SIGKILL)
        await child.wait()
    assert group_alive(pgid), "the attempt died with its owner: nothing to sweep"

    runner, removed = await open_runner(state_dir, {})
    await runner.close()
    assert len(removed) == 1
    assert "'orphan'" in removed[0]
    assert f"pid {pgid}" in removed[0]
    assert not group_alive(pgid)
    assert list(records.iterdir()) == []
    again, removed_again = await open_runner(state_dir, {})
    await again.close()
    assert removed_again == []


async def test_open_leaves_attempts_of_a_live_owner_alone(
    state_dir: Path, runner_with: RunnerWith, make_run: MakeRun, tmp_path: Path, python: Python
) -> None:
    pgid_file = tmp_path / "pgid"
    code = 'import os, sys, time; open(sys.argv[1], "w").write(str(os.getpgid(0))); time.sleep(5)'
    runner = await runner_with({"h": python(code, str(pgid_file))})
    async with anyio.create_task_group() as group:
        group.start_soon(runner.run, make_run("h"))
        pgid = int(await wait_for_file(pgid_file))
        _, removed = await open_runner(state_dir, {})
        assert removed == []
        assert group_alive(pgid)
        group.cancel_scope.cancel()


def _read_ledger(records: Path) -> str:
    found = list(records.glob("doomed-*.jsonl")) if records.is_dir() else []
    return found[0].read_text() if found else ""


@given(
    lines=st.lists(st.text(alphabet="ab ", max_size=30), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
def test_the_tail_keeps_the_last_non_empty_lines_across_chunk_boundaries(
    lines: list[str], cuts: list[int]
) -> None:
    data = "\n".join(lines).encode()
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    tail = Tail(3, 10)
    for start, end in itertools.pairwise(bounds):
        tail.feed(data[start:end])
    tail.end()
    kept = [line for line in lines if line.strip()][-3:]
    assert tail.text() == [line[:10] + (" [...]" if len(line) > 10 else "") for line in kept]


def test_the_tail_drops_carriage_returns() -> None:
    tail = Tail(5, 100)
    tail.feed(b"one\r\ntw")
    tail.feed(b"o\r\n\r\n")
    tail.end()
    assert tail.text() == ["one", "two"]
    assert tail.last() == ("two", False)
