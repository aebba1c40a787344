"""The gRPC server: one :class:`~dspy_infra.AgentInfra`, served with grpclib.

::

    async with AgentInfra.start(config) as infra, serve(infra, "127.0.0.1:50052") as server:
        await anyio.sleep_forever()

Security: the server binds loopback by default. Any other address is refused
unless both TLS (``tls``) and a ``token`` are given; a token, when given, is
checked on every call (``authorization: Bearer <token>``, compared in
constant time), and a call without it is UNAUTHENTICATED. A request message
over :func:`max_request_bytes` is RESOURCE_EXHAUSTED, refused on the size it
announces, before its body is read.

Errors: the library's exceptions become statuses — :class:`InvalidTask`,
:class:`InvalidWorkflow` and :class:`UnknownEventType` are INVALID_ARGUMENT,
:class:`UnknownTask`, :class:`UnknownService`, :class:`UnknownWorkflow` and
:class:`UnknownRun` NOT_FOUND, any other :class:`InfraError`
FAILED_PRECONDITION — with the library's message, and the exception's class
in the trailing metadata so that :mod:`dspy_infra.remote.client` raises the
same type. Anything else is a bug: it is logged here with its traceback,
and the client gets INTERNAL with a message that says nothing of the
server's insides.

Besides ``orchestrator.v1`` and ``env_manager.v1``, the server answers the
standard ``grpc.health.v1.Health`` (SERVING while the instance is open, the
server is not closing and every active service is up; per gRPC service name
and per configured service name too) and server reflection (v1 and v1alpha),
which describes every service it serves from the descriptors generated with
the code. Both go through the token check like every other call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import socket
import ssl
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from contextlib import aclosing, asynccontextmanager
from typing import TYPE_CHECKING, Any, NamedTuple, cast
from urllib.parse import quote

import anyio
import betterproto2
from attrs import frozen
from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.health.check import CheckBase
from grpclib.health.service import OVERALL, Health
from grpclib.health.v1 import health_pb2
from grpclib.metadata import encode_grpc_message
from grpclib.protocol import H2Protocol
from grpclib.reflection.service import ServerReflection
from grpclib.reflection.v1 import reflection_pb2 as reflection_v1
from grpclib.reflection.v1alpha import reflection_pb2 as reflection_v1alpha
from grpclib.server import Server, Stream
from h2.settings import SettingCodes

from dspy_infra._sockets import bind_all
from dspy_infra.errors import (
    ConfigError,
    DependencyFailed,
    InfraClosed,
    InfraError,
    InvalidTask,
    ServiceError,
    ServiceStartError,
    TaskError,
    UnknownEventType,
    UnknownService,
    UnknownTask,
)
from dspy_infra.remote import _convert as convert
from dspy_infra.remote._generated.env_manager import v1 as env_pb
from dspy_infra.remote._generated.google_proto_descriptor_pool import (
    default_google_proto_descriptor_pool,
)
from dspy_infra.remote._generated.orchestrator import v1 as orch_pb
from dspy_infra.remote._wire import (
    BASES_KEY,
    DEFAULT_ADDRESS,
    DETAIL_KEY,
    ERROR_KEY,
    RUN_KEY,
    SERVICE_KEY,
    TASK_KEY,
    TOKEN_KEY,
    WORKFLOW_KEY,
    format_address,
    is_loopback,
    parse_address,
    token_error,
)
from dspy_infra.scheduling.checks import refused
from dspy_infra.services.logs import LinesDropped
from dspy_infra.workflows.model import WorkflowEvent
from dspy_infra.workflows.spec import InvalidWorkflow, UnknownRun, UnknownWorkflow, WorkflowSpec

if TYPE_CHECKING:
    from grpclib._typing import IServable

    from dspy_infra.infra import AgentInfra

__all__ = ["DEFAULT_ADDRESS", "RemoteServer", "check_serving", "max_request_bytes", "serve"]

log = logging.getLogger("dspy_infra.remote")

# How often a Watch of grpc.health.v1.Health looks at the instance again.
HEALTH_WATCH_INTERVAL = 1.0
# The calls a client may have open at once on one connection: no cap, as
# gRPC's own servers set none. h2's default of 100 made the 101st call (a
# status, or the submit that would end them) wait for one of 100 followed
# streams to close, for ever. What a call holds is bounded by itself (its
# request's size, an event subscription's buffer), and the token is what
# keeps strangers from opening them.
MAX_CONCURRENT_CALLS = 2**31 - 1
# How long a shutdown waits for the calls it cancelled to end and the
# connections to close before it drops those still open (see _Server.shut_down).
SHUTDOWN_GRACE = 5.0

# The server reads a request message this large whatever the configuration
# (a larger max_payload_bytes raises it): a SubmitTasks batch of 64 payloads
# of the default largest size, a workflow spec of thousands of steps. gRPC's
# own default, 4 MiB, would refuse a batch of four such payloads.
MIN_MAX_REQUEST_BYTES = 64 << 20
# What a request holds besides its one payload (ids, names, resources), with room to spare.
_REQUEST_OVERHEAD = 1 << 20


def max_request_bytes(max_payload_bytes: int) -> int:
    """The largest request message a server of an instance with this ``max_payload_bytes`` reads.

    Never less than one SubmitTask of the largest payload the instance
    accepts, so that the limit refuses no task the instance would take. A
    SubmitTasks batch or a workflow spec has no bound in the configuration:
    they get MIN_MAX_REQUEST_BYTES at least, and a larger batch is split by
    its caller.
    """
    return max(MIN_MAX_REQUEST_BYTES, max_payload_bytes + _REQUEST_OVERHEAD)


@frozen
class RemoteServer:
    """A server that is listening: ``address`` is where (the port chosen, if 0 was asked)."""

    address: str
    tls: bool
    authenticated: bool


@asynccontextmanager
async def serve(
    infra: AgentInfra,
    address: str = DEFAULT_ADDRESS,
    *,
    token: str | None = None,
    tls: ssl.SSLContext | bool | None = None,
) -> AsyncIterator[RemoteServer]:
    """Serve ``infra`` on ``address`` until the block ends; then close every call and the socket.

    ``tls`` is a server TLS context (its certificate loaded, ALPN ``h2``
    offered), or None or False for plain text. Raises
    :class:`~dspy_infra.errors.ConfigError`, binding nothing, for a ``tls``
    that is neither, for an address that is not loopback without both
    ``tls`` and ``token``, and :class:`OSError` if the address cannot be bound.
    """
    host, port = await check_serving(address, token=token, tls=tls)
    tls = _server_tls(tls)
    guard = _Guard(token, max_request_bytes(infra.config.infra.max_payload_bytes))
    server = _Server([guard.wrap(s) for s in _services(infra, guard)], codec=_Codec())
    socks = await bind_all(host or "0.0.0.0", port)  # noqa: S104 - refused above without TLS and token
    try:
        await server.listen(socks, tls)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    bound_host, bound_port = socks[0].getsockname()[:2]
    listening = RemoteServer(
        address=format_address(bound_host, bound_port),
        tls=tls is not None,
        authenticated=token is not None,
    )
    log.info("serving on %s (tls: %s, token: %s)", listening.address, listening.tls, bool(token))
    try:
        yield listening
    finally:
        guard.closing = True  # from now on, a call is UNAVAILABLE
        with anyio.CancelScope(shield=True):
            await server.shut_down()


async def check_serving(
    address: str, *, token: str | None = None, tls: ssl.SSLContext | bool | None = None
) -> tuple[str, int]:
    """What :func:`serve` checks before it binds: the host and port, or ConfigError.

    For a caller that has more to start first (``dspy-infra serve``), so that
    a mistake is reported before anything started.
    """
    host, port = parse_address(address)
    if problem := token_error(token):
        raise ConfigError(problem)
    context = _server_tls(tls)
    if not await is_loopback(host) and (context is None or token is None):
        raise ConfigError(
            f"refusing to serve on {address}: it is not a loopback address, and any other "
            "address needs TLS and a token (give both a certificate and a token, "
            "or bind 127.0.0.1)"
        )
    return host, port


class _Methods(dict[str, Handler]):
    """grpclib's table of methods, answering a method it lacks with a handler
    that refuses it: UNIMPLEMENTED, as grpclib answers it itself, but through
    a call's own answer, which grpclib's client reads. grpclib's own answer
    lacks the content-type header, which that client reads first (and
    reports as "UNKNOWN: Missing content-type header"): a client newer than
    this server could not tell that the server lacks the call it made."""

    def get(self, path: str, default: Handler | None = None) -> Handler | None:  # type: ignore[override]
        found = super().get(path, default)
        if found is not None:
            return found

        async def unknown(stream: Stream[Any, Any]) -> None:
            raise GRPCError(Status.UNIMPLEMENTED, f"this server has no method {path}")

        return Handler(unknown, Cardinality.UNARY_UNARY, None, None)


def _server_tls(tls: object) -> ssl.SSLContext | None:
    """``tls`` as a context, or None for plain text; ConfigError for what is neither."""
    if isinstance(tls, ssl.SSLContext):
        return tls
    if tls is None or tls is False:
        return None
    raise ConfigError(
        "tls must be an ssl.SSLContext (a server context, its certificate loaded), "
        f"or None or False (plain text), got {tls!r}"
    )


class _Server(Server):
    """grpclib's server, closing the connections it accepted when it shuts down.

    grpclib's ``close()`` stops listening and cancels the calls in progress,
    but leaves each client's connection open, taking new calls; and from
    Python 3.12, asyncio's ``wait_closed()`` waits for those connections to
    close, which a client that stays connected never does.
    """

    def __init__(self, handlers: list[IServable], *, codec: ProtoCodec):
        super().__init__(handlers, codec=codec)
        self._mapping = _Methods(self._mapping)
        self._protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()
        self._more: list[asyncio.AbstractServer] = []  # listening beside grpclib's own

    async def listen(self, socks: list[socket.socket], tls: ssl.SSLContext | None) -> None:
        """Serve on each of ``socks``: grpclib's ``start()`` takes one socket."""
        loop = asyncio.get_running_loop()
        try:
            for sock in socks[1:]:
                self._more.append(
                    await loop.create_server(self._protocol_factory, sock=sock, ssl=tls)
                )
            await self.start(sock=socks[0], ssl=tls)
        except BaseException:
            for server in self._more:
                server.close()
            raise

    def _protocol_factory(self) -> H2Protocol:
        made = super()._protocol_factory()  # grpclib's, with its call handler registered
        protocol = _Protocol(made.handler, made.config, made.h2_config)
        self._protocols.add(protocol)
        return protocol

    async def shut_down(self) -> None:
        """Stop listening; cancel the calls in progress and let them end (with
        UNAVAILABLE: see _Guard); then close every connection.

        What is written to a client that stopped reading (its process
        stopped, its machine gone) waits for room for ever, once the socket
        is full: a call's last words, then the closing of its connection.
        So the connections still open after SHUTDOWN_GRACE are dropped, as
        gRPC's own servers drop theirs once a stop's grace has passed.
        """
        self.close()
        for server in self._more:
            server.close()
        # Taken now: closing a connection forgets its transport.
        transports = [t for p in list(self._protocols) if (t := _transport(p)) is not None]
        with anyio.move_on_after(SHUTDOWN_GRACE) as grace:
            await self._end_calls_and_connections()
        if grace.cancelled_caught:
            log.warning(
                "dropping the connections still open %g s after the shutdown began "
                "(a client that reads nothing)",
                SHUTDOWN_GRACE,
            )
            for transport in transports:
                transport.abort()  # their calls are cancelled, and their writes end
            await self._end_calls_and_connections()

    async def _end_calls_and_connections(self) -> None:
        async with anyio.create_task_group() as group:
            for handler in self._handlers:
                group.start_soon(handler.wait_closed)
        for protocol in list(self._protocols):
            connection = getattr(protocol, "connection", None)  # made once it is connected
            if connection is not None:
                connection.close()
        await self.wait_closed()
        for server in self._more:
            await server.wait_closed()


