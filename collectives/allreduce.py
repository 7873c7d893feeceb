"""Fault-aware butterfly all-reduce over gRPC.

One round reduces one flat fp32 tensor (or a list of tensors, flattened and
restored) across an ordered group of members, as ``shared/DESIGN.md`` says:

1. aggregate-scatter: the tensor is cut into one contiguous part per member;
   member i encodes part j and streams it, chunk by chunk, to member j, which
   decodes each chunk into its row of contributions as it arrives;
2. reduce: member j reduces the n rows of its part in fp32 with the round's
   reducer (weighted mean, sum, median, trimmed mean);
3. all-gather: member j encodes its reduced part once, streams the same bytes
   to every member, and itself uses the *decoded* value, so all members end
   with bit-identical results.

A member returns only when it holds the whole result and every member it sent
to has acknowledged its data. If any member is unreachable, dies, sends bad
data or misses the deadline, every surviving member raises ``MemberFailure``
naming it (a member that sees a failure first tells the others with an abort
notice), and nobody returns a partial result. Applying the result, or not, is
the business of the layer above (the commit step of the membership issue).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import torch

from protos import collective_pb2 as pb
from collectives.codecs import Codec, CodecConfig, error_bound, make_codec
from collectives.errors import (
    LoconetError,
    MemberFailure,
    NonFiniteError,
    ProtocolError,
    RoundFailed,
    StaleRound,
)
from collectives.inbox import (
    GATHER,
    SCATTER,
    DuplicateStream,
    ForeignRun,
    Group,
    RoundClosed,
    RoundInbox,
    RoundRegistry,
    StaleMessage,
    codec_proto,
)
from collectives.buffers import BufferPool
from collectives.parts import chunk_bounds, flatten, part_bounds, total_numel, unflatten_like
from collectives.reducers import ReducerConfig
from collectives.reducers import prepare as prepare_reducer
from collectives.stats import RoundStats
from collectives.transport import Transport, as_async_iter, method_handlers, raw_stream_unary, raw_unary_unary
from collectives.wire import decode_chunk, encode_chunk

log = logging.getLogger(__name__)

SERVICE = "loconet.collective.v1.Collective"
PUSH_METHOD = f"/{SERVICE}/PushPart"
ABORT_METHOD = f"/{SERVICE}/Abort"
# Trailing-metadata key that tells a sender why its stream was rejected.
ERROR_KIND_KEY = "loconet-error"
# Longest a handler waits for this member to open a round a peer already started.
MAX_OPEN_WAIT_S = 600.0
# Deadline of the best-effort abort notices.
ABORT_NOTICE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class AllReduceConfig:
    """How a round encodes, reduces and waits. Every member of a round must use the same codec and reducer."""

    codec: CodecConfig = field(default_factory=CodecConfig)
    reducer: ReducerConfig = field(default_factory=ReducerConfig)
    # Whole-round deadline: a member that has not finished by then raises MemberFailure.
    timeout_s: float = 60.0
    # At the deadline, a member stuck in the gather phase waits this much longer for
    # another member's abort notice naming the root cause before blaming the part owners.
    blame_grace_s: float = 1.0


@dataclass
class AllReduceResult:
    """The reduced tensor(s), shaped like the input, and what the round cost this member."""

    value: torch.Tensor | list[torch.Tensor]
    stats: RoundStats


def chunk_numel(codec: Codec, chunk_bytes: int) -> int:
    """Elements per chunk so that a chunk's raw payload fits chunk_bytes (whole quantization blocks)."""
    block = codec.config.block_size if codec.config.name in ("int8", "int4") else 1
    per_block = max(1, codec.raw_size(block))
    return max(1, chunk_bytes // per_block) * block


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


def check_finite(flat: torch.Tensor) -> None:
    """Raise NonFiniteError if flat holds NaN or Inf (before anything is sent)."""
    # A sum is one cheap pass; it is finite whenever every element is, so the
    # exact (slower) count runs only when something may be wrong.
    if math.isfinite(float(flat.sum())):
        return
    bad = int(flat.numel() - torch.isfinite(flat).sum())
    if bad:
        raise NonFiniteError(f"{bad} of {flat.numel()} values to reduce are NaN or Inf; nothing was sent")


def round_tag(group: Group, numel: int) -> pb.RoundTag:
    """The tag this member puts on every message of a round."""
    return pb.RoundTag(
        run_id=group.run_id,
        epoch=group.epoch,
        round_id=group.round_id,
        sender_rank=group.rank,
        group_size=group.size,
        total_numel=numel,
    )


def chunk_message(
    group: Group,
    numel: int,
    codec: CodecConfig,
    phase: int,
    part: int,
    part_numel: int,
    offset: int,
    count: int,
    weight: float,
    payload: bytes,
) -> bytes:
    """One serialised PartChunk of a round, as sent on the wire."""
    header = pb.PartChunk(
        tag=round_tag(group, numel),
        phase=phase,
        part_index=part,
        part_numel=part_numel,
        offset=offset,
        count=count,
        codec=codec_proto(codec),
        weight=weight,
    )
    return encode_chunk(header, payload)


def _error_kind(exc: ProtocolError) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RoundClosed):
        return grpc.StatusCode.FAILED_PRECONDITION, "closed"
    if isinstance(exc, ForeignRun):
        return grpc.StatusCode.FAILED_PRECONDITION, "foreign-run"
    if isinstance(exc, StaleMessage):
        return grpc.StatusCode.FAILED_PRECONDITION, "stale"
    if isinstance(exc, DuplicateStream):
        return grpc.StatusCode.ALREADY_EXISTS, "duplicate"
    return grpc.StatusCode.INVALID_ARGUMENT, "invalid"


