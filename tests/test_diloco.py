"""DiLoCo and Streaming DiLoCo against exact special cases (in-memory peers, so the math is isolated)."""

from __future__ import annotations

import copy
import itertools
import logging
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from collectives.elastic import ElasticCollective, ElasticConfig
from collectives.errors import ConfigError
from collectives.reduce.results import CommittedResult
from collectives.syncphases import CaughtUp, Stopped
from optimizers import outer
from optimizers.diloco import DiLoCo
from optimizers.federated import FedAvg
from optimizers.outer_optim import OuterConfig
from optimizers.peers import LocalPeer
from optimizers.streaming import StreamingConfig, StreamingDiLoCo, split_fragments

sys.path.insert(0, str(Path(__file__).parent))
from support.threadgroup import ThreadGroup  # noqa: E402

pytestmark = pytest.mark.timeout(60)



SGD1 = OuterConfig(lr=1.0, momentum=0.0)  # a plain outer step: global -= averaged pseudo-gradient


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)


def loss_of(m: torch.nn.Module, b) -> torch.Tensor:
    x, y = b
    return torch.nn.functional.mse_loss(m(x), y)


def train(opt, m: torch.nn.Module, rank: int, steps: int, samples: int = 1) -> None:
    for t in range(steps):
        loss_of(m, batch(rank, t)).backward()
        opt.step(samples=samples) if isinstance(opt, (DiLoCo, StreamingDiLoCo)) else opt.step()
        opt.zero_grad()


def run_threads(targets) -> None:
    errors = []

    def guard(fn):
        try:
            fn()
        except Exception as exc:  # re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=guard, args=(fn,)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]


def params(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def assert_close(a, b, atol=1e-6) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


def test_one_peer_with_outer_sgd_lr_1_and_no_momentum_is_plain_local_training():
    a, b = model(), model()
    diloco = DiLoCo(a, torch.optim.AdamW(a.parameters(), lr=1e-2), LocalPeer(), sync_every=4, outer=SGD1, codec="none")
    train(diloco, a, 0, 20)
    train(torch.optim.AdamW(b.parameters(), lr=1e-2), b, 0, 20)
    assert_close(params(a), params(b))
    assert sum(r.committed for r in diloco.history) == 5


def test_h1_with_inner_sgd_and_outer_sgd_lr_1_is_data_parallel_sgd():
    n, steps, lr = 3, 6, 0.1
    group = ThreadGroup(n)
    models = [model() for _ in range(n)]
    opts = [
        DiLoCo(m, torch.optim.SGD(m.parameters(), lr=lr), group.peers[r], sync_every=1, outer=SGD1, codec="none")
        for r, m in enumerate(models)
    ]
    run_threads([lambda r=r: train(opts[r], models[r], r, steps) for r in range(n)])
    # Data-parallel: average the n batches' gradients, one SGD step.
    dp = model()
    sgd = torch.optim.SGD(dp.parameters(), lr=lr)
    for t in range(steps):
        grads = []
        for r in range(n):
            dp.zero_grad()
            loss_of(dp, batch(r, t)).backward()
            grads.append([p.grad.clone() for p in dp.parameters()])
        for i, p in enumerate(dp.parameters()):
            p.grad = sum(g[i] for g in grads) / n
        sgd.step()
    for m in models:
        assert_close(params(m), params(dp))


def test_weights_by_samples_give_the_weighted_mean():
    group = ThreadGroup(2)
    models = [model(), model()]
    opts = [
        DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), group.peers[r], sync_every=100, outer=SGD1, codec="none")
        for r, m in enumerate(models)
    ]
    train(opts[0], models[0], 0, 3, samples=1)
    train(opts[1], models[1], 1, 3, samples=3)
    locals_before = [params(m) for m in models]
    run_threads([lambda r=r: opts[r].sync() for r in range(2)])
    # Outer SGD with lr 1 and no momentum lands on the weighted mean of the local parameters.
    w = [3.0, 9.0]
    want = [(w[0] * a + w[1] * b) / sum(w) for a, b in zip(*locals_before)]
    for m in models:
        assert_close(params(m), want, atol=1e-6)


