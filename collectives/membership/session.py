"""A peer's Session stream to the coordinator: its Heartbeat, Quorum and Commit calls as messages on one stream.

A gRPC call costs the coordinator's Python server several times what a message
on an open stream does, and a round at 1,000 peers is 2,000 such calls
(docs/scale.md). So a peer opens one ``Session`` stream and sends each of those
calls on it as a ``SessionCall`` with a ``call_id``; answers come back by id,
in any order, and calls may overlap (a heartbeat while a quorum waits).

``CoordinatorSession.call`` behaves as the unary call would: the answer, or a
``grpc.aio.AioRpcError`` with the same status code, details and (for a rate
limit) ``RETRY_AFTER_MS`` trailing metadata, so the membership client's
retries and messages are the same either way. A call past its deadline raises
DEADLINE_EXCEEDED and tells the coordinator to drop it; a cancelled call does
the same. When the stream breaks (the coordinator restarts, the connection
drops), its calls in flight fail with UNAVAILABLE (also when gRPC says INTERNAL:
a write that the break interrupts ends so) and the next call opens a new
stream. A coordinator without the Session method (an older one) answers
UNIMPLEMENTED as the stream opens: ``call`` raises ``SessionUnsupported`` and
the client goes back to one call per request; so it does when the coordinator
refuses the stream because the peer's address holds as many as it allows
(``SESSIONS_FULL``).

The stream's credential (with a run secret) is the one the peer holds when it
opens: after a join, ``reset`` so the next call opens it with the new one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError, Message

from collectives.asynctasks import cancel_and_wait
from collectives.net.rpc import Metadata, identity
from protos import membership_pb2 as pb

log = logging.getLogger(__name__)

SESSION_METHOD = "/{}/Session".format(pb.DESCRIPTOR.services_by_name["Coordinator"].full_name)
# The calls a Session carries -> their field in SessionCall and SessionReply.
SESSION_RPCS = {"Heartbeat": "heartbeat", "Quorum": "quorum", "Commit": "commit"}
# A coordinator refusing a call for its client's rate says in this trailing metadata key when to try again (ms).
RETRY_AFTER_MS = "loconet-retry-after-ms"
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# The coordinator's first reply on a stream: call_id 0 and nothing else (serialised, that is no bytes at all).
OPENED = pb.SessionReply().SerializeToString()
# The call_id of a reply the coordinator sends unasked (a push; a peer's calls are numbered from 1): a Heartbeat
# answer of which only ``hold`` is read.
PUSHED = 0


# How a coordinator's refusal of one more Session stream from the client's address begins (the address holds as many
# as the coordinator allows): the peer then sends its calls on their own, as to a coordinator without Sessions.
SESSIONS_FULL = "too many Session streams"


class SessionUnsupported(Exception):
    """The coordinator has no Session method (an older one), or no room for this peer's: use one gRPC call per
    request. The message says which."""


def rpc_error(code: grpc.StatusCode, details: str, retry_after_ms: int = 0) -> grpc.aio.AioRpcError:
    """The error a unary call failing with code and details would raise (retry_after_ms: a rate limit's wait)."""
    trailing = grpc.aio.Metadata((RETRY_AFTER_MS, str(retry_after_ms))) if retry_after_ms else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)


def broken_stream(exc: grpc.aio.AioRpcError) -> grpc.aio.AioRpcError:
    """exc as the calls on an open stream see it: gRPC core's INTERNAL there means the stream broke, as UNAVAILABLE.

    A coordinator killed while a call is written ends the write (and then the stream) with INTERNAL "Internal error
    from Core" instead of the connection's UNAVAILABLE; taken as a refusal, the round was given up for a restart
    the peer should have waited out.
    """
    if exc.code() != grpc.StatusCode.INTERNAL:
        return exc
    return rpc_error(grpc.StatusCode.UNAVAILABLE, f"the Session stream broke ({exc.details()})")


def _retry_after(metadata) -> int:
    return int(next((v for k, v in (metadata or ()) if k == RETRY_AFTER_MS), 0) or 0)


def _expire(answer: asyncio.Future) -> None:
    if not answer.done():
        answer.set_exception(TimeoutError())


