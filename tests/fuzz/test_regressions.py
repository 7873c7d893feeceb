"""The inputs the fuzzers found, each pinned as a test of the behaviour it broke.

The varint helpers and field keys (collectives/net/wire.py), the joiner's chunk and
manifest checks (collectives/statesync/format.py), the state digest (it covers the
tensors' names, dtypes and shapes), and a superseded Quorum call (it ends with
ABORTED, not a bare cancellation).
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest
import torch
from test_fuzz_coordinator import CONFIG, RUN, Aborted, FakeContext
from test_fuzz_statesync import SMALL, FakeDonor, FakeTransport

from collectives.errors import ProtocolError
from collectives.net.wire import decode_chunk, encode_varint, read_length, read_varint
from collectives.statesync.fetch import fetch_state_async
from collectives.statesync.format import (
    ExpectedState,
    StateSnapshot,
    StateSyncError,
    _check_manifest,
    _parse_chunk,
    state_digest,
)
from peer.coordinator.service import Coordinator, CoordinatorConfig
from protos import membership_pb2 as mpb
from protos import state_pb2 as spb
from protos.collective_pb2 import PartChunk

pytestmark = pytest.mark.timeout(60)


# -- wire.py -----------------------------------------------------------------------------------


def test_encode_varint_refuses_a_negative_value():
    # Found as a hang: shifting -1 right never reaches 0, so the loop never ended (and ate memory).
    with pytest.raises(ValueError, match=r"\[0, 2\*\*64\)"):
        encode_varint(-1)


def test_encode_varint_refuses_a_value_beyond_64_bits():
    # It wrote an 11-byte varint that no reader, this one included, accepts.
    with pytest.raises(ValueError, match=r"\[0, 2\*\*64\)"):
        encode_varint(1 << 64)


def test_read_varint_refuses_bits_beyond_64():
    # A 10th byte above 1 gave values up to 2**70 (protobuf keeps the low 64 bits; no field has more).
    with pytest.raises(ProtocolError, match="exceeds 64 bits"):
        read_varint(memoryview(b"\xff" * 9 + b"\x7f"), 0)


def test_read_varint_still_reads_the_largest_uint64():
    assert read_varint(memoryview(b"\xff" * 9 + b"\x01"), 0) == ((1 << 64) - 1, 10)


# The payload's key (field 9, length-delimited) in 6 bytes: protobuf refuses keys of more than 5 ("wire format
# was corrupt"); decode_chunk took the payload (found by the atheris target statechunk, the same in state chunks).
OVERLONG_PAYLOAD_KEY = b"\xca\x80\x80\x80\x80\x00"


# A length prefix of 8 bytes (0 written overlong): protobuf refuses one of more than 5 bytes ("wire format was
# corrupt"); _parse_chunk took the field (found by the atheris target statechunk; decode_chunk read lengths alike).
OVERLONG_LENGTH_CHUNK = b"r\x80\x80\x80\x80\x80\x80\x80\x00z\x00"


def test_a_state_chunk_with_a_length_prefix_of_more_than_five_bytes_is_refused():
    with pytest.raises(ProtocolError, match="length prefix of 8 bytes"):
        _parse_chunk(OVERLONG_LENGTH_CHUNK)


def test_a_part_chunk_with_a_length_prefix_of_more_than_five_bytes_is_refused():
    with pytest.raises(ProtocolError, match="length prefix of 6 bytes"):
        decode_chunk(b"\x0a\x80\x80\x80\x80\x80\x00")


def test_a_length_prefix_of_five_bytes_is_still_read():
    assert read_length(memoryview(b"\x80\x80\x80\x80\x00"), 0) == (0, 5)


def test_chunk_with_a_key_of_more_than_five_bytes_is_refused():
    with pytest.raises(ProtocolError, match="field key of 6 bytes"):
        decode_chunk(OVERLONG_PAYLOAD_KEY + b"\x02ab")


def test_chunk_with_a_five_byte_key_is_read_as_protobuf_reads_it():
    _, payload = decode_chunk(b"\xca\x80\x80\x80\x00" + b"\x02ab")
    assert bytes(payload) == PartChunk.FromString(b"\xca\x80\x80\x80\x00" + b"\x02ab").payload == b"ab"


# -- statesync/format.py ---------------------------------------------------------------------------


def manifest(meta_json: str) -> spb.StateManifest:
    return spb.StateManifest(run_id="run", round_id=1, meta_json=meta_json, sha256=hashlib.sha256(b"").digest())


@pytest.mark.parametrize("meta", ['{"lr": 1e999}', '{"lr": -1e400}', '{"a": [1, 2, 1e309]}'])
def test_manifest_with_a_number_beyond_the_float_range_is_refused(meta):
    # json.loads turned them into infinities without passing parse_constant (which refuses NaN and Infinity).
    with pytest.raises(ValueError, match="out of the float range"):
        _check_manifest(manifest(meta), "run", SMALL)


def test_manifest_with_large_finite_numbers_is_accepted():
    assert _check_manifest(manifest('{"lr": 1e308, "steps": 123456789012345678901234567890}'), "run", SMALL).meta == {
        "lr": 1e308, "steps": 123456789012345678901234567890,
    }


def test_state_chunk_with_a_field_number_beyond_protobufs_range_is_refused():
    # Field 2 (offset 0), then a field numbered 2**29, which protobuf refuses ("wire format was corrupt");
    # _parse_chunk skipped it as an unknown field.
    with pytest.raises(ValueError, match="outside protobuf's"):
        _parse_chunk(b"\x10\x00\x80\x80\x80\x80\x10\x00")


def test_state_chunk_with_a_key_of_more_than_five_bytes_is_refused():
    # The input atheris found: an unknown field whose key takes 6 bytes (8a 8a 8a 8a 8a 00).
    with pytest.raises(ValueError, match="field key of 6 bytes"):
        _parse_chunk(bytes.fromhex("8a8a8a8a8a00008a808a23018a"))


def test_state_chunk_with_the_largest_field_number_is_skipped():
    key = encode_varint(((1 << 29) - 1) << 3)  # the largest field number, varint-typed: an unknown field
    assert _parse_chunk(key + b"\x05" + b"\x10\x07")[1] == 7


# -- the state digest covers the layout, not only the bytes ---------------------------------------------


def test_a_donor_that_swaps_tensor_names_is_refused():
    honest = StateSnapshot(7, {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0, 4.0])})
    # The same bytes in the same order under the other names.
    lying = StateSnapshot(7, {"b": torch.tensor([1.0, 2.0]), "a": torch.tensor([3.0, 4.0])})
    assert state_digest(lying) != state_digest(honest)  # the digest covers the names, dtypes and shapes
    transport = FakeTransport({"liar:1": FakeDonor(lying, 1024, {})})
    expect = ExpectedState(round_id=7, sha256_hex=state_digest(honest))

    async def fetch():
        return await fetch_state_async(transport, ["liar:1"], "run", "joiner", SMALL, expect=expect)

    try:
        got = asyncio.run(fetch())
    except StateSyncError:
        return
    assert torch.equal(got.tensors["a"], honest.tensors["a"])


# -- the coordinator's service ----------------------------------------------------------------


def test_a_quorum_call_superseded_by_the_same_peer_ends_with_a_status():
    async def scenario() -> list:
        coordinator = Coordinator(CoordinatorConfig(**CONFIG))
        coordinator.start_ticking()
        try:
            joined = [
                await coordinator.Join(mpb.JoinRequest(run_id=RUN, address=address, has_state=True), FakeContext())
                for address in ("h1:1", "h2:2")  # h2 never asks: the quorum waits join_timeout_s for it
            ]
            ask = mpb.QuorumRequest(run_id=RUN, peer_id=joined[0].peer_id)
            first = asyncio.ensure_future(coordinator.Quorum(ask, FakeContext()))
            await asyncio.sleep(0.01)
            second = asyncio.ensure_future(coordinator.Quorum(ask, FakeContext()))
            return await asyncio.gather(first, second, return_exceptions=True)
        finally:
            await coordinator.stop()

    first, second = asyncio.run(scenario())
    assert isinstance(second, mpb.QuorumResponse)
    assert isinstance(first, (mpb.QuorumResponse, Aborted)), f"the first call ended with {first!r}"
