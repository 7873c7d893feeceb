"""One member's round of the all-reduce: what it sends, when it reduces, and how it fails.

``Collective`` (``collectives/allreduce.py``) opens a round's inbox and runs a
``Round``: it streams each part to its owner (through the member's
``Transport``, ``collectives/net/transport.py``, in chunks framed by
``collectives/net/wire.py``), reduces its own part chunk by chunk as
contributions arrive and streams each reduced chunk on (so the all-gather
overlaps the aggregate-scatter), waits for every part and every
acknowledgement, and on any failure names the failed members and tells the
others with an abort notice. Also here: the wire constants of the Collective
service and the configuration every member of a round must share.

An aggregator that needs a whole-vector statistic (Krum, Bulyan, clipping;
``collectives/reduce/aggregators.py``) adds statistic rounds between the scatter and
the reduce: once every contribution to its part is in, each owner computes its
share (a small float64 vector: per-contribution squared norms, pairwise squared
distances), sends it to every member (``PushStat``), and every member sums the
n shares in rank order and derives the same decision. The owners then reduce
with it; the gather is as before. Such a round cannot reduce a chunk before
the whole scatter is done, so it gives up the scatter/gather overlap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field

import grpc
import torch

from collectives.asynctasks import cancel_and_wait
from collectives.codecs import Codec, CodecConfig, check_finite
from collectives.codecs.kernels import native_kernels
from collectives.errors import ConfigError, LoconetError, MemberFailure, NonFiniteError, RoundFailed, StaleRound
from collectives.net.transport import Transport, as_async_iter
from collectives.net.wire import encode_chunk
from collectives.reduce.aggregators import Aggregator, AggregatorConfig, combine_shares
from collectives.reduce.inbox import GATHER, SCATTER, Group, RoundInbox, codec_proto
from collectives.reduce.parts import chunk_bounds
from collectives.stats import RoundStats
from protos import collective_pb2 as pb

log = logging.getLogger(__name__)

SERVICE = "loconet.collective.v1.Collective"
PUSH_METHOD = f"/{SERVICE}/PushPart"
ABORT_METHOD = f"/{SERVICE}/Abort"
STAT_METHOD = f"/{SERVICE}/PushStat"
# Trailing-metadata key that tells a sender why its stream was rejected.
ERROR_KIND_KEY = "loconet-error"
# Deadline of the best-effort abort notices.
ABORT_NOTICE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class AllReduceConfig:
    """How a round encodes, aggregates and waits. Every member of a round must use the same codec and aggregator."""

    codec: CodecConfig = field(default_factory=CodecConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    # Whole-round deadline: a member that has not finished by then raises MemberFailure.
    timeout_s: float = 60.0
    # At the deadline, a member stuck in the gather phase waits this much longer for
    # another member's abort notice naming the root cause before blaming the part owners.
    blame_grace_s: float = 1.0


class GroupUnfit(RoundFailed):
    """The round's aggregator cannot run with this many members (e.g. Bulyan below 4f+3); the message says why."""


def round_tag(group: Group, numel: int, aggregator: AggregatorConfig) -> pb.RoundTag:
    """The tag this member puts on every message of a round."""
    return pb.RoundTag(
        run_id=group.run_id,
        epoch=group.epoch,
        round_id=group.round_id,
        sender_rank=group.rank,
        group_size=group.size,
        total_numel=numel,
        aggregator=str(aggregator),
    )


def chunk_message(
    group: Group,
    numel: int,
    aggregator: AggregatorConfig,
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
        tag=round_tag(group, numel, aggregator),
        phase=phase,
        part_index=part,
        part_numel=part_numel,
        offset=offset,
        count=count,
        codec=codec_proto(codec),
        weight=weight,
    )
    return encode_chunk(header, payload)


def _rejection_kind(exc: grpc.aio.AioRpcError) -> str | None:
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_KIND_KEY:
            return str(value)
    return None


