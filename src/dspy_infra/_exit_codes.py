"""Exit codes in the library's one convention: ``-N`` for death by signal N, as Python has it.

Shells, Docker (whose containers run under an init) and Slurm's batch
scripts report a command killed by signal N as the exit code 128 + N. Read
back through them, such a code means the kill it stands for: a program
that exits 137 of its own accord cannot be told from one killed by SIGKILL,
and reads as -9 too. So that nothing reported is lost, such a code keeps
the one it was read back from (:class:`ReadBack`), which the messages for
a person give beside it (:func:`reported`).
"""

from __future__ import annotations

__all__ = ["ReadBack", "Unknown", "from_shell", "reported"]

_LAST_SIGNAL = 64  # SIGRTMAX on Linux


class ReadBack(int):
    """``-N``, read back from ``raw`` (128 + N) as ``by`` reported it; an int for all else."""

    raw: int
    by: str

    def __new__(cls, code: int, raw: int, by: str) -> ReadBack:
        self = super().__new__(cls, code)
        self.raw = raw
        self.by = by
        return self

    def __getnewargs__(self) -> tuple[int, int, str]:  # type: ignore[override]
        return int(self), self.raw, self.by


class Unknown(int):
    """-1, for no exit code: what would have reported one is gone; ``why`` says what became of it.

    Without it, -1 read as a death by signal 1 (SIGHUP).
    """

    why: str

    def __new__(cls, why: str) -> Unknown:
        self = super().__new__(cls, -1)
        self.why = why
        return self

    def __getnewargs__(self) -> tuple[str]:  # type: ignore[override]
        return (self.why,)


def from_shell(code: int, *, by: str) -> int:
    """``code`` as ``by`` reports it (128 + N for signal N), in the library's convention."""
    if 128 < code <= 128 + _LAST_SIGNAL:
        return ReadBack(128 - code, code, by)
    return code


def reported(code: int) -> str:
    """What a message about ``code`` adds: the code it was read back from, if it was,
    or why there is none."""
    if isinstance(code, Unknown):
        return f" ({code.why})"
    return f" (exit code {code.raw} from {code.by})" if isinstance(code, ReadBack) else ""
