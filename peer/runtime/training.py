"""The training loop a peer runs: a task's batches through an outer optimizer, with evals and reports.

Shared by ``loconet peer`` (the daemon), the local harness and
``loconet bench diloco``. The loop knows nothing of processes or signals: it
stops when asked (``stop``), and reports through callbacks. Each batch goes to
the model's device (``TrainConfig.device``, where its builder put the model)
before the task's loss sees it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from collectives.errors import ConfigError
from optimizers.coded import CodedSGD
from optimizers.outer import OuterOptimizer
from optimizers.peers import SyncPeer
from optimizers.registry import get_algorithm
from optimizers.steprate import StepRate
from peer.device import check_device_spec, model_device, move_batch
from peer.tasks.base import Task, batch_stream

log = logging.getLogger(__name__)


INNER_OPTIMIZERS = ("adamw", "sgd")
# Each inner optimizer's learning rate when --inner-lr is not given: plain SGD needs a far larger one than AdamW
# (digits with fedavg: accuracy 0.33 at AdamW's 0.003, 0.93 at 0.1; BENCHMARKS.md).
INNER_LR = {"adamw": 3e-3, "sgd": 0.1}


@dataclass(frozen=True)
class TrainConfig:
    """How a peer trains (filled by ``loconet peer``, the harness and the benchmark).

    ``options`` is the algorithm's own config (``DiLoCoConfig``, ``StreamingConfig``, a
    plugin's), whose defaults are the algorithm's; None: those defaults.
    """

    algorithm: str = field(default="diloco", metadata={"help": "training algorithm (a registered name)"})
    steps: int = field(default=1000, metadata={"help": "inner steps to train"})
    duration_s: float | None = field(default=None, metadata={"help": "train for this many seconds instead"})
    inner: str = field(
        default="adamw",
        metadata={"help": "inner (client) optimizer: adamw, or sgd (plain SGD, federated learning's usual client)",
                  "choices": INNER_OPTIMIZERS},
    )
    inner_lr: float | None = field(default=None, metadata={
        "help": "learning rate of the inner optimizer; default: its own (adamw 0.003, sgd 0.1)"})
    weight_decay: float = field(default=0.01, metadata={"help": "weight decay of the inner optimizer"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every this many steps (0: only at the end)"})
    round_timeout_s: float = field(default=60.0, metadata={"help": "deadline of one all-reduce attempt"})
    device: str = field(
        default="auto",
        metadata={"help": "where the model trains and evaluates: auto (CUDA when available, else the CPU), cpu, "
                  "cuda or cuda:N"},
    )
    options: Any = field(default=None, metadata={"cli": False})

    def __post_init__(self) -> None:
        algorithm = get_algorithm(self.algorithm)  # ConfigError naming the registered ones
        if self.options is None:
            object.__setattr__(self, "options", algorithm.config())
        elif not isinstance(self.options, algorithm.config):
            raise ConfigError(
                f"algorithm {self.algorithm!r} takes {algorithm.config.__name__} options, "
                f"got {type(self.options).__name__}"
            )
        if self.steps < 1 and self.duration_s is None:
            raise ConfigError("train for at least one step (--steps) or a duration (--duration)")
        if self.duration_s is not None and not (self.duration_s > 0 and math.isfinite(self.duration_s)):
            raise ConfigError(f"--duration must be a positive number of seconds, got {self.duration_s}")
        if self.inner not in INNER_OPTIMIZERS:
            raise ConfigError(f"inner optimizer must be one of {', '.join(INNER_OPTIMIZERS)}, got {self.inner!r}")
        if self.inner_lr is not None and not self.inner_lr > 0:
            raise ConfigError(f"inner lr must be positive, got {self.inner_lr}")
        # The form only: whether this machine has the device is asked where the model is built.
        check_device_spec(self.device)

    @property
    def resolved_inner_lr(self) -> float:
        """The inner learning rate: the config's, else the inner optimizer's own (INNER_LR)."""
        return self.inner_lr if self.inner_lr is not None else INNER_LR[self.inner]

    @classmethod
    def of(cls, algorithm: str = "diloco", **fields: Any) -> TrainConfig:
        """A TrainConfig whose keyword fields go to it or, when they are the algorithm's, to its options."""
        own = {f.name for f in dataclasses.fields(cls)}
        options = get_algorithm(algorithm).config(**{k: v for k, v in fields.items() if k not in own})
        return cls(algorithm=algorithm, options=options, **{k: v for k, v in fields.items() if k in own})


# Runs on one machine (the harness, bench diloco, the demo) train a small model for a few hundred steps,
# so they sync every 50 steps instead of the default 100: enough rounds to see faults and recovery.
LOCAL_SYNC_EVERY = 50


def local_run(algorithm: str = "diloco", steps: int = 400) -> TrainConfig:
    """The training of a short run on this machine: ``steps`` steps, syncing every LOCAL_SYNC_EVERY."""
    return TrainConfig.of(algorithm, steps=steps, sync_every=LOCAL_SYNC_EVERY)


def make_optimizer(model: torch.nn.Module, peer: SyncPeer, config: TrainConfig) -> OuterOptimizer:
    """The registered algorithm's optimizer around the configured inner optimizer."""
    if config.inner == "sgd":
        inner: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=config.resolved_inner_lr, weight_decay=config.weight_decay
        )
    else:
        inner = torch.optim.AdamW(model.parameters(), lr=config.resolved_inner_lr, weight_decay=config.weight_decay)
    return get_algorithm(config.algorithm).make(model, inner, peer, config.options)