class _Protocol(H2Protocol):
    """grpclib's connection, taking up to MAX_CONCURRENT_CALLS calls at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stand-in, not a subclass: it passes everything else on as it is.
        super().connection_made(cast("asyncio.BaseTransport", _QuietTransport(transport)))
        # The settings grpclib sends first say 100 (h2's default): these
        # follow them at once, before any call of the client's is read.
        self.connection._connection.update_settings(
            {SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_CALLS}
        )
        self.connection.flush()


class _QuietTransport:
    """A connection's transport, for grpclib, which drops what is written once it is closing.

    grpclib's calls write on as long as they run: to a client gone (killed,
    say) while they were sending, every write made asyncio log
    "socket.send() raised exception.", once per call and event. What is
    written to a closing transport is dropped by asyncio all the same.
    """

    def __init__(self, transport: asyncio.BaseTransport):
        self._transport = cast("asyncio.Transport", transport)
        # Under TLS, the socket's own transport (asyncio's, private): the TLS
        # one is told of a lost connection a turn of the loop later, and what
        # is written meanwhile reaches the socket's, which logs as above.
        ssl_protocol = getattr(transport, "_ssl_protocol", None)
        self._socket: asyncio.BaseTransport = getattr(ssl_protocol, "_transport", None) or transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not (self._transport.is_closing() or self._socket.is_closing()):
            self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _transport(protocol: H2Protocol) -> asyncio.Transport | None:
    """The transport of a connection made (and not yet closed), else None."""
    connection = getattr(protocol, "connection", None)
    transport: asyncio.Transport | None = getattr(connection, "_transport", None)
    return transport


def _services(infra: AgentInfra, guard: _Guard) -> list[IServable]:
    """Ours, grpc.health.v1.Health, and reflection over all of them."""
    ours: list[IServable] = [_Orchestrator(infra), _EnvManager(infra)]
    overall = _Check(lambda: _overall_health(infra, guard))
    checks: dict[Any, list[CheckBase]] = {OVERALL: [overall]}
    checks.update({service: [overall] for service in ours})
    for name in infra.services.list():
        if "/" not in name:  # health names a service by a route's middle part
            probe = functools.partial(_service_health, infra, guard, name)
            checks.setdefault(_Named(name), [_Check(probe)])
    health = Health(checks)
    # Reflection lists itself too, as gRPC's own servers do: grpclib's lists
    # what it is given, which names are enough for (and left out of what is served).
    itself = [_Named(file.services_by_name["ServerReflection"].full_name) for file in _REFLECTION]
    served = ServerReflection.extend([*ours, health, *itself], pool=_Descriptors(_descriptors()))
    return [s for s in served if not isinstance(s, _Named)]


# grpc.reflection.v1's and v1alpha's protocol files, as grpclib serves them.
_REFLECTION = (reflection_v1.DESCRIPTOR, reflection_v1alpha.DESCRIPTOR)


def _descriptors() -> Any:  # a google.protobuf DescriptorPool (protobuf ships no types)
    """The generated descriptors, with grpc.health.v1's and reflection's (which it lacks)
    added once."""
    pool = default_google_proto_descriptor_pool
    for file in (health_pb2.DESCRIPTOR, *_REFLECTION):
        try:
            pool.FindFileByName(file.name)
        except KeyError:
            pool.AddSerializedFile(file.serialized_pb)
    return pool


class _Descriptors:
    """A descriptor pool that also finds the file of a method, for reflection.

    The reflection protocol names a method ``package.Service.Method``
    (``grpcurl describe`` asks for one so), and protobuf's upb pool resolves
    the service's name but not its methods': such a query was NOT_FOUND.
    Everything else is the pool's own.
    """

    def __init__(self, pool: Any):
        self._pool = pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:  # noqa: N802 - protobuf's name
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name)
            except KeyError:
                service = None
            if service is None or method not in service.methods_by_name:
                raise
            return service.file


async def _overall_health(infra: AgentInfra, guard: _Guard) -> bool:
    # The instance is open (its scheduler, opened before and closed after it
    # is, with it) and every active service is up.
    if guard.closing:
        return False
    try:
        return (await infra.health_check()).healthy
    except InfraClosed:
        return False


async def _service_health(infra: AgentInfra, guard: _Guard, name: str) -> bool:
    if guard.closing:
        return False
    try:
        statuses = await infra.services.status([name])
    except InfraClosed:
        return False
    return statuses[name].healthy


class _Named:
    """A service that is a name only: a key of Health's checks (a configured service),
    or one that reflection lists."""

    def __init__(self, name: str):
        self._name = name

    def __mapping__(self) -> dict[str, Any]:
        return {f"/{self._name}/": None}


class _Check(CheckBase):
    """A health check asked afresh by each Check call, and polled while a Watch follows it.

    (grpclib's ServiceCheck caches its answer for its polling interval, so
    that a Check right after a service failed would still say SERVING.)
    """

    def __init__(self, probe: Callable[[], Awaitable[bool]]):
        self._probe = probe
        self._value: bool | None = None
        self._events: set[asyncio.Event] = set()
        self._poll: asyncio.Task[None] | None = None

    def __status__(self) -> bool | None:
        return self._value

    async def __check__(self) -> bool | None:
        try:
            value = await self._probe()
        except Exception:
            log.exception("the health check failed")
            value = False
        if value != self._value:
            self._value = value
            for event in self._events:
                event.set()
        return value

    async def __subscribe__(self) -> asyncio.Event:
        await self.__check__()  # the first answer of a Watch is current, never UNKNOWN
        if self._poll is None:
            self._poll = asyncio.create_task(self._polling())
        event = asyncio.Event()
        self._events.add(event)
        return event

    async def __unsubscribe__(self, event: asyncio.Event) -> None:
        self._events.discard(event)
        if not self._events and self._poll is not None:
            poll, self._poll = self._poll, None
            poll.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poll

    async def _polling(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_WATCH_INTERVAL)
            await self.__check__()


class _Codec(ProtoCodec):
    """grpclib's codec, with bytes that are not the request refused before they are parsed.

    betterproto2's parser trusts its bytes: it keeps a field sent with another
    wire type than its own as it came (a number where a string belongs, which
    a handler would then trip on; for a message or bytes field, a number n
    that encoding turns into n bytes, so that six bytes could make the server
    allocate gigabytes), reads a length prefix longer than what follows as
    whatever follows, and keeps each unknown field by copying every one
    before it (quadratic in their number). So one pass over the bytes
    (:class:`_WireCheck`) comes first: it refuses, naming the field, one whose
    wire type is not its type's, one cut short, and a string that is not
    UTF-8, before betterproto2 sees any of it; and the unknown fields, which
    the server never reads, are taken out. Left to the parser then are bytes
    it reads right; whatever it raises besides is refused as not a valid
    message, but a MemoryError is the server's own failure, not the request's.
    """

    def decode(self, data: bytes, message_type: Any) -> Any:
        name = getattr(message_type, "__name__", "message")
        if isinstance(message_type, type) and issubclass(message_type, betterproto2.Message):
            check = _WireCheck(memoryview(data))
            if problem := check.problem(message_type):
                raise GRPCError(
                    Status.INVALID_ARGUMENT, f"the request is not a valid {name}: {problem}"
                )
            if check.unknown:
                data = _known_only(memoryview(data), message_type)
        # (Else one of grpc.health.v1's or reflection's messages, which protobuf parses.)
        try:
            return message_type.FromString(data)  # as grpclib's ProtoCodec decodes
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 - whatever else the parser raises, the input is bad
            raise GRPCError(Status.INVALID_ARGUMENT, f"the request is not a valid {name}") from None


# A varint holds at most 64 bits, 7 to a byte: 10 bytes, as betterproto2 reads it.
_VARINT_MAX_BYTES = 10
# Protobuf numbers a field from 1 to 2**29 - 1.
_MAX_FIELD_NUMBER = 2**29 - 1
_WIRE_START_GROUP, _WIRE_END_GROUP = 3, 4  # proto2's groups: only ever unknown fields here
_MAX_GROUP_DEPTH = 100
# The positions that _varint gives for bytes that end inside a varint, and
# for a varint over _VARINT_MAX_BYTES.
_CUT = -1
_TOO_LONG = -2


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; or 0 and _CUT or _TOO_LONG."""
    value = shift = 0
    for i in range(pos, min(end, pos + _VARINT_MAX_BYTES)):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    return 0, _CUT if end < pos + _VARINT_MAX_BYTES else _TOO_LONG


