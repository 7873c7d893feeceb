"""The history the coordinator keeps for the dashboard's charts: bounded series, what a heartbeat adds to them,
the count of peers alive, and how it all reaches the status document."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from collectives.net.rpc import blocking_channel
from peer.coordinator.config import CoordinatorConfig
from peer.coordinator.history import Series, SeriesBook
from peer.coordinator.runstate import PeerRecord, RunState
from protos import membership_pb2 as pb
from protos import membership_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).parent))
from support.coordinator import CoordinatorThread

pytestmark = pytest.mark.timeout(60)


# ---- bounded series --------------------------------------------------------------------


def test_a_series_keeps_every_point_until_it_is_full():
    series = Series(8)
    for i in range(8):
        series.append((i,))
    assert [p[0] for p in series] == list(range(8))


def test_a_full_series_thins_its_older_half_and_keeps_the_first_and_the_newest_points():
    series = Series(8)
    for i in range(9):
        series.append((i,))
    assert [p[0] for p in series] == [0, 2, 4, 5, 6, 7, 8]


def test_a_series_never_holds_more_than_its_bound():
    series = Series(10)
    for i in range(10_000):
        series.append((i,))
        assert len(series) <= 10
    assert series.last == (9999,)
    assert next(iter(series)) == (0,)  # it still starts at the beginning of the run


def test_a_series_needs_room_for_four_points():
    with pytest.raises(ValueError, match="at least 4 points"):
        Series(3)


def test_a_full_book_drops_the_series_updated_least_recently():
    book = SeriesBook(points=4, peers=2)
    book.append("a", (1,))
    book.append("b", (1,))
    book.append("a", (2,))  # "b" is now the stalest
    assert book.append("c", (1,))
    assert book.as_dict() == {"a": [[1], [2]], "c": [[1]]}


def test_a_full_book_drops_only_series_it_may_evict():
    book = SeriesBook(points=4, peers=2, evictable=lambda peer_id: peer_id == "b")
    book.append("b", (1,))
    book.append("a", (1,))
    assert book.append("c", (1,))  # takes b's place, though a is staler now
    assert not book.append("d", (1,))  # a and c must stay: d gets no series
    assert book.as_dict() == {"a": [[1]], "c": [[1]]}


def test_reading_a_series_does_not_keep_it_in_the_book():
    book = SeriesBook(points=4, peers=2)
    book.append("a", (1,))
    book.append("b", (1,))
    assert book.get("a") is not None
    book.append("c", (1,))
    assert book.get("a") is None and len(book) == 2


# ---- what a heartbeat adds ---------------------------------------------------------------


def heard(state: RunState, peer: PeerRecord, **figures) -> None:
    """The peer reports figures in a heartbeat."""
    for name, value in figures.items():
        setattr(peer, name, value)
    state.record_metrics(peer)


def joined(state: RunState, peer_id: str = "p1-0a0b0c") -> PeerRecord:
    peer = PeerRecord(peer_id=peer_id, address=f"127.0.0.1:{len(state.peers) + 1}", lease_s=5.0)
    state.add_peer(peer)
    return peer


def test_an_eval_loss_is_a_point_once_however_many_heartbeats_repeat_it():
    state = RunState("run", 1)
    peer = joined(state)
    heard(state, peer, step=10, eval_loss=2.5)
    heard(state, peer, step=12, eval_loss=2.5)
    heard(state, peer, step=20, eval_loss=2.25)
    assert state.status("", "")["eval_loss"] == {peer.peer_id: [[10, 2.5], [20, 2.25]]}


def test_a_peer_without_an_eval_has_no_eval_curve():
    state = RunState("run", 1)
    peer = joined(state)
    heard(state, peer, step=10, loss=3.0)
    status = state.status("", "")
    assert status["eval_loss"] == {}
    assert status["peers"][0]["eval_loss"] is None
    assert status["loss"] == {peer.peer_id: [[10, 3.0]]}


def test_traffic_samples_are_spaced_by_the_interval(monkeypatch):
    state = RunState("run", 1, traffic_interval_s=0.5)
    peer = joined(state)
    clock = iter([100.0, 100.2, 100.6, 101.0])
    monkeypatch.setattr("peer.coordinator.runstate.time.time", lambda: next(clock))
    for sent in (1000, 2000, 3000, 4000):
        heard(state, peer, bytes_sent=sent, bytes_received=sent // 2)
    # 100.2 is too close to 100.0; 101.0 is 0.4 s after 100.6: both skipped.
    assert state.traffic.as_dict() == {peer.peer_id: [[100.0, 1000, 500], [100.6, 3000, 1500]]}


def test_the_count_of_peers_alive_is_a_point_at_each_change():
    state = RunState("run", 1)
    a, b = joined(state, "p1-0a0b0c"), joined(state, "p2-0a0b0c")
    state.add_peer(a)  # a rejoin: no change
    state.drop_peer(b, "lost")
    counts = [n for _, n in state.status("", "")["history"]["alive"]]
    assert counts == [0, 1, 2, 1]


def run_with_many_peers(gone: set[int]) -> dict:
    """The status of 10 peers that each sent 49 heartbeats, to a state with room for 8 points of 3 peers."""
    state = RunState("run", 1, loss_points=8, eval_points=8, traffic_points=8, series_peers=3, traffic_interval_s=0.0)
    for n in range(10):
        peer = joined(state, f"p{n}-0a0b0c")
        for step in range(1, 50):
            heard(state, peer, step=step, loss=1.0 / step, eval_loss=2.0 / step, bytes_sent=step)
        if n in gone:
            state.drop_peer(peer, "left")
    return state.status("", "")


def test_the_history_keeps_the_first_live_peers_curves_when_more_peers_are_live_than_it_has_room_for():
    status = run_with_many_peers(gone=set())
    for book in (status["loss"], status["eval_loss"], status["history"]["traffic"]):
        assert sorted(book) == ["p0-0a0b0c", "p1-0a0b0c", "p2-0a0b0c"]
        assert all(len(points) <= 8 for points in book.values())


def test_a_new_peer_takes_the_place_of_the_curves_of_a_peer_that_left():
    status = run_with_many_peers(gone={1})
    for book in (status["loss"], status["eval_loss"], status["history"]["traffic"]):
        assert sorted(book) == ["p0-0a0b0c", "p2-0a0b0c", "p3-0a0b0c"]


# ---- through a real coordinator ---------------------------------------------------------------


@pytest.fixture
def coordinator():
    """An in-process coordinator (no dashboard) and a blocking stub to it."""
    live = CoordinatorThread(CoordinatorConfig(run_id="history", port=0, dashboard_port=None, startup_grace_s=0.0))
    channel = blocking_channel(live.server.address)
    yield live, pb_grpc.CoordinatorStub(channel)
    channel.close()
    live.close()


def test_a_heartbeats_eval_loss_reaches_the_status_document(coordinator):
    live, stub = coordinator
    peer_id = stub.Join(pb.JoinRequest(run_id="history", address="127.0.0.1:1", has_state=False), timeout=5).peer_id
    for step, eval_loss in ((5, math.nan), (10, 2.75), (15, 2.75)):
        metrics = pb.PeerMetrics(step=step, loss=3.0, eval_loss=eval_loss, bytes_sent=100 * step)
        assert stub.Heartbeat(pb.HeartbeatRequest(run_id="history", peer_id=peer_id, metrics=metrics), timeout=5).known
    status = live.status()
    assert status["peers"][0]["eval_loss"] == 2.75
    assert status["eval_loss"] == {peer_id: [[10, 2.75]]}
    assert status["history"]["traffic"][peer_id][0][1:] == [500, 0]
    assert [n for _, n in status["history"]["alive"]] == [0, 1]


def test_a_replicas_spread_reaches_the_status_and_its_largest_the_summary(coordinator):
    live, stub = coordinator
    ids = [stub.Join(pb.JoinRequest(run_id="history", address=f"127.0.0.1:{i}", has_state=False), timeout=5).peer_id
           for i in (1, 2)]
    for peer_id, spread in zip(ids, (0.25, 0.5)):
        metrics = pb.PeerMetrics(step=1, spread=spread)
        assert stub.Heartbeat(pb.HeartbeatRequest(run_id="history", peer_id=peer_id, metrics=metrics), timeout=5).known
    status = live.status()
    assert sorted(p["spread"] for p in status["peers"]) == [0.25, 0.5]
    assert status["summary"]["spread"] == 0.5


def test_a_heartbeat_without_a_spread_leaves_it_unknown(coordinator):
    live, stub = coordinator
    peer_id = stub.Join(pb.JoinRequest(run_id="history", address="127.0.0.1:1", has_state=False), timeout=5).peer_id
    assert stub.Heartbeat(pb.HeartbeatRequest(run_id="history", peer_id=peer_id, metrics=pb.PeerMetrics(step=1)),
                          timeout=5).known
    assert live.status()["peers"][0]["spread"] is None and live.status()["summary"]["spread"] is None
