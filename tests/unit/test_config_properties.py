"""Property tests of configuration loading: valid documents load and round-trip,
invalid ones raise ConfigError naming the offending key path, and nothing else
ever escapes ``load_config``."""

from __future__ import annotations

import copy
import itertools
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dspy_infra import Config, ConfigError, load_config
from dspy_infra.config import dump_config

Doc = dict[str, Any]

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- building blocks ---------------------------------------------------------------
# Strategies are built once, at import: building them per draw costs more than
# drawing from them. Parts that depend on what was drawn before (placeholders
# that refer to ports and dependencies) are drawn as indices and resolved.

ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
NAMES = st.builds(str.__add__, st.sampled_from(ALNUM), st.text(alphabet=ALNUM + "_-", max_size=7))
PORT_NAMES = st.builds(
    str.__add__,
    st.sampled_from("abcdefghijklmnopqrstuvwxyz"),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", max_size=5),
)
# Text with no braces: never a placeholder. Any other character goes, quotes,
# backslashes and control characters included (TOML escapes them), but NUL,
# which no process can be given (an environment with one is refused).
PLAIN_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="{}\0"), max_size=12)
POSITIVE = st.one_of(
    st.floats(min_value=1e-3, max_value=1e4, allow_nan=False, allow_infinity=False),
    st.integers(min_value=1, max_value=10_000),
)
NON_NEGATIVE = st.one_of(st.just(0), st.just(0.0), POSITIVE)
AT_LEAST_ONE = st.integers(min_value=1, max_value=10**6)
COUNT = st.integers(min_value=0, max_value=10**6)
PORTS = st.one_of(st.just(0), st.integers(min_value=0, max_value=65535))
INDEX = st.integers(min_value=0, max_value=10**6)
# Valid regular expressions; log patterns are not templates, so braces are fine.
REGEXES = st.sampled_from(
    ["ready", r"listening on \d{2,5}", "^OK$", "(?i)started", r"Ready to accept connections"]
)
BAD_REGEXES = st.sampled_from(["(", "[", "*a", "a{2,1}", "(?P<x>", "\\", "(?<", "a)"])
RESTART_POLICIES = st.sampled_from(["no", "on-failure", "always", "unless-stopped"])

# A template: plain text and placeholders (indices into the usable ones).
TEMPLATE_PARTS = st.lists(st.one_of(PLAIN_TEXT, INDEX), max_size=3)
BACKOFFS = st.fixed_dictionaries(
    {},
    optional={
        "initial": POSITIVE,
        "max": POSITIVE,
        "factor": st.one_of(st.just(1), st.floats(min_value=1, max_value=10)),
        "jitter": st.floats(min_value=0, max_value=1),
    },
)
PROBE_TIMING = st.fixed_dictionaries(
    {},
    optional={
        "timeout": POSITIVE,
        "deadline": POSITIVE,
        "retries": AT_LEAST_ONE,
        "success_threshold": AT_LEAST_ONE,
        "failure_threshold": AT_LEAST_ONE,
        "liveness_interval": NON_NEGATIVE,
    },
)
HTTP_EXTRAS = st.fixed_dictionaries({}, optional={"status": st.integers(100, 599), "body": REGEXES})
PROBE_KINDS = ["http_fixed", "command", "log", "call", "tcp_fixed"]
PROBE_KINDS_NO_PORT = st.sampled_from(PROBE_KINDS)
PROBE_KINDS_WITH_PORT = st.sampled_from([*PROBE_KINDS, "tcp", "http"])
CONDITIONS = ["started", "healthy", "completed_successfully", "log_ready_pattern", "default"]
CONDITIONS_NO_LOG = st.sampled_from(CONDITIONS)
CONDITIONS_WITH_LOG = st.sampled_from([*CONDITIONS, "log_ready"])
INFRA_OPTIONAL = st.fixed_dictionaries(
    {},
    optional={
        "state_dir": st.sampled_from(["/srv/dspy-infra/state", "state", "a/b/../c"]),
        "project": NAMES,
        "autostart": st.booleans(),
        "max_concurrent_starts": AT_LEAST_ONE,
        "event_buffer": AT_LEAST_ONE,
        "event_history": COUNT,
    },
)
SERVICE_OPTIONAL = st.fixed_dictionaries(
    {},
    optional={
        "image": PLAIN_TEXT,
        "cwd": st.sampled_from(["/tmp", "work", "{service_dir}"]),
        "restart": RESTART_POLICIES,
        "max_restarts": COUNT,
        "restart_backoff": BACKOFFS,
        "restart_reset_after": NON_NEGATIVE,
        "start_retries": COUNT,
        "start_backoff": BACKOFFS,
        "stop_timeout": NON_NEGATIVE,
        "autostart": st.booleans(),
        "log_lines": AT_LEAST_ONE,
    },
)


