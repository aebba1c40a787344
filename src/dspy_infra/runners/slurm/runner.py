"""The Slurm runner itself: attempts in, jobs out, results back.

See the package's docstring for the whole picture. This module ties the
parts together: :class:`~dspy_infra.runners.slurm.submit.Submitter` turns
attempts into jobs, :class:`~dspy_infra.runners.slurm.poller.Poller` says
when they end, :mod:`~dspy_infra.runners.slurm.files` reads what they left;
here are the attempt's life (:meth:`SlurmRunner.run`), stopping a job, and
re-attaching to the jobs of a previous owner of the state dir.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup

from dspy_infra._exit_codes import from_shell
from dspy_infra.abc import RunFailed, RunnerContext, TaskRun
from dspy_infra.config.model import HandlerConfig
from dspy_infra.errors import BackendUnavailable
from dspy_infra.runners._commands import (
    AttemptFiles,
    attempt_env,
    command_argv,
    outcome,
    validate_handler,
)
from dspy_infra.runners.slurm.cli import SlurmCli, SlurmError
from dspy_infra.runners.slurm.files import (
    Entry,
    JobOutput,
    Manifest,
    exit_code,
    read_manifests,
    read_output,
    request_cancel,
)
from dspy_infra.runners.slurm.poller import GONE, JobInfo, Poller, list_jobs
from dspy_infra.runners.slurm.script import JobOptions, owner_names, task_script
from dspy_infra.runners.slurm.submit import Batch, Request, Submitter

__all__ = ["SlurmRunner"]

log = logging.getLogger("dspy_infra.slurm")

# Ends that are the cluster's doing, not the task's: the job is submitted
# again within the same attempt, so that they use up none of its retries.
_CLUSTER_FAULTS = frozenset({"PREEMPTED", "NODE_FAIL", "BOOT_FAIL"})
_MAX_RESUBMITS = 3
# The reason of a job whose script slurmd could not start: its exit status
# is then Slurm's error number (4021), no wait status.
_LAUNCH_FAILED = "JobLaunchFailure"
_ENDED = frozenset({"COMPLETED", "FAILED"})
# Ends that Slurm brings about itself: a command that recorded how it died
# of them was killed by Slurm, which says better why.
_ENDED_BY_SLURM = frozenset(
    {"TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
)
# After SIGKILL, how long a job may take to leave the running states.
_STOP_WAIT = 30.0
# How long close() waits for submissions in flight and the cancelling of
# jobs nobody claimed.
_CLOSE_WAIT = 30.0
# Between searches for the jobs of a previous owner while slurmctld is away.
_SEARCH_AGAIN = 30.0


class SlurmRunner:
    """Task attempts as Slurm jobs; bursts as job arrays; one poller for all."""

    _open: ClassVar[weakref.WeakValueDictionary[str, SlurmRunner]] = weakref.WeakValueDictionary()

    def __init__(self) -> None:
        self._context: RunnerContext | None = None
        self._cli: SlurmCli | None = None
        self._poller: Poller | None = None
        self._submitter: Submitter | None = None
        self._group: TaskGroup | None = None
        self._name = ""
        self._names: list[str] = []  # of its jobs, and of an earlier version's
        self._manifests: list[Manifest] = []
        self._orphans: dict[str, Request] = {}
        self._recovering = anyio.Lock()
        # The poller's scope: shielded, so that it outlives a cancel of the
        # scope around the instance (Ctrl-C), which the attempts' stopping
        # and close() still need it for; close() ends it.
        self._polling = anyio.CancelScope(shield=True)
        # Set once the jobs of a previous owner are sorted: until then an
        # attempt cannot tell whether its task's job is still running.
        # (The lock makes the others wait while the first one looks.)
        self._recovered = False

    @property
    def name(self) -> str:
        return "slurm"

    @classmethod
    def of_instance(cls, instance_id: str) -> SlurmRunner | None:
        """The open Slurm runner of an :class:`~dspy_infra.AgentInfra`, by its ``instance_id``.

        For tests and benchmarks, which count the runner's calls to Slurm.
        """
        return cls._open.get(instance_id)

    @property
    def calls(self) -> Mapping[str, int]:
        """Slurm commands run so far, by command (``sbatch``, ``squeue``...)."""
        return dict(self._cli.calls) if self._cli is not None else {}

    @property
    def poll_cycles(self) -> int:
        return self._poller.cycles if self._poller is not None else 0

    @property
    def job_name(self) -> str:
        """The job name every job of this owner carries."""
        return self._name

    async def open(self, context: RunnerContext) -> list[str]:
        directory = (context.state_dir / "slurm").absolute()

        def look() -> tuple[list[str], list[Manifest], list[str]]:
            missing = SlurmCli.missing()
            if missing:
                return missing, [], []
            names = owner_names(context.project, context.state_dir, str(os.getuid()))
            return missing, read_manifests(directory), names

        if "\\" in str(directory):
            # slurmd drops a backslash from --output (and stops expanding %
            # there): every job would fail to launch, not to be submitted.
            raise BackendUnavailable(
                f"the slurm runner cannot use a state_dir with a backslash in it "
                f"({str(context.state_dir)!r}): Slurm reads the log paths under it wrongly"
            )
        missing, manifests, names = await anyio.to_thread.run_sync(look)
        if missing:
            raise BackendUnavailable(
                f"the slurm runner needs the Slurm commands on PATH; missing: {', '.join(missing)} "
                "(run on a cluster's login node, or install the Slurm client: "
                "apt-get install slurm-client)"
            )
        cli = SlurmCli()
        name = names[0]
        # Entered here and left in close(), by the same task (the scheduler's):
        # the poller and the submissions live in it.
        group = anyio.create_task_group()
        await group.__aenter__()
        poller = Poller(cli, names)
        group.start_soon(self._poll, poller)
        self._context, self._cli, self._poller, self._group = context, cli, poller, group
        self._submitter = Submitter(cli, directory, name, group)
        self._name, self._names = name, names
        # Jobs of a previous owner are looked for when they matter: at once
        # if some ran the last attempt of their task (marked lost, it will
        # never take its job over), else at the first attempt, or at close.
        # An instance that never uses Slurm never calls it.
        self._manifests = manifests
        self._recovered = not manifests
        self._open[context.instance_id] = self
        if any(e.last or e.cancelled for m in manifests if m.name in names for e in m.entries):
            group.start_soon(self._recover_soon)
        return []

    async def _recover_soon(self) -> None:
        """Jobs left to cancel are looked for until slurmctld answers, not only
        when the next attempt comes (none may come) or at close."""
        await self._recover()
        while not self._recovered:
            await anyio.sleep(_SEARCH_AGAIN)
            await self._recover()

    async def _poll(self, poller: Poller) -> None:
        with self._polling:
            await poller.run()

    def validate(self, handler: str) -> str | None:
        return validate_handler("slurm", self._context, handler)

    async def run(self, run: TaskRun) -> Any:
        context, poller, submitter = self._context, self._poller, self._submitter
        if context is None or poller is None or submitter is None:
            raise RuntimeError("SlurmRunner.run() before open()")
        handler = run.handler_config or context.config.handlers.get(run.handler)
        if handler is None or handler.command is None:
            raise RunFailed(self.validate(run.handler) or f"no command for {run.handler!r}")
        files = AttemptFiles.of(run)
        if not self._recovered:
            await self._recover()
        request = self._orphans.pop(run.task_id, None)
        if request is not None:
            log.info("task %r: re-attached to Slurm job %s", run.task_id, request.job_id)
        resubmits = 0
        while True:
            if request is None:
                request = self._request(run, handler, files)
                submitter.add(request)
            try:
                info = await self._follow(request, run.class_config.cancel_grace)
                output = await anyio.to_thread.run_sync(
                    read_output,
                    request.entry.paths,
                    files.result_file,
                    request.slurm_log,
                    context.config.infra.max_result_bytes,
                )
            finally:
                if request.job_id is not None:
                    poller.forget(request.job_id)
                    if not request.left_running:
                        submitter.release(request)
            if request.final is None and (
                info.held or (info.state == GONE and output.code is None)
            ):
                await self._cancel_gone(request, info.job_id)
            cluster_fault = info.state in _CLUSTER_FAULTS and (
                output.code is None or _killed_by_slurm(output.code, packed=request.packed)
            )
            if cluster_fault and resubmits < _MAX_RESUBMITS:
                resubmits += 1
                log.warning(
                    "task %r: Slurm job %s ended %s: submitting it again (%d of %d)",
                    run.task_id,
                    info.job_id,
                    info.state,
                    resubmits,
                    _MAX_RESUBMITS,
                )
                request = None
                continue
            return _result(
                info,
                output,
                files,
                packed=request.packed,
                limit=context.config.infra.max_result_bytes,
            )

    def _request(self, run: TaskRun, handler: HandlerConfig, files: AttemptFiles) -> Request:
        entry = Entry(
            task_id=run.task_id,
            attempt=run.attempt,
            work_dir=files.work_dir,
            last=run.attempt >= run.max_attempts,
        )
        # The attempt's timeout is the deadline of the scope it runs in.
        seconds_left = anyio.current_effective_deadline() - anyio.current_time()
        options = JobOptions.of(run, seconds_left=seconds_left)
        script = task_script(
            title=f"task {run.task_id} attempt {run.attempt} (handler {run.handler})",
            argv=command_argv(run.handler, handler, files.values),
            env=attempt_env(handler, run, files.values),
            cwd=Path(handler.cwd) if handler.cwd is not None else files.work_dir,
            paths=entry.paths,
            forward=options.forward,
            packed=options.pack > 1,
            grace=run.class_config.cancel_grace,
        )
        return Request(entry, options=options, files=files, payload=run.payload, script=script)

    async def _follow(self, request: Request, grace: float) -> JobInfo:
        """Wait for the request's job to end; stop it if the attempt is cut short."""
        poller = self._poller
        assert poller is not None
        ended = False
        try:
            job_id = await request.submitted()
            if request.final is not None:
                info = request.final
            elif request.packed:
                info = await poller.ended(job_id, request.entry.paths.exit)
                if not info.final:
                    code = await anyio.to_thread.run_sync(exit_code, request.entry.paths)
                    if code is not None and code > 128:
                        # Killed while its job runs on: the job may have been
                        # requeued (it then runs this task again, and records
                        # anew), preempted or cancelled. Its end says which.
                        request.killed = True
                        info = await poller.final(job_id)
                if (
                    not info.final
                    and any(r.killed for r in request.group)
                    and all(r.stopping for r in request.group if r is not request)
                ):
                    # The last of a pack one of whose tasks was killed: what its
                    # job would still run (all of it again, if Slurm requeued
                    # it) nobody follows. Not otherwise: a pack that ran through
                    # is ending on its own, and a scancel each would make the
                    # calls grow with the packs, not with the poll cycles.
                    with anyio.CancelScope(shield=True):
                        await self._cancel_gone(request, job_id)
            else:
                info = await poller.final(job_id)
            ended = True
        finally:
            if not ended:
                with anyio.CancelScope(shield=True):
                    if request.abandon() and request.job_id is not None:
                        if request.packed:
                            stopped = await self._stop_packed(request, grace)
                        else:
                            stopped = await self._stop(request.job_id, grace)
                        if not stopped:
                            self._cancel_later(request)
            request.stopping = True
        return info

    async def _stop_packed(self, request: Request, grace: float) -> bool:
        """Stop one attempt of a pack: by its file, or the whole job if it is the last one.

        False when the job could not be cancelled (see :meth:`_stop`).
        """
        job_id, poller = request.job_id, self._poller
        assert job_id is not None
        assert poller is not None
        request.stopping = True
        if all(r.stopping or r.cancelled for r in request.group):
            return await self._stop(job_id, grace)
        try:
            started = await anyio.to_thread.run_sync(request_cancel, request.entry.paths)
        except OSError as exc:
            log.warning("cannot tell task %r to stop: %s", request.entry.task_id, exc)
            return True
        if started:  # else its script will see the file when its turn comes, and exit
            poller.hurry()
            with anyio.move_on_after(grace + _STOP_WAIT):
                await poller.ended(job_id, request.entry.paths.exit)
                return True
            log.warning("task %r of Slurm job %s has not stopped", request.entry.task_id, job_id)
        return True

    async def _stop(self, job_id: str, grace: float) -> bool:
        """SIGTERM to every process of the job, SIGKILL after ``grace``; then wait for its end.

        False when slurmctld could not be told to cancel it within ``grace`` +
        :data:`_STOP_WAIT` (it is away): the attempt does not wait longer
        for it, nor does a close (it would wait 5 minutes per call).
        """
        cli, poller = self._cli, self._poller
        assert cli is not None
        assert poller is not None
        info = poller.latest(job_id)
        with anyio.move_on_after(max(grace, 1.0) + _STOP_WAIT):
            try:
                if info is not None and info.running:
                    poller.hurry()
                    # Bounded: Slurm retries a signal to a job in transition.
                    with anyio.move_on_after(max(grace, 1.0)):
                        await cli.scancel([job_id], signal="TERM", full=True)
                        await poller.final(job_id)
                        return True
                    await cli.scancel([job_id], signal="KILL", full=True)
                # Pending (or not seen yet): cancelling it is all there is to do.
                await cli.scancel([job_id])
            except SlurmError as exc:
                log.warning("cannot stop Slurm job %s: %s", job_id, exc)
                return False
            with anyio.move_on_after(_STOP_WAIT):
                await poller.final(job_id)
                return True
            log.warning(
                "Slurm job %s was cancelled but has not ended after %g s", job_id, _STOP_WAIT
            )
            return True
        return False

    def _cancel_later(self, request: Request) -> None:
        """A job slurmctld could not be told to cancel: it is asked again until it is.

        Until then the batch's files stay, its tasks marked cancelled (their
        ``.cancel`` file): if this instance closes first, the next one on
        the state dir cancels the job as it starts.
        """
        group, job_id = self._group, request.job_id
        assert job_id is not None
        log.warning(
            "Slurm job %s will be cancelled once slurmctld answers (by the next instance "
            "on this state_dir, if this one closes first)",
            job_id,
        )
        request.left_running = True
        if group is not None:  # else closed: the next instance it is
            group.start_soon(self._cancel_when_back, request, job_id)

    async def _cancel_when_back(self, request: Request, job_id: str) -> None:
        cli, submitter = self._cli, self._submitter
        assert cli is not None
        assert submitter is not None
        try:
            await anyio.to_thread.run_sync(
                lambda: [request_cancel(r.entry.paths) for r in request.group]
            )
        except OSError as exc:
            log.warning("cannot mark the tasks of Slurm job %s cancelled: %s", job_id, exc)
        while True:
            try:
                await cli.scancel([job_id])
            except SlurmError:  # after waiting for slurmctld: again, until the close
                await anyio.sleep(_STOP_WAIT)
                continue
            break
        submitter.release(request)

    async def _cancel_gone(self, request: Request, job_id: str) -> None:
        """A job judged gone that left no exit code may yet run, unseen, and a held one
        (SPECIAL_EXIT) would run again if released: neither may outlive its attempt.

        Once per job: the other attempts of a pack see it end as this one did.
        """
        cli = self._cli
        assert cli is not None
        if any(r.job_cancelled for r in request.group):
            return
        request.job_cancelled = True
        try:
            await cli.scancel([job_id])
        except SlurmError as exc:
            log.warning("cannot cancel Slurm job %s, which left no exit code: %s", job_id, exc)

    # -- jobs of a previous owner ---------------------------------------------

    async def _recover(self) -> None:
        """Find the jobs that a previous owner of the state dir left, once slurmctld answers.

        Every caller waits for the first one to finish: an attempt that
        looked in ``_orphans`` before would submit its task again while
        its job still runs (and the new job would be cancelled as a stray).
        Those still running (or finished well: their result is in the work
        dir) wait in ``_orphans`` for their task's next attempt, which takes
        them over instead of submitting again. Jobs of this owner that no
        manifest explains are cancelled. While slurmctld is away, the search
        is left to the next caller: giving up would forget the jobs that
        must be cancelled (whose tasks are run again meanwhile).
        """
        cli, submitter = self._cli, self._submitter
        assert cli is not None
        assert submitter is not None
        async with self._recovering:
            if self._recovered:
                return
            manifests = self._manifests  # kept until done: a cancelled search starts over
            try:
                # Retried: a busy controller's refusal, which the poller shrugs
                # off, must not lose the jobs here.
                jobs = await list_jobs(cli, self._names, retry=True)
            except SlurmError as exc:
                log.warning("cannot look for the Slurm jobs of a previous run: %s", exc)
                if exc.kind == "final":  # else slurmctld is away: the next caller looks again
                    self._done_recovering()
                return
            ours = [m for m in manifests if m.name in self._names]
            candidates: list[tuple[Request, JobInfo | None]] = []
            for manifest in ours:
                batch = Batch(manifest.batch, len(manifest.entries))
                groups: dict[int, list[Request]] = {}
                for entry in manifest.entries:
                    info = _job_of(jobs, manifest, entry)
                    request = Request.attached(entry, info.job_id if info else "", batch)
                    request.group = groups.setdefault(entry.index, [])
                    request.group.append(request)
                    candidates.append((request, info))
            codes = await anyio.to_thread.run_sync(_recorded_codes, candidates)
            explained = {i.job_id for _, i in candidates if i is not None}
            # Held as they ended: what they ran is read below, as for any end.
            unwanted = {i.job_id for _, i in candidates if i is not None and i.held}
            for (request, info), code in zip(candidates, codes, strict=True):
                task_id = request.entry.task_id
                if info is not None and not info.final:
                    if all(r.entry.last or r.entry.cancelled for r in request.group):
                        unwanted.add(info.job_id)
                    elif not request.entry.cancelled:  # (else stopped alone, its pack runs on)
                        self._orphans[task_id] = request
                        continue
                    request.stopping = True
                    submitter.release(request)
                elif code == 0:
                    # It ended well while nobody watched: its result is in its work dir.
                    request.final = info or JobInfo(job_id=request.job_id or "?", state=GONE)
                    self._orphans[task_id] = request
                else:  # it failed, or left no trace: its task runs again
                    request.stopping = True
                    submitter.release(request)
            self._done_recovering()  # sorted: what is left cannot be undone by doing it again
            strays = [
                j.job_id
                for j in jobs.values()
                if (j.held or not j.final) and j.job_id not in explained
            ]
            if self._orphans:
                log.info("found %d Slurm job(s) of a previous run to re-attach", len(self._orphans))
        # Out of the lock: the attempts waiting for the search need not wait
        # for a slow controller to cancel what nobody will take over.
        await self._cancel_unwanted(sorted(unwanted), strays)

    async def _cancel_unwanted(self, unwanted: list[str], strays: list[str]) -> None:
        cli = self._cli
        assert cli is not None
        if unwanted:
            log.warning(
                "cancelling %d Slurm job(s) of a previous run that no task will take over "
                "(their tasks had no attempt left, or Slurm held them as they ended): %s",
                len(unwanted),
                ", ".join(unwanted),
            )
        if strays:
            log.warning(
                "cancelling %d Slurm job(s) of this state dir that no record explains: %s",
                len(strays),
                ", ".join(strays),
            )
        if unwanted or strays:
            try:
                await cli.scancel([*unwanted, *strays])
            except SlurmError as exc:
                log.warning("cannot cancel them: %s", exc)

    def _done_recovering(self) -> None:
        self._manifests, self._recovered = [], True

    async def _cancel_orphans(self) -> None:
        """Jobs of a previous owner that no attempt took over do not outlive this one."""
        cli, submitter = self._cli, self._submitter
        assert cli is not None
        assert submitter is not None
        orphans, self._orphans = self._orphans, {}
        live = sorted({r.job_id for r in orphans.values() if r.final is None and r.job_id})
        if live:
            log.warning(
                "cancelling %d Slurm job(s) of a previous run that no task took over", len(live)
            )
            try:
                await cli.scancel(live)
            except SlurmError as exc:
                log.warning("cannot cancel Slurm jobs %s: %s", ", ".join(live), exc)
                return
        for request in orphans.values():
            submitter.release(request)

    async def close(self) -> None:
        group, submitter = self._group, self._submitter
        if self._context is not None:
            self._open.pop(self._context.instance_id, None)
        self._context = None
        if group is None or submitter is None:
            return
        self._group = None
        try:
            with anyio.move_on_after(_CLOSE_WAIT, shield=True):
                await submitter.drain()
                if not self._recovered:
                    await self._recover()
                await self._cancel_orphans()
                await submitter.drain()  # the files of the batches just released
        finally:
            self._polling.cancel()
            group.cancel_scope.cancel()
            await group.__aexit__(None, None, None)