def test_streaming_with_one_fragment_no_overlap_and_alpha_0_is_diloco():
    steps = 12
    ga, gb = ThreadGroup(2), ThreadGroup(2)
    da = [model() for _ in range(2)]
    db = [model() for _ in range(2)]
    diloco = [
        DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), ga.peers[r], sync_every=4) for r, m in enumerate(da)
    ]
    cfg = StreamingConfig(sync_every=4, fragments=1, overlap=0, alpha=0.0, codec="none")
    stream = [
        StreamingDiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), gb.peers[r], cfg) for r, m in enumerate(db)
    ]
    run_threads([lambda r=r: train(diloco[r], da[r], r, steps) for r in range(2)])
    run_threads([lambda r=r: train(stream[r], db[r], r, steps) for r in range(2)])
    for a, b in zip(da, db):
        assert_close(params(a), params(b))
    assert [h.step for h in stream[0].history] == [h.step for h in diloco[0].history] == [4, 8, 12]


def test_streaming_fragments_sync_staggered_each_once_per_period():
    m = model()
    cfg = StreamingConfig(sync_every=8, fragments=2, overlap=1, alpha=0.5, codec="none")
    opt = StreamingDiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2), LocalPeer(), cfg)
    train(opt, m, 0, 33)
    # A fragment round starts every 4 steps and is applied 1 step later.
    assert [h.step for h in opt.history] == [5, 9, 13, 17, 21, 25, 29, 33]
    assert opt.cursor == 0


class OthersAhead(LocalPeer):
    """A run whose other members ask for round k at step first + (k - 1) * every, where this peer asks for the first
    at step ``every`` (it skipped syncs while the coordinator was away): each result names the furthest member's
    step."""

    def __init__(self, opt_of, first: int, every: int) -> None:
        super().__init__()
        self.opt_of, self.first, self.every, self.rounds = opt_of, first, every, 0

    def sync(self, tensors, *args, **kwargs):
        local = super().sync(tensors, *args, **kwargs)
        others = self.first + self.rounds * self.every
        self.rounds += 1
        return SimpleNamespace(value=local.value, round_id=local.round_id,
                               members_step=max(others, self.opt_of().inner_steps))


@pytest.mark.parametrize(("first", "syncs_at"), [
    (4, [4, 8, 12, 16]),  # in step with the run: nothing changes
    (12, [8, 16, 20, 24]),  # two intervals behind: one interval a round, then in step
    (6, [6, 10, 14, 18]),  # two steps behind: in step after the first round
])
def test_a_member_behind_the_rounds_furthest_member_counts_its_steps_up_at_most_an_interval_a_round(first, syncs_at):
    m = model()
    opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), OthersAhead(lambda: opt, first, 4), sync_every=4,
                 codec="none")
    train(opt, m, 0, 16)
    assert [h.step for h in opt.history] == syncs_at


class LateOnce(LocalPeer):
    """A run that went on without this peer: its first sync is told so (``CaughtUp`` with ``missed(tag)``), the
    run's peers waiting in the quorum of ``pending`` ("" when nobody waits yet); later syncs are a run of one's,
    numbered from ``next_round``."""

    def __init__(self, pending: str, next_round: int) -> None:
        super().__init__()
        self.pending, self.next_round = pending, next_round
        self.tags: list[str] = []

    def missed(self, tag: str) -> list[CommittedResult]:
        raise NotImplementedError

    def sync(self, tensors, weight=1.0, tag="", *args, **kwargs):
        self.tags.append(tag)
        if len(self.tags) > 1:
            return super().sync(tensors, weight, tag, *args, **kwargs)
        self._rounds = itertools.count(self.next_round)
        raise CaughtUp(self.missed(tag), pending_tag=self.pending)


class AheadOfItsState(LateOnce):
    """A run two fragment rounds ahead of this peer's state (a joiner whose fetch outlasted them): its first round
    finds rounds 1 and 2 committed."""

    def __init__(self, opt_of, pending: str) -> None:
        super().__init__(pending, next_round=3)
        self.opt_of = opt_of

    def missed(self, tag: str) -> list[CommittedResult]:
        opt = self.opt_of()
        return [CommittedResult(round_id=r, tag=t, value=torch.zeros(opt.state.numel(opt.round_indices(t))))
                for r, t in ((1, "fragment-0"), (2, "fragment-1"))]


