"""Harness scenarios of issue 14: joiners on slow links keep the run's state, whatever happens to its holders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from peer.runtime.training import TrainConfig
from peer.tasks.base import TaskConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_harness import run_scenario  # noqa: E402

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
        train=TrainConfig.of("diloco", steps=100, sync_every=5, round_timeout_s=30),
    )
    assert report["survivors_identical"] is True
    joiner = report["joiners"]["peer3"]
    fetched = next(e for e in harness.peers["peer3"].events if e["event"] == "joined")
    committed_during_fetch = [
        e for e in harness.peers["peer0"].events if e["event"] == "committed" and e["t"] < fetched["t"]
    ]
    assert committed_during_fetch[-1]["round"] > joiner["joined_at_round"], "the run went on during the fetch"
    assert joiner["first_commit_s"] is not None and joiner["rounds_committed"] > 0, "then the joiner took part"
