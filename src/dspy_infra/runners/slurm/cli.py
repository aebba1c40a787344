"""The Slurm commands, called from one place that paces them and reads their errors.

Every call to ``sbatch``, ``squeue``, ``scancel``, ``scontrol`` and ``sacct``
goes through :class:`SlurmCli`: a token bucket bounds how often slurmctld is
asked anything, whatever the number of tasks, and its rate moves AIMD (halved
on an error that says the controller is struggling or a submit limit was hit,
raised a little with each success), so that a busy cluster slows the runner
down instead of failing its tasks. Errors are sorted into three kinds:

- the controller cannot be reached (``unreachable``): retried while it has
  answered before (a restart of slurmctld is routine), fatal at once when it
  never has (a cluster that is down or misconfigured should say so now);
- the controller is busy, or a submit limit (``QOSMaxSubmitJobPerUserLimit``...)
  is reached (``busy``): always retried, more slowly;
- anything else (an invalid partition, gres, account...): final, with
  Slurm's own words.

A missing command is :class:`SlurmUnavailable`, which names what to install.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

import anyio
from attrs import frozen

from dspy_infra.config.model import Backoff
from dspy_infra.errors import BackendUnavailable

__all__ = [
    "COMMANDS",
    "ClusterConfig",
    "Pacer",
    "SlurmCli",
    "SlurmError",
    "SlurmUnavailable",
    "classify",
]

log = logging.getLogger("dspy_infra.slurm")

COMMANDS = ("sbatch", "squeue", "scancel", "scontrol")
ErrorKind = Literal["unreachable", "busy", "final"]

# Slurm's words, lower-cased. The controller is not there (or not answering):
_UNREACHABLE = (
    "unable to contact slurm controller",
    "connection refused",
    "socket timed out",
    "zero bytes were transmitted",
    "communication connection failure",
    "connect failure",
    "slurm_receive_msg",
    "could not establish a configuration source",
)
# The controller answered, but asks for patience: too many RPCs, or a limit
# on the number of jobs that lifts as jobs finish.
_BUSY = (
    "resource temporarily unavailable",
    "temporarily unable",
    "try again",
    "slurmctld is busy",
    "maxsubmit",
    "submit limit",
    "job violates accounting/qos policy (job submit limit",
    "too many pending jobs",
)
# How long one command may take: the Slurm clients give up on an unreachable
# controller on their own (MessageTimeout, ~10 s by default); this only
# bounds a client that hangs.
_CALL_TIMEOUT = 120.0
# The commands whose effect the runner must know once they ran.
_EFFECTFUL = frozenset({"sbatch", "scancel"})
# How long an unreachable controller that answered before is waited for,
# per call, before the call fails.
_PATIENCE = 300.0
_RETRY = Backoff(initial=0.5, max=10.0, factor=2.0, jitter=0.2)


class SlurmError(Exception):
    """A Slurm command failed; ``message`` holds Slurm's own words."""

    def __init__(self, command: str, message: str, *, kind: ErrorKind = "final"):
        self.command = command
        self.message = message
        self.kind = kind
        super().__init__(f"{command}: {message}")


class SlurmUnavailable(SlurmError, BackendUnavailable):
    """Slurm cannot be used from here at all: a command is missing, or the controller is down."""

    def __init__(self, command: str, message: str):
        SlurmError.__init__(self, command, message, kind="unreachable")


def classify(stderr: str) -> ErrorKind:
    """What a failed command's standard error says about the controller."""
    text = stderr.lower()
    if any(words in text for words in _UNREACHABLE):
        return "unreachable"
    if any(words in text for words in _BUSY):
        return "busy"
    return "final"


class Pacer:
    """A token bucket whose rate moves AIMD: halved on trouble, raised a step per success.

    ``acquire()`` waits for a token. Waiters are served one at a time, in
    order, so a burst of calls is spread over time rather than racing.
    """

    def __init__(
        self,
        *,
        rate: float = 50.0,
        burst: float = 20.0,
        min_rate: float = 0.5,
        max_rate: float = 50.0,
        step: float = 1.0,
    ):
        self.rate = rate
        self.burst = burst
        self.min_rate = min_rate
        self.max_rate = max_rate
        self.step = step
        self._tokens = burst
        self._stamp = time.monotonic()
        self._lock = anyio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                self._refill()
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await anyio.sleep((1 - self._tokens) / self.rate)

    def success(self) -> None:
        self.rate = min(self.max_rate, self.rate + self.step)

    def trouble(self) -> None:
        """Slow down: half the rate, and no burst until the bucket refills."""
        self._refill()
        self.rate = max(self.min_rate, self.rate / 2)
        self._tokens = min(self._tokens, 0.0)


@frozen(kw_only=True)
class ClusterConfig:
    """What the runner needs to know of the cluster's configuration (``scontrol show config``)."""

    max_array_size: int = 1001
    accounting: bool = False

    @classmethod
    def parse(cls, text: str) -> ClusterConfig:
        values: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                values[key.strip()] = value.strip()
        storage = values.get("AccountingStorageType", "accounting_storage/none")
        return cls(
            max_array_size=_int(values.get("MaxArraySize"), 1001),
            accounting=not storage.endswith("/none"),
        )


def _int(text: str | None, default: int) -> int:
    match = re.match(r"\d+", text or "")
    return int(match[0]) if match else default


