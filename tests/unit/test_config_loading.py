"""Configuration loading, case by case: files, pyproject, environment, overrides,
the cross-field checks, and that bad input changes nothing."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path
from typing import Any

import pytest

from dspy_infra import Config, ConfigError, Probe, ServiceConfig, ServiceStatus, load_config
from dspy_infra.config import dump_config

REDIS = """\
[infra]
state_dir = "state"

[services.redis]
command = ["redis-server", "--port", "{port}"]
ports = { main = 0 }
health = { tcp = "{port}", interval = 0.05, max_interval = 0.5 }
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error(source: Any = None, **kwargs: Any) -> ConfigError:
    """The ConfigError that loading raises (the environment is empty unless given)."""
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as info:
        load_config(source, **kwargs)
    return info.value


def svc(**fields: Any) -> dict[str, Any]:
    return {"command": ["run"], **fields}


def services(**tables: Any) -> dict[str, Any]:
    return {"services": tables}


# --- files -------------------------------------------------------------------------


def test_a_file_loads_and_names_itself(tmp_path: Path) -> None:
    path = write(tmp_path / "dspy-infra.toml", REDIS)
    config = load_config(path, environ={})
    assert config.source == str(path)
    assert config.services["redis"].command == ("redis-server", "--port", "{port}")
    assert config.services["redis"].health == Probe(tcp="{port}", interval=0.05, max_interval=0.5)
    # A str path works as well as a Path.
    assert load_config(str(path), environ={}) == config


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.toml", "[services.redis\ncommand = 1\n")
    exc = error(path)
    assert str(exc).startswith(f"{path}: invalid TOML: ")
    assert exc.source == str(path)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    exc = error(path)
    assert str(exc) == f"{path}: file not found"


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    exc = error(tmp_path)  # a directory
    assert str(exc).startswith(f"{tmp_path}: cannot read: ")


@pytest.mark.parametrize("name", ["dspy-infra.toml", "pyproject.toml"])
def test_a_file_that_is_not_utf8_names_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes('[tool.dspy-infra.infra]\nproject = "café"\n'.encode("latin-1"))
    exc = error(path)
    assert str(exc) == f"{path}: cannot read: not UTF-8 text"
    assert exc.source == str(path)


def test_bad_value_in_a_file_names_file_and_key_path(tmp_path: Path) -> None:
    path = write(
        tmp_path / "dspy-infra.toml", REDIS.replace("interval = 0.05", 'interval = "fast"')
    )
    exc = error(path)
    assert str(exc) == (
        f"{path}: services.redis.health.interval: expected a number, got 'fast' (string)"
    )
    assert (exc.source, exc.path) == (str(path), "services.redis.health.interval")


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path / "dspy-infra.toml",
        '[infra]\nevent_buffer = "x"\nevent_history = true\nbackend = "local"\n',
    )
    assert str(error(path)) == (
        f"{path}: infra.event_buffer: expected an integer, got 'x' (string) "
        "(and 1 more: infra.event_history: expected an integer, got True (boolean))"
    )


# --- pyproject.toml ----------------------------------------------------------------


PYPROJECT = """\
[project]
name = "mine"

[tool.dspy-infra.infra]
project = "mine"

[tool.dspy-infra.services.kv]
command = ["kv", "--port", "{port}"]
ports = { main = 7000 }
"""


def test_pyproject_table_given_explicitly(tmp_path: Path) -> None:
    path = write(tmp_path / "pyproject.toml", PYPROJECT)
    config = load_config(path, environ={})
    assert config.infra.project == "mine"
    assert config.services["kv"].ports == {"main": 7000}
    assert config.source == str(path)


def test_pyproject_found_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "pyproject.toml", PYPROJECT)
    monkeypatch.chdir(tmp_path)
    config = load_config(environ={})
    assert config.infra.project == "mine"
    assert config.infra.state_dir == tmp_path / ".dspy-infra"


def test_dspy_infra_toml_wins_over_pyproject(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "pyproject.toml", PYPROJECT)
    write(tmp_path / "dspy-infra.toml", '[infra]\nproject = "own-file"\n')
    monkeypatch.chdir(tmp_path)
    assert load_config(environ={}).infra.project == "own-file"


def test_pyproject_without_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "pyproject.toml", '[project]\nname = "x"\n[tool.ruff]\n')
    assert str(error(path)) == f"{path}: no [tool.dspy-infra] table"
    # Found by itself it is not ours: defaults, not an error.
    monkeypatch.chdir(tmp_path)
    config = load_config(environ={})
    assert config.source is None
    assert config.services == {}


@pytest.mark.parametrize("text", ['tool = "dspy-infra"\n', "tool = 5\n", 'tool.dspy-infra = "x"\n'])
def test_pyproject_with_odd_tool_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    path = write(tmp_path / "pyproject.toml", text)
    assert str(error(path)) == f"{path}: no [tool.dspy-infra] table"
    monkeypatch.chdir(tmp_path)
    if "dspy-infra =" in text:
        # It claims the table: a wrong table is an error, not silently skipped.
        assert str(error()) == f"{path.name}: no [tool.dspy-infra] table"
    else:
        assert load_config(environ={}).source is None


def test_no_file_at_all_gives_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(environ={})
    assert config == Config(infra=config.infra)
    assert config.infra.state_dir == tmp_path / ".dspy-infra"
    assert config.source is None


# --- DSPY_INFRA_CONFIG and the environment -----------------------------------------


