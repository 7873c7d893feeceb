"""The coordinator forgets peers long gone: the rule, the run state that applies it, and a stream of joins."""

from __future__ import annotations

import json

import pytest

from collectives.errors import ConfigError
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.forgetting import GONE_PEER_TTL_S, KEEP_GONE_PEERS, ForgetRule, peers_to_forget
from peer.coordinator.runstate import PeerRecord, RunState
from peer.coordinator.service import Coordinator
from protos import membership_pb2 as pb

GONE = [("a", 10.0), ("b", 20.0), ("c", 30.0), ("d", 40.0)]  # in the order they went


# ---- the rule --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keep", "max_age_s", "now", "forgotten"),
    [
        (4, None, 1e9, []),  # as many as it keeps, no time limit: nothing goes
        (10, None, 1e9, []),
        (3, None, 50.0, ["a"]),  # one too many: the one that went first
        (1, None, 50.0, ["a", "b", "c"]),
        (0, None, 50.0, ["a", "b", "c", "d"]),  # keep none: every gone peer is forgotten at once
        (4, 25.0, 50.0, ["a", "b"]),  # went more than 25 s before now
        (4, 25.0, 45.0, ["a"]),
        (4, 20.0, 50.0, ["a", "b"]),  # exactly max_age_s ago (c) is still kept
        (3, 25.0, 50.0, ["a", "b"]),  # both bounds: the count forgets a, the age b
        (2, 35.0, 50.0, ["a", "b"]),
        (4, 1.0, 100.0, ["a", "b", "c", "d"]),
    ],
)
def test_peers_to_forget(keep, max_age_s, now, forgotten):
    assert peers_to_forget(GONE, now, ForgetRule(keep, max_age_s)) == forgotten


def test_nobody_gone_means_nothing_to_forget():
    assert peers_to_forget([], 1e9, ForgetRule(0, 1.0)) == []


def test_by_default_64_gone_peers_are_kept_for_an_hour():
    assert ForgetRule() == ForgetRule(KEEP_GONE_PEERS, GONE_PEER_TTL_S) == ForgetRule(64, 3600.0)


@pytest.mark.parametrize(("keep", "max_age_s"), [(-1, None), (4, 0.0), (4, -5.0)])
def test_a_rule_that_cannot_hold_is_a_config_error(keep, max_age_s):
    with pytest.raises(ConfigError):
        ForgetRule(keep, max_age_s)


# ---- the run state ----------------------------------------------------------------


def join(state: RunState, n: int, bytes_sent: int = 0) -> PeerRecord:
    peer = PeerRecord(
        peer_id=f"p{n}", address=f"127.0.0.1:{10000 + n}", lease_s=5.0, bytes_sent=bytes_sent, bytes_received=1
    )
    state.add_peer(peer)
    return peer


def churned(live: int, gone: int, rule: ForgetRule | None = None) -> RunState:
    """A run with `live` peers that stay, then `gone` peers that each joined and left (default forget rule)."""
    state = RunState("r", 1, forget=rule or ForgetRule())
    for n in range(live):
        join(state, n)
    for n in range(live, live + gone):
        state.drop_peer(join(state, n, bytes_sent=10), "left" if n % 2 else "lost")
    return state


def test_the_run_remembers_only_the_64_peers_that_went_last():
    state = churned(live=3, gone=1000)
    gone = [p for p in state.peers.values() if not p.alive]
    assert sorted(p.peer_id for p in gone) == sorted(f"p{n}" for n in range(1003 - 64, 1003))
    assert state.peers_forgotten == 1000 - 64


def test_live_peers_are_never_forgotten():
    state = churned(live=100, gone=1000, rule=ForgetRule(keep=0, max_age_s=1.0))
    state.forget_gone(now=1e12)
    assert sorted(state.peers) == sorted(f"p{n}" for n in range(100))
    assert state.live == set(state.peers)


def test_gone_peers_are_forgotten_after_their_time():
    state = churned(live=2, gone=10, rule=ForgetRule(keep=64, max_age_s=60.0))
    went = max(state.gone.values())
    assert state.forget_gone(now=went + 30.0) == []
    assert len(state.forget_gone(now=went + 61.0)) == 10
    assert sorted(state.peers) == ["p0", "p1"]


def test_the_status_lists_live_and_remembered_peers_and_counts_the_forgotten():
    status = churned(live=3, gone=1000).status("127.0.0.1:7070", "test")
    assert len(status["peers"]) == 3 + 64
    assert status["summary"]["peers_alive"] == 3
    assert status["summary"]["peers_forgotten"] == 936


def test_forgotten_peers_traffic_stays_in_the_run_totals():
    # The totals are Prometheus counters: forgetting a peer must not make them go down.
    status = churned(live=3, gone=1000).status("127.0.0.1:7070", "test")
    assert status["summary"]["bytes_sent"] == 1000 * 10
    assert status["summary"]["bytes_received"] == 1003


def test_a_peer_that_joins_again_under_its_id_is_no_longer_gone():
    state = RunState("r", 1, forget=ForgetRule(keep=1, max_age_s=None))
    state.drop_peer(join(state, 1), "lost")
    join(state, 1)  # back, same id
    state.drop_peer(join(state, 2), "left")
    state.drop_peer(join(state, 3), "left")
    assert sorted(state.peers) == ["p1", "p3"]
    assert state.peers["p1"].alive


def test_the_event_list_is_bounded_by_twice_the_history():
    state = RunState("r", 1, history=50)
    for n in range(10_000):
        state.event("join", f"p{n}", "x" * 1000)
    assert len(state.events) == 100
    assert [e.peer_id for e in state.events][-1] == "p9999"
    assert all(len(e.detail) == 500 for e in state.events)


# ---- a stream of joins against the coordinator ----------------------------------------


def test_a_stream_of_joins_from_one_address_leaves_one_live_peer_and_64_gone():
    coordinator = Coordinator(CoordinatorConfig(run_id="r", dashboard_port=None, probe_peers=False))
    for _ in range(2000):
        # Each join from the address replaces the previous process there (it is marked gone).
        last = coordinator._join(pb.JoinRequest(run_id="r", address="127.0.0.1:9999"))
    state = coordinator.state
    assert state.live == {last.peer_id}
    assert len(state.peers) == 1 + 64
    status = coordinator.status()
    assert status["summary"]["peers_forgotten"] == 2000 - 1 - 64
    assert len(status["events"]) == 2 * CoordinatorConfig().history


def test_the_status_document_stays_small_after_10000_joins():
    # Before forgetting, 100,000 joins made /api/status 47 MB. Now: 65 peers, 1,000 events (the default history).
    coordinator = Coordinator(CoordinatorConfig(run_id="r", dashboard_port=None, probe_peers=False))
    for _ in range(10_000):
        coordinator._join(pb.JoinRequest(run_id="r", address="127.0.0.1:9999"))
    status = coordinator.status()
    assert len(status["peers"]) == 65
    assert len(json.dumps(status)) < 250_000


def test_a_forgotten_peer_is_told_it_is_unknown_and_joins_again():
    coordinator = Coordinator(CoordinatorConfig(run_id="r", dashboard_port=None, probe_peers=False))
    first = coordinator._join(pb.JoinRequest(run_id="r", address="127.0.0.1:9999")).peer_id
    for _ in range(100):
        coordinator._join(pb.JoinRequest(run_id="r", address="127.0.0.1:9999"))
    assert first not in coordinator.state.peers
    answer = coordinator._heartbeat(pb.HeartbeatRequest(run_id="r", peer_id=first))
    assert answer.known is False
