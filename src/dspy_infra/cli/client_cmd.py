"""``dspy-infra start|stop|status|logs|submit|task|cancel|events``: a running server, over gRPC.

Each command connects to ``--address`` (default ``$DSPY_INFRA_ADDRESS``, else
127.0.0.1:50052) through :meth:`AgentInfra.connect`, with the token of
``$DSPY_INFRA_TOKEN`` or ``--token-file``, and over TLS with ``--tls`` or
``--tls-ca PATH``. Beyond the common exit codes: 3 when no server answers
(or it refuses the token, or goes away), 4 when it holds no such task or
service.

What a script reads goes to stdout, plain (a task id, a result as JSON, log
lines, ``--json`` objects); tables and live progress are drawn with rich,
and only a terminal sees the live redraws: a pipe gets the final table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import ssl
import sys
from collections.abc import Awaitable, Callable, Mapping
from contextlib import aclosing
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import attrs
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from dspy_infra.cli._common import (
    DEFAULT_ADDRESS,
    EXIT_FAILURE,
    EXIT_NO_SERVER,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_USAGE,
    TOKEN_ENV,
    CommandError,
    Handler,
    Subparsers,
    read_token,
    ungrouped,
)
from dspy_infra.errors import (
    InvalidTask,
    ServiceStartError,
    UnknownEventType,
    UnknownService,
    UnknownTask,
)
from dspy_infra.infra import check_event_types
from dspy_infra.scheduling.checks import encode_json

if TYPE_CHECKING:
    from dspy_infra.events import Event
    from dspy_infra.remote import RemoteAgentInfra
    from dspy_infra.scheduling.tasks import ClassStatus, TaskStatus
    from dspy_infra.services.status import ServiceStatus

__all__ = ["ADDRESS_ENV", "register"]

ADDRESS_ENV = "DSPY_INFRA_ADDRESS"
POLL = 0.1  # `start`: how often the live table asks for the services' states

_Command = Callable[["RemoteAgentInfra", argparse.Namespace], Awaitable[int]]


def register(subparsers: Subparsers) -> None:
    remote = argparse.ArgumentParser(add_help=False)
    group = remote.add_argument_group("server")
    group.add_argument(
        "--address",
        default=None,
        metavar="HOST:PORT",
        help=f"the server (default: ${ADDRESS_ENV}, else {DEFAULT_ADDRESS})",
    )
    group.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help=f"a file holding the server's token (default: ${TOKEN_ENV}, if set)",
    )
    group.add_argument("--tls", action="store_true", help="connect with TLS (system CAs)")
    group.add_argument(
        "--tls-ca", type=Path, metavar="PATH", help="connect with TLS, trusting this PEM CA file"
    )

    def add(name: str, command: _Command, help_text: str, description: str) -> Any:
        parser = subparsers.add_parser(
            name, parents=[remote], help=help_text, description=description
        )
        parser.set_defaults(handler=_handler(command))
        return parser

    p = add(
        "start",
        _start,
        "start services and show their state until healthy or failed",
        "Start services (default: every configured one) and their dependencies, showing each "
        "service's state live until they are healthy (exit 0) or one failed (exit 1).",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="services to start")

    p = add(
        "stop",
        _stop,
        "stop services",
        "Stop services (default: all), dependents before their dependencies.",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="services to stop")

    p = add(
        "status",
        _status,
        "the server's health and each service's state",
        "Show overall health and each service's state. Exits 0 when healthy, 1 when a "
        "service is starting, failed or fails its probe.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = add("logs", _logs, "a service's log lines", "Print a service's buffered log lines.")
    p.add_argument("name", metavar="NAME", help="the service")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("--tail", type=_count, metavar="N", help="only the last N buffered lines")

    p = add(
        "submit",
        _submit,
        "submit a task; print its id",
        "Submit a task to HANDLER and print its id. With --wait, also wait for it: print its "
        "result as JSON and exit 0, or exit 1 when it failed, timed out or was cancelled.",
    )
    # Not "handler": that name holds the function that runs the command.
    p.add_argument("task_handler", metavar="HANDLER", help="the task's handler")
    p.add_argument(
        "payload",
        nargs="?",
        type=_payload,
        metavar="PAYLOAD",
        help="the payload as JSON text; - reads it from stdin (default: null)",
    )
    p.add_argument(
        "--class",
        dest="task_class",
        default="cpu_short",
        metavar="CLASS",
        help="the task class (default: %(default)s)",
    )
    p.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    p.add_argument(
        "--needs", action="append", default=[], metavar="SERVICE", help="a required service"
    )
    p.add_argument("--task-id", help="the id (submitting the same id twice is one task)")
    p.add_argument("--max-attempts", type=int, metavar="N", help="starts allowed, retries included")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="the task's run timeout")
    p.add_argument("--wait", action="store_true", help="wait for the task to finish")

    p = add(
        "task",
        _task,
        "a task's status",
        "Show a task's status. With --wait, once it has finished: exit 0 if it succeeded, "
        "1 otherwise.",
    )
    p.add_argument("task_id", metavar="ID")
    p.add_argument("--wait", action="store_true", help="wait for the task to finish")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = add(
        "cancel",
        _cancel,
        "cancel a task",
        "Cancel a task that has not finished, and print its state once it has stopped.",
    )
    p.add_argument("task_id", metavar="ID")

    p = add(
        "events",
        _events,
        "the server's events",
        "Print the events the server still holds, one per line, and exit; with -f, keep "
        "printing new ones until interrupted.",
    )
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    p.add_argument(
        "--type",
        dest="types",
        action="append",
        default=[],
        type=_event_types,
        metavar="TYPE",
        help="only events of this type (repeatable, or comma-separated): task_completed, ...",
    )
    p.add_argument("--since", type=int, default=0, metavar="SEQ", help="only events after this seq")
    p.add_argument("--json", action="store_true", help="one JSON object per line")


# -- running a command against the server ---------------------------------------------


def _handler(command: _Command) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        return _run(command, args)

    return handler


def _run(command: _Command, args: argparse.Namespace) -> int:
    try:
        from dspy_infra.infra import AgentInfra  # noqa: PLC0415 - keeps `config` commands light
        from dspy_infra.remote import ServerUnavailable  # noqa: PLC0415 - the grpc extra
    except ImportError as exc:
        raise CommandError(
            f"this command needs the grpc extra: pip install 'dspy-infra[grpc]' ({exc})"
        ) from None
    address = args.address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS
    token = read_token(args.token_file)
    tls = _tls(args)

    async def main() -> int:
        async with AgentInfra.connect(address, token=token, tls=tls) as infra:
            return await command(infra, args)

    try:
        return ungrouped(anyio.run, main)
    except ServerUnavailable as exc:
        # The library's message is for every caller; how to give a token, or
        # to connect with TLS, is the command line's.
        message = str(exc)
        if exc.token_refused:
            message = f"{message} (give its token with --token-file PATH or ${TOKEN_ENV})"
        elif exc.plain_text:
            message = f"{message} (--tls, or --tls-ca FILE for a self-signed certificate)"
        elif exc.untrusted_certificate:
            message = f"{message} (--tls-ca FILE, the CA file that signed it)"
        elif exc.no_tls:
            message = f"{message} (leave out --tls and --tls-ca)"
        raise CommandError(message, code=EXIT_NO_SERVER) from None
    except (UnknownTask, UnknownService) as exc:
        raise CommandError(str(exc), code=EXIT_NOT_FOUND) from None
    except (InvalidTask, UnknownEventType) as exc:
        raise CommandError(str(exc), code=EXIT_USAGE) from None


def _tls(args: argparse.Namespace) -> ssl.SSLContext | bool:
    """What ``AgentInfra.connect`` takes as ``tls``: a context trusting ``--tls-ca``,
    else whether ``--tls`` was given (True: the system's CAs)."""
    if args.tls_ca is None:
        return bool(args.tls)
    from dspy_infra.remote.client import tls_context  # noqa: PLC0415 - the grpc extra, imported

    try:
        return tls_context(args.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise CommandError(f"cannot load the TLS CA file: {exc}", code=EXIT_USAGE) from None


def _out() -> Console:
    # Made per call, so that it writes to the sys.stdout of the moment (tests capture it).
    return Console(highlight=False, soft_wrap=False)


def _print_json(value: Any) -> None:
    text = json.dumps(value, ensure_ascii=False, default=str)
    # A lone surrogate (a file name that is not UTF-8, as Python decodes it)
    # cannot be written as UTF-8; in JSON text it is only ever inside a
    # string, where its backslash escape is its JSON escape.
    print(text.encode("utf-8", "backslashreplace").decode("utf-8"), flush=True)


# -- services ----------------------------------------------------------------------------

_STATE_STYLE = {
    "healthy": "green",
    "running": "green",
    "completed": "green",
    "failed": "bold red",
    "unhealthy": "red",
    "waiting": "yellow",
    "starting": "yellow",
    "restarting": "yellow",
}


def _services_table(statuses: Mapping[str, ServiceStatus]) -> Table:
    table = Table("SERVICE", "STATE", "PORTS", "PID", "RESTARTS", "MESSAGE", box=None)
    for s in statuses.values():
        style = _STATE_STYLE.get(s.state.value, "")
        ports = " ".join(f"{k}={s.host}:{v}" for k, v in s.ports.items())
        # Text, not markup: a message quotes what a service printed ("[/etc/app.conf] missing").
        table.add_row(
            Text(s.name),
            Text(s.state.value, style=style),
            Text(ports),
            Text(str(s.pid or "")),
            str(s.restarts),
            Text(s.message),
        )
    return table


async def _start(infra: RemoteAgentInfra, args: argparse.Namespace) -> int:
    names = args.names or infra.services.list()
    if not names:
        print("no services are configured", file=sys.stderr)
        return EXIT_OK
    done = anyio.Event()
    failure: Exception | None = None

    async def start() -> None:
        nonlocal failure
        try:
            await infra.services.start(names)
        except Exception as exc:  # noqa: BLE001 - raised again below, outside the task group
            failure = exc
        finally:
            done.set()

    # The start call returns once every service is up or one failed; a
    # terminal meanwhile sees what each is doing, as the server sees it. The
    # live table goes when it ends (and is first drawn after a poll, by when
    # a call refused as a whole, for an unknown name, has failed): that call
    # prints its error alone, the others the final table.
    out = _out()
    if out.is_terminal:
        with Live(console=out, auto_refresh=False, transient=True) as live:
            async with anyio.create_task_group() as tg:
                tg.start_soon(start)
                while True:
                    with anyio.move_on_after(POLL):
                        await done.wait()
                    if done.is_set():
                        break
                    live.update(_services_table(await infra.services.status()), refresh=True)
    else:
        await start()
    if failure is not None and not isinstance(failure, ServiceStartError):
        raise failure
    out.print(_services_table(await infra.services.status()))
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


async def _stop(infra: RemoteAgentInfra, args: argparse.Namespace) -> int:
    await infra.services.stop(args.names or None)
    _out().print(_services_table(await infra.services.status(args.names or None)))
    return EXIT_OK


async def _status(infra: RemoteAgentInfra, args: argparse.Namespace) -> int:
    from dspy_infra.remote import UnsupportedCall  # noqa: PLC0415 - the grpc extra, imported late

    report = await infra.health_check()
    classes: Mapping[str, ClassStatus] | None = None
    with contextlib.suppress(UnsupportedCall):  # an older server: the rest still shows
        classes = await infra.task_classes()
    if args.json:
        _print_json(
            {
                "address": infra.address,
                "status": report.status,
                "services": {n: _service_json(s) for n, s in report.services.items()},
                "classes": None
                if classes is None
                else {n: c.to_json() for n, c in classes.items()},
            }
        )
    else:
        out = _out()
        style = "green" if report.healthy else "red"
        out.print(f"{infra.address}: [{style}]{report.status}[/]")
        if report.services:
            out.print(_services_table(report.services))
        if classes is not None:
            out.print(_classes_table(classes))
        else:
            out.print("task classes: not served by this server (older than this command)")
    return EXIT_OK if report.healthy else EXIT_FAILURE


def _classes_table(classes: Mapping[str, ClassStatus]) -> Table:
    table = Table("CLASS", "RUNNER", "LIMIT", "RUNNING", "QUEUED", box=None)
    for c in classes.values():
        # An adaptive limit moves with the load: marked, so a reader knows.
        limit = f"{c.limit} (adaptive)" if c.adaptive else str(c.limit)
        table.add_row(Text(c.name), c.runner, limit, str(c.running), str(c.queued))
    return table


def _service_json(s: ServiceStatus) -> dict[str, Any]:
    return {
        "state": s.state.value,
        "host": s.host,
        "ports": dict(s.ports),
        "pid": s.pid,
        "restarts": s.restarts,
        "exit_code": s.exit_code,
        "message": s.message,
    }


async def _logs(infra: RemoteAgentInfra, args: argparse.Namespace) -> int:
    # Plain print: a log line is the service's text, never rich markup.
    lines = infra.services.logs(args.name, follow=args.follow, tail=args.tail)
    async with aclosing(lines):
        async for line in lines:
            print(line, flush=args.follow)
    return EXIT_OK


# -- tasks ---------------------------------------------------------------------------------


def _count(text: str) -> int:
    # An argparse type: a negative count is a usage error (exit 2).
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {count}")
    return count


def _payload(text: str) -> Any:
    # An argparse type: a bad payload is a usage error (exit 2) before any
    # connection is made, and stdin is read before the event loop runs.
    if text == "-":
        text = sys.stdin.read()
    try:
        payload = json.loads(text)
    except RecursionError:  # argparse turns only ValueError and TypeError into usage errors
        raise argparse.ArgumentTypeError(
            "the payload is not JSON: it is nested too deeply"
        ) from None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"the payload is not JSON: {exc}") from None
    try:
        # What Python's decoder takes beyond JSON (NaN, 1e400 read as inf),
        # refused here in the words of the client's own check.
        encode_json(payload, "the payload")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return payload


async def _submit(infra: RemoteAgentInfra, args: argparse.Namespace) -> int:
    handle = await infra.submit_task(
        args.task_handler,
        args.payload,
        task_class=args.task_class,
        priority=args.priority,
        needs=args.needs,
        task_id=args.task_id,
        max_attempts=args.max_attempts,
        timeout=args.timeout,
    )
    print(handle.task_id, flush=True)
    if not args.wait:
        return EXIT_OK
    with Console(stderr=True).status(f"waiting for {handle.task_id}"):
        status = await handle.wait()
    return _outcome(status, print_result=True)


def _outcome(status: TaskStatus, *, print_result: bool) -> int:
    if status.state.value == "succeeded":
        if print_result:
            _print_json(status.result)
        return EXIT_OK
    detail = f": {status.error}" if status.error else ""
    print(f"error: task {status.task_id} {status.state.value}{detail}", file=sys.stderr)
    return EXIT_FAILURE


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="milliseconds")


