"""Straggler patterns: which workers are slow at each step, and by how much (seeded, reproducible, pure).

Gradient coding and its baselines are measured against stragglers, so the stragglers must be the same
for every method and every run: a pattern is a function of (seed, step, number of workers) only. The
harness's ``straggle`` events (``peer/harness/scenario.py``) slow peers down by a pattern, and the coding
benchmarks ask a pattern which workers straggle. A pattern is written:

- ``none``: nobody is slowed (the default);
- ``random,x=X[,seed=N]``: at each step ONE worker, drawn uniformly from ``default_rng([seed, step])``,
  is X times slower;
- ``persistent,worker=I,x=X``: worker I is X times slower at every step;
- ``bursty,B=B,W=W,lambda=L,x=X[,p=P][,seed=N]``: stragglers that conform to the (B, W, lambda)-bursty
  straggler model of Krishnan, Ebrahimi and Khisti, "Sequential gradient coding for straggler
  mitigation" (ICLR 2023): in every window of W consecutive steps at most ``lambda`` distinct workers
  straggle, and each of them straggles only within B consecutive steps of that window (1 <= B < W,
  as in ``collectives/gradcoding/stragglermodel.py``, which the sequential codes are built on).
  Each step, a worker not in a burst starts one with probability P (default ``lambda / (n * W)``) of a
  length drawn uniformly from 1..B; a start or a continuation that would break the model in the window
  ending at that step is refused (the burst ends). Every straggler is X times slower.

Steps count from 0; a worker is a number in 0..n-1. X > 1 and seeds are integers >= 0. ``str(pattern)``
(``pattern.spec``) writes a pattern back in the canonical form of its text (seed 0 and the default p are
left out), and ``StragglerPattern.parse`` reads it again to an equal pattern.

A bursty pattern is generated step by step from step 0 (whether a step's burst may start depends on the
steps before), each step from its own ``default_rng([seed, n, step])``; the steps generated so far are
kept per n, so asking for steps in any order gives the same answer.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from collectives.errors import ConfigError
from collectives.gradcoding.stragglermodel import BurstyModel, allows

FORMS = (
    "none",
    "random,x=X[,seed=N]",
    "persistent,worker=I,x=X",
    "bursty,B=B,W=W,lambda=L,x=X[,p=P][,seed=N]",
)
_FORMS_TEXT = "; ".join(FORMS)


class StragglerPattern:
    """Which workers straggle at each step; ``slowdown`` says how many times slower a worker is (1.0: normal)."""

    kind: ClassVar[str]
    # How many times slower a straggler is (1.0 for none).
    x: float

    def stragglers(self, step: int, n: int) -> frozenset[int]:
        """The workers (0..n-1) that straggle at this step."""
        raise NotImplementedError

    def workers_problem(self, n: int) -> str:
        """Why this pattern cannot slow anyone among n workers ("" when it can): a worker it names is not one."""
        worker = getattr(self, "worker", None)
        if worker is not None and worker >= n:
            return f"worker {worker} is none of the {n} (workers 0..{n - 1})"
        return ""

    def slowdown(self, step: int, worker: int, n: int) -> float:
        """How many times slower ``worker`` of ``n`` is at ``step``: x when it straggles, else 1.0."""
        _check_step(step, n)
        return self.x if worker in self.stragglers(step, n) else 1.0

    @property
    def spec(self) -> str:
        """The pattern's canonical text (parse reads it back to an equal pattern)."""
        raise NotImplementedError

    def describe(self) -> str:
        """A sentence for logs and reports."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.spec

    @staticmethod
    def parse(text: str) -> StragglerPattern:
        """The pattern written in ``text`` (ConfigError listing the accepted forms when it cannot be read)."""
        return parse_pattern(text)


@dataclass(frozen=True)
class NoStragglers(StragglerPattern):
    """Nobody is slowed."""

    kind: ClassVar[str] = "none"
    x: float = 1.0

    def stragglers(self, step: int, n: int) -> frozenset[int]:
        """No worker straggles."""
        _check_step(step, n)
        return frozenset()

    @property
    def spec(self) -> str:
        """``none``."""
        return "none"

    def describe(self) -> str:
        """A sentence for logs and reports."""
        return "no stragglers"


@dataclass(frozen=True)
class RandomStragglers(StragglerPattern):
    """At each step one worker, drawn uniformly with a generator seeded by (seed, step), is x times slower."""

    kind: ClassVar[str] = "random"
    x: float
    seed: int = 0

    def __post_init__(self) -> None:
        _check_factor(self.x, self.kind)
        _check_seed(self.seed, self.kind)

    def straggler(self, step: int, n: int) -> int:
        """The one worker that straggles at this step."""
        _check_step(step, n)
        return int(np.random.default_rng([self.seed, step]).integers(n))

    def stragglers(self, step: int, n: int) -> frozenset[int]:
        """The one worker that straggles at this step, as a set."""
        return frozenset((self.straggler(step, n),))

    def slowdown(self, step: int, worker: int, n: int) -> float:
        """x for the step's straggler, 1.0 for the others."""
        return self.x if worker == self.straggler(step, n) else 1.0

    @property
    def spec(self) -> str:
        """``random,x=X[,seed=N]``."""
        return f"random,x={self.x:g}" + (f",seed={self.seed}" if self.seed else "")

    def describe(self) -> str:
        """A sentence for logs and reports."""
        return f"one random worker {self.x:g}x slower at each step (seed {self.seed})"


