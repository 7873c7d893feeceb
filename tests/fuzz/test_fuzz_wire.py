"""Fuzzing the PartChunk framing (collectives/net/wire.py): any bytes are decoded or refused with ProtocolError,
and what is decoded is what protobuf itself reads from the same bytes."""

from __future__ import annotations

import pytest
from fuzzgen import U64_MAX, absurd_floats, messages, mutated, texts, uint32s, uint64s, varints
from hypothesis import strategies as st

from collectives.errors import ProtocolError
from collectives.net.wire import MAX_HEADER_BYTES, decode_chunk, encode_chunk, encode_varint, read_varint
from protos import collective_pb2 as pb

TAG_FIELDS = [f.number for f in pb.RoundTag.DESCRIPTOR.fields]
CHUNK_FIELDS = [f.number for f in pb.PartChunk.DESCRIPTOR.fields]


def tags() -> st.SearchStrategy[pb.RoundTag]:
    return st.builds(
        pb.RoundTag, run_id=texts(), epoch=uint64s(), round_id=uint64s(), sender_rank=uint32s(),
        group_size=uint32s(), total_numel=uint64s(), aggregator=st.text(max_size=40),
    )


def headers() -> st.SearchStrategy[pb.PartChunk]:
    """PartChunk headers (no payload) with any field values, some too big for MAX_HEADER_BYTES."""
    levels = st.integers(-(1 << 31), (1 << 31) - 1)
    codec = st.builds(pb.CodecSpec, name=st.text(max_size=10), block_size=uint32s(), zstd_level=levels)
    return st.builds(
        pb.PartChunk, tag=tags(), phase=st.sampled_from([0, 1, 2, 3, 1 << 20]), part_index=uint32s(),
        part_numel=uint64s(), offset=uint64s(), count=uint64s(), codec=codec, weight=absurd_floats(),
    )


def encoded_chunks() -> st.SearchStrategy[bytes]:
    return st.builds(encode_chunk, headers(), st.binary(max_size=256))


def chunk_bytes() -> st.SearchStrategy[bytes]:
    """Anything a sender could put on the wire: random bytes, protobuf-shaped fields, mutated valid chunks."""
    return st.one_of(
        st.binary(max_size=64),
        messages(CHUNK_FIELDS, TAG_FIELDS),
        mutated(encoded_chunks()),
        encoded_chunks(),
    )


def test_decode_chunk_decodes_or_refuses_any_bytes_as_protobuf_reads_them(fuzz):
    def check(data: bytes) -> None:
        try:
            header, payload = decode_chunk(data)
        except ProtocolError:
            return
        assert isinstance(payload, memoryview) and isinstance(header, pb.PartChunk)
        assert header.payload == b"" and header.ByteSize() <= MAX_HEADER_BYTES
        # The same bytes through protobuf: the header's fields and the payload are the same.
        reference = pb.PartChunk.FromString(data)
        assert bytes(payload) == reference.payload
        reference.payload = b""
        assert header == reference

    fuzz.run(check, chunk_bytes())


def test_encoded_chunks_decode_to_what_was_encoded(fuzz):
    def check(header: pb.PartChunk, payload: bytes) -> None:
        data = encode_chunk(header, payload)
        if header.ByteSize() > MAX_HEADER_BYTES:
            with pytest.raises(ProtocolError, match="exceeds"):
                decode_chunk(data)
            return
        got, view = decode_chunk(data)
        assert bytes(view) == payload
        assert got.SerializeToString(deterministic=True) == header.SerializeToString(deterministic=True)

    fuzz.run(check, headers(), st.binary(max_size=2048))


def test_read_varint_reads_or_refuses_any_bytes_at_any_position(fuzz):
    def check(data: bytes, pos: int) -> None:
        try:
            value, after = read_varint(memoryview(data), pos)
        except ProtocolError:
            return
        assert pos < after <= len(data) and after - pos <= 10
        assert 0 <= value <= U64_MAX
        # A varint in as few bytes as it needs (its last byte is not 0, or it is one byte) is what encode_varint writes.
        if data[after - 1] != 0 or after - pos == 1:
            assert encode_varint(value) == bytes(data[pos:after])

    fuzz.run(check, st.one_of(st.binary(max_size=16), varints()), st.integers(0, 16))


def test_varints_round_trip_and_only_u64_values_are_encoded(fuzz):
    def check(value: int) -> None:
        if 0 <= value <= U64_MAX:
            data = encode_varint(value)
            assert read_varint(memoryview(data), 0) == (value, len(data))
        else:
            with pytest.raises(ValueError):
                encode_varint(value)

    fuzz.run(check, st.one_of(uint64s(), st.integers(-(1 << 70), -1), st.integers(U64_MAX + 1, 1 << 80)))

