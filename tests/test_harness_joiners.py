"""The harness's figures about joiners, restarts from round 0 and rollbacks, from peers' events."""

from __future__ import annotations

from peer.harness.joiners import joiner_figures, joiners, restarts_from_round_0, rollbacks


def ev(event: str, t: float, **fields) -> dict:
    return {"event": event, "t": t, **fields}


JOINER = [
    ev("waiting", 0.0),
    ev("connecting", 10.0),
    ev("joined", 31.0, round=4, sync_s=21.0,
       fetch={"seconds": 20.5, "total_bytes": 52_000_000, "bytes_by_source": {"a": 30_000_000, "b": 22_000_000}}),
    ev("committed", 33.0, round=5, contributed=False, fetched_bytes=6_500_000),
    ev("committed", 35.0, round=6, contributed=False, fetched_bytes=6_500_000),
    ev("committed", 47.0, round=7, contributed=True),
    ev("committed", 59.0, round=8, contributed=True),
]


def test_a_joiner_reports_its_fetch_its_catch_up_and_its_first_own_commit():
    assert joiner_figures(JOINER) == {
        "joined_at_round": 4,
        "fetch_s": 20.5,
        "fetch_bytes": 52_000_000,
        "fetch_sources": 2,
        "rounds_caught_up": 2,
        "catch_up_bytes": 13_000_000,
        "first_commit_s": 37.0,
        "rounds_committed": 2,
    }


def test_a_peer_that_never_joined_has_no_figures():
    assert joiner_figures([ev("waiting", 0.0), ev("connecting", 1.0)]) is None


def test_a_joiner_without_a_fetch_report_falls_back_to_its_sync_time():
    figures = joiner_figures([ev("connecting", 0.0), ev("joined", 2.0, round=3, sync_s=1.5)])
    assert (figures["fetch_s"], figures["fetch_bytes"], figures["first_commit_s"]) == (1.5, None, None)


def test_joiners_lists_only_the_late_peers_that_joined():
    events = {"peer0": [ev("connecting", 0.0), ev("joined", 0.5, round=0)], "peer3": JOINER, "peer4": []}
    assert list(joiners(events, ["peer3", "peer4"])) == ["peer3"]


def test_a_peer_joining_at_round_0_after_the_run_committed_is_a_restart():
    events = {
        "peer0": [ev("joined", 0.0, round=0), ev("committed", 5.0, round=1)],
        "peer1": [ev("joined", 0.1, round=0), ev("committed", 5.0, round=1)],
        "peer2": [ev("joined", 9.0, round=0)],
        "peer3": [ev("joined", 9.0, round=1)],
        # It fetched round 0's state, pinned at its source, while the first rounds committed: no restart.
        "peer4": [ev("joined", 9.0, round=0, fetch={"seconds": 8.5, "total_bytes": 100})],
        # It kept its initial state, the founder's, as the coordinator allows only before the first commit (its
        # join was answered then; its event came after): no restart.
        "peer5": [ev("joined", 5.1, round=0, kept_initial=True)],
    }
    assert restarts_from_round_0(events) == ["peer2"]


def test_no_commit_yet_means_no_restart():
    assert restarts_from_round_0({"peer0": [ev("joined", 0.0, round=0)], "peer1": [ev("joined", 3.0, round=0)]}) == []


def test_rollbacks_are_the_coordinators_rollback_events():
    status = {"events": [{"kind": "join", "detail": "x"}, {"kind": "rollback", "detail": "continuing from round 2"}]}
    assert rollbacks(status) == ["continuing from round 2"]