def _task_json(status: TaskStatus) -> dict[str, Any]:
    return {
        "task_id": status.task_id,
        "handler": status.handler,
        "task_class": status.task_class,
        "state": status.state.value,
        "priority": status.priority,
        "attempts": status.attempts,
        "max_attempts": status.max_attempts,
        "needs": list(status.needs),
        "workflow_id": status.workflow_id,
        "submitted_at": status.submitted_at,
        "started_at": status.started_at,
        "finished_at": status.finished_at,
        "result": status.result,
        "error": status.error,
        "gpus": list(status.gpus),
    }


async def _task(infra: RemoteAgentInfra, args: argparse.Namespace) -> int:
    if args.wait:
        with Console(stderr=True).status(f"waiting for {args.task_id}"):
            status = await infra.task_handle(args.task_id).wait()
    else:
        status = await infra.get_task_status(args.task_id)
    if args.json:
        _print_json(_task_json(status))
    else:
        table = Table.grid(padding=(0, 2))
        rows = {
            "task": status.task_id,
            "state": status.state.value,
            "handler": status.handler,
            "class": status.task_class,
            "priority": str(status.priority),
            "attempts": f"{status.attempts} of {status.max_attempts}",
            "needs": ", ".join(status.needs),
            "workflow": status.workflow_id or "",
            "gpus": ", ".join(status.gpus),
            "submitted": _when(status.submitted_at),
            "started": _when(status.started_at),
            "finished": _when(status.finished_at),
            "result": "" if status.result is None else json.dumps(status.result),
            "error": status.error or "",
        }
        for key, value in rows.items():
            if value:
                table.add_row(Text(key, style="bold"), Text(value))
        _out().print(table)
    if args.wait:
        return _outcome(status, print_result=False)
    return EXIT_OK


