"""Flower's server optimizers as torch optimizers: FedAdam, FedYogi, FedAdagrad (Reddi et al., "Adaptive
Federated Optimization", ICLR 2021, Algorithm 2) and FedAvgM's server momentum (Hsu et al. 2019).

Every peer runs the server optimizer over the run's fp32 global parameters x
with the round's averaged pseudo-gradient as ``p.grad``::

    g = x - mean(local)          (ours: a gradient, the outer optimizers' convention)
    Delta = mean(local) - x = -g (Flower's ``delta_t``: an update, the opposite of a gradient)

What Flower does, per array and per round (``server_round`` t = 1, 2, ...;
m_0 = v_0 = 0, created by ``np.zeros_like`` on the first round), from
``framework/py/flwr/serverapp/strategy/{fedopt,fedadam,fedyogi,fedadagrad,fedavgm}.py``
(the Message-API strategies) and the same formulas in the legacy
``framework/py/flwr/server/strategy/*.py``, adap/flower at fdef7afb1d (March 2026)::

    m_t = beta_1 * m_{t-1} + (1 - beta_1) * Delta_t                        (all three)
    FedAdam:    v_t = beta_2 * v_{t-1} + (1 - beta_2) * Delta_t^2
    FedYogi:    v_t = v_{t-1} - (1 - beta_2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)
    FedAdagrad: v_t = v_{t-1} + Delta_t^2                 (Flower fixes beta_1 = beta_2 = 0, so m_t = Delta_t)
    x_{t+1} = x_t + eta_t * m_t / (sqrt(v_t) + tau)

    eta_t = eta                                                (FedYogi, FedAdagrad: no bias correction)
    eta_t = eta * sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))  (FedAdam, since Flower PR #4362, Nov 2024)

FedAdam's bias correction is Adam's alpha_t (Kingma & Ba, before section 2.1)
but with exponent ``server_round + 1``, one more than Adam's t; we copy that
exactly. Reddi et al.'s Algorithm 2 itself has no bias correction and asks for
v_{-1} >= tau^2; Flower starts v at 0 (so sign(0 - Delta^2) = -1 and FedYogi's
first v is (1 - beta_2) Delta^2), and so do we.

In our convention m is kept from g, so our m is the negative of Flower's
m_t, v is the same (it holds squares; FedYogi's sign compares v with g^2 =
Delta^2), and the step is ``x <- x - eta_t * m / (sqrt(v) + tau)``. Negation
commutes with IEEE rounding, so this gives Flower's bits whenever Flower
computes in float32 (except that Flower's FedAdam multiplies by eta_t as a
numpy float64 scalar, which makes numpy take its last step in float64; we
round eta_t to float32 like every hyperparameter). FedAdam's t is the parameter's own count of updates
(state ``step``, a float32 0-dim tensor like torch Adam's): Flower's
``server_round`` as long as every round updates every parameter; a round that
is retried or aborted applies nothing and counts nothing.

FedAvgM (``fedavgm.py``): with pseudo-gradient pg = x - mean(local) (our g,
same sign), momentum_vector = pg on the first round (``momentum_vector is
None``), else ``server_momentum * momentum_vector + pg``; then
``x - server_learning_rate * momentum_vector`` (no Nesterov; without momentum,
``x - server_learning_rate * pg``). Torch's SGD (dampening 0, no Nesterov) is
the same formula, and its first step also copies g into the buffer, but it
applies the step as ``p.add_(buf, alpha=-lr)``, which torch's vectorised CPU
kernel computes with a fused multiply-add: one rounding where Flower has two,
and a different result on CPUs (or torch builds) without FMA. Measured on
this project's AVX2 machine: 26% of 100k elements differ from Flower's
``x - lr * buf``, and the same SGD step gives other bits with
``ATEN_CPU_CAPABILITY=default``. Hence ``FedAvgM`` below.

Defaults (``FLOWER_DEFAULTS``), from the Message-API strategies (``flwr.serverapp.strategy``):

==========  =====  ======  ======  ======  =====  ===============================================
strategy    eta    eta_l   beta_1  beta_2  tau    file
==========  =====  ======  ======  ======  =====  ===============================================
FedAdam     0.1    0.1     0.9     0.99    1e-3   serverapp/strategy/fedadam.py
FedYogi     0.01   0.0316  0.9     0.99    1e-3   serverapp/strategy/fedyogi.py
FedAdagrad  0.1    0.1     (0)     (0)     1e-3   serverapp/strategy/fedadagrad.py (betas fixed at 0)
FedAvgM     server_learning_rate 1.0, server_momentum 0.0   serverapp/strategy/fedavgm.py
==========  =====  ======  ======  ======  =====  ===============================================

The legacy ``flwr.server.strategy`` classes differ only in tau: 1e-9 for
FedAdam and FedAdagrad (1e-3 for FedYogi). eta_l is the clients' learning
rate; no server optimizer uses it, it is listed so every Flower default is
defined here once.

Determinism: following ``optimizers/yogi.py``'s rules, the updates use only correctly rounded
elementwise operations (mul, add/sub without ``alpha``, div, sign) in a fixed
order, never addcmul/addcdiv/lerp or ``alpha=``/``value=`` arguments, which
torch may fuse into a multiply-add on one CPU and not on another. sqrt is
taken in float64 and rounded to float32, because torch's float32 sqrt is not
correctly rounded (``_sqrt``). Python scalars are rounded to float32 by torch
before they multiply a float32 tensor, as numpy does (NEP 50).
FedAdam's beta powers are computed by repeated squaring (correctly rounded
multiplications) rather than by the C library's ``pow``, whose last bit may
depend on the CPU's instruction set. All state is plain tensors in
``self.state[p]``; parameters whose ``grad`` is None are skipped and get no state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from collectives.checks import is_finite_number
from collectives.errors import ConfigError, UsageError

# Flower's defaults per strategy (see the module docstring for the files they come from).
FLOWER_DEFAULTS: dict[str, dict[str, float]] = {
    "fedadam": {"eta": 1e-1, "eta_l": 1e-1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedyogi": {"eta": 1e-2, "eta_l": 0.0316, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedadagrad": {"eta": 1e-1, "eta_l": 1e-1, "beta_1": 0.0, "beta_2": 0.0, "tau": 1e-3},
    "fedavgm": {"server_learning_rate": 1.0, "server_momentum": 0.0},
}

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def _check_rate(name: str, value: Any) -> None:
    if not is_finite_number(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_decay(name: str, value: Any) -> None:
    if not is_finite_number(value) or not 0 <= value < 1:
        raise ConfigError(f"{name} must be in [0, 1), got {value!r}")


def _check_tau(value: Any) -> None:
    # tau = 0 divides by zero wherever the aggregate stays 0 (a frozen row), putting NaN in the model.
    if not is_finite_number(value) or value <= 0:
        raise ConfigError(f"tau must be a positive finite number (Flower's default is 1e-3), got {value!r}")


def power(base: float, exponent: int) -> float:
    """base ** exponent by repeated squaring: IEEE multiplications only, so the same bits on every CPU."""
    result, square, n = 1.0, base, exponent
    while n > 0:
        if n & 1:
            result *= square
        square *= square
        n >>= 1
    return result


def _sqrt(v: torch.Tensor) -> torch.Tensor:
    """The correctly rounded sqrt of a float32 tensor, as IEEE's (and numpy's).

    torch's own float32 sqrt is not: on torch 2.13 CPU it is one ulp off for
    about 17% of inputs, by whatever algorithm the build and CPU select. Its
    float64 sqrt is within an ulp of double, and the square root of a float32
    never lies that close to a float32 rounding boundary, so rounding it to
    float32 gives the exact result on every CPU.
    """
    return torch.sqrt(v.to(torch.float64)).to(v.dtype)


class _ServerOptimizer(torch.optim.Optimizer):
    """Steps every parameter that has a gradient with the subclass's ``_update``."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Apply one server update to every parameter with a ``grad`` (the averaged pseudo-gradient)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise UsageError(f"{type(self).__name__} does not support sparse gradients; densify them first")
                self._update(p, p.grad, group)
        return loss

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    @staticmethod
    def _buffer(state: dict[str, Any], key: str, like: torch.Tensor) -> torch.Tensor:
        """state[key], created as zeros (Flower's ``np.zeros_like``) on the parameter's first update."""
        buf = state.get(key)
        if buf is None:
            buf = state[key] = torch.zeros_like(like, memory_format=torch.preserve_format)
        return buf

    def _first_moment(self, state: dict[str, Any], grad: torch.Tensor, beta_1: float) -> torch.Tensor:
        """m = beta_1 m + (1 - beta_1) g, from m = 0 (state ``exp_avg``)."""
        return self._buffer(state, "exp_avg", grad).mul_(beta_1).add_(grad * (1.0 - beta_1))

    @staticmethod
    def _apply(p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, eta: float, tau: float) -> None:
        """x <- x - (eta * m) / (sqrt(v) + tau), rounded in Flower's order."""
        denom = _sqrt(v).add_(tau)
        p.sub_((m * eta).div_(denom))


