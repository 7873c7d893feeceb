"""Differential privacy without a trusted server: clipping, each member's noise, the accountant, the prepare seam."""

from __future__ import annotations

import itertools
import json
import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant, rdp_privacy_accountant

from collectives.codecs import CodecConfig
from collectives.elastic import ElasticCollective, ElasticConfig, check_prepared
from collectives.errors import ConfigError, Incompatible, ProtocolError
from collectives.membership.coordinatorerrors import GroupTooSmall
from collectives.membership.roundplan import RoundPlan
from collectives.reduce.aggregators import AggregatorConfig
from collectives.reduce.parts import flatten
from collectives.reduce.round import AllReduceConfig
from optimizers.diloco import DiLoCo
from optimizers.outer_optim import OuterConfig
from optimizers.peers import LocalPeer
from optimizers.privacy import (
    DifferentialPrivacy,
    DPConfig,
    PrivacyAccountant,
    add_noise,
    clip_to_norm,
    noise_generator,
    update_noise_multiplier,
)
from peer.coordinator.config import CoordinatorConfig
from tests.support.coordinator import CoordinatorThread

DELTA = 1e-5
Relation = dp_accounting.NeighboringRelation


def plan_of(n: int, round_id: int = 1) -> RoundPlan:
    return RoundPlan(action="round", round_id=round_id, members=tuple((f"p{i}", "") for i in range(n)))


# -- clipping ---------------------------------------------------------------------------------------


def test_a_3_4_vector_clipped_to_1_is_0_6_0_8_and_its_norm_was_5():
    x = torch.tensor([3.0, 4.0])
    clipped, norm = clip_to_norm([x], 1.0)
    assert torch.equal(clipped[0], torch.tensor([0.6, 0.8]))
    assert norm == 5.0
    assert torch.equal(x, torch.tensor([3.0, 4.0]))  # the input is left alone


def test_clipping_takes_the_norm_over_all_tensors_together():
    clipped, norm = clip_to_norm([torch.tensor([3.0]), torch.tensor([[4.0]])], 2.5)
    assert norm == 5.0
    assert [t.tolist() for t in clipped] == [[1.5], [[2.0]]]


def test_an_update_within_the_clip_norm_is_returned_unchanged_as_new_tensors():
    x = torch.tensor([0.3, -0.4])
    clipped, norm = clip_to_norm([x], 1.0)
    assert torch.equal(clipped[0], x) and clipped[0] is not x
    assert norm == pytest.approx(0.5, abs=1e-7)


# -- noise ------------------------------------------------------------------------------------------


def test_one_members_noise_has_std_sigma_c_over_sqrt_n():
    n, clip, sigma = 4, 2.0, 1.5
    noise = add_noise(torch.zeros(1_000_000), n, clip, sigma, noise_generator(7))
    # Seeded, so the figures are fixed; over a million coordinates they sit within 1% of the law's.
    assert float(noise.std()) == pytest.approx(sigma * clip / math.sqrt(n), rel=0.01)
    assert abs(float(noise.mean())) < 0.01 * sigma * clip / math.sqrt(n)


def test_the_sum_of_the_members_noises_carries_sigma_c():
    n, clip, sigma = 8, 0.5, 1.0
    total = sum(add_noise(torch.zeros(200_000), n, clip, sigma, noise_generator(3, f"peer{i}")) for i in range(n))
    assert float(total.std()) == pytest.approx(sigma * clip, rel=0.01)


def test_add_noise_returns_a_new_tensor_and_keeps_its_input():
    x = torch.ones(10)
    y = add_noise(x, 1, 1.0, 1.0, noise_generator(0))
    assert torch.equal(x, torch.ones(10)) and not torch.equal(y, x)


def test_a_fixed_seed_gives_each_peer_its_own_reproducible_noise():
    def draw(stream: str) -> torch.Tensor:
        return torch.randn(5, generator=noise_generator(11, stream))

    assert torch.equal(draw("a"), draw("a"))
    assert not torch.equal(draw("a"), draw("b"))
    # Without a seed, every generator starts from os.urandom.
    assert not torch.equal(
        torch.randn(5, generator=noise_generator(None)), torch.randn(5, generator=noise_generator(None))
    )


