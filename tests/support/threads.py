"""Running in-memory peers on threads in a test, and the small model and batches the optimizer tests train."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import torch


def run_threads(targets: Iterable[Callable[[], object]], timeout_s: float = 50.0) -> None:
    """Run each target on its own thread, wait for all, and re-raise the first error one raised."""
    errors: list[BaseException] = []

    def guard(fn: Callable[[], object]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=guard, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    if errors:
        raise errors[0]


def small_model(seed: int = 0) -> torch.nn.Module:
    """A 4 -> 6 -> 2 MLP with weights from seed."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


def train_small(opt, m: torch.nn.Module, rank: int, steps: int) -> None:
    """steps inner steps of opt on rank's seeded regression batches (5 samples each)."""
    for t in range(steps):
        g = torch.Generator().manual_seed(1000 * rank + t)
        x, y = torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step(samples=5)
        opt.zero_grad()
