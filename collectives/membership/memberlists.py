"""The member list of a ROUND answer: its serialisation and digest, and its change from a list the asker holds.

At 1,000 members a list is ~40 KB, sent to every member: 40 MB out of the
coordinator each time the membership changes, which in a large run is most
rounds (a joiner, a leaver). A peer names the list it holds
(``QuorumRequest.known_members``, the digest of its last one), and when the
coordinator still has that list the answer carries only the change: the
positions dropped from it and the members inserted, each at its position in
the new list. The peer checks what it rebuilt against the round's digest.

A peer that needs the whole list (its first round, or a list the coordinator
no longer has) gets it packed: the list's serialisation as one zstd frame
(``QuorumResponse.members_packed``), compressed once per round. Peer ids and
addresses share most of their characters, so 1,000 members take a few KB, and
the peer parses one field instead of 1,000 messages. A packed list is input
from the network: its frame must declare a size within ``MAX_LIST_BYTES`` and
carry a checksum, and what it unpacks to must have the round's digest.

A list is a tuple of ``Entry`` (peer id, address, host id, registration) in rank order.
These functions are pure; the coordinator and the peer share them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from itertools import pairwise
from typing import NamedTuple

import zstandard
from google.protobuf.message import DecodeError

from collectives.zstdframes import BadFrame, read_frame
from protos import membership_pb2 as pb


class Entry(NamedTuple):
    """One member of a round's list, as ``Member`` carries it."""

    peer_id: str
    address: str
    host_id: str = ""
    # Which registration of the peer (Member.registration; 0: not said).
    registration: int = 0


# The largest list a packed one may unpack to: room for a million members of ~60 bytes. A frame declaring
# more is refused before anything is allocated (collectives/zstdframes.py).
MAX_LIST_BYTES = 64 << 20
# Packing is once per round on the coordinator: level 3 takes ~0.5 ms for 1,000 members.
PACK_LEVEL = 3


class BadMemberChange(ValueError):
    """A member-list change that does not apply to the list it names (the peer then asks for the whole list)."""


class BadPackedList(ValueError):
    """A packed member list that is not a sound zstd frame of the round's list (the peer then asks again)."""


def _member(entry: Entry) -> pb.Member:
    return pb.Member(peer_id=entry.peer_id, address=entry.address, host_id=entry.host_id,
                     registration=entry.registration)


def _entry(member: pb.Member) -> Entry:
    return Entry(member.peer_id, member.address, member.host_id, member.registration)


def list_bytes(entries: Sequence[Entry]) -> bytes:
    """The serialised ``QuorumResponse.members`` field of a list (what its digest is taken of)."""
    return pb.QuorumResponse(members=[_member(e) for e in entries]).SerializeToString()


def list_digest(entries: Sequence[Entry]) -> bytes:
    """SHA-256 of the list's serialisation: ``QuorumResponse.members_digest``."""
    return hashlib.sha256(list_bytes(entries)).digest()


def pack_list(member_list: bytes) -> bytes:
    """A list's serialisation (list_bytes) as ``QuorumResponse.members_packed``: one zstd frame that declares its
    size and carries a checksum."""
    return zstandard.ZstdCompressor(
        level=PACK_LEVEL, write_checksum=True, write_content_size=True
    ).compress(member_list)


def unpack_list(packed: bytes, digest: bytes) -> tuple[Entry, ...]:
    """The entries of a packed list, checked against the round's members_digest; BadPackedList when the frame is
    not sound, too large, or not that list."""
    try:
        raw = read_frame(packed, range(MAX_LIST_BYTES + 1))
    except BadFrame as exc:
        raise BadPackedList(str(exc)) from None
    if hashlib.sha256(raw).digest() != digest:
        raise BadPackedList("it does not unpack to the round's list (another digest)")
    try:
        return entries_of(pb.QuorumResponse.FromString(raw).members)
    except DecodeError as exc:  # bytes that are no list, sent with their own digest
        raise BadPackedList(f"it does not parse as a member list ({exc})") from None


def entries_of(members: Sequence[pb.Member]) -> tuple[Entry, ...]:
    """A received ``members`` field as entries."""
    return tuple(_entry(m) for m in members)


def member_change(base: Sequence[Entry], new: Sequence[Entry]) -> tuple[list[int], list[tuple[int, Entry]]] | None:
    """How new differs from base: (positions of base dropped, (position in new, entry) inserted), both ascending;
    None when the entries both hold are not in the same order in both (send the whole list)."""
    in_new = set(new)
    in_base = set(base)
    removed = [i for i, e in enumerate(base) if e not in in_new]
    added = [(i, e) for i, e in enumerate(new) if e not in in_base]
    kept_base = [e for e in base if e in in_new]
    kept_new = [e for e in new if e in in_base]
    return (removed, added) if kept_base == kept_new else None


def apply_change(
    base: Sequence[Entry], removed: Sequence[int], added: Sequence[tuple[int, Entry]]
) -> tuple[Entry, ...]:
    """base with the positions in removed dropped and each added entry inserted at its position in the result.

    Raises BadMemberChange for positions out of range or not strictly ascending (input from the network).
    """
    if any(b <= a for a, b in pairwise(removed)) or (removed and not 0 <= removed[0] <= removed[-1] < len(base)):
        raise BadMemberChange(
            f"dropped positions {list(removed)[:10]} are not ascending positions of a list of {len(base)}"
        )
    gone = set(removed)
    result = [e for i, e in enumerate(base) if i not in gone]
    for k, (at, entry) in enumerate(added):
        if (k and at <= added[k - 1][0]) or not 0 <= at <= len(result):
            raise BadMemberChange(f"inserted position {at} is out of order or beyond a list of {len(result)}")
        result.insert(at, entry)
    return tuple(result)


def change_bytes(base_digest: bytes, removed: Sequence[int], added: Sequence[tuple[int, Entry]]) -> bytes:
    """The serialised QuorumResponse fields that carry a change from the list named base_digest."""
    return pb.QuorumResponse(
        members_base=base_digest,
        members_removed=removed,
        members_added=[pb.IndexedMember(index=i, member=_member(e)) for i, e in added],
    ).SerializeToString()


def changed_list(base: Sequence[Entry], reply: pb.QuorumResponse) -> tuple[Entry, ...]:
    """The list a ROUND answer's change (members_removed, members_added) makes of base, checked against the
    answer's members_digest; BadMemberChange when it does not apply or gives another list."""
    added = [(m.index, _entry(m.member)) for m in reply.members_added]
    entries = apply_change(base, list(reply.members_removed), added)
    if list_digest(entries) != reply.members_digest:
        raise BadMemberChange("it does not give the round's list (another digest)")
    return entries