class _Adaptive(_ServerOptimizer):
    """Shared constructor of FedAdam and FedYogi (Flower's names: eta, beta_1, beta_2, tau)."""

    def __init__(self, params: Params, eta: float, beta_1: float, beta_2: float, tau: float) -> None:
        _check_rate("eta", eta)
        _check_decay("beta_1", beta_1)
        _check_decay("beta_2", beta_2)
        _check_tau(tau)
        defaults = {"eta": float(eta), "beta_1": float(beta_1), "beta_2": float(beta_2), "tau": float(tau)}
        super().__init__(params, defaults)


class FedAdam(_Adaptive):
    """FedAdam: Adam on the server (v_t = beta_2 v + (1 - beta_2) g^2), with Flower's bias-corrected eta.

    State per parameter: ``step`` (float32 0-dim), ``exp_avg`` (m = -Flower's m_t), ``exp_avg_sq`` (v).
    """

    def __init__(
        self,
        params: Params,
        eta: float = FLOWER_DEFAULTS["fedadam"]["eta"],
        beta_1: float = FLOWER_DEFAULTS["fedadam"]["beta_1"],
        beta_2: float = FLOWER_DEFAULTS["fedadam"]["beta_2"],
        tau: float = FLOWER_DEFAULTS["fedadam"]["tau"],
    ) -> None:
        super().__init__(params, eta, beta_1, beta_2, tau)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        beta_1, beta_2 = group["beta_1"], group["beta_2"]
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["step"] += 1
        m = self._first_moment(state, grad, beta_1)
        v = self._buffer(state, "exp_avg_sq", grad)
        v.mul_(beta_2).add_((grad * grad) * (1.0 - beta_2))
        # Flower's exponent is server_round + 1 (t + 1), not Adam's t.
        t = int(state["step"].item())
        eta_t = group["eta"] * math.sqrt(1.0 - power(beta_2, t + 1)) / (1.0 - power(beta_1, t + 1))
        self._apply(p, m, v, eta_t, group["tau"])


