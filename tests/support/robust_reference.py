"""Brute-force references on whole vectors, written from the papers, shared by the aggregator tests.

The robust aggregators run on the butterfly from per-part shares; these compute
the same thing the textbook way, on whole contributions, independently of
``collectives/reduce/robust.py`` (except the final fp32 averaging, so that results
can be compared exactly).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def clustered(honest: int, outlier_ranks: Sequence[int], length: int = 303, seed: int = 0) -> torch.Tensor:
    """``honest`` vectors close to a common point, and far outliers at the given ranks."""
    g = torch.Generator().manual_seed(seed)
    n = honest + len(outlier_ranks)
    center = torch.randn(length, generator=g)
    x = center + 0.1 * torch.randn((n, length), generator=g)
    for r in outlier_ranks:
        x[r] = center + 10.0 + 3.0 * torch.randn(length, generator=g)
    return x


def weighted_sum_loop(x: torch.Tensor, coef32: torch.Tensor) -> torch.Tensor:
    """The rank-order fp32 loop that the per-coordinate aggregators must keep (collectives/reduce/aggregation.py),
    re-implemented (it must stay bit-identical)."""
    out = torch.mul(x[0], coef32[0])
    for i in range(1, x.shape[0]):
        out.add_(x[i], alpha=float(coef32[i]))
    return out


def mean_loop(x: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    coef = torch.tensor(list(weights), dtype=torch.float64)
    return weighted_sum_loop(x, (coef / coef.sum()).to(torch.float32))


def brute_krum_scores(x: torch.Tensor, f: int, members: Sequence[int]) -> dict[int, float]:
    """Blanchard et al. 2017: sum of squared distances to the len(members) - f - 2 nearest other members."""
    v = x.numpy().astype(np.float64)
    scores = {}
    for i in members:
        d = sorted(float(np.sum((v[i] - v[j]) ** 2)) for j in members if j != i)
        scores[i] = sum(d[: max(len(members) - f - 2, 0)])
    return scores


def brute_krum_ranking(x: torch.Tensor, f: int, members: Sequence[int]) -> list[int]:
    scores = brute_krum_scores(x, f, members)
    return sorted(members, key=lambda i: (scores[i], i))


def brute_bulyan(x: torch.Tensor, f: int) -> tuple[list[int], torch.Tensor]:
    """El Mhamdi et al. 2018: theta = n - 2f picks by Krum on the remaining set, then per coordinate the mean of
    the beta = theta - 2f values closest to the median."""
    n, length = x.shape
    theta, beta = n - 2 * f, n - 4 * f
    remaining, selected = list(range(n)), []
    while len(selected) < theta:
        best = brute_krum_ranking(x, f, remaining)[0]
        selected.append(best)
        remaining.remove(best)
    picked = x.numpy()[selected]
    kept = np.empty((beta, length), dtype=np.float32)
    for c in range(length):
        values = np.sort(picked[:, c]).astype(np.float64)
        closest = np.argsort(np.abs(values - np.median(values)), kind="stable")[:beta]
        kept[:, c] = np.sort(values[closest])
    # The averaging uses the module's fp32 arithmetic (coefficients 1/beta, rows in ascending order) so that the
    # comparison can be exact; the selection above is independent of the module.
    return selected, weighted_sum_loop(torch.from_numpy(kept), torch.full((beta,), 1.0 / beta))


def brute_norm_clip(x: torch.Tensor, weights: Sequence[float], clip: float) -> np.ndarray:
    v = x.numpy().astype(np.float64)
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    scales = np.minimum(1.0, clip / np.linalg.norm(v, axis=1))
    return (w * scales) @ v


def brute_centered_clip(x: torch.Tensor, weights: Sequence[float], tau: float, iterations: int) -> np.ndarray:
    v = x.numpy().astype(np.float64)
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    center = np.median(v, axis=0)
    for _ in range(iterations):
        diff = v - center
        c = np.minimum(1.0, tau / np.linalg.norm(diff, axis=1))
        center = center + (w * c) @ diff
    return center
