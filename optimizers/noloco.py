"""NoLoCo: DiLoCo without the all-reduce; each outer step averages within a small random group.

NoLoCo (Kolehmainen, Blagoev, Donaghy, Ersoy and Nies 2025, "NoLoCo:
No-all-reduce Low Communication Training Method for Large Models", arXiv
2506.10911) keeps DiLoCo's two loops but gives every replica its own outer
weights and replaces the all-reduce of the pseudo-gradients with an average
inside a group of two (``optimizers/pairing.py`` draws the groups), plus a
term in the outer momentum that pulls each replica toward its group's mean so
that the replicas stay close with no all-reduce making them equal.

The outer-step arithmetic comes first, self-contained; the optimizer that runs
it on a model comes after it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from collectives.codecs import CodecConfig, needs_feedback
from collectives.errors import ConfigError, LoconetError, UsageError
from collectives.membership.roundplan import RoundPlan
from collectives.reduce.parts import flatten
from collectives.syncphases import Resynced
from optimizers.diloco import DiLoCo, DiLoCoConfig
from optimizers.outer_optim import OuterConfig
from optimizers.pairing import ODD_MODES, group_of, pair_groups
from optimizers.peers import SyncPeer
from optimizers.syncrecord import RECENT_SYNCS

__all__ = ["NoLoCo", "NoLoCoConfig", "NoLoCoStep", "count_sketch", "noloco_outer_step"]

# ---------------------------------------------------------------------------------------------------------------------
# The outer step: pure tensor arithmetic
# ---------------------------------------------------------------------------------------------------------------------
#
# Notation, for replica i in a group G of n_G replicas (i included):
#   φ_i  the replica's outer ("global") weights: its own copy, they differ between replicas;
#   θ_i  its local weights after H inner steps started from φ_i;
#   Δ_i = φ_i − θ_i  its pseudo-gradient (DiLoCo's sign: a descent direction is subtracted);
#   δ_i  its outer momentum, zero at the start;
#   Δ̄ = (1/n_G) Σ_{j∈G} Δ_j  and  φ̄ = (1/n_G) Σ_{j∈G} φ_j  the group's means (the one exchange of the step).
#
# The step (α outer momentum, β outer learning rate, γ the pull toward the group's mean):
#   δ_i ← α δ_i − β Δ̄ − γ (φ_i − φ̄)
#   φ_i ← φ_i + δ_i                  and the caller restarts the inner loop from θ_i ← φ_i.
#
# Checked against the authors' reference code (github.com/jkolehm/noloco, src/noloco/sparse_optimizer_c.py, which
# the repository's NoLoCo configs use, with groups of 2, outer_lr 0.7, outer_momentum 0.5 and 50 inner steps):
#   - it is this step with γ = β (one outer_lr for both terms), written with the opposite sign convention: it
#     averages θ_j − φ_j = −Δ_j and adds outer_lr times that mean, and it adds outer_lr (φ̄ − φ_i);
#   - it rounds differently: it forms the increment (α − 1) δ + lr·mean(θ − φ) + lr (φ̄ − φ_i) and adds it to δ;
#   - its groups come from a NumPy permutation seeded by the inner step count alone (no run seed), dealt out
#     round-robin (position k joins group k mod n_groups), and it requires a replica count divisible by the group
#     size (no trio or idle member; optimizers/pairing.py has both);
#   - its "Nesterov" is heavy-ball momentum: φ moves by δ itself, with no look-ahead term; its DiLoCo baseline
#     (pipeline_diloco_optimizer.py) uses the same δ ← α δ − β Δ̄, φ ← φ + δ form.
# The paper's own statement of the step was not in the stored copies searched (only its abstract and introduction
# were), so the formula above is confirmed against that code, not against the paper's equation.
#
# Special cases (each is a test in tests/test_noloco_math.py):
#   - a group of one (φ̄ = φ_i, Δ̄ = Δ_i): δ ← α δ − β Δ_i, φ ← φ + δ: heavy-ball momentum SGD on the outer weights;
#   - γ = 0 with equal φ across the group: DiLoCo's outer step with heavy-ball momentum on the group's mean Δ̄.
#     torch.optim.SGD(lr=β, momentum=α, dampening=0, nesterov=False) with gradient Δ̄ keeps b ← α b + Δ̄ and sets
#     φ ← φ − β b; by induction δ = −β b at every step (δ_t = α(−β b_{t−1}) − β Δ̄_t = −β b_t), so the two give the
#     same φ in exact arithmetic while β is constant. They part when β changes between steps (here the old β stays
#     baked into δ; SGD applies the new β to the whole buffer) and in rounding;
#   - α = 0, β = γ = 1: φ_i ← φ̄ − Δ̄ = (1/n_G) Σ θ_j, plain averaging of the group's local weights;
#   - the spread: the two replicas of a pair share Δ̄, so with equal momenta φ_1 − φ_2 becomes (1 − γ)(φ_1 − φ_2)
#     whatever their own Δ_i (the Δ̄ terms cancel; φ_1 − φ̄ = (φ_1 − φ_2)/2). Staying in one pair, the difference
#     d_t = φ_1 − φ_2 after t steps obeys d_{t+1} = (1 + α − γ) d_t − α d_{t−1} (t >= 1), which decays for
#     0 < γ < 2(1 + α) (Jury's test on z² − (1 + α − γ) z + α with 0 <= α < 1); γ = 0 leaves the spread as it is.


def noloco_outer_step(
    phi: torch.Tensor,
    momentum: torch.Tensor,
    mean_delta: torch.Tensor,
    mean_phi: torch.Tensor,
    alpha: float,
    beta: float,
    gamma: float,
) -> None:
    """NoLoCo's outer step in place: δ ← α δ − β Δ̄ − γ (φ − φ̄), then φ ← φ + δ (fp32 tensors of one shape).

    mean_phi may be phi itself (a group of one). The same inputs give the same bits on any CPU: see the order below.
    """
    tensors = {"phi": phi, "momentum": momentum, "mean_delta": mean_delta, "mean_phi": mean_phi}
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            raise ValueError(f"noloco_outer_step needs fp32 tensors, {name} is {t.dtype}")
        if t.shape != phi.shape:
            raise ValueError(f"noloco_outer_step needs tensors of one shape, {name} is {tuple(t.shape)} and phi is "
                             f"{tuple(phi.shape)}")
    if phi.numel() and phi.data_ptr() == momentum.data_ptr():  # empty tensors all report address 0
        raise ValueError("phi and momentum must be different tensors: both are updated in place")
    # One IEEE fp32 operation per element and line, each correctly rounded, so no CPU's vector width or fused
    # multiply-add changes the result (torch's add/sub with alpha= may fuse the product and the sum, so it is not
    # used). The coefficients are rounded to fp32 before they multiply (torch does so for a Python scalar). Only a
    # different flush-denormals setting (torch.set_flush_denormal) could change a subnormal result.
    # Both group terms are formed before phi or momentum is written, so mean_phi or mean_delta may alias them.
    with torch.no_grad():
        pull = phi - mean_phi  # 1. φ − φ̄
        pull.mul_(gamma)  # 2. γ (φ − φ̄)
        push = mean_delta * beta  # 3. β Δ̄
        momentum.mul_(alpha)  # 4. α δ
        momentum.sub_(push)  # 5. α δ − β Δ̄
        momentum.sub_(pull)  # 6. (α δ − β Δ̄) − γ (φ − φ̄)
        phi.add_(momentum)  # 7. φ + δ


@dataclass(frozen=True)
class NoLoCoStep:
    """The outer step's coefficients: α momentum in [0, 1), β learning rate > 0, γ pull >= 0 (None: γ = β).

    β = 0.7 and γ = β are the reference code's; for α it uses 0.5 in its NoLoCo configs (0.9 in its builder), 0.7 here.
    """

    alpha: float = 0.7
    beta: float = 0.7
    gamma: float | None = None

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if value is None and name == "gamma":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"NoLoCo {name} must be a finite number, got {value!r}")
        if not 0 <= self.alpha < 1:
            raise ConfigError(f"NoLoCo outer momentum alpha must be in [0, 1), got {self.alpha}")
        if not self.beta > 0:
            raise ConfigError(f"NoLoCo outer learning rate beta must be > 0, got {self.beta}")
        if self.gamma is not None and not self.gamma >= 0:
            raise ConfigError(f"NoLoCo pull gamma must be >= 0 (0: no pull toward the group's mean), got {self.gamma}")

    @property
    def pull(self) -> float:
        """γ as used: the given gamma, or beta when none was given."""
        return self.beta if self.gamma is None else self.gamma

    def apply(
        self, phi: torch.Tensor, momentum: torch.Tensor, mean_delta: torch.Tensor, mean_phi: torch.Tensor
    ) -> None:
        """``noloco_outer_step`` with these coefficients."""
        noloco_outer_step(phi, momentum, mean_delta, mean_phi, self.alpha, self.beta, self.pull)


# ---------------------------------------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------------------------------------

SPREAD_TAG = "noloco-spread"
# The state key under which each replica's momentum δ_i travels with its outer state (joiners, checkpoints).
MOMENTUM_KEY = "noloco_momentum"


@dataclass(frozen=True)
class NoLoCoConfig(DiLoCoConfig):
    """NoLoCo: DiLoCo's schedule; each outer step averages within a seeded pair, with the pull term.

    ``outer.lr`` is β and ``outer.momentum`` is α (the step is NoLoCo's own, heavy-ball as in the reference code:
    ``outer.name`` must be sgd and ``outer.nesterov`` is not used). The replicas exchange their outer weights as
    well as their pseudo-gradients, so the codec defaults to ``none``: a quantised φ̄ would add its rounding to
    every replica's weights at every step.
    """

    TAG: ClassVar[str] = "noloco"

    # α = 0, β = γ = 1 measured best at our scale (a few outer steps; docs/async.md): the outer step then
    # averages the pair's local models. Momentum (α > 0) pays over long runs, as in the paper's.
    outer: OuterConfig = field(default_factory=lambda: OuterConfig(lr=1.0, momentum=0.0, nesterov=False))
    codec: str = field(default="none", metadata={"help": DiLoCoConfig.__dataclass_fields__["codec"].metadata["help"]})
    pull: float | None = field(default=None, metadata={
        "help": "gamma: how strongly each replica is pulled toward its group's mean outer weights (default: the "
                "outer lr)"})
    odd: str = field(default="trio", metadata={
        "help": "with an odd number of peers in a round: one group of three (trio), or one peer alone (idle)",
        "choices": ODD_MODES})
    buffer: int | None = field(default=None, metadata={
        "help": "K: a round takes the peers ready once K are (--quorum buffer:K; no barrier); default: every live "
                "peer (--quorum all)", "flag": "noloco-buffer"})
    spread_sketch: int = field(default=4096, metadata={
        "help": "size of the sketch whose all-reduce measures the replicas' spread at each evaluation (0: none)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.outer.name != "sgd":
            raise ConfigError(f"NoLoCo takes its own outer step (outer lr beta, outer momentum alpha): use the sgd "
                              f"outer optimizer, not {self.outer.name!r}")
        if self.aggregator != "mean":
            raise ConfigError(f"NoLoCo averages within pairs: the aggregator must be mean, not {self.aggregator!r}")
        if needs_feedback(self.codec_config):
            # Its rounds average the replicas' weights too: a sparse codec would drop most of them from the mean.
            raise ConfigError(f"NoLoCo averages its replicas' weights as well as their pseudo-gradients: a sparse "
                              f"codec ({self.codec}) would drop most weights from the mean; use int8, int4 or fp16")
        if self.odd not in ODD_MODES:
            raise ConfigError(f"odd must be one of {', '.join(ODD_MODES)}, got {self.odd!r}")
        if self.buffer is not None and (isinstance(self.buffer, bool) or self.buffer < 2):
            raise ConfigError(f"noloco buffer (K) must be at least 2 (a pair), got {self.buffer!r}")
        if isinstance(self.spread_sketch, bool) or self.spread_sketch < 0:
            raise ConfigError(f"spread_sketch must be >= 0, got {self.spread_sketch!r}")
        self.step_rule  # noqa: B018 - validates alpha, beta and gamma

    @property
    def step_rule(self) -> NoLoCoStep:
        """The outer step's coefficients: α = outer momentum, β = outer lr, γ = pull."""
        return NoLoCoStep(alpha=self.outer.momentum, beta=self.outer.resolved_lr, gamma=self.pull)

    def expected_quorum(self) -> str | None:
        """``buffer:K`` when rounds take the ready peers; None (every live peer: ``all``) otherwise."""
        return None if self.buffer is None else f"buffer:{self.buffer}"