class FedYogi(_Adaptive):
    """FedYogi: Yogi on the server (v_t = v - (1 - beta_2) g^2 sign(v - g^2)), no bias correction.

    State per parameter: ``exp_avg`` (m = -Flower's m_t) and ``exp_avg_sq`` (v).
    """

    def __init__(
        self,
        params: Params,
        eta: float = FLOWER_DEFAULTS["fedyogi"]["eta"],
        beta_1: float = FLOWER_DEFAULTS["fedyogi"]["beta_1"],
        beta_2: float = FLOWER_DEFAULTS["fedyogi"]["beta_2"],
        tau: float = FLOWER_DEFAULTS["fedyogi"]["tau"],
    ) -> None:
        super().__init__(params, eta, beta_1, beta_2, tau)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        m = self._first_moment(state, grad, group["beta_1"])
        v = self._buffer(state, "exp_avg_sq", grad)
        g2 = grad * grad
        v.sub_((g2 * (1.0 - group["beta_2"])).mul_(torch.sign(v - g2)))
        self._apply(p, m, v, group["eta"], group["tau"])


class FedAdagrad(_ServerOptimizer):
    """FedAdagrad: v_t = v + g^2, no bias correction.

    Flower fixes beta_1 = 0, so m_t is the round's aggregate itself and no ``exp_avg``
    is kept; beta_1 > 0 is Reddi et al.'s FedAdagrad with server momentum.
    State per parameter: ``sum_sq`` (v), and ``exp_avg`` (m) only when beta_1 > 0.
    """

    def __init__(
        self,
        params: Params,
        eta: float = FLOWER_DEFAULTS["fedadagrad"]["eta"],
        tau: float = FLOWER_DEFAULTS["fedadagrad"]["tau"],
        beta_1: float = FLOWER_DEFAULTS["fedadagrad"]["beta_1"],
    ) -> None:
        _check_rate("eta", eta)
        _check_decay("beta_1", beta_1)
        _check_tau(tau)
        super().__init__(params, {"eta": float(eta), "tau": float(tau), "beta_1": float(beta_1)})

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        # Flower's 0 * m + 1 * g is g exactly; skipping it saves a model-sized buffer.
        m = self._first_moment(state, grad, group["beta_1"]) if group["beta_1"] > 0 else grad
        v = self._buffer(state, "sum_sq", grad).add_(grad * grad)
        self._apply(p, m, v, group["eta"], group["tau"])


class FedAvgM(_ServerOptimizer):
    """FedAvgM: heavy-ball server momentum as Flower's, rounded as Flower's (x - lr * buf, two roundings).

    buf = g on a parameter's first update, then server_momentum * buf + g; x <- x - server_learning_rate * buf.
    With server_momentum 0, x <- x - server_learning_rate * g and no buffer is kept.
    State per parameter: ``momentum_buffer`` (as torch SGD's).
    """

    def __init__(
        self,
        params: Params,
        server_learning_rate: float = FLOWER_DEFAULTS["fedavgm"]["server_learning_rate"],
        server_momentum: float = FLOWER_DEFAULTS["fedavgm"]["server_momentum"],
    ) -> None:
        _check_rate("server_learning_rate", server_learning_rate)
        _check_decay("server_momentum", server_momentum)
        defaults = {"server_learning_rate": float(server_learning_rate), "server_momentum": float(server_momentum)}
        super().__init__(params, defaults)

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        direction = grad
        if group["server_momentum"] > 0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.detach().clone(memory_format=torch.preserve_format)
            else:
                buf.mul_(group["server_momentum"]).add_(grad)
            direction = buf
        p.sub_(direction * group["server_learning_rate"])
