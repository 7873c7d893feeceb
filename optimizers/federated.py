"""Federated learning with no server: FedAvg and its family as registered algorithms.

Each round the sampled peers (clients) start from the global model, train
``sync_every`` local steps (S) or ``local_epochs`` epochs (E) of their own
data, and send their update ``global - local`` (the pseudo-gradient). The
round's aggregator combines the updates across the members on the butterfly
(``mean`` weighted by samples: FedAvg; or a robust one, ``median``,
``krum:f=1``...; ``collectives/reduce/aggregators.py``), and every peer applies the
same server step to the same global parameters, so every peer ends the round
with the same model. There is no server: the "server optimizer" runs on every
peer.

The algorithms differ in the server step and in the client objective:

====================  ===============================================================
``fedavg``            the global model becomes the weighted mean of the local models
                      (server SGD, lr 1, no momentum)
``fedavgm``           server momentum (Hsu et al. 2019): SGD with ``server_momentum``
``fedadam/fedyogi/``  Reddi et al., "Adaptive Federated Optimization": the server
``fedadagrad``        optimizer runs on the aggregate, Flower's names and defaults
                      (``optimizers/fedopt.py``)
``fedprox``           FedAvg plus the proximal term mu/2 ||w - w_global||^2 in the
                      client objective (Li et al. 2020)
``client-momentum``   FedAvg-M (Cheng et al., "Momentum Benefits Non-IID Federated
                      Learning Simply and Provably"): every local step moves
                      (1 - b) * its own step + b * lr * the last round's global
                      direction (with SGD: a step along (1 - b) grad + b direction)
====================  ===============================================================

Every one of them may add client-level differential privacy (``dp_clip``:
each update clipped to C, then noise N(0, (sigma C)^2 / n) added by each of
the n members, so the aggregate carries sigma C; ``optimizers/privacy.py``),
with the privacy spent tracked per round.

Client sampling is the coordinator's quorum policy (``--quorum sample:0.5``):
a peer the sample leaves out of a round either waits (``unsampled=wait``: its
local steps of that round are dropped and it restarts from the new global
model) or keeps training (``unsampled=train``: its own update is rebased onto
the new global model and sent, with its samples, in the next round it is
drawn for).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from collectives.errors import ConfigError
from collectives.membership.roundplan import RoundPlan
from collectives.membership.sampling import sample_size
from collectives.statesync import StateSnapshot
from collectives.syncphases import CaughtUp
from optimizers.diloco import DiLoCo
from optimizers.fedopt import FLOWER_DEFAULTS
from optimizers.outer_optim import OuterConfig
from optimizers.privacy import DifferentialPrivacy, DPConfig
from optimizers.statemeta import meta_dict
from optimizers.syncconfig import SyncConfig
from optimizers.syncrecord import SyncRecord

UNSAMPLED = ("wait", "train")
# Snapshot tensor names of client momentum's global direction: f"{DIRECTION_PREFIX}{param name}".
DIRECTION_PREFIX = "fed/direction/"


def _fraction(value: float, name: str, top_open: bool = True) -> None:
    ok = 0.0 <= value < 1.0 if top_open else 0.0 <= value <= 1.0
    if not ok:
        raise ConfigError(f"{name} must be in [0, 1{')' if top_open else ']'}, got {value!r}")


@dataclass(frozen=True)
class FedConfig(SyncConfig):
    """FedAvg: S local steps (or E epochs) per round, then the sample-weighted mean of the local models."""

    # The name a round is tagged with: every member of a run must run the same algorithm.
    TAG: ClassVar[str] = "fedavg"
    # The strategy's own options for its server optimizer's settings, which its errors name (FedAvg's are fixed).
    SERVER_FLAGS: ClassVar[dict[str, str]] = {}

    sync_every: int = field(default=10, metadata={"help": "local steps per round (S)"})
    local_epochs: float | None = field(
        default=None,
        metadata={"help": "train this many epochs of the peer's own data per round instead of S steps "
                  "(needs a task that knows its partition's size, e.g. digits)"},
    )
    proximal_mu: float = field(default=0.0, metadata={"help": "FedProx's mu: mu/2 ||w - w_global||^2 is added to "
                                                      "the client objective (0: off)"})
    client_momentum: float = field(
        default=0.0,
        metadata={"help": "weight b of the last round's global direction in every local step "
                  "(each local step: (1-b) x its own step + b x lr x direction; 0: off)"},
    )
    unsampled: str = field(
        default="wait",
        metadata={"help": "what a peer the round's sample leaves out does: wait (drop its local steps) or train "
                  "(keep them for the next round it is drawn for)", "choices": UNSAMPLED},
    )
    dp: DPConfig = field(default_factory=DPConfig)
    outer: OuterConfig = field(init=False, default_factory=OuterConfig, metadata={"cli": False})

    def least_members(self) -> int:
        """The aggregator's minimum, and with DP --dp-min-members: a private round of few carries too much noise."""
        return max(super().least_members(), self.dp.min_members if self.dp.enabled else 1)

    def round_settings(self) -> tuple[str, ...]:
        """The server optimizer's settings and the privacy's: a peer that clips or noises otherwise breaks the
        run's guarantee."""
        return (*super().round_settings(), *self.dp.settings())

    def server(self) -> OuterConfig:
        """The server optimizer: FedAvg's global model is the mean of the local ones (SGD, lr 1, no momentum)."""
        return OuterConfig(name="sgd", lr=1.0, momentum=0.0, nesterov=False)

    def __post_init__(self) -> None:
        # Built from the strategy's own fields (Flower's names), so it is never set apart from them.
        try:
            object.__setattr__(self, "outer", self.server())
        except ConfigError as exc:
            # In the strategy's words: --outer-lr and its kin are refused for it, so naming them misleads.
            said = str(exc)
            for outer_word, own in self.SERVER_FLAGS.items():
                said = said.replace(outer_word, own, 1) if said.startswith(outer_word) else said
            raise ConfigError(said) from None
        super().__post_init__()
        if self.local_epochs is not None and not self.local_epochs > 0:
            raise ConfigError(f"local_epochs must be positive, got {self.local_epochs!r}")
        if self.local_epochs is not None and self.sync_every != type(self).__dataclass_fields__["sync_every"].default:
            # Both say when a round is due: local_epochs won, and the given sync_every was ignored.
            raise ConfigError(f"give local_epochs ({self.local_epochs:g} epoch(s) a round) or sync_every "
                              f"({self.sync_every} steps a round), not both")
        if not self.proximal_mu >= 0:
            raise ConfigError(f"proximal_mu must be >= 0, got {self.proximal_mu!r}")
        _fraction(self.client_momentum, "client_momentum")
        if self.unsampled not in UNSAMPLED:
            raise ConfigError(f"unsampled must be one of {', '.join(UNSAMPLED)}, got {self.unsampled!r}")
        self.dp.check_round(self.aggregator_config)


