"""An in-memory group of peers for testing optimizer math: each round is the exact aggregate of the contributions.

The codec is ignored (rounds are lossless); the aggregator is the one the peers pass (weighted mean by default).
"""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass

import torch

from collectives.membership.roundplan import RoundPlan
from collectives.reduce.aggregators import aggregate_rows, make_aggregator
from collectives.reduce.parts import flatten, unflatten_like


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
        self.pending: dict[int, tuple] = {}  # rank -> (flat, weight, tensors, future, within, prepare)
        self.peers = [ThreadPeer(self, rank) for rank in range(n)]

    def submit(self, rank: int, tensors, weight: float, aggregator=None, within=None,
               prepare=None) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.lock:
            if rank in self.pending:
                raise RuntimeError(f"rank {rank} submitted twice in one round")
            self.pending[rank] = (flatten(list(tensors)), weight, list(tensors), future, within, prepare)
            if len(self.pending) < self.n:
                return future
            self.round_id += 1
            ranks = sorted(self.pending)
            # The plan a coordinator would send: every peer, by id; ``within`` cuts it into groups (NoLoCo's pairs).
            plan = RoundPlan(action="round", round_id=self.round_id, members=tuple((f"peer{r}", "") for r in ranks))
            # What each member sends: its flat contribution, through its prepare hook (as a real round's members do).
            sent = {
                r: self.pending[r][0] if self.pending[r][5] is None else self.pending[r][5](plan, self.pending[r][0])
                for r in ranks
            }
            results = {}
            for r in ranks:
                chosen = self.pending[r][4]
                group = ranks if chosen is None else sorted(int(pid[4:]) for pid in chosen(plan, rank=r))
                rows = torch.stack([sent[g] for g in group])
                results[r] = aggregate_rows(
                    make_aggregator(aggregator or "mean"), rows, [self.pending[g][1] for g in group]
                )
            done, self.pending = self.pending, {}
        for r in ranks:
            done[r][3].set_result(Result(unflatten_like(results[r].clone(), done[r][2]), self.round_id))
        return future


class ThreadPeer:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group = group
        self.rank = rank
        self.peer_id = f"peer{rank}"

    def sync_async(self, tensors, weight=1.0, tag="", codec=None, aggregator=None, within=None,
                   own_state=False, prepare=None) -> concurrent.futures.Future:
        chosen = None if within is None else (lambda plan, rank: within(plan))
        return self.group.submit(self.rank, tensors, weight, aggregator, chosen, prepare)

    def sync(self, tensors, weight=1.0, tag="", codec=None, aggregator=None, within=None, own_state=False,
             prepare=None) -> Result:
        return self.sync_async(tensors, weight, tag, codec, aggregator, within, own_state, prepare).result(timeout=60)
