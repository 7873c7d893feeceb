"""The digest a run keeps for a round, and whose state lost to it (peer/coordinator/digests.py)."""

from __future__ import annotations

import pytest

from peer.coordinator.digests import UNKNOWN_SENIORITY, DigestBook

GOOD, BAD = "a" * 64, "b" * 64
# When each peer joined: "a" is the most senior.
JOINED = {"a": 1.0, "b": 2.0, "c": 3.0}


def seniority(peer_id: str) -> float:
    return JOINED.get(peer_id, UNKNOWN_SENIORITY)


def book_after(reports: list[tuple[str, str]], members: tuple[str, ...] | None = ("a", "b", "c")) -> DigestBook:
    book = DigestBook()
    for peer, digest in reports:
        book.note(1, digest, peer, members, 0, seniority)
    return book


@pytest.mark.parametrize(
    "reports, kept, realign",
    [
        ([("a", GOOD), ("b", GOOD)], GOOD, set()),
        # A tie: the digest its most senior reporter holds, whoever reported first.
        ([("a", GOOD), ("b", BAD)], GOOD, {"b"}),
        ([("b", BAD), ("a", GOOD)], GOOD, {"b"}),
        # More of the round's members beat seniority.
        ([("a", BAD), ("b", GOOD), ("c", GOOD)], GOOD, {"a"}),
        # A peer outside the round does not vote: it loses to the members' digest, however many report it.
        ([("x", BAD), ("y", BAD), ("a", GOOD)], GOOD, {"x", "y"}),
        # Peers the run does not know tie as equals: the first report stays.
        ([("x", GOOD), ("y", BAD)], GOOD, {"y"}),
    ],
)
def test_the_kept_digest_and_the_peers_that_must_realign(reports, kept, realign):
    members = None if {p for p, _ in reports} <= {"x", "y"} else ("a", "b", "c")
    book = book_after(reports, members)
    assert (book.digest_of(1), book.realign) == (kept, realign)


def test_a_loser_that_reports_the_kept_digest_again_no_longer_must_realign():
    book = book_after([("a", GOOD), ("b", BAD)])
    book.note(1, GOOD, "b", ("a", "b", "c"), 0, seniority)
    assert not book.must_realign("b")


def test_a_peer_told_to_fetch_the_state_no_longer_must_realign():
    book = book_after([("a", GOOD), ("b", BAD)])
    book.realigned("b")
    assert not book.must_realign("b")


def test_each_divergence_is_told_once_per_round_and_peer():
    book = book_after([("a", GOOD)])
    assert book.note(1, BAD, "b", ("a", "b"), 0, seniority) == ("a", GOOD)
    assert book.note(1, BAD, "b", ("a", "b"), 0, seniority) is None


def test_a_rollback_forgets_the_later_rounds():
    book = DigestBook()
    for round_id in (1, 2, 3):
        book.note(round_id, GOOD, "a", None, 0, seniority)
    book.forget_after(1)
    assert (book.digest_of(1), book.digest_of(2), book.digest_of(3)) == (GOOD, "", "")


def test_rounds_up_to_the_oldest_kept_are_forgotten_when_a_new_round_is_noted():
    book = DigestBook()
    book.note(1, GOOD, "a", None, 0, seniority)
    book.note(70, GOOD, "a", None, 6, seniority)
    assert (book.digest_of(1), book.digest_of(70)) == ("", GOOD)
