"""A peer's kept member list (collectives.membership.roundplan.KnownMembers): a ROUND answer may leave the list out.

The coordinator leaves a round's member list out of the answer to a peer that
names the same list's digest (QuorumRequest.known_members), so 1,000 members
cost ~40 KB per answer only when the list changes.
"""

from __future__ import annotations

import pytest

from collectives.errors import RoundFailed
from collectives.membership.memberlists import (
    change_bytes,
    entries_of,
    list_bytes,
    list_digest,
    member_change,
    pack_list,
)
from collectives.membership.roundplan import KnownMembers
from protos import membership_pb2 as pb

LIST_A = [pb.Member(peer_id="a", address="10.0.0.1:1", host_id="h1"), pb.Member(peer_id="b", address="10.0.0.2:1")]
DIGEST_A = bytes(32 * [1])
DIGEST_B = bytes(32 * [2])


def answer(digest: bytes, members=()) -> pb.QuorumResponse:
    return pb.QuorumResponse(action=pb.QuorumResponse.ROUND, round_id=4, members=list(members), members_digest=digest)


def test_an_answer_with_a_list_gives_that_list_and_keeps_it_with_its_digest():
    known = KnownMembers()
    assert known.of(answer(DIGEST_A, LIST_A)) == ((("a", "10.0.0.1:1"), ("b", "10.0.0.2:1")), ("h1", ""))
    assert known.digest == DIGEST_A


def test_an_answer_without_a_list_gives_the_kept_one_when_the_digests_match():
    known = KnownMembers()
    kept = known.of(answer(DIGEST_A, LIST_A))
    assert known.of(answer(DIGEST_A)) == kept


@pytest.mark.parametrize("held", [b"", DIGEST_B], ids=["nothing kept", "another list kept"])
def test_an_answer_without_a_list_this_peer_does_not_hold_fails_the_round_and_asks_for_the_whole_list(held):
    known = KnownMembers()
    if held:
        known.of(answer(held, LIST_A))
    with pytest.raises(RoundFailed, match="left out a member list this peer does not hold"):
        known.of(answer(DIGEST_A))
    assert known.digest == b""


def test_an_answer_with_a_new_list_replaces_the_kept_one():
    known = KnownMembers()
    known.of(answer(DIGEST_A, LIST_A))
    assert known.of(answer(DIGEST_B, LIST_A[:1])) == ((("a", "10.0.0.1:1"),), ("h1",))
    assert known.digest == DIGEST_B


LIST_C = [*LIST_A[1:], pb.Member(peer_id="c", address="10.0.0.3:1")]  # a left, c joined


def changed(base_digest: bytes, base, new, digest: bytes | None = None) -> pb.QuorumResponse:
    """A ROUND answer carrying new as a change from base (named base_digest); digest: the round's (new's own)."""
    reply = pb.QuorumResponse.FromString(change_bytes(base_digest, *member_change(entries_of(base), entries_of(new))))
    reply.MergeFrom(answer(list_digest(entries_of(new)) if digest is None else digest))
    return reply


def test_an_answer_with_a_change_to_the_kept_list_gives_the_changed_list_and_keeps_it():
    known = KnownMembers()
    known.of(answer(list_digest(entries_of(LIST_A)), LIST_A))
    assert known.of(changed(known.digest, LIST_A, LIST_C)) == ((("b", "10.0.0.2:1"), ("c", "10.0.0.3:1")), ("", ""))
    assert known.digest == list_digest(entries_of(LIST_C))


def test_an_answer_with_a_change_to_a_list_this_peer_does_not_hold_fails_the_round_and_asks_for_the_whole_list():
    known = KnownMembers()
    known.of(answer(DIGEST_B, LIST_A))
    with pytest.raises(RoundFailed, match="carries a change to a member list this peer does not hold"):
        known.of(changed(DIGEST_A, LIST_A, LIST_C))
    assert known.digest == b""


def test_a_change_that_does_not_give_the_rounds_digest_fails_the_round_and_asks_for_the_whole_list():
    known = KnownMembers()
    known.of(answer(list_digest(entries_of(LIST_A)), LIST_A))
    with pytest.raises(RoundFailed, match="does not give the round's list"):
        known.of(changed(known.digest, LIST_A, LIST_C, digest=DIGEST_B))
    assert known.digest == b""


def test_a_change_whose_positions_do_not_fit_the_kept_list_fails_the_round():
    known = KnownMembers()
    known.of(answer(list_digest(entries_of(LIST_A)), LIST_A))
    reply = changed(known.digest, LIST_A, LIST_C)
    reply.members_removed[:] = [5]
    with pytest.raises(RoundFailed, match="does not apply"):
        known.of(reply)


def packed(members, digest: bytes | None = None) -> pb.QuorumResponse:
    """A ROUND answer carrying members packed (digest: the round's, their own by default)."""
    entries = entries_of(members)
    return pb.QuorumResponse(action=pb.QuorumResponse.ROUND, round_id=4, members_packed=pack_list(list_bytes(entries)),
                             members_digest=list_digest(entries) if digest is None else digest)


def test_an_answer_with_a_packed_list_gives_that_list_and_keeps_it_with_its_digest():
    known = KnownMembers()
    assert known.of(packed(LIST_A)) == ((("a", "10.0.0.1:1"), ("b", "10.0.0.2:1")), ("h1", ""))
    assert known.digest == list_digest(entries_of(LIST_A))


def test_a_packed_list_that_is_not_the_rounds_fails_the_round_and_asks_for_the_whole_list():
    known = KnownMembers()
    known.of(packed(LIST_A))
    with pytest.raises(RoundFailed, match="packed member list that is not sound: .*another digest"):
        known.of(packed(LIST_C, digest=DIGEST_B))
    assert known.digest == b""