def _flower(strategy: str, key: str) -> Any:
    return FLOWER_DEFAULTS[strategy][key]


@dataclass(frozen=True)
class FedAvgMConfig(FedConfig):
    """FedAvgM: FedAvg with server momentum (Hsu et al. 2019); Flower's names."""

    TAG: ClassVar[str] = "fedavgm"

    server_learning_rate: float = field(default=1.0, metadata={"help": "server learning rate"})
    # Flower's default momentum is 0, which is FedAvg; 0.9 is the paper's.
    server_momentum: float = field(default=0.9, metadata={"help": "server momentum in [0, 1)"})
    SERVER_FLAGS: ClassVar[dict[str, str]] = {
        "outer lr": "--server-learning-rate", "outer momentum": "--server-momentum"
    }

    def server(self) -> OuterConfig:
        """Heavy-ball momentum on the averaged update, rounded as Flower's FedAvgM (optimizers/fedopt.py)."""
        return OuterConfig(name="fedavgm", lr=self.server_learning_rate, momentum=self.server_momentum)


@dataclass(frozen=True)
class FedAdamConfig(FedConfig):
    """FedAdam (Reddi et al. 2021): Adam as the server optimizer; Flower's names and defaults."""

    TAG: ClassVar[str] = "fedadam"

    eta: float = field(default=_flower("fedadam", "eta"), metadata={"help": "server learning rate"})
    beta_1: float = field(default=_flower("fedadam", "beta_1"), metadata={"help": "first-moment decay"})
    beta_2: float = field(default=_flower("fedadam", "beta_2"), metadata={"help": "second-moment decay"})
    tau: float = field(default=_flower("fedadam", "tau"), metadata={"help": "degree of adaptivity (denominator guard)"})
    SERVER_FLAGS: ClassVar[dict[str, str]] = {
        "outer lr": "--eta", "outer eps": "--tau", "outer betas": "--beta-1/--beta-2"
    }

    def server(self) -> OuterConfig:
        """The registered server optimizer named by TAG, with these hyperparameters."""
        return OuterConfig(name=self.TAG, lr=self.eta, betas=(self.beta_1, self.beta_2), eps=self.tau)


