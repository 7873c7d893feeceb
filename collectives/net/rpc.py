"""Every gRPC server and channel of loconet is made here, with one credentials hook and one set of options.

Servers: ``make_server`` (every server also answers ``grpc.health.v1``; given a
``CallTasks``, it records the task of every call, for ending them at shutdown:
``collectives.net.servercalls``) and ``bind``. Channels: ``make_channel`` (asyncio, what peers and the coordinator
use) and ``blocking_channel`` (the harness, benchmarks, tests). A one-shot
``health_check`` serves the peers' failure detection and the coordinator's
probe. Nothing else in the project calls ``grpc.*server`` or ``grpc.*channel``. The peers' services take and
return raw bytes, framed by their callers: ``identity`` is their (de)serializer, and ``method_handlers``,
``raw_stream_unary`` and ``raw_unary_unary`` build their handlers.

What a server or channel needs is an ``RpcSettings``: message size limits,
keepalive, a peer server's concurrency bounds, and an ``RpcSecurity``: TLS
(``--tls-cert``/``--tls-key``; with ``--tls-ca``, mutual TLS: servers require
a client certificate signed by that CA, and clients verify servers against it)
and the run secret's file (``--token-file``). The secret's checks live in
``collectives.net.credentials``; here ``make_server`` installs its interceptor
(``RunAuthInterceptor``: every call but the standard health check is refused
``UNAUTHENTICATED`` unless it proves the secret) and both channel functions
add each call's credential metadata (``AuthClientInterceptor``).

Addresses (parsing, what a server advertises, routes) are in ``collectives.net.addresses``.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from collectives.errors import AddressInUse, ConfigError, Unauthenticated
from collectives.net.addresses import format_address
from collectives.net.credentials import OPEN_METHODS, CallAuth, load_secret, warn_if_public
from collectives.net.servercalls import CallTasks

log = logging.getLogger(__name__)

# gRPC's own default message limit; peers raise it when their chunks need more.
DEFAULT_MESSAGE_BYTES = 4 << 20
# Peers ping their connections this often; every server must accept pings at that rate.
DEFAULT_KEEPALIVE_S = 10.0
ROLES = ("peer", "coordinator")

# Server option: gRPC sets SO_REUSEPORT by default, so a second server could bind a port
# already in use and silently take half of its connections (two coordinators of one run,
# each forming its own quorums). Without it, the second bind fails with a clear error.
EXCLUSIVE_PORT = [("grpc.so_reuseport", 0)]

# Channel options: reconnect fast (a restarted peer or coordinator comes back at the same
# address), and never let gRPC retry on its own: callers retry with their own deadlines,
# and a retried stream would resend chunks the receiver may already have counted.
# Reconnect soon after a failure (backoff 0.1 s, doubling up to 2 s), but give each attempt 5 s to finish
# its handshake: gRPC takes the "min reconnect backoff" as the least time an attempt may take, and at 0.1 s
# every attempt on a link with a long or loaded round trip (a WAN, a saturated 100 mbit link) timed out
# "before receiving SETTINGS frame", so a live member was blamed as unreachable.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 5000),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.enable_retries", 0),
]


def _read(path: str, what: str, secret: bool = False) -> bytes:
    """A TLS file's bytes (a warning when a ``secret`` one is every user's to read); ConfigError naming it."""
    try:
        with open(path, "rb") as f:
            if secret:
                warn_if_public(path, os.fstat(f.fileno()).st_mode, f"the {what}")
            return f.read()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the {what} {path}: {exc.strerror}; check the path (loconet certs makes them)"
        ) from exc


def _certificates(data: bytes, option: str, path: str) -> list[x509.Certificate]:
    """The PEM certificates in a file's bytes; ConfigError naming the option when it holds none."""
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(
            f"{option} {path} holds no PEM certificate (a key file?); give a certificate's .pem (loconet certs makes "
            "them)"
        ) from None


