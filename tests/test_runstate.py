"""The coordinator's soft state: how peer ids are given out (also across coordinator restarts), round ids, and the
committed rounds it remembers for catch-up."""

from __future__ import annotations

import pytest

from peer.coordinator.rules import CommittedRound
from peer.coordinator.runstate import PeerRecord, RoundRecord, RunState


def test_fresh_ids_are_distinct_and_carry_the_coordinators_tag():
    state = RunState("run", 1)
    ids = [state.new_peer_id() for _ in range(3)]
    assert ids == [f"p{n}-{state.incarnation}" for n in (1, 2, 3)]


def test_a_restarted_coordinator_never_gives_out_an_id_its_predecessor_did():
    before, after = RunState("run", 1), RunState("run", 1)
    old = {before.new_peer_id() for _ in range(5)}
    # A peer of the old coordinator that has not rejoined yet must stay unknown, not be mistaken for a new peer.
    assert not old & {after.new_peer_id() for _ in range(5)}


def test_a_rejoining_peer_keeps_its_id_when_it_is_free():
    state = RunState("run", 1)
    assert state.new_peer_id("p7-0a0b0c") == "p7-0a0b0c"


def test_an_id_held_by_a_live_peer_is_not_given_out_twice():
    state = RunState("run", 1)
    state.add_peer(PeerRecord(peer_id="p1-0a0b0c", address="127.0.0.1:1", lease_s=5.0))
    assert state.new_peer_id("p1-0a0b0c") != "p1-0a0b0c"


def test_a_peer_that_rejoins_under_its_id_keeps_its_counters_until_its_next_heartbeat():
    # Counters that dipped to 0 would read as a reset to Prometheus, which would count the peer's history again.
    state = RunState("run", 1)
    state.add_peer(
        PeerRecord(
            peer_id="p1-0a0b0c",
            address="127.0.0.1:1",
            lease_s=5.0,
            bytes_sent=700,
            bytes_received=600,
            samples=50,
            step=9,
        )
    )
    state.drop_peer(state.peers["p1-0a0b0c"], "lost")
    state.add_peer(PeerRecord(peer_id="p1-0a0b0c", address="127.0.0.1:1", lease_s=5.0))
    again = state.peers["p1-0a0b0c"]
    assert (again.bytes_sent, again.bytes_received, again.samples, again.step) == (700, 600, 50, 9)


def _registrations(*joins: tuple[str, str, str | None]) -> list[int]:
    """Each join (peer id, address, then "lost" or "left" to drop it, or None): the registration it got."""
    state, got = RunState("run", 1), []
    for peer_id, address, then in joins:
        state.add_peer(PeerRecord(peer_id=peer_id, address=address, lease_s=5.0))
        got.append(state.peers[peer_id].registration)
        if then:
            state.drop_peer(state.peers[peer_id], then)
    return got


@pytest.mark.parametrize("joins, registrations", [
    ([("p1", "h:1", None), ("p2", "h:2", None)], [1, 2]),  # each peer its own
    ([("p1", "h:1", None), ("p1", "h:1", None)], [1, 1]),  # a live peer joining again from its address: the same
    ([("p1", "h:1", "lost"), ("p1", "h:1", None)], [1, 2]),  # its lease lapsed (a cut): a new one
    ([("p1", "h:1", "left"), ("p1", "h:1", None)], [1, 2]),  # it left and came back
    ([("p1", "h:1", None), ("p1", "h:9", None)], [1, 2]),  # from another address
])
def test_a_peer_gets_a_new_registration_unless_it_joins_again_live_from_its_address(joins, registrations):
    assert _registrations(*joins) == registrations


def test_a_joiner_that_joins_again_while_syncing_struggles_until_it_leaves_the_live_set():
    state = RunState("run", 1)
    state.add_peer(PeerRecord(peer_id="p3-0a0b0c", address="127.0.0.1:3", lease_s=5.0, state="syncing"))
    assert state.struggling == set()  # a first fetch: quorums wait for it
    state.add_peer(PeerRecord(peer_id="p3-0a0b0c", address="127.0.0.1:3", lease_s=5.0, state="syncing"))
    assert state.struggling == {"p3-0a0b0c"} and state.peers["p3-0a0b0c"].sync_failures == 1
    state.drop_peer(state.peers["p3-0a0b0c"], "lost")
    assert state.struggling == set()


def test_a_peer_out_of_the_run_is_shown_doing_nothing():
    state = RunState("run", 1)
    state.add_peer(PeerRecord(peer_id="p1-0a0b0c", address="127.0.0.1:1", lease_s=5.0, activity="training"))
    state.drop_peer(state.peers["p1-0a0b0c"], "lost")
    assert state.peers["p1-0a0b0c"].activity == ""


def record(round_id: int, epoch: int = 0, members: tuple[str, ...] = ("a", "b")) -> RoundRecord:
    return RoundRecord(round_id, epoch, list(members), 0.0, tag="t")


def test_the_next_round_id_is_the_last_committed_one_plus_one():
    state = RunState("run", 1)
    assert state.next_round_id == 1
    state.record_commit(record(1))
    assert (state.last_committed_round, state.next_round_id) == (1, 2)


def test_only_the_last_catchup_rounds_committed_rounds_are_remembered():
    state = RunState("run", 1, catchup_rounds=2)
    for round_id in (1, 2, 3):
        state.record_commit(record(round_id, epoch=round_id))
    assert list(state.committed) == [CommittedRound(2, 2, "t", ("a", "b")), CommittedRound(3, 3, "t", ("a", "b"))]


def test_no_catchup_rounds_remembers_none():
    state = RunState("run", 1, catchup_rounds=0)
    state.record_commit(record(1))
    assert (state.last_committed_round, list(state.committed)) == (1, [])


def test_a_roll_back_forgets_the_later_rounds_and_asks_for_a_new_epoch():
    state = RunState("run", 1)
    for round_id in (1, 2, 3):
        state.record_commit(record(round_id))
    state.roll_back(1)
    assert (state.last_committed_round, state.next_round_id, state.bump_epoch) == (1, 2, True)
    assert [c.round_id for c in state.committed] == [1]


def test_the_status_marks_the_members_of_the_last_committed_round():
    state = RunState("run", 1, policy="sample:0.5")
    for peer_id in "abcd":
        state.add_peer(PeerRecord(peer_id=peer_id, address=f"127.0.0.1:{ord(peer_id)}", lease_s=5.0))
    assert [p["in_last_round"] for p in state.status("here", "0")["peers"]] == [False] * 4
    state.record_commit(RoundRecord(1, 0, ["b", "c"], 0.0, candidates=list("abcd")))
    state.record_commit(RoundRecord(2, 1, ["a", "c"], 0.0, candidates=list("abcd")))
    doc = state.status("here", "0")
    assert {p["peer_id"]: p["in_last_round"] for p in doc["peers"]} == {"a": True, "b": False, "c": True, "d": False}
    assert doc["quorum_policy"] == "sample:0.5"
