"""The coordinator's soft state: how peer ids are given out, also across coordinator restarts."""

from __future__ import annotations

from peer.coordinator.runstate import PeerRecord, RunState


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
    state.add_peer(PeerRecord(peer_id="p1-0a0b0c", address="127.0.0.1:1"))
    assert state.new_peer_id("p1-0a0b0c") != "p1-0a0b0c"
