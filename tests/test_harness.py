"""Scenarios through ``loconet harness``: real peers and coordinator, faults injected, the report checked."""

from __future__ import annotations

import json

import pytest

from optimizers.outer_optim import OuterConfig
from peer.coordinator.config import CoordinatorConfig
from peer.harness.harness import Harness, HarnessConfig
from peer.harness.scenario import parse_event
from peer.runtime.training import TrainConfig
from peer.stragglers import RandomStragglers
from peer.tasks.base import TaskConfig

pytestmark = pytest.mark.timeout(300)

SMALL = TaskConfig(d_model=32, n_layers=2, n_heads=2, seq_len=32, batch_size=8)


def run_scenario(*events: str, peers: int = 3, steps: int = 300, lease_s: float = 3.0, **options) -> tuple[dict, Harness]:
    options.setdefault("train", TrainConfig.of("diloco", steps=steps, sync_every=20, round_timeout_s=10))
    options.setdefault("coordinator", CoordinatorConfig(lease_s=lease_s, heartbeat_s=0.5, dashboard_port=0))
    options.setdefault("task_config", SMALL)
    config = HarnessConfig(peers=peers, events=tuple(parse_event(e) for e in events), **options)
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
        assert event["lost_s"] is not None, f"no survivor synced after {event['event']}"


def test_kill_during_a_round(tmp_path):
    report, _ = run_scenario("kill:peer2@sync3", bandwidth="4mbit", workdir=tmp_path)
    assert_healthy(report, alive=2)
    assert report["rounds_committed"] >= 5


def contributed_rounds(harness: Harness, name: str, after: float = 0.0) -> set[int]:
    """Round ids the peer's own contribution went into, among those it committed after wall time ``after``."""
    return {
        e["round"] for e in harness.peers[name].events
        if e["event"] == "committed" and e["contributed"] and e["t"] > after
    }


def test_pause_beyond_the_lease_and_return(tmp_path):
    report, harness = run_scenario("pause:peer1@round2,for=4s", workdir=tmp_path, lease_s=1.5, steps=600)
    assert_healthy(report, alive=3)
    resumed = harness.fired[0].wall + 4
    assert contributed_rounds(harness, "peer1", after=resumed), "back from its pause, it trains with the run again"


def test_late_joiner(tmp_path):
    report, harness = run_scenario("join@round3", workdir=tmp_path)
    assert_healthy(report, alive=4)
    joiner = harness.peers["peer3"]
    assert any(e["event"] == "committed" for e in joiner.events)


def test_coordinator_restart(tmp_path):
    report, _ = run_scenario("restart-coordinator@round3", workdir=tmp_path)
    assert_healthy(report, alive=3)


def test_a_straggler_is_waited_for_in_every_round_not_dropped(tmp_path):
    report, harness = run_scenario("straggle:peer0@round1,x=3", workdir=tmp_path)
    assert_healthy(report, alive=3)
    assert report["rounds_aborted"] == 0
    straggling = harness.fired[0].wall
    later = {r for (r, _), t in harness.committed_rounds().items() if t > straggling}
    assert later and later <= contributed_rounds(harness, "peer0"), "every round after the slowdown had peer0 in it"
    # Round ids are the run's round numbers: 1, 2, 3... with no gaps.
    assert sorted(r for r, _ in harness.committed_rounds()) == list(range(1, report["rounds_committed"] + 1))
    assert report["identical_at_round"] == report["rounds_committed"]


def controls(workdir, peers: int) -> list[dict]:
    """What each peer's control file asks of it."""
    return [json.loads((workdir / f"peer{i}.control.json").read_text()) for i in range(peers)]


def test_a_pattern_event_tells_every_peer_the_pattern_and_its_worker_number_until_it_ends(tmp_path):
    harness = Harness(HarnessConfig(peers=3, task_config=SMALL, workdir=str(tmp_path)))
    fired = harness._fire(parse_event("straggle:random@0s,x=4,seed=2,for=5s"), now=100.0)
    assert controls(tmp_path, 3) == [{"straggle": "random,x=4,seed=2", "worker": i, "n": 3} for i in range(3)]
    assert fired.restore_at == 105.0
    assert fired.detail == "one random worker 4x slower at each step (seed 2), over 3 peers"
    harness._restore(fired)
    assert controls(tmp_path, 3) == [{"straggle": None, "worker": i, "n": 3} for i in range(3)]


