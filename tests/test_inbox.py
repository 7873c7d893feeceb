"""A round's inbox on its own: chunks checked in order, progress counted only once decoded, buffers kept while decodes run."""

from __future__ import annotations

import asyncio

import pytest
import torch

from collectives.codecs import CodecConfig, make_codec
from collectives.errors import ProtocolError
from collectives.inbox import SCATTER, Group, RoundInbox
from collectives.round import chunk_message
from collectives.wire import decode_chunk

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
    raw = chunk_message(sender, NUMEL, inbox.aggregator_config, inbox.codec.config, SCATTER, 0, 4, offset, len(values), 1.0, payload)
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
