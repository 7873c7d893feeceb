"""Aggregation: how the owner of a part combines the members' contributions.

This module holds the interface, the arithmetic the aggregators share and the
per-coordinate aggregators; ``collectives/reduce/robust.py`` holds the whole-vector
ones, and ``collectives/reduce/aggregators.py`` the registry, where each built-in is
registered by name, and the configuration that names one.

In the all-reduce the flat fp32 tensor is cut into one contiguous part per
member. The owner of part j receives the n contributions to part j as rows of
an fp32 matrix [n, L] in rank order, with one weight per contribution, and
reduces them (chunk by chunk: every aggregator reduces any column slice to the
same bits as the same columns of the whole part).

Per-coordinate aggregators (``mean``, ``sum``, ``median``, ``trimmed_mean``)
need nothing but the part. Whole-vector aggregators (``norm_clip``, ``krum``,
``multi_krum``, ``bulyan``, ``centered_clip``) need a statistic of the whole
vectors, which no owner sees. They get it without a server, in statistic
rounds on the butterfly:

1. each owner computes a small float64 *share* from its part (``share``):
   e.g. the per-contribution squared norms, or the n x n squared distances, of
   its columns. Shares are additive over columns;
2. the members exchange shares and each sums the n shares in rank order
   (``combine_shares``): the whole-vector statistic, the same bits everywhere;
3. each member derives the round's *decision* from it (``decide``): a pure
   function, written so it gives the same result on every CPU;
4. after the last round, the owners reduce their parts with the decisions
   (``prepare``).

Aggregators are stateless (one instance per configuration, thread-safe): the
data plane keeps nothing between all-reduce rounds, so everything an aggregator
uses comes from the round's rows, weights and decisions.

Ties are broken deterministically: a selection among equal scores takes the
lowest rank; Bulyan's per-coordinate step, among values at equal distance from
the median, keeps the lower value.

Trust model: these aggregators tolerate Byzantine *contributions*. Owners are
trusted to compute their shares and reduce their part honestly (an owner
controls its own part's result in any case); summed shares that are not finite
or negative raise BadShares.

New aggregators register with ``register_aggregator`` (usable from outside the
project) and declare their parameters as keyword-only constructor arguments
with defaults, annotated int or float; ``AggregatorConfig`` names one with its
parameters, e.g. ``AggregatorConfig.parse("multi_krum:f=1,m=3")``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from collectives.codecs.kernels import native_kernels
from collectives.errors import ConfigError, RoundFailed

Reduce = Callable[[torch.Tensor], torch.Tensor]


class BadWeights(RoundFailed):
    """The contributions' weights cannot be used by the aggregator (e.g. all zero for a mean)."""


class BadShares(RoundFailed):
    """The summed shares of a statistic round are unusable (not finite, or negative): an owner sent a corrupt share."""


# The most members a round may be asked to have (a member's QuorumRequest.min_members, a uint32 on the wire): an
# aggregator's or a private round's minimum beyond it is refused where it is configured, and by the coordinator.
MAX_ROUND_MEMBERS = 1 << 16


