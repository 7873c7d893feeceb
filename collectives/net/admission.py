"""Admission of inbound calls: caps per connection and in total, a bound on a silent stream's start, refusal counts.

A peer's server must not be made to hold unbounded state by callers that open
calls and then do nothing. gRPC's own ``maximum_concurrent_rpcs`` is the wrong
tool: it sheds every method alike once full, the health service included, so a
peer busy with idle streams looked dead to the coordinator's probe and was
dropped. Instead the transport wraps every handler it serves (``admit_handlers``;
the health service is added separately and is never wrapped) so that:

- a call beyond the per-client cap or the total cap is refused at once with
  RESOURCE_EXHAUSTED and a message saying which cap is full;
- a client-streaming call whose first message does not arrive within
  ``first_message_timeout_s`` is closed with DEADLINE_EXCEEDED.

The client key is the connection (``context.peer()``, e.g.
``ipv4:10.0.0.5:41234``), never a claimed identity inside a message, which a
caller can forge. Not the host: the members of a local run, or peers behind one
NAT, share a host, and a host-wide cap would make them starve each other.

Refusals the caller may retry within its own deadline (the server was busy or
not ready, nothing of the call was used) carry the trailing-metadata key
``RETRY_KEY``; ``collectives.net.transport`` retries those. A handler that has
taken a stream on (so a retry would duplicate it) says so with ``ACCEPTED_KEY``
in its initial metadata, which lets the sender stop keeping its messages for
a replay. The sending side's pieces of that protocol (``retry_reason``,
``Replay``) are here too, next to the keys they read.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from collectives.errors import ConfigError

log = logging.getLogger(__name__)

# Trailing-metadata key of a refusal the caller may retry (value: why, e.g. "busy", "not-open").
RETRY_KEY = "loconet-retry"
# Initial-metadata key a handler sends once it has taken a stream on (a retry would duplicate it).
ACCEPTED_KEY = "loconet-accepted"

# The names under which refusals are counted (Refusals.snapshot()).
REFUSED_CLIENT_CAP = "client_cap"
REFUSED_TOTAL_CAP = "total_cap"
FIRST_MESSAGE_TIMEOUT = "first_message_timeout"
OPEN_WAIT_EXPIRED = "open_wait_expired"
# A call without a valid credential, or one claiming another member's rank (collectives.net.credentials).
UNAUTHENTICATED = "unauthenticated"
REFUSAL_KINDS = (REFUSED_CLIENT_CAP, REFUSED_TOTAL_CAP, FIRST_MESSAGE_TIMEOUT, OPEN_WAIT_EXPIRED, UNAUTHENTICATED)


@dataclass(frozen=True)
class AdmissionLimits:
    """The caps a peer's handlers enforce (see TransportConfig for the defaults and why they are safe)."""

    per_client: int
    total: int
    first_message_timeout_s: float

    def __post_init__(self) -> None:
        if self.per_client < 1 or self.total < 1:
            raise ConfigError(f"call caps must be at least 1, got per client {self.per_client}, total {self.total}")
        if self.per_client > self.total:
            raise ConfigError(f"the per-client cap ({self.per_client}) must not exceed the total cap ({self.total})")
        if not self.first_message_timeout_s > 0:
            raise ConfigError(f"first_message_timeout_s must be positive, got {self.first_message_timeout_s}")


class Refusals:
    """How many inbound calls were refused or closed early, by kind (for metrics)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def count(self, kind: str) -> None:
        """Record one refusal of this kind (one of REFUSAL_KINDS)."""
        if kind not in REFUSAL_KINDS:
            raise ValueError(f"unknown refusal kind {kind!r}; expected one of {', '.join(REFUSAL_KINDS)}")
        self._counts[kind] += 1

    def __getitem__(self, kind: str) -> int:
        return self._counts[kind]

    def snapshot(self) -> dict[str, int]:
        """Every kind's count (zeros included), as a plain dict."""
        return {kind: self._counts[kind] for kind in REFUSAL_KINDS}