class SlurmCli:
    """Runs the Slurm commands for one runner; counts them in ``calls``, by command."""

    def __init__(self) -> None:
        self.pacer = Pacer()
        self.calls: Counter[str] = Counter()
        self._answered = False  # the controller has answered at least once
        self._config: ClusterConfig | None = None

    @staticmethod
    def missing() -> list[str]:
        """The commands this runner needs that are not on PATH (blocking: a few stats)."""
        return [name for name in COMMANDS if shutil.which(name) is None]

    async def call(self, argv: Sequence[str], *, retry: bool = True) -> str:
        """Run one command; its standard output. Raises :class:`SlurmError`.

        With ``retry``, a busy controller is asked again until it accepts, and
        an unreachable one (that answered before) for a while, pacing
        included; cancelling the caller stops the waiting.
        """
        result = await self.call_while(lambda: argv, retry=retry)
        assert result is not None
        return result

    async def call_while(
        self,
        make_argv: Callable[[], Sequence[str] | None],
        *,
        retry: bool = True,
        settle: Callable[[], Awaitable[str | None]] | None = None,
    ) -> str | None:
        """Like :meth:`call`, with the command made anew before each try.

        ``make_argv`` returning None gives up (what the command was for is
        no longer wanted): None is returned. ``sbatch`` of a job array uses
        it to leave out the tasks cancelled while the cluster was busy.

        ``settle`` is for a command that may have done its work though its
        answer was lost: a controller that is slow to answer may take a job
        after sbatch gave up waiting (``Socket timed out``). After such a
        failure, before the command runs again, ``settle`` looks for its
        effect: what it returns (the output the command would have given)
        is the call's; None runs the command again. Until ``settle`` can
        tell, the call waits for the controller however long it is away.
        """
        tries = 0
        first_failure: float | None = None
        unsure = False
        command = ""
        kind: ErrorKind
        while True:
            if unsure and settle is not None:
                try:
                    found = await settle()
                except SlurmError as exc:
                    if exc.kind == "final":
                        raise
                    message, kind = exc.message, exc.kind
                else:
                    if found is not None:
                        return found
                    unsure = False
                    continue
            else:
                argv = make_argv()
                if argv is None:
                    return None
                command = argv[0]
                await self.pacer.acquire()
                code, stdout, stderr = await self._run(argv)
                if code == 0:
                    self.pacer.success()
                    self._answered = True
                    return stdout
                message = _message(command, stderr, code)
                kind = classify(stderr)
                if kind == "final":
                    self._answered = True
                    self.pacer.success()  # it answered, promptly: no reason to slow down
                    raise SlurmError(command, message)
                # Busy: refused, nothing done. Unreachable: it may have been heard.
                unsure = kind == "unreachable"
                self.pacer.trouble()
            now = time.monotonic()
            first_failure = first_failure if first_failure is not None else now
            if kind == "unreachable" and not self._answered:
                raise SlurmUnavailable(
                    command,
                    f"slurmctld does not answer ({message}); is it running, and does "
                    "SLURM_CONF (or /etc/slurm/slurm.conf) name it?",
                )
            # Not while unsure whether a job was taken (only settle can
            # tell): giving up would leave it followed by nobody, and its
            # tasks, failed, to be run again. Any other call gives up.
            patience = math.inf if unsure and settle is not None else _PATIENCE
            if not retry or (kind == "unreachable" and now - first_failure > patience):
                raise SlurmError(command, message, kind=kind)
            delay = _RETRY.delay(tries)
            tries += 1
            log.warning("%s: %s; trying again in %.1f s", command, message, delay)
            await anyio.sleep(delay)

    async def _run(self, argv: Sequence[str]) -> tuple[int, str, str]:
        self.calls[argv[0]] += 1
        try:
            # A command that changes something is shielded: its effect must
            # be known (the id of a job that sbatch submitted); a pending
            # cancellation reaches the caller at its next await. A query is
            # not: a hung squeue must not hold up whoever no longer wants
            # its answer (close()). The environment is this process's as it
            # is now: SLURM_CONF and PATH set after the runner opened still
            # count.
            shield = argv[0] in _EFFECTFUL
            with anyio.CancelScope(shield=shield), anyio.fail_after(_CALL_TIMEOUT):
                result = await anyio.run_process(list(argv), check=False, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise SlurmUnavailable(
                argv[0],
                f"the Slurm command {argv[0]!r} is not on PATH: install the Slurm client "
                "(Debian: apt-get install slurm-client) or add its directory to PATH",
            ) from None
        except TimeoutError:
            return 1, "", f"no answer within {_CALL_TIMEOUT:g} s: socket timed out"
        except OSError as exc:
            raise SlurmUnavailable(argv[0], f"cannot run {argv[0]!r}: {exc}") from None
        return (
            result.returncode,
            result.stdout.decode(errors="replace"),
            result.stderr.decode(errors="replace"),
        )

    async def config(self) -> ClusterConfig:
        """The cluster's configuration, read once (``scontrol show config``)."""
        if self._config is None:
            self._config = ClusterConfig.parse(await self.call(["scontrol", "show", "config"]))
        return self._config

    async def scancel(
        self, job_ids: Sequence[str], *, signal: str | None = None, full: bool = False
    ) -> None:
        """Cancel jobs (or, with ``signal``, signal them); what Slurm refuses is only logged.

        A job that is already ending, or gone, is refused: which is what the
        caller wanted. What state a job is left in is for the poller to see.
        Signal only running jobs: Slurm retries a signal to a pending one for
        a minute and a half before refusing it.
        """
        argv = ["scancel"]
        if signal is not None:
            argv.append(f"--signal={signal}")
        if full:
            argv.append("--full")
        try:
            await self.call([*argv, *job_ids])
        except SlurmError as exc:
            if exc.kind != "final":
                raise
            log.debug("%s %s: %s", " ".join(argv), " ".join(job_ids), exc.message)


def _message(command: str, stderr: str, code: int) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    prefix = re.compile(rf"^{re.escape(command)}: (error: )?")
    text = "; ".join(prefix.sub("", line) for line in lines[-3:])
    return text or f"exited with code {code} and said nothing"
