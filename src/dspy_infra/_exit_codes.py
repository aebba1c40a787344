"""Exit codes in the library's one convention: ``-N`` for death by signal N, as Python has it.

Shells, Docker (whose containers run under an init) and Slurm's batch
scripts report a command killed by signal N as the exit code 128 + N. Read
back through them, such a code means the kill it stands for: a program
that exits 137 of its own accord cannot be told from one killed by SIGKILL,
and reads as -9 too.
"""

from __future__ import annotations

__all__ = ["from_shell"]

_LAST_SIGNAL = 64  # SIGRTMAX on Linux


def from_shell(code: int) -> int:
    """``code`` as a shell reports it (128 + N for signal N), in the library's convention."""
    return 128 - code if 128 < code <= 128 + _LAST_SIGNAL else code
