"""A harness scenario that cannot finish ends at once with the reason, instead of waiting for its time limit.

Two ways a scenario cannot finish: its pending events wait for rounds or syncs after every peer has finished, or
the peers still running are all joining and wait for a state that no peer of the scenario is left to serve.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from peer.coordinator.config import CoordinatorConfig
from peer.harness.harness import ScenarioStuck, never_due, stuck_waiters
from peer.harness.scenario import parse_event
from peer.runtime.training import TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from support.scenarios import run_scenario

pytestmark = pytest.mark.timeout(300)

ROUND = parse_event("kill:peer1@round3")
SYNC = parse_event("kill:peer1@sync2")
TIMED = parse_event("join@30s")
TIMED_KILL = parse_event("kill:peer1@1000s")


@pytest.mark.parametrize(
    ("pending", "running", "restoring", "never"),
    [
        ((), False, False, False),  # nothing pending: the scenario is over
        ((ROUND,), False, False, True),  # nobody left to commit a round
        ((SYNC,), False, False, True),
        ((ROUND, SYNC), False, False, True),
        ((ROUND,), True, False, False),  # a running peer may still commit it
        ((ROUND,), False, True, False),  # a stopped peer starts again soon
        ((TIMED,), False, False, False),  # a timed join comes anyway
        ((ROUND, TIMED), False, False, False),  # and may start a peer that commits the round
        # Any other timed event would come to nobody: the harness waited for it with nothing running.
        ((TIMED_KILL,), False, False, True),
        ((TIMED_KILL, TIMED), False, False, False),
        ((TIMED_KILL,), True, False, False),
    ],
)
def test_events_never_due(pending, running, restoring, never):
    assert never_due(pending, running, restoring) is never


def status(alive: int, waiting: list[str] | None, reason: str = "no live peer holds it") -> dict:
    doc = {"summary": {"peers_alive": alive}, "waiting": None}
    if waiting is not None:
        doc["waiting"] = {
            "since": 0.0,
            "reason": reason,
            "peers": [{"name": n, "address": "", "peer_id": "", "since": 0.0} for n in waiting],
        }
    return doc


@pytest.mark.parametrize(
    ("joining", "doc", "stuck"),
    [
        (["peer1"], status(0, ["peer1"]), (["peer1"], "no live peer holds it")),
        (["peer2", "peer1"], status(0, ["peer1", "peer2"]), (["peer1", "peer2"], "no live peer holds it")),
        (["peer1", "peer2"], status(0, ["peer1"]), ([], "")),  # peer2 is not waiting
        (["peer1"], status(1, ["peer1"]), ([], "")),  # a registered peer may serve the state
        (["peer1"], status(0, None), ([], "")),  # nobody waits
        ([], status(0, ["peer1"]), ([], "")),  # nobody joining
        (["peer1"], None, ([], "")),  # no answer from the coordinator (restarting): not stuck
    ],
)
def test_stuck_waiters(joining, doc, stuck):
    assert stuck_waiters(joining, doc) == stuck


def test_a_peer_back_after_the_run_ended_without_it_ends_the_scenario_with_why(tmp_path):
    # peer1 stops at round 2 for 6 s; peer0 trains alone to its end and leaves; peer1 returns holding round 2 while
    # the run committed later rounds, so it waits for a holder that no peer of the scenario can be any more.
    # The test's own timeout stands for "not the harness's time limit" (1,800 s). An event still pending for a
    # round that no peer can commit any more does not keep the scenario going.
    with pytest.raises(
        ScenarioStuck,
        match=r"peer1 waits for the run's state .* every peer holding it finished and left.*"
        r"events not fired: kill:peer0@round99",
    ):
        run_scenario(
            "stop:peer1@round2,for=6s", "kill:peer0@round99", peers=2, workdir=tmp_path,
            train=TrainConfig.of("diloco", steps=60, sync_every=10, round_timeout_s=10),
        )


def test_a_noloco_replica_back_after_the_run_ended_without_it_goes_on_from_its_own_checkpoint(tmp_path):
    # The same scenario with NoLoCo: a replica's state is its own, so peer1, back holding round 2, has nobody to wait
    # for; it skips the rounds it missed and trains on to its end (before 2026-12-05: ScenarioStuck, chaos seed 1169).
    report, harness = run_scenario(
        "stop:peer1@round2,for=6s", peers=2, workdir=tmp_path,
        train=TrainConfig.of("noloco", steps=60, sync_every=10, round_timeout_s=10),
    )
    assert report["peers_alive"] == 2 and report["left_behind"] == []
    assert report["restarts_from_round_0"] == [] and report["rollbacks"] == []
    # Its second life took part in rounds, beyond the run's round 2 it came back behind.
    back = harness.lives("peer1")[-1]
    assert len(harness.lives("peer1")) == 2 and any(
        e["event"] == "committed" and e["contributed"] and e["round"] > 2 for e in back.events
    )


def test_peers_left_alone_after_the_last_holder_died_end_the_scenario_naming_them(tmp_path):
    # peer1 is paused past its lease as its second sync starts (so it has joined, however slowly it started); peer0
    # goes on alone and is killed at round 4, the only holder of the run's state. peer1, back, finds nobody holding
    # it and trains on alone to its end: the event due at round 99 cannot happen, and the message says why (more
    # steps would not have helped). The pause outlasts the round timeout (10 s: peer1 may be paused inside round 2)
    # and peer0's way to round 4 on a loaded machine. With 6 s, CI once saw peer1 back in time to hold round 4:
    # it committed the run's last rounds alone, and nobody was left behind.
    with pytest.raises(ScenarioStuck, match=r"kill:peer1@round99 cannot happen .*; peer1 found nobody holding the "
                                            r"run's state and trained on alone"):
        run_scenario(
            "pause:peer1@sync2,for=15s", "kill:peer0@round4", "kill:peer1@round99", peers=2, workdir=tmp_path,
            train=TrainConfig.of("diloco", steps=100, sync_every=10, round_timeout_s=10),
            coordinator=CoordinatorConfig(lease_s=2.0, heartbeat_s=0.5, dashboard_port=0),
        )
