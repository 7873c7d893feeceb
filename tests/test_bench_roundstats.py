"""The figures of ``loconet bench membership`` from what its processes recorded (peer/bench/roundstats.py).

Every input is made up, so every figure is exact.
"""

from __future__ import annotations

import math

import pytest

from peer.bench.roundstats import coordinator_checks, cpu_floor, finite, formed_at, group_messages, round_stats
from peer.bench.simpeers import RoundRecord

pytestmark = pytest.mark.timeout(30)


def record(index: int, k: int = 0, *, round_id: int = 1, epoch: int = 0, members: int = 2, q_first: float = 10.0,
           q_sent: float | None = None, q_answered: float = 10.5, c_first: float = 11.0, c_sent: float | None = None,
           c_answered: float = 11.25, committed: bool = True, answer_bytes: int = 100,
           list_form: str = "whole") -> RoundRecord:
    """One simulated peer's round (unix seconds); a call answered at its first attempt unless q_sent/c_sent say."""
    return RoundRecord(
        index=index, k=k, round_id=round_id, epoch=epoch, members=members, quorum_first_sent=q_first,
        quorum_answered=q_answered, commit_first_sent=c_first, commit_answered=c_answered, committed=committed,
        quorum_sent=q_first if q_sent is None else q_sent, commit_sent=c_first if c_sent is None else c_sent,
        answer_bytes=answer_bytes, list_form=list_form,
    )


def test_the_cpu_floor_of_a_round_is_everyone_s_cpu_per_round_over_the_cores():
    # 5 rounds in 3 s: the coordinator spent 2.5 CPU-s and the simulated peers 3.0, on 2 cores.
    assert cpu_floor(2.5, 3.0, 3.0, rounds=5, cores=2) == {
        "wall_per_round_s": 0.6, "client_cpu_per_round_s": 0.6, "cores": 2, "cpu_floor_per_round_s": 0.55,
    }


def test_a_quorum_s_latency_runs_from_each_peer_s_first_request_and_its_close_from_the_last_request():
    # peer 0 asks at 10.0, peer 1 at 10.25; both are answered, at 10.5 and 10.75.
    stats, problems = round_stats([record(0, q_first=10.0, q_answered=10.5),
                                   record(1, q_first=10.25, q_answered=10.75)], peers=2)
    assert problems == []
    assert stats["quorum_latency_s"] == {"p50": 0.5, "p99": 0.5, "max": 0.5, "n": 2}
    assert stats["quorum_close_latency_s"]["max"] == 0.5 and stats["quorum_close_latency_s"]["n"] == 2
    (only,) = stats["per_round"]
    assert (only["quorum_spread_s"], only["quorum_close_first_s"], only["quorum_close_last_s"]) == (0.25, 0.25, 0.5)


def test_a_retried_request_closes_the_round_from_its_retry_not_its_first_attempt():
    stats, _ = round_stats([record(0, q_first=10.0, q_sent=10.25, q_answered=10.5), record(1)], peers=2)
    assert stats["per_round"][0]["quorum_close_last_s"] == 0.25
    assert stats["quorum_latency_s"]["max"] == 0.5  # the latency still counts from the first attempt


def test_the_coordinator_s_formation_time_splits_the_close_into_intake_and_answers():
    recs = [record(0, q_first=10.0, q_answered=10.5), record(1, q_first=10.25, q_answered=10.75)]
    stats, _ = round_stats(recs, peers=2, formed={(1, 0): 10.5})
    (only,) = stats["per_round"]
    assert only["formed_after_last_request_s"] == 0.25
    assert (only["answers_after_formed_first_s"], only["answers_after_formed_last_s"]) == (0.0, 0.25)
    assert stats["quorum_formed_after_last_request_s"]["n"] == 1


def test_an_attempt_the_coordinator_no_longer_remembers_has_no_formation_figures():
    stats, _ = round_stats([record(0), record(1)], peers=2, formed={})
    assert math.isnan(stats["per_round"][0]["formed_after_last_request_s"])
    assert stats["quorum_formed_after_last_request_s"]["n"] == 0


@pytest.mark.parametrize(
    ("records", "full"),
    [
        ([record(0), record(1)], 1),
        ([record(0)], 0),  # a peer never answered
        ([record(0), record(1, committed=False)], 0),  # one peer's round did not commit
        ([record(0, members=1), record(1, members=1)], 0),  # the round formed without every peer
    ],
    ids=["everyone", "a peer missing", "not committed", "members short"],
)
def test_a_round_is_full_only_when_every_peer_committed_it_with_every_peer_a_member(records, full):
    stats, _ = round_stats(records, peers=2)
    assert stats["rounds_full"] == full
    assert stats["per_round"][0]["committed_by_all"] is bool(full)


