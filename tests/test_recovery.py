"""What a fault cost the survivors (peer/harness/recovery.py): the affected sync over a normal one, case by case."""

from __future__ import annotations

import pytest

from peer.harness.recovery import back_s, lost_s, peer_lost_s

# Four syncs of 1 s, committed at t = 10, 20, 30, 40.
STEADY = [(10.0, 1.0), (20.0, 1.0), (30.0, 1.0), (40.0, 1.0)]


@pytest.mark.parametrize(("name", "at", "syncs", "lost"), [
    ("no sync after the event", 45.0, STEADY, None),
    ("an event that cost nothing", 15.0, STEADY, 0.0),
    ("the affected sync took 4 s more", 15.0, [(10.0, 1.0), (20.0, 5.0), (30.0, 1.0), (40.0, 1.0)], 4.0),
    ("only the first sync after the event counts", 15.0, [(10.0, 1.0), (20.0, 1.0), (30.0, 9.0)], 0.0),
    ("a sync that started before the event is the affected one", 19.5, [(10.0, 1.0), (20.0, 3.0), (30.0, 1.0)], 2.0),
    ("the median is the normal sync", 5.0, [(10.0, 2.0), (20.0, 1.0), (30.0, 1.0), (40.0, 1.0)], 1.0),
])
def test_a_peers_lost_time_is_its_affected_sync_over_its_median_sync(name, at, syncs, lost):
    assert peer_lost_s(at, syncs) == lost


def test_the_event_costs_the_median_over_the_survivors():
    syncs = {
        "a": [(10.0, 1.0), (20.0, 3.0), (30.0, 1.0)],  # 2 s lost
        "b": [(10.0, 1.0), (21.0, 4.0), (30.0, 1.0)],  # 3 s
        "c": [(10.0, 1.0), (22.0, 1.5), (30.0, 1.0)],  # 0.5 s: a peer the fault barely touched
    }
    assert lost_s(15.0, syncs) == 2.0


def test_peers_without_a_sync_after_the_event_are_left_out():
    assert lost_s(15.0, {"a": [(10.0, 1.0), (20.0, 2.0), (30.0, 1.0)], "gone": [(10.0, 1.0)]}) == 1.0
    assert lost_s(15.0, {"gone": [(10.0, 1.0)]}) is None
    assert lost_s(15.0, {}) is None


@pytest.mark.parametrize(("name", "at", "out_s", "contributed", "back"), [
    ("back in the first round after the event", 15.0, 1.0, [10.0, 20.0, 30.0], 5.0),
    ("out for two rounds", 15.0, 1.0, [10.0, 40.0], 25.0),
    ("a round it finished while it stopped is no return", 15.0, 4.0, [10.0, 15.1, 30.0], 15.0),
    ("never contributed again", 15.0, 1.0, [10.0], None),
    ("nothing at all", 15.0, 1.0, [], None),
])
def test_a_peer_taken_out_is_back_at_its_first_contribution_after_the_event_is_over(name, at, out_s, contributed, back):
    assert back_s(at, out_s, contributed) == back
