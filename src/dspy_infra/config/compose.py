"""Docker Compose files as configuration.

``AgentInfra.start("docker-compose.yml")``, or ``compose = "docker-compose.yml"``
in ``[infra]``, reads a compose file into the raw tables a TOML file gives,
so that one converter and one validation serve both, and a compose service
can be changed key by key from TOML, the environment or keywords.

The file is read the way compose reads it, so that a file that works with
``docker compose`` means the same here: YAML 1.2 scalars (``22:22`` is a
string, not the base-60 integer YAML 1.1 makes of it; ``no`` is a string,
not false); ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` ... from the
environment and the ``.env`` file beside it; relative paths relative to its
directory; a string ``command`` split into arguments, not run by a shell.
Compose has no placeholders, so braces in its values are literal: they are
escaped, and only a TOML table over the service can use ``{port}`` and co.

Compose → ours: ``image``; ``pull_policy`` → ``pull``; ``command``;
``entrypoint``; ``env_file`` then ``environment`` → ``env``; ``working_dir`` →
``cwd``; ``ports`` → ``ports`` and ``container_ports``, each named by its
container port (``"80"``, for ``{services.web.ports.80}``); ``volumes``;
``depends_on``; ``healthcheck`` → ``health``; ``restart`` (``on-failure:N`` →
``max_restarts = N``); ``profiles`` → ``autostart``; ``stop_grace_period`` →
``stop_timeout``; ``cpus``, ``mem_limit`` and ``deploy.resources`` → ``cpus``,
``memory_mb``, ``gpus``. See docs/compose.md for the details.

Health checks: compose runs a check every ``interval`` (30 s by default)
from the start, so a service is seen healthy up to ``interval`` after it is,
and whatever depends on it waits that long. Starting fast is the point of
this library, so while a service starts we probe every 0.05 s, backing off
to ``min(interval, 0.5 s)``, and only once it is up every ``interval``
(``liveness_interval``). ``retries`` consecutive failures make it unhealthy
(``failure_threshold``), as in compose; ``timeout`` bounds one attempt. The
start gives up when compose would call the service unhealthy,
``start_period + retries * (interval + timeout)``, but never before 60 s
(``deadline``), since a fast check with a short interval would otherwise
give a slow image too little time.

What has no counterpart (``build``, ``networks``, udp ports, anonymous
volumes, ...) is skipped and named, all of it in one
:class:`~dspy_infra.errors.ComposeWarning`; keys starting with ``x-`` are
compose's extension fields, skipped silently. Bad input raises
:class:`~dspy_infra.errors.ConfigError` naming the file and the key path
(``services.web.healthcheck.interval``), before anything is warned about.
"""

from __future__ import annotations

import functools
import math
import re
import shlex
import warnings
from collections import ChainMap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dspy_infra.config.model import expand_home
from dspy_infra.errors import ComposeWarning, ConfigError

if TYPE_CHECKING:
    import yaml

__all__ = ["host_path", "read_compose"]

# Startup probing: see the module docstring.
_START_INTERVAL = 0.05
_MAX_START_INTERVAL = 0.5
_MIN_DEADLINE = 60.0
# Docker's defaults for a healthcheck (0 also means the default).
_HEALTH_INTERVAL = 30.0
_HEALTH_TIMEOUT = 30.0
_HEALTH_RETRIES = 3

# Go's time.ParseDuration units; both micro signs (U+00B5 and U+03BC) are Go's.
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION = re.compile(
    r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)("
    + "|".join(sorted(_DURATION_UNITS, key=len, reverse=True))  # "ms" before "m"
    + ")"
)
# Docker reads sizes in powers of 1024, with or without a "b" or "ib".
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgtp]?)(?:i?b)?", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_INTEGER = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
# The strings compose (compose-go's interpolation casts) reads as booleans.
_BOOLEANS = {
    **dict.fromkeys(("y", "yes", "true", "on"), True),
    **dict.fromkeys(("n", "no", "false", "off"), False),
}
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXPRESSION = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", re.DOTALL)

_CONDITIONS = {
    "service_started": "started",
    "service_healthy": "healthy",
    "service_completed_successfully": "completed_successfully",
}
_RESTART = ("no", "always", "unless-stopped", "on-failure")
_PULL = {"always": "always", "never": "never", "missing": "missing", "if_not_present": "missing"}
_HINTS = {"build": "build the image first: dspy_infra.docker.build_image"}
_HOST_PATH_PREFIXES = (".", "/", "~")  # compose's test: anything else is a volume name

Handler = Callable[[Any, str, str], dict[str, Any]]


