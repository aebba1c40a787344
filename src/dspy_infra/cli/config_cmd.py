"""``dspy-infra config``: write a starter file, show the resolved configuration, validate it."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from dspy_infra.cli._common import (
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    Subparsers,
    add_config_option,
)
from dspy_infra.config import Config, dump_config, load_config

__all__ = ["STARTER", "register"]

DEFAULT_PATH = "dspy-infra.toml"

# Written by `config init`. It must validate as written (a test loads it), and
# it shows every idea a first user needs: ports chosen at start, templates
# that reach a dependency, the three probe kinds most stacks use, and the two
# dependency conditions that are not the default.
STARTER = """\
# dspy-infra configuration: the services of this project's local stack.
#
#   dspy-infra config validate    check this file
#   dspy-infra config show        the whole configuration, defaults and overrides applied
#
# Environment variables override any key: DSPY_INFRA_<KEY> for an [infra] key,
# DSPY_INFRA_SERVICES__<NAME>__<KEY> for a service's (values are read as TOML:
# 5, true, ["a", "b"]; anything else is a string), for example
#   DSPY_INFRA_MAX_CONCURRENT_STARTS=2
#   DSPY_INFRA_SERVICES__API__RESTART=always
#
# Commands, env, cwd and probes may use templates, filled in at start:
#   {port} {ports.NAME} {host} {name} {state_dir} {service_dir}
#   {services.DEP.port} {services.DEP.ports.NAME} {services.DEP.host}
# where DEP is one of the service's dependencies. {{ and }} are literal braces.

[infra]
backend = "local"             # "local": commands run as processes; "docker": images
state_dir = ".dspy-infra"     # task store, crash records (not logs); relative to this file
max_concurrent_starts = 5     # services started at once, where dependencies allow

# A key-value store. Port 0 picks a free port when the service starts.
[services.kv]
command = ["redis-server", "--port", "{port}", "--save", "", "--appendonly", "no"]
# image = "redis:7"           # what the docker backend runs instead of command
ports = { main = 0 }
health = { tcp = "{port}" }   # healthy once it accepts connections
restart = "on-failure"

# A one-shot job: it runs once kv is healthy, and must exit with status 0.
[services.migrate]
command = ["python", "-m", "myapp.migrate"]
env = { REDIS_URL = "redis://{services.kv.host}:{services.kv.port}/0" }
depends_on = ["kv"]           # a list means: wait until each one is healthy

# The application. Replace myapp with yours.
[services.api]
command = ["python", "-m", "myapp.api", "--port", "{port}"]
env = { REDIS_URL = "redis://{services.kv.host}:{services.kv.port}/0" }
ports = { main = 0 }
restart = "on-failure"
# Other probes: command = ["pg_isready"], log = "listening on", call = "pkg.module:async_fn"
health = { http = "http://{host}:{port}/healthz", status = 200, deadline = 30 }

[services.api.depends_on]
kv = { condition = "healthy" }
migrate = { condition = "completed_successfully" }
"""


def register(subparsers: Subparsers) -> None:
    config = subparsers.add_parser(
        "config",
        help="write, show or validate the configuration",
        description="Write, show or validate the dspy-infra configuration.",
    )
    config.set_defaults(help_parser=config)
    commands = config.add_subparsers(title="commands", metavar="COMMAND")

    init = commands.add_parser(
        "init",
        help=f"write a commented starter {DEFAULT_PATH}",
        description=f"Write a commented starter {DEFAULT_PATH} with an example local stack.",
    )
    init.add_argument(
        "path",
        nargs="?",
        default=DEFAULT_PATH,
        metavar="PATH",
        help=f"file, or directory to write {DEFAULT_PATH} in (default: ./{DEFAULT_PATH})",
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(handler=_init)

    show = commands.add_parser(
        "show",
        help="print the resolved configuration as TOML",
        description=(
            "Print the configuration as TOML, with defaults and DSPY_INFRA_* environment "
            "overrides applied and relative paths resolved."
        ),
    )
    add_config_option(show)
    show.set_defaults(handler=_show)

    validate = commands.add_parser(
        "validate",
        help="check the configuration",
        description=(
            "Check the configuration (DSPY_INFRA_* environment overrides included). "
            "Exits 0 when it is valid, 2 when it is not or when none is found."
        ),
    )
    add_config_option(validate)
    validate.set_defaults(handler=_validate)


def _init(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_dir():
        path /= DEFAULT_PATH
    if path.exists() and not args.force:
        raise CommandError(f"{path} already exists (use --force to overwrite it)", code=EXIT_USAGE)
    try:
        # "x" refuses a file created since the check above; --force truncates.
        with path.open("w" if args.force else "x", encoding="utf-8") as f:
            f.write(STARTER)
    except FileExistsError:
        raise CommandError(
            f"{path} already exists (use --force to overwrite it)", code=EXIT_USAGE
        ) from None
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None
    check = "dspy-infra config validate"
    if path != Path(DEFAULT_PATH):  # found without -c only in the current directory
        check += f" -c {shlex.quote(str(path))}"
    print(f"wrote {path}")
    print(f"next: edit it, then run: {check}")
    return EXIT_OK


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _show(args: argparse.Namespace) -> int:
    config = _load(args)
    if config.source is None:
        print(
            f"note: no configuration file found (no $DSPY_INFRA_CONFIG, ./{DEFAULT_PATH} "
            "or [tool.dspy-infra] in ./pyproject.toml): showing the defaults",
            file=sys.stderr,
        )
    else:
        print(f"# resolved from {config.source}")
    sys.stdout.write(dump_config(config))
    return EXIT_OK


def _validate(args: argparse.Namespace) -> int:
    config = _load(args)
    if config.source is None:
        # load_config falls back to the defaults; "ok" would hide that the
        # file the user meant was never read (wrong directory, typo).
        raise CommandError(
            f"no configuration found: pass -c PATH, set $DSPY_INFRA_CONFIG, or create "
            f"./{DEFAULT_PATH} (dspy-infra config init)",
            code=EXIT_USAGE,
        )
    names = list(config.services)
    noun = "service" if len(names) == 1 else "services"
    listed = f" ({', '.join(names)})" if names else ""
    print(f"ok: {config.source}: {len(names)} {noun}{listed}")
    return EXIT_OK
