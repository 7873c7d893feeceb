"""What the harness concludes from the peers' events (peer/harness/outcome.py), one judgement per test."""

from __future__ import annotations

import pytest

from peer.harness import outcome


def committed(round_id: int, digest: str, epoch: int = 0, **fields) -> dict:
    return {"event": "committed", "round": round_id, "epoch": epoch, "digest": digest, **fields}


def fetched(kind: str, round_id: int, digest: str) -> dict:
    return {"event": kind, "round": round_id, "digest": digest}


@pytest.mark.parametrize(
    ("events", "survivors", "expected"),
    [
        ({}, [], (None, False)),
        ({"a": [committed(1, "x"), committed(2, "y")], "b": [committed(1, "x"), committed(2, "y")]}, ["a", "b"],
         (2, True)),
        ({"a": [committed(1, "x"), committed(2, "y")], "b": [committed(1, "x"), committed(2, "z")]}, ["a", "b"],
         (2, False)),
        # Judged at the last round both hold, whatever either did after it.
        ({"a": [committed(1, "x"), committed(2, "y"), committed(3, "p")], "b": [committed(1, "x"), committed(2, "y")]},
         ["a", "b"], (2, True)),
        ({"a": [], "b": []}, ["a", "b"], (None, False)),
        ({"a": []}, ["a"], (None, True)),
        # The same round id in two attempts (a rollback between them) is two different rounds.
        ({"a": [committed(3, "x", epoch=0)], "b": [committed(3, "y", epoch=1)]}, ["a", "b"], (None, False)),
        # Survivors outside the list do not count.
        ({"a": [committed(1, "x")], "b": [committed(1, "x")], "c": [committed(1, "other")]}, ["a", "b"], (1, True)),
        # No round committed (fewer steps than a sync interval): both hold the run's initial state, round 0.
        ({"a": [fetched("joined", 0, "i")], "b": [fetched("joined", 0, "i")]}, ["a", "b"], (0, True)),
        ({"a": [fetched("joined", 0, "i")], "b": [fetched("joined", 0, "j")]}, ["a", "b"], (0, False)),
    ],
    ids=["nobody", "same", "different", "last-common", "nothing-held", "lone", "other-attempt", "only-survivors",
         "initial-same", "initial-different"],
)
def test_identical_compares_the_last_round_all_survivors_hold(events, survivors, expected) -> None:
    assert outcome.identical(events, survivors) == expected


def test_last_rounds_are_each_survivors_furthest_committed_or_fetched_round() -> None:
    events = {"a": [committed(1, "x"), committed(3, "y")], "b": [committed(1, "x"), fetched("joined", 5, "z")],
              "c": [], "gone": [committed(9, "q")]}
    assert outcome.last_rounds(events, ["a", "b", "c"]) == {"a": 3, "b": 5, "c": 0}


def held(*rounds: tuple[int, str]) -> list[dict]:
    """A peer's committed events: (round, digest of the parameters after it)."""
    return [committed(r, d) for r, d in rounds]


@pytest.mark.parametrize(("fetched_state", "expected"), [
    ((3, "c"), (3, True)),  # the run's last state: compared there
    ((3, "z"), (3, False)),  # another state of the same round: found different
    ((0, ""), (2, True)),  # a restart that fetched nothing: its earlier process's rounds
], ids=["same-state", "other-state", "nothing-fetched"])
def test_a_peer_started_again_after_the_run_ended_is_judged_by_the_state_it_fetched(fetched_state, expected) -> None:
    # peer1 committed rounds 1-2 and stopped; peer0 committed round 3 and finished; peer1 came back and fetched.
    events = {"peer0": held((1, "a"), (2, "b"), (3, "c")),
              "peer1": [*held((1, "a"), (2, "b")), fetched("joined", *fetched_state)]}
    assert outcome.identical(events, ["peer0", "peer1"]) == expected


@pytest.mark.parametrize(("digest", "same"), [("c", True), ("z", False)])
def test_a_peer_that_resynced_to_the_runs_state_is_compared_at_that_round(digest: str, same: bool) -> None:
    # Asynchronous rounds: peer1 was in rounds 1-2, resynced to round 3's state, then was in round 4 (which peer0
    # missed; peer0 finished after round 3). Rounds both committed: 1 and 2; the last round both hold: 3.
    events = {"peer0": held((1, "a"), (2, "b"), (3, "c")),
              "peer1": [*held((1, "a"), (2, "b")), fetched("resynced", 3, digest), *held((4, "d"))]}
    assert outcome.identical(events, ["peer0", "peer1"]) == (3, same)