# The wire type that each proto type is sent as. Besides, a repeated number
# may come packed: length-delimited, as proto3 sends it.
_WIRE_TYPE_OF = {
    **dict.fromkeys(betterproto2.WIRE_VARINT_TYPES, betterproto2.WIRE_VARINT),
    **dict.fromkeys(betterproto2.WIRE_FIXED_32_TYPES, betterproto2.WIRE_FIXED_32),
    **dict.fromkeys(betterproto2.WIRE_FIXED_64_TYPES, betterproto2.WIRE_FIXED_64),
    **dict.fromkeys(betterproto2.WIRE_LEN_DELIM_TYPES, betterproto2.WIRE_LEN_DELIM),
}
_FIXED_SIZE = {betterproto2.WIRE_FIXED_64: 8, betterproto2.WIRE_FIXED_32: 4}
_PACKABLE = frozenset(betterproto2.PACKED_TYPES)
# Length-delimited, each element a field of its own: never packed together.
_NEVER_PACKED = frozenset(betterproto2.WIRE_LEN_DELIM_TYPES)
_MESSAGES = frozenset({betterproto2.TYPE_MESSAGE, betterproto2.TYPE_MAP})

# How each wire type reads in a refusal.
_WIRE_TYPES = {
    betterproto2.WIRE_VARINT: "a varint",
    betterproto2.WIRE_FIXED_64: "8 fixed bytes",
    betterproto2.WIRE_LEN_DELIM: "length-delimited bytes",
    betterproto2.WIRE_FIXED_32: "4 fixed bytes",
}


