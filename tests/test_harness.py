"""Scenarios through ``loconet harness``: real peers and coordinator, faults injected, the report checked."""

from __future__ import annotations

import pytest

from peer.coordinator.config import CoordinatorConfig
from peer.harness.harness import Harness, HarnessConfig
from peer.harness.scenario import parse_event
from peer.tasks.base import TaskConfig
from peer.runtime.training import TrainConfig

pytestmark = pytest.mark.timeout(300)

SMALL = TaskConfig(d_model=32, n_layers=2, n_heads=2, seq_len=32, batch_size=8)


def run_scenario(*events: str, peers: int = 3, steps: int = 300, lease_s: float = 3.0, **options) -> tuple[dict, Harness]:
    config = HarnessConfig(
        peers=peers,
        task_config=SMALL,
        train=TrainConfig.of("diloco", steps=steps, sync_every=20, round_timeout_s=10),
        events=tuple(parse_event(e) for e in events),
        coordinator=CoordinatorConfig(lease_s=lease_s, heartbeat_s=0.5, dashboard_port=0),
        **options,
    )
    harness = Harness(config)
    report = harness.run()
    assert harness.orphans() == [], "every child process is reaped"
    return report, harness


def assert_healthy(report: dict, alive: int) -> None:
    assert report["survivors_identical"] is True
    assert report["aborted_rounds_retried"] is True
    assert report["peers_alive"] == alive
    for event in report["events"]:
        assert event["recovery_s"] is not None, f"no round committed after {event['event']}"


def test_kill_during_a_round(tmp_path):
    report, _ = run_scenario("kill:peer2@sync3", bandwidth="4mbit", workdir=tmp_path)
    assert_healthy(report, alive=2)
    assert report["rounds_committed"] >= 5


def test_pause_beyond_the_lease_and_return(tmp_path):
    report, harness = run_scenario("pause:peer1@round2,for=4s", workdir=tmp_path, lease_s=1.5)
    assert_healthy(report, alive=3)
    resyncs = [e for e in harness.peers["peer1"].events if e["event"] == "joined"]
    assert resyncs, "the paused peer was part of the run"


def test_late_joiner(tmp_path):
    report, harness = run_scenario("join@round3", workdir=tmp_path)
    assert_healthy(report, alive=4)
    joiner = harness.peers["peer3"]
    assert any(e["event"] == "committed" for e in joiner.events)


def test_coordinator_restart(tmp_path):
    report, _ = run_scenario("restart-coordinator@round3", workdir=tmp_path)
    assert_healthy(report, alive=3)


def test_straggler(tmp_path):
    report, _ = run_scenario("straggle:peer0@round1,x=3", workdir=tmp_path)
    assert_healthy(report, alive=3)


def test_link_cut_with_netns(tmp_path):
    netns = pytest.importorskip("peer.harness.netns")
    try:
        netns.check_available()
    except netns.NetnsUnavailable as exc:
        pytest.skip(f"network namespaces unavailable: {exc}")
    # Long enough that the cut peer comes back while the others still train.
    report, _ = run_scenario("cut:peer1@round2,for=4s", workdir=tmp_path, netns=True, lease_s=1.5, steps=800)
    assert_healthy(report, alive=3)


def test_a_peer_whose_training_blows_up_restarts_from_the_run_state_and_trains_on(tmp_path):
    report, harness = run_scenario("diverge:peer1@round2", workdir=tmp_path)
    assert_healthy(report, alive=3)
    events = harness.peers["peer1"].events
    kinds = [e["event"] for e in events]
    assert "diverge-injected" in kinds
    after = kinds[kinds.index("diverge-injected"):]
    missed = [e for e in events if e["event"] == "sync-missed"]
    assert missed and "diverged" in missed[0]["reason"]
    assert "committed" in after, "the peer took part in rounds again"
    finished = next(e for e in events if e["event"] == "finished")
    assert finished["eval_loss"] < 10, "its model is finite and trained again"
