"""The slurm runner: each attempt is a ``[handlers.NAME]`` command in a Slurm job.

A handler keeps the process runner's contract (docs/runners.md): the payload
in ``payload.json``, the result in ``result.json`` or the last line of
stdout, the same placeholders and ``DSPY_INFRA_*`` variables, failures with
the exit code and the tail of stderr. The work dir must be on a disk that
the cluster's nodes share with this machine (it is, trivially, on a
single-node cluster).

How it talks to the cluster, and why:

- :mod:`.cli` runs the commands, through a token bucket whose rate halves
  when slurmctld is struggling or a submit limit is hit: a busy cluster
  slows the runner down rather than failing tasks.
- :mod:`.submit` turns attempts that start together into one job array
  (one ``sbatch``), with the class's ``array_throttle``.
- :mod:`.poller` asks ``squeue`` once per cycle about all of this owner's
  jobs, however many, at an interval that shortens while jobs change.
- :mod:`.script` writes the job scripts, which record each command's exit
  code, stdout and stderr in its work dir, so that the outcome of a job
  never depends on the cluster keeping accounting.
- :mod:`.runner` stops jobs (SIGTERM, then SIGKILL after ``cancel_grace``),
  submits again a job that the cluster lost (preempted, node failure) within
  the same attempt, and, after a crash, re-attaches the jobs of the previous
  owner of the state dir, found by their job name.
"""

from __future__ import annotations

from dspy_infra.runners.slurm.runner import SlurmRunner

__all__ = ["Runner", "SlurmRunner"]

Runner = SlurmRunner
