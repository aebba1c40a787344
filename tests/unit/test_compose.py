"""Compose files as configuration: each mapping, the one warning for what is skipped,
errors that name file and key path, ``[infra] compose`` under TOML, profiles and
``${VAR}``."""

from __future__ import annotations

import json
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from attrs import evolve
from hypothesis import given, settings
from hypothesis import strategies as st

from dspy_infra import (
    ComposeWarning,
    Config,
    ConfigError,
    Dependency,
    Probe,
    ServiceConfig,
    load_config,
)
from dspy_infra.config.model import Condition


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def load(path: Path, **environ: str) -> Config:
    return load_config(path, environ=environ)


def web(tmp_path: Path, body: str, **environ: str) -> ServiceConfig:
    """Service ``web`` of a compose file holding ``body`` (YAML, under ``web:``)."""
    text = "services:\n  web:\n" + textwrap.indent(textwrap.dedent(body), "    ")
    return load(write(tmp_path / "docker-compose.yml", text), **environ).services["web"]


def error(path: Path, **environ: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(path, **environ)
    return info.value


def warned(path: Path, **environ: str) -> tuple[Config, str]:
    """The configuration and the text of the one ComposeWarning that loading gave."""
    with pytest.warns(ComposeWarning) as record:
        config = load(path, **environ)
    assert len(record) == 1, [str(w.message) for w in record]
    return config, str(record[0].message)


# --- the file itself ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["docker-compose.yml", "compose.yaml"])
def test_a_compose_file_alone_is_a_docker_configuration(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, "name: shop\nservices:\n  web:\n    image: nginx\n")
    config = load(path)
    assert config.infra.backend == "docker"
    assert config.infra.project == "shop"
    assert config.source == str(path)
    assert config.services == {"web": ServiceConfig(image="nginx")}
    # Relative paths of the configuration are relative to the compose file.
    assert config.infra.state_dir == tmp_path / ".dspy-infra"


def test_the_environment_still_overrides_a_compose_file(tmp_path: Path) -> None:
    path = write(tmp_path / "docker-compose.yml", "services:\n  web:\n    image: nginx\n")
    config = load(path, DSPY_INFRA_SERVICES__WEB__RESTART="always")
    assert config.services["web"].restart == "always"


def test_compose_values_are_read_as_yaml_1_2(tmp_path: Path) -> None:
    # YAML 1.1 reads 22:22 as 1342 (base 60) and no/yes as booleans; compose does not.
    svc = web(
        tmp_path,
        """\
        image: sshd
        ports: [22:22]
        restart: no
        environment: {A: yes, B: on, C: 010, D: 1.5, E: true}
        """,
    )
    assert (svc.ports, svc.container_ports) == ({"22": 22}, {"22": 22})
    assert svc.restart == "no"
    assert svc.env == {"A": "yes", "B": "on", "C": "8", "D": "1.5", "E": "true"}


def test_missing_pyyaml_says_which_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "docker-compose.yml", "services: {}\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    assert str(error(path)) == (
        f"{path}: reading a compose file needs PyYAML: pip install 'dspy-infra[docker]'"
    )


# --- image, command, entrypoint -----------------------------------------------------


def test_command_and_entrypoint(tmp_path: Path) -> None:
    svc = web(
        tmp_path,
        """\
        image: redis:7
        command: redis-server --save "" --appendonly 'no'
        entrypoint: docker-entrypoint.sh --verbose
        """,
    )
    assert svc.image == "redis:7"
    # Compose splits a string into words and runs no shell: neither do we.
    assert svc.command == ("redis-server", "--save", "", "--appendonly", "no")
    assert svc.shell is False
    assert svc.entrypoint == ("docker-entrypoint.sh", "--verbose")


def test_command_and_entrypoint_as_lists(tmp_path: Path) -> None:
    svc = web(
        tmp_path,
        """\
        image: busybox
        command: ["sleep", 10]
        entrypoint: ["/bin/sh", "-c"]
        """,
    )
    assert svc.command == ("sleep", "10")
    assert svc.entrypoint == ("/bin/sh", "-c")


def test_braces_in_compose_values_are_literal(tmp_path: Path) -> None:
    # Compose has no {placeholders}: a brace is a brace (escaped for ours).
    svc = web(
        tmp_path,
        """\
        image: app
        command: ["echo", "{port}", "$${x}"]
        environment: {JSON: '{"a": 1}'}
        """,
    )
    assert svc.command == ("echo", "{{port}}", "${{x}}")
    assert svc.env == {"JSON": '{{"a": 1}}'}


# --- environment and env_file -------------------------------------------------------


def test_environment_as_a_list(tmp_path: Path) -> None:
    svc = web(
        tmp_path,
        """\
        image: app
        environment: ["A=1", "B=x=y", "EMPTY=", "FROM_HOST", "UNSET"]
        """,
        FROM_HOST="host value",
    )
    assert svc.env == {"A": "1", "B": "x=y", "EMPTY": "", "FROM_HOST": "host value"}


def test_environment_as_a_mapping(tmp_path: Path) -> None:
    svc = web(
        tmp_path,
        """\
        image: app
        environment: {N: 5, F: 0.5, T: true, S: text, FROM_HOST: null, UNSET: }
        """,
        FROM_HOST="host value",
    )
    assert svc.env == {"N": "5", "F": "0.5", "T": "true", "S": "text", "FROM_HOST": "host value"}