def _rejection_kind(exc: grpc.aio.AioRpcError) -> str | None:
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_KIND_KEY:
            return str(value)
    return None


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
        self._background: set[asyncio.Task] = set()

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """The gRPC handlers of the Collective service, for ``Transport.start``."""
        return [
            method_handlers(
                SERVICE,
                {"PushPart": raw_stream_unary(self._handle_push), "Abort": raw_unary_unary(self._handle_abort)},
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
    ) -> AllReduceResult:
        """Reduce tensors across the group and return the result; raises RoundFailed on any failure."""
        # The caller is blocked until the round ends, so its input need not be copied.
        future = self.allreduce_async(
            group, tensors, weight=weight, config=config, residual=residual, out=out, copy_input=False
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
    ) -> concurrent.futures.Future[AllReduceResult]:
        """Start a round and return a future of its result; the input is copied first, so training may go on.

        ``residual`` enables error feedback: a flat fp32 tensor of the input's
        total size, owned by the caller and updated by the round (do not touch
        it until the future is done). ``out``, a flat fp32 tensor of that size,
        receives the result (saves an allocation per round); the returned
        tensors are then views of it. ``copy_input=False`` promises that the
        input is not modified until the future is done, which saves the copy
        when it is one contiguous fp32 CPU tensor.
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
            and tensors.device.type == "cpu"
            and tensors.is_contiguous()
        )
        flat = tensors.detach().view(-1) if borrowed else flatten(tensors, out=self.buffers.take(numel))
        pooled = None if borrowed else flat
        try:
            check_finite(flat)
        except NonFiniteError:
            if pooled is not None:
                self.buffers.give(pooled)
            raise
        result = torch.empty(numel, dtype=torch.float32) if out is None else out
        like = tensors if isinstance(tensors, torch.Tensor) else list(tensors)
        return self.transport.submit(self._run(group, flat, pooled, float(weight), config, residual, result, like))

    async def reduce_flat(
        self,
        group: Group,
        flat: torch.Tensor,
        *,
        weight: float = 1.0,
        config: AllReduceConfig | None = None,
        residual: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> AllReduceResult:
        """Run a round on the transport's loop for a flat fp32 tensor already checked finite (not copied)."""
        if group.run_id != self.run_id:
            raise ValueError(f"group is for run {group.run_id!r}, this collective serves run {self.run_id!r}")
        result = torch.empty(flat.numel(), dtype=torch.float32) if out is None else out
        return await self._run(group, flat, None, float(weight), config or AllReduceConfig(), residual, result, flat)

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
    ) -> AllReduceResult:
        codec = make_codec(config.codec)
        started = time.monotonic()
        deadline = started + config.timeout_s
        rows = self.buffers.take(RoundInbox.rows_numel(group, flat.numel()))
        inbox = RoundInbox(group, flat.numel(), codec, rows, result)
        stats = RoundStats(
            run_id=group.run_id,
            epoch=group.epoch,
            round_id=group.round_id,
            group_size=group.size,
            numel=flat.numel(),
            codec=str(config.codec),
        )
        rnd = _Round(self, group, inbox, codec, config, stats, deadline)
        await self.registry.open(inbox)
        try:
            await rnd.run(flat, weight, residual)
            stats.gather_s = time.monotonic() - started - stats.scatter_s
        except asyncio.CancelledError:
            rnd.broadcast_abort([], "the round was cancelled by its caller")
            raise
        except LoconetError as exc:
            if inbox.failure_reported_by is None and not isinstance(exc, StaleRound):
                why = "; ".join(inbox.failed.values()) if inbox.failed else str(exc)
                rnd.broadcast_abort(list(inbox.failed), why)
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
            stats.wall_s = time.monotonic() - started
        return AllReduceResult(value=unflatten_like(inbox.result, like), stats=stats)

    def spawn(self, coro) -> None:
        """Run a fire-and-forget coroutine on the loop, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- handlers (run on the transport's loop) -----------------------------------------

    async def _handle_push(self, request_iterator, context: grpc.aio.ServicerContext) -> bytes:
        inbox: RoundInbox | None = None
        stream = None
        chunks = 0
        try:
            async for raw in request_iterator:
                header, payload = decode_chunk(raw)
                if stream is None:
                    wait = context.time_remaining()
                    wait = MAX_OPEN_WAIT_S if wait is None else min(wait, MAX_OPEN_WAIT_S)
                    inbox = await self.registry.find(header.tag, wait)
                    stream = inbox.begin_stream(header)
                target = inbox.check_chunk(stream, header, payload)
                inbox.begin_decode()
                try:
                    inbox.decode_s += await self.transport.run_cpu(inbox.decode_into, payload, target)
                finally:
                    inbox.end_decode()
                inbox.advance(stream, header.count)
                chunks += 1
                inbox.bytes_received += len(raw)
                await self.transport.note_received(inbox.group.members[stream.sender], len(raw))
            if stream is None:
                raise ProtocolError("empty PushPart stream")
            inbox.finish(stream)
        except ProtocolError as exc:
            if inbox is not None and stream is not None and not isinstance(exc, StaleMessage):
                inbox.fail(stream.sender, f"sent bad data: {exc}")
            code, kind = _error_kind(exc)
            log.debug("rejected a push: %s", exc)
            await context.abort(code, str(exc), trailing_metadata=((ERROR_KIND_KEY, kind),))
        except asyncio.CancelledError:
            # The sender went away mid-stream. Not blamed here: if it died, the round's
            # connection watcher names it at once; if it gave up on the round, its abort
            # notice (naming the real culprit) is on the way; otherwise the deadline decides.
            if inbox is not None:
                inbox.wake()
            raise
        return pb.PushAck(chunks=chunks).SerializeToString()

    async def _handle_abort(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            try:
                notice = pb.AbortNotice.FromString(request)
            except Exception as exc:  # protobuf's DecodeError and friends
                raise ProtocolError(f"malformed abort notice: {exc}") from exc
            self.registry.abort_notice(notice)
        except ProtocolError as exc:
            code, kind = _error_kind(exc)
            await context.abort(code, str(exc), trailing_metadata=((ERROR_KIND_KEY, kind),))
        return pb.AbortAck().SerializeToString()


class _Round:
    """The sending side and the bookkeeping of one member's round (lives on the transport's loop)."""

    def __init__(
        self,
        owner: Collective,
        group: Group,
        inbox: RoundInbox,
        codec: Codec,
        config: AllReduceConfig,
        stats: RoundStats,
        deadline: float,
    ) -> None:
        self.owner = owner
        self.transport = owner.transport
        self.group = group
        self.inbox = inbox
        self.codec = codec
        self.config = config
        self.stats = stats
        self.deadline = deadline
        self.others = [j for j in range(group.size) if j != group.rank]
        self.pending: Counter[int] = Counter()
        self.tasks: list[asyncio.Task] = []
        self.chunk_numel = chunk_numel(codec, self.transport.config.chunk_bytes)
        self.started = time.monotonic()
        # This member's reduced chunks, in order, shared by every destination's gather stream.
        self._gathered: list[bytes] = []
        self._gather_ready = asyncio.Event()
        self._gather_done = False
        loop = asyncio.get_running_loop()
        for j in self.others:
            self.tasks.append(loop.create_task(self._watch(j)))

    # -- phases ------------------------------------------------------------------------

    async def run(self, flat: torch.Tensor, weight: float, residual: torch.Tensor | None) -> None:
        """Send each part to its owner; reduce and all-gather this member's part as contributions arrive.

        The owner reduces chunk k of its part as soon as every member's
        contribution to chunk k is in and streams it on, so the all-gather
        overlaps the aggregate-scatter and a slow link never idles. Chunk
        boundaries are fixed, so the result does not depend on timing.
        """
        self._enter("scatter")
        me = self.group.rank
        a, b = self.inbox.bounds[me]
        self.inbox.rows[me].copy_(flat[a:b])
        self.inbox.weights[me] = weight
        if residual is not None:
            residual[a:b].zero_()  # this member's own part is contributed exactly
        for j in self.others:
            self._send(j, self._scatter_messages(j, flat, weight, residual))
        for j in self.others:
            self._send(j, self._gather_messages())
        own = self.inbox.result[a:b]
        reduce = None
        for c0, c1 in chunk_bounds(0, b - a, self.chunk_numel):
            await self._wait("scatter", lambda: self.inbox.contributions_ready() >= c1, self._late_contributors)
            if c1 == b - a:
                self._enter("gather")
            if reduce is None:  # every contribution's weight is known from its first chunk
                reduce = prepare_reducer(self.config.reducer, self.inbox.weights)
            message = await self.transport.run_cpu(self._reduce_chunk, reduce, own, b - a, c0, c1)
            self._gathered.append(message)
            self._gather_ready.set()
        self._gather_done = True
        self._gather_ready.set()
        self.stats.scatter_s = time.monotonic() - self.started
        await self._wait(
            "gather",
            lambda: not self.inbox.gather_left and not any(self.pending.values()),
            lambda: self.inbox.gather_left,
        )

    def _reduce_chunk(self, reduce, own: torch.Tensor, part_numel: int, c0: int, c1: int) -> bytes:
        # Runs on a codec thread: reduce, encode, keep the decoded value, frame the message.
        t0 = time.perf_counter()
        reduced = reduce(self.inbox.rows[:, c0:c1])
        t1 = time.perf_counter()
        payload = self.codec.encode(reduced, copy=False)
        t2 = time.perf_counter()
        # The owner keeps the decoded value, exactly what every other member will hold.
        self.codec.decode(payload, c1 - c0, out=own[c0:c1])
        message = self._message(GATHER, self.group.rank, part_numel, c0, c1 - c0, 0.0, payload)
        self.stats.reduce_s += t1 - t0
        self.stats.encode_s += t2 - t1
        return message

    def _late_contributors(self) -> set[int]:
        ready = self.inbox.contributions_ready()
        return {j for j, got in self.inbox.scatter_progress.items() if got <= ready}

    async def _gather_messages(self) -> AsyncIterator[bytes]:
        # Every destination streams the same reduced chunks, each as soon as it exists.
        sent = 0
        while True:
            while sent < len(self._gathered):
                yield self._gathered[sent]
                sent += 1
            if self._gather_done:
                return
            self._gather_ready.clear()
            await self._gather_ready.wait()

    def _enter(self, phase: str) -> None:
        if self.owner.phase_hook is not None:
            self.owner.phase_hook(self.group, phase)

    async def _wait(self, phase: str, done, missing) -> None:
        ok = await self.inbox.wait_for(done, self.deadline)
        if not ok and phase == "gather" and self.config.blame_grace_s > 0:
            # The owners we wait for may themselves wait for the real culprit; give
            # their abort notice a moment to arrive before blaming them.
            await self.inbox.wait_for(done, time.monotonic() + self.config.blame_grace_s)
            ok = self.inbox.broken or done()
        if not ok:
            late = set(missing()) | {j for j, n in self.pending.items() if n > 0}
            for j in sorted(late):
                self.inbox.fail(j, f"missed the {self.config.timeout_s:g} s deadline in the {phase} phase")
        self._raise_if_broken()

    def _raise_if_broken(self) -> None:
        inbox = self.inbox
        if inbox.failed:
            addresses = {r: self.group.members[r] for r in inbox.failed}
            raise MemberFailure(addresses, inbox.failed, round_id=self.group.round_id)
        if inbox.error is not None:
            raise inbox.error

    # -- sending -------------------------------------------------------------------------

    def _scatter_message(
        self, j: int, part_numel: int, offset: int, x: torch.Tensor, weight: float, residual: torch.Tensor | None
    ) -> bytes:
        # Runs on a codec thread; copy=False is safe because the payload is framed on the same thread.
        t0 = time.perf_counter()
        if residual is None:
            payload = self.codec.encode(x, copy=False)
        else:
            payload = self.codec.encode_with_feedback(x, residual, copy=False)
        self.stats.encode_s += time.perf_counter() - t0
        return self._message(SCATTER, j, part_numel, offset, x.numel(), weight, payload)

    def _message(self, phase: int, part: int, part_numel: int, offset: int, count: int, weight: float, payload: bytes) -> bytes:
        return chunk_message(self.group, self.inbox.numel, self.codec.config, phase, part, part_numel, offset, count, weight, payload)

    async def _scatter_messages(
        self, j: int, flat: torch.Tensor, weight: float, residual: torch.Tensor | None
    ) -> AsyncIterator[bytes]:
        # Each chunk is encoded just before it is sent, so encoding overlaps the network.
        a, b = self.inbox.bounds[j]
        for c0, c1 in chunk_bounds(a, b, self.chunk_numel):
            res = None if residual is None else residual[c0:c1]
            yield await self.transport.run_cpu(
                self._scatter_message, j, b - a, c0 - a, flat[c0:c1], weight, res
            )

    def _send(self, j: int, messages: Iterator[bytes] | AsyncIterator[bytes]) -> None:
        self.pending[j] += 1
        self.tasks.append(asyncio.get_running_loop().create_task(self._send_to(j, messages)))

    async def _send_to(self, j: int, messages: Iterator[bytes] | AsyncIterator[bytes]) -> None:
        address = self.group.members[j]
        counted = self._count(messages)
        try:
            await self.transport.stream_call(address, PUSH_METHOD, counted, self.deadline - time.monotonic())
        except grpc.aio.AioRpcError as exc:
            kind = _rejection_kind(exc)
            if kind == "stale":
                self.inbox.set_error(StaleRound(f"rank {j} ({address}) says this round is stale: {exc.details()}"))
            elif kind != "closed":
                self.inbox.fail(j, f"{exc.code().name}: {exc.details()}")
            # "closed": j gave up on the round; its abort notice says why (or the deadline does).
            return
        except LoconetError as exc:  # encoding failed here: our own problem, not the receiver's
            self.inbox.set_error(exc if isinstance(exc, RoundFailed) else RoundFailed(f"encoding failed: {exc}"))
            return
        self.pending[j] -= 1
        self.inbox.wake()

    async def _count(self, messages: Iterator[bytes] | AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for msg in as_async_iter(messages):
            self.stats.bytes_sent += len(msg)
            yield msg

    async def _watch(self, j: int) -> None:
        reason = await self.transport.wait_unreachable(self.group.members[j])
        self.inbox.fail(j, reason)

    # -- failure -------------------------------------------------------------------------

    def broadcast_abort(self, failed: list[int], reason: str) -> None:
        """Tell every member not known to have failed that this round is aborted (best effort)."""
        g = self.group
        notice = pb.AbortNotice(
            tag=round_tag(g, self.inbox.numel),
            failed_ranks=sorted(failed),
            reason=reason[:1000],
        ).SerializeToString()
        for j in self.others:
            if j not in failed:
                self.owner.spawn(self._notify(g.members[j], notice))

    async def _notify(self, address: str, notice: bytes) -> None:
        try:
            await self.transport.unary_call(address, ABORT_METHOD, notice, ABORT_NOTICE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            log.debug("abort notice to %s not delivered: %s", address, exc.code().name)

    async def stop(self) -> None:
        """Cancel this round's sends and watchers and wait until they are gone."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