def test_a_fetched_state_is_matched_to_the_attempt_with_its_digest() -> None:
    # Round 3 committed twice (a rollback between): the joiner fetched the first attempt's state.
    events = {"a": [committed(3, "old", epoch=0)], "b": [committed(3, "old", epoch=0)],
              "c": [committed(3, "new", epoch=1)], "late": [fetched("joined", 3, "old")]}
    assert outcome.identical(events, ["a", "b", "late"]) == (3, True)


def test_a_fetched_state_matching_no_attempt_is_compared_with_the_latest_and_found_different() -> None:
    events = {"a": [committed(3, "old", epoch=0), committed(3, "new", epoch=1)], "late": [fetched("joined", 3, "bad")]}
    assert outcome.identical(events, ["a", "late"]) == (3, False)


def test_a_fetched_state_does_not_override_a_round_the_peer_committed_itself() -> None:
    events = {"a": [committed(2, "y")], "b": [committed(2, "y"), fetched("resynced", 2, "stale")]}
    assert outcome.identical(events, ["a", "b"]) == (2, True)


def test_left_behind_are_the_peers_whose_syncs_found_nobody_holding_the_state() -> None:
    waiting = {"event": "sync-missed", "error": "WaitingForState"}
    other_miss = {"event": "sync-missed", "error": "RoundAborted"}
    events = {"a": [waiting], "b": [other_miss], "c": [], "d": [waiting]}
    assert outcome.left_behind(events, ["d", "b", "c", "a"]) == ["a", "d"]


def miss(reason: str) -> dict:
    return {"event": "sync-missed", "reason": reason, "error": "GroupTooSmall"}


COMMITTED = {"event": "committed", "round": 1, "digest": "d"}


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ({}, ""),
        ({"a": [COMMITTED], "b": []}, ""),
        ({"a": [miss("x"), COMMITTED]}, ""),  # a later commit: nothing missed at the end
        ({"a": [COMMITTED, miss("x")], "b": [COMMITTED]}, "x"),
        ({"a": [miss("x")], "b": [miss("y")], "c": [miss("y")]}, "y"),  # the most common
        ({"a": [miss("y")], "b": [miss("x")]}, "x"),  # a tie: the first in sorted order
        ({"a": [miss("x"), {"event": "eval", "loss": 2.0}]}, "x"),  # other events do not count
        ({"a": [miss("")]}, ""),
    ],
)
def test_last_miss_is_the_reason_most_peers_last_syncs_did_not_commit(events, expected) -> None:
    assert outcome.last_miss(events) == expected


@pytest.mark.parametrize(
    ("rounds", "expected"),
    [
        ([], True),
        ([{"started_at": 1, "status": "committed"}], True),
        ([{"started_at": 1, "status": "aborted"}, {"started_at": 2, "status": "committed"}], True),
        ([{"started_at": 1, "status": "committed"}, {"started_at": 2, "status": "aborted"}], False),
        ([{"started_at": 1, "status": "aborted"}, {"started_at": 2, "status": "aborted"},
          {"started_at": 3, "status": "committed"}], True),
    ],
    ids=["none", "committed-only", "aborted-then-committed", "aborted-last", "two-aborted-then-committed"],
)
def test_retried_means_a_committed_round_followed_every_aborted_one(rounds, expected) -> None:
    assert outcome.retried({"rounds": rounds}) is expected


def test_retried_holds_for_a_status_without_rounds() -> None:
    assert outcome.retried({}) is True


def test_byzantine_reports_what_each_attacker_says_it_did() -> None:
    events = {
        "honest": [committed(1, "x")],
        "bad": [
            {"event": "byzantine-started", "attack": "scale", "step": 40},
            {"event": "byzantine-sent"}, {"event": "byzantine-sent"},
            {"event": "byzantine-refused", "reason": "the codec cannot carry it"},
        ],
    }
    assert outcome.byzantine(events) == {"bad": {
        "attacks": ["scale"], "started_at_step": 40, "contributions_corrupted": 2, "corrupted_in_committed_rounds": 0,
        "refused": ["the codec cannot carry it"],
    }}


