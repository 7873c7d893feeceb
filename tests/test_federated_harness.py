"""A federated run through ``loconet harness``: real peers on the digits task, with a fault injected."""

from __future__ import annotations

import pytest

from optimizers.privacy import DPConfig
from peer.coordinator.config import CoordinatorConfig
from peer.harness.harness import Harness, HarnessConfig
from peer.harness.scenario import parse_event
from peer.runtime.training import TrainConfig
from peer.tasks.base import TaskConfig

pytestmark = pytest.mark.timeout(180)

STEPS, LOCAL_STEPS = 60, 10


def test_a_peer_killed_inside_a_fedavg_round_costs_one_retried_round_and_nothing_more(tmp_path):
    config = HarnessConfig(
        peers=3,
        task="digits",
        task_config=TaskConfig(batch_size=32, dirichlet=1.0),
        train=TrainConfig.of("fedavg", steps=STEPS, sync_every=LOCAL_STEPS, inner="sgd", inner_lr=0.3,
                             round_timeout_s=10),
        coordinator=CoordinatorConfig(lease_s=3.0, heartbeat_s=0.5, dashboard_port=0),
        events=(parse_event("kill:peer2@sync3"),),
        workdir=str(tmp_path),
        timeout_s=150,
    )
    harness = Harness(config)
    report = harness.run()
    assert harness.orphans() == []
    assert report["peers_alive"] == 2 and report["survivors_identical"] is True
    assert report["aborted_rounds_retried"] is True
    assert report["rounds_aborted"] <= 1
    # The survivors commit every one of their rounds: the kill cost a retry, no round was lost.
    assert report["rounds_committed"] == STEPS // LOCAL_STEPS
    # digits is a classification task: the report carries the survivors' held-out accuracy.
    assert 0.0 <= report["final_accuracy"] <= 1.0


def test_a_sampled_private_round_draws_as_many_members_as_a_private_round_needs(tmp_path):
    # sample:1 draws one member; a private round needs two (--dp-min-members 2, the default). The coordinator draws
    # two and every member checks the sample with its own need: no round was refused, none failed to form.
    config = HarnessConfig(
        peers=3,
        task="digits",
        task_config=TaskConfig(batch_size=32),
        train=TrainConfig.of(
            "fedavg", steps=STEPS, sync_every=LOCAL_STEPS, inner="sgd", dp=DPConfig(clip=1.0, noise=0.3)
        ),
        coordinator=CoordinatorConfig(dashboard_port=0, quorum="sample:1"),
        workdir=str(tmp_path),
        timeout_s=150,
    )
    report = Harness(config).run()
    assert report["rounds_committed"] == STEPS // LOCAL_STEPS and report["rounds_aborted"] == 0
    log = (tmp_path / "coordinator.log").read_text()
    assert log.count("with 2 members") == STEPS // LOCAL_STEPS