def test_a_joiner_becomes_one_more_worker_of_the_pattern(tmp_path):
    events = (parse_event("straggle:bursty@0s,B=1,W=2,lambda=1,x=4"), parse_event("join@round3"))
    harness = Harness(HarnessConfig(peers=2, task_config=SMALL, workdir=str(tmp_path), events=events))
    harness._joiners = ["peer2"]  # as run() starts it, idle behind its gate
    harness._fire(events[0], now=0.0)
    assert controls(tmp_path, 2) == [{"straggle": "bursty,B=1,W=2,lambda=1,x=4", "worker": i, "n": 2} for i in range(2)]
    harness._fire(events[1], now=1.0)
    assert controls(tmp_path, 3) == [{"straggle": "bursty,B=1,W=2,lambda=1,x=4", "worker": i, "n": 3} for i in range(3)]


def test_a_later_pattern_replaces_an_earlier_one_whose_end_then_changes_nothing(tmp_path):
    harness = Harness(HarnessConfig(peers=2, task_config=SMALL, workdir=str(tmp_path)))
    first = harness._fire(parse_event("straggle:random@0s,x=4,for=10s"), now=0.0)
    harness._fire(parse_event("straggle:persistent@1s,worker=1,x=2"), now=1.0)
    harness._restore(first)
    assert [c["straggle"] for c in controls(tmp_path, 2)] == ["persistent,worker=1,x=2"] * 2
    harness._fire(parse_event("straggle:none@2s"), now=2.0)
    assert [c["straggle"] for c in controls(tmp_path, 2)] == [None, None]


def test_every_peer_follows_a_random_straggler_pattern_as_its_worker_number(tmp_path):
    report, harness = run_scenario("straggle:random@round1,x=3", "straggle:none@round8", workdir=tmp_path)
    assert_healthy(report, alive=3)
    pattern = RandomStragglers(x=3)
    for worker in range(3):
        events = harness.peers[f"peer{worker}"].events
        started = next(e for e in events if e["event"] == "straggle-started")
        stopped = next(e for e in events if e["event"] == "straggle-stopped")
        assert (started["pattern"], started["worker"], started["n"]) == ("random,x=3", worker, 3)
        # Each step the peer took under the pattern was slowed when the pattern picked it, and only then.
        steps = range(started["step"], stopped["step"])
        assert len(steps) > 0
        assert stopped["steps_slowed"] == sum(pattern.straggler(k, 3) == worker for k in steps)


def test_first_k_rounds_go_on_without_a_paused_peer_which_then_applies_their_results(tmp_path):
    # The pause (shorter than the lease, so peer4 stays a member) spans a round or more at this pace, and the
    # run outlasts it: if the others finished every round meanwhile, peer4 would be alone with a stale state.
    pause_s = 5.0
    report, harness = run_scenario(
        f"pause:peer4@round2,for={pause_s:g}s", peers=5, workdir=tmp_path, keep_results=4,
        train=TrainConfig.of("diloco", steps=1200, sync_every=60, round_timeout_s=10, outer=OuterConfig("adam", lr=0.02)),
        coordinator=CoordinatorConfig(lease_s=8.0, heartbeat_s=0.5, dashboard_port=0, quorum="first-k:4"),
    )
    assert_healthy(report, alive=5)
    paused = harness.fired[0].wall
    during = {r for (r, _), t in harness.committed_rounds().items() if paused < t < paused + pause_s}
    assert during, "rounds committed while peer4 was paused"
    events = harness.peers["peer4"].events
    late = {e["round"] for e in events if e["event"] == "committed" and not e["contributed"]}
    timeline = [(round(e["t"] - paused, 2), e["event"], e.get("round"), e.get("reason")) for e in events]
    resynced = any("resynced" in e["reason"] for e in events if e["event"] == "sync-missed")
    if len(during) <= 2:
        # Two rounds' results cost fewer bytes than Adam's state (parameters and two moments): the peer applies them.
        assert during <= late and not resynced, f"peer4 applied the rounds that went on without it: {timeline}"
    else:
        # At a faster pace more rounds went by, whose results cost as much as the state: either way back is right.
        assert during <= late or resynced, f"peer4 caught up: {timeline}"


def test_a_joiner_of_a_run_with_an_adam_outer_optimizer_continues_bit_identically(tmp_path):
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