def test_dspy_infra_config_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "elsewhere" / "conf.toml", REDIS)
    write(tmp_path / "dspy-infra.toml", '[infra]\nproject = "local-file"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config(environ={"DSPY_INFRA_CONFIG": str(path)})
    assert config.source == str(path)
    assert "redis" in config.services
    # Relative paths in it are relative to it, not to the working directory.
    assert config.infra.state_dir == path.parent / "state"
    # An explicit source wins over the variable.
    explicit = load_config(tmp_path / "dspy-infra.toml", environ={"DSPY_INFRA_CONFIG": str(path)})
    assert explicit.infra.project == "local-file"


def test_dspy_infra_config_pointing_nowhere(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    exc = error(environ={"DSPY_INFRA_CONFIG": str(missing)})
    assert str(exc) == f"{missing}: file not found"


def test_environment_overrides(tmp_path: Path) -> None:
    path = write(tmp_path / "dspy-infra.toml", REDIS)
    environ = {
        "DSPY_INFRA_BACKEND": "docker",
        "DSPY_INFRA_STATE_DIR": str(tmp_path / "elsewhere"),
        "DSPY_INFRA_MAX_CONCURRENT_STARTS": "7",
        "DSPY_INFRA_AUTOSTART": "false",
        "DSPY_INFRA_PROJECT": '"123"',
        "DSPY_INFRA_SERVICES__REDIS__RESTART": "always",
        "DSPY_INFRA_SERVICES__REDIS__IMAGE": "redis:7",
        "DSPY_INFRA_SERVICES__REDIS__HEALTH__INTERVAL": "0.2",
        "DSPY_INFRA_SERVICES__REDIS__ENV": '{ A = "1" }',
        "DSPY_INFRA_SERVICES__KV__COMMAND": '["kv", "--port", "{port}"]',
        "DSPY_INFRA_SERVICES__KV__PORTS__MAIN": "6000",
        "DSPY_INFRA_SERVICES__KV__IMAGE": "kv:1",
        "DSPY_INFRA_CONFIG": "/not/used/when/a/source/is/given.toml",
        "DSPY_INFRA_SOMETHING_ELSE": "ignored: belongs to another tool",
        "OTHER_TOOL_BACKEND": "ignored",
    }
    config = load_config(path, environ=environ)
    assert config.infra.backend == "docker"
    assert config.infra.state_dir == tmp_path / "elsewhere"
    assert config.infra.max_concurrent_starts == 7
    assert config.infra.autostart is False
    assert config.infra.project == "123"
    redis = config.services["redis"]
    assert (redis.restart, redis.image, redis.env) == ("always", "redis:7", {"A": "1"})
    # A nested table merges key by key: the file's tcp probe is kept.
    assert redis.health == Probe(tcp="{port}", interval=0.2, max_interval=0.5)
    assert redis.command == ("redis-server", "--port", "{port}")
    assert config.services["kv"].command == ("kv", "--port", "{port}")
    assert config.services["kv"].ports == {"main": 6000}


def test_a_variable_naming_an_env_entry_keeps_its_case(tmp_path: Path) -> None:
    # The name after ENV__ is an environment variable's, not a config key:
    # it was lower-cased with the rest (HF_TOKEN became hf_token), unlike
    # the same entry written in the file. Every other name still folds.
    file = write(tmp_path / "dspy-infra.toml", REDIS + '[handlers.h]\ncommand = ["true"]\n')
    environ = {
        "DSPY_INFRA_SERVICES__REDIS__ENV__HF_TOKEN": "secret",
        "DSPY_INFRA_Services__Redis__Env__Mixed_Case": "m",
        "DSPY_INFRA_HANDLERS__H__ENV__CUDA_VISIBLE_DEVICES": "all",
        "DSPY_INFRA_SERVICES__REDIS__RESTART": "always",
    }
    overrides = {"SERVICES__REDIS__ENV__LOG_LEVEL": "debug", "handlers__H__env__Path": "/bin"}
    config = load_config(file, environ=environ, overrides=overrides)
    redis = config.services["redis"]
    assert redis.env == {"HF_TOKEN": "secret", "Mixed_Case": "m", "LOG_LEVEL": "debug"}
    assert redis.restart == "always"
    assert config.handlers["h"].env == {"CUDA_VISIBLE_DEVICES": "all", "Path": "/bin"}


@pytest.mark.parametrize(
    ("name", "value", "path", "expected"),
    [
        (
            "DSPY_INFRA_SERVICES__REDIS__RESTART",
            "sometimes",
            "services.redis.restart",
            "expected one of 'no', 'on-failure', 'always', 'unless-stopped', got 'sometimes'",
        ),
        ("DSPY_INFRA_BACKEND", "k8s", "infra.backend", "unknown backend 'k8s'"),
        (
            "DSPY_INFRA_MAX_CONCURRENT_STARTS",
            "0",
            "infra.max_concurrent_starts",
            "expected a number >= 1, got 0",
        ),
        (
            "DSPY_INFRA_MAX_CONCURRENT_STARTS",
            "many",
            "infra.max_concurrent_starts",
            "expected an integer, got 'many' (string)",
        ),
        ("DSPY_INFRA_PROJECT", "123", "infra.project", "expected a string, got 123 (integer)"),
        (
            "DSPY_INFRA_SERVICES__REDIS__BOGUS",
            "1",
            "services.redis.bogus",
            "unknown key (expected one of: ",
        ),
        ("DSPY_INFRA_INFRA__BOGUS", "1", "infra.bogus", "unknown key"),
        (
            "DSPY_INFRA_SERVICES__REDIS__HEALTH__TCP",
            '"{nope}"',
            "services.redis.health.tcp",
            "unknown placeholder {nope}",
        ),
        (
            "DSPY_INFRA_SERVICES__REDIS__PORTS__MAIN",
            "99999",
            "services.redis.ports.main",
            "is not a port number",
        ),
        (
            "DSPY_INFRA_SERVICES__REDIS__COMMAND__X",
            "1",
            "services.redis.command",
            "cannot set services.redis.command.x: expected a table here",
        ),
        (
            "DSPY_INFRA_SERVICES__REDIS__DEPENDS_ON",
            '["nope"]',
            "services.redis.depends_on.nope",
            "unknown service 'nope'",
        ),
    ],
)
def test_invalid_environment_value_names_the_variable(
    tmp_path: Path, name: str, value: str, path: str, expected: str
) -> None:
    file = write(tmp_path / "dspy-infra.toml", REDIS)
    exc = error(file, environ={name: value})
    assert str(exc).startswith(f"environment variable {name}: {path}: "), str(exc)
    assert expected in str(exc)
    assert (exc.source, exc.path) == (f"environment variable {name}", path)


def test_a_default_at_odds_with_a_layer_s_value_names_the_layer(tmp_path: Path) -> None:
    # The file sets no max_interval: its default (0.02) is below the interval
    # that the variable set, and the error blamed the file, with neither value.
    file = write(tmp_path / "dspy-infra.toml", REDIS.replace(", max_interval = 0.5", ""))
    name = "DSPY_INFRA_SERVICES__REDIS__HEALTH__INTERVAL"
    exc = error(file, environ={name: "0.5"})
    assert str(exc) == (
        f"environment variable {name}: services.redis.health.max_interval: "
        "must be at least interval (0.5), got 0.02"
    )
    # A value the file set is still the file's to answer for.
    file = write(
        tmp_path / "other.toml", REDIS.replace("max_interval = 0.5", "max_interval = 0.01")
    )
    exc = error(file, environ={"DSPY_INFRA_SERVICES__REDIS__RESTART": "always"})
    assert (exc.source, exc.path) == (str(file), "services.redis.health.max_interval")


def test_an_error_in_the_file_still_names_the_file(tmp_path: Path) -> None:
    file = write(tmp_path / "dspy-infra.toml", REDIS.replace("{port}", "{nope}", 1))
    exc = error(file, environ={"DSPY_INFRA_SERVICES__REDIS__RESTART": "always"})
    assert str(exc).startswith(f"{file}: services.redis.command[2]: unknown placeholder {{nope}}")


@pytest.mark.parametrize(
    "layer",
    [
        {"environ": {"DSPY_INFRA_SERVICES__REDIS__RESTART": "always"}},
        {"overrides": {"services__redis__restart": "always"}},
        {"overrides": {"services__redis": {"restart": "always"}}},
        {"overrides": {"services": {"redis": {"restart": "always"}}}},
        {"environ": {"DSPY_INFRA_SERVICES": '{ redis = { restart = "always" } }'}},
    ],
)
def test_a_table_merged_over_the_file_leaves_the_file_s_errors_to_the_file(
    tmp_path: Path, layer: dict[str, Any]
) -> None:
    # The layer set restart only: the bad placeholder is the file's, whichever
    # way the layer wrote its key (a flat name, or a table merged key by key).
    file = write(tmp_path / "dspy-infra.toml", REDIS.replace("{port}", "{nope}", 1))
    exc = error(file, **layer)
    assert (exc.source, exc.path) == (str(file), "services.redis.command[2]")


@pytest.mark.parametrize(
    ("layer", "source"),
    [
        (
            {"environ": {"DSPY_INFRA_SERVICES__REDSI__RESTART": "always"}},
            "environment variable DSPY_INFRA_SERVICES__REDSI__RESTART",
        ),
        (
            {"overrides": {"services__redsi__restart": "always"}},
            "override services__redsi__restart=",
        ),
        ({"overrides": {"services": {"redsi": {"restart": "always"}}}}, "override services="),
    ],
)
def test_a_service_that_only_a_layer_names_is_that_layer_s_error(
    tmp_path: Path, layer: dict[str, Any], source: str
) -> None:
    # A typo of a service's name makes a new service, which the file never
    # named: its missing command is the variable's or the override's to fix.
    file = write(tmp_path / "dspy-infra.toml", REDIS)
    exc = error(file, **layer)
    assert (exc.source, exc.path) == (source, "services.redsi.command")
    assert str(exc) == f"{source}: services.redsi.command: required with the local backend"


@pytest.mark.parametrize(
    ("table", "path"),
    [
        ('command = ["cat", "{payload}"]', "handlers.h.command[1]"),
        ('command = "cat {payload}"\nshell = true', "handlers.h.command"),
    ],
)
def test_a_handler_command_naming_an_unknown_placeholder_is_refused_at_load(
    tmp_path: Path, table: str, path: str
) -> None:
    # Not only at each submit: `dspy-infra config validate` says so too.
    file = write(tmp_path / "dspy-infra.toml", f"[handlers.h]\n{table}\n")
    exc = error(file)
    assert str(exc) == (
        f"{file}: {path}: unknown placeholder {{payload}} (known: {{payload_file}}, "
        "{result_file}, {task_id}, {attempt}, {work_dir})"
    )


def test_a_key_that_is_no_string_is_unknown_without_a_guess() -> None:
    # Only a mapping built in Python holds one: no typo of a name, and no crash.
    assert str(error({"infra": {1: 2}})).startswith("<mapping>: infra.1: unknown key (expected")


def test_a_docker_handler_may_leave_the_command_to_its_image(tmp_path: Path) -> None:
    file = write(tmp_path / "dspy-infra.toml", '[handlers.d]\nimage = "alpine"\n')
    assert load_config(file).handlers["d"].command is None
    file.write_text("[handlers.d]\nenv = { A = '1' }\n")
    assert str(error(file)) == f"{file}: handlers.d.command: required (or an image)"


def test_os_environ_is_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = write(tmp_path / "dspy-infra.toml", REDIS)
    monkeypatch.setenv("DSPY_INFRA_SERVICES__REDIS__RESTART", "on-failure")
    assert load_config(file).services["redis"].restart == "on-failure"


# --- keyword overrides and precedence ----------------------------------------------


def test_keyword_overrides(tmp_path: Path) -> None:
    file = write(tmp_path / "dspy-infra.toml", REDIS)
    config = load_config(
        file,
        environ={},
        overrides={
            "state_dir": tmp_path / "over",
            "MAX_CONCURRENT_STARTS": 2,
            "services__redis__restart": "always",
            "infra": {"project": "p"},
            "services": {"kv": {"command": ["kv"]}},
        },
    )
    assert config.infra.state_dir == tmp_path / "over"
    assert config.infra.max_concurrent_starts == 2
    assert config.infra.project == "p"
    assert config.services["redis"].restart == "always"
    assert config.services["redis"].ports == {"main": 0}  # merged, not replaced
    assert config.services["kv"].command == ("kv",)


@pytest.mark.parametrize(
    ("doc", "path", "meant"),
    [
        ({"infra": {"bakend": "docker"}}, "infra.bakend", "backend"),
        ({"servics": {}}, "servics", "services"),
        (services(a=svc(restrat="always")), "services.a.restrat", "restart"),
        (
            services(a=svc(ports={"main": 0}, health={"tpc": "{port}"})),
            "services.a.health.tpc",
            "tcp",
        ),
        (
            {"classes": {"cpu_short": {"max_concurency": 2}}},
            "classes.cpu_short.max_concurency",
            "max_concurrency",
        ),
    ],
)
def test_a_typo_of_a_key_names_the_key_meant(doc: dict[str, Any], path: str, meant: str) -> None:
    exc = error(doc)
    assert exc.path == path
    assert f"unknown key, did you mean {meant!r}? (expected one of: " in str(exc)


def test_an_unknown_key_like_no_known_one_suggests_nothing() -> None:
    exc = error({"infra": {"bogus": 1}})  # three edits from gpus: no typo of it
    assert str(exc).startswith("<mapping>: infra.bogus: unknown key (expected one of: autostart, ")


def test_unknown_override_is_refused() -> None:
    exc = error({}, overrides={"bogus": 1})
    assert str(exc).startswith("overrides: bogus: unknown key (expected a section or an [infra]")
    exc = error({}, overrides={"stat_dir": "s"})
    assert str(exc).startswith("overrides: stat_dir: unknown key, did you mean 'state_dir'? (")
    exc = error({}, overrides={"sevices__a__image": "x"})  # the section's name misspelt
    assert str(exc).startswith(
        "overrides: sevices__a__image: unknown key, did you mean 'services'?"
    )
    exc = error({}, overrides={"state_dir__x": "s"})  # right as far as it goes: no guess
    assert str(exc).startswith("overrides: state_dir__x: unknown key (expected")
    exc = error({}, overrides={"services__x__restart": "never"})
    assert str(exc).startswith("override services__x__restart=: services.x.restart: expected")


def test_precedence_file_then_environment_then_overrides(tmp_path: Path) -> None:
    file = write(tmp_path / "dspy-infra.toml", '[infra]\nproject = "file"\nevent_buffer = 3\n')
    assert load_config(file, environ={}).infra.project == "file"
    environ = {"DSPY_INFRA_PROJECT": "env", "DSPY_INFRA_EVENT_BUFFER": "4"}
    config = load_config(file, environ=environ)
    assert (config.infra.project, config.infra.event_buffer) == ("env", 4)
    config = load_config(file, environ=environ, overrides={"project": "kw"})
    assert (config.infra.project, config.infra.event_buffer) == ("kw", 4)
    # An error in an overridden value names the last one that set it.
    exc = error(file, environ=environ, overrides={"event_buffer": 0})
    assert exc.source == "override event_buffer="


def test_config_object_source(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "dspy-infra.toml", REDIS), environ={})
    # Nothing to apply: the very same object.
    assert load_config(config, environ={}) is config
    changed = load_config(config, environ={"DSPY_INFRA_SERVICES__REDIS__RESTART": "always"})
    assert changed.services["redis"].restart == "always"
    assert changed.source == config.source
    assert changed.infra.state_dir == config.infra.state_dir


def test_a_config_object_s_relative_paths_are_relative_to_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # AgentInfra.start(load_config(path)) applies the environment again: a relative
    # DSPY_INFRA_STATE_DIR went to the working directory there, to the file's
    # directory in the Config it was given, so the two disagreed on the store.
    conf = tmp_path / "conf"
    path = write(conf / "dspy-infra.toml", '[services.a]\ncommand = ["a"]\n')
    monkeypatch.chdir(tmp_path)
    environ = {"DSPY_INFRA_STATE_DIR": "state"}
    config = load_config(path, environ=environ)
    assert config.infra.state_dir == conf / "state"
    assert load_config(config, environ=environ) == config
    changed = load_config(config, environ={}, overrides={"services__a__cwd": "work"})
    assert changed.services["a"].cwd == str(conf / "work")
    # A mapping's stay relative to the working directory.
    mapping = load_config({"services": {"a": svc()}}, environ={})
    assert load_config(mapping, environ=environ).infra.state_dir == tmp_path / "state"


def test_config_object_keeps_a_python_probe_callable(tmp_path: Path) -> None:
    def make() -> Any:
        async def ready(status: ServiceStatus) -> bool:
            return True

        return ready

    probe = make()
    config = Config(services={"a": ServiceConfig(command=("x",), health=Probe(call=probe))})
    loaded = load_config(
        config, environ={"DSPY_INFRA_PROJECT": "p"}, overrides={"autostart": False}
    )
    health = loaded.services["a"].health
    assert health is not None
    assert health.call is probe
    assert loaded.infra.project == "p"


def test_probe_call_by_reference() -> None:
    config = load_config(services(a=svc(health={"call": "asyncio:sleep"})), environ={})
    health = config.services["a"].health
    assert health is not None
    sleep: object = asyncio.sleep
    assert health.call is sleep
    for ref, expected in [
        ("asyncio", "expected 'module:function', got 'asyncio'"),
        ("no_such_module_x:f", "cannot import 'no_such_module_x:f'"),
        ("asyncio:no_such_name", "cannot import 'asyncio:no_such_name'"),
        ("os:getcwd", "'os:getcwd' is not an async function"),
    ]:
        exc = error(services(a=svc(health={"call": ref})))
        assert exc.path == "services.a.health.call"
        assert expected in str(exc)


HTTP = "http://127.0.0.1:{port}/healthz"


def test_an_override_naming_another_probe_kind_replaces_the_kind_below(tmp_path: Path) -> None:
    # One probe has one kind: the file's tcp probe, overridden by an http one,
    # is an http probe (not "found: tcp, http"), keeping the file's timings.
    file = write(tmp_path / "dspy-infra.toml", REDIS)
    env = {"DSPY_INFRA_SERVICES__REDIS__HEALTH__HTTP": HTTP}
    assert load_config(file, environ=env).services["redis"].health == (
        Probe(http=HTTP, interval=0.05, max_interval=0.5)
    )
    over = {"services": {"redis": {"health": {"log": "ready", "deadline": 5}}}}
    config = load_config(file, environ=env, overrides=over)  # tcp -> http -> log
    assert config.services["redis"].health == (
        Probe(log="ready", deadline=5, interval=0.05, max_interval=0.5)
    )
    # From http, its status and body go with it; over a Config too.
    web = load_config(services(a=svc(ports={"main": 0}, health={"http": HTTP, "status": 204})))
    command = {"services": {"a": {"health": {"command": ["true"]}}}}
    assert load_config(web, environ={}, overrides=command).services["a"].health == (
        Probe(command=("true",))
    )
    # The same kind again keeps them; a key of its own changes only that key.
    url = {"services": {"a": {"health": {"http": HTTP + "2"}}}}
    assert load_config(web, environ={}, overrides=url).services["a"].health == (
        Probe(http=HTTP + "2", status=204)
    )
    deadline = {"services__a__health__deadline": 5}
    assert load_config(web, environ={}, overrides=deadline).services["a"].health == (
        Probe(http=HTTP, status=204, deadline=5)
    )


@pytest.mark.parametrize(
    ("health", "expected"),
    [
        ({"tcp": "{port}", "log": "ready"}, "a probe needs exactly one of tcp, http, command"),
        ({"tcp": "{port}", "status": 200}, "status and body apply only to an http probe"),
    ],
)
def test_an_override_that_contradicts_itself_names_the_override(
    health: dict[str, Any], expected: str
) -> None:
    base = services(a=svc(ports={"main": 0}, health={"http": HTTP, "status": 204}))
    exc = error(base, overrides={"services": {"a": {"health": health}}})
    assert (exc.source, exc.path) == ("override services=", "services.a.health")
    assert expected in str(exc)


# --- cross-field checks ------------------------------------------------------------


def test_cycle_message_shows_the_whole_cycle() -> None:
    doc = services(
        a=svc(depends_on=["b"]),
        b=svc(depends_on={"c": {"condition": "started"}}),
        c=svc(depends_on=["a"]),
    )
    assert str(error(doc)) == "<mapping>: services.a.depends_on: cycle: a -> b -> c -> a"
    self_loop = services(a=svc(depends_on=["a"]))
    assert str(error(self_loop)) == "<mapping>: services.a.depends_on: cycle: a -> a"


def test_placeholder_of_a_non_dependency_is_refused() -> None:
    db = svc(ports={"main": 0})
    doc = services(db=db, app=svc(env={"DB": "{services.db.port}"}))
    exc = error(doc)
    assert exc.path == "services.app.env.DB"
    assert "refers to 'db', which is not among this service's dependencies" in str(exc)
    # A dependency, direct or not, is fine.
    chain = services(
        db=db,
        mid=svc(depends_on=["db"]),
        app=svc(depends_on=["mid"], env={"DB": "{services.db.host}:{services.db.port}"}),
    )
    assert load_config(chain, environ={}).services["app"].env == {
        "DB": "{services.db.host}:{services.db.port}"
    }


def test_port_placeholder_needs_one_obvious_port() -> None:
    several = {"http": 0, "grpc": 0}
    exc = error(services(a=svc(ports=several, command=["a", "{port}"])))
    assert exc.path == "services.a.command[1]"
    assert "several ports (grpc, http) and none named 'main': use {ports.NAME}" in str(exc)
    exc = error(services(a=svc(command=["a", "{port}"])))
    assert "declares no ports" in str(exc)
    for ports in ({"http": 0}, {**several, "main": 0}):
        load_config(services(a=svc(ports=ports, command=["a", "{port}"])), environ={})
    load_config(services(a=svc(ports=several, command=["a", "{ports.grpc}"])), environ={})
    exc = error(services(a=svc(ports=several, command=["a", "{ports.main}"])))
    assert "has no port 'main' (ports: grpc, http)" in str(exc)


@pytest.mark.parametrize(
    ("probe", "good"),
    [
        ({"tcp": "{port}"}, True),
        ({"tcp": "{host}:{port}"}, True),
        ({"tcp": "localhost:6379"}, True),
        # The check reads the port with int(), which allows whitespace around it.
        ({"tcp": " {port}"}, True),
        ({"tcp": "{port} "}, True),
        ({"tcp": "localhost: {port}"}, True),
        ({"tcp": "-1"}, False),
        ({"tcp": "localhost"}, False),  # the port left out
        ({"tcp": "localhost:"}, False),
        ({"tcp": ":6379"}, False),
        ({"tcp": "70000"}, False),
        ({"tcp": "{port}/tcp"}, False),
        ({"http": "http://127.0.0.1:{port}/healthz"}, True),
        ({"http": "https://{host}:{port}"}, True),
        ({"http": "localhost:{port}/healthz"}, False),  # no scheme
        ({"http": "/healthz"}, False),
        ({"http": "ftp://127.0.0.1:{port}/"}, False),
        ({"http": "http://127.0.0.1:{port}x/"}, False),
    ],
)
def test_a_probe_target_that_no_check_can_reach_is_refused(
    probe: dict[str, str], good: bool
) -> None:
    # Such a probe failed every check until its deadline, a minute after the start.
    doc = services(a=svc(ports={"main": 0}, health=probe))
    if good:
        load_config(doc, environ={})
        return
    exc = error(doc)
    kind, target = next(iter(probe.items()))
    assert exc.path == f"services.a.health.{kind}"
    assert str(exc).endswith(f"got {target!r}")


def test_log_ready_needs_a_pattern_or_a_log_probe() -> None:
    def doc(dep: dict[str, Any], **b: Any) -> dict[str, Any]:
        return services(a=svc(depends_on={"b": dep}), b=svc(**b))

    exc = error(doc({"condition": "log_ready"}))
    assert str(exc) == (
        "<mapping>: services.a.depends_on.b: "
        "condition 'log_ready' needs a pattern (or a log probe on 'b')"
    )
    exc = error(doc({"condition": "log_ready"}, health={"tcp": "127.0.0.1:1"}))
    assert exc.path == "services.a.depends_on.b"
    load_config(doc({"condition": "log_ready", "pattern": "ready"}), environ={})
    load_config(doc({"condition": "log_ready"}, health={"log": "ready"}), environ={})
    exc = error(doc({"condition": "healthy", "pattern": "ready"}))
    assert str(exc).endswith(
        "services.a.depends_on.b.pattern: applies only to condition 'log_ready'"
    )


def test_shell_string_needs_shell_true() -> None:
    exc = error(services(a={"command": "redis-server --port {port}", "ports": {"main": 0}}))
    assert exc.path == "services.a.command"
    assert "runs through a shell only with shell = true" in str(exc)
    config = load_config(
        services(a={"command": "echo $$ {port}", "shell": True, "ports": {"main": 0}}),
        environ={},
    )
    assert config.services["a"].command == "echo $$ {port}"


def test_probe_command_is_a_list_only() -> None:
    # A probe has no shell switch: a string would be split into characters.
    exc = error(services(a=svc(health={"command": "redis-cli ping"})))
    assert str(exc) == (
        "<mapping>: services.a.health.command: "
        "expected a list of strings, got 'redis-cli ping' (string)"
    )


def test_command_is_required_with_the_local_backend_only() -> None:
    exc = error(services(a={"image": "redis:7"}))
    assert str(exc) == "<mapping>: services.a.command: required with the local backend"
    load_config({"infra": {"backend": "docker"}, **services(a={"image": "redis:7"})}, environ={})


@pytest.mark.parametrize("name", ["a.b", "../up", "", "a b", "-x"])
def test_service_names_are_checked(name: str) -> None:
    exc = error(services(**{name: svc()}))
    assert exc.path == f"services.{name}"
    assert f"{name!r} is not a valid service name" in str(exc)


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"services": 5}, "services"),
        ({"infra": []}, "infra"),
        (services(a="redis"), "services.a"),
        (services(a=svc(health="tcp")), "services.a.health"),
        (services(a=svc(env=["A=1"])), "services.a.env"),
        (services(a=svc(ports=8080)), "services.a.ports"),
        (services(a=svc(start_backoff=1.5)), "services.a.start_backoff"),
        (services(a=svc(depends_on={"b": "healthy"}), b=svc()), "services.a.depends_on.b"),
    ],
)
def test_a_table_where_a_table_belongs(doc: dict[str, Any], path: str) -> None:
    exc = error(doc)
    assert exc.path == path
    assert ": expected a table, got " in str(exc)