async def _cancel(infra: RemoteAgentInfra, args: argparse.Namespace) -> int:
    status = await infra.cancel_task(args.task_id)
    print(f"{status.task_id}: {status.state.value}")
    return EXIT_OK


# -- events ---------------------------------------------------------------------------------


def _event_json(event: Event) -> dict[str, Any]:
    """Every field of the event, ``seq``, ``time`` and ``type`` first.

    Read from the event's class, not listed here: a kept list left out what
    a kind of event added (a workflow event's run_id and step).
    """
    data: dict[str, Any] = {"seq": event.seq, "time": event.time, "type": event.type}
    for key, value in attrs.asdict(event, recurse=False).items():
        data.setdefault(key, list(value) if isinstance(value, tuple) else value)
    return data


def _event_line(event: Event) -> str:
    """One line per event, whatever it holds: a result is JSON, and so is a text
    that would break the line (an error with the task's output in it), so that
    ``grep`` and ``wc -l`` count events and no output can pass for one."""
    data = _event_json(event)
    when = datetime.fromtimestamp(event.time).strftime("%H:%M:%S.%f")[:-3]
    skip = {"seq", "time", "type", "task_class", "workflow_id", "dependents"}
    shown = {k: v for k, v in data.items() if k not in skip and v not in (None, "", [])}
    rest = " ".join(f"{k}={_one_line(k, v)}" for k, v in shown.items())
    return f"{event.seq:>7} {when} {event.type:<18} {rest}".rstrip()


def _one_line(key: str, value: Any) -> Any:
    if key == "result" or (isinstance(value, str) and not value.isprintable()):
        return json.dumps(value)
    return value


def _event_types(text: str) -> list[str]:
    # An argparse type: a type that no part publishes is a usage error (exit
    # 2) before any connection is made, where `-f` would wait for it forever.
    types = [t.strip() for t in text.split(",") if t.strip()]
    if not types:  # an empty shell variable, say: no --type at all means every type
        raise argparse.ArgumentTypeError(f"expected an event type, got {text!r}")
    try:
        check_event_types(types)
    except UnknownEventType as exc:
        raise argparse.ArgumentTypeError(exc.reason) from None
    return types


async def _events(infra: RemoteAgentInfra, args: argparse.Namespace) -> int:
    types = {t for given in args.types for t in given}
    events = infra.stream_events(types or None, since=args.since, follow=args.follow)
    async with aclosing(events):
        async for event in events:
            if args.json:
                _print_json(_event_json(event))
            else:
                print(_event_line(event), flush=args.follow)
    return EXIT_OK
