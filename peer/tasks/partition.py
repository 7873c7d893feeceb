"""How a labelled data set is divided among peers: iid, or non-iid by Dirichlet(alpha) label proportions.

Both functions are pure and deterministic: equal arguments give equal
partitions on every machine. A partition is a list of ``world`` sorted int64
index arrays that are disjoint, cover every example exactly once, and are all
non-empty (a peer with no data could not train a round).

``dirichlet_partition`` is the split of Hsu et al., "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification" (2019),
as in Flower's ``DirichletPartitioner``: for every class k, proportions
p_k ~ Dirichlet(alpha, ..., alpha) over the peers, and the examples of class k
(shuffled) are cut at the cumulative proportions. Large alpha gives every peer
nearly the global label mix (alpha=100 is close to iid); small alpha gives
each peer a few classes (at alpha=0.1 most peers see mostly 1-3 of 10).

Empty peers. Small alpha can leave a peer with no example. Flower redraws
until every partition reaches ``min_partition_size`` and fails after 10
tries; here no redraw is needed: while a peer holds fewer than ``min_size``
examples it takes one, chosen by the seeded generator, from the currently
largest partition (lowest rank on ties). That moves at most
``world * min_size`` examples, keeps the split deterministic, and always
succeeds when ``len(labels) >= world * min_size`` (a ConfigError otherwise).
"""

from __future__ import annotations

import math

import numpy as np

from collectives.errors import ConfigError
from peer.tasks.base import seeded_rng


def iid_partition(n_examples: int, world: int, seed: int) -> list[np.ndarray]:
    """A seeded random permutation of ``range(n_examples)`` cut into ``world`` parts whose sizes differ by at most 1."""
    _check(n_examples, world, 1)
    order = seeded_rng(seed, "iid-partition", world).permutation(n_examples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, world)]


def dirichlet_partition(labels: np.ndarray, world: int, alpha: float, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Per-class Dirichlet(alpha) split of ``labels``' indices over ``world`` peers, each holding >= ``min_size``."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ConfigError(f"dirichlet_partition: labels must be one label per example (1-D), got shape {labels.shape}")
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"dirichlet_partition: alpha must be a finite number > 0, got {alpha!r}")
    if not (isinstance(min_size, int) and min_size >= 1):
        raise ConfigError(f"dirichlet_partition: min_size must be an int >= 1, got {min_size!r}")
    _check(len(labels), world, min_size)
    rng = seeded_rng(seed, "dirichlet-partition", world)
    chunks: list[list[np.ndarray]] = [[] for _ in range(world)]
    for label in np.unique(labels):  # sorted: the draws happen in a fixed order
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        proportions = rng.dirichlet(np.full(world, float(alpha)))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for rank, chunk in enumerate(np.split(members, cuts)):
            chunks[rank].append(chunk)
    parts = [np.concatenate(c) for c in chunks]
    for rank in range(world):
        while len(parts[rank]) < min_size:
            # largest first, then lowest rank: it holds more than min_size since sum >= world * min_size
            donor = max(range(world), key=lambda q: (len(parts[q]), -q))
            pick = int(rng.integers(len(parts[donor])))
            parts[rank] = np.append(parts[rank], parts[donor][pick])
            parts[donor] = np.delete(parts[donor], pick)
    return [np.sort(p).astype(np.int64) for p in parts]


def _check(n_examples: int, world: int, min_size: int) -> None:
    if not (isinstance(world, int) and world >= 1):
        raise ConfigError(f"a partition needs world >= 1 peers, got {world!r}")
    if n_examples < world * min_size:
        raise ConfigError(
            f"cannot give each of {world} peers at least {min_size} example(s) from {n_examples}: "
            "use fewer peers or more data"
        )