class _WireCheck:
    """One pass over a request's bytes, as protobuf's wire format reads them.

    :meth:`problem` says which field a message type cannot take from them,
    and why, or None: a field cut short (a length or a varint that runs past
    the end of its message, a varint over 10 bytes), one of a known number
    whose wire type is not its type's, a string that is not UTF-8, and the
    same within each message field. Each field is read once, and only a
    string is decoded (as UTF-8) and a message field looked into; nothing is
    kept but a count per repeated field, and the pass stops at the first
    problem. Then ``unknown`` tells whether it met a field that its type
    does not know.
    """

    def __init__(self, data: memoryview):
        self._data = data
        self.unknown = False

    def problem(
        self,
        message_type: type[betterproto2.Message],
        start: int = 0,
        end: int | None = None,
        *,
        number: str = "",
        path: str = "",
        within: str = "the message",
    ) -> str | None:
        """What is wrong with the message between ``start`` and ``end``, or None.

        ``number``, ``path`` and ``within`` say where the message is (``10.``,
        ``resources.``, ``field 10 (resources)``): at the top, nothing.
        """
        data = self._data
        end = len(data) if end is None else end
        # (betterproto2 types its classproperty for a Message's subclasses only.)
        meta = message_type._betterproto  # type: ignore[arg-type]
        counts: dict[int, int] = {}
        pos = start
        while pos < end:
            key = data[pos]
            key, after = (key, pos + 1) if key < 0x80 else _varint(data, pos, end)
            field_number, wire_type = key >> 3, key & 7
            if after < 0 or not 0 < field_number <= _MAX_FIELD_NUMBER:
                return f"{within} {_key_problem(after, field_number)} (at byte {pos})"
            name = meta.field_name_by_number.get(field_number)
            if name is None:  # left out (_known_only), never the problem unless cut short
                span = _span(data, after, end, wire_type, field_number)
                if isinstance(span, str):
                    return f"field {number}{field_number} {span}"
                self.unknown = True
                pos = span[1]
                continue
            field = meta.meta_by_field_name[name]
            nth = -1
            if field.repeated or field.proto_type == betterproto2.TYPE_MAP:  # an entry a field
                nth = counts[field_number] = counts.get(field_number, -1) + 1
            at = _At(number, field_number, path, name, nth)
            if wire_type != _WIRE_TYPE_OF[field.proto_type] and not (
                wire_type == betterproto2.WIRE_LEN_DELIM
                and field.repeated
                and field.proto_type in _PACKABLE
            ):
                sent = _WIRE_TYPES.get(wire_type, f"wire type {wire_type}")
                return f"{at.where(meta)} must be {_kind(meta, name)}, got {sent}"
            span = _span(data, after, end, wire_type)
            if isinstance(span, str):
                return f"{at.where(meta)} {span}"
            if problem := self._value(meta, wire_type, span, at):
                return problem
            pos = span[1]
        return None

    def _value(self, meta: Any, wire_type: int, span: tuple[int, int], at: _At) -> str | None:
        """What is wrong with the value, in ``span``, of the known field ``at``, or None."""
        begin, end = span
        proto_type = meta.meta_by_field_name[at.name].proto_type
        expected = _WIRE_TYPE_OF[proto_type]
        if wire_type != expected:  # numbers, packed
            if problem := _packed_problem(self._data, begin, end, expected):
                return f"{at.where(meta)} must be packed {proto_type}s, got {problem}"
        elif proto_type == betterproto2.TYPE_STRING:
            try:
                str(self._data[begin:end], "utf-8")
            except UnicodeDecodeError:
                return f"{at.where(meta)} must be a string, got bytes that are not UTF-8"
        elif proto_type in _MESSAGES:
            return self.problem(
                _message_class(meta, at.name),
                begin,
                end,
                number=f"{at.number}{at.field_number}.",
                path=f"{at.label(meta)}.",
                within=at.where(meta),
            )
        return None