# -- the accountant ---------------------------------------------------------------------------------


def direct_epsilon(relation, event, rounds: int) -> float:
    accountant = RdpAccountant(neighboring_relation=relation)
    accountant.compose(event, rounds)
    return accountant.get_epsilon(DELTA)


def test_unsampled_rounds_cost_what_dp_accounting_says_of_the_composed_gaussian():
    accountant = PrivacyAccountant(noise=1.1)
    for _ in range(12):
        accountant.record_round()
    want = direct_epsilon(Relation.REPLACE_SPECIAL, dp_accounting.GaussianDpEvent(1.1), 12)
    assert accountant.epsilon(DELTA) == pytest.approx(want, rel=1e-12)
    assert accountant.rounds == 12


def test_the_gaussians_rdp_is_alpha_over_2_sigma_squared_per_round():
    # The closed form of the Gaussian mechanism's RDP (Mironov 2017), through the library's conversion to epsilon.
    sigma, rounds = 1.1, 12
    accountant = PrivacyAccountant(noise=sigma)
    for _ in range(rounds):
        accountant.record_round()
    orders = np.asarray(RdpAccountant().orders, dtype=np.float64)
    want, _ = rdp_privacy_accountant.compute_epsilon(orders, rounds * orders / (2 * sigma**2), DELTA)
    assert accountant.epsilon(DELTA) == pytest.approx(want, rel=1e-12)


def test_under_replace_one_the_sensitivity_is_2c_so_the_multiplier_is_halved():
    accountant = PrivacyAccountant(noise=2.0, adjacency="replace-one")
    for _ in range(5):
        accountant.record_round()
    want = direct_epsilon(Relation.REPLACE_ONE, dp_accounting.GaussianDpEvent(1.0), 5)
    assert accountant.epsilon(DELTA) == pytest.approx(want, rel=1e-12)


def test_sampled_rounds_are_dp_accountings_sampled_without_replacement_gaussian():
    accountant = PrivacyAccountant(noise=2.0, adjacency="replace-one")
    for _ in range(10):
        accountant.record_round(0.125)
    event = dp_accounting.SampledWithoutReplacementDpEvent(8, 1, dp_accounting.GaussianDpEvent(1.0))
    assert accountant.epsilon(DELTA) == pytest.approx(direct_epsilon(Relation.REPLACE_ONE, event, 10), rel=1e-9)


def test_epsilon_is_zero_before_any_round_and_grows_with_every_round():
    accountant = PrivacyAccountant(noise=1.0)
    seen = [accountant.epsilon(DELTA)]
    for _ in range(5):
        accountant.record_round()
        seen.append(accountant.epsilon(DELTA))
    assert seen[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(seen))


def test_epsilon_shrinks_with_the_sampling_rate():
    def spent(q: float) -> float:
        accountant = PrivacyAccountant(noise=1.0, adjacency="replace-one")
        for _ in range(10):
            accountant.record_round(q)
        return accountant.epsilon(DELTA)

    assert spent(0.25) < spent(0.5) < spent(1.0)


def test_at_a_rate_where_the_sampled_bound_is_loose_the_unsampled_one_is_used():
    # dp-accounting's sampled-without-replacement bound for 3 of 4 peers at multiplier 0.5 is looser than the
    # unsampled Gaussian's (423 against 295 after 100 rounds); sampling never costs privacy, so it costs at most that.
    sampled, full = PrivacyAccountant(1.0, "replace-one"), PrivacyAccountant(1.0, "replace-one")
    for _ in range(100):
        sampled.record_round(0.75)
        full.record_round(1.0)
    assert sampled.epsilon(DELTA) <= full.epsilon(DELTA)


