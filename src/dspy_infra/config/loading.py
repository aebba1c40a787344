"""Reading a configuration: file, ``[tool.dspy-infra]``, environment, overrides.

Precedence, lowest first: defaults, the file, ``DSPY_INFRA_*`` environment
variables, keyword overrides. Everything is merged as plain data, structured
once by the converter, then checked across fields. Every error is a
:class:`~dspy_infra.errors.ConfigError` naming where the bad value came from
(file or environment variable), its key path and what was expected.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import tomli_w
import yarl
from attrs import asdict, evolve, fields
from cattrs.errors import BaseValidationError

from dspy_infra.config.compose import host_path, read_compose
from dspy_infra.config.converter import converter, describe_errors, did_you_mean
from dspy_infra.config.model import (
    DEFAULT_CLASSES,
    INDEX_RE,
    KEY_NAME_RE,
    PROBE_KINDS,
    Config,
    InfraSettings,
    ServiceConfig,
    expand_home,
    origin_of,
)
from dspy_infra.config.placeholders import (
    HANDLER_PLACEHOLDERS,
    Endpoint,
    PlaceholderError,
    RenderContext,
    render,
    render_handler,
)
from dspy_infra.errors import ConfigError

__all__ = ["ENV_PREFIX", "dump_config", "find_cycle", "load_config", "service_templates"]

ENV_PREFIX = "DSPY_INFRA_"
DEFAULT_FILE = "dspy-infra.toml"
_SECTIONS = frozenset(a.name for a in fields(Config) if not a.metadata.get("internal"))
_INFRA_KEYS = frozenset(a.name for a in fields(InfraSettings))
_KNOWN_BACKENDS = ("local", "docker")
KNOWN_RUNNERS = ("inprocess", "process", "docker", "slurm")
_ABSOLUTE_PLACEHOLDERS = ("{state_dir}", "{service_dir}")  # absolute paths, once filled in
_HTTP_ONLY = ("status", "body")  # probe keys that go with an http probe
_ENV_OWNERS = ("services", "handlers")  # the sections whose tables hold an env table


def load_config(
    source: Config | str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build a :class:`Config` from a file path, a mapping, a Config or nothing.

    With nothing, ``$DSPY_INFRA_CONFIG``, then ``./dspy-infra.toml``, then
    ``[tool.dspy-infra]`` in ``./pyproject.toml`` are tried; else defaults.
    A ``.yml`` or ``.yaml`` path is a Docker Compose file (see
    :mod:`dspy_infra.config.compose`).
    """
    environ = os.environ if environ is None else environ
    if isinstance(source, Config):
        if not overrides and not any(_env_items(environ)):
            return source
        # attrs.asdict, not the converter: a probe's Python callable must stay
        # itself (a closure has no importable "module:function" name).
        raw, name = asdict(source), source.source
        raw.pop("source", None)
        raw.pop("origins", None)
        # Its file's directory, as when it was loaded: a relative path that a
        # variable or an override sets is relative to the file (see docs).
        base = Path(name).parent if name not in (None, "<mapping>") else Path.cwd()
    elif isinstance(source, Mapping):
        raw, name, base = _copy_tables(source), "<mapping>", Path.cwd()
    else:
        path = _find_file(source, environ)
        if path is None:
            raw, name, base = {}, None, Path.cwd()
        else:
            raw, name, base = _read_file(path, environ), str(path), path.parent

    # Who set what: the values each layer wrote and the tables it made, not
    # the key it was given. A table merges key by key, so a value it left is
    # still the file's; a table it made (a typo of a service name) is its own.
    origins = dict(source.origins) if isinstance(source, Config) else {}
    written: list[tuple[str, ...]] = []
    for key_path, value, origin in _env_items(environ):
        made = _merge(raw, key_path, value, origin)
        written += made
        origins.update(dict.fromkeys(made, origin))
    _one_probe_kind(raw, written)
    written = []
    for key, value in (overrides or {}).items():
        placed = _place(_split(key))
        if placed is None:
            known = sorted(_SECTIONS | _INFRA_KEYS)
            raise ConfigError(
                f"unknown key{did_you_mean(key.split('__')[0], known)} "
                f"(expected a section or an [infra] key: {', '.join(known)})",
                source="overrides",
                path=key,
            )
        origin = f"override {key}="
        made = _merge(raw, placed, value, origin)
        written += made
        origins.update(dict.fromkeys(made, origin))
    _one_probe_kind(raw, written)
    # A Config holds its compose services already, unless a layer names another file.
    if not isinstance(source, Config) or _new_compose(raw, source, base, origins):
        origins = _with_compose(raw, base, environ, origins, name)

    _with_default_classes(raw)
    config = _structure(raw, name, origins)
    config = _resolve_paths(config, base)
    validate(config)
    return config


