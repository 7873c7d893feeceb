"""Asynchronous DiLoCo and NoLoCo over real processes: a pause, a kill and a join in one run of each.

Async: every survivor applies every committed round exactly once (as a member or by catching up), ends with the
same global parameters as the others at the last round they all hold, and the paused peer comes back with stale
contributions that count. NoLoCo: no group larger than a pair, and the replicas' spread stays finite and bounded.
"""

from __future__ import annotations

import math

import pytest
import torch

from peer.coordinator.config import CoordinatorConfig
from peer.harness.harness import Harness, HarnessConfig
from peer.harness.scenario import parse_event
from peer.runtime.training import TrainConfig
from peer.tasks.base import TaskConfig
from peer.tasks.registry import make_task

pytestmark = pytest.mark.timeout(300)

SMALL = TaskConfig(d_model=32, n_layers=2, n_heads=2, seq_len=32, batch_size=8)
FAULTS = ("pause:peer1@round2,for=3s", "kill:peer2@round5", "join@round7")
SURVIVORS = ("peer0", "peer1", "peer3")  # peer3 is the joiner


def run(train: TrainConfig, tmp_path) -> tuple[dict, Harness]:
    config = HarnessConfig(
        peers=3, task_config=SMALL, events=tuple(parse_event(e) for e in FAULTS), train=train, workdir=str(tmp_path),
        coordinator=CoordinatorConfig(lease_s=1.5, heartbeat_s=0.5, dashboard_port=0),
    )
    harness = Harness(config)
    report = harness.run()
    assert harness.orphans() == [], "every child process is reaped"
    return report, harness


def committed(harness: Harness, name: str) -> list[dict]:
    return [e for e in harness.peers[name].events if e["event"] == "committed"]


def test_async_diloco_survives_a_pause_a_kill_and_a_join_applying_each_round_once(tmp_path):
    # Long enough that the run outlasts the pause: a peer still behind when the others finish finds no holder.
    train = TrainConfig.of("async-diloco", steps=1200, sync_every=20, buffer=2, round_timeout_s=10)
    report, harness = run(train, tmp_path)
    assert report["survivors_identical"] is True
    assert report["peers_alive"] == 3
    assert "largest_group" not in report  # rounds of the whole quorum
    # Rounds of two of three: the third may have been asked to keep some (when its heartbeat came before its sync).
    kept = report["results_kept"]
    assert set(kept) == {"results", "bytes"} and (kept["results"] == 0) == (kept["bytes"] == 0)
    for event in report["events"]:
        assert event["recovery_s"] is not None, f"no round committed after {event['event']}"
    for name in SURVIVORS:
        rounds = [(e["round"], e.get("epoch", 0)) for e in committed(harness, name)]
        assert len(rounds) == len(set(rounds)), f"{name} applied a round twice"
    # Back from its pause, peer1's contributions were stale and still counted.
    resumed = harness.schedule.fired[0].wall + 3
    late = [e for e in committed(harness, "peer1") if e["contributed"] and e["t"] > resumed]
    assert late and any(e["staleness"] > 0 for e in committed(harness, "peer1") if e["contributed"])


def test_noloco_survives_a_pause_a_kill_and_a_join_in_pairs_with_a_bounded_spread(tmp_path):
    train = TrainConfig.of("noloco", steps=300, sync_every=20, eval_every=60, odd="idle", round_timeout_s=10)
    report, harness = run(train, tmp_path)
    assert report["peers_alive"] == 3
    for event in report["events"]:
        assert event["recovery_s"] is not None, f"no round committed after {event['event']}"
    groups = {e["group"] for name in SURVIVORS for e in committed(harness, name)}
    assert groups <= {1, 2}, "no group larger than a pair"
    assert report["largest_group"] == max(groups) and set(report["spread_per_peer"]) >= set(SURVIVORS)
    spreads = [e["spread"] for name in SURVIVORS for e in harness.peers[name].events
               if e["event"] == "eval" and e.get("spread") is not None]
    assert spreads and all(math.isfinite(s) for s in spreads)
    # Bounded. With three peers and odd="idle" one replica trains alone each round, and the draw can leave the same
    # one alone several rounds running, so replicas part by a few outer steps' worth of local training: up to 1.5
    # here, against an initial weights' norm of 13 and about 9.5 travelled from the initial weights by step 300.
    # (CI once measured 3.6: the paused peer could not fetch a replica after a spread round and trained on from
    # its own stale one; tests/test_noloco.py has that case.) Each pair's exact mean is tested there too.
    initial = make_task("synthetic-lm", SMALL).build_model()
    norm = float(torch.cat([p.detach().reshape(-1) for p in initial.parameters()]).norm())
    assert max(spreads) < 0.5 * norm, spreads
    assert all(math.isfinite(loss) for loss in report["eval_loss_per_peer"].values())
