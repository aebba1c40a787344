"""The one cattrs converter: strict types, unknown keys refused, readable errors.

cattrs is lenient by default (``float("1")``, ``str(5)``); configuration
should not be, so scalar hooks accept only the TOML type they name.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import cattrs
from attrs import asdict, fields
from cattrs.cols import homogenous_tuple_structure_factory
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import (
    make_dict_structure_fn,
    make_dict_unstructure_fn,
    make_mapping_structure_fn,
    override,
)
from cattrs.v import format_exception

from dspy_infra.config.model import (
    Backoff,
    Config,
    Dependency,
    FieldError,
    HandlerConfig,
    InfraSettings,
    MetricsSettings,
    Probe,
    ProbeCallable,
    ServerSettings,
    ServiceConfig,
    TaskClass,
)

__all__ = ["converter", "describe_errors", "did_you_mean", "resolve_callable"]

T = TypeVar("T")

converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _kind(value: object) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "table",
    }.get(type(value), type(value).__name__)


def _expected(what: str, value: object) -> TypeError:
    return TypeError(f"expected {what}, got {value!r} ({_kind(value)})")


def _strict(tp: type[Any]) -> Callable[[object, type[Any]], Any]:
    accepted: tuple[type, ...] = (int, float) if tp is float else (tp,)

    def hook(value: object, _: type[Any]) -> Any:
        if isinstance(value, bool) and tp is not bool:
            raise _expected(_TYPE_NAMES[tp], value)
        if not isinstance(value, accepted):
            raise _expected(_TYPE_NAMES[tp], value)
        try:
            return tp(value)
        except OverflowError:
            raise TypeError(f"expected {_TYPE_NAMES[tp]}, got an integer too large") from None

    return hook


for _tp in (bool, int, float, str):
    converter.register_structure_hook(_tp, _strict(_tp))


def _structure_path(value: object, _: type[Any]) -> Path:
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise _expected("a path (string)", value)
    if not value.strip():
        # Path("") is ".": an empty state_dir (DSPY_INFRA_STATE_DIR= meant as
        # unset) put the store beside the configuration file without a word.
        raise _expected("a path", value)
    return Path(value)


def _structure_argv(value: object, _: type[Any]) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(a, str) for a in value):
        raise _expected("a list of strings", value)
    return tuple(value)


def _structure_command(value: object, _: type[Any]) -> tuple[str, ...] | str | None:
    if value is None or isinstance(value, str):
        return value
    return _structure_argv(value, tuple)


def _structure_optional_argv(value: object, _: type[Any]) -> tuple[str, ...] | None:
    # A probe command has no shell switch: only a list of arguments.
    if value is None:
        return None
    return _structure_argv(value, tuple)


def _structure_depends_on(value: object, _: type[Any]) -> dict[str, Dependency]:
    # Like compose: a list of names, or a table of name -> {condition, pattern}.
    if isinstance(value, list | tuple):
        if not all(isinstance(n, str) for n in value):
            raise _expected("a list of service names or a table", value)
        return {name: Dependency() for name in value}
    if isinstance(value, Mapping):
        return converter.structure(value, dict[str, Dependency])
    raise _expected("a list of service names or a table", value)


def resolve_callable(ref: str) -> ProbeCallable:
    """Import ``"package.module:function"`` and check that it is an async callable."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:function', got {ref!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import {ref!r}: {exc}") from None
    if not inspect.iscoroutinefunction(target) and not inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004 - an async __call__ counts too
    ):
        raise ValueError(f"{ref!r} is not an async function")
    return target  # type: ignore[no-any-return]


def _structure_call(value: object, _: type[Any]) -> ProbeCallable | str | None:
    if value is None or callable(value):
        return value
    if isinstance(value, str):
        return resolve_callable(value)
    raise _expected("'module:function' or an async callable", value)


def _is_literal(tp: object) -> bool:
    origin: object = get_origin(tp)
    return origin is Literal


