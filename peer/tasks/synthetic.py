"""synthetic-lm: a language model on a seeded Markov chain whose entropy rate is known exactly.

The source
    A first-order Markov chain over ``vocab_size`` tokens, drawn once from the
    seed. Tokens are cut into ``clusters`` contiguous blocks ("topics"); row i
    of the transition matrix is ``(1 - leak) * q_i + leak * r_i`` where ``q_i``
    ~ Dirichlet(alpha) over the tokens of i's own cluster and ``r_i`` ~
    Dirichlet(alpha) over the whole vocabulary. Small alpha makes rows sparse-ish
    (a few likely successors), so the chain is far from uniform; the small leak
    makes a sequence stay in one topic for tens of tokens, which is what lets
    the non-iid split give peers clearly different data from the same chain.

What evaluate() scores, and the floor
    A sequence is L + 1 tokens s_0..s_L with s_0 drawn from the stationary
    distribution pi; inputs are s_0..s_{L-1} and targets s_1..s_L, and every
    target position is scored. Each target s_{t+1} has at least its predecessor
    s_t as context, so no position is context-free; by the Markov property the
    best predictor is P[s_t, :], and since s_t ~ pi at every t (pi is
    stationary) the expected loss at every position is the entropy rate

        h = sum_i pi_i * H(P_i)   (nats).

    ``entropy_floor`` is exactly h, the expected loss of that best predictor on
    evaluate()'s data. The eval set is a finite sample, so the oracle's loss on
    it differs from h by Monte-Carlo noise (about 1% at the defaults, 8 x 16 x 64 tokens).

Splits
    "iid": every peer draws sequences with s_0 ~ pi from its own random stream.
    "non-iid": peer r starts its sequences only in the tokens of its own
    clusters (pi restricted to them and renormalised): with world <= clusters,
    peer r owns clusters {c : c % world == r}; with more peers than clusters,
    peer r shares cluster r % clusters with the other peers of that residue.
    The chain is the same for all, so peers' token histograms differ (each
    mostly sees its topics) while the eval set, drawn from pi, is the mixture
    and its floor is still h. With world == 1 both splits are the same.

Sampling is vectorised over the batch (one searchsorted per time step for all
sequences) and deterministic per (seed, rank, world, batch index).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from collectives.errors import ConfigError
from peer.tasks.base import Batch, Task, TaskConfig, check_rank, seeded_rng
from peer.tasks.model import ModelConfig, TransformerLM, build_transformer

logger = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.2
DEFAULT_CLUSTERS = 4
DEFAULT_LEAK = 0.02


def make_chain(vocab_size: int, rng: np.random.Generator, alpha: float, clusters: int, leak: float) -> np.ndarray:
    """A row-stochastic float64 transition matrix (vocab, vocab) with the clustered sparse-Dirichlet structure above."""
    clusters = max(1, min(clusters, vocab_size))
    cluster_of = np.arange(vocab_size) * clusters // vocab_size
    p = np.empty((vocab_size, vocab_size))
    for i in range(vocab_size):
        own = np.flatnonzero(cluster_of == cluster_of[i])
        local = np.zeros(vocab_size)
        local[own] = rng.dirichlet(np.full(len(own), alpha))
        spread = rng.dirichlet(np.full(vocab_size, alpha))
        p[i] = (1.0 - leak) * local + leak * spread
    # guard against underflowed rows; the normalisation is what defines the chain
    p = np.maximum(p, 0.0)
    return p / p.sum(axis=1, keepdims=True)


def stationary_distribution(transition: np.ndarray) -> np.ndarray:
    """The stationary distribution pi (pi P = pi, sum 1) of an irreducible chain, in float64."""
    p = np.asarray(transition, dtype=np.float64)
    n = p.shape[0]
    # pi (P - I) = 0 together with sum(pi) = 1: an overdetermined but consistent linear system
    system = np.vstack([p.T - np.eye(n), np.ones((1, n))])
    rhs = np.zeros(n + 1)
    rhs[-1] = 1.0
    pi = np.linalg.lstsq(system, rhs, rcond=None)[0]
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


def row_entropies(transition: np.ndarray) -> np.ndarray:
    """H(P_i) in nats for every row i (0 log 0 = 0)."""
    p = np.asarray(transition, dtype=np.float64)
    logs = np.log(np.where(p > 0, p, 1.0))
    return -(p * logs).sum(axis=1)


def entropy_rate(transition: np.ndarray, stationary: np.ndarray | None = None) -> float:
    """The chain's entropy rate in nats: sum_i pi_i * H(P_i) (stationary: pi, when already computed).

    SyntheticLMTask's ``entropy_floor``; a test checks it against a two-state chain worked by hand."""
    pi = stationary_distribution(transition) if stationary is None else stationary
    return float(pi @ row_entropies(transition))


