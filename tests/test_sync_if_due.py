"""The sync a daemon runs before its first step (``sync_if_due``): only one a stop interrupted, for every algorithm."""

from __future__ import annotations

import pytest
import torch

from optimizers.peers import LocalPeer
from optimizers.registry import algorithm_names
from peer.runtime.training import TrainConfig, make_optimizer

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("name", algorithm_names())
def test_a_fresh_optimizer_of_any_algorithm_has_no_sync_due(name):
    torch.manual_seed(0)
    # Enough layers for Streaming DiLoCo's default fragments.
    model = torch.nn.Sequential(*(torch.nn.Linear(3, 3) for _ in range(4)))
    opt = make_optimizer(model, LocalPeer(), TrainConfig.of(name))
    assert opt.sync_if_due() is False and opt.committed_rounds == 0


@pytest.mark.parametrize("name", ["diloco", "fedavg", "fedprox", "client-momentum"])
def test_a_step_schedule_resumed_with_its_sync_due_syncs_once_at_once(name):
    torch.manual_seed(0)
    opt = make_optimizer(torch.nn.Linear(3, 2), LocalPeer(), TrainConfig.of(name, sync_every=5))
    opt.load_state_dict(
        {**opt.state_dict(), "inner_steps": 5, "counters": {"steps_since_sync": 5, "samples_since_sync": 40}}
    )
    assert opt.sync_if_due() is True and opt.committed_rounds == 1
    assert opt.sync_if_due() is False and opt.committed_rounds == 1


def test_a_fresh_peer_whose_time_budget_ran_out_while_it_joined_syncs_only_after_a_step():
    torch.manual_seed(0)
    opt = make_optimizer(torch.nn.Linear(3, 2), LocalPeer(), TrainConfig.of("diloco", sync_seconds=1e-9))
    assert opt.sync_if_due() is False and opt.committed_rounds == 0
