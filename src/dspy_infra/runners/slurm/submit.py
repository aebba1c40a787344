"""Attempts that start together go to Slurm together: one ``sbatch`` of a job array.

:meth:`Submitter.add` queues an attempt under its job options; attempts with
the same options that arrive while the queue is collecting (until it has been
quiet for :data:`QUIET`, at most :data:`WINDOW` after the first) are written
out in one thread hop and submitted in one call, as a job array (or a plain
job when alone), split at the cluster's ``MaxArraySize``. With the class's
``pack``, each job of the array runs a group of up to that many attempts,
one after another; the groups are as even as can be.

An attempt cancelled before its array is accepted is left out of it (the
array's indices say which jobs run; a packed attempt whose group runs
anyway is skipped by its job, told by a file); one cancelled while
``sbatch`` runs is cancelled as soon as its job id is known. A batch's files
go once all its attempts are done with.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup
from attrs import evolve

from dspy_infra.abc import RunFailed
from dspy_infra.runners._commands import AttemptFiles
from dspy_infra.runners.slurm.cli import SlurmCli, SlurmError
from dspy_infra.runners.slurm.files import (
    BatchFiles,
    Entry,
    remove_batch,
    request_cancel,
    write_batch,
)
from dspy_infra.runners.slurm.poller import JobInfo, list_jobs
from dspy_infra.runners.slurm.script import JobOptions, batch_script, sbatch_argv

__all__ = ["QUIET", "WINDOW", "Batch", "Request", "Submitter"]

log = logging.getLogger("dspy_infra.slurm")

QUIET = 0.01
WINDOW = 0.1


class Batch:
    """The attempts of one ``sbatch`` call; ``remaining`` are not yet done with."""

    def __init__(self, files: BatchFiles, remaining: int):
        self.files = files
        self.remaining = remaining


class Request:
    """One attempt on its way to a job: queued, submitted (``job_id``) or refused (``error``)."""

    def __init__(
        self,
        entry: Entry,
        *,
        options: JobOptions | None = None,
        files: AttemptFiles | None = None,
        payload: Any = None,
        script: str = "",
    ):
        self.entry = entry
        self.options = options
        self.files = files
        self.payload = payload
        self.script = script
        self.job_id: str | None = None
        self.error: str | None = None
        self.batch: Batch | None = None
        self.index = 0
        # The attempts run by the same job, this one included (more than one: packed).
        self.group: list[Request] = [self]
        self.cancelled = False
        self.stopping = False  # a packed attempt being stopped, or done with
        # A packed attempt whose command was killed while its job ran on (a requeue?).
        self.killed = False
        self.job_cancelled = False  # by the runner, as gone or held: once for the group
        # Its job could not be cancelled (slurmctld away): its batch's files stay.
        self.left_running = False
        self.done = anyio.Event()
        # Known at once for a job of a previous owner that already ended.
        self.final: JobInfo | None = None

    @classmethod
    def attached(cls, entry: Entry, job_id: str, batch: Batch) -> Request:
        """A job found running after a restart: nothing to submit."""
        request = cls(entry)
        request.job_id, request.batch, request.index = job_id, batch, entry.index
        request.done.set()
        return request

    @property
    def packed(self) -> bool:
        """Its job runs other attempts too: stopping the job is not for it alone to do."""
        return len(self.group) > 1

    async def submitted(self) -> str:
        """The job id, once the job is accepted; RunFailed when it was refused."""
        await self.done.wait()
        if self.job_id is None:
            raise RunFailed(self.error or "the job was not submitted")
        return self.job_id

    def abandon(self) -> bool:
        """The attempt gives up on its job: True when it has one, to stop.

        Without a job yet, the submitter leaves it out, or cancels its job as
        soon as it has one; either way the submitter is then done with it.
        """
        if self.job_id is None and not self.done.is_set():
            self.cancelled = True
            return False
        return self.job_id is not None

    @property
    def slurm_log(self) -> Path | None:
        return None if self.batch is None else self.batch.files.log(self.index)


class Submitter:
    """Collects attempts into job arrays and submits them, in the runner's task group."""

    def __init__(self, cli: SlurmCli, directory: Path, name: str, group: TaskGroup):
        self._cli = cli
        self._directory = directory
        self._name = name
        self._group = group
        self._pending: dict[JobOptions, list[Request]] = {}
        self._last: dict[JobOptions, float] = {}
        self._busy = 0
        self._idle = anyio.Event()
        self._idle.set()

    def add(self, request: Request) -> None:
        assert request.options is not None
        key = request.options
        now = anyio.current_time()
        self._last[key] = now
        queue = self._pending.get(key)
        if queue is not None:
            queue.append(request)
            return
        self._pending[key] = [request]
        self._enter()
        self._group.start_soon(self._collect, key, now)

    def release(self, request: Request) -> None:
        """The attempt is done with its job: the batch's files go after the last one."""
        batch, request.batch = request.batch, None
        if batch is None:
            return
        batch.remaining -= 1
        if batch.remaining <= 0:
            self._enter()  # drain() waits for it: close() must not cut it short
            self._group.start_soon(self._remove, batch.files)

    async def _remove(self, files: BatchFiles) -> None:
        try:
            # Shielded: an instance closed by a cancellation (Ctrl-C, a
            # timeout around it) releases its batches in a cancelled group,
            # and their files must go all the same.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(remove_batch, files)
        finally:
            self._leave()

    async def drain(self) -> None:
        """Wait until nothing is being collected, submitted or removed."""
        await self._idle.wait()

    def _enter(self) -> None:
        if not self._busy:
            self._idle = anyio.Event()
        self._busy += 1

    def _leave(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._idle.set()

    async def _collect(self, key: JobOptions, first: float) -> None:
        try:
            while True:
                now = anyio.current_time()
                until = min(self._last[key] + QUIET, first + WINDOW)
                if now >= until:
                    break
                await anyio.sleep(until - now)
            requests = self._pending.pop(key)
            del self._last[key]
            try:
                await self._send(key, requests)
            except Exception as exc:  # a bug here must fail these attempts, not the instance
                log.exception("submitting %d task(s) to Slurm failed", len(requests))
                self._refuse(requests, f"the slurm runner failed to submit it: {exc!r}")
        finally:
            self._leave()

    async def _send(self, options: JobOptions, requests: list[Request]) -> None:
        requests = [r for r in requests if not r.cancelled]
        if not requests:
            return
        try:
            size = (await self._cli.config()).max_array_size * options.pack
        except SlurmError as exc:
            self._refuse(requests, str(exc))
            return
        for start in range(0, len(requests), size):
            await self._submit(options, requests[start : start + size])

    async def _submit(self, options: JobOptions, requests: Sequence[Request]) -> None:
        groups = _groups(requests, options.pack)
        batch_id = secrets.token_hex(6)
        batch = Batch(
            BatchFiles(directory=self._directory, batch_id=batch_id, size=len(groups)),
            len(requests),
        )
        contents = []
        for index, group in enumerate(groups):
            for request in group:
                assert request.files is not None
                request.batch, request.index, request.group = batch, index, group
                request.entry = evolve(request.entry, index=index)
                contents.append((request.entry, request.files, request.payload, request.script))
        text = batch_script(
            f"{len(requests)} task(s) in {len(groups)} job(s), batch {batch_id}",
            [[r.entry.paths.script for r in group] for group in groups],
            options.forward,
        )
        try:
            await anyio.to_thread.run_sync(write_batch, batch.files, self._name, contents, text)
        except OSError as exc:
            self._refuse(requests, f"cannot write the job's files: {exc}")
            return
        single = len(groups) == 1
        per_job = max(len(group) for group in groups)
        included: list[int] = []
        comment = batch_id
        if len(requests) == 1:
            comment += f"/{requests[0].entry.task_id}/{requests[0].entry.attempt}"

        def make_argv() -> list[str] | None:
            included[:] = [i for i, g in enumerate(groups) if not all(r.cancelled for r in g)]
            if not included:
                return None
            return sbatch_argv(
                options,
                name=self._name,
                comment=comment,
                output=batch.files.output,
                chdir=self._directory,
                script=batch.files.script,
                indices=None if single else included,
                per_job=per_job,
            )

        async def settle() -> str | None:
            # The batch's comment is its own: a job that carries it is the one
            # sbatch submitted before its answer was lost (the indices are
            # those of that try: make_argv has not run since).
            jobs = await list_jobs(self._cli, [self._name])
            found = [j.job_id for j in jobs.values() if j.comment == comment]
            if not found:
                return None
            job = found[0].partition("_")[0]
            log.warning("sbatch's answer was lost, but it had submitted Slurm job %s", job)
            return job

        try:
            out = await self._cli.call_while(make_argv, settle=settle)
        except SlurmError as exc:
            self._refuse(requests, f"Slurm refused the job: {exc}")
            return
        if out is None:  # all were cancelled before Slurm took them
            self._refuse(requests, "cancelled before it was submitted")
            return
        job = out.strip().split(";")[0]
        submitted = set(included)
        # No await until every request knows its job: a cancellation now
        # must not lose a job id.
        for request in requests:
            if request.index in submitted:
                request.job_id = job if single else f"{job}_{request.index}"
            else:
                request.error = "cancelled before it was submitted"
                self.release(request)
            request.done.set()
        log.debug("submitted %d task(s) in Slurm job %s", len(requests), job)
        await self._cancel_abandoned(groups)

    async def _cancel_abandoned(self, groups: Sequence[Sequence[Request]]) -> None:
        """Jobs of attempts cancelled while sbatch ran: nobody else will stop them.

        A job all of whose attempts are cancelled is cancelled; in a pack
        that runs anyway, a cancelled attempt is told to stop by its file.
        """
        jobs: list[str] = []
        packed: list[Request] = []
        for group in groups:
            cancelled = [r for r in group if r.cancelled and r.job_id is not None]
            if len(cancelled) == len(group) and group[0].job_id is not None:
                jobs.append(group[0].job_id)
            packed.extend(r for r in cancelled if len(cancelled) < len(group))
        if not jobs and not packed:
            return
        with anyio.CancelScope(shield=True):
            if packed:
                try:
                    await anyio.to_thread.run_sync(
                        lambda: [request_cancel(r.entry.paths) for r in packed]
                    )
                except OSError as exc:
                    log.warning("cannot tell packed tasks to stop: %s", exc)
            if jobs:
                try:
                    await self._cli.scancel(jobs)
                except SlurmError as exc:
                    log.warning("cannot cancel the jobs of cancelled tasks: %s", exc)
        for group in groups:
            for request in group:
                if request.cancelled and request.job_id is not None:
                    self.release(request)

    def _refuse(self, requests: Sequence[Request], why: str) -> None:
        for request in requests:
            if request.job_id is None:
                request.error = why
                self.release(request)
                request.done.set()


def _groups(requests: Sequence[Request], pack: int) -> list[list[Request]]:
    """The requests in order, in as few groups of at most ``pack`` as can be, as even as can be."""
    count = -(-len(requests) // pack)
    size, extra = divmod(len(requests), count)
    groups, start = [], 0
    for index in range(count):
        end = start + size + (1 if index < extra else 0)
        groups.append(list(requests[start:end]))
        start = end
    return groups
