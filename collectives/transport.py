"""The gRPC endpoint of a peer: one server, a pool of client channels, on one event-loop thread.

A ``Transport`` owns a private asyncio loop running in a thread it starts and
stops itself (``start`` / ``close``). Everything that touches gRPC runs on
that loop; other threads hand it coroutines with ``submit``, which returns a
``concurrent.futures.Future``, so a caller can block on a round or keep
training while it travels.

Messages are bytes: the services that use the transport do their own
(protobuf-compatible) framing, which keeps the big tensor payloads from being
copied through protobuf objects. The transport counts every byte, paces them
with optional token buckets (to emulate a slow link on loopback), and puts a
deadline on every call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from collectives.errors import ConfigError
from collectives.ratelimit import TokenBucket
from collectives.stats import TrafficCounters

log = logging.getLogger(__name__)

T = TypeVar("T")

# Room for a chunk's header next to its payload inside one gRPC message.
HEADER_SLACK_BYTES = 64 * 1024


def message_bound(chunk_bytes: int) -> int:
    """Largest gRPC message a chunk of chunk_bytes raw payload can become (zstd's worst case, header)."""
    return chunk_bytes + chunk_bytes // 64 + HEADER_SLACK_BYTES


def identity(data: bytes) -> bytes:
    """The (de)serializer of raw-bytes methods: the framing is the caller's."""
    return data


@dataclass(frozen=True)
class TransportConfig:
    """Where a peer listens and how it moves bytes."""

    # Interface to bind. Loopback unless the user asks for more (never all interfaces by default).
    host: str = "127.0.0.1"
    # 0 lets the OS choose a free port.
    port: int = 0
    # Largest payload per streamed message; parts are cut into chunks of this size.
    chunk_bytes: int = 1 << 20
    # gRPC send/receive limit per message (None: 4 MiB, or what chunk_bytes needs if more).
    # Every peer of a run must accept the chunks the others send.
    max_message_bytes: int | None = None
    # Cap on bytes sent and, separately, bytes received, in bits per second (None: no cap).
    bandwidth_bps: float | None = None
    # Bound on RPCs a peer serves at once, so other peers cannot make it hold unbounded state.
    max_concurrent_rpcs: int = 256
    # HTTP/2 keepalive ping interval; a peer that stops answering loses its connection.
    keepalive_s: float = 10.0
    # Threads that encode and decode payloads off the event loop (torch and numpy release the GIL),
    # so the loop keeps every stream moving while chunks are being (de)quantized. 0 runs that
    # work on the loop itself: better when peer processes share the cores (a local harness or
    # benchmark with more peers than cores), where the processes are the parallelism and extra
    # threads only queue for the GIL (measured in BENCHMARKS.md).
    codec_threads: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.chunk_bytes < 1024:
            raise ConfigError(f"chunk_bytes must be at least 1024, got {self.chunk_bytes}")
        if self.max_message_bytes is not None and self.max_message_bytes < message_bound(self.chunk_bytes):
            raise ConfigError(
                f"max_message_bytes ({self.max_message_bytes}) must exceed chunk_bytes ({self.chunk_bytes}) "
                f"by at least {message_bound(self.chunk_bytes) - self.chunk_bytes}; raise it or lower chunk_bytes"
            )
        if self.bandwidth_bps is not None and self.bandwidth_bps <= 0:
            raise ConfigError(f"bandwidth must be positive, got {self.bandwidth_bps} bit/s")
        if self.codec_threads < 0:
            raise ConfigError(f"codec_threads must be 0 (on the event loop) or more, got {self.codec_threads}")

    @property
    def message_limit(self) -> int:
        """The effective gRPC message size limit in bytes."""
        if self.max_message_bytes is not None:
            return self.max_message_bytes
        return max(4 << 20, message_bound(self.chunk_bytes))

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel and server options shared by both ends."""
        return [
            ("grpc.max_send_message_length", self.message_limit),
            ("grpc.max_receive_message_length", self.message_limit),
            *keepalive_options(self.keepalive_s),
            # Reconnect fast: a restarted peer comes back at the same address.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.enable_retries", 0),
        ]


def codec_threads_for(peer_processes: int, cores: int | None = None) -> int:
    """Codec threads for each of peer_processes peers sharing this machine's cores: 0 once they fill the cores."""
    cores = cores or os.cpu_count() or 1
    return 0 if peer_processes >= cores else TransportConfig.codec_threads


# Server option: gRPC sets SO_REUSEPORT by default, so a second server could bind a port
# already in use and silently take half of its connections (two coordinators of one run,
# each forming its own quorums). Without it, the second bind fails with a clear error.
EXCLUSIVE_PORT = [("grpc.so_reuseport", 0)]


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


class TransportClosed(RuntimeError):
    """The transport was closed (or never started); start a new one."""


def format_address(host: str, port: int) -> str:
    """host:port, with IPv6 hosts bracketed."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of a host:port address (IPv6 hosts bracketed); ValueError if it has no port."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


async def port_refuses(address: str, timeout_s: float = 1.0) -> str | None:
    """Why a TCP connection to address fails (refused, unroutable, timed out), or None if it is accepted."""
    host, port = split_address(address)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except asyncio.TimeoutError:
        return f"connecting timed out after {timeout_s:g} s"
    except OSError as exc:  # asyncio words it "Connect call failed"; the errno says why
        return os.strerror(exc.errno) if exc.errno else str(exc)
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return None


async def peer_unresponsive(address: str, timeout_s: float = 2.0) -> str | None:
    """Why the gRPC server at address is out of reach (port refused, or no health answer in time), or None."""
    why = await port_refuses(address, min(timeout_s, 1.0))
    if why is not None:
        return why
    # The port accepts, but a paused process's kernel accepts too: ask the server itself,
    # on a fresh channel (the pooled one is the connection that just failed).
    channel = grpc.aio.insecure_channel(address)
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    except grpc.aio.AioRpcError as exc:
        return f"no answer to a health check ({exc.code().name})"
    finally:
        await channel.close()
    return None


class Transport:
    """A peer's gRPC server and client channels, running on a private event-loop thread."""

    def __init__(self, config: TransportConfig | None = None) -> None:
        self.config = config or TransportConfig()
        self.counters = TrafficCounters()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._address: str | None = None
        self._cpu: concurrent.futures.ThreadPoolExecutor | None = None
        self._send_bucket: TokenBucket | None = None
        self._recv_bucket: TokenBucket | None = None
        if self.config.bandwidth_bps:
            rate = self.config.bandwidth_bps / 8.0
            burst = float(self.config.chunk_bytes + HEADER_SLACK_BYTES)
            self._send_bucket = TokenBucket(rate, burst)
            self._recv_bucket = TokenBucket(rate, burst)

    # -- lifecycle -----------------------------------------------------------------

    def start(self, handlers: Sequence[grpc.GenericRpcHandler] = ()) -> str:
        """Start the loop thread and the server with these handlers; return the bound address.

        The server also answers the standard gRPC health service (grpc.health.v1).
        """
        if self._thread is not None:
            raise RuntimeError("transport already started")
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        if self.config.codec_threads:
            self._cpu = concurrent.futures.ThreadPoolExecutor(self.config.codec_threads, thread_name_prefix="loconet-codec")
        self._thread = threading.Thread(target=run, name="loconet-transport", daemon=True)
        self._thread.start()
        ready.wait()
        try:
            self._address = self.submit(self._start_server(list(handlers))).result(timeout=30)
        except BaseException:
            self.close()
            raise
        log.info("transport listening on %s", self._address)
        return self._address

    async def _start_server(self, handlers: list[grpc.GenericRpcHandler]) -> str:
        server = grpc.aio.server(
            options=[*self.config.grpc_options(), *EXCLUSIVE_PORT],
            maximum_concurrent_rpcs=self.config.max_concurrent_rpcs,
        )
        server.add_generic_rpc_handlers(tuple(handlers))
        add_health_service(server)
        address = listen(server, self.config.host, self.config.port, "choose another --host/--port")
        await server.start()
        self._server = server
        return address

    def close(self, grace_s: float = 0.5) -> None:
        """Stop the server, close every channel and stop the loop thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(grace_s), loop).result(timeout=grace_s + 10)
            except Exception:  # closing must not raise; the loop is stopped below regardless
                log.exception("error while closing transport %s", self._address)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not loop.is_running():
            loop.close()
        if self._cpu is not None:
            self._cpu.shutdown(wait=True, cancel_futures=True)
            self._cpu = None
        self._loop = None
        self._thread = None

    async def _shutdown(self, grace_s: float) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()
        current = asyncio.current_task()
        for task in asyncio.all_tasks():
            if task is not current:
                task.cancel()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        """The address other peers reach this one at (host:port)."""
        if self._address is None:
            raise TransportClosed("transport not started")
        return self._address

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The transport's event loop (for code that must run on it)."""
        if self._loop is None:
            raise TransportClosed("transport not started or already closed")
        return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run a coroutine on the transport's loop; return a future of its result."""
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.loop)
        except BaseException:
            coro.close()
            raise

    async def run_cpu(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a CPU-bound function (encoding, decoding, reducing) on the codec threads; call from the loop."""
        if self._loop is None:
            raise TransportClosed("transport not started or already closed")
        if self._cpu is None:  # codec_threads=0: on the loop, between its I/O
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, *args)

    async def run_off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a long one-off function (a state snapshot) on a thread even with codec_threads=0; call from the loop."""
        if self._loop is None:
            raise TransportClosed("transport not started or already closed")
        # None: the loop's default executor, for a transport without codec threads.
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, *args)

    async def run_cpu_ahead(self, calls: Iterable[tuple[Callable[..., T], tuple]]) -> AsyncIterator[T]:
        """Yield fn(*args) for each (fn, args) in order, computing the next on a codec thread while one is used.

        One call ahead, no more: a sender frames or encodes message k+1 while message k
        is on the wire (with codec_threads=0, on the loop while it waits for the wire).
        Work left when the consumer stops is cancelled if not started.
        """
        calls = iter(calls)
        first = next(calls, None)
        if first is None:
            return
        pending = asyncio.ensure_future(self.run_cpu(first[0], *first[1]))
        try:
            for fn, args in calls:
                result = await pending
                pending = asyncio.ensure_future(self.run_cpu(fn, *args))
                yield result
            yield await pending
        finally:
            if not pending.done():
                pending.cancel()
                pending.add_done_callback(consume_exception)

    # -- client side (call from the loop) --------------------------------------------

    def channel(self, address: str) -> grpc.aio.Channel:
        """The pooled channel to address (created on first use)."""
        ch = self._channels.get(address)
        if ch is None:
            ch = grpc.aio.insecure_channel(address, options=self.config.grpc_options())
            self._channels[address] = ch
        return ch

    async def stream_call(
        self, address: str, method: str, messages: AsyncIterable[bytes] | Iterable[bytes], timeout_s: float
    ) -> bytes:
        """Stream messages to a client-streaming method; return the response bytes.

        Raises grpc.aio.AioRpcError with the call's final status on any failure.
        """
        call = self.channel(address).stream_unary(method, request_serializer=identity, response_deserializer=identity)(
            timeout=max(timeout_s, 0.001)
        )
        try:
            async for msg in as_async_iter(messages):
                if self._send_bucket is not None:
                    await self._send_bucket.acquire(len(msg))
                await call.write(msg)
                self.counters.count_sent(address, len(msg))
            await call.done_writing()
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
            # The call ended early (the peer rejected it or died): report its real status.
            pass
        except BaseException:
            call.cancel()
            raise
        return await call

    async def unary_call(self, address: str, method: str, request: bytes, timeout_s: float) -> bytes:
        """Call a unary method with raw request bytes; return the response bytes."""
        if self._send_bucket is not None:
            await self._send_bucket.acquire(len(request))
        call = self.channel(address).unary_unary(method, request_serializer=identity, response_deserializer=identity)
        response = await call(request, timeout=max(timeout_s, 0.001))
        self.counters.count_sent(address, len(request))
        return response

    async def pace_send(self, address: str, nbytes: int) -> None:
        """Count bytes a server stream sends and pace them under the send cap."""
        if self._send_bucket is not None:
            await self._send_bucket.acquire(nbytes)
        self.counters.count_sent(address, nbytes)

    async def note_received(self, sender: str, nbytes: int) -> None:
        """Count bytes a handler received and pace them under the receive cap."""
        self.counters.count_received(sender, nbytes)
        if self._recv_bucket is not None:
            await self._recv_bucket.acquire(nbytes)

    async def wait_unreachable(self, address: str) -> str:
        """Return (with a reason) once address stops accepting connections; runs until cancelled otherwise."""
        ch = self.channel(address)
        state = ch.get_state(try_to_connect=True)
        while True:
            if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                # Confirm before blaming the peer: a dead process's port refuses at once and a
                # paused one does not answer, while a live peer whose connection merely
                # hiccuped answers, and the channel reconnects by itself.
                why = await peer_unresponsive(address)
                if why is not None:
                    return f"unreachable ({why})"
                log.info("connection to %s failed but the peer answers; still watching", address)
            if state == grpc.ChannelConnectivity.SHUTDOWN:
                return "channel shut down"
            await _state_change(ch, state)
            # A dropped connection shows as IDLE: try to reconnect so a dead peer shows as a failure.
            state = ch.get_state(try_to_connect=True)


