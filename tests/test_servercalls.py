"""The tasks of a gRPC server's calls (``CallTasks``), over real gRPC on 127.0.0.1. What ``stop_server`` is for, a
close that logs no gRPC error with push streams open, is tested in test_transport.py."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from collectives.net.rpc import (
    RpcSettings,
    bind,
    identity,
    make_channel,
    make_server,
    method_handlers,
    raw_stream_unary,
)
from collectives.net.servercalls import CallTasks

pytestmark = pytest.mark.timeout(30)

METHOD = "/test.Calls/Hold"


async def serve(calls: CallTasks, handler) -> tuple[grpc.aio.Server, str]:
    server = make_server(
        RpcSettings(), role="peer", handlers=(method_handlers("test.Calls", {"Hold": raw_stream_unary(handler)}),),
        calls=calls,
    )
    address = bind(server, "127.0.0.1", 0, settings=RpcSettings(), hint="")
    await server.start()
    return server, address


def test_a_call_is_running_from_its_start_to_its_end():
    async def scenario() -> tuple[int, int]:
        calls = CallTasks()
        reading = asyncio.Event()

        async def hold(requests, context) -> bytes:
            async for _ in requests:
                reading.set()
            return b"done"

        server, address = await serve(calls, hold)
        channel = make_channel(address, RpcSettings())
        try:
            call = channel.stream_unary(METHOD, request_serializer=identity, response_deserializer=identity)()
            await call.write(b"x")
            await reading.wait()
            during = calls.running()
            await call.done_writing()
            assert await call == b"done"
            await asyncio.wait(during)  # the client may have the response before the server's task has ended
            return len(during), len(calls.running())
        finally:
            await channel.close()
            await server.stop(None)

    assert asyncio.run(scenario()) == (1, 0)
