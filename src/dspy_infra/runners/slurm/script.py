"""What is handed to ``sbatch``: the job's options, its scripts, and the names that find it again.

Every job of one owner (one state dir, one user) carries the same job name,
:func:`owner_names`, so that one ``squeue --name`` lists them all, and a
comment that says what it runs: ``BATCH/TASK_ID/ATTEMPT`` for a job of one
task, ``BATCH`` for a job array, whose tasks are listed by array index in the
batch's manifest under the state dir. After a crash the next owner on the
same state dir finds them by name and re-attaches instead of re-submitting.

Each task gets a script of its own in its work dir (``slurm-ATTEMPT.sh``)
that sets its environment, runs its command with stdout and stderr in
``slurm-ATTEMPT.out`` / ``.err``, and writes its exit code to
``slurm-ATTEMPT.exit``: what the runner reads when the job ends, with or
without the cluster's accounting. The batch script, one per ``sbatch`` call,
picks the task script by ``SLURM_ARRAY_TASK_ID``.
"""

from __future__ import annotations

import hashlib
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from attrs import frozen

from dspy_infra.abc import TaskRun

__all__ = [
    "JobOptions",
    "TaskPaths",
    "array_ranges",
    "batch_script",
    "owner_names",
    "sbatch_argv",
    "task_script",
]


def owner_names(project: str, state_dir: Path, user: str) -> list[str]:
    """The job names of this owner's jobs (the project and a digest of the state dir): first
    the one its jobs carry, then the one earlier versions gave them, where it differs.

    The digest is of the state dir's real path, so that an owner that reaches
    it another way (through a symlink, with ``..``) after a crash still finds
    the jobs. Earlier versions took the path as given: their jobs are found
    by an owner on that same path. Blocking: it resolves the path.
    """
    names = [_owner_name(project, state_dir.resolve(), user)]
    earlier = _owner_name(project, state_dir.absolute(), user)
    return names if earlier in names else [*names, earlier]


def _owner_name(project: str, path: Path, user: str) -> str:
    digest = hashlib.sha256(f"{user}\0{path}".encode()).hexdigest()[:10]
    return f"dspy-infra.{project}.{digest}"


@frozen(kw_only=True)
class TaskPaths:
    """The files of one attempt's job in the task's work dir."""

    script: Path
    stdout: Path
    stderr: Path
    exit: Path
    cancel: Path

    @classmethod
    def of(cls, work_dir: Path, attempt: int) -> TaskPaths:
        stem = work_dir / f"slurm-{attempt}"
        return cls(
            script=stem.with_suffix(".sh"),
            stdout=stem.with_suffix(".out"),
            stderr=stem.with_suffix(".err"),
            exit=stem.with_suffix(".exit"),
            cancel=stem.with_suffix(".cancel"),
        )


@frozen(kw_only=True)
class JobOptions:
    """The ``sbatch`` options of a task's job. Tasks with equal options can share an array."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_minutes: int | None = None
    gres: str | None = None
    gpus: int = 0
    cpus: int = 0
    memory_mb: int = 0
    signal: str | None = None
    throttle: int | None = None
    pack: int = 1

    @classmethod
    def of(cls, run: TaskRun, *, seconds_left: float) -> JobOptions:
        """From the attempt's class and resources, and the time it has left (or inf)."""
        task_class = run.class_config
        limit = task_class.time_limit
        if limit is None and math.isfinite(seconds_left):
            # Past the attempt's own timeout the runner stops the job itself;
            # the wall time is for a job whose owner crashed.
            limit = max(seconds_left, 0.0) + task_class.cancel_grace + 60.0
        return cls(
            partition=task_class.partition,
            account=task_class.account,
            qos=task_class.qos,
            time_minutes=None if limit is None else max(1, math.ceil(limit / 60)),
            gres=task_class.gres,
            gpus=run.gpu_count,
            cpus=math.ceil(run.cpus),
            memory_mb=run.memory_mb,
            signal=task_class.signal,
            throttle=task_class.array_throttle,
            pack=task_class.pack or 1,
        )

    @property
    def forward(self) -> str | None:
        """The warning signal's name, which the task script passes on to the command."""
        if self.signal is None:
            return None
        return self.signal.partition("@")[0].removeprefix("SIG")

    def args(self, per_job: int = 1) -> list[str]:
        """The options; ``per_job`` tasks run one after another in each job (packing)."""
        args = []
        for option, value in (
            ("partition", self.partition),
            ("account", self.account),
            ("qos", self.qos),
            ("gres", self.gres),
        ):
            if value is not None:
                args.append(f"--{option}={value}")
        if self.time_minutes is not None:
            args.append(f"--time={self.time_minutes * per_job}")
        if self.gpus:
            args.append(f"--gpus={self.gpus}")
        if self.cpus:
            args.append(f"--cpus-per-task={self.cpus}")
        if self.memory_mb:
            args.append(f"--mem={self.memory_mb}M")
        if self.signal is not None:
            # B: the batch shell only: the task script passes it on to the command.
            args.append(f"--signal=B:{self.signal}")
        return args


def array_ranges(indices: Sequence[int]) -> str:
    """``0-3,5,7-9``: Slurm's syntax for the array indices left to run."""
    parts: list[str] = []
    start = prev = indices[0]
    for index in [*indices[1:], None]:
        if index is not None and index == prev + 1:
            prev = index
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if index is not None:
            start = prev = index
    return ",".join(parts)


