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

Its settings are a ``TransportConfig`` (``collectives.net.transportconfig``). Its
server and channels come from ``collectives.net.rpc`` (options, credentials hook,
health service, raw-bytes handlers). It binds ``host`` and reports
``advertise`` as its ``address``: what it registers with the coordinator and
what joiners fetch state from. Without ``advertise``, a wildcard bind reports this machine's
address on its route to the coordinator (see ``collectives.net.addresses``).

Waiting is bounded for every caller (``collectives.net.admission``): the handlers
it serves are admitted under per-connection and total caps, a client stream
that sends nothing is closed, and gRPC's own server-wide cap is not used, so
the health service always answers. A call refused in a way the receiver marks
retryable (busy, or a round it has not opened yet) is retried here with
backoff until the caller's deadline, and so is a call whose connection never
became ready while the receiver still answers a health check (a dead
receiver's call fails at once); a stream's messages are kept for such a
replay until the receiver says it has taken the stream on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Coroutine, Iterable, Sequence
from typing import Any, Self, TypeVar

import grpc

from collectives.asynctasks import cancel_and_wait, cancel_within, consume_exception
from collectives.errors import TransportClosed, UsageError
from collectives.net.addresses import advertised_address, check_reachable, split_address
from collectives.net.admission import Admission, Refusals, Replay, admit_handlers, never_connected, retry_reason
from collectives.net.credentials import CallAuth
from collectives.net.ratelimit import TokenBucket, burst_bytes
from collectives.net.reachability import peer_unresponsive
from collectives.net.rpc import bind, call_metadata, identity, make_channel, make_server
from collectives.net.servercalls import CallTasks, stop_server
from collectives.net.transportconfig import TransportConfig
from collectives.stats import TrafficCounters

log = logging.getLogger(__name__)

T = TypeVar("T")

# Backoff between retries of a call the receiver refused as retryable: doubling from the first to the last.
RETRY_BACKOFF_S = (0.05, 1.0)
# Bytes of a stream kept for a replay until the receiver takes it on (at least this, or four messages).
# The receiver reads nothing past the first message before then, so flow control keeps the real
# amount far below; a stream to a receiver that never says so simply stops being replayable.
REPLAY_BYTES = 32 << 20
# Longest a refused stream waits for gRPC to settle its initial metadata (it is settled once the call ends).
ACCEPTED_SETTLE_S = 1.0
# A pooled channel not asked for in this long and not connected (or connecting) is closed when another is made:
# a long run with churn meets thousands of peer addresses (~8 KB a channel, kept for ever before). The
# coordinator's channel is kept: a client holds it for its calls.
CHANNEL_IDLE_S = 600.0
# Calls still on a channel closed as idle may finish within this long.
CHANNEL_CLOSE_GRACE_S = 60.0
_BUSY = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.CONNECTING)
# Longest close() waits for gRPC to answer the connectivity watches of the channels it closed (it answers them
# as soon as a closed channel's calls are freed: in milliseconds).
WATCH_SETTLE_S = 1.0