def read_compose(path: Path, *, environ: Mapping[str, str]) -> dict[str, Any]:
    """A compose file as a raw configuration: ``{"infra": {...}, "services": {...}}``.

    ``infra`` holds ``backend = "docker"``, since that is what a compose file
    is for, and ``project`` from the file's ``name``. ``environ`` supplies
    ``${VAR}`` values and ``COMPOSE_PROFILES`` (over the ``.env`` file).
    """
    source = str(path)
    data = _load_yaml(path)
    unset: dict[str, None] = {}
    variables = {**_dotenv(path.parent / ".env", environ, unset), **environ}
    reader = _Reader(source, path.parent, variables)
    reader.unset = unset
    raw = reader.document(reader.interpolate(data, ""))
    if message := reader.report():
        # read_compose <- loading <- load_config <- the caller
        warnings.warn(f"{source}: {message}", ComposeWarning, stacklevel=4)
    return raw


def _load_yaml(path: Path) -> Any:
    try:
        import yaml  # noqa: PLC0415 - the docker extra: only compose files need it
    except ImportError:
        raise ConfigError(
            "reading a compose file needs PyYAML: pip install 'dspy-infra[docker]'",
            source=str(path),
        ) from None
    try:
        text = _read_text(path)
    except ValueError as exc:
        raise ConfigError(str(exc), source=str(path)) from None
    try:
        loader = _yaml12_loader()(text)  # its reader refuses a control character at once
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", source=str(path)) from None
    try:
        node = loader.get_single_node()
        if node is None:  # an empty file
            return None
        _refuse_duplicate_keys(node, path)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", source=str(path)) from None
    finally:
        loader.dispose()


def _refuse_duplicate_keys(root: yaml.Node, path: Path) -> None:
    """A key written twice in one mapping is an error, as in compose (Go's yaml.v3).

    PyYAML keeps the last value without a word, so a service or a key pasted
    twice silently lost the first. Checked on the nodes as written, before
    ``<<:`` merges, whose keys a mapping may override.
    """
    import yaml  # noqa: PLC0415 - see _load_yaml

    seen_nodes: set[int] = set()  # an anchor's node is reached again through each alias
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, where = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            lines: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                if not isinstance(key, yaml.ScalarNode):
                    continue
                inner = f"{where}.{key.value}" if where else str(key.value)
                line = key.start_mark.line + 1
                if (first := lines.get((key.tag, key.value))) is not None:
                    at = f"lines {first} and {line}" if first != line else f"line {line}"
                    raise ConfigError(
                        f"defined twice ({at}): a mapping holds each key once, "
                        "as docker compose requires",
                        source=str(path),
                        path=inner,
                    )
                lines[key.tag, key.value] = line
                stack.append((value, inner))


@functools.cache
def _yaml12_loader() -> type[yaml.SafeLoader]:
    """PyYAML's safe loader with YAML 1.2 scalars, as compose (Go's yaml.v3) reads them.

    YAML 1.1 reads ``22:22`` as the base-60 integer 1342 and ``no`` as false:
    a port mapping or ``restart: no`` would silently mean something else.
    """
    import yaml  # noqa: PLC0415 - see _load_yaml

    class Loader(yaml.SafeLoader):
        pass

    replaced = {f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "timestamp")}
    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in replaced]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    core_schema = [
        ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
        ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
        (
            "float",
            r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
            r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
            "-+.0123456789",
        ),
    ]
    for tag, pattern, first in core_schema:
        Loader.add_implicit_resolver(
            f"tag:yaml.org,2002:{tag}", re.compile(f"^(?:{pattern})$"), list(first)
        )
    Loader.add_constructor("tag:yaml.org,2002:int", _compose_int)
    return Loader


def _compose_int(loader: Any, node: Any) -> int | float:
    """An integer as compose (Go's yaml.v3) reads it: ``0x1f``, ``0o17``, and
    YAML 1.1's octal ``017`` still; what is not a valid octal (``08080``) is
    the number it reads as otherwise, not an error."""
    text = str(loader.construct_scalar(node)).replace("_", "")
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-")
    try:
        if digits[:2] in ("0x", "0o"):
            return sign * int(digits[2:], 16 if digits[1] == "x" else 8)
        return sign * int(digits, 8 if len(digits) > 1 and digits[0] == "0" else 10)
    except ValueError:
        number = float(digits)
        return sign * (int(number) if number.is_integer() else number)


