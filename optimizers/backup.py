"""Dynamic backup workers: how many of the n workers each synchronous SGD round waits for.

After Xu, Neglia and Sebastianelli, "Dynamic Backup Workers for Parallel Machine
Learning" (IFIP Networking 2020; Computer Networks 2021; arXiv 2004.14696). A
round that applies the mean of the first k of n minibatch gradients trades
noise against time. Waiting for more workers lowers the update's variance but
waits for a later arrival. Each round this module picks the k that maximises
the expected loss decrease per second of wall time. It estimates the terms
online from the committed rounds.

The model, with c = lr * L (learning rate times the loss's smoothness
constant). For an L-smooth loss, one step with the mean g_hat of k independent
gradients, each unbiased with variance sigma^2 = E||g_i - grad||^2, decreases
the loss in expectation by at least::

    Delta(k) = lr*G^2 - (L lr^2 / 2) * E||g_hat||^2 = lr * [(1 - c/2) G^2 - (c/2) sigma^2 / k]

where G^2 = ||grad||^2. Rounds repeat, so by the renewal-reward theorem the
long-run decrease per second is Delta(k) / E[round time]. The round time is
E[T_(k)], the k-th order statistic of the n arrival times, plus a fixed
overhead A (aggregation and commit). The chosen k is::

    k* = argmax_{lo <= k <= hi} Delta(k) / (E[T_(k)] + A)     (ties go to the larger k)

Two cases take hi instead. One is when no k has Delta(k) > 0: the bound then
promises no decrease, and the least noisy update is the best bet. The other is
before enough rounds have been seen (``BackupConfig.warmup``).

Estimators, all in float64 over a bounded window of committed rounds. Each
round r reports k_r, S_r = ||g_bar||^2 and Q_r = mean_i ||g_i||^2.

- sigma^2 is pooled over the last ``grad_window`` rounds:
  sum_r k_r (Q_r - S_r) / sum_r (k_r - 1). This is unbiased, because
  sum_i ||g_i - g_bar||^2 = k (Q - S). Rounds with k = 1 carry no variance
  information and add nothing.
- G^2 = mean_r (S_r - sigma^2 / k_r) over the same rounds, because
  E||g_bar||^2 = G^2 + sigma^2 / k. Both estimates are clamped at 0.
- E[T_(j)] is the mean, over the window's rounds with the same n, of that
  round's j-th arrival. The first k arrivals are exact. A later one is
  censored: all we know is that it came after the k-th. We impute it as
  max(the k-th arrival, m_j), where m_j is the mean of the uncensored j-th
  arrivals in the window. When the window has none, we impute the k-th
  arrival alone. That value is optimistic, so the estimator probes a position
  it has not seen for ``window`` rounds. Finally the estimates are made
  non-decreasing in j. Sorting each round's own times (not pooling workers
  as i.i.d.) keeps a persistent straggler in the top position, where it
  belongs. Censoring is non-informative: k is fixed before the round's times
  are drawn. So the uncensored mean is unbiased.
- A is the mean of (round_s - the k-th arrival) over the rounds that report
  ``round_s``, or 0 if none do.

The paper states its rule per iteration at a parameter server. Here every peer
runs the same pure computation on the same committed data, so every peer picks
the same k with no server. L is not estimated. Secant estimates from
stochastic gradients are dominated by noise, so c = lr * L is a parameter
(default 1: lr = 1/L, the step that maximises the deterministic bound). A
smaller c puts less weight on variance and favours smaller k. The batch size
never enters: sigma^2 is the variance of one worker's whole minibatch
gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from collectives.checks import is_finite_number, is_whole
from collectives.errors import ConfigError, LoconetError
from optimizers.statemeta import meta_dict

STATE_VERSION = 1


class ObservationError(LoconetError, ValueError):
    """A round observation is malformed; the message says which field and what it must be."""


@dataclass(frozen=True)
class BackupConfig:
    """Bounds on k and the estimator's windows; every peer of a run must use the same values."""

    min_k: int = 1  # never wait for fewer workers (capped at n)
    max_k: int | None = None  # never wait for more workers (None: n)
    window: int = 50  # rounds kept; also the longest a censored position goes unprobed
    grad_window: int = 10  # latest rounds (at most window) behind the gradient norm and variance, which drift
    warmup: int = 3  # rounds with the same n needed before leaving the default k = hi
    lr_smoothness: float = 1.0  # c = lr * L, in (0, 2)

    def __post_init__(self) -> None:
        if self.min_k < 1:
            raise ConfigError(f"min_k must be >= 1, got {self.min_k}")
        if self.max_k is not None and self.max_k < self.min_k:
            raise ConfigError(f"max_k ({self.max_k}) must be >= min_k ({self.min_k}) or None (no upper bound)")
        if self.window < 1:
            raise ConfigError(f"window must be >= 1 round, got {self.window}")
        if self.grad_window < 1:
            raise ConfigError(f"grad_window must be >= 1 round, got {self.grad_window}")
        if not 1 <= self.warmup <= self.window:
            raise ConfigError(f"warmup must be in [1, window={self.window}], got {self.warmup}")
        if not 0.0 < self.lr_smoothness < 2.0:
            raise ConfigError(
                f"lr_smoothness (lr * L) must be in (0, 2), got {self.lr_smoothness}; at 2 or more the "
                "smoothness bound promises no decrease even without noise"
            )

    def bounds(self, n: int) -> tuple[int, int]:
        """The allowed range [lo, hi] of k for a group of n workers."""
        hi = n if self.max_k is None else min(self.max_k, n)
        return min(self.min_k, hi), hi


