"""Tasks as Slurm jobs (``runner = "slurm"``), against a real cluster, through the public API.

Most tests share one instance (jobs take a few tenths of a second to start,
an instance nothing): each looks only at its own tasks and jobs. Those that
break the cluster on purpose (no commands, no controller) or crash an owner
have instances of their own. The last tests need no cluster: they pin the
pieces that the real cluster cannot show on demand (array syntax, error
sorting, the AIMD pacer).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from dspy_infra import AgentInfra, Resources
from dspy_infra.abc import RunFailed
from dspy_infra.errors import (
    InvalidTask,
    TaskCancelled,
    TaskFailed,
    TaskTimedOut,
    UnknownTask,
)
from dspy_infra.runners._commands import AttemptFiles, Tail
from dspy_infra.runners.slurm import SlurmRunner
from dspy_infra.runners.slurm import cli as slurm_cli
from dspy_infra.runners.slurm.cli import Pacer, SlurmCli, classify
from dspy_infra.runners.slurm.files import JobOutput
from dspy_infra.runners.slurm.poller import MIN_INTERVAL, JobInfo, parse_sacct, parse_squeue
from dspy_infra.runners.slurm.runner import _result
from dspy_infra.runners.slurm.script import (
    JobOptions,
    TaskPaths,
    array_ranges,
    owner_names,
    task_script,
)
from dspy_infra.scheduling.tasks import TaskHandle, TaskState

pytestmark = pytest.mark.anyio

ECHO = "import json, sys; json.dump(json.load(open(sys.argv[1])), open(sys.argv[2], 'w'))"
# Appends a line to payload["log"] each time it starts, then sleeps.
SLEEP = """
import json, sys, time
payload = json.load(open(sys.argv[1]))
with open(payload["log"], "a") as f:
    f.write("started\\n")