class _At(NamedTuple):
    """Where a known field is, put in words only for a refusal."""

    number: str  # the numbers of the messages it is in: "10." within resources
    field_number: int
    path: str  # their names: "resources."
    name: str
    nth: int  # which one of a repeated field it is (from 0), else -1

    def label(self, meta: Any) -> str:
        """``resources.gpus``, or ``payloads_json[1]``: an element of a repeated
        string, bytes or message field by its index."""
        proto_type = meta.meta_by_field_name[self.name].proto_type
        if self.nth >= 0 and proto_type in _NEVER_PACKED:
            return f"{self.path}{self.name}[{self.nth}]"
        return f"{self.path}{self.name}"

    def where(self, meta: Any) -> str:
        """``field 10.3 (resources.gpus)``"""
        return f"field {self.number}{self.field_number} ({self.label(meta)})"


def _span(
    data: memoryview, after: int, end: int, wire_type: int, number: int = 0, *, depth: int = 0
) -> tuple[int, int] | str:
    """Where the value of a field whose key ends at ``after`` begins, and where
    the next field does; or what is wrong with it. ``number``: the field's, for
    a group (an unknown field may be one: protobuf skips it whole)."""
    if wire_type == _WIRE_START_GROUP:
        group_end = _group_end(data, after, end, number, depth)
        return group_end if isinstance(group_end, str) else (after, group_end)
    if wire_type == betterproto2.WIRE_VARINT:
        begin = after
        _, pos = _varint(data, after, end)
    elif wire_type == betterproto2.WIRE_LEN_DELIM:
        length = data[after] if after < end else 0x80
        length, begin = (length, after + 1) if length < 0x80 else _varint(data, after, end)
        if begin < 0:
            return _varint_problem(" length", begin)
        pos = begin + length
        if pos > end:
            return f"is cut short: its length is {length} bytes, and {end - begin} follow"
    elif size := _FIXED_SIZE.get(wire_type):
        begin, pos = after, after + size
        if pos > end:
            return f"is cut short: it is {size} bytes, and {end - after} follow"
    else:  # the end of a group that did not begin (4), or none (6 and 7)
        return f"has wire type {wire_type}, which this server does not read"
    return (begin, pos) if pos >= 0 else _varint_problem("", pos)


def _group_end(data: memoryview, pos: int, end: int, number: int, depth: int) -> int | str:
    """Where the group of field ``number`` whose fields begin at ``pos`` ends
    (after its end key), or what is wrong with it."""
    if depth >= _MAX_GROUP_DEPTH:  # as protobuf's parsers stop, and the stack must
        return f"has groups nested over {_MAX_GROUP_DEPTH} deep"
    while pos < end:
        key = data[pos]
        key, after = (key, pos + 1) if key < 0x80 else _varint(data, pos, end)
        field_number, wire_type = key >> 3, key & 7
        if after < 0 or not 0 < field_number <= _MAX_FIELD_NUMBER:
            return _key_problem(after, field_number)
        if wire_type == _WIRE_END_GROUP:
            if field_number != number:
                return f"has a group ended by field {field_number}'s end"
            return after
        span = _span(data, after, end, wire_type, field_number, depth=depth + 1)
        if isinstance(span, str):
            return span
        pos = span[1]
    return "is cut short: the bytes end inside its group"


def _packed_problem(data: memoryview, begin: int, end: int, wire_type: int) -> str | None:
    """What is wrong with the packed numbers between ``begin`` and ``end``, or None."""
    if size := _FIXED_SIZE.get(wire_type):
        length = end - begin
        return f"{length} bytes, not a multiple of {size}" if length % size else None
    pos = begin
    while pos < end:
        _, pos = _varint(data, pos, end)
        if pos < 0:
            return "a varint cut short" if pos == _CUT else "a varint of over 10 bytes"
    return None


def _key_problem(after: int, field_number: int) -> str:
    if after == _CUT:
        return "ends inside a field's key"
    if after == _TOO_LONG:
        return "has a field's key of over 10 bytes"
    return f"has a field numbered {field_number}, which no field can be (1 to {_MAX_FIELD_NUMBER})"


def _varint_problem(what: str, pos: int) -> str:
    if pos == _CUT:
        return f"is cut short: the bytes end inside its{what} varint"
    return f"has a{what} varint of over 10 bytes"


def _message_class(meta: Any, name: str) -> type[betterproto2.Message]:
    """The class of a message field's value, from its type's metadata."""
    unwrap = meta.meta_by_field_name[name].unwrap
    return unwrap() if unwrap else meta.cls_by_field[name]  # type: ignore[no-any-return]


def _kind(meta: Any, name: str) -> str:
    proto_type: str = meta.meta_by_field_name[name].proto_type
    if proto_type == betterproto2.TYPE_MESSAGE:
        return f"a {_message_class(meta, name).__name__} message"
    article = "an" if proto_type[0] in "aeiou" else "a"
    return f"{article} {proto_type}"


def _known_only(data: memoryview, message_type: type[betterproto2.Message]) -> bytes:
    """``data``, which :class:`_WireCheck` found right, without the fields that
    ``message_type`` does not know, at any depth.

    betterproto2 keeps an unknown field by copying those before it (in
    quadratic time: 640,000 of them, 2 MB, took 77 s); the server has no use
    for one.
    """
    meta = message_type._betterproto  # type: ignore[arg-type]
    out = bytearray()
    pos, end = 0, len(data)
    while pos < end:
        start = pos
        key, after_key = _varint(data, pos, end)
        field_number, wire_type = key >> 3, key & 7
        span = _span(data, after_key, end, wire_type, field_number)
        assert not isinstance(span, str), "_WireCheck found it right"
        begin, pos = span
        name = meta.field_name_by_number.get(field_number)
        if name is None:
            continue
        proto_type = meta.meta_by_field_name[name].proto_type
        if wire_type == betterproto2.WIRE_LEN_DELIM and proto_type in _MESSAGES:
            inner = _known_only(data[begin:pos], _message_class(meta, name))
            out += data[start:after_key]
            out += betterproto2.encode_varint(len(inner))
            out += inner
        else:
            out += data[start:pos]
    return bytes(out)


# -- the guard around every call ----------------------------------------------