def test_env_files_relative_to_the_compose_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(
        tmp_path / "deploy" / "common.env",
        """\
        # shared settings

        A=from common
        B = spaced
        export C="quoted # not a comment"
        D=plain # a comment
        F="quoted, then" # a comment
        """,
    )
    write(tmp_path / "deploy" / "web.env", "A=from web\nE='single'\n")
    path = write(
        tmp_path / "deploy" / "docker-compose.yml",
        """\
        services:
          web:
            image: app
            env_file: [common.env, web.env, {path: missing.env, required: false}]
            environment: {E: from environment}
          db:
            image: db
            env_file: web.env
        """,
    )
    monkeypatch.chdir(tmp_path)  # elsewhere than the compose file
    config = load(path.relative_to(tmp_path))
    assert config.services["web"].env == {
        "A": "from web",
        "B": "spaced",
        "C": "quoted # not a comment",
        "D": "plain",
        "E": "from environment",
        "F": "quoted, then",
    }
    assert config.services["db"].env == {"A": "from web", "E": "single"}


# As compose's documentation of env files has it: a value unquoted or in
# double quotes has its ${VAR} substituted (from the environment, then the
# lines above); one in single quotes is literal; a backslash escapes a quote,
# and in double quotes \n, \r, \t and \\ are escapes; quotes may hold line
# breaks. Read naively, a JSON value kept its quotes and backslashes, and
# DATA=${BASE}/data reached the container, or a volume, as it was written.
ENV_FILE_SYNTAX = r"""
BASE=/srv
DATA=${BASE}/data
QUOTED_DATA="${BASE}/quoted"
FROM_HOST=$HOST_DIR/cache
LITERAL='${BASE}'
JSON="{\"a\": [1, 2]}"
ESCAPES="tab\tnew\nline\\"
SINGLE='Let\'s go!'
MULTI="first
second" # a comment
AFTER=still read
"""
ENV_FILE_VALUES = {
    "BASE": "/srv",
    "DATA": "/srv/data",
    "QUOTED_DATA": "/srv/quoted",
    "FROM_HOST": "/home/u/cache",
    "LITERAL": "${BASE}",
    "JSON": '{"a": [1, 2]}',
    "ESCAPES": "tab\tnew\nline\\",
    "SINGLE": "Let's go!",
    "MULTI": "first\nsecond",
    "AFTER": "still read",
}


def test_env_files_are_read_with_compose_syntax(tmp_path: Path) -> None:
    (tmp_path / "app.env").write_text(ENV_FILE_SYNTAX)
    svc = web(tmp_path, "image: app\nenv_file: app.env\n", HOST_DIR="/home/u")
    # Braces are escaped for our placeholders: "{{" reads as "{".
    assert {k: v.replace("{{", "{").replace("}}", "}") for k, v in svc.env.items()} == (
        ENV_FILE_VALUES
    )


def test_the_dotenv_file_is_read_with_compose_syntax(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(ENV_FILE_SYNTAX)
    environment = "\n".join(f"  {key}: ${{{key}}}" for key in ENV_FILE_VALUES)
    svc = web(tmp_path, f"image: app\nenvironment:\n{environment}\n", HOST_DIR="/home/u")
    assert {k: v.replace("{{", "{").replace("}}", "}") for k, v in svc.env.items()} == (
        ENV_FILE_VALUES
    )
    volume = web(tmp_path, "image: app\nvolumes: ['${DATA}:/data']\n", HOST_DIR="/h").volumes
    assert volume == ("/srv/data:/data",)


@pytest.mark.parametrize(
    ("env_file", "content", "where", "message"),
    [
        ("missing.env", None, "services.web.env_file", "missing.env: file not found"),
        ("[ok.env, bad.env]", None, "services.web.env_file[1]", "bad.env: file not found"),
        ("bad.env", "A=1\nnot a pair\n", "services.web.env_file", "line 2: expected KEY=VALUE"),
    ],
)
def test_bad_env_files_name_the_key(
    tmp_path: Path, env_file: str, content: str | None, where: str, message: str
) -> None:
    write(tmp_path / "ok.env", "A=1\n")
    if content is not None:
        write(tmp_path / "bad.env", content)
    path = write(
        tmp_path / "docker-compose.yml",
        f"services:\n  web:\n    image: app\n    env_file: {env_file}\n",
    )
    exc = error(path)
    assert (exc.source, exc.path) == (str(path), where)
    assert message in str(exc)


# --- ports ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "host", "container"),
    [
        ('"8080:80"', 8080, 80),
        ('"127.0.0.1:8080:80"', 8080, 80),
        ('"127.0.0.1::80"', 0, 80),
        ('"[::1]:8080:80"', 8080, 80),
        ('"80"', 0, 80),
        ('"8080:80/tcp"', 8080, 80),
        ("80", 0, 80),
        ("{target: 80, published: 8080}", 8080, 80),
        ('{target: 80, published: "8080", host_ip: 127.0.0.1, protocol: tcp}', 8080, 80),
        ("{target: 80}", 0, 80),
        # Integers as compose reads them: 08080 is not a (bad) octal but 8080.
        ("{target: 080, published: 08080}", 8080, 80),
        ("{target: 0x50, published: 0o17620}", 8080, 80),
    ],
)
def test_ports(tmp_path: Path, spec: str, host: int, container: int) -> None:
    svc = web(tmp_path, f"image: nginx\nports:\n  - {spec}\n")
    assert svc.ports == {str(container): host}
    assert svc.container_ports == {str(container): container}


