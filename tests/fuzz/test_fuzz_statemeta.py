"""Fuzzing what a peer adopts from a fetched state's metadata (``load_snapshot`` of every kind of optimizer).

The run's digest covers a state's tensors, not the JSON metadata beside them (docs/security.md): the step
count, a schedule's cursor, the privacy accountant's rates, the backup workers' window, a sequential code's
scheme. A donor may send any JSON there that ``statesync.format`` lets through (an object of at most 1 MiB, finite
numbers). Each example takes a real state of one optimizer, changes or deletes a few values anywhere in its
metadata, and has a fresh peer load it.

What must hold: the peer adopts the state or refuses it with a LoconetError (a ConfigError that says what is
wrong) and is then as it was, never another exception, an allocation the numbers ask for, or a hang.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from hypothesis import strategies as st

from collectives.errors import LoconetError
from collectives.statesync import StateSnapshot, state_digest
from optimizers.asyncdiloco import AsyncDiLoCo
from optimizers.coded import CodedSGD, SyncSGDConfig
from optimizers.diloco import DiLoCo
from optimizers.federated import FedAvg, FedConfig
from optimizers.noloco import NoLoCo
from optimizers.peers import LocalPeer
from optimizers.privacy import DPConfig
from optimizers.seqcoded import SeqSGCConfig, SequentialCodedSGD
from optimizers.streaming import StreamingConfig, StreamingDiLoCo


class Regression:
    """Batch ``step`` of partition p of P: 3 seeded samples of a linear target (the coded optimizers' data)."""

    def loss(self, model: torch.nn.Module, partition: int, partitions: int, step: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(step * 1009 + partition)
        x = torch.randn(3, 4, generator=g)
        return ((model(x).squeeze(-1) - x.sum(-1)) ** 2).mean(), 3


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1)


@dataclass(frozen=True)
class Kind:
    """An optimizer: how to build one on a LocalPeer, and how it trains a step."""

    name: str
    build: Callable[[torch.nn.Module], Any]
    coded: bool = False

    def trained(self, steps: int) -> Any:
        m = model()
        opt = self.build(m)
        for _ in range(steps):
            if self.coded:
                opt.train_step(Regression())
            else:
                m(torch.randn(2, 4)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        return opt


def _sgd(m: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.1)


KINDS = (
    Kind("diloco", lambda m: DiLoCo(m, _sgd(m), LocalPeer(), sync_every=2)),
    Kind(
        "streaming",
        lambda m: StreamingDiLoCo(m, _sgd(m), LocalPeer(), StreamingConfig(sync_every=4, fragments=2, overlap=1)),
    ),
    Kind("async-diloco", lambda m: AsyncDiLoCo(m, _sgd(m), LocalPeer(), sync_every=2)),
    Kind("noloco", lambda m: NoLoCo(m, _sgd(m), LocalPeer(), sync_every=2)),
    Kind(
        "fedavg+dp",
        lambda m: FedAvg(m, _sgd(m), LocalPeer(), FedConfig(sync_every=2, dp=DPConfig(clip=1.0, min_members=1))),
    ),
    Kind("sync-sgd+backup", lambda m: CodedSGD(m, _sgd(m), LocalPeer(), SyncSGDConfig(dynamic_k=True)), coded=True),
    Kind("seq-sgc m-sgc", lambda m: SequentialCodedSGD(m, _sgd(m), LocalPeer(), SeqSGCConfig(window=3)), coded=True),
    Kind(
        "seq-sgc sr-sgc",
        lambda m: SequentialCodedSGD(m, _sgd(m), LocalPeer(), SeqSGCConfig(scheme="sr-sgc")),
        coded=True,
    ),
)


@cache
def snapshot_of(index: int) -> StateSnapshot:
    """A real state of KINDS[index] after a few rounds (built once)."""
    return KINDS[index].trained(6).snapshot()


# What a hostile donor may put in place of a value: JSON only (no NaN or Inf: statesync.format refuses them).
values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([0, 1, -1, 2**31, 2**53 + 1, 10**12]),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6),
    st.lists(st.one_of(st.integers(-3, 10**9), st.floats(-2.0, 2.0), st.text(max_size=2)), max_size=4),
    st.lists(st.lists(st.integers(-2, 10**9), max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-2, 10**9), max_size=2),
)
# A change: a path of child choices into the metadata, and a new value there (None in the pair: delete it).
changes = st.lists(st.tuples(st.lists(st.integers(0, 1000), min_size=1, max_size=5), st.booleans(), values),
                   min_size=1, max_size=3)


def changed(meta: dict, edits: list[tuple[list[int], bool, Any]]) -> dict:
    """A copy of meta with each edit applied: follow the path's choices down the tree, then set or delete."""
    meta = copy.deepcopy(meta)
    for path, delete, value in edits:
        node: Any = meta
        for depth, choice in enumerate(path):
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = keys[choice % len(keys)]
            child = node[key]
            if depth == len(path) - 1 or not isinstance(child, (dict, list)) or not child:
                if delete and isinstance(node, dict):
                    del node[key]
                else:
                    node[key] = value
                break
            node = child
    return meta


def test_a_peer_adopts_any_states_metadata_or_refuses_it_with_a_config_error(fuzz):
    def check(index: int, edits: list) -> None:
        source = snapshot_of(index)
        state = StateSnapshot(round_id=source.round_id, tensors=dict(source.tensors), meta=changed(source.meta, edits))
        peer = KINDS[index].build(model())
        before = peer.snapshot()
        try:
            peer.load_snapshot(state)
        except LoconetError:
            # Refused before anything changed: the peer's state is what it was.
            after = peer.snapshot()
            assert (after.round_id, state_digest(after), after.meta) == (
                before.round_id, state_digest(before), before.meta)

    fuzz.run(check, st.integers(0, len(KINDS) - 1), changes)
