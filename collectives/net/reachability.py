"""Whether a peer can be reached: its port accepts a TCP connection, and its gRPC server answers a health check.

A round's failure watcher (``Transport``'s, ``collectives/net/transport.py``) asks this before it names a member
unreachable, and a member waiting in its host's shared-memory round (``collectives/hosts/round.py``) before it names
a local member that never attached: a refused port is known at once.
"""

from __future__ import annotations

import asyncio
import os

import grpc

from collectives.net.addresses import split_address
from collectives.net.rpc import RpcSettings, health_check


async def port_refuses(address: str, timeout_s: float = 1.0) -> str | None:
    """Why a TCP connection to address fails (refused, unroutable, timed out), or None if it is accepted."""
    host, port = split_address(address)
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return f"connecting timed out after {timeout_s:g} s"
    except OSError as exc:  # asyncio words it "Connect call failed"; the errno says why
        return os.strerror(exc.errno) if exc.errno else str(exc)
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return None


async def peer_unresponsive(address: str, timeout_s: float = 2.0, settings: RpcSettings | None = None) -> str | None:
    """Why the gRPC server at address is out of reach (port refused, or no health answer in time), or None."""
    why = await port_refuses(address, min(timeout_s, 1.0))
    if why is not None:
        return why
    # The port accepts, but a paused process's kernel accepts too: ask the server itself
    # (on a fresh connection: the pooled one is the connection that just failed).
    try:
        serving = await health_check(address, timeout_s, settings)
    except grpc.aio.AioRpcError as exc:
        return f"no answer to a health check ({exc.code().name})"
    return None if serving else "its health check says it is not serving"
