"""The zero-copy PartChunk framing is plain protobuf on the wire, and rejects garbage."""

import pytest

from collectives.errors import ProtocolError
from collectives.net.wire import decode_chunk, encode_chunk
from protos import collective_pb2 as pb


def header() -> pb.PartChunk:
    return pb.PartChunk(
        tag=pb.RoundTag(run_id="r", epoch=3, round_id=9, sender_rank=1, group_size=4, total_numel=100),
        phase=pb.PHASE_SCATTER,
        part_index=2,
        part_numel=25,
        offset=5,
        count=10,
        codec=pb.CodecSpec(name="int8", block_size=64),
        weight=2.5,
    )


def test_encoded_chunk_parses_as_a_protobuf_part_chunk():
    data = encode_chunk(header(), b"\x01\x02\x03")
    msg = pb.PartChunk.FromString(data)
    assert msg.payload == b"\x01\x02\x03" and msg.tag.round_id == 9 and msg.weight == 2.5


def test_decode_returns_header_and_payload_view():
    head, payload = decode_chunk(encode_chunk(header(), b"abc" * 1000))
    assert head == header()
    assert bytes(payload) == b"abc" * 1000


def test_decode_reads_a_chunk_serialised_by_protobuf_itself():
    msg = header()
    msg.payload = b"xyz"
    head, payload = decode_chunk(msg.SerializeToString())
    assert head.count == 10 and bytes(payload) == b"xyz"


def test_empty_payload_round_trips():
    head, payload = decode_chunk(encode_chunk(header(), b""))
    assert head.part_index == 2 and len(payload) == 0


@pytest.mark.parametrize(
    "data",
    [
        b"\x4a\xff\xff\xff\xff\x0f",  # payload length far past the end
        b"\x4a\x05ab",  # truncated payload
        b"\x0b",  # group wire type
        b"\x4a\x01a\x4a\x01b",  # payload twice
        b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80",  # endless varint
        b"\x0a\x03\xff\xff\xff",  # tag field with garbage inside
    ],
)
def test_malformed_chunks_raise_protocol_error(data):
    with pytest.raises(ProtocolError):
        decode_chunk(data)
