"""Differential privacy without a trusted server: clipping, each member's share of the noise, the privacy spent.

The mechanism is DP-FedAvg (McMahan et al., "Learning Differentially Private
Recurrent Language Models", 2018) with the noise added by the members, not
by a server. Each member clips its update to L2 norm C (``clip_to_norm``)
and, once the round's n members are known, adds Gaussian noise
N(0, (sigma*C)^2 / n) to every coordinate of it (``add_noise``). The round
is the unweighted mean of the n noisy contributions, so the sum carries
noise of standard deviation sigma*C, the Gaussian mechanism with noise
multiplier sigma on a sum of contributions of norm at most C; dividing by
the public n is post-processing, and so are the codecs. The round's
weights must be uniform (a sample-weighted mean breaks the bound on one
member's influence) and its aggregator the mean (``DPConfig.check_round``).

Adaptive clipping (Andrew et al., "Differentially Private Learning with
Adaptive Clipping", 2021) is optional: each member also contributes, as one
extra coordinate, whether its update's norm was within C (centred to
+-1/2, with noise N(0, sigma_b^2 / n)); the committed round's mean of that
coordinate is the noisy fraction of unclipped updates b, and every peer
moves C geometrically towards the target quantile gamma:
C <- C * exp(-eta * (b - gamma)). Everyone applies the same committed value,
so C stays identical on every peer. The two noisy queries together are one
Gaussian mechanism with noise multiplier z = ``noise`` when the update's
multiplier is sigma_u = (z^-2 - (2 sigma_b)^-2)^-1/2 (the paper's Theorem 1),
so the accountant sees z either way.

The privacy spent is computed by Google's ``dp-accounting`` library (the
accountant of TF Privacy and TensorFlow Federated, maintained with Google's
differential-privacy libraries, offering RDP and PLD accountants), not by
hand. We use its RDP accountant: it is what DP-FedAvg and the adaptive
clipping paper report, it is exact for composed Gaussian mechanisms up to
the standard RDP-to-(epsilon, delta) conversion, and it is the one of the
two that analyses sampling without replacement (Wang, Balle,
Kasiviswanathan 2019), the kind of client sampling loconet does.

What the guarantee covers (read before relying on it):

- Neighbouring runs differ in one peer's data. By default (``zero-out``,
  dp-accounting's REPLACE_SPECIAL) the neighbour replaces that peer's
  update by zero: participation is public in loconet (round members are
  named in every plan), the data is what is protected; the sensitivity of
  the sum is C and the noise multiplier sigma, the figures DP-FedAvg
  reports. With amplification by sampling (``DPConfig.amplify``) the
  neighbour replaces the peer's update by any other (REPLACE_ONE, the
  relation dp-accounting's sampled-without-replacement analysis needs): the
  sensitivity is 2C, so each round is a Gaussian mechanism with multiplier
  sigma/2 on k of N peers; per order, the tighter of that and the
  unsampled bound is used (subsampling never costs privacy).
- Amplification by sampling holds only against someone who does not know
  whether the peer was in the round. loconet's ``sample`` quorum derives
  the sample from the run's seed, which every member knows, so against the
  members it gives no amplification: ``amplify`` is off by default and
  then every round counts in full.
- The epsilon is that of the committed results (what every member and
  anyone who sees the model gets). Without secure aggregation a member also
  receives a part of each other member's own contribution, whose noise is
  only sigma/sqrt(n) times C; t colluding members, who know their own noise,
  see an aggregate whose noise is sigma*C*sqrt((n-t)/n). A member that does
  not clip or add noise (a modified peer) cannot be detected: every honest
  member trusts the others to run this code.
- The noise is drawn with torch's generator (Mersenne Twister, seeded from
  os.urandom) in floating point: the standard of research DP libraries, not
  hardened against floating-point or generator attacks. A fixed ``seed`` is
  for reproducible benchmarks only: whoever knows it can remove the noise.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from collectives.checks import is_finite_number, is_whole
from collectives.errors import ConfigError, ProtocolError
from collectives.membership.roundplan import RoundPlan
from collectives.reduce.aggregation import MAX_ROUND_MEMBERS
from collectives.reduce.aggregators import AggregatorConfig
from optimizers.statemeta import meta_dict, meta_float, meta_str

ZERO_OUT = "zero-out"
REPLACE_ONE = "replace-one"
ADJACENCIES = (ZERO_OUT, REPLACE_ONE)
# A saved run of sampling rates counts at most this many rounds (2^53: exact as a float in the RDP sum): a state
# fetched from another peer may claim any number.
MAX_ROUNDS = 1 << 53


DEFAULT_NOISE = 1.0
"""The noise multiplier of a private run that names none."""


@dataclass(frozen=True)
class DPConfig:
    """Differential privacy of a federated run: clip norm, noise multiplier, delta (nested as ``dp``: --dp-clip...)."""

    clip: float | None = field(
        default=None,
        metadata={"help": "differential privacy: clip each peer's update to this L2 norm C and add Gaussian noise "
                  "(the start of C with --dp-adaptive); none: no differential privacy"},
    )
    # None until a clip norm is set: a noise multiplier alone turned no privacy on, silently.
    noise: float | None = field(
        default=None,
        metadata={"help": "noise multiplier sigma: the round's sum carries Gaussian noise of std sigma*C, each of "
                  f"its n peers adding its share N(0, (sigma*C)^2/n) (default: {DEFAULT_NOISE} with --dp-clip)"},
    )
    delta: float = field(default=1e-5, metadata={"help": "delta at which the privacy spent (epsilon) is reported"})
    adaptive: float | None = field(
        default=None,
        metadata={"help": "adaptive clipping (Andrew et al. 2021): the target fraction of updates within C, "
                  "e.g. 0.5; C follows it; none: C stays fixed"},
    )
    clip_lr: float = field(default=0.2, metadata={"help": "adaptive clipping: learning rate of log C (eta)"})
    count_noise: float | None = field(
        default=None,
        metadata={"help": "adaptive clipping: noise std sigma_b on the count of unclipped updates; "
                  "none: max(n/20, sigma) for a round of n peers"},
    )
    amplify: bool = field(
        default=False,
        metadata={"help": "credit amplification by client sampling (replace-one adjacency); valid only against "
                  "someone who does not know each round's sample, which every member of the run knows"},
    )
    min_members: int = field(
        default=2,
        metadata={"help": "the fewest members a private round may have: its mean carries noise sigma*C/n per "
                  "coordinate, so a round of one applies one peer's update under the whole noise; smaller rounds "
                  "do not form (the peers train on until enough are live); 1: rounds of any size"},
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "seed of the noise, for reproducible benchmarks only (whoever knows it can remove the "
                  "noise); none: from os.urandom"},
    )

    def __post_init__(self) -> None:
        if self.clip is not None and not (is_finite_number(self.clip) and self.clip > 0):
            raise ConfigError(f"dp clip must be a positive number (or none: no privacy), got {self.clip!r}")
        if self.clip is None and self.noise is not None:
            raise ConfigError("--dp-noise without --dp-clip adds no noise: privacy is on only with a clip norm C; "
                              "give --dp-clip C (e.g. 1.0) too")
        if self.clip is not None and self.noise is None:
            object.__setattr__(self, "noise", DEFAULT_NOISE)
        if self.noise is not None and not (is_finite_number(self.noise) and self.noise > 0):
            raise ConfigError(
                f"dp noise must be a positive number, got {self.noise!r} "
                "(for clipping without noise use the aggregator norm_clip:clip=C)"
            )
        if not (is_finite_number(self.delta) and 0 < self.delta < 1):
            raise ConfigError(f"dp delta must be in (0, 1), typically below 1/peers, got {self.delta!r}")
        if self.adaptive is not None:
            if not (is_finite_number(self.adaptive) and 0 < self.adaptive < 1):
                raise ConfigError(f"dp adaptive is a target fraction in (0, 1), e.g. 0.5; got {self.adaptive!r}")
            if self.clip is None:
                raise ConfigError("adaptive clipping starts from --dp-clip: give it an initial C (e.g. 0.1)")
        if not (is_finite_number(self.clip_lr) and self.clip_lr > 0):
            raise ConfigError(f"dp clip_lr must be a positive number, got {self.clip_lr!r}")
        if self.count_noise is not None and not (is_finite_number(self.count_noise)
                                                 and 2 * self.count_noise > (self.noise or 0)):
            raise ConfigError(
                f"dp count_noise must exceed noise/2 = {(self.noise or 0) / 2} (the update's noise would have to be "
                f"infinite otherwise), got {self.count_noise!r}"
            )
        if not isinstance(self.amplify, bool):
            raise ConfigError(f"dp amplify must be true or false, got {self.amplify!r}")
        if not is_whole(self.min_members, 1, MAX_ROUND_MEMBERS):
            raise ConfigError(f"dp min_members must be an integer from 1 to {MAX_ROUND_MEMBERS}, got "
                              f"{self.min_members!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"dp seed must be an integer or none, got {self.seed!r}")

    @property
    def enabled(self) -> bool:
        """Whether updates are clipped and noised (a clip norm is set)."""
        return self.clip is not None

    def settings(self) -> tuple[str, ...]:
        """What every member of a run must clip and noise alike, and the size of its rounds, in parts the coordinator
        compares ("dp off" when disabled); delta, amplify and the seed change only what is reported or drawn."""
        if not self.enabled:
            return ("dp off",)
        exact = lambda x: repr(float(x))  # noqa: E731 - 1 and 1.0 (a JSON file's and a flag's) agree
        # The minimum too: every member checks a sampled round's size against its own (RoundPlan.check_sample).
        parts = [f"dp clip {exact(self.clip)}", f"dp noise {exact(self.noise)}", f"dp min members {self.min_members}"]
        if self.adaptive is not None:
            count = "auto" if self.count_noise is None else exact(self.count_noise)
            parts += [
                f"dp adaptive {exact(self.adaptive)}", f"dp clip lr {exact(self.clip_lr)}", f"dp count noise {count}"
            ]
        return tuple(parts)

    @property
    def adjacency(self) -> str:
        """The neighbouring relation the privacy is accounted under (see the module docstring)."""
        return REPLACE_ONE if self.amplify else ZERO_OUT

    def check_round(self, aggregator: AggregatorConfig) -> None:
        """ConfigError unless rounds combine contributions as the mechanism needs: the (unweighted) mean."""
        if self.enabled and aggregator.name != "mean":
            raise ConfigError(
                f"differential privacy needs the mean aggregator (with weight 1 per peer), not {aggregator.name!r}: "
                "a robust aggregator's output is not a Gaussian mechanism on the sum of clipped updates"
            )


# -- the math: clipping and noise ------------------------------------------------------------------


def global_norm(tensors: Sequence[torch.Tensor]) -> float:
    """The L2 norm of all tensors taken as one vector, computed in float64."""
    squares = sum(float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2 for t in tensors)
    return math.sqrt(squares)


def clip_to_norm(tensors: Sequence[torch.Tensor], clip: float) -> tuple[list[torch.Tensor], float]:
    """(tensors scaled by min(1, clip/norm), their original global L2 norm); the inputs are not modified.

    The clipped norm is clip up to float32 rounding (relative 2^-23).
    """
    norm = global_norm(tensors)
    if norm <= clip:
        return [t.detach().clone() for t in tensors], norm
    scale = clip / norm
    return [t.detach() * scale for t in tensors], norm


def add_noise(
    flat: torch.Tensor, n: int, clip: float, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A new tensor: flat plus N(0, (sigma*clip)^2 / n) on every coordinate (one member's share of a round of n)."""
    if n < 1:
        raise ValueError(f"a round has at least one member, got n={n}")
    std = sigma * clip / math.sqrt(n)
    noise = torch.randn(flat.shape, generator=generator, dtype=flat.dtype)
    return noise.mul_(std).add_(flat)


