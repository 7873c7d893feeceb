"""Fault-aware butterfly all-reduce over gRPC.

One round reduces one flat fp32 tensor (or a list of tensors, flattened and
restored) across an ordered group of members, as ``shared/DESIGN.md`` says:

1. aggregate-scatter: the tensor is cut into one contiguous part per member;
   member i encodes part j and streams it, chunk by chunk, to member j, which
   decodes each chunk into its row of contributions as it arrives;
2. reduce: member j reduces the n rows of its part in fp32 with the round's
   aggregator (weighted mean, sum, median, trimmed mean; or a whole-vector one
   such as Krum, whose statistic the owners assemble from per-part shares
   first, see ``collectives/reduce/round.py``);
3. all-gather: member j encodes its reduced part once, streams the same bytes
   to every member, and itself uses the *decoded* value, so all members end
   with bit-identical results.

A member returns only when it holds the whole result and every member it sent
to has acknowledged its data. If any member is unreachable, dies, sends bad
data or misses the deadline, every surviving member raises ``MemberFailure``
naming it (a member that sees a failure first tells the others with an abort
notice), and nobody returns a partial result. A member whose input holds NaN
or Inf raises ``NonFiniteError`` and aborts the round (the others raise
``MemberFailure`` naming it): its encoders refuse non-finite values chunk by
chunk, so the round needs no separate pass over the whole input first.
Applying the result, or not, is the business of the layer above (the commit
step of the membership issue).

An input on a GPU stays there: member i encodes its parts on the device
(``collectives/codecs/device.py``, the same bytes as on the CPU), so only
encoded bytes cross to the host; owners reduce, and every member decodes its
result, on the host.

This module is the endpoint: the public API, the Collective service's
handlers (receive side, validated by ``collectives/reduce/inbox.py``), its
buffer pool (``collectives/reduce/buffers.py``). One flat round is a ``Round``
of ``collectives/reduce/round.py`` (its sending side, its reduction); a round
of members that share a host is ``collectives/hosts/round.py``'s ``HostRound``.
Both move their bytes through the member's ``Transport``
(``collectives/net/transport.py``).

A push or share for a round this member has not opened waits at most the
transport's ``open_wait_s`` and is then refused as retryable ("not-open"); the
sender's transport retries it until the sender's own deadline, so a member a
little late to open a round still gets every contribution, and a stream for a
round that never opens holds a server slot for seconds, not minutes. A push
that is taken on says so in its initial metadata, after which the sender no
longer keeps its messages for a replay.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from collectives.asynctasks import consume_exception
from collectives.codecs import Codec, CodecConfig, error_bound, make_codec
from collectives.errors import (
    LoconetError,
    NonFiniteError,
    ProtocolError,
    StaleRound,
    Unauthenticated,
)
from collectives.hosts.cache import SegmentCache
from collectives.hosts.local import HostPlan, pre_reducible
from collectives.hosts.round import HostRound
from collectives.net.admission import ACCEPTED_KEY, OPEN_WAIT_EXPIRED, RETRY_KEY, UNAUTHENTICATED
from collectives.net.credentials import refuse_unauthenticated, verify_peer_call
from collectives.net.rpc import method_handlers, raw_stream_unary, raw_unary_unary
from collectives.net.transport import Transport
from collectives.net.wire import decode_chunk
from collectives.reduce.buffers import BufferPool
from collectives.reduce.inbox import (
    DuplicateStream,
    ForeignRun,
    Group,
    RoundClosed,
    RoundInbox,
    RoundNotOpen,
    RoundRegistry,
    StaleMessage,
    sent_by_another,
)
from collectives.reduce.parts import flatten, part_bounds, shared_device, total_numel, unflatten_like
from collectives.reduce.round import (
    ABORT_METHOD,
    ERROR_KIND_KEY,
    PUSH_METHOD,
    SERVICE,
    STAT_METHOD,
    AllReduceConfig,
    Round,
)
from collectives.stats import RoundStats
from protos import collective_pb2 as pb

log = logging.getLogger(__name__)

# Initial metadata of a push this member has taken on (the sender stops keeping it for a replay).
ACCEPTED = ((ACCEPTED_KEY, "1"),)
# How long a push whose stream ended short of its part waits for its cancellation before it is bad data
# (a cancel showed up within a few loop turns on 127.0.0.1; this is ample on a loaded machine).
CANCEL_GRACE_S = 0.5

@dataclass
class AllReduceResult:
    """The reduced tensor(s), shaped like the input, and what the round cost this member."""

    value: torch.Tensor | list[torch.Tensor]
    stats: RoundStats
    # The aggregator's decisions, one per statistic round (e.g. {"selected": [2], "scores": [...]} for Krum).
    decisions: list[dict] = field(default_factory=list)


def mean_error_bound(config: CodecConfig, contributions: Sequence[torch.Tensor]) -> float:
    """Largest per-element error a mean round with this codec may show against the exact mean.

    Each member's contribution to another's part is quantized once (the owner's
    own is exact); the reduced part is quantized again for the all-gather.
    Blocks are aligned at each part's start, as the round cuts them. The fp32
    arithmetic of the mean adds a few units in the last place.
    """
    n = len(contributions)
    numel = contributions[0].numel()
    worst = 0.0
    for owner, (a, b) in enumerate(part_bounds(numel, n)):
        if a == b:
            continue
        contrib = torch.zeros(b - a, dtype=torch.float32)
        for r, x in enumerate(contributions):
            if r != owner:
                contrib += error_bound(config, x[a:b])
        contrib /= n
        rows = torch.stack([x[a:b] for x in contributions])
        arithmetic = rows.abs().amax(0) * ((n + 2) * 2.0**-24)
        mean = rows.double().mean(0).float()
        reduced = error_bound(config, mean.abs() + contrib + arithmetic)
        worst = max(worst, float((contrib + arithmetic + reduced).max()))
    return worst


def hierarchical(group: Group, hosts: Sequence[str] | None, config: AllReduceConfig) -> bool:
    """Whether a round runs through shared memory inside hosts: host ids given, a host shared, a pre-reducible
    aggregator (``Aggregator.pre_reducible``)."""
    if hosts is None:
        return False
    if len(hosts) != group.size or not all(isinstance(h, str) and h for h in hosts):
        raise ValueError(f"hosts must name one non-empty host id per member ({group.size}), got {list(hosts)!r}")
    return pre_reducible(config.aggregator) and HostPlan(tuple(hosts), group.rank).shares_a_host


def _error_kind(exc: ProtocolError) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RoundNotOpen):
        return grpc.StatusCode.UNAVAILABLE, "not-open"
    if isinstance(exc, RoundClosed):
        return grpc.StatusCode.FAILED_PRECONDITION, "closed"
    if isinstance(exc, ForeignRun):
        return grpc.StatusCode.FAILED_PRECONDITION, "foreign-run"
    if isinstance(exc, StaleMessage):
        return grpc.StatusCode.FAILED_PRECONDITION, "stale"
    if isinstance(exc, DuplicateStream):
        return grpc.StatusCode.ALREADY_EXISTS, "duplicate"
    return grpc.StatusCode.INVALID_ARGUMENT, "invalid"


class Collective:
    """A peer's all-reduce endpoint for one run: serves pushes from the others and runs its own rounds.

    Create it on a not-yet-started transport and start the transport with
    ``handlers()``; then call ``allreduce`` (blocking) or ``allreduce_async``
    (returns a future) from any thread.
    """

    def __init__(
        self, transport: Transport, run_id: str, phase_hook: Callable[[Group, str], None] | None = None
    ) -> None:
        if not run_id:
            raise ValueError("run_id must be a non-empty string")
        self.transport = transport
        self.run_id = run_id
        # Called on the transport's loop as each round enters "scatter" and "gather"
        # (observers, and fault-injection tests that stop a member inside a phase).
        self.phase_hook = phase_hook
        self.registry = RoundRegistry(run_id)
        self.buffers = BufferPool()
        # Codecs are thread-safe and keep per-thread scratch buffers: one per config for
        # the collective's life, so a round does not allocate (and fault in) scratch anew.
        self._codecs: dict[CodecConfig, Codec] = {}
        self._background: set[asyncio.Task] = set()
        # Shared-memory segments of hierarchical rounds, kept mapped from round to round (collectives/hosts/cache.py).
        self.segments = SegmentCache()

    def close(self) -> None:
        """Release what the collective keeps between rounds (its hierarchical rounds' shared memory). Idempotent."""
        self.segments.close()

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """The gRPC handlers of the Collective service, for ``Transport.start``."""
        return [
            method_handlers(
                SERVICE,
                {
                    "PushPart": raw_stream_unary(self._handle_push),
                    "PushStat": raw_unary_unary(self._handle_stat),
                    "Abort": raw_unary_unary(self._handle_abort),
                },
            )
        ]

    # -- public API ----------------------------------------------------------------

    def allreduce(
        self,
        group: Group,
        tensors: torch.Tensor | Sequence[torch.Tensor],
        *,
        weight: float = 1.0,
        config: AllReduceConfig | None = None,
        residual: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        hosts: Sequence[str] | None = None,
    ) -> AllReduceResult:
        """Reduce tensors across the group and return the result; raises RoundFailed on any failure."""
        # The caller is blocked until the round ends, so its input need not be copied.
        future = self.allreduce_async(
            group, tensors, weight=weight, config=config, residual=residual, out=out, copy_input=False, hosts=hosts
        )
        return future.result()

    def allreduce_async(
        self,
        group: Group,
        tensors: torch.Tensor | Sequence[torch.Tensor],
        *,
        weight: float = 1.0,
        config: AllReduceConfig | None = None,
        residual: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        copy_input: bool = True,
        hosts: Sequence[str] | None = None,
    ) -> concurrent.futures.Future[AllReduceResult]:
        """Start a round and return a future of its result; the input is copied first, so training may go on.

        ``residual`` enables error feedback: a flat fp32 tensor of the input's
        total size, owned by the caller and updated by the round if it succeeds
        (a failed round leaves it unchanged; do not touch it until the future is
        done). ``out``, a flat fp32 tensor of that size,
        receives the result (saves an allocation per round); the returned
        tensors are then views of it. ``copy_input=False`` promises that the
        input is not modified until the future is done, which saves the copy
        when it is one contiguous fp32 CPU tensor. ``hosts``, one host id per member in rank order, makes
        members that share a host reduce through shared memory first (``collectives/hosts/round.py``;
        pre-reducible aggregators only, others ignore it); every member must pass the same.
        """
        config = config or AllReduceConfig()
        if group.run_id != self.run_id:
            raise ValueError(f"group is for run {group.run_id!r}, this collective serves run {self.run_id!r}")
        numel = total_numel(tensors)
        for name, buf in (("residual", residual), ("out", out)):
            if buf is not None and (buf.shape != (numel,) or buf.dtype != torch.float32 or not buf.is_contiguous()):
                raise ValueError(f"{name} must be a contiguous float32 tensor of shape ({numel},)")
        borrowed = (
            not copy_input
            and isinstance(tensors, torch.Tensor)
            and tensors.dtype == torch.float32
            and tensors.is_contiguous()
        )
        device = shared_device(tensors)
        if borrowed:
            flat = tensors.detach().view(-1)
        elif device.type != "cpu":  # copied where it lives: the round encodes it there
            flat = flatten(tensors, device=device)
        else:
            flat = flatten(tensors, out=self.buffers.take(numel))
        pooled = None if borrowed or flat.device.type != "cpu" else flat
        if residual is not None and residual.device != flat.device:
            raise ValueError(
                f"residual must be on {flat.device}, where the input is encoded; it is on {residual.device}"
            )
        if out is not None and out.device.type != "cpu":
            raise ValueError("out must be a CPU tensor: results are decoded on the host")
        result = torch.empty(numel, dtype=torch.float32) if out is None else out
        like = tensors if isinstance(tensors, torch.Tensor) else list(tensors)
        return self.transport.submit(
            self._run(group, flat, pooled, float(weight), config, residual, result, like, hosts)
        )

    async def reduce_flat(
        self,
        group: Group,
        flat: torch.Tensor,
        *,
        weight: float = 1.0,
        config: AllReduceConfig | None = None,
        residual: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
        hosts: Sequence[str] | None = None,
    ) -> AllReduceResult:
        """Run a round on the transport's loop for a flat fp32 tensor (not copied); ``hosts`` as allreduce_async's."""
        if group.run_id != self.run_id:
            raise ValueError(f"group is for run {group.run_id!r}, this collective serves run {self.run_id!r}")
        result = torch.empty(flat.numel(), dtype=torch.float32) if out is None else out
        return await self._run(
            group, flat, None, float(weight), config or AllReduceConfig(), residual, result, flat, hosts
        )

    # -- the round -------------------------------------------------------------------

    async def _run(
        self,
        group: Group,
        flat: torch.Tensor,
        pooled: torch.Tensor | None,
        weight: float,
        config: AllReduceConfig,
        residual: torch.Tensor | None,
        result: torch.Tensor,
        like: torch.Tensor | list[torch.Tensor],
        hosts: Sequence[str] | None = None,
    ) -> AllReduceResult:
        if hierarchical(group, hosts, config):
            return await self._run_hierarchical(group, hosts, flat, pooled, weight, config, residual, result, like)
        codec = self._codecs.get(config.codec)
        if codec is None:
            codec = self._codecs[config.codec] = make_codec(config.codec)
        started = time.monotonic()
        deadline = started + config.timeout_s
        rows = self.buffers.take(RoundInbox.rows_numel(group, flat.numel()))
        inbox = RoundInbox(group, flat.numel(), codec, rows, result, config.aggregator)
        stats = RoundStats(
            run_id=group.run_id,
            epoch=group.epoch,
            round_id=group.round_id,
            group_size=group.size,
            numel=flat.numel(),
            codec=str(config.codec),
        )
        rnd = Round(
            self.transport, self.spawn, self.phase_hook, group, inbox, codec, inbox.aggregator, config, stats, deadline
        )
        # Error feedback works on a private copy of the residual, handed back only if the round
        # succeeds: a failed round delivered nothing, so it must leave the caller's residual as
        # it was, and an encode still running on a codec thread after a failure writes into a
        # buffer nobody reads (it is not pooled then).
        work = None
        if residual is not None and residual.device.type != "cpu":
            work = residual.clone()  # on its device, beside the input it corrects
        elif residual is not None:
            work = self.buffers.take(residual.numel())
            work.copy_(residual)
        await self.registry.open(inbox)
        try:
            await rnd.run(flat, weight, work)
            stats.gather_s = time.monotonic() - started - stats.scatter_s
            if work is not None:
                residual.copy_(work)  # every encode is done: the round has sent everything
                if work.device.type == "cpu":
                    self.buffers.give(work)
        except asyncio.CancelledError:
            rnd.broadcast_abort([], "the round was cancelled by its caller")
            raise
        except LoconetError as exc:
            if inbox.failure_reported_by is None and not isinstance(exc, StaleRound):
                why = "; ".join(inbox.failed.values()) if inbox.failed else str(exc)
                # A non-finite input is this member's bad data: the others name it as failed.
                culprits = [group.rank] if isinstance(exc, NonFiniteError) else list(inbox.failed)
                rnd.broadcast_abort(culprits, why)
            raise
        finally:
            self.registry.close(inbox)
            await rnd.stop()
            await inbox.drained()
            if pooled is not None:
                self.buffers.give(pooled)
            self.buffers.give(rows)
            stats.bytes_received = inbox.bytes_received
            stats.decode_s = inbox.decode_s
            stats.waited_for_rank, stats.waited_s = inbox.last_sender()
            stats.wall_s = time.monotonic() - started
        return AllReduceResult(value=unflatten_like(inbox.result, like), stats=stats, decisions=rnd.decisions)

    async def _run_hierarchical(
        self,
        group: Group,
        hosts: Sequence[str],
        flat: torch.Tensor,
        pooled: torch.Tensor | None,
        weight: float,
        config: AllReduceConfig,
        residual: torch.Tensor | None,
        result: torch.Tensor,
        like: torch.Tensor | list[torch.Tensor],
    ) -> AllReduceResult:
        """Members of a host reduce through shared memory; their leaders run this module's round between hosts."""

        async def between_hosts(leaders: Group, host_flat, host_weight, leader_residual, out) -> RoundStats:
            done = await self._run(leaders, host_flat, None, host_weight, config, leader_residual, out, host_flat)
            return done.stats

        try:
            stats = await HostRound(self.transport, group, hosts, config, self.phase_hook).run(
                flat, weight, residual, result, between_hosts, self.segments
            )
        finally:
            if pooled is not None:
                self.buffers.give(pooled)
        return AllReduceResult(value=unflatten_like(result, like), stats=stats)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a fire-and-forget coroutine on the loop, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- handlers (run on the transport's loop) -----------------------------------------

    async def _handle_push(self, request_iterator, context: grpc.aio.ServicerContext) -> bytes:
        inbox: RoundInbox | None = None
        stream = None
        header = None
        chunks = 0
        # The previous chunk's decode: it runs on a codec thread while the next chunk is read
        # and paced, so neither the link nor the CPU waits for the other.
        decoding: asyncio.Task | None = None
        try:
            sender = await self._sender(context, PUSH_METHOD)
            async for raw in request_iterator:
                header, payload = decode_chunk(raw)
                if stream is None:
                    inbox = await self.registry.find(header.tag, self._open_wait(context))
                    if sent_by_another(inbox.group, header.tag.sender_rank, sender):
                        await self._forged(context, PUSH_METHOD, sender)
                    stream = inbox.begin_stream(header)
                    await context.send_initial_metadata(ACCEPTED)
                target = inbox.check_chunk(stream, header, payload)
                if decoding is not None:
                    await asyncio.shield(decoding)  # a cancelled handler must not cancel it
                inbox.begin_decode()  # counted from now: an aborted round keeps its buffers until it ends
                decoding = asyncio.get_running_loop().create_task(
                    self._decode(inbox, stream, payload, target, header.offset, header.count)
                )
                chunks += 1
                inbox.bytes_received += len(raw)
                await self.transport.note_received(inbox.group.members[stream.sender], len(raw))
            if decoding is not None:
                await asyncio.shield(decoding)
            if stream is None:
                raise ProtocolError("empty PushPart stream")
            if not stream.covered:
                # gRPC may end the request stream of a client that cancelled (it gave up on the round) a few
                # loop turns before it cancels this handler: let the cancellation land before calling an
                # incomplete part bad data and naming its sender as failed.
                await asyncio.sleep(CANCEL_GRACE_S)
            inbox.finish(stream)
        except ProtocolError as exc:
            self._blame(inbox, header, exc, "sent bad data")
            log.debug("rejected a push: %s", exc)
            await self._refuse(context, exc)
        except asyncio.CancelledError:
            # The sender went away mid-stream. Not blamed here: if it died, the round's
            # connection watcher names it at once; if it gave up on the round, its abort
            # notice (naming the real culprit) is on the way; otherwise the deadline decides.
            if inbox is not None:
                inbox.wake()
            raise
        finally:
            if decoding is not None and not decoding.done():
                # Never cancelled: the inbox counts it until its thread is done with the buffers.
                decoding.add_done_callback(consume_exception)
        return pb.PushAck(chunks=chunks).SerializeToString()

    async def _decode(
        self, inbox: RoundInbox, stream, payload: memoryview, target: torch.Tensor, offset: int, count: int
    ) -> None:
        """Take one checked chunk on a codec thread (begin_decode was called for it), then record it."""
        try:
            inbox.decode_s += await self.transport.run_cpu(inbox.receive, stream, offset, payload, target)
        finally:
            inbox.end_decode()
        inbox.advance(stream, count)

    async def _handle_stat(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        inbox: RoundInbox | None = None
        share = None
        try:
            try:
                share = pb.StatShare.FromString(request)
            except Exception as exc:  # protobuf's DecodeError and friends
                raise ProtocolError(f"malformed statistic share: {exc}") from exc
            sender = await self._sender(context, STAT_METHOD)
            inbox = await self.registry.find(share.tag, self._open_wait(context))
            if sent_by_another(inbox.group, share.tag.sender_rank, sender):
                await self._forged(context, STAT_METHOD, sender)
            inbox.accept_share(share)
            inbox.bytes_received += len(request)
            await self.transport.note_received(inbox.group.members[share.tag.sender_rank], len(request))
        except ProtocolError as exc:
            self._blame(inbox, share, exc, "sent a bad statistic share")
            await self._refuse(context, exc)
        return pb.StatAck().SerializeToString()

    async def _sender(self, context: grpc.aio.ServicerContext, method: str) -> str | None:
        """With a run secret: the data-plane address the caller's credential vouches for (None without one); a call
        without a valid credential signed for this peer ends UNAUTHENTICATED, before any message is read."""
        try:
            cred = verify_peer_call(context, self.transport.auth, method, self.transport.address)
        except Unauthenticated as exc:
            self.transport.refusals.count(UNAUTHENTICATED)
            await refuse_unauthenticated(context, exc)
        return None if cred is None else cred.address

    async def _forged(self, context: grpc.aio.ServicerContext, method: str, sender: str | None) -> None:
        """End a message that claims another member's rank than its sender's (nobody is blamed: it is not theirs)."""
        self.transport.refusals.count(UNAUTHENTICATED)
        await refuse_unauthenticated(
            context, Unauthenticated(f"{method}: the message claims a rank that is not {sender}'s")
        )

    def _open_wait(self, context: grpc.aio.ServicerContext) -> float:
        """How long a message may wait for its round to open here: open_wait_s, or less if its caller's deadline is
        sooner."""
        wait = self.transport.config.open_wait_s
        remaining = context.time_remaining()
        return wait if remaining is None else min(wait, remaining)

    async def _refuse(self, context: grpc.aio.ServicerContext, exc: ProtocolError) -> None:
        """End a call with the status and error kind of exc; a round not open here yet is marked retryable."""
        code, kind = _error_kind(exc)
        metadata: tuple[tuple[str, str], ...] = ((ERROR_KIND_KEY, kind),)
        if isinstance(exc, RoundNotOpen):
            self.transport.refusals.count(OPEN_WAIT_EXPIRED)
            metadata += ((RETRY_KEY, kind),)
        await context.abort(code, str(exc), trailing_metadata=metadata)

    @staticmethod
    def _blame(inbox: RoundInbox | None, message, exc: ProtocolError, what: str) -> None:
        """Name the member a refused message claims to come from as failed (not for stale or duplicate ones).

        Also when the first chunk is refused outright (another codec or aggregator, wrong sizes): the
        round cannot succeed with that member, and waiting for the deadline would only delay the abort.
        """
        if inbox is None or message is None or isinstance(exc, (StaleMessage, DuplicateStream, RoundNotOpen)):
            return
        culprit = inbox.claimed_member(message.tag)
        if culprit is not None:
            inbox.fail(culprit, f"{what}: {exc}")

    async def _handle_abort(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            try:
                notice = pb.AbortNotice.FromString(request)
            except Exception as exc:  # protobuf's DecodeError and friends
                raise ProtocolError(f"malformed abort notice: {exc}") from exc
            self.registry.abort_notice(notice, await self._sender(context, ABORT_METHOD))
        except ProtocolError as exc:
            code, kind = _error_kind(exc)
            await context.abort(code, str(exc), trailing_metadata=((ERROR_KIND_KEY, kind),))
        return pb.AbortAck().SerializeToString()