def test_ports_are_named_by_their_container_port(tmp_path: Path) -> None:
    path = write(
        tmp_path / "docker-compose.yml",
        """\
        services:
          web:
            image: nginx
            ports: ["8080:80", "8443:443"]
          check:
            image: curl
            command: ["curl", "http://web:80"]
            depends_on: [web]
        """,
    )
    config = load(path)
    assert config.services["web"].ports == {"80": 8080, "443": 8443}
    # So a TOML table or a dependant can say {services.web.ports.80}.
    dependant = {"command": ["curl", "http://{services.web.host}:{services.web.ports.80}"]}
    config = load_config(path, overrides={"services__check": dependant}, environ={})
    assert config.services["check"].command == tuple(dependant["command"])


def test_udp_ports_and_ranges_are_skipped_and_named(tmp_path: Path) -> None:
    path = write(
        tmp_path / "docker-compose.yml",
        """\
        services:
          dns:
            image: dns
            ports:
              - "53:53/udp"
              - "8000-8010:8000-8010"
              - {target: 5353, protocol: udp}
              - "9000:80"
              - "9001:80"
              - "8080:8080"
        """,
    )
    config, message = warned(path)
    assert config.services["dns"].ports == {"80": 9000, "8080": 8080}
    assert message == (
        f"{path}: ignored unsupported keys: dns.ports[0] (udp), dns.ports[1] (port range), "
        "dns.ports[2] (udp), dns.ports[4] (container port 80 is already published)"
    )


IPS = st.sampled_from([None, "127.0.0.1", "0.0.0.0", "[::1]"])


@settings(max_examples=100, deadline=None)
@given(
    host=st.none() | st.integers(0, 65535),
    container=st.integers(1, 65535),
    ip=IPS,
    tcp=st.booleans(),
)
def test_port_specs_round_trip(
    tmp_path_factory: pytest.TempPathFactory,
    host: int | None,
    container: int,
    ip: str | None,
    tcp: bool,
) -> None:
    spec = str(container)
    if host is not None or ip is not None:
        spec = f"{'' if host is None else host}:{spec}"
    if ip is not None:
        spec = f"{ip}:{spec}"
    if tcp:
        spec += "/tcp"
    path = tmp_path_factory.mktemp("ports") / "docker-compose.yml"
    path.write_text(f"services:\n  web:\n    image: x\n    ports: [{json.dumps(spec)}]\n")
    svc = load(path).services["web"]
    assert svc.ports == {str(container): host or 0}
    assert svc.container_ports == {str(container): container}


# --- volumes --------------------------------------------------------------------------


def test_volumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(
        tmp_path / "app" / "docker-compose.yml",
        """\
        services:
          web:
            image: app
            volumes:
              - ./data:/data
              - ../shared:/shared:ro
              - /abs/path:/x:ro
              - ~/cache:/cache:rw
              - named:/named
              - renamed:/renamed
              - {type: bind, source: conf, target: /conf, read_only: true}
              - {type: volume, source: named, target: /again}
        volumes:
          named:
          renamed: {name: real-name, external: true}
        """,
    )
    monkeypatch.chdir(tmp_path)
    svc = load(Path("app/docker-compose.yml")).services["web"]
    app = path.parent
    assert svc.volumes == (
        f"{app / 'data'}:/data",
        f"{tmp_path / 'shared'}:/shared:ro",
        "/abs/path:/x:ro",
        f"{tmp_path / 'home' / 'cache'}:/cache",
        "named:/named",
        "real-name:/renamed",
        f"{app / 'conf'}:/conf:ro",
        "named:/again",
    )


def test_volumes_without_a_counterpart_are_skipped_and_named(tmp_path: Path) -> None:
    path = write(
        tmp_path / "docker-compose.yml",
        """\
        services:
          web:
            image: app
            volumes:
              - /anonymous
              - {type: volume, target: /also-anonymous}
              - {type: tmpfs, target: /tmp}
              - ./data:/data:z
        volumes:
          data: {driver: local}
        """,
    )
    config, message = warned(path)
    assert config.services["web"].volumes == (f"{tmp_path / 'data'}:/data",)
    assert message == (
        f"{path}: ignored unsupported keys: volumes.data.driver, "
        "web.volumes[0] (anonymous volume), web.volumes[1] (anonymous volume), "
        "web.volumes[2] (type tmpfs), web.volumes[3] (option z)"
    )


# --- depends_on -----------------------------------------------------------------------


def test_depends_on_as_a_list_waits_for_the_start(tmp_path: Path) -> None:
    path = write(
        tmp_path / "docker-compose.yml",
        """\
        services:
          db: {image: postgres}
          web: {image: app, depends_on: [db]}
        """,
    )
    assert load(path).services["web"].depends_on == {"db": Dependency(condition="started")}


@pytest.mark.parametrize(
    ("compose", "ours"),
    [
        ("service_started", "started"),
        ("service_healthy", "healthy"),
        ("service_completed_successfully", "completed_successfully"),
    ],
)
def test_depends_on_conditions(tmp_path: Path, compose: str, ours: Condition) -> None:
    path = write(
        tmp_path / "docker-compose.yml",
        f"""\
        services:
          db: {{image: postgres}}
          web:
            image: app
            depends_on: {{db: {{condition: {compose}}}}}
        """,
    )
    assert load(path).services["web"].depends_on == {"db": Dependency(condition=ours)}


