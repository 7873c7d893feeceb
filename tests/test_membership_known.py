"""A peer's kept member list (collectives.membership.KnownMembers): a ROUND answer may leave the list out.

The coordinator leaves a round's member list out of the answer to a peer that
names the same list's digest (QuorumRequest.known_members), so 1,000 members
cost ~40 KB per answer only when the list changes.
"""

from __future__ import annotations

import pytest

from collectives.errors import RoundFailed
from collectives.membership import KnownMembers
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