def test_an_array_item_is_named_by_its_index_in_brackets() -> None:
    # It read "infra.gpus.1", as if 1 were a key; placeholders and compose say [1].
    exc = error({"infra": {"gpus": [0, "x"]}, **services(a=svc(volumes=["a:/b", 5]))})
    assert exc.path == "infra.gpus[1]"
    assert str(exc) == (
        "<mapping>: infra.gpus[1]: expected an integer, got 'x' (string) "
        "(and 1 more: services.a.volumes[1]: expected a string, got 5 (integer))"
    )
    env = error({}, environ={"DSPY_INFRA_GPUS": '[0, "x"]'})
    assert (env.source, env.path) == ("environment variable DSPY_INFRA_GPUS", "infra.gpus[1]")


@pytest.mark.parametrize(
    ("doc", "path", "got"),
    [
        ({"infra": {"gpus": 0}}, "infra.gpus", "0 (integer)"),
        ({"infra": {"gpus": "01"}}, "infra.gpus", "'01' (string)"),
        ({"infra": {"gpus": {"0": 1}}}, "infra.gpus", "{'0': 1} (table)"),
        (services(a=svc(volumes="/data:/data")), "services.a.volumes", "'/data:/data' (string)"),
        (services(a=svc(volumes={"/a:/b": True})), "services.a.volumes", "{'/a:/b': True} (table)"),
        ({"handlers": {"h": {"image": "x", "volumes": "/d:/d"}}}, "handlers.h.volumes", "'/d:/d'"),
    ],
)
def test_an_array_where_an_array_belongs(doc: dict[str, Any], path: str, got: str) -> None:
    # A string was split into its characters ("'/' is not a volume"), a table read
    # as its keys (volumes = { "/a:/b" = true } loaded), a number failed with
    # "'int' object is not iterable".
    exc = error(doc)
    assert exc.path == path
    assert ": expected an array, got " + got in str(exc)
    env = error({}, environ={"DSPY_INFRA_GPUS": "0,1"})
    assert str(env) == (
        "environment variable DSPY_INFRA_GPUS: infra.gpus: expected an array, got '0,1' (string)"
    )