# --- healthcheck ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("test", "command"),
    [
        ('["CMD", "redis-cli", "ping"]', ("redis-cli", "ping")),
        (
            '["CMD-SHELL", "curl -f localhost || exit 1"]',
            ("/bin/sh", "-c", "curl -f localhost || exit 1"),
        ),
        ("curl -f localhost", ("/bin/sh", "-c", "curl -f localhost")),
    ],
)
def test_healthcheck_tests(tmp_path: Path, test: str, command: tuple[str, ...]) -> None:
    svc = web(tmp_path, f"image: app\nhealthcheck:\n  test: {test}\n")
    assert svc.health is not None
    assert svc.health.command == command


def test_healthcheck_timing_probes_fast_at_start_and_at_interval_after(tmp_path: Path) -> None:
    svc = web(
        tmp_path,
        """\
        image: app
        healthcheck:
          test: ["CMD", "true"]
          interval: 10s
          timeout: 2s
          retries: 5
          start_period: 1m
          start_interval: 1s
        """,
    )
    assert svc.health == Probe(
        command=("true",),
        interval=0.05,
        max_interval=0.5,
        timeout=2.0,
        deadline=60 + 5 * (10 + 2),
        failure_threshold=5,
        liveness_interval=10.0,
    )


def test_healthcheck_defaults_are_dockers(tmp_path: Path) -> None:
    svc = web(tmp_path, 'image: app\nhealthcheck:\n  test: ["CMD", "true"]\n  interval: 0s\n')
    # interval 30 s, timeout 30 s, 3 retries: startup gives up after 3 * (30 + 30) s.
    assert svc.health == Probe(
        command=("true",),
        interval=0.05,
        max_interval=0.5,
        timeout=30.0,
        deadline=180.0,
        failure_threshold=3,
        liveness_interval=30.0,
    )


def test_a_short_healthcheck_keeps_the_minimum_deadline(tmp_path: Path) -> None:
    svc = web(
        tmp_path,
        'image: app\nhealthcheck: {test: ["CMD", "true"], interval: 100ms, timeout: 1s}\n',
    )
    assert svc.health is not None
    assert (svc.health.max_interval, svc.health.deadline) == (0.1, 60.0)
    assert svc.health.liveness_interval == 0.1


@pytest.mark.parametrize("check", ['{test: ["NONE"]}', '{test: ["CMD", "true"], disable: true}'])
def test_a_disabled_healthcheck_gives_no_probe(tmp_path: Path, check: str) -> None:
    text = f"services:\n  web:\n    image: app\n    healthcheck: {check}\n"
    path = write(tmp_path / "docker-compose.yml", text)
    config, message = warned(path)
    assert config.services["web"].health is None
    # The docker backend still reads the image's own HEALTHCHECK: said so.
    assert message == (
        f"{path}: ignored unsupported keys: "
        "web.healthcheck (disabled: the image's HEALTHCHECK, if any, counts)"
    )


@pytest.mark.parametrize(
    ("duration", "seconds"),
    [
        ("1s", 1.0),
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("2h", 7200.0),
        ("10us", 1e-5),
        ("1.5s", 1.5),
        ("1h2m3s4ms", 3723.004),
        ('"0"', 0.0),
    ],
)
def test_durations(tmp_path: Path, duration: str, seconds: float) -> None:
    svc = web(tmp_path, f"image: app\nstop_grace_period: {duration}\n")
    assert svc.stop_timeout == pytest.approx(seconds)


# --- restart, profiles and the rest ---------------------------------------------------


@pytest.mark.parametrize(
    ("compose", "restart", "max_restarts"),
    [
        ("no", "no", 10),
        ('"no"', "no", 10),
        ("always", "always", 10),
        ("unless-stopped", "unless-stopped", 10),
        ("on-failure", "on-failure", 10),
        ("on-failure:3", "on-failure", 3),
        ("on-failure:0", "on-failure", 10),  # Docker: no limit; ours: the default
    ],
)
def test_restart(tmp_path: Path, compose: str, restart: str, max_restarts: int) -> None:
    svc = web(tmp_path, f"image: app\nrestart: {compose}\n")
    assert (svc.restart, svc.max_restarts) == (restart, max_restarts)


PROFILED = """\
services:
  app: {image: app}
  debug: {image: debug, profiles: [debug, all]}
  metrics: {image: metrics, profiles: [ops]}
  always: {image: always, profiles: []}
"""


@pytest.mark.parametrize(
    ("active", "started"),
    [
        (None, {"app", "always"}),
        ("debug", {"app", "always", "debug"}),
        (" ops , debug ", {"app", "always", "debug", "metrics"}),
        ("*", {"app", "always", "debug", "metrics"}),
        ("other", {"app", "always"}),
    ],
)
def test_profiles(tmp_path: Path, active: str | None, started: set[str]) -> None:
    path = write(tmp_path / "docker-compose.yml", PROFILED)
    environ = {} if active is None else {"COMPOSE_PROFILES": active}
    config = load(path, **environ)
    # A service of an inactive profile is still declared, to start on demand.
    assert set(config.services) == {"app", "always", "debug", "metrics"}
    assert {n for n, s in config.services.items() if s.autostart} == started


def test_profiles_from_the_dotenv_file(tmp_path: Path) -> None:
    path = write(tmp_path / "docker-compose.yml", PROFILED)
    write(tmp_path / ".env", "COMPOSE_PROFILES=ops\n")
    assert load(path).services["metrics"].autostart is True
    assert load(path, COMPOSE_PROFILES="debug").services["metrics"].autostart is False


