"""Zero-copy framing of ``PartChunk`` messages.

A chunk's payload is most of its bytes, so it is never copied through a
protobuf object: ``encode_chunk`` serialises the header fields with protobuf
and appends the payload field by hand; ``decode_chunk`` walks the top-level
fields and returns the payload as a memoryview into the received buffer. The
bytes on the wire are a valid protobuf encoding of ``PartChunk`` (any
implementation of ``protos/collective.proto`` can read and write them), and
``decode_chunk`` accepts fields in any order. The payload is the only field
that may not repeat; every malformed input raises ``ProtocolError``.
"""

from __future__ import annotations

from collectives.errors import ProtocolError
from protos import collective_pb2 as pb

PAYLOAD_FIELD = pb.PartChunk.DESCRIPTOR.fields_by_name["payload"].number
_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5
_PAYLOAD_KEY = bytes([(PAYLOAD_FIELD << 3) | _WIRE_LEN])
# The header of a chunk is a handful of small fields; anything bigger is an attack or a bug.
MAX_HEADER_BYTES = 4096
# Protobuf varints carry at most 64 bits.
_VARINT_LIMIT = 1 << 64
# A field's key (number << 3 | wire type) is a varint of at most 5 bytes, its number 1 .. 2**29 - 1: protobuf
# refuses a message with any other, so the hand-written decoders here refuse it too.
MAX_FIELD_NUMBER = (1 << 29) - 1
_MAX_KEY_BYTES = 5
# A length prefix too: protobuf reads it as a 32-bit size and refuses a longer varint ("wire format was corrupt").
_MAX_LENGTH_BYTES = 5


def encode_varint(value: int) -> bytes:
    """Protobuf base-128 varint of an integer in [0, 2**64); ValueError otherwise."""
    # A negative value would never reach zero by shifting (an endless loop), a larger one no reader accepts.
    if not 0 <= value < _VARINT_LIMIT:
        raise ValueError(f"a varint holds an integer in [0, 2**64), got {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """Decode the varint at pos; return (value, next position). ProtocolError if malformed."""
    result = 0
    shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise ProtocolError("truncated varint in a PartChunk")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if result >= _VARINT_LIMIT:
                # A 10th byte above 1: bits beyond 64, which no protobuf field has.
                raise ProtocolError("a varint exceeds 64 bits")
            return result, pos
        shift += 7
        if shift >= 64:
            raise ProtocolError("varint longer than 10 bytes in a PartChunk")


def read_length(buf: memoryview, pos: int) -> tuple[int, int]:
    """Decode a length-delimited field's length at pos; return (length, next position). ProtocolError if malformed
    or longer than protobuf's 5 bytes."""
    length, after = read_varint(buf, pos)
    if after - pos > _MAX_LENGTH_BYTES:
        raise ProtocolError(f"a length prefix of {after - pos} bytes (protobuf allows {_MAX_LENGTH_BYTES})")
    return length, after


def read_key(buf: memoryview, pos: int) -> tuple[int, int, int]:
    """Decode the field key at pos; return (field number, wire type, next position). ProtocolError if malformed."""
    key, after = read_varint(buf, pos)
    if after - pos > _MAX_KEY_BYTES:
        raise ProtocolError(f"a field key of {after - pos} bytes (protobuf allows {_MAX_KEY_BYTES})")
    field = key >> 3
    if not 0 < field <= MAX_FIELD_NUMBER:
        raise ProtocolError(f"field number {field} is outside protobuf's 1 .. 2**29 - 1")
    return field, key & 7, after


def encode_chunk(header: pb.PartChunk, payload: bytes | memoryview) -> bytes:
    """Serialise a PartChunk whose payload field is ``payload`` (header.payload must be empty)."""
    if header.payload:
        raise ValueError("pass the payload separately, not in the header")
    return b"".join((header.SerializeToString(), _PAYLOAD_KEY, encode_varint(len(payload)), payload))


def decode_chunk(data: bytes) -> tuple[pb.PartChunk, memoryview]:
    """Parse a serialised PartChunk into (header without payload, payload view)."""
    buf = memoryview(data)
    pos = 0
    end = len(buf)
    header_spans: list[tuple[int, int]] = []
    payload: memoryview | None = None
    while pos < end:
        field_start = pos
        field, wire, pos = read_key(buf, pos)
        if wire == _WIRE_VARINT:
            _, pos = read_varint(buf, pos)
        elif wire == _WIRE_I64:
            pos += 8
        elif wire == _WIRE_I32:
            pos += 4
        elif wire == _WIRE_LEN:
            length, pos = read_length(buf, pos)
            if pos + length > end:
                raise ProtocolError("a length-delimited field runs past the end of a PartChunk")
            if field == PAYLOAD_FIELD:
                if payload is not None:
                    raise ProtocolError("payload field repeated in a PartChunk")
                payload = buf[pos : pos + length]
                pos += length
                continue
            pos += length
        else:
            raise ProtocolError(f"unsupported wire type {wire} in a PartChunk")
        if pos > end:
            raise ProtocolError("a field runs past the end of a PartChunk")
        header_spans.append((field_start, pos))
    header_bytes = b"".join(bytes(buf[a:b]) for a, b in header_spans)
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ProtocolError(f"PartChunk header of {len(header_bytes)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = pb.PartChunk.FromString(header_bytes)
    except Exception as exc:  # protobuf raises DecodeError (and others on deep garbage)
        raise ProtocolError(f"malformed PartChunk header: {exc}") from exc
    return header, payload if payload is not None else memoryview(b"")
