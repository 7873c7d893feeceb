"""NoLoCo's optimizer on in-memory peers: seeded pairs, the outer step on each replica, the replicas' spread.

The step's arithmetic is table-tested in tests/test_noloco_math.py; runs over real processes are in
tests/test_async_processes.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from collectives.errors import ConfigError, RoundFailed, TransportClosed
from collectives.membership.roundplan import RoundPlan
from collectives.reduce.parts import flatten
from optimizers.noloco import NoLoCo, NoLoCoConfig, count_sketch
from optimizers.outer_optim import OuterConfig
from optimizers.pairing import group_of, pair_groups

sys.path.insert(0, str(Path(__file__).parent))
from support.threadgroup import ThreadGroup
from support.threads import run_threads, small_model, train_small

pytestmark = pytest.mark.timeout(60)


model = small_model
train = train_small


def replicas(n: int, **options) -> tuple[list[torch.nn.Module], list[NoLoCo]]:
    group = ThreadGroup(n)
    models = [model() for _ in range(n)]
    config = NoLoCoConfig(sync_every=3, **options)
    opts = [NoLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), group.peers[r], config) for r, m in enumerate(models)]
    return models, opts


def test_with_alpha_0_and_beta_gamma_1_each_pair_ends_on_the_mean_of_its_local_models() -> None:
    models, opts = replicas(4)
    locals_after = {}

    def run(r: int) -> None:
        opts[r].on_sync_start = lambda step, r=r: locals_after.__setitem__(r, flatten(list(models[r].parameters())))
        train(opts[r], models[r], r, 3)

    run_threads([lambda r=r: run(r) for r in range(4)])
    plan = RoundPlan(action="round", round_id=1, members=tuple((f"peer{r}", "") for r in range(4)))
    groups = pair_groups(plan.seed, 1, [f"peer{r}" for r in range(4)])
    for r in range(4):
        pair = [int(p[4:]) for p in group_of(f"peer{r}", groups)]
        want = sum(locals_after[p] for p in pair) / 2
        assert torch.allclose(flatten(opts[r].state.globals), want, atol=1e-6)
        assert torch.equal(flatten(list(models[r].parameters())).detach(), flatten(opts[r].state.globals))
    assert all(list(o.group_sizes) == [2] for o in opts)
    assert all(o.history[-1].group_size == 2 for o in opts)


def max_spread(opts: list[NoLoCo]) -> float:
    phis = [flatten(o.state.globals) for o in opts]
    mean = sum(phis) / len(phis)
    return max(float((p - mean).norm()) for p in phis)


def test_replicas_differ_between_pairs_and_the_pull_keeps_them_closer() -> None:
    spreads = {}
    for pull in (0.0, 0.7):
        models, opts = replicas(4, outer=OuterConfig(lr=0.7, momentum=0.5, nesterov=False), pull=pull)
        run_threads([lambda r=r, o=opts, m=models: train(o[r], m[r], r, 30) for r in range(4)])  # ten outer steps
        spreads[pull] = max_spread(opts)
        assert all(len(o.group_sizes) == 10 and set(o.group_sizes) == {2} for o in opts)
    assert 0 < spreads[0.7] < 0.5 * spreads[0.0]


def test_an_odd_round_makes_one_trio_or_leaves_one_peer_alone() -> None:
    for odd, sizes in (("trio", {2, 3}), ("idle", {1, 2})):
        models, opts = replicas(5, odd=odd)
        run_threads([lambda r=r, o=opts, m=models: train(o[r], m[r], r, 3) for r in range(5)])
        assert {o.group_sizes[0] for o in opts} == sizes


def test_the_momentum_travels_with_the_state_a_joiner_fetches() -> None:
    models, opts = replicas(2, outer=OuterConfig(lr=0.7, momentum=0.5, nesterov=False))
    run_threads([lambda r=r: train(opts[r], models[r], r, 3) for r in range(2)])
    joiner_model = model(seed=9)
    joiner = NoLoCo(joiner_model, torch.optim.SGD(joiner_model.parameters(), lr=0.1), ThreadGroup(1).peers[0],
                    NoLoCoConfig(sync_every=3, outer=OuterConfig(lr=0.7, momentum=0.5, nesterov=False)))
    joiner.load_snapshot(opts[0].snapshot())
    for g_j, g_0 in zip(joiner.state.globals, opts[0].state.globals):
        assert torch.equal(g_j, g_0)
        assert torch.equal(
            joiner.state.outer.state[g_j]["noloco_momentum"], opts[0].state.outer.state[g_0]["noloco_momentum"]
        )
        assert opts[0].state.outer.state[g_0]["noloco_momentum"].abs().sum() > 0


def test_the_spread_is_measured_through_a_sketch_all_reduce() -> None:
    models, opts = replicas(4, spread_sketch=1 << 14)
    run_threads([lambda r=r: train(opts[r], models[r], r, 6) for r in range(4)])
    got: dict[int, float | None] = {}
    run_threads([lambda r=r: got.__setitem__(r, opts[r].measure_spread()) for r in range(4)])
    mean = sum(flatten(o.state.globals) for o in opts) / 4
    for r in range(4):
        exact = float((flatten(opts[r].state.globals) - mean).norm())
        assert got[r] == pytest.approx(exact, rel=0.25)


def test_the_spread_round_labels_the_unchanged_state_with_its_round() -> None:
    # A joiner asks for the run's last round, which may be a spread round: the holders must serve their state as it.
    models, opts = replicas(2)
    run_threads([lambda r=r: train(opts[r], models[r], r, 3) for r in range(2)])
    before = [(o.state.round_id, [g.clone() for g in o.state.globals]) for o in opts]
    run_threads([lambda r=r: opts[r].measure_spread() for r in range(2)])
    for o, (round_id, globals_) in zip(opts, before):
        assert o.state.round_id == round_id + 1
        assert all(torch.equal(g, h) for g, h in zip(o.state.globals, globals_))
        assert o.snapshot().round_id == round_id + 1


class _Resyncing:
    """A peer whose next sync raises Resynced with a given snapshot, as one dropped from the run does."""

    def __init__(self, snapshot) -> None:
        self.snapshot = snapshot

    def sync(self, *args, **kwargs):
        from collectives.syncphases import Resynced

        raise Resynced(self.snapshot, "127.0.0.1:1")


def test_a_peer_resynced_during_the_spread_round_adopts_the_runs_replica() -> None:
    models, opts = replicas(2)
    run_threads([lambda r=r: train(opts[r], models[r], r, 3) for r in range(2)])
    stale_model = model(seed=9)
    stale = NoLoCo(stale_model, torch.optim.SGD(stale_model.parameters(), lr=0.1), _Resyncing(opts[0].snapshot()),
                   NoLoCoConfig(sync_every=3))
    assert stale.measure_spread() is None
    assert stale.state.round_id == opts[0].state.round_id
    assert all(torch.equal(g, h) for g, h in zip(stale.state.globals, opts[0].state.globals))


class _Raising:
    """A peer whose next sync raises the given error."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def sync(self, *args, **kwargs):
        raise self.error