@dataclass(frozen=True)
class PersistentStraggler(StragglerPattern):
    """Worker ``worker`` is x times slower at every step."""

    kind: ClassVar[str] = "persistent"
    worker: int
    x: float

    def __post_init__(self) -> None:
        _check_factor(self.x, self.kind)
        if not isinstance(self.worker, int) or self.worker < 0:
            raise ConfigError(f"persistent: worker must be a worker number >= 0, got {self.worker!r}; {_hint()}")

    def stragglers(self, step: int, n: int) -> frozenset[int]:
        """The slow worker, when it is one of the n."""
        _check_step(step, n)
        return frozenset((self.worker,)) if self.worker < n else frozenset()

    @property
    def spec(self) -> str:
        """``persistent,worker=I,x=X``."""
        return f"persistent,worker={self.worker},x={self.x:g}"

    def describe(self) -> str:
        """A sentence for logs and reports."""
        return f"worker {self.worker} {self.x:g}x slower at every step"


class _History:
    """The steps of a bursty pattern generated so far, per number of workers (extended in step order only)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # n -> (straggler sets of steps 0..len-1, the bursts still running after the last one: worker -> steps left).
        self.by_n: dict[int, tuple[list[frozenset[int]], dict[int, int]]] = {}

    def __getstate__(self) -> dict:
        # A pattern may be pickled (sent to another process): the generated steps go along, the lock does not.
        return {"by_n": self.by_n}

    def __setstate__(self, state: dict) -> None:
        self._lock = threading.Lock()
        self.by_n = state["by_n"]

    def at(self, step: int, n: int, generate: Callable[[list[frozenset[int]], dict[int, int]], frozenset[int]]
           ) -> frozenset[int]:
        """Step ``step``'s straggler set for n workers, first extending the steps of n up to it in order, each by
        ``generate(steps so far, running bursts)`` (which updates the running bursts); under the lock."""
        with self._lock:
            steps, running = self.by_n.setdefault(n, ([], {}))
            while len(steps) <= step:
                steps.append(generate(steps, running))
            return steps[step]


@dataclass(frozen=True)
class BurstyStragglers(StragglerPattern):
    """Bursts of stragglers conforming to the (B, W, lambda)-bursty model; each straggler is x times slower."""

    kind: ClassVar[str] = "bursty"
    B: int
    W: int
    lam: int
    x: float
    # Probability that a worker not in a burst starts one at a step (None: lam / (n * W)).
    p: float | None = None
    seed: int = 0
    _history: _History = field(default_factory=_History, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name, value in (("B", self.B), ("W", self.W), ("lambda", self.lam)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"bursty: {name} must be an integer >= 1, got {value!r}; {_hint()}")
        if self.B >= self.W:
            raise ConfigError(f"bursty: a burst (B={self.B}) must be shorter than its window (W={self.W}); {_hint()}")
        _check_factor(self.x, self.kind)
        _check_seed(self.seed, self.kind)
        if self.p is not None and not (0 < self.p <= 1):
            raise ConfigError(f"bursty: p is a probability in (0, 1], got {self.p:g}; {_hint()}")

    def start_probability(self, n: int) -> float:
        """The probability that a worker of n not in a burst starts one at a step."""
        return self.p if self.p is not None else min(1.0, self.lam / (n * self.W))

    def stragglers(self, step: int, n: int) -> frozenset[int]:
        """The workers that straggle at this step (generating the steps up to it, once per n)."""
        _check_step(step, n)
        return self._history.at(step, n, lambda steps, running: self._next(steps, running, n))

    def _next(self, steps: list[frozenset[int]], running: dict[int, int], n: int) -> frozenset[int]:
        """Step len(steps)'s stragglers, given the steps before; updates the running bursts."""
        t = len(steps)
        rng = np.random.default_rng([self.seed, n, t])
        starts = rng.random(n) < self.start_probability(n)
        lengths = rng.integers(1, self.B + 1, size=n)
        order = rng.permutation(n)
        model = BurstyModel(n, self.B, self.W, min(self.lam, n))
        chosen: set[int] = set()
        # Running bursts go first: they never add a distinct straggler to a window that holds their last step.
        candidates = [int(w) for w in order if int(w) in running] + [
            int(w) for w in order if int(w) not in running and starts[w]
        ]
        for w in candidates:
            if not allows(steps, chosen | {w}, model):
                running.pop(w, None)  # the burst ends here
                continue
            chosen.add(w)
            left = running.pop(w, int(lengths[w])) - 1
            if left > 0:
                running[w] = left
        return frozenset(chosen)

    @property
    def spec(self) -> str:
        """``bursty,B=B,W=W,lambda=L,x=X[,p=P][,seed=N]``."""
        text = f"bursty,B={self.B},W={self.W},lambda={self.lam},x={self.x:g}"
        if self.p is not None:
            text += f",p={self.p:g}"
        return text + (f",seed={self.seed}" if self.seed else "")

    def describe(self) -> str:
        """A sentence for logs and reports."""
        return (
            f"bursts of at most {self.B} steps, at most {self.lam} distinct stragglers in any {self.W} steps, "
            f"each {self.x:g}x slower (seed {self.seed})"
        )