def closure(services: Mapping[str, Doc], name: str) -> set[str]:
    """Every service ``name`` depends on, directly or not (in a document)."""
    seen: set[str] = set()
    stack = list(dep_names(services[name]))
    while stack:
        dep = stack.pop()
        if dep not in seen and dep in services:
            seen.add(dep)
            stack.extend(dep_names(services[dep]))
    return seen


def dep_names(service: Doc) -> list[str]:
    deps = service.get("depends_on", [])
    return list(deps) if isinstance(deps, dict) else [str(d) for d in deps]


def one_port(ports: Mapping[str, int]) -> bool:
    """Whether ``{port}`` can be used: a single port, or one named ``main``."""
    return len(ports) == 1 or "main" in ports


def usable_placeholders(services: Mapping[str, Doc], name: str) -> list[str]:
    """Templates that service ``name`` can use: its own ports, its dependencies'."""
    ports = services[name].get("ports", {})
    found = ["{name}", "{host}", "{state_dir}", "{service_dir}", "{{literal}}", "{ name }"]
    found += [f"{{ports.{p}}}" for p in ports]
    if one_port(ports):
        found.append("{port}")
    for dep in sorted(closure(services, name)):
        found.append(f"{{services.{dep}.host}}")
        dep_ports = services[dep].get("ports", {})
        found += [f"{{services.{dep}.ports.{p}}}" for p in dep_ports]
        if one_port(dep_ports):
            found.append(f"{{services.{dep}.port}}")
    return found


def render_parts(parts: list[str | int], usable: list[str]) -> str:
    return "".join(p if isinstance(p, str) else usable[p % len(usable)] for p in parts)


@st.composite
def probes(draw: st.DrawFn, ports: Mapping[str, int], usable: list[str]) -> Doc:
    kind = draw(PROBE_KINDS_WITH_PORT if one_port(ports) else PROBE_KINDS_NO_PORT)
    probe: Doc
    if kind == "tcp":
        probe = {"tcp": "{port}"}
    elif kind == "tcp_fixed":
        probe = {"tcp": f"127.0.0.1:{draw(PORTS)}"}
    elif kind in ("http", "http_fixed"):
        port = "{port}" if kind == "http" else str(draw(PORTS))
        probe = {"http": f"http://{{host}}:{port}/health"} | draw(HTTP_EXTRAS)
    elif kind == "command":
        argv = draw(st.lists(TEMPLATE_PARTS, min_size=1, max_size=3))
        probe = {"command": [render_parts(arg, usable) for arg in argv]}
    elif kind == "log":
        probe = {"log": draw(REGEXES)}
    else:
        probe = {"call": "asyncio:sleep"}
    timing = draw(PROBE_TIMING)
    if draw(st.booleans()):
        interval = draw(POSITIVE)
        timing["interval"] = interval
        timing["max_interval"] = interval + draw(st.sampled_from([0, 0.5, 10]))
    elif draw(st.booleans()):
        timing["max_interval"] = draw(st.floats(min_value=0.01, max_value=100))
    return probe | timing


