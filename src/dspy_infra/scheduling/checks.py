"""The checks of a task request that need no configuration, written once for both sides.

The local scheduler runs them with the checks that need its configuration
(the class, the handler, ``max_priority``, the services, the machine's
capacity); the remote client runs them before it encodes a request, since
the wire cannot carry a wrong type (``True`` arrives as 1, ``None`` as 0 or
the default class) and encoding one fails with a bare TypeError. Both raise
the same :class:`~dspy_infra.errors.InvalidTask` with the same words.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable
from itertools import accumulate
from typing import Any

from dspy_infra.errors import InvalidTask
from dspy_infra.scheduling.store import JSON_ENCODER
from dspy_infra.scheduling.tasks import Resources, TaskRequest

__all__ = [
    "MAX_JSON_DEPTH",
    "check_ids",
    "encodable",
    "encode_json",
    "id_type_error",
    "json_too_deep",
    "max_attempts_error",
    "priority_error",
    "refused",
    "request_error",
    "resources_error",
    "shape_error",
    "timeout_error",
    "too_deep_error",
    "workflow_id_error",
]

_MAX_TASK_ID = 200
_TASK_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]*\Z")
# SQLite's INTEGER is 64-bit; a larger int is not a float either.
_MAX_STORED_INT = 2**63 - 1
_MAX_FLOAT_INT = int(sys.float_info.max)


# How deeply a payload, a result or a workflow's inputs may nest arrays and
# objects. JSON that Python encodes may still be too deep to decode where it
# is read next (deeper in some other stack: the limit of both is about a
# thousand levels less the frames below), and the engine read a run's inputs
# back inside the task that drives it, whose failure stopped the instance. A
# fixed limit, well below Python's, leaves the stack of any reader room.
MAX_JSON_DEPTH = 500

# A string of JSON text, escapes and all: its brackets are no nesting.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS_ONLY = str.maketrans("", "", "".join(c for c in map(chr, range(128)) if c not in "[]{}"))
_NESTING = {"[": 1, "{": 1, "]": -1, "}": -1}
# A key as JSON writes one that is no string (1, -2.5, 1e+16, true, null).
# A string's own '"' are escaped, so that what matches ends a key.
_WRITTEN_KEY = re.compile(r'"(?:-?[0-9][0-9.eE+-]*|true|false|null)":')


# The store's encoder, and one that sorts keys too, for values hashed sorted
# later: keys of mixed types (1 and "a") cannot be, and are refused here in
# the caller's words.
_chunks = JSON_ENCODER.iterencode
# JSON_ENCODER's own C encoder, made once: iterencode() makes one per call,
# which costs more than encoding a small payload does. It has no check for
# cycles (markers None): a cycle recurses until RecursionError.
_make_c_encoder = getattr(json.encoder, "c_make_encoder", None)
_c_chunks = _make_c_encoder and _make_c_encoder(
    None,
    JSON_ENCODER.default,
    json.encoder.encode_basestring_ascii,
    JSON_ENCODER.indent,
    JSON_ENCODER.key_separator,
    JSON_ENCODER.item_separator,
    JSON_ENCODER.sort_keys,
    JSON_ENCODER.skipkeys,
    JSON_ENCODER.allow_nan,
)


def _encoded(value: Any) -> str:
    if _c_chunks is not None:
        try:
            return "".join(_c_chunks(value, 0))
        except (TypeError, ValueError, RecursionError):
            pass  # encoded again below, to be refused in iterencode()'s words (a cycle's)
    return "".join(_chunks(value, _one_shot=True))


_dumps_sorted = json.JSONEncoder(separators=(",", ":"), allow_nan=False, sort_keys=True).encode


def encode_json(value: Any, what: str, *, verb: str = "is", sort_keys: bool = False) -> str:
    """``value`` as compact JSON, or ValueError with the words every caller refuses it with.

    Each caller wraps the reason in its own error (InvalidTask, InvalidWorkflow,
    a task's failure), so the words are the same wherever a value is refused.
    Nesting too deep for this stack is refused here (RecursionError); nesting
    that encodes but may be too deep to decode elsewhere is :func:`json_too_deep`'s.
    """
    # How deep a value encodes depends on the frames below: each caller's
    # limit stays where it was. Unsorted (a task's payload or result, a run's
    # inputs, called where the store's encode() was) there are no more frames
    # below than encode() had, so that what the server just managed to decode
    # still encodes here. Sorted (a workflow's payloads, once per spec) it keeps
    # the frame that json.dumps() had there.
    try:
        text = _dumps_sorted(value) if sort_keys else _encoded(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{what} {verb} not JSON-compatible ({exc})") from None
    if "{" in text and _key_written_twice(text) and (clash := _key_clash(value)):
        raise ValueError(f"{what} {verb} not JSON-compatible ({clash})")
    return text


def _key_written_twice(text: str) -> bool:
    """Whether a key of ``value`` may be another's once written, as its ``text`` tells.

    Only a key that is no string can be written as another one is, and then
    that key's text appears twice: an ordinary value (string keys that are
    not numbers, or each once) costs a scan of its text, not a walk of it.
    """
    keys = _WRITTEN_KEY.findall(text)
    return len(keys) > len(set(keys))


def _key_clash(value: Any) -> str | None:
    """Which two keys of a dict in ``value`` JSON writes as one, and where; else None.

    JSON keys are strings: ``json.dumps`` writes 1 as "1", and
    ``{1: "a", "1": "b"}`` as an object with that key twice, which decodes
    with one of its values. Walked without recursion: the value encoded, but
    may nest deeper than this stack has room for.
    """
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict):
            seen: dict[str, Any] = {}
            for key, child in item.items():
                written = key if isinstance(key, str) else _written_key(key)
                if written in seen:
                    where = f" at {path}" if path else ""
                    return (
                        f"its keys {seen[written]!r} and {key!r}{where} are both "
                        f"{json.dumps(written)} as JSON: one value would be lost"
                    )
                seen[written] = key
                stack.append((child, f"{path}[{key!r}]"))
        elif isinstance(item, list | tuple):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
    return None


def _written_key(key: float | bool | None) -> str:
    """The key that ``json.dumps`` writes for ``key``, which is no string (but encoded)."""
    if key is None or isinstance(key, bool):
        return json.dumps(key)
    if isinstance(key, int):
        return int.__repr__(key)
    return float.__repr__(key)


def json_too_deep(text: str) -> int | None:
    """How deeply ``text`` nests if that is more than :data:`MAX_JSON_DEPTH`, else None.

    ``text`` is JSON as ``json.dumps`` writes it (characters beyond ASCII
    escaped). Short text, or text with few brackets, is answered at once;
    else a scan costs about a third of what encoding it did.
    """
    if len(text) <= 2 * MAX_JSON_DEPTH or text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return None
    if '"' in text:
        text = _JSON_STRING.sub("", text)
    depth = max(accumulate(map(_NESTING.__getitem__, text.translate(_BRACKETS_ONLY))), default=0)
    return depth if depth > MAX_JSON_DEPTH else None


def too_deep_error(what: str, depth: int) -> str:
    return f"{what} is nested {depth} levels deep, over the limit of {MAX_JSON_DEPTH}"


def refused(task_id: str | None, problem: str) -> InvalidTask:
    """The error for a request refused for ``problem``; a task without an id yet is named so."""
    if not task_id:
        return InvalidTask("", f"task refused: {problem}")
    return InvalidTask(task_id, f"task {task_id!r} refused: {problem}")


def check_template(template: TaskRequest) -> None:
    """Raise InvalidTask if ``template`` (of a submit by payload) names an id: its
    tasks get one each."""
    if template.task_id is not None:
        raise refused(template.task_id, "each task submitted by payload gets an id of its own")


def check_ids(requests: Iterable[TaskRequest]) -> None:
    """Raise InvalidTask for the first id given that could not name a task."""
    for request in requests:
        task_id = request.task_id
        if task_id is not None and (bad := _task_id_error(task_id)):
            raise InvalidTask(str(task_id), bad)


def id_type_error(value: object, what: str) -> str | None:
    """What is wrong with ``value`` as the id ``what`` (``task_id``, ``run_id``...)
    given to look something up, or None: only its type, since a string that
    names nothing is unknown, not wrong.

    The objects that carry an id (a :class:`~dspy_infra.scheduling.tasks.TaskHandle`,
    a workflow run's handle) given for it failed deep inside, with "unhashable
    type" or SQLite's "Error binding parameter" (over gRPC, "has no attribute
    'encode'").
    """
    if isinstance(value, str):
        return None
    carried = getattr(value, what, None)
    if isinstance(carried, str):
        kind = type(value).__name__
        return f"{what} must be a string, got a {kind}: pass its .{what} ({carried!r})"
    return f"{what} must be a string, got {value!r:.200}"


def _task_id_error(task_id: object) -> str | None:
    if not isinstance(task_id, str) or not task_id:
        return f"task_id must be a non-empty string, got {task_id!r}"
    if len(task_id) > _MAX_TASK_ID:
        return f"task_id is {len(task_id)} characters long, over the limit of {_MAX_TASK_ID}"
    if not _TASK_ID_RE.match(task_id):
        # It names the task's directory under the state dir: no '/', no '..'.
        return (
            f"task_id {task_id!r} may only hold letters, digits and '_', '-', '.', ':', "
            "starting with a letter, digit or '_'"
        )
    return None


def request_error(request: TaskRequest) -> str | None:
    """What is wrong with ``request`` whatever the configuration, or None.

    Values left to the class (None) are not looked at: the class's are
    checked where the configuration is.
    """
    resources = request.resources
    return (
        shape_error(request)
        or priority_error(request.priority)
        or (None if request.max_attempts is None else max_attempts_error(request.max_attempts))
        or timeout_error(request.timeout)
        or (
            None
            if resources is None
            else resources_error(resources.cpus, resources.memory_mb, resources.gpus)
        )
    )


def shape_error(request: TaskRequest) -> str | None:
    """Wrong types, before anything looks the values up (a list is not hashable)."""
    for what in ("handler", "task_class"):
        value = getattr(request, what)
        if not isinstance(value, str):
            return f"{what} must be a string, got {value!r}"
    if problem := workflow_id_error(request.workflow_id):
        return problem
    needs = request.needs
    if (
        isinstance(needs, str)
        or not isinstance(needs, Iterable)
        or not all(isinstance(n, str) for n in needs)
    ):
        return f"needs must be a list of service names, got {needs!r}"
    if request.resources is not None and not isinstance(request.resources, Resources):
        return f"resources must be a Resources or None, got {request.resources!r}"
    return _text_error(request)


def _text_error(request: TaskRequest) -> str | None:
    """Text of the right type that neither the store nor the wire can hold."""
    for what in ("handler", "task_class"):
        if not encodable(value := getattr(request, what)):
            # A handler registered under such a name would reach the store.
            return f"{what} must be text that UTF-8 can encode, got {value!r}"
    if not all(map(encodable, request.needs)):
        # No service is named so (a configuration is UTF-8).
        return f"needs must be service names that UTF-8 can encode, got {request.needs!r}"
    return None


def workflow_id_error(workflow_id: object) -> str | None:
    if workflow_id is None or (
        isinstance(workflow_id, str) and len(workflow_id) <= _MAX_TASK_ID and encodable(workflow_id)
    ):
        return None
    return (
        f"workflow_id must be a string of at most {_MAX_TASK_ID} characters (that UTF-8 "
        f"can encode) or None, got {workflow_id!r}"
    )


def encodable(text: str) -> bool:
    """Whether SQLite can store ``text``: UTF-8 encodes anything but lone surrogates."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def priority_error(priority: object) -> str | None:
    """Its type only (True == 1, but True is no priority): its range is the configuration's."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        return f"priority must be an integer, got {priority!r}"
    return None


# Bounded by what the store's INTEGER and REAL hold: beyond, the insert
# fails, and a failed commit stops the instance.


def max_attempts_error(max_attempts: object) -> str | None:
    if (
        isinstance(max_attempts, bool)
        or not isinstance(max_attempts, int)
        or not 1 <= max_attempts <= _MAX_STORED_INT
    ):
        return f"max_attempts must be an integer from 1 to {_MAX_STORED_INT}, got {max_attempts!r}"
    return None


def timeout_error(timeout: object) -> str | None:
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not timeout > 0
        or (isinstance(timeout, int) and timeout > _MAX_FLOAT_INT)
    ):
        return f"timeout must be a number of seconds above 0, got {timeout!r}"
    return None


def resources_error(cpus: object, memory_mb: object, gpus: object) -> str | None:
    """What is wrong with the amounts a task holds; None is the class's, not looked at."""
    for what, amount, kind in zip(
        ("cpus", "memory_mb", "gpus"), (cpus, memory_mb, gpus), (int | float, int, int), strict=True
    ):
        # ``not >= 0`` also refuses NaN; ``< inf`` the CPUs no runner can ask for
        # (sbatch's and Docker's are integers: inf failed each attempt with an
        # OverflowError). Stored as JSON: any finite size fits.
        if amount is not None and (
            isinstance(amount, bool) or not isinstance(amount, kind) or not 0 <= amount < math.inf
        ):
            expected = "a finite number" if what == "cpus" else "an integer"
            return f"resources.{what} must be {expected} of at least 0, got {amount!r}"
    return None
