"""The stuck caller, played from the harness: idle PushPart streams and unread state fetches held against one peer.

Issue 14 found that callers who open calls and then do nothing could take a
peer offline: 260 idle PushPart streams filled its server, and four unread
state fetches locked out every joiner. The defences (``collectives/net/admission.py``,
``RoundRegistry.find`` bounded by ``open_wait_s``, the StateServer's fetch caps
and ``serve_stall_timeout_s``) are checked in-process by
``tests/test_bounded_waiting.py``; a ``stall`` event (``peer/harness/scenario.py``)
puts the same pressure on a peer of a running network, so a scenario can show
that rounds keep committing, the peer is never dropped and joiners still join.

A ``Stall`` runs its own asyncio loop in a thread (``start``/``stop``) and,
spread over several connections as an attacker would:

- opens ``streams`` PushPart calls to the peer's data-plane address: half send
  nothing, half send one well-formed PartChunk header of a round that never
  opens, and none ever ends its side of the stream;
- opens ``fetches`` FetchState calls for the whole state, naming no peer id
  (so the peer keys them by connection), and reads only their first message.

Whenever the peer ends a call, its slot opens it again (at most once per
``reopen_every_s``), so the pressure stays on until ``duration_s`` passes,
``stop`` is called, or the target has left the run. A client that reads
nothing never learns that the peer ended its fetch (the status waits behind
the unread messages), so a fetch is held unread for ``fetch_hold_s``, longer
than a peer's ``serve_stall_timeout_s``, then read out to see how it ended.
``StallCounts`` says what the peer did with the calls, and ``stall_figures``
(pure, over the peers' events and the coordinator's status) what the run did
meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import grpc
import torch

from collectives.asynctasks import cancel_and_wait
from collectives.codecs import CodecConfig, make_codec
from collectives.net.admission import RETRY_KEY
from collectives.net.rpc import identity, make_channel
from collectives.net.transportconfig import TransportConfig
from collectives.reduce.aggregators import AggregatorConfig
from collectives.reduce.inbox import SCATTER, Group
from collectives.reduce.parts import part_bounds
from collectives.reduce.round import PUSH_METHOD, chunk_message
from collectives.statesync.format import FETCH_METHOD
from protos import state_pb2

log = logging.getLogger(__name__)

# The round id the stuck caller's headers name: far beyond any round a run reaches, so it never opens.
NEVER_ROUND = 1 << 40
# A placeholder for the sender of those headers (its address is in no message; any distinct string will do).
_FAKE_SENDER = "stall.invalid:1"
# The stuck caller keeps gRPC's receive window at its initial size: the BDP probe would grow it on a loaded
# machine until a whole state fits unread in the client, and the fetch would complete instead of stalling.
STALLED_CLIENT_OPTIONS = (("grpc.http2.bdp_probe", 0),)
# How often the stall looks for its target's address before the target has joined.
_ADDRESS_POLL_S = 0.2


@dataclass(frozen=True)
class StallPlan:
    """What a stall holds open against one peer, and for how long."""

    run_id: str
    streams: int = 300
    fetches: int = 10
    # The calls are spread over this many client connections (each its own TCP connection).
    connections: int = 10
    # None: until stop().
    duration_s: float | None = None
    # A slot whose call the peer ended opens it again, but no sooner than this after its last opening.
    reopen_every_s: float = 1.0
    # An unread fetch is held this long (longer than a peer's serve_stall_timeout_s, 15 s by default), then read
    # out for at most drain_s to learn whether the peer cut it off, and opened again.
    fetch_hold_s: float = 17.0
    drain_s: float = 5.0


@dataclass(frozen=True)
class StallCounts:
    """What the peer did with the stall's calls (status code names as keys)."""

    address: str | None
    streams_opened: int
    streams_reopened: int
    # Streams the peer ended, by status code and the reason a retryable refusal gives (UNAVAILABLE/not-open: a
    # round not open; DEADLINE_EXCEEDED/first-message: a silent stream; RESOURCE_EXHAUSTED/busy: a full cap).
    streams_refused: dict[str, int]
    fetches_opened: int
    fetches_reopened: int
    # Fetches the peer ended before their first message (RESOURCE_EXHAUSTED: its caps...), by status code.
    fetches_refused: dict[str, int]
    # Fetches the peer ended after their first message while nothing more was read (seen when read out).
    fetches_cut_off: int
    # Fetches whose whole response was sent anyway (a state small enough to fit in the connection's buffers).
    fetches_completed: int
    # Fetches the peer was still serving after fetch_hold_s unread (it never cut them off); ended by the stall.
    fetches_still_served: int
    # Calls still open when the stall stopped (a fetch: held unread, its outcome unknown).
    streams_held_at_end: int
    fetches_held_at_end: int
    # Calls that ended as the target left the run (it finished): neither refused nor cut off.
    ended_as_target_left: int