@st.composite
def dependencies(draw: st.DrawFn, services: Mapping[str, Doc]) -> list[str] | Doc:
    """``depends_on`` on some of ``services`` (those before: so the graph is a DAG)."""
    names = list(services)
    picked = draw(st.sets(INDEX, max_size=3)) if names else set()
    deps = sorted({names[i % len(names)] for i in picked})
    if draw(st.booleans()):
        return deps
    table: Doc = {}
    for dep in deps:
        has_log = "log" in (services[dep].get("health") or {})
        condition = draw(CONDITIONS_WITH_LOG if has_log else CONDITIONS_NO_LOG)
        if condition == "default":
            table[dep] = {}
        elif condition == "log_ready_pattern":
            table[dep] = {"condition": "log_ready", "pattern": draw(REGEXES)}
        else:
            table[dep] = {"condition": condition}
    return table


@st.composite
def valid_documents(draw: st.DrawFn, min_services: int = 0) -> Doc:
    backend = draw(st.sampled_from(["local", "docker"]))
    infra = draw(INFRA_OPTIONAL)
    if backend != "local" or draw(st.booleans()):
        infra["backend"] = backend
    names = draw(st.lists(NAMES, min_size=min_services, max_size=5, unique=True))
    services: dict[str, Doc] = {}
    for name in names:
        svc: Doc = {}
        ports = draw(st.dictionaries(PORT_NAMES, PORTS, max_size=3))
        if bool(ports) or draw(st.booleans()):
            svc["ports"] = ports
        depends_on = draw(dependencies(services))
        if bool(depends_on) or draw(st.booleans()):
            svc["depends_on"] = depends_on
        services[name] = svc  # usable_placeholders() needs it in place
        usable = usable_placeholders(services, name)
        if backend == "local" or draw(st.booleans()):
            if draw(st.booleans()):
                argv = draw(st.lists(TEMPLATE_PARTS, min_size=1, max_size=4))
                svc["command"] = [render_parts(arg, usable) for arg in argv]
            else:
                svc["command"] = render_parts(draw(TEMPLATE_PARTS), usable) or "true"
                svc["shell"] = True
        if "shell" not in svc and draw(st.booleans()):
            svc["shell"] = draw(st.booleans())
        if draw(st.booleans()):
            env = draw(st.dictionaries(NAMES, TEMPLATE_PARTS, max_size=3))
            svc["env"] = {k: render_parts(v, usable) for k, v in env.items()}
        if draw(st.booleans()):
            svc["health"] = draw(probes(ports, usable))
        svc |= draw(SERVICE_OPTIONAL)
        # The docker backend needs an image: a generated one may be absent or empty.
        svc |= {"image": svc.get("image") or f"image-{draw(NAMES)}"} if backend == "docker" else {}
    doc: Doc = {}
    if bool(infra) or draw(st.booleans()):
        doc["infra"] = infra
    if bool(services) or draw(st.booleans()):
        doc["services"] = services
    return doc


def load(doc: Mapping[str, Any]) -> Config:
    return load_config(doc, environ={})


def assert_reflects(doc: Doc, config: Config) -> None:
    """What the document says is what the Config holds."""
    for key, value in doc.get("infra", {}).items():
        expected = (Path.cwd() / value).resolve() if key == "state_dir" else value
        assert getattr(config.infra, key) == expected, key
    services = doc.get("services", {})
    assert set(config.services) == set(services)
    for name, svc in services.items():
        got = config.services[name]
        command = svc.get("command")
        assert got.command == (tuple(command) if isinstance(command, list) else command)
        assert got.ports == svc.get("ports", {})
        assert got.env == svc.get("env", {})
        assert got.restart == svc.get("restart", "no")
        assert got.shell == svc.get("shell", False)
        assert set(got.depends_on) == set(dep_names(svc))
        deps = svc.get("depends_on", [])
        for dep, spec in deps.items() if isinstance(deps, dict) else ():
            assert got.depends_on[dep].condition == spec.get("condition", "healthy")
            assert got.depends_on[dep].pattern == spec.get("pattern")
        assert (got.health is None) == ("health" not in svc)
        for key, value in svc.get("health", {}).items():
            actual = getattr(got.health, key)
            if key == "call":
                assert callable(actual)
            else:
                assert actual == (tuple(value) if key == "command" else value), key
        for table in ("restart_backoff", "start_backoff"):
            for key, value in svc.get(table, {}).items():
                assert getattr(getattr(got, table), key) == value