@pytest.mark.parametrize("key", ["state_dir", "compose"])
def test_an_empty_path_is_refused(tmp_path: Path, key: str) -> None:
    # Path("") is ".": an empty state_dir put the store beside the file without a
    # word, and an empty compose read the directory ('.: cannot read: Is a directory').
    path = write(tmp_path / "dspy-infra.toml", f'[infra]\n{key} = ""\n')
    exc = error(path)
    assert str(exc) == f"{path}: infra.{key}: expected a path, got '' (string)"
    variable = f"DSPY_INFRA_{key.upper()}"
    exc = error(write(tmp_path / "other.toml", ""), environ={variable: ""})
    assert (exc.source, exc.path) == (f"environment variable {variable}", f"infra.{key}")


def test_huge_numbers_are_clear() -> None:
    exc = error(services(a=svc(health={"log": "x", "interval": 10**400})))
    assert str(exc) == (
        "<mapping>: services.a.health.interval: expected a number, got an integer too large"
    )
    # A huge count is just a large count (where nothing holds that many).
    config = load_config({"infra": {"event_buffer": 10**30}}, environ={})
    assert config.infra.event_buffer == 10**30


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        (services(a=svc(cpus=float("inf"))), "services.a.cpus"),
        (
            {"classes": {"s": {"runner": "slurm", "time_limit": float("inf")}}},
            "classes.s.time_limit",
        ),
        ({"classes": {"s": {"runner": "slurm", "cpus": float("inf")}}}, "classes.s.cpus"),
    ],
)
def test_an_infinite_value_that_is_passed_on_as_an_integer_is_refused(
    doc: dict[str, Any], path: str
) -> None:
    # TOML's inf passed "> 0", then failed at start with an OverflowError:
    # int(inf * 1e9) for Docker's NanoCpus, math.ceil(inf / 60) for sbatch --time,
    # math.ceil(inf) for its --cpus-per-task (every task of the class failed so).
    exc = error(doc)
    assert exc.path == path
    assert str(exc).endswith(": expected a finite number, got inf")


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        (services(a=svc(memory_mb=5)), "services.a.memory_mb"),
        ({"classes": {"d": {"runner": "docker", "memory_mb": 5}}}, "classes.d.memory_mb"),
    ],
)
def test_a_memory_limit_below_docker_s_minimum_is_refused(doc: dict[str, Any], path: str) -> None:
    # Docker refuses a limit under 6 MB ("Minimum memory limit allowed is
    # 6MB"): the service failed its start, every task of the class its run.
    exc = error(doc)
    assert exc.path == path
    assert str(exc).endswith(": expected at least 6 (Docker's smallest memory limit), got 5")