def _structure_literal(value: object, tp: type[Any]) -> Any:
    choices = get_args(tp)
    if value not in choices:
        raise ValueError(f"expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value


def _table(hook: Callable[[Any, type[Any]], T]) -> Callable[[Any, type[Any]], T]:
    """Refuse a non-table up front: cattrs would fail on it with a Python internal message."""

    def structure(value: object, tp: type[Any]) -> T:
        if not isinstance(value, Mapping):
            raise _expected("a table", value)
        return hook(value, tp)

    return structure


def _is_dict(tp: object) -> bool:
    return get_origin(tp) is dict


def _dict_hook(tp: type[Any]) -> Callable[[Any, type[Any]], Any]:
    return _table(make_mapping_structure_fn(tp, converter))


def _is_array(tp: object) -> bool:
    args = get_args(tp)
    return get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis


def _array_hook(tp: type[Any]) -> Callable[[Any, type[Any]], Any]:
    """Refuse a non-array up front: cattrs iterates whatever it is given, so a
    string became its characters, a table its keys, and a number failed with
    "'int' object is not iterable"."""
    hook = homogenous_tuple_structure_factory(tp, converter)

    def structure(value: object, tp: type[Any]) -> Any:
        if not isinstance(value, list | tuple):
            raise _expected("an array", value)
        return hook(value, tp)

    return structure


converter.register_structure_hook(Path, _structure_path)
converter.register_structure_hook_func(_is_literal, _structure_literal)
converter.register_structure_hook_factory(_is_dict, _dict_hook)
converter.register_structure_hook_factory(_is_array, _array_hook)
for _cl in (Backoff, Dependency, InfraSettings, MetricsSettings, ServerSettings):
    converter.register_structure_hook(_cl, _table(make_dict_structure_fn(_cl, converter)))
# Field-level hooks: these types are unions or generics that cattrs cannot
# dispatch on, and their meaning (a command, a dependency table) is per field.
converter.register_structure_hook(
    Probe,
    _table(
        make_dict_structure_fn(
            Probe,
            converter,
            command=override(struct_hook=_structure_optional_argv),
            call=override(struct_hook=_structure_call),
        )
    ),
)


def _backoff_with_defaults(
    owner: type[ServiceConfig | TaskClass], name: str
) -> Callable[[object, type[Any]], Backoff]:
    """A partial backoff table keeps the field's own defaults for the other keys.

    ``start_backoff = { max = 1.0 }`` keeps ``initial = 0.2`` (the default of
    ``start_backoff``), not the 0.1 of a bare :class:`Backoff`.
    """
    base = asdict(getattr(owner(), name))

    def structure(value: object, _: type[Any]) -> Backoff:
        if isinstance(value, Mapping):
            value = {**base, **value}
        return converter.structure(value, Backoff)

    return structure


converter.register_structure_hook(
    ServiceConfig,
    _table(
        make_dict_structure_fn(
            ServiceConfig,
            converter,
            command=override(struct_hook=_structure_command),
            entrypoint=override(struct_hook=_structure_optional_argv),
            depends_on=override(struct_hook=_structure_depends_on),
            restart_backoff=override(
                struct_hook=_backoff_with_defaults(ServiceConfig, "restart_backoff")
            ),
            start_backoff=override(
                struct_hook=_backoff_with_defaults(ServiceConfig, "start_backoff")
            ),
        )
    ),
)
converter.register_structure_hook(
    TaskClass,
    _table(
        make_dict_structure_fn(
            TaskClass,
            converter,
            retry_backoff=override(struct_hook=_backoff_with_defaults(TaskClass, "retry_backoff")),
        )
    ),
)
converter.register_structure_hook(
    HandlerConfig,
    _table(
        make_dict_structure_fn(
            HandlerConfig,
            converter,
            command=override(struct_hook=_structure_command),
            entrypoint=override(struct_hook=_structure_optional_argv),
        )
    ),
)
# Last: generating the Config hook resolves the hooks of everything it holds.
converter.register_structure_hook(
    Config,
    _table(
        make_dict_structure_fn(
            Config, converter, source=override(omit=True), origins=override(omit=True)
        )
    ),
)


def _unstructure_call(value: ProbeCallable | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return f"{value.__module__}:{value.__qualname__}"


converter.register_unstructure_hook(Path, str)
converter.register_unstructure_hook(
    Probe,
    make_dict_unstructure_fn(Probe, converter, call=override(unstruct_hook=_unstructure_call)),
)
# Last, as for structuring. Who set what is no part of the configuration's
# content (and its keys are tuples).
converter.register_unstructure_hook(
    Config, make_dict_unstructure_fn(Config, converter, origins=override(omit=True))
)


def did_you_mean(name: object, known: Collection[str]) -> str:
    """``", did you mean 'backend'?"`` for a typo of a known name, else ``""``.

    The list of what is expected is long (24 keys of a service): the one
    meant is named first, as git and kubectl do. A typo is one edit away (a
    letter missing, extra, wrong, or two swapped), two for a longer name:
    ``bogus`` is no ``gpus``. Not difflib's ratio: it misses a swap in a
    short name (``tpc`` for ``tcp``) unless its cutoff lets ``bogus`` pass.
    """
    if not isinstance(name, str):  # a key of a mapping built in Python: no typo of a name
        return ""
    typed = name.lower()
    if typed in known:  # right as it is: the mistake is elsewhere (state_dir__x)
        return ""
    most = min(1 if len(typed) <= 5 else 2, len(typed) - 1)  # "x" is no typo of "y"
    distances = {k: _edits(typed, k) for k in known}
    close = [k for k, d in sorted(distances.items(), key=lambda kd: kd[1]) if d <= most]
    return f", did you mean {close[0]!r}?" if close else ""


def _edits(a: str, b: str) -> int:
    """Edits from ``a`` to ``b``: insertions, deletions, substitutions, adjacent swaps."""
    before: list[int] = []
    row = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        previous, row = row, [i, *[0] * len(b)]
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], before[j - 2] + 1)
        before = previous
    return row[-1]


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def describe_errors(exc: BaseException, path: str = "") -> list[tuple[str, str]]:
    """Flatten a cattrs error tree into ``(key.path, message)`` pairs."""
    if isinstance(exc, FieldError):
        return [(_join(path, exc.field), str(exc))]
    if isinstance(exc, ForbiddenExtraKeysError):
        names = sorted(a.name for a in fields(exc.cl) if not a.metadata.get("internal"))
        return [
            (
                _join(path, key),
                f"unknown key{did_you_mean(key, names)} (expected one of: {', '.join(names)})",
            )
            for key in sorted(exc.extra_fields)
        ]
    if isinstance(exc, ClassValidationError | IterableValidationError):
        found: list[tuple[str, str]] = []
        for sub in exc.exceptions:
            sub_path = path
            for note in getattr(sub, "__notes__", ()):
                if isinstance(note, IterableValidationNote):
                    # An array's item is named as everywhere else (services.a.command[2]),
                    # a table's by its key.
                    index = note.index
                    sub_path = f"{path}[{index}]" if isinstance(index, int) else _join(path, index)
                elif hasattr(note, "name"):
                    sub_path = _join(path, note.name)
            found.extend(describe_errors(sub, sub_path))
        return found
    if exc.args:
        return [(path, str(exc.args[0]))]
    return [(path, format_exception(exc, None))]
