"""How much an asynchronous contribution counts, given how stale it is.

In an asynchronous round (async DiLoCo, FedBuff) a peer's contribution was
computed from a global version that is τ rounds older than the one it is
applied to: τ = (rounds committed when it is applied) − (the round its local
work started from). A staleness function s(τ) scales it down. The forms are
those of the literature:

- ``inverse-sqrt`` (the default): s(τ) = 1 / sqrt(1 + τ), the weight FedBuff
  uses (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous
  Aggregation");
- ``poly:a=A``: s(τ) = (1 + τ)^(−a), a > 0, the polynomial function of Xie,
  Koyejo and Gupta 2019, "Asynchronous Federated Optimization" (FedAsync);
  ``poly:a=0.5`` is inverse-sqrt in exact arithmetic (in floating point the
  two may differ in the last bit: ``pow`` against ``1/sqrt``);
- ``hinge:a=A,b=B``: s(τ) = 1 for τ <= b, else 1 / (a (τ − b) + 1), a > 0, b a
  whole number >= 0, FedAsync's hinge function: no discount up to b rounds,
  then one falling like 1/τ;
- ``constant``: s(τ) = 1, the ablation with no staleness weighting.

Every form gives exactly 1.0 at τ = 0, so a round with no stale contribution
is weighted exactly as a synchronous one, and every form is non-increasing in τ.

How the weights enter the aggregate is the caller's choice, and it matters.
FedBuff's server, as its algorithm reads, adds s(τ_i)·Δ_i to a buffer and
divides the buffer by K once K updates are in, so a round made of stale
updates moves the global model less than a fresh one. A weighted mean
Σ s_i Δ_i / Σ s_i only re-weights the members of one round against each
other: with equal τ the weights cancel and it equals the plain mean.

Spec strings: ``StalenessConfig.parse("hinge:a=1,b=2")``, and ``str(config)``
gives the canonical spec back (parse(str(c)) == c). Pure functions, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from collectives.errors import ConfigError

__all__ = ["STALENESS_FORMS", "StalenessConfig", "staleness_weight"]


@dataclass(frozen=True)
class _Form:
    """One staleness function: its parameter names (canonical order) and s(τ, a, b)."""

    params: tuple[str, ...]
    weight: Callable[[int, float, int], float]


def _inverse_sqrt(tau: int, a: float, b: int) -> float:
    return 1.0 / math.sqrt(1.0 + tau)


def _poly(tau: int, a: float, b: int) -> float:
    return (1.0 + tau) ** (-a)


def _hinge(tau: int, a: float, b: int) -> float:
    # The int comparison is exact; τ - b is a whole number >= 1 here, so the denominator is > 1.
    return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)


def _constant(tau: int, a: float, b: int) -> float:
    return 1.0


# Name -> form. Read-only: a new form is one function and one line here.
STALENESS_FORMS: dict[str, _Form] = {
    "inverse-sqrt": _Form((), _inverse_sqrt),
    "poly": _Form(("a",), _poly),
    "hinge": _Form(("a", "b"), _hinge),
    "constant": _Form((), _constant),
}

FORMS_USAGE = "inverse-sqrt, poly:a=A (A > 0), hinge:a=A,b=B (A > 0, B a whole number >= 0) or constant"


def _format(value: float) -> str:
    # Integral values print as integers ("a=1"); others as repr, which parses back to the same float.
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


@dataclass(frozen=True)
class StalenessConfig:
    """A staleness function by name, with its parameters (a for poly and hinge, b for hinge; None otherwise).

    Validated at construction: ConfigError naming the accepted forms.
    """

    name: str = "inverse-sqrt"
    a: float | None = None
    b: int | None = None

    def __post_init__(self) -> None:
        form = STALENESS_FORMS.get(self.name) if isinstance(self.name, str) else None
        if form is None:
            raise ConfigError(f"unknown staleness function {self.name!r}; write {FORMS_USAGE}")
        given = {key for key in ("a", "b") if getattr(self, key) is not None}
        if given != set(form.params):
            needs = ", ".join(form.params) if form.params else "no parameters"
            got = ", ".join(sorted(given)) or "none"
            raise ConfigError(f"staleness function {self.name} takes {needs}, got {got}; write {FORMS_USAGE}")
        if self.a is not None:
            number = isinstance(self.a, (int, float)) and not isinstance(self.a, bool)
            if not (number and math.isfinite(self.a) and self.a > 0):
                raise ConfigError(f"staleness function {self.name} needs a finite a > 0, got {self.a!r}; "
                                  f"write {FORMS_USAGE}")
            object.__setattr__(self, "a", float(self.a))
        if self.b is not None and (isinstance(self.b, bool) or not isinstance(self.b, int) or self.b < 0):
            raise ConfigError(f"staleness function {self.name} needs a whole number b >= 0 (rounds of grace), "
                              f"got {self.b!r}; write {FORMS_USAGE}")

    @classmethod
    def parse(cls, text: str) -> StalenessConfig:
        """The config a spec names: ``inverse-sqrt``, ``poly:a=A``, ``hinge:a=A,b=B`` or ``constant``."""
        name, colon, rest = (part.strip() for part in text.strip().partition(":"))
        if name not in STALENESS_FORMS:
            raise ConfigError(f"unknown staleness function {name!r} in {text!r}; write {FORMS_USAGE}")
        if colon and not rest:
            raise ConfigError(f"staleness spec {text!r} ends with ':'; write {FORMS_USAGE}")
        values: dict[str, str] = {}
        for item in rest.split(",") if rest else []:
            key, eq, value = (part.strip() for part in item.partition("="))
            if not eq or not key or not value:
                raise ConfigError(f"staleness parameter {item.strip()!r} in {text!r} must read key=value; "
                                  f"write {FORMS_USAGE}")
            if key not in ("a", "b"):
                raise ConfigError(f"staleness function {name} has no parameter {key!r}; write {FORMS_USAGE}")
            if key in values:
                raise ConfigError(f"staleness parameter {key} is given twice in {text!r}; write {FORMS_USAGE}")
            values[key] = value
        a = b = None
        if "a" in values:
            try:
                a = float(values["a"])
            except ValueError:
                raise ConfigError(f"staleness parameter a must be a number, got {values['a']!r}; "
                                  f"write {FORMS_USAGE}") from None
        if "b" in values:
            bad_b = f"staleness parameter b must be a whole number >= 0, got {values['b']!r}; write {FORMS_USAGE}"
            try:
                b_float = float(values["b"])
            except ValueError:
                raise ConfigError(bad_b) from None
            if not (math.isfinite(b_float) and b_float.is_integer()):
                raise ConfigError(bad_b)
            b = int(b_float)
        return cls(name, a, b)

    def __str__(self) -> str:
        params = [f"{key}={_format(float(getattr(self, key)))}" for key in STALENESS_FORMS[self.name].params]
        return self.name + (":" + ",".join(params) if params else "")

    def weight(self, tau: int) -> float:
        """s(τ) for a contribution τ rounds stale (τ an int >= 0); 1.0 exactly at τ = 0."""
        if isinstance(tau, bool) or not isinstance(tau, int) or tau < 0:
            raise ConfigError(f"staleness must be a whole number of rounds >= 0, got {tau!r}")
        form = STALENESS_FORMS[self.name]
        # Unused parameters are passed as neutral values; each form reads only its own.
        return form.weight(tau, self.a if self.a is not None else 0.0, self.b if self.b is not None else 0)


def staleness_weight(spec: StalenessConfig | str, tau: int) -> float:
    """s(τ) for a config or its spec text (as parsed by StalenessConfig.parse)."""
    config = StalenessConfig.parse(spec) if isinstance(spec, str) else spec
    return config.weight(tau)