class CoordinatorSession:
    """One peer's Session stream, opened on first use and again after it breaks (use on one event loop)."""

    def __init__(
        self, channel: Callable[[], grpc.aio.Channel], metadata: Callable[[str], Metadata | None] = lambda method: None
    ) -> None:
        """``metadata(method)``: the stream's credential metadata (rpc.call_metadata; a channel's interceptors do not
        add it to a request stream)."""
        self._channel = channel
        self._metadata = metadata
        # False once the coordinator said it has no Session method.
        self.supported = True
        # Streams opened so far (more than one: the stream broke, or was reset after a join).
        self.opened = 0
        self._stream: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 1
        self._open_lock: asyncio.Lock | None = None
        self._write_lock: asyncio.Lock | None = None
        self._cancels: set[asyncio.Task] = set()
        # Called on the loop with a Heartbeat answer the coordinator pushed unasked (only its ``hold`` counts).
        self.pushed: Callable[[pb.HeartbeatResponse], None] | None = None
        # Why the last stream ended.
        self._ended = rpc_error(grpc.StatusCode.UNAVAILABLE, "the coordinator ended the Session stream")

    async def call(self, rpc: str, request: Message, timeout_s: float) -> Message:
        """rpc's answer to request (rpc in SESSION_RPCS) within timeout_s; raises grpc.aio.AioRpcError as the
        unary call would, or SessionUnsupported."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        stream = await self._open(timeout_s)
        call_id, self._next_id = self._next_id, self._next_id + 1
        answer = loop.create_future()
        self._pending[call_id] = answer
        kind = SESSION_RPCS[rpc]
        # One timer on the answer itself (asyncio.wait_for would add a task's worth of futures and hops per call).
        timer = loop.call_at(deadline, _expire, answer)
        try:
            await self._write(stream, pb.SessionCall(call_id=call_id, **{kind: request}).SerializeToString())
            reply = await answer
        except TimeoutError:
            self._cancel(stream, call_id)
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except asyncio.CancelledError:
            self._cancel(stream, call_id)
            raise
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED and not self.supported:
                # The stream was refused after it seemed open: the call reached no handler, send it on its own.
                raise SessionUnsupported() from None
            raise
        finally:
            timer.cancel()
            self._pending.pop(call_id, None)
            if answer.done() and not answer.cancelled():
                answer.exception()  # retrieved: a failure that came while the write failed is not logged as lost
        if reply.code:
            raise rpc_error(_CODES.get(reply.code, grpc.StatusCode.UNKNOWN), reply.details, reply.retry_after_ms)
        if reply.WhichOneof("reply") != kind:
            raise rpc_error(
                grpc.StatusCode.INTERNAL, f"the coordinator answered a {rpc} call with {reply.WhichOneof('reply')}"
            )
        return getattr(reply, kind)

    async def _open(self, timeout_s: float) -> grpc.aio.StreamStreamCall:
        if self._stream is not None:
            return self._stream
        if not self.supported:
            raise SessionUnsupported()
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._stream is None:
                try:
                    # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives as the connect
                    # completes, and a heartbeat task cancelled then went on beating (a peer's close waited 30 s).
                    async with asyncio.timeout(timeout_s):
                        await self._connect()
                except TimeoutError:
                    raise rpc_error(
                        grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded (opening a Session)"
                    ) from None
            stream = self._stream
        if stream is None:
            # It ended as it opened (a refusal can come as the stream's only answer): say why.
            if not self.supported:
                raise SessionUnsupported()
            raise self._ended
        return stream

    async def _connect(self) -> None:
        stream = self._channel().stream_stream(
            SESSION_METHOD, request_serializer=identity, response_deserializer=identity
        )(metadata=self._metadata(SESSION_METHOD))
        try:
            # The coordinator's first reply (call_id 0, nothing else) says it took the stream on; a refusal (the run
            # secret, the rate, no such method) is the stream's only answer. Writing before knowing which can turn
            # the refusal into gRPC core's INTERNAL ("execute_batch"), so nothing is written until then.
            first = await stream.read()
            if first is grpc.aio.EOF:
                code, details = await stream.code(), await stream.details()
                raise rpc_error(code, details, _retry_after(await stream.trailing_metadata()))
            if first != OPENED:
                stream.cancel()
                raise rpc_error(
                    grpc.StatusCode.INTERNAL, "the coordinator did not open the Session stream as it should"
                )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.supported = False
                raise SessionUnsupported("the coordinator has no Session streams (an older one)") from None
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and (exc.details() or "").startswith(SESSIONS_FULL):
                self.supported = False
                raise SessionUnsupported(f"the coordinator refused a Session stream ({exc.details()})") from None
            raise
        except BaseException:
            stream.cancel()
            raise
        self._stream = stream
        self.opened += 1
        self._reader = asyncio.get_running_loop().create_task(self._read(stream))

    async def _write(self, stream: grpc.aio.StreamStreamCall, raw: bytes) -> None:
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        async with self._write_lock:  # one write at a time on a gRPC stream
            try:
                await stream.write(raw)
            except asyncio.InvalidStateError:
                # The stream has ended (a refusal, the coordinator gone): the call fails as the stream did.
                code, details = await stream.code(), await stream.details()
                raise broken_stream(rpc_error(code, details, _retry_after(await stream.trailing_metadata()))) from None
            except grpc.aio.AioRpcError as exc:
                raise broken_stream(exc) from None

    def _cancel(self, stream: grpc.aio.StreamStreamCall, call_id: int) -> None:
        """Tell the coordinator to drop call_id (best effort: the stream may be gone already)."""
        if stream is not self._stream or stream.done():
            return

        async def send() -> None:
            try:
                await self._write(stream, pb.SessionCall(call_id=call_id, cancel=True).SerializeToString())
            except (grpc.aio.AioRpcError, grpc.aio.UsageError) as exc:
                # the stream ended meanwhile, and its calls with it
                log.debug("cancel of Session call %d not sent: %r", call_id, exc)

        task = asyncio.get_running_loop().create_task(send())
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _read(self, stream: grpc.aio.StreamStreamCall) -> None:
        """Hand each answer to its call until the stream ends; then fail the calls still waiting."""
        error = rpc_error(grpc.StatusCode.UNAVAILABLE, "the coordinator ended the Session stream")
        try:
            while True:
                raw = await stream.read()
                if raw is grpc.aio.EOF:
                    break
                reply = pb.SessionReply.FromString(raw)
                if reply.call_id == PUSHED:
                    if reply.HasField("heartbeat") and self.pushed is not None:
                        self._take_push(reply.heartbeat)
                    continue
                answer = self._pending.get(reply.call_id)
                if answer is not None and not answer.done():
                    answer.set_result(reply)
        except grpc.aio.AioRpcError as exc:
            error = broken_stream(exc)
        except DecodeError as exc:
            stream.cancel()
            error = rpc_error(grpc.StatusCode.INTERNAL, f"the coordinator sent a malformed SessionReply: {exc}")
        finally:
            if self._stream is stream:
                self._stream = None
        self._ended = error
        if error.code() == grpc.StatusCode.UNIMPLEMENTED:
            self.supported = False
        log.debug("Session stream ended: %s", error.code().name)
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(error)

    def _take_push(self, answer: pb.HeartbeatResponse) -> None:
        try:
            self.pushed(answer)
        except Exception as exc:  # noqa: BLE001 - a push is advice: its handler failing must not end the stream's calls
            log.warning("a pushed answer from the coordinator was not taken: %r", exc)

    async def reset(self) -> None:
        """Close the stream (its calls in flight fail with CANCELLED); the next call opens a new one."""
        stream, reader = self._stream, self._reader
        self._stream = self._reader = None
        if stream is not None:
            stream.cancel()
        if reader is not None:
            await asyncio.gather(reader, return_exceptions=True)
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(rpc_error(grpc.StatusCode.CANCELLED, "the Session stream was closed"))

    async def close(self) -> None:
        """Close the stream and stop its reader and pending cancels (the session may be opened again by a call)."""
        await self.reset()
        await cancel_and_wait(self._cancels)
