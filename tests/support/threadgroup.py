"""An in-memory group of peers for testing optimizer math: each round is the exact aggregate of the contributions.

The codec is ignored (rounds are lossless); the aggregator is the one the peers pass (weighted mean by default).
"""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass

import torch

from collectives.aggregators import aggregate_rows, make_aggregator
from collectives.parts import flatten, unflatten_like


@dataclass
class Result:
    value: list[torch.Tensor]
    round_id: int


class ThreadGroup:
    """n peers (one per training thread); a round completes when all n contributed."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.lock = threading.Lock()
        self.round_id = 0
        self.pending: dict[int, tuple[torch.Tensor, float, list, concurrent.futures.Future]] = {}
        self.peers = [ThreadPeer(self, rank) for rank in range(n)]

    def submit(self, rank: int, tensors, weight: float, aggregator=None) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.lock:
            if rank in self.pending:
                raise RuntimeError(f"rank {rank} submitted twice in one round")
            self.pending[rank] = (flatten(list(tensors)), weight, list(tensors), future)
            if len(self.pending) < self.n:
                return future
            self.round_id += 1
            ranks = sorted(self.pending)
            rows = torch.stack([self.pending[r][0] for r in ranks])
            mean = aggregate_rows(make_aggregator(aggregator or "mean"), rows, [self.pending[r][1] for r in ranks])
            done, self.pending = self.pending, {}
        for r in ranks:
            done[r][3].set_result(Result(unflatten_like(mean.clone(), done[r][2]), self.round_id))
        return future


class ThreadPeer:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group = group
        self.rank = rank

    def sync_async(self, tensors, weight=1.0, tag="", codec=None, aggregator=None) -> concurrent.futures.Future:
        return self.group.submit(self.rank, tensors, weight, aggregator)

    def sync(self, tensors, weight=1.0, tag="", codec=None, aggregator=None) -> Result:
        return self.sync_async(tensors, weight, tag, codec, aggregator).result(timeout=60)
