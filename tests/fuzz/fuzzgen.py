"""Hypothesis strategies shared by the fuzz targets: protobuf wire bytes, mutations, absurd values.

Random bytes rarely get past a decoder's first check, so most inputs here are
built the way a hostile peer would build them: well-formed protobuf fields
with absurd values, field numbers and wire types the decoder does not expect,
length prefixes that lie, and valid messages with a few bytes mutated.
"""

from __future__ import annotations

from functools import cache

from hypothesis import strategies as st

from collectives.net.wire import encode_varint

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
# Values at the edges of the integer types protobuf carries.
EDGE_INTS = (
    0, 1, 2, 3, 127, 128, 255, 4096, (1 << 31) - 1, 1 << 31, U32_MAX, 1 << 32, (1 << 63) - 1, 1 << 63, U64_MAX - 1,
    U64_MAX,
)


@cache  # built once: building a strategy costs far more than drawing from it
def uint64s() -> st.SearchStrategy[int]:
    """Unsigned 64-bit values, biased to small ones and to the edges (2**64-1 included)."""
    return st.one_of(st.integers(0, 16), st.sampled_from(EDGE_INTS), st.integers(0, U64_MAX))


@cache
def uint32s() -> st.SearchStrategy[int]:
    """Unsigned 32-bit values, biased to small ones and to the edges."""
    edges = [v for v in EDGE_INTS if v <= U32_MAX]
    return st.one_of(st.integers(0, 8), st.sampled_from(edges), st.integers(0, U32_MAX))


@cache
def absurd_floats() -> st.SearchStrategy[float]:
    """Any double, NaN and infinities included, with the special values often."""
    specials = st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e308, -1e308, 5e-324])
    return st.one_of(specials, st.floats(allow_nan=True, allow_infinity=True))


@cache
def long_texts(alphabet: str = "a:9é\x00") -> st.SearchStrategy[str]:
    """Texts up to 200,000 characters, cheap to generate (a short piece repeated)."""
    pieces = st.text(alphabet, min_size=1, max_size=4)
    return st.builds(lambda piece, times: piece * times, pieces, st.integers(0, 50_000))


@cache
def texts() -> st.SearchStrategy[str]:
    """Short texts of any characters, or very long ones."""
    return st.one_of(st.text(max_size=20), long_texts())


def raw_varint(value: int) -> bytes:
    """Base-128 varint of any non-negative integer, also beyond 64 bits (which no decoder may accept)."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@cache
def varints() -> st.SearchStrategy[bytes]:
    """Varints: canonical ones of any u64, and malformed ones (overlong, more than 64 bits, unterminated)."""
    canonical = uint64s().map(encode_varint)
    too_big = st.integers(1 << 64, 1 << 70).map(raw_varint)
    padded = st.builds(lambda v, pad: _overlong(v, pad), st.integers(0, 1000), st.integers(1, 6))
    raw = st.binary(min_size=1, max_size=12)
    return st.one_of(canonical, canonical, padded, too_big, raw)


def _overlong(value: int, pad: int) -> bytes:
    """value as a varint with pad redundant continuation bytes (valid protobuf if it stays within 10 bytes)."""
    body = bytearray(encode_varint(value))
    body[-1] |= 0x80
    return bytes(body) + b"\x80" * (pad - 1) + b"\x00"


def field_bytes(numbers: list[int], inner: st.SearchStrategy[bytes] | None = None) -> st.SearchStrategy[bytes]:
    """One protobuf field: a key (a number of ``numbers`` or any, any wire type) and a value that fits it, or not."""
    number = st.one_of(st.sampled_from(numbers), st.integers(0, 40), st.sampled_from([(1 << 29) - 1, 1 << 29, 1 << 61]))
    wire = st.sampled_from([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 7])
    payload = st.binary(max_size=64) if inner is None else st.one_of(st.binary(max_size=64), inner)
    value = {
        0: varints(),
        1: st.binary(min_size=0, max_size=9),
        2: st.one_of(
            payload.map(lambda b: encode_varint(len(b)) + b),
            st.tuples(varints(), payload).map(lambda t: t[0] + t[1]),  # a length that may lie
        ),
        5: st.binary(min_size=0, max_size=5),
    }

    def build(key_number: int, key_wire: int, pad: int) -> st.SearchStrategy[bytes]:
        key = raw_varint((key_number << 3) | key_wire)
        if pad:  # the same key in more bytes than it needs (protobuf refuses a key of more than 5)
            key = _overlong((key_number << 3) | key_wire, pad) if key_number < 1 << 40 else key
        return value.get(key_wire, st.just(b"")).map(lambda v: key + v)

    overlong = st.sampled_from([0, 0, 0, 0, 0, 0, 1, 3, 4])
    return st.tuples(number, wire, overlong).flatmap(lambda t: build(*t))


def messages(numbers: list[int], nested: list[int] | None = None, max_fields: int = 12) -> st.SearchStrategy[bytes]:
    """A protobuf-like message: fields of ``numbers`` (some nested messages of ``nested`` numbers), concatenated."""
    inner = messages(nested, None, 6) if nested else None
    return st.lists(field_bytes(numbers, inner), max_size=max_fields).map(b"".join)


def mutated(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Valid encodings with a few bytes flipped, inserted, deleted, or cut off."""

    def apply(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
        out = bytearray(data)
        for kind, where, byte in edits:
            pos = where % (len(out) + 1)
            if kind == 0 and pos < len(out):
                out[pos] ^= byte or 1
            elif kind == 1:
                out[pos:pos] = bytes([byte])
            elif kind == 2:
                del out[pos : pos + 1 + byte % 8]
            else:
                del out[pos:]
        return bytes(out)

    edit = st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255))
    return st.builds(apply, valid, st.lists(edit, min_size=1, max_size=4))