NONE = NoStragglers()

# Each kind's options: name -> (type, required).
_KEYS: dict[str, dict[str, tuple[type, bool]]] = {
    "none": {},
    "random": {"x": (float, True), "seed": (int, False)},
    "persistent": {"worker": (int, True), "x": (float, True)},
    "bursty": {
        "B": (int, True), "W": (int, True), "lambda": (int, True), "x": (float, True),
        "p": (float, False), "seed": (int, False),
    },
}
KINDS = tuple(_KEYS)


def parse_pattern(text: str) -> StragglerPattern:
    """The pattern written ``KIND[,KEY=VALUE]...`` (ConfigError listing the accepted forms otherwise)."""
    parts = [part.strip() for part in str(text).strip().split(",")]
    kind, options = parts[0], parts[1:]
    if kind not in _KEYS:
        raise ConfigError(f"unknown straggler pattern {kind!r} in {text!r}; {_hint()}")
    keys = _KEYS[kind]
    values: dict[str, float | int] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            raise ConfigError(f"straggler pattern {text!r}: cannot read {option!r}, write KEY=VALUE; {_hint()}")
        if key not in keys:
            accepted = ", ".join(f"{k}=" for k in keys) or "no options"
            raise ConfigError(f"straggler pattern {text!r}: {kind} takes {accepted}, not {key}=; {_hint()}")
        if key in values:
            raise ConfigError(f"straggler pattern {text!r}: {key}= is given twice")
        values[key] = _number(value, keys[key][0], key, text)
    missing = [k for k, (_, required) in keys.items() if required and k not in values]
    if missing:
        raise ConfigError(f"straggler pattern {text!r}: {kind} needs {', '.join(f'{k}=' for k in missing)}; {_hint()}")
    if kind == "none":
        return NONE
    if kind == "random":
        return RandomStragglers(x=values["x"], seed=int(values.get("seed", 0)))
    if kind == "persistent":
        return PersistentStraggler(worker=int(values["worker"]), x=values["x"])
    return BurstyStragglers(
        B=int(values["B"]), W=int(values["W"]), lam=int(values["lambda"]), x=values["x"],
        p=values.get("p"), seed=int(values.get("seed", 0)),
    )


def _number(value: str, kind: type, key: str, text: str) -> float | int:
    """An option's value as an int or a finite float."""
    try:
        number = kind(value)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"straggler pattern {text!r}: {key}= needs {what}, got {value!r}; {_hint()}") from None
    if kind is float and not math.isfinite(number):
        raise ConfigError(f"straggler pattern {text!r}: {key}= must be finite, got {value!r}")
    return number


def _hint() -> str:
    return f"write one of: {_FORMS_TEXT}"


def _check_factor(x: float, kind: str) -> None:
    if not (isinstance(x, int | float) and math.isfinite(x) and x > 1):
        raise ConfigError(
            f"{kind}: x is how many times slower a straggler is and must be above 1, got {x!r}; {_hint()}"
        )


def _check_seed(seed: int, kind: str) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"{kind}: seed must be an integer >= 0, got {seed!r}")


def _check_step(step: int, n: int) -> None:
    # numpy seeds take non-negative integers only, and a pattern needs at least one worker.
    if step < 0:
        raise ValueError(f"steps count from 0, got {step}")
    if n < 1:
        raise ValueError(f"a pattern needs at least one worker, got n={n}")