@pytest.mark.parametrize(("error", "raised"), [
    (TransportClosed("the transport is closed"), True),  # a closed transport is no missed measurement
    (RoundFailed("round 3 aborted"), False),  # a round that did not commit: not measured
])
def test_the_spread_round_reraises_a_usage_error_and_counts_a_failed_round_as_not_measured(error, raised) -> None:
    m = model(seed=1)
    opt = NoLoCo(m, torch.optim.SGD(m.parameters(), lr=0.1), _Raising(error), NoLoCoConfig(sync_every=3))
    if raised:
        with pytest.raises(type(error)):
            opt.measure_spread()
    else:
        assert opt.measure_spread() is None


def test_a_count_sketch_is_linear_and_keeps_the_norm_in_expectation() -> None:
    x, y = torch.randn(5000), torch.randn(5000)
    assert torch.allclose(count_sketch(x + y, 256), count_sketch(x, 256) + count_sketch(y, 256), atol=1e-4)
    norms = [float(count_sketch(x, 512, seed).norm() ** 2) for seed in range(40)]
    assert sum(norms) / len(norms) == pytest.approx(float(x.norm() ** 2), rel=0.05)


@pytest.mark.parametrize(("options", "message"), [
    ({"outer": OuterConfig(name="adam", lr=0.01)}, "use the sgd outer optimizer"),
    ({"aggregator": "median"}, "the aggregator must be mean"),
    ({"odd": "pair"}, "odd must be one of trio, idle"),
    ({"buffer": 1}, "at least 2"),
    ({"pull": -1.0}, "pull gamma must be >= 0"),
])
def test_a_bad_option_is_refused(options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        NoLoCoConfig(**options)


def test_the_quorum_is_every_live_peer_or_the_buffer() -> None:
    assert NoLoCoConfig().expected_quorum() is None
    assert NoLoCoConfig(buffer=2).expected_quorum() == "buffer:2"