def _find_file(source: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path | None:
    if source is not None:
        return Path(source)
    if env_path := environ.get(f"{ENV_PREFIX}CONFIG"):
        return Path(env_path)
    if Path(DEFAULT_FILE).is_file():
        return Path(DEFAULT_FILE)
    pyproject = Path("pyproject.toml")
    if pyproject.is_file():
        tool = _read_toml(pyproject).get("tool")
        if isinstance(tool, dict) and "dspy-infra" in tool:
            return pyproject
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        # A byte order mark, which editors on Windows write, is no TOML
        # statement ("Invalid statement (at line 1, column 1)"): skipped.
        return tomllib.loads(path.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError("file not found", source=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", source=str(path)) from None
    except UnicodeDecodeError:
        # tomllib decodes the bytes itself, and lets this one through: a file
        # saved as Latin-1 or UTF-16 by an editor is bad input like any other.
        raise ConfigError("cannot read: not UTF-8 text", source=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(path)) from None


def _read_file(path: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    if path.suffix in (".yml", ".yaml"):
        return read_compose(path, environ=environ)
    data = _read_toml(path)
    if path.name == "pyproject.toml":
        tool = data.get("tool")
        section = tool.get("dspy-infra") if isinstance(tool, dict) else None
        if not isinstance(section, dict):
            raise ConfigError("no [tool.dspy-infra] table", source=str(path))
        return section
    return data


def _split(flat: str) -> list[str]:
    """The names of a flat key (``SERVICES__REDIS__RESTART``), lower-cased as config keys are.

    But for the name of an ``env`` entry (``SERVICES__REDIS__ENV__HF_TOKEN``):
    that names an environment variable, whose case is its own, as in a TOML
    table.
    """
    parts = flat.split("__")
    lowered = [part.lower() for part in parts]
    if len(parts) == 4 and lowered[0] in _ENV_OWNERS and lowered[2] == "env":
        lowered[3] = parts[3]
    return lowered


def _place(parts: list[str]) -> tuple[str, ...] | None:
    """Where a flat key (``backend``, ``services__redis__image``) goes, or None."""
    if not parts or not all(parts):
        return None
    if parts[0] in _SECTIONS:
        return tuple(parts)
    if parts[0] in _INFRA_KEYS and len(parts) == 1:
        return ("infra", parts[0])
    return None


def _env_items(environ: Mapping[str, str]) -> Iterator[tuple[tuple[str, ...], Any, str]]:
    """``DSPY_INFRA_STATE_DIR=x``, ``DSPY_INFRA_SERVICES__REDIS__RESTART=always``.

    Variables whose name is not a section or an ``[infra]`` key belong to
    other tools (``DSPY_INFRA_CONFIG``, test switches) and are skipped. Values
    are read as TOML values (``5``, ``true``, ``["a"]``), else as strings.
    """
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        key_path = _place(_split(name[len(ENV_PREFIX) :]))
        if key_path is not None:
            yield key_path, _parse_env_value(value), f"environment variable {name}"


def _parse_env_value(value: str) -> Any:
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def _merge(
    raw: dict[str, Any], key_path: tuple[str, ...], value: Any, origin: str
) -> list[tuple[str, ...]]:
    """Set ``key_path`` in ``raw``; a table merges key by key into a table already there.

    Returns the key paths of the values set (a table's, each of its own),
    for :func:`_one_probe_kind`, and of the tables it made, where there was
    none: whatever a table made here holds, or lacks, is this layer's.
    """
    node = raw
    made: list[tuple[str, ...]] = []
    for i, key in enumerate(key_path[:-1]):
        if key not in node:
            made.append(key_path[: i + 1])
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"cannot set {'.'.join(key_path)}: expected a table here, got {child!r}",
                source=origin,
                path=".".join(key_path[: i + 1]),
            )
        node = child
    leaf = key_path[-1]
    if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
        return made + [
            (*key_path[:-1], *inner)
            for k, v in value.items()
            for inner in _merge(node, (leaf, k), v, origin)
        ]
    node[leaf] = _copy_tables(value) if isinstance(value, Mapping) else value
    return made + list(_leaves(key_path, value, tables=True))


def _leaves(
    key_path: tuple[str, ...], value: Any, *, tables: bool = False
) -> Iterator[tuple[str, ...]]:
    """The key paths of the values in ``value``, a table or not, at ``key_path``.

    With ``tables``, those of the tables in it too, ``value`` first.
    """
    if isinstance(value, Mapping) and value:
        if tables:
            yield key_path
        for key, inner in value.items():
            yield from _leaves((*key_path, key), inner, tables=tables)
    else:
        yield key_path


def _one_probe_kind(raw: dict[str, Any], written: Iterable[tuple[str, ...]]) -> None:
    """A probe kind that one layer names replaces the kind of the probe below it.

    A probe has one kind, so ``health = { http = "..." }`` over a ``tcp``
    probe makes an ``http`` probe, not one with both (which the model
    refuses); the timings below stay unless the layer sets them, as the
    rest of the table merges key by key. ``status`` and ``body`` go with
    the ``http`` probe they belong to, unless the layer sets them. Two
    kinds named by the same layer are left as they are: a ConfigError that
    names the layer. ``written`` are the key paths that the layer set.
    """
    named: dict[str, set[str]] = {}
    for path in written:
        if len(path) == 4 and path[0] == "services" and path[2] == "health":
            named.setdefault(path[1], set()).add(path[3])
    services = raw.get("services")
    for name, keys in named.items():
        table = services.get(name) if isinstance(services, dict) else None
        health = table.get("health") if isinstance(table, dict) else None
        if not isinstance(health, dict):  # replaced since by a value the converter refuses
            continue
        kinds = {key for key in keys if key in PROBE_KINDS and health.get(key)}
        if not kinds:  # only timings (or `container = false`): the kind below stays
            continue
        stale = [*PROBE_KINDS, *(_HTTP_ONLY if "http" not in kinds else ())]
        for key in stale:
            if key not in keys:
                health.pop(key, None)


def _copy_tables(table: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the nested tables, so that merging never changes the caller's mappings."""
    return {k: _copy_tables(v) if isinstance(v, Mapping) else v for k, v in table.items()}


def _with_compose(
    raw: dict[str, Any],
    base: Path,
    environ: Mapping[str, str],
    origins: Mapping[tuple[str, ...], str],
    name: str | None,
) -> dict[tuple[str, ...], str]:
    """Put the services of ``[infra] compose`` under the configuration's own.

    So a compose file is reused as it is, and TOML, the environment and
    keywords change only the keys they set: a service table merges key by
    key into the compose service of the same name. A ``health`` table that
    names another kind of probe (``http``, ``tcp``, ...) replaces the compose
    ``command``, as any layer's does (:func:`_one_probe_kind`). Returns the
    origins with the compose file's values added, lowest, so that an error
    in one of them names the compose file.
    """
    infra = raw.get("infra")
    compose = infra.get("compose") if isinstance(infra, dict) else None
    own = raw.get("services", {})
    if (
        not isinstance(infra, dict)
        or not isinstance(compose, str | os.PathLike)
        or not str(compose).strip()
        or not isinstance(own, dict)
    ):
        return dict(origins)  # none, or a wrong type or value that the converter reports
    set_by = origins.get(("infra", "compose"), name)
    try:
        path = base / expand_home(str(compose))
    except ValueError as exc:
        raise ConfigError(str(exc), source=set_by, path="infra.compose") from None
    try:
        document = read_compose(path, environ=environ)
    except ConfigError as exc:
        if exc.source != str(path) or str(exc) != f"{path}: file not found":
            raise
        # Named where it was set: the compose file's own name says nothing
        # of which file or variable asked for it.
        raise ConfigError(f"file not found: {path}", source=set_by, path="infra.compose") from None
    services: dict[str, Any] = document["services"]
    found: dict[tuple[str, ...], str] = {}
    # A table that a variable or an override made, where the TOML has none
    # ([services], a service's, its health), holds compose's under it: what
    # that lacks is the compose file's to answer for, not the layer's.
    document_tables = {"services": services} if services else {}
    layers: dict[tuple[str, ...], str] = {}
    for where, origin in origins.items():
        if isinstance(_table_at(document_tables, where), dict) and isinstance(
            _table_at(raw, where), dict
        ):
            found[where] = str(path)
        else:
            layers[where] = origin
    # Its backend ("docker": images are what it describes) and project, lowest too.
    for key, value in document["infra"].items():
        if key not in infra:
            infra[key] = value
            found[("infra", key)] = str(path)
    for svc, table in services.items():
        mine = own.get(svc)
        if not isinstance(mine, Mapping):
            found[("services", svc)] = str(path)
            continue
        found.update({("services", svc, key): str(path) for key in table if key not in mine})
    merged = {"services": services}
    _one_probe_kind(merged, _merge(merged, ("services",), own, str(path)))
    raw["services"] = services
    return {**found, **layers}


def _new_compose(
    raw: dict[str, Any], config: Config, base: Path, origins: Mapping[tuple[str, ...], str]
) -> bool:
    """Whether a variable or an override names a compose file that ``config`` has not read.

    If so, ``backend`` and ``project`` that are the Config's defaults, and that
    no layer set, are dropped from ``raw``: the compose file's go where
    ``[infra]`` does not set them, as for a file.
    """
    infra = raw.get("infra")
    compose = infra.get("compose") if isinstance(infra, dict) else None
    if (
        ("infra", "compose") not in origins
        or not isinstance(infra, dict)
        or not isinstance(compose, str | os.PathLike)
        or not str(compose).strip()
    ):
        return False
    path = Path(compose)
    if (path if path.is_absolute() else (base / path).resolve()) == config.infra.compose:
        return False
    defaults = InfraSettings()
    for key in ("backend", "project"):
        if ("infra", key) not in origins and infra.get(key) == getattr(defaults, key):
            infra.pop(key)
    return True


def _table_at(raw: Mapping[str, Any], key_path: tuple[str, ...]) -> Any:
    """The value at ``key_path`` in ``raw``, or None."""
    value: Any = raw
    for key in key_path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _with_default_classes(raw: dict[str, Any]) -> None:
    """A ``[classes.cpu_short]`` table changes only the keys it sets of the default class."""
    classes = raw.get("classes", {})
    if not isinstance(classes, dict):
        return  # the converter reports it
    merged: dict[str, Any] = {
        name: converter.unstructure(default) for name, default in DEFAULT_CLASSES.items()
    }
    for name, table in classes.items():
        if isinstance(table, dict) and name in merged:
            merged[name] = {**merged[name], **table}
        else:
            merged[name] = table
    raw["classes"] = merged


def _structure(
    raw: dict[str, Any], name: str | None, origins: Mapping[tuple[str, ...], str]
) -> Config:
    try:
        config = converter.structure(raw, Config)
    except BaseValidationError as exc:
        problems = describe_errors(exc)
        path, message = problems[0]
        # A key that no one set holds its default, fine on its own: the value at
        # odds with it (interval over a default max_interval) is its table's.
        where, _, key = INDEX_RE.sub("", path).rpartition(".")
        table = _table_at(raw, tuple(where.split("."))) if where else None
        unset = isinstance(table, Mapping) and key not in table
        origin = origin_of(where if unset else path, origins, name)
        if len(problems) > 1:
            message += (
                f" (and {len(problems) - 1} more: "
                + "; ".join(f"{p}: {m}" for p, m in problems[1:])
                + ")"
            )
        raise ConfigError(message, source=origin, path=path) from None
    return evolve(config, source=name, origins=origins)


def _resolve_paths(config: Config, base: Path) -> Config:
    """Relative paths are relative to the file they were written in (like compose)."""

    # A leading ~ is a home directory, as a shell (and compose) reads it.
    def absolute(path: Path) -> Path:
        path = expand_home(str(path))
        return path if path.is_absolute() else (base / path).resolve()

    def resolved(cwd: str | None) -> str | None:
        return None if cwd is None else str(absolute(Path(cwd)))

    def literal(path: Path) -> str:
        return str(path).replace("{", "{{").replace("}", "}}")

    def resolved_template(cwd: str | None) -> str | None:
        # A service's cwd is a template: one with placeholders is made
        # absolute here too (it was left relative, so it was taken from
        # wherever the program ran), unless a placeholder that is a path
        # starts it; the file's directory goes in with its braces escaped,
        # since they are part of a name, not placeholders.
        if cwd is None or cwd.startswith(_ABSOLUTE_PLACEHOLDERS):
            return cwd
        if cwd.startswith("~"):
            head, sep, rest = cwd.partition("/")
            return f"{literal(expand_home(head))}{sep}{rest}"
        if Path(cwd).is_absolute():
            return cwd
        if "{" not in cwd:
            return literal((base / cwd).resolve())
        return f"{literal(base.resolve())}/{cwd}"

    def mount(volume: str) -> str:
        # A source with a slash or a leading dot or tilde is a host path; else a volume name.
        source, _, rest = volume.partition(":")
        if source.startswith((".", "~")) or ("/" in source and not source.startswith("/")):
            return f"{host_path(source, base)}:{rest}"
        return volume

    def mounts(volumes: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(mount(v) for v in volumes)

    services = {
        name: evolve(s, cwd=resolved_template(s.cwd), volumes=mounts(s.volumes))
        for name, s in config.services.items()
    }
    handlers = {
        name: evolve(h, cwd=resolved(h.cwd), volumes=mounts(h.volumes))
        for name, h in config.handlers.items()
    }
    return evolve(
        config,
        infra=evolve(
            config.infra,
            state_dir=absolute(config.infra.state_dir),
            compose=None if config.infra.compose is None else absolute(config.infra.compose),
        ),
        services=services,
        handlers=handlers,
    )


def dependency_closure(config: Config, name: str) -> list[str]:
    """Every service ``name`` depends on, directly or not."""
    seen: dict[str, None] = {}
    stack = list(config.services[name].depends_on)
    while stack:
        dep = stack.pop()
        if dep not in seen and dep in config.services:
            seen[dep] = None
            stack.extend(config.services[dep].depends_on)
    return list(seen)


def validate(config: Config) -> None:
    """Checks that span fields: names, backend, dependencies, cycles, placeholders.

    An error names what set the value (:meth:`Config.source_of`): an
    environment variable or an override rather than the file.
    """

    def fail(path: str, message: str) -> ConfigError:
        return ConfigError(message, source=config.source_of(path), path=path)

    for name in config.services:
        if not KEY_NAME_RE.match(name):
            raise fail(
                f"services.{name}",
                f"{name!r} is not a valid service name "
                "(letters, digits, '_', '-'; starting with a letter or digit)",
            )

    if config.infra.backend not in _KNOWN_BACKENDS:
        known = ", ".join(_KNOWN_BACKENDS)
        raise fail(
            "infra.backend",
            f"unknown backend {config.infra.backend!r} (expected one of: {known})",
        )
    for name, svc in config.services.items():
        if not svc.command and config.infra.backend == "local":
            raise fail(f"services.{name}.command", "required with the local backend")
        if not svc.image and config.infra.backend == "docker":
            raise fail(f"services.{name}.image", "required with the docker backend")
        _check_dependencies(config, name, fail)
    _check_tasks(config, fail)
    _check_cycles(config, fail)
    for name in config.services:
        ctx = _validation_context(config, name)
        for path, template in service_templates(config.services[name]):
            try:
                rendered = render(template, ctx)
            except PlaceholderError as exc:
                raise fail(f"services.{name}.{path}", str(exc)) from None
            if problem := _probe_target_problem(path, template, rendered):
                raise fail(f"services.{name}.{path}", problem)


def _probe_target_problem(path: str, template: str, target: str) -> str | None:
    """What makes a ``tcp`` or ``http`` probe's target (placeholders filled) unusable, if anything.

    Checked at load time: a target that no check can reach (``tcp = "localhost"``,
    an URL without its ``http://``) otherwise failed every check until the
    probe's deadline, a minute later, with a message that named no key.
    Auto ports read as 0 here, so 0 passes. The port is read with int(), as
    the check reads it: what the check reaches (``" {port}"``, whitespace
    included) must load.
    """
    if path == "health.tcp":
        host, sep, port = target.rpartition(":")
        try:
            reachable = 0 <= int(port) <= 65535 and bool(host or not sep)
        except ValueError:
            reachable = False
        if not reachable:
            return (
                "expected a port or 'HOST:PORT' (as in '{port}' or '127.0.0.1:{port}'), "
                f"got {template!r}"
            )
    elif path == "health.http":
        try:
            url = yarl.URL(target)
            ok = url.scheme in ("http", "https") and bool(url.host) and url.port is not None
        except ValueError:
            ok = False
        if not ok:
            return (
                "expected an http:// or https:// URL with a host "
                f"(as in 'http://127.0.0.1:{{port}}/health'), got {template!r}"
            )
    return None


def _check_dependencies(config: Config, name: str, fail: Any) -> None:
    for dep, spec in config.services[name].depends_on.items():
        if dep not in config.services:
            raise fail(
                f"services.{name}.depends_on.{dep}",
                f"unknown service {dep!r} (configured: {', '.join(sorted(config.services))})",
            )
        if spec.condition == "log_ready" and spec.pattern is None:
            probe = config.services[dep].health
            if probe is None or probe.log is None:
                raise fail(
                    f"services.{name}.depends_on.{dep}",
                    f"condition 'log_ready' needs a pattern (or a log probe on {dep!r})",
                )


def _check_tasks(config: Config, fail: Any) -> None:
    for name, task_class in config.classes.items():
        if not KEY_NAME_RE.match(name):
            raise fail(
                f"classes.{name}",
                f"{name!r} is not a valid class name "
                "(letters, digits, '_', '-'; starting with a letter or digit)",
            )
        if task_class.runner not in KNOWN_RUNNERS:
            raise fail(
                f"classes.{name}.runner",
                f"unknown runner {task_class.runner!r} "
                f"(expected one of: {', '.join(KNOWN_RUNNERS)})",
            )
    stand_ins = dict.fromkeys(HANDLER_PLACEHOLDERS, "x")
    for name, handler in config.handlers.items():
        if handler.command is None:
            if handler.image is None:  # an image's own ENTRYPOINT and CMD may do
                raise fail(f"handlers.{name}.command", "required (or an image)")
            continue
        parts = (
            [("", handler.command)]
            if isinstance(handler.command, str)
            else [(f"[{i}]", part) for i, part in enumerate(handler.command)]
        )
        for at, part in parts:
            try:
                render_handler(part, stand_ins)
            except PlaceholderError as exc:
                raise fail(f"handlers.{name}.command{at}", str(exc)) from None


def _check_cycles(config: Config, fail: Any) -> None:
    graph = {name: config.services[name].depends_on for name in sorted(config.services)}
    cycle = find_cycle(graph)
    if cycle is not None:
        raise fail(f"services.{cycle[0]}.depends_on", "cycle: " + " -> ".join(cycle))


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """The first cycle of ``depends_on`` edges, as ``[a, b, a]``; None if there is none.

    Searched from each name in ``graph``'s order; a dependency that ``graph``
    does not hold is a leaf. Serves services and workflow steps alike.

    Depth first with a stack of its own, not recursion: a workflow of a few
    thousand steps in a chain is a path longer than Python's recursion limit.
    """
    done: set[str] = set()
    for root in graph:
        if root in done:
            continue
        path = [root]  # the names being visited, each a dependency of the one before
        on_path = {root: 0}  # their positions in path
        left = [iter(graph.get(root, ()))]  # the dependencies each has yet to visit
        while left:
            dep = next(left[-1], None)
            if dep is None:
                name = path.pop()
                del on_path[name]
                done.add(name)
                left.pop()
            elif dep in on_path:
                return [*path[on_path[dep] :], dep]
            elif dep not in done:
                on_path[dep] = len(path)
                path.append(dep)
                left.append(iter(graph.get(dep, ())))
    return None


def _validation_context(config: Config, name: str) -> RenderContext:
    def endpoint(svc: ServiceConfig) -> Endpoint:
        return Endpoint("127.0.0.1", dict(svc.ports))

    return RenderContext(
        name=name,
        own=endpoint(config.services[name]),
        state_dir=str(config.infra.state_dir),
        service_dir=str(config.infra.state_dir / "services" / name),
        services={d: endpoint(config.services[d]) for d in dependency_closure(config, name)},
    )


def service_templates(svc: ServiceConfig) -> Iterator[tuple[str, str]]:
    """Every placeholder-bearing string of a service, with its key path."""
    if isinstance(svc.command, str):
        yield "command", svc.command
    elif svc.command:
        for i, arg in enumerate(svc.command):
            yield f"command[{i}]", arg
    for key, value in svc.env.items():
        yield f"env.{key}", value
    if svc.cwd is not None:
        yield "cwd", svc.cwd
    probe = svc.health
    if probe is not None:
        for key in ("tcp", "http"):
            if (value := getattr(probe, key)) is not None:
                yield f"health.{key}", value
        for i, arg in enumerate(probe.command or ()):
            yield f"health.command[{i}]", arg


def dump_config(config: Config) -> str:
    """The configuration as TOML (None values omitted: TOML has no null)."""

    def prune(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: prune(v) for k, v in value.items() if v is not None}
        if isinstance(value, list | tuple):
            return [prune(v) for v in value]
        return value

    data = converter.unstructure(config)
    data.pop("source", None)
    return tomli_w.dumps(prune(data))