class _Guarded:
    """A servable whose every method goes through the guard first."""

    def __init__(self, service: IServable, guard: _Guard):
        self._service = service
        self._guard = guard

    def __mapping__(self) -> Mapping[str, Handler]:
        return {
            route: Handler(
                self._guard.around(route, handler.func, unary=handler.cardinality in _UNARY),
                *handler[1:],
            )
            for route, handler in self._service.__mapping__().items()
        }


# Calls whose request is one message (the server may stream its answer).
_UNARY = frozenset({Cardinality.UNARY_UNARY, Cardinality.UNARY_STREAM})


_Method = Callable[["Stream[Any, Any]"], Any]


class _Guard:
    """Checks the token and the requests' sizes; turns the library's exceptions into statuses."""

    def __init__(self, token: str | None, max_request: int):
        self._expected = None if token is None else f"Bearer {token}".encode()
        self._max_request = max_request
        self.closing = False

    def wrap(self, service: IServable) -> _Guarded:
        return _Guarded(service, self)

    def around(self, route: str, method: _Method, *, unary: bool) -> _Method:
        async def guarded(stream: Stream[Any, Any]) -> None:
            if self.closing:  # on a connection still open: refused, as a new one would be
                raise GRPCError(Status.UNAVAILABLE, "the server is shutting down")
            self._authorize(stream)
            _check_requests(stream, unary=unary, max_size=self._max_request)
            try:
                await method(stream)
            except asyncio.CancelledError:
                # grpclib cancels the calls in progress when the server
                # closes, and tells their clients nothing: a client following
                # a stream would wait forever. Say why the call ends instead.
                if self.closing:
                    with contextlib.suppress(Exception):
                        await stream.send_trailing_metadata(
                            status=Status.UNAVAILABLE, status_message="the server is shutting down"
                        )
                raise
            except GRPCError:
                raise
            except InfraError as exc:
                message = _sendable(str(exc), _MAX_MESSAGE_BYTES)
                await stream.send_trailing_metadata(
                    status=_status_of(exc),
                    status_message=message,
                    metadata=_error_metadata(
                        exc, room=_METADATA_BYTES - len(encode_grpc_message(message))
                    ),
                )
            except Exception:
                log.exception("a call to %s failed", route)
                raise GRPCError(
                    Status.INTERNAL, "internal server error (the server's log has the details)"
                ) from None

        return guarded

    def _authorize(self, stream: Stream[Any, Any]) -> None:
        if self._expected is None:
            return
        metadata = stream.metadata
        given = metadata.get(TOKEN_KEY, "") if metadata is not None else ""
        given_bytes = given.encode() if isinstance(given, str) else given
        if not hmac.compare_digest(given_bytes, self._expected):
            raise GRPCError(Status.UNAUTHENTICATED, "missing or wrong token")


def _check_requests(stream: Stream[Any, Any], *, unary: bool, max_size: int) -> None:
    """A client's mistakes in what it sends are its own, not a bug of the server's:
    a unary call without its message is INVALID_ARGUMENT, a compressed message
    (which grpclib does not read) UNIMPLEMENTED, a message over ``max_size``
    RESOURCE_EXHAUSTED."""
    # grpclib reads a message's 5-byte prefix, then as many bytes as the
    # prefix announces, whatever that is, before any of our code sees them.
    # The read of the body is refused here, on its size: until the server
    # reads, a client cannot send more of it than the stream's flow-control
    # window (grpclib's 4 MiB), and the refusal resets the stream.
    frames = stream._stream  # the HTTP/2 stream, whose reads grpclib sizes
    read = frames.recv_data

    async def recv_data(size: int) -> bytes:
        if size > max_size:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"the request message is {size} bytes, over the server's limit of {max_size} bytes",
            )
        return await read(size)

    frames.recv_data = recv_data  # type: ignore[method-assign]
    receive = stream.recv_message

    async def recv_message() -> Any:
        try:
            message = await receive()
        except NotImplementedError:  # grpclib's word for a compressed message
            raise GRPCError(Status.UNIMPLEMENTED, "compressed messages are not supported") from None
        if message is None and unary:
            raise GRPCError(Status.INVALID_ARGUMENT, "the call carries no request message")
        return message

    stream.recv_message = recv_message  # type: ignore[method-assign]


def _status_of(exc: InfraError) -> Status:
    if isinstance(exc, InvalidTask | InvalidWorkflow | UnknownEventType):
        return Status.INVALID_ARGUMENT
    if isinstance(exc, UnknownTask | UnknownService | UnknownWorkflow | UnknownRun):
        return Status.NOT_FOUND
    return Status.FAILED_PRECONDITION


# An error's trailers must stay well under the 64 KiB that a grpclib client
# accepts for a header list: over it, the client drops the whole connection,
# and every call on it fails. Percent-encoding can triple a byte. The detail
# is smaller still, and takes only what the message and the ids leave of
# _METADATA_BYTES: grpcio refuses metadata over 8 KiB at random (its soft
# limit), turning the error into RESOURCE_EXHAUSTED, and a log tail repeats
# lines that the message holds already.
_MAX_MESSAGE_BYTES = 8192
_MAX_ID_BYTES = 2048
_MAX_DETAIL_BYTES = 4096
_METADATA_BYTES = 7168


def _sendable(text: str, limit: int) -> str:
    """``text`` as it can travel in a trailer: at most ``limit`` bytes of UTF-8,
    cut with an ellipsis, and what UTF-8 cannot encode (a lone surrogate)
    written as an escape instead of failing the call."""
    data = text.encode("utf-8", "backslashreplace")
    if len(data) > limit:
        return data[: limit - 3].decode("utf-8", "ignore") + "…"  # the ellipsis: 3 bytes
    return data.decode()


def _error_metadata(exc: InfraError, *, room: int) -> list[tuple[str, str]]:
    """The trailers that name ``exc`` (its class and ids) and hold its detail,
    the detail in what is left of ``room`` bytes once the rest is in."""
    # Metadata values are non-empty ASCII: ids and names are percent-encoded,
    # and left out when empty (a task refused before it had an id).
    bases = " ".join(c.__name__ for c in type(exc).__mro__[1:] if issubclass(c, InfraError))
    metadata = [(ERROR_KEY, type(exc).__name__)]
    if bases:
        metadata.append((BASES_KEY, bases))
    ids = [
        (TASK_KEY, exc.task_id if isinstance(exc, TaskError) else None),
        (SERVICE_KEY, exc.service if isinstance(exc, ServiceError) else None),
        (WORKFLOW_KEY, exc.workflow_id if isinstance(exc, UnknownWorkflow) else None),
        (RUN_KEY, exc.run_id if isinstance(exc, UnknownRun) else None),
    ]
    metadata.extend(
        (key, quote(_sendable(str(value), _MAX_ID_BYTES), safe="")) for key, value in ids if value
    )
    room -= sum(len(key) + len(value) for key, value in metadata)
    detail = _error_detail(exc, min(room - len(DETAIL_KEY), _MAX_DETAIL_BYTES))
    if detail is not None:
        metadata.append((DETAIL_KEY, detail))
    return metadata