def test_a_small_memory_need_of_a_class_not_run_by_docker_loads() -> None:
    # memory_mb is then what a task holds of the machine, and 1 MB is fine.
    doc = {"classes": {"p": {"runner": "process", "memory_mb": 1}}}
    assert load_config(doc, environ={}).classes["p"].memory_mb == 1
    assert load_config(services(a=svc(memory_mb=6)), environ={}).services["a"].memory_mb == 6


# --- paths -------------------------------------------------------------------------


def test_relative_paths_are_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    path = write(
        conf / "dspy-infra.toml",
        '[infra]\nstate_dir = "../state"\n'
        '[services.a]\ncommand = ["a"]\ncwd = "work/dir"\n'
        '[services.b]\ncommand = ["b"]\ncwd = "/abs/dir"\n'
        '[services.c]\ncommand = ["c"]\ncwd = "{service_dir}/x"\n',
    )
    monkeypatch.chdir(tmp_path / "..")
    config = load_config(path, environ={})
    assert config.infra.state_dir == tmp_path / "state"
    assert config.services["a"].cwd == str(conf / "work" / "dir")
    assert config.services["b"].cwd == "/abs/dir"
    assert config.services["c"].cwd == "{service_dir}/x"  # filled in at start


def test_a_relative_cwd_with_placeholders_is_relative_to_the_file_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It was left relative, so the service ran in work/NAME of wherever the program ran.
    conf = tmp_path / "conf {x}"  # braces in the directory are literal, not placeholders
    path = write(
        conf / "dspy-infra.toml",
        '[services.a]\ncommand = ["a"]\ncwd = "work/{name}"\n'
        '[services.b]\ncommand = ["b"]\ncwd = "{state_dir}/b"\n'
        '[services.c]\ncommand = ["c"]\ncwd = "plain"\n'
        '[handlers.h]\ncommand = ["h"]\ncwd = "runs/{literal}"\n',  # a handler's is no template
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(path, environ={})
    assert config.services["a"].cwd == str(tmp_path / "conf {{x}}" / "work") + "/{name}"
    assert config.services["b"].cwd == "{state_dir}/b"  # absolute once filled in
    assert config.services["c"].cwd == str(tmp_path / "conf {{x}}" / "plain")
    assert config.handlers["h"].cwd == str(conf / "runs" / "{literal}")


def test_mapping_paths_are_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config({"infra": {"state_dir": "s"}, **services(a=svc(cwd="w"))}, environ={})
    assert config.infra.state_dir == tmp_path / "s"
    assert config.services["a"].cwd == str(tmp_path / "w")


# --- bad input changes nothing -----------------------------------------------------


BAD_DOCUMENTS = [
    '[services.a]\ncommand = ["a"]\nrestart = "sometimes"\n',
    '[services.a]\ncommand = ["a", "{services.b.port}"]\n',
    '[services.a]\ncommand = ["a"]\ndepends_on = ["a"]\n',
    "[services.a\n",
]


@pytest.mark.parametrize("text", BAD_DOCUMENTS)
def test_bad_input_changes_nothing(tmp_path: Path, text: str) -> None:
    state = tmp_path / "state"
    path = write(tmp_path / "dspy-infra.toml", f'[infra]\nstate_dir = "{state}"\n' + text)
    environ = {"DSPY_INFRA_PROJECT": "p"}
    before = sorted(tmp_path.rglob("*"))
    error(path, environ=environ)
    assert sorted(tmp_path.rglob("*")) == before
    assert path.read_text() == f'[infra]\nstate_dir = "{state}"\n' + text
    assert environ == {"DSPY_INFRA_PROJECT": "p"}


def test_loading_never_writes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    doc = {"infra": {"state_dir": str(state)}, **services(a=svc(cwd="w"))}
    load_config(doc, environ={})
    assert not state.exists()
    assert list(tmp_path.iterdir()) == []


def test_the_callers_mappings_are_not_changed() -> None:
    doc = services(a=svc(health={"log": "x"}))
    overrides = {"services": {"a": {"env": {"A": "1"}}}, "services__a__env__B": "2"}
    load_config(doc, environ={"DSPY_INFRA_SERVICES__A__RESTART": "always"}, overrides=overrides)
    assert doc == services(a=svc(health={"log": "x"}))
    assert overrides == {"services": {"a": {"env": {"A": "1"}}}, "services__a__env__B": "2"}


# --- dump_config -------------------------------------------------------------------


def test_dump_config_round_trips_a_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "dspy-infra.toml", REDIS), environ={})
    text = dump_config(config)
    assert f'state_dir = "{tmp_path / "state"}"' in text
    dumped = write(tmp_path / "dumped" / "dspy-infra.toml", text)
    again = load_config(dumped, environ={})
    assert again == config
    assert again.source == str(dumped)
    assert tomllib.loads(text)["services"]["redis"]["ports"] == {"main": 0}


