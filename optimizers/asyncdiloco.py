"""Asynchronous DiLoCo (buffered, as in FedBuff): no round waits for the slowest peer.

Each peer trains ``sync_every`` inner steps (or ``sync_seconds``), then is
*ready* and asks for a round. The coordinator's ``buffer:K[,t=T]`` policy
(``peer/coordinator/policies/buffered.py``) starts a round once K peers are ready, or T
seconds after the first one, with the ready peers only: a peer still training
is not waited for. It contributes to a later round, and meanwhile the run's
global parameters moved on without it.

Staleness. A peer's pseudo-gradient ``Δ = φ_base - θ`` is computed against
the global version ``φ_base`` its local training started from. If τ rounds
committed since (τ is its staleness), it first catches up: it applies those
rounds' committed results to its global state (the same outer steps every
member took, fetched from any member that keeps them; or the whole state,
whichever is fewer bytes, ``collectives/elasticsync.py``), without touching its
local model. It then contributes ``s(τ) · Δ`` in the next round, with s the
staleness function (``optimizers/staleness.py``: 1/sqrt(1+τ) by default).
The round's aggregate is the sample-weighted mean, so it is FedBuff's
(1/K) Σ s(τ_i) Δ_i generalised to weights: a stale contribution counts less,
and a fresh one (τ = 0, s = 1) exactly as in synchronous DiLoCo. With K = n
and no slow peer every contribution is fresh, and async DiLoCo *is* DiLoCo,
bit for bit. A contribution staler than ``max_staleness`` is dropped: the
peer restarts from the current global parameters (it re-bases) and trains on.

Share. A round of K of the n live peers is scaled by K/n (``scale_rounds``; the
buffer policy names the live roster as the round's candidates): FedBuff's
server learning rate, at the value that makes each contribution move the
global model as far as in synchronous DiLoCo, so the outer optimizer tuned
there keeps its meaning. Unscaled, K = 2 of 9 peers made every contribution
count 4.5 times as much, and DiLoCo's Nesterov outer step overshot (eval loss
2.9 where DiLoCo reaches 1.77; docs/async.md).

Nothing is applied twice or lost: each committed round is applied once by
every peer, by its members at commit and by everyone else at catch-up (the
round ids say which), and a contribution counts only in the round that
committed it. A round that aborts is retried on the survivors, as in DiLoCo.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from collectives.errors import ConfigError, QuorumMismatch
from collectives.membership.roundplan import RoundPlan
from collectives.statesync import StateSnapshot
from collectives.syncphases import CaughtUp
from optimizers.diloco import DiLoCo, DiLoCoConfig
from optimizers.peers import SyncPeer
from optimizers.staleness import StalenessConfig
from optimizers.syncrecord import RECENT_SYNCS, SyncRecord


@dataclass(frozen=True)
class AsyncDiLoCoConfig(DiLoCoConfig):
    """Asynchronous DiLoCo: rounds of the ready peers (``buffer:K``), stale contributions weighted by s(τ)."""

    TAG: ClassVar[str] = "async-diloco"

    buffer: int = field(default=2, metadata={"help": "K: a round starts once K peers are ready (the coordinator's "
                                                     "--quorum buffer:K); K = the number of peers is synchronous"})
    buffer_timeout_s: float | None = field(
        default=None, metadata={"help": "T: or T seconds after the first peer is ready, with the ready ones",
                                "flag": "buffer-timeout"})
    staleness: str = field(default="inverse-sqrt", metadata={
        "help": "weight of a contribution tau rounds stale: inverse-sqrt (1/sqrt(1+tau)), poly:a=A, hinge:a=A,b=B, "
                "or constant (no weighting)"})
    max_staleness: int = field(default=16, metadata={
        "help": "a contribution staler than this many rounds is dropped; the peer restarts from the run's state"})
    scale_rounds: bool = field(default=True, metadata={
        "help": "scale each round's mean by its members / the live peers (FedBuff's server rate K/n), so that a "
                "contribution moves the model as far as in synchronous DiLoCo; off: every round is a whole outer step"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.buffer, bool) or not isinstance(self.buffer, int) or self.buffer < 1:
            raise ConfigError(f"buffer (K) must be an integer >= 1, got {self.buffer!r}")
        if self.buffer_timeout_s is not None and not self.buffer_timeout_s > 0:
            raise ConfigError(f"buffer_timeout_s must be positive, got {self.buffer_timeout_s}")
        if isinstance(self.max_staleness, bool) or not isinstance(self.max_staleness, int) or self.max_staleness < 0:
            raise ConfigError(f"max_staleness must be an integer >= 0, got {self.max_staleness!r}")
        StalenessConfig.parse(self.staleness)  # ConfigError naming the forms

    def expected_quorum(self) -> str:
        """The coordinator's quorum policy these rounds need: ``buffer:K`` (and its timeout)."""
        return f"buffer:{self.buffer}" + ("" if self.buffer_timeout_s is None else f",t={self.buffer_timeout_s:g}")

    def quorum_problem(self, policy: str) -> str:
        """Any policy but this ``buffer:K[,t=T]`` ignores --buffer (and --buffer-timeout): the rounds would take
        whoever the other policy picks."""
        needed = self.expected_quorum()
        if policy != needed:
            return (
                f"async-diloco --buffer {self.buffer} needs the coordinator's --quorum {needed}, "
                f"and the run's is {policy!r}"
            )
        return ""


