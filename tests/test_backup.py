"""Dynamic backup workers: the k the formula gives, how the estimates react to variance, stragglers and censoring."""

from __future__ import annotations

import json
import math
import random

import pytest

from collectives.errors import ConfigError
from optimizers.backup import (
    BackupConfig,
    BackupWorkers,
    ObservationError,
    RoundObservation,
    decide,
    order_statistics,
)


def observation(times, grad_sq, variance, n=None, k=None, round_s=None):
    """A round whose statistics estimate exactly grad_sq and variance.

    E||g_bar||^2 = G^2 + sigma^2/k and E mean_i||g_i||^2 = G^2 + sigma^2, taken at their expectations.
    """
    k = len(times) if k is None else k
    return RoundObservation(
        n=len(times) if n is None else n,
        k=k,
        mean_grad_sq_norm=grad_sq + variance / k,
        member_sq_norm_mean=grad_sq + variance,
        arrival_s=tuple(times[:k]),
        round_s=round_s,
    )


def fed(rounds, **config):
    workers = BackupWorkers(BackupConfig(**config))
    for r in rounds:
        workers.observe(r)
    return workers


# Hand-computed from Delta(k)/lr = (1 - c/2) G^2 - (c/2) sigma^2 / k and speed = Delta / E[T_(k)].
@pytest.mark.parametrize(
    "times, grad_sq, variance, config, expected",
    [
        # no noise: every k gains 0.5, so the fastest arrival wins
        ([1, 2, 3, 4], 1.0, 0.0, {}, 1),
        # gains -1, -0.25, 0, 0.125: only k = 4 promises a decrease
        ([1, 2, 3, 4], 1.0, 3.0, {}, 4),
        # gains 0, .25, .3333, .375 / times 1, 1.125, 1.25, 10 -> speeds 0, .222, .267, .0375
        ([1, 1.125, 1.25, 10], 1.0, 1.0, {}, 3),
        # the same with c = 0.5: gains .5, .625, .6667, .6875 -> speeds .5, .556, .533, .069
        ([1, 1.125, 1.25, 10], 1.0, 1.0, {"lr_smoothness": 0.5}, 2),
        # gains 1.5, 1.75, 1.833, 1.875 / times 1, 3, 3.5, 4 -> speeds 1.5, .583, .524, .469
        ([1, 3, 3.5, 4], 4.0, 1.0, {}, 1),
        # the previous case, but never fewer than 2
        ([1, 3, 3.5, 4], 4.0, 1.0, {"min_k": 2}, 2),
        # the k = 3 case, but never more than 2
        ([1, 1.125, 1.25, 10], 1.0, 1.0, {"max_k": 2}, 2),
        # gains 0, .25, .3333, .375 / times 1, 2, 2, 2: waiting past the second arrival is free
        ([1, 2, 2, 2], 1.0, 1.0, {}, 4),
    ],
)
def test_picks_the_k_the_formula_gives(times, grad_sq, variance, config, expected):
    workers = fed([observation(times, grad_sq, variance)] * 3, **config)
    assert workers.choose_k(4) == expected


def test_the_estimated_terms_are_exact_on_exact_statistics():
    est = fed([observation([1, 1.125, 1.25, 10], 1.0, 3.0)] * 3).estimate(4)
    assert (est.ready, est.grad_sq, est.variance, est.overhead_s) == (True, 1.0, 3.0, 0.0)
    assert est.order_stats == (1.0, 1.125, 1.25, 10.0)
    assert est.gain == (-1.0, -0.25, 0.0, 0.125)
    assert est.speed == (-1.0, -0.25 / 1.125, 0.0, 0.0125)


