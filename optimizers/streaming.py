"""Streaming DiLoCo: DiLoCo on fragments of the model, staggered and overlapped with training.

The parameters are split into ``fragments`` (P) groups: by default strided by
layer (fragment p holds layers p, p+P, p+2P, ... in model order, the
embeddings and head counting as layers), or size-balanced. Every
``sync_every / P`` inner steps the peer starts the round of the next fragment
(so each fragment syncs once every ``sync_every`` steps, the fragments
staggered). The round travels in the background while training goes on for
``overlap`` (tau) more steps; then the fragment's outer step is applied and
mixed into the local parameters:

    local = alpha * local + (1 - alpha) * global

(When P does not divide ``sync_every``, rounds start at the steps where
``step * P // sync_every`` grows, so each fragment still syncs once per
``sync_every`` steps on average.) ``alpha`` weights the *local* side (alpha = 0: the local fragment restarts
from the new global one, as in DiLoCo). Pseudo-gradients use a 4-bit codec by
default and are summed in fp32 by the all-reduce.

Which fragment a round carries is the run's shared ``cursor`` (advanced by
every committed round, carried in the state a joiner fetches), so every peer
syncs the same fragment in the same round; the coordinator refuses a quorum
whose members disagree. With P = 1, tau = 0 and alpha = 0 this is DiLoCo.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from collectives.allreduce import AllReduceConfig
from collectives.codecs import CodecConfig
from collectives.errors import ConfigError, NonFiniteError
from collectives.statesync import StateSnapshot
from optimizers.outer import OuterConfig, OuterOptimizer
from optimizers.peers import SyncPeer

SPLITS = ("strided", "balanced")


@dataclass(frozen=True)
class StreamingConfig:
    """Fragments, schedule, overlap and mixing of Streaming DiLoCo."""

    sync_every: int = 100
    fragments: int = 4
    overlap: int = 5
    alpha: float = 0.5
    split: str = "strided"
    outer: OuterConfig = OuterConfig()
    allreduce: AllReduceConfig = field(default_factory=lambda: AllReduceConfig(codec=CodecConfig("int4")))

    def __post_init__(self) -> None:
        if self.fragments < 1:
            raise ConfigError(f"fragments must be at least 1, got {self.fragments}")
        if self.sync_every < self.fragments:
            raise ConfigError(
                f"sync_every ({self.sync_every}) must be at least fragments ({self.fragments}): "
                "each fragment syncs once per sync_every steps"
            )
        if not 0 <= self.overlap < self.sync_every // self.fragments:
            raise ConfigError(
                f"overlap ({self.overlap}) must be below sync_every/fragments ({self.sync_every // self.fragments}): "
                "a fragment's round must end before the next fragment's starts"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")


def layer_key(name: str) -> str:
    """The layer a parameter belongs to: 'blocks.3' for 'blocks.3.attn.weight', else its first component."""
    parts = name.split(".")
    if len(parts) > 2 and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def split_fragments(names: Sequence[str], sizes: Sequence[int], count: int, mode: str = "strided") -> list[list[int]]:
    """Parameter indices of each fragment (every parameter in exactly one; none empty)."""
    layers: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        layers.setdefault(layer_key(name), []).append(i)
    groups = list(layers.values())
    if count > len(groups):
        raise ConfigError(f"{count} fragments but the model has only {len(groups)} layers; use fewer fragments")
    fragments: list[list[int]] = [[] for _ in range(count)]
    if mode == "strided":
        for k, group in enumerate(groups):
            fragments[k % count].extend(group)
    else:
        loads = [0] * count
        by_size = sorted(range(len(groups)), key=lambda k: (-sum(sizes[i] for i in groups[k]), k))
        for k in by_size:
            target = min(range(count), key=lambda f: (loads[f], f))
            fragments[target].extend(groups[k])
            loads[target] += sum(sizes[i] for i in groups[k])
    return [sorted(f) for f in fragments]


@dataclass
class _InFlight:
    fragment: int
    future: concurrent.futures.Future
    apply_at: int
    started: float


class StreamingDiLoCo(OuterOptimizer):
    """A torch.optim-like wrapper running Streaming DiLoCo over a peer."""

    def __init__(
        self, model: torch.nn.Module, inner: torch.optim.Optimizer, peer: SyncPeer, config: StreamingConfig | None = None
    ) -> None:
        self.config = config or StreamingConfig()
        super().__init__(model, inner, peer, self.config.outer)
        self.fragments = split_fragments(
            self.state.names, [p.numel() for p in self.state.params], self.config.fragments, self.config.split
        )
        self.cursor = 0
        self.samples = [0] * self.config.fragments
        self.inflight: _InFlight | None = None

    def step(self, closure: Callable[[], torch.Tensor] | None = None, samples: int = 1) -> torch.Tensor | None:
        """One inner step; starts and finishes fragment rounds on schedule."""
        loss = self.inner.step(closure)
        self.inner_steps += 1
        for f in range(self.config.fragments):
            self.samples[f] += samples
        if self.inflight is not None and self.inner_steps >= self.inflight.apply_at:
            self._finish()
        if self._round_due():
            if self.inflight is not None:  # only with a config that lets rounds overlap; finish it first
                self._finish()
            self._start()
            if self.config.overlap == 0 and self.inflight is not None:
                self._finish()
        return loss

    def _round_due(self) -> bool:
        # A fragment round starts each time step * P // H grows: every H/P steps on average.
        t, p, h = self.inner_steps, self.config.fragments, self.config.sync_every
        return (t * p) // h > ((t - 1) * p) // h

    def _start(self) -> None:
        f = self.cursor
        indices = self.fragments[f]
        self._sync_starts()
        try:
            future = self.peer.sync_async(
                self.state.pseudo_gradients(indices),
                weight=float(max(self.samples[f], 1)),
                tag=f"fragment-{f}",
                config=self.config.allreduce,
            )
        except NonFiniteError as exc:  # refused before any round started
            self._diverged(exc)
            return
        self.inflight = _InFlight(f, future, self.inner_steps + self.config.overlap, time.monotonic())

    def _forget_local_progress(self) -> None:
        self.samples = [0] * self.config.fragments

    def _finish(self) -> None:
        """Wait for the fragment in flight, then apply its outer step and mix it in."""
        flight, self.inflight = self.inflight, None
        assert flight is not None
        f = flight.fragment

        def committed() -> None:
            self.samples[f] = 0
            self.cursor = (f + 1) % self.config.fragments

        self._conclude(
            flight.future.result,
            self.fragments[f],
            alpha=self.config.alpha,
            started=flight.started,
            label=f"fragment {f} round",
            committed=committed,
        )

    def flush(self) -> None:
        """Finish a round still in flight (before evaluating, checkpointing or stopping)."""
        if self.inflight is not None:
            self._finish()

    # -- state ----------------------------------------------------------------------------

    def _meta(self) -> dict:
        return {"algorithm": "streaming", "cursor": self.cursor}

    def load_snapshot(self, snapshot: StateSnapshot) -> None:
        """Adopt the run's state (all fragments, the cursor, the step count that drives the schedule)."""
        meta = self._adopt(snapshot)
        self.cursor = int(meta.get("cursor", 0)) % self.config.fragments

    def state_dict(self) -> dict:
        """Everything a restart needs (call flush() first so no round is in flight)."""
        return self._state_dict(samples=list(self.samples))

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned; the model's parameters are the caller's to restore."""
        meta = self._load_state_dict(state)
        self.cursor = int(meta.get("cursor", 0)) % self.config.fragments
        self.samples = [int(s) for s in state["samples"]]
