"""The coordinator's side of a peer's Session stream: Heartbeat, Quorum and Commit as messages on one stream.

A gRPC call costs the Python server several times what a message on an open
stream does (docs/scale.md), so a peer sends its frequent calls on one
long-lived ``Session`` stream. Each message is a call of its own, answered by
``call_id`` in any order, and goes through what its unary RPC would:

- the client's rate limit, one token per message (``RateLimitInterceptor.charge``);
  the stream's opening is charged too, as a call, and one client address holds
  at most ``--sessions-per-client`` streams (``open_session``): the peer refused
  one sends its calls on their own;
- the run secret and the peer credential, checked once as the stream opens
  (``Callers.caller``); every message must then name that peer id
  (``Callers.check``). A forged credential ends the stream at once;
- the Coordinator's own handler (``Coordinator.peer_call``, as its own call's), whose refusal
  (``BadRequest``) becomes the answer's ``code`` and ``details``.

The coordinator may also write a reply nobody asked for (``call_id`` ``PUSHED``):
a Heartbeat answer whose ``hold`` asks the peer to keep a round's result at
once, as the round commits (``PeerStreams``; peer/coordinator/resultholders.py).
Only the stream a peer's accepted heartbeats last came on gets them.

A message that is not a ``SessionCall``, a ``call_id`` already in flight, or
more than ``MAX_CALLS_IN_FLIGHT`` calls at once end the stream with
INVALID_ARGUMENT or RESOURCE_EXHAUSTED: a peer has at most a heartbeat, a
quorum and a commit in flight. When the stream ends, its calls in flight are
cancelled, as the calls themselves would be when their client goes away.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError, Message

from collectives.membership.session import OPENED, PUSHED, SESSION_RPCS
from collectives.net.rpc import identity
from collectives.net.wire import encode_varint
from peer.coordinator.identity import Caller, Callers
from peer.coordinator.limits import retry_after_ms
from peer.coordinator.quorum import BadRequest
from protos import membership_pb2 as pb

log = logging.getLogger(__name__)

# A peer has at most a heartbeat, a quorum and a commit in flight; a few more allow for cancels in transit.
MAX_CALLS_IN_FLIGHT = 8
MAX_DETAILS_CHARS = 2000
# SessionCall's oneof field -> the RPC it stands for (the client's SESSION_RPCS, read the other way).
RPCS = {kind: rpc for rpc, kind in SESSION_RPCS.items()}
# SessionReply's field number for each RPC's answer (a Quorum answer comes serialised: it is appended as bytes).
REPLY_FIELDS = {rpc: pb.SessionReply.DESCRIPTOR.fields_by_name[kind].number for rpc, kind in SESSION_RPCS.items()}

# charge(context.peer(), rpc name) -> (0.0, "") or (seconds to wait, why): the server's rate limits.
Charge = Callable[[str, str], tuple[float, str]]


class SessionLimits(Protocol):
    """What a client may cost in Sessions (``RateLimitInterceptor``): each message's rate, the streams it holds."""

    def charge(self, peer: str, name: str) -> tuple[float, str]:
        """Charge one message of the stream (name: the RPC it stands for) to peer (``context.peer()``): (0.0, "")
        if it may go on, else (seconds until it may, the refusal's message)."""
        ...

    def open_session(self, peer: str) -> str:
        """Count a Session stream from peer as open: "" if it may stay, else the refusal's message."""
        ...

    def close_session(self, peer: str) -> None:
        """A Session stream open_session let in has ended."""
        ...


class SessionCoordinator(Protocol):
    """What a Session stream uses of the coordinator (``service.Coordinator``, which imports this module)."""

    callers: Callers
    streams: PeerStreams

    def peer_call(
        self, caller: Caller, rpc: str, request: Message
    ) -> Message | bytes | Coroutine[Any, Any, Message | bytes]:
        """The answer to one call a peer makes as itself, or a coroutine for one that waits."""
        ...


def reply_bytes(call_id: int, rpc: str, answer: Message | bytes) -> bytes:
    """A serialised SessionReply carrying answer (a message, or bytes already serialised) for call_id."""
    body = answer if isinstance(answer, bytes) else answer.SerializeToString()
    head = pb.SessionReply(call_id=call_id).SerializeToString()
    # Protobuf reads concatenated serialisations as one message: the answer is appended as its field, unparsed.
    return head + encode_varint(REPLY_FIELDS[rpc] << 3 | 2) + encode_varint(len(body)) + body


