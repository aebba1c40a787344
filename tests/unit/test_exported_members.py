"""The public surface: everything in __all__ exists, is sorted, and nothing is missing."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import dspy_infra


def test_all_is_sorted_and_complete() -> None:
    assert dspy_infra.__all__ == sorted(dspy_infra.__all__)
    for name in dspy_infra.__all__:
        assert getattr(dspy_infra, name).__module__.startswith("dspy_infra"), name
    public = {n for n in vars(dspy_infra) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(dspy_infra, n)).__name__ == "module"}
    assert public - modules == set(dspy_infra.__all__)


def _documented_errors() -> dict[str, str | None]:
    """``{error: parent}`` from the tree of errors in docs/index.md."""
    doc = (Path(__file__).parents[2] / "docs" / "index.md").read_text()
    tree = doc.split("```text\nInfraError\n", 1)[1].split("```", 1)[0]
    found: dict[str, str | None] = {"InfraError": None}
    parents = ["InfraError"]  # by depth: a level of the tree is 5 columns wide
    for line in tree.splitlines():
        match = re.match(r"^[ │├└─]*", line)
        assert match is not None
        depth = match.end() // 5
        name = line[match.end() :].split()[0]
        del parents[depth:]
        found[name] = parents[-1]
        parents.append(name)
    return found


def _errors_in_the_package() -> set[str]:
    """Every public InfraError class of the package but the remote client's (documented apart)."""
    names: set[str] = set()
    for module in pkgutil.walk_packages(dspy_infra.__path__, "dspy_infra."):
        if module.name.startswith(("dspy_infra.remote", "dspy_infra.testing")) or (
            module.name.endswith(".__main__")
        ):
            continue
        for name, value in vars(importlib.import_module(module.name)).items():
            if (
                isinstance(value, type)
                and issubclass(value, dspy_infra.InfraError)
                and value.__module__ == module.name
                and not name.startswith("_")
                # The slurm runner's: turned into its class's refusal of tasks, never raised.
                and name != "SlurmUnavailable"
            ):
                names.add(name)
    return names


def test_the_errors_of_the_index_are_every_error_exported() -> None:
    documented = _documented_errors()
    assert set(documented) == _errors_in_the_package()
    for name, parent in documented.items():
        error = getattr(dspy_infra, name)
        assert name in dspy_infra.__all__
        assert parent is None or issubclass(error, getattr(dspy_infra, parent)), name
