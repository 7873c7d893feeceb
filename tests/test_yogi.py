"""Yogi against a hand-written reference of its formulas, its sign rule, skipped parameters and its state dict."""

from __future__ import annotations

import io
import math

import pytest
import torch

from optimizers.yogi import Yogi


def reference(x0, grads, lr, betas, eps, v0, weight_decay=0.0, bias_correction=False):
    """The paper's update, element by element in Python floats (float64), in the order Yogi rounds."""
    b1, b2 = betas
    x, m, v = list(x0), [0.0] * len(x0), [v0] * len(x0)
    for t, g_t in enumerate(grads, start=1):
        for i, g in enumerate(g_t):
            g = g + x[i] * weight_decay if weight_decay else g
            m[i] = m[i] * b1 + g * (1.0 - b1)
            g2 = g * g
            sign = (v[i] > g2) - (v[i] < g2)
            v[i] = v[i] - g2 * (1.0 - b2) * sign
            if bias_correction:
                update = (m[i] / (1.0 - b1**t)) / (math.sqrt(v[i] / (1.0 - b2**t)) + eps)
            else:
                update = m[i] / (math.sqrt(v[i]) + eps)
            x[i] = x[i] - update * lr
    return x, m, v


def run(x0, grads, dtype=torch.float64, **options):
    p = torch.tensor(x0, dtype=dtype)
    opt = Yogi([p], **options)
    for g in grads:
        p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
    return p, opt


GRADS = [
    [0.5, -2.0, 1e-4, 0.0, 3.0],
    [0.4, 1.0, -1e-4, 0.0, -3.0],
    [-0.3, 0.25, 2e-4, 2e-3, 0.01],
    [1.0, 1.0, 1.0, 1.0, 1.0],
]
X0 = [1.0, -1.0, 0.5, 0.0, 2.0]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"bias_correction": True},
        {"lr": 0.3, "betas": (0.5, 0.9), "eps": 1e-6, "initial_accumulator": 0.25, "weight_decay": 0.1},
        {"lr": 0.3, "betas": (0.0, 0.0), "eps": 1e-8, "initial_accumulator": 0.0, "bias_correction": True},
    ],
)
def test_float64_steps_equal_the_reference_exactly(options):
    p, opt = run(X0, GRADS, **options)
    full = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-3, "v0": 1e-6, **options}
    full["v0"] = full.pop("initial_accumulator", full["v0"])
    x, m, v = reference(X0, GRADS, **full)
    state = opt.state[p]
    assert torch.equal(p, torch.tensor(x, dtype=torch.float64))
    assert torch.equal(state["exp_avg"], torch.tensor(m, dtype=torch.float64))
    assert torch.equal(state["exp_avg_sq"], torch.tensor(v, dtype=torch.float64))


