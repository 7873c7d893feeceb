"""The training loop a peer runs: a task's batches through an outer optimizer, with evals and reports.

Shared by ``loconet peer`` (the daemon), the local harness and
``loconet bench diloco``. The loop knows nothing of processes or signals: it
stops when asked (``stop``), and reports through callbacks.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from collectives.allreduce import AllReduceConfig
from collectives.codecs import CodecConfig
from collectives.errors import ConfigError
from optimizers.diloco import DiLoCo
from optimizers.outer import OuterConfig
from optimizers.peers import SyncPeer
from optimizers.streaming import StreamingConfig, StreamingDiLoCo
from peer.tasks.base import Task, batch_stream

log = logging.getLogger(__name__)

ALGORITHMS = ("diloco", "streaming")


@dataclass(frozen=True)
class TrainConfig:
    """How a peer trains (filled by ``loconet peer`` and the benchmark)."""

    algorithm: str = "diloco"
    steps: int = 1000
    # Stop after this many seconds instead (None: run the steps).
    duration_s: float | None = None
    inner_lr: float = 3e-3
    weight_decay: float = 0.01
    sync_every: int = 50
    sync_seconds: float | None = None
    outer_lr: float = 0.7
    outer_momentum: float = 0.7
    nesterov: bool = True
    # Pseudo-gradient codec (None: int8 for DiLoCo, int4 for Streaming).
    codec: str | None = None
    fragments: int = 4
    overlap: int = 5
    alpha: float = 0.5
    split: str = "strided"
    # Evaluate every this many steps (0: only at the end).
    eval_every: int = 0
    # Deadline of one all-reduce attempt.
    round_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.steps < 1 and self.duration_s is None:
            raise ConfigError("train for at least one step (--steps) or a duration (--duration)")
        if self.inner_lr <= 0:
            raise ConfigError(f"inner lr must be positive, got {self.inner_lr}")

    def allreduce(self) -> AllReduceConfig:
        """The all-reduce settings of the pseudo-gradient rounds."""
        default = "int8" if self.algorithm == "diloco" else "int4"
        return AllReduceConfig(codec=CodecConfig.parse(self.codec or default), timeout_s=self.round_timeout_s)


def make_optimizer(model: torch.nn.Module, peer: SyncPeer, config: TrainConfig) -> DiLoCo | StreamingDiLoCo:
    """The outer optimizer of config.algorithm around an AdamW inner optimizer."""
    inner = torch.optim.AdamW(model.parameters(), lr=config.inner_lr, weight_decay=config.weight_decay)
    if config.algorithm == "diloco":
        return DiLoCo(
            model,
            inner,
            peer,
            sync_every=config.sync_every,
            outer_lr=config.outer_lr,
            outer_momentum=config.outer_momentum,
            nesterov=config.nesterov,
            sync_seconds=config.sync_seconds,
            allreduce=config.allreduce(),
        )
    streaming = StreamingConfig(
        sync_every=config.sync_every,
        fragments=config.fragments,
        overlap=config.overlap,
        alpha=config.alpha,
        split=config.split,
        outer=OuterConfig(config.outer_lr, config.outer_momentum, config.nesterov),
        allreduce=config.allreduce(),
    )
    return StreamingDiLoCo(model, inner, peer, streaming)


@dataclass
class Progress:
    """What the loop has done so far (read by displays and heartbeats)."""

    step: int = 0
    samples: int = 0
    loss: float = math.nan
    steps_per_s: float = math.nan
    eval_loss: float = math.nan
    rounds: int = 0
    evals: list[tuple[int, float]] = field(default_factory=list)


class TrainLoop:
    """Runs a task's batches through the optimizer until the step budget, the time budget, or stop."""

    def __init__(
        self,
        task: Task,
        model: torch.nn.Module,
        optimizer: DiLoCo | StreamingDiLoCo,
        config: TrainConfig,
        rank: int = 0,
        world: int = 1,
        start_step: int = 0,
    ) -> None:
        self.task = task
        self.model = model
        self.optimizer = optimizer
        self.config = config
        # A resumed or joining peer continues its data stream where it left off.
        self.batches = batch_stream(task, rank, world, start_step)
        self.progress = Progress(step=start_step)
        # Called after each step and each eval; the daemon reports and draws progress from them.
        self.on_step: Callable[[Progress], None] | None = None
        self.on_eval: Callable[[int, float], None] | None = None

    def evaluate(self) -> float:
        """Eval loss of the current local model."""
        loss = self.task.evaluate(self.model)
        self.progress.eval_loss = loss
        self.progress.evals.append((self.progress.step, loss))
        if self.on_eval is not None:
            self.on_eval(self.progress.step, loss)
        return loss

    def run(self, stop: threading.Event | None = None) -> Progress:
        """Train until done or stop is set; flush a round in flight; evaluate at the end."""
        cfg = self.config
        started = time.monotonic()
        window_start, window_steps = started, 0
        samples = self.task.samples_per_batch()
        self.model.train()
        while not (stop is not None and stop.is_set()):
            if cfg.duration_s is not None and time.monotonic() - started >= cfg.duration_s:
                break
            if cfg.duration_s is None and self.progress.step >= cfg.steps:
                break
            loss = self.task.loss(self.model, next(self.batches))
            loss.backward()
            self.optimizer.step(samples=samples)
            self.optimizer.zero_grad()
            p = self.progress
            p.step += 1
            p.samples += samples
            p.loss = loss.item()
            p.rounds = self.optimizer.committed_rounds
            window_steps += 1
            now = time.monotonic()
            if now - window_start >= 1.0:
                p.steps_per_s = window_steps / (now - window_start)
                window_start, window_steps = now, 0
            if self.on_step is not None:
                self.on_step(p)
            if cfg.eval_every and p.step % cfg.eval_every == 0:
                self.evaluate()
        if isinstance(self.optimizer, StreamingDiLoCo):
            self.optimizer.flush()
        self.evaluate()
        return self.progress


def global_digest(optimizer: DiLoCo | StreamingDiLoCo) -> str:
    """SHA-256 of the global parameters (equal on peers that applied the same rounds)."""
    import hashlib

    h = hashlib.sha256()
    with optimizer.state.lock:
        for g in optimizer.state.globals:
            h.update(g.numpy())  # contiguous fp32: hashed in place, no copy
    return h.hexdigest()