class Round:
    """The sending side and the bookkeeping of one member's round (lives on the transport's loop)."""

    def __init__(
        self,
        transport: Transport,
        spawn: Callable[[Coroutine], None],
        phase_hook: Callable[[Group, str], None] | None,
        group: Group,
        inbox: RoundInbox,
        codec: Codec,
        aggregator: Aggregator,
        config: AllReduceConfig,
        stats: RoundStats,
        deadline: float,
    ) -> None:
        self.transport = transport
        self.spawn = spawn
        self.phase_hook = phase_hook
        self.group = group
        self.inbox = inbox
        self.codec = codec
        self.aggregator = aggregator
        self.config = config
        self.stats = stats
        self.deadline = deadline
        self.others = [j for j in range(group.size) if j != group.rank]
        self.pending: Counter[int] = Counter()
        self.tasks: list[asyncio.Task] = []
        self.chunk_numel = codec.chunk_numel(self.transport.config.chunk_bytes)
        self.started = time.monotonic()
        # This member's reduced chunks, in order, shared by every destination's gather stream.
        self._gathered: list[bytes] = []
        self._gather_ready = asyncio.Event()
        self._gather_done = False
        # The aggregator's decisions, one per statistic round (what Krum selected, clipping scales...).
        self.decisions: list[dict] = []
        self._own_copied = False
        self._own_residual: torch.Tensor | None = None
        self._kernels = native_kernels()  # None: torch copies and checks the own part
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
        try:
            self.aggregator.check_group(self.group.size)
            stat_rounds = self.aggregator.stat_rounds(self.group.size)
        except ConfigError as exc:  # every member finds the same before sending anything: nobody can reduce
            raise GroupUnfit(f"round {self.group.round_id}: {exc}") from None
        self._enter("scatter")
        me = self.group.rank
        a, b = self.inbox.bounds[me]
        # The own part is copied into its row chunk by chunk at reduce time (_reduce_chunk), so
        # the first bytes leave without waiting for it. Nothing checks the whole input up front:
        # every encode refuses NaN/Inf in what it sends, _reduce_chunk in the own part.
        self.inbox.weights[me] = weight
        if residual is not None and not self.codec.NEEDS_FEEDBACK:
            residual[a:b].zero_()  # this member's own part is contributed exactly
        self._own_residual = None if residual is None else residual[a:b]
        for j in self.others:
            self._send(j, self._scatter_messages(j, flat, weight, residual))
        for j in self.others:
            self._send(j, self._gather_messages())
        if stat_rounds:
            await self._statistics(stat_rounds, flat[a:b])
        own = self.inbox.result[a:b]
        reduce = None
        for c0, c1 in chunk_bounds(0, b - a, self.chunk_numel):
            await self._wait("scatter", lambda: self.inbox.contributions_ready() >= c1, self._late_contributors)
            if c1 == b - a:
                self._enter("gather")
            if reduce is None:  # every contribution's weight is known from its first chunk
                # Kept payloads are summed with the aggregator's coefficients (_reduce_kept), rows by its Reduce.
                prepare = self.aggregator.prepare if self.inbox.quantized is None else self.aggregator.coefficients
                reduce = prepare(self.inbox.weights, self.decisions)
            message = await self.transport.run_cpu(self._reduce_chunk, reduce, flat[a + c0:a + c1], own, b - a, c0, c1)
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

    async def _statistics(self, stat_rounds: int, mine: torch.Tensor) -> None:
        """Exchange the owners' shares of the aggregator's statistics and derive its decisions (the same on every
        member)."""
        a, b = self.inbox.bounds[self.group.rank]
        await self._wait("scatter", lambda: self.inbox.contributions_ready() >= b - a, self._late_contributors)
        await self.transport.run_cpu(self._copy_own, mine, 0, b - a)
        self._own_copied = True
        weights = list(self.inbox.weights)
        for r in range(stat_rounds):
            share = await self.transport.run_cpu(self.aggregator.share, r, self.inbox.rows, weights, self.decisions)
            self.inbox.put_share(r, self.group.rank, share)
            message = self._stat_message(r, share)
            for j in self.others:
                self._send_stat(j, message)
            await self._wait("statistics", lambda: self.inbox.shares_complete(r), lambda: self.inbox.missing_shares(r))
            total = combine_shares(self.inbox.shares_of(r))
            self.decisions.append(self.aggregator.decide(r, total, weights, self.decisions))

    def _stat_message(self, r: int, share: torch.Tensor) -> bytes:
        values = share.to(torch.float64).contiguous().numpy().astype("<f8", copy=False).tobytes()
        tag = round_tag(self.group, self.inbox.numel, self.config.aggregator)
        return pb.StatShare(tag=tag, stat_round=r, values=values).SerializeToString()

    def _copy_own(self, mine: torch.Tensor, c0: int, c1: int) -> None:
        # This member's own contribution goes into its row exactly (it never crosses the wire), except with a
        # sparse codec (NEEDS_FEEDBACK): coded like the others' (with its residual), or the reduced part is dense.
        row = self.inbox.rows[self.group.rank, c0:c1]
        try:
            if self.codec.NEEDS_FEEDBACK:
                res = None if self._own_residual is None else self._own_residual[c0:c1]
                payload = self.codec.encode_with_feedback(mine, res)
                self.codec.decode(payload, c1 - c0, out=row)
            elif (self._kernels is not None and mine.dtype == torch.float32 and mine.is_contiguous()
                  and self._kernels.copy_finite(mine, row)):
                return  # copied, and every value is finite
            else:
                row.copy_(mine)
            check_finite(row, "values to reduce")
        except NonFiniteError as exc:
            raise self._nonfinite(exc) from None

    def _reduce_chunk(self, reduce, mine: torch.Tensor, own: torch.Tensor, part_numel: int, c0: int, c1: int) -> bytes:
        # Runs on a codec thread: add this member's own contribution (mine), reduce, encode,
        # keep the decoded value, frame the message.
        t0 = time.perf_counter()
        if isinstance(reduce, torch.Tensor):  # a linear aggregator's coefficients, over kept payloads
            reduced = self._reduce_kept(reduce, mine, c0, c1)
        else:
            if not self._own_copied:
                self._copy_own(mine, c0, c1)
            reduced = reduce(self.inbox.rows[:, c0:c1])
        t1 = time.perf_counter()
        try:
            if not self.others:
                # A round of one: no member receives its gather, so the result stays exact (int8 gave it its error
                # for nothing). The codec's refusal of non-finite values still holds.
                check_finite(reduced, "the reduced values")
                own[c0:c1].copy_(reduced)
                self.stats.reduce_s += t1 - t0
                return b""
            payload = self.codec.encode_reduced(reduced, copy=False)  # a sparse codec keeps every reduced entry
        except NonFiniteError as exc:  # every input was finite: the reduction overflowed
            raise RoundFailed(
                f"the reduced values of part {self.group.rank} overflow to Inf ({exc}); scale the tensors down"
            ) from None
        t2 = time.perf_counter()
        # The owner keeps the decoded value, exactly what every other member will hold.
        self.codec.decode(payload, c1 - c0, out=own[c0:c1])
        message = self._message(GATHER, self.group.rank, part_numel, c0, c1 - c0, 0.0, payload)
        self.stats.reduce_s += t1 - t0
        self.stats.encode_s += t2 - t1
        return message

    def _reduce_kept(self, coef: torch.Tensor, mine: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
        # One pass over the own values and the others' int8 or int4 payloads as received (kernels.c), with the bits of
        # decoding them into rows and summing those: no rows written and read back.
        if not (mine.dtype == torch.float32 and mine.device.type == "cpu" and mine.is_contiguous()):
            self._copy_own(mine, c0, c1)  # an input elsewhere (a GPU) is copied into its row as before
            mine = self.inbox.rows[self.group.rank, c0:c1]
        sources = self.inbox.chunk_sources(c0, c1, mine)
        reduced = torch.empty(c1 - c0, dtype=torch.float32)
        if not self._kernels.reduce_quantized(sources, coef, reduced):
            try:  # only the own values can be non-finite (decoded ones are finite by their checked scales)
                check_finite(mine, "values to reduce")
            except NonFiniteError as exc:
                raise self._nonfinite(exc) from None
            raise RoundFailed(f"round {self.group.round_id}: a decoded contribution was not finite")
        return reduced

    def _nonfinite(self, exc: NonFiniteError) -> NonFiniteError:
        return NonFiniteError(
            f"rank {self.group.rank}'s input to round {self.group.round_id} is not finite, so the round was "
            f"aborted and no member returns a result: {exc}"
        )

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
        if self.phase_hook is not None:
            self.phase_hook(self.group, phase)

    async def _wait(self, phase: str, done, missing) -> None:
        ok = await self.inbox.wait_for(done, self.deadline)
        if not ok and phase in ("gather", "statistics") and self.config.blame_grace_s > 0:
            # The owners we wait for may themselves wait for the real culprit; give
            # their abort notice a moment to arrive before blaming them.
            await self.inbox.wait_for(done, time.monotonic() + self.config.blame_grace_s)
            ok = self.inbox.broken or done()
        if not ok:
            # Until this member has reduced its whole part, its gather stream to each j is open by its own
            # doing (it waits for contributions, maybe from the real culprit): not j's. Only sends j left
            # unaccepted count against j.
            ours = 0 if self._gather_done else 1
            late = set(missing()) | {j for j, n in self.pending.items() if n > ours}
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
        payload = self.codec.encode_with_feedback(x, residual, copy=False)
        self.stats.encode_s += time.perf_counter() - t0
        return self._message(SCATTER, j, part_numel, offset, x.numel(), weight, payload)

    def _message(
        self, phase: int, part: int, part_numel: int, offset: int, count: int, weight: float, payload: bytes
    ) -> bytes:
        return chunk_message(
            self.group, self.inbox.numel, self.config.aggregator, self.codec.config,
            phase, part, part_numel, offset, count, weight, payload,
        )

    async def _scatter_messages(
        self, j: int, flat: torch.Tensor, weight: float, residual: torch.Tensor | None
    ) -> AsyncIterator[bytes]:
        # Chunk k+1 is encoded on a codec thread while chunk k is on the wire, so the
        # link never waits for the encoder (and the encoder only runs one chunk ahead).
        a, b = self.inbox.bounds[j]
        calls = (
            (
                self._scatter_message,
                (j, b - a, c0 - a, flat[c0:c1], weight, None if residual is None else residual[c0:c1]),
            )
            for c0, c1 in chunk_bounds(a, b, self.chunk_numel)
        )
        async for message in self.transport.run_cpu_ahead(calls):
            yield message

    def _send(self, j: int, messages: Iterator[bytes] | AsyncIterator[bytes]) -> None:
        self.pending[j] += 1
        self.tasks.append(asyncio.get_running_loop().create_task(self._send_to(j, messages)))

    def _send_stat(self, j: int, message: bytes) -> None:
        self.pending[j] += 1
        self.stats.bytes_sent += len(message)
        self.tasks.append(asyncio.get_running_loop().create_task(self._send_to(j, None, message)))

    async def _send_to(
        self, j: int, messages: Iterator[bytes] | AsyncIterator[bytes] | None, unary: bytes = b""
    ) -> None:
        address = self.group.members[j]
        try:
            if messages is None:
                await self.transport.unary_call(address, STAT_METHOD, unary, self.deadline - time.monotonic())
            else:
                await self.transport.stream_call(
                    address, PUSH_METHOD, self._count(messages), self.deadline - time.monotonic()
                )
        except grpc.aio.AioRpcError as exc:
            kind = _rejection_kind(exc)
            if kind == "stale":
                self.inbox.set_error(StaleRound(f"rank {j} ({address}) says this round is stale: {exc.details()}"))
            elif kind != "closed":
                self.inbox.fail(j, f"{exc.code().name}: {exc.details()}")
            # "closed": j gave up on the round; its abort notice says why (or the deadline does).
            return
        except NonFiniteError as exc:  # this member's input: the round cannot succeed
            self.inbox.set_error(self._nonfinite(exc))
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
        """Tell every other member that this round is aborted and whom it blames (best effort).

        The blamed members are told too: one that is alive but sent bad data would otherwise
        wait for the deadline (its streams to this member may already be refused as closed).
        """
        g = self.group
        notice = pb.AbortNotice(
            tag=round_tag(g, self.inbox.numel, self.config.aggregator),
            failed_ranks=sorted(failed),
            reason=reason[:1000],
        ).SerializeToString()
        for j in self.others:
            self.spawn(self._notify(g.members[j], notice))

    async def _notify(self, address: str, notice: bytes) -> None:
        try:
            await self.transport.unary_call(address, ABORT_METHOD, notice, ABORT_NOTICE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            log.debug("abort notice to %s not delivered: %s", address, exc.code().name)

    async def stop(self) -> None:
        """Cancel this round's sends and watchers and wait until they are gone."""
        await cancel_and_wait(self.tasks)
        # Ended: a cancelled send keeps its CancelledError, whose traceback holds the stream's gRPC call, and so
        # its channel, which Transport.close() then could not end while its loop ran.
        self.tasks.clear()