def _error_detail(exc: InfraError, limit: int) -> str | None:
    """What ``exc`` holds beyond its message and ids, as JSON of at most
    ``limit`` bytes; None when it holds nothing more, or too much.

    A log tail keeps its last lines that fit, as the newest say most of why
    a service failed; anything else too long to fit (a reason of kilobytes)
    sends no detail at all, rather than a changed one.
    """
    detail: dict[str, object]
    if isinstance(exc, ServiceStartError):
        detail = {"reason": exc.reason, "exit_code": exc.exit_code}
        if isinstance(exc, DependencyFailed):
            detail["dependency"] = exc.dependency
    elif isinstance(exc, UnknownService):
        detail = {"known": exc.known}
    elif isinstance(exc, UnknownEventType):
        detail = {"unknown": exc.unknown, "known": exc.known}
    elif isinstance(exc, ConfigError):
        detail = {"source": exc.source, "path": exc.path}
    else:
        return None
    try:
        if isinstance(exc, ServiceStartError):
            detail["log_tail"] = _last_lines(
                exc.log_tail, limit - len(_ascii_json({**detail, "log_tail": []}))
            )
        text = _ascii_json(detail)
    except (TypeError, ValueError):  # an attribute JSON cannot hold: the client's defaults do
        return None
    return text if len(text) <= limit else None


def _last_lines(lines: Sequence[str], budget: int) -> list[str]:
    """The last of ``lines`` whose JSON, commas included, fits in ``budget`` bytes."""
    kept: list[str] = []
    for line in reversed(lines):
        budget -= len(_ascii_json(line)) + (1 if kept else 0)
        if budget < 0:
            break
        kept.append(line)
    return kept[::-1]


def _ascii_json(value: object) -> str:
    # DEL is ASCII, so ensure_ascii leaves it, but no metadata value may hold it.
    return convert.dump_json(value).replace("\x7f", "\\u007f")


# -- the services ---------------------------------------------------------------


class _Streaming:
    """Server streams that are closed when the call ends, however it ends.

    The generated base iterates a handler's generator and leaves it to the
    garbage collector when the client goes away; closing it here releases
    what it holds (an event-bus subscription) at once.
    """

    async def _call_rpc_handler_server_stream(
        self,
        handler: Callable[[Any], AsyncGenerator[Any, None]],
        stream: Stream[Any, Any],
        request: Any,
    ) -> None:
        async with aclosing(handler(request)) as messages:
            async for message in messages:
                await stream.send_message(message)


def _load_json(text: str, field: str, refuse: Callable[[str], InfraError]) -> Any:
    """``text`` decoded, or ``refuse(why)`` raised, naming ``field``.

    JSON nested deeper than Python recurses (about a thousand levels, less
    what the stack holds already) is the client's mistake as much as a
    syntax error is, never a failure of the server's. Only the decoding is
    looked at: a value just shallow enough to decode, and too deep for what
    walks it next, is refused there (a workflow spec's checks of its
    payloads, the engine's of a run's inputs), and a RecursionError anywhere
    else is a bug.
    """
    try:
        return convert.load_json(text)
    except RecursionError:
        raise refuse(f"{field} is nested too deeply") from None
    except ValueError as exc:
        raise refuse(f"{field} is not JSON ({exc})") from None


def _load_payload(text: str, task_id: str | None, field: str = "payload_json") -> Any:
    return _load_json(text, field, functools.partial(refused, task_id))


def _refuse_workflow(why: str) -> InvalidWorkflow:
    return InvalidWorkflow(f"workflow refused: {why}")