# --- valid documents ----------------------------------------------------------------


@SETTINGS
@given(valid_documents())
def test_valid_documents_load_and_round_trip(doc: Doc) -> None:
    before = copy.deepcopy(doc)
    config = load(doc)
    assert doc == before, "load_config changed its input"
    assert_reflects(doc, config)
    # The same document read from TOML text is the same configuration.
    assert load(tomllib.loads(tomli_w.dumps(doc))) == config
    text = dump_config(config)
    again = load(tomllib.loads(text))
    assert again == config
    assert dump_config(again) == text


# --- invalid documents --------------------------------------------------------------
# Each mutation breaks one thing in a valid document and says which key path
# the error must name.

INFRA_FIELDS = {
    "backend": "str",
    "state_dir": "str",
    "project": "str",
    "autostart": "bool",
    "max_concurrent_starts": "int",
    "event_buffer": "int",
    "event_history": "int",
}
SERVICE_FIELDS = {
    "command": "argv",
    "shell": "bool",
    "image": "str",
    "env": "table",
    "cwd": "str",
    "ports": "table",
    "depends_on": "deps",
    "health": "table",
    "restart": "str",
    "max_restarts": "int",
    "restart_backoff": "table",
    "restart_reset_after": "float",
    "start_retries": "int",
    "start_backoff": "table",
    "stop_timeout": "float",
    "autostart": "bool",
    "log_lines": "int",
}
PROBE_FIELDS = {
    "tcp": "str",
    "http": "str",
    "status": "int",
    "body": "str",
    "command": "list",
    "log": "str",
    "call": "str",
    "interval": "float",
    "max_interval": "float",
    "timeout": "float",
    "deadline": "float",
    "retries": "int",
    "success_threshold": "int",
    "failure_threshold": "int",
    "liveness_interval": "float",
}
BACKOFF_FIELDS = {"initial": "float", "max": "float", "factor": "float", "jitter": "float"}
DEPENDENCY_FIELDS = {"condition": "str", "pattern": "str"}
KNOWN_KEYS = frozenset(
    [
        *INFRA_FIELDS,
        *SERVICE_FIELDS,
        *PROBE_FIELDS,
        *BACKOFF_FIELDS,
        *DEPENDENCY_FIELDS,
        "infra",
        "services",
        "source",
    ]
)

SMALL_TABLES = st.dictionaries(st.sampled_from(["x", "y"]), st.integers(), max_size=1)
WRONG: dict[str, st.SearchStrategy[Any]] = {
    "str": st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), SMALL_TABLES),
    "int": st.one_of(
        st.text(max_size=3),
        st.floats(allow_nan=False).filter(lambda f: not f.is_integer()),
        st.booleans(),
        st.lists(st.integers(), max_size=2),
    ),
    "float": st.one_of(st.text(max_size=3), st.booleans(), SMALL_TABLES),
    "bool": st.one_of(st.integers(), st.text(max_size=3), st.floats(allow_nan=False)),
    "argv": st.one_of(
        st.integers(), st.booleans(), st.lists(st.integers(), min_size=1), SMALL_TABLES
    ),
    "list": st.one_of(st.integers(), st.text(max_size=3), st.lists(st.integers(), min_size=1)),
    "table": st.one_of(st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2)),
    "deps": st.one_of(st.integers(), st.text(max_size=3), st.booleans()),
}
OUT_OF_RANGE: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "infra": {
        "max_concurrent_starts": st.integers(max_value=0),
        "event_buffer": st.integers(max_value=0),
        "event_history": st.integers(max_value=-1),
        "keep_finished": st.floats(max_value=0),
    },
    "service": {
        "max_restarts": st.integers(max_value=-1),
        "restart_reset_after": st.floats(max_value=-1e-9),
        "start_retries": st.integers(max_value=-1),
        "stop_timeout": st.floats(max_value=-1e-9),
        "log_lines": st.integers(max_value=0),
    },
    "probe": {
        "interval": st.floats(max_value=0),
        "timeout": st.floats(max_value=0),
        "deadline": st.floats(max_value=0),
        "retries": st.integers(max_value=0),
        "success_threshold": st.integers(max_value=0),
        "failure_threshold": st.integers(max_value=0),
        "liveness_interval": st.floats(max_value=-1e-9),
        "status": st.one_of(st.integers(max_value=99), st.integers(min_value=600)),
    },
    "backoff": {
        "initial": st.floats(max_value=0),
        "max": st.floats(max_value=0),
        "factor": st.floats(max_value=0.999),
        "jitter": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.001)),
    },
}
UNKNOWN_KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).filter(
    lambda k: k not in KNOWN_KEYS
)
BAD_NAMES = st.sampled_from(["a.b", "", "-x", "../up", "a b", "_x", "x/y", "é", "a:b"])
BAD_CONDITIONS = st.sampled_from(["ready", "Healthy", "", "log-ready", "complete"])
BAD_RESTARTS = st.sampled_from(["never", "On-Failure", "yes", "", "on_failure"])
BAD_BACKENDS = st.sampled_from(["k8s", "Docker", "", "local backend", "../x"])
BAD_TEMPLATES = ["{nope}", "{ports.no_such_port}", "{services}", "{services.x}", "{port.main}"]
BAD_TEMPLATES += ["x { y", "}", "{{{", "{}"]