def _finite_nonnegative(name: str, value: float) -> float:
    if not (is_finite_number(value) and value >= 0.0):
        raise ObservationError(f"{name} must be a finite number >= 0, got {value!r:.40}")
    return float(value)


@dataclass(frozen=True)
class RoundObservation:
    """What every peer knows, identically, of one committed round of the first k of n workers."""

    n: int  # workers the round could have waited for
    k: int  # members whose gradients were averaged
    mean_grad_sq_norm: float  # ||g_bar||^2, g_bar the mean of the members' gradients
    member_sq_norm_mean: float  # mean over members of ||g_i||^2
    arrival_s: tuple[float, ...]  # the k members' ready times, seconds after the round's start (any order)
    round_s: float | None = None  # start-to-commit seconds, identical at every peer (e.g. from the commit); or None

    def __post_init__(self) -> None:
        if not (is_whole(self.n, 1) and is_whole(self.k, 1, self.n)):
            raise ObservationError(f"need 1 <= k <= n, got k={self.k}, n={self.n}")
        if len(self.arrival_s) != self.k:
            raise ObservationError(f"arrival_s must hold the k={self.k} members' times, got {len(self.arrival_s)}")
        times = tuple(sorted(_finite_nonnegative("arrival_s", t) for t in self.arrival_s))
        # Sorted once here: position j is then the j-th order statistic of the round.
        object.__setattr__(self, "arrival_s", times)
        for name in ("mean_grad_sq_norm", "member_sq_norm_mean"):
            object.__setattr__(self, name, _finite_nonnegative(name, getattr(self, name)))
        if self.round_s is not None:
            round_s = _finite_nonnegative("round_s", self.round_s)
            if round_s < times[-1]:
                raise ObservationError(f"round_s ({round_s}) is before the k-th arrival ({times[-1]})")
            object.__setattr__(self, "round_s", round_s)


@dataclass(frozen=True)
class Estimate:
    """One decision and every term behind it (for logs, benchmarks and tests)."""

    n: int
    k: int
    ready: bool  # False: too few rounds; k is the default hi
    grad_sq: float  # estimated ||grad||^2 (nan when not ready)
    variance: float  # estimated per-worker gradient variance sigma^2 (nan when not ready)
    overhead_s: float  # estimated per-round overhead A after the k-th arrival
    order_stats: tuple[float, ...]  # estimated E[T_(j)], j = 1..n (empty when not ready)
    gain: tuple[float, ...]  # Delta(k) / lr for k = 1..n
    speed: tuple[float, ...]  # gain / (E[T_(k)] + A) for k = 1..n


def _mean(values: Sequence[float]) -> float:
    # fsum is exactly rounded, so the result does not depend on summation order or platform.
    return math.fsum(values) / len(values)


def gradient_terms(rounds: Sequence[RoundObservation]) -> tuple[float, float] | None:
    """(G^2, sigma^2) pooled over the rounds, or None when no round had k >= 2."""
    dof = sum(r.k - 1 for r in rounds)
    if dof == 0:
        return None
    variance = max(0.0, math.fsum(r.k * (r.member_sq_norm_mean - r.mean_grad_sq_norm) for r in rounds) / dof)
    grad_sq = max(0.0, _mean([r.mean_grad_sq_norm - variance / r.k for r in rounds]))
    return grad_sq, variance


