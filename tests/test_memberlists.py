"""A member list's change from a list the asker holds, and a whole list packed (collectives/membership/memberlists.py):
computed by the coordinator, applied or unpacked by the peer, checked against the round's digest."""

from __future__ import annotations

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from collectives.membership.memberlists import (
    MAX_LIST_BYTES,
    BadMemberChange,
    BadPackedList,
    Entry,
    apply_change,
    change_bytes,
    changed_list,
    entries_of,
    list_bytes,
    list_digest,
    member_change,
    pack_list,
    unpack_list,
)
from protos import membership_pb2 as pb


def e(name: str, address: str = "", registration: int = 0) -> Entry:
    """An entry named name (address defaults to one derived from it)."""
    return Entry(name, address or f"10.0.0.{ord(name[0])}:1", "", registration)


A, B, C, D = e("a"), e("b"), e("c"), e("d")


@pytest.mark.parametrize("base, new, removed, added", [
    ((A, B, C), (A, B, C), [], []),
    ((A, B, C), (A, B, C, D), [], [(3, D)]),
    ((B, C, D), (A, B, C, D), [], [(0, A)]),
    ((A, B, D), (A, B, C, D), [], [(2, C)]),
    ((A, B, C), (A, C), [1], []),
    ((A, B, C), (A, C, D), [1], [(2, D)]),
    ((A, B), (A, e("b", "10.9.9.9:2")), [1], [(1, e("b", "10.9.9.9:2"))]),  # b came back at another address
    ((A, B), (A, e("b", registration=2)), [1], [(1, e("b", registration=2))]),  # b registered again (a cut)
    ((), (A, B), [], [(0, A), (1, B)]),
    ((A, B), (), [0, 1], []),
])
def test_a_change_lists_the_dropped_positions_and_the_inserted_entries_at_their_new_positions(
    base, new, removed, added
):
    assert member_change(base, new) == (removed, added)
    assert apply_change(base, removed, added) == new


def test_lists_whose_common_members_are_in_another_order_have_no_change():
    assert member_change((A, B, C), (C, B, A)) is None


@pytest.mark.parametrize("removed, added, why", [
    ([1, 1], [], "not ascending"),
    ([2, 1], [], "not ascending"),
    ([3], [], "not ascending positions of a list of 3"),
    ([], [(1, D), (1, e("x"))], "out of order"),
    ([], [(4, D)], "beyond a list of 3"),
])
def test_a_change_that_does_not_apply_to_the_list_is_refused(removed, added, why):
    with pytest.raises(BadMemberChange, match=why):
        apply_change((A, B, C), removed, added)


def test_a_change_reads_back_from_its_serialisation():
    removed, added = member_change((A, B, C), (A, C, D))
    reply = pb.QuorumResponse.FromString(change_bytes(b"\x01" * 32, removed, added))
    reply.members_digest = list_digest((A, C, D))
    assert reply.members_base == b"\x01" * 32 and changed_list((A, B, C), reply) == (A, C, D)


def test_a_change_that_gives_another_list_than_the_rounds_is_refused():
    reply = pb.QuorumResponse.FromString(change_bytes(b"\x01" * 32, *member_change((A, B, C), (A, C, D))))
    reply.members_digest = list_digest((A, C))
    with pytest.raises(BadMemberChange, match="does not give the round's list"):
        changed_list((A, B, C), reply)


def test_a_list_read_off_the_wire_has_the_digest_of_the_list_sent():
    sent = (A, e("b", "[::1]:7"), Entry("c", "10.0.0.3:9", "host-c", 12))
    reply = pb.QuorumResponse.FromString(list_bytes(sent))
    assert list_digest(entries_of(reply.members)) == list_digest(sent)


names = st.lists(st.sampled_from("abcdefghijklmnopqrstuvwxyz"), unique=True, max_size=12).map(sorted)


@given(names, names)
def test_the_change_between_any_two_lists_in_rank_order_applies_back_to_the_new_one(base, new):
    base_entries, new_entries = tuple(map(e, base)), tuple(map(e, new))
    change = member_change(base_entries, new_entries)
    assert change is not None and apply_change(base_entries, *change) == new_entries


def bench_like(n: int) -> tuple[Entry, ...]:
    """n entries with ids as the coordinator gives them, one address and one registration each."""
    return tuple(sorted(Entry(f"p{i}-a1b2c3", f"10.0.{i >> 8}.{i & 255}:{20000 + i}", "", i + 1) for i in range(n)))


@pytest.mark.parametrize(
    "entries",
    [(), (A,), (A, e("b", "[::1]:7"), Entry("c", "10.0.0.3:9", "host-c", 12)), bench_like(1000)],
    ids=["empty", "one", "three", "1000"],
)
def test_a_packed_list_unpacks_to_the_list_it_was_packed_from(entries):
    assert unpack_list(pack_list(list_bytes(entries)), list_digest(entries)) == entries


def test_a_packed_list_of_1000_members_is_a_fraction_of_the_list():
    entries = bench_like(1000)
    assert len(pack_list(list_bytes(entries))) * 4 < len(list_bytes(entries))


def frame(data: bytes, checksum: bool = True, size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=checksum, write_content_size=size).compress(data)


def corrupted(packed: bytes) -> bytes:
    """packed with one byte of its compressed block flipped (the header and the checksum kept)."""
    middle = len(packed) // 2
    return packed[:middle] + bytes([packed[middle] ^ 0xFF]) + packed[middle + 1:]


LIST = list_bytes(bench_like(50))


@pytest.mark.parametrize("packed, why", [
    (LIST, "not a zstd frame"),
    (frame(LIST, checksum=False), "has no checksum"),
    (frame(LIST, size=False), "declares no content size"),
    (frame(bytes(MAX_LIST_BYTES + 1)), f"expected 0 to {MAX_LIST_BYTES} bytes"),
    (corrupted(frame(LIST)), "corrupt"),
    (frame(LIST) + b"\x00", "corrupt"),
    (frame(list_bytes(bench_like(49))), "another digest"),
], ids=["raw list", "no checksum", "no size", "too large", "flipped byte", "trailing byte", "another list"])
def test_a_packed_list_that_is_not_a_sound_frame_of_the_rounds_list_is_refused(packed, why):
    with pytest.raises(BadPackedList, match=why):
        unpack_list(packed, list_digest(bench_like(50)))