def dependency_table(svc: Doc) -> Doc:
    """The service's ``depends_on`` as a table (turned into one if it was a list)."""
    deps = svc.get("depends_on")
    if not isinstance(deps, dict):
        deps = svc["depends_on"] = {d: {} for d in dep_names(svc)}
    return deps


def probe_of(svc: Doc) -> Doc:
    probe: Doc = svc.setdefault("health", {"log": "x"})
    return probe


def _unknown_key(draw: st.DrawFn, doc: Doc, name: str) -> str:
    svc, at = doc["services"][name], f"services.{name}"
    tables: list[tuple[str, Doc]] = [("", doc), ("infra", doc.setdefault("infra", {}))]
    tables += [(at, svc), (f"{at}.health", probe_of(svc))]
    tables += [(f"{at}.{b}", svc.setdefault(b, {})) for b in ("restart_backoff", "start_backoff")]
    deps = svc.get("depends_on")
    if isinstance(deps, dict):
        tables += [(f"{at}.depends_on.{d}", spec) for d, spec in deps.items()]
    path, table = draw(st.sampled_from(tables))
    key = draw(UNKNOWN_KEYS)
    table[key] = draw(st.one_of(st.integers(), st.text(max_size=3)))
    return f"{path}.{key}" if path else key


def _wrong_type(draw: st.DrawFn, doc: Doc, name: str) -> str:
    svc, at = doc["services"][name], f"services.{name}"
    infra = doc.setdefault("infra", {})
    choices = [("infra", infra, f, k) for f, k in INFRA_FIELDS.items()]
    choices += [(at, svc, f, k) for f, k in SERVICE_FIELDS.items()]
    choices += [(f"{at}.health", probe_of(svc), f, k) for f, k in PROBE_FIELDS.items()]
    backoff = svc.setdefault("start_backoff", {})
    choices += [(f"{at}.start_backoff", backoff, f, k) for f, k in BACKOFF_FIELDS.items()]
    deps = svc.get("depends_on")
    for dep, spec in deps.items() if isinstance(deps, dict) else ():
        choices += [(f"{at}.depends_on.{dep}", spec, f, k) for f, k in DEPENDENCY_FIELDS.items()]
    path, table, key, kind = draw(st.sampled_from(choices))
    table[key] = draw(WRONG[kind])
    return f"{path}.{key}"


