"""Fuzzing a member's inbox (collectives/reduce/inbox.py): chunks, statistic shares and abort notices of any shape.

Each example opens one round at a member (any group size, rank, size,
codec and aggregator) and feeds it what hostile or buggy peers could send, as
the data plane's handlers do (``Collective._handle_push``, ``_handle_stat``,
``_handle_abort`` in collectives/allreduce.py, with or without a verified
caller address): honest streams, streams with
header fields, payloads or whole chunks mutated, streams cut short, repeated or
reordered, foreign and stale tags, shares of any size, notices naming any rank.

What must hold: every message is accepted or refused with ProtocolError (never
another exception); an honest first stream of a part is accepted and decodes
to exactly what the codec gives; a chunk decodes only into the part its stream
was accepted for, and a chunk whose decode succeeds holds no NaN or infinity
(one that fails may leave partial data, as ``Codec.decode`` documents: its
stream is refused and its sender blamed); progress never passes a part's end;
the registry's memories stay within their bounds.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch
from fuzzgen import absurd_floats, messages, mutated, texts, uint32s, uint64s
from hypothesis import strategies as st

from collectives.allreduce import Collective
from collectives.codecs import CodecConfig, make_codec
from collectives.errors import ProtocolError
from collectives.net.wire import decode_chunk, encode_chunk
from collectives.reduce.aggregators import AggregatorConfig
from collectives.reduce.inbox import (
    CLOSED_MEMORY,
    EARLY_ABORT_MEMORY,
    GATHER,
    SCATTER,
    Group,
    RoundInbox,
    RoundRegistry,
    codec_proto,
    sent_by_another,
)
from collectives.reduce.round import round_tag
from protos import collective_pb2 as pb

RUN = "run"
# Written into the round's buffers before any message: an element no chunk decoded into keeps it.
SENTINEL = -7777.0
CODECS = (
    CodecConfig("none"),
    CodecConfig("fp16"),
    CodecConfig("bf16"),
    CodecConfig("int8", block_size=4),
    CodecConfig("int4", block_size=3),
    CodecConfig("int8", block_size=64, zstd_level=3),
    CodecConfig("none", zstd_level=1),
)
AGGREGATORS = ("mean", "trimmed_mean", "krum", "centered_clip", "norm_clip")
HEADER_FIELDS = ("run_id", "epoch", "round_id", "sender_rank", "group_size", "total_numel", "aggregator",
                 "phase", "part_index", "part_numel", "offset", "count", "codec", "weight")


class Scenario:
    """One round open at one member, and what the fuzzer sent it."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data
        n = data.draw(st.integers(1, 4), label="group size")
        rank = data.draw(st.integers(0, n - 1), label="rank")
        self.numel = data.draw(st.integers(0, 40), label="numel")
        epoch, round_id = data.draw(st.integers(0, 3), label="epoch"), data.draw(st.integers(1, 3), label="round")
        self.group = Group(RUN, epoch, round_id, tuple(f"m{i}:1" for i in range(n)), rank)
        self.codec = make_codec(data.draw(st.sampled_from(CODECS), label="codec"))
        self.aggregator = AggregatorConfig.parse(data.draw(st.sampled_from(AGGREGATORS), label="aggregator"))
        rows = torch.full((RoundInbox.rows_numel(self.group, self.numel),), SENTINEL)
        self.inbox = RoundInbox(self.group, self.numel, self.codec, rows, torch.full((self.numel,), SENTINEL),
                                aggregator_config=self.aggregator)
        self.registry = RoundRegistry(RUN)
        # Streams accepted whole: (phase, sender) -> elements covered.
        self.written: dict[tuple[int, int], int] = {}
        # Elements some chunk was allowed to decode into (a decode that fails may leave anything there).
        self.touched_rows = torch.zeros(rows.numel(), dtype=torch.bool)
        self.touched_result = torch.zeros(self.numel, dtype=torch.bool)

    # -- what an honest member sends ------------------------------------------------------

    def target_range(self, phase: int, sender: int) -> tuple[int, int]:
        """Elements [a, b) of the part a stream of sender's in phase carries (scatter: this member's part)."""
        return self.inbox.bounds[self.group.rank if phase == SCATTER else sender]

    def honest_stream(
        self, phase: int, sender: int, weight: float
    ) -> tuple[list[pb.PartChunk], list[bytes], torch.Tensor]:
        """The headers and payloads of sender's stream of a phase as a correct member sends it; what they decode to."""
        a, b = self.target_range(phase, sender)
        part = self.group.rank if phase == SCATTER else sender
        length = b - a
        step = self.data.draw(st.integers(1, max(1, length)), label="chunk elements")
        seed = self.data.draw(st.integers(0, 1 << 16), label="values seed")
        values = 3 * torch.randn(length, generator=torch.Generator().manual_seed(seed))
        sender_group = Group(RUN, self.group.epoch, self.group.round_id, self.group.members, sender)
        tag = round_tag(sender_group, self.numel, self.aggregator)
        headers, payloads = [], []
        for c0 in range(0, max(length, 1), step):
            c1 = min(c0 + step, length)
            headers.append(pb.PartChunk(
                tag=tag, phase=phase, part_index=part, part_numel=length, offset=c0, count=c1 - c0,
                codec=codec_proto(self.codec.config), weight=weight if phase == SCATTER else 0.0,
            ))
            payloads.append(bytes(self.codec.encode(values[c0:c1])))
        decoded = [self.codec.decode(p, h.count) for h, p in zip(headers, payloads)]
        return headers, payloads, torch.cat(decoded) if decoded else torch.empty(0)

    def mutate_header(self, header: pb.PartChunk) -> bool:
        """Replace a few header fields by any value; True if any was replaced."""
        fields = self.data.draw(st.lists(st.sampled_from(HEADER_FIELDS), max_size=3, unique=True), label="fields")
        for name in fields:
            if name in ("run_id", "aggregator"):
                setattr(header.tag, name, self.data.draw(st.one_of(texts(), st.just(RUN)), label=name))
            elif name in ("epoch", "round_id", "total_numel"):
                setattr(header.tag, name, self.data.draw(uint64s(), label=name))
            elif name in ("sender_rank", "group_size"):
                setattr(header.tag, name, self.data.draw(uint32s(), label=name))
            elif name == "phase":
                header.phase = self.data.draw(st.sampled_from([0, SCATTER, GATHER, 3, 1 << 30]), label=name)
            elif name == "part_index":
                header.part_index = self.data.draw(uint32s(), label=name)
            elif name == "codec":
                spec = self.data.draw(st.sampled_from(CODECS), label=name)
                header.codec.CopyFrom(codec_proto(spec))
                header.codec.block_size = self.data.draw(st.one_of(st.just(spec.block_size), uint32s()), label="block")
            elif name == "weight":
                header.weight = self.data.draw(absurd_floats(), label=name)
            else:
                setattr(header, name, self.data.draw(uint64s(), label=name))
        return bool(fields)

    def stream_messages(self) -> tuple[list[bytes], tuple[int, int, torch.Tensor] | None]:
        """A PushPart stream's raw messages, and (phase, sender, decoded values) when it is exactly an honest one."""
        kind = self.data.draw(st.sampled_from(["honest", "honest", "mutated", "garbage"]), label="stream")
        if kind == "garbage":
            chunk_fields = [f.number for f in pb.PartChunk.DESCRIPTOR.fields]
            tag_fields = [f.number for f in pb.RoundTag.DESCRIPTOR.fields]
            raws = self.data.draw(st.lists(messages(chunk_fields, tag_fields), min_size=0, max_size=3), label="raw")
            return raws, None
        phase = self.data.draw(st.sampled_from([SCATTER, GATHER]), label="phase")
        n = self.group.size
        others = [j for j in range(n) if j != self.group.rank]
        sender = self.data.draw(st.sampled_from(others), label="sender") if others else 0
        weight = self.data.draw(st.floats(0.0, 1e6), label="weight")
        headers, payloads, decoded = self.honest_stream(phase, sender, weight)
        if kind == "honest" and others:
            return [encode_chunk(h, p) for h, p in zip(headers, payloads)], (phase, sender, decoded)
        changed = False
        for h in headers:
            if self.data.draw(st.booleans(), label="mutate header"):
                changed |= self.mutate_header(h)
        for i in range(len(payloads)):
            how = self.data.draw(st.sampled_from(["keep", "keep", "random", "cut", "extend", "flip"]), label="payload")
            if how == "random":
                payloads[i] = self.data.draw(st.binary(max_size=200), label="payload bytes")
            elif how == "cut":
                payloads[i] = payloads[i][: len(payloads[i]) // 2]
            elif how == "extend":
                payloads[i] += self.data.draw(st.binary(min_size=1, max_size=16), label="extra bytes")
            elif how == "flip" and payloads[i]:
                at = self.data.draw(st.integers(0, len(payloads[i]) - 1), label="flip at")
                payloads[i] = payloads[i][:at] + bytes([payloads[i][at] ^ 0xFF]) + payloads[i][at + 1 :]
            changed |= how != "keep"
        raws = [encode_chunk(h, p) for h, p in zip(headers, payloads)]
        order = self.data.draw(st.sampled_from(["keep", "drop", "repeat", "reverse", "bytes"]), label="order")
        if order == "drop" and raws:
            del raws[self.data.draw(st.integers(0, len(raws) - 1), label="drop")]
        elif order == "repeat" and raws:
            raws.append(raws[self.data.draw(st.integers(0, len(raws) - 1), label="repeat")])
        elif order == "reverse":
            raws.reverse()
        elif order == "bytes" and raws:
            i = self.data.draw(st.integers(0, len(raws) - 1), label="mutated chunk")
            raws[i] = self.data.draw(mutated(st.just(raws[i])), label="chunk bytes")
        same = not changed and (order == "keep" or (order == "reverse" and len(raws) == 1)) and others
        return raws, (phase, sender, decoded) if same else None

    def touch(self, phase: int, sender: int, target: torch.Tensor) -> None:
        """Note the elements a checked chunk decodes into, after checking they lie in the part its stream is for."""
        a, b = self.target_range(phase, sender)
        buffer, mask = (self.inbox.rows_buffer, self.touched_rows) if phase == SCATTER else (self.inbox.result,
                                                                                             self.touched_result)
        part = self.inbox.rows[sender] if phase == SCATTER else self.inbox.result[a:b]
        if not target.numel():
            return
        start = (target.data_ptr() - buffer.data_ptr()) // 4
        first = (part.data_ptr() - buffer.data_ptr()) // 4
        assert first <= start and start + target.numel() <= first + part.numel(), "a chunk decodes outside its part"
        mask[start : start + target.numel()] = True

    # -- the handlers, as allreduce.py runs them -------------------------------------------------

    def caller(self) -> str | None:
        """The data-plane address a caller's credential vouches for: None without a run secret, else any member's."""
        addresses = st.sampled_from([*self.group.members, "stranger:1"])
        return self.data.draw(st.one_of(st.none(), addresses), label="caller")

    async def push(self, raws: list[bytes], sender: str | None) -> bool:
        """Feed one PushPart stream as Collective._handle_push does; True if it was accepted."""
        inbox = stream = header = None
        try:
            for raw in raws:
                header, payload = decode_chunk(raw)
                if stream is None:
                    inbox = await self.registry.find(header.tag, 0.0)
                    if sent_by_another(inbox.group, header.tag.sender_rank, sender):
                        return False  # refused UNAUTHENTICATED; nobody is blamed
                    stream = inbox.begin_stream(header)
                target = inbox.check_chunk(stream, header, payload)
                self.touch(stream.phase, stream.sender, target)
                inbox.begin_decode()
                try:
                    inbox.decode_into(payload, target)
                finally:
                    inbox.end_decode()
                assert bool(torch.isfinite(target).all()), "a decoded chunk holds NaN or Inf"
                inbox.advance(stream, header.count)
            if stream is None:
                raise ProtocolError("empty PushPart stream")
            inbox.finish(stream)
        except ProtocolError as exc:
            Collective._blame(inbox, header, exc, "sent bad data")
            return False
        self.written[(stream.phase, stream.sender)] = stream.next_offset
        assert sender is None or self.group.members[stream.sender] == sender, "a stream was taken for another's rank"
        return True

    async def share(self) -> None:
        """Feed one statistic share as Collective._handle_stat does."""
        n = self.group.size
        sender = self.data.draw(st.integers(0, n), label="share sender")
        sender_group = Group(RUN, self.group.epoch, self.group.round_id, self.group.members, min(sender, n - 1))
        tag = round_tag(sender_group, self.numel, self.aggregator)
        tag.sender_rank = sender
        stat_round = self.data.draw(st.one_of(st.integers(0, 3), uint32s()), label="stat round")
        rounds = self.inbox.aggregator.stat_rounds(n)
        size = self.inbox.aggregator.share_numel(n, stat_round) if stat_round < rounds else 1
        values = self.data.draw(st.lists(absurd_floats(), min_size=size, max_size=size), label="values")
        raw = np.asarray(values, dtype="<f8").tobytes()
        raw = self.data.draw(st.one_of(st.just(raw), mutated(st.just(raw))), label="share bytes")
        request = pb.StatShare(tag=tag, stat_round=stat_round, values=raw).SerializeToString()
        request = self.data.draw(st.one_of(st.just(request), mutated(st.just(request))), label="share message")
        inbox = share = None
        try:
            try:
                share = pb.StatShare.FromString(request)
            except Exception as exc:  # as the handler does: protobuf's DecodeError and friends
                raise ProtocolError(f"malformed statistic share: {exc}") from exc
            inbox = await self.registry.find(share.tag, 0.0)
            caller = self.caller()
            if sent_by_another(inbox.group, share.tag.sender_rank, caller):
                return  # refused UNAUTHENTICATED; nobody is blamed
            inbox.accept_share(share)
        except ProtocolError as exc:
            Collective._blame(inbox, share, exc, "sent a bad statistic share")

    def abort(self) -> None:
        """Feed one abort notice as Collective._handle_abort does."""
        tag = round_tag(self.group, self.numel, self.aggregator)
        if self.data.draw(st.booleans(), label="foreign tag"):
            tag.round_id = self.data.draw(uint64s(), label="abort round")
            tag.epoch = self.data.draw(uint64s(), label="abort epoch")
        tag.sender_rank = self.data.draw(uint32s(), label="abort sender")
        ranks = self.data.draw(st.one_of(st.lists(uint32s(), max_size=5), st.builds(lambda r, k: [r] * k, uint32s(),
                                                                                     st.integers(0, 10_000))))
        notice = pb.AbortNotice(tag=tag, failed_ranks=ranks, reason=self.data.draw(texts(), label="reason"))
        try:
            self.registry.abort_notice(pb.AbortNotice.FromString(notice.SerializeToString()), self.caller())
        except ProtocolError:
            pass

    # -- what must hold ------------------------------------------------------------------------

    def check_buffers(self) -> None:
        """Nothing was written outside what checked chunks covered; progress and weights stay in range."""
        inbox = self.inbox
        assert bool((inbox.rows_buffer[~self.touched_rows] == SENTINEL).all())
        assert bool((inbox.result[~self.touched_result] == SENTINEL).all())
        for done in inbox.scatter_progress.values():
            assert -1 <= done <= inbox.rows.shape[1]
        for (phase, sender), covered in self.written.items():
            a, b = self.target_range(phase, sender)
            assert covered == b - a, "an accepted stream covered its whole part"
        for sender in range(self.group.size):
            started = (SCATTER, sender) in inbox._started
            assert (inbox.weights[sender] is None) != started or sender == self.group.rank
            assert not started or math.isfinite(inbox.weights[sender])
        assert len(self.registry._early_aborts) <= EARLY_ABORT_MEMORY
        assert len(self.registry._closed) <= CLOSED_MEMORY


async def play(data: st.DataObject) -> None:
    s = Scenario(data)
    await s.registry.open(s.inbox)
    closed = False
    for _ in range(data.draw(st.integers(1, 8), label="messages")):
        what = data.draw(st.sampled_from(["stream", "stream", "stream", "share", "abort", "close"]), label="message")
        if what == "stream":
            raws, honest = s.stream_messages()
            caller = s.caller()
            fresh = honest is not None and honest[:2] not in s.inbox._started and not closed
            fresh = fresh and caller in (None, s.group.members[honest[1]])
            accepted = await s.push(raws, caller)
            if fresh:
                phase, sender, decoded = honest
                assert accepted, "an honest first stream of a part was refused"
                a, b = s.target_range(phase, sender)
                got = s.inbox.rows[sender] if phase == SCATTER else s.inbox.result[a:b]
                assert torch.equal(got, decoded), "an honest stream decoded to other values than its codec gives"
        elif what == "share":
            await s.share()
        elif what == "abort":
            s.abort()
        elif not closed:
            s.registry.close(s.inbox)
            closed = True
        s.check_buffers()


@pytest.mark.fuzz_weight(3)  # an example is a whole round's worth of messages
def test_inbox_accepts_or_refuses_every_message_and_writes_only_within_bounds(fuzz):
    fuzz.run(lambda data: asyncio.run(play(data)), st.data())

