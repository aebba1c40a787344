"""``{placeholder}`` substitution in commands, environment, cwd and probes.

One renderer serves both validation (against a context made from the
configuration, at load time) and the real substitution (against the chosen
ports, at start time), so whatever validates also renders.

Grammar: ``{port}``, ``{ports.NAME}``, ``{host}``, ``{name}``,
``{state_dir}``, ``{service_dir}``, ``{services.OTHER.port}``,
``{services.OTHER.ports.NAME}``, ``{services.OTHER.host}``; ``{{`` and
``}}`` are literal braces.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from attrs import field, frozen

__all__ = [
    "HANDLER_PLACEHOLDERS",
    "Endpoint",
    "PlaceholderError",
    "RenderContext",
    "render",
    "render_handler",
    "substitute",
]

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
KNOWN = (
    "{port}, {ports.NAME}, {host}, {name}, {state_dir}, {service_dir}, "
    "{services.NAME.port}, {services.NAME.ports.NAME}, {services.NAME.host}"
)


class PlaceholderError(ValueError):
    """A template names a placeholder that cannot be filled."""


# What a [handlers.NAME] command may name: one attempt's files and ids.
HANDLER_PLACEHOLDERS = ("payload_file", "result_file", "task_id", "attempt", "work_dir")
_HANDLER_KNOWN = ", ".join(f"{{{name}}}" for name in HANDLER_PLACEHOLDERS)


def render_handler(template: str, values: Mapping[str, str]) -> str:
    """A handler command's ``template`` with ``values`` (of HANDLER_PLACEHOLDERS) filled in.

    Checked when the configuration loads (with stand-in values), so that a
    misspelt placeholder is a ConfigError then, not a refusal of every task.
    """

    def lookup(ref: str) -> str:
        try:
            return values[ref]
        except KeyError:
            raise PlaceholderError(
                f"unknown placeholder {{{ref}}} (known: {_HANDLER_KNOWN})"
            ) from None

    return substitute(template, lookup)


@frozen
class Endpoint:
    """Where a service can be reached: its host and named ports."""

    host: str
    ports: Mapping[str, int] = field(factory=dict)

    def port(self, owner: str) -> int:
        """The service's port when it has one obvious port (the only one, or ``main``)."""
        if len(self.ports) == 1:
            return next(iter(self.ports.values()))
        if "main" in self.ports:
            return self.ports["main"]
        if not self.ports:
            raise PlaceholderError(f"{owner} declares no ports")
        names = ", ".join(sorted(self.ports))
        raise PlaceholderError(
            f"{owner} has several ports ({names}) and none named 'main': use {{ports.NAME}}"
        )

    def named_port(self, name: str, owner: str) -> int:
        try:
            return self.ports[name]
        except KeyError:
            names = ", ".join(sorted(self.ports)) or "none"
            raise PlaceholderError(f"{owner} has no port {name!r} (ports: {names})") from None


@frozen
class RenderContext:
    """What a service's templates can refer to."""

    name: str
    own: Endpoint
    state_dir: str
    service_dir: str
    services: Mapping[str, Endpoint] = field(factory=dict)


def _lookup(ref: str, ctx: RenderContext) -> str:
    parts = ref.split(".")
    if parts[0] == "services" and len(parts) >= 3:
        other = parts[1]
        endpoint = ctx.services.get(other)
        if endpoint is None:
            raise PlaceholderError(
                f"{{{ref}}} refers to {other!r}, which is not among this service's "
                "dependencies (add it to depends_on)"
            )
        return _endpoint_field(endpoint, parts[2:], f"service {other!r}", ref)
    plain = {"name": ctx.name, "state_dir": ctx.state_dir, "service_dir": ctx.service_dir}
    if len(parts) == 1 and parts[0] in plain:
        return plain[parts[0]]
    return _endpoint_field(ctx.own, parts, "this service", ref)


def _endpoint_field(endpoint: Endpoint, parts: list[str], owner: str, ref: str) -> str:
    match parts:
        case ["port"]:
            return str(endpoint.port(owner))
        case ["ports", port_name]:
            return str(endpoint.named_port(port_name, owner))
        case ["host"]:
            return endpoint.host
    raise PlaceholderError(f"unknown placeholder {{{ref}}} (known: {KNOWN})")


def render(template: str, ctx: RenderContext) -> str:
    """Fill ``template``'s placeholders from ``ctx``; raise PlaceholderError naming the bad one."""
    return substitute(template, lambda ref: _lookup(ref, ctx))


def substitute(template: str, lookup: Callable[[str], str]) -> str:
    """Replace each ``{name}`` with ``lookup(name)``; ``{{`` and ``}}`` are literal braces.

    ``lookup`` raises PlaceholderError for a name it does not know.
    """

    def replace(match: re.Match[str]) -> str:
        text = match.group(0)
        if text in ("{{", "}}"):
            return text[0]
        ref = match.group(1)
        if ref is None:
            raise PlaceholderError(
                f"unmatched {text!r} in {template!r} (write {text * 2} for a literal)"
            )
        return lookup(ref.strip())

    return _TOKEN.sub(replace, template)
