"""Fuzzing a peer's reading of a packed member list (collectives/membership/memberlists.py,
collectives/membership/roundplan.py): any
``members_packed`` bytes, with the round's digest or one made to match them, give a list of members or fail
the round with RoundFailed (a frame declaring more than MAX_LIST_BYTES: tests/test_memberlists.py)."""

from __future__ import annotations

import hashlib

import zstandard
from fuzzgen import mutated
from hypothesis import strategies as st

from collectives.errors import RoundFailed
from collectives.membership.memberlists import Entry, list_bytes, pack_list
from collectives.membership.roundplan import KnownMembers
from protos import membership_pb2 as pb

entries = st.lists(st.builds(Entry, st.text(max_size=12), st.text(max_size=20), st.text(max_size=6),
                             st.integers(0, 2**64 - 1)), max_size=20)


def _frame(data: bytes, checksum: bool, size: bool) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=checksum, write_content_size=size).compress(data)


def packed_lists() -> st.SearchStrategy[tuple[bytes, bytes]]:
    """(packed bytes, raw bytes they were made from): valid lists, frames of any bytes with or without a size
    and a checksum, mutated frames, and random bytes."""
    valid = entries.map(lambda e: list_bytes(tuple(e))).map(lambda raw: (pack_list(raw), raw))
    framed = st.builds(
        lambda raw, c, s: (_frame(raw, c, s), raw), st.binary(max_size=200), st.booleans(), st.booleans()
    )
    broken = st.builds(lambda p: (p, b""), mutated(valid.map(lambda v: v[0])))
    return st.one_of(valid, framed, broken, st.builds(lambda b: (b, b), st.binary(max_size=64)))


def test_a_packed_list_gives_members_or_fails_the_round(fuzz):
    def check(packed_raw: tuple[bytes, bytes], digest_of_raw: bool) -> None:
        packed, raw = packed_raw
        # A hostile coordinator may name the digest of whatever it packed: the parse must still hold.
        digest = hashlib.sha256(raw).digest() if digest_of_raw else bytes(32)
        reply = pb.QuorumResponse(action=pb.QuorumResponse.ROUND, round_id=1, members_packed=packed,
                                  members_digest=digest)
        known = KnownMembers()
        try:
            members, hosts = known.of(reply)
        except RoundFailed:
            assert known.digest == b""
            return
        assert known.digest == digest and len(members) == len(hosts)
        assert all(isinstance(p, str) and isinstance(a, str) for p, a in members)

    fuzz.run(check, packed_lists(), st.booleans())