def unopened_round_header(run_id: str, target: str) -> bytes:
    """A well-formed first PushPart chunk to ``target`` (rank 1) of a round that never opens (NEVER_ROUND)."""
    group = Group(run_id, 0, NEVER_ROUND, (_FAKE_SENDER, target), 0)
    numel = 64
    a, b = part_bounds(numel, group.size)[1]
    codec = CodecConfig("none")
    payload = make_codec(codec).encode(torch.ones(b - a))
    return chunk_message(group, numel, AggregatorConfig(), codec, SCATTER, 1, b - a, 0, b - a, 1.0, payload)


def whole_state_request(run_id: str) -> bytes:
    """A FetchState request for the whole current state, naming no peer id (the server keys it by connection)."""
    return state_pb2.StateRequest(run_id=run_id).SerializeToString()


class Stall:
    """Idle streams and unread fetches held against the peer at ``address()`` on a loop thread; start() once, stop()."""

    def __init__(self, plan: StallPlan, address: Callable[[], str | None]) -> None:
        self.plan = plan
        # Called from the stall's thread: the target's address, None before it joined and once it is gone (the
        # stall waits for the first, and its calls are not opened again after the second).
        self._address_of = address
        self._address: str | None = None
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._stream_codes: Counter[str] = Counter()
        self._fetch_codes: Counter[str] = Counter()
        self._loop = asyncio.new_event_loop()
        self._stopping = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="harness-stall", daemon=True)

    def start(self) -> None:
        """Open the calls, from a thread of their own."""
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close every call and the connections, and end the thread (idempotent)."""
        if self._thread.ident is None:  # never started
            self._loop.close()
        elif self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("the stall thread did not end within %g s", timeout_s)

    @property
    def running(self) -> bool:
        """Whether the thread still holds calls open."""
        return self._thread.is_alive()

    def counts(self) -> StallCounts:
        """What the peer did with the calls so far."""
        with self._lock:
            c = self._counts
            return StallCounts(
                address=self._address,
                streams_opened=c["streams_opened"],
                streams_reopened=c["streams_reopened"],
                streams_refused=dict(sorted(self._stream_codes.items())),
                fetches_opened=c["fetches_opened"],
                fetches_reopened=c["fetches_reopened"],
                fetches_refused=dict(sorted(self._fetch_codes.items())),
                fetches_cut_off=c["fetches_cut_off"],
                fetches_completed=c["fetches_completed"],
                fetches_still_served=c["fetches_still_served"],
                streams_held_at_end=c["streams_held_at_end"],
                fetches_held_at_end=c["fetches_held_at_end"],
                ended_as_target_left=c["ended_as_target_left"],
            )

    # -- on the stall's loop ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        except Exception:
            log.exception("the stall against %s failed", self._address)
        finally:
            self._loop.close()

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _ended(self, key: str, codes: Counter[str] | None = None, code: str | None = None) -> None:
        """Count how the peer ended a call: under key, or under code in codes (a refusal)."""
        if not self._address_of():
            # The call ended because the target left the run (its process exits): not something it refused.
            self._count("ended_as_target_left")
            return
        with self._lock:
            if codes is not None:
                codes[code] += 1
            else:
                self._counts[key] += 1

    async def _main(self) -> None:
        plan = self.plan
        deadline = None if plan.duration_s is None else time.monotonic() + plan.duration_s
        address = await self._target(deadline)
        if address is None:
            return
        with self._lock:
            self._address = address
        settings = TransportConfig().rpc_settings()
        channels = [
            make_channel(address, settings, own_connection=True, extra_options=STALLED_CLIENT_OPTIONS)
            for _ in range(max(1, plan.connections))
        ]
        header = unopened_round_header(plan.run_id, address)
        request = whole_state_request(plan.run_id)
        slots = [
            self._stream_slot(channels[i % len(channels)], header if i % 2 else None) for i in range(plan.streams)
        ] + [self._fetch_slot(channels[(plan.streams + i) % len(channels)], request) for i in range(plan.fetches)]
        tasks = [asyncio.ensure_future(slot) for slot in slots]
        log.info("stalling %s with %d idle streams and %d unread fetches over %d connections",
                 address, plan.streams, plan.fetches, len(channels))
        try:
            await self._until_stopped(deadline)
        finally:
            self._stopping.set()  # also when the duration ran out: a slot whose cancellation is swallowed ends
            await cancel_and_wait(tasks)
            for channel in channels:
                await channel.close()
            log.info("stopped stalling %s", address)

    async def _until_stopped(self, deadline: float | None) -> None:
        await self._wait_stopping(None if deadline is None else max(0.0, deadline - time.monotonic()))

    async def _wait_stopping(self, timeout_s: float | None) -> None:
        """Return once the stall is stopping, or after timeout_s (None: no limit)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._stopping.wait()

    async def _target(self, deadline: float | None) -> str | None:
        """The target's address, once it has one; None if the stall ends first."""
        while not self._stopping.is_set() and (deadline is None or time.monotonic() < deadline):
            address = self._address_of()
            if address:
                return address
            await self._wait_stopping(_ADDRESS_POLL_S)
        return None

    def _go_on(self, first: bool) -> bool:
        """Whether a slot opens its call (again): not once the stall is stopping or the target has left.

        The stop flag is checked as well as the task's cancellation because a grpc call may end as its
        cancellation arrives (collectives/asynctasks.py; a stall thread outlived stop() in CI)."""
        return not self._stopping.is_set() and (first or bool(self._address_of()))

    async def _pace(self, opened_at: float) -> None:
        """Wait until this slot may open its call again (or the stall stops)."""
        await self._wait_stopping(max(0.0, opened_at + self.plan.reopen_every_s - time.monotonic()))

    async def _stream_slot(self, channel: grpc.aio.Channel, header: bytes | None) -> None:
        """One PushPart stream, opened again whenever the peer ends it: silent, or one header and then silent."""
        first = True
        while self._go_on(first):
            opened_at = time.monotonic()
            call = channel.stream_unary(PUSH_METHOD, request_serializer=identity, response_deserializer=identity)()
            self._count("streams_opened" if first else "streams_reopened")
            first = False
            try:
                self._ended("", self._stream_codes, await self._push(call, header))
            except asyncio.CancelledError:
                call.cancel()
                self._count("streams_held_at_end")
                raise
            await self._pace(opened_at)

    @staticmethod
    async def _push(call: grpc.aio.StreamUnaryCall, header: bytes | None) -> str:
        """Write the header, if any, and never end the stream: how the peer ended it (a _refusal name)."""
        try:
            if header is not None:
                await call.write(header)
            await call
            return "OK"
        except grpc.aio.AioRpcError as exc:
            return _refusal(exc.code(), exc.trailing_metadata())
        except asyncio.InvalidStateError:  # the peer ended it before the header was written
            pass
        return _refusal(await call.code(), await call.trailing_metadata())

    async def _fetch_slot(self, channel: grpc.aio.Channel, request: bytes) -> None:
        """One FetchState call that reads its first message and then nothing, opened again whenever it ends."""
        first = True
        while self._go_on(first):
            opened_at = time.monotonic()
            call = channel.unary_stream(FETCH_METHOD, request_serializer=identity, response_deserializer=identity)(
                request
            )
            self._count("fetches_opened" if first else "fetches_reopened")
            first = False
            try:
                self._ended(*await self._hold(call))
            except asyncio.CancelledError:
                self._count("fetches_held_at_end")
                raise
            finally:
                if not call.done():
                    call.cancel()
            await self._pace(opened_at)

    async def _hold(self, call: grpc.aio.UnaryStreamCall) -> tuple[str, Counter[str] | None, str | None]:
        """Read a fetch's first message, hold it unread for fetch_hold_s, then read it out; how it ended (the
        arguments of _ended)."""
        try:
            if await call.read() is grpc.aio.EOF:
                return "fetches_completed", None, None
        except grpc.aio.AioRpcError as exc:
            return "", self._fetch_codes, _refusal(exc.code(), exc.trailing_metadata())
        # A client that stops reading never sees the peer end its call: the status waits behind the unread
        # messages. So the call is held, then read out to learn what the peer did meanwhile.
        await asyncio.sleep(self.plan.fetch_hold_s)
        code = await self._read_out(call)
        if code is None:
            return "fetches_still_served", None, None
        return ("fetches_completed" if code == grpc.StatusCode.OK else "fetches_cut_off"), None, None

    async def _read_out(self, call: grpc.aio.UnaryStreamCall) -> grpc.StatusCode | None:
        """Read what is left of a held fetch for up to drain_s: its status, or None if the peer is still sending."""
        try:
            # asyncio.timeout, not wait_for: it never swallows the stall's own cancellation.
            async with asyncio.timeout(self.plan.drain_s):
                while await call.read() is not grpc.aio.EOF:
                    pass
                return await call.code()
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        except TimeoutError:
            return None


