"""Serving state to joiners: pinned round snapshots shared by every fetch, byte ranges, bounded waiting.

A donor's state changes every round, and a joiner on a slow link may need
longer than a round to fetch it. So the server pins the encoded snapshot of a
round (its manifest, block hashes and bytes) the first time it serves it, and
every fetch of that round, from any joiner, streams from that one copy: a
joiner that got round r's manifest can ask for any byte range of round r again
later, here or from another donor that pinned it too (``collectives.statesync.fetch``
stripes a fetch across donors this way). A pin lasts while fetches of it run and
``pin_grace_s`` after the last one ends; at most ``max_pinned`` rounds are
pinned (the least recently used idle one makes room; when all are in use, a
request for another round is refused, and a request for the current state is
served the newest pinned round instead). ``pinned_rounds`` tells the caller
which rounds joiners may still be catching up from.

No caller can hold the server: fetches are capped per client (its
connection: a claimed peer id proves nothing) and in total, refusals say so at once
(RESOURCE_EXHAUSTED), and a fetch whose client reads nothing for
``serve_stall_timeout_s`` is cancelled, freeing its slot and its pin.

A late peer may ask for the result of a round the coordinator has just
committed before this member has applied it: the server waits up to
``result_wait_s`` for this member's commit before it answers "not kept",
and looks again each time the member says it kept a result (``result_kept``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from collectives.asynctasks import consume_exception
from collectives.errors import Unauthenticated
from collectives.net.admission import UNAUTHENTICATED
from collectives.net.credentials import refuse_unauthenticated, verify_peer_call
from collectives.net.rpc import identity, method_handlers
from collectives.net.transport import Transport
from collectives.net.transportconfig import HEADER_SLACK_BYTES
from collectives.statesync.format import (
    DEFAULT_CONFIG,
    FETCH_METHOD,
    MIN_CHUNK_BYTES,
    SERVICE,
    ResultNotYet,
    StateSnapshot,
    StateSyncConfig,
    _chunk_plan,
    _encode_snapshot,
    _Encoded,
    _frame,
)
from protos import state_pb2 as pb

log = logging.getLogger(__name__)

@dataclass
class _Pin:
    """One round's encoded snapshot, shared by the fetches of that round."""

    encoded: _Encoded
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)


def _connection(peer: str) -> str:
    """host:port of a gRPC peer string such as ``ipv4:10.0.0.5:41234``."""
    scheme, sep, rest = peer.partition(":")
    return rest if sep and scheme in ("ipv4", "ipv6") else peer


# What a peer without a state provider answers a fetch (a joiner stops at once on it: collectives/elastic.py).
SERVES_NO_STATE = ("this peer serves no state: its ElasticCollective has no state provider (an optimizer registers "
                   "one; without one, give provide_state a function returning the state a joiner should load)")


