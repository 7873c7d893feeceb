"""Aggregators: how the owner of a part combines the members' contributions.

This module holds the interface, the registry, the configuration and the
per-coordinate aggregators; collectives/robust.py holds the whole-vector ones
(importing this module registers them all).

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

import functools
import inspect
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch

from collectives.errors import ConfigError, RoundFailed

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
Reduce = Callable[[torch.Tensor], torch.Tensor]


class BadWeights(RoundFailed):
    """The contributions' weights cannot be used by the aggregator (e.g. all zero for a mean)."""


class BadShares(RoundFailed):
    """The summed shares of a statistic round are unusable (not finite, or negative): an owner sent a corrupt share."""


class Aggregator(ABC):
    """How the owner of a part combines the members' contributions (one instance per config; stateless, thread-safe)."""

    name: ClassVar[str]
    # Whether the contributions' weights change the result (the others only require them finite).
    uses_weights: ClassVar[bool] = True

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


# -- registry and configuration ---------------------------------------------------------------------------------

AGGREGATORS: dict[str, type[Aggregator]] = {}
_Class = TypeVar("_Class", bound=type[Aggregator])


def register_aggregator(cls: _Class) -> _Class:
    """Register an Aggregator subclass under its ``name`` (usable as a class decorator); returns the class."""
    if not (isinstance(cls, type) and issubclass(cls, Aggregator)):
        raise TypeError(f"only Aggregator subclasses can be registered, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _IDENT.fullmatch(name):
        raise TypeError(f"{cls.__qualname__}.name must be an identifier string, got {name!r}")
    _param_types(cls)  # refuse a constructor make_aggregator could not call
    existing = AGGREGATORS.get(name)
    if existing is not None and existing is not cls:
        raise ConfigError(f"aggregator name {name!r} is already registered by "
                          f"{existing.__module__}.{existing.__qualname__}; give {cls.__qualname__} another name")
    AGGREGATORS[name] = cls
    return cls


@functools.cache
def _param_types(cls: type[Aggregator]) -> dict[str, type]:
    # The parameters are the constructor's keyword-only arguments, each with a default and an int or float annotation.
    types: dict[str, type] = {}
    for p in inspect.signature(cls, eval_str=True).parameters.values():
        if p.kind is not p.KEYWORD_ONLY or p.default is p.empty or p.annotation not in (int, float):
            raise TypeError(f"{cls.__qualname__} parameter {p.name!r} must be keyword-only, with a default, "
                            "annotated int or float")
        types[p.name] = p.annotation
    return types


@functools.cache
def _param_defaults(cls: type[Aggregator]) -> dict[str, int | float]:
    return {p.name: p.default for p in inspect.signature(cls, eval_str=True).parameters.values()}


def _build(name: str, params: tuple[tuple[str, float], ...]) -> Aggregator:
    cls = AGGREGATORS.get(name)
    if cls is None:
        raise ConfigError(f"unknown aggregator {name!r}; choose one of {', '.join(sorted(AGGREGATORS))}")
    types = _param_types(cls)
    kwargs: dict[str, int | float] = {}
    for key, value in params:
        if key not in types:
            allowed = ", ".join(types) if types else "none"
            raise ConfigError(f"{name} has no parameter {key!r}; its parameters are: {allowed}")
        if types[key] is int:
            if not float(value).is_integer():
                raise ConfigError(f"{name} parameter {key} must be an integer, got {value}")
            kwargs[key] = int(value)
        else:
            kwargs[key] = float(value)
    return cls(**kwargs)


def _format_value(value: float) -> str:
    # Integral values print as integers ("f=1"); others as repr, which parses back to the same float.
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


@dataclass(frozen=True)
class AggregatorConfig:
    """Which aggregator a round uses and its parameters; every member of a round must agree.

    ``params`` is canonicalised to (key, float) pairs sorted by key, every parameter of the aggregator present
    (defaults filled in; a mapping is accepted too). The name, the parameters and their values are validated at
    construction (ConfigError).
    """

    name: str = "mean"
    params: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ConfigError(f"the aggregator name must be a string, got {self.name!r}")
        items = self.params.items() if isinstance(self.params, Mapping) else self.params
        canon: dict[str, float] = {}
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise ConfigError(f"{self.name} params must be (name, number) pairs, got {item!r}")
            key, value = item
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{self.name} parameter {key} must be a finite number, got {value!r}")
            if key in canon:
                raise ConfigError(f"{self.name} parameter {key} is given twice")
            canon[key] = float(value)
        _build(self.name, tuple(sorted(canon.items())))
        # Defaults are filled in, so "krum" and "krum:f=1" are one config: members compare configs on the wire.
        defaults = {k: float(v) for k, v in _param_defaults(AGGREGATORS[self.name]).items()}
        object.__setattr__(self, "params", tuple(sorted({**defaults, **canon}.items())))

    @classmethod
    def parse(cls, text: str) -> AggregatorConfig:
        """Parse ``name`` or ``name:key=value,key=value`` (e.g. ``trimmed_mean:trim=0.2``)."""
        name, _, rest = text.strip().partition(":")
        params: list[tuple[str, float]] = []
        for item in rest.split(",") if rest.strip() else []:
            key, eq, value = (s.strip() for s in item.partition("="))
            if not eq or not key:
                raise ConfigError(f"aggregator parameter {item.strip()!r} in {text!r} must read key=value, "
                                  "as in 'multi_krum:f=1,m=3'")
            try:
                params.append((key, float(value)))
            except ValueError:
                raise ConfigError(f"{name.strip()} parameter {key} must be a number, got {value!r}") from None
        return cls(name.strip(), tuple(params))

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_format_value(v)}" for k, v in self.params)


