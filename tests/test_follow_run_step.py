"""A peer the run went on without skips ahead to the run's step, so its next sync is the run's next round."""

from __future__ import annotations

import pytest
import torch

from collectives.statesync import StateSnapshot
from optimizers.asyncdiloco import AsyncDiLoCo
from optimizers.diloco import DiLoCo
from optimizers.peers import LocalPeer


class Late(LocalPeer):
    """A one-peer run whose coordinator reports its last committed round and (run step, its step at that round)."""

    def __init__(self, run_step: int, round_step: int, run_round: int = 4) -> None:
        super().__init__()
        self.progress = (run_step, round_step)
        self.committed = run_round

    def run_progress(self) -> tuple[int, int]:
        return self.progress

    def run_round(self) -> int:
        return self.committed


def diloco(peer, cls=DiLoCo, **overrides) -> DiLoCo:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return cls(model, torch.optim.SGD(model.parameters(), lr=0.1), peer, sync_every=10, **overrides)


def state_at(opt: DiLoCo, round_id: int, step: int) -> StateSnapshot:
    snap = opt.snapshot()
    snap.round_id = round_id
    snap.meta["step"] = step
    return snap


@pytest.mark.parametrize(
    "own_step, run_step, round_step, skips_to, steps_since_sync",
    [
        (30, 37, 30, 37, 7),  # the run trained 7 steps since its round at 30: so does this peer now
        (30, 30, 30, 30, 0),  # not behind: nothing changes
        (31, 31, 30, 31, 1),  # at the run's step, one into its interval: its next sync is the run's, at 40
        (31, 30, 30, 31, 1),  # a step past the run's word: the same
        (29, 29, 20, 29, 9),  # the last step of the interval: the next step syncs, as the run's does
        (30, 25, 20, 30, 0),  # a heartbeat older than this peer's own step: nothing changes
        (30, 10_000, 30, 39, 9),  # never past one interval after the run's last round: the next step syncs
        (30, 45, 40, 45, 5),  # two rounds behind: it catches up with the run all the same
        (50, 45, 40, 50, 0),  # ahead of the run's word (a stale heartbeat): nothing changes
        # The run went on one round without it: never more than two intervals ahead, whatever the members say
        # (one heartbeat of an insider made the run's step 2^63 and a late peer skipped to it, ending its training).
        (30, 2**63, 2**63, 50, 0),
        (30, 2**63, 40, 49, 9),
    ],
)
def test_a_peer_whose_state_the_run_went_past_continues_from_the_runs_step(
    own_step, run_step, round_step, skips_to, steps_since_sync
):
    opt = diloco(Late(run_step, round_step))
    opt.load_snapshot(state_at(opt, round_id=3, step=own_step))
    assert (opt.inner_steps, opt.steps_since_sync, opt.global_step) == (skips_to, steps_since_sync, skips_to)


def test_a_state_of_the_runs_last_round_keeps_its_step_for_the_next_round_may_be_waiting_for_this_peer():
    opt = diloco(Late(37, 30, run_round=3))
    opt.load_snapshot(state_at(opt, round_id=3, step=30))
    assert (opt.inner_steps, opt.steps_since_sync) == (30, 0)


def test_a_peer_without_a_coordinator_keeps_its_own_step():
    opt = diloco(LocalPeer())
    opt.load_snapshot(state_at(opt, round_id=3, step=30))
    assert (opt.inner_steps, opt.steps_since_sync) == (30, 0)


def test_asynchronous_rounds_keep_their_own_schedule():
    opt = diloco(Late(37, 30), cls=AsyncDiLoCo)
    opt.load_snapshot(state_at(opt, round_id=3, step=30))
    assert opt.inner_steps == 30