def test_float32_steps_match_the_float64_reference_closely():
    p, _ = run(X0, GRADS, dtype=torch.float32, lr=0.1, bias_correction=True)
    x, _, _ = reference(X0, GRADS, lr=0.1, betas=(0.9, 0.99), eps=1e-3, v0=1e-6, bias_correction=True)
    torch.testing.assert_close(p, torch.tensor(x, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_defaults_are_the_papers_and_step_is_a_float32_scalar():
    p, opt = run([1.0, 2.0], [[0.1, 0.2]], dtype=torch.float32)
    group = opt.param_groups[0]
    assert group["lr"] == 1e-2 and group["betas"] == (0.9, 0.99) and group["eps"] == 1e-3
    assert group["initial_accumulator"] == 1e-6 and group["weight_decay"] == 0.0 and group["bias_correction"] is False
    step = opt.state[p]["step"]
    assert step.dtype == torch.float32 and step.shape == () and step.item() == 1.0


def test_v_grows_towards_larger_squared_gradients_and_shrinks_towards_smaller_ones():
    # v0 = 1: g^2 = 4 pulls v up, g^2 = 0.25 pulls it down, g^2 = 1 leaves it (sign 0), and so does g = 0
    # (the change is (1 - beta2) g^2: unlike Adam's v, Yogi's does not decay without gradient).
    p, opt = run([0.0, 0.0, 0.0, 0.0], [[2.0, 0.5, 1.0, 0.0]], initial_accumulator=1.0, betas=(0.9, 0.99))
    v = opt.state[p]["exp_avg_sq"]
    assert torch.equal(v, torch.tensor([1.0 + 0.01 * 4.0, 1.0 - 0.01 * 0.25, 1.0, 1.0], dtype=torch.float64))
    # Additive, unlike Adam: v moves by (1 - beta2) g^2, not towards g^2 by a fraction of the gap.
    before = v.clone()
    p.grad = torch.tensor([10.0, 0.1, 1.0, 0.0], dtype=torch.float64)
    opt.step()
    assert v[0] > before[0] and v[1] < before[1] and v[2] == before[2] and v[3] == before[3]
    assert torch.allclose(v[0] - before[0], torch.tensor(0.01 * 100.0, dtype=torch.float64))


def test_v_stays_positive_under_huge_then_tiny_gradients():
    p, opt = run([0.0], [[1e6], [1e-6], [0.0]] * 20, betas=(0.9, 0.5))
    assert opt.state[p]["exp_avg_sq"].item() > 0 and torch.isfinite(p).all()


def test_parameters_without_grad_are_untouched_and_get_no_state():
    a, b = torch.ones(3), torch.full((2, 2), 5.0)
    opt = Yogi([a, b], lr=0.1, weight_decay=0.5)
    a.grad = torch.tensor([1.0, -1.0, 0.5])
    opt.step()
    opt.step()
    assert torch.equal(b, torch.full((2, 2), 5.0)) and b not in opt.state
    assert opt.state[a]["step"].item() == 2.0 and not torch.equal(a, torch.ones(3))


def test_closure_loss_is_returned_and_a_quadratic_is_minimised():
    x = torch.tensor([0.0], requires_grad=True)
    opt = Yogi([x], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = ((x - 3.0) ** 2).sum()
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(300)]
    assert losses[0] == 9.0 and losses[-1] < 1e-2


def interrupted_and_uninterrupted(save):
    g = torch.Generator().manual_seed(0)
    grads = [[torch.randn(4, 3, generator=g), torch.randn(3, generator=g)] for _ in range(8)]
    first = [torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), torch.zeros(3)]
    second = [t.clone() for t in first]
    options = dict(lr=0.05, betas=(0.8, 0.95), bias_correction=True, weight_decay=0.01)
    straight = Yogi(first, **options)
    for i, gs in enumerate(grads):
        for p, gr in zip(first, gs):
            p.grad = None if (i == 1 and p.dim() == 1) else gr.clone()
        straight.step()
    resumed = Yogi(second, **options)
    for i, gs in enumerate(grads):
        if i == 4:
            state = save(resumed.state_dict())
            resumed = Yogi(second, lr=1.0)  # other hyperparameters: the state dict's win
            resumed.load_state_dict(state)
        for p, gr in zip(second, gs):
            p.grad = None if (i == 1 and p.dim() == 1) else gr.clone()
        resumed.step()
    return straight, first, resumed, second


def through_torch_save(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("save", [lambda sd: sd, through_torch_save], ids=["in-memory", "torch.save"])
def test_state_dict_round_trip_continues_bit_identically(save):
    straight, first, resumed, second = interrupted_and_uninterrupted(save)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    sa, sb = straight.state_dict(), resumed.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for key, value in sa["state"][i].items():
            assert torch.equal(value, sb["state"][i][key]), key
            assert value.dtype == sb["state"][i][key].dtype


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -1.0}, "learning rate"),
        ({"eps": -1e-3}, "epsilon"),
        ({"betas": (1.0, 0.99)}, "index 0"),
        ({"betas": (0.9, -0.1)}, "index 1"),
        ({"betas": (0.9,)}, "betas"),
        ({"initial_accumulator": -1.0}, "initial_accumulator"),
        ({"weight_decay": float("nan")}, "weight_decay"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Yogi([torch.zeros(1)], **kwargs)


def test_sparse_gradients_are_refused():
    p = torch.zeros(3)
    opt = Yogi([p])
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