@pytest.mark.parametrize("pending, rounds", [
    # The run waits in the round of the fragment this peer syncs next: it joins at once (round 3, applied at step 6),
    # and its next fragment is on time (round 4, step 9).
    ("fragment-0", [(5, 1, False), (5, 2, False), (6, 3, True), (9, 4, True)]),
    ("", [(5, 1, False), (5, 2, False), (9, 3, True)]),  # nobody waits: the next fragment at its due step
])
def test_a_streaming_peer_that_caught_up_joins_the_round_the_run_waits_in_at_once(pending, rounds):
    m = model()
    cfg = StreamingConfig(sync_every=8, fragments=2, overlap=1, alpha=0.5, codec="none")
    peer = AheadOfItsState(lambda: opt, pending)
    opt = StreamingDiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), peer, cfg)
    train(opt, m, 0, 9)
    assert [(h.step, h.round_id, h.contributed) for h in opt.history] == rounds
    assert peer.tags[:2] == ["fragment-0", "fragment-0"]


class LateForDiLoCo(LateOnce):
    """A run that committed round 1 while this peer was away."""

    def __init__(self, numel: int, pending: str) -> None:
        super().__init__(pending, next_round=2)
        self.numel = numel

    def missed(self, tag: str) -> list[CommittedResult]:
        return [CommittedResult(round_id=1, tag=tag, value=torch.zeros(self.numel))]


@pytest.mark.parametrize("schedule", [{"sync_every": 8}, {"sync_seconds": 3600.0}])
@pytest.mark.parametrize("pending, rounds", [
    # The run waits in its next round: the caught-up peer trains one step and joins it, not a whole interval later.
    ("diloco", [(0, 1, False), (1, 2, True)]),
    ("", [(0, 1, False)]),  # nobody waits: the next sync when the schedule says
])
def test_a_diloco_peer_that_caught_up_joins_the_round_the_run_waits_in_after_one_step(schedule, pending, rounds):
    m = model()
    peer = LateForDiLoCo(sum(p.numel() for p in m.parameters()), pending)
    opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), peer, codec="none", **schedule)
    assert opt.sync() is False  # the sync the peer was late for: caught up instead
    train(opt, m, 0, 3)
    assert [(h.step, h.round_id, h.contributed) for h in opt.history] == rounds
    assert peer.tags == ["diloco"] * len(rounds)
    if pending:
        assert (opt.history[-1].step, opt.steps_since_sync) == (1, 2)  # a whole interval until the next


class LateForDiLoCoOnTime(LateForDiLoCo):
    """The same run, saying when its last round committed (``run_committed_at``) and its steps (``run_progress``)."""

    def __init__(self, numel: int, committed_at: float) -> None:
        super().__init__(numel, pending="")
        self.committed_at = committed_at

    def run_committed_at(self) -> float:
        return self.committed_at

    def run_progress(self) -> tuple[int, int]:
        return 0, 0


@pytest.mark.parametrize("ago_s, rounds", [
    (7200.0, [(0, 1, False), (1, 2, True)]),  # the run committed two budgets ago: its next round is due now
    (0.0, [(0, 1, False)]),  # it committed just now: a whole budget to go
])
def test_a_diloco_peer_on_a_time_budget_counts_its_interval_from_the_runs_last_commit_after_catching_up(
    ago_s, rounds
):
    m = model()
    committed_at = time.monotonic() - ago_s
    peer = LateForDiLoCoOnTime(sum(p.numel() for p in m.parameters()), committed_at)
    opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), peer, codec="none", sync_seconds=3600.0)
    assert opt.sync() is False  # caught up instead
    assert opt.last_sync_time == committed_at
    train(opt, m, 0, 1)
    assert [(h.step, h.round_id, h.contributed) for h in opt.history] == rounds


