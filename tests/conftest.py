"""Shared fixtures: in-process collective endpoints on 127.0.0.1 (ports chosen by the OS).

Tests marked ``cuda`` are skipped, with the reason, where torch sees no CUDA device. The files run slowest
first (``support/durations.py``), so the two xdist workers of the README's command finish together.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from collectives.allreduce import Collective
from collectives.net.transport import Transport
from collectives.net.transportconfig import TransportConfig
from collectives.reduce.inbox import Group
from support.durations import load, slowest_first

CUDA_SKIP_REASON = "CUDA is not available (torch.cuda.is_available() is False)"


def pytest_configure(config: pytest.Config) -> None:
    """Keep the files in the order pytest_collection_modifyitems gives them (xdist would put the most tests first)."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the files slowest first (tests/support/durations.py); skip the tests marked ``cuda`` where there is
    no CUDA device, saying why."""
    order = {nodeid: i for i, nodeid in enumerate(slowest_first((item.nodeid for item in items), load()))}
    items.sort(key=lambda item: order[item.nodeid])
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


class LocalEndpoints:
    """n collective endpoints in this process, each with its own transport and event-loop thread."""

    def __init__(self, n: int, run_id: str = "test", **transport_options) -> None:
        self.run_id = run_id
        self.transports = [Transport(TransportConfig(**transport_options)) for _ in range(n)]
        self.collectives = [Collective(t, run_id) for t in self.transports]
        self.addresses = tuple(t.start(c.handlers()) for t, c in zip(self.transports, self.collectives))
        self._rounds = itertools.count(1)

    def groups(self, epoch: int = 0, round_id: int | None = None) -> list[Group]:
        """One Group per endpoint for a fresh round."""
        rid = next(self._rounds) if round_id is None else round_id
        return [Group(self.run_id, epoch, rid, self.addresses, r) for r in range(len(self.addresses))]

    def close(self) -> None:
        for t in self.transports:
            t.close()


@pytest.fixture
def endpoints():
    """Factory of LocalEndpoints that closes them all after the test."""
    made: list[LocalEndpoints] = []

    def make(n: int, **options) -> LocalEndpoints:
        e = LocalEndpoints(n, **options)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()