def test_a_partial_backoff_keeps_its_own_defaults() -> None:
    config = load_config(
        services(a=svc(start_backoff={"max": 1.0}, restart_backoff={"factor": 3})), environ={}
    )
    a = config.services["a"]
    assert (a.start_backoff.initial, a.start_backoff.max) == (0.2, 1.0)
    assert (a.restart_backoff.initial, a.restart_backoff.factor) == (0.1, 3.0)
    assert load_config(services(a=svc()), environ={}).services["a"].start_backoff.initial == 0.2


# --- container keys ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"volumes": ["data"]},
            "<mapping>: services.web.volumes: 'data' is not a volume: expected "
            "'SOURCE:/container/path'",
        ),
        (
            {"volumes": ["./data:relative"]},
            "<mapping>: services.web.volumes: './data:relative' is not a volume",
        ),
        (
            {"volumes": ["/data:/data:rx"]},
            "<mapping>: services.web.volumes: '/data:/data:rx' is not a volume",
        ),
        (
            {"ports": {"main": 0}, "container_ports": {"http": 80}},
            "<mapping>: services.web.container_ports.http: names no port in ports (ports: main)",
        ),
        (
            {"ports": {"main": 0}, "container_ports": {"main": 0}},
            "<mapping>: services.web.container_ports.main: 0 is not a port number (1 to 65535)",
        ),
        ({"pull": "sometimes"}, "<mapping>: services.web.pull: expected one of"),
    ],
)
def test_bad_container_keys_are_refused_naming_the_key(
    fields: dict[str, Any], expected: str
) -> None:
    doc = {"infra": {"backend": "docker"}, "services": {"web": {"image": "img", **fields}}}
    before = repr(doc)
    assert str(error(doc)).startswith(expected)
    assert repr(doc) == before, "loading changed its input"