def update_noise_multiplier(noise: float, count_noise: float) -> float:
    """Andrew et al.'s sigma_u: the update's multiplier that, with count noise sigma_b, makes the round's z=noise."""
    rest = noise ** -2 - (2 * count_noise) ** -2
    if rest <= 0:
        raise ConfigError(f"count noise {count_noise} must exceed noise/2 = {noise / 2}")
    return rest ** -0.5


def noise_generator(seed: int | None, stream: str = "") -> torch.Generator:
    """A private generator: seeded from os.urandom, or (reproducible benchmarks) from seed and this peer's stream."""
    if seed is None:
        value = int.from_bytes(os.urandom(8), "little")
    else:
        # Each peer needs its own noise: the same seed everywhere would let any member subtract everyone's.
        digest = hashlib.sha256(f"loconet-dp:{seed}:{stream}".encode()).digest()
        value = int.from_bytes(digest[:8], "little")
    return torch.Generator().manual_seed(value & ((1 << 63) - 1))


# -- the accountant ---------------------------------------------------------------------------------


def _dp_accounting() -> Any:
    try:
        import dp_accounting
    except ImportError as e:
        raise ConfigError(
            f"differential privacy accounting needs dp-accounting ({e}): pip install 'loconet[federated]'"
        ) from e
    return dp_accounting


