"""The receiving side of a round: what a member expects, what it has, and who failed.

A ``RoundInbox`` is opened by the member's own all-reduce when the round
starts. It knows exactly which chunks may arrive (phase, sender, part, element
range, codec, payload size), so every incoming chunk is checked against it
before its payload is decoded into place; nothing unexpected is buffered.

The ``RoundRegistry`` maps (round id, epoch) to open inboxes, rejects messages
of foreign runs, stale epochs and finished rounds at once, and lets a handler
wait a short, bounded time for a round this member has not opened yet (a fast
peer may start a round before a slow one); past that it refuses with
``RoundNotOpen`` and the sender retries, so a round that never opens here
cannot hold a caller for the round's whole deadline.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from collectives.codecs import Codec, CodecConfig, QuantizedChunk
from collectives.codecs.kernels import native_kernels
from collectives.errors import CodecError, InternalError, LoconetError, ProtocolError, RoundFailed
from collectives.reduce.aggregators import Aggregator, AggregatorConfig, make_aggregator
from collectives.reduce.parts import part_bounds
from protos import collective_pb2 as pb

SCATTER = pb.PHASE_SCATTER
GATHER = pb.PHASE_GATHER
PHASE_NAMES = {SCATTER: "scatter", GATHER: "gather"}

# How many finished rounds a member remembers to reject their late messages at once.
CLOSED_MEMORY = 1024
# How many abort notices for not-yet-opened rounds a member keeps.
EARLY_ABORT_MEMORY = 64


class ForeignRun(ProtocolError):
    """A message names a run this peer is not part of."""


class StaleMessage(ProtocolError):
    """A message belongs to an older epoch of a round, or to a round already finished."""


class RoundClosed(StaleMessage):
    """A message arrived for a round this member has already finished or given up on."""


class RoundNotOpen(ProtocolError):
    """A message arrived for a round this member has not opened (yet); the sender may retry it shortly."""


class DuplicateStream(ProtocolError):
    """A sender sent the same part of the same phase twice."""


@dataclass(frozen=True)
class Group:
    """One round's membership as every member sees it: same run, epoch, round id and ordered members."""

    run_id: str
    epoch: int
    round_id: int
    # Addresses in rank order; member i owns part i.
    members: tuple[str, ...]
    # This member's rank.
    rank: int

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("a group needs at least one member")
        if not 0 <= self.rank < len(self.members):
            raise ValueError(f"rank {self.rank} out of range for {len(self.members)} members")
        if len(set(self.members)) != len(self.members):
            raise ValueError(f"duplicate addresses in group {self.members}")
        if self.epoch < 0 or self.round_id < 0:
            raise ValueError("epoch and round id must be >= 0")

    @property
    def size(self) -> int:
        """Number of members."""
        return len(self.members)

    @property
    def key(self) -> tuple[int, int]:
        """(round id, epoch): what identifies this round within its run."""
        return (self.round_id, self.epoch)


def codec_proto(config: CodecConfig) -> pb.CodecSpec:
    """The wire form of a codec configuration."""
    return pb.CodecSpec(name=config.name, block_size=config.block_size, zstd_level=config.zstd_level)


@dataclass
class _Stream:
    """One incoming stream: one phase of one part from one sender, in order."""

    phase: int
    sender: int
    target: torch.Tensor  # where decoded elements go (a view)
    next_offset: int = 0  # elements decoded so far
    checked_offset: int = 0  # elements accepted by check_chunk (a decode may still be running)

    @property
    def covered(self) -> bool:
        """Whether the chunks accepted so far cover the whole part."""
        return self.checked_offset == self.target.numel()