def test_the_docker_backend_needs_an_image() -> None:
    doc = {"infra": {"backend": "docker"}, "services": {"web": svc()}}
    assert str(error(doc)) == ("<mapping>: services.web.image: required with the docker backend")


def test_volume_sources_are_relative_to_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "dspy-infra.toml",
        '[infra]\nbackend = "docker"\n[services.web]\nimage = "img"\n'
        'volumes = ["./data:/data:ro", "cache:/cache", "/abs:/abs"]\n',
    )
    volumes = load_config(path, environ={}).services["web"].volumes
    assert volumes == (f"{tmp_path / 'data'}:/data:ro", "cache:/cache", "/abs:/abs")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        (
            "dspy-infra.toml",
            '[infra]\nbackend = "docker"\n[services.web]\nimage = "img"\n'
            'volumes = ["~/data:/data", "~:/home:ro"]\n',
        ),
        (
            "docker-compose.yml",
            "services:\n  web:\n    image: img\n    volumes: ['~/data:/data', '~:/home:ro']\n",
        ),
    ],
    ids=["toml", "compose"],
)
def test_a_volume_source_starting_with_a_tilde_is_in_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, text: str
) -> None:
    # As docker compose reads it: the TOML file made "~/data" a directory
    # named "~" beside the file, and "~" a volume name that Docker refuses.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    volumes = load_config(write(tmp_path / name, text), environ={}).services["web"].volumes
    assert volumes == (f"{tmp_path / 'home' / 'data'}:/data", f"{tmp_path / 'home'}:/home:ro")