def test_sampling_is_credited_only_under_replace_one_adjacency():
    with pytest.raises(ConfigError, match="replace-one adjacency"):
        PrivacyAccountant(noise=1.0).record_round(0.5)


def test_the_accountants_state_round_trips_through_json():
    accountant = PrivacyAccountant(noise=1.0, adjacency="replace-one")
    for q in [1.0, 1.0, 0.5, 0.5, 0.5, 1.0]:
        accountant.record_round(q)
    state = json.loads(json.dumps(accountant.state_dict()))
    assert state == {"noise": 1.0, "adjacency": "replace-one", "rates": [[1.0, 2], [0.5, 3], [1.0, 1]]}
    restored = PrivacyAccountant(noise=1.0, adjacency="replace-one")
    restored.load_state_dict(state)
    assert restored.rates == [(1.0, 2), (0.5, 3), (1.0, 1)] and restored.rounds == 6
    assert restored.epsilon(DELTA) == accountant.epsilon(DELTA)


def test_a_trillion_rounds_at_one_rate_are_kept_as_one_run():
    accountant = PrivacyAccountant(noise=1.0)
    accountant.load_state_dict({"noise": 1.0, "adjacency": "zero-out", "rates": [[1.0, 10**12]]})
    accountant.record_round(1.0)
    assert accountant.rates == [(1.0, 10**12 + 1)] and accountant.rounds == 10**12 + 1
    assert accountant.state_dict()["rates"] == [[1.0, 10**12 + 1]] and accountant.epsilon(DELTA) > 0


@pytest.mark.parametrize(
    "rates",
    [
        [[1.0, 10**30]],  # rounds beyond MAX_ROUNDS: a hostile peer's state must not allocate or overflow
        [[1.0, 0]],
        [[1.0, -3]],
        [[1.0, 2.5]],
        [[1.0, True]],
        [[1.5, 1]],
        [[0.0, 1]],
        [["1.0", 1]],
        [[1.0]],
        [1.0, 1],
        {"1.0": 1},
    ],
)
def test_saved_rates_that_are_not_rate_and_rounds_pairs_are_refused(rates):
    accountant = PrivacyAccountant(noise=1.0, adjacency="replace-one")
    with pytest.raises(ConfigError, match="saved"):
        accountant.load_state_dict({"noise": 1.0, "adjacency": "replace-one", "rates": rates})
    assert accountant.rounds == 0


def test_a_state_spent_at_another_noise_is_refused():
    accountant = PrivacyAccountant(noise=1.0)
    accountant.record_round()
    with pytest.raises(ConfigError, match="spent at noise 1.0"):
        PrivacyAccountant(noise=2.0).load_state_dict(accountant.state_dict())


# -- the configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"clip": 0.0}, "clip must be a positive number"),
        ({"clip": 1.0, "noise": 0.0}, "norm_clip"),
        ({"delta": 1.0}, "delta must be in"),
        ({"adaptive": 0.5}, "starts from --dp-clip"),
        ({"clip": 1.0, "adaptive": 1.5}, "target fraction"),
        ({"clip": 1.0, "noise": 2.0, "count_noise": 1.0}, "exceed noise/2"),
        ({"clip": 1.0, "min_members": 0}, "min_members must be an integer from 1 to 65536"),
        ({"clip": 1.0, "min_members": True}, "min_members must be an integer from 1 to 65536"),
        ({"clip": 1.0, "min_members": 5_000_000_000}, "min_members must be an integer from 1 to 65536"),
        # A noise multiplier alone turned nothing on: the run trained without privacy and said nothing.
        ({"noise": 1.0}, "--dp-noise without --dp-clip adds no noise"),
    ],
)
def test_a_config_that_cannot_give_privacy_is_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        DPConfig(**fields)


def test_a_private_run_without_a_noise_multiplier_takes_the_default_and_one_without_a_clip_has_none():
    assert DPConfig(clip=1.0).noise == 1.0
    assert DPConfig().noise is None and not DPConfig().enabled