def _out_of_range(draw: st.DrawFn, doc: Doc, name: str) -> str:
    svc, at = doc["services"][name], f"services.{name}"
    backoff = draw(st.sampled_from(["restart_backoff", "start_backoff"]))
    where, path, table = draw(
        st.sampled_from(
            [
                ("infra", "infra", doc.setdefault("infra", {})),
                ("service", at, svc),
                ("probe", f"{at}.health", probe_of(svc)),
                ("backoff", f"{at}.{backoff}", svc.setdefault(backoff, {})),
            ]
        )
    )
    key = draw(st.sampled_from(sorted(OUT_OF_RANGE[where])))
    table[key] = draw(OUT_OF_RANGE[where][key])
    return f"{path}.{key}"


def _bad_port(draw: st.DrawFn, doc: Doc, name: str) -> str:
    port = draw(PORT_NAMES)
    value = draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=65536)))
    doc["services"][name].setdefault("ports", {})[port] = value
    return f"services.{name}.ports.{port}"


def _bad_literal(draw: st.DrawFn, doc: Doc, name: str) -> str:
    svc = doc["services"][name]
    which = draw(st.sampled_from(["restart", "backend", "condition"]))
    if which == "restart":
        svc["restart"] = draw(BAD_RESTARTS)
        return f"services.{name}.restart"
    if which == "backend":
        doc.setdefault("infra", {})["backend"] = draw(BAD_BACKENDS)
        return "infra.backend"
    # Even a self-dependency fails on the condition first.
    other = draw(st.sampled_from(sorted(doc["services"])))
    dependency_table(svc)[other] = {"condition": draw(BAD_CONDITIONS)}
    return f"services.{name}.depends_on.{other}.condition"


def _unknown_dependency(draw: st.DrawFn, doc: Doc, name: str) -> str:
    missing = draw(NAMES.filter(lambda n: n not in doc["services"]))
    deps = doc["services"][name].setdefault("depends_on", [])
    if isinstance(deps, dict):
        deps[missing] = {}
    else:
        deps.append(missing)
    return f"services.{name}.depends_on.{missing}"


def _bad_placeholder(draw: st.DrawFn, doc: Doc, name: str) -> str:
    services = doc["services"]
    svc = services[name]
    outsiders = sorted(set(services) - closure(services, name) - {name})
    candidates = [*BAD_TEMPLATES, *(f"{{services.{o}.host}}" for o in outsiders)]
    if not one_port(svc.get("ports", {})):
        candidates.append("{port}")
    template = draw(st.sampled_from(candidates))
    if isinstance(svc.get("command"), list) and draw(st.booleans()):
        svc["command"].append(template)
        return f"services.{name}.command[{len(svc['command']) - 1}]"
    key = draw(NAMES)
    svc.setdefault("env", {})[key] = draw(PLAIN_TEXT) + template
    return f"services.{name}.env.{key}"


def _bad_regex(draw: st.DrawFn, doc: Doc, name: str) -> str:
    svc = doc["services"][name]
    regex = draw(BAD_REGEXES)
    which = draw(st.sampled_from(["log", "body", "pattern"]))
    if which == "log":
        svc["health"] = {"log": regex}
        return f"services.{name}.health.log"
    if which == "body":
        svc["health"] = {"http": "http://127.0.0.1:1/", "body": regex}
        return f"services.{name}.health.body"
    other = draw(st.sampled_from(sorted(doc["services"])))
    dependency_table(svc)[other] = {"condition": "log_ready", "pattern": regex}
    return f"services.{name}.depends_on.{other}.pattern"


def _bad_name(draw: st.DrawFn, doc: Doc, name: str) -> str:
    bad = draw(BAD_NAMES)
    doc["services"][bad] = {"command": ["true"]}
    return f"services.{bad}"


def _bad_interval(draw: st.DrawFn, doc: Doc, name: str) -> str:
    probe = probe_of(doc["services"][name])
    probe["interval"] = draw(st.floats(min_value=0.5, max_value=10))
    probe["max_interval"] = draw(st.floats(min_value=0.001, max_value=0.499))
    return f"services.{name}.health.max_interval"