class PrivacyAccountant:
    """The privacy spent by a run's rounds, by dp-accounting's RDP accountant: ``record_round``, ``epsilon``.

    Every round is a Gaussian mechanism with noise multiplier ``noise`` on a sum of
    contributions of norm at most C. Under ``zero-out`` adjacency only unsampled rounds
    (rate 1) are accounted; under ``replace-one`` a round of k sampled out of N peers
    (rate k/N) is the sampled-without-replacement Gaussian with multiplier noise/2.
    """

    def __init__(self, noise: float, adjacency: str = ZERO_OUT) -> None:
        if not (is_finite_number(noise) and noise > 0):
            raise ConfigError(f"the accountant's noise multiplier must be positive, got {noise!r}")
        if adjacency not in ADJACENCIES:
            raise ConfigError(f"adjacency must be one of {', '.join(ADJACENCIES)}, got {adjacency!r}")
        self.noise = float(noise)
        self.adjacency = adjacency
        # [rate, rounds] runs in order: a run of a million rounds at one rate is one entry (memory and meta).
        self._runs: list[list] = []
        self._rdp_of: dict[float, np.ndarray] = {}  # per-round RDP curve of each sampling rate, computed once
        self._orders: np.ndarray | None = None

    @property
    def rounds(self) -> int:
        """Rounds recorded."""
        return sum(count for _, count in self._runs)

    @property
    def rates(self) -> list[tuple[float, int]]:
        """The recorded rounds' sampling rates, run-length encoded in order: (rate, rounds at it)."""
        return [(q, count) for q, count in self._runs]

    def record_round(self, sampling_rate: float = 1.0) -> None:
        """Compose one round whose members were sampled at this rate (k/N; 1.0: not sampled)."""
        q = float(sampling_rate)
        if not (is_finite_number(q) and 0 < q <= 1):
            raise ConfigError(f"a round's sampling rate is k/N in (0, 1], got {sampling_rate!r}")
        if q < 1 and self.adjacency != REPLACE_ONE:
            raise ConfigError(
                f"a sampling rate of {q} is credited only under replace-one adjacency (--dp-amplify), as "
                "dp-accounting analyses sampling without replacement; record 1.0 when the sample is public"
            )
        self._curve(q)  # fails here, not later in epsilon(), if the library cannot account it
        if self._runs and self._runs[-1][0] == q:
            self._runs[-1][1] += 1
        else:
            self._runs.append([q, 1])

    def epsilon(self, delta: float) -> float:
        """Epsilon of the rounds so far at this delta (0.0 before the first round)."""
        if not (is_finite_number(delta) and 0 < delta < 1):
            raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
        if not self._runs:
            return 0.0
        per_rate: Counter[float] = Counter()
        for q, count in self._runs:
            per_rate[q] += count
        total = sum(count * self._curve(q) for q, count in per_rate.items())
        rdp = _dp_accounting().rdp.rdp_privacy_accountant
        eps, _ = rdp.compute_epsilon(self._orders, total, delta)
        return float(eps)

    def _curve(self, q: float) -> np.ndarray:
        """One round's RDP at every order of the accountant, for sampling rate q."""
        curve = self._rdp_of.get(q)
        if curve is not None:
            return curve
        dpa = _dp_accounting()
        relation = dpa.NeighboringRelation
        if self.adjacency == ZERO_OUT:
            # The relation dp-accounting calls REPLACE_SPECIAL: the special record is the zero update.
            curve = self._single(dpa.GaussianDpEvent(self.noise), relation.REPLACE_SPECIAL)
        else:
            # Replacing one update by another moves the sum by up to 2C: the multiplier is noise/2.
            gaussian = dpa.GaussianDpEvent(self.noise / 2)
            curve = self._single(gaussian, relation.REPLACE_ONE)
            if q < 1:
                # dp-accounting wants the sample as integer counts; the rate is what its analysis reads.
                size, sample = _as_fraction(q)
                sampled = dpa.SampledWithoutReplacementDpEvent(size, sample, gaussian)
                # Its bound can exceed the unsampled one at large orders; subsampling never costs privacy.
                curve = np.minimum(curve, self._single(sampled, relation.REPLACE_ONE))
        self._rdp_of[q] = curve
        return curve

    def _single(self, event: Any, relation: Any) -> np.ndarray:
        accountant = _dp_accounting().rdp.RdpAccountant(neighboring_relation=relation)
        accountant.compose(event)
        self._orders = np.asarray(accountant.orders)
        return np.asarray(accountant.rdp, dtype=np.float64)

    def state_dict(self) -> dict:
        """The rounds' sampling rates (run-length encoded, so meta stays small) and what they were accounted with."""
        return {"noise": self.noise, "adjacency": self.adjacency, "rates": [[q, count] for q, count in self._runs]}

    def load_state_dict(self, state: dict) -> None:
        """Restore the rounds recorded by state_dict (ConfigError if they were accounted with other settings, or
        are not [rate, rounds] pairs: the state may come from another peer)."""
        self.checked_state(state)()

    def checked_state(self, state: dict) -> Callable[[], None]:
        """Check a state_dict (as load_state_dict does) and return what takes it: nothing changes before."""
        if meta_float(state, "noise") != self.noise or meta_str(state, "adjacency") != self.adjacency:
            raise ConfigError(
                f"this run's privacy was spent at noise {state['noise']} ({state['adjacency']}); this peer is "
                f"configured with noise {self.noise} ({self.adjacency}): use the run's --dp-noise and --dp-amplify"
            )
        runs = _checked_runs(state.get("rates"))
        for q in {q for q, _ in runs}:
            if q < 1 and self.adjacency != REPLACE_ONE:
                raise ConfigError(f"a saved sampling rate of {q!r} cannot be accounted under {self.adjacency}")
            self._curve(q)  # a cache: computed once per rate

        def take() -> None:
            self._runs = runs

        return take