@dataclass
class RoundInbox:
    """Receive-side state of one round at one member."""

    group: Group
    numel: int
    codec: Codec
    # Flat fp32 buffer of group.size * (this member's part length) elements, contents undefined;
    # it holds the scatter contributions to this member's part, one row per rank.
    rows_buffer: torch.Tensor
    # The round's full result (numel elements), filled part by part in the gather phase.
    result: torch.Tensor
    aggregator_config: AggregatorConfig = field(default_factory=AggregatorConfig)
    bounds: list[tuple[int, int]] = field(init=False)
    rows: torch.Tensor = field(init=False)
    weights: list[float | None] = field(init=False)
    scatter_left: set[int] = field(init=False)
    gather_left: set[int] = field(init=False)
    # Elements of this member's part received so far from each other member, in order
    # (-1 until its first chunk, which also carries the contribution's weight, arrives).
    scatter_progress: dict[int, int] = field(init=False)
    failed: dict[int, str] = field(default_factory=dict)
    # Set when the failure was learned from another member's abort notice.
    failure_reported_by: int | None = None
    # A failure that blames no member (this member is stale, bad weights...).
    error: LoconetError | None = None
    closed: bool = False
    bytes_received: int = 0
    decode_s: float = 0.0
    # When each sender's part of each phase finished arriving (monotonic seconds), by (phase, sender): whom the
    # round waited for (last_sender).
    done_at: dict[tuple[int, int], float] = field(default_factory=dict)
    # Statistic round -> rank -> that owner's float64 share (aggregators with whole-vector statistics).
    shares: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)
    aggregator: Aggregator = field(init=False)
    # Scatter chunks kept as received, by sender and offset, where the owner reduces straight from quantised
    # payloads (a codec that allows it and a linear aggregator: round.py); None: each is decoded into its row.
    # Written by codec threads (one sender's chunks one at a time), taken by the reduce (chunk_sources).
    quantized: dict[int, dict[int, QuantizedChunk]] | None = field(init=False, default=None)
    _started: set[tuple[int, int]] = field(default_factory=set)
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    _inflight: int = 0
    _drained: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        n = self.group.size
        self.bounds = part_bounds(self.numel, n)
        a, b = self.bounds[self.group.rank]
        self.rows = self.rows_buffer.view(n, b - a)
        if self.result.numel() != self.numel:
            raise ValueError(f"result buffer has {self.result.numel()} elements, the round reduces {self.numel}")
        self.weights = [None] * n
        others = set(range(n)) - {self.group.rank}
        self.scatter_left = set(others)
        self.gather_left = set(others)
        self.scatter_progress = {j: -1 for j in others}
        self._codec_wire = codec_proto(self.codec.config)
        self._aggregator_wire = str(self.aggregator_config)
        self.aggregator = make_aggregator(self.aggregator_config)
        if self.codec.reduces_quantized and self.aggregator.linear:
            self.quantized = {j: {} for j in others}

    def contributions_ready(self) -> int:
        """How many leading elements of this member's part every member has contributed (-1: not started)."""
        if not self.scatter_progress:
            return self.rows.shape[1]
        return min(self.scatter_progress.values())

    @staticmethod
    def rows_numel(group: Group, numel: int) -> int:
        """Size of the rows buffer a member needs for a round."""
        a, b = part_bounds(numel, group.size)[group.rank]
        return group.size * (b - a)

    # -- progress and failure --------------------------------------------------

    def wake(self) -> None:
        """Wake the round's coroutine to re-check its condition."""
        self._wakeup.set()

    def fail(self, rank: int, reason: str, reported_by: int | None = None) -> None:
        """Record that a member failed (first reason wins) and wake the round."""
        if self.closed:
            return
        self.failed.setdefault(rank, reason)
        if reported_by is not None and self.failure_reported_by is None:
            self.failure_reported_by = reported_by
        self.wake()

    def set_error(self, error: LoconetError) -> None:
        """Record a failure that blames no member (first one wins) and wake the round."""
        if self.closed:
            return
        if self.error is None:
            self.error = error
        self.wake()

    @property
    def broken(self) -> bool:
        """Whether the round has failed in any way."""
        return bool(self.failed) or self.error is not None

    async def wait_for(self, done: Callable[[], bool], deadline: float) -> bool:
        """Wait until done() or a failure; False if the monotonic deadline passed first."""
        while not self.broken and not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return self.broken or done()
        return True

    # -- incoming chunks ---------------------------------------------------------

    def claimed_member(self, tag: pb.RoundTag) -> int | None:
        """The rank a message's tag claims to come from, if that is another member of this round (to blame it)."""
        rank = tag.sender_rank
        return rank if rank < self.group.size and rank != self.group.rank else None

    def check_tag(self, tag: pb.RoundTag) -> None:
        """Raise ProtocolError unless the tag matches this round's shape."""
        g = self.group
        if tag.group_size != g.size:
            raise ProtocolError(f"sender counts {tag.group_size} members, this round has {g.size}")
        if tag.total_numel != self.numel:
            raise ProtocolError(f"sender reduces {tag.total_numel} elements, this round reduces {self.numel}")
        if tag.sender_rank >= g.size or tag.sender_rank == g.rank:
            raise ProtocolError(f"sender rank {tag.sender_rank} is not another member of a {g.size}-member round")
        if tag.aggregator != self._aggregator_wire:
            raise ProtocolError(
                f"sender aggregates with {tag.aggregator[:200]!r}, this round with {self._aggregator_wire!r}: "
                "every member of a run must use the same aggregator"
            )

    def begin_stream(self, header: pb.PartChunk) -> _Stream:
        """Validate the first chunk of a stream and claim its (phase, sender) slot."""
        if self.closed:
            raise RoundClosed(f"round {self.group.round_id} is already finished here")
        self.check_tag(header.tag)
        sender = header.tag.sender_rank
        phase = header.phase
        if header.codec != self._codec_wire:
            raise ProtocolError(f"codec {_spec(header.codec)} differs from the round's {_spec(self._codec_wire)}")
        if phase == SCATTER:
            part = self.group.rank
            target = self.rows[sender]
            if not math.isfinite(header.weight):
                raise ProtocolError(f"contribution weight {header.weight} is not finite")
        elif phase == GATHER:
            part = sender
            a, b = self.bounds[part]
            target = self.result[a:b]
        else:
            raise ProtocolError(f"unknown phase {phase}")
        if header.part_index != part:
            raise ProtocolError(f"{PHASE_NAMES[phase]} chunk for part {header.part_index}, expected part {part}")
        if header.part_numel != target.numel():
            raise ProtocolError(f"part {part} has {target.numel()} elements, the chunk says {header.part_numel}")
        if (phase, sender) in self._started:
            raise DuplicateStream(f"rank {sender} already sent its {PHASE_NAMES[phase]} part")
        self._started.add((phase, sender))
        if phase == SCATTER:
            self.weights[sender] = header.weight
        return _Stream(phase=phase, sender=sender, target=target)

    def check_chunk(self, stream: _Stream, header: pb.PartChunk, payload: memoryview) -> torch.Tensor:
        """Validate one chunk of an open stream; return the view its elements decode into."""
        if self.closed:
            raise RoundClosed(f"round {self.group.round_id} is already finished here")
        if header.tag.sender_rank != stream.sender or header.phase != stream.phase:
            raise ProtocolError("a stream's chunks must keep one sender and one phase")
        if stream.phase == SCATTER and header.weight != self.weights[stream.sender]:
            raise ProtocolError("a contribution's weight changed between chunks")
        if header.offset != stream.checked_offset:
            raise ProtocolError(f"chunk at offset {header.offset}, expected {stream.checked_offset}")
        end = header.offset + header.count
        if end > stream.target.numel():
            raise ProtocolError(f"chunk [{header.offset}, {end}) runs past the part's {stream.target.numel()} elements")
        if len(payload) > self.codec.max_payload_size(header.count):
            raise ProtocolError(f"payload of {len(payload)} bytes is too big for {header.count} elements")
        stream.checked_offset = end
        return stream.target[header.offset : end]

    def decode_into(self, payload: memoryview, out: torch.Tensor) -> float:
        """Decode a checked payload into its view (any thread); return the seconds it took."""
        t0 = time.perf_counter()
        try:
            self.codec.decode(payload, out.numel(), out=out)
        except CodecError as exc:
            raise ProtocolError(f"undecodable payload: {exc}") from exc
        return time.perf_counter() - t0

    def receive(self, stream: _Stream, offset: int, payload: memoryview, out: torch.Tensor) -> float:
        """Take a checked chunk (any thread): decode it into its view or, a scatter chunk where the owner reduces
        from payloads, keep it quantised; return the seconds it took."""
        # An empty part (a round of fewer elements than members) has nothing to keep quantised: decoded, as nothing.
        if stream.phase != SCATTER or self.quantized is None or out.numel() == 0:
            return self.decode_into(payload, out)
        t0 = time.perf_counter()
        try:
            chunk = self.codec.keep_quantized(payload, out.numel())
        except CodecError as exc:
            raise ProtocolError(f"undecodable payload: {exc}") from exc
        self.quantized[stream.sender][offset] = chunk
        return time.perf_counter() - t0

    def chunk_sources(self, c0: int, c1: int, own: torch.Tensor) -> list[torch.Tensor | QuantizedChunk]:
        """Every member's contribution to elements [c0, c1) of this member's part, in rank order, taken out of
        the inbox (call once, when every contribution reaches c1): ``own`` for this member; another's kept
        chunk where it covers exactly [c0, c1), else its row, into which its kept chunks starting before c1
        are decoded first (a sender that cuts its chunks elsewhere, with another chunk size)."""
        assert self.quantized is not None, "chunk_sources needs an inbox that keeps quantised chunks"
        sources: list[torch.Tensor | QuantizedChunk] = []
        for j in range(self.group.size):
            if j == self.group.rank:
                sources.append(own)
                continue
            kept = self.quantized[j]
            chunk = kept.get(c0)
            if chunk is not None and chunk.numel == c1 - c0:
                sources.append(kept.pop(c0))
                continue
            # sorted() copies the keys at once (the GIL held): codec threads may add later chunks meanwhile.
            for offset in sorted(kept):
                if offset < c1:
                    piece = kept.pop(offset)
                    self._dequantize(piece, self.rows[j, offset:offset + piece.numel])
            sources.append(self.rows[j, c0:c1])
        return sources

    @staticmethod
    def _dequantize(chunk: QuantizedChunk, out: torch.Tensor) -> None:
        # The fused reduction of one source with coefficient 1 stores exactly its dequantised values.
        kernels = native_kernels()
        assert kernels is not None  # a codec reduces_quantized only with them
        kernels.reduce_quantized([chunk], torch.ones(1), out)

    def advance(self, stream: _Stream, count: int) -> None:
        """Record that a stream's next count elements are decoded."""
        stream.next_offset += count
        if stream.next_offset == stream.target.numel():
            self.done_at[(stream.phase, stream.sender)] = time.monotonic()
        if stream.phase == SCATTER:
            self.scatter_progress[stream.sender] = stream.next_offset
            self.wake()  # the owner reduces chunks as soon as every contribution to them is in

    def last_sender(self) -> tuple[int, float]:
        """(the rank whose part of a phase arrived last, how long after every other sender's), from the phase where
        that gap is widest; (-1, 0.0) with fewer than two senders: the member the round waited for, as this member
        saw it. Per phase: a slow uplink delays its sender's scatter parts only (every owner's gather part then
        waits for them alike), a slow downlink its owner's gather part only."""
        best = (-1, 0.0)
        for phase in {p for p, _ in self.done_at}:
            times = sorted(((t, s) for (p, s), t in self.done_at.items() if p == phase), reverse=True)
            if len(times) >= 2 and times[0][0] - times[1][0] > best[1]:
                best = (times[0][1], times[0][0] - times[1][0])
        return best

    # -- statistic shares -------------------------------------------------------------

    def put_share(self, r: int, rank: int, share: torch.Tensor) -> None:
        """Record an owner's share of statistic round r and wake the round."""
        self.shares.setdefault(r, {})[rank] = share
        self.wake()

    def accept_share(self, message: pb.StatShare) -> None:
        """Validate another owner's share (round, size, finite values, no duplicate) and record it."""
        if self.closed:
            raise RoundClosed(f"round {self.group.round_id} is already finished here")
        self.check_tag(message.tag)
        n, r, sender = self.group.size, message.stat_round, message.tag.sender_rank
        rounds = self.aggregator.stat_rounds(n)
        if r >= rounds:
            raise ProtocolError(f"statistic round {r} of an aggregator with {rounds} statistic round(s)")
        expected = self.aggregator.share_numel(n, r) * 8
        if len(message.values) != expected:
            raise ProtocolError(f"a share of {len(message.values)} bytes, statistic round {r} needs {expected}")
        if sender in self.shares.get(r, {}):
            raise DuplicateStream(f"rank {sender} already sent its share of statistic round {r}")
        share = torch.from_numpy(np.frombuffer(message.values, dtype="<f8").copy())
        if not bool(torch.isfinite(share).all()):
            raise ProtocolError(f"rank {sender}'s share of statistic round {r} holds NaN or Inf")
        self.put_share(r, sender, share)

    def shares_complete(self, r: int) -> bool:
        """Whether every owner's share of statistic round r is in."""
        return len(self.shares.get(r, {})) == self.group.size

    def missing_shares(self, r: int) -> set[int]:
        """Ranks whose share of statistic round r has not arrived."""
        return set(range(self.group.size)) - set(self.shares.get(r, {}))

    def shares_of(self, r: int) -> list[torch.Tensor]:
        """The shares of statistic round r in rank order (call once complete)."""
        got = self.shares[r]
        return [got[j] for j in range(self.group.size)]

    def begin_decode(self) -> None:
        """Count a decode running on another thread: the round's buffers stay in use until it ends."""
        self._inflight += 1

    def end_decode(self) -> None:
        """A decode started with begin_decode has ended."""
        self._inflight -= 1
        if self._inflight == 0:
            self._drained.set()

    async def drained(self) -> None:
        """Wait until no decode writes into this round's buffers."""
        while self._inflight:
            self._drained.clear()
            await self._drained.wait()

    def finish(self, stream: _Stream) -> None:
        """Close a stream; it must have covered its whole part."""
        if stream.next_offset != stream.target.numel():
            raise ProtocolError(
                f"stream ended at element {stream.next_offset} of {stream.target.numel()}; the part is incomplete"
            )
        (self.scatter_left if stream.phase == SCATTER else self.gather_left).discard(stream.sender)
        self.wake()


