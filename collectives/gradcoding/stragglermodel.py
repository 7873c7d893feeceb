"""The (B, W, λ)-bursty straggler model of sequential gradient coding, and seeded patterns that conform to it.

Krishnan, Ebrahimi and Khisti ("Sequential Gradient Coding For Straggler Mitigation", ICLR 2023) design their
schemes for stragglers that come in bursts: a slow machine stays slow for a few rounds, then recovers for a
while. A *straggler pattern* is a list with one entry per round: the set of workers (0..n-1) that straggle
in that round. It conforms to the (B, W, λ)-bursty model when, in every window of W consecutive rounds,

- at most λ distinct workers straggle (the spatial condition), and
- each worker's straggling rounds lie within B consecutive rounds (the temporal condition: one burst of
  length at most B per window).

Rounds before round 0 are straggler-free, so a prefix of a pattern is checked by the same rule. The temporal
condition is equivalent to a pairwise one, which is what ``first_violation`` checks: a worker must not
straggle in two rounds r < r' with B <= r' - r <= W - 1. Consequently, once a burst ends at round e, the
worker's next burst starts at round e + W or later.

Pure functions, no I/O; ``collectives/gradcoding/seqcoding.py`` builds its schemes on this model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from collectives.errors import ConfigError

Pattern = Sequence[AbstractSet[int]]

PATTERN_MODES = ("random", "aligned", "rotating")


@dataclass(frozen=True)
class BurstyModel:
    """The (B, W, λ)-bursty straggler model for n workers: 1 <= B < W, 0 <= λ <= n."""

    n: int
    B: int
    W: int
    lam: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"the straggler model needs n >= 1 workers, got {self.n}")
        if not 1 <= self.B < self.W:
            raise ConfigError(f"the bursty model needs 1 <= B < W (a burst shorter than its window), "
                              f"got B={self.B}, W={self.W}")
        if not 0 <= self.lam <= self.n:
            raise ConfigError(f"the bursty model needs 0 <= lambda <= n={self.n}, got lambda={self.lam}")


@dataclass(frozen=True)
class Violation:
    """Where a pattern first leaves the model: the round, the worker, and which condition it breaks."""

    round: int
    worker: int
    reason: str


def first_violation(pattern: Pattern, model: BurstyModel) -> Violation | None:
    """The first round (and worker) at which the pattern breaks the model, or None when it conforms."""
    for t, stragglers in enumerate(pattern):
        for w in sorted(stragglers):
            if not 0 <= w < model.n:
                return Violation(t, w, f"worker {w} is not one of the n={model.n} workers")
            reason = _breaks(pattern, t, w, model)
            if reason:
                return Violation(t, w, reason)
    return None


def conforms(pattern: Pattern, model: BurstyModel) -> bool:
    """True when every window of W consecutive rounds satisfies both conditions of the model.

    The model's check of a whole pattern, which tests apply to generated patterns; a pattern built round by round
    (peer/stragglers.py) asks ``allows`` of each round instead."""
    return first_violation(pattern, model) is None


def allows(history: Pattern, stragglers: AbstractSet[int], model: BurstyModel) -> bool:
    """Whether a conforming ``history`` followed by one more round with these ``stragglers`` still conforms."""
    pattern = [*history, frozenset(stragglers)]
    t = len(history)
    return all(0 <= w < model.n and not _breaks(pattern, t, w, model) for w in stragglers)


def _breaks(pattern: Pattern, t: int, w: int, model: BurstyModel) -> str:
    """Why worker w straggling in round t breaks the model given rounds < t (and round t's others), or ''."""
    # Temporal: an earlier straggle at distance B..W-1 means two bursts (or one too long) inside a window.
    for r in range(max(0, t - model.W + 1), t - model.B + 1):
        if w in pattern[r]:
            return (f"worker {w} straggles in rounds {r} and {t}: more than a burst of B={model.B} "
                    f"within a window of W={model.W}")
    # Spatial: windows ending before t were checked when their own last straggle was added.
    distinct = set().union(*pattern[max(0, t - model.W + 1): t + 1])
    if len(distinct) > model.lam:
        return (f"{len(distinct)} distinct workers straggle in rounds {max(0, t - model.W + 1)}..{t}: "
                f"more than lambda={model.lam} in a window of W={model.W}")
    return ""


def bursty_pattern(n: int, B: int, W: int, lam: int, rounds: int, seed: int, mode: str = "random",
                   start: float = 0.3, stay: float = 0.7) -> list[frozenset[int]]:
    """A seeded straggler pattern of ``rounds`` rounds that conforms to the (B, W, λ) model. Used by tests to drive
    the sequential-coding schemes through conforming patterns, worst cases (aligned, rotating) included; the
    harness's bursty stragglers come from peer/stragglers.py.

    ``random``: each round, a worker in a burst stays slow with probability ``stay``, any other starts a
    burst with probability ``start``; a straggle the model forbids is skipped. ``aligned``: λ workers
    (drawn once) straggle together in full bursts of B rounds, as often as the model allows (every W+B-1
    rounds). ``rotating``: the same bursts, by the next λ workers in a seeded order each time.
    """
    model = BurstyModel(n, B, W, lam)
    if rounds < 0:
        raise ConfigError(f"a pattern needs rounds >= 0, got {rounds}")
    if mode not in PATTERN_MODES:
        raise ConfigError(f"unknown pattern mode {mode!r}; choose one of {', '.join(PATTERN_MODES)}")
    rng = random.Random(seed)
    if mode == "random":
        return _random_pattern(model, rounds, rng, start, stay)
    order = list(range(n))
    rng.shuffle(order)
    period = W + B - 1
    pattern: list[frozenset[int]] = []
    for t in range(rounds):
        burst, phase = divmod(t, period)
        if phase >= B or lam == 0:
            pattern.append(frozenset())
            continue
        first = 0 if mode == "aligned" else (burst * lam) % n
        pattern.append(frozenset(order[(first + k) % n] for k in range(lam)))
    return pattern


def _random_pattern(model: BurstyModel, rounds: int, rng: random.Random, start: float,
                    stay: float) -> list[frozenset[int]]:
    """Round by round: continue bursts, start new ones, keep each straggle only if the model allows it."""
    pattern: list[frozenset[int]] = []
    for t in range(rounds):
        previous = pattern[t - 1] if t else frozenset()
        continuing = [w for w in sorted(previous) if rng.random() < stay]
        others = [w for w in range(model.n) if w not in previous]
        rng.shuffle(others)
        starting = [w for w in others if rng.random() < start]
        chosen: set[int] = set()
        for w in continuing + starting:
            if allows(pattern, chosen | {w}, model):
                chosen.add(w)
        pattern.append(frozenset(chosen))
    return pattern