def test_working_dir_stop_grace_period_and_pull_policy(tmp_path: Path) -> None:
    svc = web(
        tmp_path,
        "image: app\nworking_dir: /srv/app\nstop_grace_period: 1m30s\npull_policy: never\n",
    )
    assert (svc.cwd, svc.stop_timeout, svc.pull) == ("/srv/app", 90.0, "never")


@pytest.mark.parametrize(
    ("limits", "cpus", "memory_mb"),
    [
        ("cpus: 1.5\nmem_limit: 512m\n", 1.5, 512),
        ('cpus: "0.5"\nmem_limit: 1g\n', 0.5, 1024),
        ("mem_limit: 1GiB\n", None, 1024),
        ("mem_limit: 6291456\n", None, 6),
        ("mem_limit: 6000000\n", None, 6),  # rounded up: a limit is never lowered
        ("mem_limit: 1.5g\n", None, 1536),
        ("cpus: 0\nmem_limit: 0\n", None, None),  # 0: no limit
        ("deploy: {resources: {limits: {cpus: '2', memory: 2g}}}\n", 2.0, 2048),
        ("cpus: 1\ndeploy: {resources: {limits: {cpus: '2'}}}\n", 2.0, None),
    ],
)
def test_cpu_and_memory_limits(
    tmp_path: Path, limits: str, cpus: float | None, memory_mb: int | None
) -> None:
    svc = web(tmp_path, "image: app\n" + limits)
    assert (svc.cpus, svc.memory_mb) == (cpus, memory_mb)


def test_gpus(tmp_path: Path) -> None:
    svc = web(
        tmp_path,
        """\
        image: trainer
        deploy:
          resources:
            reservations:
              devices:
                - {driver: nvidia, count: 2, capabilities: [gpu]}
                - {count: 1, capabilities: [[gpu, utility]]}
        """,
    )
    assert svc.gpus == 3


def test_gpus_without_a_count_are_skipped_and_named(tmp_path: Path) -> None:
    path = write(
        tmp_path / "docker-compose.yml",
        """\
        services:
          train:
            image: trainer
            deploy:
              replicas: 2
              resources:
                reservations:
                  devices:
                    - {count: all, capabilities: [gpu]}
                    - {device_ids: ["0"], capabilities: [gpu]}
                    - {capabilities: [tpu], count: 1}
        """,
    )
    config, message = warned(path)
    assert config.services["train"].gpus == 0
    devices = "train.deploy.resources.reservations.devices"
    assert message == (
        f"{path}: ignored unsupported keys: train.deploy.replicas, "
        f"{devices}[0] (all GPUs or given device ids: give a count), "
        f"{devices}[1] (all GPUs or given device ids: give a count), "
        f"{devices}[2] (not a GPU)"
    )


# --- what is skipped: one warning -----------------------------------------------------


def test_unsupported_keys_are_named_in_one_warning(tmp_path: Path) -> None:
    path = write(
        tmp_path / "docker-compose.yml",
        """\
        version: "3.9"
        x-common: &common
          restart: always
        services:
          web:
            <<: *common
            image: app
            build: .
            container_name: the-web
            networks: [front]
            labels: {a: b}
            logging: {driver: none}
            x-note: extension fields are compose's own
            healthcheck: {interval: 5s}
          db:
            image: postgres
            ports: ["5432:5432", "53:53/udp"]
            depends_on: {}
        networks: {front: {}}
        secrets: {token: {file: ./token}}
        configs: {}
        """,
    )
    config, message = warned(path)
    assert config.services["web"].restart == "always"  # YAML merge keys work
    assert message == (
        f"{path}: ignored unsupported keys: networks, secrets, configs, "
        "web.build (build the image first: dspy_infra.docker.build_image), "
        "web.container_name, web.networks, web.labels, web.logging, "
        "web.healthcheck (timings without a test), db.ports[1] (udp)"
    )