def test_only_the_mean_aggregator_is_allowed_with_privacy_on():
    DPConfig(clip=1.0).check_round(AggregatorConfig("mean"))
    DPConfig().check_round(AggregatorConfig("median"))  # privacy off: anything goes
    with pytest.raises(ConfigError, match="needs the mean aggregator"):
        DPConfig(clip=1.0).check_round(AggregatorConfig("median"))


# -- one peer's side: clip, noise, absorb ----------------------------------------------------------


def test_without_amplification_every_absorbed_round_counts_in_full():
    dp = DifferentialPrivacy(DPConfig(clip=1.0, seed=0))
    dp.absorb([torch.zeros(2)], sampling_rate=0.5)
    assert dp.accountant.rates == [(1.0, 1)]
    assert dp.report() == {"epsilon": dp.accountant.epsilon(1e-5), "delta": 1e-5, "dp_rounds": 1, "clip": 1.0}


def test_with_amplification_an_absorbed_round_counts_at_its_sampling_rate():
    dp = DifferentialPrivacy(DPConfig(clip=1.0, amplify=True, seed=0))
    dp.absorb([torch.zeros(2)], sampling_rate=0.5)
    assert dp.accountant.rates == [(0.5, 1)]


def test_the_noise_function_uses_the_clip_of_its_contribution_and_the_rounds_member_count():
    config = DPConfig(clip=2.0, noise=1.5, seed=5)
    dp, reference = DifferentialPrivacy(config, "p"), noise_generator(5, "p")
    noisy = dp.prepare()
    dp.clip = 9.0  # as if a round committed meanwhile: this contribution was clipped to 2
    flat = torch.arange(6, dtype=torch.float32)
    assert torch.equal(noisy(plan_of(3), flat), add_noise(flat, 3, 2.0, 1.5, reference))


def test_the_noise_function_refuses_a_round_smaller_than_the_minimum():
    # The coordinator forms no such round; a member given one anyway refuses it rather than noise it.
    noisy = DifferentialPrivacy(DPConfig(clip=1.0, seed=0, min_members=3)).prepare()
    with pytest.raises(ProtocolError, match="round 1 has 2 member\\(s\\), fewer than the 3"):
        noisy(plan_of(2), torch.zeros(4))
    assert noisy(plan_of(3), torch.zeros(4)).shape == (4,)


def test_by_default_a_private_round_needs_two_members():
    assert DPConfig(clip=1.0).min_members == 2


def test_adaptive_clipping_appends_the_centred_indicator():
    dp = DifferentialPrivacy(DPConfig(clip=1.0, adaptive=0.5, seed=0))
    inside = dp.contribution([torch.tensor([0.3, 0.4])])
    outside = dp.contribution([torch.tensor([3.0, 4.0])])
    assert [t.tolist() for t in inside] == [pytest.approx([0.3, 0.4]), [0.5]]
    assert [t.tolist() for t in outside] == [pytest.approx([0.6, 0.8]), [-0.5]]
    assert dp.extra_numel == 1


def test_adaptive_clipping_splits_the_noise_as_andrew_et_al():
    # z^-2 = sigma_u^-2 + (2 sigma_b)^-2: the two queries together are one Gaussian with multiplier z.
    sigma_u = update_noise_multiplier(1.0, 2.0)
    assert sigma_u ** -2 + 4.0 ** -2 == pytest.approx(1.0)
    dp = DifferentialPrivacy(DPConfig(clip=0.5, adaptive=0.5, count_noise=2.0, seed=1), "p")
    reference = noise_generator(1, "p")
    flat = torch.zeros(11)
    got = dp.noisy(flat, 4, 0.5)
    assert torch.equal(got[:-1], add_noise(flat[:-1], 4, 0.5, sigma_u, reference))
    assert torch.equal(got[-1:], add_noise(flat[-1:], 4, 1.0, 2.0, reference))


def test_the_default_count_noise_is_n_over_20_but_at_least_the_noise_multiplier():
    dp = DifferentialPrivacy(DPConfig(clip=1.0, adaptive=0.5))
    assert (dp.count_noise(8), dp.count_noise(100)) == (1.0, 5.0)