def test_the_variance_estimate_is_the_unbiased_sample_variance_of_the_members_gradients():
    # g_i = (1, 0), (3, 0), (2, 3): g_bar = (2, 1), squared deviations 2 + 2 + 4 = 8, so sigma^2 = 8 / (k - 1) = 4
    grads = [(1.0, 0.0), (3.0, 0.0), (2.0, 3.0)]
    obs = RoundObservation(
        n=3,
        k=3,
        mean_grad_sq_norm=2.0**2 + 1.0**2,
        member_sq_norm_mean=sum(x * x + y * y for x, y in grads) / 3,
        arrival_s=(1.0, 2.0, 3.0),
    )
    est = fed([obs], warmup=1).estimate(3)
    assert est.variance == pytest.approx(4.0, rel=1e-15)
    assert est.grad_sq == pytest.approx(5.0 - 4.0 / 3, rel=1e-15)  # ||g_bar||^2 - sigma^2 / k


def test_higher_variance_waits_for_more_workers():
    times = [1, 1.125, 1.25, 1.5, 2, 4]
    chosen = [fed([observation(times, 1.0, v)] * 3).choose_k(6) for v in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 16.0)]
    assert chosen == sorted(chosen)
    assert chosen[0] == 1 and chosen[-1] == 6


@pytest.mark.parametrize("n", [2, 4, 6, 12])
def test_one_persistent_4x_straggler_is_left_out(n):
    times = [1.0 + j / 1024 for j in range(n - 1)] + [4.0]
    assert fed([observation(times, 1.0, 0.5)] * 3).choose_k(n) == n - 1


@pytest.mark.parametrize("variance", [0.0, 0.01, 1.0])
def test_equal_arrival_times_wait_for_all(variance):
    assert fed([observation([1.0] * 6, 1.0, variance)] * 3).choose_k(6) == 6


def test_small_spread_and_some_variance_wait_for_all():
    times = [1.0 + j / 1024 for j in range(6)]
    assert fed([observation(times, 1.0, 0.1)] * 3).choose_k(6) == 6


def test_a_large_overhead_after_the_arrivals_makes_waiting_cheap():
    times = [1, 1, 1, 1, 1, 4]
    assert fed([observation(times, 1.0, 1.0)] * 3).choose_k(6) == 5
    assert fed([observation(times, 1.0, 1.0, round_s=104.0)] * 3).choose_k(6) == 6


def test_no_positive_gain_waits_for_the_most_allowed():
    # gains (G^2 - sigma^2/k)/2 are all negative when sigma^2 > k G^2
    assert fed([observation([1, 2, 3, 4], 0.1, 10.0)] * 3).choose_k(4) == 4
    assert fed([observation([1, 2, 3, 4], 0.1, 10.0)] * 3, max_k=3).choose_k(4) == 3


@pytest.mark.parametrize(
    "rounds, n, config, expected",
    [
        ([], 4, {}, 4),  # nothing seen
        ([observation([1, 2, 3, 4], 1.0, 0.0)] * 2, 4, {}, 4),  # fewer than warmup rounds
        ([observation([1, 2, 3, 4], 1.0, 0.0)] * 2, 4, {"max_k": 3}, 3),  # the default respects max_k
        ([observation([1, 2, 3, 4], 1.0, 0.0, k=1)] * 5, 4, {}, 4),  # k = 1 rounds say nothing of the variance
        ([observation([1, 2, 3, 4], 1.0, 0.0)] * 5, 5, {}, 5),  # no round of this group size
        ([observation([1, 2, 3, 4], 1.0, 0.0)] * 5, 3, {}, 3),  # nor of this one
    ],
)
def test_the_default_before_enough_rounds_is_the_largest_allowed_k(rounds, n, config, expected):
    est = fed(rounds, **config).estimate(n)
    assert (est.ready, est.k) == (False, expected)


def test_one_variance_round_is_enough_once_timing_is_known():
    rounds = [observation([1, 2, 3, 4], 1.0, 0.0, k=1)] * 3 + [observation([1, 2, 3, 4], 1.0, 0.0)]
    assert fed(rounds).estimate(4).ready


def test_gradient_terms_use_only_the_recent_rounds():
    old = [observation([1, 2, 3, 4], 1.0, 100.0)] * 5
    new = [observation([1, 2, 3, 4], 1.0, 0.0)] * 2
    est = fed(old + new, grad_window=2).estimate(4)
    assert (est.variance, est.grad_sq, est.k) == (0.0, 1.0, 1)