class Aggregator(ABC):
    """How the owner of a part combines the members' contributions (one instance per config; stateless, thread-safe)."""

    name: ClassVar[str]
    def min_group(self) -> int:
        """The fewest contributions this aggregator runs with (a round below it is not formed: the coordinator
        learns it from the members' quorum requests)."""
        return 1

    def check_group(self, n: int) -> None:
        """Raise ConfigError if this aggregator cannot run with n contributions."""
        if n < 1:
            raise ConfigError(f"{self.name} needs at least one contribution, got {n}")

    def stat_rounds(self, n: int) -> int:
        """How many statistic exchanges precede the reduction (0 for per-coordinate aggregators)."""
        return 0

    def share_numel(self, n: int, r: int) -> int:
        """Float64 elements of one owner's share in statistic round r."""
        raise ValueError(self._no_round(n, r))

    def share(self, r: int, rows: torch.Tensor, weights: Sequence[float], decisions: Sequence[dict]) -> torch.Tensor:
        """This owner's float64 share (1-D) for statistic round r, from its part [n, L] and the earlier decisions."""
        raise ValueError(self._no_round(rows.shape[0], r))

    def decide(self, r: int, total: torch.Tensor, weights: Sequence[float], decisions: Sequence[dict]) -> dict:
        """The decision of statistic round r from the summed shares; pure, JSON-able, identical on every member."""
        raise ValueError(self._no_round(len(weights), r))

    # Whether the reduction is always sum_t coefficients[t] * row t, accumulated in rank order (weighted_sum):
    # then an owner may reduce straight from received quantised payloads (round.py).
    linear: ClassVar[bool] = False

    def coefficients(self, weights: Sequence[float], decisions: Sequence[dict]) -> torch.Tensor:
        """A linear aggregator's fp32 coefficients, one per contribution (BadWeights as prepare)."""
        raise NotImplementedError(f"{self.name} is not a weighted sum of its rows")

    # Whether the members that share a host may reduce their contributions first, through shared memory, and one
    # leader per host take the host's result into the round between hosts (collectives/hosts/round.py): the result
    # over every contribution must equal this aggregator's result over the hosts' results, each with the weight
    # host_coefficients gives. Stronger than linear: no statistic of the whole round, and coefficients that compose.
    pre_reducible: ClassVar[bool] = False

    def host_coefficients(self, weights: Sequence[float], alone: bool) -> tuple[torch.Tensor, float]:
        """A pre-reducible aggregator's (fp32 coefficients of one host's rows, the host's weight in the round between
        hosts), from the weights of the host's members; ``alone``: this host is the round's only one (its result is
        the round's). BadWeights as prepare."""
        raise NotImplementedError(f"{self.name} cannot be reduced within a host before the round between hosts")

    @abstractmethod
    def prepare(self, weights: Sequence[float], decisions: Sequence[dict]) -> Reduce:
        """Check the weights (BadWeights) and return a function reducing [n, l] fp32 rows (any column slice) to [l]."""

    def _no_round(self, n: int, r: int) -> str:
        return f"{self.name} has {self.stat_rounds(n)} statistic round(s) with {n} contributions; there is no round {r}"

    def _check_round(self, r: int, n: int, decisions: Sequence[dict]) -> None:
        # Round r must come after exactly the decisions of rounds 0..r-1.
        self.check_group(n)
        if not 0 <= r < self.stat_rounds(n):
            raise ValueError(self._no_round(n, r))
        if len(decisions) != r:
            raise ValueError(f"{self.name} round {r} needs the {r} earlier decision(s), got {len(decisions)}")

    def _check_share(self, r: int, rows: torch.Tensor, weights: Sequence[float], decisions: Sequence[dict]) -> None:
        if rows.dim() != 2 or rows.dtype != torch.float32 or rows.shape[0] != len(weights):
            raise ValueError(f"{self.name} shares need float32 rows, one per weight ({len(weights)}), "
                             f"got {tuple(rows.shape)} {rows.dtype}")
        self._check_round(r, len(weights), decisions)

    def _check_decisions(self, n: int, decisions: Sequence[dict]) -> None:
        self.check_group(n)
        want = self.stat_rounds(n)
        if len(decisions) != want:
            raise ValueError(f"{self.name} reduces after {want} decision(s) with {n} contributions, "
                             f"got {len(decisions)}")

    def _statistic(self, r: int, total: torch.Tensor, n: int) -> torch.Tensor:
        # The summed shares as float64, checked for a statistic that is a sum of squares (all of robust.py's).
        want = self.share_numel(n, r)
        if total.dim() != 1 or total.numel() != want:
            raise ValueError(f"{self.name} round {r} statistic must be 1-D with {want} elements, "
                             f"got {tuple(total.shape)}")
        total = total.to(torch.float64)
        if not bool(torch.isfinite(total).all()) or bool((total < 0).any()):
            raise BadShares(f"{self.name} round {r}: the summed shares hold non-finite or negative values; "
                            "an owner sent a corrupt share (check the members' versions and hardware)")
        return total


