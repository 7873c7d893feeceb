"""A byzantine peer in ``loconet harness``: real processes; its events and the report say what it did."""

from __future__ import annotations

import pytest

from collectives.errors import ConfigError
from peer.coordinator.config import CoordinatorConfig
from peer.harness.harness import Harness, HarnessConfig
from peer.harness.scenario import parse_event
from peer.harness.summary import report_summary
from peer.runtime.training import TrainConfig
from peer.tasks.base import TaskConfig

pytestmark = pytest.mark.timeout(120)

TINY = TaskConfig(d_model=16, n_layers=1, n_heads=2, seq_len=16, batch_size=4, eval_batches=2)
STEPS, SYNC_EVERY = 100, 20


def test_a_signflip_peer_sends_corrupted_contributions_and_the_run_still_commits(tmp_path):
    config = HarnessConfig(
        peers=3,
        task_config=TINY,
        train=TrainConfig.of("diloco", steps=STEPS, sync_every=SYNC_EVERY, round_timeout_s=10),
        coordinator=CoordinatorConfig(lease_s=3.0, heartbeat_s=0.5, dashboard_port=0),
        events=(parse_event("byzantine:peer1@0s,attack=signflip"),),
        workdir=str(tmp_path),
        timeout_s=100,
    )
    harness = Harness(config)
    report = harness.run()
    assert harness.orphans() == []

    rounds = STEPS // SYNC_EVERY
    assert report["rounds_committed"] == rounds
    assert report["survivors_identical"] is True and report["peers_alive"] == 3
    assert [e["event"] for e in report["events"]] == ["byzantine:peer1@0s,attack=signflip"]
    assert report["events"][0]["detail"] == "peer1 sends -10 times its honest update"
    assert report["byzantine"] == {
        "peer1": {"attacks": ["signflip"], "started_at_step": 0, "contributions_corrupted": rounds,
                  "corrupted_in_committed_rounds": rounds, "refused": []},
    }
    sent = [e for e in harness.peers["peer1"].events if e["event"] == "byzantine-sent"]
    assert all(e["sent_norm"] == pytest.approx(10 * e["honest_norm"], rel=1e-5) for e in sent)
    assert "byzantine      peer1: signflip; 5 contributions corrupted, 5 in committed rounds" in report_summary(
        report, STEPS)


def test_labelflip_on_a_task_without_classes_is_refused_before_any_process_starts(tmp_path):
    config = HarnessConfig(
        peers=2,
        task_config=TINY,
        events=(parse_event("byzantine:peer1@round1,attack=labelflip"),),
        workdir=str(tmp_path),
    )
    harness = Harness(config)
    with pytest.raises(ConfigError, match="labelflip flips class labels, and task 'synthetic-lm' has no classes"):
        harness.run()
    assert harness.peers == {} and harness.coordinators == []