class AheadOfItsStateAndStep(AheadOfItsState):
    """The same, and the coordinator says the run is at step 12 (where its peers asked for round 3), its last
    round at step 8 (``run_progress``, from the RESYNC answer)."""

    def run_progress(self) -> tuple[int, int]:
        return 12, 8


def test_a_streaming_peer_that_caught_up_lines_up_with_the_step_the_run_waits_at():
    m = model()
    cfg = StreamingConfig(sync_every=8, fragments=2, overlap=1, alpha=0.5, codec="none")
    peer = AheadOfItsStateAndStep(lambda: opt, "fragment-0")
    opt = StreamingDiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), peer, cfg)
    train(opt, m, 0, 14)
    # Its round 3 at step 12 with the others (applied at 13), not at its own count's step 5 or 8; then on time.
    assert [(h.step, h.round_id, h.contributed) for h in opt.history] == [
        (5, 1, False), (5, 2, False), (13, 3, True), (17, 4, True), (21, 5, True)
    ]
    assert opt.inner_steps == 21  # 14 steps trained, and the 7 from step 5 to the run's step 12 skipped


def test_streaming_mixes_local_and_global_with_alpha_weighting_the_local_side():
    m = model()
    cfg = StreamingConfig(sync_every=2, fragments=1, overlap=1, alpha=0.25, outer=SGD1, codec="none")
    opt = StreamingDiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), LocalPeer(), cfg)
    train(opt, m, 0, 2)  # round starts at step 2 with pseudo-gradient global - local(2)
    local2 = params(m)
    loss_of(m, batch(0, 2)).backward()
    opt.inner.step()
    local3 = params(m)
    opt.inner.zero_grad()
    opt.inner_steps += 1
    opt.flush()
    # With one peer, outer lr 1, no momentum: the new global is local(2); mix 0.25 local(3) + 0.75 local(2).
    assert_close(params(m), [0.25 * a + 0.75 * b for a, b in zip(local3, local2)])


def test_strided_split_by_layer_and_balanced_split_cover_every_parameter_once():
    names = ["emb.weight", "blocks.0.w", "blocks.0.b", "blocks.1.w", "blocks.2.w", "blocks.3.w", "head.weight"]
    sizes = [100, 10, 1, 10, 10, 10, 100]
    strided = split_fragments(names, sizes, 2, "strided")
    assert strided == [[0, 3, 5], [1, 2, 4, 6]]
    balanced = split_fragments(names, sizes, 2, "balanced")
    assert sorted(i for f in balanced for i in f) == list(range(len(names)))
    loads = [sum(sizes[i] for i in f) for f in balanced]
    assert max(loads) - min(loads) <= 10


def test_more_fragments_than_layers_is_a_config_error():
    with pytest.raises(ConfigError, match="fragments"):
        split_fragments(["a.w", "b.w"], [1, 1], 3)


def test_overlap_must_end_before_the_next_fragment_starts():
    with pytest.raises(ConfigError, match="overlap"):
        StreamingConfig(sync_every=8, fragments=4, overlap=2)


def test_a_too_long_overlap_is_refused_with_both_ways_out():
    # sync_every 10 over 4 fragments leaves 2 steps between fragments: overlap 1 fits, or sync_every 24 for 5.
    with pytest.raises(ConfigError, match="set overlap to at most 1 or sync_every to at least 24"):
        StreamingConfig(sync_every=10, fragments=4, overlap=5)
    StreamingConfig(sync_every=10, fragments=4, overlap=1)
    StreamingConfig(sync_every=24, fragments=4, overlap=5)


def test_a_negative_overlap_is_refused():
    with pytest.raises(ConfigError, match="overlap must be 0 or more, got -1"):
        StreamingConfig(sync_every=8, fragments=4, overlap=-1)