class Transport:
    """A peer's gRPC server and client channels, running on a private event-loop thread."""

    def __init__(self, config: TransportConfig | None = None, auth: CallAuth | None = None) -> None:
        self.config = config or TransportConfig()
        # The run's credentials (collectives.net.credentials): every call out carries them, every call in proves them.
        self.auth = auth
        self.counters = TrafficCounters()
        # The response message size this peer's state and result fetches ask for (0: each source's own, 1 MiB):
        # set once one of them stalled, as behind a slow link (statesync/fetch.py), for every later one.
        self.fetch_chunk_bytes = 0
        # Inbound calls refused or closed early, by kind (metrics); the all-reduce counts its own here too.
        self.refusals = Refusals()
        self.admission = Admission(self.config.admission_limits(), self.refusals)
        self._rpc = self.config.rpc_settings()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._calls = CallTasks()  # the tasks of the server's calls, ended first at close (collectives.net.servercalls)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._used: dict[str, float] = {}  # when each pooled channel was last asked for
        # The registration each address's peer last had in a round (Member.registration): note_registrations.
        self._registrations: dict[str, int] = {}
        self._swept = time.monotonic()
        self._closing: set[asyncio.Task] = set()  # idle channels being closed
        # The connectivity watches in flight, one per channel and state, shared by its watchers (_state_change).
        self._watches: dict[tuple[grpc.aio.Channel, grpc.ChannelConnectivity], asyncio.Future] = {}
        self._coordinator: str | None = None
        self._address: str | None = None
        self._bound_address: str | None = None
        self._cpu: concurrent.futures.ThreadPoolExecutor | None = None
        self._send_bucket: TokenBucket | None = None
        self._recv_bucket: TokenBucket | None = None
        if self.config.bandwidth_bps:
            rate = self.config.bandwidth_bps / 8.0
            # A link's burst, not a chunk's: a bucket that starts full and refills to a whole chunk between rounds
            # let every round under ~1 MiB through at once (link_utilization 282 at 10kbit). A chunk goes into debt.
            burst = float(burst_bytes(rate))
            self._send_bucket = TokenBucket(rate, burst)
            self._recv_bucket = TokenBucket(rate, burst)

    # -- lifecycle -----------------------------------------------------------------

    def start(self, handlers: Sequence[grpc.GenericRpcHandler] = (), *, coordinator: str | None = None) -> str:
        """Start the loop thread and the server with these handlers; return the address others reach it at.

        That is ``advertise`` when configured (``bound_address`` is what it bound).
        ``coordinator`` (HOST:PORT, the address every member of the run reaches)
        decides what a wildcard bind advertises, and a loopback bind while it is on
        another machine raises ConfigError before anything starts
        (``collectives.net.addresses.check_reachable``). The server also answers the
        standard gRPC health service (grpc.health.v1).
        """
        if self._thread is not None:
            raise UsageError("transport already started: close() it before starting it again")
        if coordinator is not None:
            check_reachable(self.config.host, self.config.advertise, coordinator)
            self._coordinator = coordinator
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        if self.config.codec_threads:
            self._cpu = concurrent.futures.ThreadPoolExecutor(
                self.config.codec_threads, thread_name_prefix="loconet-codec"
            )
        self._thread = threading.Thread(target=run, name="loconet-transport", daemon=True)
        self._thread.start()
        ready.wait()
        try:
            self._bound_address = self.submit(self._start_server(tuple(handlers))).result(timeout=30)
        except BaseException:
            self.close()
            raise
        self._address = advertised_address(
            self.config.host,
            split_address(self._bound_address)[1],
            self.config.advertise,
            role="peer",
            coordinator=coordinator,
        )
        if self._address == self._bound_address:
            log.info("transport listening on %s", self._address)
        else:
            log.info("transport listening on %s, advertised as %s", self._bound_address, self._address)
        return self._address

    async def _start_server(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> str:
        server = make_server(
            self._rpc, role="peer", handlers=admit_handlers(handlers, self.admission), auth=self.auth, calls=self._calls
        )
        hint = "choose another --host/--port"
        address = bind(server, self.config.host, self.config.port, settings=self._rpc, hint=hint)
        await server.start()
        self._server = server
        return address

    def close(self, grace_s: float = 0.5) -> None:
        """Stop the server (within grace_s), end its calls, close every channel, cancel what is left on the loop and
        stop the loop thread (that order: docs/collectives.md, Threads). Idempotent."""
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
            # The server's calls end before anything else is cancelled: cancelled among the rest, gRPC's task around
            # a call that had just ended logged "Exception not handled by _handle_exceptions"
            # (collectives.net.servercalls).
            server, self._server = self._server, None
            await stop_server(server, self._calls, grace_s)
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()
        await cancel_and_wait(list(self._closing))
        # As asyncio.run ends a loop: cancel what is left and let it unwind, then close the async generators (a
        # cancelled handler's request stream among them). Stopping the loop first left both pending, and asyncio
        # logged each as "Task was destroyed but it is pending!" at exit (a peer held by 50 idle streams: 85 lines).
        watches = set(self._watches.values())
        current = asyncio.current_task()
        # Nothing here holds the cancelled tasks afterwards: a cancelled task keeps its CancelledError, whose
        # traceback holds the gRPC call it awaited (an abort notice's), and that call keeps its closed channel,
        # and the channel's watches, from being answered (below).
        await cancel_within([t for t in asyncio.all_tasks() if t is not current and t not in watches], grace_s + 1.0)
        # A closed channel's watches are answered through gRPC's completion queue, which every event loop of
        # the process that used gRPC reads: one read after this loop closed was handed to the closed loop
        # ("Event loop is closed", logged by another transport's loop). gRPC answers them once the channel is
        # gone, i.e. once the calls on it are freed: let them land while the loop runs. A stream call cancelled
        # while it was still sending (a push of a cancelled or failed round, or one the channel's close cancelled)
        # is not freed when its last reference goes: gRPC's task that ran it keeps its CancelledError, whose
        # traceback holds the call, a cycle only the collector frees. Unanswered, such watches cost every close
        # WATCH_SETTLE_S and were answered after the loop closed; a collection here takes tens of milliseconds.
        if any(not watch.done() for watch in watches):
            gc.collect()
        if watches:
            await asyncio.wait(watches, timeout=WATCH_SETTLE_S)
        log.debug("transport %s closed its channels: %d of their %d connectivity watch(es) left unanswered",
                  self._address, sum(not watch.done() for watch in watches), len(watches))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s + 1.0):
                await asyncio.get_running_loop().shutdown_asyncgens()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        """The address other peers reach this one at (host:port): the advertised one, else the bound one."""
        if self._address is None:
            raise TransportClosed("transport not started")
        return self._address

    @property
    def bound_address(self) -> str:
        """The address the server is bound to (host:port; 0.0.0.0 or [::] when bound to every interface)."""
        if self._bound_address is None:
            raise TransportClosed("transport not started")
        return self._bound_address

    @property
    def running(self) -> bool:
        """Whether the transport is started and not closed: its loop is there to take work (``submit``), so
        asking for ``loop`` does not raise TransportClosed. Safe to read from any thread, a signal handler too."""
        loop = self._loop
        return loop is not None and not loop.is_closed()

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
        """The pooled channel to address (created on first use; closed once idle, CHANNEL_IDLE_S)."""
        now = time.monotonic()
        ch = self._channels.get(address)
        if ch is None:
            self._close_idle(now)
            # Its own TCP connection, as a peer in its own process has: peers sharing a process (tests, thread
            # groups) would otherwise share one, and servers count their calls per connection (admission caps).
            ch = make_channel(address, self._rpc, own_connection=True, auth=self.auth)
            self._channels[address] = ch
        self._used[address] = now
        return ch

    def _close_idle(self, now: float) -> None:
        """Close the pooled channels not asked for in CHANNEL_IDLE_S and not connected (checked at most every
        tenth of that); the coordinator's stays."""
        if now - self._swept < CHANNEL_IDLE_S / 10:
            return
        self._swept = now
        for address, used in list(self._used.items()):
            ch = self._channels[address]
            if address == self._coordinator or now - used < CHANNEL_IDLE_S or ch.get_state() in _BUSY:
                continue
            self._retire(address)
        log.debug("%d pooled channel(s) open", len(self._channels))

    def _retire(self, address: str) -> None:
        """Take address's channel out of the pool and close it once its calls end (CHANNEL_CLOSE_GRACE_S at most)."""
        ch = self._channels.pop(address)
        del self._used[address]
        task = asyncio.get_running_loop().create_task(ch.close(grace=CHANNEL_CLOSE_GRACE_S))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def retire_peer_channels(self) -> None:
        """Retire every pooled channel but the coordinator's (this peer registered again after a cut: its
        connections from before it may be dead)."""
        for address in [a for a in self._channels if a != self._coordinator]:
            self._retire(address)

    def note_registrations(self, members: Iterable[tuple[str, int]]) -> None:
        """Take in a round's (address, registration) members: the pooled channel to an address whose peer
        registered again since the last round that named it is retired, so that the next call connects anew.

        A peer the coordinator lost (its lease lapsed in a cut) and that registered again may sit behind a
        connection that died in the cut without either side knowing yet; a call on it fails the round. Only a
        changed registration retires: an address absent from some rounds (a sample's) keeps its channel.
        Registration 0 (a coordinator that does not say) is ignored.
        """
        named = set()
        for address, registration in members:
            if not registration:
                continue
            named.add(address)
            before = self._registrations.get(address)
            self._registrations[address] = registration
            if before is not None and before != registration and address in self._channels:
                log.info("%s registered again since its last round with this peer: a new connection to it",
                         address)
                self._retire(address)
        # Remembered: the addresses of this round and those with a channel; the rest could only grow the table.
        for address in [a for a in self._registrations if a not in named and a not in self._channels]:
            del self._registrations[address]

    async def stream_call(
        self, address: str, method: str, messages: AsyncIterable[bytes] | Iterable[bytes], timeout_s: float
    ) -> bytes:
        """Stream messages to a client-streaming method; return the response bytes.

        The first message is produced (and paced) before the stream opens, so the
        receiver never holds an open stream that is silent on our side. A refusal
        the receiver marks retryable is retried with backoff until timeout_s has
        passed, replaying the messages it had not taken on; so is a connection that
        never became ready, while the receiver answers a health check. Raises
        grpc.aio.AioRpcError with the last call's final status on any failure.
        """
        deadline = time.monotonic() + timeout_s
        source = as_async_iter(messages)
        replay = Replay(max(REPLAY_BYTES, 4 * self.config.message_limit))
        backoff = RETRY_BACKOFF_S[0]
        try:
            while True:
                try:
                    return await self._stream_once(address, method, source, replay, deadline)
                except grpc.aio.AioRpcError as exc:
                    if not replay.usable:  # the receiver took the stream on, or it outgrew what is kept
                        raise
                    why = await self._retry_reason(address, exc, replayable=True)
                    if why is None or deadline - time.monotonic() <= backoff:
                        raise
                    log.debug("%s to %s not taken (%s: %s); sending it again", method, address, why, exc.details())
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, RETRY_BACKOFF_S[1])
        finally:
            await source.aclose()  # the producer's own clean-up (pending encodes) runs now, not at collection

    async def _retry_reason(self, address: str, exc: grpc.aio.AioRpcError, replayable: bool = False) -> str | None:
        """Why a call to address that failed with exc may be sent again whole, or None: it fails now.

        stream_call and unary_call both decide here; the caller knows the call can be resent (a stream only while
        its messages are kept, ``Replay.usable``). Retried: a refusal the receiver marks retryable (``retry_reason``;
        ``replayable`` as there), and a connection that never became ready (``never_connected``) while its server
        still answers a health check: a connection reset or refused once, as seen on a capped link at a round's
        start. A server that does not answer (a refused port, no health answer in time) fails the call at once,
        as a dead member's must: that is what makes its loss known fast.
        """
        why = retry_reason(exc, replayable=replayable)
        if why is None and never_connected(exc):
            unreachable = await self.unresponsive(address)
            why = None if unreachable else "its connection failed, and its server answers"
        return why

    async def _stream_once(
        self, address: str, method: str, source: AsyncGenerator[bytes, None], replay: Replay, deadline: float
    ) -> bytes:
        """One attempt of stream_call: the replayed messages, then the rest of source."""
        resend = list(replay.messages)
        if resend:
            first: bytes | None = resend.pop(0)
        else:
            first = await anext(source, None)
            if first is not None:
                replay.keep(first)
        if first is not None and self._send_bucket is not None:
            await self._send_bucket.acquire(len(first))
        call = self.channel(address).stream_unary(method, request_serializer=identity, response_deserializer=identity)(
            timeout=max(deadline - time.monotonic(), 0.001), metadata=call_metadata(self.auth, method, address)
        )
        accepted = asyncio.ensure_future(call.initial_metadata())
        try:
            if first is not None:
                await call.write(first)
                self.counters.count_sent(address, len(first))
            for msg in resend:
                await self._write(call, address, msg)
            async for msg in source:
                replay.note_accepted(accepted)
                replay.keep(msg)
                await self._write(call, address, msg)
            await call.done_writing()
        except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
            # The call ended early (the peer rejected it or died): report its real status.
            pass
        except BaseException:
            call.cancel()
            accepted.cancel()
            accepted.add_done_callback(consume_exception)
            raise
        try:
            return await call
        except grpc.aio.AioRpcError:
            # Whether the receiver took the stream on before refusing decides if a retry may replay it;
            # gRPC settles the initial metadata (empty if none came) once the call has ended.
            await asyncio.wait({accepted}, timeout=ACCEPTED_SETTLE_S)
            replay.note_accepted(accepted)
            raise
        finally:
            accepted.cancel()
            accepted.add_done_callback(consume_exception)

    async def _write(self, call: grpc.aio.StreamUnaryCall, address: str, msg: bytes) -> None:
        if self._send_bucket is not None:
            await self._send_bucket.acquire(len(msg))
        await call.write(msg)
        self.counters.count_sent(address, len(msg))

    async def unary_call(self, address: str, method: str, request: bytes, timeout_s: float) -> bytes:
        """Call a unary method with raw request bytes; return the response bytes.

        A refusal the receiver marks retryable is retried with backoff until timeout_s has passed; so is a
        connection that never became ready, while the receiver answers a health check (as in stream_call).
        Raises grpc.aio.AioRpcError with the last call's final status on any failure.
        """
        # Resending is safe whatever the method, as only a request the receiver never acted on is sent again: a
        # retryable refusal comes before the handler does anything, and a connection that never became ready
        # carried no byte of the call. It need not be idempotent, and the collectives' are not all: a second
        # PushStat share of a round is refused as a duplicate (DuplicateStream), while a second Abort notice
        # only fails the same ranks again.
        deadline = time.monotonic() + timeout_s
        backoff = RETRY_BACKOFF_S[0]
        while True:
            if self._send_bucket is not None:
                await self._send_bucket.acquire(len(request))
            # Each attempt on the pooled channel of now, as stream_call's: one closed or replaced meanwhile is not used.
            call = self.channel(address).unary_unary(
                method, request_serializer=identity, response_deserializer=identity
            )
            try:
                response = await call(request, timeout=max(deadline - time.monotonic(), 0.001))
            except grpc.aio.AioRpcError as exc:
                why = await self._retry_reason(address, exc)
                if why is None or deadline - time.monotonic() <= backoff:
                    raise
                log.debug("%s to %s not taken (%s: %s); sending it again", method, address, why, exc.details())
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, RETRY_BACKOFF_S[1])
                continue
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

    async def unresponsive(self, address: str) -> str | None:
        """Why the peer at address is out of reach (its port refuses, or no health answer in time: a dead or
        paused process), or None: its server answers (on a fresh connection, with this transport's TLS and token)."""
        return await peer_unresponsive(address, settings=self._rpc)

    async def wait_unreachable(self, address: str) -> str:
        """Return (with a reason) once address stops accepting connections; runs until cancelled otherwise."""
        ch = self.channel(address)
        state = ch.get_state(try_to_connect=True)
        while True:
            if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                # Confirm before blaming the peer: a dead process's port refuses at once and a
                # paused one does not answer, while a live peer whose connection merely
                # hiccuped answers, and the channel reconnects by itself.
                why = await self.unresponsive(address)
                if why is not None:
                    return f"unreachable ({why})"
                log.info("connection to %s failed but the peer answers; still watching", address)
            if state == grpc.ChannelConnectivity.SHUTDOWN:
                if self._server is None:  # the transport is closing
                    return "channel shut down"
                # Retired (its peer registered again, note_registrations): watch the pool's new one instead.
                ch = self.channel(address)
                state = ch.get_state(try_to_connect=True)
                continue
            await self._state_change(ch, state)
            if self._channels.get(address) is ch:
                self._used[address] = time.monotonic()  # watched: in use, however long the round
            # A dropped connection shows as IDLE: try to reconnect so a dead peer shows as a failure.
            state = ch.get_state(try_to_connect=True)

    async def _state_change(self, channel: grpc.aio.Channel, state: grpc.ChannelConnectivity) -> None:
        """Wait until the channel leaves state; cancelling the caller never waits for grpc.

        gRPC cannot take a connectivity watch back: cancelling its waiter leaves it registered (with a future
        it answers) until the state changes, which for a connected channel is when it closes. A watch per
        caller piled up, one per member per round (800 after 400 rounds of two). So the callers watching a
        channel in one state share one watch, which a cancelled caller abandons; close() waits for the
        watches of the channels it closes to be answered. grpc's wait_for_state_change does not always
        honour cancellation anyway (seen while a channel sits in TRANSIENT_FAILURE).
        """
        key = (channel, state)
        change = self._watches.get(key)
        if change is None:
            change = asyncio.ensure_future(channel.wait_for_state_change(state))
            self._watches[key] = change
            change.add_done_callback(lambda done: self._watch_answered(key, done))
        await asyncio.wait({change})

    def _watch_answered(self, key: tuple[grpc.aio.Channel, grpc.ChannelConnectivity], change: asyncio.Future) -> None:
        if self._watches.get(key) is change:
            del self._watches[key]
        consume_exception(change)  # the callers look at the channel's state instead


async def as_async_iter(messages: AsyncIterable[bytes] | Iterable[bytes]) -> AsyncGenerator[bytes, None]:
    """Iterate a plain or an async iterable of messages asynchronously."""
    if isinstance(messages, AsyncIterable):
        async for msg in messages:
            yield msg
    else:
        for msg in messages:
            yield msg
