"""Whole-vector aggregators: norm_clip, krum, multi_krum, bulyan, centered_clip, and their math.

These are the aggregators with statistic rounds (see collectives/reduce/aggregation.py
for the protocol: shares, summed shares, decisions, then the reduction). They
are registered by collectives/reduce/aggregators.py. Two kinds of
arithmetic live here:

- Shares (``squared_norms``, ``pairwise_squared_distances``) are float64 sums
  over the columns of one owner's part. They are additive over column splits
  (up to float64 rounding), so the members' shares summed give the statistic
  of the whole vectors. Their bits need not agree between machines: each share
  is computed once, sent, and every member sums the same received shares.
- Decisions (``krum_scores``, ``krum_select``, ``iterated_krum``, the clip
  factors) run on every member from the same summed statistic and must give
  the same answer on every CPU. They use only sorting (exact), elementwise
  float64 additions in a fixed order and Python float arithmetic (each exactly
  rounded by IEEE 754), never a library reduction whose summation order may
  depend on the CPU's vector width.

Ties are broken by the lowest rank (selections) or the lowest value (Bulyan's
per-coordinate step), so every member breaks them the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from collectives.errors import ConfigError
from collectives.reduce.aggregation import (
    Aggregator,
    BadWeights,
    Reduce,
    checked_reduce,
    coordinate_median,
    finite_weights,
    mean_coefficients,
    uniform_mean,
    weighted_sum,
)

# Columns per block when computing a share: bounds the float64 temporaries to
# n * _BLOCK * 8 bytes whatever the part's size.
_BLOCK = 1 << 16


def squared_norms(rows: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 [n]: the squared L2 norm of each row of [n, L] fp32 ``rows`` (minus ``center`` [L] if given)."""
    n, length = rows.shape
    out = torch.zeros(n, dtype=torch.float64)
    for a in range(0, length, _BLOCK):
        block = rows[:, a : a + _BLOCK].to(torch.float64)
        if center is not None:
            block -= center[a : a + _BLOCK].to(torch.float64)
        out += block.square().sum(dim=1)
    return out


def pairwise_squared_distances(rows: torch.Tensor) -> torch.Tensor:
    """Float64 [n, n]: squared L2 distances between the rows of [n, L] fp32 ``rows`` (exactly symmetric, zero
    diagonal)."""
    n, length = rows.shape
    upper = torch.zeros((n, n), dtype=torch.float64)
    for a in range(0, length, _BLOCK):
        # Differences of fp32 values are exact in float64, so only the sums round.
        block = rows[:, a : a + _BLOCK].to(torch.float64)
        for i in range(n - 1):
            upper[i, i + 1 :] += (block[i + 1 :] - block[i]).square().sum(dim=1)
    # Adding the transpose of a strictly upper-triangular matrix copies each value exactly.
    return upper + upper.T


def krum_scores(dist: torch.Tensor, members: Sequence[int], f: int) -> list[float]:
    """Krum score of each of ``members``: the sum of its max(len(members) - f - 2, 0) smallest squared distances
    to the other members (Blanchard et al. 2017), from the float64 [n, n] matrix ``dist``."""
    idx = torch.tensor(list(members), dtype=torch.long)
    sub = dist.index_select(0, idx).index_select(1, idx)
    sub.fill_diagonal_(float("inf"))  # a contribution is not its own neighbour
    nearest = torch.sort(sub, dim=1).values
    k = max(len(members) - f - 2, 0)
    score = torch.zeros(len(members), dtype=torch.float64)
    # Column by column, ascending: a fixed order of exactly rounded adds, the same bits on every member.
    for j in range(k):
        score += nearest[:, j]
    return score.tolist()


def krum_select(scores: Sequence[float], members: Sequence[int], count: int) -> list[int]:
    """The ``count`` members with the lowest scores, lowest first (equal scores: lowest rank first)."""
    order = sorted(range(len(members)), key=lambda t: (scores[t], members[t]))
    return [members[t] for t in order[:count]]


