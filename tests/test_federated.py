"""The federated algorithms (optimizers/federated.py): their rounds, client objectives, schedules and state."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from collectives.elastic import CaughtUp, CommittedResult
from collectives.errors import ConfigError, Incompatible
from collectives.membership.roundplan import RoundPlan
from optimizers.federated import DIRECTION_PREFIX, ClientMomentumConfig, FedAvg, FedConfig, FedProxConfig, sampling_rate
from optimizers.peers import LocalPeer
from optimizers.privacy import DPConfig
from optimizers.registry import get_algorithm
from peer.runtime.training import TrainConfig
from tests.support.threadgroup import ThreadGroup

FEDERATED = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "client-momentum")


def model(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2)


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)


def train(opt: FedAvg, m: torch.nn.Module, rank: int, steps: int, samples: int = 4) -> None:
    for step in range(steps):
        x, y = batch(rank, step)
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step(samples=samples)
        opt.zero_grad()


def run_group(n: int, config: FedConfig, steps: int, samples: list[int] | None = None) -> list[FedAvg]:
    """n peers on an exact in-memory group, each training its own batches; their optimizers after `steps`."""
    group = ThreadGroup(n)
    models = [model() for _ in range(n)]
    opts = [FedAvg(m, torch.optim.SGD(m.parameters(), lr=0.1), group.peers[r], config) for r, m in enumerate(models)]
    threads = [
        threading.Thread(target=train, args=(opts[r], models[r], r, steps, (samples or [4] * n)[r])) for r in range(n)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return opts


def test_fedavg_global_model_is_the_sample_weighted_mean_of_the_local_models():
    n, s = 3, 2
    config = FedConfig(sync_every=s, codec="none")
    # The same local training, but no round: each peer's local model after S steps.
    locals_ = []
    for r in range(n):
        m = model()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for step in range(s):
            x, y = batch(r, step)
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
            opt.zero_grad()
        locals_.append(torch.cat([p.detach().reshape(-1) for p in m.parameters()]).double())
    samples = [4, 8, 12]  # per step: weights 8, 16, 24 over the two steps
    expected = sum(w * loc for w, loc in zip(samples, locals_)) / sum(samples)
    opts = run_group(n, config, s, samples)
    for opt in opts:
        got = torch.cat([g.reshape(-1) for g in opt.state.globals]).double()
        assert torch.allclose(got, expected, rtol=0, atol=1e-6)
        assert opt.committed_rounds == 1


def test_every_peer_ends_each_round_with_the_same_global_model():
    opts = run_group(3, FedConfig(sync_every=2, codec="none"), 6)
    digests = {opt.state.digest() for opt in opts}
    assert len(digests) == 1 and opts[0].committed_rounds == 3


def test_fedprox_with_mu_zero_is_fedavg_bit_for_bit():
    fedavg = run_group(2, FedConfig(sync_every=2, codec="none"), 4)
    fedprox = run_group(2, FedProxConfig(sync_every=2, codec="none", proximal_mu=0.0), 4)
    assert fedavg[0].state.digest() == fedprox[0].state.digest()


def test_fedprox_adds_mu_times_the_distance_to_the_global_model_to_each_gradient():
    m = model()
    opt = FedAvg(m, torch.optim.SGD(m.parameters(), lr=1.0), LocalPeer(), FedProxConfig(proximal_mu=0.5, sync_every=10))
    with torch.no_grad():
        m.weight.add_(1.0)  # the local model is 1 away from the global one in every weight
    m.weight.grad = torch.zeros_like(m.weight)
    m.bias.grad = torch.zeros_like(m.bias)
    before = m.weight.detach().clone()
    opt.step()
    # gradient 0 + 0.5 * (w - w_global) = 0.5 everywhere; SGD lr 1 moves each weight by -0.5
    assert torch.equal(m.weight.detach(), before - 0.5)


def test_client_momentum_mixes_the_last_rounds_direction_into_each_gradient():
    m = model()
    config = ClientMomentumConfig(sync_every=2, client_momentum=0.5, codec="none")
    opt = FedAvg(m, torch.optim.SGD(m.parameters(), lr=0.1), LocalPeer(), config)
    train(opt, m, 0, 2)  # one round: the direction is its update over lr * S
    direction = opt.direction
    assert direction is not None
    # A zero gradient now steps along b * direction only.
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in m.parameters()]
    opt.step()
    for p, b, d in zip(m.parameters(), before, direction):
        assert torch.allclose(p.detach(), b - 0.1 * 0.5 * d, rtol=0, atol=1e-7)


def test_client_momentum_with_adamw_moves_by_the_mix_of_adamws_own_step_and_the_direction():
    m = model()
    config = ClientMomentumConfig(sync_every=2, client_momentum=0.5, codec="none")
    opt = FedAvg(m, torch.optim.AdamW(m.parameters(), lr=0.01), LocalPeer(), config)
    train(opt, m, 0, 2)  # one round: a direction to mix in
    direction = opt.direction
    # The same AdamW, from the same state, without the direction: the step it makes on its own.
    twin = model()
    twin.load_state_dict(m.state_dict())
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=0.01)
    twin_opt.load_state_dict(copy.deepcopy(opt.inner.state_dict()))  # load_state_dict alone shares the tensors
    x, y = batch(0, 7)
    for net in (m, twin):
        torch.nn.functional.mse_loss(net(x), y).backward()
    before = [p.detach().clone() for p in m.parameters()]
    opt.step()
    twin_opt.step()
    for p, b, own, d in zip(m.parameters(), before, twin.parameters(), direction):
        # (1 - b) x AdamW's own move + b x lr x direction: the direction is not fed through AdamW's statistics.
        assert torch.allclose(p.detach(), b + 0.5 * (own.detach() - b) - 0.5 * 0.01 * d, rtol=0, atol=1e-7)
    for state, twin_state in zip(opt.inner.state.values(), twin_opt.state.values()):
        assert torch.equal(state["exp_avg"], twin_state["exp_avg"])


def test_client_momentum_direction_is_the_mean_update_over_lr_times_steps():
    m = model()
    opt = FedAvg(m, torch.optim.SGD(m.parameters(), lr=0.1), LocalPeer(),
                 ClientMomentumConfig(sync_every=2, codec="none"))
    start = [g.clone() for g in opt.state.globals]
    train(opt, m, 0, 2)
    for d, s, g in zip(opt.direction, start, opt.state.globals):
        assert torch.allclose(d, (s - g) / (0.1 * 2), rtol=0, atol=1e-5)


def test_local_epochs_syncs_once_the_peer_has_trained_that_many_of_its_examples():
    m = model()
    opt = FedAvg(m, torch.optim.SGD(m.parameters(), lr=0.1), LocalPeer(), FedConfig(local_epochs=2.0, codec="none"))
    opt.epoch_samples = 10
    train(opt, m, 0, 4, samples=4)  # 16 examples < 20
    assert opt.committed_rounds == 0
    train(opt, m, 0, 1, samples=4)  # 20 examples: two epochs of 10
    assert opt.committed_rounds == 1


def test_local_epochs_without_the_partition_size_says_what_to_set():
    m = model()
    opt = FedAvg(m, torch.optim.SGD(m.parameters(), lr=0.1), LocalPeer(), FedConfig(local_epochs=1.0))
    with pytest.raises(ConfigError, match="epoch_samples"):
        train(opt, m, 0, 1)


@pytest.mark.parametrize(
    ("config", "fields", "says"),
    [
        ("FedAdamConfig", {"eta": 0.0}, "--eta must be a positive finite number, got 0.0"),
        ("FedAdamConfig", {"tau": 0.0}, "--tau must be a positive finite number, got 0.0"),
        ("FedYogiConfig", {"beta_1": 1.0}, "--beta-1/--beta-2 must be two numbers in [0, 1), got (1.0, 0.99)"),
        ("FedAvgMConfig", {"server_momentum": 1.0}, "--server-momentum must be in [0, 1), got 1.0"),
        ("FedAvgMConfig", {"server_learning_rate": 0.0}, "--server-learning-rate must be a positive finite number, "
                                                         "got 0.0"),
    ],
)
def test_a_server_setting_out_of_range_is_named_by_the_strategys_own_option(config, fields, says):
    # It was named as --outer-lr, --outer-momentum...: options refused for these strategies.
    import optimizers.federated as federated

    with pytest.raises(ConfigError) as refused:
        getattr(federated, config)(**fields)
    assert str(refused.value) == says


def test_local_epochs_and_a_sync_every_of_ones_own_are_refused_together():
    # Both say when a round is due: local_epochs won, and --sync-every 5 was ignored without a word.
    with pytest.raises(ConfigError, match=r"give local_epochs \(1 epoch\(s\) a round\) or sync_every \(5 steps a "
                                          r"round\), not both"):
        FedConfig(local_epochs=1.0, sync_every=5)


def test_local_epochs_with_a_task_that_streams_without_end_is_refused_naming_both():
    from peer.runtime.training import TrainConfig, epochs_problem
    from peer.tasks import TaskConfig, make_task

    endless, digits = make_task("synthetic-lm", TaskConfig()), make_task("digits", TaskConfig())
    train = TrainConfig(algorithm="fedavg", options=FedConfig(local_epochs=1.0))
    assert epochs_problem(endless, train, 2).startswith("--local-epochs 1 counts rounds in epochs of a peer's data, "
                                                        "and task 'synthetic-lm' streams without end")
    assert epochs_problem(digits, train, 2) == ""
    assert epochs_problem(endless, TrainConfig(algorithm="fedavg"), 2) == ""


def test_a_peer_left_out_of_a_round_that_waits_restarts_from_the_new_global_model():
    m = model()
    opt = FedAvg(m, torch.optim.SGD(m.parameters(), lr=0.1), LocalPeer(), FedConfig(sync_every=100, codec="none"))
    train(opt, m, 0, 3)
    value = torch.full((opt.state.numel(range(2)),), 0.25)
    opt._catch_up(CaughtUp([CommittedResult(round_id=1, tag="fedavg", value=value, epoch=0, source="x")]))
    for p, g in zip(m.parameters(), opt.state.globals):
        assert torch.equal(p.detach(), g)
    assert (opt.steps_since_sync, opt.samples_since_sync) == (0, 0)


def test_a_peer_left_out_of_a_round_that_trains_keeps_its_own_update_on_the_new_global_model():
    m = model()
    config = FedConfig(sync_every=100, codec="none", unsampled="train")
    opt = FedAvg(m, torch.optim.SGD(m.parameters(), lr=0.1), LocalPeer(), config)
    start = [g.clone() for g in opt.state.globals]
    train(opt, m, 0, 3)
    own = [p.detach() - s for p, s in zip(m.parameters(), start)]
    value = torch.full((opt.state.numel(range(2)),), 0.25)
    opt._catch_up(CaughtUp([CommittedResult(round_id=1, tag="fedavg", value=value, epoch=0, source="x")]))
    for p, g, o in zip(m.parameters(), opt.state.globals, own):
        assert torch.allclose(p.detach(), g + o, rtol=0, atol=1e-7)
    assert opt.samples_since_sync == 12 and opt.steps_since_sync == 0


def test_state_dict_carries_the_direction_and_restores_it():
    m = model()
    config = ClientMomentumConfig(sync_every=2, codec="none")
    opt = FedAvg(m, torch.optim.SGD(m.parameters(), lr=0.1), LocalPeer(), config)
    train(opt, m, 0, 2)
    state = opt.state_dict()
    m2 = model(1)
    opt2 = FedAvg(m2, torch.optim.SGD(m2.parameters(), lr=0.1), LocalPeer(), config)
    opt2.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(opt.direction, opt2.direction))
    assert opt2.state.digest() == opt.state.digest()


def test_a_joiner_adopts_the_direction_from_the_runs_snapshot():
    m = model()
    config = ClientMomentumConfig(sync_every=2, codec="none")
    opt = FedAvg(m, torch.optim.SGD(m.parameters(), lr=0.1), LocalPeer(), config)
    train(opt, m, 0, 2)
    m2 = model(1)
    joiner = FedAvg(m2, torch.optim.SGD(m2.parameters(), lr=0.1), LocalPeer(), config)
    joiner.load_snapshot(opt.snapshot())
    assert all(torch.equal(a, b) for a, b in zip(opt.direction, joiner.direction))


def test_a_snapshot_taken_while_a_round_is_applied_holds_its_parameters_and_its_direction_together():
    # Chaos seed 1338: most likely a joiner was served round 21's parameters with round 20's direction.
    m = model()
    opt = FedAvg(m, torch.optim.SGD(m.parameters(), lr=0.1), LocalPeer(), ClientMomentumConfig(sync_every=2,
                                                                                                codec="none"))
    train(opt, m, 0, 2)  # round 1: a direction to go stale
    servers: list[threading.Thread] = []
    snapshots: list = []
    outer_step = opt.state.outer_step

    def step_then_snapshot(*args, **kwargs):
        outer_step(*args, **kwargs)  # the parameters are the new round's; the direction is not yet
        server = threading.Thread(target=lambda: snapshots.append(opt.snapshot()))
        server.start()
        server.join(timeout=0.5)
        waited.append(server.is_alive())  # read while the round is still being applied
        servers.append(server)

    waited: list[bool] = []
    opt.state.outer_step = step_then_snapshot
    train(opt, m, 0, 2)  # round 2, with a joiner's fetch in the middle of applying it
    assert waited == [True]  # the fetch waited for the round to be applied whole
    servers[0].join(timeout=10)
    served = [snapshots[0].tensors[f"{DIRECTION_PREFIX}{n}"] for n in opt.state.names]
    assert snapshots[0].round_id == 2 and all(torch.equal(a, b) for a, b in zip(served, opt.direction))


def test_with_privacy_every_member_weighs_one_and_each_round_reports_epsilon():
    m = model()
    # a run of one
    config = FedConfig(sync_every=2, codec="none", dp=DPConfig(clip=1.0, noise=1.0, seed=3, min_members=1))
    weights = []

    class Recording(LocalPeer):
        def sync(self, tensors, weight=1.0, tag="", codec=None, aggregator=None, prepare=None):
            weights.append(weight)
            return super().sync(tensors, weight, tag, codec, aggregator, prepare)

    opt = FedAvg(m, torch.optim.SGD(m.parameters(), lr=0.1), Recording(), config)
    train(opt, m, 0, 4, samples=16)
    assert weights == [1.0, 1.0]
    eps = [r.epsilon for r in opt.history]
    assert all(e is not None and e > 0 for e in eps) and eps[1] > eps[0]
    assert opt.state_dict()["meta"]["privacy"]["accountant"]


@pytest.mark.parametrize(
    ("dp", "asked"),
    [
        (DPConfig(clip=1.0, seed=3), [2]),  # the default minimum of a private round
        (DPConfig(clip=1.0, seed=3, min_members=4), [4]),
        (DPConfig(), [1]),  # no privacy: nothing asked beyond the aggregator's need (the sync's default)
    ],
)
def test_a_private_round_asks_its_peer_for_the_minimum_number_of_members(dp, asked):
    m = model()
    seen = []

    class Recording(LocalPeer):
        def sync(self, tensors, *args, min_members=1, **kwargs):
            seen.append(min_members)
            return super().sync(tensors, *args, **kwargs)

    opt = FedAvg(m, torch.optim.SGD(m.parameters(), lr=0.1), Recording(), FedConfig(sync_every=2, codec="none", dp=dp))
    train(opt, m, 0, 2)
    assert seen == asked


def test_a_private_run_of_one_peer_stops_at_its_first_sync_saying_what_to_change():
    m = model()
    opt = FedAvg(
        m, torch.optim.SGD(m.parameters(), lr=0.1), LocalPeer(), FedConfig(sync_every=2, dp=DPConfig(clip=1.0))
    )
    with pytest.raises(Incompatible, match="run more peers, or give --dp-min-members 1"):
        train(opt, m, 0, 2)


def test_privacy_refuses_a_robust_aggregator():
    with pytest.raises(ConfigError, match="mean aggregator"):
        FedConfig(aggregator="median", dp=DPConfig(clip=1.0))


@pytest.mark.parametrize("name", FEDERATED)
def test_every_federated_algorithm_is_registered_and_trains(name):
    config = TrainConfig.of(name, steps=4, sync_every=2, codec="none")
    m = model()
    opt = get_algorithm(name).make(m, torch.optim.SGD(m.parameters(), lr=0.1), LocalPeer(), config.options)
    train(opt, m, 0, 4)
    assert opt.committed_rounds == 2
    assert all(torch.isfinite(g).all() for g in opt.state.globals)


def test_a_round_of_another_algorithm_is_refused():
    m = model()
    opt = FedAvg(m, torch.optim.SGD(m.parameters(), lr=0.1), LocalPeer(), FedProxConfig())
    with pytest.raises(ConfigError, match="'fedprox' rounds, not 'fedavg'"):
        opt.round_indices("fedavg")


def test_fedadam_config_builds_its_server_optimizer_from_flowers_names():
    config = TrainConfig.of("fedadam", eta=0.05, beta_1=0.8, tau=0.01).options
    assert (config.outer.name, config.outer.lr, config.outer.betas[0], config.outer.eps) == ("fedadam", 0.05, 0.8, 0.01)


@pytest.mark.parametrize(
    ("policy", "members", "candidates", "rate"),
    [
        ("sample:2", "bc", "abcd", 0.5),  # a seeded random draw: the accountant's subsampling rate
        ("sample:0.5", "bc", "abc", 2 / 3),
        ("sample:2", "ab", "", 1.0),  # no candidates named: no rate to claim
        ("allbut:1", "abc", "abcd", 1.0),  # the fastest three, not a random draw: no amplification
        ("buffer:2", "ab", "abcd", 1.0),
        ("all", "abcd", "", 1.0),
    ],
)
def test_only_a_random_sample_counts_as_a_sampling_rate_for_privacy(policy, members, candidates, rate):
    plan = RoundPlan("round", round_id=1, members=tuple((m, "") for m in members), policy=policy,
                     candidates=tuple(candidates))
    assert sampling_rate(plan) == rate