@pytest.mark.parametrize(
    "rounds, n, expected",
    [
        # the first k arrivals are exact order statistics; later ones are at least the k-th arrival
        ([(1, 3)], 4, (1.0, 3.0, 3.0, 3.0)),
        # a censored position is imputed with the uncensored mean when that is later than the k-th arrival ...
        ([(1, 3, 5, 9), (1, 3)], 4, (1.0, 3.0, 5.0, 9.0)),
        # ... and with the round's k-th arrival when that is later: position 3 is (5 + 7) / 2
        ([(1, 3, 5, 9), (1, 7)], 4, (1.0, 5.0, 6.0, 9.0)),
        # position 3 alone would be (1 + max(6, 1) + max(2, 1)) / 3 = 3, below position 2's (1 + 6 + max(2, 3.5)) / 3
        ([(1, 1, 1), (5, 6), (2,)], 3, (8.0 / 3, 3.5, 3.5)),
    ],
)
def test_censored_arrivals_are_imputed_at_least_at_the_last_arrival(rounds, n, expected):
    obs = [RoundObservation(n=n, k=len(t), mean_grad_sq_norm=0.0, member_sq_norm_mean=0.0, arrival_s=t) for t in rounds]
    assert order_statistics(obs, n) == pytest.approx(expected, rel=1e-15)


def test_a_position_not_seen_within_the_window_is_probed():
    window = 5
    times = [1, 1, 1, 1, 1, 4]
    workers = fed([observation(times, 1.0, 1.0)], window=window, warmup=1)
    assert workers.choose_k(6) == 5
    for _ in range(window - 1):
        workers.observe(observation(times, 1.0, 1.0, k=5))
        assert workers.choose_k(6) == 5  # the full round is still in the window
    workers.observe(observation(times, 1.0, 1.0, k=5))
    assert workers.choose_k(6) == 6  # it left: the 6th arrival is only known to be >= 1, so look again


def test_arrival_order_does_not_matter():
    a = RoundObservation(n=3, k=3, mean_grad_sq_norm=1.0, member_sq_norm_mean=2.0, arrival_s=(3.0, 1.0, 2.0))
    b = RoundObservation(n=3, k=3, mean_grad_sq_norm=1.0, member_sq_norm_mean=2.0, arrival_s=(1.0, 2.0, 3.0))
    assert a == b


def random_rounds(seed, count, n=6):
    """Rounds with random times, a random straggler, random k and noisy gradient statistics."""
    rng = random.Random(seed)
    rounds = []
    for _ in range(count):
        times = [rng.uniform(0.9, 1.2) for _ in range(n)]
        times[rng.randrange(n)] *= 4
        k = rng.randint(1, n)
        s = rng.uniform(0.0, 2.0)
        rounds.append(
            RoundObservation(
                n=n,
                k=k,
                mean_grad_sq_norm=s,
                member_sq_norm_mean=s + rng.uniform(0.0, 3.0),
                arrival_s=tuple(sorted(times)[:k]),
                round_s=sorted(times)[k - 1] + rng.uniform(0.0, 0.1) if rng.random() < 0.5 else None,
            )
        )
    return rounds


def test_the_same_observations_give_the_same_decisions():
    config = BackupConfig(window=20, grad_window=5)
    a, b = BackupWorkers(config), BackupWorkers(config)
    seen_a, seen_b = [], []
    for obs in random_rounds(0, 60):
        a.observe(obs)
        b.observe(obs)
        seen_a.append(repr(a.estimate(6)))  # repr: the not-ready estimates hold nan, which != itself
        seen_b.append(repr(b.estimate(6)))
    assert seen_a == seen_b
    assert len({a_k.split("k=")[1].split(",")[0] for a_k in seen_a}) > 1  # the data makes k move


def test_the_state_round_trips_through_json_and_a_joiner_decides_alike():
    config = BackupConfig(window=20, grad_window=5)
    rounds = random_rounds(1, 80)
    old = BackupWorkers(config)
    for obs in rounds[:50]:
        old.observe(obs)
    joiner = BackupWorkers(config)
    joiner.load_state_dict(json.loads(json.dumps(old.state_dict())))
    assert joiner.rounds == old.rounds and len(joiner.rounds) == 20
    for obs in rounds[50:]:
        assert repr(joiner.estimate(6)) == repr(old.estimate(6))
        old.observe(obs)
        joiner.observe(obs)
    assert joiner.state_dict() == old.state_dict()


