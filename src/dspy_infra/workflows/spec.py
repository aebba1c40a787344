"""What a workflow is: steps (task specs with ``depends_on``), references, validation.

A step's ``payload`` (and its ``fan_out``) may hold *references*: a string
that is exactly ``"${...}"`` is replaced by the value it names when the step
starts:

- ``${inputs.NAME}`` (and deeper keys, ``${inputs.NAME.key.0}``): the run's inputs;
- ``${steps.NAME.result}`` (and deeper): the result of an upstream step (the
  list of results, in order, for a fan-out step);
- ``${item}`` and ``${index}`` in a fan-out step: the element it runs for and its position.

``"$${...}"`` is the literal text ``"${...}"``. A reference is the whole
string: ``"model-${inputs.size}"`` is left as it is (build names in a
handler).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

from attrs import field, frozen

from dspy_infra._names import one_or_many
from dspy_infra.config.loading import find_cycle
from dspy_infra.errors import InfraError
from dspy_infra.scheduling.checks import (
    encodable,
    encode_json,
    id_type_error,
    json_too_deep,
    too_deep_error,
)

__all__ = [
    "InvalidWorkflow",
    "Step",
    "UnknownRun",
    "UnknownWorkflow",
    "WorkflowError",
    "WorkflowSpec",
    "check_id",
    "check_new_run_id",
    "inputs_dict",
    "resolve",
    "run_key",
    "workflow_key",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*\Z")
_WORKFLOW_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_MAX_NAME = 64
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_MAX_RUN_ID = 100
_REF_RE = re.compile(r"^\$\{([^{}]+)\}\Z")
_STEP_KEYS = (
    "handler",
    "payload",
    "depends_on",
    "fan_out",
    "task_class",
    "priority",
    "max_attempts",
    "timeout",
    "needs",
)


class WorkflowError(InfraError):
    """A problem with a workflow or one of its runs."""


class InvalidWorkflow(WorkflowError, ValueError):
    """A workflow spec (or a run's inputs) that cannot be used; nothing was stored."""


class _NotStored(WorkflowError, KeyError):
    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])


class UnknownWorkflow(_NotStored):
    """A workflow id that the store does not hold."""

    def __init__(self, workflow_id: str):
        self.workflow_id = workflow_id
        super().__init__(f"unknown workflow {workflow_id!r}")


