"""Byzantine attacks: how a dishonest peer corrupts what it contributes to a round (a test tool, pure functions).

The harness's ``byzantine`` event (``peer/harness/scenario.py``) and
``loconet bench federated`` both use these. An attack is written
``KIND[,KEY=VALUE]...``:

- ``signflip`` / ``signflip,k=K``: send ``-K`` times the honest update (K > 0, default 10);
- ``scale=K`` / ``scale,k=K``: send ``K`` times the honest update (K finite, required);
- ``noise=S`` / ``noise,s=S`` (optional ``,seed=N``): send pure Gaussian noise, ``N(0, S^2)`` in every
  coordinate, in place of the update (the "Gaussian attack" of the robust-aggregation papers; the honest
  update is not sent at all, so the noise does not hide behind it). S > 0 is required;
- ``zero``: send a zero update (a free rider);
- ``labelflip``: poison the data instead: the peer trains on labels ``y -> C - 1 - y`` (a classification
  task with C classes) and sends its honest update of that training.

Whatever the honest update holds, what is sent is finite: NaN becomes 0 and values beyond float range are
clamped to it, so the collective's NaN/Inf checks do not catch the attacker; only a robust aggregator can.
The noise is reproducible: the n-th contribution an ``Attack`` corrupts draws from a ``torch.Generator``
seeded with ``noise_seed(seed, n)``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

from collectives.errors import ConfigError

KINDS = ("signflip", "scale", "noise", "zero", "labelflip")
# The option each kind takes (besides the short KIND=VALUE form of scale and noise).
_OPTIONS = {"signflip": {"k"}, "scale": {"k"}, "noise": {"s", "seed"}, "zero": set(), "labelflip": set()}
_EXAMPLES = "signflip, signflip,k=5, scale=3, noise=0.5, noise=0.5,seed=1, zero or labelflip"


def noise_seed(seed: int, call: int) -> int:
    """The generator seed of the call-th contribution a noise attack with this seed corrupts."""
    # A fixed odd multiplier spreads neighbouring (seed, call) pairs over the 63-bit range torch takes.
    return (seed * 0x9E3779B97F4A7C15 + call) % (1 << 63)


@dataclass(frozen=True)
class Attack:
    """One attack: its kind, the factor ``k`` (signflip, scale), the noise std ``s`` and seed (noise)."""

    kind: str
    k: float = 10.0
    s: float = 0.0
    seed: int = 0
    # Contributions corrupted so far: the noise of each is drawn from its own seeded generator.
    _calls: itertools.count = field(default_factory=itertools.count, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown attack {self.kind!r}; write one of {_EXAMPLES}")
        if not math.isfinite(self.k):
            raise ConfigError(f"attack {self.kind}: k must be a finite number, got {self.k}")
        if self.kind == "signflip" and self.k <= 0:
            raise ConfigError(f"signflip sends -k times the honest update; k must be > 0, got {self.k:g} (e.g. k=10)")
        if self.kind == "noise" and not (math.isfinite(self.s) and self.s > 0):
            raise ConfigError(f"noise needs a finite standard deviation above 0, e.g. noise=0.5; got {self.s:g}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"attack seed must be an integer >= 0, got {self.seed!r}")

    def __str__(self) -> str:
        if self.kind == "signflip":
            return "signflip" if self.k == Attack.k else f"signflip,k={self.k:g}"
        if self.kind == "scale":
            return f"scale={self.k:g}"
        if self.kind == "noise":
            return f"noise={self.s:g}" + (f",seed={self.seed}" if self.seed else "")
        return self.kind

    @property
    def poisons_data(self) -> bool:
        """The attack changes the peer's training data (labelflip), not what it sends."""
        return self.kind == "labelflip"

    def describe(self) -> str:
        """What the attacker sends, in words (for logs)."""
        return {
            "signflip": f"-{self.k:g} times its honest update",
            "scale": f"{self.k:g} times its honest update",
            "noise": f"Gaussian noise of std {self.s:g} instead of its update",
            "zero": "a zero update",
            "labelflip": "its update of training on flipped labels (y -> C-1-y)",
        }[self.kind]

    def corrupt(self, tensors: list[torch.Tensor], *, call: int | None = None) -> list[torch.Tensor]:
        """The contribution to send in place of the honest ``tensors`` (new tensors, always finite).

        ``call`` numbers the contribution for the noise's generator; by default the
        attack counts its own calls (0, 1, 2...).
        """
        n = next(self._calls) if call is None else call
        if self.kind in ("signflip", "scale"):
            factor = -self.k if self.kind == "signflip" else self.k
            out = [t * factor for t in tensors]
        elif self.kind == "noise":
            gen = torch.Generator().manual_seed(noise_seed(self.seed, n))
            out = [(torch.randn(t.shape, generator=gen, dtype=t.dtype) * self.s).to(t.device) for t in tensors]
        elif self.kind == "zero":
            out = [torch.zeros_like(t) for t in tensors]
        else:  # labelflip: the update itself is honest, of poisoned training
            out = [t.clone() for t in tensors]
        return [_finite(t) for t in out]

    def flip_labels(self, batch: tuple[torch.Tensor, torch.Tensor], classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch this attacker trains on: labels flipped for labelflip (``flip_labels``), as it is otherwise."""
        return flip_labels(batch, classes) if self.poisons_data else batch


def _finite(t: torch.Tensor) -> torch.Tensor:
    """t with NaN as 0 and +-Inf (or an overflow of the attack's factor) as the dtype's largest finite value."""
    if not t.is_floating_point():
        return t
    big = torch.finfo(t.dtype).max
    return torch.nan_to_num(t, nan=0.0, posinf=big, neginf=-big)


def parse_attack(text: str) -> Attack:
    """An attack from its text (``signflip``, ``signflip,k=5``, ``scale=3``, ``noise=0.5``, ``zero``, ``labelflip``)."""
    head, *rest = [part.strip() for part in text.strip().split(",")]
    kind, _, short = head.partition("=")
    if kind not in KINDS:
        raise ConfigError(f"unknown attack {text!r}; write one of {_EXAMPLES}")
    options: dict[str, str] = {}
    if short:
        if kind not in ("scale", "noise"):
            raise ConfigError(f"attack {text!r}: only scale=K and noise=S take a value; write {kind} alone")
        options["k" if kind == "scale" else "s"] = short
    for part in rest:
        key, eq, value = part.partition("=")
        if not eq or not value:
            raise ConfigError(f"attack {text!r}: cannot read {part!r}; options are KEY=VALUE, e.g. {kind},k=5")
        if key not in _OPTIONS[kind]:
            takes = ", ".join(f"{o}=" for o in sorted(_OPTIONS[kind])) or "no options"
            raise ConfigError(f"attack {text!r}: {kind} takes {takes}, not {key}=")
        if key in options:
            raise ConfigError(f"attack {text!r}: {key} is given twice")
        options[key] = value
    if kind == "scale" and "k" not in options:
        raise ConfigError(f"attack {text!r}: scale needs its factor, e.g. scale=3")
    if kind == "noise" and "s" not in options:
        raise ConfigError(f"attack {text!r}: noise needs its standard deviation, e.g. noise=0.5")
    fields: dict[str, float | int] = {}
    for key, value in options.items():
        try:
            fields[key] = int(value) if key == "seed" else float(value)
        except ValueError:
            need = "an integer" if key == "seed" else "a number"
            raise ConfigError(f"attack {text!r}: {key}= needs {need}, got {value!r}") from None
    return Attack(kind, **fields)


def flip_labels(batch: tuple[torch.Tensor, torch.Tensor], classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch ``(inputs, labels)`` with each label y replaced by ``classes - 1 - y`` (labelflip's poisoning)."""
    inputs, labels = batch
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labelflip needs integer class labels, got a {labels.dtype} tensor")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(
            f"labelflip: labels must lie in [0, {classes}) for a task of {classes} classes; "
            f"got {int(labels.min())}..{int(labels.max())}"
        )
    return inputs, classes - 1 - labels