def _checked_runs(saved: Any) -> list[list]:
    """[rate, rounds] runs as saved, checked: a rate in (0, 1], a whole number of rounds in [1, MAX_ROUNDS]."""
    if not isinstance(saved, list):
        raise ConfigError(f"saved sampling rates must be a list of [rate, rounds] pairs, got {type(saved).__name__}")
    runs: list[list] = []
    for run in saved:
        if not (isinstance(run, list) and len(run) == 2):
            raise ConfigError(f"a saved run of sampling rates must be [rate, rounds], got {run!r:.80}")
        q, count = run
        if not (is_finite_number(q) and 0 < q <= 1):
            raise ConfigError(f"a saved sampling rate must be in (0, 1], got {q!r:.80}")
        if not is_whole(count, 1, MAX_ROUNDS):
            raise ConfigError(f"a saved run of sampling rates must count 1 to {MAX_ROUNDS} rounds, got {count!r:.80}")
        runs.append([float(q), count])
    return runs


def _as_fraction(q: float) -> tuple[int, int]:
    """(N, k) with k/N == q to within 1e-9 (dp-accounting's events take counts)."""
    f = Fraction(q).limit_denominator(10 ** 9)
    return f.denominator, f.numerator


# -- one peer's side of a private run ---------------------------------------------------------------