class UnknownRun(_NotStored):
    """A run id that the store does not hold."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        super().__init__(f"unknown workflow run {run_id!r}")


def check_id(value: Any, what: str) -> str:
    """``value``, a ``workflow_id`` or ``run_id`` (``what``); :class:`InvalidWorkflow` if
    it is not a string (see :func:`~dspy_infra.scheduling.checks.id_type_error`)."""
    if problem := id_type_error(value, what):
        raise InvalidWorkflow(problem)
    return cast(str, value)


def workflow_key(value: Any) -> str:
    """``value``, a workflow id to look up (see :func:`_stored_key`)."""
    return _stored_key(value, "workflow_id", UnknownWorkflow)


def run_key(value: Any) -> str:
    """``value``, a run id to look up (see :func:`_stored_key`)."""
    return _stored_key(value, "run_id", UnknownRun)


def _stored_key(value: Any, what: str, unknown: Callable[[str], _NotStored]) -> str:
    """``value``, an id to look up, checked as :func:`check_id` does; one that UTF-8
    cannot encode (an argument that is not UTF-8, as Python decodes it) is
    ``unknown``, since none is stored so, where the store and the wire raised a
    bare UnicodeEncodeError. Both sides run this, so both raise the same."""
    key = check_id(value, what)
    if not encodable(key):
        raise unknown(key)
    return key


def check_new_run_id(run_id: Any) -> str:
    """``run_id``, given to name a new run; :class:`InvalidWorkflow` if it cannot.

    Checked before the workflow is looked up, by both sides: the client cannot
    send one that UTF-8 cannot encode, and so could not tell what the server
    would have looked up first.
    """
    if not _RUN_ID_RE.match(check_id(run_id, "run_id")) or len(run_id) > _MAX_RUN_ID:
        raise InvalidWorkflow(
            f"run_id {run_id!r}: letters, digits, '_', '.', '-', at most {_MAX_RUN_ID}"
        )
    return cast(str, run_id)


def inputs_dict(workflow_id: str, inputs: Mapping[str, Any] | None) -> dict[str, Any]:
    """A run's ``inputs`` as a dict of its own; :class:`InvalidWorkflow` if they are
    not a mapping (a list of pairs, which ``dict()`` would take, included)."""
    if inputs is not None and not isinstance(inputs, Mapping):
        raise InvalidWorkflow(
            f"run of {workflow_id!r} refused: inputs must be a mapping of names to values, "
            f"got {type(inputs).__name__}"
        )
    return dict(inputs or {})


def _names(value: Any, key: str) -> tuple[str, ...]:
    try:
        return tuple(one_or_many(value))
    except TypeError:  # "'int' object is not iterable" named neither the key nor the value
        raise TypeError(f"{key} must be a list of names, got {value!r:.200}") from None


def _dependencies(value: Any) -> tuple[str, ...]:
    return _names(value, "depends_on")


def _needs(value: Any) -> tuple[str, ...]:
    return _names(value, "needs")


@frozen(kw_only=True)
class Step:
    """One step: a task spec (as :meth:`AgentInfra.submit_task` takes) plus ``depends_on``.

    With ``fan_out`` (a ``"${...}"`` reference to a list), the step runs one
    task per element, all at once; its result is the list of their results.
    """

    name: str
    handler: str
    payload: Any = None
    depends_on: tuple[str, ...] = field(default=(), converter=_dependencies)
    fan_out: str | None = None
    task_class: str = "cpu_short"
    priority: int = 0
    max_attempts: int | None = None
    timeout: float | None = None
    needs: tuple[str, ...] = field(default=(), converter=_needs)

    def to_mapping(self) -> dict[str, Any]:
        table: dict[str, Any] = {"handler": self.handler}
        for key in _STEP_KEYS[1:]:
            value = getattr(self, key)
            if key in ("depends_on", "needs"):
                if value:
                    table[key] = list(value)
            elif value is not None:
                # Whatever it is: a payload of () is [] to its task, never left out (None).
                table[key] = list(value) if isinstance(value, tuple) else value
        return table


def _steps(value: Iterable[Step]) -> tuple[Step, ...]:
    return tuple(value)


@frozen(kw_only=True)
class WorkflowSpec:
    """A named DAG of steps. Build it in Python, or read it with :meth:`from_mapping`
    (a TOML document: ``name = ...`` and one ``[steps.NAME]`` table per step)."""

    name: str
    steps: tuple[Step, ...] = field(converter=_steps)

    def __attrs_post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> WorkflowSpec:
        """``{"name": ..., "steps": {NAME: {handler, payload, depends_on, ...}}}``.

        ``steps`` may also be a list of tables with a ``name`` each.
        """
        if not isinstance(data, Mapping):
            raise InvalidWorkflow(f"a workflow is a table, got {data!r}")
        unknown = sorted(set(data) - {"name", "steps"})
        if unknown:
            raise InvalidWorkflow(f"unknown workflow keys {unknown} (expected: name, steps)")
        name = data.get("name")
        if not isinstance(name, str):
            raise InvalidWorkflow(f"a workflow needs a name (a string), got {name!r}")
        steps = [_step(name, step_name, table) for step_name, table in _tables(name, data)]
        return cls(name=name, steps=tuple(steps))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> WorkflowSpec:
        """Read a TOML file (see :meth:`from_mapping`)."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        # A ValueError: a NUL in the path ("embedded null byte"), bytes that are
        # not text, or TOML that is not valid. RecursionError: arrays nested deeply.
        except (OSError, ValueError, RecursionError) as exc:
            raise InvalidWorkflow(f"{path}: {exc}") from None
        try:
            return cls.from_mapping(data)
        except InvalidWorkflow as exc:
            raise InvalidWorkflow(f"{path}: {exc}") from None

    def to_mapping(self) -> dict[str, Any]:
        return {"name": self.name, "steps": {s.name: s.to_mapping() for s in self.steps}}

    def workflow_id(self) -> str:
        """``NAME-HASH``: the same spec always gets the same id; a changed one another."""
        text = json.dumps(self.to_mapping(), sort_keys=True, separators=(",", ":"))
        return f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"

    def step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    def inputs(self) -> set[str]:
        """The names of the inputs its references use."""
        found = set()
        for step in self.steps:
            for path in _references(step):
                if path[0] == "inputs" and len(path) > 1:
                    found.add(path[1])
        return found

    def order(self) -> list[str]:
        """The step names, each after its dependencies (the spec must be valid)."""
        done: dict[str, None] = {}
        by_name = {s.name: s for s in self.steps}
        for step in self.steps:
            # Depth first with a stack of its own: a chain of steps may be
            # longer than Python's recursion limit.
            stack = [(step.name, iter(step.depends_on))]
            while stack:
                name, deps = stack[-1]
                dep = next(deps, None)
                if dep is None:
                    stack.pop()
                    done[name] = None
                elif dep not in done:
                    stack.append((dep, iter(by_name[dep].depends_on)))
        return list(done)

    def validate(self) -> None:
        """Everything that needs no instance; raises :class:`InvalidWorkflow`."""
        where = f"workflow {self.name!r}"
        if (
            not isinstance(self.name, str)
            or not _WORKFLOW_NAME_RE.match(self.name)
            or len(self.name) > _MAX_NAME
        ):
            raise InvalidWorkflow(
                f"{where}: a workflow name is letters, digits, '_', '.', '-' "
                f"(at most {_MAX_NAME}, not starting with '.' or '-')"
            )
        if not self.steps:
            raise InvalidWorkflow(f"{where}: it has no steps")
        by_name: dict[str, Step] = {}
        for step in self.steps:
            if not isinstance(step, Step):
                raise InvalidWorkflow(f"{where}: a step must be a Step, got {step!r}")
            _check_step_shape(where, step)
            if step.name in by_name:
                raise InvalidWorkflow(f"{where}: step {step.name!r} is declared twice")
            by_name[step.name] = step
        known = ", ".join(by_name)
        for step in self.steps:
            for dep in step.depends_on:
                if dep == step.name:
                    raise InvalidWorkflow(f"{where}: step {step.name!r} depends on itself")
                if dep not in by_name:
                    raise InvalidWorkflow(
                        f"{where}: step {step.name!r}: depends_on: unknown step {dep!r} "
                        f"(steps: {known})"
                    )
        cycle = find_cycle({name: step.depends_on for name, step in by_name.items()})
        if cycle is not None:
            raise InvalidWorkflow(f"{where}: cycle: {' -> '.join(cycle)}")
        _check_references(where, self.steps, by_name, self.order)