class Admission:
    """Counts the calls in progress per client and in total, and admits or refuses new ones (on one event loop)."""

    def __init__(self, limits: AdmissionLimits, refusals: Refusals | None = None) -> None:
        self.limits = limits
        self.refusals = refusals or Refusals()
        self._active: Counter[str] = Counter()
        self._total = 0

    def enter(self, client: str) -> str | None:
        """Admit a call from client (counted until ``leave``), or return why it is refused."""
        if self._total >= self.limits.total:
            self.refusals.count(REFUSED_TOTAL_CAP)
            return f"this peer serves its maximum of {self.limits.total} calls at once; retry shortly"
        if self._active[client] >= self.limits.per_client:
            self.refusals.count(REFUSED_CLIENT_CAP)
            return (
                f"connection {client} already has {self.limits.per_client} calls in progress here, "
                "the most one connection may hold; retry after some of them end"
            )
        self._active[client] += 1
        self._total += 1
        return None

    def leave(self, client: str) -> None:
        """A call admitted by ``enter`` has ended."""
        self._total -= 1
        self._active[client] -= 1
        if self._active[client] <= 0:
            del self._active[client]

    def active(self, client: str | None = None) -> int:
        """Calls in progress from client (None: in total). Used by tests to watch calls being admitted and giving
        their slots back."""
        return self._total if client is None else self._active[client]

    async def first_message_bounded(
        self, requests: AsyncIterable[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """The requests of a client stream; closes the call if the first does not come within the timeout."""
        it = requests.__aiter__()
        timeout = self.limits.first_message_timeout_s
        try:
            async with asyncio.timeout(timeout):
                first = await it.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            self.refusals.count(FIRST_MESSAGE_TIMEOUT)
            log.debug("closed a stream from %s that sent nothing for %g s", context.peer(), timeout)
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no first message within {timeout:g} s of opening the stream; it was closed",
                trailing_metadata=((RETRY_KEY, "first-message"),),
            )
        yield first
        async for request in it:
            yield request


def admit_handlers(
    handlers: Sequence[grpc.GenericRpcHandler], admission: Admission
) -> tuple[grpc.GenericRpcHandler, ...]:
    """These handlers with every method's behaviour run under ``admission`` (caps, first-message bound)."""
    return tuple(_AdmittedHandler(h, admission) for h in handlers)


class _AdmittedHandler(grpc.GenericRpcHandler):
    """A generic handler whose methods are admitted first."""

    def __init__(self, inner: grpc.GenericRpcHandler, admission: Admission) -> None:
        self._inner = inner
        self._admission = admission
        # Only the inner handler's own methods are kept: a caller naming arbitrary methods adds nothing.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrapped[method] = _admitted(handler, self._admission)
        return wrapped


_FACTORIES = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def _admitted(handler: grpc.RpcMethodHandler, admission: Admission) -> grpc.RpcMethodHandler:
    """One method's handler, its behaviour wrapped in admission (synchronous behaviours are left as they are)."""
    name, factory = _FACTORIES[(bool(handler.request_streaming), bool(handler.response_streaming))]
    behavior = getattr(handler, name)
    streaming_in = bool(handler.request_streaming)

    async def refuse(context: grpc.aio.ServicerContext, why: str) -> None:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why, trailing_metadata=((RETRY_KEY, "busy"),))

    if inspect.isasyncgenfunction(behavior):

        async def wrapped_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            client = context.peer()
            why = admission.enter(client)
            if why is not None:
                await refuse(context, why)
            try:
                if streaming_in:
                    request = admission.first_message_bounded(request, context)
                async for response in behavior(request, context):
                    yield response
            finally:
                admission.leave(client)

        wrapped: Any = wrapped_stream
    elif inspect.iscoroutinefunction(behavior):

        async def wrapped_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            client = context.peer()
            why = admission.enter(client)
            if why is not None:
                await refuse(context, why)
            try:
                if streaming_in:
                    request = admission.first_message_bounded(request, context)
                return await behavior(request, context)
            finally:
                admission.leave(client)

        wrapped = wrapped_call
    else:  # a thread-pool handler: gRPC runs it off the loop, where these counters cannot be kept
        return handler
    return factory(
        wrapped, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


# -- the sending side: what may be retried, and what is kept to replay a stream -----------------


def retry_reason(exc: grpc.aio.AioRpcError, replayable: bool = False) -> str | None:
    """Why a call that failed with exc may be tried again, or None if it may not.

    The receiver's retryable refusals (busy, not-open...) say so in RETRY_KEY. ``replayable``: the call is a
    stream the receiver has not taken on (``Replay.usable``); then gRPC core's INTERNAL is retried too, as a
    refusal that lands while a message is being written can surface as INTERNAL "execute_batch" instead of the
    receiver's status. Nothing was taken on, so trying again is safe, and a real failure still ends at the
    caller's deadline.
    """
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_KEY:
            return str(value)
    if replayable and exc.code() == grpc.StatusCode.INTERNAL:
        return "a refusal raced a write"
    return None


# gRPC core's words for a call that failed because no connection to its address became ready: nothing of the
# call left this process.
CONNECT_FAILED = "failed to connect to all addresses"


def never_connected(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a call failed because no connection to its address became ready (then nothing of it was sent)."""
    return exc.code() == grpc.StatusCode.UNAVAILABLE and CONNECT_FAILED in (exc.details() or "")


class Replay:
    """The messages of a stream the receiver has not taken on yet, kept for a retry (up to a byte limit)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.messages: list[bytes] = []
        self.nbytes = 0
        # Whether a retry can replay the stream: until it is taken on, and while under the limit.
        self.usable = True

    def keep(self, msg: bytes) -> None:
        """Keep a new message about to be written."""
        if not self.usable:
            return
        self.messages.append(msg)
        self.nbytes += len(msg)
        if self.nbytes > self.limit_bytes:
            self._drop()

    def note_accepted(self, initial_metadata: asyncio.Future) -> None:
        """Stop keeping messages once the receiver's initial metadata says it took the stream on."""
        if not self.usable:
            return
        if not initial_metadata.done() or initial_metadata.cancelled():
            return
        if initial_metadata.exception() is None and any(k == ACCEPTED_KEY for k, _ in initial_metadata.result() or ()):
            self._drop()

    def _drop(self) -> None:
        self.messages, self.nbytes, self.usable = [], 0, False
