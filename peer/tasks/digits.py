"""digits: classify scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes) with a small MLP.

The data
    ``sklearn.datasets.load_digits`` ships inside scikit-learn (no download;
    ``pip install 'loconet[federated]'``). Pixels (0..16) are scaled to [0, 1]
    as float32; a batch is ``(images, labels)``: float32 ``(n, 64)`` and int64
    ``(n,)``.

Held-out set
    20% of every class (rounded), chosen by a fixed generator that does not
    depend on ``TaskConfig.seed``: 359 images, the same for every peer, seed
    and call, so accuracies compare across seeds. ``evaluate`` is the mean
    cross-entropy over all of it, ``accuracy`` the fraction classified
    correctly (``eval_batches`` is not used).

Splits (``TaskConfig.partitioning``)
    "iid": the 1,438 training images are dealt out by a seeded permutation,
    sizes differing by at most one. "dirichlet" (``--dirichlet ALPHA``):
    per-class Dirichlet(alpha) proportions (``peer.tasks.partition``), every
    peer holding at least one image. "non-iid" is refused: label skew has a
    strength, so say it with ``--dirichlet`` (0.1: a few classes per peer,
    100: nearly iid). Partitions depend on (seed, world).

Batches
    Like a shuffling DataLoader that keeps its last partial batch: epoch e of
    peer r is a permutation of r's partition drawn from (seed, rank, world,
    e), cut into ``ceil(m / batch_size)`` batches for a partition of m
    images, the last holding the remainder. So ``E * batches_per_epoch``
    batches show every image of the partition exactly E times; a partition
    smaller than ``batch_size`` gives one batch per epoch, the whole
    partition. ``samples_per_batch`` is the configured ``batch_size`` (the
    nominal size); ``partition_size`` gives the exact count to weight by.

The model
    ``64 -> d_model -> 10`` with a ReLU (``fc1``, ``fc2``; ``d_model`` is the
    hidden width, 64 by default), PyTorch's default initialisation drawn from
    the seed alone. ``seq_len``, ``vocab_size``, ``n_layers`` and ``n_heads``
    do not apply.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from collectives.errors import ConfigError
from peer.tasks.base import Batch, Task, TaskConfig, check_rank, evaluating, seeded_rng, seeded_torch
from peer.tasks.partition import dirichlet_partition, iid_partition

logger = logging.getLogger(__name__)

HOLDOUT_FRACTION = 0.2
HOLDOUT_SEED = 0  # fixed: the held-out set is the same whatever the run's seed
CLASSES = 10
PIXELS = 64
MIN_PARTITION = 1  # every peer holds at least this many training images


@functools.cache
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images as float32 (1797, 64) in [0, 1] and their int64 labels; read-only, loaded once."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as e:
        raise ConfigError(f"the digits task needs scikit-learn ({e}): pip install 'loconet[federated]'") from e
    bunch = sklearn_load_digits()
    images = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def holdout_indices(labels: np.ndarray) -> np.ndarray:
    """Sorted indices of the held-out images: round(20%) of every class, by a fixed generator."""
    rng = seeded_rng(HOLDOUT_SEED, "digits-holdout")
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen.append(rng.choice(members, size=round(HOLDOUT_FRACTION * len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


class DigitsMLP(nn.Module):
    """Image (n, 64) -> logits (n, 10) through one ReLU hidden layer."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(PIXELS, hidden)
        self.fc2 = nn.Linear(hidden, CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (n, 64) -> logits (n, 10)."""
        return self.fc2(F.relu(self.fc1(images)))


class DigitsTask(Task):
    """Handwritten-digit classification; the loss is cross-entropy of the logits (``Task.loss``)."""

    name = "digits"
    splits = ("iid", "dirichlet")
    reads_data = False
    # A classification task: the number of labels (what a labelflip attack flips).
    classes = CLASSES

    def __init__(self, config: TaskConfig) -> None:
        super().__init__(config)
        images, labels = load_digits()
        held = holdout_indices(labels)
        train = np.setdiff1d(np.arange(len(labels)), held)
        self.train_images, self.train_labels = images[train], labels[train]
        self.eval_images, self.eval_labels = images[held], labels[held]
        self._partitions: dict[int, list[np.ndarray]] = {}
        logger.debug("digits: %d training and %d held-out images", len(train), len(held))

    def model_settings(self) -> tuple[str, ...]:
        """The MLP's hidden width."""
        return ("model mlp", f"hidden {self.config.d_model}")

    def build_model(self) -> DigitsMLP:
        """The MLP with ``d_model`` hidden units, initialised from the seed; the global RNG is left untouched."""
        with seeded_torch(self.config.seed):
            return DigitsMLP(self.config.d_model)

    def partition(self, rank: int, world: int) -> np.ndarray:
        """Sorted indices (into the training images) that peer ``rank`` of ``world`` holds."""
        check_rank(rank, world)
        parts = self._partitions.get(world)
        if parts is None:
            c = self.config
            if c.dirichlet is None:
                parts = iid_partition(len(self.train_labels), world, c.seed)
            else:
                parts = dirichlet_partition(self.train_labels, world, c.dirichlet, c.seed, MIN_PARTITION)
            self._partitions[world] = parts
        return parts[rank]

    def batch_samples(self, batch: Batch) -> int:
        """The images in this batch: an epoch's last batch may be short, and FedAvg weighs by samples."""
        return int(batch[1].shape[0])

    def partition_size(self, rank: int, world: int) -> int:
        """Number of training images peer ``rank`` of ``world`` holds."""
        return len(self.partition(rank, world))

    def batches_per_epoch(self, rank: int, world: int) -> int:
        """Batches in one pass over peer ``rank``'s partition: ceil(partition size / batch size)."""
        return math.ceil(self.partition_size(rank, world) / self.config.batch_size)

    def batch(self, rank: int, world: int, index: int) -> Batch:
        """Training batch number ``index`` of peer ``rank`` of ``world`` (what ``batches`` yields at that step)."""
        mine = self.partition(rank, world)
        size = self.config.batch_size
        epoch, within = divmod(index, self.batches_per_epoch(rank, world))
        order = seeded_rng(self.config.seed, "digits-train", rank, world, epoch).permutation(len(mine))
        chosen = mine[order[within * size : (within + 1) * size]]
        return torch.from_numpy(self.train_images[chosen]), torch.from_numpy(self.train_labels[chosen])

    def batches(self, rank: int, world: int, start: int = 0) -> Iterator[Batch]:
        """Infinite stream of batches ``start, start + 1, ...`` (start > 0 resumes a stream)."""
        self.partition(rank, world)  # fail here, not at the first next(), on a bad rank or too many peers
        return _stream(self, rank, world, start)

    def eval_set(self) -> Sequence[Batch]:
        """The whole held-out set as one batch; the same for every peer, seed and call."""
        return [(torch.from_numpy(self.eval_images.copy()), torch.from_numpy(self.eval_labels.copy()))]

    def accuracy(self, model: torch.nn.Module) -> float:
        """Fraction of the held-out images whose largest logit is the true label (eval mode, no grad)."""
        device = next(model.parameters()).device
        with evaluating(model):
            predicted = model(torch.from_numpy(self.eval_images.copy()).to(device)).argmax(dim=1).cpu()
        return float((predicted == torch.from_numpy(self.eval_labels)).double().mean())


def _stream(task: DigitsTask, rank: int, world: int, index: int) -> Iterator[Batch]:
    while True:
        yield task.batch(rank, world, index)
        index += 1
