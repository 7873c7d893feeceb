"""The silence that took every lease (peer/coordinator/silence.py): when it counts as an outage, how long quorums
hold."""

from __future__ import annotations

import math

import pytest

from peer.coordinator.silence import Silence


def outage(*peers: str) -> Silence:
    """A Silence in which peers lapsed one by one with nothing heard, the last leaving none live."""
    s = Silence()
    for i, p in enumerate(peers):
        s.lapse(p, live_left=len(peers) - 1 - i)
    return s


@pytest.mark.parametrize(
    "lapses, heard_between, taken",
    [
        # (peer, live peers left after it) in order; a call heard after the first lapse or not
        ([("a", 2), ("b", 1), ("c", 0)], False, {"a", "b", "c"}),  # every lease lapsed in one silence
        ([("a", 2), ("b", 1)], False, set()),  # c is still live: its calls come through
        ([("a", 2), ("b", 1), ("c", 0)], True, {"b", "c"}),  # a call came after a's lapse: b and c were the rest
        ([("a", 0)], False, set()),  # a one-peer run's quiet peer is not an outage
        ([("a", 1), ("b", 0)], False, {"a", "b"}),
    ],
)
def test_an_outage_is_every_live_lease_lapsing_with_no_call_heard(lapses, heard_between, taken):
    s = Silence()
    got: frozenset[str] = frozenset()
    for i, (peer, left) in enumerate(lapses):
        got = s.lapse(peer, left) or got
        if heard_between and i == 0:
            s.heard(10.0)
    assert got == taken


def test_quorums_hold_while_the_outage_lasts():
    assert outage("a", "b").settle_age(100.0, live=set(), grace_s=5.0) == 0.0


@pytest.mark.parametrize(
    "now, live, age",
    [
        (101.0, {"a"}, 1.0),  # b is not back, within the grace: hold
        (104.9, {"a"}, pytest.approx(4.9)),
        (105.0, {"a"}, math.inf),  # the grace passed: no more holding for b
        (101.0, {"a", "b"}, math.inf),  # every peer it took is back
        (101.0, {"a", "b", "z"}, math.inf),
    ],
)
def test_after_the_first_call_quorums_hold_until_all_are_back_or_the_grace_passed(now, live, age):
    s = outage("a", "b")
    s.heard(100.0)
    s.heard(100.5)  # later calls do not move the end
    assert s.settle_age(now, live=live, grace_s=5.0) == age


def test_no_outage_no_hold():
    s = Silence()
    s.lapse("a", live_left=3)
    assert s.settle_age(0.0, live=set(), grace_s=5.0) == math.inf


def test_a_new_outage_replaces_the_last():
    s = outage("a", "b")
    s.heard(100.0)
    s.lapse("c", live_left=1)
    assert s.lapse("d", live_left=0) == {"c", "d"}
    s.heard(200.0)
    assert s.settle_age(201.0, live={"c"}, grace_s=5.0) == 1.0