def order_statistics(rounds: Sequence[RoundObservation], n: int) -> tuple[float, ...]:
    """Estimated E[T_(j)], j = 1..n, from rounds of n workers, censored positions imputed (see module doc)."""
    same = [r for r in rounds if r.n == n]
    if not same:
        return ()
    estimates: list[float] = []
    for j in range(n):
        observed = [r.arrival_s[j] for r in same if r.k > j]
        seen = _mean(observed) if observed else 0.0
        values = [r.arrival_s[j] if r.k > j else max(r.arrival_s[-1], seen) for r in same]
        estimate = _mean(values)
        estimates.append(max(estimate, estimates[-1]) if estimates else estimate)
    return tuple(estimates)


def decide(rounds: Sequence[RoundObservation], n: int, config: BackupConfig) -> Estimate:
    """The k to wait for in the next round of n workers, a pure function of the window's rounds."""
    if n < 1:
        raise ConfigError(f"the group size n must be >= 1, got {n}")
    lo, hi = config.bounds(n)
    recent = list(rounds)[-config.grad_window :]
    terms = gradient_terms(recent)
    times = order_statistics(rounds, n)
    same_n = sum(1 for r in rounds if r.n == n)
    if terms is None or same_n < config.warmup:
        return Estimate(n, hi, False, math.nan, math.nan, 0.0, (), (), ())
    grad_sq, variance = terms
    with_round = [r.round_s - r.arrival_s[-1] for r in rounds if r.round_s is not None]
    overhead = _mean(with_round) if with_round else 0.0
    c = config.lr_smoothness
    gain = tuple((1.0 - c / 2.0) * grad_sq - (c / 2.0) * variance / k for k in range(1, n + 1))
    # A zero round time (only in degenerate inputs) would divide by zero; a nanosecond floor keeps the order.
    speed = tuple(g / max(t + overhead, 1e-9) for g, t in zip(gain, times))
    best = hi
    if max(gain[lo - 1 : hi]) > 0.0:
        best = lo
        for k in range(lo + 1, hi + 1):
            if speed[k - 1] >= speed[best - 1]:  # >=: ties go to the larger, less noisy k
                best = k
    return Estimate(n, best, True, grad_sq, variance, overhead, times, gain, speed)


@dataclass
class BackupWorkers:
    """Chooses each round's k from the committed rounds; the state is the bounded window of those rounds."""

    config: BackupConfig = field(default_factory=BackupConfig)
    rounds: list[RoundObservation] = field(default_factory=list)

    def observe(self, observation: RoundObservation) -> None:
        """Record a committed round; rounds older than the window are forgotten."""
        self.rounds.append(observation)
        del self.rounds[: -self.config.window]

    def estimate(self, n: int) -> Estimate:
        """The next round's decision for n workers, with the terms behind it."""
        return decide(self.rounds, n, self.config)

    def choose_k(self, n: int) -> int:
        """How many of the n workers the next round waits for, in [1, n]."""
        return self.estimate(n).k

    def state_dict(self) -> dict[str, Any]:
        """Plain data (JSON-safe) from which a joining peer reproduces the same decisions."""
        return {
            "version": STATE_VERSION,
            "config": asdict(self.config),
            "rounds": [{**asdict(r), "arrival_s": list(r.arrival_s)} for r in self.rounds],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the window by a saved one; the saved config must equal this one."""
        self.checked_state(state)()

    def checked_state(self, state: Mapping[str, Any]) -> Callable[[], None]:
        """Check a saved window (as load_state_dict does) and return what takes it: nothing changes before."""
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"backup-workers state version {state.get('version')!r} is not {STATE_VERSION}")
        if meta_dict(state, "config") != asdict(self.config):
            raise ConfigError(
                f"the state was saved with {state['config']}, this peer has {asdict(self.config)}; "
                "every peer of a run must use the same backup-workers options"
            )
        saved = state.get("rounds")
        if not isinstance(saved, list) or len(saved) > self.config.window:
            raise ConfigError(
                f"a backup-workers state holds a list of at most {self.config.window} rounds (its window)"
            )
        try:
            rounds = [RoundObservation(**{**r, "arrival_s": tuple(r["arrival_s"])}) for r in saved]
        except (TypeError, KeyError) as exc:  # a state from another peer: fields missing, extra or of other types
            raise ConfigError(f"a backup-workers state's round is malformed: {exc}") from None

        def take() -> None:
            self.rounds = rounds

        return take