@pytest.mark.parametrize(
    ("name", "text", "path"),
    [
        (
            "dspy-infra.toml",
            '[handlers.h]\nimage = "img"\nvolumes = ["~nosuchuser/data:/data"]\n',
            "handlers.h.volumes",
        ),
        (
            "docker-compose.yml",
            "services:\n  web:\n    image: img\n    volumes: ['~nosuchuser/data:/data']\n",
            "services.web.volumes[0]",
        ),
        (
            "docker-compose.yml",
            "services:\n  web:\n    image: img\n    env_file: ~nosuchuser/.env\n",
            "services.web.env_file",
        ),
    ],
    ids=["toml", "compose", "compose env_file"],
)
def test_a_home_directory_that_cannot_be_found_is_refused_naming_the_key(
    tmp_path: Path, name: str, text: str, path: str
) -> None:
    # Path.expanduser raised a bare RuntimeError("Could not determine home directory.").
    file = write(tmp_path / name, text)
    assert str(error(file)) == (
        f"{file}: {path}: cannot expand '~nosuchuser': no such user, or no home directory"
    )


def test_other_paths_starting_with_a_tilde_are_in_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As a shell reads them, and volumes are: "~/.cache/dspy-infra" was a
    # directory named "~" beside the file.
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    write(home / "compose.yml", "services: {}\n")
    cfg = load_config(
        write(
            tmp_path / "conf" / "dspy-infra.toml",
            '[infra]\nbackend = "local"\nstate_dir = "~/state"\ncompose = "~/compose.yml"\n'
            '[handlers.h]\ncommand = ["true"]\ncwd = "~/work"\n'
            '[services.a]\ncommand = ["true"]\ncwd = "~/a"\n'
            '[services.b]\ncommand = ["true"]\ncwd = "~/b/{port}"\nports = {port = 0}\n',
        ),
        environ={},
    )
    assert cfg.infra.state_dir == home / "state"
    assert cfg.infra.compose == home / "compose.yml"
    assert cfg.handlers["h"].cwd == str(home / "work")
    assert cfg.services["a"].cwd == str(home / "a")
    assert cfg.services["b"].cwd == f"{home}/b/{{port}}"


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('[infra]\nstate_dir = "~nosuchuser/state"\n', "infra.state_dir"),
        ('[handlers.h]\ncommand = ["true"]\ncwd = "~nosuchuser/w"\n', "handlers.h.cwd"),
        ('[services.s]\ncommand = ["true"]\ncwd = "~nosuchuser/w"\n', "services.s.cwd"),
        ('[infra]\ncompose = "~nosuchuser/compose.yml"\n', "infra.compose"),
    ],
)
def test_a_path_in_a_home_directory_that_cannot_be_found_is_refused(
    tmp_path: Path, text: str, path: str
) -> None:
    file = write(tmp_path / "dspy-infra.toml", text)
    assert str(error(file)) == (
        f"{file}: {path}: cannot expand '~nosuchuser': no such user, or no home directory"
    )


def test_a_server_address_that_is_not_host_port_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "dspy-infra.toml"
    path.write_text('[server]\naddress = "localhost"\n')
    with pytest.raises(ConfigError, match=r"server\.address"):
        load_config(path)
    path.write_text('[server]\naddress = "0.0.0.0:50052"\n')
    assert load_config(path).server.address == "0.0.0.0:50052"  # TLS and a token: checked by serve


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"infra": {"event_history": 10**30}}, "infra.event_history"),
        ({"services": {"s": {"command": ["true"], "log_lines": 10**30}}}, "services.s.log_lines"),
    ],
)
def test_counts_kept_in_memory_beyond_a_deque_are_refused(doc: dict[str, Any], path: str) -> None:
    # They used to load, then fail the start with OverflowError.
    with pytest.raises(ConfigError, match=rf"{path}: expected a number <="):
        load_config(doc)


def test_a_byte_order_mark_before_the_toml_is_skipped(tmp_path: Path) -> None:
    # As editors on Windows write it: not a TOML statement, but no error of the user's.
    path = tmp_path / "dspy-infra.toml"
    path.write_bytes(b"\xef\xbb\xbf" + b'[infra]\nstate_dir = "state"\n')
    assert load_config(path).infra.state_dir == (tmp_path / "state").resolve()


@pytest.mark.parametrize("table", ["services.a", "handlers.a"])
def test_an_empty_cwd_is_refused(tmp_path: Path, table: str) -> None:
    # Set empty (meant as unset), it would have run in the file's directory.
    file = write(tmp_path / "dspy-infra.toml", f'[{table}]\ncommand = ["true"]\ncwd = ""\n')
    assert str(error(file)) == f"{file}: {table}.cwd: expected a path, got ''"


@pytest.mark.parametrize("table", ["services.a", "handlers.a"])
@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ('{ "A=B" = "x" }', "'A=B' cannot be an environment variable's name (it has '=')"),
        ('{ "" = "x" }', "'' cannot be an environment variable's name (it is empty)"),
        (
            '{ "A\\u0000" = "x" }',
            "'A\\x00' cannot be an environment variable's name (it has a NUL)",
        ),
        ('{ A = "x\\u0000y" }', "the value of 'A' cannot be passed to a process (it has a NUL)"),
    ],
    ids=["equals-sign", "empty", "nul-in-name", "nul-in-value"],
)
def test_an_environment_a_process_cannot_have_is_refused(
    tmp_path: Path, table: str, env: str, problem: str
) -> None:
    # It used to load, then fail every start or attempt with a bare
    # "ValueError: illegal environment variable name" (or "embedded null
    # byte"), naming no variable; Docker took the name up to its '='.
    file = write(tmp_path / "dspy-infra.toml", f'[{table}]\ncommand = ["true"]\nenv = {env}\n')
    assert str(error(file)) == f"{file}: {table}.env: {problem}"


@pytest.mark.parametrize("cwd", ["app", "./app", "~/app"])
def test_a_docker_handlers_cwd_must_be_a_path_inside_the_container(
    tmp_path: Path, cwd: str
) -> None:
    # Made a path on this machine, Docker created it empty in the container,
    # and the command ran there without a word.
    file = write(tmp_path / "dspy-infra.toml", f'[handlers.a]\nimage = "alpine"\ncwd = "{cwd}"\n')
    assert str(error(file)) == (
        f"{file}: handlers.a.cwd: a path inside the container (the handler has an image) "
        f"must be absolute, got {cwd!r}"
    )
    file.write_text('[handlers.a]\nimage = "alpine"\ncwd = "/srv"\n')
    assert load_config(file).handlers["a"].cwd == "/srv"