def count_sketch(x: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """A CountSketch of the flat fp32 tensor x: element j goes to bucket h(j) with sign s(j), both drawn from seed.

    Linear, and ``E |sketch(x)|^2 = |x|^2``: the norm of a difference of sketches estimates the norm of the
    difference (relative standard deviation about sqrt(2 / size)).
    """
    gen = torch.Generator().manual_seed(seed)
    buckets = torch.randint(0, size, (x.numel(),), generator=gen)
    signs = torch.randint(0, 2, (x.numel(),), generator=gen).to(torch.float32).mul_(2).sub_(1)
    return torch.zeros(size, dtype=torch.float32).index_add_(0, buckets, x.detach().float().cpu() * signs)


class NoLoCo(DiLoCo):
    """Replicas with their own outer weights, averaged each outer step within seeded pairs (no all-reduce)."""

    config: NoLoCoConfig
    # Each replica's state is its own: there is no one run's state to record a digest of, and a replica that
    # missed rounds skips them rather than catching up (so it keeps its own schedule too).
    REPLICAS_IDENTICAL = False
    FOLLOWS_RUN_STEP = False

    def __init__(
        self,
        model: torch.nn.Module,
        inner: torch.optim.Optimizer,
        peer: SyncPeer,
        config: NoLoCoConfig | None = None,
        **overrides: Any,
    ) -> None:
        """``overrides`` replace fields of config (or of the defaults), e.g. ``pull=0.5``."""
        super().__init__(model, inner, peer, replace(config or NoLoCoConfig(), **overrides))
        self.tag = NoLoCoConfig.TAG
        self.rule = self.config.step_rule
        for g in self.state.globals:
            self.state.outer.state[g].setdefault(MOMENTUM_KEY, torch.zeros_like(g))
        # The size of the group each recent committed outer step averaged in, and each recent measured spread.
        self.group_sizes: deque[int] = deque(maxlen=RECENT_SYNCS)
        self.spreads: deque[float] = deque(maxlen=RECENT_SYNCS)
        self._group_size = 0

    def _layout(self, tag: str) -> list[torch.Tensor]:
        return [*self.state.globals, *self.state.globals]

    # -- the outer step -------------------------------------------------------------------

    def _within(self, plan: RoundPlan) -> tuple[str, ...]:
        """This peer's group in the round: NoLoCo's seeded pairing of the round's members."""
        groups = pair_groups(plan.seed, plan.round_id, [pid for pid, _ in plan.members], odd=self.config.odd)
        group = group_of(self.peer.peer_id, groups)
        self._group_size = len(group)
        return group

    def sync(self) -> bool:
        """Average pseudo-gradient and outer weights with this round's partner, and take NoLoCo's outer step."""
        started = time.monotonic()
        self._sync_starts()
        everything = range(len(self.state.params))
        deltas = self.state.pseudo_gradients(everything)
        if self.tamper is not None:
            deltas = self.tamper(deltas)
        with self.state.lock:
            phis = [g.clone() for g in self.state.globals]
        committed = self._conclude(
            lambda: self._send(self.tag, 1.0, wait=True, tensors=[*deltas, *phis], within=self._within,
                               own_state=True),
            self.tag,
            started=started,
            label=f"{self.tag} sync at step {self.inner_steps}",
            missed=lambda: self._reset_schedule(keep_samples=True),
        )
        return committed

    def _round_facts(self) -> dict[str, Any]:
        return {"group_size": self._group_size}

    def _apply(self, tag: str, value: Sequence[torch.Tensor], round_id: int) -> None:
        """NoLoCo's step on every replica weight from the group's means (Δ̄, φ̄), then the model restarts from φ."""
        n = len(self.state.globals)
        with self.state.lock, torch.no_grad():
            for i, g in enumerate(self.state.globals):
                mean_delta = value[i].to(device="cpu", dtype=torch.float32).reshape(g.shape)
                mean_phi = value[n + i].to(device="cpu", dtype=torch.float32).reshape(g.shape)
                self.rule.apply(g, self.state.outer.state[g][MOMENTUM_KEY], mean_delta, mean_phi)
            self.state.outer_steps += 1
            self.state.round_id = round_id
            self.state.step = self.inner_steps
        self.group_sizes.append(self._group_size)
        self.state.load_into_model(range(n))
        self._round_applied(tag)

    # -- the replicas' spread -------------------------------------------------------------

    def measure_spread(self) -> float | None:
        """|φ_i - φ̄| over the peers of one extra round, estimated from an all-reduce of a CountSketch of φ_i
        (``spread_sketch`` floats each); None when not measured or the round did not commit."""
        size = self.config.spread_sketch
        if size == 0:
            return None
        with self.state.lock:
            sketch = count_sketch(flatten(self.state.globals), size)
        try:
            result = self.peer.sync([sketch], weight=1.0, tag=SPREAD_TAG, codec=CodecConfig("none"),
                                    aggregator=self.aggregator, own_state=True)
        except Resynced as exc:  # back in the run after being dropped: a replica of the run's, as a sync adopts
            self.load_snapshot(exc.snapshot)
            return None
        except UsageError:
            raise  # a closed transport or the caller's mistake: no measurement hides it (outer.py does the same)
        except LoconetError:
            return None
        with self.state.lock:
            # The round changed no state: the state held now is also the state as of this round. Labelled so,
            # a peer that joins right after it (and asks for the run's last round) can fetch it.
            self.state.round_id = max(self.state.round_id, result.round_id)
        spread = float((sketch - result.value[0].reshape(-1)).norm())
        self.spreads.append(spread)
        return spread