def test_a_clean_file_gives_no_warning(tmp_path: Path) -> None:
    path = write(tmp_path / "docker-compose.yml", "version: '3'\nservices:\n  web: {image: x}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(path)


# --- ${VAR} ---------------------------------------------------------------------------


def test_booleans_from_variables_are_read_as_compose_casts_them(tmp_path: Path) -> None:
    # ${VAR} makes strings: compose casts them back where a boolean is due.
    write(tmp_path / "extra.env", "A=1\n")
    svc = web(
        tmp_path,
        """\
        image: app
        env_file:
          - {path: ./missing.env, required: "${REQUIRED:-false}"}
          - {path: ./extra.env, required: "${REQUIRED:-false}"}
        volumes:
          - {type: bind, source: ./data, target: /data, read_only: "${RO:-yes}"}
          - {type: bind, source: ./logs, target: /logs, read_only: "${RW}"}
        healthcheck:
          test: ["CMD", "true"]
          disable: ${NO_CHECK}
        """,
        RW="False",
        NO_CHECK="OFF",
    )
    assert svc.env == {"A": "1"}
    assert svc.volumes == (f"{tmp_path / 'data'}:/data:ro", f"{tmp_path / 'logs'}:/logs")
    assert svc.health is not None
    assert svc.health.command == ("true",)


def test_a_boolean_that_is_none_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = write(
        tmp_path / "docker-compose.yml",
        """\
        services:
          web:
            image: app
            healthcheck: {test: ["CMD", "true"], disable: "${NO_CHECK:-maybe}"}
        """,
    )
    assert str(error(path)) == (
        f"{path}: services.web.healthcheck.disable: expected true or false, got 'maybe'"
    )


def test_interpolation(tmp_path: Path) -> None:
    write(tmp_path / ".env", "TAG=from-dotenv\nPORT=8080\nOVERRIDDEN=dotenv\n")
    svc = web(
        tmp_path,
        """\
        image: "app:${TAG}"
        ports: ["${PORT}:80"]
        environment:
          PLAIN: $OVERRIDDEN
          DEFAULT: ${MISSING:-fallback}
          DEFAULT_EMPTY: ${EMPTY:-for empty}
          DASH: ${EMPTY-kept empty}
          ALT: ${TAG:+set}
          NOT_ALT: ${MISSING:+set}
          NESTED: ${MISSING:-${TAG}}
          DOLLAR: $$HOME and $${HOME}
          LONE: "5 $"
        stop_grace_period: ${GRACE:-2s}
        """,
        OVERRIDDEN="environment",
        EMPTY="",
    )
    assert svc.image == "app:from-dotenv"
    assert svc.ports == {"80": 8080}
    assert svc.env == {
        "PLAIN": "environment",
        "DEFAULT": "fallback",
        "DEFAULT_EMPTY": "for empty",
        "DASH": "",
        "ALT": "set",
        "NOT_ALT": "",
        "NESTED": "from-dotenv",
        "DOLLAR": "$HOME and ${{HOME}}",
        "LONE": "5 $",
    }
    assert svc.stop_timeout == 2.0


def test_unset_variables_are_named_in_the_warning(tmp_path: Path) -> None:
    path = write(
        tmp_path / "docker-compose.yml",
        """\
        services:
          web:
            image: app:${TAG}
            environment:
              - A=$NOPE
              - B=${NOPE}
        """,
    )
    config, message = warned(path)
    assert config.services["web"].image == "app:"
    assert message == f"{path}: variables not set, read as empty strings: TAG, NOPE"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("${NEEDED:?set NEEDED first}", "set NEEDED first"),
        ("${NEEDED?}", "variable NEEDED is required"),
        ("${EMPTY:?}", "variable EMPTY is required"),
        ("${NOT CLOSED", "unclosed '${' in '${NOT CLOSED'"),
        ("${1BAD}", "invalid interpolation '${1BAD}'"),
    ],
)
def test_bad_interpolation_names_the_key(tmp_path: Path, value: str, message: str) -> None:
    path = write(tmp_path / "docker-compose.yml", f"services:\n  web:\n    image: '{value}'\n")
    assert str(error(path, EMPTY="")) == f"{path}: services.web.image: {message}"


# --- bad input ------------------------------------------------------------------------


TWICE = "a mapping holds each key once, as docker compose requires"


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        ("", "services", "missing: a compose file declares its services here"),
        ("- a list\n", None, "expected a mapping, got ['a list']"),
        ("version: '3'\n", "services", "missing: a compose file declares its services here"),
        ("services: [web]\n", "services", "expected a mapping, got ['web']"),
        ("services:\n  web: nginx\n", "services.web", "expected a mapping, got 'nginx'"),
        ("services:\n  web: {image: 7}\n", "services.web.image", "expected a string, got 7"),
        # A key written twice: PyYAML kept the last without a word; compose refuses it.
        (
            "services:\n  web: {image: a}\n  web: {image: b}\n",
            "services.web",
            f"defined twice (lines 2 and 3): {TWICE}",
        ),
        (
            "services:\n  web: {image: a, 'image': b}\n",
            "services.web.image",
            f"defined twice (line 2): {TWICE}",
        ),
        (
            "services:\n  web:\n    image: a\n    environment:\n      A: '1'\n      A: '2'\n",
            "services.web.environment.A",
            f"defined twice (lines 5 and 6): {TWICE}",
        ),
        (
            "services:\n  web: {image: a, ports: [{target: 80, target: 81}]}\n",
            "services.web.ports[0].target",
            f"defined twice (line 2): {TWICE}",
        ),
        (
            "services:\n  web: {image: x, healthcheck: {test: [CMD, 'true'], interval: 10}}\n",
            "services.web.healthcheck.interval",
            "expected a duration such as '30s', '1m30s' or '500ms', got 10",
        ),
        (
            "services:\n  web: {image: x, healthcheck: {test: [CMD, 'true'], timeout: 5 s}}\n",
            "services.web.healthcheck.timeout",
            "expected a duration such as '30s', '1m30s' or '500ms', got '5 s'",
        ),
        (
            "services:\n  web: {image: x, healthcheck: {test: [CMD], retries: -1}}\n",
            "services.web.healthcheck.test",
            "expected ['CMD', program, args...], ['CMD-SHELL', script], ['NONE'] or a script, "
            "got ['CMD']",
        ),
        (
            "services:\n  web: {image: x, mem_limit: lots}\n",
            "services.web.mem_limit",
            "expected a size such as '512m', '1g' or a number of bytes, got 'lots'",
        ),
        (
            "services:\n  web: {image: x, deploy: {resources: {limits: {cpus: many}}}}\n",
            "services.web.deploy.resources.limits.cpus",
            "expected a number >= 0, got 'many'",
        ),
        (
            "services:\n  web: {image: x, ports: ['80:http']}\n",
            "services.web.ports[0]",
            "expected a port number (1 to 65535), got 'http'",
        ),
        (
            "services:\n  web: {image: x, ports: [{target: 80, published: 70000}]}\n",
            "services.web.ports[0].published",
            "expected a port number (0 to 65535), got 70000",
        ),
        (
            "services:\n  web: {image: x, ports: [{published: 80}]}\n",
            "services.web.ports[0].target",
            "required: the port inside the container",
        ),
        (
            "services:\n  web: {image: x, volumes: ['./data:relative']}\n",
            "services.web.volumes[0]",
            "the path inside the container must be absolute, got 'relative'",
        ),
        (
            "services:\n  db: {}\n  web: {image: x, depends_on: {db: {condition: ready}}}\n",
            "services.web.depends_on.db.condition",
            "expected one of service_started, service_healthy, "
            "service_completed_successfully, got 'ready'",
        ),
        (
            "services:\n  web: {image: x, restart: sometimes}\n",
            "services.web.restart",
            "expected one of no, always, unless-stopped, on-failure or on-failure:N, "
            "got 'sometimes'",
        ),
        (
            "services:\n  web: {image: x, restart: 'on-failure:x'}\n",
            "services.web.restart",
            "expected an integer >= 0, got 'x'",
        ),
        (
            "services:\n  web: {image: x, command: 'echo \"unclosed'}\n",
            "services.web.command",
            "cannot split 'echo \"unclosed' into arguments (No closing quotation)",
        ),
        (
            "services:\n  web: {image: x, working_dir: app}\n",
            "services.web.working_dir",
            "expected an absolute path inside the container, got 'app'",
        ),
        (
            "services:\n  web: {image: x, environment: [1]}\n",
            "services.web.environment[0]",
            "expected a string, got 1",
        ),
        (
            # An escape pasted into a command: YAML refuses it before parsing.
            'services:\n  web: {image: x, command: ["echo", "\x1b[31mred"]}\n',
            None,
            "invalid YAML: unacceptable character #x001b: special characters are not allowed\n"
            '  in "<unicode string>", position 47',
        ),
    ],
)
def test_bad_input_names_file_and_key_path(
    tmp_path: Path, text: str, path: str | None, message: str
) -> None:
    file = write(tmp_path / "docker-compose.yml", text)
    exc = error(file)
    assert (exc.source, exc.path) == (str(file), path)
    assert str(exc) == ": ".join(p for p in (str(file), path, message) if p)


