"""DiLoCo: many local steps, then one averaged outer step.

Each peer trains its copy of the model with its own inner optimizer (AdamW
in the examples). Every ``sync_every`` inner steps (or every
``sync_seconds``), it computes the pseudo-gradient ``global - local``, the
run averages the pseudo-gradients in one committed round (weighted by the
samples each peer processed since its last sync, so slow and fast peers count
fairly), every peer applies the same outer step to the global parameters (by default
SGD with Nesterov momentum, lr 0.7; momentum 0.7, measured best at our scale,
where the paper uses 0.9; any registered outer optimizer, see
``optimizers/outer_optim.py``), and the local parameters restart from them.
The inner optimizer's state is kept.

With a sparse codec (``topk``, whose ``NEEDS_FEEDBACK`` is set) each peer
keeps an error-feedback residual, as in SparseLoCo: what a round did not
carry of its pseudo-gradient is added to the next one, so the entries the
codec drops are delayed, not lost (``OuterOptimizer._send``, for every
algorithm's rounds, one residual per round tag).

Used like a torch optimizer::

    opt = DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=3e-4), peer, sync_every=100)
    for x, y in loader:
        loss = loss_fn(model(x), y); loss.backward(); opt.step(samples=len(x), loss=loss); opt.zero_grad()

Failures: a round that aborts is retried by the peer on the survivors; if it
cannot complete (too few peers, coordinator gone), this peer keeps its inner
progress and tries again at its next sync. If it missed committed rounds, the
peer raises ``Resynced`` with the run's state, which DiLoCo loads (global
parameters, outer state; the local parameters restart from them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from collectives.errors import ConfigError
from collectives.syncphases import CaughtUp
from optimizers.outer import OuterOptimizer
from optimizers.peers import SyncPeer
from optimizers.syncconfig import SyncConfig

TAG = "diloco"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiLoCoConfig(SyncConfig):
    """DiLoCo: when to sync (every sync_every steps, or on a time budget) and the shared round settings."""

    # The algorithm's registered name: its rounds, states and joins carry it (a subclass registered under another
    # name sets its own, or a peer of plain DiLoCo would be taken for one of its own).
    TAG: ClassVar[str] = TAG
    # Peers of different speeds then meet at the same time, each weighted by its samples.
    sync_seconds: float | None = field(
        default=None, metadata={"help": "sync on a time budget instead: seconds of training between syncs"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sync_seconds is not None and self.sync_seconds <= 0:
            raise ConfigError(f"sync_seconds must be positive, got {self.sync_seconds}")


class DiLoCo(OuterOptimizer):
    """A torch.optim-like wrapper: inner optimizer steps, and an outer step every sync."""

    config: DiLoCoConfig
    FOLLOWS_RUN_STEP = True
    # A peer that caught up with the run joins the round the run's peers already wait in after one step (below).
    JOINS_WAITING_ROUND = True

    def __init__(
        self,
        model: torch.nn.Module,
        inner: torch.optim.Optimizer,
        peer: SyncPeer,
        config: DiLoCoConfig | None = None,
        **overrides: Any,
    ) -> None:
        """``overrides`` replace fields of config (or of the defaults), e.g. ``sync_every=100``."""
        config = replace(config or DiLoCoConfig(), **overrides)
        super().__init__(model, inner, peer, config)
        # What this peer's rounds are tagged: every member of a run must run the same algorithm.
        self.tag = type(config).TAG
        self.steps_since_sync = 0
        self.samples_since_sync = 0
        self.last_sync_time = time.monotonic()
        # The run's peers wait now in the round this peer syncs next: sync after the next step.
        self._join_now = False

    def _stepped(self, samples: int) -> None:
        """Count the step and its samples (this peer's weight in the next round); sync when due."""
        self.steps_since_sync += 1
        self.samples_since_sync += samples
        if self._join_now or self._sync_due():
            self.sync()

    def _sync_due(self) -> bool:
        if self.config.sync_seconds is not None:
            return time.monotonic() - self.last_sync_time >= self.config.sync_seconds
        return self.steps_since_sync >= self.config.sync_every

    def sync_if_due(self) -> bool:
        """Sync now if a sync is due (by steps or by time) and a step was taken since the last; whether it committed."""
        # Only a stop during a sync leaves a due count behind (a sync that ends, committed or not, resets it). Synced
        # after the next step instead, this peer would sync a step after the others for the rest of the run. Never
        # without a step since the last sync: a time budget may have run out while a fresh peer joined.
        return self.sync() if self.steps_since_sync > 0 and self._sync_due() else False

    def round_indices(self, tag: str) -> Sequence[int]:
        """Every round carries every parameter."""
        if tag != self.tag:
            raise ConfigError(
                f"this peer runs {self.tag!r} rounds, not {tag!r}: every peer must run the same algorithm"
            )
        return range(len(self.state.params))

    # -- the outer step -------------------------------------------------------------------

    def sync(self) -> bool:
        """Average the pseudo-gradients with the run and take the outer step; False if no round committed."""
        started = time.monotonic()
        self._sync_starts()
        weight = self._weight()
        return self._conclude(
            lambda: self._send(self.tag, weight, wait=True),
            self.tag,
            started=started,
            label=f"{self.tag} sync at step {self.inner_steps}",
            missed=lambda: self._reset_schedule(keep_samples=True),
        )

    def _weight(self) -> float:
        """This peer's weight in the round: the samples it trained on since its last sync."""
        return float(max(self.samples_since_sync, 1))

    def _round_applied(self, tag: str) -> None:
        # Before the record is published, so an on_commit checkpoint sees the schedule after the round.
        self._reset_schedule()

    def _forget_local_progress(self) -> None:
        self._reset_schedule()

    def _catch_up(self, exc: CaughtUp) -> None:
        super()._catch_up(exc)
        # The RESYNC answer names the round the run's peers wait in now. If it is this peer's next, they wait for
        # it: it joins after one step (its contribution that step, weighted by its samples), not when its own
        # schedule says, a whole interval later (sync_every without the run's step, or sync_seconds).
        self._join_now = self.JOINS_WAITING_ROUND and exc.pending_tag == self.tag
        if self._join_now:
            log.info("the run's peers wait in its next round for this peer: joining it after one step")

    def _follow_run_step(self, rounds_missed: int) -> None:
        super()._follow_run_step(rounds_missed)
        # On a time budget the run's members count their interval from its last commit: so does a peer that caught
        # up, not from the moment it did (it would sync when they have waited for it up to the join timeout).
        committed_at = getattr(self.peer, "run_committed_at", None)
        at = committed_at() if committed_at is not None and self.FOLLOWS_RUN_STEP else None
        if at is not None:  # only a time budget reads it
            self.last_sync_time = at

    def _line_up(self, members_step: int) -> None:
        """Count this peer's steps up to the round's furthest member's, at most one interval a round: members of a
        synchronous run ask at one step, and one that asked earlier skipped syncs while the coordinator was away. Its
        count stayed behind for good, and it reached --steps after the others and made a round without them (probe
        L: steps 1640/1660/1680 at round 32, and the last peer left a round early with other parameters)."""
        if (
            not self.FOLLOWS_RUN_STEP
            or getattr(self.config, "sync_seconds", None) is not None
            or members_step <= self.inner_steps
        ):
            return  # on a time budget members train at their own pace: their counts differ by design
        target = min(members_step, self.inner_steps + self.config.sync_every)
        log.info("the round's members asked at step %d, this peer at %d (syncs it skipped): counting from step %d",
                 members_step, self.inner_steps, target)
        self._skip_to(target, 0)

    def _skip_to(self, step: int, into_interval: int) -> None:
        super()._skip_to(step, into_interval)
        # The next sync comes when the run's does: after as many steps as its members have left.
        self.steps_since_sync = into_interval

    def _reset_schedule(self, keep_samples: bool = False) -> None:
        self._join_now = False
        self.steps_since_sync = 0
        self.last_sync_time = time.monotonic()
        if not keep_samples:
            self.samples_since_sync = 0

    # -- state ----------------------------------------------------------------------------

    def _meta(self) -> dict:
        return {"algorithm": self.tag}

    def _counters(self) -> dict:
        return {"steps_since_sync": self.steps_since_sync, "samples_since_sync": self.samples_since_sync}

    def _load_counters(self, state: dict) -> None:
        self.steps_since_sync = int(state.get("steps_since_sync", 0))
        self.samples_since_sync = int(state.get("samples_since_sync", 0))

