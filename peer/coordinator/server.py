"""A running coordinator: its gRPC server, its tick loop and its dashboard.

``peer/coordinator/service.py`` is the Coordinator service itself (the protocol's
state and moves); this module binds it to a port (its server comes from
``collectives.net.rpc``, with the options a thousand peers need and the health
service) and runs the dashboard thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging

import grpc
from google.protobuf.message import Message

from collectives.errors import AddressInUse, ConfigError
from collectives.net.addresses import advertised_address, format_address, split_address
from collectives.net.rpc import COORDINATOR_SETTINGS, RpcSettings, RunAuthInterceptor, bind, make_server
from collectives.net.servercalls import CallTasks, stop_server
from peer.coordinator.limits import RateLimitInterceptor
from peer.coordinator.service import Coordinator, CoordinatorConfig
from peer.coordinator.sessions import SessionLimits, session_handler
from peer.coordinator.statefile import hold_state_file
from peer.filelock import ExclusiveHold
from protos import membership_pb2 as pb

log = logging.getLogger(__name__)


# The collector's first threshold while serving: a round at 1,000 peers allocates a few objects per message, and
# at Python's default (700) that is a young collection every few dozen messages and a full one every few thousand,
# each walking every peer record: ~9% of the coordinator's CPU in a round, and pauses of tens of milliseconds.
GC_YOUNG_THRESHOLD = 50_000


def tune_gc_for_serving() -> None:
    """Move what exists at start (modules, descriptors, the server) out of the collector's reach, and collect
    young objects less often: what a long-running server allocating per message wants (docs/scale.md)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


# RPCs whose server-side handler is another method of the Coordinator, one that may answer with bytes already
# serialised (shared by many calls) instead of a message.
WIRE_METHODS = {"Quorum": "quorum_wire"}


