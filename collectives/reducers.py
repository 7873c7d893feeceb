"""Reducers: how the owner of a part combines the members' contributions.

A reducer takes the n contributions of one part, stacked as rows of an fp32
matrix in rank order, and one weight per contribution, and returns the reduced
part. Every reducer is deterministic: the same rows and weights give the same
bits, so a retried round reproduces its result exactly.

- ``mean``: weighted mean, sum_i(w_i * x_i) / sum_i(w_i). Weights must be
  finite, >= 0, with a positive sum (e.g. sample counts).
- ``sum``: weighted sum, sum_i(w_i * x_i); weights are any finite reals
  (gradient coding's decoding coefficients may be negative). Weight 1 each
  gives the plain sum.
- ``median``: coordinate-wise median (the mean of the two middle values for
  an even count, as numpy.median). Weights are ignored.
- ``trimmed_mean``: coordinate-wise mean after dropping the ``trim`` fraction
  of the lowest and of the highest values, int(trim * n) from each side (as
  scipy.stats.trim_mean). Weights are ignored.

The weighted sums accumulate rows in rank order in fp32, with the weights
first normalised in float64 (for ``mean``), so the result is exactly
reproducible by the same loop in numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from collectives.errors import ConfigError, RoundFailed

REDUCER_NAMES = ("mean", "sum", "median", "trimmed_mean")


class BadWeights(RoundFailed):
    """The contributions' weights cannot be used by the reducer (e.g. all zero for a mean)."""


@dataclass(frozen=True)
class ReducerConfig:
    """Which reducer a round uses; every member of a round must agree."""

    name: str = "mean"
    # Fraction dropped from each side by trimmed_mean, in [0, 0.5).
    trim: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in REDUCER_NAMES:
            raise ConfigError(f"unknown reducer {self.name!r}; choose one of {', '.join(REDUCER_NAMES)}")
        if not 0.0 <= self.trim < 0.5:
            raise ConfigError(f"trimmed_mean trim must be in [0, 0.5), got {self.trim}")

    @property
    def uses_weights(self) -> bool:
        """Whether the weights of the contributions change the result."""
        return self.name in ("mean", "sum")


def check_weights(config: ReducerConfig, weights: list[float]) -> None:
    """Raise BadWeights when the weights are unusable by this reducer."""
    if not weights:
        raise BadWeights("no contributions to reduce")
    wt = torch.tensor(weights, dtype=torch.float64)
    if not bool(torch.isfinite(wt).all()):
        raise BadWeights(f"weights must be finite, got {weights}")
    if config.name == "mean":
        if bool((wt < 0).any()):
            raise BadWeights(f"mean weights must be >= 0, got {weights}")
        if float(wt.sum()) <= 0.0:
            raise BadWeights(f"mean weights sum to zero ({weights}); at least one contribution needs weight > 0")


def prepare(config: ReducerConfig, weights: list[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Check the weights once and return a function reducing [n, L] fp32 rows (any column slice)."""
    check_weights(config, weights)
    n = len(weights)
    if config.name in ("mean", "sum"):
        coef = torch.tensor(weights, dtype=torch.float64)
        if config.name == "mean":
            coef = coef / coef.sum()
        coef32 = coef.to(torch.float32)
        reduce = lambda rows: _weighted_sum(rows, coef32)  # noqa: E731
    elif config.name == "median":
        reduce = _median
    else:
        reduce = lambda rows: _trimmed_mean(rows, config.trim)  # noqa: E731

    def run(rows: torch.Tensor) -> torch.Tensor:
        if rows.dim() != 2 or rows.dtype != torch.float32 or rows.shape[0] != n:
            raise ValueError(f"rows must be a float32 tensor of {n} rows, got {tuple(rows.shape)} {rows.dtype}")
        return reduce(rows)

    return run


def reduce_rows(config: ReducerConfig, rows: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Reduce an [n, L] fp32 matrix of contributions (rank order) into an fp32 vector of L."""
    if rows.dim() == 2 and len(weights) != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} rows but {len(weights)} weights")
    return prepare(config, weights)(rows)


def _weighted_sum(rows: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    # An explicit loop over the n rows (each row vectorised) fixes the order
    # of the fp32 additions, so the result does not depend on thread count.
    out = torch.mul(rows[0], coef[0])
    for i in range(1, rows.shape[0]):
        out.add_(rows[i], alpha=float(coef[i]))
    return out


def _median(rows: torch.Tensor) -> torch.Tensor:
    n = rows.shape[0]
    ordered = torch.sort(rows, dim=0).values
    mid = n // 2
    if n % 2 == 1:
        return ordered[mid].clone()
    return (ordered[mid - 1] + ordered[mid]) * 0.5


def _trimmed_mean(rows: torch.Tensor, trim: float) -> torch.Tensor:
    n = rows.shape[0]
    k = int(trim * n)
    if k == 0:
        kept = rows
    else:
        kept = torch.sort(rows, dim=0).values[k : n - k]
    coef = torch.full((kept.shape[0],), 1.0 / kept.shape[0], dtype=torch.float32)
    return _weighted_sum(kept, coef)
