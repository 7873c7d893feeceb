"""Asynchronous DiLoCo against exact special cases: in-memory peers, so the staleness arithmetic is isolated.

The multi-process behaviour (the buffer:K policy, kills, joins and pauses) is in tests/test_async_processes.py.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

from collectives.elastic import CaughtUp, CommittedResult, Resynced
from collectives.errors import ConfigError
from collectives.membership.roundplan import RoundPlan
from collectives.reduce.parts import flatten, unflatten_like
from optimizers.asyncdiloco import AsyncDiLoCo, AsyncDiLoCoConfig
from optimizers.diloco import DiLoCo
from optimizers.outer_optim import OuterConfig
from optimizers.peers import LocalPeer, LocalResult

sys.path.insert(0, str(Path(__file__).parent))
from support.threadgroup import ThreadGroup
from support.threads import run_threads, small_model, train_small

pytestmark = pytest.mark.timeout(60)

SGD1 = OuterConfig(lr=1.0, momentum=0.0)  # global -= the round's aggregate


model = small_model
train = train_small


def params(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


class ScriptedPeer:
    """A run seen by one peer: the first syncs are late for the given rounds, later ones commit the contribution.

    Each late sync raises CaughtUp with the next batch of committed results; each committed round's result is
    the contribution itself (a run of one), so the test can recompute every step.
    """

    def __init__(self, late: list[list[torch.Tensor]]) -> None:
        self.late = list(late)  # per late sync: the flat results of the rounds it missed
        self.sent: list[list[torch.Tensor]] = []
        self.round_id = 0

    def sync(self, tensors, weight=1.0, tag="", codec=None, aggregator=None, prepare=None):
        self.sent.append([t.clone() for t in tensors])
        if self.late:
            results = []
            for value in self.late.pop(0):
                self.round_id += 1
                results.append(CommittedResult(self.round_id, tag, value, source="peerX"))
            raise CaughtUp(results)
        self.round_id += 1
        return LocalResult(value=[t.clone() for t in tensors], round_id=self.round_id)


class PlannedPeer:
    """A round of one plan whose result is this peer's own prepared contribution (a mean of equal members)."""

    def __init__(self, plan: RoundPlan) -> None:
        self.plan = plan

    def sync(self, tensors, weight=1.0, tag="", codec=None, aggregator=None, prepare=None):
        flat = flatten(list(tensors))
        sent = flat if prepare is None else prepare(self.plan, flat)
        return LocalResult(value=unflatten_like(sent, list(tensors)), round_id=self.plan.round_id)


def async_opt(m: torch.nn.Module, peer, **options) -> AsyncDiLoCo:
    return AsyncDiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), peer,
                       AsyncDiLoCoConfig(sync_every=3, codec="none", outer=SGD1, **options))


# -- with every peer in every round, async DiLoCo is DiLoCo ----------------------------------------------


def test_with_k_equal_n_and_no_slow_peer_async_diloco_is_diloco_bit_for_bit() -> None:
    n, steps = 3, 12
    sync_group, async_group = ThreadGroup(n), ThreadGroup(n)
    outer = OuterConfig(lr=0.7, momentum=0.9, nesterov=True)
    sync_models = [model() for _ in range(n)]
    async_models = [model() for _ in range(n)]
    sync_opts = [DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_group.peers[r], sync_every=4, outer=outer)
                 for r, m in enumerate(sync_models)]
    async_opts = [AsyncDiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), async_group.peers[r], sync_every=4,
                              outer=outer, buffer=n)
                  for r, m in enumerate(async_models)]
    run_threads([lambda r=r: train(sync_opts[r], sync_models[r], r, steps) for r in range(n)])
    run_threads([lambda r=r: train(async_opts[r], async_models[r], r, steps) for r in range(n)])
    for a, b in zip(sync_models, async_models):
        assert all(torch.equal(x, y) for x, y in zip(params(a), params(b)))
    assert all(list(o.staleness_history) == [0, 0, 0] for o in async_opts)