def iterated_krum(dist: torch.Tensor, f: int, count: int) -> list[int]:
    """Bulyan's selection: apply Krum ``count`` times, each time to the remaining contributions with their own
    number as n, removing the one selected. Returns the ranks in order of selection."""
    remaining = list(range(dist.shape[0]))
    chosen: list[int] = []
    for _ in range(count):
        best = krum_select(krum_scores(dist, remaining, f), remaining, 1)[0]
        chosen.append(best)
        remaining.remove(best)
    return chosen


def closest_to_median(values: torch.Tensor, beta: int) -> torch.Tensor:
    """Per column of [theta, l] fp32 ``values``: the ``beta`` values closest to the column's median, ascending.

    Bulyan's coordinate step (El Mhamdi et al. 2018). The median is numpy's (the mean of the two middle values
    for an even count); distances are taken in float64, where they are exact or nearly so; of two values at the
    same distance the lower one is kept. The output [beta, l] is sorted per column, so a sum of its rows in order
    depends only on which values were kept.
    """
    theta = values.shape[0]
    ordered = torch.sort(values, dim=0).values
    wide = ordered.to(torch.float64)
    mid = theta // 2
    median = wide[mid] if theta % 2 == 1 else (wide[mid - 1] + wide[mid]) * 0.5
    # A stable sort of the distances keeps the sorted (value) order among equal distances.
    pick = torch.sort((wide - median).abs(), dim=0, stable=True).indices[:beta]
    return torch.gather(ordered, 0, torch.sort(pick, dim=0).values)


def _clip_scale(limit: float, squared_norm: float) -> float:
    # min(1, limit / norm) in Python floats: correctly rounded, the same on every member.
    norm = math.sqrt(squared_norm)
    return 1.0 if norm <= limit else limit / norm


def _positive(name: str, key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} {key} must be a finite number > 0, got {value}")


def _at_least(name: str, key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name} {key} must be an integer >= {low}, got {value}")


class NormClip(Aggregator):
    """Weighted mean of the contributions each scaled by min(1, clip / ||x_i||) (whole-vector L2 norm).

    One statistic round: share = the squared norms of this part's rows; decision {"scales": [s_i]}.
    """

    name = "norm_clip"

    def __init__(self, *, clip: float = 1.0) -> None:
        _positive(self.name, "clip", clip)
        self.clip = clip

    def stat_rounds(self, n: int) -> int:
        """One round: the norms."""
        return 1

    def share_numel(self, n: int, r: int) -> int:
        """One squared norm per contribution."""
        return n

    def share(self, r: int, rows: torch.Tensor, weights: Sequence[float], decisions: Sequence[dict]) -> torch.Tensor:
        """Squared norms of this part's rows."""
        self._check_share(r, rows, weights, decisions)
        return squared_norms(rows)

    def decide(self, r: int, total: torch.Tensor, weights: Sequence[float], decisions: Sequence[dict]) -> dict:
        """The clip factors from the whole-vector squared norms."""
        self._check_round(r, len(weights), decisions)
        return {"scales": [_clip_scale(self.clip, v) for v in self._statistic(r, total, len(weights)).tolist()]}

    def prepare(self, weights: Sequence[float], decisions: Sequence[dict]) -> Reduce:
        """Rank-order fp32 accumulation with coefficients w_i * s_i / sum(w) computed in float64."""
        self._check_decisions(len(weights), decisions)
        scales = torch.tensor(decisions[0]["scales"], dtype=torch.float64)
        coef = (mean_coefficients(self.name, weights) * scales).to(torch.float32)
        return checked_reduce(len(weights), lambda rows: weighted_sum(rows, coef))


class _PairwiseDistances(Aggregator):
    # One statistic round whose share is this part's n x n squared distances, flattened.

    def __init__(self, *, f: int = 1) -> None:
        _at_least(self.name, "f", f, 0)
        self.f = f

    def stat_rounds(self, n: int) -> int:
        """One round: the pairwise distances."""
        return 1

    def share_numel(self, n: int, r: int) -> int:
        """The n x n squared distances."""
        return n * n

    def share(self, r: int, rows: torch.Tensor, weights: Sequence[float], decisions: Sequence[dict]) -> torch.Tensor:
        """Squared distances between this part's rows, flattened row-major."""
        self._check_share(r, rows, weights, decisions)
        return pairwise_squared_distances(rows).reshape(-1)

    def _distances(self, r: int, total: torch.Tensor, n: int) -> torch.Tensor:
        return self._statistic(r, total, n).view(n, n)