def sample_sequences(
    transition: np.ndarray, start: np.ndarray, n: int, length: int, rng: np.random.Generator
) -> np.ndarray:
    """n sequences of ``length`` tokens (int64): s_0 ~ start, s_{t+1} ~ row s_t of ``transition``."""
    vocab = transition.shape[0]
    # each row's cumulative sum ends at exactly 1.0, so the row-shifted array below is sorted
    cumulative = np.minimum(np.cumsum(transition, axis=1), 1.0)
    cumulative[:, -1] = 1.0
    # rows shifted by their index form one sorted array, so one searchsorted serves the whole batch
    flat = (cumulative + np.arange(vocab)[:, None]).ravel()
    u = rng.random((n, length))
    start_cum = np.cumsum(start)
    out = np.empty((n, length), dtype=np.int64)
    out[:, 0] = np.minimum(np.searchsorted(start_cum, u[:, 0] * start_cum[-1], side="right"), vocab - 1)
    for t in range(1, length):
        prev = out[:, t - 1]
        idx = np.searchsorted(flat, u[:, t] + prev, side="right") - prev * vocab
        # rounding can push u past the row's last cumulative value: stay in the row
        out[:, t] = np.clip(idx, 0, vocab - 1)
    return out


class SyntheticLMTask(Task):
    """Next-token prediction on the seeded Markov chain; ``entropy_floor`` is its exact entropy rate."""

    name = "synthetic-lm"
    splits = ("iid", "non-iid")
    reads_data = False

    def __init__(
        self,
        config: TaskConfig,
        alpha: float = DEFAULT_ALPHA,
        clusters: int = DEFAULT_CLUSTERS,
        leak: float = DEFAULT_LEAK,
    ) -> None:
        super().__init__(config)
        if not (alpha > 0 and clusters >= 1 and 0.0 < leak <= 1.0):
            raise ConfigError(
                f"synthetic-lm: need alpha > 0, clusters >= 1, 0 < leak <= 1; got {alpha}, {clusters}, {leak}"
            )
        v = config.vocab_size
        self.transition = make_chain(v, seeded_rng(config.seed, "synthetic-chain"), alpha, clusters, leak)
        self.stationary = stationary_distribution(self.transition)
        self.cluster_of = np.arange(v) * max(1, min(clusters, v)) // v
        self.clusters = int(self.cluster_of.max()) + 1
        self._floor = entropy_rate(self.transition, self.stationary)
        logger.debug("synthetic-lm: vocab %d, entropy floor %.4f nats (log V = %.4f)", v, self._floor, math.log(v))

    @property
    def entropy_floor(self) -> float:
        """Exact best expected eval loss in nats (the chain's entropy rate; see the module docstring)."""
        return self._floor

    def build_model(self) -> TransformerLM:
        """The default transformer at the configured size, initialised from the seed."""
        return build_transformer(self.shape(), self.config.seed)

    def shape(self) -> ModelConfig:
        """The transformer's shape at the configured size."""
        c = self.config
        return ModelConfig(c.vocab_size, c.seq_len, c.d_model, c.n_layers, c.n_heads)

    def model_settings(self) -> tuple[str, ...]:
        """The transformer's shape."""
        return self.shape().settings()

    def start_distribution(self, rank: int, world: int) -> np.ndarray:
        """Distribution of s_0 for peer ``rank`` of ``world``: pi ("iid") or pi on the peer's clusters ("non-iid")."""
        check_rank(rank, world)
        if self.config.split == "iid" or world == 1:
            return self.stationary
        if world <= self.clusters:
            mine = self.cluster_of % world == rank
        else:
            mine = self.cluster_of == rank % self.clusters
        start = np.where(mine, self.stationary, 0.0)
        return start / start.sum()

    def batch(self, rank: int, world: int, index: int) -> Batch:
        """Training batch number ``index`` of peer ``rank`` of ``world`` (what ``batches`` yields at that step)."""
        c = self.config
        rng = seeded_rng(c.seed, "synthetic-train", rank, world, index)
        seqs = sample_sequences(self.transition, self.start_distribution(rank, world), c.batch_size, c.seq_len + 1, rng)
        return _to_batch(seqs)

    def batches(self, rank: int, world: int, start: int = 0) -> Iterator[Batch]:
        """Infinite stream of batches ``start, start + 1, ...`` (start > 0 resumes a stream)."""
        check_rank(rank, world)  # here, not at the first next()
        return _stream(self, rank, world, start)

    def eval_set(self) -> Sequence[Batch]:
        """``eval_batches`` batches drawn from pi with a seed of their own; identical for every peer."""
        c = self.config
        rng = seeded_rng(c.seed, "synthetic-eval")
        seqs = sample_sequences(self.transition, self.stationary, c.eval_batches * c.batch_size, c.seq_len + 1, rng)
        return [_to_batch(chunk) for chunk in np.split(seqs, c.eval_batches)]


def _stream(task: SyntheticLMTask, rank: int, world: int, index: int) -> Iterator[Batch]:
    while True:
        yield task.batch(rank, world, index)
        index += 1


def _to_batch(seqs: np.ndarray) -> Batch:
    t = torch.from_numpy(np.ascontiguousarray(seqs))
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()