@dataclass(frozen=True)
class FedYogiConfig(FedAdamConfig):
    """FedYogi (Reddi et al. 2021): Yogi's additive second moment; Flower's names and defaults."""

    TAG: ClassVar[str] = "fedyogi"

    eta: float = field(default=_flower("fedyogi", "eta"), metadata={"help": "server learning rate"})
    beta_1: float = field(default=_flower("fedyogi", "beta_1"), metadata={"help": "first-moment decay"})
    beta_2: float = field(default=_flower("fedyogi", "beta_2"), metadata={"help": "second-moment decay"})
    tau: float = field(default=_flower("fedyogi", "tau"), metadata={"help": "degree of adaptivity (denominator guard)"})


@dataclass(frozen=True)
class FedAdagradConfig(FedAdamConfig):
    """FedAdagrad (Reddi et al. 2021): the second moment is the sum of squares; Flower's names and defaults."""

    TAG: ClassVar[str] = "fedadagrad"

    eta: float = field(default=_flower("fedadagrad", "eta"), metadata={"help": "server learning rate"})
    beta_1: float = field(default=_flower("fedadagrad", "beta_1"), metadata={"help": "first-moment decay"})
    beta_2: float = field(default=_flower("fedadagrad", "beta_2"), metadata={"help": "unused by Adagrad (Flower's)"})
    tau: float = field(
        default=_flower("fedadagrad", "tau"), metadata={"help": "degree of adaptivity (denominator guard)"}
    )


@dataclass(frozen=True)
class FedProxConfig(FedConfig):
    """FedProx (Li et al. 2020): FedAvg whose clients add mu/2 ||w - w_global||^2 to their objective."""

    TAG: ClassVar[str] = "fedprox"

    proximal_mu: float = field(default=0.01, metadata={"help": "FedProx's mu (0 is FedAvg)"})


@dataclass(frozen=True)
class ClientMomentumConfig(FedConfig):
    """FedAvg-M (Cheng et al. 2023): each local step mixes in the last round's global direction."""

    TAG: ClassVar[str] = "client-momentum"

    client_momentum: float = field(
        default=0.5,
        metadata={"help": "weight b of the last round's global direction: each local step moves (1-b) x its own "
                  "step + b x lr x direction"},
    )


def sampling_rate(plan: RoundPlan) -> float:
    """The round's sampling rate for the privacy accountant: members / candidates for a seeded random ``sample``
    policy; 1 for any other (a roster sent as candidates, e.g. ``allbut`` or ``buffer``, was not drawn at random,
    and only a random draw amplifies privacy)."""
    return plan.share() if sample_size(plan.policy) is not None else 1.0


