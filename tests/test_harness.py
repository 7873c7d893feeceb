"""Scenarios through ``loconet harness``: real peers and coordinator, faults injected, the report checked.

Stragglers and quorum policies are in test_harness_stragglers.py (two files, so two test workers share them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from optimizers.outer_optim import OuterConfig
from peer.coordinator.config import CoordinatorConfig
from peer.runtime.training import TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from support.scenarios import assert_healthy, contributed_rounds, run_scenario

pytestmark = pytest.mark.timeout(300)


def test_peers_built_from_one_seed_keep_their_initial_state_and_fetch_nothing_at_the_start(tmp_path):
    # Round 1 waits for all three (min_peers 3): a peer slow to start on a loaded machine would otherwise join after
    # the first commit, when a joiner fetches the run's state (the fresh-clone CI at 7a0b28d saw one do so).
    coordinator = CoordinatorConfig(lease_s=3.0, heartbeat_s=0.5, dashboard_port=0, min_peers=3)
    report, harness = run_scenario(workdir=tmp_path, steps=100, coordinator=coordinator)
    assert_healthy(report, alive=3)
    joined = {name: next(e for e in proc.events if e["event"] == "joined") for name, proc in harness.peers.items()}
    assert sum(e["kept_initial"] for e in joined.values()) == 2, "every peer but the founder kept its own state"
    assert all(e["fetch"] is None for e in joined.values())
    assert report["state_sync_bytes_per_peer"] == 0 and report["restarts_from_round_0"] == []


def test_kill_during_a_round(tmp_path):
    report, _ = run_scenario("kill:peer2@sync3", bandwidth="4mbit", workdir=tmp_path)
    assert_healthy(report, alive=2)
    assert report["rounds_committed"] >= 5


def test_pause_beyond_the_lease_and_return(tmp_path):
    report, harness = run_scenario("pause:peer1@round2,for=4s", workdir=tmp_path, lease_s=1.5, steps=600)
    assert_healthy(report, alive=3)
    resumed = harness.schedule.fired[0].wall + 4
    assert contributed_rounds(harness, "peer1", after=resumed), "back from its pause, it trains with the run again"
    (event,) = report["events"]
    assert event["target"] == "peer1" and event["back_s"] > 4, "the report says when it contributed again"


def test_coordinator_restart(tmp_path):
    report, _ = run_scenario("restart-coordinator@round3", workdir=tmp_path)
    assert_healthy(report, alive=3)


def test_a_run_with_a_run_secret_goes_through_a_coordinator_restart_and_leaves_no_task_pending(tmp_path):
    # Every Session stream breaks at the restart: with a run secret, grpc.aio's interceptor used to leave a task
    # pending per broken stream, which asyncio logged as destroyed (now the credential goes as call metadata).
    report, _ = run_scenario("restart-coordinator@round3", workdir=tmp_path, token=True)
    assert_healthy(report, alive=3)
    for log in sorted(tmp_path.glob("peer*.log")):
        assert "Task was destroyed" not in log.read_text(), log.name


def test_a_late_joiner_of_a_run_with_an_adam_outer_optimizer_continues_bit_identically(tmp_path):
    # The late joiner's scenario: it fetches the run's state (Adam's moments included) and takes part.
    adam = OuterConfig(name="adam", lr=0.02)
    report, harness = run_scenario(
        "join@round3", workdir=tmp_path, train=TrainConfig.of("diloco", steps=300, sync_every=20, outer=adam),
    )
    assert_healthy(report, alive=4)
    digests = {}
    for proc in harness.peers.values():
        for e in proc.events:
            if e["event"] == "committed":
                digests.setdefault((e["round"], e["epoch"]), set()).add(e["digest"])
    joiner_rounds = {(e["round"], e["epoch"]) for e in harness.peers["peer3"].events if e["event"] == "committed"}
    assert len(joiner_rounds) >= 5
    assert all(len(digests[r]) == 1 for r in joiner_rounds), "the joiner holds the others' parameters after each round"
    # Its whole state too (Adam's moments in the order it loaded them): the coordinator saw one digest per round.
    assert "diverged" not in (tmp_path / "coordinator.log").read_text()


def test_link_cut_with_netns(tmp_path):
    availability = pytest.importorskip("peer.harness.netns.availability")
    try:
        availability.check_available()
    except availability.NetnsUnavailable as exc:
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