def serialize(response: Message | bytes) -> bytes:
    """A response's wire bytes: a message is serialised, bytes (an answer serialised once for many calls) pass."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def strict_handlers(coordinator: Coordinator, limits: SessionLimits) -> grpc.GenericRpcHandler:
    """The Coordinator service's handlers, answering a malformed request with INVALID_ARGUMENT (not UNKNOWN);
    limits: what a client's Session streams may cost (peer/coordinator/sessions.py)."""
    service = pb.DESCRIPTOR.services_by_name["Coordinator"]
    handlers = {"Session": session_handler(coordinator, limits)}
    for method in service.methods:
        if method.name in handlers:
            continue
        request_type = getattr(pb, method.input_type.name)
        behavior = getattr(coordinator, WIRE_METHODS.get(method.name, method.name))

        async def handle(raw: bytes, context, behavior=behavior, request_type=request_type):
            try:
                request = request_type.FromString(raw)
            except Exception as exc:  # protobuf's DecodeError and friends: the bytes are not this message
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {request_type.__name__}: {exc}")
            return await behavior(request, context)

        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=lambda b: b, response_serializer=serialize
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class CoordinatorServer:
    """A running coordinator: its gRPC server, tick loop and dashboard (create and use on one event loop).

    It binds ``config.host``/``config.port`` and tells peers ``config.advertise``
    (``HOST[:PORT]``; default: the bound address): that is ``address``, printed
    and shown on the dashboard.
    """

    def __init__(self, config: CoordinatorConfig, settings: RpcSettings = COORDINATOR_SETTINGS) -> None:
        self.config = config
        self.advertise = config.advertise  # checked by CoordinatorConfig
        # The coordinator's TLS files and run secret come with its config. Every live peer holds its Session stream
        # (one RPC) for as long as it is in the run, so the concurrent-RPC bound has room for max_peers of them
        # besides the calls it was measured for.
        self.settings = dataclasses.replace(
            settings, security=config.security,
            max_concurrent_rpcs=None if settings.max_concurrent_rpcs is None
            else settings.max_concurrent_rpcs + config.max_peers,
        )
        self.coordinator = Coordinator(config)
        # Per-client rate limits on every call but the health check (counted for the metrics).
        self.rate_limits = RateLimitInterceptor(config.limits)
        self.coordinator.rate_limited = self.rate_limits.counts
        self.address = ""
        self.bound_address = ""
        self.dashboard_url = ""
        self._server: grpc.aio.Server | None = None
        self._calls = CallTasks()  # the tasks of the server's calls, ended at stop (collectives.net.servercalls)
        self._dashboard = None
        self._hold: ExclusiveHold | None = None

    async def start(self) -> str:
        """Bind and start serving; return the gRPC address."""
        from peer.coordinator.dashboard_security import read_token_file

        # Read before anything listens: a bad token file must not leave a half-started coordinator.
        token = read_token_file(self.config.dashboard_token_file) if self.config.dashboard_token_file else None
        if token is not None and self.coordinator.auth is not None and token.encode() == self.coordinator.auth.secret:
            # The dashboard's token travels in browser URLs and scrapers' configs; the run's must not go with it.
            raise ConfigError(f"--dashboard-token-file {self.config.dashboard_token_file} holds the run secret: give "
                              "the dashboard a token of its own (anyone who may watch would otherwise hold the run's)")
        if self.config.state_file and self._hold is None:
            self._hold = hold_state_file(self.config.state_file)
        try:
            return await self._serve(token)
        except BaseException:
            await self.stop()  # whatever did start, and the hold on the state file
            raise

    async def _serve(self, token: str | None) -> str:
        """Bind the gRPC server, start the ticks and the dashboard; return the gRPC address."""
        from peer.coordinator.dashboard import DashboardServer

        # The run secret is checked first (a caller without it spends nothing, not even its rate), then the rate.
        first = () if self.coordinator.auth is None else (RunAuthInterceptor(self.coordinator.auth),)
        if first:
            self.coordinator.unauthenticated = lambda: first[0].refused
        server = make_server(
            self.settings, role="coordinator", handlers=(strict_handlers(self.coordinator, self.rate_limits),),
            interceptors=(*first, self.rate_limits), calls=self._calls,
        )
        self.bound_address = bind(
            server, self.config.host, self.config.port, settings=self.settings,
            hint="is another coordinator running? choose another --port (0: any free port)",
        )
        await server.start()
        self._server = server
        port = split_address(self.bound_address)[1]
        address = advertised_address(self.config.host, port, self.advertise, role="coordinator")
        self.address = self.coordinator.address = address
        self.coordinator.start_ticking()
        if self.config.dashboard_port is not None:
            loop = asyncio.get_running_loop()
            coordinator = self.coordinator

            async def snapshot() -> dict:
                return coordinator.status()

            def status() -> dict:
                # The dashboard's thread asks the loop, so the document is a consistent snapshot.
                return asyncio.run_coroutine_threadsafe(snapshot(), loop).result(timeout=10)

            dashboard = DashboardServer(
                status, host=self.config.dashboard_host, port=self.config.dashboard_port, token=token,
                allowed_hosts=self.config.dashboard_hosts,
                tls_cert=self.config.security.tls_cert, tls_key=self.config.security.tls_key,
            )
            try:
                self.dashboard_url = dashboard.start()
            except OSError as exc:  # start() stops what did start: the gRPC server and the ticks
                raise AddressInUse(
                    "cannot serve the dashboard on "
                    f"{format_address(self.config.dashboard_host, self.config.dashboard_port)}"
                    f" ({exc.strerror or exc}): choose another --dashboard-port (0: any free port, none: no dashboard)"
                ) from None
            self._dashboard = dashboard
        log.info(
            "coordinator of run %s on %s, dashboard %s", self.config.run_id, self.address, self.dashboard_url or "off"
        )
        return self.address

    async def stop(self) -> None:
        """Stop the dashboard, the tick loop and the gRPC server, then end its calls still running."""
        if self._dashboard is not None:
            self._dashboard.close()
            self._dashboard = None
        await self.coordinator.stop()
        if self._server is not None:
            # Its calls (the peers' Session streams) end before asyncio.run cancels the rest, as a peer's transport
            # does (collectives.net.servercalls).
            server, self._server = self._server, None
            await stop_server(server, self._calls, 0.5)
        if self._hold is not None:
            self._hold.release()
            self._hold = None