time.sleep(payload["seconds"])
print(json.dumps({"slept": payload["seconds"]}))
"""
# In the queue, and running or able to run (a held SPECIAL_EXIT job runs again if released).
ACTIVE = (
    "PENDING",
    "RUNNING",
    "COMPLETING",
    "CONFIGURING",
    "SUSPENDED",
    "REQUEUED",
    "SPECIAL_EXIT",
)


def handlers(directory: Path) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    sleep = directory / "sleep.py"
    sleep.write_text(textwrap.dedent(SLEEP))
    return {
        "echo": {"command": [sys.executable, "-c", ECHO, "{payload_file}", "{result_file}"]},
        "fail": {
            "command": "echo starting; echo 'first words' >&2; echo 'last words' >&2; exit 3",
            "shell": True,
        },
        "sleep": {"command": [sys.executable, str(sleep), "{payload_file}"]},
        "quit": {"command": "exit 143", "shell": True},
        "allocation": {
            "command": 'echo "$SLURM_CPUS_PER_TASK $SLURM_MEM_PER_NODE"',
            "shell": True,
        },
    }


def config(directory: Path) -> dict[str, Any]:
    base = {"runner": "slurm", "cancel_grace": 1.0}
    return {
        "classes": {
            "s": base,
            "bad_partition": {**base, "partition": "no-such-partition"},
            "bad_gres": {**base, "gres": "gpu:no-such-gpu:1"},
            "packed": {**base, "pack": 3},
        },
        "handlers": handlers(directory),
    }


async def command(*argv: str) -> str:
    """Run a Slurm command as a person would; its stdout."""
    return (await anyio.run_process(argv)).stdout.decode()


async def active(runner: SlurmRunner, task_id: str | None = None) -> list[tuple[str, str]]:
    """``(job id, state)`` of the runner's jobs in the queue (of ``task_id``'s) that still run."""
    out = await command(
        "squeue",
        "--noheader",
        "--array",
        "--states=all",
        f"--name={runner.job_name}",
        "--Format=JobArrayID:|,State:|,Comment:",
    )
    jobs = [line.split("|") for line in out.splitlines() if "|" in line]
    return [
        (job_id, state)
        for job_id, state, comment, *_ in jobs
        if state.strip() in ACTIVE and (task_id is None or f"/{task_id}/" in comment)
    ]


@pytest.fixture(scope="module")
async def infra(slurm: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AgentInfra]:
    directory = tmp_path_factory.mktemp("slurm")
    async with AgentInfra.start(config(directory), state_dir=directory / "state") as instance:
        yield instance


@pytest.fixture
def runner(infra: AgentInfra) -> SlurmRunner:
    found = SlurmRunner.of_instance(infra.instance_id)
    assert found is not None
    return found


async def wait_for_line(path: Path, lines: int = 1) -> None:
    file = anyio.Path(path)
    with anyio.fail_after(30):
        while not await file.exists() or len((await file.read_text()).splitlines()) < lines:
            await anyio.sleep(0.02)


async def test_results_and_failures_come_back(infra: AgentInfra) -> None:
    payload = {"text": "hi ✓", "nested": {"n": [1, 2.5, None]}}
    handle = await infra.submit_task("echo", payload, task_class="s")
    assert await handle.result() == payload
    handle = await infra.submit_task("fail", None, task_class="s")
    with pytest.raises(TaskFailed) as caught:
        await handle.result()
    assert "exited with code 3" in caught.value.error
    assert "first words" in caught.value.error
    assert "last words" in caught.value.error
    assert "starting" not in caught.value.error  # stdout is not the error's


async def test_a_tasks_own_resources_are_what_its_job_asks_for(infra: AgentInfra) -> None:
    handle = await infra.submit_task(
        "allocation", None, task_class="s", resources=Resources(cpus=2, memory_mb=100)
    )
    assert await handle.result() == "2 100"


async def test_infinite_cpus_are_refused_at_submit(infra: AgentInfra) -> None:
    # No machine's capacity is looked at for a Slurm class: inf CPUs were
    # stored, and each attempt failed with "OverflowError: cannot convert
    # float infinity to integer" (sbatch's --cpus-per-task), naming nothing.
    with pytest.raises(InvalidTask) as caught:
        await infra.submit_task(
            "echo", {}, task_class="s", task_id="inf-cpus", resources=Resources(cpus=math.inf)
        )
    assert str(caught.value) == (
        "task 'inf-cpus' refused: resources.cpus must be a finite number of at least 0, got inf"
    )
    with pytest.raises(UnknownTask):
        await infra.get_task_status("inf-cpus")


async def test_an_exit_code_read_as_a_signal_keeps_the_recorded_one_in_the_message(
    infra: AgentInfra,
) -> None:
    # The batch script records a death by SIGTERM as 143, as a command's own
    # exit 143: both read as -15, and the message keeps the 143.
    handle = await infra.submit_task("quit", None, task_class="s")
    with pytest.raises(TaskFailed) as caught:
        await handle.result()
    assert "killed by signal SIGTERM (exit code 143 from its batch script)" in caught.value.error


async def test_a_burst_goes_as_one_job_array(infra: AgentInfra, runner: SlurmRunner) -> None:
    before, cycles = dict(runner.calls), runner.poll_cycles
    started = time.monotonic()
    handles = await infra.submit_tasks("echo", [{"i": i} for i in range(20)], task_class="s")
    results = [await handle.result() for handle in handles]
    elapsed = time.monotonic() - started
    assert results == [{"i": i} for i in range(20)]
    calls = {k: v - before.get(k, 0) for k, v in runner.calls.items()}
    assert calls.get("sbatch", 0) <= 2, calls
    # One squeue per poll cycle for all 20 jobs, and cycles at most every
    # MIN_INTERVAL: the calls follow the time taken, not the number of tasks.
    assert calls.get("squeue", 0) == runner.poll_cycles - cycles, calls
    assert calls.get("squeue", 0) <= elapsed / MIN_INTERVAL + 2, (calls, elapsed)


async def test_cancel_removes_the_job(
    infra: AgentInfra, runner: SlurmRunner, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    handle = await infra.submit_task(
        "sleep", {"log": str(log), "seconds": 60}, task_class="s", task_id="cancel-me"
    )
    await wait_for_line(log)
    assert await active(runner, "cancel-me")
    started = time.monotonic()
    await infra.cancel_task(handle.task_id)
    with pytest.raises(TaskCancelled):
        await handle.result()
    assert time.monotonic() - started < 10
    assert await active(runner, "cancel-me") == []


@pytest.mark.parametrize(
    ("slurm_command", "words"),
    [
        (["scancel", "{}"], "was cancelled from outside"),
        # The shortest limit sbatch takes is a minute; scontrol takes seconds.
        (["scontrol", "update", "TimeLimit=0:01", "JobId={}"], "reached its time limit"),
        # Ended and held in the queue: released, it would run the task again.
        (["scontrol", "requeuehold", "State=SpecialExit", "{}"], "was requeued and held"),
    ],
)
async def test_a_job_ended_by_slurm_says_why(
    infra: AgentInfra, runner: SlurmRunner, tmp_path: Path, slurm_command: list[str], words: str
) -> None:
    log = tmp_path / "log"
    handle = await infra.submit_task("sleep", {"log": str(log), "seconds": 300}, task_class="s")
    await wait_for_line(log)
    ((job_id, _),) = await active(runner, handle.task_id)
    await command(*(word.format(job_id) for word in slurm_command))
    with anyio.fail_after(120), pytest.raises(TaskFailed) as caught:
        await handle.result()
    assert f"Slurm job {job_id} {words}" in caught.value.error
    assert "signal" not in caught.value.error
    assert await active(runner, handle.task_id) == []


async def test_a_timeout_stops_the_job(
    infra: AgentInfra, runner: SlurmRunner, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    handle = await infra.submit_task(
        "sleep", {"log": str(log), "seconds": 60}, task_class="s", task_id="slow", timeout=2
    )
    with pytest.raises(TaskTimedOut):
        await handle.result()
    assert await anyio.Path(log).read_text() == "started\n"
    assert await active(runner, "slow") == []


async def test_a_requeued_job_does_not_use_up_an_attempt(
    infra: AgentInfra, runner: SlurmRunner, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    handle = await infra.submit_task(
        "sleep", {"log": str(log), "seconds": 2}, task_class="s", task_id="requeued"
    )
    await wait_for_line(log)
    ((job_id, _),) = await active(runner, "requeued")
    await command("scontrol", "requeue", job_id)
    # Slurm holds a requeued job back for a while; let it go at once...
    with anyio.fail_after(10):
        while "BeginTime" not in await command("squeue", "-h", f"--jobs={job_id}", "--format=%r"):
            await anyio.sleep(0.1)
    # ... or nearly: slurmd may still be ending the first run, and would end
    # the second one too (it has the same job id).
    await anyio.sleep(2)
    await command("scontrol", "update", f"jobid={job_id}", "starttime=now")
    assert await handle.result() == {"slept": 2}
    assert await anyio.Path(log).read_text() == "started\nstarted\n"
    assert (await handle.wait()).attempts == 1


async def test_packed_tasks_share_a_job_and_stop_alone(
    infra: AgentInfra, runner: SlurmRunner, tmp_path: Path
) -> None:
    logs = [tmp_path / f"log{i}" for i in range(3)]
    payloads = [
        {"log": str(log), "seconds": s} for log, s in zip(logs, (60, 0.3, 0.3), strict=True)
    ]
    sbatch = runner.calls.get("sbatch", 0)
    first, second, third = await infra.submit_tasks("sleep", payloads, task_class="packed")
    await wait_for_line(logs[0])
    (job,) = [j for j in await active(runner) if j[1].strip() == "RUNNING"]
    # The third waits for its turn: cancelled, it never starts.
    await infra.cancel_task(third.task_id)
    with pytest.raises(TaskCancelled):
        await third.result()
    # The first runs: cancelled, it stops, and the job goes on with the next.
    await infra.cancel_task(first.task_id)
    with anyio.fail_after(10), pytest.raises(TaskCancelled):
        await first.result()
    assert await second.result() == {"slept": 0.3}
    assert runner.calls.get("sbatch", 0) == sbatch + 1, "one job for the three"
    assert not logs[2].exists()
    with anyio.fail_after(10):
        while job in await active(runner):
            await anyio.sleep(0.1)


async def test_a_held_pack_is_cancelled_once_for_all_its_tasks(
    infra: AgentInfra, runner: SlurmRunner, tmp_path: Path
) -> None:
    # Each task of a pack held as it ended (SPECIAL_EXIT) cancelled the job
    # itself: one scancel per task, where one for the job does.
    logs = [tmp_path / f"log{i}" for i in range(3)]
    payloads = [{"log": str(log), "seconds": 300} for log in logs]
    handles = await infra.submit_tasks("sleep", payloads, task_class="packed")
    await wait_for_line(logs[0])
    ((job_id, _),) = await active(runner)
    scancel = runner.calls.get("scancel", 0)
    await command("scontrol", "requeuehold", "State=SpecialExit", job_id.strip())
    for handle in handles:
        with anyio.fail_after(120), pytest.raises(TaskFailed, match="was requeued and held"):
            await handle.result()
    assert runner.calls.get("scancel", 0) == scancel + 1
    assert await active(runner) == []


async def test_a_requeued_pack_is_waited_for_and_does_not_outlive_the_instance(
    slurm: str, tmp_path: Path
) -> None:
    # Requeueing kills the pack's running task (its script records 143), and
    # Slurm runs the whole job again, with the same job id: that task is not
    # over, and its job must not run on after the instance closes.
    logs = [tmp_path / f"log{i}" for i in range(2)]
    payloads = [{"log": str(log), "seconds": 3} for log in logs]
    async with AgentInfra.start(config(tmp_path), state_dir=tmp_path / "state") as infra:
        runner = SlurmRunner.of_instance(infra.instance_id)
        assert runner is not None
        handles = await infra.submit_tasks("sleep", payloads, task_class="packed")
        await wait_for_line(logs[0])
        ((job_id, _),) = await active(runner)
        job_id = job_id.strip()
        await command("scontrol", "requeue", job_id)
        with anyio.fail_after(10):
            while "BeginTime" not in await command(
                "squeue", "-h", f"--jobs={job_id}", "--format=%r"
            ):
                await anyio.sleep(0.1)
        await anyio.sleep(2)  # as in test_a_requeued_job_does_not_use_up_an_attempt
        await command("scontrol", "update", f"jobid={job_id}", "starttime=now")
        with anyio.fail_after(60):
            for handle in handles:
                assert await handle.result() == {"slept": 3}
    assert runner is not None
    with anyio.fail_after(10):  # cancelled at close at the latest: it leaves the queue
        while await active(runner):
            await anyio.sleep(0.1)


def shim(tmp_path: Path, name: str, body: str) -> None:
    """Put a ``name`` first on PATH that runs ``body`` (bash; ``$real`` is the real command)."""
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"#!/bin/bash\nreal={shutil.which(name)}\n{body}\n")
    path.chmod(0o755)


def slurmctld_away(tmp_path: Path, *names: str) -> Path:
    """Shims of ``names`` that cannot reach slurmctld while the file returned exists."""
    down = tmp_path / "slurmctld-down"
    for name in names:
        shim(
            tmp_path,
            name,
            f'if [ -e {down} ]; then echo "{name}: error: Unable to contact slurm controller '
            '(connect failure)" >&2; exit 1; fi\nexec $real "$@"',
        )
    return down


async def a_running_job(infra: AgentInfra, log: Path) -> tuple[SlurmRunner, TaskHandle, str]:
    """A task of class s sleeping 300 s, its job running: its runner, its handle, the job id."""
    runner = SlurmRunner.of_instance(infra.instance_id)
    assert runner is not None
    payload = {"log": str(log), "seconds": 300}
    handle = await infra.submit_task("sleep", payload, task_class="s")
    await wait_for_line(log)
    ((job_id, _),) = await active(runner, handle.task_id)
    return runner, handle, job_id


async def test_a_preempted_job_is_submitted_again_though_its_command_recorded_the_signal(
    slurm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Preemption (PreemptMode=CANCEL) ends a job as a cancel does: SIGTERM to
    # all its processes, which the job script outlives to record 143. Its
    # state is then PREEMPTED: shown here by squeue, for the job named in
    # the file, as the cancelled job it really is could not be preempted on
    # a one-partition cluster.
    preempted = tmp_path / "preempted"
    shim(
        tmp_path,
        "squeue",
        f"job=$(cat {preempted} 2>/dev/null)\n"
        f'if [ -z "$job" ]; then exec $real "$@"; fi\n'
        f'$real "$@" | sed "s/^$job *|CANCELLED */$job|PREEMPTED/"',
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    log = tmp_path / "log"
    async with AgentInfra.start(config(tmp_path), state_dir=tmp_path / "state") as infra:
        runner = SlurmRunner.of_instance(infra.instance_id)
        assert runner is not None
        handle = await infra.submit_task("sleep", {"log": str(log), "seconds": 1}, task_class="s")
        await wait_for_line(log)
        ((job_id, _),) = await active(runner, handle.task_id)
        preempted.write_text(job_id)
        await command("scancel", job_id)
        with anyio.fail_after(60):
            assert await handle.result() == {"slept": 1}
        assert await anyio.Path(log).read_text() == "started\nstarted\n"
        assert (await handle.wait()).attempts == 1
        assert runner.calls["sbatch"] == 2


@pytest.mark.parametrize("tasks", [1, 3])  # a job, a job array
async def test_a_job_submitted_though_sbatch_timed_out_runs_once_and_is_not_left_behind(
    slurm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tasks: int
) -> None:
    # A busy slurmctld may take a job and answer too late: sbatch then says
    # its socket timed out, though the job is queued. Here the real sbatch
    # submits it, and its answer is replaced by that error, once.
    lose = tmp_path / "lose-the-answer"
    lose.touch()
    shim(
        tmp_path,
        "sbatch",
        f'if [ -e {lose} ]; then rm {lose}; $real "$@" >/dev/null || exit; '
        'echo "sbatch: error: Batch job submission failed: '
        'Socket timed out on send/recv operation" >&2; exit 1; fi\n'
        'exec $real "$@"',
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    log = tmp_path / "log"
    async with AgentInfra.start(config(tmp_path), state_dir=tmp_path / "state") as infra:
        runner = SlurmRunner.of_instance(infra.instance_id)
        assert runner is not None
        payload = {"log": str(log), "seconds": 1}
        handles = await infra.submit_tasks("sleep", [payload] * tasks, task_class="s")
        with anyio.fail_after(60):
            for handle in handles:
                assert await handle.result() == {"slept": 1}
        with anyio.fail_after(30):  # any other job of the tasks ends too
            while await active(runner):
                await anyio.sleep(0.1)
        assert runner.calls["sbatch"] == 1
    assert not lose.exists(), "the answer was lost"
    assert await anyio.Path(log).read_text() == "started\n" * tasks


async def test_a_job_submitted_as_slurmctld_went_away_for_long_is_followed_once_it_is_back(
    slurm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # slurmctld takes the job, and is then out of reach for longer than a
    # call waits for it (5 minutes; 1 s here): the task failed as refused,
    # and its job ran on, followed by nobody (its task run again, twice).
    monkeypatch.setattr(slurm_cli, "_PATIENCE", 1.0)
    down = slurmctld_away(tmp_path, "squeue")
    shim(
        tmp_path,
        "sbatch",
        f'if [ -e {down} ]; then $real "$@" >/dev/null || exit; '
        'echo "sbatch: error: Batch job submission failed: '
        'Socket timed out on send/recv operation" >&2; exit 1; fi\n'
        'exec $real "$@"',
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    log = tmp_path / "log"
    async with AgentInfra.start(config(tmp_path), state_dir=tmp_path / "state") as infra:
        runner = SlurmRunner.of_instance(infra.instance_id)
        assert runner is not None
        down.touch()
        handle = await infra.submit_task("sleep", {"log": str(log), "seconds": 1}, task_class="s")
        await wait_for_line(log)  # it runs, while the runner cannot tell
        await anyio.sleep(3)
        down.unlink()
        with anyio.fail_after(60):
            assert await handle.result() == {"slept": 1}
        assert runner.calls["sbatch"] == 1
    assert await anyio.Path(log).read_text() == "started\n"


@pytest.mark.parametrize(
    ("task_class", "words"),
    [("bad_partition", "invalid partition"), ("bad_gres", "generic resource")],
)
async def test_what_slurm_refuses_fails_the_task_clearly(
    infra: AgentInfra, runner: SlurmRunner, task_class: str, words: str
) -> None:
    handle = await infra.submit_task("echo", {}, task_class=task_class, task_id=task_class)
    with pytest.raises(TaskFailed) as caught:
        await handle.result()
    assert "Slurm refused the job" in caught.value.error
    assert words in caught.value.error.lower()
    assert await active(runner, task_class) == []


async def test_without_the_slurm_commands_the_class_refuses_tasks_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    async with AgentInfra.start(config(tmp_path), state_dir=tmp_path / "state") as infra:
        with pytest.raises(InvalidTask, match=r"Slurm commands on PATH; missing: sbatch"):
            await infra.submit_task("echo", {}, task_class="s", task_id="refused")
        with pytest.raises(InvalidTask, match="slurm-client"):
            await infra.submit_task("echo", {}, task_class="gpu_slurm", task_id="refused")
        with pytest.raises(UnknownTask):  # refused, not recorded
            await infra.get_task_status("refused")


async def test_without_slurmctld_a_task_fails_clearly(
    slurm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same cluster, as seen through a configuration whose controller
    # port nobody listens on: slurmctld "down", without stopping the real one.
    real = await anyio.Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text()
    text = re.sub(r"(?im)^\s*(SlurmctldPort|MessageTimeout)\s*=.*$", "", real)
    dead = tmp_path / "slurm.conf"
    dead.write_text(f"SlurmctldPort=9\nMessageTimeout=3\n{text}")
    monkeypatch.setenv("SLURM_CONF", str(dead))
    async with AgentInfra.start(config(tmp_path), state_dir=tmp_path / "state") as infra:
        handle = await infra.submit_task("echo", {}, task_class="s")
        with anyio.fail_after(30), pytest.raises(TaskFailed, match="slurmctld does not answer"):
            await handle.result()
        assert (await handle.wait()).state is TaskState.FAILED


async def test_an_instance_closed_by_a_cancel_around_it_stops_its_jobs_at_once(
    slurm: str, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    with anyio.CancelScope() as scope:  # as Ctrl-C, or a timeout around the instance
        async with AgentInfra.start(config(tmp_path), state_dir=tmp_path / "state") as infra:
            runner = SlurmRunner.of_instance(infra.instance_id)
            assert runner is not None
            await infra.submit_task("sleep", {"log": str(log), "seconds": 60}, task_class="s")
            await wait_for_line(log)
            started = time.monotonic()
            scope.cancel()
            await anyio.sleep_forever()
    assert time.monotonic() - started < 10
    assert runner is not None
    assert await active(runner) == []
    # The batch's script, manifest and log went with its job, as when the
    # instance closes otherwise.
    assert list((tmp_path / "state" / "slurm").iterdir()) == []


async def test_an_instance_closed_while_slurmctld_is_away_leaves_its_job_to_the_next(
    slurm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Closing waited for slurmctld 5 minutes per call to cancel a running job
    # (5.5 minutes in all), and then forgot the job, which ran on for good.
    down = slurmctld_away(tmp_path, "squeue", "scancel")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    async with AgentInfra.start(config(tmp_path), state_dir=tmp_path / "state") as infra:
        runner, _handle, job_id = await a_running_job(infra, tmp_path / "log")
        down.touch()
        started = time.monotonic()
    assert time.monotonic() - started < 45
    assert runner is not None
    down.unlink()
    assert (job_id, "RUNNING") in [(j, s.strip()) for j, s in await active(runner)]
    async with AgentInfra.start(config(tmp_path), state_dir=tmp_path / "state") as infra:
        with anyio.fail_after(30):  # cancelled as the next instance starts
            while job_id in [j for j, _ in await active(runner)]:
                await anyio.sleep(0.2)


async def test_a_job_left_to_the_next_instance_is_cancelled_though_it_starts_in_the_outage(
    slurm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The next instance looked for it once, as it started: slurmctld away,
    # it gave up, and the job ran on (its task run again meanwhile) for good.
    down = slurmctld_away(tmp_path, "squeue", "scancel", "sbatch", "scontrol")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    async with AgentInfra.start(config(tmp_path), state_dir=tmp_path / "state") as infra:
        runner, _handle, job_id = await a_running_job(infra, tmp_path / "log")
        down.touch()
    assert runner is not None
    async with AgentInfra.start(config(tmp_path), state_dir=tmp_path / "state") as infra:
        await anyio.sleep(1)
        down.unlink()
        with anyio.fail_after(60):  # cancelled once slurmctld answers
            while job_id in [j for j, _ in await active(runner)]:
                await anyio.sleep(0.2)


async def test_a_job_cancelled_while_slurmctld_is_away_is_cancelled_once_it_is_back(
    slurm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    down = slurmctld_away(tmp_path, "squeue", "scancel")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    async with AgentInfra.start(config(tmp_path), state_dir=tmp_path / "state") as infra:
        runner, handle, job_id = await a_running_job(infra, tmp_path / "log")
        down.touch()
        await infra.cancel_task(handle.task_id)
        with anyio.fail_after(45), pytest.raises(TaskCancelled):
            await handle.result()
        down.unlink()
        with anyio.fail_after(60):  # asked again, by this instance
            while job_id in [j for j, _ in await active(runner)]:
                await anyio.sleep(0.2)
        assert list((tmp_path / "state" / "slurm").iterdir()) == [], "its batch's files went"


async def test_any_state_dir_and_cwd_will_do(slurm: str, tmp_path: Path) -> None:
    # sbatch expands % in --output; bash $, ` and quotes in the script.
    odd = tmp_path / "50%j done, it's $HOME `true`"
    settings = config(odd / "handlers")
    settings["handlers"]["nowhere"] = {"command": ["true"], "cwd": str(odd / "gone")}
    async with AgentInfra.start(settings, state_dir=odd / "state") as infra:
        handle = await infra.submit_task("echo", {"odd": True}, task_class="s")
        assert await handle.result() == {"odd": True}
        handle = await infra.submit_task("nowhere", {}, task_class="s")
        with pytest.raises(TaskFailed) as caught:
            await handle.result()
        assert f"working directory {odd / 'gone'} does not exist on" in caught.value.error


async def test_a_handlers_env_names_are_not_run_by_the_job_script(
    slurm: str, tmp_path: Path
) -> None:
    # The job script sets the handler's env: a name is data, never shell.
    # (One that no process can have, with a '=', is refused as the config loads.)
    mark = tmp_path / "injected"
    settings = config(tmp_path / "handlers")
    show = "import os, sys; print(os.environ.get(sys.argv[1]))"
    for handler, name in (("names", f"X; touch {mark}; Y"), ("dashed", "A-B")):
        # Legal environment names, though not a shell variable's.
        settings["handlers"][handler] = {
            "command": [sys.executable, "-c", show, name],
            "env": {name: "set"},
        }
    async with AgentInfra.start(settings, state_dir=tmp_path / "state") as infra:
        for handler in ("names", "dashed"):
            handle = await infra.submit_task(handler, {}, task_class="s")
            assert await handle.result() == "set"
        assert not mark.exists(), "an env name was run as a command"


async def test_a_state_dir_slurm_cannot_take_is_refused_with_the_reason(
    slurm: str, tmp_path: Path
) -> None:
    # slurmd drops a backslash from --output: every job would fail to launch.
    odd = tmp_path / "a\\b"
    async with AgentInfra.start(config(odd / "handlers"), state_dir=odd / "state") as infra:
        with pytest.raises(InvalidTask, match="cannot use a state_dir with a backslash"):
            await infra.submit_task("echo", {}, task_class="s")


def test_a_job_slurm_could_not_launch_is_not_read_as_killed_by_a_signal(tmp_path: Path) -> None:
    info = JobInfo(job_id="7", state="FAILED", exit_status=4021, reason="JobLaunchFailure")
    output = JobOutput(code=None, raw=None, stdout=Tail(1, 10), stderr=Tail(1, 10), slurm=())
    files = AttemptFiles(
        work_dir=tmp_path, payload_file=tmp_path / "p", result_file=tmp_path / "r", values={}
    )
    with pytest.raises(RunFailed, match=r"Slurm job 7 could not be started .*JobLaunchFailure"):
        _result(info, output, files, packed=False, limit=100)


@pytest.mark.parametrize(
    ("code", "said"), [(1, "exited with code 1"), (143, "reached its time limit")]
)
def test_a_task_of_a_pack_slurm_ended_is_told_by_its_own_code_unless_killed(
    tmp_path: Path, code: int, said: str
) -> None:
    # The pack's TIMEOUT is the state of every task in it: a task that failed
    # of its own accord before the end keeps its failure.
    info = JobInfo(job_id="7_0", state="TIMEOUT", exit_status=None, reason="TimeLimit")
    output = JobOutput(code=code, raw=None, stdout=Tail(1, 10), stderr=Tail(1, 10), slurm=())
    files = AttemptFiles(
        work_dir=tmp_path, payload_file=tmp_path / "p", result_file=tmp_path / "r", values={}
    )
    with pytest.raises(RunFailed, match=said):
        _result(info, output, files, packed=True, limit=100)


@pytest.mark.parametrize("forward", ["USR1", "TERM"])
def test_a_command_ending_on_the_signal_passed_on_is_recorded_as_it_ended(
    tmp_path: Path, forward: str
) -> None:
    # The signal cuts the task script's wait short (128 + N), often as the
    # command exits: only the command's own status may be recorded. The
    # script run by bash directly, as a job runs it, many times over (the
    # two moments race).
    for i in range(20):
        work = tmp_path / str(i)
        work.mkdir()
        paths, ready = TaskPaths.of(work, 1), work / "ready"
        command = [
            "bash",
            "-c",
            # Waiting in the shell (not in sleep), it exits the moment the signal comes.
            f"sleep 100 & s=$!; trap 'kill $s; exit 3' {forward}; touch {ready}; wait",
        ]
        paths.script.write_text(
            task_script(title="t", argv=command, env={}, cwd=work, paths=paths, forward=forward)
        )
        script = subprocess.Popen(["bash", str(paths.script)])
        try:
            deadline = time.monotonic() + 10
            while not ready.exists() and time.monotonic() < deadline:
                time.sleep(0.005)
            script.send_signal(getattr(signal, f"SIG{forward}"))
            script.wait(timeout=10)
        finally:
            script.kill()
            script.wait()
        assert (i, paths.exit.read_text()) == (i, "3\n")


@pytest.mark.parametrize("empty_answers", [1, 2])
async def test_a_job_missing_from_squeue_is_believed_gone_only_twice_and_then_cancelled(
    slurm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_answers: int
) -> None:
    # squeue answers, without error, as if the queue were empty: a
    # controller's hiccup (as the first time), or the job has gone.
    real, empties = shutil.which("squeue"), tmp_path / "empties"
    squeue = tmp_path / "bin" / "squeue"
    squeue.parent.mkdir()
    squeue.write_text(
        f"#!/bin/bash\nn=$(cat {empties} 2>/dev/null || echo 0)\n"
        f'if [ "$n" -gt 0 ]; then echo $((n - 1)) >{empties}; exit 0; fi\nexec {real} "$@"\n'
    )
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{squeue.parent}{os.pathsep}{os.environ['PATH']}")
    log = tmp_path / "log"
    async with AgentInfra.start(config(tmp_path), state_dir=tmp_path / "state") as infra:
        runner = SlurmRunner.of_instance(infra.instance_id)
        assert runner is not None
        seconds = 10 if empty_answers == 1 else 60
        payload = {"log": str(log), "seconds": seconds}
        handle = await infra.submit_task("sleep", payload, task_class="s")
        await wait_for_line(log)
        empties.write_text(str(empty_answers))
        if empty_answers == 1:
            assert await handle.result() == {"slept": seconds}
        else:
            with pytest.raises(TaskFailed, match="left the queue without recording"):
                await handle.result()
            empties.write_text("0")
            with anyio.fail_after(10):  # cancelled, not left running
                while await active(runner):
                    await anyio.sleep(0.1)


OWNER = """
import json, os, sys
import anyio
from dspy_infra import AgentInfra

