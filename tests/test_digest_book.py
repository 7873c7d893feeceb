"""The digest a run keeps for a round, and whose state lost to it (peer/coordinator/digests.py)."""

from __future__ import annotations

import pytest

from peer.coordinator.digests import DIGEST_ROUNDS, UNKNOWN_SENIORITY, DigestBook

GOOD, BAD = "a" * 64, "b" * 64
# When each peer joined: "a" is the most senior.
JOINED = {"a": 1.0, "b": 2.0, "c": 3.0}


def seniority(peer_id: str) -> float:
    return JOINED.get(peer_id, UNKNOWN_SENIORITY)


def book_after(reports: list[tuple[str, str]], members: tuple[str, ...] | None = ("a", "b", "c")) -> DigestBook:
    """A book whose round 1 committed with ``members`` (None: a round another coordinator committed)."""
    book = DigestBook()
    if members is not None:
        book.round_committed(1, members)
    for peer, digest in reports:
        book.note(1, digest, peer, 0, seniority)
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
        # A peer outside the round does not vote, nor is its report kept, however many report it and however
        # early: it lost to the members' digest.
        ([("x", BAD), ("y", BAD), ("a", GOOD)], GOOD, {"x", "y"}),
        ([("x", BAD)], "", set()),
    ],
)
def test_the_kept_digest_and_the_peers_that_must_realign(reports, kept, realign):
    book = book_after(reports)
    assert (book.digest_of(1), book.realign) == (kept, realign)


def test_for_a_round_another_coordinator_committed_every_reporter_votes_and_a_tie_keeps_the_first():
    book = book_after([("x", GOOD), ("y", BAD)], members=None)
    assert (book.digest_of(1), book.realign) == (GOOD, {"y"})


def test_a_loser_that_reports_the_kept_digest_again_no_longer_must_realign():
    book = book_after([("a", GOOD), ("b", BAD)])
    book.note(1, GOOD, "b", 0, seniority)
    assert not book.must_realign("b")


def test_a_loser_whose_report_of_the_next_round_comes_first_still_must_realign_and_its_word_is_not_kept():
    # Its own report must not clear it, nor set the digest its realigning fetch will expect: another member's will.
    book = book_after([("a", GOOD), ("b", BAD)])
    book.round_committed(2, ("a", "b", "c"))
    book.note(2, BAD, "b", 0, seniority)
    assert book.must_realign("b") and book.digest_of(2) == ""
    book.note(2, GOOD, "a", 0, seniority)
    assert book.digest_of(2) == GOOD and book.must_realign("b")


def test_a_peer_that_loses_a_round_loses_the_later_digests_kept_on_its_word_alone():
    # CI (test_realign): b reported rounds 1 and 2 first; a's report of round 1 made b lose, and the fetch b was
    # told to make expected b's own digest of round 2, which a's state did not have.
    book = DigestBook()
    book.round_committed(1, ("a", "b"))
    book.note(1, BAD, "b", 0, seniority)
    book.round_committed(2, ("a", "b"))
    book.note(2, BAD, "b", 0, seniority)
    book.note(2, BAD, "c", 0, seniority)  # a non-member agreeing does not count
    book.note(1, GOOD, "a", 0, seniority)
    assert (book.digest_of(1), book.digest_of(2), book.realign) == (GOOD, "", {"b"})
    book.note(2, GOOD, "a", 0, seniority)
    assert (book.digest_of(2), book.realign) == (GOOD, {"b", "c"})


def test_a_peer_told_to_fetch_the_state_no_longer_must_realign():
    book = book_after([("a", GOOD), ("b", BAD)])
    book.realigned("b")
    assert not book.must_realign("b")


def test_each_divergence_is_told_once_per_round_and_peer():
    book = book_after([("a", GOOD)])
    assert book.note(1, BAD, "b", 0, seniority) == ("a", GOOD)
    assert book.note(1, BAD, "b", 0, seniority) is None


def test_a_rollback_forgets_the_later_rounds():
    book = DigestBook()
    for round_id in (1, 2, 3):
        book.note(round_id, GOOD, "a", 0, seniority)
    book.forget_after(1)
    assert (book.digest_of(1), book.digest_of(2), book.digest_of(3)) == (GOOD, "", "")


def test_a_commit_forgets_the_rounds_digest_rounds_before_it_even_when_no_digest_is_reported():
    book = DigestBook()
    book.note(1, GOOD, "a", 0, seniority)
    for round_id in range(1, DIGEST_ROUNDS + 2):
        book.round_committed(round_id, ("a",))
    assert book.digest_of(1) == "" and min(book.members) == 2 and len(book.members) == DIGEST_ROUNDS


def test_a_peer_that_reports_again_votes_once_for_its_latest_digest():
    book = book_after([("a", BAD), ("b", BAD), ("c", GOOD)])
    book.note(1, GOOD, "a", 0, seniority)  # a fetched the run's state and holds what c holds
    assert (book.digest_of(1), book.votes[1][BAD], book.votes[1][GOOD]) == (GOOD, {"b"}, {"a", "c"})