def _tables(name: str, data: Mapping[str, Any]) -> list[tuple[str, Any]]:
    raw = data.get("steps")
    if isinstance(raw, Mapping):
        return list(raw.items())
    if not isinstance(raw, list):
        raise InvalidWorkflow(f"workflow {name!r}: steps must be a table of steps")
    tables = []
    for i, table in enumerate(raw):
        if not isinstance(table, Mapping) or not isinstance(table.get("name"), str):
            raise InvalidWorkflow(f"workflow {name!r}: steps[{i}] needs a name")
        tables.append((table["name"], {k: v for k, v in table.items() if k != "name"}))
    return tables


def _step(name: str, step_name: str, table: Any) -> Step:
    where = f"workflow {name!r}: step {step_name!r}"
    if not isinstance(table, Mapping):
        raise InvalidWorkflow(f"{where}: expected a table, got {table!r}")
    extra = sorted(set(table) - set(_STEP_KEYS))
    if extra:
        raise InvalidWorkflow(f"{where}: unknown keys {extra} (expected: {', '.join(_STEP_KEYS)})")
    if "handler" not in table:
        raise InvalidWorkflow(f"{where}: handler is required")
    try:
        return Step(name=step_name, **table)
    except TypeError as exc:
        raise InvalidWorkflow(f"{where}: {exc}") from None


def _check_step_shape(where: str, step: Step) -> None:
    if not isinstance(step.name, str) or not _NAME_RE.match(step.name) or len(step.name) > 64:
        raise InvalidWorkflow(
            f"{where}: step name {step.name!r}: letters, digits, '_' and '-', at most 64 "
            "(not starting with '-')"
        )
    at = f"{where}: step {step.name!r}"
    for key in ("handler", "task_class"):
        if not isinstance(getattr(step, key), str):
            raise InvalidWorkflow(f"{at}: {key} must be a string, got {getattr(step, key)!r}")
    for key in ("depends_on", "needs"):
        if not all(isinstance(n, str) for n in getattr(step, key)):
            raise InvalidWorkflow(f"{at}: {key} must be a list of names")
    try:
        # Sorted as workflow_id() sorts it: keys of mixed types (1 and "a")
        # cannot be, and failed there with a bare TypeError.
        text = encode_json(step.payload, "the payload", sort_keys=True)
    except ValueError as exc:
        raise InvalidWorkflow(f"{at}: {exc}") from None
    if depth := json_too_deep(text):
        # As a task's payload is refused (the references only add to it).
        raise InvalidWorkflow(f"{at}: {too_deep_error('the payload', depth)}")
    if step.fan_out is None:
        return
    match = _REF_RE.match(step.fan_out) if isinstance(step.fan_out, str) else None
    if match is None:
        raise InvalidWorkflow(
            f"{at}: fan_out must be a reference to a list, as in "
            f"'${{steps.prepare.result}}' or '${{inputs.items}}', got {step.fan_out!r}"
        )
    if match[1].strip().split(".")[0] in ("item", "index"):
        # What the fan-out makes cannot be what it is made from: every run failed.
        raise InvalidWorkflow(
            f"{at}: fan_out {step.fan_out}: ${{item}} and ${{index}} are what a fan-out makes; "
            "fan_out names a list in the inputs or an upstream step's result"
        )


