"""One poller per runner: a single ``squeue`` per cycle tells the state of all its jobs.

However many tasks wait, the cluster is asked once per cycle, for the jobs
that carry this owner's name (``--name``), in every state (``--states=all``,
so that jobs that just ended are still seen) and one line per array element
(``--array``). Waiters are woken by job id. The interval adapts: short
(:data:`MIN_INTERVAL`) while something changes or a job is about to end
(``COMPLETING``), or a waiter asks for haste (a job being stopped), and
growing by :data:`GROWTH` up to :data:`MAX_INTERVAL` while nothing does;
never shorter than ten times what the last ``squeue`` took, so that a slow
(big, busy) controller is asked less often.
With nothing to watch, the poller makes no call at all.

A job that left the queue (older than the cluster's ``MinJobAge``) is looked
up in ``sacct`` when the cluster keeps accounting; otherwise, once two
listings in a row lacked it (one may be a controller's hiccup), it is
reported ``GONE``, and the runner reads what the job script wrote in the
task's work dir: the state of a job never has to come from accounting.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import anyio
import anyio.to_thread
from attrs import frozen

from dspy_infra.config.model import Backoff
from dspy_infra.runners.slurm.cli import SlurmCli, SlurmError

__all__ = [
    "FINAL_STATES",
    "GONE",
    "HELD_STATES",
    "MAX_INTERVAL",
    "MIN_INTERVAL",
    "JobInfo",
    "Poller",
    "list_jobs",
    "parse_sacct",
    "parse_squeue",
]

log = logging.getLogger("dspy_infra.slurm")

MIN_INTERVAL = 0.05
MAX_INTERVAL = 2.0
GROWTH = 1.5
_ERROR_INTERVAL = 10.0
# After a failed squeue: twice MIN_INTERVAL, doubling up to _ERROR_INTERVAL.
_RETRY = Backoff(initial=2 * MIN_INTERVAL, max=_ERROR_INTERVAL, jitter=0.0)
_DUTY = 10.0
GONE = "GONE"
# Ended, but kept in the queue, held: released (scontrol release), the job
# would run its tasks again. SPECIAL_EXIT: scontrol requeuehold
# State=SpecialExit, or the cluster's epilog on a chosen exit code.
HELD_STATES = frozenset({"SPECIAL_EXIT"})
# States after which the job does nothing more (squeue's long names), on its own.
FINAL_STATES = HELD_STATES | frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "TIMEOUT",
        GONE,
    }
)
_FORMAT = "JobArrayID:|,State:|,exit_code:|,Comment:|,Reason:"


@frozen
class JobInfo:
    """One job (or array element) as the cluster last told it.

    ``exit_status`` is the batch script's raw wait status (exit code times
    256, or the signal), when Slurm knows it.
    """

    job_id: str
    state: str
    exit_status: int | None = None
    comment: str = ""
    reason: str = ""

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def held(self) -> bool:
        """It has ended, but waits in the queue to run again: it must be cancelled."""
        return self.state in HELD_STATES

    @property
    def running(self) -> bool:
        """Its processes run (a signal can reach them)."""
        return self.state in ("RUNNING", "SUSPENDED")


def parse_squeue(text: str) -> dict[str, JobInfo]:
    jobs = {}
    for line in text.splitlines():
        parts = line.split("|", 4)
        if len(parts) < 5 or not parts[0].strip():
            continue
        job_id, state, status, comment, reason = (part.strip() for part in parts)
        jobs[job_id] = JobInfo(
            job_id=job_id,
            state=state.split()[0] if state else "UNKNOWN",
            exit_status=int(status) if status.isdigit() else None,
            comment="" if comment == "(null)" else comment,
            reason=reason,
        )
    return jobs


def parse_sacct(text: str) -> dict[str, JobInfo]:
    """``sacct -P -o JobID,State,ExitCode`` lines; ExitCode is ``code:signal``."""
    jobs = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 3 or not parts[0]:
            continue
        job_id, state, exit_code = parts[:3]
        code, _, sig = exit_code.partition(":")
        status = None
        if code.isdigit() and sig.isdigit():
            status = int(sig) if int(sig) else int(code) << 8
        # "CANCELLED by 0": the first word is the state.
        jobs[job_id] = JobInfo(job_id=job_id, state=state.split()[0], exit_status=status)
    return jobs


async def list_jobs(
    cli: SlurmCli, names: Iterable[str], *, retry: bool = False
) -> dict[str, JobInfo]:
    """All jobs of this owner (carrying one of its ``names``) that the controller still holds,
    by job id.

    ``retry``: ask a busy (or restarting) controller again, as :meth:`SlurmCli.call`
    does; the poller does not, it asks again at its next cycle anyway.
    """
    argv = [
        "squeue",
        "--noheader",
        "--array",
        "--states=all",
        f"--name={','.join(names)}",
        f"--user={os.getuid()}",
        f"--Format={_FORMAT}",
    ]
    return parse_squeue(await cli.call(argv, retry=retry))


class _Watch:
    __slots__ = ("event", "info", "waiters")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.info: JobInfo | None = None
        self.waiters = 0


class _FileWatch:
    """A task packed with others in a job: it is over when its exit file appears."""

    __slots__ = ("event", "info", "job_id", "path")

    def __init__(self, job_id: str, path: Path) -> None:
        self.job_id = job_id
        self.path = path
        self.event = anyio.Event()
        self.info: JobInfo | None = None


def _existing(paths: list[Path]) -> set[Path]:
    return {path for path in paths if path.exists()}


class Poller:
    """Follows this owner's jobs for the runner's attempts: :meth:`final` waits for one to end."""

    def __init__(self, cli: SlurmCli, names: Sequence[str]):
        self._cli = cli
        self._names = names
        self._watches: dict[str, _Watch] = {}
        self._files: set[_FileWatch] = set()
        self._latest: dict[str, JobInfo] = {}
        self._wake = anyio.Event()
        self._next = math.inf
        self._interval = MIN_INTERVAL
        self._failures = 0
        # Jobs that the last listing lacked: one answer without a job may be
        # the controller's hiccup; a second one in a row is believed.
        self._missed: set[str] = set()
        self.cycles = 0

    def latest(self, job_id: str) -> JobInfo | None:
        """What the last cycle said of the job (None: not seen yet, or forgotten)."""
        return self._latest.get(job_id)

    def forget(self, job_id: str) -> None:
        """The runner is done with the job."""
        self._latest.pop(job_id, None)

    def hurry(self) -> None:
        """Poll soon, and often: something waits on a job that is about to change."""
        self._interval = MIN_INTERVAL
        self._next = min(self._next, anyio.current_time() + MIN_INTERVAL)
        self._wake.set()

    async def final(self, job_id: str) -> JobInfo:
        """Wait until the job has ended (or left the queue); what the cluster said of it last."""
        known = self._latest.get(job_id)
        if known is not None and known.final:
            return known
        watch = self._watches.get(job_id)
        if watch is None:
            watch = self._watches[job_id] = _Watch()
            self.hurry()
        watch.waiters += 1
        try:
            await watch.event.wait()
        finally:
            watch.waiters -= 1
            if not watch.waiters and self._watches.get(job_id) is watch:
                del self._watches[job_id]
        assert watch.info is not None
        return watch.info

    async def ended(self, job_id: str, exit_file: Path) -> JobInfo:
        """For a task packed with others in a job: wait until its exit file appears, or the
        job ends (what the cluster said of the job then; while it runs, RUNNING)."""
        watch = _FileWatch(job_id, exit_file)
        self._files.add(watch)
        self.hurry()
        try:
            await watch.event.wait()
        finally:
            self._files.discard(watch)
        assert watch.info is not None
        return watch.info

    async def run(self) -> None:
        """The polling loop, for the runner's task group. Never raises (but Cancelled)."""
        while True:
            await self._sleep()
            try:
                await self._cycle()
            except Exception:  # the loop outlives any one bad cycle
                log.exception("the Slurm poller failed a cycle; it goes on")
                self._next = anyio.current_time() + _ERROR_INTERVAL

    async def _sleep(self) -> None:
        while True:
            now = anyio.current_time()
            if not self._watches and not self._files:
                self._next = math.inf
            if self._next <= now:
                return
            self._wake = anyio.Event()
            with anyio.move_on_after(self._next - now):
                await self._wake.wait()

    async def _cycle(self) -> None:
        started = anyio.current_time()
        self._next = math.inf  # hurry() during the cycle brings it closer
        # Only jobs watched before the listing was asked for can be missing
        # from it: one submitted meanwhile may be younger than the listing.
        asked = {*self._watches, *(watch.job_id for watch in self._files)}
        try:
            jobs = await list_jobs(self._cli, self._names)
        except SlurmError as exc:
            self._failures += 1
            if self._failures in (1, 10) or self._failures % 100 == 0:
                log.warning(
                    "cannot read the state of Slurm jobs (%d times): %s", self._failures, exc
                )
            self._next = started + _RETRY.delay(self._failures - 1)
            return
        self._failures = 0
        self.cycles += 1
        missing = {job_id for job_id in asked if job_id not in jobs}
        if missing:
            log.debug("jobs %s are not in the queue (it holds %s)", missing, sorted(jobs))
            left = await self._left_queue(missing)
            jobs.update(
                (job_id, info)
                for job_id, info in left.items()
                if info.state != GONE or job_id in self._missed
            )
        missed_first = bool(missing - self._missed)  # the second listing is wanted soon
        self._missed = missing
        changed = self._update(jobs) or missed_first
        changed = await self._check_files(jobs) or changed
        hurry = changed or any(
            self._latest.get(job_id, _UNSEEN).state == "COMPLETING" for job_id in self._watches
        )
        self._interval = MIN_INTERVAL if hurry else min(MAX_INTERVAL, self._interval * GROWTH)
        # However hurried, the listing takes at most a tenth of the time: on a
        # big cluster, where one squeue takes long, the poller slows down.
        took = anyio.current_time() - started
        self._next = min(self._next, started + max(self._interval, _DUTY * took))

    async def _left_queue(self, job_ids: Iterable[str]) -> dict[str, JobInfo]:
        """Jobs no longer in the queue: from accounting if the cluster keeps it, else GONE."""
        job_ids = list(job_ids)
        found: dict[str, JobInfo] = {}
        try:
            config = await self._cli.config()
            if config.accounting:
                argv = ["sacct", "--noheader", "--parsable2", "--allocations"]
                argv += ["--format=JobID,State,ExitCode", f"--jobs={','.join(job_ids)}"]
                found = parse_sacct(await self._cli.call(argv, retry=False))
        except SlurmError as exc:
            log.warning("cannot look up jobs that left the queue in accounting: %s", exc)
        return {job_id: found.get(job_id, JobInfo(job_id=job_id, state=GONE)) for job_id in job_ids}

    async def _check_files(self, jobs: dict[str, JobInfo]) -> bool:
        """Resolve the file watches whose file is there, or whose job has ended."""
        watches = list(self._files)
        if not watches:
            return False
        found = await anyio.to_thread.run_sync(_existing, [w.path for w in watches])
        changed = False
        for watch in watches:
            info = jobs.get(watch.job_id) or self._latest.get(watch.job_id)
            if watch.path in found:
                watch.info = info or JobInfo(job_id=watch.job_id, state="RUNNING")
            elif info is not None and info.final:
                watch.info = info
            else:
                continue
            changed = True
            watch.event.set()
            self._files.discard(watch)
        return changed

    def _update(self, jobs: dict[str, JobInfo]) -> bool:
        changed = False
        for file_watch in self._files:
            info = jobs.get(file_watch.job_id)
            if info is not None and self._latest.get(file_watch.job_id) != info:
                self._latest[file_watch.job_id] = info
                changed = True
        for job_id, watch in list(self._watches.items()):
            info = jobs.get(job_id)
            if info is None:
                continue
            if self._latest.get(job_id) != info:
                log.debug("Slurm job %s: %s (%s)", job_id, info.state, info.reason)
                changed = True
                self._latest[job_id] = info
            if info.final:
                watch.info = info
                watch.event.set()
                del self._watches[job_id]
        return changed


_UNSEEN = JobInfo(job_id="", state="UNSEEN")