Runner = SlurmRunner


def _job_of(jobs: Mapping[str, JobInfo], manifest: Manifest, entry: Entry) -> JobInfo | None:
    batch_id = manifest.batch.batch_id
    alone = f"{batch_id}/{entry.task_id}/{entry.attempt}"
    for info in jobs.values():
        if len(manifest.entries) == 1:
            if info.comment == alone:
                return info
        elif info.comment == batch_id and (
            manifest.batch.size == 1 or info.job_id.endswith(f"_{entry.index}")
        ):
            return info
    return None


def _recorded_codes(candidates: list[tuple[Request, JobInfo | None]]) -> list[int | None]:
    """The exit code each task of a previous owner recorded (None: none, or its job is queued).

    A task whose job is nowhere to be seen and that recorded nothing may
    have a job yet: the owner's ``sbatch`` may have been submitting it as
    the owner died, and slurmctld takes it later. Its cancel file, written
    here, makes that job exit as it starts, without running the task,
    which is run again as another job (or lost) meanwhile. Blocking.
    """
    codes: list[int | None] = []
    for request, info in candidates:
        if info is not None and not info.final:
            codes.append(None)
            continue
        paths = request.entry.paths
        code = exit_code(paths)
        if code is None and info is None:
            try:
                request_cancel(paths)
            except OSError as exc:  # its work dir is gone, say: so is what a job would run
                log.debug("cannot mark task %r given up on: %s", request.entry.task_id, exc)
        codes.append(code)
    return codes


