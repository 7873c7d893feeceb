"""A round's inbox on its own: chunks checked in order, progress counted only once decoded, buffers kept while decodes
run; and the registry where handlers wait for a round to open."""

from __future__ import annotations

import asyncio

import pytest
import torch

from collectives.codecs import CodecConfig, make_codec
from collectives.errors import ProtocolError
from collectives.net.wire import decode_chunk
from collectives.reduce.inbox import SCATTER, Group, RoundInbox, RoundRegistry
from collectives.reduce.round import chunk_message
from protos import collective_pb2 as pb

HANG_LIMIT_S = 10.0
NUMEL = 8  # two members: part 0 is elements 0..3, part 1 is 4..7


def make_inbox() -> RoundInbox:
    group = Group("run", 0, 1, ("a:1", "b:1"), 0)
    codec = make_codec(CodecConfig("none"))
    rows = torch.empty(RoundInbox.rows_numel(group, NUMEL))
    return RoundInbox(group, NUMEL, codec, rows, torch.empty(NUMEL))


def scatter_chunk(inbox: RoundInbox, offset: int, values: list[float]):
    """Member 1's scatter chunk of part 0 at offset, as (header, payload)."""
    sender = Group("run", 0, 1, inbox.group.members, 1)
    payload = torch.tensor(values, dtype=torch.float32).numpy().tobytes()
    raw = chunk_message(
        sender, NUMEL, inbox.aggregator_config, inbox.codec.config, SCATTER, 0, 4, offset, len(values), 1.0, payload
    )
    return decode_chunk(raw)


def test_next_chunk_is_accepted_before_the_previous_one_is_decoded():
    inbox = make_inbox()
    header, payload = scatter_chunk(inbox, 0, [1.0, 2.0])
    stream = inbox.begin_stream(header)
    first = inbox.check_chunk(stream, header, payload)
    header2, payload2 = scatter_chunk(inbox, 2, [3.0, 4.0])
    second = inbox.check_chunk(stream, header2, payload2)  # pipelined: chunk 0 not decoded yet
    assert (first.numel(), second.numel()) == (2, 2)


def test_progress_counts_decoded_elements_only():
    inbox = make_inbox()
    header, payload = scatter_chunk(inbox, 0, [1.0, 2.0])
    stream = inbox.begin_stream(header)
    target = inbox.check_chunk(stream, header, payload)
    assert inbox.contributions_ready() == -1
    inbox.decode_into(payload, target)
    inbox.advance(stream, header.count)
    assert inbox.contributions_ready() == 2
    assert inbox.rows[1, :2].tolist() == [1.0, 2.0]


def test_a_chunk_out_of_order_is_rejected_against_what_was_already_accepted():
    inbox = make_inbox()
    header, payload = scatter_chunk(inbox, 0, [1.0, 2.0])
    stream = inbox.begin_stream(header)
    inbox.check_chunk(stream, header, payload)
    with pytest.raises(ProtocolError, match="offset 0, expected 2"):
        inbox.check_chunk(stream, header, payload)  # the same chunk again


def test_drained_waits_for_a_decode_in_flight():
    async def scenario() -> tuple[bool, bool]:
        inbox = make_inbox()
        inbox.begin_decode()
        waiter = asyncio.ensure_future(inbox.drained())
        await asyncio.sleep(0.01)
        before = waiter.done()
        inbox.end_decode()
        await asyncio.wait_for(waiter, 5)
        return before, waiter.done()

    assert asyncio.run(scenario()) == (False, True)


# -- waiting for a round to open (RoundRegistry.find) -----------------------------------------------


def round_tag(inbox: RoundInbox) -> pb.RoundTag:
    """The tag another member's message for inbox's round carries."""
    group = inbox.group
    return pb.RoundTag(run_id=group.run_id, epoch=group.epoch, round_id=group.round_id, sender_rank=1)


def test_a_handler_waiting_for_a_round_gets_its_inbox_when_the_round_opens():
    async def scenario():
        registry = RoundRegistry("run")
        inbox = make_inbox()
        waiter = asyncio.ensure_future(registry.find(round_tag(inbox), timeout_s=30.0))
        await asyncio.sleep(0)
        await registry.open(inbox)
        return inbox, await waiter

    opened, found = asyncio.run(scenario())
    assert found is opened


def inbox_of_round(round_id: int) -> RoundInbox:
    group = Group("run", round_id, 1, ("a:1", "b:1"), 0)
    return RoundInbox(group, NUMEL, make_codec(CodecConfig("none")), torch.empty(RoundInbox.rows_numel(group, NUMEL)),
                      torch.empty(NUMEL))


def test_handlers_cancelled_twice_while_waiting_end_cancelled_and_later_rounds_still_open():
    # gRPC cancels the handler of a client that left, and a second cancel can land while the first is handled.
    # Eight idle streams wait for round 9; round 1 opening wakes them all, then each is cancelled twice.
    async def scenario():
        registry = RoundRegistry("run")
        round_9 = inbox_of_round(9)
        waiters = [asyncio.ensure_future(registry.find(round_tag(round_9), timeout_s=30.0)) for _ in range(8)]
        await asyncio.sleep(0)
        await registry.open(inbox_of_round(1))
        for waiter in waiters:
            waiter.cancel()
        await asyncio.sleep(0)
        for waiter in waiters:
            waiter.cancel()
        ended = await asyncio.gather(*waiters, return_exceptions=True)
        # A bound against a hang (a lock left held), not a timing measurement.
        async with asyncio.timeout(HANG_LIMIT_S):
            await registry.open(round_9)
            found = await registry.find(round_tag(round_9), timeout_s=0.0)
        return ended, round_9, found

    ended, opened, found = asyncio.run(scenario())
    assert [type(e) for e in ended] == [asyncio.CancelledError] * 8
    assert found is opened


def test_a_chunk_of_another_codec_block_size_is_refused_naming_the_block_sizes():
    group = Group("run", 0, 1, ("a:1", "b:1"), 0)
    inbox = RoundInbox(group, NUMEL, make_codec(CodecConfig("int8", block_size=4)), torch.empty(
        RoundInbox.rows_numel(group, NUMEL)), torch.empty(NUMEL))
    header, _ = scatter_chunk(inbox, 0, [1.0, 2.0])
    header.codec.block_size = 7
    with pytest.raises(
        ProtocolError, match=r"codec 'int8' \(block 7, zstd 0\) differs from the round's 'int8' \(block 4,"
    ):
        inbox.begin_stream(header)