def test_absorbing_a_round_moves_c_geometrically_towards_the_target_quantile():
    dp = DifferentialPrivacy(DPConfig(clip=0.1, adaptive=0.5, clip_lr=0.2, seed=0))
    # The round's mean indicator 0.3 says 80% of the updates fit under C: C shrinks.
    update = dp.absorb([torch.tensor([1.0, 2.0]), torch.tensor([0.3])])
    assert [t.tolist() for t in update] == [[1.0, 2.0]]
    assert dp.clip == pytest.approx(0.1 * math.exp(-0.2 * (0.8 - 0.5)), rel=1e-7)
    assert dp.unclipped_fraction == pytest.approx(0.8, rel=1e-7)


def test_the_clip_and_the_rounds_travel_in_the_state():
    config = DPConfig(clip=0.1, adaptive=0.5, seed=0)
    dp = DifferentialPrivacy(config)
    dp.absorb([torch.zeros(1), torch.tensor([0.5])])
    joiner = DifferentialPrivacy(config)
    joiner.load_state_dict(json.loads(json.dumps(dp.state_dict())))
    assert (joiner.clip, joiner.accountant.rates, joiner.epsilon()) == (dp.clip, [(1.0, 1)], dp.epsilon())



def test_a_state_whose_rounds_are_malformed_leaves_the_clip_as_it_was():
    # The clip is valid, the rounds are not: neither is taken (a fetched state is checked whole first).
    config = DPConfig(clip=0.1, adaptive=0.5, seed=0)
    joiner = DifferentialPrivacy(config)
    state = {"clip": 0.7, "accountant": {"noise": config.noise, "adjacency": "zero-out", "rates": [[1.0, -1]]}}
    with pytest.raises(ConfigError, match="saved run of sampling rates"):
        joiner.load_state_dict(state)
    assert (joiner.clip, joiner.accountant.rounds) == (0.1, 0)


# -- the prepare seam -------------------------------------------------------------------------------


def test_a_prepared_tensor_must_be_new_finite_and_shaped_like_the_contribution():
    flat = torch.zeros(4)
    with pytest.raises(ProtocolError, match="must return a new tensor"):
        check_prepared(flat, flat, 1)
    with pytest.raises(ProtocolError, match=r"not float32 \(4,\)"):
        check_prepared(torch.zeros(5), flat, 1)
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        check_prepared(torch.tensor([0.0, math.nan, 0.0, 0.0]), flat, 1)


def test_a_local_peer_prepares_once_with_a_plan_of_one_member():
    calls = []

    def prepare(plan, flat):
        calls.append((plan.round_id, len(plan.members), flat.tolist()))
        return flat + 1

    x = torch.tensor([1.0, 2.0])
    result = LocalPeer().sync([x], prepare=prepare, codec=CodecConfig("none"))
    assert calls == [(1, 1, [1.0, 2.0])]
    assert result.value[0].tolist() == [2.0, 3.0]
    assert x.tolist() == [1.0, 2.0]


def test_a_local_peer_refuses_a_prepared_nan():
    future = LocalPeer().sync_async([torch.ones(3)], prepare=lambda plan, flat: flat * math.nan)
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        future.result()


class PrivateDiLoCo(DiLoCo):
    """DiLoCo with the wiring a private federated algorithm does: clip in contribution, noise in prepare."""

    def __init__(self, *args, dp: DifferentialPrivacy, **kwargs):
        self.dp = dp
        super().__init__(*args, **kwargs)

    def contribution(self, indices):
        return self.dp.contribution(super().contribution(indices))

    def prepare(self):
        return self.dp.prepare()


