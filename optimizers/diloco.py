"""DiLoCo: many local steps, then one averaged outer step.

Each peer trains its copy of the model with its own inner optimizer (AdamW
in the examples). Every ``sync_every`` inner steps (or every
``sync_seconds``), it computes the pseudo-gradient ``global - local``, the
run averages the pseudo-gradients in one committed round (weighted by the
samples each peer processed since its last sync, so slow and fast peers count
fairly), every peer applies the same outer step (SGD with Nesterov momentum,
lr 0.7; momentum 0.7 by default, measured best at our scale, where the paper
uses 0.9) to the global parameters, and the local
parameters restart from them. The inner optimizer's state is kept.

Used like a torch optimizer::

    opt = DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=3e-4), peer, sync_every=500)
    for batch in loader:
        loss = task.loss(model, batch); loss.backward(); opt.step(); opt.zero_grad()

Failures: a round that aborts is retried by the peer on the survivors; if it
cannot complete (too few peers, coordinator gone), this peer keeps its inner
progress and tries again at its next sync. If it missed committed rounds, the
peer raises ``Resynced`` with the run's state, which DiLoCo loads (global
parameters, outer state; the local parameters restart from them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from collectives.allreduce import AllReduceConfig
from collectives.errors import ConfigError
from collectives.statesync import StateSnapshot
from optimizers.outer import OuterConfig, OuterOptimizer
from optimizers.peers import SyncPeer


@dataclass(frozen=True)
class DiLoCoConfig:
    """When to sync and how to take the outer step."""

    sync_every: int = 500
    # Sync on a time budget instead (seconds of training between syncs); peers of
    # different speeds then meet at the same time, each weighted by its samples.
    sync_seconds: float | None = None
    outer: OuterConfig = OuterConfig()
    # Codec etc. of the pseudo-gradient rounds (None: the peer's own settings).
    allreduce: AllReduceConfig | None = None

    def __post_init__(self) -> None:
        if self.sync_every < 1:
            raise ConfigError(f"sync_every must be at least 1, got {self.sync_every}")
        if self.sync_seconds is not None and self.sync_seconds <= 0:
            raise ConfigError(f"sync_seconds must be positive, got {self.sync_seconds}")


class DiLoCo(OuterOptimizer):
    """A torch.optim-like wrapper: inner optimizer steps, and an outer step every sync."""

    def __init__(
        self,
        model: torch.nn.Module,
        inner: torch.optim.Optimizer,
        peer: SyncPeer,
        sync_every: int = 500,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.7,
        nesterov: bool = True,
        sync_seconds: float | None = None,
        allreduce: AllReduceConfig | None = None,
    ) -> None:
        self.config = DiLoCoConfig(
            sync_every=sync_every,
            sync_seconds=sync_seconds,
            outer=OuterConfig(lr=outer_lr, momentum=outer_momentum, nesterov=nesterov),
            allreduce=allreduce,
        )
        super().__init__(model, inner, peer, self.config.outer)
        self.steps_since_sync = 0
        self.samples_since_sync = 0
        self.last_sync_time = time.monotonic()

    def step(self, closure: Callable[[], torch.Tensor] | None = None, samples: int = 1) -> torch.Tensor | None:
        """One inner step; also an outer step when a sync is due. ``samples``: how many this step trained on."""
        loss = self.inner.step(closure)
        self.inner_steps += 1
        self.steps_since_sync += 1
        self.samples_since_sync += samples
        if self._sync_due():
            self.sync()
        return loss

    def _sync_due(self) -> bool:
        if self.config.sync_seconds is not None:
            return time.monotonic() - self.last_sync_time >= self.config.sync_seconds
        return self.steps_since_sync >= self.config.sync_every

    # -- the outer step -------------------------------------------------------------------

    def sync(self) -> bool:
        """Average the pseudo-gradients with the run and take the outer step; False if no round committed."""
        indices = range(len(self.state.params))
        started = time.monotonic()
        self._sync_starts()
        return self._conclude(
            lambda: self.peer.sync(
                self.state.pseudo_gradients(indices),
                weight=float(max(self.samples_since_sync, 1)),
                tag="diloco",
                config=self.config.allreduce,
            ),
            indices,
            alpha=0.0,
            started=started,
            label=f"sync at step {self.inner_steps}",
            committed=self._reset_schedule,
            missed=lambda: self._reset_schedule(keep_samples=True),
        )

    def _forget_local_progress(self) -> None:
        self._reset_schedule()

    def _reset_schedule(self, keep_samples: bool = False) -> None:
        self.steps_since_sync = 0
        self.last_sync_time = time.monotonic()
        if not keep_samples:
            self.samples_since_sync = 0

    # -- state ----------------------------------------------------------------------------

    def _meta(self) -> dict:
        return {"algorithm": "diloco"}

    def load_snapshot(self, snapshot: StateSnapshot) -> None:
        """Adopt the run's state: global parameters, outer state, step count; the local parameters restart from them."""
        self._adopt(snapshot)
        self._reset_schedule()

    def state_dict(self) -> dict:
        """Everything a restart needs: global state, inner optimizer, counters."""
        return self._state_dict(
            steps_since_sync=self.steps_since_sync,
            samples_since_sync=self.samples_since_sync,
            config=asdict(self.config),
        )

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned; the model's (local) parameters are the caller's to restore."""
        self._load_state_dict(state)
        self.steps_since_sync = int(state["steps_since_sync"])
        self.samples_since_sync = int(state["samples_since_sync"])