# gRPC takes the TLS files as bytes and only says "Failed to bind" (or fails each handshake) when they do not fit,
# so they are checked here, where they are read. Keyed on the bytes: channels are made often, the files rarely change.
@functools.lru_cache(maxsize=16)
def _checked_pair(
    cert: bytes, cert_path: str, key: bytes, key_path: str
) -> tuple[datetime.datetime, datetime.datetime]:
    """The validity window of --tls-cert, once it and --tls-key are checked to be a PEM certificate and its key."""
    leaf = _certificates(cert, "--tls-cert", cert_path)[0]
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except TypeError:
        raise ConfigError(f"--tls-key {key_path} is encrypted; gRPC needs an unencrypted PEM key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(
            f"--tls-key {key_path} holds no PEM private key; give the .key made with --tls-cert {cert_path}"
        ) from None
    if private.public_key() != leaf.public_key():
        raise ConfigError(
            f"--tls-key {key_path} is not the key of --tls-cert {cert_path}; give the key made with that certificate "
            "(loconet certs writes NAME.pem and NAME.key)"
        )
    return leaf.not_valid_before_utc, leaf.not_valid_after_utc


def _check_validity(path: str, window: tuple[datetime.datetime, datetime.datetime]) -> None:
    """Refuse this process's own certificate outside its dates: the other end would only say the CA did not sign it."""
    start, end = window
    now = datetime.datetime.now(datetime.UTC)
    dates = f"valid from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC"
    if now > end:
        raise ConfigError(f"--tls-cert {path} expired ({dates}); make a new one (loconet certs --out DIR --host NAME)")
    if now < start:
        raise ConfigError(f"--tls-cert {path} is not valid yet ({dates}); check this machine's clock")


@functools.lru_cache(maxsize=16)
def _checked_ca(ca: bytes, path: str) -> None:
    """Check that --tls-ca holds PEM certificates."""
    _certificates(ca, "--tls-ca", path)


@dataclass(frozen=True)
class RpcSecurity:
    """TLS files and the run secret's file of a process's servers and channels (all empty: plaintext, no secret)."""

    token_file: str = field(
        default="", metadata={"help": "file holding the run secret (or set $LOCONET_TOKEN); every call proves it"}
    )
    tls_cert: str = field(default="", metadata={"help": "PEM certificate this process serves and dials with (TLS)"})
    tls_key: str = field(default="", metadata={"help": "PEM private key of --tls-cert"})
    tls_ca: str = field(
        default="", metadata={"help": "PEM CA that signs every certificate of the run (mutual TLS: both ends verified)"}
    )

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together: give both (loconet certs makes them)")
        if self.tls_ca and not self.tls_cert:
            raise ConfigError("--tls-ca needs --tls-cert and --tls-key: mutual TLS verifies both ends")

    @property
    def tls(self) -> bool:
        """Whether servers and channels use TLS."""
        return bool(self.tls_cert)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """Credentials a server binds its port with (None: plaintext); with a CA, clients must present a certificate."""
        if not self.tls:
            return None
        cert, key, ca = self.tls_files()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """Credentials a channel connects with (None: plaintext): verify the server, and present our certificate."""
        if not self.tls:
            return None
        cert, key, ca = self.tls_files()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def tls_files(self) -> tuple[bytes, bytes, bytes | None]:
        """The certificate, key and CA (None without --tls-ca) as PEM bytes; ConfigError naming the option when a
        file is unreadable, not what it should be, the key is not the certificate's, or the certificate is out of
        date."""
        cert, key = _read(self.tls_cert, "TLS certificate"), _read(self.tls_key, "TLS key", secret=True)
        _check_validity(self.tls_cert, _checked_pair(cert, self.tls_cert, key, self.tls_key))
        ca = _read(self.tls_ca, "TLS CA") if self.tls_ca else None
        if ca is not None:
            _checked_ca(ca, self.tls_ca)
        return cert, key, ca

    def load_secret(self) -> bytes | None:
        """The run secret (--token-file, else $LOCONET_TOKEN), or None: calls then carry no credential."""
        return load_secret(self.token_file or None)

    def call_auth(self, run_id: str) -> CallAuth | None:
        """This process's run credentials for run_id (a fresh peer key), or None without a secret."""
        secret = self.load_secret()
        return None if secret is None else CallAuth(secret, run_id)