def test_a_state_from_another_config_is_refused():
    state = fed([observation([1, 2], 1.0, 1.0)], window=7).state_dict()
    with pytest.raises(ConfigError, match="same backup-workers options"):
        BackupWorkers(BackupConfig(window=8)).load_state_dict(state)
    with pytest.raises(ConfigError, match="version"):
        BackupWorkers(BackupConfig(window=7)).load_state_dict({**state, "version": 99})


@pytest.mark.parametrize(
    "rounds, error",
    [
        ("x", ConfigError),
        ([{"n": 2}], ConfigError),  # fields missing
        (
            [{"n": 2, "k": 1, "mean_grad_sq_norm": 1.0, "member_sq_norm_mean": 1.0, "arrival_s": [1.0], "x": 1}],
            ConfigError,
        ),
        ([{"n": 2, "k": 1, "mean_grad_sq_norm": 1.0, "member_sq_norm_mean": 1.0, "arrival_s": 5}], ConfigError),
        (
            [{"n": 2, "k": 3, "mean_grad_sq_norm": 1.0, "member_sq_norm_mean": 1.0, "arrival_s": [1.0]}],
            ObservationError,
        ),
        ([observation([1, 2], 1.0, 1.0)] * 8, ConfigError),  # more rounds than the window
    ],
)
def test_a_malformed_state_is_refused_and_changes_nothing(rounds, error):
    state = fed([observation([1, 2], 1.0, 1.0)], window=7).state_dict()
    rounds = [{**vars(r), "arrival_s": list(r.arrival_s)} if isinstance(r, RoundObservation) else r for r in rounds] \
        if isinstance(rounds, list) else rounds
    workers = fed([observation([3, 4], 2.0, 2.0)], window=7)
    before = list(workers.rounds)
    with pytest.raises(error):
        workers.load_state_dict({**state, "rounds": rounds})
    assert workers.rounds == before


def test_the_window_bounds_the_state():
    workers = fed(random_rounds(2, 30), window=10, grad_window=3)
    assert len(workers.rounds) == 10 and workers.rounds == random_rounds(2, 30)[-10:]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"min_k": 0}, "min_k"),
        ({"min_k": 3, "max_k": 2}, "max_k"),
        ({"window": 0}, "window"),
        ({"grad_window": 0}, "grad_window"),
        ({"warmup": 0}, "warmup"),
        ({"lr_smoothness": 0.0}, "lr_smoothness"),
        ({"lr_smoothness": 2.0}, "lr_smoothness"),
    ],
)
def test_bad_config_is_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        BackupConfig(**options)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"k": 0}, "1 <= k <= n"),
        ({"k": 4, "arrival_s": (1.0, 2.0, 3.0, 4.0)}, "1 <= k <= n"),
        ({"arrival_s": (1.0, 2.0)}, "members' times"),
        ({"arrival_s": (1.0, -2.0, 3.0)}, "arrival_s"),
        ({"arrival_s": (1.0, math.nan, 3.0)}, "arrival_s"),
        ({"mean_grad_sq_norm": math.inf}, "mean_grad_sq_norm"),
        ({"member_sq_norm_mean": -1.0}, "member_sq_norm_mean"),
        ({"round_s": 2.0}, "before the k-th arrival"),
    ],
)
def test_bad_observations_are_refused(fields, message):
    base = {"n": 3, "k": 3, "mean_grad_sq_norm": 1.0, "member_sq_norm_mean": 2.0, "arrival_s": (1.0, 2.0, 3.0)}
    with pytest.raises(ObservationError, match=message):
        RoundObservation(**{**base, **fields})


def test_a_group_size_below_one_is_refused():
    with pytest.raises(ConfigError, match="n must be >= 1"):
        decide([], 0, BackupConfig())