class FedAvg(DiLoCo):
    """A federated client-and-server in one: local steps, then a round, then the same server step on every peer.

    DiLoCo with other settings: its schedule, weights and counters, plus the client objective, privacy and
    sampling hooks below.
    """

    config: FedConfig
    # A client is caught up also when a sampled round was drawn without it; joining the next round at once would
    # only hold it in a round it may not be drawn for either. It keeps its own schedule.
    JOINS_WAITING_ROUND = False

    def __init__(
        self,
        model: torch.nn.Module,
        inner: torch.optim.Optimizer,
        peer: Any,
        config: FedConfig | None = None,
        **overrides: Any,
    ) -> None:
        """``overrides`` replace fields of config (or of FedAvg's defaults), e.g. ``sync_every=20``."""
        config = replace(config or FedConfig(), **overrides)
        super().__init__(model, inner, peer, config)
        self.tag = config.TAG
        # Examples of this peer's data: what local_epochs counts in (the training loop sets it from the task).
        self.epoch_samples: int | None = None
        # Client momentum: the last round's global direction per parameter (None until a round committed).
        self.direction: list[torch.Tensor] | None = None
        # Client-level differential privacy (None: off); its noise is this peer's own (see privacy.py).
        # A fixed --dp-seed is mixed with the peer's name, so peers of a benchmark draw different noise.
        stream = str(getattr(getattr(peer, "config", None), "name", "") or "")
        self.dp = DifferentialPrivacy(config.dp, stream=stream) if config.dp.enabled else None
        # Sampling rate of each round this peer took part in (members / candidates), for the accountant.
        self._rates: dict[int, float] = {}

    # -- when a round is due (DiLoCo's schedule, counted in steps or epochs) --------------

    def _sync_due(self) -> bool:
        if self.config.local_epochs is None:
            return self.steps_since_sync >= self.config.sync_every
        if not self.epoch_samples:
            raise ConfigError(
                "local_epochs needs the size of this peer's data: set optimizer.epoch_samples (the training loop "
                "does it for tasks that know it), or give sync_every (S local steps) instead"
            )
        return self.samples_since_sync >= self.config.local_epochs * self.epoch_samples

    def _weight(self) -> float:
        """The samples trained on since the last round; with DP every member weighs the same, or one member's
        weight would break the sensitivity bound."""
        return 1.0 if self.dp is not None else super()._weight()

    # -- the client objective ----------------------------------------------------------

    def _adjust_gradients(self) -> None:
        """FedProx's proximal gradient, added to the step's gradients."""
        mu = self.config.proximal_mu
        if mu == 0:
            return
        with torch.no_grad():
            for i, p in enumerate(self.state.params):
                if p.grad is not None:
                    p.grad.add_(p - self.state.globals[i].to(device=p.device, dtype=p.dtype), alpha=mu)

    def _inner_step(self, step: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
        """Client momentum: the step moves each parameter by (1 - b) x the inner optimizer's own move plus
        b x lr x the last round's direction. With plain SGD that is a step along (1 - b) grad + b direction; mixed
        into the gradient instead, an adaptive optimizer (AdamW) would rescale the direction with its gradient
        statistics and follow it round after round, away from the data."""
        b = self.config.client_momentum
        if b == 0 or self.direction is None:
            return step()
        with torch.no_grad():
            before = [p.detach().clone() for p in self.state.params]
        loss = step()
        lr = float(self.inner.param_groups[0]["lr"])
        with torch.no_grad():
            for p, start, d in zip(self.state.params, before, self.direction, strict=True):
                # p <- start + (1 - b) (p - start) - b lr d, written to move p in place.
                p.sub_(start).mul_(1.0 - b).add_(start).sub_(d.to(device=p.device, dtype=p.dtype), alpha=b * lr)
        return loss

    # -- the contribution ------------------------------------------------------------

    def contribution(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """The update, clipped when DP is on (and the adaptive-clipping indicator), then the base's tamper hook."""
        tensors = self.state.pseudo_gradients(indices)
        if self.dp is not None:
            tensors = self.dp.contribution(tensors)
        return tensors if self.tamper is None else self.tamper(tensors)

    def prepare(self) -> Callable[[Any, torch.Tensor], torch.Tensor] | None:
        """With DP, each attempt adds this member's share of the noise, N(0, (sigma C)^2 / n) for n members."""
        if self.dp is None:
            return None
        noisy = self.dp.prepare()

        def prepare(plan: Any, flat: torch.Tensor) -> torch.Tensor:
            self._rates[plan.round_id] = sampling_rate(plan)
            return noisy(plan, flat)

        return prepare

    def round_minimum(self) -> int:
        """With DP, --dp-min-members: the round's mean carries noise sigma C / n, too much in a round of few."""
        return 1 if self.dp is None else self.config.dp.min_members

    def _layout(self, tag: str) -> list[torch.Tensor]:
        extra = [torch.zeros(self.dp.extra_numel)] if self.dp is not None and self.dp.extra_numel else []
        return super()._layout(tag) + extra

    # -- after a round ---------------------------------------------------------------

    def _apply(self, tag: str, value: Sequence[torch.Tensor], round_id: int) -> None:
        if self.dp is not None:
            # Counts the round (own or caught up; an unknown sampling rate counts as 1) and moves an adaptive C.
            value = self.dp.absorb(value, self._rates.pop(round_id, 1.0))
        super()._apply(tag, value, round_id)
        if self.config.client_momentum:
            # The mean update of S SGD steps at lr eta is eta * S * (mean direction): the direction is that over eta S.
            scale = 1.0 / (float(self.inner.param_groups[0]["lr"]) * self.config.sync_every)
            self.direction = [v.detach().to(torch.float32).reshape(g.shape) * scale
                              for v, g in zip(value, self.state.globals)]

    def _record(self, record: SyncRecord) -> None:
        if self.dp is not None and record.committed:
            record.epsilon = self.dp.epsilon()
            status = getattr(self.peer, "status", None)
            if status is not None and hasattr(status, "epsilon"):
                status.epsilon = record.epsilon
        super()._record(record)

    def _catch_up(self, exc: CaughtUp) -> None:
        """Rounds this peer was not sampled for: wait drops its local steps; train keeps them, rebased."""
        if self.config.unsampled == "wait":
            super()._catch_up(exc)
            return
        with torch.no_grad():
            local = [p.detach().to(device="cpu", dtype=torch.float32).clone() for p in self.state.params]
            start = [g.clone() for g in self.state.globals]
        samples = self.samples_since_sync
        super()._catch_up(exc)  # applies the rounds and restarts the model from the new global
        with torch.no_grad():
            for p, lo, s, g in zip(self.state.params, local, start, self.state.globals):
                # This peer's own update (local - start), now on top of the new global model.
                p.copy_((g + (lo - s)).to(device=p.device, dtype=p.dtype))
        self.samples_since_sync = samples  # its weight when it is next drawn; the step count starts over

    # -- state -----------------------------------------------------------------------

    def _meta(self) -> dict:
        meta = super()._meta()
        if self.dp is not None:
            meta["privacy"] = self.dp.state_dict()
        return meta

    def _checked_meta(self, meta: dict) -> Callable[[], None]:
        if self.dp is not None and "privacy" in meta:
            return self.dp.checked_state(meta_dict(meta, "privacy"))
        return lambda: None

    def snapshot(self) -> StateSnapshot:
        """The run's state, plus client momentum's direction when there is one, both of the same round (chaos seed
        1338's joiner most likely got round 21's parameters with round 20's direction: the replicas diverged)."""
        with self._applying:
            snap = super().snapshot()
            if self.direction is not None:
                for name, d in zip(self.state.names, self.direction):
                    snap.tensors[f"{DIRECTION_PREFIX}{name}"] = d.clone()
            return snap

    def _adopt_direction(self, tensors: dict[str, torch.Tensor]) -> None:
        keys = [f"{DIRECTION_PREFIX}{n}" for n in self.state.names]
        if all(k in tensors for k in keys):
            self.direction = [tensors[k].to(torch.float32).clone() for k in keys]

    def load_snapshot(self, snapshot: StateSnapshot) -> None:
        """Adopt the run's state (and its direction)."""
        with self._applying:
            super().load_snapshot(snapshot)
            self._adopt_direction(snapshot.tensors)

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned (and the direction)."""
        with self._applying:
            super().load_state_dict(state)
            self._adopt_direction(state["global"])


# (registered name, config, one line for --help); every one is the FedAvg class with another config.
FEDERATED = (
    (FedConfig, "FedAvg: S local steps per round, then the sample-weighted mean of the local models"),
    (FedAvgMConfig, "FedAvgM: FedAvg with server momentum"),
    (FedAdamConfig, "FedAdam: Adam as the server optimizer (Reddi et al.; Flower's defaults)"),
    (FedYogiConfig, "FedYogi: Yogi as the server optimizer (Reddi et al.; Flower's defaults)"),
    (FedAdagradConfig, "FedAdagrad: Adagrad as the server optimizer (Reddi et al.; Flower's defaults)"),
    (FedProxConfig, "FedProx: FedAvg with a proximal term in the client objective"),
    (ClientMomentumConfig, "FedAvg-M: client-side momentum for non-IID data (Cheng et al.)"),
)
