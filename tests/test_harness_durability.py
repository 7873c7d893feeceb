"""Harness scenarios of issue 14: joiners on slow links keep the run's state, whatever happens to its holders."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from peer.runtime.training import TrainConfig
from peer.tasks.base import TaskConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_harness import run_scenario

pytestmark = pytest.mark.timeout(420)

# 0.9 MB of state to fetch: 3-4 s at 2 mbit, longer than the run's rounds below.
MEDIUM = TaskConfig(d_model=64, n_layers=2, n_heads=4, seq_len=32, batch_size=8)
# 3.2 MB: about 9 s at 3 mbit, longer than the 5 s a quorum waits for a syncing joiner plus a few rounds.
LARGER = TaskConfig(d_model=128, n_layers=2, n_heads=4, seq_len=32, batch_size=8)


def test_killing_a_holder_while_a_joiner_fetches_over_a_slow_link_loses_nothing(tmp_path):
    report, _ = run_scenario(
        "join@round2", "kill:peer0@round2", bandwidth="2mbit", workdir=tmp_path, task_config=MEDIUM,
        train=TrainConfig.of("diloco", steps=300, sync_every=20, round_timeout_s=30),
    )
    assert report["survivors_identical"] is True
    assert report["restarts_from_round_0"] == []
    assert report["rollbacks"] == []
    joiner = report["joiners"]["peer3"]
    assert joiner["fetch_bytes"] and joiner["rounds_committed"] > 0


def test_a_joiner_whose_fetch_outlasts_the_runs_rounds_catches_up_and_takes_part(tmp_path):
    report, harness = run_scenario(
        "join@round3", bandwidth="3mbit", workdir=tmp_path, task_config=LARGER,
        train=TrainConfig.of("diloco", steps=70, sync_every=5, round_timeout_s=30),
    )
    assert report["survivors_identical"] is True
    joiner = report["joiners"]["peer3"]
    fetched = next(e for e in harness.peers["peer3"].events if e["event"] == "joined")
    committed_during_fetch = sorted(  # by any of the peers that started the run (whichever took the first rounds)
        (e for n in ("peer0", "peer1", "peer2") for e in harness.peers[n].events
         if e["event"] == "committed" and e["t"] < fetched["t"]), key=lambda e: e["round"]
    )
    assert committed_during_fetch[-1]["round"] > joiner["joined_at_round"], "the run went on during the fetch"
    assert joiner["first_commit_s"] is not None and joiner["rounds_committed"] > 0, "then the joiner took part"


def test_every_peer_stops_then_one_returns_with_its_checkpoint_and_the_run_goes_on_from_its_last_round(tmp_path):
    report, harness = run_scenario(
        "stop:peer0@round3,for=5s", "stop:peer1@round3", "stop:peer2@round3", workdir=tmp_path,
        train=TrainConfig.of("diloco", steps=300, sync_every=20, round_timeout_s=10, eval_every=20),
    )
    assert report["peers_alive"] == 1, "the two peers that stayed stopped are no survivors"
    assert report["restarts_from_round_0"] == [] and report["rollbacks"] == []
    stopped_at = max(r for (r, _), t in harness.committed_rounds().items() if t < harness.schedule.fired[0].wall + 1)
    events = harness.peers["peer0"].events  # its second process
    joined = next(e for e in events if e["event"] == "joined")
    assert joined["round"] == stopped_at, "it came back holding the run's last committed round"
    rounds = [e["round"] for e in events if e["event"] == "committed"]
    assert rounds and rounds[0] == stopped_at + 1, "the run went on from there"
    # Its loss went on from where the run was, not from an untrained model's.
    before = [e["eval_loss"] for p in harness.retired for e in p.events if e["event"] == "eval"]
    after = [e["eval_loss"] for e in events if e["event"] == "eval"]
    assert after[0] < (before[-1] + report["initial_eval_loss"]) / 2


def test_a_peer_behind_the_run_when_its_holders_stop_waits_for_them_instead_of_rolling_the_run_back(tmp_path):
    # peer1 sleeps past its lease while peer0 commits round 3 alone; peer0 then stops, so when peer1 wakes
    # (holding round 2) nobody holds the run's last round, until peer0 comes back with its checkpoint.
    # Rounds of 80 steps: slower than the harness's 100 ms tick, so the pause lands between rounds 2 and 3 (at 20
    # steps, rounds 1-3 once formed within 180 ms and the pause came after peer1 had reported round 3).
    report, _ = run_scenario(
        "pause:peer1@round2,for=8s", "stop:peer0@round3,for=8s", peers=2, workdir=tmp_path,
        train=TrainConfig.of("diloco", steps=800, sync_every=80, round_timeout_s=10),
    )
    assert report["rollbacks"] == [] and report["restarts_from_round_0"] == []
    assert report["survivors_identical"] is True and report["peers_alive"] == 2
    said = (tmp_path / "coordinator.log").read_text()
    # The run's last round is 3, or 4 when peer0 had voted for it as the stop came (it then waits for the decision).
    assert re.search(r"has committed round [34] \(.*\) but no live peer holds it", said), (
        "peer1 was told to wait, and why"
    )


def test_a_peer_behind_when_the_others_finished_trains_on_to_its_end_without_rolling_the_run_back(tmp_path):
    # peer0 finishes its steps while peer1 sleeps: nobody holds the run's last round when peer1 wakes, behind.
    report, harness = run_scenario(
        "pause:peer1@round2,for=8s", peers=2, lease_s=1.5, workdir=tmp_path,
        train=TrainConfig.of("diloco", steps=120, sync_every=20, round_timeout_s=10),
    )
    assert report["rollbacks"] == [] and report["restarts_from_round_0"] == []
    assert report["peers_alive"] == 2 and report["survivors_identical"] is True
    missed = [e for e in harness.peers["peer1"].events if e["event"] == "sync-missed"]
    assert missed and "every peer holding it finished and left" in missed[-1]["reason"], (
        "each sync said why it could not take place"
    )
    assert missed[-1]["error"] == "WaitingForState"
    assert report["left_behind"] == ["peer1"], "the report says which survivor trained on alone"