def _ancestors_among(
    by_name: Mapping[str, Step], order: Iterable[str], asked: Mapping[str, set[str]]
) -> dict[str, set[str]]:
    """For each step of ``asked``, those of the steps asked about that are its ancestors.

    One pass in topological ``order``: a step's ancestors among the steps
    asked about (``wanted``) are a bit set, the union of its dependencies'
    (and of each dependency that is wanted). Only the sets of the steps whose
    dependents are still to come are kept: a chain holds one or two at a
    time. A chain of N steps each referring to its first costs N small unions
    (not a walk back to the first from each, N * N / 2 steps); each referring
    to a different earlier step, N unions of N bits, in C.
    """
    wanted: dict[str, int] = {}  # its bit's position (not the bit: N of those are N * N bits)
    for names in asked.values():
        for name in names:
            if name in by_name and name not in wanted:
                wanted[name] = len(wanted)
    left: dict[str, int] = dict.fromkeys(by_name, 0)  # dependents still to come, per step
    for step in by_name.values():
        for dep in dict.fromkeys(step.depends_on):
            left[dep] += 1
    kept: dict[str, int] = {}
    found: dict[str, set[str]] = {}
    for name in order:
        step = by_name[name]
        bits = 0
        for dep in dict.fromkeys(step.depends_on):
            bits |= kept[dep]
            if dep in wanted:
                bits |= 1 << wanted[dep]
            left[dep] -= 1
            if not left[dep]:
                del kept[dep]
        if name in asked:
            found[name] = {a for a in asked[name] if a in wanted and bits >> wanted[a] & 1}
        if left[name]:
            kept[name] = bits
    return found


def _walk_strings(value: Any) -> Iterator[str]:
    """The strings in ``value``, in order; with a stack of its own, not recursion,
    which a payload nested deeply enough would exhaust."""
    stack: list[Iterator[Any]] = [iter((value,))]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, str):
            yield item
        elif isinstance(item, Mapping):
            stack.append(iter(item.values()))
        elif isinstance(item, list | tuple):
            stack.append(iter(item))


_END = object()


def _references(step: Step) -> Iterator[list[str]]:
    texts = list(_walk_strings(step.payload))
    if step.fan_out is not None:
        texts.append(step.fan_out)
    for text in texts:
        match = _REF_RE.match(text)
        if match is not None:
            yield match[1].strip().split(".")


def _check_references(
    where: str,
    steps: Iterable[Step],
    by_name: Mapping[str, Step],
    order: Callable[[], Iterable[str]],
) -> None:
    """Raise for the first bad reference, in the steps' order and each step's.

    A reference to a step that is not a direct dependency must be to an
    ancestor: those are found for all such references at once, afterwards
    (found for each step alone, a chain of N steps each referring to its first
    walked back to it from each, N * N / 2 steps).
    """
    checks: list[tuple[str, str, list[tuple[str, str]], str | None]] = []
    asked: dict[str, set[str]] = {}  # step -> the steps it refers to beyond its depends_on
    for step in steps:
        at = f"{where}: step {step.name!r}"
        further: list[tuple[str, str]] = []  # (step referred to, reference), in order
        problem = None
        for path in _references(step):
            problem = _reference_problem(at, step, path)
            if problem is not None:
                break  # what comes after it in this step is not looked at
            if path[0] == "steps" and path[1] not in step.depends_on:
                further.append((path[1], "${" + ".".join(path) + "}"))
        if further:
            asked[step.name] = {name for name, _ in further}
        if further or problem is not None:
            checks.append((step.name, at, further, problem))
    ancestors = _ancestors_among(by_name, order(), asked) if asked else {}
    for name_of_step, at, further, problem in checks:
        for name, text in further:
            if name == name_of_step:
                raise InvalidWorkflow(f"{at}: {text} is its own result")
            if name not in by_name:
                raise InvalidWorkflow(
                    f"{at}: {text} refers to step {name!r}, which this workflow does not "
                    f"have (its steps: {', '.join(by_name)})"
                )
            if name not in ancestors[name_of_step]:
                raise InvalidWorkflow(
                    f"{at}: {text} refers to step {name!r}, which is not among its "
                    "dependencies (add it to depends_on)"
                )
        if problem is not None:
            raise InvalidWorkflow(problem)