def test_a_key_over_a_merged_one_is_not_written_twice(tmp_path: Path) -> None:
    path = write(
        tmp_path / "docker-compose.yml",
        """\
        x-base: &base {image: base, restart: always}
        services:
          web: &web
            <<: *base
            image: web
          worker:
            <<: [*web, *base]
            image: worker
        """,
    )
    config = load(path)
    assert {n: (s.image, s.restart) for n, s in config.services.items()} == {
        "web": ("web", "always"),
        "worker": ("worker", "always"),
    }


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "docker-compose.yml", "services: [unclosed\n")
    assert str(error(path)).startswith(f"{path}: invalid YAML: ")


def test_an_error_comes_without_a_warning(tmp_path: Path) -> None:
    # filterwarnings = error: a warning before the error would surface instead.
    path = write(
        tmp_path / "docker-compose.yml",
        "services:\n  web: {image: x, build: ., stop_grace_period: soon}\n",
    )
    assert error(path).path == "services.web.stop_grace_period"


def test_our_own_checks_name_the_compose_file(tmp_path: Path) -> None:
    path = write(tmp_path / "docker-compose.yml", "services:\n  web: {command: [run]}\n")
    assert str(error(path)) == f"{path}: services.web.image: required with the docker backend"


# --- [infra] compose -------------------------------------------------------------------

COMPOSE = """\
services:
  web:
    image: app:1
    command: ["serve"]
    environment: {A: compose, B: compose}
    ports: ["8080:80"]
    volumes: ["./data:/data"]
    healthcheck: {test: ["CMD", "true"]}
  db:
    image: postgres
"""


def test_compose_key_reads_services_under_the_toml(tmp_path: Path) -> None:
    write(tmp_path / "deploy" / "docker-compose.yml", COMPOSE)
    path = write(
        tmp_path / "dspy-infra.toml",
        """\
        [infra]
        backend = "docker"
        compose = "deploy/docker-compose.yml"

        [services.web]
        image = "app:2"
        env = { B = "toml", C = "toml" }
        health = { http = "http://127.0.0.1:{ports.80}/healthz" }

        [services.worker]
        image = "worker"
        depends_on = ["web"]
        env = { WEB = "http://127.0.0.1:{services.web.ports.80}" }
        """,
    )
    config = load(path)
    assert config.infra.compose == tmp_path / "deploy" / "docker-compose.yml"
    assert set(config.services) == {"web", "db", "worker"}
    svc = config.services["web"]
    assert svc.image == "app:2"  # the TOML's
    assert svc.command == ("serve",)  # the compose file's
    assert svc.env == {"A": "compose", "B": "toml", "C": "toml"}  # merged key by key
    # Another kind of probe replaces compose's command; compose's timings stay.
    assert svc.health == Probe(
        http="http://127.0.0.1:{ports.80}/healthz",
        interval=0.05,
        max_interval=0.5,
        timeout=30.0,
        deadline=180.0,
        failure_threshold=3,
        liveness_interval=30.0,
    )
    # Relative paths in the compose file are relative to the compose file.
    assert svc.volumes == (f"{tmp_path / 'deploy' / 'data'}:/data",)
    assert config.services["db"] == ServiceConfig(image="postgres")