class RoundRegistry:
    """The open rounds of one member of one run, and the memory of finished ones."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._open: dict[tuple[int, int], RoundInbox] = {}
        # round id -> highest epoch opened, for rejecting older epochs of a retried round.
        self._epochs: OrderedDict[int, int] = OrderedDict()
        self._closed: OrderedDict[tuple[int, int], None] = OrderedDict()
        # Abort notices for rounds not open yet: failed ranks, reason, reporter's rank and its verified address.
        self._early_aborts: OrderedDict[tuple[int, int], tuple[list[int], str, int, str | None]] = OrderedDict()
        # Set (and replaced) whenever a round opens. An Event, not a Condition: a handler cancelled twice while
        # waiting (gRPC cancels, then wait_for's timeout) must not leave a lock to release that it no longer holds.
        self._opened = asyncio.Event()

    def _check(self, tag: pb.RoundTag) -> None:
        if tag.run_id != self.run_id:
            raise ForeignRun(f"message for run {tag.run_id[:100]!r}; this peer is in run {self.run_id!r}")
        key = (tag.round_id, tag.epoch)
        if key in self._closed:
            raise RoundClosed(f"round {tag.round_id} epoch {tag.epoch} is already finished here")
        newest = self._epochs.get(tag.round_id)
        if newest is not None and tag.epoch < newest:
            raise StaleMessage(f"round {tag.round_id} epoch {tag.epoch} is stale: this member is at epoch {newest}")

    async def open(self, inbox: RoundInbox) -> None:
        """Register a round this member starts; wakes handlers waiting for it."""
        key = inbox.group.key
        self._check(_tag_of(inbox.group))
        if key in self._open:
            # One all-reduce runs a (round, epoch) and opens it once: a second open is a bug here (or in the
            # coordinator that planned the round), not something the caller can fix.
            raise InternalError(f"round {key} is already open at this member")
        self._open[key] = inbox
        self._epochs[inbox.group.round_id] = inbox.group.epoch
        self._epochs.move_to_end(inbox.group.round_id)
        while len(self._epochs) > CLOSED_MEMORY:
            self._epochs.popitem(last=False)
        early = self._early_aborts.pop(key, None)
        if early is not None and not sent_by_another(inbox.group, early[2], early[3]):
            ranks, reason, reporter, _ = early
            for r in ranks:
                if r < inbox.group.size:
                    inbox.fail(r, reason, reported_by=reporter)
            if not ranks:
                inbox.set_error(RoundFailed(f"round {key[0]} aborted: {reason}"))
        opened, self._opened = self._opened, asyncio.Event()
        opened.set()

    def open_inbox(self, round_id: int, epoch: int) -> RoundInbox | None:
        """The inbox of an open round (None if it is not open here). Used by tests to look into a round in
        progress; the all-reduce that runs a round holds its inbox itself."""
        return self._open.get((round_id, epoch))

    def close(self, inbox: RoundInbox) -> None:
        """Forget an open round; later messages for it are rejected as stale."""
        inbox.closed = True
        key = inbox.group.key
        self._open.pop(key, None)
        self._closed[key] = None
        while len(self._closed) > CLOSED_MEMORY:
            self._closed.popitem(last=False)

    async def find(self, tag: pb.RoundTag, timeout_s: float) -> RoundInbox:
        """The open inbox for tag, waiting up to timeout_s for this member to open it (then RoundNotOpen)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        key = (tag.round_id, tag.epoch)
        while True:
            self._check(tag)
            inbox = self._open.get(key)
            if inbox is not None:
                return inbox
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RoundNotOpen(
                    f"round {tag.round_id} epoch {tag.epoch} is not open at this member yet "
                    f"(waited {max(0.0, timeout_s):g} s); retry within the round's deadline"
                )
            try:
                async with asyncio.timeout(remaining):
                    await self._opened.wait()
            except TimeoutError:
                pass

    def abort_notice(self, notice: pb.AbortNotice, sender: str | None = None) -> None:
        """Apply another member's abort notice to its round (or keep it until the round opens).

        sender: with a run secret, the verified data-plane address of the caller; a notice whose rank is not that
        address's in the round is refused (or, kept early, dropped when the round opens)."""
        tag = notice.tag
        self._check(tag)
        key = (tag.round_id, tag.epoch)
        reason = f"reported by rank {tag.sender_rank}: {notice.reason[:500]}"
        inbox = self._open.get(key)
        if inbox is None:
            self._early_aborts[key] = (list(notice.failed_ranks), reason, tag.sender_rank, sender)
            while len(self._early_aborts) > EARLY_ABORT_MEMORY:
                self._early_aborts.popitem(last=False)
            return
        n = inbox.group.size
        if tag.group_size != n or tag.sender_rank >= n or any(r >= n for r in notice.failed_ranks):
            raise ProtocolError(f"abort notice names ranks outside a {n}-member round")
        if sent_by_another(inbox.group, tag.sender_rank, sender):
            raise ProtocolError(f"abort notice claims rank {tag.sender_rank}, which is not its sender {sender[:200]}")
        for r in notice.failed_ranks:
            inbox.fail(r, reason, reported_by=tag.sender_rank)
        if not notice.failed_ranks:
            inbox.set_error(
                RoundFailed(f"round {tag.round_id} aborted by rank {tag.sender_rank}: {notice.reason[:500]}")
            )


def sent_by_another(group: Group, rank: int, sender: str | None) -> bool:
    """Whether a message claiming rank comes from another address than that member's (sender None: unchecked)."""
    return sender is not None and (rank >= group.size or group.members[rank] != sender)


def _tag_of(group: Group) -> pb.RoundTag:
    return pb.RoundTag(run_id=group.run_id, epoch=group.epoch, round_id=group.round_id, sender_rank=group.rank)


def _spec(codec: pb.CodecSpec) -> str:
    """A codec as its wire spec says it, every field shown (two specs may differ in their block size alone)."""
    return f"{codec.name[:40]!r} (block {codec.block_size}, zstd {codec.zstd_level})"