def epochs_problem(task: Task, config: TrainConfig, world: int) -> str:
    """Why the algorithm's rounds, counted in epochs of a peer's data (--local-epochs), cannot be counted with this
    task ("" when they can): its data has no size (a stream without end)."""
    epochs = getattr(config.options, "local_epochs", None)
    if epochs is None or task.partition_size(0, max(world, 1)) is not None:
        return ""
    return (f"--local-epochs {epochs:g} counts rounds in epochs of a peer's data, and task {task.name!r} streams "
            "without end: give --sync-every (local steps a round) instead, or a task with a data set (digits)")


class TaskPartitions:
    """Any partition's batches of a task, by step: what a gradient code computes (``optimizers.coded.PartitionData``).

    Partition j of n is the task's stream for rank j of world n, so batch t of it is the same on every
    worker; streams are kept open and read in order, and opened again at a jump (a catch-up, a new roster).
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        self._streams: dict[tuple[int, int], tuple[int, Any]] = {}

    def batch(self, partition: int, partitions: int, step: int) -> Any:
        """Batch ``step`` of partition ``partition`` of ``partitions``."""
        key = (partition, partitions)
        at, stream = self._streams.get(key, (-1, None))
        if stream is None or at != step:
            stream = batch_stream(self.task, partition, partitions, step)
        batch = next(stream)
        self._streams[key] = (step + 1, stream)
        # Streams of another roster size are not read again until the roster changes back.
        for other in [k for k in self._streams if k[1] != partitions]:
            del self._streams[other]
        return batch

    def loss(self, model: torch.nn.Module, partition: int, partitions: int, step: int) -> tuple[torch.Tensor, int]:
        """The task's loss of that batch on model (the batch moved to the model's device), and the batch's samples."""
        batch = self.batch(partition, partitions, step)
        samples = self.task.batch_samples(batch)
        return self.task.loss(model, move_batch(batch, model_device(model))), samples


@dataclass
class Progress:
    """What the loop has done so far (read by displays and heartbeats)."""

    # The run's step (it jumps when the peer skips ahead to the run's), and the steps this process trained.
    step: int = 0
    trained: int = 0
    samples: int = 0
    loss: float = math.nan
    steps_per_s: float = math.nan
    eval_loss: float = math.nan
    rounds: int = 0
    # NoLoCo: the distance of this replica's outer weights from the replicas' mean at the last evaluation.
    spread: float | None = None


class TrainLoop:
    """Runs a task's batches through the optimizer until the step budget, the time budget, or stop."""

    def __init__(
        self,
        task: Task,
        model: torch.nn.Module,
        optimizer: OuterOptimizer,
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
        # A gradient code picks its partitions' batches itself, by step.
        self.partitions = TaskPartitions(task)
        self.progress = Progress(step=start_step)
        # An algorithm that trains whole epochs per round needs the size of this peer's data.
        size = task.partition_size(rank, world)
        if size is not None and hasattr(optimizer, "epoch_samples"):
            optimizer.epoch_samples = size
        problem = epochs_problem(task, config, world)
        if problem:
            raise ConfigError(problem)
        # Called after each step and each eval; the daemon reports and draws progress from them.
        self.on_step: Callable[[Progress], None] | None = None
        self.on_eval: Callable[[int, float], None] | None = None

    def evaluate(self) -> float:
        """Eval loss of the current local model."""
        loss = self.task.evaluate(self.model)
        self.progress.eval_loss = loss
        # An algorithm whose replicas differ (NoLoCo) measures how far apart they are, with the other peers.
        measure = getattr(self.optimizer, "measure_spread", None)
        if measure is not None:
            self.progress.spread = measure()
        if self.on_eval is not None:
            self.on_eval(self.progress.step, loss)
        return loss

    def run(self, stop: threading.Event | None = None) -> Progress:
        """Train until done or stop is set; flush a round in flight; evaluate at the end."""
        cfg = self.config
        started = time.monotonic()
        rate = StepRate()
        self.model.train()
        while not (stop is not None and stop.is_set()):
            if cfg.duration_s is not None and time.monotonic() - started >= cfg.duration_s:
                break
            if cfg.duration_s is None and self.progress.step >= cfg.steps:
                break
            p = self.progress
            if isinstance(self.optimizer, CodedSGD):
                # One round per step, on the batches of the partitions the code gives this worker.
                p.loss, samples = self.optimizer.train_step(self.partitions)
            else:
                batch = next(self.batches)
                samples = self.task.batch_samples(batch)
                # On the model's device, so a user task's own loss gets it there too.
                batch = move_batch(batch, model_device(self.model))
                loss = self.task.loss(self.model, batch)
                loss.backward()
                p.loss = loss.item()  # read once: the optimizer reports this number rather than reading it again
                self.optimizer.step(samples=samples, loss=p.loss)  # it reports step, loss and samples to the run
                self.optimizer.zero_grad()
            # The run's step count is the step: a coded step that caught up applied the rounds it was late for, and
            # a peer the run went on without skipped ahead to the run's step (OuterOptimizer._follow_run_step).
            p.step = max(p.step + 1, getattr(self.optimizer, "global_step", 0))
            p.trained += 1
            p.samples += samples
            p.rounds = self.optimizer.committed_rounds
            p.steps_per_s = rate.tick(time.monotonic())
            if self.on_step is not None:
                self.on_step(p)
            if cfg.eval_every and p.step % cfg.eval_every == 0:
                self.evaluate()
        self.optimizer.flush()
        self.evaluate()
        return self.progress