def _scale_to_share(plan: RoundPlan, flat: torch.Tensor) -> torch.Tensor:
    # The buffer policy names the live roster as candidates; a coordinator older than that names none (share 1).
    share = plan.share()
    # A new tensor either way (prepare's contract); K = n sends DiLoCo's contribution, bit for bit.
    return flat.clone() if share == 1.0 else flat * share


class AsyncDiLoCo(DiLoCo):
    """DiLoCo whose rounds take the ready peers; a late peer catches up, then contributes with weight s(τ)."""

    config: AsyncDiLoCoConfig
    # Its rounds take the ready peers: a late peer contributes with a staleness weight instead of skipping ahead.
    FOLLOWS_RUN_STEP = False

    def __init__(
        self,
        model: torch.nn.Module,
        inner: torch.optim.Optimizer,
        peer: SyncPeer,
        config: AsyncDiLoCoConfig | None = None,
        **overrides: Any,
    ) -> None:
        """``overrides`` replace fields of config (or of the defaults), e.g. ``buffer=3``."""
        super().__init__(model, inner, peer, replace(config or AsyncDiLoCoConfig(), **overrides))
        self.tag = AsyncDiLoCoConfig.TAG
        self.weighting = StalenessConfig.parse(self.config.staleness)
        # The global version the local model trained from: a contribution's staleness counts from it.
        self.base_round = self.state.round_id
        # The staleness of each recent contribution that counted in a committed round (for reports).
        self.staleness_history: deque[int] = deque(maxlen=RECENT_SYNCS)
        self._caught_up = False
        self._syncing = False
        self._tau = 0  # the staleness of the contribution in flight

    # -- the outer step -------------------------------------------------------------------

    def sync(self) -> bool:
        """Contribute this peer's pseudo-gradient, weighted by its staleness, once caught up; False if none counted."""
        started = time.monotonic()
        self._sync_starts()
        delta = self.contribution(self.round_indices(self.tag))  # against the base version, before any catch-up
        weight = self._weight()
        self._syncing = True
        try:
            return self._contribute(delta, weight, started)
        finally:
            self._syncing = False

    def _contribute(self, delta: list[torch.Tensor], weight: float, started: float) -> bool:
        """Send delta, scaled by its staleness, until a round counts it, it is too stale, or a round fails."""
        while True:
            tau = self.staleness()
            if tau > self.config.max_staleness:
                self._rebase(tau)
                return False
            scale = self.weighting.weight(tau)
            sent = delta if scale == 1.0 else [d * scale for d in delta]
            self._caught_up = False
            self._tau = tau
            committed = self._conclude(
                lambda sent=sent: self._send(self.tag, weight, wait=True, tensors=sent),
                self.tag,
                started=started,
                label=f"{self.tag} sync at step {self.inner_steps} ({tau} round(s) stale)",
                missed=lambda: self._reset_schedule(keep_samples=True),
            )
            if committed:
                self.staleness_history.append(tau)
                return True
            if not self._caught_up:
                return False
            # Caught up: the same contribution, now staler, goes to the next round.

    def prepare(self) -> Callable[[Any, torch.Tensor], torch.Tensor] | None:
        """With scale_rounds, each attempt's contribution times its members / the live peers (the plan's
        candidates): every member scales by the same share, so the round's mean is scaled by it."""
        if not self.config.scale_rounds:
            return None
        config = self.config

        def checked(plan: Any, flat: torch.Tensor) -> torch.Tensor:
            # The round's policy must be the one --buffer names: this member refuses the round otherwise (the
            # coordinator's --quorum all took everyone, and --buffer was ignored without a word).
            problem = config.quorum_problem(plan.policy) if getattr(plan, "policy", "") else ""
            if problem:
                raise QuorumMismatch(problem)
            return _scale_to_share(plan, flat)

        return checked

    def _round_facts(self) -> dict[str, Any]:
        return {"staleness": self._tau}

    def staleness(self) -> int:
        """Rounds committed since the global version this peer's local training started from."""
        return self.state.round_id - self.base_round

    def _catch_up(self, exc: CaughtUp) -> None:
        """Apply the rounds this peer missed to the global state only: the local model keeps its progress, and the
        pending contribution becomes that many rounds staler."""
        for missed in exc.rounds:
            self._apply_late(missed, self._outer_step_only)
        self._caught_up = True

    def _outer_step_only(self, tag: str, value: Sequence[torch.Tensor], round_id: int) -> None:
        """A committed round's outer step on the global state, the local model untouched."""
        self.state.outer_step(self.round_indices(tag), value, round_id, step=self.inner_steps)

    def load_snapshot(self, snapshot: StateSnapshot) -> None:
        """Adopt the run's state. During a sync (a catch-up by the whole state, when that is fewer bytes than the
        missed results) only the global side: the local model and its pending contribution are kept, as when
        catching up by results. Otherwise (joining, or a state from before the base version) the model restarts."""
        if not self._syncing or snapshot.round_id < self.base_round:
            super().load_snapshot(snapshot)
            return
        take_meta = self._taking_meta(snapshot.meta)
        self.state.restore(snapshot, into_model=False)
        self.inner_steps = max(self.inner_steps, self.state.step)
        take_meta()
        self._caught_up = True

    def _rebase(self, tau: int) -> None:
        """Drop a hopelessly stale contribution: the local model restarts from the run's current global parameters."""
        self.state.load_into_model(range(len(self.state.params)))
        self._forget_local_progress()
        reason = (f"contribution {tau} rounds stale, above max_staleness {self.config.max_staleness}: dropped; "
                  "restarted from the run's current parameters")
        self._record(SyncRecord(self.inner_steps, False, self.state.round_id, reason=reason, contributed=False))

    # -- where the local model starts from -------------------------------------------------

    def _round_applied(self, tag: str) -> None:
        super()._round_applied(tag)
        self.base_round = self.state.round_id  # the model was just loaded with the new globals

    def _forget_local_progress(self) -> None:
        super()._forget_local_progress()
        self.base_round = self.state.round_id  # a resync or a divergence restarts the model from the globals

    def _counters(self) -> dict:
        return {**super()._counters(), "base_round": self.base_round}

    def _load_counters(self, state: dict) -> None:
        super()._load_counters(state)
        self.base_round = int(state.get("base_round", self.state.round_id))