@dataclass(frozen=True)
class RpcSettings:
    """What a process's servers and channels share: sizes, keepalive, server bounds and security."""

    max_receive_bytes: int = DEFAULT_MESSAGE_BYTES
    max_send_bytes: int = DEFAULT_MESSAGE_BYTES
    keepalive_s: float = DEFAULT_KEEPALIVE_S
    # Server side: RPCs handled at once, so callers cannot make a process hold unbounded state (None: no bound).
    # gRPC sheds every method alike beyond it, the health service included: a peer leaves it None and
    # bounds its own handlers instead (collectives.net.admission), so its health check always answers.
    max_concurrent_rpcs: int | None = None
    # Server side: HTTP/2 streams one connection may hold open (None: gRPC's default, no bound). A
    # client beyond it waits for a slot (or sees the stream refused if it opened it before learning
    # the limit); a health check comes on its own connection and is never held back by it.
    max_streams_per_connection: int | None = None
    # Server side: calls that may wait for the handler loop before gRPC sheds them (None: gRPC's default, 1000).
    max_pending_requests: int | None = None
    # The credentials hook: the same for a process's servers and channels, so both ends agree.
    security: RpcSecurity = RpcSecurity()

    def __post_init__(self) -> None:
        for name in (
            "max_receive_bytes",
            "max_send_bytes",
            "max_concurrent_rpcs",
            "max_pending_requests",
            "max_streams_per_connection",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if self.keepalive_s <= 0:
            raise ConfigError(f"keepalive_s must be positive, got {self.keepalive_s}")


# The coordinator, measured with 1000 simulated peers (loconet bench membership): a thousand
# quorum calls and as many heartbeats a second can wait for the handler loop at once, and
# gRPC's default pending limit (1000) sheds the excess. Requests are small (1 MiB is plenty);
# answers carry member lists and the status document.
COORDINATOR_SETTINGS = RpcSettings(
    max_receive_bytes=1 << 20, max_send_bytes=64 << 20, max_concurrent_rpcs=10_000, max_pending_requests=20_000
)


def keepalive_options(keepalive_s: float) -> list[tuple[str, int]]:
    """gRPC options for both ends of a connection that pings every keepalive_s seconds.

    The server side must accept pings at that rate, or it answers with a
    GOAWAY ("too_many_pings") that fails the calls in flight.
    """
    return [
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", int(keepalive_s * 500)),
    ]


def _size_options(settings: RpcSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", settings.max_send_bytes),
        ("grpc.max_receive_message_length", settings.max_receive_bytes),
    ]


def server_options(settings: RpcSettings) -> list[tuple[str, int]]:
    """The options of every server: sizes, keepalive, an exclusive port, the pending-request and stream bounds."""
    options = [*_size_options(settings), *keepalive_options(settings.keepalive_s), *EXCLUSIVE_PORT]
    if settings.max_streams_per_connection is not None:
        options.append(("grpc.max_concurrent_streams", settings.max_streams_per_connection))
    if settings.max_pending_requests is not None:
        options += [
            ("grpc.server.max_pending_requests", settings.max_pending_requests),
            ("grpc.server.max_pending_requests_hard_limit", settings.max_pending_requests),
        ]
    return options


def channel_options(settings: RpcSettings, own_connection: bool = False) -> list[tuple[str, int]]:
    """The options of every channel; own_connection: a TCP connection not shared with equal channels."""
    options = [*_size_options(settings), *keepalive_options(settings.keepalive_s), *RECONNECT_OPTIONS]
    if own_connection:
        # By default channels with equal targets and options share one connection (and its backoff).
        options.append(("grpc.use_local_subchannel_pool", 1))
    return options


# -- servers ---------------------------------------------------------------------------


def make_server(
    settings: RpcSettings,
    *,
    role: str,
    handlers: tuple[grpc.GenericRpcHandler, ...] = (),
    auth: CallAuth | None = None,
    interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
    calls: CallTasks | None = None,
) -> grpc.aio.Server:
    """A server of this role (``peer`` or ``coordinator``) with these handlers and the health service; bind it next.

    With auth, every call but the health check must prove the run secret (checked first); interceptors run after.
    With calls, the task of every call is recorded there before anything else runs (``stop_server`` ends them at
    shutdown: ``collectives.net.servercalls``).
    """
    if role not in ROLES:
        raise ValueError(f"unknown server role {role!r}; expected one of {', '.join(ROLES)}")
    chain = (
        ((calls,) if calls is not None else ())
        + ((RunAuthInterceptor(auth),) if auth is not None else ())
        + tuple(interceptors)
    )
    server = grpc.aio.server(
        options=server_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        interceptors=chain or None,
    )
    if handlers:
        server.add_generic_rpc_handlers(tuple(handlers))
    add_health_service(server)
    return server


def add_health_service(server: grpc.aio.Server) -> None:
    """Serve grpc.health.v1 on server, reporting SERVING overall."""
    # A new servicer reports SERVING for the whole server ("").
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)