if os.environ.get("OWNER_OF_AN_EARLIER_VERSION"):
    # It named its jobs after the state dir's path as given, not its real path.
    import hashlib
    from dspy_infra.runners.slurm import runner

    def named_as_before(project, state_dir, user):
        digest = hashlib.sha256(f"{user}\\0{state_dir.absolute()}".encode()).hexdigest()[:10]
        return [f"dspy-infra.{project}.{digest}"]

    runner.owner_names = named_as_before

state_dir, config, payloads = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
max_attempts = int(sys.argv[4])

async def main():
    async with AgentInfra.start(config, state_dir=state_dir) as infra:
        for i, payload in enumerate(payloads):
            await infra.submit_task(
                "sleep", payload, task_class="s", task_id=f"survivor{i}",
                max_attempts=max_attempts,
            )
        await anyio.sleep_forever()

anyio.run(main)
"""


def owner_argv(
    tmp_path: Path,
    settings: dict[str, Any],
    state_dir: Path,
    payloads: list[dict[str, Any]],
    *,
    max_attempts: int = 2,
) -> list[str]:
    """The command line of an owner (OWNER, a process of its own) of ``payloads``' tasks."""
    script = tmp_path / "owner.py"
    script.write_text(textwrap.dedent(OWNER))
    return [
        sys.executable,
        str(script),
        str(state_dir),
        json.dumps(settings),
        json.dumps(payloads),
        str(max_attempts),
    ]


