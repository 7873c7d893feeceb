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
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from collectives.errors import ConfigError, NonFiniteError
from collectives.syncphases import CaughtUp
from optimizers.outer import OuterOptimizer
from optimizers.peers import SyncPeer
from optimizers.statemeta import meta_int
from optimizers.syncconfig import SyncConfig

SPLITS = ("strided", "balanced")
TAG_PREFIX = "fragment-"


@dataclass(frozen=True)
class StreamingConfig(SyncConfig):
    """Fragments, schedule, overlap and mixing of Streaming DiLoCo (and the shared round settings)."""

    TAG: ClassVar[str] = "streaming"  # the registered name, which its states and joins carry
    codec: str = field(default="int4", metadata={"help": "codec of the pseudo-gradient rounds (see SyncConfig)"})
    fragments: int = field(default=4, metadata={"help": "number of fragments the parameters are split into (P)"})
    overlap: int = field(default=5, metadata={"help": "inner steps a fragment's round overlaps with training (tau)"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the local side when mixing in a fragment's result"})
    split: str = field(
        default="strided", metadata={"help": "how layers go to fragments", "flag": "fragment-split", "choices": SPLITS}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fragments < 1:
            raise ConfigError(f"fragments must be at least 1, got {self.fragments}")
        if self.sync_every < self.fragments:
            raise ConfigError(
                f"sync_every ({self.sync_every}) must be at least fragments ({self.fragments}): "
                "each fragment syncs once per sync_every steps"
            )
        if self.overlap < 0:
            raise ConfigError(f"overlap must be 0 or more, got {self.overlap}")
        gap = self.sync_every // self.fragments  # inner steps from one fragment's round to the next one's
        if self.overlap >= gap:
            # Say both ways out: most users meet this by lowering sync_every and keeping the other defaults.
            raise ConfigError(
                f"overlap ({self.overlap}) must be below sync_every/fragments ({gap}): "
                "a fragment's round must end before the next fragment's starts; set overlap to at most "
                f"{max(0, gap - 1)} or sync_every to at least {(self.overlap + 1) * self.fragments}"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")

    def round_settings(self) -> tuple[str, ...]:
        """With the outer step's, how the parameters are cut into fragments: peers that cut them otherwise hold
        other parameters under one fragment's tag."""
        return (*super().round_settings(), f"fragments {self.fragments}", f"fragment split {self.split}")


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

    config: StreamingConfig
    FOLLOWS_RUN_STEP = True

    def __init__(
        self,
        model: torch.nn.Module,
        inner: torch.optim.Optimizer,
        peer: SyncPeer,
        config: StreamingConfig | None = None,
        **overrides: Any,
    ) -> None:
        """``overrides`` replace fields of config (or of the defaults), e.g. ``fragments=2``."""
        config = replace(config or StreamingConfig(), **overrides)
        super().__init__(model, inner, peer, config)
        self.fragments = split_fragments(
            self.state.names, [p.numel() for p in self.state.params], config.fragments, config.split
        )
        self.cursor = 0
        self.samples = [0] * config.fragments
        self.inflight: _InFlight | None = None
        # The run waits now in the round of the fragment this peer syncs next: start it at once.
        self._join_now = False

    def _stepped(self, samples: int) -> None:
        """Count the step's samples (every fragment's weight); finish and start fragment rounds on schedule."""
        for f in range(self.config.fragments):
            self.samples[f] += samples
        if self.inflight is not None and self.inner_steps >= self.inflight.apply_at:
            self._finish()
        if self._round_due() or self._join_now:
            self._join_now = False
            if self.inflight is not None:  # only with a config that lets rounds overlap; finish it first
                self._finish()
            self._start()
            if self.config.overlap == 0 and self.inflight is not None:
                self._finish()

    def _round_due(self) -> bool:
        # A fragment round starts each time step * P // H grows: every H/P steps on average.
        t, p, h = self.inner_steps, self.config.fragments, self.config.sync_every
        return (t * p) // h > ((t - 1) * p) // h

    def round_indices(self, tag: str) -> Sequence[int]:
        """The parameters of fragment N, for the tag ``fragment-N``."""
        number = tag.removeprefix(TAG_PREFIX)
        if not tag.startswith(TAG_PREFIX) or not number.isdigit() or int(number) >= len(self.fragments):
            raise ConfigError(
                f"Streaming DiLoCo rounds are tagged {TAG_PREFIX}0..{len(self.fragments) - 1}, not {tag!r}: "
                "every peer must run the same algorithm with the same fragments"
            )
        return self.fragments[int(number)]

    def mix_alpha(self) -> float:
        """The local side's weight when a fragment's result is mixed in."""
        return self.config.alpha

    def _start(self) -> None:
        f = self.cursor
        self._sync_starts()
        try:
            future = self._send(f"{TAG_PREFIX}{f}", float(max(self.samples[f], 1)), wait=False)
        except NonFiniteError as exc:  # refused before any round started
            self._diverged(exc)
            return
        self.inflight = _InFlight(f, future, self.inner_steps + self.config.overlap, time.monotonic())

    def _catch_up(self, exc: CaughtUp) -> None:
        super()._catch_up(exc)
        # This peer's round was for an earlier fragment than the run's (its state was older than its step: a joiner
        # whose fetch outlasted rounds): the run's peers wait now in the round of the fragment it syncs next. It
        # joins at once; at its next due step it would have kept them waiting, and the run lost a fragment round.
        self._join_now = exc.pending_tag == f"{TAG_PREFIX}{self.cursor}"

    def _forget_local_progress(self) -> None:
        self.samples = [0] * self.config.fragments

    def _round_applied(self, tag: str) -> None:
        f = int(tag.removeprefix(TAG_PREFIX))
        self.samples[f] = 0
        self.cursor = (f + 1) % self.config.fragments

    def _finish(self) -> None:
        """Wait for the fragment in flight, then apply its outer step and mix it in."""
        flight, self.inflight = self.inflight, None
        assert flight is not None
        self._conclude(
            flight.future.result,
            f"{TAG_PREFIX}{flight.fragment}",
            started=flight.started,
            label=f"fragment {flight.fragment} round",
        )

    def flush(self) -> None:
        """Finish a round still in flight (before evaluating, checkpointing or stopping)."""
        if self.inflight is not None:
            self._finish()

    # -- state ----------------------------------------------------------------------------

    def _meta(self) -> dict:
        return {"algorithm": type(self.config).TAG, "cursor": self.cursor}

    def _checked_meta(self, meta: dict) -> Callable[[], None]:
        cursor = meta_int(meta, "cursor", 0) % self.config.fragments

        def take() -> None:
            self.cursor = cursor

        return take

    def _counters(self) -> dict:
        return {"samples": list(self.samples)}

    def _load_counters(self, state: dict) -> None:
        self.samples = [int(s) for s in state.get("samples", [0] * self.config.fragments)]