def _killed_by_slurm(code: int, *, packed: bool) -> bool:
    """Whether a command that recorded ``code`` in a job Slurm ended was ended by it.

    A command that finished well before Slurm ended its job keeps its
    result; so does a task of a pack that failed of its own accord (not by
    a signal) before the pack's end, whose state is the pack's. A job of
    one task whose command failed of its own accord would have ended
    FAILED: its script exits as soon as it has recorded the code.
    """
    return code != 0 and (not packed or code > 128)


def _decode(status: int) -> int:
    """A raw wait status as an exit code, ``-N`` for signal N."""
    return -(status & 0x7F) if status & 0x7F else status >> 8


def _result(
    info: JobInfo, output: JobOutput, files: AttemptFiles, *, packed: bool, limit: int
) -> Any:
    code = output.code
    if (
        code is not None
        and info.state in _ENDED_BY_SLURM | _CLUSTER_FAULTS
        and _killed_by_slurm(code, packed=packed)
    ):
        # Only a job that ended on its own comes here: one this runner
        # stopped is cancelled with its attempt.
        code = None
    if code is None and packed:
        pass  # the job's exit status is its last task's, not necessarily this one's
    elif (
        code is None
        and info.exit_status is not None
        and info.state in _ENDED
        and info.reason != _LAUNCH_FAILED
    ):
        # No exit file (not yet visible here, on a slow shared disk?): Slurm's word.
        code = _decode(info.exit_status)
    elif code is not None:
        code = from_shell(code, by="its batch script")  # which reports a signal as 128 + N
    if code is not None:
        return outcome(
            code, output.raw, files.result_file, output.stdout, output.stderr, limit=limit
        )
    raise RunFailed(
        f"Slurm job {info.job_id} {_why(info)}",
        output=[*output.stderr.text(), *output.slurm],
    )