def test_replicas_are_empty_without_grouped_rounds() -> None:
    assert outcome.replicas({"a": [committed(1, "x")], "b": [{"event": "eval", "spread": 0.5}]}) == {}


def test_replicas_give_the_largest_group_and_each_peers_last_spread() -> None:
    events = {
        "a": [committed(1, "x", group=2), {"event": "eval", "spread": 0.5}, {"event": "eval", "spread": 0.25}],
        "b": [committed(1, "y", group=3), {"event": "eval", "spread": None}],
    }
    assert outcome.replicas(events) == {"largest_group": 3, "spread_per_peer": {"a": 0.25}}


def test_link_utilization_is_the_median_share_of_the_cap_a_round_used() -> None:
    # 1,000,000 bits over a 1 Mbit/s link: 1 s of link time, in all-reduces of 2, 1 and 4 s.
    events = {
        "a": [committed(1, "x", bytes=125_000, allreduce_s=2.0), committed(2, "x", bytes=125_000, allreduce_s=1.0)],
        "b": [committed(1, "x", bytes=125_000, allreduce_s=4.0), committed(2, "x", bytes=125_000)],
    }
    assert outcome.link_utilization(events, 1e6) == 0.5


def test_link_utilization_is_none_without_timed_rounds() -> None:
    assert outcome.link_utilization({"a": [committed(1, "x")]}, 1e6) is None


@pytest.mark.parametrize(("values", "expected"), [([], None), ([None], None), ([1.0, None, 3.0], 2.0)])
def test_mean_of_leaves_out_unknown_values(values, expected) -> None:
    assert outcome.mean_of(values) == expected


@pytest.mark.parametrize(
    ("returncode", "signalled", "unexpected"),
    [
        (None, set(), False),  # still running
        (0, set(), False),
        (1, set(), True),
        (2, set(), True),
        (-9, set(), True),  # killed by someone else (the OOM killer)
        (-9, {9}, False),  # a kill event
        (1, {9}, False),  # a kill event's, whatever the code
        (0, {15}, False),  # a stop event, obeyed
        (-15, {15}, False),  # a stop event before the peer's handler was in place
        (1, {15}, True),  # a stop event, and the peer failed on its way out
        (-11, {19, 18}, True),  # paused and resumed, then crashed
    ],
    ids=["running", "clean", "error", "usage", "oom", "kill", "kill-code", "stop", "stop-early", "stop-failed",
         "segfault-after-pause"],
)
def test_an_exit_is_unexpected_unless_clean_or_the_end_of_a_signal_the_harness_sent(
    returncode, signalled, unexpected
) -> None:
    assert outcome.unexpected_exit(returncode, signalled) is unexpected


def test_corruptions_the_run_took_are_the_rounds_committed_while_the_attack_ran() -> None:
    # contributions_corrupted counts what was made: a refused quorum (Bulyan short of peers) committed none of them.
    events = [
        committed(1, "a"),
        {"event": "byzantine-started", "attack": "signflip", "step": 10},
        {"event": "byzantine-sent"}, committed(2, "b"),
        {"event": "byzantine-sent"},  # no round formed
        {"event": "byzantine-sent"}, committed(3, "c", contributed=False),  # applied late: not its contribution
        {"event": "byzantine-sent"}, committed(4, "d"),
        {"event": "byzantine-stopped", "attack": "signflip", "step": 40},
        committed(5, "e"),
    ]
    did = outcome.byzantine({"p": events})["p"]
    assert (did["contributions_corrupted"], did["corrupted_in_committed_rounds"]) == (4, 2)


@pytest.mark.parametrize(("members", "sent"), [
    ([4, 4, 4], 100 * 2 * 3 / 4 * 4 * 1000),  # four peers throughout
    ([3, 2, 2, 2], 100 * 2 * 1.25 / 2.25 * 4 * 1000),  # a kill after the first round: the mean count, 2.25
    ([1], 0.0),  # alone: nothing to send
    ([], 0.0),
])
def test_data_parallel_sends_for_the_mean_member_count_of_the_committed_rounds(members, sent):
    assert outcome.data_parallel_bytes(100, 1000, members) == pytest.approx(sent)


def test_the_committed_rounds_member_counts_come_from_the_status():
    status = {"rounds": [{"status": "committed", "members": ["a", "b", "c"]}, {"status": "aborted", "members": ["a"]},
                         {"status": "committed", "members": ["a", "b"]}]}
    assert outcome.committed_members(status) == [3, 2]