class Krum(_PairwiseDistances):
    """Krum (Blanchard et al. 2017): the contribution with the lowest sum of squared distances to its n - f - 2
    nearest others (equal scores: lowest rank), copied exactly. Needs n >= 2f + 3; ignores weights."""

    name = "krum"

    def min_group(self) -> int:
        """Krum's guarantee needs n >= 2f + 3."""
        return 2 * self.f + 3

    def check_group(self, n: int) -> None:
        """Krum's guarantee needs n >= 2f + 3."""
        least = Krum.min_group(self)  # Multi-Krum's own minimum adds m, checked with its own message
        if n < least:
            raise ConfigError(f"{self.name} needs at least 2f+3 = {least} contributions (f={self.f}), "
                              f"got {n}; lower f or add peers")

    def _count(self, n: int) -> int:
        return 1

    def decide(self, r: int, total: torch.Tensor, weights: Sequence[float], decisions: Sequence[dict]) -> dict:
        """{"selected": ranks ascending, "scores": every contribution's Krum score}."""
        n = len(weights)
        self._check_round(r, n, decisions)
        scores = krum_scores(self._distances(r, total, n), range(n), self.f)
        return {"selected": sorted(krum_select(scores, range(n), self._count(n))), "scores": scores}

    def prepare(self, weights: Sequence[float], decisions: Sequence[dict]) -> Reduce:
        """Copy the selected row."""
        self._check_decisions(len(weights), decisions)
        finite_weights(weights)
        (chosen,) = decisions[0]["selected"]
        return checked_reduce(len(weights), lambda rows: rows[chosen].clone())


class MultiKrum(Krum):
    """Multi-Krum: the weighted mean (weights as ``mean``, rank order) of the m contributions with the lowest Krum
    scores (equal scores: lowest rank); m = 0 means n - f."""

    name = "multi_krum"

    def __init__(self, *, f: int = 1, m: int = 0) -> None:
        super().__init__(f=f)
        _at_least(self.name, "m", m, 0)
        self.m = m

    def min_group(self) -> int:
        """n >= 2f + 3, and m <= n."""
        return max(super().min_group(), self.m)

    def check_group(self, n: int) -> None:
        """n >= 2f + 3, and m <= n."""
        super().check_group(n)
        if self.m > n:
            raise ConfigError(f"{self.name} m={self.m} exceeds the {n} contributions; lower m or set m=0 (n - f)")

    def _count(self, n: int) -> int:
        return self.m or n - self.f

    def prepare(self, weights: Sequence[float], decisions: Sequence[dict]) -> Reduce:
        """Rank-order fp32 accumulation over the selected rows, their weights normalised in float64."""
        self._check_decisions(len(weights), decisions)
        mean_coefficients(self.name, weights)
        chosen = list(decisions[0]["selected"])
        picked = [weights[i] for i in chosen]
        if sum(picked) <= 0:
            raise BadWeights(f"{self.name} selected contributions {chosen} whose weights are all zero ({picked}); "
                             "give every contribution a weight > 0")
        coef = mean_coefficients(self.name, picked).to(torch.float32)
        return checked_reduce(len(weights), lambda rows: weighted_sum(rows, coef, chosen))