class DifferentialPrivacy:
    """What a federated algorithm calls for private rounds: clip, noise at send time, absorb the result, account.

    ``contribution`` clips the update (adaptive clipping: and appends the indicator
    coordinate, so a round carries ``extra_numel`` more values); ``prepare`` returns the
    peer's noise function for that contribution; ``absorb`` takes a committed round's
    value (removes the indicator and moves C) and counts the round; ``epsilon`` is the
    privacy spent so far; ``state_dict`` is the run's part (C and the rounds), identical on
    every peer, for the state joiners fetch.
    """

    def __init__(self, config: DPConfig, stream: str = "") -> None:
        """``stream``: this peer's name, which a fixed ``config.seed`` is mixed with so every peer's noise differs."""
        if not config.enabled:
            raise ConfigError("DifferentialPrivacy needs a clip norm (--dp-clip)")
        self.config = config
        self.clip = float(config.clip)
        self.generator = noise_generator(config.seed, stream)
        self.accountant = PrivacyAccountant(config.noise, config.adjacency)
        # The noisy fraction of unclipped updates of the last absorbed round (adaptive clipping), for reports.
        self.unclipped_fraction: float | None = None

    @property
    def extra_numel(self) -> int:
        """Values a round carries beyond the update (1 with adaptive clipping: the indicator)."""
        return 1 if self.config.adaptive is not None else 0

    def contribution(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The update clipped to the current C (new tensors); with adaptive clipping, plus the centred indicator."""
        clipped, norm = clip_to_norm(tensors, self.clip)
        if self.config.adaptive is None:
            return clipped
        within = 1.0 if norm <= self.clip else 0.0
        # Centred to +-1/2 so its sensitivity is 1/2, as in Andrew et al.'s analysis.
        return clipped + [torch.tensor([within - 0.5], dtype=torch.float32)]

    def prepare(self) -> Callable[[RoundPlan, torch.Tensor], torch.Tensor]:
        """The function the peer runs on the flat contribution once each attempt's members are known: its noise."""
        clip = self.clip  # the C this contribution was clipped to, even if a round commits meanwhile

        def noisy(plan: RoundPlan, flat: torch.Tensor) -> torch.Tensor:
            n = len(plan.members)
            if n < self.config.min_members:
                # The coordinator forms no such round (QuorumRequest.min_members); one that does is refused here.
                raise ProtocolError(f"round {plan.round_id} has {n} member(s), fewer than the "
                                    f"{self.config.min_members} a private round needs (--dp-min-members)")
            return self.noisy(flat, n, clip)

        return noisy

    def noisy(self, flat: torch.Tensor, n: int, clip: float) -> torch.Tensor:
        """A new tensor: flat with this member's share of a round of n members' noise, for updates clipped to clip."""
        if self.config.adaptive is None:
            return add_noise(flat, n, clip, self.config.noise, self.generator)
        sigma_b = self.count_noise(n)
        sigma_u = update_noise_multiplier(self.config.noise, sigma_b)
        out = torch.empty_like(flat)
        out[:-1] = add_noise(flat[:-1], n, clip, sigma_u, self.generator)
        out[-1:] = add_noise(flat[-1:], n, 1.0, sigma_b, self.generator)
        return out

    def count_noise(self, n: int) -> float:
        """sigma_b of a round of n members: the configured one, else Andrew et al.'s n/20, at least the noise."""
        if self.config.count_noise is not None:
            return self.config.count_noise
        # Below sigma, sigma_u would grow without bound (it is infinite at sigma/2); at sigma it is 1.155 sigma.
        return max(n / 20, self.config.noise)

    def absorb(self, value: Sequence[torch.Tensor], sampling_rate: float = 1.0) -> list[torch.Tensor]:
        """Take a committed round's value (in contribution's layout): count the round, move C; return the update."""
        self.accountant.record_round(sampling_rate if self.config.amplify else 1.0)
        if self.config.adaptive is None:
            return list(value)
        *update, indicator = value
        if indicator.numel() != 1:
            raise ValueError(f"a private round's last tensor is the 1-value indicator, got {indicator.numel()} values")
        fraction = float(indicator.reshape(-1)[0]) + 0.5
        self.unclipped_fraction = fraction
        # Geometric update (Andrew et al., Algorithm 1): shrink C while more than the target fraction fits under it.
        self.clip *= math.exp(-self.config.clip_lr * (fraction - self.config.adaptive))
        return update

    def epsilon(self) -> float:
        """The privacy spent so far: epsilon at the configured delta."""
        return self.accountant.epsilon(self.config.delta)

    def report(self) -> dict:
        """What a round reports: epsilon, delta, the rounds accounted, the clip norm (and the unclipped fraction)."""
        out = {"epsilon": self.epsilon(), "delta": self.config.delta, "dp_rounds": self.accountant.rounds,
               "clip": self.clip}
        if self.unclipped_fraction is not None:
            out["unclipped_fraction"] = self.unclipped_fraction
        return out

    def state_dict(self) -> dict:
        """The run's part, JSON-able and identical on every peer: C and the rounds accounted."""
        return {"clip": self.clip, "accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Adopt what state_dict returned (a joiner's or a restart's)."""
        self.checked_state(state)()

    def checked_state(self, state: dict) -> Callable[[], None]:
        """Check a state_dict and return what takes it (ConfigError first if malformed: nothing changes before)."""
        clip = meta_float(state, "clip", positive=True)
        take_rounds = self.accountant.checked_state(meta_dict(state, "accountant"))

        def take() -> None:
            take_rounds()
            self.clip = clip

        return take