def test_state_dict_round_trip_restores_global_state_and_counters():
    a = model()
    opt = DiLoCo(a, torch.optim.AdamW(a.parameters(), lr=1e-2), LocalPeer(), sync_every=3)
    train(opt, a, 0, 7)
    # deepcopy: like torch.optim's, the state dict holds references to live buffers.
    saved, saved_params = copy.deepcopy(opt.state_dict()), params(a)
    b = model(seed=5)
    fresh = DiLoCo(b, torch.optim.AdamW(b.parameters(), lr=1e-2), LocalPeer(), sync_every=3)
    fresh.load_state_dict(saved)
    for p, q in zip(b.parameters(), saved_params):
        p.data.copy_(q)
    assert_close(fresh.state.globals, opt.state.globals, atol=0)
    assert fresh.inner_steps == 7 and fresh.steps_since_sync == 1
    train(opt, a, 0, 5)
    train(fresh, b, 0, 5)
    assert_close(params(a), params(b))


def test_a_state_dict_of_another_inner_optimizer_kind_is_refused_and_changes_nothing():
    # An AdamW checkpoint resumed by a peer started with --inner sgd died at its first step (KeyError: 'momentum').
    a = model()
    opt = DiLoCo(a, torch.optim.AdamW(a.parameters(), lr=1e-2), LocalPeer(), sync_every=3)
    train(opt, a, 0, 7)
    saved = copy.deepcopy(opt.state_dict())
    b = model(seed=5)
    fresh = DiLoCo(b, torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9), LocalPeer(), sync_every=3)
    before = [g.clone() for g in fresh.state.globals]
    with pytest.raises(ConfigError, match=r"another kind than this peer's --inner \(its settings amsgrad, betas, "
                                          r"capturable, decoupled_weight_decay, eps against this peer's dampening, "
                                          r"momentum, nesterov\)"):
        fresh.load_state_dict(saved)
    assert_close(fresh.state.globals, before, atol=0)
    assert fresh.inner_steps == 0 and fresh.inner.param_groups[0]["momentum"] == 0.9


def test_a_resumed_inner_optimizer_keeps_this_peers_hyperparameters_and_the_checkpoints_moments():
    # A peer restarted with a lower --inner-lr trained on with the checkpoint's, and nothing said so.
    a = model()
    opt = DiLoCo(a, torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.01), LocalPeer(), sync_every=3)
    train(opt, a, 0, 7)
    saved = copy.deepcopy(opt.state_dict())
    b = model()
    fresh = DiLoCo(b, torch.optim.AdamW(b.parameters(), lr=1e-4, weight_decay=0.5), LocalPeer(), sync_every=3)
    fresh.load_state_dict(saved)
    group = fresh.inner.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (1e-4, 0.5)
    moments = [fresh.inner.state[p]["exp_avg"] for p in b.parameters()]
    assert_close(moments, [opt.inner.state[p]["exp_avg"] for p in a.parameters()], atol=0)


def test_a_resumed_outer_optimizer_keeps_this_peers_lr_the_one_its_joins_announce():
    # A peer started with --outer-lr 0.3 resumed a checkpoint of 0.7 and ran 0.7 while telling the coordinator 0.3.
    a = model()
    opt = DiLoCo(a, torch.optim.AdamW(a.parameters(), lr=1e-2), LocalPeer(), sync_every=3)
    train(opt, a, 0, 7)
    saved = copy.deepcopy(opt.state_dict())
    b = model()
    fresh = DiLoCo(b, torch.optim.AdamW(b.parameters(), lr=1e-2), LocalPeer(), sync_every=3,
                   outer=OuterConfig(lr=0.3))
    fresh.load_state_dict(saved)
    assert fresh.state.outer.param_groups[0]["lr"] == 0.3 and "outer lr 0.3" in fresh.run_settings()
    buffers = [fresh.state.outer.state[g]["momentum_buffer"] for g in fresh.state.globals]
    assert_close(buffers, [opt.state.outer.state[g]["momentum_buffer"] for g in opt.state.globals], atol=0)


