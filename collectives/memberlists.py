"""The member list of a ROUND answer: its serialisation and digest, and its change from a list the asker holds.

At 1,000 members a list is ~40 KB, sent to every member: 40 MB out of the
coordinator each time the membership changes, which in a large run is most
rounds (a joiner, a leaver). A peer names the list it holds
(``QuorumRequest.known_members``, the digest of its last one), and when the
coordinator still has that list the answer carries only the change: the
positions dropped from it and the members inserted, each at its position in
the new list. The peer checks what it rebuilt against the round's digest.

A list is a tuple of ``Entry`` (peer id, address, host id) in rank order.
These functions are pure; the coordinator and the peer share them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from itertools import pairwise

from protos import membership_pb2 as pb

Entry = tuple[str, str, str]  # (peer id, address, host id)


class BadMemberChange(ValueError):
    """A member-list change that does not apply to the list it names (the peer then asks for the whole list)."""


def _member(entry: Entry) -> pb.Member:
    peer_id, address, host_id = entry
    return pb.Member(peer_id=peer_id, address=address, host_id=host_id)


def _entry(member: pb.Member) -> Entry:
    return (member.peer_id, member.address, member.host_id)


def list_bytes(entries: Sequence[Entry]) -> bytes:
    """The serialised ``QuorumResponse.members`` field of a list (what its digest is taken of)."""
    return pb.QuorumResponse(members=[_member(e) for e in entries]).SerializeToString()


def list_digest(entries: Sequence[Entry]) -> bytes:
    """SHA-256 of the list's serialisation: ``QuorumResponse.members_digest``."""
    return hashlib.sha256(list_bytes(entries)).digest()


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


def apply_change(base: Sequence[Entry], removed: Sequence[int], added: Sequence[tuple[int, Entry]]) -> tuple[Entry, ...]:
    """base with the positions in removed dropped and each added entry inserted at its position in the result.

    Raises BadMemberChange for positions out of range or not strictly ascending (input from the network).
    """
    if any(b <= a for a, b in pairwise(removed)) or (removed and not 0 <= removed[0] <= removed[-1] < len(base)):
        raise BadMemberChange(f"dropped positions {list(removed)[:10]} are not ascending positions of a list of {len(base)}")
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