def test_peers_told_different_round_ids_in_one_round_are_a_problem():
    _, problems = round_stats([record(0, round_id=1), record(1, round_id=2)], peers=2)
    assert problems == ["round 0: peers got different round ids [1, 2] / epochs [0]"]


def test_rounds_are_reported_in_order_with_their_answer_bytes_and_list_forms():
    recs = [
        record(0, k=1, round_id=2, answer_bytes=48, list_form="omitted"),
        record(1, k=1, round_id=2, answer_bytes=48, list_form="omitted"),
        record(0, k=0, answer_bytes=6000, list_form="packed"),
        record(1, k=0, answer_bytes=6000, list_form="whole"),
    ]
    stats, _ = round_stats(recs, peers=2)
    assert [r["round_id"] for r in stats["per_round"]] == [1, 2]
    assert [r["quorum_answer_bytes"] for r in stats["per_round"]] == [12000, 96]
    assert stats["per_round"][0]["quorum_answer_lists"] == {"packed": 1, "whole": 1}
    assert stats["per_round"][1]["quorum_answer_lists"] == {"omitted": 2}


def test_a_round_s_wall_runs_from_the_first_quorum_request_to_the_last_commit_answer():
    stats, _ = round_stats([record(0, q_first=10.0, c_answered=11.5), record(1, q_first=10.25, c_answered=12.0)],
                           peers=2)
    assert stats["per_round"][0]["round_wall_s"] == 2.0
    assert stats["commit_latency_s"]["max"] == 1.0  # peer 1: sent at 11.0, answered at 12.0


def test_formed_at_reads_the_attempts_the_status_remembers():
    status = {"rounds": [{"round_id": 3, "epoch": 1, "started_at": 100.0}, {"round_id": 4, "epoch": 1}]}
    assert formed_at(status) == {(3, 1): 100.0}
    assert formed_at({}) == {}


def test_finite_drops_the_attempts_without_a_time():
    assert finite([0.5, math.nan, math.inf, 0.25]) == [0.5, 0.25]


def test_messages_are_grouped_by_shape_most_frequent_first():
    messages = ["peer 3 lease lapsed", "peer 17 lease lapsed", "round 2 aborted", "peer 5 lease lapsed"]
    assert group_messages(messages) == [
        {"count": 3, "example": "peer 3 lease lapsed"},
        {"count": 1, "example": "round 2 aborted"},
    ]


def test_a_long_message_is_shortened_and_the_groups_are_limited():
    (group,) = group_messages(["x" * 400])
    assert group == {"count": 1, "example": "x" * 300 + "..."}
    assert len(group_messages([f"kind{chr(97 + i)}" for i in range(5)], limit=3)) == 3


def status(committed: int = 2, aborted: int = 0, alive: int = 3, members: int = 3) -> dict:
    """A coordinator's status after a measurement: its summary and its committed rounds' members."""
    rounds = [{"round_id": r + 1, "status": "committed", "members": [f"p{i}" for i in range(members)]}
              for r in range(committed)]
    return {"summary": {"rounds_committed": committed, "rounds_aborted": aborted, "peers_alive": alive},
            "rounds": rounds}


@pytest.mark.parametrize(
    ("given", "rounds_full", "problems"),
    [
        (status(), 2, []),
        (status(committed=1), 2, ["coordinator committed 1 rounds, expected 2"]),
        (status(aborted=1), 2, ["coordinator aborted 1 rounds"]),
        (status(alive=2), 2, ["coordinator sees 2 live peers, expected 3"]),
        (status(members=2), 2, ["a committed round in the coordinator's history has fewer members than peers"]),
        (status(), 1, ["1 of 2 rounds committed by all 3 peers"]),
    ],
    ids=["all well", "a round short", "an abort", "a peer gone", "members short", "a peer saw a round fail"],
)
def test_the_coordinator_s_status_is_checked_against_the_rounds_and_peers_asked_for(given, rounds_full, problems):
    assert coordinator_checks(given, peers=3, rounds=2, rounds_full=rounds_full) == problems


def test_a_measurement_without_rounds_checks_only_the_live_peers():
    assert coordinator_checks(status(committed=0, alive=10), peers=10, rounds=0, rounds_full=0) == []
    assert coordinator_checks(status(committed=0, alive=9), peers=10, rounds=0, rounds_full=0) == [
        "coordinator sees 9 live peers, expected 10"
    ]