# -- a round of K of the n live peers moves the model K/n of an outer step -------------------------------


@pytest.mark.parametrize(
    ("members", "candidates", "share"),
    [("ab", "abcd", 0.5), ("abc", "abc", 1.0), ("ab", "", 1.0), ("abcd", "abcde", 0.8)],
)
def test_a_rounds_share_is_its_members_over_the_live_peers_its_plan_names(members, candidates, share) -> None:
    plan = RoundPlan("round", round_id=1, members=tuple((m, "") for m in members), candidates=tuple(candidates))
    assert plan.share() == share


def test_each_member_sends_its_contribution_times_the_rounds_share() -> None:
    prepare = async_opt(model(), ScriptedPeer([])).prepare()
    flat = torch.tensor([1.0, -2.0, 4.0])
    two_of_four = RoundPlan("round", round_id=1, members=(("a", ""), ("b", "")), candidates=tuple("abcd"))
    all_three = RoundPlan("round", round_id=2, members=(("a", ""), ("b", ""), ("c", "")), candidates=tuple("abc"))
    assert torch.equal(prepare(two_of_four, flat), torch.tensor([0.5, -1.0, 2.0]))
    sent = prepare(all_three, flat)
    assert torch.equal(sent, flat) and sent is not flat  # K = n: the contribution unchanged (a new tensor)


@pytest.mark.parametrize(
    ("config", "policy", "problem"),
    [
        ({"buffer": 2}, "buffer:2", ""),
        ({"buffer": 2, "buffer_timeout_s": 5.0}, "buffer:2,t=5", ""),
        ({"buffer": 2}, "buffer:3",
         "async-diloco --buffer 2 needs the coordinator's --quorum buffer:2, and the run's is 'buffer:3'"),
        ({"buffer": 2}, "all",
         "async-diloco --buffer 2 needs the coordinator's --quorum buffer:2, and the run's is 'all'"),
        ({"buffer": 2, "buffer_timeout_s": 5.0}, "buffer:2", "needs the coordinator's --quorum buffer:2,t=5"),
    ],
)
def test_a_quorum_policy_other_than_the_buffers_is_a_problem(config, policy, problem) -> None:
    # --buffer 2 under --quorum all or buffer:3 was ignored without a word: the rounds took whoever the policy picked.
    found = AsyncDiLoCoConfig(**config).quorum_problem(policy)
    assert (found == "") if not problem else (problem in found)


def test_a_member_refuses_a_round_formed_by_another_policy_than_its_buffers() -> None:
    from collectives.errors import QuorumMismatch

    prepare = async_opt(model(), ScriptedPeer([]), buffer=2).prepare()
    everyone = RoundPlan("round", round_id=1, members=(("a", ""), ("b", ""), ("c", "")), candidates=tuple("abc"),
                         policy="all")
    with pytest.raises(QuorumMismatch, match="needs the coordinator's --quorum buffer:2, and the run's is 'all'"):
        prepare(everyone, torch.ones(3))


def test_without_scale_rounds_a_contribution_goes_as_it_is() -> None:
    assert async_opt(model(), ScriptedPeer([]), scale_rounds=False).prepare() is None


def test_rounds_of_two_of_four_peers_move_the_model_half_as_far_as_with_scale_rounds_off() -> None:
    # Two peers of four live: every round's mean is halved, so with outer SGD at lr 1 each round moves half as far.
    plan = RoundPlan("round", round_id=1, members=(("a", ""), ("b", "")), candidates=tuple("abcd"))
    moves = {}
    for scale in (True, False):
        m = model()
        opt = async_opt(m, PlannedPeer(plan), scale_rounds=scale)
        start = flatten(params(m))
        train(opt, m, 0, 3)
        moves[scale] = flatten(opt.state.globals) - start
    assert torch.allclose(moves[True], moves[False] * 0.5, rtol=0, atol=1e-7)