class StopsAtSecondSync(LocalPeer):
    """A run of one peer stopped (as by SIGTERM) while its second sync is in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def sync(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 2:
            raise Stopped("stopped with a round in flight")
        return super().sync(*args, **kwargs)


def test_a_peer_resumed_from_a_stop_during_its_sync_runs_that_sync_before_its_next_step():
    a = model()
    whole = DiLoCo(a, torch.optim.SGD(a.parameters(), lr=0.1), LocalPeer(), sync_every=3)
    train(whole, a, 0, 9)
    b = model()
    stopped = DiLoCo(b, torch.optim.SGD(b.parameters(), lr=0.1), StopsAtSecondSync(), sync_every=3)
    with pytest.raises(Stopped):
        train(stopped, b, 0, 6)
    saved, saved_params = copy.deepcopy(stopped.state_dict()), params(b)  # the checkpoint taken at the stop
    c = model(seed=5)
    resumed = DiLoCo(c, torch.optim.SGD(c.parameters(), lr=0.1), LocalPeer(), sync_every=3)
    resumed.load_state_dict(saved)
    for p, q in zip(c.parameters(), saved_params):
        p.data.copy_(q)
    assert resumed.sync_if_due() and (resumed.inner_steps, resumed.steps_since_sync) == (6, 0)
    assert not resumed.sync_if_due()
    for t in range(6, 9):  # the steps after the stop, on the same batches as the uninterrupted peer's
        loss_of(c, batch(0, t)).backward()
        resumed.step(samples=1)
        resumed.zero_grad()
    assert resumed.committed_rounds == 2 and whole.committed_rounds == 3
    assert_close(params(c), params(a), atol=0)


@pytest.mark.parametrize("outer", ["adam", "yogi"])
def test_an_adaptive_outer_optimizer_survives_a_state_dict_round_trip_bit_for_bit(outer):
    # FedAdam/FedYogi-style: every Adam moment and step count is in the state, so the copy continues exactly.
    a = model()
    config = OuterConfig(name=outer, lr=0.02)
    opt = DiLoCo(a, torch.optim.AdamW(a.parameters(), lr=1e-2), LocalPeer(), sync_every=3, outer=config)
    train(opt, a, 0, 7)
    saved, saved_params = copy.deepcopy(opt.state_dict()), params(a)
    b = model(seed=5)
    fresh = DiLoCo(b, torch.optim.AdamW(b.parameters(), lr=1e-2), LocalPeer(), sync_every=3, outer=config)
    fresh.load_state_dict(saved)
    for p, q in zip(b.parameters(), saved_params):
        p.data.copy_(q)
    state = fresh.state.outer.state_dict()["state"]
    assert state and all(torch.equal(x["exp_avg"], y["exp_avg"]) for x, y in zip(
        state.values(), opt.state.outer.state_dict()["state"].values()))
    train(opt, a, 0, 8)
    train(fresh, b, 0, 8)
    assert all(torch.equal(x, y) for x, y in zip(params(a), params(b)))
    assert all(torch.equal(x, y) for x, y in zip(opt.state.globals, fresh.state.globals))


def test_a_joiner_of_an_adam_run_takes_the_outer_state_and_continues_bit_for_bit():
    a = model()
    adam = OuterConfig(name="adam", lr=0.02)
    opt = DiLoCo(a, torch.optim.AdamW(a.parameters(), lr=1e-2), LocalPeer(), sync_every=2, outer=adam)
    train(opt, a, 0, 6)
    b = model(seed=9)
    joiner = DiLoCo(b, torch.optim.AdamW(b.parameters(), lr=1e-2), LocalPeer(), sync_every=2, outer=adam)
    joiner.load_snapshot(opt.snapshot())
    # Both now apply the same committed rounds: the same averaged pseudo-gradient into the same outer state.
    update = [torch.randn_like(g) for g in opt.state.globals]
    opt.state.outer_step(range(len(update)), update, round_id=9)
    joiner.state.outer_step(range(len(update)), update, round_id=9)
    assert all(torch.equal(x, y) for x, y in zip(opt.state.globals, joiner.state.globals))
    assert opt.snapshot().meta["outer_state"] == joiner.snapshot().meta["outer_state"]


def test_a_joiner_of_another_outer_optimizer_is_refused():
    a, b = model(), model()
    opt = DiLoCo(a, torch.optim.AdamW(a.parameters(), lr=1e-2), LocalPeer(), outer=OuterConfig(name="adam", lr=0.02))
    joiner = DiLoCo(b, torch.optim.AdamW(b.parameters(), lr=1e-2), LocalPeer())
    with pytest.raises(ConfigError, match="another outer optimizer"):
        joiner.load_snapshot(opt.snapshot())


def test_a_joiner_loading_the_snapshot_holds_the_run_global_state():
    a = model()
    opt = DiLoCo(a, torch.optim.AdamW(a.parameters(), lr=1e-2), LocalPeer(), sync_every=2)
    train(opt, a, 0, 6)
    b = model(seed=9)
    joiner = DiLoCo(b, torch.optim.AdamW(b.parameters(), lr=1e-2), LocalPeer(), sync_every=2)
    joiner.load_snapshot(opt.snapshot())
    assert_close(joiner.state.globals, opt.state.globals, atol=0)
    assert_close(params(b), opt.state.globals, atol=0)
    assert joiner.state.round_id == opt.state.round_id


def _poison(m: torch.nn.Module) -> None:
    with torch.no_grad():
        m[0].weight[0, 0] = float("nan")


def test_a_diloco_peer_whose_training_diverges_restarts_from_the_global_state_and_trains_on():
    m = model()
    opt = DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=0.01), LocalPeer(), sync_every=2, codec="none")
    train(opt, m, 0, 2)  # one committed round
    global_after_round = [g.clone() for g in opt.state.globals]
    loss_of(m, batch(0, 2)).backward()
    opt.step()
    opt.zero_grad()
    _poison(m)
    loss_of(m, batch(0, 3)).backward()
    opt.step()  # the sync refuses the NaN pseudo-gradient
    assert not opt.history[-1].committed and "diverged" in opt.history[-1].reason
    assert_close(params(m), global_after_round, atol=0.0)
    assert opt.inner.state == {} and opt.samples_since_sync == 0
    train(opt, m, 0, 2)
    assert opt.history[-1].committed and all(torch.isfinite(p).all() for p in m.parameters())




def test_a_state_with_a_malformed_schedule_is_refused_before_the_parameters_change():
    # The run's digest covers the tensors, not the metadata: a donor's cursor may be anything (optimizers/statemeta.py).
    cfg = StreamingConfig(sync_every=4, fragments=2, overlap=1, codec="none")
    source_model, joiner_model = model(), model(seed=1)
    source = StreamingDiLoCo(source_model, torch.optim.SGD(source_model.parameters(), lr=0.1), LocalPeer(), cfg)
    train(source, source_model, 0, 8)
    state = source.snapshot()
    state.meta["cursor"] = "1"
    joiner = StreamingDiLoCo(joiner_model, torch.optim.SGD(joiner_model.parameters(), lr=0.1), LocalPeer(), cfg)
    before = params(joiner_model)
    with pytest.raises(ConfigError, match="'cursor' must be a whole number"):
        joiner.load_snapshot(state)
    assert_close(params(joiner_model), before, atol=0.0)
    assert (joiner.state.round_id, joiner.cursor) == (0, 0)

def test_the_optimizer_keeps_its_recent_syncs_records_and_counts_every_sync(monkeypatch):
    # A long run of per-step syncs must not hold every sync's record (~400 bytes each) for ever.
    monkeypatch.setattr(outer, "RECENT_SYNCS", 3)
    m = model()
    opt = DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=0.01), LocalPeer(), sync_every=1, codec="none")
    train(opt, m, 0, 4)
    _poison(m)
    train(opt, m, 0, 1)  # the fifth sync refuses the NaN pseudo-gradient
    train(opt, m, 0, 2)
    assert [(h.step, h.committed) for h in opt.history] == [(5, False), (6, True), (7, True)]
    assert (opt.committed_rounds, opt.syncs_missed) == (6, 1)

def test_a_streaming_peer_refused_for_nan_before_its_round_starts_restarts_from_the_global_state():
    # An elastic peer refuses a NaN input at once, before asking for a quorum (never started: no network).
    peer = ElasticCollective(ElasticConfig(coordinator="127.0.0.1:1", run_id="r"))
    m = model()
    initial = params(m)
    cfg = StreamingConfig(sync_every=4, fragments=2, overlap=0, codec="none")
    opt = StreamingDiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), peer, cfg)
    train(opt, m, 0, 1)
    _poison(m)
    train(opt, m, 0, 1)  # step 2 starts fragment 0's round
    assert opt.inflight is None and "diverged" in opt.history[-1].reason
    assert_close(params(m), initial, atol=0.0)
    assert opt.samples == [0, 0]


@pytest.mark.parametrize("make_other", [
    lambda m: StreamingDiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), LocalPeer(), StreamingConfig(fragments=1)),
    lambda m: FedAvg(m, torch.optim.SGD(m.parameters(), lr=0.1), LocalPeer()),
])
def test_a_state_of_another_algorithm_is_refused_and_changes_nothing(make_other):
    donor_model = model(1)
    donor = DiLoCo(
        donor_model, torch.optim.SGD(donor_model.parameters(), lr=0.1), LocalPeer(), sync_every=2, codec="none"
    )
    train(donor, donor_model, 0, 4)
    joiner_model = model(2)
    joiner = make_other(joiner_model)
    before = [p.clone() for p in params(joiner_model)]
    with pytest.raises(ConfigError, match=r"the run's state is a 'diloco' state and this peer runs '.+': every peer "
                                          r"of a run must run the same --algorithm"):
        joiner.load_snapshot(donor.snapshot())
    assert_close(params(joiner_model), before, atol=0)
    with pytest.raises(ConfigError, match="same --algorithm"):
        joiner.load_state_dict(donor.state_dict())


def test_a_model_with_buffers_is_warned_that_rounds_average_parameters_only(caplog):
    # BatchNorm's running statistics never travel: each peer keeps its own, and a joiner starts from fresh ones.
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    with caplog.at_level(logging.WARNING, logger="optimizers.outer"):
        DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), LocalPeer(), sync_every=2)
    (record,) = caplog.records
    assert "the model has buffers (1.running_mean, 1.running_var)" in record.getMessage()


def test_a_model_without_floating_buffers_is_not_warned(caplog):
    model = torch.nn.Linear(4, 4)
    model.register_buffer("count", torch.zeros((), dtype=torch.long))
    with caplog.at_level(logging.WARNING, logger="optimizers.outer"):
        DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), LocalPeer(), sync_every=2)
    assert caplog.records == []


# -- error feedback with a sparse codec ------------------------------------------------------------------------


def test_streaming_keeps_one_error_feedback_residual_per_fragment_with_a_sparse_codec():
    # Only DiLoCo kept one: Streaming DiLoCo (and async DiLoCo) dropped what topk left out, for good.
    m = model()
    cfg = StreamingConfig(sync_every=8, fragments=2, overlap=1, codec="topk/4", outer=SGD1)
    opt = StreamingDiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), LocalPeer(), cfg)
    train(opt, m, 0, 17)
    sizes = {tag: sum(opt.state.params[i].numel() for i in opt.round_indices(tag)) for tag in opt._residuals}
    assert len(sizes) == 2 and {tag: r.numel() for tag, r in opt._residuals.items()} == sizes
    assert all(bool(r.abs().sum() > 0) for r in opt._residuals.values())


def test_async_diloco_keeps_an_error_feedback_residual_with_a_sparse_codec():
    from optimizers.asyncdiloco import AsyncDiLoCo, AsyncDiLoCoConfig

    m = model()
    opt = AsyncDiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), LocalPeer(),
                      AsyncDiLoCoConfig(sync_every=3, codec="topk/4", outer=SGD1))
    train(opt, m, 0, 7)
    (residual,) = opt._residuals.values()
    assert residual.numel() == sum(p.numel() for p in m.parameters()) and bool(residual.abs().sum() > 0)


def test_a_dense_codec_keeps_no_residual():
    m = model()
    opt = DiLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), LocalPeer(), sync_every=3, codec="int8")
    train(opt, m, 0, 7)
    assert opt._residuals == {}


def test_noloco_refuses_a_sparse_codec_which_would_drop_most_weights_from_its_mean():
    from optimizers.noloco import NoLoCoConfig

    with pytest.raises(ConfigError, match="NoLoCo averages its replicas' weights"):
        NoLoCoConfig(codec="topk/64")