def bind(server: grpc.aio.Server, host: str, port: int, *, settings: RpcSettings, hint: str) -> str:
    """Bind server to host:port (0: any free port); return the bound address, or raise AddressInUse ending in hint."""
    where = format_address(host, port)
    credentials = settings.security.server_credentials()
    try:
        if credentials is None:
            bound = server.add_insecure_port(where)
        else:
            bound = server.add_secure_port(where, credentials)
    except RuntimeError:
        # grpc's own message only says "Failed to bind" and how to turn on its debug log.
        bound = 0
    if bound == 0 and credentials is not None and _can_listen(host, port):
        # The address is free, so gRPC refused the TLS files (checked when read, so something those checks miss).
        security = settings.security
        raise ConfigError(
            f"cannot serve TLS on {where}: gRPC refused --tls-cert {security.tls_cert} and --tls-key "
            f"{security.tls_key} (set GRPC_VERBOSITY=debug to see why); give a PEM certificate and its key "
            "(loconet certs makes them)"
        )
    if bound == 0:
        raise AddressInUse(f"cannot listen on {where}: the port is taken or the address is not this machine's; {hint}")
    return format_address(host, bound)


def _can_listen(host: str, port: int) -> bool:
    """Whether a plain socket can listen on every address of host:port (as gRPC's listener would: address reuse on)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False
    for family, kind, proto, _name, address in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
                probe.listen(1)
        except OSError:
            return False
    return True


# -- channels ----------------------------------------------------------------------------


def make_channel(
    address: str,
    settings: RpcSettings,
    *,
    own_connection: bool = False,
    auth: CallAuth | None = None,
    extra_options: Sequence[tuple[str, int]] = (),
) -> grpc.aio.Channel:
    """An asyncio channel to address (create it on the loop that uses it); with auth, every call that does not stream
    requests carries its credential (those take ``call_metadata``). extra_options: gRPC channel arguments added to
    the usual ones."""
    options = [*channel_options(settings, own_connection), *extra_options]
    credentials = settings.security.channel_credentials()
    interceptors = None if auth is None else [cls(auth, address) for cls in _AIO_AUTH_INTERCEPTORS]
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


def blocking_channel(
    address: str, settings: RpcSettings = RpcSettings(), *, own_connection: bool = False, auth: CallAuth | None = None
) -> grpc.Channel:
    """A blocking (thread-based) channel to address, for tools and tests outside an event loop."""
    options = channel_options(settings, own_connection)
    credentials = settings.security.channel_credentials()
    if credentials is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        channel = grpc.secure_channel(address, credentials, options=options)
    return channel if auth is None else grpc.intercept_channel(channel, _BlockingAuth(auth, address))


async def health_check(address: str, timeout_s: float, settings: RpcSettings | None = None) -> bool:
    """Ask the server at address for its health on a fresh connection: True if SERVING.

    Raises grpc.aio.AioRpcError when it does not answer (UNAVAILABLE: refused or
    unreachable; DEADLINE_EXCEEDED: accepted but silent, e.g. a paused process).
    The connection is never shared with the caller's pooled channel, which may be
    the one that just failed.
    """
    channel = make_channel(address, settings or RpcSettings(), own_connection=True)
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    finally:
        await channel.close()
    return reply.status == health_pb2.HealthCheckResponse.SERVING


# -- raw-bytes methods: the services do their own (protobuf-compatible) framing ------------------


def identity(data: bytes) -> bytes:
    """The (de)serializer of raw-bytes methods: the framing is the caller's."""
    return data