class Bulyan(_PairwiseDistances):
    """Bulyan (El Mhamdi et al. 2018) over Krum: theta = n - 2f contributions chosen by iterated Krum, then per
    coordinate the unweighted mean of the beta = theta - 2f selected values closest to their median.

    Needs n >= 4f + 3; ignores weights. Decision {"selected": ranks in order of selection}.
    """

    name = "bulyan"

    def min_group(self) -> int:
        """Bulyan needs n >= 4f + 3."""
        return 4 * self.f + 3

    def check_group(self, n: int) -> None:
        """Bulyan needs n >= 4f + 3."""
        if n < self.min_group():
            raise ConfigError(f"{self.name} needs at least 4f+3 = {self.min_group()} contributions (f={self.f}), "
                              f"got {n}; lower f or add peers")

    def decide(self, r: int, total: torch.Tensor, weights: Sequence[float], decisions: Sequence[dict]) -> dict:
        """Iterated Krum on the whole-vector distances, each pass on the remaining contributions."""
        n = len(weights)
        self._check_round(r, n, decisions)
        return {"selected": iterated_krum(self._distances(r, total, n), self.f, n - 2 * self.f)}

    def prepare(self, weights: Sequence[float], decisions: Sequence[dict]) -> Reduce:
        """Per column: sort the selected values, keep the beta closest to their median, average them in fp32."""
        self._check_decisions(len(weights), decisions)
        finite_weights(weights)
        chosen = torch.tensor(sorted(decisions[0]["selected"]), dtype=torch.long)
        beta = len(chosen) - 2 * self.f
        return checked_reduce(
            len(weights), lambda rows: uniform_mean(closest_to_median(rows.index_select(0, chosen), beta))
        )


class CenteredClip(Aggregator):
    """Centered clipping (Karimireddy, He, Jaggi 2021), stateless: from v_0 = the coordinate median,
    v_{l+1} = v_l + sum_i (w_i / sum w) * min(1, tau / ||x_i - v_l||) * (x_i - v_l), for ``iterations`` steps.

    The paper starts from the previous round's aggregate; the data plane holds no state between rounds, so the
    center starts at the coordinate median, which each owner computes from its own part. Each iteration is one
    statistic round: share r = the squared distances of this part's rows to its v_r; decision {"scales": [c_i]}.
    """

    name = "centered_clip"

    def __init__(self, *, tau: float = 1.0, iterations: int = 3) -> None:
        _positive(self.name, "tau", tau)
        _at_least(self.name, "iterations", iterations, 1)
        self.tau = tau
        self.iterations = iterations

    def stat_rounds(self, n: int) -> int:
        """One round per iteration."""
        return self.iterations

    def share_numel(self, n: int, r: int) -> int:
        """One squared distance per contribution."""
        return n

    def share(self, r: int, rows: torch.Tensor, weights: Sequence[float], decisions: Sequence[dict]) -> torch.Tensor:
        """Squared distances of this part's rows to the center v_r, recomputed from the rows and decisions[:r]."""
        self._check_share(r, rows, weights, decisions)
        return squared_norms(rows, self._center(rows, self._steps(weights, decisions)))

    def decide(self, r: int, total: torch.Tensor, weights: Sequence[float], decisions: Sequence[dict]) -> dict:
        """The clip factors min(1, tau / ||x_i - v_r||)."""
        self._check_round(r, len(weights), decisions)
        return {"scales": [_clip_scale(self.tau, v) for v in self._statistic(r, total, len(weights)).tolist()]}

    def prepare(self, weights: Sequence[float], decisions: Sequence[dict]) -> Reduce:
        """The final center v_iterations of any column slice."""
        self._check_decisions(len(weights), decisions)
        steps = self._steps(weights, decisions)
        return checked_reduce(len(weights), lambda rows: self._center(rows, steps))

    def _steps(self, weights: Sequence[float], decisions: Sequence[dict]) -> list[torch.Tensor]:
        # Iteration l's fp32 coefficients (w_i / sum w) * c_i, computed in float64.
        coef = mean_coefficients(self.name, weights)
        return [(coef * torch.tensor(d["scales"], dtype=torch.float64)).to(torch.float32) for d in decisions]

    @staticmethod
    def _center(rows: torch.Tensor, steps: Sequence[torch.Tensor]) -> torch.Tensor:
        # Elementwise fp32 updates with the rows in rank order: any column slice gives the same bits.
        center = coordinate_median(rows)
        for k in steps:
            step = torch.mul(rows[0] - center, k[0])
            for i in range(1, rows.shape[0]):
                step.add_(rows[i] - center, alpha=float(k[i]))
            center = center + step
        return center