def combine_shares(shares: Sequence[torch.Tensor]) -> torch.Tensor:
    """The whole-vector statistic: the owners' shares summed in rank order in float64 (same bits on every member)."""
    total = shares[0].to(torch.float64, copy=True)
    for s in shares[1:]:
        total += s
    return total


# -- arithmetic shared by the aggregators (collectives/reduce/robust.py's too) ----------------------------------------


def finite_weights(weights: Sequence[float]) -> torch.Tensor:
    """The weights as float64, or BadWeights if there are none or one is not finite."""
    if not weights:
        raise BadWeights("no contributions to reduce")
    wt = torch.tensor(list(weights), dtype=torch.float64)
    if not bool(torch.isfinite(wt).all()):
        raise BadWeights(f"weights must be finite, got {list(weights)}")
    return wt


def mean_coefficients(name: str, weights: Sequence[float]) -> torch.Tensor:
    """Float64 w_i / sum(w), or BadWeights unless the weights are finite, >= 0, with a positive sum."""
    wt = finite_weights(weights)
    if bool((wt < 0).any()):
        raise BadWeights(f"{name} weights must be >= 0, got {list(weights)}")
    if float(wt.sum()) <= 0.0:
        raise BadWeights(f"{name} weights sum to zero ({list(weights)}); at least one contribution needs weight > 0")
    return wt / wt.sum()


def checked_reduce(n: int, reduce: Reduce) -> Reduce:
    """Wrap ``reduce`` so that it refuses anything but [n, l] fp32 rows."""

    def run(rows: torch.Tensor) -> torch.Tensor:
        if rows.dim() != 2 or rows.dtype != torch.float32 or rows.shape[0] != n:
            raise ValueError(f"rows must be a float32 tensor of {n} rows, got {tuple(rows.shape)} {rows.dtype}")
        return reduce(rows)

    return run