async def _state_change(channel: grpc.aio.Channel, state: grpc.ChannelConnectivity) -> None:
    """Wait until the channel leaves state; cancelling the caller never waits for grpc.

    grpc's wait_for_state_change does not always honour cancellation (seen while a
    channel sits in TRANSIENT_FAILURE), so it runs as its own task that a cancelled
    caller abandons instead of awaiting.
    """
    change = asyncio.ensure_future(channel.wait_for_state_change(state))
    try:
        await asyncio.wait({change})
    finally:
        if not change.done():
            change.cancel()
        change.add_done_callback(consume_exception)  # the caller looks at the channel's state instead


def consume_exception(future: asyncio.Future) -> None:
    """Done-callback for work whose caller has gone or does not need its outcome: retrieve it, ignore it."""
    if not future.cancelled():
        future.exception()


async def as_async_iter(messages: AsyncIterable[bytes] | Iterable[bytes]) -> AsyncIterator[bytes]:
    """Iterate a plain or an async iterable of messages asynchronously."""
    if isinstance(messages, AsyncIterable):
        async for msg in messages:
            yield msg
    else:
        for msg in messages:
            yield msg


def listen(server: grpc.aio.Server, host: str, port: int, hint: str) -> str:
    """Bind server to host:port (0: any free port) and return the bound address; OSError ending in hint if not."""
    bind = format_address(host, port)
    try:
        bound = server.add_insecure_port(bind)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {bind}: {exc}; {hint}") from exc
    if bound == 0:
        raise OSError(f"cannot listen on {bind}; {hint}")
    return format_address(host, bound)


def add_health_service(server: grpc.aio.Server) -> None:
    """Serve grpc.health.v1 on server, reporting SERVING overall."""
    # A new servicer reports SERVING for the whole server ("").
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)


def method_handlers(service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> grpc.GenericRpcHandler:
    """A generic handler for one service's methods (raw-bytes handlers built by the caller)."""
    return grpc.method_handlers_generic_handler(service, handlers)


def raw_stream_unary(behavior: Any) -> grpc.RpcMethodHandler:
    """A client-streaming method whose handler sees raw request bytes and returns response bytes."""
    return grpc.stream_unary_rpc_method_handler(behavior, request_deserializer=identity, response_serializer=identity)


def raw_unary_unary(behavior: Any) -> grpc.RpcMethodHandler:
    """A unary method whose handler sees raw request bytes and returns response bytes."""
    return grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=identity, response_serializer=identity)