async def test_after_a_crash_the_next_owner_re_attaches_the_running_jobs(
    slurm: str, tmp_path: Path
) -> None:
    settings, state_dir, logs, payloads = await an_owner_killed(tmp_path, 3, started=1)
    async with AgentInfra.start(settings, state_dir=state_dir) as infra:
        handles = await resubmitted_and_reattached(infra, payloads, logs)
        for handle in handles:
            assert (await handle.wait()).attempts == 2  # the crash used one up, the job did not
    assert not list((state_dir / "slurm").glob("*.json")), "the batch's files are gone"


@pytest.mark.parametrize("earlier_version", [False, True])
async def test_after_a_crash_the_jobs_are_found_whatever_path_led_to_the_state_dir(
    slurm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, earlier_version: bool
) -> None:
    # The owner reached the state dir through a symlink; the next one, by its
    # real path. An owner of an earlier version named its jobs after the path
    # as given: the next one, on the same path, finds them all the same.
    real, link = tmp_path / "state", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real)
    if earlier_version:
        monkeypatch.setenv("OWNER_OF_AN_EARLIER_VERSION", "1")
    settings, _, logs, payloads = await an_owner_killed(tmp_path, 2, started=2, state_dir=link)
    async with AgentInfra.start(settings, state_dir=link if earlier_version else real) as infra:
        await resubmitted_and_reattached(infra, payloads, logs)


