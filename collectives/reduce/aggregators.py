"""The aggregators a round can use, by name, and the configuration that names one.

``AggregatorConfig.parse("multi_krum:f=1,m=3")`` names an aggregator with its
parameters; ``make_aggregator`` builds it from this registry. The built-in
ones (``collectives/reduce/aggregation.py``: per-coordinate; ``collectives/reduce/robust.py``:
whole-vector) are registered at the end of this module; a new one is one
module plus one ``register_aggregator`` line (a user's own module, imported
with ``loconet peer --plugin MODULE``, may register its own). An aggregator
declares its parameters as keyword-only constructor arguments with defaults,
annotated int or float. Registration happens at import time only; the table
is read-only afterwards.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from collectives.errors import ConfigError
from collectives.reduce.aggregation import (
    MAX_ROUND_MEMBERS,
    Aggregator,
    BadShares,
    BadWeights,
    Mean,
    Median,
    Sum,
    TrimmedMean,
    combine_shares,
)
from collectives.reduce.robust import Bulyan, CenteredClip, Krum, MultiKrum, NormClip

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "AggregatorConfig",
    "BadShares",
    "BadWeights",
    "aggregate_rows",
    "combine_shares",
    "make_aggregator",
    "register_aggregator",
]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

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
            if abs(value) > MAX_ROUND_MEMBERS:  # counts of contributions: no round has more
                raise ConfigError(f"{name} parameter {key} is beyond any round's size ({MAX_ROUND_MEMBERS}), got "
                                  f"{value:g}")
            kwargs[key] = int(value)
        else:
            kwargs[key] = float(value)
    aggregator = cls(**kwargs)
    if aggregator.min_group() > MAX_ROUND_MEMBERS:
        # Refused here, not by every peer's first quorum request (a uint32 there: 1e300 raised inside the client).
        raise ConfigError(f"{name} needs {aggregator.min_group()} contributions a round with these parameters, more "
                          f"than any round has ({MAX_ROUND_MEMBERS}); lower them")
    return aggregator


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


def aggregate_rows(aggregator: Aggregator, rows: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Run an aggregator locally on whole contributions [n, L] fp32 (one owner, one part); returns fp32 [L]."""
    if rows.dim() != 2 or rows.shape[0] != len(weights):
        raise ValueError(f"rows must be [n, L] with one row per weight, got {tuple(rows.shape)} for {len(weights)}")
    decisions: list[dict] = []
    for r in range(aggregator.stat_rounds(len(weights))):
        total = combine_shares([aggregator.share(r, rows, weights, decisions)])
        decisions.append(aggregator.decide(r, total, weights, decisions))
    return aggregator.prepare(weights, decisions)(rows)


for _builtin in (Mean, Sum, Median, TrimmedMean, NormClip, Krum, MultiKrum, Bulyan, CenteredClip):
    register_aggregator(_builtin)
