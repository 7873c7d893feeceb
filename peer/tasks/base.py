"""The training-task interface: what a peer trains, on which data, and how it is scored.

A task builds the model, yields each peer's batches and evaluates the model on
a held-out set that is the same for every peer. Everything is deterministic
from ``TaskConfig.seed``: the model's initial weights, every peer's batch
stream (per seed, rank, world and batch index) and the eval set.

The built-in language models (``peer/tasks/registry.py``) take token sequences: a batch
is ``(inputs, targets)``, two int64 tensors of shape ``(batch_size, seq_len)``
with ``targets[:, t] == inputs[:, t + 1]`` (the next token); the model maps
inputs to logits of shape ``(batch_size, seq_len, vocab)``. The ``digits``
classifier takes ``(images, labels)``: float32 ``(batch, 64)`` and int64
``(batch,)``; it also scores ``accuracy``. A user task
(``"package.module:function"``) may use any model and batch format as long as
it provides its own ``loss`` (see ``peer.tasks.user``).
"""

from __future__ import annotations

import inspect
import itertools
import math
import threading
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from collectives.errors import ConfigError
from peer.device import model_device

Batch = tuple[torch.Tensor, torch.Tensor]
"""(inputs, targets) of one training or eval step."""

SPLITS = ("iid", "non-iid", "by-file")
"""Values of ``TaskConfig.split``; each task says which it implements (``Task.splits``).

"iid": every peer draws from the whole training data. "non-iid": a task-specific skew (synthetic-lm:
each peer's own topics; text-lm: a contiguous shard per peer). "by-file": text-lm on a folder, each
peer reads its own files. Dirichlet label skew is not a split name but ``TaskConfig.dirichlet``.
"""


def batch_stream(source: object, rank: int, world: int, start: int = 0) -> Iterator[Batch]:
    """``source.batches(rank, world)`` from batch number ``start``; jumps there when ``batches`` takes ``start``."""
    if start and _takes_start(source.batches):
        return iter(source.batches(rank, world, start=start))
    stream = iter(source.batches(rank, world))
    # A stream that cannot start elsewhere is drawn and discarded up to start.
    return itertools.islice(stream, start, None) if start else stream


def _takes_start(fn: object) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins and other callables without a signature
        return False
    return "start" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@dataclass(frozen=True)
class TaskConfig:
    """Everything a task is built from; equal configs give identical models, batches and eval sets."""

    # Everything is deterministic from the seed (model init, data).
    seed: int = field(default=0, metadata={"help": "seed of the model's initial weights and of the data"})
    batch_size: int = field(default=16, metadata={"help": "sequences (digits: images) per batch"})
    seq_len: int = field(default=64, metadata={"help": "tokens per sequence"})
    # How the data is divided among peers.
    split: str = field(default="iid", metadata={"help": "how the data is divided among peers", "choices": SPLITS})
    dirichlet: float | None = field(
        default=None,
        metadata={"help": "split labels across peers by Dirichlet(alpha); small alpha: very non-IID (digits)"},
    )
    # Model size (small defaults).
    d_model: int = field(default=64, metadata={"help": "model width"})
    n_layers: int = field(default=2, metadata={"help": "transformer layers", "flag": "layers"})
    n_heads: int = field(default=4, metadata={"help": "attention heads", "flag": "heads"})
    vocab_size: int = field(default=64, metadata={"help": "synthetic-lm vocabulary"})
    data: str | None = field(default=None, metadata={"help": "text-lm: a UTF-8 text file or a folder of them"})
    eval_batches: int = field(default=8, metadata={"help": "held-out batches an evaluation averages"})

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigError(f"TaskConfig: {what}")

        need(isinstance(self.seed, int) and self.seed >= 0, f"seed must be an int >= 0, got {self.seed!r}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.seq_len >= 1, f"seq_len must be >= 1, got {self.seq_len}")
        need(self.split in SPLITS, f"split must be one of {', '.join(SPLITS)}; got {self.split!r}")
        need(
            self.dirichlet is None
            or (
                isinstance(self.dirichlet, int | float)
                and not isinstance(self.dirichlet, bool)
                and math.isfinite(self.dirichlet)
                and self.dirichlet > 0
            ),
            f"dirichlet (alpha) must be a number > 0, got {self.dirichlet!r}",
        )
        need(
            self.dirichlet is None or self.split == "iid",
            f"dirichlet replaces the split: leave split at 'iid' when setting dirichlet (got split {self.split!r})",
        )
        need(
            self.d_model >= 1 and self.n_layers >= 0 and self.n_heads >= 1,
            "d_model, n_heads must be >= 1 and n_layers >= 0",
        )
        need(
            self.d_model % self.n_heads == 0,
            f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})",
        )
        need(self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}")
        need(self.eval_batches >= 1, f"eval_batches must be >= 1, got {self.eval_batches}")
        # An unset $DATA gives --data "": read as the working directory, every file in it became the corpus.
        need(self.data is None or self.data.strip() != "", "data is empty: give a text file or a folder of them")

    @property
    def partitioning(self) -> str:
        """How the data is divided: ``split``, or "dirichlet" when ``dirichlet`` is set."""
        return "dirichlet" if self.dirichlet is not None else self.split