def weighted_sum(
    rows: torch.Tensor, coef: torch.Tensor, order: Sequence[int] | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 sum_t coef[t] * rows[order[t]], accumulated in that order (rank order by default), into out if given.

    out may be the first row itself (the sum is then made in place, as a host's shared-memory round does).
    """
    # An explicit loop over the rows (each row vectorised, in rank order or the given order) fixes the order
    # of the fp32 additions, so the result depends neither on the thread count nor on the column slice.
    order = range(rows.shape[0]) if order is None else order
    kernels = native_kernels()
    if (kernels is not None and kernels.has_weighted_sum and _fits_kernel(rows, 2) and _fits_kernel(coef, 1)
            and (out is None or _fits_kernel(out, 1))):
        # One pass instead of one per row, with the same bits (kernels.c).
        if out is None:
            out = torch.empty(rows.shape[1], dtype=torch.float32)
        kernels.weighted_sum(rows, coef[:len(order)], order, out)
        return out
    out = torch.mul(rows[order[0]], coef[0], out=out)
    for t in range(1, len(order)):
        out.add_(rows[order[t]], alpha=float(coef[t]))
    return out


def _fits_kernel(t: torch.Tensor, dim: int) -> bool:
    """A CPU fp32 tensor of ``dim`` dimensions, not empty, whose last one has unit stride (the C weighted sum's)."""
    return (t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == dim and t.shape[-1] > 0
            and t.stride(-1) == 1)


def coordinate_median(rows: torch.Tensor) -> torch.Tensor:
    """Median of each column of [n, l] rows (numpy's: the mean of the two middle values for an even n)."""
    n = rows.shape[0]
    ordered = torch.sort(rows, dim=0).values
    mid = n // 2
    if n % 2 == 1:
        return ordered[mid].clone()
    return (ordered[mid - 1] + ordered[mid]) * 0.5


def uniform_mean(rows: torch.Tensor) -> torch.Tensor:
    """Unweighted fp32 mean of the rows, coefficients 1/k accumulated in row order."""
    k = rows.shape[0]
    return weighted_sum(rows, torch.full((k,), 1.0 / k, dtype=torch.float32))


# -- per-coordinate aggregators --------------------------------------------------------------------------------


class Mean(Aggregator):
    """Weighted mean sum_i(w_i x_i) / sum_i(w_i); weights finite, >= 0, with a positive sum."""

    name = "mean"

    linear = True
    pre_reducible = True

    def coefficients(self, weights: Sequence[float], decisions: Sequence[dict]) -> torch.Tensor:
        """The weights normalised in float64, as fp32."""
        self._check_decisions(len(weights), decisions)
        return mean_coefficients(self.name, weights).to(torch.float32)

    def host_coefficients(self, weights: Sequence[float], alone: bool) -> tuple[torch.Tensor, float]:
        """w_i / sum(w) (the flat round's, when the host is alone) and weight sum(w); a host whose weights are all
        zero contributes zeros with weight 0 unless it is alone (then BadWeights, as the flat round)."""
        total = float(finite_weights(weights).sum())
        if total == 0.0 and not alone and min(weights) >= 0:
            return torch.zeros(len(weights), dtype=torch.float32), 0.0
        return mean_coefficients(self.name, weights).to(torch.float32), total

    def prepare(self, weights: Sequence[float], decisions: Sequence[dict]) -> Reduce:
        """Rank-order fp32 accumulation with the weights normalised in float64."""
        coef = self.coefficients(weights, decisions)
        return checked_reduce(len(weights), lambda rows: weighted_sum(rows, coef))


class Sum(Aggregator):
    """Weighted sum sum_i(w_i x_i); weights any finite reals (gradient coding's coefficients may be negative)."""

    name = "sum"

    linear = True
    pre_reducible = True

    def coefficients(self, weights: Sequence[float], decisions: Sequence[dict]) -> torch.Tensor:
        """The weights themselves, as fp32."""
        self._check_decisions(len(weights), decisions)
        return finite_weights(weights).to(torch.float32)

    def host_coefficients(self, weights: Sequence[float], alone: bool) -> tuple[torch.Tensor, float]:
        """w_i and weight 1: the hosts' sums add up to the round's."""
        return finite_weights(weights).to(torch.float32), 1.0

    def prepare(self, weights: Sequence[float], decisions: Sequence[dict]) -> Reduce:
        """Rank-order fp32 accumulation of w_i x_i."""
        coef = self.coefficients(weights, decisions)
        return checked_reduce(len(weights), lambda rows: weighted_sum(rows, coef))


class Median(Aggregator):
    """Coordinate-wise median (numpy's: the mean of the two middle values for an even count); ignores weights."""

    name = "median"

    def prepare(self, weights: Sequence[float], decisions: Sequence[dict]) -> Reduce:
        """Sort each column."""
        self._check_decisions(len(weights), decisions)
        finite_weights(weights)
        return checked_reduce(len(weights), coordinate_median)


class TrimmedMean(Aggregator):
    """Coordinate-wise mean after dropping int(trim * n) values from each side (as scipy.stats.trim_mean).

    Ignores weights.
    """

    name = "trimmed_mean"

    def __init__(self, *, trim: float = 0.1) -> None:
        if not 0.0 <= trim < 0.5:
            raise ConfigError(f"trimmed_mean trim must be in [0, 0.5), got {trim}")
        self.trim = trim

    def prepare(self, weights: Sequence[float], decisions: Sequence[dict]) -> Reduce:
        """Sort each column, drop both tails, average the rest in fp32."""
        self._check_decisions(len(weights), decisions)
        finite_weights(weights)
        n = len(weights)
        k = int(self.trim * n)
        if k == 0:
            return checked_reduce(n, uniform_mean)
        return checked_reduce(n, lambda rows: uniform_mean(torch.sort(rows, dim=0).values[k : n - k]))