def test_an_outer_optimizers_prepare_reaches_the_peer_and_its_noise_lands_in_the_update():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in model.parameters()]
    config = DPConfig(clip=0.01, noise=1.0, seed=9, min_members=1)  # a run of one makes rounds of one
    opt = PrivateDiLoCo(
        model, torch.optim.SGD(model.parameters(), lr=0.5), LocalPeer(),
        dp=DifferentialPrivacy(config, "solo"), sync_every=1, outer=OuterConfig(lr=1.0, momentum=0.0), codec="none",
    )
    torch.nn.functional.mse_loss(model(torch.ones(4, 3)), torch.zeros(4, 2)).backward()
    local = [p.detach() - 0.5 * p.grad for p in model.parameters()]
    opt.step()
    # Outer SGD with lr 1: global = start - (clipped pseudo-gradient + this peer's noise, a round of one).
    clipped, _ = clip_to_norm([s - m for s, m in zip(start, local)], 0.01)
    noisy = add_noise(flatten(clipped), 1, 0.01, 1.0, noise_generator(9, "solo"))
    want = flatten(start) - noisy
    torch.testing.assert_close(flatten(list(model.parameters())), want, atol=1e-6, rtol=0)


def test_a_local_peer_cannot_make_a_round_of_more_than_one():
    with pytest.raises(Incompatible, match="--dp-min-members 1"):
        LocalPeer().sync([torch.zeros(3)], min_members=2)


@pytest.mark.timeout(60)
def test_no_round_forms_below_the_minimum_a_sync_asks_for():
    coordinator = CoordinatorThread(
        CoordinatorConfig(run_id="dp", port=0, dashboard_port=None, startup_grace_s=0, min_peers=2, join_timeout_s=0.5)
    )
    config = ElasticConfig(coordinator=coordinator.server.address, run_id="dp")
    peers = [ElasticCollective(config) for _ in range(2)]
    try:
        for p in peers:
            p.start(has_state=True)
        futures = [p.sync_async(torch.zeros(4), tag="t", min_members=3) for p in peers]
        for f in futures:
            with pytest.raises(GroupTooSmall, match="2 live peer\\(s\\).*rounds need 3 members"):
                f.result(30)
    finally:
        for p in peers:
            p.close()
        coordinator.close()


@pytest.mark.timeout(60)
def test_every_member_prepares_each_attempt_from_its_original_contribution_with_the_rounds_plan():
    coordinator = CoordinatorThread(
        CoordinatorConfig(run_id="dp", port=0, dashboard_port=None, startup_grace_s=0, min_peers=3, join_timeout_s=5)
    )
    # The members of a refused attempt learn of it at their all-reduce deadline: a short one keeps the test short.
    config = ElasticConfig(coordinator=coordinator.server.address, run_id="dp", allreduce=AllReduceConfig(timeout_s=3))
    peers = [ElasticCollective(config) for _ in range(3)]
    try:
        for p in peers:
            p.start(has_state=True)
        seen: dict[str, list[tuple[int, int]]] = {p.peer_id: [] for p in peers}

        def adds(peer_id: str, offset: float, refuse_first: bool):
            def prepare(plan, flat):
                seen[peer_id].append((plan.round_id, len(plan.members)))
                if refuse_first and len(seen[peer_id]) == 1:
                    raise ProtocolError("not this time")  # the round aborts and every member retries it
                return flat + offset

            return prepare

        xs = [torch.full((12,), float(i)) for i in range(3)]
        futures = [
            p.sync_async(x, tag="t", codec=CodecConfig("none"), prepare=adds(p.peer_id, 10.0 * (i + 1), i == 0))
            for i, (p, x) in enumerate(zip(peers, xs))
        ]
        results = [f.result(45) for f in futures]
    finally:
        for p in peers:
            p.close()
        coordinator.close()
    assert [r.attempts for r in results] == [2, 2, 2]
    round_id = results[0].round_id
    assert all(calls == [(round_id, 3), (round_id, 3)] for calls in seen.values())
    # Each member's offset once (the mean of 0+10, 1+20, 2+30), not twice: the retry started from the original.
    for r in results:
        assert torch.equal(r.value, torch.full((12,), 21.0))
