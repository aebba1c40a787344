"""The configuration classes.

Frozen attrs classes: a loaded configuration is a value, safe to share between
tasks and to compare. Field validators check what can be checked one field at
a time; :func:`dspy_infra.config.loading.validate` checks what spans fields
(dependencies, cycles, placeholders).
"""

from __future__ import annotations

import ipaddress
import math
import operator
import random
import re
import signal as signal_module
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from attrs import Attribute, field, frozen

from dspy_infra.services.status import ServiceStatus

__all__ = [
    "Backoff",
    "Condition",
    "Config",
    "Dependency",
    "FieldError",
    "HandlerConfig",
    "InfraSettings",
    "MetricsSettings",
    "Probe",
    "ProbeCallable",
    "PullPolicy",
    "RestartPolicy",
    "ServerSettings",
    "ServiceConfig",
    "TaskClass",
]

Condition = Literal["started", "healthy", "completed_successfully", "log_ready"]
RestartPolicy = Literal["no", "on-failure", "always", "unless-stopped"]
PullPolicy = Literal["missing", "never", "always"]
Synchronous = Literal["normal", "full"]
ProbeCallable = Callable[[ServiceStatus], Awaitable[bool]]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Service and port names are segments of key paths (``services.NAME.port``) and
# of placeholders (``{services.NAME.ports.PORT}``): no dots there.
KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class FieldError(ValueError):
    """A bad value of one field; the loader adds ``field`` to the key path it reports."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


Validator = Callable[[object, "Attribute[Any]", Any], None]


# Counts of lines or events kept: a deque holds at most this many (more is an
# OverflowError at start, not a configuration error).
_MAX_KEPT = sys.maxsize


def _bound(op: str, bound: int) -> Validator:
    # Compared as given, not through float(): a huge TOML integer is a fine
    # count, and float() of it would raise OverflowError.
    checks: dict[str, Callable[[Any, Any], bool]] = {
        ">": operator.gt,
        ">=": operator.ge,
        "<=": operator.le,
    }

    def check(_: object, attribute: Attribute[Any], value: float | None) -> None:
        if value is not None and not checks[op](value, bound):
            raise FieldError(attribute.name, f"expected a number {op} {bound}, got {value!r}")

    return check


_positive = _bound(">", 0)
_non_negative = _bound(">=", 0)
_at_least_one = _bound(">=", 1)


def _finite(_: object, attribute: Attribute[Any], value: float | None) -> None:
    # Passed on as an integer (Docker's NanoCpus, sbatch's minutes): inf is no limit there.
    if value is not None and not math.isfinite(value):
        raise FieldError(attribute.name, f"expected a finite number, got {value!r}")


# A task's priority travels as an int32 (TaskStatus.priority in proto/): a
# larger one would read back cut over gRPC (2**32 + 7 as 7).
_MAX_PRIORITY = 2**31 - 1

# Docker refuses a smaller container memory limit ("Minimum memory limit
# allowed is 6MB"), at each start: refused here with the key named instead.
_DOCKER_MIN_MEMORY_MB = 6


def docker_memory_error(value: int | None) -> str | None:
    """Why Docker would refuse ``value`` MB as a container's memory limit (0: none), or None.

    A service's or class's ``memory_mb`` as the configuration loads, a
    task's own (``Resources``) as it is submitted: found at a start, it
    failed each one.
    """
    if value is not None and 0 < value < _DOCKER_MIN_MEMORY_MB:
        smallest = _DOCKER_MIN_MEMORY_MB
        return f"expected at least {smallest} (Docker's smallest memory limit), got {value}"
    return None


def _docker_memory(_: object, attribute: Attribute[Any], value: int | None) -> None:
    if problem := docker_memory_error(value):
        raise FieldError(attribute.name, problem)


def _path(_: object, attribute: Attribute[Any], value: str | Path | None) -> None:
    # "" is the configuration file's directory once resolved: a key set empty
    # (meant as unset) would run the command there without a word.
    if value is None:
        return
    if not str(value).strip():
        raise FieldError(attribute.name, f"expected a path, got {value!r}")
    _home(attribute, str(value))


def _home(attribute: Attribute[Any], path: str) -> None:
    """Refuse a path under a home directory that cannot be found, naming it
    (made absolute once loaded: see loading._resolve_paths)."""
    try:
        expand_home(path)
    except ValueError as exc:
        raise FieldError(attribute.name, str(exc)) from None


def _env(_: object, attribute: Attribute[Any], value: dict[str, str]) -> None:
    # What the operating system refuses (subprocess named no variable for
    # it), or Docker takes apart at the first '=': refused here, by name.
    for name, text in value.items():
        if flaw := _env_name_flaw(name):
            raise FieldError(
                attribute.name, f"{name!r} cannot be an environment variable's name ({flaw})"
            )
        if "\0" in text:
            raise FieldError(
                attribute.name,
                f"the value of {name!r} cannot be passed to a process (it has a NUL)",
            )


def _env_name_flaw(name: str) -> str | None:
    if not name:
        return "it is empty"
    if "=" in name:
        return "it has '='"
    return "it has a NUL" if "\0" in name else None


def _regex(_: object, attribute: Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    try:
        re.compile(value)
    except re.error as exc:
        raise FieldError(attribute.name, f"not a valid regular expression ({exc})") from None


def _name(_: object, attribute: Attribute[Any], value: str) -> None:
    if not NAME_RE.match(value):
        raise FieldError(
            attribute.name,
            f"{value!r} is not a valid name "
            "(letters, digits, '_', '.', '-'; starting with a letter or digit)",
        )


def _check_command(command: tuple[str, ...] | str | None, *, shell: bool) -> None:
    if isinstance(command, str) and not shell:
        raise FieldError(
            "command",
            "a string runs through a shell only with shell = true; "
            "otherwise give a list of arguments",
        )
    if command is not None and not command:
        raise FieldError("command", "must not be empty")


def expand_home(path: str) -> Path:
    """``path`` with a leading ``~`` or ``~user`` made that home directory, as a shell does.

    ValueError naming it where there is none (an unknown user, no HOME):
    Path.expanduser's bare RuntimeError named neither the key nor the path.
    """
    try:
        return Path(path).expanduser()
    except RuntimeError:
        head = path.split("/", 1)[0]
        raise ValueError(f"cannot expand {head!r}: no such user, or no home directory") from None


def _volumes(_: object, attribute: Attribute[Any], value: tuple[str, ...]) -> None:
    for volume in value:
        source, sep, rest = volume.partition(":")
        target, _, mode = rest.partition(":")
        if not (source and sep and target.startswith("/")) or mode not in ("", "ro", "rw"):
            raise FieldError(
                attribute.name,
                f"{volume!r} is not a volume: expected 'SOURCE:/container/path' or "
                "'SOURCE:/container/path:ro' (SOURCE a host path or a volume name)",
            )
        _home(attribute, source)


def _gpu_ids(_: object, attribute: Attribute[Any], value: tuple[int, ...] | None) -> None:
    if value is None:
        return
    if any(i < 0 for i in value):
        raise FieldError(attribute.name, f"device ids are indices from 0, got {list(value)}")
    if len(set(value)) != len(value):
        raise FieldError(attribute.name, f"a device is listed twice: {list(value)}")


# Slurm's own syntax: ``[SIG]NAME`` or a number, then ``@SECONDS`` (60 when left out).
_SLURM_SIGNAL_RE = re.compile(r"^(?:SIG)?([A-Z][A-Z0-9]*|[0-9]+)(?:@([0-9]+))?$")


def _slurm_word(_: object, attribute: Attribute[Any], value: str | None) -> None:
    # Passed to sbatch as one argument: no shell, but an empty or spaced value
    # is a typo that sbatch would report far from the configuration.
    if value is not None and (not value or any(c.isspace() for c in value)):
        raise FieldError(attribute.name, f"expected a Slurm name without spaces, got {value!r}")


def _slurm_signal(_: object, attribute: Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    match = _SLURM_SIGNAL_RE.match(value)
    if match is None or not _is_signal(match[1]):
        raise FieldError(
            attribute.name,
            "expected a signal and the seconds before the time limit to send it, "
            f"as in 'USR1@120' (Slurm's --signal), got {value!r}",
        )


def _is_signal(name: str) -> bool:
    try:
        if name.isdigit():
            signal_module.Signals(int(name))
        else:
            signal_module.Signals[f"SIG{name}"]
    except (KeyError, ValueError):
        return False
    return True


@frozen(kw_only=True)
class Backoff:
    """Exponential backoff with jitter: ``initial * factor**n``, capped at ``max``."""

    initial: float = field(default=0.1, validator=_positive)
    max: float = field(default=10.0, validator=_positive)
    factor: float = field(default=2.0, validator=_at_least_one)
    jitter: float = field(default=0.1, validator=[_non_negative, _bound("<=", 1)])

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        try:
            grown = self.initial * self.factor ** min(attempt, 64)
        except OverflowError:  # a float power past 1e308 raises; it is capped by max anyway
            grown = self.max
        base = min(self.max, grown)
        spread = base * self.jitter
        return max(0.0, base + random.uniform(-spread, spread))  # noqa: S311 - jitter, not crypto


# The keys of a probe that each name its kind; a probe has exactly one.
PROBE_KINDS = ("tcp", "http", "command", "log", "call", "container")


@frozen(kw_only=True)
class Probe:
    """How the library checks that a service is up, from outside the service.

    Exactly one kind is set: ``tcp`` ("{port}" or "host:port"), ``http`` (a
    URL, with ``status`` and an optional ``body`` regex), ``command`` (argv;
    exit 0 is healthy), ``log`` (a regex over the service's output) or
    ``call`` (an async callable given the service's status, or a
    ``"module:function"`` reference to one), or ``container = true`` (the
    verdict of the image's own HEALTHCHECK, docker backend; used by default
    when a container service has no probe and its image has a HEALTHCHECK).

    The first startup check runs right after launch; then the probe waits
    ``interval``, backing off exponentially, with jitter, up to
    ``max_interval`` (checking sooner when the service prints a line), until
    ``success_threshold`` consecutive successes, the ``deadline`` or
    ``retries`` attempts. After startup the probe runs every
    ``liveness_interval`` seconds (0 turns this off); ``failure_threshold``
    consecutive failures make the service unhealthy.
    """

    tcp: str | None = None
    http: str | None = None
    status: int | None = field(default=None, validator=[_bound(">=", 100), _bound("<=", 599)])
    body: str | None = field(default=None, validator=_regex)
    command: tuple[str, ...] | None = field(default=None)
    log: str | None = field(default=None, validator=_regex)
    call: ProbeCallable | str | None = None
    container: bool = False
    interval: float = field(default=0.01, validator=_positive)
    max_interval: float = field(default=0.02, validator=_positive)
    timeout: float = field(default=1.0, validator=_positive)
    deadline: float = field(default=60.0, validator=_positive)
    retries: int | None = field(default=None, validator=_at_least_one)
    success_threshold: int = field(default=1, validator=_at_least_one)
    failure_threshold: int = field(default=3, validator=_at_least_one)
    liveness_interval: float = field(default=5.0, validator=_non_negative)

    def __attrs_post_init__(self) -> None:
        kinds = [k for k in PROBE_KINDS if getattr(self, k)]
        if len(kinds) != 1:
            found = ", ".join(kinds) if kinds else "none"
            raise ValueError(
                f"a probe needs exactly one of {', '.join(PROBE_KINDS)} (found: {found})"
            )
        if (self.status is not None or self.body is not None) and self.http is None:
            raise ValueError("status and body apply only to an http probe")
        if self.max_interval < self.interval:
            raise FieldError(
                "max_interval",
                f"must be at least interval ({self.interval:g}), got {self.max_interval:g}",
            )

    @property
    def kind(self) -> str:
        return next(k for k in PROBE_KINDS if getattr(self, k))


@frozen(kw_only=True)
class Dependency:
    """What a service waits for in one of its dependencies.

    ``healthy`` (the default) means the probe passed, or the process started
    when the dependency has no probe. ``log_ready`` waits for a line matching
    ``pattern`` (default: the dependency's ``log`` probe).
    """

    condition: Condition = "healthy"
    pattern: str | None = field(default=None, validator=_regex)

    def __attrs_post_init__(self) -> None:
        if self.pattern is not None and self.condition != "log_ready":
            raise FieldError("pattern", "applies only to condition 'log_ready'")


@frozen(kw_only=True)
class ServiceConfig:
    """One service: how to run it, what it needs, how to know it is up.

    ``image``, ``pull``, ``entrypoint``, ``container_ports``, ``volumes``,
    ``cpus`` and ``memory_mb`` apply to the docker backend; ``gpus`` (devices
    of the service's own, which tasks do not lease) to both.
    ``ports`` are the ports on this machine (0 picks a free one);
    ``container_ports`` the port inside the container for the same name,
    which defaults to the host port, so that ``{port}`` in a command means
    the same with either backend. ``pull = "missing"`` pulls an image that
    is not present (reporting progress as events); ``"never"`` fails with a
    clear error instead.
    """

    command: tuple[str, ...] | str | None = None
    shell: bool = False
    image: str | None = None
    pull: PullPolicy = "missing"
    entrypoint: tuple[str, ...] | None = None
    env: dict[str, str] = field(factory=dict, validator=_env)
    cwd: str | None = field(default=None, validator=_path)
    ports: dict[str, int] = field(factory=dict)
    container_ports: dict[str, int] = field(factory=dict)
    volumes: tuple[str, ...] = field(default=(), validator=_volumes)
    cpus: float | None = field(default=None, validator=[_positive, _finite])
    memory_mb: int | None = field(default=None, validator=[_positive, _docker_memory])
    gpus: int = field(default=0, validator=_non_negative)
    depends_on: dict[str, Dependency] = field(factory=dict)
    health: Probe | None = None
    restart: RestartPolicy = "no"
    max_restarts: int | None = field(default=10, validator=_non_negative)
    restart_backoff: Backoff = field(factory=Backoff)
    restart_reset_after: float = field(default=30.0, validator=_non_negative)
    start_retries: int = field(default=2, validator=_non_negative)
    start_backoff: Backoff = field(factory=lambda: Backoff(initial=0.2, max=5.0))
    stop_timeout: float = field(default=10.0, validator=_non_negative)
    autostart: bool = True
    log_lines: int = field(default=1000, validator=[_at_least_one, _bound("<=", _MAX_KEPT)])

    def __attrs_post_init__(self) -> None:
        _check_command(self.command, shell=self.shell)
        for port_name, port in self.ports.items():
            if not KEY_NAME_RE.match(port_name):
                raise FieldError(
                    f"ports.{port_name}",
                    f"{port_name!r} is not a valid port name "
                    "(letters, digits, '_', '-'; starting with a letter or digit)",
                )
            if not 0 <= port <= 65535:
                raise FieldError(
                    f"ports.{port_name}",
                    f"{port} is not a port number (0 to 65535; 0 picks a free one)",
                )
        for port_name, port in self.container_ports.items():
            if port_name not in self.ports:
                raise FieldError(
                    f"container_ports.{port_name}",
                    f"names no port in ports (ports: {', '.join(self.ports) or 'none'})",
                )
            if not 1 <= port <= 65535:
                raise FieldError(
                    f"container_ports.{port_name}", f"{port} is not a port number (1 to 65535)"
                )


@frozen(kw_only=True)
class TaskClass:
    """A class of tasks: which runner executes them, how many at once, with what.

    ``cpus``, ``memory_mb`` and ``gpus`` are what one task of the class holds
    while it runs, out of the machine's capacity (``[infra] cpus``, ...); GPUs
    are leased as whole devices. ``adaptive`` lets the concurrency limit move
    between ``min_concurrency`` and ``max_concurrency`` with the latency and
    failures of its tasks. ``aging`` is how many seconds of waiting are worth
    one priority level (0 turns aging off: strict priority). With
    ``reserve_after``, a task first in line whose resources have been taken
    that many seconds has them reserved: what other tasks free is kept for it
    (unset: never, pure backfill). A task is tried
    ``max_attempts`` times in all, waiting ``retry_backoff`` between attempts;
    ``timeout`` bounds one attempt's run, ``queue_timeout`` the wait before
    its first start. ``cancel_grace`` is how long a cancelled process gets
    between SIGTERM and SIGKILL.

    The keys after ``cancel_grace`` apply to the ``slurm`` runner only, which
    passes them to ``sbatch``: ``partition``, ``account``, ``qos`` and
    ``gres`` as they are; ``time_limit`` (seconds) as ``--time``, rounded up
    to minutes (by default the attempt's timeout plus ``cancel_grace`` and a
    minute, so that a job outlives a crashed owner by little); ``signal``
    (``"USR1@120"``: a signal and how many seconds before the time limit) as
    ``--signal=B:...``, passed on to the command so that it can checkpoint
    before Slurm ends the job; ``array_throttle`` as the
    ``%N`` of the job arrays that bursts of tasks are submitted as: at most
    N of one burst's jobs run at once; ``pack`` runs up to N tasks of a
    burst one after another in one job, for short tasks, which would
    otherwise spend more time in Slurm's start and end of a job than at work.
    """

    runner: str = field(default="inprocess", validator=_name)
    max_concurrency: int = field(default=64, validator=_at_least_one)
    min_concurrency: int = field(default=1, validator=_at_least_one)
    adaptive: bool = False
    cpus: float = field(default=0.0, validator=[_non_negative, _finite])
    memory_mb: int = field(default=0, validator=_non_negative)
    gpus: int = field(default=0, validator=_non_negative)
    timeout: float | None = field(default=None, validator=_positive)
    queue_timeout: float | None = field(default=None, validator=_positive)
    max_attempts: int = field(default=1, validator=_at_least_one)
    retry_backoff: Backoff = field(factory=lambda: Backoff(initial=0.1, max=30.0))
    aging: float = field(default=60.0, validator=_non_negative)
    reserve_after: float | None = field(default=None, validator=_non_negative)
    cancel_grace: float = field(default=5.0, validator=_non_negative)
    partition: str | None = field(default=None, validator=_slurm_word)
    account: str | None = field(default=None, validator=_slurm_word)
    qos: str | None = field(default=None, validator=_slurm_word)
    time_limit: float | None = field(default=None, validator=[_positive, _finite])
    gres: str | None = field(default=None, validator=_slurm_word)
    signal: str | None = field(default=None, validator=_slurm_signal)
    array_throttle: int | None = field(default=None, validator=_at_least_one)
    pack: int | None = field(default=None, validator=_at_least_one)

    def __attrs_post_init__(self) -> None:
        if self.min_concurrency > self.max_concurrency:
            raise FieldError("min_concurrency", "must be at most max_concurrency")
        # Other runners only count it against the machine: a small amount is fine there.
        if self.runner == "docker" and (problem := docker_memory_error(self.memory_mb)):
            raise FieldError("memory_mb", problem)


@frozen(kw_only=True)
class HandlerConfig:
    """A handler run outside this process: a command for the process or docker runner.

    ``command`` may use ``{payload_file}`` (the payload, as JSON),
    ``{result_file}`` (where to write the result, as JSON), ``{task_id}``,
    ``{attempt}`` and ``{work_dir}``. The docker runner runs ``command`` in
    ``image``, with the task's work directory mounted at the same path, so
    the placeholders mean the same inside the container.
    """

    command: tuple[str, ...] | str | None = None
    shell: bool = False
    env: dict[str, str] = field(factory=dict, validator=_env)
    cwd: str | None = field(default=None, validator=_path)
    image: str | None = None
    pull: PullPolicy = "missing"
    entrypoint: tuple[str, ...] | None = None
    volumes: tuple[str, ...] = field(default=(), validator=_volumes)

    def __attrs_post_init__(self) -> None:
        _check_command(self.command, shell=self.shell)
        # Relative, it would be made a path on this machine (as a process
        # handler's is), which Docker creates empty in the container.
        if self.image is not None and self.cwd is not None and not self.cwd.startswith("/"):
            raise FieldError(
                "cwd",
                "a path inside the container (the handler has an image) must be absolute, "
                f"got {self.cwd!r}",
            )


@frozen(kw_only=True)
class InfraSettings:
    """The ``[infra]`` table: instance-wide settings.

    ``durable = false`` keeps tasks in memory only (nothing survives the
    process); ``synchronous = "full"`` makes each commit of the task store
    survive power loss too, at a cost (see docs/scheduling.md). ``cpus``,
    ``memory_mb`` and ``gpus`` are the capacity that task classes draw on:
    detected when not set (``gpus`` from NVML, nvidia-smi, or
    ``CUDA_VISIBLE_DEVICES``). ``compose`` names a Docker Compose file
    (relative to the configuration file) whose services are read under the
    ``[services]`` tables, so that a compose file can be reused as it is and
    only what differs is written in TOML (see docs/compose.md).
    ``keep_finished`` (seconds) forgets tasks and workflow runs that finished
    longer ago than that, with the tasks' work directories: a long-running
    instance's store and disk stop growing (as Celery's result expiry);
    unset, nothing is forgotten.
    """

    backend: str = field(default="local", validator=_name)
    state_dir: Path = field(default=Path(".dspy-infra"), validator=_path)
    project: str = field(default="dspy-infra", validator=_name)
    autostart: bool = True
    max_concurrent_starts: int = field(default=5, validator=_at_least_one)
    event_buffer: int = field(default=1024, validator=_at_least_one)
    event_history: int = field(default=10_000, validator=[_non_negative, _bound("<=", _MAX_KEPT)])
    durable: bool = True
    synchronous: Synchronous = "normal"
    max_payload_bytes: int = field(default=1 << 20, validator=_at_least_one)
    max_result_bytes: int = field(default=1 << 20, validator=_at_least_one)
    max_priority: int = field(default=100, validator=[_non_negative, _bound("<=", _MAX_PRIORITY)])
    cpus: float | None = field(default=None, validator=_positive)
    memory_mb: int | None = field(default=None, validator=_positive)
    gpus: tuple[int, ...] | None = field(default=None, validator=_gpu_ids)
    start_needed_services: bool = True
    worker_threads: int = field(default=16, validator=_at_least_one)
    compose: Path | None = field(default=None, validator=_path)
    keep_finished: float | None = field(default=None, validator=_positive)


def split_address(address: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"``, ``"[::1]:9464"``, ``"localhost:0"`` -> (host, port)."""
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    # ASCII: str.isdigit() holds for digits that int() does not read ("²").
    digits = port_text.isascii() and port_text.isdigit()
    if not sep or not host or not digits or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected 'HOST:PORT' (port 0 to 65535; 0 picks one), got {address!r}")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@frozen(kw_only=True)
class MetricsSettings:
    """The ``[metrics]`` table: the HTTP endpoint and the event-loop lag gauge.

    ``address`` (``"127.0.0.1:9464"``; port 0 picks a free one) turns on an
    HTTP server in the instance's event loop, serving ``/metrics``,
    ``/health`` and ``/ready``; none (the default) serves nothing. It must
    be a loopback address unless ``allow_remote`` is true: the endpoint has
    no authentication. ``loop_lag_interval`` is how often the event-loop lag
    is measured (0 turns it off).
    """

    address: str | None = None
    allow_remote: bool = False
    loop_lag_interval: float = field(default=0.5, validator=_non_negative)

    def __attrs_post_init__(self) -> None:
        if self.address is None:
            return
        try:
            host, _ = split_address(self.address)
        except ValueError as exc:
            raise FieldError("address", str(exc)) from None
        if not self.allow_remote and not is_loopback(host):
            raise FieldError(
                "address",
                f"{host!r} is not a loopback address: the endpoint has no authentication, "
                "so serving it beyond this machine needs allow_remote = true",
            )


@frozen(kw_only=True)
class ServerSettings:
    """The ``[server]`` table: where ``dspy-infra serve`` listens.

    ``address`` is ``"HOST:PORT"`` (port 0 picks a free one). Serving on an
    address that is not loopback needs TLS and a token as well, which
    ``dspy-infra serve`` checks when it starts.
    """

    address: str = "127.0.0.1:50052"

    def __attrs_post_init__(self) -> None:
        try:
            split_address(self.address)
        except ValueError as exc:
            raise FieldError("address", str(exc)) from None


def _default_classes() -> dict[str, TaskClass]:
    return {
        "cpu_short": TaskClass(runner="inprocess", max_concurrency=64),
        "cpu_long": TaskClass(runner="process", max_concurrency=64, cpus=1.0),
        "gpu": TaskClass(runner="process", max_concurrency=64, gpus=1),
        "gpu_slurm": TaskClass(runner="slurm", max_concurrency=64),
    }


DEFAULT_CLASSES = _default_classes()


@frozen(kw_only=True)
class Config:
    """A whole configuration. ``source`` names where it came from, for messages.

    ``classes`` always holds the default classes (``cpu_short``,
    ``cpu_long``, ``gpu``, ``gpu_slurm``); a table of the same name changes
    only the keys it sets.
    """

    infra: InfraSettings = field(factory=InfraSettings)
    services: dict[str, ServiceConfig] = field(factory=dict)
    classes: dict[str, TaskClass] = field(factory=_default_classes)
    handlers: dict[str, HandlerConfig] = field(factory=dict)
    metrics: MetricsSettings = field(factory=MetricsSettings)
    server: ServerSettings = field(factory=ServerSettings)
    source: str | None = field(default=None, eq=False, metadata={"internal": True})
    # Who set the values that ``source`` did not (environment variables,
    # overrides, a compose file), by key path: see :meth:`source_of`.
    origins: Mapping[tuple[str, ...], str] = field(
        factory=dict, eq=False, repr=False, metadata={"internal": True}
    )

    def source_of(self, path: str) -> str | None:
        """Who set the value at ``path`` (``infra.gpus``), for an error that names it.

        An error found once loaded (at start: a GPU not on this machine, a
        state_dir that cannot be made) names what set the value, as loading's
        own errors do: not the file, when a variable or an override set it.
        """
        return origin_of(path, self.origins, self.source)


# An array's item in a key path (services.a.command[2]): who set it set the array.
INDEX_RE = re.compile(r"\[\d+\]")


def origin_of(path: str, origins: Mapping[tuple[str, ...], str], default: str | None) -> str | None:
    """Who set the value at ``path``: the environment variable, override or compose file
    that wrote it (or made the nearest table around it), else the last one that wrote
    inside it, else ``default`` (the file)."""
    key_path = tuple(INDEX_RE.sub("", path).split("."))
    around = [where for where in origins if key_path[: len(where)] == where]
    if around:
        return origins[max(around, key=len)]
    for where, origin in list(origins.items())[::-1]:
        if where[: len(key_path)] == key_path:
            return origin
    return default