def _read_text(path: Path) -> str:
    """The file's text; a ValueError says in words why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte order mark is no text
    except FileNotFoundError:
        raise ValueError("file not found") from None
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError("cannot read: not UTF-8 text") from None


def _parse_env(
    text: str, source: str, lookup: Mapping[str, str | None], unset: dict[str, None]
) -> dict[str, str | None]:
    """``KEY=VALUE`` statements, as compose reads an ``env_file`` or ``.env``.

    Blank lines, ``#`` comments and an ``export`` prefix are skipped; a bare
    ``KEY`` has no value (None): compose takes it from the environment. A
    value in single quotes is literal. One in double quotes, or in none, has
    its ``${VAR}`` substituted, from ``lookup`` first, then from the lines
    above (names not set anywhere go in ``unset``): ``DATA=${BASE}/data``.
    In double quotes ``\\n``, ``\\r``, ``\\t`` are escapes; in either quotes a
    backslash escapes a quote (``"{\\"a\\": 1}"``), and a line break is kept.
    A ValueError names the bad line; a failed ``${VAR:?...}`` is a ConfigError
    naming ``source`` and the key.
    """
    env: dict[str, str | None] = {}
    reader = _Reader(source, Path(), ChainMap(dict(lookup), env))
    reader.unset = unset
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        number, line = index + 1, lines[index]
        index += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        key, sep, value = stripped.removeprefix("export ").partition("=")
        key = key.strip()
        if not key or any(c.isspace() for c in key):
            raise ValueError(f"line {number}: expected KEY=VALUE, got {stripped!r}")
        if not sep:
            env[key] = None
            continue
        value = value.lstrip()
        quote = value[:1]
        if quote not in ("'", '"'):
            comment = value.find(" #")  # a comment after a space; A=b#c is "b#c"
            env[key] = reader._substitute(value[:comment].rstrip() if comment >= 0 else value, key)
            continue
        body = value[1:]
        while (end := _closing_quote(body, quote)) < 0:
            if index == len(lines):
                raise ValueError(f"line {number}: {key}: unterminated quoted value")
            body += "\n" + lines[index]
            index += 1
        after = body[end + 1 :].strip()
        if after and not after.startswith("#"):
            raise ValueError(
                f"line {number}: {key}: expected a comment or nothing after the closing quote, "
                f"got {after!r}"
            )
        if quote == "'":
            env[key] = body[:end].replace("\\'", "'")
        else:
            env[key] = reader._substitute(_ESCAPE.sub(_unescape, body[:end]), key)
    return env


# In double quotes: \n, \r and \t, and a backslash before anything else but
# a "$" stands for that character, as compose reads them.
_ESCAPE = re.compile(r"\\([^$])", re.DOTALL)
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t"}


def _unescape(match: re.Match[str]) -> str:
    return _ESCAPES.get(match[1], match[1])


def _closing_quote(body: str, quote: str) -> int:
    """Where ``body`` (a value after its opening quote) closes it; -1: not yet closed."""
    i = 0
    while i < len(body):
        if body[i] == "\\":
            i += 2
        elif body[i] == quote:
            return i
        else:
            i += 1
    return -1


def _dotenv(path: Path, environ: Mapping[str, str], unset: dict[str, None]) -> dict[str, str]:
    """The ``.env`` beside the compose file: variables for ``${VAR}``, when it exists."""
    if not path.exists():
        return {}
    try:
        env = _parse_env(_read_text(path), str(path), environ, unset)
    except ValueError as exc:
        raise ConfigError(str(exc), source=str(path)) from None
    return {k: v for k, v in env.items() if v is not None}


def _literal(text: str) -> str:
    """Compose has no placeholders: its braces are literal, so escape them for ours."""
    return text.replace("{", "{{").replace("}", "}}")


def _closing_brace(text: str, start: int) -> int:
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return -1


class _Unsupported(Exception):
    """Valid compose with no counterpart here: the item is skipped and named in the warning."""


class _Reader:
    """One pass over one compose file: it knows the file for errors and collects what it skips."""

    def __init__(self, source: str, base: Path, variables: Mapping[str, str | None]) -> None:
        self.source = source
        self.base = base
        self.variables = variables
        self.skipped: list[str] = []
        self.unset: dict[str, None] = {}
        self.volume_names: dict[str, str] = {}
        # In this order: what a later handler sets wins (environment over env_file,
        # deploy limits over cpus and mem_limit).
        self.handlers: dict[str, Handler] = {
            "image": self._image,
            "pull_policy": self._pull_policy,
            "command": self._command,
            "entrypoint": self._entrypoint,
            "env_file": self._env_file,
            "environment": self._environment,
            "working_dir": self._working_dir,
            "ports": self._ports,
            "volumes": self._volumes,
            "depends_on": self._depends_on,
            "healthcheck": self._healthcheck,
            "restart": self._restart,
            "profiles": self._profiles,
            "stop_grace_period": self._stop_grace_period,
            "cpus": self._cpus,
            "mem_limit": self._mem_limit,
            "deploy": self._deploy,
        }

    # --- the document ----------------------------------------------------------

    def document(self, data: Any) -> dict[str, Any]:
        top = self.mapping(data, "")
        if "services" not in top:
            raise self.fail("services", "missing: a compose file declares its services here")
        services = self.mapping(top["services"], "services")
        self.unknown(top, {"services", "version", "name", "volumes"}, "")
        infra: dict[str, Any] = {"backend": "docker"}
        if "name" in top:
            infra["project"] = self.string(top["name"], "name")
        self._named_volumes(top.get("volumes"))
        return {
            "infra": infra,
            "services": {name: self._service(name, table) for name, table in services.items()},
        }

    def _named_volumes(self, value: Any) -> None:
        # A named volume is created by Docker on first use; only its real name matters here.
        for key, spec in self.mapping(value, "volumes").items():
            table = self.mapping(spec, f"volumes.{key}")
            self.unknown(table, {"name", "external"}, f"volumes.{key}")
            if "name" in table:
                self.volume_names[key] = self.string(table["name"], f"volumes.{key}.name")

    def _service(self, name: str, value: Any) -> dict[str, Any]:
        path = f"services.{name}"
        table = self.mapping(value, path)
        self.unknown(table, set(self.handlers), name)
        service: dict[str, Any] = {}
        for key, handler in self.handlers.items():
            if key in table:
                for field, part in handler(table[key], f"{path}.{key}", name).items():
                    previous = service.get(field)
                    service[field] = {**previous, **part} if isinstance(previous, dict) else part
        return service

    # --- service keys ---------------------------------------------------------

    def _image(self, value: Any, path: str, name: str) -> dict[str, Any]:
        return {"image": self.string(value, path)}

    def _pull_policy(self, value: Any, path: str, name: str) -> dict[str, Any]:
        policy = self.string(value, path)
        if policy in _PULL:
            return {"pull": _PULL[policy]}
        self.skip(f"{name}.pull_policy", policy)
        return {}

    def _command(self, value: Any, path: str, name: str) -> dict[str, Any]:
        argv = self.argv(value, path)
        if argv is None:
            return {}
        if not argv:
            self.skip(f"{name}.command", "empty: the image's command is used")
            return {}
        return {"command": [_literal(arg) for arg in argv]}

    def _entrypoint(self, value: Any, path: str, name: str) -> dict[str, Any]:
        argv = self.argv(value, path)
        return {} if argv is None else {"entrypoint": argv}

    def _env_file(self, value: Any, path: str, name: str) -> dict[str, Any]:
        entries = value if isinstance(value, list) else [value]
        env: dict[str, str | None] = {}
        for i, entry in enumerate(entries):
            where = f"{path}[{i}]" if isinstance(value, list) else path
            if isinstance(entry, dict):
                spec = self.mapping(entry, where)
                self.unknown(spec, {"path", "required"}, f"{name}.env_file[{i}]")
                file = self.string(spec.get("path"), f"{where}.path")
                required = self.boolean(spec.get("required", True), f"{where}.required")
            else:
                file, required = self.string(entry, where), True
            try:
                full = self.base / expand_home(file)
            except ValueError as exc:
                raise self.fail(where, str(exc)) from None
            if not required and not full.exists():
                continue
            try:
                text = _read_text(full)
                env.update(_parse_env(text, str(full), self.variables, self.unset))
            except ValueError as exc:
                raise self.fail(where, f"{full}: {exc}") from None
        return {"env": self._env_values(env)}

    def _environment(self, value: Any, path: str, name: str) -> dict[str, Any]:
        env: dict[str, str | None] = {}
        if isinstance(value, list):
            for i, item in enumerate(value):
                key, sep, text = self.string(item, f"{path}[{i}]").partition("=")
                if not key:
                    raise self.fail(f"{path}[{i}]", f"expected KEY=VALUE or KEY, got {item!r}")
                env[key] = text if sep else None
        else:
            for key, item in self.mapping(value, path).items():
                env[key] = None if item is None else self.text(item, f"{path}.{key}")
        return {"env": self._env_values(env)}

    def _env_values(self, env: Mapping[str, str | None]) -> dict[str, str]:
        # A name without a value takes it from the environment, as in compose; unset: left out.
        values = {k: v if v is not None else self.variables.get(k) for k, v in env.items()}
        return {k: _literal(v) for k, v in values.items() if v is not None}

    def _working_dir(self, value: Any, path: str, name: str) -> dict[str, Any]:
        cwd = self.string(value, path)
        if not cwd.startswith("/"):
            raise self.fail(path, f"expected an absolute path inside the container, got {cwd!r}")
        return {"cwd": _literal(cwd)}

    def _ports(self, value: Any, path: str, name: str) -> dict[str, Any]:
        ports: dict[str, int] = {}
        container_ports: dict[str, int] = {}
        for i, item in enumerate(self.sequence(value, path)):
            label = f"{name}.ports[{i}]"
            try:
                host, container = self._port(item, f"{path}[{i}]", label)
            except _Unsupported as exc:
                self.skip(label, str(exc))
                continue
            if str(container) in ports:
                self.skip(label, f"container port {container} is already published")
                continue
            ports[str(container)] = host
            container_ports[str(container)] = container
        return {"ports": ports, "container_ports": container_ports} if ports else {}

    def _port(self, item: Any, where: str, label: str) -> tuple[int, int]:
        """``(host port, container port)`` of one entry."""
        if isinstance(item, int) and not isinstance(item, bool):
            return 0, self.port(item, where, low=1)
        if isinstance(item, str):
            return self._short_port(item, where)
        if isinstance(item, dict):
            return self._long_port(self.mapping(item, where), where, label)
        raise self.fail(
            where, f"expected 'HOST:CONTAINER', a port number or a mapping, got {item!r}"
        )

    def _short_port(self, spec: str, where: str) -> tuple[int, int]:
        # [[IP:]HOST:]CONTAINER[/PROTOCOL]. The IP is not used: ports are published
        # on loopback (see docs/compose.md).
        numbers, _, protocol = spec.partition("/")
        _tcp_only(protocol or "tcp")
        host_part, _, container = numbers.rpartition(":")
        published = host_part.rpartition(":")[2]  # after the IP, if any
        _single(published, container)
        host = self.port(published, where, low=0) if published else 0
        return host, self.port(container, where, low=1)

    def _long_port(self, table: dict[str, Any], where: str, label: str) -> tuple[int, int]:
        allowed = {"target", "published", "host_ip", "protocol", "mode", "name", "app_protocol"}
        self.unknown(table, allowed, label)
        _tcp_only(self.string(table.get("protocol", "tcp"), f"{where}.protocol"))
        if "target" not in table:
            raise self.fail(f"{where}.target", "required: the port inside the container")
        published = table.get("published")
        _single(published, table["target"])
        host = 0 if published in (None, "") else self.port(published, f"{where}.published", low=0)
        return host, self.port(table["target"], f"{where}.target", low=1)

    def _volumes(self, value: Any, path: str, name: str) -> dict[str, Any]:
        volumes: list[str] = []
        for i, item in enumerate(self.sequence(value, path)):
            label = f"{name}.volumes[{i}]"
            try:
                source, target, read_only = self._volume(item, f"{path}[{i}]", label)
            except _Unsupported as exc:
                self.skip(label, str(exc))
                continue
            volumes.append(f"{source}:{target}:ro" if read_only else f"{source}:{target}")
        return {"volumes": volumes} if volumes else {}

    def _volume(self, item: Any, where: str, label: str) -> tuple[str, str, bool]:
        """``(host path or volume name, container path, read-only)`` of one entry."""
        if isinstance(item, str):
            parts = item.split(":")
            if len(parts) == 1:
                raise _Unsupported("anonymous volume")
            if len(parts) > 3 or not parts[0]:
                raise self.fail(
                    where, f"expected 'SOURCE:TARGET' or 'SOURCE:TARGET:MODE', got {item!r}"
                )
            source, target = parts[0], parts[1]
            options = [o for o in (parts[2] if len(parts) == 3 else "").split(",") if o]
            if others := [o for o in options if o not in ("ro", "rw")]:
                self.skip(label, f"option {','.join(others)}")
            bind, read_only = source.startswith(_HOST_PATH_PREFIXES), "ro" in options
            source_at = where
        else:
            table = self.mapping(item, where)
            self.unknown(table, {"type", "source", "target", "read_only"}, label)
            kind = self.string(table.get("type", "volume"), f"{where}.type")
            if kind not in ("bind", "volume"):
                raise _Unsupported(f"type {kind}")
            if table.get("source") is None and kind == "volume":
                raise _Unsupported("anonymous volume")
            source_at = f"{where}.source"
            source = self.string(table.get("source"), source_at)
            target = self.string(table.get("target"), f"{where}.target")
            bind = kind == "bind"
            read_only = self.boolean(table.get("read_only", False), f"{where}.read_only")
            where = f"{where}.target"
        if not target.startswith("/"):
            raise self.fail(
                where, f"the path inside the container must be absolute, got {target!r}"
            )
        if not bind:
            return self.volume_names.get(source, source), target, read_only
        try:
            return host_path(source, self.base), target, read_only
        except ValueError as exc:
            raise self.fail(source_at, str(exc)) from None

    def _depends_on(self, value: Any, path: str, name: str) -> dict[str, Any]:
        if isinstance(value, list):
            # The short form waits for the start only, as in compose.
            names = [self.string(dep, f"{path}[{i}]") for i, dep in enumerate(value)]
            return {"depends_on": {dep: {"condition": "started"} for dep in names}}
        depends_on: dict[str, Any] = {}
        for dep, spec in self.mapping(value, path).items():
            table = self.mapping(spec, f"{path}.{dep}")
            self.unknown(table, {"condition"}, f"{name}.depends_on.{dep}")
            where = f"{path}.{dep}.condition"
            condition = self.string(table.get("condition", "service_started"), where)
            if condition not in _CONDITIONS:
                raise self.fail(
                    where, f"expected one of {', '.join(_CONDITIONS)}, got {condition!r}"
                )
            depends_on[dep] = {"condition": _CONDITIONS[condition]}
        return {"depends_on": depends_on}

    def _healthcheck(self, value: Any, path: str, name: str) -> dict[str, Any]:
        table = self.mapping(value, path)
        timings = {"interval", "timeout", "retries", "start_period", "start_interval"}
        self.unknown(table, {"test", "disable", *timings}, f"{name}.healthcheck")
        disabled = self.boolean(table.get("disable", False), f"{path}.disable")
        if not disabled and "test" not in table:
            # Compose would run the image's HEALTHCHECK with these timings.
            self.skip(f"{name}.healthcheck", "timings without a test")
            return {}
        command = None if disabled else self._health_test(table["test"], f"{path}.test")
        if command is None:
            # Compose turns the image's HEALTHCHECK off too; the docker backend still reads it.
            self.skip(f"{name}.healthcheck", "disabled: the image's HEALTHCHECK, if any, counts")
            return {}

        def seconds(key: str, default: float) -> float:
            # Docker reads 0 as "the default" too.
            return (
                (self.seconds(table[key], f"{path}.{key}") or default) if key in table else default
            )

        interval = seconds("interval", _HEALTH_INTERVAL)
        timeout = seconds("timeout", _HEALTH_TIMEOUT)
        retries = self.integer(table.get("retries", 0), f"{path}.retries") or _HEALTH_RETRIES
        give_up = seconds("start_period", 0.0) + retries * (interval + timeout)
        # Every timing key, so that a TOML health table over this one that has
        # another key names another kind of probe (see loading._with_compose).
        return {
            "health": {
                "command": [_literal(arg) for arg in command],
                "interval": _START_INTERVAL,
                "max_interval": max(_START_INTERVAL, min(interval, _MAX_START_INTERVAL)),
                "timeout": timeout,
                "deadline": max(_MIN_DEADLINE, give_up),
                "retries": None,
                "success_threshold": 1,
                "failure_threshold": retries,
                "liveness_interval": interval,
            }
        }

    def _health_test(self, value: Any, path: str) -> list[str] | None:
        """The probe's argv, or None for ``["NONE"]``."""
        if isinstance(value, str) and value.strip():
            return ["/bin/sh", "-c", value]  # a string is CMD-SHELL in compose
        words = [self.string(w, f"{path}[{i}]") for i, w in enumerate(self.sequence(value, path))]
        kind, args = (words[0], words[1:]) if words else ("", [])
        if kind == "NONE":
            return None
        if kind == "CMD" and args:
            return args
        if kind == "CMD-SHELL" and args:
            return ["/bin/sh", "-c", " ".join(args)]
        raise self.fail(
            path,
            "expected ['CMD', program, args...], ['CMD-SHELL', script], ['NONE'] or a script, "
            f"got {value!r}",
        )

    def _restart(self, value: Any, path: str, name: str) -> dict[str, Any]:
        policy, _, count = self.string(value, path).partition(":")
        if policy not in _RESTART or (count and policy != "on-failure"):
            raise self.fail(
                path, f"expected one of {', '.join(_RESTART)} or on-failure:N, got {value!r}"
            )
        restart: dict[str, Any] = {"restart": policy}
        # on-failure:0 is Docker's "no limit": our max_restarts keeps its default then.
        if count and (limit := self.integer(count, path)):
            restart["max_restarts"] = limit
        return restart

    def _profiles(self, value: Any, path: str, name: str) -> dict[str, Any]:
        profiles = {
            self.string(p, f"{path}[{i}]") for i, p in enumerate(self.sequence(value, path))
        }
        active = {p.strip() for p in (self.variables.get("COMPOSE_PROFILES") or "").split(",")}
        if not profiles or "*" in active or profiles & active:
            return {}
        return {"autostart": False}

    def _stop_grace_period(self, value: Any, path: str, name: str) -> dict[str, Any]:
        return {"stop_timeout": self.seconds(value, path)}

    def _cpus(self, value: Any, path: str, name: str) -> dict[str, Any]:
        cpus = self.number(value, path)
        return {"cpus": cpus} if cpus else {}  # 0: no limit

    def _mem_limit(self, value: Any, path: str, name: str) -> dict[str, Any]:
        megabytes = self.megabytes(value, path)
        return {"memory_mb": megabytes} if megabytes else {}  # 0: no limit

    def _deploy(self, value: Any, path: str, name: str) -> dict[str, Any]:
        label = f"{name}.deploy"
        deploy = self.mapping(value, path)
        self.unknown(deploy, {"resources"}, label)
        resources = self.mapping(deploy.get("resources"), f"{path}.resources")
        self.unknown(resources, {"limits", "reservations"}, f"{label}.resources")
        path, label = f"{path}.resources", f"{label}.resources"
        limits = self.mapping(resources.get("limits"), f"{path}.limits")
        self.unknown(limits, {"cpus", "memory"}, f"{label}.limits")
        reservations = self.mapping(resources.get("reservations"), f"{path}.reservations")
        self.unknown(reservations, {"devices"}, f"{label}.reservations")
        found: dict[str, Any] = {}
        if "cpus" in limits:
            found |= self._cpus(limits["cpus"], f"{path}.limits.cpus", name)
        if "memory" in limits:
            found |= self._mem_limit(limits["memory"], f"{path}.limits.memory", name)
        if "devices" in reservations:
            where = f"{path}.reservations.devices"
            found |= self._devices(reservations["devices"], where, f"{label}.reservations.devices")
        return found

    def _devices(self, value: Any, path: str, label: str) -> dict[str, Any]:
        gpus = 0
        for i, item in enumerate(self.sequence(value, path)):
            where = f"{path}[{i}]"
            device = self.mapping(item, where)
            self.unknown(device, {"capabilities", "count", "device_ids", "driver"}, f"{label}[{i}]")
            if "gpu" not in self._capabilities(
                device.get("capabilities", []), f"{where}.capabilities"
            ):
                self.skip(f"{label}[{i}]", "not a GPU")
            elif device.get("count") in (None, "all") or "device_ids" in device:
                # Leases are counted, not named; "all" (the default) has no count.
                self.skip(f"{label}[{i}]", "all GPUs or given device ids: give a count")
            else:
                gpus += self.integer(device["count"], f"{where}.count")
        return {"gpus": gpus} if gpus else {}

    def _capabilities(self, value: Any, path: str) -> set[str]:
        # A list of strings; older files nest it in a list of lists.
        found: set[str] = set()
        for i, entry in enumerate(self.sequence(value, path)):
            for item in entry if isinstance(entry, list) else [entry]:
                found.add(self.string(item, f"{path}[{i}]"))
        return found

    # --- ${VAR} ----------------------------------------------------------------

    def interpolate(self, value: Any, path: str) -> Any:
        """Every string value (not key) of the document, with ``${VAR}`` substituted."""
        if isinstance(value, str):
            return self._substitute(value, path)
        if isinstance(value, dict):
            return {
                k: self.interpolate(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()
            }
        if isinstance(value, list):
            return [self.interpolate(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    def _substitute(self, text: str, path: str) -> str:
        out: list[str] = []
        pos = 0
        while (start := text.find("$", pos)) >= 0:
            out.append(text[pos:start])
            following = text[start + 1 : start + 2]
            if following == "$":
                out.append("$")
                pos = start + 2
            elif following == "{":
                end = _closing_brace(text, start + 2)
                if end < 0:
                    raise self.fail(path, f"unclosed '${{' in {text!r}")
                out.append(self._expand(text[start + 2 : end], path))
                pos = end + 1
            elif match := _VARIABLE.match(text, start + 1):
                out.append(self._variable(match[0]))
                pos = match.end()
            else:
                out.append("$")
                pos = start + 1
        out.append(text[pos:])
        return "".join(out)

    def _expand(self, expression: str, path: str) -> str:
        match = _EXPRESSION.fullmatch(expression)
        if match is None:
            raise self.fail(path, f"invalid interpolation '${{{expression}}}'")
        name, operator, word = match[1], match[2], match[3] or ""
        if operator is None:
            return self._variable(name)
        value = self.variables.get(name)
        # With a colon, an empty value counts as unset.
        present = value is not None and (value != "" or not operator.startswith(":"))
        if operator.endswith("-"):
            return (value or "") if present else self._substitute(word, path)
        if operator.endswith("+"):
            return self._substitute(word, path) if present else ""
        if not present:
            raise self.fail(path, self._substitute(word, path) or f"variable {name} is required")
        return value or ""

    def _variable(self, name: str) -> str:
        value = self.variables.get(name)
        if value is None:
            self.unset[name] = None
        return value or ""

    # --- reading values -------------------------------------------------------

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(message, source=self.source, path=path or None)

    def skip(self, what: str, reason: str | None = None) -> None:
        self.skipped.append(f"{what} ({reason})" if reason else what)

    def unknown(self, table: Mapping[str, Any], known: set[str], label: str) -> None:
        for key in table:
            if key not in known and not key.startswith("x-"):
                self.skip(f"{label}.{key}" if label else key, _HINTS.get(key))

    def report(self) -> str | None:
        parts = []
        if self.skipped:
            parts.append("ignored unsupported keys: " + ", ".join(self.skipped))
        if self.unset:
            parts.append("variables not set, read as empty strings: " + ", ".join(self.unset))
        return "; ".join(parts) or None

    def mapping(self, value: Any, path: str) -> dict[str, Any]:
        if value is None:  # an empty section: "healthcheck:" with nothing under it
            return {}
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {value!r}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(path, f"expected names as keys, got {key!r}")
        return value

    def sequence(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list, got {value!r}")
        return value

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise self.fail(path, f"expected a string, got {value!r}")
        return value

    def text(self, value: Any, path: str) -> str:
        """A scalar as the string compose makes of it: ``true``, ``5``, ``0.5``."""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str | int | float):
            return str(value)
        raise self.fail(path, f"expected a string or a number, got {value!r}")

    def boolean(self, value: Any, path: str) -> bool:
        # A string too, cast as compose casts one where a boolean is due:
        # ${VAR} makes strings of booleans.
        if isinstance(value, str) and value.lower() in _BOOLEANS:
            return _BOOLEANS[value.lower()]
        if not isinstance(value, bool):
            raise self.fail(path, f"expected true or false, got {value!r}")
        return value

    def integer(self, value: Any, path: str) -> int:
        # A string too: ${VAR} makes strings of numbers.
        if isinstance(value, str) and _INTEGER.fullmatch(value):
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(path, f"expected an integer >= 0, got {value!r}")
        return value

    def number(self, value: Any, path: str) -> float:
        if isinstance(value, str) and _NUMBER.fullmatch(value):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise self.fail(path, f"expected a number >= 0, got {value!r}")
        return float(value)

    def port(self, value: Any, path: str, *, low: int) -> int:
        if isinstance(value, str) and _INTEGER.fullmatch(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
            raise self.fail(path, f"expected a port number ({low} to 65535), got {value!r}")
        return value

    def argv(self, value: Any, path: str) -> list[str] | None:
        """A list as it is; a string split into words as a shell would, but run by no shell."""
        if value is None:
            return None
        if isinstance(value, str):
            try:
                return shlex.split(value)
            except ValueError as exc:
                raise self.fail(path, f"cannot split {value!r} into arguments ({exc})") from None
        return [self.text(arg, f"{path}[{i}]") for i, arg in enumerate(self.sequence(value, path))]

    def seconds(self, value: Any, path: str) -> float:
        """A Go duration, as compose writes them: ``1m30s``, ``500ms``, ``2h``, ``10us``."""
        text = value if isinstance(value, str) else ""
        if text == "0":  # the one duration Go reads without a unit
            return 0.0
        total, pos = 0.0, 0
        while pos < len(text) and (match := _DURATION.match(text, pos)):
            total += float(match[1]) * _DURATION_UNITS[match[2]]
            pos = match.end()
        if not text or pos < len(text):
            raise self.fail(
                path, f"expected a duration such as '30s', '1m30s' or '500ms', got {value!r}"
            )
        return total

    def megabytes(self, value: Any, path: str) -> int:
        """A Docker size (``512m``, ``1g``, a number of bytes) in MiB, rounded up, so that a
        limit is never lowered."""
        size: float
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            size = value
        elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
            size = float(match[1]) * 1024 ** _SIZE_POWERS[match[2].lower()]
        else:
            raise self.fail(
                path, f"expected a size such as '512m', '1g' or a number of bytes, got {value!r}"
            )
        return math.ceil(size / 2**20)


def host_path(source: str, base: Path) -> str:
    """A bind mount's host path, absolute, so that it means the same wherever the
    file is used from: ``~`` is the home directory, as in compose, and a relative
    path is relative to ``base``, the directory of the file it was written in.
    ValueError when the home directory cannot be found."""
    path = expand_home(source)
    return str(path if path.is_absolute() else (base / path).resolve())


def _tcp_only(protocol: str) -> None:
    if protocol.lower() != "tcp":
        raise _Unsupported(protocol.lower())


def _single(*ports: object) -> None:
    if any(isinstance(port, str) and "-" in port for port in ports):
        raise _Unsupported("port range")