_WHY = {
    "TIMEOUT": "reached its time limit (time_limit, or the partition's)",
    "CANCELLED": "was cancelled from outside (scancel, or an administrator)",
    "OUT_OF_MEMORY": "ran out of memory (memory_mb)",
    "DEADLINE": "reached its deadline (sbatch --deadline, or scontrol's)",
    "REVOKED": "was revoked: the federation ran it on another cluster",
    "SPECIAL_EXIT": (
        "was requeued and held (SPECIAL_EXIT: scontrol requeuehold, or the cluster's "
        "epilog); it is cancelled rather than left to run again if released"
    ),
    GONE: (
        "left the queue without recording an exit code (it had ended longer ago than "
        "the cluster's MinJobAge, and accounting is off)"
    ),
    _LAUNCH_FAILED: (
        "could not be started on its node (JobLaunchFailure: see Slurm's output below, "
        "or slurmd's log there)"
    ),
}


def _why(info: JobInfo) -> str:
    state = info.state
    why = _WHY.get(info.reason if info.reason == _LAUNCH_FAILED else state)
    if why is not None:
        return why
    if state in _CLUSTER_FAULTS:
        return f"ended {state} {_MAX_RESUBMITS + 1} times: the cluster could not run it"
    reason = f", {info.reason}" if info.reason and info.reason != "None" else ""
    return f"ended {state}{reason} before its command could record an exit code"