def _refusal(code: grpc.StatusCode, metadata: object) -> str:
    """How a report names a refusal: the status code, and the reason a retryable one gives
    (``UNAVAILABLE/not-open``)."""
    reason = next((str(v) for k, v in (metadata or ()) if k == RETRY_KEY), None)
    return f"{code.name}/{reason}" if reason else code.name


# -- what the run did meanwhile (pure) ------------------------------------------------------------

DROP_KINDS = ("lost", "leave", "rejoin")


def _first(events: Iterable[Mapping], kind: str) -> Mapping | None:
    return next((e for e in events if e["event"] == kind), None)


def stall_figures(
    started: float, target: str, events_by_peer: Mapping[str, list[dict]], status: Mapping, joiners: Iterable[str]
) -> dict:
    """What the run did while a stall started at wall time ``started`` held ``target``: the rounds committed after
    it (by any peer; the target's own), the coordinator's events that dropped the target before it finished, and
    each joiner that connected after it started: seconds from connecting to joined (None if it never joined)."""
    committed = {
        (e["round"], e.get("epoch", 0))
        for evs in events_by_peer.values() for e in evs
        if e["event"] == "committed" and e["t"] > started
    }
    mine = events_by_peer.get(target, [])
    own = {
        (e["round"], e.get("epoch", 0))
        for e in mine if e["event"] == "committed" and e.get("contributed", True) and e["t"] > started
    }
    ids = {e.get("peer_id") for e in mine if e["event"] == "joined"} - {None}
    finished = _first(mine, "finished")
    end = finished["t"] if finished is not None else float("inf")
    dropped = [
        f"{e['kind']}: {e.get('detail', '')}"
        for e in reversed(status.get("events", []))  # the status lists the newest first
        if e.get("kind") in DROP_KINDS and e.get("peer_id") in ids and e.get("time", 0) < end
    ]
    joins = {}
    for name in joiners:
        evs = events_by_peer.get(name, [])
        connecting, joined = _first(evs, "connecting"), _first(evs, "joined")
        if connecting is not None and connecting["t"] >= started:
            joins[name] = None if joined is None else joined["t"] - connecting["t"]
    return {
        "rounds_committed_after": len(committed),
        "target_rounds_after": len(own),
        "target_dropped": dropped,
        "joined_s": joins,
    }


@dataclass
class StallRecord:
    """A stall the harness started: its event's text, target, start (wall time) and the stall itself."""

    event: str
    target: str
    started: float
    stall: Stall = field(repr=False)

    def report(self, events_by_peer: Mapping[str, list[dict]], status: Mapping, joiners: Iterable[str]) -> dict:
        """The stall's counts and what the run did meanwhile, for the harness JSON."""
        counts = self.stall.counts()
        return {
            "event": self.event,
            "target": self.target,
            **asdict(counts),
            **stall_figures(self.started, self.target, events_by_peer, status, joiners),
        }


def serving_address(events: Iterable[Mapping]) -> str | None:
    """The data-plane address in a peer's latest "joined" event; None before it joined and once it finished."""
    found = None
    for e in list(events):
        if e["event"] == "joined" and e.get("address"):
            found = e["address"]
        elif e["event"] == "finished":
            found = None
    return found