def pushed_bytes(answer: pb.HeartbeatResponse) -> bytes:
    """A serialised SessionReply the coordinator sends unasked (call_id PUSHED): a Heartbeat answer, of which the
    peer reads only ``hold``."""
    return reply_bytes(PUSHED, "Heartbeat", answer)


def error_bytes(call_id: int, code: grpc.StatusCode, details: str, wait_s: float = 0.0) -> bytes:
    """A serialised SessionReply refusing call_id with code (wait_s: a rate limit's wait)."""
    return pb.SessionReply(
        call_id=call_id, code=code.value[0], details=details[:MAX_DETAILS_CHARS],
        retry_after_ms=retry_after_ms(wait_s) if wait_s > 0 else 0,
    ).SerializeToString()


class SessionEnded(Exception):
    """The peer broke the Session protocol: the stream ends with this status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Session:
    """One open Session stream on the coordinator's loop: takes calls, and writes each answer as it is decided.

    Answers are written by whoever has them (the reading loop for an answer at hand, the call's task for one
    that waited), one write at a time: no queue and no writer task between a decision and its bytes.
    """

    def __init__(self, coordinator: SessionCoordinator, caller: Caller, peer: str, charge: Charge,
                 write: Callable[[bytes], Awaitable[None]]) -> None:
        self.coordinator = coordinator
        self.caller = caller
        self.peer = peer
        self.charge = charge
        self._write = write
        self._writing = asyncio.Lock()
        self.calls: dict[int, asyncio.Task] = {}
        # Writes of what the coordinator tells the peer unasked (push), cancelled with the stream.
        self._pushes: set[asyncio.Task] = set()
        # The peer id its accepted heartbeats name ("": none yet), which PeerStreams pushes to on this stream.
        self.peer_id = ""

    async def write(self, raw: bytes) -> None:
        """Send one serialised SessionReply (one write at a time on a gRPC stream)."""
        async with self._writing:
            await self._write(raw)

    def push(self, raw: bytes) -> None:
        """Send a reply nobody asked for (call_id PUSHED) without waiting for it (on the coordinator's loop)."""
        task = asyncio.get_running_loop().create_task(self.write(raw))
        self._pushes.add(task)
        task.add_done_callback(self._pushed)

    def _pushed(self, task: asyncio.Task) -> None:
        self._pushes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("a push to %s was not sent: %r", self.peer, task.exception())

    def take(self, raw: bytes) -> bytes | None:
        """Handle one message of the stream: the reply to send now, or None (none, or its call's task will);
        raises SessionEnded when the message breaks the protocol."""
        try:
            call = pb.SessionCall.FromString(raw)
        except DecodeError as exc:
            raise SessionEnded(grpc.StatusCode.INVALID_ARGUMENT, f"malformed SessionCall: {exc}") from None
        kind = call.WhichOneof("call")
        call_id = call.call_id
        if kind == "cancel":
            task = self.calls.pop(call_id, None)
            if task is not None:
                task.cancel()
            return None
        if kind is None:
            raise SessionEnded(grpc.StatusCode.INVALID_ARGUMENT, f"SessionCall {call_id} carries no call")
        if call_id in self.calls:
            raise SessionEnded(grpc.StatusCode.INVALID_ARGUMENT, f"call id {call_id} is already in flight")
        if len(self.calls) >= MAX_CALLS_IN_FLIGHT:
            raise SessionEnded(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than {MAX_CALLS_IN_FLIGHT} calls in flight on one Session stream: a peer needs at most three",
            )
        rpc = RPCS[kind]
        wait_s, why = self.charge(self.peer, rpc)
        if wait_s > 0:
            return error_bytes(call_id, grpc.StatusCode.RESOURCE_EXHAUSTED, why, wait_s)
        try:
            answer = self.coordinator.peer_call(self.caller, rpc, getattr(call, kind))
        except BadRequest as exc:
            return error_bytes(call_id, exc.code, str(exc))
        if kind == "heartbeat" and isinstance(answer, pb.HeartbeatResponse) and answer.known:
            # The peer's heartbeats come on this stream: what the coordinator tells it unasked goes here too.
            self.coordinator.streams.note(call.heartbeat.peer_id, self)
        if not asyncio.iscoroutine(answer):
            return reply_bytes(call_id, rpc, answer)
        task = asyncio.get_running_loop().create_task(self._answer(call_id, rpc, answer))
        self.calls[call_id] = task
        task.add_done_callback(lambda t, call_id=call_id: self._done(call_id, t))
        return None

    async def _answer(self, call_id: int, rpc: str, pending) -> None:
        """Wait for a call's answer (or refusal), then send it."""
        try:
            raw = reply_bytes(call_id, rpc, await pending)
        except BadRequest as exc:
            raw = error_bytes(call_id, exc.code, str(exc))
        except Exception as exc:
            # As a unary handler's unexpected exception: UNKNOWN, with the exception for the coordinator's log.
            log.warning("%s on a Session stream failed: %r", rpc, exc)
            raw = error_bytes(call_id, grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")
        await self.write(raw)

    def _done(self, call_id: int, task: asyncio.Task) -> None:
        if self.calls.get(call_id) is task:
            del self.calls[call_id]
        if not task.cancelled() and task.exception() is not None:
            # Its answer could not be written: the stream is gone, and the reading loop ends with it.
            log.debug("a Session answer to %s was not sent: %r", self.peer, task.exception())

    def close(self) -> None:
        """Cancel the calls still in flight and the pushes being written (the stream is gone)."""
        for task in (*self.calls.values(), *self._pushes):
            task.cancel()
        self.calls.clear()
        self._pushes.clear()


class PeerStreams:
    """The open Session stream each peer's accepted heartbeats last came on: where the coordinator pushes what it
    tells a peer unasked (use on the coordinator's loop)."""

    def __init__(self) -> None:
        self._by_peer: dict[str, Session] = {}
        # Every open stream's handler task, ended by end_all as the coordinator stops.
        self._handlers: set[asyncio.Task] = set()
        self.ending = False

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._by_peer

    def note(self, peer_id: str, session: Session) -> None:
        """peer_id's heartbeat came on session (and was accepted)."""
        if session.peer_id != peer_id:
            self.forget(session)  # the stream's peer joined again under another id
            session.peer_id = peer_id
        self._by_peer[peer_id] = session

    def forget(self, session: Session) -> None:
        """The stream ended (or names another peer now): nothing more is pushed on it for its peer."""
        if self._by_peer.get(session.peer_id) is session:
            del self._by_peer[session.peer_id]

    def push(self, peer_id: str, raw: bytes) -> bool:
        """Send raw (a serialised SessionReply with call_id PUSHED) on peer_id's stream; False when it has none."""
        session = self._by_peer.get(peer_id)
        if session is None:
            return False
        session.push(raw)
        return True

    def opened(self, handler: asyncio.Task) -> None:
        """A stream's handler started (its task, which end_all ends)."""
        self._handlers.add(handler)

    def closed(self, handler: asyncio.Task) -> None:
        """A stream's handler is done."""
        self._handlers.discard(handler)

    async def end_all(self, timeout_s: float = 1.0) -> None:
        """End every open stream with OK as the coordinator stops: the streams never end on their own, and the
        gRPC server cancelling them at its grace's end logged an error with a traceback for each."""
        self.ending = True
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers, timeout=timeout_s)


def session_handler(coordinator: SessionCoordinator, limits: SessionLimits) -> grpc.RpcMethodHandler:
    """The Session method's handler (stream of serialised SessionCall in, serialised SessionReply out)."""

    async def serve(requests, context: grpc.aio.ServicerContext) -> None:
        try:
            caller = coordinator.callers.caller(context, "Session")
        except BadRequest as exc:
            await context.abort(exc.code, str(exc))
        peer = context.peer()
        # One client address holds at most so many streams (the peer refused sends its calls on their own).
        refused = limits.open_session(peer)
        if refused:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        session = Session(coordinator, caller, peer, limits.charge, context.write)
        handler = asyncio.current_task()
        coordinator.streams.opened(handler)
        try:
            # The first reply (call_id 0, nothing else) tells the peer the stream was taken on: it writes no call
            # before (a refusal racing a write can reach it as gRPC core's INTERNAL instead of its status).
            await context.write(OPENED)
            while True:
                raw = await context.read()
                if raw is grpc.aio.EOF:
                    return
                try:
                    reply = session.take(raw)
                except SessionEnded as exc:
                    await context.abort(exc.code, str(exc))
                if reply is not None:
                    await session.write(reply)
        except asyncio.CancelledError:
            if not coordinator.streams.ending:
                raise
            # The coordinator stops (PeerStreams.end_all): the stream ends with OK, and the peer reconnects.
        finally:
            coordinator.streams.closed(handler)
            coordinator.streams.forget(session)
            session.close()
            limits.close_session(peer)

    return grpc.stream_stream_rpc_method_handler(
        serve, request_deserializer=identity, response_serializer=identity
    )