def _reference_problem(at: str, step: Step, path: list[str]) -> str | None:
    """What is wrong with one reference of ``step`` whatever the other steps are, or None."""
    text = "${" + ".".join(path) + "}"
    root = path[0]
    if "" in path[1:]:  # ${inputs.x.}: it could name nothing an input holds
        return f"{at}: {text}: an empty name between dots"
    if root == "inputs":
        if len(path) < 2:  # an empty name is refused above
            return f"{at}: {text}: name an input, as in ${{inputs.dataset}}"
    elif root == "steps":
        if len(path) < 3 or path[2] != "result":
            return f"{at}: {text}: a step is referred to as ${{steps.NAME.result}}"
    elif root in ("item", "index"):
        if step.fan_out is None or (len(path) > 1 and root == "index"):
            return f"{at}: {text} is only meaningful in a fan_out step"
    else:
        return (
            f"{at}: {text}: unknown reference (expected inputs.NAME, steps.NAME.result, "
            "item or index)"
        )
    return None


class ReferenceError_(ValueError):  # noqa: N801 - not the builtin ReferenceError
    """A reference names something that the run does not have."""


# An index into a list: ASCII digits only ("²" is a digit to isdigit(), not
# to int()), one '-' at most ("--1" passed a '-' stripped, and int() failed),
# and 18 at most (int() refuses thousands; no list holds 10**18 items).
_INDEX_RE = re.compile(r"-?[0-9]{1,18}\Z")


def _lookup(value: Any, path: list[str], text: str) -> Any:
    for i, key in enumerate(path):
        if isinstance(value, Mapping) and key in value:
            value = value[key]
        elif (
            isinstance(value, list)
            and _INDEX_RE.match(key)
            and -len(value) <= int(key) < len(value)
        ):
            value = value[int(key)]
        else:
            at = ".".join(path[: i + 1])
            why = ""
            if isinstance(value, list):
                why = (
                    f" (a list of {len(value)}: an index is an integer from "
                    f"{-len(value)} to {len(value) - 1})"
                    if value
                    else " (an empty list)"
                )
            raise ReferenceError_(f"{text}: nothing at {at!r}{why}")
    return value


def resolve(value: Any, context: Mapping[str, Any]) -> Any:
    """``value`` with each ``"${...}"`` string replaced by what it names in ``context``.

    A copy of its lists and mappings (tuples become lists).
    """
    return _resolve(value, context, 0)


# Levels filled in by recursion (two frames a level: a payload half as deep as
# the limit on nesting, which the spec's checks accept, exhausted the stack);
# deeper ones with a stack of its own, which is slower.
_RECURSE = 50


def _resolve(value: Any, context: Mapping[str, Any], depth: int) -> Any:
    if isinstance(value, str):
        if value.startswith("$${") and _REF_RE.match(value[1:]):
            # The escape of a whole reference only: "$${HOME}/bin" is no
            # reference, and is left as it is.
            return value[1:]
        match = _REF_RE.match(value)
        return value if match is None else _lookup(context, match[1].strip().split("."), value)
    if isinstance(value, Mapping | list | tuple) and depth >= _RECURSE:
        return _resolve_deep(value, context)
    if isinstance(value, Mapping):
        return {k: _resolve(v, context, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_resolve(v, context, depth + 1) for v in value]
    return value


def _resolve_deep(value: Any, context: Mapping[str, Any]) -> Any:
    """:func:`resolve` with a stack of its own, not recursion."""
    root: list[Any] = [None]
    # (the value, the copy it goes into, its key or index there), in reverse
    # order: references are looked up in the order they appear.
    todo: list[tuple[Any, Any, Any]] = [(value, root, 0)]
    while todo:
        item, into, key = todo.pop()
        if isinstance(item, Mapping):
            copy: Any = dict.fromkeys(item)
            todo.extend((v, copy, k) for k, v in reversed(list(item.items())))
        elif isinstance(item, list | tuple):
            copy = [None] * len(item)
            todo.extend((v, copy, i) for i, v in reversed(list(enumerate(item))))
        else:
            copy = _resolve(item, context, 0)  # holds no other value: no recursion
        into[key] = copy
    return root[0]