def sbatch_argv(
    options: JobOptions,
    *,
    name: str,
    comment: str,
    output: Path,
    chdir: Path,
    script: Path,
    indices: Sequence[int] | None,
    per_job: int = 1,
) -> list[str]:
    """The ``sbatch`` call; ``indices`` make it a job array (None: one job)."""
    argv = [
        "sbatch",
        "--parsable",
        f"--job-name={name}",
        f"--comment={comment}",
        f"--output={output}",
        f"--chdir={chdir}",
        *options.args(per_job),
    ]
    if indices is not None:
        throttle = f"%{options.throttle}" if options.throttle else ""
        argv.append(f"--array={array_ranges(indices)}{throttle}")
    argv.append(str(script))
    return argv


_Q = shlex.quote
_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def task_script(
    *,
    title: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: Path,
    paths: TaskPaths,
    forward: str | None,
    packed: bool = False,
    grace: float = 5.0,
) -> str:
    """The script that runs one task's command in its job and records how it ended.

    The command runs in the background so that the shell can pass on the
    warning signal (Slurm sends ``--signal=B:...`` to this shell only) and
    outlive a SIGTERM (a cancel reaches every process of the job: the
    command gets it itself, and may take ``cancel_grace`` to finish), to
    write the exit code.

    A task whose ``paths.cancel`` file is there when its job starts exits
    at once: its attempt was given up on while its job waited, perhaps
    unseen (submitted by an ``sbatch`` on its way as its owner died).
    ``packed``: the job may run other tasks too, so this one cannot be
    stopped by cancelling the job; the runner asks for it with that file,
    which the script also looks for every tenth of a second while the
    command runs (SIGTERM, then SIGKILL after ``grace``).
    """
    # A name bash cannot export (A-B) is still a name: env sets it for the command.
    exports = "\n".join(
        f"export {key}={_Q(value)}" for key, value in env.items() if _SHELL_NAME.match(key)
    )
    others = [f"{key}={value}" for key, value in env.items() if not _SHELL_NAME.match(key)]
    if others:
        argv = ["env", *others, *argv]
    exit_file = _Q(str(paths.exit))
    exit_tmp = _Q(str(paths.exit.with_suffix(".exit.tmp")))
    cancel = _Q(str(paths.cancel))
    if forward == "TERM":
        traps = "trap 'trapped=1; kill -s TERM \"$child\" 2>/dev/null' TERM"
    else:
        traps = "trap 'trapped=1' TERM"
        if forward is not None:
            traps += f"\ntrap 'trapped=1; kill -s {forward} \"$child\" 2>/dev/null' {forward}"
    watch = after = ""
    if packed:
        watch = f"""(
    while kill -0 "$child" 2>/dev/null; do
        if [ -e {cancel} ]; then
            kill -s TERM "$child" 2>/dev/null
            sleep {grace:g}
            kill -s KILL "$child" 2>/dev/null
            exit 0
        fi
        sleep 0.1
    done
) &
watcher=$!
"""
        after = 'kill "$watcher" 2>/dev/null\n'
    return f"""#!/bin/bash
# dspy-infra: {title}
rm -f {exit_file}
exec </dev/null >{_Q(str(paths.stdout))} 2>{_Q(str(paths.stderr))}
[ -e {cancel} ] && exit 0  # given up on before it started
{exports}
record() {{ printf '%s\\n' "$1" >{exit_tmp} && mv -f {exit_tmp} {exit_file}; }}
if ! cd {_Q(str(cwd))}; then
    echo {_Q(f"working directory {cwd} does not exist on ")}"$(hostname)" >&2
    record 127
    exit 127
fi
{shlex.join(argv)} &
child=$!
{traps}
{watch}# wait returns early (128 + N) for each signal trapped above, even when the
# child has exited meanwhile: only a wait that no trap cut short gives the
# child's status. The last wait, once it is gone, gives it too, unless bash
# no longer knows it (-1, once Slurm's SIGCONT, sent before its SIGTERM,
# has come): then the last uncut wait's status stands, if there was one.
code=
while kill -0 "$child" 2>/dev/null; do
    trapped=
    wait "$child"
    status=$?
    [ -n "$trapped" ] || code=$status
done
wait "$child"
status=$?
[ "$status" -lt 0 ] || code=$status
{after}if [ -z "$code" ]; then
    exit 1  # unknown: the runner goes by the job's state
fi
record "$code"
exit "$code"
"""


def batch_script(title: str, groups: Sequence[Sequence[Path]], forward: str | None) -> str:
    """The job's script: the task scripts of its array index (index 0 for a plain job).

    A group of one task becomes the job's shell itself (``exec``), which
    gets Slurm's signals first hand. A pack runs its tasks one after
    another, passing the warning signal on to the one running.
    """
    cases = []
    for index, scripts in enumerate(groups):
        if len(scripts) == 1:
            cases.append(f"    {index}) exec /bin/bash {_Q(str(scripts[0]))} ;;")
        else:
            cases.append(f"    {index}) run_all {' '.join(_Q(str(s)) for s in scripts)} ;;")
    pack = ""
    if any(len(scripts) > 1 for scripts in groups):
        relay = ""
        if forward is not None and forward != "TERM":
            relay = f'\n    trap \'[ -n "$current" ] && kill -s {forward} "$current"\' {forward}'
        pack = f"""run_all() {{
    # A cancel of the whole job reaches each task itself: the next one may
    # still be cancelled on its own (it then exits at once).
    trap : TERM{relay}
    for script in "$@"; do
        /bin/bash "$script" &
        current=$!
        while kill -0 "$current" 2>/dev/null; do wait "$current"; done
        current=
    done
}}
"""
    body = "\n".join(cases)
    return f"""#!/bin/bash
# dspy-infra: {title}
{pack}case "${{SLURM_ARRAY_TASK_ID:-0}}" in
{body}
    *) echo "no task for array index $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;
esac
"""
