"""Every gRPC server and channel of loconet is made here, with one credentials hook and one set of options.

Servers: ``make_server`` (every server also answers ``grpc.health.v1``) and
``bind``. Channels: ``make_channel`` (asyncio, what peers and the coordinator
use) and ``blocking_channel`` (the harness, benchmarks, tests). A one-shot
``health_check`` serves the peers' failure detection and the coordinator's
probe. Nothing else in the project calls ``grpc.*server`` or ``grpc.*channel``.

What a server or channel needs is an ``RpcSettings``: message size limits,
keepalive, a peer server's concurrency bounds, and an ``RpcSecurity``, the
credentials hook. Today the only mode is ``insecure``: its methods return
None (plain HTTP/2) and no interceptors. Security is added by changing this
module only:

- TLS: a mode ``"tls"`` with certificate/key/CA file fields;
  ``server_credentials`` returns ``grpc.ssl_server_credentials(...)`` and
  ``channel_credentials`` ``grpc.ssl_channel_credentials(root_certificates=...)``.
  ``bind`` then uses ``add_secure_port`` and both channel functions
  ``secure_channel``: they already branch on None.
- Mutual TLS: the same, with ``require_client_auth=True`` on the server and a
  client certificate chain in the channel credentials.
- The run token (DESIGN.md: every RPC carries the run's credential, bound to
  the peer id): the client side is a ``grpc.AuthMetadataPlugin`` wrapped by
  ``grpc.metadata_call_credentials`` and joined to the channel credentials
  with ``grpc.composite_channel_credentials`` (gRPC sends call credentials only
  over secure channels, so the token comes with TLS, or with
  ``grpc.local_channel_credentials`` on loopback); the server side is a
  ``grpc.aio.ServerInterceptor`` returned by ``server_interceptors(role)``,
  which ``make_server`` already installs.

Addresses (parsing, what a server advertises, routes) are in ``collectives.addresses``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from collectives.addresses import format_address
from collectives.errors import AddressInUse, ConfigError

log = logging.getLogger(__name__)

# gRPC's own default message limit; peers raise it when their chunks need more.
DEFAULT_MESSAGE_BYTES = 4 << 20
# Peers ping their connections this often; every server must accept pings at that rate.
DEFAULT_KEEPALIVE_S = 10.0
SECURITY_MODES = ("insecure",)
ROLES = ("peer", "coordinator")

# Server option: gRPC sets SO_REUSEPORT by default, so a second server could bind a port
# already in use and silently take half of its connections (two coordinators of one run,
# each forming its own quorums). Without it, the second bind fails with a clear error.
EXCLUSIVE_PORT = [("grpc.so_reuseport", 0)]

# Channel options: reconnect fast (a restarted peer or coordinator comes back at the same
# address), and never let gRPC retry on its own: callers retry with their own deadlines,
# and a retried stream would resend chunks the receiver may already have counted.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.enable_retries", 0),
]


@dataclass(frozen=True)
class RpcSecurity:
    """The credentials hook of every server and channel (only ``insecure`` today; see the module docstring)."""

    mode: str = field(
        default="insecure", metadata={"help": "security of gRPC servers and channels (TLS is planned)", "choices": SECURITY_MODES}
    )

    def __post_init__(self) -> None:
        if self.mode not in SECURITY_MODES:
            choices = ", ".join(SECURITY_MODES)
            raise ConfigError(f"security mode {self.mode!r} is not supported; choose one of {choices}")

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """Credentials a server binds its port with (None: plaintext)."""
        return None

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """Credentials (channel and per-call) a channel connects with (None: plaintext)."""
        return None

    def server_interceptors(self, role: str) -> tuple[grpc.aio.ServerInterceptor, ...]:
        """Interceptors a server of this role runs on every call (where the run token is checked)."""
        return ()


@dataclass(frozen=True)
class RpcSettings:
    """What a process's servers and channels share: sizes, keepalive, server bounds and security."""

    max_receive_bytes: int = DEFAULT_MESSAGE_BYTES
    max_send_bytes: int = DEFAULT_MESSAGE_BYTES
    keepalive_s: float = DEFAULT_KEEPALIVE_S
    # Server side: RPCs handled at once, so callers cannot make a process hold unbounded state (None: no bound).
    # gRPC sheds every method alike beyond it, the health service included: a peer leaves it None and
    # bounds its own handlers instead (collectives.admission), so its health check always answers.
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
    settings: RpcSettings, *, role: str, handlers: tuple[grpc.GenericRpcHandler, ...] = ()
) -> grpc.aio.Server:
    """A server of this role (``peer`` or ``coordinator``) with these handlers and the health service; bind it next."""
    if role not in ROLES:
        raise ValueError(f"unknown server role {role!r}; expected one of {', '.join(ROLES)}")
    server = grpc.aio.server(
        options=server_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        interceptors=settings.security.server_interceptors(role) or None,
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
    if bound == 0:
        raise AddressInUse(f"cannot listen on {where}: the port is taken or the address is not this machine's; {hint}")
    return format_address(host, bound)


# -- channels ----------------------------------------------------------------------------


def make_channel(address: str, settings: RpcSettings, *, own_connection: bool = False) -> grpc.aio.Channel:
    """An asyncio channel to address (create it on the loop that uses it)."""
    options = channel_options(settings, own_connection)
    credentials = settings.security.channel_credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials, options=options)


def blocking_channel(
    address: str, settings: RpcSettings = RpcSettings(), *, own_connection: bool = False
) -> grpc.Channel:
    """A blocking (thread-based) channel to address, for tools and tests outside an event loop."""
    options = channel_options(settings, own_connection)
    credentials = settings.security.channel_credentials()
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


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