def test_compose_key_brings_the_docker_backend_and_project_unless_set(tmp_path: Path) -> None:
    write(tmp_path / "docker-compose.yml", "name: shop\n" + COMPOSE)
    path = write(tmp_path / "dspy-infra.toml", '[infra]\ncompose = "docker-compose.yml"\n')
    config = load(path)
    assert (config.infra.backend, config.infra.project) == ("docker", "shop")
    # What the TOML (or the environment) sets wins.
    config = load(path, DSPY_INFRA_PROJECT="mine")
    assert (config.infra.backend, config.infra.project) == ("docker", "mine")
    path.write_text('[infra]\nbackend = "local"\ncompose = "docker-compose.yml"\n')
    with pytest.raises(ConfigError, match="required with the local backend"):
        load(path)


def test_compose_key_from_the_environment_and_overrides(tmp_path: Path) -> None:
    write(tmp_path / "docker-compose.yml", COMPOSE)
    path = write(tmp_path / "dspy-infra.toml", '[infra]\nbackend = "docker"\n')
    config = load(
        path,
        DSPY_INFRA_COMPOSE="docker-compose.yml",
        DSPY_INFRA_SERVICES__WEB__HEALTH__DEADLINE="10",
    )
    assert config.services["web"].image == "app:1"
    # A timing of the compose probe changes; the probe stays.
    health = config.services["web"].health
    assert health is not None
    assert (health.command, health.deadline) == (("true",), 10.0)
    config = load_config(
        path, overrides={"compose": "docker-compose.yml", "services__db__image": "pg"}, environ={}
    )
    assert config.services["db"].image == "pg"
    # A loaded Config holds its compose services: they are not read twice.
    assert load_config(config, overrides={"project": "again"}, environ={}).services == (
        config.services
    )
    assert load_config(config, overrides={"compose": "docker-compose.yml"}, environ={}) == config


def test_compose_key_over_a_config_that_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # AgentInfra.start(config, compose=...) or DSPY_INFRA_COMPOSE over a Config
    # said infra.compose = the file, and read none of it: no services, local backend.
    write(tmp_path / "docker-compose.yml", "name: shop\n" + COMPOSE)
    monkeypatch.chdir(tmp_path)
    base = load_config({"services": {"own": {"command": ["run"], "image": "mine"}}}, environ={})
    for config in (
        load_config(base, overrides={"compose": "docker-compose.yml"}, environ={}),
        load_config(base, environ={"DSPY_INFRA_COMPOSE": "docker-compose.yml"}),
    ):
        assert sorted(config.services) == ["db", "own", "web"]
        assert config.services["web"].image == "app:1"
        assert (config.infra.backend, config.infra.project) == ("docker", "shop")
    # What the Config sets still wins.
    mine = evolve(base, infra=evolve(base.infra, project="mine"))
    config = load_config(mine, overrides={"compose": "docker-compose.yml"}, environ={})
    assert (config.infra.backend, config.infra.project) == ("docker", "mine")


def test_errors_name_the_file_that_holds_the_value(tmp_path: Path) -> None:
    compose = write(
        tmp_path / "docker-compose.yml", "services:\n  web: {image: x, restart: always}\n"
    )
    path = write(
        tmp_path / "dspy-infra.toml",
        '[infra]\nbackend = "local"\ncompose = "docker-compose.yml"\n'
        '[services.web]\nstop_timeout = "long"\n',
    )
    # The TOML's value: the TOML file.
    assert str(error(path)) == (
        f"{path}: services.web.stop_timeout: expected a number, got 'long' (string)"
    )
    path.write_text('[infra]\nbackend = "local"\ncompose = "docker-compose.yml"\n')
    # A compose service that the local backend cannot run: the compose file.
    assert str(error(path)) == f"{compose}: services.web.command: required with the local backend"
    # A compose file that is not there: the file and key that named it.
    path.write_text('[infra]\ncompose = "missing.yml"\n')
    missing = tmp_path / "missing.yml"
    assert str(error(path)) == f"{path}: infra.compose: file not found: {missing}"
    # One that cannot even be looked for names itself, saying why.
    path.write_text(f'[infra]\ncompose = "{"a" * 300}.yml"\n')
    assert str(error(path)).endswith(".yml: cannot read: File name too long")
    path.write_text('[infra]\ncompose = "missing.yml"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"DSPY_INFRA_COMPOSE": "missing.yml"})
    assert str(info.value) == (
        f"environment variable DSPY_INFRA_COMPOSE: infra.compose: file not found: {missing}"
    )


@pytest.mark.parametrize(
    "environ",
    [
        {"DSPY_INFRA_SERVICES__WEB__STOP_TIMEOUT": "5"},
        {"DSPY_INFRA_SERVICES__OTHER__COMMAND": '["run"]'},
    ],
)
def test_a_variable_over_a_compose_service_leaves_its_errors_to_the_compose_file(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    # A variable that sets a key of a compose service makes its table, or
    # the [services] table, where the TOML has none; compose's service is
    # still below it, and what it lacks is still compose's.
    compose = write(tmp_path / "docker-compose.yml", "services:\n  web: {image: x}\n")
    path = write(
        tmp_path / "dspy-infra.toml", '[infra]\nbackend = "local"\ncompose = "docker-compose.yml"\n'
    )
    exc = error(path, **environ)
    assert (exc.source, exc.path) == (str(compose), "services.web.command")


def test_compose_key_must_be_a_path(tmp_path: Path) -> None:
    path = write(tmp_path / "dspy-infra.toml", "[infra]\ncompose = 5\n")
    assert str(error(path)) == (f"{path}: infra.compose: expected a path (string), got 5 (integer)")
