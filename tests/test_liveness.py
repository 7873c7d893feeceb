"""Leases, tick by tick: which peers the coordinator's liveness check drops, on a clock the test moves."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from peer.coordinator import liveness
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.liveness import Liveness, lease_terms
from peer.coordinator.runstate import PeerRecord, RunState


class Clock:
    """time.monotonic for the liveness module, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(liveness.time, "monotonic", c)
    return c


def checker(clock: Clock, members: tuple[str, ...], reported: tuple[str, ...]) -> tuple[Liveness, list[str]]:
    """A liveness check of peers a, b, c (lease 3 s, last heard at the clock's start) and a round of ``members`` in
    flight in which ``reported`` have reported; the second item lists the peers it drops."""
    state = RunState(run_id="r", min_peers=1)
    for name in ("a", "b", "c"):
        state.add_peer(PeerRecord(peer_id=name, address=f"127.0.0.1:{ord(name)}", last_seen=clock.now, lease_s=3.0))
    attempt = SimpleNamespace(record=SimpleNamespace(members=list(members)), reports=dict.fromkeys(reported))
    quorums = SimpleNamespace(in_flight=lambda: attempt, pending=None)
    dropped: list[str] = []

    def mark_lost(peer: PeerRecord, why: str, kind: str) -> None:
        dropped.append(peer.peer_id)
        state.drop_peer(peer, "lost")

    return Liveness(CoordinatorConfig(probe_peers=False), state, quorums, mark_lost), dropped


def tick(check: Liveness, clock: Clock, to: float, step: float = 0.05) -> None:
    """Run the coordinator's tick every ``step`` seconds until the clock reads ``to``."""
    while clock.now < to - 1e-9:
        clock.now = min(clock.now + step, to)
        check.check()


def test_a_silent_member_of_the_round_in_flight_is_dropped_on_the_first_tick_past_its_lease(clock):
    check, dropped = checker(clock, members=("a", "b"), reported=("a",))
    start = clock.now
    # The full check runs every 0.5 s; between them, the silent member b is looked at on every tick.
    tick(check, clock, start + 3.0)
    assert dropped == []
    tick(check, clock, start + 3.05)
    assert dropped == ["b"]


def test_peers_outside_the_round_and_members_that_reported_wait_for_the_full_check(clock):
    check, dropped = checker(clock, members=("a", "b"), reported=("a",))
    check.state.peers["b"].last_seen = clock.now + 10  # b stays well within its lease
    start = clock.now
    tick(check, clock, start + 3.05)
    assert dropped == []  # a reported, c is not a member
    tick(check, clock, start + 3.5)
    assert sorted(dropped) == ["a", "c"]  # the full check, twice a second


def test_no_lease_is_judged_on_the_tick_after_the_coordinators_own_loop_stalled(clock):
    check, dropped = checker(clock, members=("a", "b"), reported=())
    start = clock.now
    tick(check, clock, start + 2.9)
    clock.now = start + 4.0  # the loop stalled 1.1 s: heartbeats may sit unread
    check.check()
    assert dropped == []


@pytest.mark.parametrize(
    ("heartbeat_s", "lease_s", "live", "terms"),
    [
        (1.0, 5.0, 0, (1.0, 5.0)),  # a small run: the configured interval and lease
        (1.0, 5.0, 500, (1.0, 5.0)),  # ~500 heartbeats a second is where slowing down starts
        (1.0, 5.0, 2000, (4.0, 12.0)),  # 2,000 peers / 500 a second; the lease three intervals
        (0.5, 3.0, 1000, (2.0, 6.0)),
        (2.0, 10.0, 750, (2.0, 10.0)),  # a longer configured interval and lease still hold
    ],
)
def test_heartbeats_slow_down_as_the_run_grows_and_the_lease_stays_three_intervals(heartbeat_s, lease_s, live, terms):
    config = CoordinatorConfig(run_id="r", dashboard_port=None, heartbeat_s=heartbeat_s, lease_s=lease_s)
    assert lease_terms(config, live) == terms
