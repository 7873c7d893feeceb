"""Flower's server optimizers (FedAdam, FedYogi, FedAdagrad, FedAvgM) against numpy references of the formulas.

The references are written in Flower's convention (Delta = aggregate - x,
x <- x + eta_t m / (sqrt(v) + tau)); the optimizers get our pseudo-gradient
g = x - aggregate. Computed in float32, one numpy operation per operation of
the formulas, the references must give the optimizers' bits exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from collectives.errors import ConfigError
from optimizers.fedopt import FLOWER_DEFAULTS, FedAdagrad, FedAdam, FedAvgM, FedYogi, power
from optimizers.outer_optim import OuterConfig, load_optimizer_state, make_outer_optimizer, optimizer_state

pytestmark = pytest.mark.timeout(120)

SHAPES = [(3, 4), (5,), ()]
NAMES = ["layer.weight", "layer.bias", "scale"]
ROUNDS = 6
CLASSES = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad, "fedavgm": FedAvgM}


def inputs() -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """The start x0 and the aggregate (mean of the local models) of each round, float32.

    Row 0 of the matrix is frozen: its aggregate always equals its start, so its
    Delta stays 0 (tau guards the division; Yogi's sign(0) is 0).
    """
    rng = np.random.default_rng(15)
    x0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    aggregates = []
    for _ in range(ROUNDS):
        agg = [np.asarray(x + 0.3 * rng.standard_normal(x.shape), dtype=np.float32) for x in x0]
        agg[0][0] = x0[0][0]
        aggregates.append(agg)
    return x0, aggregates


# -- references, from the formulas (Reddi et al. Algorithm 2 and Hsu et al., as Flower writes them) --------------


def reference_fedopt(kind, x0, aggregates, eta, beta_1, beta_2, tau, dtype=np.float32):
    """FedAdam/FedYogi/FedAdagrad: returns x, m, v after every round (m, v in Flower's sign: m follows Delta).

    Python floats (eta, betas, tau) multiply numpy arrays as the arrays' dtype, as in Flower.
    """
    x = [np.asarray(a, dtype=dtype) for a in x0]
    m = [np.zeros_like(a) for a in x]
    v = [np.zeros_like(a) for a in x]
    for t, agg in enumerate(aggregates, start=1):
        if kind == "fedadam":  # Flower's bias-corrected eta, with its exponent server_round + 1
            eta_t = eta * math.sqrt(1 - beta_2 ** (t + 1)) / (1 - beta_1 ** (t + 1))
        else:
            eta_t = eta
        for i, a in enumerate(agg):
            delta = a.astype(dtype) - x[i]
            m[i] = beta_1 * m[i] + (1 - beta_1) * delta
            if kind == "fedadam":
                v[i] = beta_2 * v[i] + (1 - beta_2) * (delta * delta)
            elif kind == "fedyogi":
                v[i] = v[i] - (1 - beta_2) * (delta * delta) * np.sign(v[i] - delta * delta)
            else:
                v[i] = v[i] + delta * delta
            x[i] = x[i] + eta_t * m[i] / (np.sqrt(v[i]) + tau)
    return x, m, v


def reference_fedavgm(x0, aggregates, server_learning_rate, server_momentum, dtype=np.float32):
    """FedAvgM: pseudo-gradient x - aggregate; momentum vector = it on round 1, then momentum * vector + it."""
    x = [a.astype(dtype) for a in x0]
    vector = None
    for agg in aggregates:
        pseudo_gradient = [xi - a.astype(dtype) for xi, a in zip(x, agg)]
        if server_momentum > 0:
            if vector is None:
                vector = pseudo_gradient
            else:
                vector = [server_momentum * mv + pg for mv, pg in zip(vector, pseudo_gradient)]
            pseudo_gradient = vector
        x = [xi - server_learning_rate * pg for xi, pg in zip(x, pseudo_gradient)]
    return x, vector


# -- running ours ---------------------------------------------------------------------------------------------


def step_round(opt: torch.optim.Optimizer, params: list[torch.Tensor], aggregate: list[np.ndarray]) -> None:
    """One server update with our pseudo-gradient g = global - mean(local)."""
    for p, a in zip(params, aggregate):
        p.grad = p.detach() - torch.from_numpy(a)
    opt.step()
    for p in params:
        p.grad = None


def run(name: str, rounds: list[list[np.ndarray]], x0: list[np.ndarray], **hyper):
    params = [torch.tensor(a) for a in x0]
    opt = CLASSES[name](params, **hyper)
    for aggregate in rounds:
        step_round(opt, params, aggregate)
    return params, opt


def assert_bits(tensor: torch.Tensor, array) -> None:
    expected = torch.from_numpy(np.asarray(array, dtype=np.float32))
    assert tensor.dtype == torch.float32 and tensor.shape == expected.shape
    assert torch.equal(tensor, expected), (tensor - expected).abs().max()


def flower(name: str) -> dict[str, float]:
    return {k: v for k, v in FLOWER_DEFAULTS[name].items() if k != "eta_l"}


ADAPTIVE_CASES = [
    ("fedadam", flower("fedadam")),
    ("fedadam", {"eta": 0.05, "beta_1": 0.5, "beta_2": 0.9, "tau": 1e-6}),
    ("fedyogi", flower("fedyogi")),
    ("fedyogi", {"eta": 0.2, "beta_1": 0.0, "beta_2": 0.5, "tau": 1e-9}),
    ("fedadagrad", flower("fedadagrad")),
    ("fedadagrad", {"eta": 0.3, "beta_1": 0.9, "beta_2": 0.0, "tau": 1e-2}),  # Reddi et al.'s, with momentum
]


def ours_hyper(name: str, hyper: dict[str, float]) -> dict[str, float]:
    """FedAdagrad takes no beta_2 (Flower fixes it; Adagrad's v has no decay)."""
    return {k: v for k, v in hyper.items() if not (name == "fedadagrad" and k == "beta_2")}


# -- exact math -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, hyper", ADAPTIVE_CASES)
def test_adaptive_server_updates_equal_the_float32_reference_bit_for_bit_over_six_rounds(name, hyper):
    x0, aggregates = inputs()
    params, opt = run(name, aggregates, x0, **ours_hyper(name, hyper))
    x, m, v = reference_fedopt(name, x0, aggregates, **hyper)
    for p, xi, mi, vi in zip(params, x, m, v):
        assert_bits(p, xi)
        state = opt.state[p]
        if name == "fedadagrad" and hyper["beta_1"] == 0:
            assert sorted(state) == ["sum_sq"]  # Flower's m_t is the aggregate itself: no buffer
        else:
            assert_bits(state["exp_avg"], -mi)  # our m follows g = -Delta
        assert_bits(state["sum_sq" if name == "fedadagrad" else "exp_avg_sq"], vi)
        if name == "fedadam":
            assert state["step"].dtype == torch.float32 and state["step"].item() == ROUNDS
    assert not torch.equal(params[0][1:], torch.from_numpy(x0[0][1:])), "the model moved"
    assert torch.equal(params[0][0], torch.from_numpy(x0[0][0])), "the frozen row stays put"


@pytest.mark.parametrize("name, hyper", ADAPTIVE_CASES)
def test_adaptive_server_updates_stay_within_float32_rounding_of_the_float64_formulas(name, hyper):
    x0, aggregates = inputs()
    params, _ = run(name, aggregates, x0, **ours_hyper(name, hyper))
    x, _, _ = reference_fedopt(name, x0, aggregates, **hyper, dtype=np.float64)
    for p, xi in zip(params, x):
        np.testing.assert_allclose(p.double().numpy(), xi, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lr, momentum", [(1.0, 0.9), (0.7, 0.5), (0.5, 0.0), (1.0, 0.0)])
def test_fedavgm_equals_the_float32_reference_bit_for_bit_over_six_rounds(lr, momentum):
    x0, aggregates = inputs()
    params, opt = run("fedavgm", aggregates, x0, server_learning_rate=lr, server_momentum=momentum)
    x, vector = reference_fedavgm(x0, aggregates, lr, momentum)
    for i, (p, xi) in enumerate(zip(params, x)):
        assert_bits(p, xi)
        if momentum > 0:
            assert sorted(opt.state[p]) == ["momentum_buffer"]
            assert_bits(opt.state[p]["momentum_buffer"], vector[i])
        else:
            assert p not in opt.state  # no momentum, no buffer (as Flower's)


def test_fedadams_first_step_uses_flowers_bias_correction_exponent_round_plus_one():
    p = torch.tensor([1.0])
    opt = FedAdam([p], eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3)
    p.grad = torch.tensor([0.5])
    opt.step()
    # m = 0.1 * 0.5, v = 0.01 * 0.25; eta_1 = 0.1 * sqrt(1 - 0.99^2) / (1 - 0.9^2)
    eta_1 = np.float32(0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2))
    m, v = np.float32(0.5) * np.float32(0.1), np.float32(0.25) * np.float32(0.01)
    expected = np.float32(1.0) - (eta_1 * m) / (np.sqrt(v) + np.float32(1e-3))
    assert p.item() == expected


# -- state and determinism ------------------------------------------------------------------------------------

CONFIGS = {
    "fedadam": OuterConfig(name="fedadam", lr=0.05, betas=(0.8, 0.95), eps=1e-4),
    "fedyogi": OuterConfig(name="fedyogi", lr=0.05, betas=(0.8, 0.95), eps=1e-4),
    "fedadagrad": OuterConfig(name="fedadagrad", lr=0.05, betas=(0.5, 0.0), eps=1e-4),
    "fedavgm": OuterConfig(name="fedavgm", lr=0.8, momentum=0.6),
}


def through_checkpoint(tensors: dict[str, torch.Tensor], meta: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """What a checkpoint does: tensors through torch.save / torch.load(weights_only=True), meta through JSON."""
    buf = io.BytesIO()
    torch.save(tensors, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True), json.loads(json.dumps(meta, allow_nan=False))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_round_trip_continues_bit_identically(name):
    x0, aggregates = inputs()
    params = [torch.tensor(a) for a in x0]
    opt = make_outer_optimizer(params, CONFIGS[name])
    for aggregate in aggregates[:3]:
        step_round(opt, params, aggregate)
    tensors, meta = through_checkpoint(*optimizer_state(opt, NAMES))
    assert meta["name"] == name and meta["groups"][0]["hyperparameters"] == {
        k: v for k, v in opt.param_groups[0].items() if k != "params"
    }
    joiner_params = [p.detach().clone() for p in params]
    joiner = make_outer_optimizer(joiner_params, CONFIGS[name])
    load_optimizer_state(joiner, NAMES, tensors, meta)
    for aggregate in aggregates[3:]:
        step_round(opt, params, aggregate)
        step_round(joiner, joiner_params, aggregate)
    for p, q in zip(params, joiner_params):
        assert torch.equal(p, q)
        assert sorted(opt.state[p]) == sorted(joiner.state[q])
        for key, value in opt.state[p].items():
            other = joiner.state[q][key]
            assert value.dtype == other.dtype and value.shape == other.shape and torch.equal(value, other), key


def digests() -> dict[str, str]:
    """sha256 of each registered server optimizer's parameters and state after six rounds."""
    x0, aggregates = inputs()
    out = {}
    for name, config in sorted(CONFIGS.items()):
        params = [torch.tensor(a) for a in x0]
        opt = make_outer_optimizer(params, config)
        for aggregate in aggregates:
            step_round(opt, params, aggregate)
        h = hashlib.sha256()
        for p in params:
            h.update(p.numpy().tobytes())
            for key in sorted(opt.state[p]):
                h.update(key.encode() + opt.state[p][key].numpy().tobytes())
        out[name] = h.hexdigest()
    return out


def test_two_optimizers_fed_the_same_inputs_give_the_same_bits():
    assert digests() == digests()


def test_a_cpu_without_vector_fma_kernels_computes_the_same_bits():
    """torch's dispatch forced to its DEFAULT (no AVX2/AVX-512) kernels, as on another CPU, in a child process."""
    root = pathlib.Path(__file__).resolve().parent.parent
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    code = "import json, torch; from tests.test_fedopt import digests; "
    code += "print(json.dumps([torch.backends.cpu.get_cpu_capability(), digests()]))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=90, check=True
    )
    capability, theirs = json.loads(done.stdout.strip().splitlines()[-1])
    assert capability == "DEFAULT"
    assert theirs == digests()


def test_a_parameter_without_a_gradient_is_left_alone_and_gets_no_state():
    for name, config in sorted(CONFIGS.items()):
        a, b = torch.ones(3), torch.ones(2)
        opt = make_outer_optimizer([a, b], config)
        a.grad = torch.full((3,), 0.5)
        opt.step()
        assert torch.equal(b, torch.ones(2)) and b not in opt.state, name
        assert not torch.equal(a, torch.ones(3)), name


# -- defaults, registry and validation ------------------------------------------------------------------------


def test_flower_defaults_are_those_of_flowers_serverapp_strategies():
    assert FLOWER_DEFAULTS == {
        "fedadam": {"eta": 0.1, "eta_l": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
        "fedyogi": {"eta": 0.01, "eta_l": 0.0316, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
        "fedadagrad": {"eta": 0.1, "eta_l": 0.1, "beta_1": 0.0, "beta_2": 0.0, "tau": 1e-3},
        "fedavgm": {"server_learning_rate": 1.0, "server_momentum": 0.0},
    }


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_the_optimizers_defaults_are_flowers(name):
    group = CLASSES[name]([torch.zeros(1)]).param_groups[0]
    expected = ours_hyper(name, flower(name)) if name != "fedavgm" else FLOWER_DEFAULTS[name]
    assert {k: v for k, v in group.items() if k != "params"} == expected


@pytest.mark.parametrize(
    "config, cls, hyper",
    [
        (CONFIGS["fedadam"], FedAdam, {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-4}),
        (CONFIGS["fedyogi"], FedYogi, {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-4}),
        (CONFIGS["fedadagrad"], FedAdagrad, {"eta": 0.05, "beta_1": 0.5, "tau": 1e-4}),
        (CONFIGS["fedavgm"], FedAvgM, {"server_learning_rate": 0.8, "server_momentum": 0.6}),
    ],
)
def test_outer_config_maps_lr_betas_eps_momentum_onto_flowers_names(config, cls, hyper):
    opt = make_outer_optimizer([torch.zeros(2)], config)
    assert type(opt) is cls
    assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == hyper


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_weight_decay_is_refused_for_flowers_optimizers(name):
    with pytest.raises(ConfigError, match=f"outer optimizer '{name}' has no weight decay"):
        OuterConfig(name=name, weight_decay=0.01)


@pytest.mark.parametrize(
    "cls, options, message",
    [
        (FedAdam, {"tau": 0.0}, "tau must be a positive finite number"),
        (FedYogi, {"beta_2": 1.0}, r"beta_2 must be in \[0, 1\)"),
        (FedAdagrad, {"eta": -0.1}, "eta must be a finite number >= 0"),
        (FedAvgM, {"server_momentum": 1.0}, r"server_momentum must be in \[0, 1\)"),
        (FedAvgM, {"server_learning_rate": math.nan}, "server_learning_rate must be a finite number >= 0"),
    ],
)
def test_invalid_hyperparameters_are_refused_by_name(cls, options, message):
    with pytest.raises(ConfigError, match=message):
        cls([torch.zeros(1)], **options)


def test_power_is_exact_where_the_result_is_representable_and_close_to_pow_elsewhere():
    assert power(0.5, 0) == 1.0 and power(0.5, 1) == 0.5 and power(0.5, 13) == 2.0**-13
    assert power(0.9, 7) == pytest.approx(0.9**7, rel=4e-16)
    assert power(0.99, 100_000) == 0.0  # underflows as pow does: the correction is then exactly 1
