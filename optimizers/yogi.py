"""Yogi (Zaheer et al., NeurIPS 2018), the adaptive optimizer behind FedYogi (Reddi et al., ICLR 2021).

Yogi is Adam with an additive second-moment update: v moves towards g^2 by
(1 - beta2) g^2 per step. When gradients turn small, Adam's v shrinks by a
fraction of itself and its effective learning rate jumps up; Yogi's v shrinks
only by the small (1 - beta2) g^2, so its effective learning rate rises slowly
(the Yogi paper's argument). Torch has no Yogi; this one follows torch's
optimizer conventions (param groups, state dict, a float32 0-dim ``step`` like
Adam's) so it can serve as an outer optimizer whose state travels in a
``StateSnapshot``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from collectives.errors import UsageError


class Yogi(torch.optim.Optimizer):
    r"""Yogi: Adam's first moment with an additive, sign-controlled second moment.

    For each parameter x with gradient g at step t (weight decay is added to the
    gradient, L2 style, like torch's Adam: g <- g + weight_decay * x)::

        m_t = beta1 * m_{t-1} + (1 - beta1) * g_t
        v_t = v_{t-1} - (1 - beta2) * g_t^2 * sign(v_{t-1} - g_t^2)
        x_t = x_{t-1} - lr * m_hat_t / (sqrt(v_hat_t) + eps)

    with m_0 = 0 and v_0 = initial_accumulator. Without bias correction (the
    default) m_hat_t = m_t and v_hat_t = v_t, as in the Yogi paper's Algorithm 2
    and Reddi et al.'s FedYogi (Algorithm 2); with ``bias_correction=True``,
    m_hat_t = m_t / (1 - beta1^t) and v_hat_t = v_t / (1 - beta2^t) as in Adam
    (v_0 is not zero, so this correction is the usual approximation). sign(0) = 0:
    when v already equals g^2 it is left alone. v stays positive when v_0 > 0.

    Defaults and where they come from:

    - ``lr=1e-2``: Zaheer et al.'s experiments, and Flower's FedYogi (``eta``).
    - ``betas=(0.9, 0.99)``: beta1 = 0.9 everywhere; beta2 = 0.99 is Reddi et al.'s
      FedYogi setting and Flower's default (the Yogi paper used 0.999 for centralised training).
    - ``eps=1e-3``: Zaheer et al. (a large eps is part of what makes Yogi stable),
      and Flower's FedYogi ``tau``.
    - ``initial_accumulator=1e-6``: the ``initial_accumulator_value`` of the TensorFlow
      Yogi implementations (TensorFlow Addons); Reddi et al. ask for v_0 >= tau^2, Flower uses 0.
    - ``weight_decay=0``, ``bias_correction=False``: neither paper uses them.

    The update uses only correctly rounded elementwise operations (no addcmul,
    addcdiv or lerp, which may or may not fuse a multiply-add depending on the
    CPU's vector unit), so peers on different CPUs compute the same bits.
    Parameters whose ``grad`` is None are skipped and get no state.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-3,
        initial_accumulator: float = 1e-6,
        weight_decay: float = 0.0,
        bias_correction: bool = False,
    ) -> None:
        if not 0.0 <= lr < math.inf:
            raise ValueError(f"Invalid learning rate: {lr} (must be a finite number >= 0)")
        if not 0.0 <= eps < math.inf:
            raise ValueError(f"Invalid epsilon value: {eps} (must be a finite number >= 0)")
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas} (must be two numbers in [0, 1))")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta} (must be in [0, 1))")
        if not 0.0 <= initial_accumulator < math.inf:
            raise ValueError(f"Invalid initial_accumulator value: {initial_accumulator} (must be a finite number >= 0)")
        if not 0.0 <= weight_decay < math.inf:
            raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be a finite number >= 0)")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            initial_accumulator=initial_accumulator,
            weight_decay=weight_decay,
            bias_correction=bool(bias_correction),
        )
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # State dicts saved before an option existed load with the option's default.
        for group in self.param_groups:
            group.setdefault("bias_correction", False)
            group.setdefault("initial_accumulator", 1e-6)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step on every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise UsageError("Yogi does not support sparse gradients; densify them first (grad.to_dense())")
                self._update(p, p.grad, group, beta1, beta2)
        return loss

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], beta1: float, beta2: float) -> None:
        """One Yogi step of one parameter (see the class docstring for the formulas)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.full_like(
                p, group["initial_accumulator"], memory_format=torch.preserve_format
            )
        m, v, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        step_t += 1
        if group["weight_decay"] != 0:
            grad = grad + p * group["weight_decay"]
        # m = beta1 m + (1 - beta1) g
        m.mul_(beta1).add_(grad * (1.0 - beta1))
        # v = v - (1 - beta2) g^2 sign(v - g^2)
        g2 = grad * grad
        delta = g2.mul(1.0 - beta2).mul_(torch.sign(v - g2))
        v.sub_(delta)
        if group["bias_correction"]:
            t = step_t.item()
            denom = (v / (1.0 - beta2**t)).sqrt_().add_(group["eps"])
            update = (m / (1.0 - beta1**t)).div_(denom)
        else:
            denom = v.sqrt().add_(group["eps"])
            update = m / denom
        p.sub_(update.mul_(group["lr"]))