class Task(ABC):
    """A training task: model, per-peer batches, loss and a fixed held-out evaluation.

    Subclasses implement ``build_model`` and ``batches``, and either ``eval_set``
    (then ``evaluate`` averages ``loss`` over it) or ``evaluate`` itself.
    ``loss`` defaults to next-token cross-entropy of a model that returns logits.
    """

    name: str = "task"
    # The partitionings (TaskConfig.partitioning) this task implements; None: any (a user task reads the config).
    splits: tuple[str, ...] | None = None
    # Whether the task reads TaskConfig.data (a user task may): one that does not refuses a --data it would ignore.
    reads_data: bool = True

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self._eval_cache: list[Batch] | None = None
        if config.data is not None and not self.reads_data:
            raise ConfigError(f"task {self.name!r} reads no --data (text-lm does): leave it out, or choose --task "
                              "text-lm to train on that text")
        if self.splits is not None and config.partitioning not in self.splits:
            raise ConfigError(
                f"task {self.name!r} does not implement the split {config.partitioning!r}; its splits: "
                f"{', '.join(self.splits)} (--split {'|'.join(SPLITS)}, or --dirichlet ALPHA for 'dirichlet')"
            )

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """A freshly initialised model; the same weights for the same seed, no global RNG side effects."""

    def model_settings(self) -> tuple[str, ...]:
        """What the model is, in parts a run's peers must agree on (the coordinator refuses a joiner whose parts
        differ); () when the task does not say. Name what the parameters' shapes do not show (attention heads)."""
        return ()

    @abstractmethod
    def batches(self, rank: int, world: int, start: int = 0) -> Iterator[Batch]:
        """Peer ``rank`` of ``world``'s infinite, deterministic stream of training batches, from number ``start``.

        A resumed or joining peer continues its stream at ``start``. A subclass whose
        ``batches`` takes no ``start`` still works: ``batch_stream`` skips by drawing.
        """

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy in nats of the model's next-token logits (scalar tensor)."""
        inputs, targets = batch
        device = model_device(model)
        logits = model(inputs.to(device))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.to(device).reshape(-1))

    def eval_set(self) -> Sequence[Batch]:
        """The fixed held-out batches (same for every peer and call); override this or ``evaluate``."""
        raise NotImplementedError(f"task {self.name!r} defines neither eval_set() nor evaluate()")

    def evaluate(self, model: torch.nn.Module) -> float:
        """Mean loss over the held-out set, without gradients, in eval mode (the previous modes are restored)."""
        # getattr: a user subclass may not call Task.__init__
        if getattr(self, "_eval_cache", None) is None:
            self._eval_cache = list(self.eval_set())
        total, count = 0.0, 0
        with evaluating(model):
            for batch in self._eval_cache:
                n = int(batch[1].numel())  # weight by targets: a mean over every scored token
                total += float(self.loss(model, batch)) * n
                count += n
        return total / count

    @property
    def entropy_floor(self) -> float | None:
        """The best possible eval loss in nats, when known exactly (synthetic data); else None."""
        return None

    def samples_per_batch(self) -> int:
        """Samples in one training batch (weights a peer's contribution)."""
        return self.config.batch_size

    def batch_samples(self, batch: Batch) -> int:
        """Samples in this training batch; a task whose batches vary (an epoch's last one) counts them."""
        return self.samples_per_batch()

    def accuracy(self, model: torch.nn.Module) -> float | None:
        """Fraction of the held-out set classified correctly, for a classification task; None: this task has none."""
        return None

    def partition_size(self, rank: int, world: int) -> int | None:
        """Training examples peer ``rank`` of ``world`` holds (to train "E epochs" of them); None: not a finite set."""
        return None


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no grad inside; every submodule's previous train/eval mode restored after."""
    # model.train(was_training) would flatten submodules whose modes differed; restore each one
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def check_rank(rank: int, world: int) -> None:
    """Raise ConfigError unless 0 <= rank < world."""
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ConfigError(f"need 0 <= rank < world with world >= 1; got rank={rank!r}, world={world!r}")


# torch's global CPU generator is one per process: models built from a seed in several threads (the
# peers of bench federated) take turns, or one thread's seed would draw another's weights.
_GLOBAL_RNG = threading.Lock()


@contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Inside, torch's global generator is seeded with ``seed``; its state is restored after, and other threads wait."""
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def seeded_rng(seed: int, stream: str, *keys: int) -> np.random.Generator:
    """An independent numpy generator for (seed, stream name, keys...); stable across runs and platforms."""
    # crc32 rather than hash(): str hashes are salted per process
    return np.random.default_rng([seed, zlib.crc32(stream.encode()), *keys])