async def test_after_a_crash_a_busy_controller_does_not_lose_the_running_jobs(
    slurm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The next owner's search for the jobs meets a busy slurmctld, once:
    # it asks again, as any other call does, rather than give the jobs up
    # (its tasks submitted again beside them, and the jobs never cancelled).
    settings, state_dir, logs, payloads = await an_owner_killed(tmp_path, 2, started=2)
    busy = tmp_path / "busy"
    busy.touch()
    shim(
        tmp_path,
        "squeue",
        f"if [ -e {busy} ]; then rm {busy}; "
        'echo "squeue: error: slurm_load_jobs error: Resource temporarily unavailable" >&2; '
        'exit 1; fi\nexec $real "$@"',
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    async with AgentInfra.start(settings, state_dir=state_dir) as infra:
        with anyio.fail_after(60):
            await resubmitted_and_reattached(infra, payloads, logs)
    assert not busy.exists(), "the controller was busy"


async def test_after_a_crash_a_job_slurm_held_as_it_ended_is_cancelled_and_its_task_runs_again(
    slurm: str, tmp_path: Path
) -> None:
    settings, state_dir, logs, payloads = await an_owner_killed(tmp_path, 1, started=1)
    (name, *_) = owner_names("dspy-infra", state_dir, str(os.getuid()))
    job_id = (await command("squeue", "--noheader", f"--name={name}", "--format=%i")).strip()
    await command("scontrol", "requeuehold", "State=SpecialExit", job_id)
    with anyio.fail_after(30):  # held once its run has ended
        while "SPECIAL_EXIT" not in await command("squeue", "-h", f"--jobs={job_id}", "-o%T"):
            await anyio.sleep(0.1)
    async with AgentInfra.start(settings, state_dir=state_dir) as infra:
        runner = SlurmRunner.of_instance(infra.instance_id)
        assert runner is not None
        handle = await infra.submit_task(
            "sleep", payloads[0], task_class="s", task_id="survivor0", max_attempts=2
        )
        with anyio.fail_after(60):
            assert await handle.result() == {"slept": 4}
        assert await anyio.Path(logs[0]).read_text() == "started\nstarted\n"
        assert await active(runner, "survivor0") == [], "held, it would run again if released"


async def an_owner_killed(
    tmp_path: Path, count: int, *, started: int, state_dir: Path | None = None
) -> tuple[dict[str, Any], Path, list[Path], list[dict[str, Any]]]:
    """An owner (a process of its own) of ``count`` tasks of 4 s, SIGKILLed once
    ``started`` of them began: its settings, state dir, the tasks' logs and payloads."""
    settings = config(tmp_path / "handlers")
    state_dir = state_dir or tmp_path / "state"
    logs = [tmp_path / f"log{i}" for i in range(count)]
    payloads = [{"log": str(log), "seconds": 4} for log in logs]
    argv = owner_argv(tmp_path, settings, state_dir, payloads)
    async with await anyio.open_process(argv) as owner:
        try:
            for log in logs[:started]:
                await wait_for_line(log)
        finally:
            os.kill(owner.pid, signal.SIGKILL)
    return settings, state_dir, logs, payloads


async def resubmitted_and_reattached(
    infra: AgentInfra, payloads: list[dict[str, Any]], logs: list[Path]
) -> list[TaskHandle]:
    """The killed owner's tasks, submitted again under their ids, finish in the
    jobs it had started: none submitted again, each command run once."""
    runner = SlurmRunner.of_instance(infra.instance_id)
    assert runner is not None
    # All at once: none may look for its job before the search for them is done.
    handles = [
        await infra.submit_task(
            "sleep", payload, task_class="s", task_id=f"survivor{i}", max_attempts=2
        )
        for i, payload in enumerate(payloads)
    ]
    for handle in handles:
        assert await handle.result() == {"slept": 4}
    assert runner.calls.get("sbatch", 0) == 0, "re-attached, not submitted again"
    for log in logs:
        assert await anyio.Path(log).read_text() == "started\n"
    return handles


async def test_after_a_crash_the_jobs_of_tasks_left_no_attempt_are_cancelled_at_start(
    slurm: str, tmp_path: Path
) -> None:
    settings = config(tmp_path / "handlers")
    state_dir = tmp_path / "state"
    log = tmp_path / "log"
    payloads = [{"log": str(log), "seconds": 120}]
    argv = owner_argv(tmp_path, settings, state_dir, payloads, max_attempts=1)
    async with await anyio.open_process(argv) as owner:
        try:
            await wait_for_line(log)
        finally:
            os.kill(owner.pid, signal.SIGKILL)
    async with AgentInfra.start(settings, state_dir=state_dir) as infra:
        runner = SlurmRunner.of_instance(infra.instance_id)
        assert runner is not None
        assert (await infra.get_task_status("survivor0")).state is TaskState.LOST
        assert await active(runner, "survivor0"), "its job ran on"
        # Its task will never take it over: it must not run for as long as
        # this instance is open (it could be days), holding its allocation.
        with anyio.fail_after(30):
            while await active(runner, "survivor0"):
                await anyio.sleep(0.1)
    assert not list((state_dir / "slurm").glob("*.json")), "the batch's files are gone"


async def test_after_a_crash_mid_sbatch_a_job_slurm_takes_later_does_not_run_its_task(
    slurm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The owner dies while its sbatch is on its way (sbatch has read the
    # script; slurmctld takes the job a moment later). The next owner finds
    # no job for the batch, nor an exit code, and marks the task (its last
    # attempt) lost: the job slurmctld takes after that must not run it.
    sent, go, read = tmp_path / "sbatch-sent", tmp_path / "go", tmp_path / "script-as-read.sh"
    shim(
        tmp_path,
        "sbatch",
        f'cp "${{@: -1}}" {read}; touch {sent}\n'
        f"for _ in $(seq 600); do [ -e {go} ] && break; sleep 0.05; done\n"
        f"[ -e {go} ] || exit 1\n"
        # The owner, and the pipes sbatch would answer on, are gone by now.
        f'exec $real "${{@:1:$#-1}}" {read} >/dev/null 2>&1',
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    settings = config(tmp_path / "handlers")
    state_dir, log = tmp_path / "state", tmp_path / "log"
    payloads = [{"log": str(log), "seconds": 1}]
    argv = owner_argv(tmp_path, settings, state_dir, payloads, max_attempts=1)
    async with await anyio.open_process(argv) as owner:
        try:
            with anyio.fail_after(30):
                while not sent.exists():
                    await anyio.sleep(0.02)
        finally:
            os.kill(owner.pid, signal.SIGKILL)
    (name, *_) = owner_names("dspy-infra", state_dir, str(os.getuid()))
    async with AgentInfra.start(settings, state_dir=state_dir) as infra:
        assert (await infra.get_task_status("survivor0")).state is TaskState.LOST
        with anyio.fail_after(30):  # the next owner has looked for the batch's job
            while list((state_dir / "slurm").glob("*.json")):
                await anyio.sleep(0.05)
        go.touch()
        with anyio.fail_after(30):
            while not (
                job := (await command("squeue", "-h", f"--name={name}", "-tall", "-o%i")).strip()
            ):
                await anyio.sleep(0.1)
            while "COMPLETED" not in await command(
                "squeue", "-h", f"--jobs={job}", "-tall", "-o%T"
            ):
                await anyio.sleep(0.1)
    assert not log.exists(), "the job ran the task its owner's successor had marked lost"


# -- pieces the cluster cannot show on demand ---------------------------------


def test_array_indices_are_written_as_ranges() -> None:
    assert array_ranges([0, 1, 2, 3]) == "0-3"
    assert array_ranges([0, 2, 3, 4, 7, 9, 10]) == "0,2-4,7,9-10"
    assert array_ranges([5]) == "5"


def test_job_options_come_from_the_class_the_resources_and_the_timeout(tmp_path: Path) -> None:
    from dspy_infra.abc import TaskRun  # noqa: PLC0415
    from dspy_infra.config.model import TaskClass  # noqa: PLC0415

    task_class = TaskClass(
        runner="slurm",
        partition="gpu",
        account="lab",
        qos="high",
        gres="gpu:a100:2",
        cpus=1.0,
        signal="USR1@90",
        array_throttle=4,
        cancel_grace=5,
    )

    def attempt(**resources: Any) -> TaskRun:
        return TaskRun(
            task_id="t",
            handler="h",
            payload=None,
            attempt=1,
            task_class="sl",
            class_config=task_class,
            tasks_dir=tmp_path,
            **resources,
        )

    # The scheduler fills in the task's own resources, else the class's.
    options = JobOptions.of(attempt(cpus=1.5, memory_mb=2048), seconds_left=600)
    assert options.args() == [
        "--partition=gpu",
        "--account=lab",
        "--qos=high",
        "--gres=gpu:a100:2",
        "--time=12",  # 600 s + grace + a minute, in minutes, rounded up
        "--cpus-per-task=2",
        "--mem=2048M",
        "--signal=B:USR1@90",
    ]
    assert options.forward == "USR1"
    assert JobOptions.of(attempt(gpu_count=2), seconds_left=600).args()[5] == "--gpus=2"
    bare = TaskRun(
        task_id="t",
        handler="h",
        payload=None,
        attempt=1,
        task_class="sl",
        class_config=TaskClass(runner="slurm"),
        tasks_dir=tmp_path,
    )
    assert JobOptions.of(bare, seconds_left=float("inf")).args() == []


def test_squeue_and_sacct_lines_are_read() -> None:
    jobs = parse_squeue("12_3|COMPLETED|768|abc|None\n13|PENDING|0|(null)|Resources\n")
    assert jobs["12_3"].state == "COMPLETED"
    assert jobs["12_3"].exit_status == 768
    assert jobs["12_3"].final
    assert jobs["13"].comment == ""
    assert not jobs["13"].final
    done = parse_sacct("12_3|CANCELLED by 0|0:15\n14|FAILED|3:0\n")
    assert done["12_3"].state == "CANCELLED"
    assert done["12_3"].exit_status == 15
    assert done["14"].exit_status == 3 << 8


# Every state squeue or sacct reports a job in once it will do nothing more.
ENDS = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "DEADLINE",
    "REVOKED",
    "BOOT_FAIL",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "SPECIAL_EXIT",
)
NOT_ENDS = (
    "PENDING",
    "RUNNING",
    "COMPLETING",
    "CONFIGURING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "RESV_DEL_HOLD",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
    "SUSPENDED",
)


@pytest.mark.parametrize("state", [*ENDS, "CANCELLED by 0", *NOT_ENDS])
def test_every_state_that_ends_a_job_is_read_as_its_end(state: str) -> None:
    ends = state.split(maxsplit=1)[0] in ENDS
    assert parse_squeue(f"12_3|{state}|0|abc|None\n")["12_3"].final is ends
    assert parse_sacct(f"12_3|{state}|0:0\n")["12_3"].final is ends


@pytest.mark.parametrize("state", sorted({*ENDS} - {"COMPLETED", "FAILED"}))
def test_a_job_slurm_ended_says_why_not_the_signal_its_command_died_of(
    tmp_path: Path, state: str
) -> None:
    info = JobInfo(job_id="7", state=state, exit_status=None, reason="None")
    output = JobOutput(code=143, raw=None, stdout=Tail(1, 10), stderr=Tail(1, 10), slurm=())
    files = AttemptFiles(
        work_dir=tmp_path, payload_file=tmp_path / "p", result_file=tmp_path / "r", values={}
    )
    with pytest.raises(RunFailed) as caught:
        _result(info, output, files, packed=False, limit=100)
    assert "signal" not in str(caught.value)
    assert "record an exit code" not in str(caught.value)  # said why, not just the state


def test_slurm_errors_are_sorted_by_what_to_do_about_them() -> None:
    down = "sbatch: error: Batch job submission failed: Unable to contact slurm controller"
    assert classify(down) == "unreachable"
    limit = "sbatch: error: QOSMaxSubmitJobPerUserLimit"
    assert classify(limit) == "busy"
    assert classify("sbatch: error: Slurm temporarily unable to accept job") == "busy"
    assert classify("sbatch: error: invalid partition specified: x") == "final"


async def test_the_pacer_halves_its_rate_on_trouble_and_recovers_step_by_step() -> None:
    pacer = Pacer(rate=40, burst=1, max_rate=40, step=2)
    pacer.trouble()
    pacer.trouble()
    assert pacer.rate == 10
    started = time.monotonic()
    for _ in range(3):
        await pacer.acquire()
    # The bucket was emptied by the trouble: three tokens at 10/s take ~0.3 s.
    assert time.monotonic() - started >= 0.25
    pacer.success()
    assert pacer.rate == 12  # one step up, not straight back
    for _ in range(20):
        pacer.success()
    assert pacer.rate == 40  # and no further than max_rate


async def test_a_hung_query_gives_way_to_a_cancel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    squeue = tmp_path / "bin" / "squeue"  # of a controller that does not answer
    squeue.parent.mkdir()
    squeue.write_text("#!/bin/sh\nexec sleep 1000\n")
    squeue.chmod(0o755)
    monkeypatch.setenv("PATH", f"{squeue.parent}{os.pathsep}{os.environ['PATH']}")
    started = time.monotonic()
    with anyio.move_on_after(0.5):  # as close() ends the poller
        await SlurmCli().call(["squeue"], retry=False)
    assert time.monotonic() - started < 5


async def test_a_controller_away_for_long_fails_a_call_that_need_not_wait_for_it(
    slurm: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every call whose controller went away waited for it for ever (as only
    # an sbatch that may have been taken must): a scancel, shielded as a
    # stop's, held up the close of the instance for as long as it was away.
    monkeypatch.setattr(slurm_cli, "_PATIENCE", 1.0)
    down = slurmctld_away(tmp_path, "scancel")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    cli = SlurmCli()
    await cli.scancel(["999999999"])  # it answered once (no such job)
    down.touch()
    with anyio.fail_after(30), pytest.raises(slurm_cli.SlurmError):
        await cli.scancel(["999999999"])