class PeerWithoutPrepare:
    """A user's peer written before ``prepare`` (a run of one: the round's result is the contribution)."""

    def sync(self, tensors, weight=1.0, tag="", codec=None, aggregator=None):
        return LocalResult(value=[t.clone() for t in tensors], round_id=1)


def test_a_peer_whose_sync_takes_no_prepare_is_told_what_to_add() -> None:
    m = model()
    opt = async_opt(m, PeerWithoutPrepare())
    with pytest.raises(TypeError, match=r"PeerWithoutPrepare.sync\(\) takes no `prepare` argument.*SyncPeer"):
        train(opt, m, 0, 3)


def test_without_scale_rounds_a_peer_without_prepare_still_syncs() -> None:
    m = model()
    opt = async_opt(m, PeerWithoutPrepare(), scale_rounds=False)
    train(opt, m, 0, 3)
    assert opt.committed_rounds == 1


# -- a late peer catches up, then contributes s(tau) times its pseudo-gradient ---------------------------


def test_a_late_peer_applies_the_missed_rounds_to_its_globals_and_keeps_its_local_model() -> None:
    m = model()
    missed = [torch.full((flatten(params(m)).numel(),), 0.5), torch.full((flatten(params(m)).numel(),), -0.25)]
    peer = ScriptedPeer([missed])
    opt = async_opt(m, peer)
    start = flatten(params(m))
    train(opt, m, 0, 3)  # the sync at step 3: late for rounds 1 and 2, then counted in round 3
    # Outer SGD with lr 1: global = start - 0.5 + 0.25 after the missed rounds, then minus the stale contribution.
    local = flatten([t for t in peer.sent[0]])  # Δ = start - θ, as first sent (tau 0)
    assert torch.equal(flatten(peer.sent[1]), local * (1 / math.sqrt(3)))  # tau = 2: s = 1/sqrt(3)
    expected = (start - 0.5 + 0.25) - local * (1 / math.sqrt(3))
    assert torch.allclose(flatten(opt.state.globals), expected, atol=1e-6)
    assert list(opt.staleness_history) == [2] and opt.state.round_id == 3
    assert [r.staleness for r in opt.history if r.committed and r.contributed] == [2]
    assert [r.round_id for r in opt.history if not r.contributed] == [1, 2]


def test_the_contribution_is_computed_against_the_base_version_not_the_caught_up_one() -> None:
    m = model()
    numel = flatten(params(m)).numel()
    peer = ScriptedPeer([[torch.ones(numel)]])
    opt = async_opt(m, peer, staleness="constant")  # s = 1: the same tensors are sent again
    train(opt, m, 0, 3)
    assert all(torch.equal(a, b) for a, b in zip(peer.sent[0], peer.sent[1]))


def test_each_catch_up_makes_the_same_contribution_staler() -> None:
    m = model()
    numel = flatten(params(m)).numel()
    peer = ScriptedPeer([[torch.zeros(numel)], [torch.zeros(numel), torch.zeros(numel)]])
    opt = async_opt(m, peer, staleness="poly:a=1")
    train(opt, m, 0, 3)
    first = flatten(peer.sent[0])
    assert torch.equal(flatten(peer.sent[1]), first * 0.5)  # tau 1: 1/2
    assert torch.equal(flatten(peer.sent[2]), first * 0.25)  # tau 3: 1/4
    assert list(opt.staleness_history) == [3]


class ResyncingPeer(ScriptedPeer):
    """Late for two rounds, and told to fetch the run's whole state (fewer bytes than the missed results)."""

    def __init__(self, snapshot) -> None:
        super().__init__([])
        self.snapshot = snapshot

    def sync(self, tensors, weight=1.0, tag="", codec=None, aggregator=None, prepare=None):
        if self.snapshot is not None:
            self.sent.append([t.clone() for t in tensors])
            snapshot, self.snapshot = self.snapshot, None
            self.round_id = snapshot.round_id
            raise Resynced(snapshot, "127.0.0.1:1")
        return super().sync(tensors, weight, tag, codec, aggregator, prepare)


