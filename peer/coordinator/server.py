"""A running coordinator: its gRPC server, its tick loop and its dashboard.

``peer/coordinator.py`` is the Coordinator service itself (the protocol's
state and moves); this module binds it to a port, with the server options a
thousand peers need, the health service, and the dashboard thread.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from protos import membership_pb2 as pb
from collectives.transport import EXCLUSIVE_PORT, TransportConfig, add_health_service, keepalive_options, listen
from peer.coordinator.service import Coordinator, CoordinatorConfig

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1 << 20


def strict_handlers(coordinator: Coordinator) -> grpc.GenericRpcHandler:
    """The Coordinator service's handlers, answering a malformed request with INVALID_ARGUMENT (not UNKNOWN)."""
    service = pb.DESCRIPTOR.services_by_name["Coordinator"]
    handlers = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        behavior = getattr(coordinator, method.name)

        async def handle(raw: bytes, context, behavior=behavior, request_type=request_type):
            try:
                request = request_type.FromString(raw)
            except Exception as exc:  # protobuf's DecodeError and friends: the bytes are not this message
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {request_type.__name__}: {exc}")
            return await behavior(request, context)

        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            handle, request_deserializer=lambda b: b, response_serializer=response_type.SerializeToString
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class CoordinatorServer:
    """A running coordinator: its gRPC server, tick loop and dashboard (create and use on one event loop)."""

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.coordinator = Coordinator(config)
        self.address = ""
        self.dashboard_url = ""
        self._server: grpc.aio.Server | None = None
        self._dashboard = None

    async def start(self) -> str:
        """Bind and start serving; return the gRPC address."""
        from peer.coordinator.dashboard import DashboardServer

        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", 64 << 20),
            # With a thousand peers, a thousand quorum calls and as many heartbeats a second
            # can wait for the handler loop at once; gRPC's default (1000) sheds the excess.
            ("grpc.server.max_pending_requests", 20_000),
            ("grpc.server.max_pending_requests_hard_limit", 20_000),
            # Peers' channels ping every TransportConfig.keepalive_s; accept that rate.
            *keepalive_options(TransportConfig().keepalive_s),
            *EXCLUSIVE_PORT,
        ]
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=10_000)
        server.add_generic_rpc_handlers((strict_handlers(self.coordinator),))
        add_health_service(server)
        address = listen(server, self.config.host, self.config.port, "is another coordinator running? choose --port")
        await server.start()
        self._server = server
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

            self._dashboard = DashboardServer(status, host=self.config.dashboard_host, port=self.config.dashboard_port)
            self.dashboard_url = self._dashboard.start()
        log.info("coordinator of run %s on %s, dashboard %s", self.config.run_id, self.address, self.dashboard_url or "off")
        return self.address

    async def stop(self) -> None:
        """Stop the dashboard, the tick loop and the gRPC server."""
        if self._dashboard is not None:
            self._dashboard.close()
            self._dashboard = None
        await self.coordinator.stop()
        if self._server is not None:
            await self._server.stop(0.5)
            self._server = None