def method_handlers(service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> grpc.GenericRpcHandler:
    """A generic handler for one service's methods (raw-bytes handlers built by the caller)."""
    return grpc.method_handlers_generic_handler(service, handlers)


def raw_stream_unary(behavior: Any) -> grpc.RpcMethodHandler:
    """A client-streaming method whose handler sees raw request bytes and returns response bytes."""
    return grpc.stream_unary_rpc_method_handler(behavior, request_deserializer=identity, response_serializer=identity)


def raw_unary_unary(behavior: Any) -> grpc.RpcMethodHandler:
    """A unary method whose handler sees raw request bytes and returns response bytes."""
    return grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=identity, response_serializer=identity)


# -- the run secret on the wire (collectives.net.credentials holds the checks) --------------------


def _method_name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


class RunAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call that does not prove the run secret, before its handler runs or its request is read."""

    def __init__(self, auth: CallAuth) -> None:
        self.auth = auth
        # Calls refused, for the metrics (one counter: the interceptor runs on the server's loop only).
        self.refused = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """The method's handler for a call that proves the run secret (or needs not: OPEN_METHODS); else one that
        refuses it UNAUTHENTICATED without reading its request."""
        method = handler_call_details.method
        if method in OPEN_METHODS:
            return await continuation(handler_call_details)
        try:
            self.auth.check(method, handler_call_details.invocation_metadata)
        except Unauthenticated as exc:
            self.refused += 1
            log.debug("refused %s: %s", method, exc)
            return _refusal(await continuation(handler_call_details), str(exc))
        return await continuation(handler_call_details)


def _refusal(handler: grpc.RpcMethodHandler | None, why: str) -> grpc.RpcMethodHandler:
    """A handler of handler's kind that ends the call UNAUTHENTICATED without reading a message."""

    async def refuse(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    if handler is not None and handler.request_streaming:
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse)
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class _AuthClient:
    """Adds a call's credential metadata (collectives.net.credentials.CallAuth) to its details."""

    def __init__(self, auth: CallAuth, target: str) -> None:
        self.auth = auth
        self.target = target

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        method = _method_name(details.method)
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self.auth.metadata(method, self.target))
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _AuthUnaryUnary(_AuthClient, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AuthUnaryStream(_AuthClient, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


# Calls that stream requests take their credential as call metadata (call_metadata) instead: grpc.aio feeds the
# writes of an intercepted request stream through a generator whose task stays pending when the call ends before
# done_writing (the other side gone, a refusal), and asyncio logs "Task was destroyed but it is pending!" for each
# when the call is collected (seen at every coordinator restart of a run with a run secret).
_AIO_AUTH_INTERCEPTORS = (_AuthUnaryUnary, _AuthUnaryStream)


# Call metadata: (key, value) pairs.
Metadata = list[tuple[str, str | bytes]]


def call_metadata(auth: CallAuth | None, method: str, target: str) -> Metadata | None:
    """The credential metadata of one request-streaming call of method to target (None without auth): make_channel's
    interceptors add it to every other call."""
    return None if auth is None else auth.metadata(method, target)


class _BlockingDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


class _BlockingAuth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """The blocking channels' version of _AuthClient (tools: the harness's and benchmarks' Status calls)."""

    def __init__(self, auth: CallAuth, target: str) -> None:
        self.auth = auth
        self.target = target

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(d.metadata or ()), *self.auth.metadata(_method_name(d.method), self.target)]
        return _BlockingDetails(
            d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, getattr(d, "compression", None)
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)