class _Orchestrator(_Streaming, orch_pb.OrchestratorBase):
    def __init__(self, infra: AgentInfra):
        self._infra = infra

    async def health(self, message: orch_pb.HealthRequest) -> orch_pb.HealthResponse:
        report = await self._infra.health_check()
        return orch_pb.HealthResponse(
            status=report.status, services=convert.statuses_to_proto(report.services)
        )

    async def get_metrics(self, message: orch_pb.GetMetricsRequest) -> orch_pb.GetMetricsResponse:
        return orch_pb.GetMetricsResponse(values=await self._infra.get_metrics())

    async def submit_task(self, message: orch_pb.SubmitTaskRequest) -> orch_pb.SubmitTaskResponse:
        handle = await self._infra.submit_task(
            message.handler,
            _load_payload(message.payload_json, message.task_id),
            task_class=message.task_class if message.task_class is not None else "cpu_short",
            priority=message.priority,
            needs=message.needs,
            task_id=message.task_id,
            workflow_id=message.workflow_id,
            max_attempts=message.max_attempts,
            timeout=message.timeout,
            resources=convert.resources_from_proto(message.resources),
        )
        return orch_pb.SubmitTaskResponse(task_id=handle.task_id)

    async def submit_tasks(
        self, message: orch_pb.SubmitTasksRequest
    ) -> orch_pb.SubmitTasksResponse:
        payloads = [
            _load_payload(text, None, f"payloads_json[{i}]")
            for i, text in enumerate(message.payloads_json)
        ]
        handles = await self._infra.submit_tasks(
            message.handler,
            payloads,
            task_class=message.task_class if message.task_class is not None else "cpu_short",
            priority=message.priority,
            needs=message.needs,
            workflow_id=message.workflow_id,
            max_attempts=message.max_attempts,
            timeout=message.timeout,
            resources=convert.resources_from_proto(message.resources),
        )
        return orch_pb.SubmitTasksResponse(task_ids=[h.task_id for h in handles])

    async def get_task_status(
        self, message: orch_pb.GetTaskStatusRequest
    ) -> orch_pb.GetTaskStatusResponse:
        if message.wait:
            status = await self._infra.task_handle(message.task_id).wait()
        else:
            status = await self._infra.get_task_status(message.task_id)
        return orch_pb.GetTaskStatusResponse(status=convert.task_status_to_proto(status))

    async def cancel_task(self, message: orch_pb.CancelTaskRequest) -> orch_pb.CancelTaskResponse:
        status = await self._infra.cancel_task(message.task_id)
        return orch_pb.CancelTaskResponse(status=convert.task_status_to_proto(status))

    async def list_task_classes(
        self, message: orch_pb.ListTaskClassesRequest
    ) -> orch_pb.ListTaskClassesResponse:
        classes = await self._infra.task_classes()
        return orch_pb.ListTaskClassesResponse(
            classes=[convert.class_status_to_proto(c) for c in classes.values()]
        )

    async def stream_task_results(
        self, message: orch_pb.StreamTaskResultsRequest
    ) -> AsyncGenerator[orch_pb.TaskEvent, None]:
        if message.all_tasks and message.task_ids:
            raise GRPCError(Status.INVALID_ARGUMENT, "give task_ids or all_tasks, not both")
        task_ids = None if message.all_tasks else message.task_ids
        async with aclosing(self._infra.stream_task_results(task_ids, since=message.since)) as rs:
            async for event in rs:
                yield convert.task_event_to_proto(event)

    async def stream_events(
        self, message: orch_pb.StreamEventsRequest
    ) -> AsyncGenerator[orch_pb.Event, None]:
        types = message.types or None
        # Absent is following: what every client got before the field existed.
        follow = message.follow is not False
        events = self._infra.stream_events(types, since=message.since, follow=follow)
        async with aclosing(events):
            async for event in events:
                yield convert.event_to_proto(event)

    async def create_workflow(
        self, message: orch_pb.CreateWorkflowRequest
    ) -> orch_pb.CreateWorkflowResponse:
        # Always a mapping, never a path: nothing here reads the server's files.
        data = _load_json(message.spec_json, "spec_json", _refuse_workflow)
        workflow = await self._infra.workflows.create(WorkflowSpec.from_mapping(data))
        stored = convert.workflow_to_proto(workflow)
        return orch_pb.CreateWorkflowResponse(
            workflow_id=stored.workflow_id,
            spec_json=stored.spec_json,
            created_at=stored.created_at,
        )

    async def get_workflow(
        self, message: orch_pb.GetWorkflowRequest
    ) -> orch_pb.GetWorkflowResponse:
        workflow = await self._infra.workflows.get(message.workflow_id)
        return orch_pb.GetWorkflowResponse(workflow=convert.workflow_to_proto(workflow))

    async def list_workflows(
        self, message: orch_pb.ListWorkflowsRequest
    ) -> orch_pb.ListWorkflowsResponse:
        workflows = await self._infra.workflows.list()
        return orch_pb.ListWorkflowsResponse(
            workflows=[convert.workflow_to_proto(w) for w in workflows]
        )

    async def start_workflow_run(
        self, message: orch_pb.StartWorkflowRunRequest
    ) -> orch_pb.StartWorkflowRunResponse:
        refused = f"run of {message.workflow_id!r} refused"

        def refuse(why: str) -> InvalidWorkflow:
            return InvalidWorkflow(f"{refused}: {why}")

        inputs = _load_json(message.inputs_json, "inputs_json", refuse)
        if inputs is not None and not isinstance(inputs, dict):
            raise refuse(f"inputs_json must be a JSON object, got {inputs!r}")
        handle = await self._infra.workflows.start_run(
            message.workflow_id, inputs, run_id=message.run_id
        )
        return orch_pb.StartWorkflowRunResponse(run_id=handle.run_id)

    async def get_workflow_run(
        self, message: orch_pb.GetWorkflowRunRequest
    ) -> orch_pb.GetWorkflowRunResponse:
        workflows = self._infra.workflows
        if message.wait:
            status = await workflows.wait_run(message.run_id)
        else:
            status = await workflows.get_run(message.run_id)
        return orch_pb.GetWorkflowRunResponse(run=convert.run_status_to_proto(status))

    async def cancel_workflow_run(
        self, message: orch_pb.CancelWorkflowRunRequest
    ) -> orch_pb.CancelWorkflowRunResponse:
        status = await self._infra.workflows.cancel_run(message.run_id)
        return orch_pb.CancelWorkflowRunResponse(run=convert.run_status_to_proto(status))

    async def stream_workflow_status(
        self, message: orch_pb.StreamWorkflowStatusRequest
    ) -> AsyncGenerator[orch_pb.WorkflowRunStatus, None]:
        workflows = self._infra.workflows
        events = workflows.stream_status(message.run_id, since=message.since)
        async with aclosing(events):
            async for event in events:
                final = event.type in WorkflowEvent.RUN_FINAL_TYPES
                run = await workflows.get_run(event.run_id) if final else None
                yield convert.workflow_event_to_proto(event, run)


class _EnvManager(_Streaming, env_pb.EnvManagerBase):
    def __init__(self, infra: AgentInfra):
        self._infra = infra

    async def start_services(
        self, message: env_pb.StartServicesRequest
    ) -> env_pb.StartServicesResponse:
        statuses = await self._infra.services.start(message.names or None)
        return env_pb.StartServicesResponse(services=convert.statuses_to_proto(statuses))

    async def stop_services(
        self, message: env_pb.StopServicesRequest
    ) -> env_pb.StopServicesResponse:
        await self._infra.services.stop(message.names or None)
        return env_pb.StopServicesResponse()

    async def get_service_status(
        self, message: env_pb.GetServiceStatusRequest
    ) -> env_pb.GetServiceStatusResponse:
        statuses = await self._infra.services.status(message.names or None)
        return env_pb.GetServiceStatusResponse(services=convert.statuses_to_proto(statuses))

    async def list_services(
        self, message: env_pb.ListServicesRequest
    ) -> env_pb.ListServicesResponse:
        return env_pb.ListServicesResponse(names=self._infra.services.list())

    async def stream_logs(
        self, message: env_pb.StreamLogsRequest
    ) -> AsyncGenerator[env_pb.LogLine, None]:
        if message.tail is not None and message.tail < 0:
            raise GRPCError(Status.INVALID_ARGUMENT, f"tail must be 0 or more, got {message.tail}")
        lines = self._infra.services.logs(message.name, follow=message.follow, tail=message.tail)
        async with aclosing(lines):
            seq = 0
            async for line in lines:
                seq += 1
                dropped = line.dropped if isinstance(line, LinesDropped) else 0
                yield env_pb.LogLine(seq=seq, line=line, dropped=dropped)