MUTATIONS = {
    f.__name__.lstrip("_"): f
    for f in (
        _unknown_key,
        _wrong_type,
        _out_of_range,
        _bad_port,
        _bad_literal,
        _unknown_dependency,
        _bad_placeholder,
        _bad_regex,
        _bad_name,
        _bad_interval,
    )
}


@st.composite
def invalid_documents(draw: st.DrawFn, mutation: str) -> tuple[Doc, str]:
    """A valid document with one thing broken, and the key path the error must name."""
    doc = draw(valid_documents(min_services=1))
    name = draw(st.sampled_from(sorted(doc["services"])))
    return doc, MUTATIONS[mutation](draw, doc, name)


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
@settings(SETTINGS, max_examples=25)
@given(data=st.data())
def test_invalid_documents_name_the_key_path(mutation: str, data: st.DataObject) -> None:
    doc, path = data.draw(invalid_documents(mutation), label="document, path")
    with pytest.raises(ConfigError) as info:
        load(doc)
    assert info.value.path == path, str(info.value)
    assert info.value.source == "<mapping>"
    assert str(info.value).startswith(f"<mapping>: {path}: "), str(info.value)


@st.composite
def cyclic_documents(draw: st.DrawFn) -> Doc:
    """A valid document plus edges that close at least one cycle."""
    doc = draw(valid_documents(min_services=1))
    services: dict[str, Doc] = doc["services"]
    names = list(services)  # dependencies only point backwards: the order is topological
    i = draw(st.integers(0, len(names) - 1))
    j = draw(st.integers(i, len(names) - 1))
    edges = [(names[i], names[j])]
    if i != j and names[i] not in closure(services, names[j]):
        edges.append((names[j], names[i]))
    for src, dst in edges:
        deps = services[src].setdefault("depends_on", [])
        if isinstance(deps, dict):
            deps[dst] = {}
        elif dst not in deps:
            deps.append(dst)
    return doc


@SETTINGS
@given(cyclic_documents())
def test_cycles_are_refused_with_the_whole_cycle(doc: Doc) -> None:
    with pytest.raises(ConfigError) as info:
        load(doc)
    match = re.fullmatch(r"<mapping>: services\.(\S+)\.depends_on: cycle: (.*)", str(info.value))
    assert match, str(info.value)
    cycle = match.group(2).split(" -> ")
    assert cycle[0] == cycle[-1] == match.group(1)
    assert len(set(cycle)) == len(cycle) - 1, "a cycle visits each service once"
    for src, dst in itertools.pairwise(cycle):
        assert dst in dep_names(doc["services"][src]), f"{src} -> {dst} is not an edge"


# --- anything at all ----------------------------------------------------------------

TOML_SCALARS = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=8),
    st.sampled_from(["{port}", "{", "(", "local", "docker", "always", "asyncio:sleep", "os:sep"]),
)
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=5), NAMES), inner, max_size=3),
    ),
    max_leaves=10,
)
ANY_KEY = st.one_of(NAMES, st.sampled_from(sorted(KNOWN_KEYS)))


@st.composite
def scrambled_documents(draw: st.DrawFn) -> Doc:
    """A valid document with any value at any path replaced by any TOML value."""
    doc = draw(valid_documents())
    node: Any = doc
    for _ in range(draw(st.integers(0, 4))):
        if not isinstance(node, dict) or not node:
            break
        key = draw(st.sampled_from(sorted(node)))
        if not isinstance(node[key], dict) or not node[key] or draw(st.booleans()):
            node[key] = draw(TOML_VALUES)
            return doc
        node = node[key]
    if isinstance(node, dict):
        node[draw(ANY_KEY)] = draw(TOML_VALUES)
    return doc


@SETTINGS
@given(scrambled_documents())
def test_nothing_but_config_error_escapes(doc: Doc) -> None:
    error: ConfigError | None = None
    try:
        config = load(doc)
    except ConfigError as exc:
        error = exc
    if error is not None:
        assert str(error).startswith("<mapping>: "), str(error)
        assert error.path is not None
    else:
        # What loads is a real configuration: it dumps and loads back the same.
        assert load(tomllib.loads(dump_config(config))) == config
