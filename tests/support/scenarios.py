"""Harness scenarios for the tests: a small task, a run with faults injected, and checks of its report."""

from __future__ import annotations

from peer.coordinator.config import CoordinatorConfig
from peer.harness.harness import Harness, HarnessConfig
from peer.harness.scenario import parse_event
from peer.runtime.training import TrainConfig
from peer.tasks.base import TaskConfig

SMALL = TaskConfig(d_model=32, n_layers=2, n_heads=2, seq_len=32, batch_size=8)


def run_scenario(
    *events: str, peers: int = 3, steps: int = 300, lease_s: float = 3.0, **options
) -> tuple[dict, Harness]:
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


def contributed_rounds(harness: Harness, name: str, after: float = 0.0) -> set[int]:
    """Round ids the peer's own contribution went into, among those it committed after wall time ``after``."""
    return {
        e["round"] for e in harness.peers[name].events
        if e["event"] == "committed" and e["contributed"] and e["t"] > after
    }
