"""NoLoCo's outer step: δ ← α δ − β Δ̄ − γ (φ − φ̄), φ ← φ + δ, exactly, and what it reduces to.

Values are small multiples of powers of two, so fp32 holds every intermediate exactly and results are compared
with ``torch.equal``, not a tolerance.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from collectives.errors import ConfigError
from optimizers.noloco import NoLoCoStep, noloco_outer_step


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def step(phi, momentum, mean_delta, mean_phi, alpha, beta, gamma):
    """Run the step on copies; return (phi, momentum) after it."""
    phi, momentum = phi.clone(), momentum.clone()
    noloco_outer_step(phi, momentum, mean_delta, mean_phi, alpha, beta, gamma)
    return phi, momentum


def test_the_step_by_hand():
    # α = 0.5, β = 0.5, γ = 0.25, element by element:
    #   γ(φ − φ̄) = [-0.25, 0, -0.5, 0.0625]; β Δ̄ = [0.125, 0.5, -1, 2]; α δ = [0.25, -0.5, 1, 0]
    phi, momentum = step(t(1, 2, -4, 0.5), t(0.5, -1, 2, 0), t(0.25, 1, -2, 4), t(2, 2, -2, 0.25), 0.5, 0.5, 0.25)
    assert torch.equal(momentum, t(0.375, -1.0, 2.5, -2.0625))
    assert torch.equal(phi, t(1.375, 1.0, -1.5, -1.5625))


dyadic = st.integers(-256, 256).map(lambda k: k / 16)
coefficient = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])


@given(st.lists(st.tuples(dyadic, dyadic, dyadic, dyadic), min_size=1, max_size=8), coefficient, coefficient,
       coefficient)
def test_the_step_is_the_formula_in_exact_arithmetic(rows, alpha, beta, gamma):
    phi0, delta0, mean_delta, mean_phi = (list(column) for column in zip(*rows))
    phi, momentum = step(t(*phi0), t(*delta0), t(*mean_delta), t(*mean_phi), alpha, beta, gamma)
    a, b, g = Fraction(alpha), Fraction(beta), Fraction(gamma)
    want_delta = [a * Fraction(d) - b * Fraction(md) - g * (Fraction(p) - Fraction(mp))
                  for p, d, md, mp in zip(phi0, delta0, mean_delta, mean_phi)]
    want_phi = [Fraction(p) + d for p, d in zip(phi0, want_delta)]
    assert [Fraction(x) for x in momentum.tolist()] == want_delta
    assert [Fraction(x) for x in phi.tolist()] == want_phi


def test_the_same_inputs_give_the_same_bits_in_the_documented_order():
    # Random fp32 values (rounding everywhere) and a length that leaves a tail after any vector width.
    g = torch.Generator().manual_seed(0)
    phi0, delta0, mean_delta, mean_phi = (torch.randn(1003, generator=g) for _ in range(4))
    alpha, beta, gamma = 0.7, 0.7, 0.7
    first = step(phi0, delta0, mean_delta, mean_phi, alpha, beta, gamma)
    second = step(phi0, delta0, mean_delta, mean_phi, alpha, beta, gamma)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # The documented order, one correctly rounded fp32 operation at a time, with the coefficients rounded to fp32.
    f = np.float32
    pull = f(gamma) * (phi0.numpy() - mean_phi.numpy())
    push = mean_delta.numpy() * f(beta)
    momentum = (f(alpha) * delta0.numpy() - push) - pull
    assert np.array_equal(first[1].numpy(), momentum)
    assert np.array_equal(first[0].numpy(), phi0.numpy() + momentum)


def test_a_group_of_one_is_heavy_ball_momentum_on_the_outer_weights():
    # φ̄ = φ (the very tensor) and Δ̄ = the replica's own Δ: δ ← α δ − β Δ, φ ← φ + δ.
    phi, momentum, delta = t(1, -2, 0.5), t(0.5, 0.25, -1), t(0.5, -1, 0.25)
    noloco_outer_step(phi, momentum, delta, phi, 0.5, 0.5, 0.75)
    assert torch.equal(momentum, t(0.5 * 0.5 - 0.5 * 0.5, 0.5 * 0.25 + 0.5 * 1, 0.5 * -1 - 0.5 * 0.25))
    assert torch.equal(phi, t(1 + 0.0, -2 + 0.625, 0.5 - 0.625))


def test_with_no_pull_and_equal_weights_it_is_diloco_s_outer_sgd_with_momentum():
    # torch's SGD (dampening 0, no Nesterov) keeps b ← α b + Δ̄ and sets φ ← φ − β b; here δ = −β b at every step.
    alpha, beta = 0.5, 0.5
    deltas = [t(0.5, -1, 2), t(0.25, 0.5, -1), t(-1, 0.75, 0.5), t(2, 0, -0.25)]
    phi, momentum = t(1, 2, 3), torch.zeros(3)
    param = torch.nn.Parameter(t(1, 2, 3))
    sgd = torch.optim.SGD([param], lr=beta, momentum=alpha, dampening=0, nesterov=False)
    for mean_delta in deltas:
        noloco_outer_step(phi, momentum, mean_delta, phi, alpha, beta, 0.0)
        param.grad = mean_delta.clone()
        sgd.step()
        assert torch.equal(phi, param.detach())
        assert torch.equal(momentum, -beta * sgd.state[param]["momentum_buffer"])


def test_the_two_momentum_forms_part_when_the_learning_rate_changes():
    # Steps with β = 1/2 then β = 1/4 from zero momentum: here δ keeps the first β, SGD rescales its whole buffer.
    alpha, d1, d2 = 0.5, t(1.0), t(1.0)
    phi, momentum = t(0.0), torch.zeros(1)
    noloco_outer_step(phi, momentum, d1, phi, alpha, 0.5, 0.0)
    noloco_outer_step(phi, momentum, d2, phi, alpha, 0.25, 0.0)
    assert torch.equal(phi, t(-0.5 - (0.5 * 0.5 + 0.25)))  # −β₁Δ₁ − (α β₁ Δ₁ + β₂ Δ₂) = −1
    param = torch.nn.Parameter(t(0.0))
    sgd = torch.optim.SGD([param], lr=0.5, momentum=alpha)
    for lr, d in ((0.5, d1), (0.25, d2)):
        sgd.param_groups[0]["lr"] = lr
        param.grad = d.clone()
        sgd.step()
    assert torch.equal(param.detach(), t(-0.5 - 0.25 * (0.5 + 1.0)))  # −β₁Δ₁ − β₂(α Δ₁ + Δ₂) = −0.875


def test_no_momentum_and_full_steps_average_the_groups_local_weights():
    # α = 0, β = γ = 1: φ_i ← φ̄ − Δ̄ = the mean of the group's θ_j, for every member whatever its φ_i.
    phis, thetas = [t(1, 2), t(3, -2)], [t(0.5, 1), t(1.5, 3)]
    deltas = [p - th for p, th in zip(phis, thetas)]
    mean_phi, mean_delta = (phis[0] + phis[1]) / 2, (deltas[0] + deltas[1]) / 2
    for phi0 in phis:
        phi, _ = step(phi0, torch.zeros(2), mean_delta, mean_phi, 0.0, 1.0, 1.0)
        assert torch.equal(phi, t(1.0, 2.0))


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 0.75, 1.0, 1.5])
def test_one_step_scales_a_pairs_spread_by_one_minus_gamma(gamma):
    # The pair shares Δ̄, so its own Δ_i do not matter; with equal momenta the Δ̄ terms cancel.
    phi1, phi2 = t(1, -2, 4), t(3, 2, -4)
    mean_phi, mean_delta = (phi1 + phi2) / 2, t(0.5, 0.25, -1)
    momentum = t(0.25, -0.5, 1)
    new1, _ = step(phi1, momentum, mean_delta, mean_phi, 0.5, 0.5, gamma)
    new2, _ = step(phi2, momentum, mean_delta, mean_phi, 0.5, 0.5, gamma)
    assert torch.equal(new1 - new2, (1 - gamma) * (phi1 - phi2))


def test_the_default_step_keeps_three_tenths_of_the_spread():
    config = NoLoCoStep()  # α = β = 0.7, γ = β
    phi1, phi2 = t(1.0, -3.0), t(2.0, 5.0)
    mean_phi, mean_delta = (phi1 + phi2) / 2, t(0.125, -0.5)
    new1, new2, m1, m2 = phi1.clone(), phi2.clone(), torch.zeros(2), torch.zeros(2)
    config.apply(new1, m1, mean_delta, mean_phi)
    config.apply(new2, m2, mean_delta, mean_phi)
    assert torch.allclose(new1 - new2, 0.3 * (phi1 - phi2), rtol=1e-6, atol=0)
    assert (new1 - new2).abs().lt((phi1 - phi2).abs()).all()


@pytest.mark.parametrize("alpha,gamma", [(0.5, 0.5), (0.5, 0.25), (0.25, 1.0), (0.5, 0.0)])
def test_a_pair_kept_together_follows_the_spread_recurrence(alpha, gamma):
    # d_{t+1} = (1 + α − γ) d_t − α d_{t−1} from equal (zero) momenta; γ = 0 keeps the spread, the others shrink it.
    phi1, phi2, m1, m2 = t(2.0), t(-2.0), torch.zeros(1), torch.zeros(1)
    mean_delta = t(0.25)
    spreads = [4.0]
    for _ in range(8):
        mean_phi = (phi1 + phi2) / 2
        noloco_outer_step(phi1, m1, mean_delta, mean_phi, alpha, 0.5, gamma)
        noloco_outer_step(phi2, m2, mean_delta, mean_phi, alpha, 0.5, gamma)
        spreads.append((phi1 - phi2).item())
    want = [4.0, (1 - gamma) * 4.0]
    while len(want) < len(spreads):
        want.append((1 + alpha - gamma) * want[-1] - alpha * want[-2])
    assert spreads == want
    assert abs(spreads[-1]) < 4.0 if gamma > 0 else spreads[-1] == 4.0


# --- the coefficients ---------------------------------------------------------------------------------------------


def test_gamma_defaults_to_beta():
    assert NoLoCoStep().pull == 0.7
    assert NoLoCoStep(beta=0.5).pull == 0.5
    assert NoLoCoStep(beta=0.5, gamma=0.0).pull == 0.0
    assert NoLoCoStep(beta=0.5, gamma=0.25).pull == 0.25


def test_apply_is_the_function_with_the_configs_coefficients():
    phi, momentum = t(1, 2), t(0.5, -0.5)
    phi2, momentum2 = phi.clone(), momentum.clone()
    NoLoCoStep(alpha=0.5, beta=0.25).apply(phi, momentum, t(1, 1), t(0, 0))
    noloco_outer_step(phi2, momentum2, t(1, 1), t(0, 0), 0.5, 0.25, 0.25)
    assert torch.equal(phi, phi2) and torch.equal(momentum, momentum2)


BAD_STEPS = [
    ({"alpha": -0.1}, "alpha must be in \\[0, 1\\)"),
    ({"alpha": 1.0}, "alpha must be in \\[0, 1\\)"),
    ({"beta": 0.0}, "beta must be > 0"),
    ({"beta": -1.0}, "beta must be > 0"),
    ({"gamma": -0.5}, "gamma must be >= 0"),
    ({"alpha": float("nan")}, "alpha must be a finite number"),
    ({"beta": float("inf")}, "beta must be a finite number"),
    ({"gamma": float("nan")}, "gamma must be a finite number"),
    ({"beta": True}, "beta must be a finite number"),
]


@pytest.mark.parametrize("kwargs,message", BAD_STEPS)
def test_bad_coefficients_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        NoLoCoStep(**kwargs)


@pytest.mark.parametrize(
    "tensors,message",
    [
        ((torch.zeros(2, dtype=torch.float64), torch.zeros(2), torch.zeros(2), torch.zeros(2)), "phi is torch.float64"),
        ((torch.zeros(2), torch.zeros(2), torch.zeros(3), torch.zeros(2)), "mean_delta is \\(3,\\)"),
        ((torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.float16)), "mean_phi is"),
    ],
)
def test_the_tensors_must_be_fp32_of_one_shape(tensors, message):
    with pytest.raises(ValueError, match=message):
        noloco_outer_step(*tensors, 0.5, 0.5, 0.5)


def test_phi_and_momentum_must_be_different_tensors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="different tensors"):
        noloco_outer_step(x, x, torch.zeros(2), torch.zeros(2), 0.5, 0.5, 0.5)


def test_empty_tensors_are_a_step_that_changes_nothing():
    phi, momentum = torch.zeros(0), torch.zeros(0)
    noloco_outer_step(phi, momentum, torch.zeros(0), torch.zeros(0), 0.5, 0.5, 0.5)
    assert phi.shape == momentum.shape == (0,)