def make_aggregator(config: AggregatorConfig | str) -> Aggregator:
    """Build the aggregator a config (or its text, as parsed by AggregatorConfig.parse) names."""
    if isinstance(config, str):
        config = AggregatorConfig.parse(config)
    return _build(config.name, config.params)


def combine_shares(shares: Sequence[torch.Tensor]) -> torch.Tensor:
    """The whole-vector statistic: the owners' shares summed in rank order in float64 (same bits on every member)."""
    total = shares[0].to(torch.float64, copy=True)
    for s in shares[1:]:
        total += s
    return total


def aggregate_rows(aggregator: Aggregator, rows: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Run an aggregator locally on whole contributions [n, L] fp32 (one owner, one part); returns fp32 [L]."""
    if rows.dim() != 2 or rows.shape[0] != len(weights):
        raise ValueError(f"rows must be [n, L] with one row per weight, got {tuple(rows.shape)} for {len(weights)}")
    decisions: list[dict] = []
    for r in range(aggregator.stat_rounds(len(weights))):
        total = combine_shares([aggregator.share(r, rows, weights, decisions)])
        decisions.append(aggregator.decide(r, total, weights, decisions))
    return aggregator.prepare(weights, decisions)(rows)


# -- arithmetic shared by the aggregators (collectives/robust.py's too) ------------------------------------------


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


def weighted_sum(rows: torch.Tensor, coef: torch.Tensor, order: Sequence[int] | None = None) -> torch.Tensor:
    """fp32 sum_t coef[t] * rows[order[t]], accumulated in that order (rank order by default)."""
    # An explicit loop over the rows (each row vectorised, in rank order or the given order) fixes the order
    # of the fp32 additions, so the result depends neither on the thread count nor on the column slice.
    order = range(rows.shape[0]) if order is None else order
    out = torch.mul(rows[order[0]], coef[0])
    for t in range(1, len(order)):
        out.add_(rows[order[t]], alpha=float(coef[t]))
    return out


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


@register_aggregator
class Mean(Aggregator):
    """Weighted mean sum_i(w_i x_i) / sum_i(w_i); weights finite, >= 0, with a positive sum."""

    name = "mean"

    def prepare(self, weights: Sequence[float], decisions: Sequence[dict]) -> Reduce:
        """Rank-order fp32 accumulation with the weights normalised in float64."""
        self._check_decisions(len(weights), decisions)
        coef = mean_coefficients(self.name, weights).to(torch.float32)
        return checked_reduce(len(weights), lambda rows: weighted_sum(rows, coef))


@register_aggregator
class Sum(Aggregator):
    """Weighted sum sum_i(w_i x_i); weights any finite reals (gradient coding's coefficients may be negative)."""

    name = "sum"

    def prepare(self, weights: Sequence[float], decisions: Sequence[dict]) -> Reduce:
        """Rank-order fp32 accumulation of w_i x_i."""
        self._check_decisions(len(weights), decisions)
        coef = finite_weights(weights).to(torch.float32)
        return checked_reduce(len(weights), lambda rows: weighted_sum(rows, coef))


@register_aggregator
class Median(Aggregator):
    """Coordinate-wise median (numpy's: the mean of the two middle values for an even count); ignores weights."""

    name = "median"
    uses_weights = False

    def prepare(self, weights: Sequence[float], decisions: Sequence[dict]) -> Reduce:
        """Sort each column."""
        self._check_decisions(len(weights), decisions)
        finite_weights(weights)
        return checked_reduce(len(weights), coordinate_median)


@register_aggregator
class TrimmedMean(Aggregator):
    """Coordinate-wise mean after dropping int(trim * n) values from each side (as scipy.stats.trim_mean).

    Ignores weights.
    """

    name = "trimmed_mean"
    uses_weights = False

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


# The whole-vector aggregators register themselves on import; robust.py needs the definitions above.
import collectives.robust  # noqa: E402, F401