class StateServer:
    """Serves this peer's state to joiners, and recent rounds' results to late peers (FetchState).

    ``provider`` is called on a thread off the event loop (at most one call at a time, shared by
    the requests waiting for it) and must return a consistent snapshot, copied under the caller's
    own lock, or None while this peer holds no state yet. ``results(round_id)`` returns the committed
    result of a recent round as a snapshot, or None when this peer does not keep it, and raises
    ResultNotYet for a round newer than this peer's last commit (whoever keeps results calls ``result_kept``
    after each, or a request waiting for that round looks again only at its deadline). The optional
    ``current_round()`` (called on the loop: must be cheap) names the round the provider's state is
    at, so a request for the current state is served a pinned copy of it without calling the provider.
    """

    def __init__(
        self,
        transport: Transport,
        run_id: str,
        provider: Callable[[], StateSnapshot | None] | None,
        config: StateSyncConfig = DEFAULT_CONFIG,
        results: Callable[[int], StateSnapshot | None] | None = None,
        current_round: Callable[[], int | None] | None = None,
    ) -> None:
        if not run_id:
            raise ValueError("run_id must be a non-empty string")
        self.transport = transport
        self.run_id = run_id
        self.provider = provider
        self.results = results
        self.current_round = current_round
        self.config = config
        # Touched on the loop only.
        self._active = 0
        self._by_client: Counter[str] = Counter()
        self._pins: OrderedDict[int, _Pin] = OrderedDict()  # least recently used first
        self._fresh: asyncio.Future[_Encoded | None] | None = None
        self._aborts: set[asyncio.Task] = set()
        # Set (and replaced) when a result is kept: the requests waiting for an uncommitted round look again.
        self._kept: asyncio.Event | None = None
        # Bytes sent to joiners (also in the transport's counters), so reports can tell them apart.
        self.bytes_served = 0
        # Fetches refused (caps, pins all in use) and fetches cancelled because their client stopped reading.
        self.refused = 0
        self.stalled_out = 0

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """The gRPC handlers of the StateSync service, for ``Transport.start``."""
        method = grpc.unary_stream_rpc_method_handler(
            self._handle_fetch, request_deserializer=identity, response_serializer=identity
        )
        return [method_handlers(SERVICE, {"FetchState": method})]

    def pinned_rounds(self) -> list[int]:
        """The rounds whose snapshots are pinned now (in use or in their grace period), ascending.

        Joiners of these rounds catch up from them: keep the committed results after the oldest.
        """
        now = time.monotonic()
        grace = self.config.pin_grace_s
        return sorted(r for r, p in list(self._pins.items()) if p.users or now - p.last_used < grace)

    # -- snapshots and pins (on the loop) -------------------------------------------------------

    def _snapshot(self, result_of_round: int = 0) -> _Encoded | None:
        # Runs off the event loop: the provider copies the state, then it is checked and hashed.
        if result_of_round:
            snapshot = self.results(result_of_round) if self.results is not None else None
        else:
            snapshot = self.provider() if self.provider is not None else None
        return None if snapshot is None else _encode_snapshot(snapshot, self.run_id, self.config)

    def result_kept(self) -> None:
        """A committed result was kept (call from any thread): requests waiting for a round this member had
        not committed yet look again."""
        self.transport.loop.call_soon_threadsafe(self._wake_waiters)

    def _wake_waiters(self) -> None:
        if self._kept is not None:
            self._kept.set()
            self._kept = None

    async def _result(self, round_id: int) -> _Encoded | None:
        """Round round_id's result, waiting up to result_wait_s while this member has not committed it yet."""
        deadline = time.monotonic() + self.config.result_wait_s
        while True:
            # Taken before looking: a result kept while the look runs wakes this request, it is not missed.
            if self._kept is None:
                self._kept = asyncio.Event()
            kept = self._kept
            try:
                return await self.transport.run_off_loop(self._snapshot, round_id)
            except ResultNotYet as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.info("no result to serve: %s after %g s", exc, self.config.result_wait_s)
                    return None
            with contextlib.suppress(TimeoutError):  # then one last look
                async with asyncio.timeout(left):
                    await kept.wait()

    async def _current(self) -> _Encoded | None:
        """A fresh snapshot of the provider's state; concurrent requests share one provider call."""
        task = self._fresh
        if task is None:
            task = self._fresh = asyncio.ensure_future(self.transport.run_off_loop(self._snapshot, 0))
            task.add_done_callback(self._fresh_done)
        return await asyncio.shield(task)

    def _fresh_done(self, task: asyncio.Future) -> None:
        if self._fresh is task:
            self._fresh = None
        consume_exception(task)  # its waiters saw the outcome, or all left

    def _expire(self) -> None:
        """Drop the idle pins whose grace period is over."""
        now = time.monotonic()
        for round_id, pin in list(self._pins.items()):
            if not pin.users and now - pin.last_used >= self.config.pin_grace_s:
                del self._pins[round_id]

    def _insert(self, encoded: _Encoded) -> _Pin | None:
        """Pin a new round's snapshot, making room by dropping the least recently used idle pin; None if all busy."""
        self._expire()
        if len(self._pins) >= self.config.max_pinned:
            idle = next((r for r, p in self._pins.items() if not p.users), None)
            if idle is None:
                return None
            del self._pins[idle]
        pin = self._pins[encoded.round_id] = _Pin(encoded)
        return pin

    def _newest_if_all_busy(self) -> _Pin | None:
        """The newest pinned round when no other can be pinned (all pins in use), else None."""
        self._expire()
        if len(self._pins) < self.config.max_pinned or any(not p.users for p in self._pins.values()):
            return None
        return self._pins[max(self._pins)]

    def _use(self, pin: _Pin) -> _Pin:
        pin.users += 1
        self._pins.move_to_end(pin.encoded.round_id)
        return pin

    def _unuse(self, pin: _Pin) -> None:
        pin.users -= 1
        pin.last_used = time.monotonic()
        if not pin.users:
            asyncio.get_running_loop().call_later(self.config.pin_grace_s, self._expire)

    async def _pin_for(self, req: pb.StateRequest, context: grpc.aio.ServicerContext, who: str) -> _Pin:
        """The pin a state request is served from (in use until ``_unuse``), or abort the call."""
        self._expire()
        if req.HasField("round_id"):
            want = req.round_id
            pin = self._pins.get(want)
            hint = self.current_round() if self.current_round is not None else None
            if pin is None and hint is not None and hint != want:
                await context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"this peer no longer holds round {want} (its state is at round {hint}); "
                    f"fetch round {hint} or ask a peer that still holds round {want}",
                )
            if pin is None:
                encoded = await self._current_or_abort(context, who)
                pin = self._pins.get(want)  # pinned by another request meanwhile
                if pin is None and encoded.round_id != want:
                    await context.abort(
                        grpc.StatusCode.NOT_FOUND,
                        f"this peer no longer holds round {want} (its state is at round {encoded.round_id}); "
                        f"fetch round {encoded.round_id} or ask a peer that still holds round {want}",
                    )
                pin = pin or self._insert(encoded)
                if pin is None:
                    await self._refuse(
                        context,
                        f"this peer's {self.config.max_pinned} pinned snapshots are all being fetched, so it cannot "
                        f"pin round {want} too; retry later or ask another peer",
                    )
            return self._use(pin)
        hint = self.current_round() if self.current_round is not None else None
        pin = self._pins.get(hint) if hint is not None else None
        # With every pin in use no new round can be pinned: the newest pinned one is still a consistent state.
        pin = pin or self._newest_if_all_busy()
        if pin is None:
            encoded = await self._current_or_abort(context, who)
            pin = self._pins.get(encoded.round_id)
            if pin is not None and not pin.users and pin.encoded.manifest != encoded.manifest:
                # The state changed without a new round (e.g. this peer reloaded it): nobody is fetching
                # the old copy, so the current one replaces it.
                log.info("round %d's state changed since it was pinned; pinning the current one", encoded.round_id)
                del self._pins[encoded.round_id]
                pin = None
            pin = pin or self._insert(encoded) or self._newest_if_all_busy()
        return self._use(pin)

    async def _current_or_abort(self, context: grpc.aio.ServicerContext, who: str) -> _Encoded:
        if self.provider is None:
            # Never will: a joiner told to wait for this peer's first round would wait for good.
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, SERVES_NO_STATE)
        try:
            encoded = await self._current()
        except Exception as exc:
            log.exception("the state provider failed while serving %s", who)
            await context.abort(grpc.StatusCode.INTERNAL, f"the serving peer could not snapshot its state: {exc}")
        if encoded is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this peer holds no state yet; retry after its first round or ask another peer",
            )
        return encoded

    async def _refuse(self, context: grpc.aio.ServicerContext, why: str) -> None:
        self.refused += 1
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)

    # -- the FetchState handler ------------------------------------------------------------------

    async def _handle_fetch(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        try:
            req = pb.StateRequest.FromString(request)
        except Exception as exc:  # protobuf's DecodeError and friends
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed StateRequest: {exc}")
        try:
            # With a run secret: only a peer the run's coordinator vouches for reads the state, as itself.
            cred = verify_peer_call(context, self.transport.auth, FETCH_METHOD, self.transport.address)
            if cred is not None and req.peer_id != cred.peer_id:
                raise Unauthenticated(f"the fetch names peer {req.peer_id[:100]!r}, its credential {cred.peer_id!r}")
        except Unauthenticated as exc:
            self.transport.refusals.count(UNAUTHENTICATED)
            await refuse_unauthenticated(context, exc)
        who = f"{req.peer_id[:200]!r} at {context.peer()}" if req.peer_id else context.peer()
        if req.run_id != self.run_id:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this peer serves run {self.run_id!r}, not {req.run_id[:100]!r}; fetch from a peer of your own run",
            )
        # The connection, not the peer id the request claims: anyone can claim a joiner's id and use up its share.
        client = _connection(context.peer())
        if self._active >= self.config.max_concurrent_fetches:
            await self._refuse(
                context,
                f"this peer is already serving {self._active} state fetches, its maximum; retry later or fetch "
                "from another peer",
            )
        if self._by_client[client] >= self.config.max_fetches_per_client:
            await self._refuse(
                context,
                f"{client} already has {self._by_client[client]} state fetches in progress here, the most one "
                "client may hold; wait for one to end or fetch from another peer",
            )
        self._active += 1
        self._by_client[client] += 1
        stalled = False
        try:
            stalled = not await self._serve(req, context, who)
        except asyncio.CancelledError:
            log.info("state fetch by %s ended early (cancelled or disconnected)", who)
            raise
        finally:
            self._active -= 1
            self._by_client[client] -= 1
            if self._by_client[client] <= 0:
                del self._by_client[client]
        if stalled:
            self.stalled_out += 1
            timeout = self.config.serve_stall_timeout_s
            log.warning("cancelled a state fetch by %s: it read nothing for %g s", who, timeout)
            # The status can only follow the queued data, which the client does not read: send it
            # from a task of its own and end this handler now, so its slot is free at once.
            abort = asyncio.ensure_future(
                context.abort(
                    grpc.StatusCode.ABORTED,
                    f"the serving peer cancelled this fetch: nothing was read for {timeout:g} s "
                    "(serve_stall_timeout_s); read the stream as it comes or fetch from another peer",
                )
            )
            self._aborts.add(abort)
            abort.add_done_callback(self._aborts.discard)
            abort.add_done_callback(consume_exception)
            raise asyncio.CancelledError()  # gRPC ends a cancelled handler without a status of its own

    async def _serve(self, req: pb.StateRequest, context: grpc.aio.ServicerContext, who: str) -> bool:
        """Stream what req asks for; False if the client stopped reading (the call is to be cancelled)."""
        started = time.monotonic()
        pin = None
        try:
            if req.result_of_round:
                try:
                    encoded = await self._result(req.result_of_round)
                except Exception as exc:
                    log.exception("the results provider failed while serving %s", who)
                    await context.abort(grpc.StatusCode.INTERNAL, f"the serving peer could not copy the result: {exc}")
                if encoded is None:
                    await context.abort(
                        grpc.StatusCode.NOT_FOUND,
                        f"this peer does not keep the result of round {req.result_of_round} "
                        f"(it dropped it, or did not commit it within result_wait_s); fetch the whole state",
                    )
            else:
                pin = await self._pin_for(req, context, who)
                encoded = pin.encoded
            if req.expect_sha256 and not hmac.compare_digest(req.expect_sha256, encoded.sha256):
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"this peer's state of round {encoded.round_id} has SHA-256 {encoded.sha256.hex()[:16]}..., not "
                    f"the expected {req.expect_sha256.hex()[:16]}...; fetch it from a peer that holds that state",
                )
            start, total = req.offset, encoded.total_bytes
            end = total if req.length == 0 else start + req.length
            if start > total or end > total:
                await context.abort(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"bytes [{start}, {end}) asked of a state of {total} bytes; ask within its manifest's total_bytes",
                )
            if not await self._send(context, encoded, start, end, req.manifest_only, req.max_chunk_bytes):
                return False
            log.info(
                "served round %d state bytes [%d, %d) of %d to %s in %.2f s",
                encoded.round_id, start, end if not req.manifest_only else start, total, who,
                time.monotonic() - started,
            )
            return True
        finally:
            if pin is not None:
                self._unuse(pin)

    async def _send(
        self, context: grpc.aio.ServicerContext, encoded: _Encoded, start: int, end: int, manifest_only: bool,
        asked: int = 0,
    ) -> bool:
        """Write the response's messages (about ``asked`` data bytes each, if asked), each within
        serve_stall_timeout_s; False when one could not be."""
        limit = self.transport.config.message_limit - HEADER_SLACK_BYTES
        if len(encoded.manifest) > limit:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the state's manifest ({len(encoded.manifest)} bytes) exceeds the gRPC message limit; raise "
                "TransportConfig.max_message_bytes on every peer, use fewer tensors or a larger block_bytes",
            )
        peer = context.peer()
        messages = self._messages(encoded, limit, start, end, manifest_only, asked)
        async with contextlib.aclosing(messages):
            async for message in messages:
                await self.transport.pace_send(peer, len(message))
                # Under flow control a write waits for the client to read: a client that stops
                # reading must not hold this fetch (and its pin) for the whole deadline.
                try:
                    async with asyncio.timeout(self.config.serve_stall_timeout_s):
                        await context.write(message)
                except TimeoutError:
                    return False
                except Exception as exc:
                    # gRPC core fails a write to a call its client cancelled or dropped (its internal
                    # ExecuteBatchError): the fetch ended early, as a cancelled one does. Raised on, gRPC logged it
                    # as an error with a traceback, one per such fetch (the harness's stall event, a joiner killed).
                    log.debug("a write of a state fetch to %s failed: %r", peer, exc)
                    raise asyncio.CancelledError() from None
                self.bytes_served += len(message)
        return True

    async def _messages(
        self, encoded: _Encoded, limit: int, start: int, end: int, manifest_only: bool, asked: int = 0
    ) -> AsyncIterator[bytes]:
        """The response's messages (at most limit bytes each, and about ``asked`` data bytes when the receiver
        asked for that size), each framed while the last one is sent."""
        if manifest_only or start >= end:
            yield _frame(encoded.manifest, start, [])
            return
        chunk_bytes = min(self.config.chunk_bytes, limit, max(asked, MIN_CHUNK_BYTES) if asked else limit)
        plan = _chunk_plan(encoded.views, chunk_bytes, start, end)
        first = next(plan)
        manifest: bytes | None = encoded.manifest
        if len(encoded.manifest) + chunk_bytes > limit:
            yield _frame(encoded.manifest, start, [])  # the manifest does not fit next to a full chunk
            manifest = None
        calls = itertools.chain(
            [(_frame, (manifest, *first))], ((_frame, (None, offset, pieces)) for offset, pieces in plan)
        )
        framed = self.transport.run_cpu_ahead(calls)
        async with contextlib.aclosing(framed):
            async for message in framed:
                yield message