def test_a_catch_up_by_the_whole_state_keeps_the_local_model_and_the_pending_contribution() -> None:
    run = async_opt(model(), ScriptedPeer([]))
    numel = flatten(params(model())).numel()
    for r in (1, 2):  # the run moved on by two rounds
        run.state.outer_step(range(4), [torch.full_like(t, 0.125 * r) for t in run.state.globals], r)
    m = model()
    peer = ResyncingPeer(run.snapshot())
    opt = async_opt(m, peer)
    train(opt, m, 0, 2)
    local = params(m)
    opt.sync()
    assert len(peer.sent) == 2 and flatten(peer.sent[1]).numel() == numel
    assert torch.equal(flatten(peer.sent[1]), flatten(peer.sent[0]) * (1 / math.sqrt(3)))  # tau 2
    assert list(opt.staleness_history) == [2] and opt.state.round_id == 3
    assert any(r.resynced and r.round_id == 2 and "resynced from the run" in r.reason for r in opt.history)
    assert not all(torch.equal(a, b) for a, b in zip(local, params(m)))  # loaded only once the round committed


def test_a_contribution_staler_than_the_bound_is_dropped_and_the_model_restarts_from_the_globals() -> None:
    m = model()
    numel = flatten(params(m)).numel()
    peer = ScriptedPeer([[torch.zeros(numel)] * 3])
    opt = async_opt(m, peer, max_staleness=2)
    train(opt, m, 0, 3)
    assert len(peer.sent) == 1  # nothing was sent after the catch-up
    assert all(torch.equal(p, g) for p, g in zip(params(m), opt.state.globals))
    assert opt.base_round == 3 and opt.staleness() == 0
    assert "3 rounds stale, above max_staleness 2: dropped" in opt.history[-1].reason
    train(opt, m, 0, 3)  # and the next sync is fresh
    assert list(opt.staleness_history) == [0]


# -- configuration --------------------------------------------------------------------------------------


def test_the_coordinator_policy_follows_the_buffer() -> None:
    assert AsyncDiLoCoConfig(buffer=3).expected_quorum() == "buffer:3"
    assert AsyncDiLoCoConfig(buffer=2, buffer_timeout_s=1.5).expected_quorum() == "buffer:2,t=1.5"


@pytest.mark.parametrize(("options", "message"), [
    ({"buffer": 0}, "buffer (K) must be an integer >= 1"),
    ({"buffer_timeout_s": 0.0}, "buffer_timeout_s must be positive"),
    ({"max_staleness": -1}, "max_staleness must be an integer >= 0"),
    ({"staleness": "linear"}, "linear"),
])
def test_a_bad_option_is_refused(options, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        AsyncDiLoCoConfig(**options)


def test_a_state_of_another_algorithm_is_refused_during_a_sync_too() -> None:
    # The catch-up by the whole state (inside a sync) adopts only the global side; it checks the state as a join does.
    donor_model, joiner_model = small_model(), small_model()
    donor = DiLoCo(donor_model, torch.optim.SGD(donor_model.parameters(), lr=0.1), LocalPeer(), sync_every=3,
                   codec="none")
    snapshot = donor.snapshot()
    opt = async_opt(joiner_model, LocalPeer())
    opt._syncing = True  # as inside sync(): the path that keeps the local model
    before = [p.clone() for p in opt.state.params]
    with pytest.raises(ConfigError, match="the run's state is a 'diloco' state and this peer runs 'async-diloco'"):
        opt.load_snapshot(snapshot)
    assert all(torch.equal(a, b) for a, b in zip(opt.state.params, before))
